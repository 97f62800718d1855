//! SPEC §2 and the handshake checks of §1: what requests that are not (valid)
//! websocket upgrades get.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next().unwrap();
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The UUID4 at the end of a channel URL.
fn uuid_of(url: &str) -> uuid::Uuid {
    let id = url.trim().rsplit('/').next().unwrap();
    let uuid = uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("no uuid in {url:?}"));
    assert_eq!(uuid.get_version_num(), 4);
    uuid
}

#[test]
fn curl_gets_a_fresh_channel_url_as_plain_text() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let one = get(addr, "/", "Accept: */*\r\n");
    assert_eq!(status(&one), 200);
    assert!(
        header(&one, "Content-Type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(header(&one, "Cache-Control"), Some("no-store"));
    let url = body(&one);
    assert!(
        url.starts_with(&format!("ws://{addr}/")) && url.ends_with('\n'),
        "{url:?}"
    );
    assert_eq!(url.lines().count(), 1);
    let two = get(addr, "/any/path", "");
    assert_ne!(
        uuid_of(url),
        uuid_of(body(&two)),
        "every page gets a new channel"
    );
    // The URL works: two clients on it talk.
    let path = format!("/{}", uuid_of(url));
    let mut a = connect(addr, &path);
    let mut b = connect(addr, &path);
    a.send(Message::text("hi")).unwrap();
    assert_eq!(recv(&mut b), Message::text("hi"));
}

#[test]
fn browsers_get_html_and_https_proxies_get_wss() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let r = get(
        staps.addr(),
        "/",
        "Accept: text/html,application/xhtml+xml;q=0.9,*/*;q=0.8\r\nX-Forwarded-Proto: https\r\nHost: chat.example.org\r\n",
    );
    assert_eq!(status(&r), 200);
    assert!(header(&r, "Content-Type").unwrap().starts_with("text/html"));
    assert!(body(&r).contains("<html"));
    assert!(body(&r).contains("wss://"), "{r}");
    // Its JavaScript example works as written: two tabs, or one with echo.
    assert!(
        body(&r).contains("two browser tabs") && body(&r).contains("?echo=1"),
        "{r}"
    );
    // The page holds a channel URL, a secret: no referrer takes it along.
    assert_eq!(header(&r, "Referrer-Policy"), Some("no-referrer"));
    assert_eq!(header(&r, "X-Content-Type-Options"), Some("nosniff"));
    // text/html;q=0 is a refusal.
    let r = get(staps.addr(), "/", "Accept: text/html;q=0, text/plain\r\n");
    assert!(
        header(&r, "Content-Type")
            .unwrap()
            .starts_with("text/plain")
    );
}

#[test]
fn hostile_host_headers_are_not_reflected() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let r = raw_http(
        staps.addr(),
        b"GET / HTTP/1.1\r\nHost: <script>alert(1)</script>\r\nAccept: text/html\r\n\r\n",
    );
    assert_eq!(status(&r), 200);
    assert!(!r.contains("<script>alert"), "{r}");
    // An error quotes the request; it must never be sniffed into a page.
    let r = raw_http(
        staps.addr(),
        b"GET /x?max=<script>alert(1)</script> HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_eq!(status(&r), 400, "{r}");
    assert!(
        header(&r, "Content-Type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(header(&r, "X-Content-Type-Options"), Some("nosniff"));
}

#[test]
fn public_url_overrides_scheme_host_and_prefix() {
    let staps = Staps::start(
        "[staps]\nlisten = 127.0.0.1:0\npublic_url = wss://relay.example.net/staps\n",
        &[],
    );
    let r = get(staps.addr(), "/", "X-Forwarded-Proto: http\r\n");
    let url = body(&r);
    assert!(url.starts_with("wss://relay.example.net/staps/"), "{url}");
    uuid_of(url);
}

#[test]
fn head_gets_headers_only() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let r = raw_http(staps.addr(), b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status(&r), 200);
    let length: usize = header(&r, "Content-Length").unwrap().parse().unwrap();
    assert!(length > 0);
    assert_eq!(body(&r), "");
}

#[test]
fn other_methods_get_405_with_allow() {
    let staps = Staps::start(&tcp_config(""), &[]);
    for method in ["DELETE", "PATCH", "BREW"] {
        let r = raw_http(
            staps.addr(),
            format!("{method} /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        );
        assert_eq!(status(&r), 405, "{method}");
        assert_eq!(header(&r, "Allow"), Some("GET, HEAD, POST, PUT, OPTIONS"));
    }
}

/// Pages on other origins may listen and publish (CORS): a preflight gets
/// 204 with what may be sent, and every answer, stream and error carries
/// `Access-Control-Allow-Origin: *`; the metrics listener's do not.
#[test]
fn answers_may_be_read_by_pages_of_any_origin() {
    let config = tcp_config("").replace("[limits]", "metrics = 127.0.0.1:0\n[limits]");
    let mut staps = Staps::start(&config, &[]);
    let addr = staps.addr();
    let ch = channel();
    let preflight = raw_http(
        addr,
        format!(
            "OPTIONS {ch} HTTP/1.1\r\nHost: x\r\nOrigin: http://elsewhere.example\r\n\
             Access-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: content-type\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(status(&preflight), 204, "{preflight}");
    assert_eq!(header(&preflight, "Access-Control-Allow-Origin"), Some("*"));
    let methods = header(&preflight, "Access-Control-Allow-Methods").unwrap_or("");
    assert!(
        methods.contains("POST") && methods.contains("PUT"),
        "{preflight}"
    );
    let headers = header(&preflight, "Access-Control-Allow-Headers").unwrap_or("");
    assert!(headers.contains("Content-Type"), "{preflight}");
    assert!(
        header(&preflight, "Access-Control-Max-Age").is_some(),
        "{preflight}"
    );
    assert!(
        header(&preflight, "Content-Length").is_none(),
        "{preflight}"
    );
    // A stream's head, a publish, ?stats, ?readonly and an error.
    let mut sse = std::net::TcpStream::connect(addr).unwrap();
    sse.set_read_timeout(Some(DEADLINE)).unwrap();
    sse.write_all(format!("GET {ch}?sse HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_until_seen(&mut sse, "\r\n\r\n");
    assert_eq!(
        header(&head, "Access-Control-Allow-Origin"),
        Some("*"),
        "{head}"
    );
    let published = post(addr, &ch, "Content-Type: application/json\r\n", b"{}");
    assert_eq!(header(&published, "Access-Control-Allow-Origin"), Some("*"));
    for query in ["stats", "readonly"] {
        let r = get(addr, &format!("{ch}?{query}"), "");
        assert_eq!(header(&r, "Access-Control-Allow-Origin"), Some("*"), "{r}");
    }
    let refused = raw_http(addr, b"DELETE /x HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(header(&refused, "Access-Control-Allow-Origin"), Some("*"));
    let metrics = get(staps.metrics_addr(), "/metrics", "");
    assert_eq!(status(&metrics), 200);
    assert_eq!(header(&metrics, "Access-Control-Allow-Origin"), None);
}

#[test]
fn garbage_and_malformed_heads_get_400() {
    let staps = Staps::start(&tcp_config(""), &[]);
    for bad in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls hello\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ] {
        let r = raw_http(staps.addr(), bad);
        assert_eq!(status(&r), 400, "{:?} -> {r}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn oversized_heads_get_431() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let mut request = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    while request.len() < 9000 {
        request.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let r = raw_http(staps.addr(), &request);
    assert_eq!(status(&r), 431);
    // Too many header lines is the same thing.
    let mut request = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..100 {
        request.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    assert_eq!(status(&raw_http(staps.addr(), &request)), 431);
}

#[test]
fn slow_and_truncated_heads_are_closed_at_the_handshake_timeout() {
    let staps = Staps::start(&tcp_config("handshake_timeout = 1"), &[]);
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    // A slowloris: sends a byte now and then, never finishes.
    let mut slow = TcpStream::connect(staps.addr()).unwrap();
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    let started = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    // A truncated head: half a request, then silence.
    let mut truncated = TcpStream::connect(staps.addr()).unwrap();
    truncated.set_read_timeout(Some(DEADLINE)).unwrap();
    truncated.write_all(b"GET /abc HTTP/1.1\r\nUpgr").unwrap();
    let mut buf = [0u8; 64];
    let mut closed = false;
    while started.elapsed() < DEADLINE {
        // Keep dribbling; the deadline is for the whole head, not per byte.
        if slow.write_all(b"X").is_err() {
            closed = true;
            break;
        }
        // Other clients are served meanwhile.
        a.send(Message::text("still here")).unwrap();
        assert_eq!(recv(&mut b), Message::text("still here"));
        slow.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match slow.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => panic!("the slowloris got an answer"),
            Err(_) => {}
        }
    }
    assert!(closed, "slowloris never closed");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        truncated.read(&mut buf).unwrap_or(0),
        0,
        "truncated head not closed"
    );
}

#[test]
fn invalid_handshakes_get_400_with_a_reason() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let base = "GET /x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        (format!("{base}Sec-WebSocket-Version: 13\r\n\r\n"), "Key"),
        (
            format!("{base}{key}Sec-WebSocket-Version: 12\r\n\r\n"),
            "version",
        ),
        (format!("{base}{key}\r\n\r\n"), "version"),
        (
            format!("{base}Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n"),
            "Key",
        ),
        (
            format!(
                "GET /x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            "Connection",
        ),
    ];
    for (request, word) in cases {
        let r = raw_http(staps.addr(), request.as_bytes());
        assert_eq!(status(&r), 400, "{request}");
        assert!(
            header(&r, "Content-Type")
                .unwrap()
                .starts_with("text/plain")
        );
        assert_eq!(body(&r).lines().count(), 1, "{r}");
        assert!(body(&r).contains(word), "{word}: {r}");
    }
    let r = raw_http(
        staps.addr(),
        format!("{base}{key}Sec-WebSocket-Version: 8\r\n\r\n").as_bytes(),
    );
    assert_eq!(header(&r, "Sec-WebSocket-Version"), Some("13"));
}

#[test]
fn root_is_not_a_channel() {
    let staps = Staps::start(&tcp_config(""), &[]);
    assert_eq!(status_of(&try_connect(staps.addr(), "/").unwrap_err()), 404);
    assert_eq!(
        status_of(&try_connect(staps.addr(), "/?x=1").unwrap_err()),
        404
    );
}

#[test]
fn uuid_only_accepts_uuid4_paths() {
    let staps = Staps::start(&tcp_config("uuid_only = true"), &[]);
    for bad in [
        "/chat",
        "/0b7e4a4f-3b0e-1c1e-9f55-7f3c1f2b9d10",
        "/0b7e4a4f-3b0e-4c1e-7f55-7f3c1f2b9d10",
        "/0b7e4a4f-3b0e-4c1e-9f55-7f3c1f2b9d10/",
        "/0b7e4a4f3b0e4c1e9f557f3c1f2b9d10",
    ] {
        assert_eq!(
            status_of(&try_connect(staps.addr(), bad).unwrap_err()),
            404,
            "{bad}"
        );
    }
    let upper = "/0B7E4A4F-3B0E-4C1E-AF55-7F3C1F2B9D10";
    let mut a = connect(staps.addr(), upper);
    let mut b = connect(staps.addr(), &format!("{upper}?x=1"));
    a.send(Message::text("ok")).unwrap();
    assert_eq!(recv(&mut b), Message::text("ok"));
    // The usage page still works on any path.
    assert_eq!(status(&get(staps.addr(), "/chat", "")), 200);
}

#[test]
fn long_paths_get_414_measured_after_decoding() {
    let staps = Staps::start(&tcp_config("max_path_length = 20"), &[]);
    let ok = format!("/{}", "a".repeat(19));
    connect(staps.addr(), &ok);
    let long = format!("/{}", "a".repeat(20));
    assert_eq!(
        status_of(&try_connect(staps.addr(), &long).unwrap_err()),
        414
    );
    // 19 decoded bytes, 57 bytes on the wire: allowed.
    let encoded = format!("/{}", "%61".repeat(19));
    connect(staps.addr(), &encoded);
}

#[test]
fn paths_that_are_not_utf8_once_decoded_get_400() {
    let staps = Staps::start(&tcp_config(""), &[]);
    assert_eq!(
        status_of(&try_connect(staps.addr(), "/%ff%fe").unwrap_err()),
        400
    );
}

#[test]
fn bytes_right_after_the_head_are_the_first_frames() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut b = connect(staps.addr(), &ch);
    let mut stream = TcpStream::connect(staps.addr()).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut request = upgrade_request(&ch).into_bytes();
    request.extend(client_frame(true, 0x1, b"eager"));
    stream.write_all(&request).unwrap();
    assert_eq!(recv(&mut b), Message::text("eager"));
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
}

#[test]
fn a_real_browser_shows_the_channel_url_and_an_example_without_external_resources() {
    if skip(
        "a_real_browser_shows_the_usage_page",
        needs_program("chromium", "chromium"),
    ) {
        return;
    }
    let staps = Staps::start(&tcp_config(""), &[]);
    let profile = tempfile::tempdir().unwrap();
    let dom = browser::headless_chromium(profile.path())
        .arg("--dump-dom")
        .arg(format!("http://{}/", staps.addr()))
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run chromium");
    assert!(dom.status.success());
    let dom = String::from_utf8_lossy(&dom.stdout);
    // The rendered page names a fresh channel URL and shows how to use it.
    let prefix = format!("ws://{}/", staps.addr());
    let start = dom
        .find(&format!("<td id=\"url\"><code>{prefix}"))
        .expect(&dom);
    let url: String = dom[start..]
        .trim_start_matches("<td id=\"url\"><code>")
        .chars()
        .take_while(|&c| c != '<')
        .collect();
    uuid_of(&url);
    // Its read-only twin beside it.
    assert!(
        dom.contains(&format!("<td id=\"twin\"><code>{prefix}r/")),
        "{dom}"
    );
    assert!(dom.contains(&format!("websocat {url}")), "{dom}");
    // The curl pair comes first, on the same channel over plain HTTP.
    let http = url.replacen("ws://", "http://", 1);
    let listen = dom.find(&format!("curl -N '{http}?raw'")).expect(&dom);
    let publish = dom.find(&format!("curl -d hello {http}")).expect(&dom);
    assert!(listen < publish && publish < dom.find("websocat ").unwrap());
    assert!(dom.contains(&format!("new WebSocket(\"{url}\")")), "{dom}");
    // Nothing loaded from elsewhere: no scripts, images, styles or frames by URL.
    for tag in ["<script", "<img", "<link", "<iframe", "src=", "url("] {
        assert!(!dom.contains(tag), "{tag} in {dom}");
    }
}

/// A page served from another origin (another port) listens with an
/// `EventSource` and publishes with `fetch` (JSON, so a preflight first) in
/// headless Chromium: both work, as CORS allows them. The page reports to
/// the server it came from.
#[test]
fn a_page_of_another_origin_listens_and_publishes_in_a_real_browser() {
    if skip(
        "a_page_of_another_origin_listens_and_publishes_in_a_real_browser",
        needs_program("chromium", "chromium"),
    ) {
        return;
    }
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let page = format!(
        "<!doctype html><title>elsewhere</title><script>\n\
         const base = 'http://{}{ch}';\n\
         const report = (what) => fetch('/report?' + encodeURIComponent(what));\n\
         const events = new EventSource(base + '?sse');\n\
         events.onmessage = (e) => report('event ' + e.data);\n\
         events.onerror = () => report('stream error');\n\
         events.onopen = () => fetch(base, {{method: 'POST', \
           headers: {{'Content-Type': 'application/json'}}, body: JSON.stringify({{from: 'page'}})}})\n\
           .then((r) => r.json())\n\
           .then((j) => report('published ' + j.clients), (e) => report('publish error ' + e));\n\
         </script>",
        staps.addr()
    );
    let mut page = browser::Page::open(page);
    let want = ["published 1", "event {\"from\":\"page\"}"];
    for w in want {
        page.wait_for(w);
    }
    let seen = page.seen().to_vec();
    drop(page);
    for w in want {
        assert!(seen.iter().any(|s| s == w), "{w:?} not reported: {seen:?}");
    }
}
