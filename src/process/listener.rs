//! Listening sockets (unix and TCP) and the accept loop that gives every
//! connection its own thread.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::config::resolve::Host;
use crate::config::{Address, Endpoint, Settings, TcpSpec};
use crate::conn::server::Server;
use crate::os::logging::{Throttle, escape_path};
use crate::os::stream::Stream;
use crate::os::systemd;

/// Pending connections the kernel keeps for us while every thread is busy;
/// a burst of reconnecting clients should not see refusals.
const BACKLOG: i32 = 1024;

/// A bound listening socket.
#[derive(Debug)]
pub(crate) enum Listener {
    /// TCP, with the address it is bound to.
    Tcp(TcpListener, SocketAddr),
    /// A unix socket and its file, removed on exit if it is still ours.
    Unix {
        /// The listening socket.
        listener: UnixListener,
        /// Path of the socket file.
        path: PathBuf,
        /// Device and inode of the file we created; `None` for a socket systemd
        /// passed us, whose file is systemd's to remove.
        id: Option<(u64, u64)>,
    },
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listener::Tcp(_, addr) => write!(f, "{addr}"),
            Listener::Unix { path, .. } => write!(f, "unix:{}", escape_path(path)),
        }
    }
}

impl Listener {
    /// Give the connections this listener will accept their socket options:
    /// no Nagle (writers batch frames themselves; Nagle would only add
    /// latency) and a write timeout, so that a client that does not read its
    /// answer cannot hold a thread forever. Linux copies both from a TCP
    /// listening socket to every socket it accepts (tested below), which
    /// saves two setsockopt(2) calls per connection. Not the read timeout: on
    /// a listening socket that one would time accept(2) out.
    ///
    /// What [`Listener::accept`] must still set on each connection: nothing
    /// when the options are inherited, else `Some(write_timeout)` (a unix
    /// socket inherits nothing; a failed setsockopt is logged and falls back).
    pub(crate) fn prepare(&self, write_timeout: Duration) -> Option<Duration> {
        let Listener::Tcp(l, _) = self else {
            return Some(write_timeout);
        };
        let socket = socket2::SockRef::from(l);
        match socket
            .set_tcp_nodelay(true)
            .and_then(|()| socket.set_write_timeout(Some(write_timeout)))
        {
            Ok(()) => None,
            Err(e) => {
                log::warn!("{self}: cannot set the options its connections inherit: {e}");
                Some(write_timeout)
            }
        }
    }

    /// The next connection, and its peer's address when it is TCP; `options`
    /// is what [`Listener::prepare`] said to set.
    pub(crate) fn accept(&self, options: Option<Duration>) -> io::Result<(Stream, Option<IpAddr>)> {
        let (stream, from) = match self {
            Listener::Tcp(l, _) => {
                let (s, addr) = l.accept()?;
                if options.is_some() {
                    s.set_nodelay(true)?;
                }
                (Stream::Tcp(s), Some(addr.ip()))
            }
            Listener::Unix { listener, .. } => (Stream::Unix(listener.accept()?.0), None),
        };
        if options.is_some() {
            stream.set_write_timeout(options)?;
        }
        Ok((stream, from))
    }

    /// The listening socket's descriptor, for the event loop.
    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Listener::Tcp(l, _) => l.as_fd(),
            Listener::Unix { listener, .. } => listener.as_fd(),
        }
    }

    /// Accept without waiting (`WouldBlock` when nobody is waiting), as the
    /// event loop does until the kernel has no more.
    pub(crate) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l, _) => l.set_nonblocking(true),
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
        }
    }

    /// Wake the accept loop so that it sees the server is stopping: on Linux,
    /// shutdown(2) on a listening socket makes a blocked accept(2) return EINVAL.
    pub(crate) fn stop(&self) {
        let socket = match self {
            Listener::Tcp(l, _) => socket2::SockRef::from(l),
            Listener::Unix { listener, .. } => socket2::SockRef::from(listener),
        };
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }

    /// Remove the socket file, if it is still the one we created; the error
    /// when it could not be removed.
    pub(crate) fn remove_file(&self) -> io::Result<()> {
        if let Listener::Unix { path, id, .. } = self {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if Some((meta.dev(), meta.ino())) == *id {
                    std::fs::remove_file(path)?;
                }
            }
        }
        Ok(())
    }
}

/// Take the listening sockets systemd passed, as listeners; they replace
/// the configured ones. Must run before any thread exists.
pub(crate) fn take_activated() -> Result<Vec<Listener>, String> {
    systemd::take_listen_fds()?
        .into_iter()
        .map(|(fd, socket)| {
            let addr = socket
                .local_addr()
                .map_err(|e| format!("passed descriptor {fd} is not a socket: {e}"))?;
            if let Some(tcp) = addr.as_socket() {
                Ok(Listener::Tcp(socket.into(), tcp))
            } else if addr.is_unix() {
                let path = addr.as_pathname().map(Path::to_owned).unwrap_or_default();
                Ok(Listener::Unix {
                    listener: UnixListener::from(std::os::fd::OwnedFd::from(socket)),
                    path,
                    id: None,
                })
            } else {
                Err(format!(
                    "passed descriptor {fd} is neither TCP nor a unix socket"
                ))
            }
        })
        .collect()
}

/// Bind every configured listener. Errors say which one and why.
pub(crate) fn bind_all(settings: &Settings, host: &Host) -> Result<Vec<Listener>, String> {
    let mut listeners = Vec::new();
    for path in &settings.sockets {
        match bind_unix(path, settings.mode, host.socket_owner) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                listeners.iter().for_each(|l| drop(l.remove_file()));
                return Err(format!("cannot listen on unix:{}: {e}", escape_path(path)));
            }
        }
    }
    for spec in &host.tcp {
        match bind_tcp(spec) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                listeners.iter().for_each(|l| drop(l.remove_file()));
                return Err(format!("cannot listen on {spec}: {e}"));
            }
        }
    }
    Ok(listeners)
}

/// Bind the metrics listener, when one is configured.
pub(crate) fn bind_metrics(settings: &Settings, host: &Host) -> Result<Option<Listener>, String> {
    let Some(endpoint) = &host.metrics else {
        return Ok(None);
    };
    let bound = match endpoint {
        Endpoint::Tcp(addr) => bind_tcp(&TcpSpec::Addr(addr.clone())),
        Endpoint::Unix(path) => bind_unix(path, settings.mode, host.socket_owner),
    };
    bound
        .map(Some)
        .map_err(|e| format!("cannot listen for metrics on {endpoint}: {e}"))
}

/// Bind a unix socket at `path` with the configured mode and owner.
///
/// The directory may belong to the service user (`/run/staps`), and staps
/// may be root: a path changed between bind and chmod/chown could be swapped
/// for a symlink to any file. So the socket is bound in a fresh directory of
/// our own beside it (mode 0700: nobody else can enter it), its mode and
/// owner are set there, and only then is it renamed into place; the file at
/// `path` is checked to be the one we made.
fn bind_unix(
    path: &Path,
    mode: u32,
    owner: (Option<libc::uid_t>, Option<libc::gid_t>),
) -> Result<Listener, String> {
    let mut stale = false;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err("the path exists and is not a socket; remove it or choose another".into());
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err("another process is listening on it; refusing to take it over".into());
            }
            // Nobody answers: a stale file left by a crash, replaced by the rename below.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => stale = true,
            Err(e) => return Err(format!("cannot check the existing socket file: {e}")),
        }
    }
    let name = path
        .file_name()
        .ok_or("the socket path names no file")?
        .to_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = Dir::open(parent).map_err(|e| format!("cannot open its directory: {e}"))?;
    let private = parent.private_subdir().map_err(|e| {
        format!("cannot create a private directory beside it (is its directory writable?): {e}")
    })?;
    let made = private.bind(&name).and_then(|listener| {
        private.chmod(&name, mode)?;
        if owner != (None, None) {
            private.chown_nofollow(&name, owner)?;
        }
        let id = private.id_of(&name)?;
        private.rename_to(&name, &parent, &name)?;
        Ok((listener, id))
    });
    private.remove(&name);
    let (listener, id) = made.map_err(|e| e.to_string())?;
    let bound = Listener::Unix {
        listener,
        path: path.to_owned(),
        id: Some(id),
    };
    // The rename put our socket at `path`; anything else there now was put
    // by someone else since, and is not ours to serve on or remove.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == id => {
            if stale {
                log::info!("replaced stale socket file {}", escape_path(path));
            }
            Ok(bound)
        }
        _ => Err("the socket file was replaced while staps set it up; refusing it".into()),
    }
}

/// A directory held open, for changes relative to it that cannot be
/// redirected by renaming or replacing what lies on the way.
struct Dir {
    fd: std::os::fd::OwnedFd,
    /// For the private directory: its name in `parent`, to remove it after.
    name: Option<(std::ffi::CString, libc::c_int)>,
}

/// `name` as a C string for the `*at` calls.
fn c_name(name: &std::ffi::OsStr) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL byte"))
}

/// A libc result: -1 is the OS error.
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl Dir {
    fn open(path: &Path) -> io::Result<Dir> {
        let cpath = c_name(path.as_os_str())?;
        // SAFETY: a valid C string; the descriptor is checked and then owned.
        let fd = check(unsafe {
            libc::open(
                cpath.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        Ok(Dir {
            // SAFETY: fresh descriptor, ours alone.
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            name: None,
        })
    }

    fn raw(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }

    /// A new directory inside this one that only this process's user may enter.
    fn private_subdir(&self) -> io::Result<Dir> {
        let name = c_name(format!(".staps-{}", uuid::Uuid::new_v4().simple()).as_ref())?;
        // SAFETY: valid descriptor and C string; results checked.
        check(unsafe { libc::mkdirat(self.raw(), name.as_ptr(), 0o700) })?;
        let fd = check(unsafe {
            libc::openat(
                self.raw(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        });
        let dir = fd.map(|fd| Dir {
            // SAFETY: fresh descriptor, ours alone.
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            name: Some((name, self.raw())),
        })?;
        // Renamed away and replaced between mkdir and open: not ours.
        let meta = File::from(dir.fd.try_clone()?).metadata()?;
        // SAFETY: geteuid cannot fail.
        if meta.uid() != unsafe { libc::geteuid() } || meta.mode() & 0o777 != 0o700 {
            return Err(io::Error::other("the private directory was replaced"));
        }
        Ok(dir)
    }

    /// A listening unix socket at `name` in this directory.
    fn bind(&self, name: &std::ffi::OsStr) -> io::Result<UnixListener> {
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        // bind(2) takes a path, not a directory descriptor: reach the
        // directory through its descriptor's name in /proc, which follows the
        // descriptor wherever the directory has been moved.
        let at = Path::new("/proc/self/fd")
            .join(self.raw().to_string())
            .join(name);
        socket.bind(&socket2::SockAddr::unix(&at)?)?;
        socket.listen(BACKLOG)?;
        Ok(UnixListener::from(std::os::fd::OwnedFd::from(socket)))
    }

    fn chmod(&self, name: &std::ffi::OsStr, mode: u32) -> io::Result<()> {
        let cname = c_name(name)?;
        // SAFETY: valid descriptor and C string. Nobody else can enter this
        // directory, so nothing can stand in for the socket.
        check(unsafe { libc::fchmodat(self.raw(), cname.as_ptr(), mode as libc::mode_t, 0) })
            .map(drop)
            .map_err(|e| io::Error::other(format!("cannot set mode {mode:04o}: {e}")))
    }

    fn chown_nofollow(
        &self,
        name: &std::ffi::OsStr,
        (uid, gid): (Option<libc::uid_t>, Option<libc::gid_t>),
    ) -> io::Result<()> {
        let cname = c_name(name)?;
        // SAFETY: valid descriptor and C string; -1 leaves an id unchanged.
        check(unsafe {
            libc::fchownat(
                self.raw(),
                cname.as_ptr(),
                uid.unwrap_or(libc::uid_t::MAX),
                gid.unwrap_or(libc::gid_t::MAX),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
        .map_err(|e| io::Error::other(format!("cannot change owner: {e}")))
    }

    /// Device and inode of `name`.
    fn id_of(&self, name: &std::ffi::OsStr) -> io::Result<(u64, u64)> {
        let cname = c_name(name)?;
        // SAFETY: fstatat fills the zeroed struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        check(unsafe {
            libc::fstatat(
                self.raw(),
                cname.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Move `name` to `to_name` in `to`, atomically replacing what is there.
    fn rename_to(
        &self,
        name: &std::ffi::OsStr,
        to: &Dir,
        to_name: &std::ffi::OsStr,
    ) -> io::Result<()> {
        let (from, dest) = (c_name(name)?, c_name(to_name)?);
        // SAFETY: valid descriptors and C strings.
        check(unsafe { libc::renameat(self.raw(), from.as_ptr(), to.raw(), dest.as_ptr()) })
            .map(drop)
    }

    /// Remove `name` if it is still here, and this private directory itself.
    fn remove(&self, name: &std::ffi::OsStr) {
        if let Ok(cname) = c_name(name) {
            // SAFETY: valid descriptor and C string; failure means it is gone.
            unsafe { libc::unlinkat(self.raw(), cname.as_ptr(), 0) };
        }
        if let Some((dir, parent)) = &self.name {
            // SAFETY: as above; a directory someone else put there is not
            // empty or not ours, and stays.
            unsafe { libc::unlinkat(*parent, dir.as_ptr(), libc::AT_REMOVEDIR) };
        }
    }
}

fn bind_tcp(spec: &TcpSpec) -> Result<Listener, String> {
    let bind = |addr: SocketAddr, dual_stack: bool| -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if dual_stack {
            socket.set_only_v6(false)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        Ok(socket.into())
    };
    let listener = match spec {
        TcpSpec::Addr(Address::Ip(addr)) => bind(*addr, false),
        // resolve looks every name up before anything is bound.
        TcpSpec::Addr(Address::Host(name)) => {
            Err(io::Error::other(format!("{name} was not looked up")))
        }
        TcpSpec::AllInterfaces(port) => {
            // One dual-stack socket takes IPv6 and IPv4; a host without IPv6 gets IPv4.
            match bind((std::net::Ipv6Addr::UNSPECIFIED, *port).into(), true) {
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    bind((std::net::Ipv4Addr::UNSPECIFIED, *port).into(), false)
                }
                other => other,
            }
        }
    }
    .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    Ok(Listener::Tcp(listener, addr))
}

/// What the metrics listener's accept loop does with each connection it
/// takes (`Err`: a thread that could not start). The public listeners are
/// the event loop's (`event_loop`).
pub(crate) type Serve = fn(&Arc<Server>, Stream, Option<IpAddr>) -> io::Result<()>;

/// Accept connections on `listener` on a thread called `name`, handing each
/// to `serve`, until the process exits (`/healthz` answers while clients are
/// closed).
pub(crate) fn spawn_accept_loop(
    listener: Arc<Listener>,
    server: Arc<Server>,
    name: &str,
    serve: Serve,
) -> io::Result<()> {
    thread::Builder::new()
        .name(name.into())
        .spawn(move || accept_loop(&listener, &server, serve))
        .map(drop)
}

/// Answer a connection taken with the spare descriptor, on a connection
/// thread: answering waits for the client's request and for it to read the
/// answer, or closing would reset the connection before the client read it.
pub(crate) fn refuse_out_of_fds(stream: Stream, server: &Arc<Server>) {
    server.refuse();
    let refused = server.readers().run(move || {
        crate::proto::http::respond(
            &stream,
            &crate::proto::http::Response::error(503, "server is out of file descriptors")
                .with("Retry-After", "5"),
        );
    });
    if let Err(e) = refused {
        log::debug!("cannot start a thread to refuse a connection: {e}");
    }
}

fn accept_loop(listener: &Listener, server: &Arc<Server>, serve: Serve) {
    let throttle = Throttle::new();
    let complain = |what: &str, e: &dyn std::fmt::Display| {
        if throttle.ready() {
            log::warn!("{listener}: {what}: {e}");
        }
    };
    // A descriptor held in reserve: when the process runs out, it is given up
    // to take the waiting connection and answer it 503, so that clients learn
    // at once instead of hanging in the backlog.
    let mut spare = File::open("/dev/null").ok();
    let options = listener.prepare(server.limits().handshake_timeout);
    loop {
        let (stream, from) = match listener.accept(options) {
            Ok(accepted) => accepted,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE) => {
                        complain(
                            "out of file descriptors, refusing connections until some are free",
                            &e,
                        );
                        match spare.take() {
                            Some(file) => {
                                drop(file);
                                if let Ok((stream, _)) = listener.accept(options) {
                                    refuse_out_of_fds(stream, server);
                                }
                            }
                            // The spare is in use (by the last refusal): wait
                            // instead of spinning on the same error.
                            None => thread::sleep(Duration::from_millis(100)),
                        }
                        // Succeeds once a descriptor is free again.
                        spare = spare.or_else(|| File::open("/dev/null").ok());
                    }
                    Some(libc::ENOBUFS | libc::ENOMEM) => {
                        complain(
                            "cannot accept, refusing connections until memory frees up",
                            &e,
                        );
                        thread::sleep(Duration::from_millis(100));
                    }
                    _ => log::debug!("{listener}: accept: {e}"),
                }
                continue;
            }
        };
        let spawned = serve(server, stream, from);
        if let Err(e) = spawned {
            complain("cannot start a thread for a new connection", &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `prepare` relies on Linux copying these options to accepted sockets.
    #[test]
    fn accepted_tcp_connections_inherit_the_prepared_options() {
        let spec = TcpSpec::Addr(Address::Ip("127.0.0.1:0".parse().unwrap()));
        let listener = bind_tcp(&spec).unwrap();
        let Listener::Tcp(_, addr) = &listener else {
            unreachable!()
        };
        let timeout = Duration::from_secs(7);
        assert_eq!(listener.prepare(timeout), None, "nothing left to set");
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (Stream::Tcp(accepted), _) = listener.accept(None).unwrap() else {
            unreachable!()
        };
        assert!(accepted.nodelay().unwrap());
        assert_eq!(accepted.write_timeout().unwrap(), Some(timeout));
        assert_eq!(accepted.read_timeout().unwrap(), None);
    }
}
