//! SPEC §5: configuration files and the command line.

mod common;

use std::process::{Command, Output};

use common::*;
use tungstenite::Message;

fn run(args: &[&str], config: Option<&str>) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(binary());
    if let Some(text) = config {
        let path = dir.path().join("staps.conf");
        std::fs::write(&path, text).unwrap();
        cmd.arg("-c").arg(path);
    }
    cmd.args(args).env_remove("RUST_LOG");
    (cmd.output().expect("run staps"), dir)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn check_config_prints_the_effective_settings() {
    let conf = "[staps]\nsocket = /tmp/a.sock, /tmp/b.sock\nmode = 640\namqp = amqp://staps:hunter2@broker/\n\
                [limits]\nqueue_length = 7\nslow_client = drop\n";
    let (o, _dir) = run(&["--check-config"], Some(conf));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("socket = /tmp/a.sock /tmp/b.sock"), "{out}");
    assert!(out.contains("mode = 0640"), "{out}");
    assert!(out.contains("queue_length = 7"), "{out}");
    assert!(out.contains("slow_client = drop"), "{out}");
    assert!(
        out.contains("max_message_size = 1048576"),
        "defaults are shown: {out}"
    );
    assert!(!out.contains("hunter2"), "passwords are not printed: {out}");
}

#[test]
fn check_config_fails_on_unknown_keys_naming_file_and_line() {
    let (o, dir) = run(
        &["--check-config"],
        Some("[staps]\nport = 1\n\n[limits]\nqueue_lenght = 5\n"),
    );
    assert_eq!(o.status.code(), Some(78));
    let conf = dir.path().join("staps.conf");
    let expected = format!("{}:5: unknown key 'queue_lenght'", conf.display());
    assert!(stderr(&o).contains(&expected), "{}", stderr(&o));
}

#[test]
fn unknown_keys_only_warn_at_startup() {
    let mut staps = Staps::start("[staps]\nlisten = 127.0.0.1:0\nfrobnicate = yes\n", &[]);
    let line = staps.wait_log("unknown key 'frobnicate'");
    assert!(line.contains("staps.conf:3"), "{line}");
}

#[test]
fn bad_values_stop_startup_with_78_naming_file_line_key_and_form() {
    let cases = [
        (
            "[staps]\nport = 1\nmode = rw-rw----\n",
            ":3: [staps] mode:",
            "octal",
        ),
        (
            "[staps]\nlisten = 127.0.0.1\n",
            ":2: [staps] listen:",
            "ADDRESS:PORT",
        ),
        (
            "[staps]\nport = 1\namqp = http://x/\n",
            "[staps] amqp",
            "amqp://",
        ),
        (
            "[staps]\nport = 1\n[daemon]\nuser = no-such-user-here\n",
            "[daemon] user",
            "no such user",
        ),
        // A number with no passwd entry has no group to switch to.
        (
            "[staps]\nport = 1\n[daemon]\nuser = 54321\n",
            "[daemon] user",
            "uid 54321 has no passwd entry",
        ),
        (
            "[staps]\nport = 1\n[limits]\nping_interval = soon\n",
            ":4: [limits] ping_interval:",
            "seconds",
        ),
        ("[staps]\nport = 70000\n", ":2: [staps] port:", "0 to 65535"),
        (
            "[staps]\nport = 1\n[limits]\nmax_message_size = 1000000000000\n",
            ":4: [limits] max_message_size:",
            "at most 1073741824",
        ),
    ];
    for (conf, place, form) in cases {
        for args in [&[][..], &["--check-config"][..]] {
            let (o, _dir) = run(args, Some(conf));
            assert_eq!(o.status.code(), Some(78), "{conf}");
            let err = stderr(&o);
            assert!(err.contains(place) && err.contains(form), "{conf}: {err}");
        }
    }
}

/// 0.1.6 served /var/run/staps/staps.sock when no listener was configured
/// (a file with only mode and amqp): so does staps, with a warning that
/// names the modern form. `--socket` alone is 0.1.6's way to turn that
/// socket off: with nothing else, nothing is left to listen on.
#[test]
fn a_0_1_x_file_without_listeners_serves_the_0_1_x_socket() {
    let conf = "[staps]\nmode = 0660\namqp =\n";
    let (o, _dir) = run(&["--check-config"], Some(conf));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("socket = /var/run/staps/staps.sock"),
        "{}",
        stdout(&o)
    );
    let err = stderr(&o);
    assert!(
        err.contains("warning:") && err.contains("socket = /run/staps/staps.sock"),
        "{err}"
    );
    let (o, _dir) = run(&["--socket"], Some(conf));
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("no listener"), "{}", stderr(&o));
    // --socket alone with a port: TCP only.
    let (o, _dir) = run(
        &["--check-config", "--socket", "--port", "4711"],
        Some(conf),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("port = 4711") && out.contains("socket = \n"),
        "{out}"
    );
}

#[test]
fn the_0_1_x_section_name_is_a_warning_under_check_config() {
    let (o, _dir) = run(
        &["--check-config"],
        Some("[controller.base]\nport = 4711\n"),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning:") && stderr(&o).contains("[staps]"));
    // An unknown key stays an error there.
    let (o, _dir) = run(
        &["--check-config"],
        Some("[controller.base]\nport = 4711\nmood = 1\n"),
    );
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
}

#[test]
fn debug_is_verbose_and_amqp_errors_name_the_command_line() {
    let conf = "[staps]\nport = 4711\n";
    let (o, _dir) = run(&["--check-config", "--debug"], Some(conf));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("-v"), "{}", stderr(&o));
    let (o, _dir) = run(&["--check-config", "--amqp", "http://nope/"], Some(conf));
    assert_eq!(o.status.code(), Some(78));
    let err = stderr(&o);
    assert!(
        err.contains("command line") && err.contains("--amqp"),
        "{err}"
    );
    assert!(!err.contains("staps.conf"), "{err}");
}

#[test]
fn legacy_section_name_works_with_a_warning() {
    let mut staps = Staps::start("[controller.base]\nlisten = 127.0.0.1:0\n", &[]);
    let line = staps.wait_log("[controller.base]");
    assert!(line.contains("[staps]"), "{line}");
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    a.send(Message::text("legacy")).unwrap();
    assert_eq!(recv(&mut b), Message::text("legacy"));
}

#[test]
fn command_line_overrides_files() {
    let conf = "[staps]\nsocket = /nonexistent/dir/x.sock\nport = 1\nmode = 0600\n";
    let (o, _dir) = run(
        &[
            "--check-config",
            "--listen",
            "127.0.0.1:9",
            "[::1]:10",
            "--mode",
            "0666",
        ],
        Some(conf),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("socket = \n"),
        "command-line listeners replace the files': {out}"
    );
    assert!(out.contains("port = \n"), "{out}");
    assert!(out.contains("listen = 127.0.0.1:9 [::1]:10"), "{out}");
    assert!(out.contains("mode = 0666"), "{out}");
    // And it really serves there.
    let staps = Staps::start(conf, &["--listen", "127.0.0.1:0"]);
    assert_eq!(staps.tcp.len(), 1);
    assert!(staps.sockets.is_empty());
}

#[test]
fn legacy_options_take_several_values() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let staps = Staps::start(
        "",
        &[
            "--socket",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "--mode",
            "0600",
        ],
    );
    assert_eq!(staps.sockets, vec![a.clone(), b]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&a).unwrap().permissions().mode() & 0o7777,
        0o600
    );
}

#[test]
fn bad_command_line_values_are_config_errors_and_unknown_flags_usage_errors() {
    let (o, _dir) = run(&["--port", "http"], Some(""));
    assert_eq!(o.status.code(), Some(78));
    assert!(
        stderr(&o).contains("command line: --port"),
        "{}",
        stderr(&o)
    );
    let (o, _dir) = run(&["--frobnicate"], Some(""));
    assert_eq!(o.status.code(), Some(64));
    let (o, _dir) = run(&["-V"], None);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains(env!("CARGO_PKG_VERSION")));
    let (o, _dir) = run(&["--help"], None);
    assert_eq!(o.status.code(), Some(0));
    for flag in [
        "--socket",
        "--port",
        "--listen",
        "--mode",
        "--amqp",
        "--daemon",
        "--config",
        "--check-config",
        "--verbose",
        "--quiet",
    ] {
        assert!(stdout(&o).contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn home_config_is_read_when_no_file_is_given() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".staps.conf"),
        "[staps]\nport = 4711\n[limits]\nqueue_length = 4711\n",
    )
    .unwrap();
    let o = Command::new(binary())
        .arg("--check-config")
        .env("HOME", home.path())
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(out.contains("queue_length = 4711"), "{out}{}", stderr(&o));
    assert!(
        out.contains(&format!("{}", home.path().join(".staps.conf").display())),
        "{out}"
    );
}

#[test]
fn a_missing_config_file_given_with_c_is_an_error() {
    let o = Command::new(binary())
        .args(["-c", "/nonexistent/staps.conf"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("/nonexistent/staps.conf"));
}

#[test]
fn an_address_in_use_fails_with_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (o, _dir) = run(&["--listen", &addr], Some(""));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&addr), "{}", stderr(&o));
}

/// Issue 28: `amqp` lists a cluster's nodes; `--check-config` checks each,
/// shows them all without passwords, and an error in any of them never
/// shows a password (a second URL's was shown whole).
#[test]
fn every_amqp_url_is_checked_and_none_shows_its_password() {
    let conf = "[staps]\nport = 4711\n\
                amqp = amqp://staps:hunter2@rabbit1/, amqps://staps:hunter3@rabbit2:5999/v\n";
    let (o, _dir) = run(&["--check-config"], Some(conf));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("amqp = amqp://staps:***@rabbit1/ amqps://staps:***@rabbit2:5999/v"),
        "{out}"
    );
    assert!(!out.contains("hunter"), "{out}");
    let bad = "[staps]\nport = 4711\n\
               amqp = amqp://staps:hunter2@rabbit1/ amqp://staps:hunter3@rabbit2:notaport/\n";
    let (o, _dir) = run(&["--check-config"], Some(bad));
    assert_eq!(o.status.code(), Some(78));
    let err = stderr(&o);
    assert!(err.contains("amqp://staps:***@rabbit2:notaport/"), "{err}");
    assert!(!err.contains("hunter"), "{err}");
    let (o, _dir) = run(
        &[
            "--check-config",
            "--amqp",
            "amqp://a/ amqp://u:hunter4@b:x/",
        ],
        Some("[staps]\nport = 4711\n"),
    );
    assert_eq!(o.status.code(), Some(78));
    assert!(!stderr(&o).contains("hunter4"), "{}", stderr(&o));
}
