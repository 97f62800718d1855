//! Running as a system daemon: users and groups, dropping privileges,
//! detaching classic-style with a readiness pipe, the pid file, and systemd's
//! notifications.
//!
//! `daemonize` 0.5 forks, detaches, sets the working directory and umask and
//! redirects stdout and stderr; the rest is done here: supplementary groups
//! are reset before switching user (it does not), the parent waits on a pipe
//! for the child to be ready and exits with its error (its parent always
//! exits 0), and the pid file is written by staps itself, never through a
//! symlink ([`crate::files`]; daemonize opens and chowns the path as root,
//! which in a directory the service user owns hands any file to that user),
//! and removed on a clean exit.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::fd::FromRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::OnceLock;

use crate::config::Settings;
use crate::{files, logging};

/// A user's ids, as `getpwnam(3)` gives them.
#[derive(Debug, Clone, Copy)]
pub struct User {
    /// User id.
    pub uid: libc::uid_t,
    /// Primary group id.
    pub gid: libc::gid_t,
}

/// Look a user up by name, or by number when the name is numeric.
pub fn lookup_user(name: &str) -> Result<User, String> {
    let cname = CString::new(name).map_err(|_| format!("'{name}' is not a user name"))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: passwd is plain old data; getpwnam_r writes into it and into buf,
    // whose length we pass, and sets result to null or to &pwd.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Ok(User {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        });
    }
    if let Ok(uid) = name.parse::<libc::uid_t>() {
        return Ok(User { uid, gid: uid });
    }
    Err(format!(
        "no such user '{name}' (a user name from /etc/passwd or a number)"
    ))
}

/// Look a group up by name, or by number when the name is numeric.
pub fn lookup_group(name: &str) -> Result<libc::gid_t, String> {
    let cname = CString::new(name).map_err(|_| format!("'{name}' is not a group name"))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: as in lookup_user, with getgrnam_r and struct group.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Ok(grp.gr_gid);
    }
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    Err(format!(
        "no such group '{name}' (a group name from /etc/group or a number)"
    ))
}

/// Whether the process runs as root, and so can change owners and drop privileges.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The ids to switch to after binding: from `user` and `group`; `None` when
/// there is nothing to switch or the process is not root.
fn target_ids(settings: &Settings) -> Result<Option<(libc::uid_t, libc::gid_t)>, String> {
    let Some(name) = &settings.user else {
        return Ok(None);
    };
    let user = lookup_user(name)?;
    let gid = match &settings.group {
        Some(group) => lookup_group(group)?,
        None => user.gid,
    };
    Ok(Some((user.uid, gid)))
}

/// Switch to `user`/`group` for good: supplementary groups reset to the
/// target group, then the group, then the user. As a user other than root,
/// staps keeps running as it is, with a warning if `user` names someone else.
pub fn drop_privileges(settings: &Settings) -> Result<(), String> {
    let Some((uid, gid)) = target_ids(settings)? else {
        return Ok(());
    };
    if !is_root() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != uid {
            log::warn!(
                "not started as root: cannot switch to user {}; running as uid {}",
                settings.user.as_deref().unwrap_or_default(),
                unsafe { libc::geteuid() }
            );
        }
        return Ok(());
    }
    let os_err = |what: &str| format!("{what}: {}", io::Error::last_os_error());
    // SAFETY: plain system calls on ids; each result is checked.
    unsafe {
        if libc::setgroups(1, &gid) != 0 {
            return Err(os_err("cannot reset supplementary groups"));
        }
        if libc::setgid(gid) != 0 {
            return Err(os_err(&format!("cannot switch to group {gid}")));
        }
        if libc::setuid(uid) != 0 {
            return Err(os_err(&format!("cannot switch to user {uid}")));
        }
    }
    log::debug!("running as uid {uid}, gid {gid}");
    Ok(())
}

/// What the detached child owes its waiting parent: one line saying it is
/// ready, or why it is not. Empty in the foreground.
pub struct Readiness(Option<File>);

impl Readiness {
    /// Readiness of a process that did not detach.
    pub fn foreground() -> Readiness {
        Readiness(None)
    }

    /// Serving: let the parent exit 0, and tell systemd.
    pub fn ready(&mut self) {
        if let Some(mut pipe) = self.0.take() {
            let _ = pipe.write_all(b"READY\n");
        }
        notify("READY=1");
    }

    /// Startup failed after detaching: let the parent report it and exit `code`.
    pub fn fail(&mut self, code: i32, message: &str) -> ! {
        match self.0.take() {
            Some(mut pipe) => {
                let _ = writeln!(pipe, "ERROR {code} {message}");
            }
            None => log::error!("{message}"),
        }
        std::process::exit(code)
    }
}

/// Detach classic-style with `settings`: fork, setsid, working directory,
/// umask, locked pid file, stdout/stderr to `log_file` or /dev/null; then, still
/// privileged, run `bind` (which binds and drops privileges). The parent waits
/// until the child is ready and exits 0, or prints the child's error and exits
/// with its code; only the child returns. No thread may exist before this.
pub fn detach<T: 'static>(
    settings: &Settings,
    bind: impl FnOnce() -> Result<T, String> + 'static,
) -> (T, Readiness) {
    let (read_end, write_end) = match pipe() {
        Ok(ends) => ends,
        Err(e) => {
            eprintln!("staps: cannot create a pipe: {e}");
            std::process::exit(1);
        }
    };
    let (stdout, stderr) = match &settings.log_file {
        Some(path) => match logging::open_log(path).and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((out, err)) => (out.into(), err.into()),
            Err(e) => {
                eprintln!("staps: cannot open log file {}: {e}", path.display());
                std::process::exit(1);
            }
        },
        None => (daemonize::Stdio::devnull(), daemonize::Stdio::devnull()),
    };
    let daemon = daemonize::Daemonize::new()
        .working_directory(&settings.dir)
        .umask(settings.umask)
        .stdout(stdout)
        .stderr(stderr);
    let privileged = {
        let settings = settings.clone();
        move || -> Result<T, String> {
            if let Some(pid_file) = &settings.pid_file {
                write_pid_file(pid_file, target_ids(&settings)?)?;
            }
            bind()
        }
    };
    match daemon.privileged_action(privileged).execute() {
        daemonize::Outcome::Parent(result) => {
            drop(write_end);
            std::process::exit(wait_for_child(read_end, result.is_ok()))
        }
        daemonize::Outcome::Child(result) => {
            drop(read_end);
            let mut readiness = Readiness(Some(write_end));
            match result {
                Ok(child) => match child.privileged_action_result {
                    Ok(bound) => (bound, readiness),
                    Err(e) => {
                        remove_pid_file(settings);
                        readiness.fail(1, &e)
                    }
                },
                Err(e) => readiness.fail(1, &format!("cannot detach: {e}")),
            }
        }
    }
}

/// The parent's side: wait for the child's line, report it, give the exit code.
fn wait_for_child(pipe: File, forked: bool) -> i32 {
    let mut line = String::new();
    let _ = io::BufReader::new(pipe).read_line(&mut line);
    let line = line.trim_end();
    if line == "READY" {
        return 0;
    }
    if let Some(rest) = line.strip_prefix("ERROR ") {
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        eprintln!("staps: {message}");
        return code.parse().unwrap_or(1);
    }
    if forked {
        eprintln!("staps: the daemon exited before it was ready (see its log)");
    } else {
        eprintln!("staps: cannot fork: {}", io::Error::last_os_error());
    }
    1
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors on success; we own them from here.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptors are fresh and owned by nothing else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// The pid file, open and locked for the life of the process.
static PID_FILE: OnceLock<File> = OnceLock::new();

/// Create or take over the pid file at `path`, lock it, write this process's
/// pid and hand it to `owner` (when root), all through one descriptor opened
/// without following symlinks. Fails if another process holds the lock.
fn write_pid_file(path: &Path, owner: Option<(libc::uid_t, libc::gid_t)>) -> Result<(), String> {
    let context = |e: io::Error| format!("cannot write pid file {}: {e}", path.display());
    let mut file = files::open_for_writing(path, files::Write::Keep, 0o644).map_err(context)?;
    if !files::try_lock(&file).map_err(context)? {
        return Err(format!(
            "pid file {} is locked: is staps already running?",
            path.display()
        ));
    }
    file.set_len(0).map_err(context)?;
    writeln!(file, "{}", std::process::id()).map_err(context)?;
    if let Some((uid, gid)) = owner.filter(|_| is_root()) {
        // The user it runs as removes it at exit.
        files::chown(&file, Some(uid), Some(gid)).map_err(context)?;
    }
    let _ = PID_FILE.set(file);
    Ok(())
}

/// Remove the pid file if it still holds this process's pid (daemon mode only).
pub fn remove_pid_file(settings: &Settings) {
    let Some(path) = settings.pid_file.as_ref().filter(|_| settings.daemon) else {
        return;
    };
    let ours = std::fs::read_to_string(path)
        .map(|text| text.trim() == std::process::id().to_string() || text.trim().is_empty())
        .unwrap_or(false);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Tell systemd about a state change (`READY=1`, `STOPPING=1`) when it asked
/// for it with `NOTIFY_SOCKET` (`Type=notify`). A few lines instead of a crate.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)
            .and_then(|a| socket.send_to_addr(state.as_bytes(), &a)),
        None => socket.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        log::warn!("cannot notify systemd ({state}): {e}");
    }
}
