//! The real staps binary, started per test, and real websocket clients for it.
//!
//! Everything waits on events with generous deadlines (a loaded 2-core machine
//! must not make a test fail), never on fixed sleeps.

#![allow(dead_code)] // each test file uses a different part of this

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

pub mod browser;

/// How long any single expected event may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Path to the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_staps")
}

/// A running staps.
pub struct Staps {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    log_file: Option<PathBuf>,
    pub dir: tempfile::TempDir,
    pub tcp: Vec<SocketAddr>,
    pub sockets: Vec<PathBuf>,
}

impl Staps {
    /// Start staps with `config` (an INI text; `{dir}` stands for a temporary
    /// directory) and extra arguments, and wait until it is ready.
    pub fn start(config: &str, args: &[&str]) -> Staps {
        Self::start_env(config, args, &[])
    }

    /// As [`Staps::start`], with extra environment variables.
    pub fn start_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Staps {
        Self::launch(config, args, env, None)
    }

    /// Start staps with its stderr going to `stderr`, reading its log lines from
    /// the file at the path given with it (the same file, or staps' `log_file`),
    /// and wait until it is ready.
    pub fn launch(
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Option<(Stdio, PathBuf)>,
    ) -> Staps {
        let dir = tempfile::tempdir().expect("tempdir");
        // The secret of read-only URLs in the test's directory, not in the
        // machine's /var/lib/staps, unless the test says where.
        // Added at the end (a section may come twice), so that line numbers
        // in the test's text stay as they are.
        let config = if config.contains("secret_file") || config.contains("[controller.base]") {
            config.to_owned()
        } else {
            format!("{config}\n[staps]\nsecret_file = {{dir}}/secret\n")
        };
        let config = config.replace("{dir}", dir.path().to_str().unwrap());
        let conf = dir.path().join("staps.conf");
        std::fs::write(&conf, config).expect("write config");
        let mut cmd = Command::new(binary());
        cmd.arg("-c").arg(&conf).args(args);
        cmd.env_remove("RUST_LOG").env_remove("JOURNAL_STREAM");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut log_file = None;
        match stderr {
            Some((file, path)) => {
                cmd.stderr(file);
                log_file = Some(path);
            }
            None => {
                cmd.stderr(Stdio::piped());
            }
        }
        let mut child = cmd.spawn().expect("start staps");
        if let Some(stderr) = child.stderr.take() {
            let log2 = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("STAPS_TEST_ECHO").is_some() {
                        eprintln!("staps: {line}");
                    }
                    log2.lock().unwrap().push(line);
                }
            });
        }
        let mut staps = Staps {
            child,
            log,
            log_file,
            dir,
            tcp: Vec::new(),
            sockets: Vec::new(),
        };
        staps.wait_log("ready");
        for line in staps.lines() {
            if let Some(l) = line.split("listening on ").nth(1) {
                match l.strip_prefix("unix:") {
                    Some(path) => staps.sockets.push(PathBuf::from(path)),
                    None => staps.tcp.push(l.parse().expect("listen address")),
                }
            }
        }
        staps
    }

    /// The first TCP address.
    pub fn addr(&self) -> SocketAddr {
        self.tcp[0]
    }

    /// All log lines so far.
    pub fn lines(&self) -> Vec<String> {
        match &self.log_file {
            Some(path) => std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect(),
            None => self.log.lock().unwrap().clone(),
        }
    }

    /// Wait for a log line containing `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str) -> String {
        self.wait_log_after(0, needle)
    }

    /// Wait for a log line containing `needle` among the lines after the first `skip`.
    pub fn wait_log_after(&mut self, skip: usize, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(line) = self.lines().iter().skip(skip).find(|l| l.contains(needle)) {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader thread a moment to collect the last lines.
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until {
                    if let Some(l) = self.lines().iter().skip(skip).find(|l| l.contains(needle)) {
                        return l.clone();
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                panic!(
                    "staps exited ({status}) before logging {needle:?}:\n{}",
                    self.lines().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {DEADLINE:?}:\n{}",
                self.lines().join("\n")
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send a signal.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Where the metrics listener is (an address, or `unix:PATH`), from its
    /// log line.
    pub fn metrics_at(&mut self) -> String {
        let line = self.wait_log("metrics on ");
        line.split("metrics on ").nth(1).unwrap().trim().to_owned()
    }

    /// The metrics listener's TCP address.
    pub fn metrics_addr(&mut self) -> SocketAddr {
        self.metrics_at().parse().expect("a TCP metrics listener")
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ask for the counters with SIGUSR1 and return the new line.
    pub fn stats(&mut self) -> String {
        let skip = self.lines().len();
        self.signal(libc::SIGUSR1);
        self.wait_log_after(skip, "connections=")
    }

    /// Wait until the counters satisfy `check` (they change as threads finish).
    pub fn wait_stats(&mut self, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let line = self.stats();
            if check(&line) {
                return line;
            }
            assert!(Instant::now() < deadline, "counters never matched: {line}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "staps did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Staps {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=` in a counters line.
pub fn counter(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

/// A websocket client over TCP.
pub type Ws = WebSocket<TcpStream>;

/// Connect a websocket client to `path` (may include a query).
pub fn connect(addr: SocketAddr, path: &str) -> Ws {
    try_connect(addr, path).unwrap_or_else(|e| panic!("connect {path}: {e}"))
}

/// Connect, returning the handshake error (e.g. an HTTP status) instead of panicking.
pub fn try_connect(addr: SocketAddr, path: &str) -> Result<Ws, tungstenite::Error> {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let url = format!("ws://{addr}{path}");
    match tungstenite::client(url, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("handshake interrupted"),
    }
}

/// A client with a tiny receive buffer that never reads: its raw socket, after
/// the handshake.
pub fn stalled_client(staps: &Staps, ch: &str) -> TcpStream {
    stalled_client_from("127.0.0.1", staps, ch)
}

/// [`stalled_client`] from loopback address `source`.
pub fn stalled_client_from(source: &str, staps: &Staps, ch: &str) -> TcpStream {
    let stream = small_socket_from(source, staps.addr());
    let (ws, _) = tungstenite::client(format!("ws://{}{ch}", staps.addr()), stream).unwrap();
    ws.into_inner()
}

/// A TCP connection from `source` with a 4 KiB receive buffer: what the
/// server sends it piles up as soon as it stops reading.
pub fn small_socket_from(source: &str, addr: SocketAddr) -> TcpStream {
    socket_from(source, addr, Some(4096))
}

/// A field of `/proc/PID/status` (`VmRSS`, `VmHWM` in KiB, `Threads`).
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// How many threads of process `pid` are called `name`.
pub fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("proc task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// How many file descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// A websocket client over a unix socket.
pub fn connect_unix(socket: &Path, path: &str) -> WebSocket<UnixStream> {
    let stream = UnixStream::connect(socket).expect("unix connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let url = format!("ws://localhost{path}");
    match tungstenite::client(url, stream) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("unix handshake: {e}"),
    }
}

/// The HTTP status a failed handshake got.
pub fn status_of(e: &tungstenite::Error) -> u16 {
    match e {
        tungstenite::Error::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP error, got {other}"),
    }
}

/// Next data message (pings and pongs skipped).
pub fn recv<S: Read + Write>(ws: &mut WebSocket<S>) -> Message {
    loop {
        match ws.read().expect("read") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// Read until the server closes; returns its close code (0 when none was sent).
pub fn close_code<S: Read + Write>(ws: &mut WebSocket<S>) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map_or(0, |f| f.code.into()),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    }
}

/// Send raw bytes as an HTTP request and read the whole response.
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(request).expect("write request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// Read from `stream` until what has come contains `needle`; all of it.
/// Fails if the stream ends (or its read timeout passes) first.
pub fn read_until_seen(stream: &mut impl Read, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = stream.read(&mut buf).unwrap_or(0);
        assert!(
            n > 0,
            "{needle:?} not in {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The status code of an HTTP response.
pub fn status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

/// The body of an HTTP response.
pub fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// A POST of `body` to `path` with the given extra header lines, its
/// Content-Length, and `Connection: close`; the whole response.
pub fn post(addr: SocketAddr, path: &str, headers: &str, body: &[u8]) -> String {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    raw_http(addr, &request)
}

/// A GET with the given extra header lines.
pub fn get(addr: SocketAddr, path: &str, headers: &str) -> String {
    raw_http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n").as_bytes(),
    )
}

/// A valid websocket upgrade request for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A raw websocket connection: the handshake done by hand, frames written by the test.
pub fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(upgrade_request(path).as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// A client frame: FIN set or not, opcode, masked with a fixed key.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// Read one server frame from a raw connection: (opcode, payload).
pub fn server_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    stream.read_exact(&mut h).expect("frame header");
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    (h[0] & 0x0f, payload)
}

/// The close code of the next close frame on a raw connection (skipping pings).
pub fn raw_close_code(stream: &mut TcpStream) -> u16 {
    loop {
        let (op, payload) = server_frame(stream);
        if op == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// A config with one TCP listener on a free port and extra lines for [limits].
pub fn tcp_config(limits: &str) -> String {
    format!("[staps]\nlisten = 127.0.0.1:0\n[limits]\n{limits}\n")
}

/// A random UUID4 channel path.
pub fn channel() -> String {
    format!("/{}", uuid::Uuid::new_v4())
}

/// Whether tests that need something this machine lacks (root, a broker, a
/// Debian package) must fail instead of skipping: `.ci/run` sets it.
pub fn strict() -> bool {
    std::env::var_os("STAPS_TEST_STRICT").is_some_and(|v| v == "1")
}

/// Skip the calling test when `missing` is `Some(what)`: loudly, on the real
/// stderr (not captured), or as a failure under [`strict`]. Returns true to skip.
pub fn skip(test: &str, missing: Option<String>) -> bool {
    let Some(what) = missing else { return false };
    if strict() {
        panic!("{test} cannot run: {what} (STAPS_TEST_STRICT=1 forbids skipping)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: {what}. Run .ci/run (or set up the machine as it does) to run it. ***\n"
    );
    true
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// `Some(reason)` unless running as root.
pub fn needs_root() -> Option<String> {
    (!is_root()).then(|| "needs root".to_owned())
}

/// `Some(reason)` unless `program` is on the PATH.
pub fn needs_program(program: &str, package: &str) -> Option<String> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    (!found).then(|| format!("{program} not found (Debian package {package})"))
}

/// Why a test cannot use Python module `module`, if it cannot (`.ci/run`
/// installs it with pip).
pub fn needs_python_module(module: &str) -> Option<String> {
    let found = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!found).then(|| format!("Python module {module} not found (pip install {module})"))
}

/// Wait until `check` holds, or fail after [`DEADLINE`] saying `what`.
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP connection to `addr` from loopback address `source` (127.0.0.2,
/// 127.0.0.3, ...): bound before it connects, so that staps sees another
/// client address.
pub fn tcp_from(source: &str, addr: SocketAddr) -> TcpStream {
    socket_from(source, addr, None)
}

/// A connection from `source`, with a receive buffer of `buffer` bytes
/// when given.
fn socket_from(source: &str, addr: SocketAddr, buffer: Option<usize>) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(size) = buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let from: SocketAddr = format!("{source}:0").parse().expect("source address");
    socket.bind(&from.into()).expect("bind the source address");
    socket.connect(&addr.into()).expect("tcp connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// A websocket client from loopback address `source`, or the handshake's error.
pub fn try_connect_from(
    source: &str,
    addr: SocketAddr,
    path: &str,
) -> Result<Ws, tungstenite::Error> {
    let stream = tcp_from(source, addr);
    match tungstenite::client(format!("ws://{addr}{path}"), stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("handshake interrupted"),
    }
}

/// A websocket client from loopback address `source`.
pub fn connect_from(source: &str, addr: SocketAddr, path: &str) -> Ws {
    try_connect_from(source, addr, path)
        .unwrap_or_else(|e| panic!("connect {path} from {source}: {e}"))
}

/// A raw websocket connection from `source`: handshake done by hand.
pub fn raw_ws_from(source: &str, addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = tcp_from(source, addr);
    stream.write_all(upgrade_request(path).as_bytes()).unwrap();
    let head = read_until_seen(&mut ByteReader(&mut stream), "\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// Reads one byte at a time, so that nothing past the response head is taken.
struct ByteReader<'a>(&'a mut TcpStream);

impl Read for ByteReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(1);
        self.0.read(&mut buf[..n])
    }
}

/// The header of a masked client frame announcing `len` payload bytes
/// (64-bit length form, mask key 0: the payload goes as it is).
pub fn frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode, 0x80 | 127];
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]);
    f
}

/// Lower the open files limit of process `pid` (with prlimit) so that about
/// `room` more descriptors fit; how many do. The limit is on descriptor
/// numbers, and some high ones are inherited (cargo's jobserver).
pub fn limit_descriptors(pid: u32, room: usize) -> usize {
    let fds: Vec<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let limit = fds.iter().filter(|&&fd| fd < 100).max().unwrap() + 1 + room;
    let set = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit");
    assert!(set.success());
    limit - fds.iter().filter(|&&fd| fd < limit).count()
}
