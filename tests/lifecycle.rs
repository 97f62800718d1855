//! SPEC §4, §6 and §7 as far as the foreground daemon goes: socket files,
//! signals, logging and privacy.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};

use common::*;
use tungstenite::Message;

#[test]
fn sigterm_sends_1001_to_everyone_removes_files_and_exits_0() {
    let mut staps = Staps::start(
        "[staps]\nsocket = {dir}/s.sock\nlisten = 127.0.0.1:0\n",
        &[],
    );
    let sock = staps.sockets[0].clone();
    assert!(sock.exists());
    let ch = channel();
    let mut tcp = connect(staps.addr(), &ch);
    let mut unix = connect_unix(&sock, &ch);
    tcp.send(Message::text("before")).unwrap();
    assert_eq!(recv(&mut unix), Message::text("before"));
    staps.signal(libc::SIGTERM);
    for code in [close_code(&mut tcp), close_code(&mut unix)] {
        assert_eq!(code, 1001);
    }
    // The close handshake completes (tungstenite answered while reading).
    drop((tcp, unix));
    let status = staps.wait_exit();
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "socket file left behind");
    let log = staps.lines().join("\n");
    assert!(log.contains("stopped: connections=0"), "{log}");
}

#[test]
fn sigterm_reaches_clients_whose_writers_never_started() {
    // Nothing was ever sent to these clients and pings are off, so none has a
    // writer thread: stopping starts 200 at once to send the close frames.
    let mut staps = Staps::start(&tcp_config("ping_interval = 0"), &[]);
    let mut clients: Vec<_> = (0..100)
        .flat_map(|_| {
            let ch = channel();
            [connect(staps.addr(), &ch), connect(staps.addr(), &ch)]
        })
        .collect();
    assert_eq!(threads_named(staps.pid(), "staps-writer"), 0);
    staps.signal(libc::SIGTERM);
    for ws in &mut clients {
        assert_eq!(close_code(ws), 1001);
    }
    drop(clients);
    assert_eq!(staps.wait_exit().code(), Some(0));
}

#[test]
fn sigint_is_the_same_as_sigterm() {
    let mut staps = Staps::start(&tcp_config(""), &[]);
    let mut ws = connect(staps.addr(), &channel());
    staps.signal(libc::SIGINT);
    assert_eq!(close_code(&mut ws), 1001);
    drop(ws);
    assert_eq!(staps.wait_exit().code(), Some(0));
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut staps = Staps::start("[staps]\nsocket = {dir}/s.sock\n", &[]);
    let sock = staps.sockets[0].clone();
    // A client that will never answer the close frame holds the graceful shutdown.
    let _silent = {
        let stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let (ws, _) = tungstenite::client(format!("ws://x{}", channel()), stream).unwrap();
        ws
    };
    staps.signal(libc::SIGTERM);
    staps.wait_log("shutting down");
    staps.signal(libc::SIGTERM);
    assert_eq!(staps.wait_exit().code(), Some(1));
    assert!(staps.lines().iter().any(|l| l.contains("exiting at once")));
    assert!(!sock.exists());
}

#[test]
fn new_connections_are_refused_once_shutdown_begins() {
    let mut staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let _silent = raw_ws(addr, &channel());
    staps.signal(libc::SIGTERM);
    staps.wait_log("shutting down");
    // The listener is closed: connecting fails, or the connection is closed unanswered.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        match try_connect_quietly(addr) {
            None => break,
            Some(()) => assert!(std::time::Instant::now() < deadline, "still accepting"),
        }
    }
}

fn try_connect_quietly(addr: std::net::SocketAddr) -> Option<()> {
    let stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).ok()?;
    tungstenite::client(format!("ws://{addr}/x"), stream)
        .ok()
        .map(drop)
}

#[test]
fn sigusr1_logs_the_counters() {
    let mut staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    let mut c = connect(staps.addr(), &ch);
    for _ in 0..3 {
        a.send(Message::text("x")).unwrap();
    }
    for _ in 0..3 {
        recv(&mut b);
        recv(&mut c);
    }
    // Counters are added after the deliveries are queued.
    let line = staps.wait_stats(|l| counter(l, "messages_out") == 6);
    assert_eq!(counter(&line, "connections"), 3);
    assert_eq!(counter(&line, "connections_total"), 3);
    assert_eq!(counter(&line, "channels"), 1);
    assert_eq!(counter(&line, "messages_in"), 3);
    assert_eq!(counter(&line, "messages_out"), 6);
    assert_eq!(counter(&line, "dropped"), 0);
    assert_eq!(counter(&line, "slow_disconnects"), 0);
}

#[test]
fn stale_socket_files_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(UnixListener::bind(&path).unwrap()); // the file stays, nobody listens
    assert!(path.exists());
    let mut staps = Staps::start(&format!("[staps]\nsocket = {}\n", path.display()), &[]);
    staps.wait_log("replaced stale socket");
    let ch = channel();
    let mut a = connect_unix(&path, &ch);
    let mut b = connect_unix(&path, &ch);
    a.send(Message::text("fresh")).unwrap();
    assert_eq!(recv(&mut b), Message::text("fresh"));
}

#[test]
fn a_live_socket_is_not_stolen_and_other_files_are_not_touched() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.sock");
    let _owner = UnixListener::bind(&live).unwrap();
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, "keep me").unwrap();
    for (path, message) in [
        (&live, "another process is listening"),
        (&plain, "not a socket"),
    ] {
        let o = Command::new(binary())
            .args(["-c", "/dev/null", "--socket"])
            .arg(path)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(message) && err.contains(path.to_str().unwrap()),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "keep me");
    assert!(live.exists());
}

#[test]
fn socket_mode_is_honoured() {
    for (mode, expected) in [("0600", 0o600), ("0666", 0o666), ("0660", 0o660)] {
        let staps = Staps::start(
            &format!("[staps]\nsocket = {{dir}}/m.sock\nmode = {mode}\n"),
            &[],
        );
        let meta = std::fs::metadata(&staps.sockets[0]).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, expected, "mode {mode}");
    }
}

#[test]
fn socket_group_owns_the_socket() {
    // A group the test runner is in, so this works as root and as a user.
    let gid = unsafe { libc::getegid() };
    let staps = Staps::start(
        &format!("[staps]\nsocket = {{dir}}/g.sock\nsocket_group = {gid}\n"),
        &[],
    );
    assert_eq!(std::fs::metadata(&staps.sockets[0]).unwrap().gid(), gid);
}

#[test]
fn sighup_reopens_the_log_file() {
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("staps.log");
    let mut staps = Staps::launch(
        &format!(
            "[staps]\nlisten = 127.0.0.1:0\n[daemon]\nlog_file = {}\n",
            log.display()
        ),
        &[],
        &[],
        Some((Stdio::null(), log.clone())),
    );
    // logrotate: move the file away, then SIGHUP.
    let rotated = logs.path().join("staps.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    staps.signal(libc::SIGHUP);
    staps.wait_log("reopened log file");
    let line = staps.stats();
    assert!(line.contains("connections=0"));
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("ready") && !old.contains("reopened"), "{old}");
}

#[test]
fn under_journald_lines_carry_priorities_and_no_timestamps() {
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("journal");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut staps = Staps::launch(
        &tcp_config(""),
        &[],
        &[("JOURNAL_STREAM", &stream)],
        Some((file.into(), path.clone())),
    );
    let ready = staps.wait_log("ready");
    assert!(ready.starts_with("<6>staps"), "{ready}");
    // With JOURNAL_STREAM naming some other stream, the usual format.
    let other = Staps::start_env(&tcp_config(""), &[], &[("JOURNAL_STREAM", "1:1")]);
    let ready = other
        .lines()
        .into_iter()
        .find(|l| l.contains("ready"))
        .unwrap();
    assert!(ready.starts_with("20") && ready.contains("INFO"), "{ready}");
}

#[test]
fn channel_paths_never_appear_in_logs_at_info() {
    let mut staps = Staps::start(
        &tcp_config("max_message_size = 100\nmax_clients_per_channel = 2\nqueue_length = 1"),
        &[],
    );
    let paths: Vec<String> = (0..5).map(|_| channel()).collect();
    for path in &paths {
        let mut a = connect(staps.addr(), path);
        let mut b = connect(staps.addr(), path);
        let _ = try_connect(staps.addr(), path); // 503: full
        a.send(Message::text("hello")).unwrap();
        assert_eq!(recv(&mut b), Message::text("hello"));
        a.send(Message::binary(vec![0u8; 200])).unwrap(); // 1009
        assert_eq!(close_code(&mut a), 1009);
    }
    let _ = get(staps.addr(), &paths[0], "");
    staps.stats();
    staps.signal(libc::SIGTERM);
    staps.wait_exit();
    let log = staps.lines().join("\n");
    assert!(log.contains("stopped:"), "{log}");
    for path in &paths {
        assert!(
            !log.contains(&path[1..9]),
            "channel {path} leaked into the log:\n{log}"
        );
    }
}

#[test]
fn debug_logging_shows_fingerprints_and_paths() {
    let mut staps = Staps::start(&tcp_config(""), &["-v"]);
    let path = channel();
    let _a = connect(staps.addr(), &path);
    let line = staps.wait_log("joined channel");
    assert!(line.contains(&path), "{line}");
    // A path with a newline, a journald priority and a terminal escape is
    // logged escaped: no forged line, nothing for a terminal to run.
    let _b = connect(staps.addr(), "/x%0a%3c0%3eforged%1b%5b2J");
    let line = staps.wait_log("forged");
    assert!(line.contains("/x\\n<0>forged\\u{1b}[2J"), "{line}");
    assert!(
        !staps.lines().iter().any(|l| l.starts_with("<0>")),
        "a forged line"
    );
}

#[test]
fn quiet_logs_warnings_but_no_info() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let conf = dir.path().join("q.conf");
    std::fs::write(
        &conf,
        format!("[staps]\nsocket = {}\nbogus = 1\n", sock.display()),
    )
    .unwrap();
    let child = Command::new(binary())
        .arg("-c")
        .arg(&conf)
        .arg("-q")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Serving is the sign it is ready, since -q hides "ready".
    let deadline = std::time::Instant::now() + DEADLINE;
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "never served");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ch = channel();
    let mut a = connect_unix(&sock, &ch);
    let mut b = connect_unix(&sock, &ch);
    a.send(Message::text("quiet")).unwrap();
    assert_eq!(recv(&mut b), Message::text("quiet"));
    drop((a, b));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("WARN") && log.contains("bogus"), "{log}");
    assert!(!log.contains("INFO"), "{log}");
}

#[test]
fn system_limits_short_of_max_connections_are_reported() {
    // Ten million clients need more mappings, pids and descriptors than any
    // machine here allows; ten need nothing special.
    let mut big = Staps::start(&tcp_config("max_connections = 10000000"), &[]);
    let line = big.wait_log("vm.max_map_count is");
    assert!(
        line.contains("WARN") && line.contains("clients' worth"),
        "{line}"
    );
    big.wait_log("the open files limit is");
    // The largest value the key takes must not overflow anything.
    let mut huge = Staps::start(&tcp_config("max_connections = 18446744073709551615"), &[]);
    huge.wait_log("kernel.pid_max is");
    let small = Staps::start(&tcp_config("max_connections = 10"), &[]);
    assert!(
        !small.lines().iter().any(|l| l.contains("clients' worth")),
        "{:?}",
        small.lines()
    );
}
