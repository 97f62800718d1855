//! SPEC §6 and §4: daemon mode, privileges, systemd notification and socket
//! activation. Tests that need root (or systemd's tools) skip loudly without
//! them, and fail instead under STAPS_TEST_STRICT=1 (set by `.ci/run`).

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use tungstenite::Message;

/// A directory every user may write, as /run/staps is for the staps user.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// The config file `text` in `dir`; the secret of read-only URLs goes in
/// `dir` too (as `Staps::start` does), not in the machine's /var/lib/staps.
fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("staps.conf");
    let text = if text.contains("secret_file") {
        text.to_owned()
    } else {
        format!("{text}\n[staps]\nsecret_file = {{dir}}/secret\n")
    };
    fs::write(&path, text.replace("{dir}", dir.to_str().unwrap())).unwrap();
    path
}

fn run_daemon(conf: &Path) -> Output {
    Command::new(binary())
        .arg("-c")
        .arg(conf)
        .arg("--daemon")
        .stdin(Stdio::null())
        .output()
        .expect("run staps --daemon")
}

/// Run `staps --daemon`, which must start (exit 0).
fn start_daemon(conf: &Path) {
    let out = run_daemon(conf);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pid_of(pid_file: &Path) -> i32 {
    fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

fn status_field(pid: i32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn daemon_mode_detaches_drops_privileges_and_cleans_up() {
    if skip(
        "daemon_mode_detaches_drops_privileges_and_cleans_up",
        needs_root(),
    ) {
        return;
    }
    let dir = open_dir();
    let conf = write_config(
        dir.path(),
        "[staps]\nsocket = {dir}/d.sock\nmode = 0660\nsecret_file = {dir}/secret\n\
         [daemon]\nuser = nobody\ngroup = nogroup\npid_file = {dir}/d.pid\nlog_file = {dir}/d.log\ndir = {dir}\numask = 0077\n",
    );
    let (sock, pid_file, log) = (
        dir.path().join("d.sock"),
        dir.path().join("d.pid"),
        dir.path().join("d.log"),
    );
    start_daemon(&conf);
    // The parent exits only once the child accepts connections: no waiting needed.
    let pid = pid_of(&pid_file);
    assert!(alive(pid));
    assert_ne!(pid as u32, std::process::id());
    // Detached: a session of its own, and not our child.
    let sid = unsafe { libc::getsid(pid) };
    assert!(
        sid > 0 && sid != unsafe { libc::getsid(0) },
        "still in our session"
    );
    assert_ne!(status_field(pid, "PPid"), std::process::id().to_string());
    // Privileges: uid, gid and supplementary groups are nobody's only.
    assert_eq!(status_field(pid, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Gid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Groups"), "65534");
    // The pid file is locked by the daemon.
    let held = fs::File::open(&pid_file).unwrap();
    let rc = unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, -1, "pid file is not locked");
    drop(held);
    // A second daemon on the same pid file refuses, and says why.
    let second = run_daemon(&conf);
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("locked"));
    // Socket file: owner, group and mode.
    let meta = fs::metadata(&sock).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    // The working directory and umask took effect.
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        dir.path()
    );
    assert_eq!(status_field(pid, "Umask"), "0077");
    // The secret of read-only URLs was made after privileges were dropped:
    // the service user's, 0600.
    let secret = fs::symlink_metadata(dir.path().join("secret")).unwrap();
    assert_eq!(
        (secret.uid(), secret.gid(), secret.len()),
        (65534, 65534, 32)
    );
    assert_eq!(secret.permissions().mode() & 0o777, 0o600);
    // It serves.
    let ch = channel();
    let mut a = connect_unix(&sock, &ch);
    let mut b = connect_unix(&sock, &ch);
    a.send(Message::text("daemon")).unwrap();
    assert_eq!(recv(&mut b), Message::text("daemon"));
    drop((a, b));
    // SIGHUP reopens the log file after logrotate moved it.
    let rotated = dir.path().join("d.log.1");
    fs::rename(&log, &rotated).unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_until("a new log file", || {
        fs::read_to_string(&log).is_ok_and(|t| t.contains("reopened"))
    });
    assert!(fs::read_to_string(&rotated).unwrap().contains("ready"));
    // SIGTERM: files removed, process gone.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until("the daemon to exit", || !alive(pid));
    assert!(!sock.exists(), "socket file left behind");
    assert!(!pid_file.exists(), "pid file left behind");
    assert!(fs::read_to_string(&log).unwrap().contains("stopped:"));
}

#[test]
fn the_parent_reports_a_failed_start_with_the_childs_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = open_dir();
    let conf = write_config(
        dir.path(),
        &format!("[staps]\nlisten = {addr}\n[daemon]\npid_file = {{dir}}/p.pid\ndir = {{dir}}\n"),
    );
    let out = run_daemon(&conf);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr.to_string()) && err.contains("in use"),
        "{err}"
    );
    assert!(
        !dir.path().join("p.pid").exists(),
        "pid file of a failed start left behind"
    );
    // A working directory that does not exist.
    let conf = write_config(
        dir.path(),
        "[staps]\nlisten = 127.0.0.1:0\n[daemon]\ndir = /nonexistent/staps\n",
    );
    let out = run_daemon(&conf);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/staps") && err.contains("No such file or directory"),
        "{err}"
    );
}

/// After dropping privileges, the daemon cannot remove its files from a
/// directory only root may write: it says so at shutdown, once, naming them.
#[test]
fn files_left_in_a_root_owned_directory_are_reported_at_shutdown() {
    if skip(
        "files_left_in_a_root_owned_directory_are_reported_at_shutdown",
        needs_root(),
    ) {
        return;
    }
    // Root's, 0755: nobody may not remove files from it.
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let logs = open_dir();
    let conf = write_config(
        dir.path(),
        &format!(
            "[staps]\nsocket = {{dir}}/d.sock\n[daemon]\nuser = nobody\ngroup = nogroup\n\
             pid_file = {{dir}}/d.pid\nlog_file = {}/d.log\ndir = /\n",
            logs.path().display()
        ),
    );
    start_daemon(&conf);
    let pid = pid_of(&dir.path().join("d.pid"));
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until("the daemon to exit", || !alive(pid));
    let log = fs::read_to_string(logs.path().join("d.log")).unwrap();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("could not remove"))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(
        said[0].contains("d.sock") && said[0].contains("d.pid") && said[0].contains("write access"),
        "{log}"
    );
}

#[test]
fn foreground_as_root_drops_privileges_after_binding() {
    if skip(
        "foreground_as_root_drops_privileges_after_binding",
        needs_root(),
    ) {
        return;
    }
    let staps = Staps::start(
        "[staps]\nsocket = {dir}/f.sock\nlisten = 127.0.0.1:0\nsocket_group = nogroup\n[daemon]\nuser = nobody\n",
        &[],
    );
    let pid = staps.pid() as i32;
    assert_eq!(status_field(pid, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Groups"), "65534");
    // The socket was made as root and handed over.
    let meta = fs::metadata(&staps.sockets[0]).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    // Port 80 would need root: binding happened before the drop. Here, any port works.
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect_unix(&staps.sockets[0], &ch);
    a.send(Message::text("dropped")).unwrap();
    assert_eq!(recv(&mut b), Message::text("dropped"));
}

#[test]
fn systemd_gets_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let socket = UnixDatagram::bind(&notify).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut staps = Staps::start_env(
        &tcp_config(""),
        &[],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1");
    assert_eq!(&buf[..n], b"READY=1");
    staps.signal(libc::SIGTERM);
    let n = socket.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(staps.wait_exit().code(), Some(0));
}

#[test]
fn socket_activation_replaces_configured_listeners() {
    if skip(
        "socket_activation_replaces_configured_listeners",
        needs_program("systemd-socket-activate", "systemd"),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let conf = write_config(dir.path(), "[staps]\nsocket = {dir}/configured.sock\n");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(binary())
        .arg("-c")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // systemd-socket-activate makes the socket and starts staps on the first connection.
    wait_until("the activated socket", || sock.exists());
    let ch = channel();
    let mut a = connect_unix(&sock, &ch);
    let mut b = connect_unix(&sock, &ch);
    a.send(Message::text("activated")).unwrap();
    assert_eq!(recv(&mut b), Message::text("activated"));
    assert!(
        !dir.path().join("configured.sock").exists(),
        "configured socket bound too"
    );
    drop((a, b));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // The socket is systemd's: staps leaves its file alone.
    assert!(sock.exists());
}
