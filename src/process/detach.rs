//! Running as a system daemon: dropping privileges, detaching classic-style
//! with a readiness pipe, and the pid file.
//!
//! `daemonize` 0.5 forks, detaches, sets the working directory and umask and
//! redirects stdout and stderr; the rest is done here: supplementary groups
//! are reset before switching user (it does not), the parent waits on a pipe
//! for the child to be ready and exits with its error (its parent always
//! exits 0), and the pid file is written by staps itself, never through a
//! symlink ([`crate::os::files`]; daemonize opens and chowns the path as root,
//! which in a directory the service user owns hands any file to that user),
//! and removed on a clean exit.

use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::process::ExitCode;
use std::sync::OnceLock;

use crate::config::Settings;
use crate::config::resolve::Host;
use crate::os::files;
use crate::os::logging;
use crate::os::sys;

/// Switch to `user`/`group` for good: supplementary groups reset to the
/// target group, then the group, then the user. As a user other than root,
/// staps keeps running as it is, with a warning if `user` names someone else.
pub(crate) fn drop_privileges(settings: &Settings, host: &Host) -> Result<(), String> {
    let Some((uid, gid)) = host.run_as else {
        return Ok(());
    };
    if !sys::is_root() {
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
pub(crate) struct Readiness(Option<File>);

impl Readiness {
    /// Readiness of a process that did not detach.
    pub(crate) fn foreground() -> Readiness {
        Readiness(None)
    }

    /// Serving: let the parent exit 0, and tell systemd.
    pub(crate) fn ready(&mut self) {
        if let Some(mut pipe) = self.0.take() {
            let _ = pipe.write_all(b"READY\n");
        }
        crate::os::systemd::notify("READY=1");
    }

    /// Startup failed: let the parent (if any) report it and exit `code`;
    /// the code for this process to exit with.
    pub(crate) fn fail(&mut self, code: u8, message: &str) -> ExitCode {
        match self.0.take() {
            Some(mut pipe) => {
                let _ = writeln!(pipe, "ERROR {code} {message}");
            }
            None => log::error!("{message}"),
        }
        ExitCode::from(code)
    }
}

/// Detach classic-style with `settings`: fork, setsid, working directory,
/// umask, locked pid file, stdout/stderr to `log_file` or /dev/null; then, still
/// privileged, run `bind` (which binds and drops privileges). The parent waits
/// until the child is ready and returns `Err(0)`, or prints the child's
/// error and returns `Err` with its code; the child gets `Ok`, or `Err` once
/// it has told the parent why it failed. No thread may exist before this.
pub(crate) fn detach<T: 'static>(
    settings: &Settings,
    host: &Host,
    bind: impl FnOnce() -> Result<T, String> + 'static,
) -> Result<(T, Readiness), ExitCode> {
    let (read_end, write_end) = pipe().map_err(|e| {
        eprintln!("staps: cannot create a pipe: {e}");
        ExitCode::FAILURE
    })?;
    let (stdout, stderr) = match &settings.log_file {
        Some(path) => match logging::open_log(path).and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((out, err)) => (out.into(), err.into()),
            Err(e) => {
                eprintln!(
                    "staps: cannot open log file {}: {e}",
                    logging::escape_path(path)
                );
                return Err(ExitCode::FAILURE);
            }
        },
        None => (daemonize::Stdio::devnull(), daemonize::Stdio::devnull()),
    };
    // Checked here too, for a message that names it: daemonize says only
    // "unable to change directory, errno 2".
    if let Err(e) = std::fs::read_dir(&settings.dir) {
        eprintln!(
            "staps: cannot enter [daemon] dir {}: {e}",
            logging::escape_path(&settings.dir)
        );
        return Err(ExitCode::FAILURE);
    }
    let daemon = daemonize::Daemonize::new()
        .working_directory(&settings.dir)
        .umask(settings.umask)
        .stdout(stdout)
        .stderr(stderr);
    let run_as = host.run_as;
    let privileged = {
        let settings = settings.clone();
        move || -> Result<T, String> {
            if let Some(pid_file) = &settings.pid_file {
                write_pid_file(pid_file, run_as)?;
            }
            bind()
        }
    };
    match daemon.privileged_action(privileged).execute() {
        daemonize::Outcome::Parent(result) => {
            drop(write_end);
            Err(ExitCode::from(wait_for_child(read_end, result.is_ok())))
        }
        daemonize::Outcome::Child(result) => {
            drop(read_end);
            let mut readiness = Readiness(Some(write_end));
            match result {
                Ok(child) => match child.privileged_action_result {
                    Ok(bound) => Ok((bound, readiness)),
                    Err(e) => {
                        // Still root here: it goes.
                        let _ = remove_pid_file(settings);
                        Err(readiness.fail(1, &e))
                    }
                },
                Err(e) => Err(readiness.fail(1, &detach_error(&e, settings))),
            }
        }
    }
}

/// The parent's side: wait for the child's line, report it, give the exit code.
fn wait_for_child(pipe: File, forked: bool) -> u8 {
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
    if let Some((uid, gid)) = owner.filter(|_| sys::is_root()) {
        // The user it runs as removes it at exit.
        files::chown(&file, Some(uid), Some(gid)).map_err(context)?;
    }
    let _ = PID_FILE.set(file);
    Ok(())
}

/// daemonize's error, with its errno told in words and the directory named
/// when entering it failed.
fn detach_error(e: &daemonize::Error, settings: &Settings) -> String {
    let text = e.to_string();
    let (what, errno) = match text.rsplit_once(", errno ") {
        Some((what, n)) => (what, n.parse().ok()),
        None => (text.as_str(), None),
    };
    let why = errno.map_or(String::new(), |n| {
        format!(": {}", std::io::Error::from_raw_os_error(n))
    });
    if what.contains("change directory") {
        format!(
            "cannot enter [daemon] dir {}{why}",
            logging::escape_path(&settings.dir)
        )
    } else {
        format!("cannot detach: {what}{why}")
    }
}

/// Remove the pid file if it still holds this process's pid (daemon mode
/// only); the error when it could not be removed.
pub(crate) fn remove_pid_file(settings: &Settings) -> io::Result<()> {
    let Some(path) = settings.pid_file.as_ref().filter(|_| settings.daemon) else {
        return Ok(());
    };
    let ours = std::fs::read_to_string(path)
        .map(|text| text.trim() == std::process::id().to_string() || text.trim().is_empty())
        .unwrap_or(false);
    if ours {
        std::fs::remove_file(path)?;
    }
    Ok(())
}
