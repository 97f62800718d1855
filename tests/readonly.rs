//! SPEC §12: every channel's listen-only twin `/r/<token>` and
//! publish-only twin `/w/<token>`, derived from the channel path under the
//! server's secret (`secret_file`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;

use common::*;
use tungstenite::Message;

/// The read-only URL of channel `ch`, as `GET /P?readonly` answers it.
fn readonly_url(addr: SocketAddr, ch: &str) -> String {
    twin_url(addr, ch, "readonly")
}

/// The URL `GET /P?which` answers (`readonly` or `writeonly`).
fn twin_url(addr: SocketAddr, ch: &str, which: &str) -> String {
    let r = get(addr, &format!("{ch}?{which}"), "");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("Cache-Control: no-store"), "{r}");
    body(&r).trim_end_matches('\n').to_owned()
}

/// The path of a twin URL: `/r/<token>` or `/w/<token>`.
fn twin_path(url: &str) -> String {
    let at = url
        .find("/r/")
        .or_else(|| url.find("/w/"))
        .unwrap_or_else(|| panic!("no twin in {url}"));
    url[at..].to_owned()
}

#[test]
fn the_twin_listens_to_its_channel_and_cannot_send() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let ch = channel();
    let url = readonly_url(addr, &ch);
    assert!(url.starts_with(&format!("ws://{addr}/r/")), "{url}");
    let twin = twin_path(&url);
    // A UUID4 path's token: 71 characters of base64url.
    assert_eq!(twin.len(), 3 + 71, "{twin}");
    assert!(!twin.contains(&ch[1..]));
    // The same URL every time, and the twin of the twin is itself.
    assert_eq!(readonly_url(addr, &ch), url);
    assert_eq!(readonly_url(addr, &twin), url);

    let mut a = connect(addr, &ch);
    let mut b = connect(addr, &ch);
    a.send(Message::text("before")).unwrap();
    assert_eq!(recv(&mut b), Message::text("before"));
    let mut listener = connect(addr, &format!("{twin}?replay=1"));
    assert_eq!(recv(&mut listener), Message::text("before"), "replay");
    a.send(Message::binary(vec![1, 2])).unwrap();
    assert_eq!(recv(&mut listener), Message::binary(vec![1, 2]));
    assert_eq!(recv(&mut b), Message::binary(vec![1, 2]));
    // ?stats on either counts the channel's members, the twin's among them.
    for path in [&ch, &twin] {
        let r = get(addr, &format!("{path}?stats"), "");
        assert!(body(&r).contains("{\"clients\": 3}"), "{path}: {r}");
    }
    // What the twin sends goes nowhere and closes it with 1008.
    listener.send(Message::text("may I?")).unwrap();
    assert_eq!(close_code(&mut listener), 1008);
    b.send(Message::text("after")).unwrap();
    assert_eq!(
        recv(&mut a),
        Message::text("after"),
        "a got the twin's message"
    );
}

/// A read-only client is closed at the header of its first data frame: it
/// never gets to send (or make staps hold) the message it announces.
#[test]
fn the_twin_is_closed_at_its_first_data_frame_header() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let twin = twin_path(&readonly_url(staps.addr(), &channel()));
    for header in [
        frame_header(true, 2, 1 << 20),
        // The start of a fragmented message.
        client_frame(false, 1, b"part"),
    ] {
        let mut raw = raw_ws(staps.addr(), &twin);
        raw.write_all(&client_frame(true, 9, b"ping")).unwrap();
        raw.write_all(&header).unwrap();
        assert_eq!(raw_close_code(&mut raw), 1008);
    }
}

#[test]
fn http_listeners_work_on_the_twin_and_publishing_to_it_is_403() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let ch = channel();
    let twin = twin_path(&readonly_url(addr, &ch));
    let mut a = connect(addr, &ch);
    let mut sse = TcpStream::connect(addr).unwrap();
    sse.set_read_timeout(Some(DEADLINE)).unwrap();
    sse.write_all(format!("GET {twin}?sse HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    read_until_seen(&mut sse, "\r\n\r\n");
    a.send(Message::text("to the twin")).unwrap();
    read_until_seen(&mut sse, "data: to the twin\n\n");
    let r = post(addr, &twin, "", b"no");
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // A publish to the channel itself reaches both.
    let r = post(addr, &ch, "", b"yes");
    assert!(body(&r).contains("{\"clients\": 2}"), "{r}");
    read_until_seen(&mut sse, "data: yes\n\n");
}

#[test]
fn without_the_secret_a_token_is_an_ordinary_path() {
    let one = Staps::start(&tcp_config(""), &[]);
    let two = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let twin = twin_path(&readonly_url(one.addr(), &ch));
    // Another secret, another token.
    assert_ne!(twin_path(&readonly_url(two.addr(), &ch)), twin);
    // At two the token decrypts to nothing: /r/<token> is a channel of its
    // own there, where both members may send.
    let mut x = connect(two.addr(), &twin);
    let mut y = connect(two.addr(), &twin);
    let mut member = connect(two.addr(), &ch);
    x.send(Message::text("ordinary")).unwrap();
    assert_eq!(recv(&mut y), Message::text("ordinary"));
    member.send(Message::text("channel")).unwrap();
    y.send(Message::text("still ordinary")).unwrap();
    assert_eq!(recv(&mut x), Message::text("still ordinary"));
    // A tampered token is an ordinary path too.
    let mut tampered = twin.clone().into_bytes();
    let i = tampered.len() - 10;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let mut p = connect(one.addr(), &tampered);
    let mut q = connect(one.addr(), &tampered);
    let mut real = connect(one.addr(), &ch);
    p.send(Message::text("tampered")).unwrap();
    assert_eq!(recv(&mut q), Message::text("tampered"));
    real.send(Message::text("real")).unwrap();
    q.send(Message::text("end")).unwrap();
    assert_eq!(
        recv(&mut p),
        Message::text("end"),
        "the tampered path got /P's"
    );
}

#[test]
fn the_secret_file_is_created_0600_and_reused_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let config = format!(
        "[staps]\nlisten = 127.0.0.1:0\nsecret_file = {}\n",
        secret.display()
    );
    let ch = channel();
    let mut first = Staps::start(&config, &[]);
    let url = readonly_url(first.addr(), &ch);
    first.wait_log("created the secret of read-only URLs");
    let meta = std::fs::metadata(&secret).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    first.signal(libc::SIGTERM);
    first.wait_exit();
    let second = Staps::start(&config, &[]);
    assert_eq!(
        twin_path(&readonly_url(second.addr(), &ch)),
        twin_path(&url),
        "the same secret, the same twins"
    );
    assert!(
        !second
            .lines()
            .iter()
            .any(|l| l.contains("created the secret")),
        "created again"
    );
    // A symlink is never followed: a per-process secret and a warning.
    std::fs::remove_file(&secret).unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &secret).unwrap();
    let mut third = Staps::start(&config, &[]);
    let line = third.wait_log("cannot read or create the secret file");
    assert!(line.contains("symlink") && line.contains("WARN"), "{line}");
    assert!(!dir.path().join("elsewhere").exists());
    assert_ne!(twin_path(&readonly_url(third.addr(), &ch)), twin_path(&url));
}

#[test]
fn urls_follow_the_usage_page_rules_and_tokens_stay_out_of_the_log() {
    let staps = Staps::start(
        &tcp_config("uuid_only = true").replace(
            "[limits]",
            "public_url = wss://relay.example/staps/\n[limits]",
        ),
        &["-v"],
    );
    let addr = staps.addr();
    let ch = channel();
    let url = readonly_url(addr, &ch);
    assert!(url.starts_with("wss://relay.example/staps/r/"), "{url}");
    let twin = twin_path(&url);
    // uuid_only checks the channel a twin names, not the twin's path.
    let _a = connect(addr, &ch);
    let _t = connect(addr, &twin);
    wait_until("the twin's join logged", || {
        staps
            .lines()
            .iter()
            .any(|l| l.contains("joined channel") && l.ends_with("read-only"))
    });
    let token = &twin[3..];
    assert!(
        !staps.lines().iter().any(|l| l.contains(token)),
        "a token in the log"
    );
    // The HTML page shows a fresh channel and its twin side by side.
    let page = get(addr, "/", "Accept: text/html\r\n");
    assert!(
        page.contains("<td id=\"twin\"><code>wss://relay.example/staps/r/"),
        "{page}"
    );
    // Plain text stays one channel URL.
    let text = get(addr, "/", "");
    assert_eq!(body(&text).lines().count(), 1);
    assert!(!body(&text).contains("/r/"));
    // Without public_url: the request's host and scheme.
    let plain = Staps::start(&tcp_config(""), &[]);
    let r = raw_http(
        plain.addr(),
        format!(
            "GET {ch}?readonly HTTP/1.1\r\nHost: chat.example:8443\r\n\
             X-Forwarded-Proto: https\r\n\r\n"
        )
        .as_bytes(),
    );
    assert!(body(&r).starts_with("wss://chat.example:8443/r/"), "{r}");
    let mut s = TcpStream::connect(plain.addr()).unwrap();
    s.write_all(format!("HEAD {ch}?readonly HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    let mut head = String::new();
    s.read_to_string(&mut head).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && body(&head).is_empty(),
        "{head}"
    );
}

/// Python's `websockets` on a publish-only URL: what it sends reaches the
/// channel's members, it receives nothing (no replay, no message), and its
/// pings are answered. It prints `nothing` or what it got.
const WRITER: &str = r#"
import asyncio, sys, websockets
async def main(url):
    async with websockets.connect(url) as ws:
        await ws.send("from the webhook")
        print("sent", flush=True)
        sys.stdin.readline()
        await asyncio.wait_for(await ws.ping(), 30)
        try:
            got = await asyncio.wait_for(ws.recv(), 0.5)
            print("got", repr(got), flush=True)
        except asyncio.TimeoutError:
            print("nothing", flush=True)
asyncio.run(main(sys.argv[1]))
"#;

#[test]
fn the_publish_only_twin_publishes_and_receives_nothing() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let ch = channel();
    let url = twin_url(addr, &ch, "writeonly");
    assert!(url.starts_with(&format!("ws://{addr}/w/")), "{url}");
    let write = twin_path(&url);
    let read = twin_path(&readonly_url(addr, &ch));
    assert_ne!(write[3..], read[3..]);
    assert!(!write.contains(&ch[1..]));
    assert_eq!(twin_url(addr, &write, "writeonly"), url, "its own twin");
    // Neither twin leads to the other.
    for (twin, other) in [(&write, "readonly"), (&read, "writeonly")] {
        let r = get(addr, &format!("{twin}?{other}"), "");
        assert_eq!(status(&r), 403, "{twin}?{other}: {r}");
    }
    // It cannot listen over HTTP.
    for how in ["sse", "raw"] {
        assert_eq!(status(&get(addr, &format!("{write}?{how}"), "")), 403);
    }

    let mut a = connect(addr, &ch);
    let mut b = connect(addr, &ch);
    a.send(Message::text("before")).unwrap();
    assert_eq!(recv(&mut b), Message::text("before"));
    // An HTTP publish to it reaches the channel's members.
    let r = post(addr, &write, "Content-Type: text/plain\r\n", b"posted");
    assert!(body(&r).contains("{\"clients\": 2}"), "{r}");
    assert_eq!(recv(&mut a), Message::text("posted"));
    assert_eq!(recv(&mut b), Message::text("posted"));

    if skip(
        "the_publish_only_twin_publishes_and_receives_nothing (Python websockets)",
        needs_python_module("websockets"),
    ) {
        return;
    }
    let mut python = std::process::Command::new("python3")
        .args(["-c", WRITER, &format!("{url}?replay=5&echo=1")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut out = std::io::BufReader::new(python.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "sent\n");
    assert_eq!(recv(&mut a), Message::text("from the webhook"));
    assert_eq!(recv(&mut b), Message::text("from the webhook"));
    // It is connected, and no receiver: neither ?stats nor a publish
    // counts it.
    let r = get(addr, &format!("{ch}?stats"), "");
    assert!(body(&r).contains("{\"clients\": 2}"), "{r}");
    a.send(Message::text("to the members")).unwrap();
    assert_eq!(recv(&mut b), Message::text("to the members"));
    python.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "nothing\n", "a publish-only client got a message");
    assert!(python.wait().unwrap().success());
}
