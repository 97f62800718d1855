//! SPEC §11: publishing with an HTTP POST or PUT, and listening with a
//! streaming GET (Server-Sent Events or raw lines), with the real curl
//! (Debian package `curl`) and Python's http.client next to websocket
//! clients.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use tungstenite::Message;

/// The number of clients `?stats` reports for `ch`.
fn clients(addr: SocketAddr, ch: &str) -> u64 {
    let r = get(addr, &format!("{ch}?stats"), "");
    body(&r)
        .trim()
        .strip_prefix("{\"clients\": ")
        .and_then(|n| n.strip_suffix('}'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {r:?}"))
}

fn wait_clients(addr: SocketAddr, ch: &str, n: u64) {
    wait_until(&format!("{n} clients on the channel"), || {
        clients(addr, ch) == n
    });
}

/// Run curl to completion: its exit status and its output.
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A `curl -N` listener whose output lines arrive on a channel.
struct CurlListener {
    child: Child,
    lines: mpsc::Receiver<String>,
    last_id: std::cell::Cell<Option<u64>>,
}

impl CurlListener {
    fn start(url: &str, extra: &[&str]) -> CurlListener {
        let mut child = Command::new("curl")
            .args(["-sN", url])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl runs");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            // Lines of bytes: a raw listener passes binary as it is.
            let mut line = Vec::new();
            while matches!(out.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\n')
                    .to_owned();
                if tx.send(text).is_err() {
                    break;
                }
                line.clear();
            }
        });
        CurlListener {
            child,
            lines,
            last_id: Default::default(),
        }
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(DEADLINE)
            .expect("a line from the curl listener")
    }

    /// Lines up to the blank line that ends an event, but its id, which
    /// becomes [`CurlListener::last_id`].
    fn event(&self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self.line() {
                l if l.is_empty() && !lines.is_empty() => return lines,
                l if l.is_empty() || l.starts_with(':') => {}
                l => match l.strip_prefix("id: ") {
                    Some(id) => self.last_id.set(Some(id.parse().expect("a numeric id"))),
                    None => lines.push(l),
                },
            }
        }
    }

    /// The id of the last event with one.
    fn last_id(&self) -> u64 {
        self.last_id.get().expect("an event with an id")
    }

    /// Its exit status, waiting for it.
    fn exit(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(std::time::Instant::now() < deadline, "curl did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CurlListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn no_curl(test: &str) -> bool {
    skip(test, needs_program("curl", "curl"))
}

#[test]
fn curl_publishes_to_websocket_members_and_streaming_listeners() {
    if no_curl("curl_publishes") {
        return;
    }
    let mut staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let ch = channel();
    let url = format!("http://{addr}{ch}");
    let mut ws = connect(addr, &ch);
    let raw = CurlListener::start(&format!("{url}?raw"), &[]);
    let sse = CurlListener::start(&url, &["-H", "Accept: text/event-stream"]);
    wait_clients(addr, &ch, 3);

    // curl -d sends application/x-www-form-urlencoded: text, as people mean it.
    let (code, out) = curl(&["-d", "hello", &url]);
    assert_eq!((code, out.as_str()), (0, "{\"clients\": 3}\n"));
    assert_eq!(recv(&mut ws), Message::text("hello"));
    assert_eq!(raw.line(), "hello");
    assert_eq!(sse.event(), ["data: hello"]);
    // A binary type stays binary.
    let (_, out) = curl(&[
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        "bytes",
        &url,
    ]);
    assert_eq!(out, "{\"clients\": 3}\n");
    assert_eq!(recv(&mut ws), Message::binary(b"bytes".to_vec()));
    assert_eq!(raw.line(), "bytes");
    assert_eq!(sse.event(), ["event: binary", "data: Ynl0ZXM="]);

    // Text, with a line break: two data lines, one event.
    let (_, out) = curl(&[
        "-H",
        "Content-Type: text/plain; charset=utf-8",
        "--data-binary",
        "two\nlines",
        &url,
    ]);
    assert_eq!(out, "{\"clients\": 3}\n");
    assert_eq!(recv(&mut ws), Message::text("two\nlines"));
    assert_eq!((raw.line(), raw.line()), ("two".into(), "lines".into()));
    assert_eq!(sse.event(), ["data: two", "data: lines"]);

    // A file, and standard input as a chunked PUT.
    let file = staps.dir.path().join("payload");
    std::fs::write(&file, [0u8, 1, 2, 255]).unwrap();
    let (_, out) = curl(&["--data-binary", &format!("@{}", file.display()), &url]);
    assert_eq!(out, "{\"clients\": 3}\n");
    assert_eq!(recv(&mut ws), Message::binary(vec![0, 1, 2, 255]));
    assert_eq!(sse.event(), ["event: binary", "data: AAEC/w=="]);
    let mut put = Command::new("curl")
        .args(["-sS", "-T", "-", "-H", "Content-Type: text/plain", &url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    put.stdin.take().unwrap().write_all(b"from stdin").unwrap();
    let out = put.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"clients\": 3}\n");
    assert_eq!(recv(&mut ws), Message::text("from stdin"));
    assert_eq!(sse.event(), ["data: from stdin"]);
    // The raw listener had the binary file (its bytes and a newline) first.
    assert_eq!(raw.line(), "\0\u{1}\u{2}\u{fffd}");
    assert_eq!(raw.line(), "from stdin");

    // A large body with Expect: 100-continue (curl adds it itself past a size).
    // No newline in it: the raw listener gets it as one line.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 | 0x80).collect();
    std::fs::write(&file, &big).unwrap();
    let at_file = format!("@{}", file.display());
    let (_, out) = curl(&[
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &at_file,
        &url,
    ]);
    assert_eq!(out, "{\"clients\": 3}\n");
    assert_eq!(recv(&mut ws), Message::binary(big));
    let _ = sse.event();
    assert!(raw.line().len() >= 300_000);
    // Over max_message_size: 413 on the head, and curl never sends the body.
    std::fs::write(&file, vec![b'x'; 2 << 20]).unwrap();
    let (_, out) = curl(&["-w", "%{http_code}", "--data-binary", &at_file, &url]);
    assert!(out.ends_with("413"), "{out}");
    // A websocket member's message reaches the listeners the same way.
    ws.send(Message::text("from ws")).unwrap();
    assert_eq!(raw.line(), "from ws");
    assert_eq!(sse.event(), ["data: from ws"]);
    // Listeners count in ?stats; nobody listens on another channel.
    assert_eq!(clients(addr, &ch), 3);
    let (_, out) = curl(&["-d", "x", &format!("http://{addr}{}", channel())]);
    assert_eq!(out, "{\"clients\": 0}\n");
    // The counters saw five messages in.
    let stats = staps.stats();
    assert!(counter(&stats, "messages_in") >= 5, "{stats}");
}

/// A request by hand: the status and the response.
fn request(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut req = head.replace('\n', "\r\n").into_bytes();
    req.extend_from_slice(body);
    let r = raw_http(addr, &req);
    (status(&r), r)
}

#[test]
fn text_binary_and_the_refusals_411_413_415() {
    let staps = Staps::start(&tcp_config("max_message_size = 1000"), &[]);
    let addr = staps.addr();
    let ch = channel();
    let mut ws = connect(addr, &ch);
    let post = |headers: &str, body: &[u8]| {
        request(
            addr,
            &format!("POST {ch} HTTP/1.1\nHost: x\nConnection: close\n{headers}\n"),
            body,
        )
    };
    // text/* with valid UTF-8 is text; invalid UTF-8 under text/* is binary.
    let (status, r) = post(
        "Content-Type: text/plain\nContent-Length: 5\n",
        "été".as_bytes(),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(recv(&mut ws), Message::text("été"));
    post(
        "Content-Type: TEXT/markdown; charset=\"UTF-8\"\nContent-Length: 2\n",
        &[0xc3, 0x28],
    );
    assert_eq!(recv(&mut ws), Message::binary(vec![0xc3, 0x28]));
    post("Content-Type: application/json\nContent-Length: 2\n", b"{}");
    assert_eq!(recv(&mut ws), Message::text("{}"));
    post("Content-Type: image/png\nContent-Length: 2\n", b"{}");
    assert_eq!(recv(&mut ws), Message::binary(b"{}".to_vec()));

    let (status, r) = post(
        "Content-Type: text/plain; charset=iso-8859-1\nContent-Length: 1\n",
        b"e",
    );
    assert_eq!(status, 415, "{r}");
    let (status, r) = post("", b"");
    assert_eq!(status, 411, "{r}");
    // Too large: refused on its Content-Length, before any of the body.
    let (status, r) = post("Content-Length: 1001\n", b"");
    assert_eq!(status, 413, "{r}");
    assert!(r.contains("1000 bytes"), "{r}");
    // Chunked, over the limit by its second chunk.
    let big = format!("3e8\r\n{}\r\n1\r\nx\r\n0\r\n\r\n", "y".repeat(1000));
    let (status, _) = post("Transfer-Encoding: chunked\n", big.as_bytes());
    assert_eq!(status, 413);
    // Both framings at once, or one not understood.
    let (status, _) = post(
        "Transfer-Encoding: chunked\nContent-Length: 3\n",
        b"0\r\n\r\n",
    );
    assert_eq!(status, 400);
    let (status, _) = post("Transfer-Encoding: gzip\n", b"");
    assert_eq!(status, 501);
    // Two codings: a proxy in front may read the second, so no body is read.
    for second in ["identity", "gzip"] {
        let (status, r) = post(
            &format!("Transfer-Encoding: chunked\nTransfer-Encoding: {second}\n"),
            b"3\r\nabc\r\n0\r\n\r\n",
        );
        assert_eq!(status, 400, "{second}: {r}");
    }
    let (status, _) = post("Content-Length: 2\nContent-Length: 3\n", b"abc");
    assert_eq!(status, 400);
    // Path rules as for joining.
    let (status, _) = request(addr, "POST / HTTP/1.1\nContent-Length: 1\n\n", b"x");
    assert_eq!(status, 404);
    // A chunked body with extensions and trailers is one message.
    let (status, r) = post(
        "Transfer-Encoding: chunked\nContent-Type: text/plain\n",
        b"4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nX-Trailer: 1\r\n\r\n",
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(recv(&mut ws), Message::text("abcdef"));
    // Nothing refused reached the member.
    let mut other = connect(addr, &ch);
    other.send(Message::text("end")).unwrap();
    assert_eq!(recv(&mut ws), Message::text("end"));
}

#[test]
fn a_connection_posts_again_and_again_with_keep_alive() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let ch = channel();
    let mut ws = connect(addr, &ch);
    // Two requests in one write (pipelined), then a third after the answers.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(
        format!(
            "POST {ch} HTTP/1.1\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\none\
             PUT {ch} HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n\
             3\r\ntwo\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while String::from_utf8_lossy(&got)
        .matches("{\"clients\": 1}")
        .count()
        < 2
    {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains("Connection: close"), "{text}");
    assert_eq!(recv(&mut ws), Message::text("one"));
    assert_eq!(recv(&mut ws), Message::text("two"));
    s.write_all(
        format!("POST {ch} HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nthree")
            .as_bytes(),
    )
    .unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("Connection: close") && rest.contains("{\"clients\": 1}"),
        "{rest}"
    );
    // No Content-Type: UTF-8 is text.
    assert_eq!(recv(&mut ws), Message::text("three"));
}

#[test]
fn python_http_client_keeps_one_connection_for_many_posts() {
    if skip("python_http_client", needs_program("python3", "python3")) {
        return;
    }
    let staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let ch = channel();
    let mut ws = connect(addr, &ch);
    let script = format!(
        r#"
import http.client
conn = http.client.HTTPConnection("{ip}", {port}, timeout=30)
ports = set()
for i in range(20):
    conn.request("POST", "{ch}", body="line %d" % i, headers={{"Content-Type": "text/plain"}})
    r = conn.getresponse()
    assert r.status == 200, r.status
    assert r.read() == b'{{"clients": 1}}\n'
    ports.add(conn.sock.getsockname()[1])
print(len(ports))
"#,
        ip = addr.ip(),
        port = addr.port()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "one connection"
    );
    for i in 0..20 {
        assert_eq!(recv(&mut ws), Message::text(format!("line {i}")));
    }
}

/// A listener by hand: the response head, then the body as it comes.
struct Stream {
    s: TcpStream,
    head: String,
    buf: Vec<u8>,
}

impl Stream {
    fn open(addr: SocketAddr, target: &str, headers: &str, version: &str) -> Stream {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(s, "GET {target} HTTP/{version}\r\nHost: x\r\n{headers}\r\n").unwrap();
        let mut stream = Stream {
            s,
            head: String::new(),
            buf: Vec::new(),
        };
        let end = stream.until(b"\r\n\r\n");
        stream.head = String::from_utf8(stream.buf.drain(..end).collect()).unwrap();
        stream
    }

    /// Read until `needle` has arrived; where it ends.
    fn until(&mut self, needle: &[u8]) -> usize {
        loop {
            if let Some(i) = self.buf.windows(needle.len()).position(|w| w == needle) {
                return i + needle.len();
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).expect("listener reads");
            assert!(
                n > 0,
                "the stream ended: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next `needle`-terminated piece of the body.
    fn next(&mut self, needle: &[u8]) -> String {
        let end = self.until(needle);
        String::from_utf8_lossy(&self.buf.drain(..end).collect::<Vec<_>>()).into_owned()
    }

    /// The next chunk of an SSE stream, its size checked: the event's id
    /// (`id:`, the first line of each message), and the event without it.
    fn event(&mut self) -> (Option<u64>, String) {
        let chunk = self.next(b"\n\n\r\n");
        let (size, event) = chunk.split_once("\r\n").expect("a chunk");
        let event = event.strip_suffix("\r\n").expect("a chunk's end");
        assert_eq!(
            usize::from_str_radix(size, 16).unwrap(),
            event.len(),
            "{chunk:?}"
        );
        match event.strip_prefix("id: ").and_then(|e| e.split_once('\n')) {
            Some((id, rest)) => (Some(id.parse().expect("a numeric id")), rest.to_owned()),
            None => (None, event.to_owned()),
        }
    }

    /// Everything up to the end of the connection.
    fn rest(&mut self) -> String {
        let _ = self.s.read_to_end(&mut self.buf);
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

#[test]
fn sse_frames_multi_line_text_and_replays_and_pings() {
    let staps = Staps::start(&tcp_config("ping_interval = 1"), &[]);
    let addr = staps.addr();
    let ch = channel();
    let mut a = connect(addr, &ch);
    let mut b = connect(addr, &ch);
    for m in ["first", "second\r\nline", "third"] {
        a.send(Message::text(m)).unwrap();
        assert_eq!(recv(&mut b), Message::text(m));
    }
    let mut sse = Stream::open(addr, &format!("{ch}?sse&replay=2"), "", "1.1");
    assert!(sse.head.starts_with("HTTP/1.1 200 "), "{}", sse.head);
    for want in [
        "Content-Type: text/event-stream",
        "Transfer-Encoding: chunked",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
    ] {
        assert!(sse.head.contains(want), "{want} in {}", sse.head);
    }
    // The last two, in order, each one chunk, each with its id; ids grow.
    let (second, event) = sse.event();
    assert_eq!(event, "data: second\ndata: line\n\n");
    let (third, event) = sse.event();
    assert_eq!(event, "data: third\n\n");
    b.send(Message::binary(vec![1, 2, 3])).unwrap();
    let (binary, event) = sse.event();
    assert_eq!(event, "event: binary\ndata: AQID\n\n");
    assert!(
        second < third && third < binary,
        "{second:?} {third:?} {binary:?}"
    );
    // Nothing more to send: a comment every ping_interval.
    assert_eq!(sse.event(), (None, ": ping\n\n".into()));
    // An SSE listener over HTTP/1.0: no chunks, the stream ends with the connection.
    let mut old = Stream::open(addr, &format!("{ch}?raw"), "", "1.0");
    assert!(old.head.contains("Connection: close") && !old.head.contains("chunked"));
    wait_clients(addr, &ch, 4);
    a.send(Message::text("plain")).unwrap();
    assert_eq!(old.next(b"\n"), "plain\n");
    assert_eq!(sse.event().1, "data: plain\n\n");
}

#[test]
fn a_slow_sse_listener_is_cut_and_the_channel_keeps_its_speed() {
    let staps = Staps::start(&tcp_config("queue_bytes = 65536"), &[]);
    let addr = staps.addr();
    let ch = channel();
    let mut a = connect(addr, &ch);
    let mut b = connect(addr, &ch);
    // A listener that never reads: its socket and then its queue fill.
    let mut slow = Stream::open(
        addr,
        &format!("{ch}?sse"),
        "Accept: text/event-stream\r\n",
        "1.1",
    );
    slow.s
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    wait_clients(addr, &ch, 3);
    // In steps that the member that reads takes whole before the next, so
    // that only the listener falls behind, however loaded the machine.
    let payload = "z".repeat(4000);
    let mut sent = 0;
    while clients(addr, &ch) == 3 {
        assert!(sent < 100_000, "the listener was never cut");
        for _ in 0..8 {
            a.write(Message::text(payload.clone())).unwrap();
        }
        a.flush().unwrap();
        for _ in 0..8 {
            assert_eq!(recv(&mut b), Message::text(payload.clone()));
        }
        sent += 8;
    }
    let mut staps = staps;
    staps.wait_stats(|s| counter(s, "slow_disconnects") == 1);
    // What reached its socket is there to read; then its response ends.
    slow.s.set_read_timeout(Some(DEADLINE)).unwrap();
    let rest = slow.rest();
    assert!(
        rest.split_once("\r\nid: ")
            .and_then(|(_, r)| r.split_once('\n'))
            .is_some_and(|(_, r)| r.starts_with("data: zzz")),
        "{}",
        &rest[..40.min(rest.len())]
    );
}

#[test]
fn sigterm_ends_a_streaming_response_with_its_last_chunk() {
    if no_curl("sigterm_ends_a_stream") {
        return;
    }
    let mut staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let ch = channel();
    let mut raw = CurlListener::start(&format!("http://{addr}{ch}?raw"), &[]);
    wait_clients(addr, &ch, 1);
    let (_, out) = curl(&["-d", "before", &format!("http://{addr}{ch}")]);
    assert_eq!(out, "{\"clients\": 1}\n");
    assert_eq!(raw.line(), "before");
    staps.signal(libc::SIGTERM);
    // curl exits 0 only for a complete response: the last chunk came.
    assert_eq!(raw.exit(), 0);
    assert!(staps.wait_exit().success());
}

#[test]
fn the_memory_budget_and_handshake_timeout_bound_a_publish() {
    // Half of a 1 MiB budget is for messages still arriving; no replay
    // ring holds what was published, so nothing stays counted.
    let staps = Staps::start(
        &tcp_config("memory_budget = 1048576\nhandshake_timeout = 1\nreplay_length = 0"),
        &[],
    );
    let addr = staps.addr();
    let ch = channel();
    let mut ws = connect(addr, &ch);
    let post = |length: usize, body: &[u8]| {
        request(
            addr,
            &format!("POST {ch} HTTP/1.1\nContent-Length: {length}\nConnection: close\n\n"),
            body,
        )
    };
    let (status, r) = post(600_000, b"");
    assert_eq!(status, 503, "{r}");
    assert!(r.contains("Retry-After: 5"), "{r}");
    let (status, r) = post(100_000, &[0xff; 100_000]);
    assert_eq!(status, 200, "{r}");
    assert_eq!(recv(&mut ws), Message::binary(vec![0xff; 100_000]));
    // A body that stops coming: 408 once handshake_timeout has passed.
    let (status, r) = post(10, b"abc");
    assert_eq!(status, 408, "{r}");
    let mut staps = staps;
    let stats = staps.stats();
    assert_eq!(counter(&stats, "memory_used"), 0, "{stats}");
}

/// SPEC §11: every message has an id, each SSE event carries it, and a
/// listener that comes back with the last one it saw (`?since=`, or the
/// `Last-Event-ID` EventSource sends) gets what it missed, then the live
/// ones; from an id no longer held, a `gap` event first.
#[test]
fn a_listener_resumes_after_the_last_id_it_saw() {
    if no_curl("a_listener_resumes_after_the_last_id_it_saw") {
        return;
    }
    let staps = Staps::start(&tcp_config("replay_length = 3"), &[]);
    let addr = staps.addr();
    let ch = channel();
    let url = format!("http://{addr}{ch}");
    let post = |m: &str| assert_eq!(curl(&["-d", m, &url]).0, 0);
    // Keeps the channel while its listeners come and go.
    let _keeper = connect(addr, &ch);
    let first = CurlListener::start(&format!("{url}?sse"), &[]);
    wait_clients(addr, &ch, 2);
    post("m1");
    assert_eq!(first.event(), ["data: m1"]);
    let id1 = first.last_id();
    post("m2");
    assert_eq!(first.event(), ["data: m2"]);
    let id2 = first.last_id();
    assert!(id1 < id2, "{id1} {id2}");
    drop(first);
    wait_clients(addr, &ch, 1);
    post("m3");
    post("m4");

    // curl with ?since=: what it missed, in order, then the live ones.
    let again = CurlListener::start(&format!("{url}?sse&since={id2}"), &[]);
    assert_eq!(again.event(), ["data: m3"]);
    assert_eq!(again.event(), ["data: m4"]);
    wait_clients(addr, &ch, 2);
    post("m5");
    assert_eq!(again.event(), ["data: m5"]);
    let id5 = again.last_id();
    drop(again);
    wait_clients(addr, &ch, 1);

    // EventSource's header is newer than the URL's since: it wins.
    let last = format!("Last-Event-ID: {id5}");
    let header = CurlListener::start(&format!("{url}?sse&since={id1}"), &["-H", &last]);
    wait_clients(addr, &ch, 2);
    post("m6");
    assert_eq!(header.event(), ["data: m6"], "nothing before m6 again");
    drop(header);
    wait_clients(addr, &ch, 1);

    // The ring holds three (m4 m5 m6): m1 is gone, and an id staps never
    // gave (another instance's, another start's) is not held either.
    for extra in [vec![], vec!["-H", "Last-Event-ID: not-an-id-of-ours"]] {
        let target = if extra.is_empty() {
            format!("{url}?sse&since={id1}")
        } else {
            format!("{url}?sse")
        };
        let gap = CurlListener::start(&target, &extra);
        assert_eq!(gap.event(), ["event: gap", "data: "]);
        for m in ["m4", "m5", "m6"] {
            assert_eq!(gap.event(), [format!("data: {m}")]);
        }
    }

    // A raw stream resumes the same way, with no room for a gap.
    let raw = CurlListener::start(&format!("{url}?raw&since={id5}"), &[]);
    assert_eq!(raw.line(), "m6");
    // A since that is no id is a malformed option.
    let (_, status) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{url}?sse&since=x"),
    ]);
    assert_eq!(status, "400");
}

/// SPEC §10: `linger=S` keeps an emptied channel's ring for S seconds;
/// HTTP publishes then go into it, and a listener that comes back gets
/// them. Nothing of the channel survives the linger; `max_linger` caps S.
#[test]
fn a_lingering_channel_keeps_what_is_published_until_its_listener_returns() {
    if no_curl("a_lingering_channel_keeps_what_is_published") {
        return;
    }
    let mut staps = Staps::start(&tcp_config("max_linger = 2"), &[]);
    let addr = staps.addr();
    let ch = channel();
    let url = format!("http://{addr}{ch}");
    // It asks for an hour: it gets max_linger.
    let listener = CurlListener::start(&format!("{url}?sse&linger=3600"), &[]);
    wait_clients(addr, &ch, 1);
    assert_eq!(curl(&["-d", "m1", &url]).1, "{\"clients\": 1}\n");
    assert_eq!(listener.event(), ["data: m1"]);
    let id1 = listener.last_id();
    drop(listener);
    wait_clients(addr, &ch, 0);
    // Emptied but lingering: publishes go into its ring.
    assert_eq!(curl(&["-d", "m2", &url]).1, "{\"clients\": 0}\n");
    assert_eq!(curl(&["-d", "m3", &url]).1, "{\"clients\": 0}\n");
    staps.wait_stats(|s| counter(s, "channels") == 1);
    let back = CurlListener::start(&format!("{url}?sse&since={id1}"), &[]);
    assert_eq!(back.event(), ["data: m2"], "no gap: m1's id is still held");
    assert_eq!(back.event(), ["data: m3"]);
    let id3 = back.last_id();
    drop(back);
    // Its linger ends (2 s, not an hour), and the channel with it.
    staps.wait_stats(|s| counter(s, "channels") == 0);
    assert_eq!(curl(&["-d", "lost", &url]).1, "{\"clients\": 0}\n");
    let late = CurlListener::start(&format!("{url}?sse&since={id3}"), &[]);
    assert_eq!(late.event(), ["event: gap", "data: "]);
    wait_clients(addr, &ch, 1);
    assert_eq!(curl(&["-d", "m4", &url]).1, "{\"clients\": 1}\n");
    assert_eq!(late.event(), ["data: m4"], "nothing of the old channel");
}

/// With `max_linger = 0` no channel lingers, whatever its creator asks.
#[test]
fn max_linger_0_turns_lingering_off() {
    let mut staps = Staps::start(&tcp_config("max_linger = 0"), &[]);
    let addr = staps.addr();
    let ch = channel();
    let ws = connect(addr, &format!("{ch}?linger=60"));
    staps.wait_stats(|s| counter(s, "channels") == 1);
    drop(ws);
    staps.wait_stats(|s| counter(s, "channels") == 0);
    let answer = post(addr, &ch, "", b"to nobody");
    assert_eq!(body(&answer), "{\"clients\": 0}\n");
    // A linger that is no number is a malformed option.
    assert_eq!(status(&get(addr, &format!("{ch}?sse&linger=x"), "")), 400);
}

/// Issue 27's whole story in a real browser: a page on another origin
/// listens with an `EventSource` on a channel it asked to linger; the
/// network breaks (a proxy cuts the stream and holds the reconnection);
/// what is published meanwhile waits in the lingering channel, and once the
/// network is back EventSource reconnects by itself, with `Last-Event-ID`,
/// and the page gets every message once, in order, without a gap.
#[test]
fn an_event_source_reconnects_and_misses_nothing() {
    if skip(
        "an_event_source_reconnects_and_misses_nothing",
        needs_program("chromium", "chromium"),
    ) {
        return;
    }
    let staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let proxy = browser::Proxy::to(addr);
    let ch = channel();
    let html = format!(
        "<!doctype html><title>elsewhere</title><script>\n\
         const report = (what) => fetch('/report?' + encodeURIComponent(what));\n\
         const events = new EventSource('http://{}{ch}?sse&linger=30');\n\
         events.onopen = () => report('open');\n\
         events.onmessage = (e) => report('event ' + e.data);\n\
         events.addEventListener('gap', () => report('gap'));\n\
         </script>",
        proxy.addr()
    );
    let mut page = browser::Page::open(html);
    let publish = |m: &str| body(&post(addr, &ch, "", m.as_bytes())).to_owned();
    assert!(page.wait_for("open"), "{:?}", page.seen());
    assert_eq!(publish("m1"), "{\"clients\": 1}\n");
    assert!(page.wait_for("event m1"), "{:?}", page.seen());
    proxy.cut();
    wait_clients(addr, &ch, 0);
    // Nobody listens: the lingering channel keeps them.
    assert_eq!(publish("m2"), "{\"clients\": 0}\n");
    assert_eq!(publish("m3"), "{\"clients\": 0}\n");
    proxy.mend();
    wait_clients(addr, &ch, 1);
    assert_eq!(publish("m4"), "{\"clients\": 1}\n");
    let events = |seen: &[String]| -> Vec<String> {
        seen.iter()
            .filter(|s| s.starts_with("event ") || *s == "gap")
            .cloned()
            .collect()
    };
    page.wait(|seen| events(seen).len() >= 4);
    assert_eq!(
        events(page.seen()),
        ["event m1", "event m2", "event m3", "event m4"],
        "{:?}",
        page.seen()
    );
    assert_eq!(
        page.seen().iter().filter(|s| *s == "open").count(),
        2,
        "{:?}",
        page.seen()
    );
}
