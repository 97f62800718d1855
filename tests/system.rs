//! SPEC §9: the units, the Debian package, and staps behind real nginx and
//! Apache, all from Debian's packages.
//!
//! `systemd-analyze verify` runs wherever systemd's tools are. The others
//! change the machine (install a package, run web servers as root) and so run
//! only with STAPS_TEST_SYSTEM=1, which `.ci/run` sets; elsewhere they skip
//! loudly, and under STAPS_TEST_STRICT=1 a missing tool is a failure.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::*;
use tungstenite::Message;

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `Some(reason)` unless system tests are switched on, we are root, and the
/// programs are there.
fn needs_system(programs: &[(&str, &str)]) -> Option<String> {
    if std::env::var_os("STAPS_TEST_SYSTEM").is_none_or(|v| v != "1") {
        // Not an error even under STAPS_TEST_STRICT: these change the machine,
        // so they run only when asked to.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: system test (set STAPS_TEST_SYSTEM=1, as .ci/run does) ***\n"
        );
        return Some(String::new());
    }
    needs_root().or_else(|| programs.iter().find_map(|(p, pkg)| needs_program(p, pkg)))
}

fn skip_system(test: &str, programs: &[(&str, &str)]) -> bool {
    match needs_system(programs) {
        Some(reason) if reason.is_empty() => true,
        missing => skip(test, missing),
    }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if skip(
        "units_pass_systemd_analyze_verify",
        needs_program("systemd-analyze", "systemd"),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart exists and that the man page named in
    // Documentation= is there: point both at this build.
    let service = fs::read_to_string(root_dir().join("staps.service"))
        .unwrap()
        .replace("/usr/bin/staps", binary());
    fs::write(dir.path().join("staps.service"), service).unwrap();
    fs::copy(
        root_dir().join("packaging/staps.socket"),
        dir.path().join("staps.socket"),
    )
    .unwrap();
    let man = dir.path().join("man/man1");
    fs::create_dir_all(&man).unwrap();
    fs::copy(root_dir().join("packaging/staps.1"), man.join("staps.1")).unwrap();
    let (ok, out) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("staps.service"))
        .arg(dir.path().join("staps.socket"))
        .env("MANPATH", dir.path().join("man")));
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    let (_, security) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(dir.path().join("staps.service")));
    let level = security
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level:\n{security}"));
    let score: f64 = level
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(score <= 2.0, "exposure grew: {level}");
}

/// A websocket connection made by `socat` running as `user`: the kernel checks
/// the socket's permissions against that user, and tungstenite speaks through
/// socat's standard input and output.
struct AsUser {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl AsUser {
    fn connect(user: &str, socket: &Path, path: &str) -> tungstenite::WebSocket<AsUser> {
        let mut child = Command::new("runuser")
            .args(["-u", user, "--", "socat", "-"])
            .arg(format!("UNIX-CONNECT:{}", socket.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("runuser socat");
        let stream = AsUser {
            stdin: child.stdin.take().unwrap(),
            stdout: child.stdout.take().unwrap(),
            child,
        };
        match tungstenite::client(format!("ws://localhost{path}"), stream) {
            Ok((ws, _)) => ws,
            Err(e) => panic!("handshake as {user}: {e}"),
        }
    }
}

impl Read for AsUser {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stdout.read(buf)
    }
}

impl Write for AsUser {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stdin.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stdin.flush()
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_debian_package_installs_serves_and_purges() {
    if skip_system(
        "the_debian_package_installs_serves_and_purges",
        &[
            ("dpkg", "dpkg"),
            ("lintian", "lintian"),
            ("socat", "socat"),
            ("runuser", "util-linux"),
        ],
    ) {
        return;
    }
    let root = root_dir();
    let (ok, out) = run(Command::new("make").arg("deb").current_dir(&root));
    assert!(ok, "make deb:\n{out}");
    let arch = run(Command::new("dpkg").arg("--print-architecture"))
        .1
        .trim()
        .to_owned();
    let deb = root.join(format!(
        "target/debian/staps_{}_{arch}.deb",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(deb.exists(), "{} not built", deb.display());

    let (_, lint) = run(Command::new("lintian").arg(&deb));
    assert!(
        !lint
            .lines()
            .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian:\n{lint}"
    );

    let (ok, out) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i:\n{out}");
    let socket = Path::new("/run/staps/staps.sock");
    // Without systemd (or where policy-rc.d forbids starting), start it by hand.
    let (_, status) = run(Command::new("/etc/init.d/staps").arg("status"));
    if !status.contains("is running") {
        let (ok, out) = run(Command::new("/etc/init.d/staps").arg("start"));
        assert!(ok, "init.d start:\n{out}");
    }
    let out = Command::new("/etc/init.d/staps")
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "status of a running staps");
    let pid: i32 = fs::read_to_string("/run/staps/staps.pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let staps_uid = run(Command::new("id").args(["-u", "staps"])).1;
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().nth(1) == Some(staps_uid.trim()),
        "{uid_line}"
    );

    // The secret of read-only URLs: made by the package, the staps user's, 0600.
    let secret = fs::symlink_metadata("/var/lib/staps/secret").expect("the package's secret");
    assert!(secret.file_type().is_file() && secret.len() == 32);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&secret.permissions()) & 0o777,
        0o600
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&secret).to_string(),
        staps_uid.trim()
    );
    // Clients as user staps exchange messages over the packaged socket.
    let ch = channel();
    let mut a = AsUser::connect("staps", socket, &ch);
    let mut b = AsUser::connect("staps", socket, &ch);
    a.send(Message::text("packaged")).unwrap();
    assert_eq!(recv(&mut b), Message::text("packaged"));
    drop((a, b));
    // The packaged build links over TLS (issue 28): amqps:// is a valid URL.
    let (ok, out) = run(Command::new("/usr/bin/staps").args([
        "--check-config",
        "-c",
        "/etc/staps/staps.conf",
        "--amqp",
        "amqps://staps:secret@rabbit1.example/ amqps://staps:secret@rabbit2.example/",
    ]));
    assert!(ok, "the package refuses amqps://:\n{out}");
    // nobody is not in the socket's group: refused by the kernel.
    let (ok, _) = run(Command::new("runuser")
        .args(["-u", "nobody", "--", "socat", "-u", "-"])
        .arg(format!("UNIX-CONNECT:{}", socket.display()))
        .stdin(Stdio::null()));
    assert!(!ok, "nobody could connect to a 0660 staps:staps socket");

    let (ok, out) = run(Command::new("/etc/init.d/staps").arg("stop"));
    assert!(ok, "init.d stop:\n{out}");
    wait_until("staps to stop", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    let out = Command::new("/etc/init.d/staps")
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "status of a stopped staps");
    assert!(!socket.exists() && !Path::new("/run/staps/staps.pid").exists());

    let (ok, out) = run(Command::new("dpkg").args(["--purge", "staps"]));
    assert!(ok, "dpkg --purge:\n{out}");
    let (_, listed) = run(Command::new("dpkg").args(["-l", "staps"]));
    assert!(
        !listed
            .lines()
            .any(|l| l.starts_with("ii") || l.starts_with("rc"))
    );
    for path in [
        "/usr/bin/staps",
        "/etc/staps",
        "/etc/init.d/staps",
        "/etc/default/staps",
        "/var/lib/staps",
        "/run/staps",
        "/usr/share/doc/staps",
    ] {
        assert!(!Path::new(path).exists(), "{path} left after purge");
    }
    let (_, rc) = run(Command::new("sh").args(["-c", "ls /etc/rc*.d/ | grep staps || true"]));
    assert!(rc.trim().is_empty(), "init links left: {rc}");
}

/// Clients one address may hold in these tests: [`check_proxy`] opens five
/// from 127.0.0.1.
const PER_ADDRESS: usize = 6;

/// staps on a socket nginx's or Apache's workers (www-data) may use.
fn staps_for_proxy() -> Staps {
    Staps::start(
        &format!(
            "[staps]\nsocket = {{dir}}/staps.sock\nmode = 0660\nsocket_group = www-data\n\
             [limits]\nmax_connections_per_address = {PER_ADDRESS}\n"
        ),
        &[],
    )
}

/// Check what a proxy in front of staps on `port` lets through; the secrets
/// it used (channel paths and read-only tokens), which no log may hold.
fn check_proxy(port: u16) -> Vec<String> {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    wait_until("the proxy to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    let ch = channel();
    let mut a = connect(addr, &ch);
    let mut b = connect(addr, &ch.to_uppercase());
    let mut c = connect(addr, &ch);
    a.send(Message::text("through the proxy")).unwrap();
    assert_eq!(recv(&mut c), Message::text("through the proxy"));
    a.send(Message::binary(vec![0, 1, 2])).unwrap();
    assert_eq!(recv(&mut c), Message::binary(vec![0, 1, 2]));
    b.send(Message::text("other case, other channel")).unwrap();
    c.send(Message::text("c")).unwrap();
    assert_eq!(recv(&mut a), Message::text("c"));
    // The read-only twin comes through, and listens.
    let page = raw_http(
        addr,
        format!("GET {ch}?readonly HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let url = body(&page).trim();
    let twin = &url[url.find("/r/").unwrap_or_else(|| panic!("{page}"))..];
    let mut listener = connect(addr, twin);
    a.send(Message::text("to the twin")).unwrap();
    assert_eq!(recv(&mut listener), Message::text("to the twin"));
    assert_eq!(recv(&mut c), Message::text("to the twin"));
    // An HTTP publish and a streaming listener come through, the listener's
    // events as they happen (not buffered until the response ends).
    let mut sse = std::net::TcpStream::connect(addr).unwrap();
    sse.set_read_timeout(Some(DEADLINE)).unwrap();
    sse.write_all(format!("GET {ch}?sse HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_until_seen(&mut sse, "\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    let posted = post(addr, &ch, "Content-Type: text/plain\r\n", b"posted!!");
    assert!(posted.starts_with("HTTP/1.1 200"), "{posted}");
    assert!(posted.contains("{\"clients\": 4}"), "{posted}");
    assert_eq!(recv(&mut c), Message::text("posted!!"));
    read_until_seen(&mut sse, "data: posted!!\n\n");
    a.send(Message::text("to the listener")).unwrap();
    read_until_seen(&mut sse, "data: to the listener\n\n");
    // The usage page comes through, with the proxy's host.
    let page = raw_http(
        addr,
        b"GET / HTTP/1.1\r\nHost: relay.example\r\nConnection: close\r\n\r\n",
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("ws://relay.example/"), "{page}");
    // Other paths are refused by the proxy itself.
    for path in [
        "/chat",
        "/not-a-uuid/",
        "/0b7e4a4f-3b0e-1c1e-9f55-7f3c1f2b9d10",
    ] {
        let err = try_connect(addr, path).unwrap_err();
        let status = status_of(&err);
        assert!(status == 404 || status == 403, "{path}: {status}");
    }
    check_per_address(addr);
    vec![ch[1..].to_owned(), twin[3..].to_owned()]
}

/// Every connection comes from the proxy, yet each client address has its
/// own limit: the proxy names the client (X-Forwarded-For), and what the
/// client itself claims there changes nothing.
fn check_per_address(addr: std::net::SocketAddr) {
    let ch = channel();
    let mine: Vec<Ws> = (0..PER_ADDRESS)
        .map(|_| connect_from("127.0.0.2", addr, &ch))
        .collect();
    let refused = try_connect_from("127.0.0.2", addr, &ch).unwrap_err();
    assert_eq!(status_of(&refused), 503, "one more from 127.0.0.2");
    let mut spoofing = tcp_from("127.0.0.2", addr);
    spoofing
        .write_all(
            format!(
                "GET {ch} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 X-Forwarded-For: 10.20.30.40\r\nX-Real-IP: 10.20.30.41\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let head = read_until_seen(&mut spoofing, "\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 503"),
        "a claimed address helped: {head}"
    );
    // Another address is served.
    let mut other = connect_from("127.0.0.3", addr, &ch);
    drop(mine);
    other.send(Message::text("still here")).unwrap();
}

/// The tests that run Debian's stock nginx and Apache on port 80 and change
/// their configuration in /etc: one at a time.
static STOCK_WEB_SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A directory of /etc as it was, put back when the test ends, however it ends.
struct Restore {
    dir: PathBuf,
    saved: tempfile::TempDir,
}

impl Restore {
    fn save(dir: &str) -> Restore {
        let saved = tempfile::tempdir().unwrap();
        let (ok, out) = run(Command::new("cp").arg("-a").arg(dir).arg(saved.path()));
        assert!(ok, "saving {dir}: {out}");
        Restore {
            dir: PathBuf::from(dir),
            saved,
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let name = self.dir.file_name().unwrap();
        let _ = fs::remove_dir_all(&self.dir);
        let _ = Command::new("cp")
            .arg("-a")
            .arg(self.saved.path().join(name))
            .arg(self.dir.parent().unwrap())
            .status();
    }
}

/// Runs a command when the test ends, however it ends (stopping a server).
struct Finally(Vec<&'static str>);

impl Drop for Finally {
    fn drop(&mut self) {
        let _ = Command::new(self.0[0]).args(&self.0[1..]).status();
    }
}

/// Follow the steps an example's comment gives an operator (its lines
/// `#   $ COMMAND`), as they are written, from Debian's stock configuration.
/// Two things differ from a real install, and only these: the example is
/// this checkout's, with the socket of the test's staps in place of
/// `/run/staps/staps.sock` (the package's staps is not running), and the last
/// step, `systemctl reload SERVER` (there is no systemd here), is `start`.
fn follow_the_steps(example: &str, socket: &Path, start: &[&str]) {
    let text = fs::read_to_string(root_dir().join("packaging").join(example)).unwrap();
    let examples = tempfile::tempdir().unwrap();
    fs::write(
        examples.path().join(example),
        text.replace("/run/staps/staps.sock", socket.to_str().unwrap()),
    )
    .unwrap();
    let steps: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#   $ "))
        .collect();
    assert!(
        steps
            .last()
            .is_some_and(|s| s.starts_with("systemctl reload ")),
        "{example}: the steps end with a reload: {steps:?}"
    );
    for step in &steps[..steps.len() - 1] {
        let step = step.replace(
            "/usr/share/doc/staps/examples",
            examples.path().to_str().unwrap(),
        );
        let (ok, out) = run(Command::new("sh").arg("-ec").arg(&step));
        assert!(ok, "{example}: the step `{step}` failed:\n{out}");
    }
    let (ok, out) = run(Command::new(start[0]).args(&start[1..]));
    assert!(ok, "{example}: {start:?} failed:\n{out}");
}

/// Port 80 must be free for the stock web servers' configuration (a server
/// stopped by the test before may take a moment to let go of it).
fn port_80_is_free() {
    wait_until("port 80 to be free for the stock configuration", || {
        std::net::TcpListener::bind("0.0.0.0:80").is_ok()
    });
}

#[test]
fn nginx_with_the_shipped_example() {
    if skip_system("nginx_with_the_shipped_example", &[("nginx", "nginx")]) {
        return;
    }
    let _one = STOCK_WEB_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let _etc = Restore::save("/etc/nginx");
    // Debian's configuration as installed: its default site enabled.
    assert!(
        Path::new("/etc/nginx/sites-enabled/default").exists(),
        "not the stock configuration: /etc/nginx/sites-enabled/default is missing"
    );
    port_80_is_free();
    let staps = staps_for_proxy();
    let log = Path::new("/var/log/nginx/staps-access.log");
    empty_logs("/var/log/nginx");
    let _stop = Finally(vec!["nginx", "-s", "quit"]);
    follow_the_steps("nginx-staps.conf", &staps.sockets[0], &["nginx"]);
    let secrets = check_proxy(80);
    // The page keeps the port the client used.
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], 80).into();
    let page = raw_http(
        addr,
        b"GET / HTTP/1.1\r\nHost: relay.example:8443\r\nConnection: close\r\n\r\n",
    );
    assert!(page.contains("ws://relay.example:8443/"), "{page}");
    // The access log has the requests, and no channel path.
    let ch = channel();
    drop(connect(addr, &ch));
    wait_until("nginx to log the channel's request", || {
        fs::read_to_string(log).is_ok_and(|t| t.contains("\"GET\" 101"))
    });
    let text = fs::read_to_string(log).unwrap();
    assert!(
        !text.contains(&ch[1..]),
        "a channel path in the access log:\n{text}"
    );
    no_secret_in_logs("/var/log/nginx", &secrets);
}

/// No file in `dir` holds any of `secrets` (channel paths, tokens).
fn no_secret_in_logs(dir: &str, secrets: &[String]) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = String::from_utf8_lossy(&fs::read(&path).unwrap_or_default()).into_owned();
        for secret in secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{} holds a channel path or token:\n{text}",
                path.display()
            );
        }
    }
}

/// Empty the log files of `dir`, so that what a test finds there is its own.
fn empty_logs(dir: &str) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let _ = fs::write(entry.path(), b"");
    }
}

#[test]
fn apache_with_the_shipped_example() {
    if skip_system(
        "apache_with_the_shipped_example",
        &[("apache2", "apache2"), ("a2enmod", "apache2")],
    ) {
        return;
    }
    let _one = STOCK_WEB_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let _etc = Restore::save("/etc/apache2");
    assert!(
        Path::new("/etc/apache2/sites-enabled/000-default.conf").exists(),
        "not the stock configuration: 000-default is not enabled"
    );
    port_80_is_free();
    let staps = staps_for_proxy();
    empty_logs("/var/log/apache2");
    let _stop = Finally(vec!["apache2ctl", "stop"]);
    follow_the_steps(
        "apache-staps.conf",
        &staps.sockets[0],
        &["apache2ctl", "start"],
    );
    let secrets = check_proxy(80);
    // Apache writes its log as requests end: one more, then look.
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], 80).into();
    drop(connect(addr, &channel()));
    wait_until("Apache to log the requests", || {
        fs::read_to_string("/var/log/apache2/staps-access.log")
            .is_ok_and(|t| t.contains("\"GET\" 101"))
    });
    no_secret_in_logs("/var/log/apache2", &secrets);
}

#[test]
fn make_install_honours_prefix_and_destdir() {
    if skip_system(
        "make_install_honours_prefix_and_destdir",
        &[("make", "make")],
    ) {
        return;
    }
    let dest = tempfile::tempdir().unwrap();
    let (ok, out) = run(Command::new("make")
        .arg("install")
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg("PREFIX=/opt/staps")
        .current_dir(root_dir()));
    assert!(ok, "make install:\n{out}");
    for file in [
        "opt/staps/bin/staps",
        "opt/staps/share/man/man1/staps.1",
        "etc/staps/staps.conf",
        "opt/staps/share/doc/staps/examples/staps.service",
        "opt/staps/share/doc/staps/examples/nginx-staps.conf",
    ] {
        assert!(dest.path().join(file).is_file(), "{file} not installed");
    }
    // An existing configuration is kept.
    fs::write(dest.path().join("etc/staps/staps.conf"), "; mine\n").unwrap();
    let (ok, _) = run(Command::new("make")
        .arg("install")
        .arg(format!("DESTDIR={}", dest.path().display()))
        .current_dir(root_dir()));
    assert!(ok);
    assert_eq!(
        fs::read_to_string(dest.path().join("etc/staps/staps.conf")).unwrap(),
        "; mine\n"
    );
}
