//! The one step that looks at the host: where the configuration files are
//! (`HOME`), and, once they are parsed ([`crate::config`] looks at nothing
//! else), the users and groups they name become ids and systemd's sockets
//! are noticed, once at startup.

use std::net::ToSocketAddrs;

use crate::config::{ADDRESS_FORM, Address, ConfigError, Endpoint, Settings, TcpSpec};
use crate::os::sys;
use crate::os::systemd;

/// The files read when `-c` is not given, in order; later files win:
/// `/etc/staps/staps.conf`, then `~/.staps.conf` (`HOME`).
pub(crate) fn default_files() -> Vec<std::path::PathBuf> {
    let mut files = vec![std::path::PathBuf::from("/etc/staps/staps.conf")];
    if let Some(home) = std::env::var_os("HOME") {
        files.push(std::path::Path::new(&home).join(".staps.conf"));
    }
    files
}

/// What the configuration names on this host.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// The TCP listeners, host names looked up.
    pub tcp: Vec<TcpSpec>,
    /// The metrics listener, its host name looked up.
    pub metrics: Option<Endpoint>,
    /// User and group to switch to after binding (when root).
    pub run_as: Option<(libc::uid_t, libc::gid_t)>,
    /// Owner and group of the socket files; `None` leaves one as it is.
    pub socket_owner: SocketOwner,
    /// systemd passed listening sockets, which replace the configured ones.
    pub socket_activated: bool,
}

/// Look up what `settings` names; errors are configuration errors (exit 78).
pub fn resolve(settings: &Settings) -> Result<Host, ConfigError> {
    let socket_activated = systemd::socket_activated();
    if settings.sockets.is_empty() && settings.tcp.is_empty() && !socket_activated {
        return Err(ConfigError::of_whole(
            settings,
            "listeners",
            "no listener configured: set [staps] socket, port or listen, or give --socket, --port \
             or --listen (--socket alone turns the socket off)"
                .into(),
        ));
    }
    let (run_as, socket_owner) = identities(settings)?;
    let tcp = settings
        .tcp
        .iter()
        .map(|spec| match spec {
            TcpSpec::Addr(address) => {
                look_up(settings, "[staps] listen", address).map(TcpSpec::Addr)
            }
            other => Ok(other.clone()),
        })
        .collect::<Result<_, _>>()?;
    let metrics = match &settings.metrics {
        Some(Endpoint::Tcp(address)) => Some(Endpoint::Tcp(look_up(
            settings,
            "[staps] metrics",
            address,
        )?)),
        other => other.clone(),
    };
    Ok(Host {
        tcp,
        metrics,
        run_as,
        socket_owner,
        socket_activated,
    })
}

/// Who to run as after binding, and who owns the socket files.
fn identities(
    settings: &Settings,
) -> Result<(Option<(libc::uid_t, libc::gid_t)>, SocketOwner), ConfigError> {
    let err = |key: &str, message: String| ConfigError::of_whole(settings, key, message);
    let group = |key: &str, name: &Option<String>| {
        name.as_deref()
            .map(sys::lookup_group)
            .transpose()
            .map_err(|m| err(key, m))
    };
    let gid = group("[daemon] group", &settings.group)?;
    let socket_gid = group("[staps] socket_group", &settings.socket_group)?;
    let user = settings
        .user
        .as_deref()
        .map(sys::lookup_user)
        .transpose()
        .map_err(|m| err("[daemon] user", m))?;
    let run_as = match user {
        Some(user) => match gid.or(user.gid) {
            Some(gid) => Some((user.uid, gid)),
            None => {
                return Err(err(
                    "[daemon] user",
                    format!(
                        "uid {} has no passwd entry, so no group: set [daemon] group too",
                        user.uid
                    ),
                ));
            }
        },
        None => None,
    };
    let socket_owner = if sys::is_root() {
        (
            run_as.map(|(uid, _)| uid),
            socket_gid.or(run_as.map(|(_, gid)| gid)),
        )
    } else {
        // An unprivileged user may still hand the socket to a group it is in.
        (None, socket_gid)
    };
    Ok((run_as, socket_owner))
}

/// Owner and group of the socket files (see [`Host::socket_owner`]).
type SocketOwner = (Option<libc::uid_t>, Option<libc::gid_t>);

/// `address` as `key` gives it, a host name looked up: to its first
/// address, once (a name that moves later is not followed).
fn look_up(settings: &Settings, key: &str, address: &Address) -> Result<Address, ConfigError> {
    let Address::Host(name) = address else {
        return Ok(address.clone());
    };
    let err = |message: String| ConfigError::of_whole(settings, key, message);
    let first = name
        .to_socket_addrs()
        .map_err(|e| err(format!("'{name}': {e}; {ADDRESS_FORM}")))?
        .next()
        .ok_or_else(|| err(format!("'{name}' resolves to no address; {ADDRESS_FORM}")))?;
    Ok(Address::Ip(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> Result<Host, ConfigError> {
        resolve(&crate::config::from_text(std::path::Path::new("t.conf"), text)?.settings)
    }

    #[test]
    fn users_and_groups_become_ids_once() {
        let h = host("[staps]\nport = 1\n[daemon]\nuser = nobody\ngroup = nogroup\n").unwrap();
        assert_eq!(h.run_as, Some((65534, 65534)));
        // A number with a passwd entry takes its group from it.
        let h = host("[staps]\nport = 1\n[daemon]\nuser = 65534\n").unwrap();
        assert_eq!(h.run_as, Some((65534, 65534)));
        // Without one, only with a group.
        let e = host("[staps]\nport = 1\n[daemon]\nuser = 54321\n").unwrap_err();
        assert!(e.to_string().contains("no passwd entry"), "{e}");
        let h = host("[staps]\nport = 1\n[daemon]\nuser = 54321\ngroup = 54321\n").unwrap();
        assert_eq!(h.run_as, Some((54321, 54321)));
        // No listener left (`--socket` alone turned the socket off).
        let mut settings = crate::config::from_text(std::path::Path::new("t.conf"), "[staps]\n")
            .unwrap()
            .settings;
        settings.sockets.clear();
        let e = resolve(&settings).unwrap_err();
        assert!(e.to_string().starts_with("t.conf: listeners"), "{e}");
    }

    #[test]
    fn host_names_are_looked_up_here_not_while_parsing() {
        let text = "[staps]\nlisten = localhost:8080\nmetrics = localhost:9090\n";
        let settings = crate::config::from_text(std::path::Path::new("t.conf"), text)
            .unwrap()
            .settings;
        assert_eq!(
            settings.tcp,
            [TcpSpec::Addr(Address::Host("localhost:8080".into()))]
        );
        let h = resolve(&settings).unwrap();
        let [TcpSpec::Addr(Address::Ip(addr))] = h.tcp.as_slice() else {
            panic!("not looked up: {:?}", h.tcp);
        };
        assert!(addr.ip().is_loopback() && addr.port() == 8080, "{addr}");
        assert!(matches!(h.metrics, Some(Endpoint::Tcp(Address::Ip(_)))));
        let e = host("[staps]\nlisten = no-such-host.invalid:80\n").unwrap_err();
        assert!(e.to_string().contains("[staps] listen"), "{e}");
    }
}
