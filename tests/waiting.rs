//! SPEC §3: a socket that has not completed its request head, and an HTTP
//! keep-alive connection between requests, hold no thread: one event loop
//! keeps them. Threads are counted from /proc (`staps-client` is a reader).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use tungstenite::Message;

/// Reader threads of staps now.
fn readers(staps: &Staps) -> usize {
    threads_named(staps.pid(), "staps-client")
}

/// Hundreds of sockets from many addresses that say nothing, or trickle a
/// request head, hold no thread; clients from another address get in.
#[test]
fn silent_and_trickling_sockets_hold_no_thread_and_others_get_in() {
    let staps = Staps::start(&tcp_config("handshake_timeout = 60"), &[]);
    let addr = staps.addr();
    let mut held: Vec<TcpStream> = Vec::new();
    for a in 0..20 {
        let source = format!("127.0.0.{}", 2 + a);
        for i in 0..20 {
            let mut s = tcp_from(&source, addr);
            // Half say nothing, half the start of a head.
            if i % 2 == 1 {
                s.write_all(b"GET /").unwrap();
            }
            held.push(s);
        }
    }
    // A trickle on the talking ones, while others connect.
    for s in held.iter_mut().skip(1).step_by(2) {
        s.write_all(b"a").unwrap();
    }
    let ch = channel();
    let mut a = connect_from("127.0.0.100", addr, &ch);
    for i in 0..30 {
        let mut c = connect_from("127.0.0.101", addr, &ch);
        a.send(Message::text(format!("hello {i}"))).unwrap();
        assert_eq!(recv(&mut c), Message::text(format!("hello {i}")));
    }
    // 400 waiting sockets: a thread each would be 400 readers; the pool keeps
    // at most 64 idle ones for the clients that came and went.
    let threads = readers(&staps);
    assert!(
        threads < 100,
        "{threads} reader threads for 400 waiting sockets"
    );
    drop(held);
}

/// Kept-alive publishing connections wait between requests without a
/// thread and are served again when their next request comes.
#[test]
fn kept_alive_connections_wait_without_a_thread_and_are_served_again() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let ch = channel();
    let mut member = connect(addr, &ch);
    let post = format!(
        "POST {ch} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
    );
    let answered = |s: &mut TcpStream| {
        let head = read_until_seen(s, "}\n");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    };
    let mut conns: Vec<TcpStream> = (0..150)
        .map(|i| {
            let mut s = tcp_from(&format!("127.0.0.{}", 2 + i % 50), addr);
            s.write_all(post.as_bytes()).unwrap();
            answered(&mut s);
            s
        })
        .collect();
    let threads = readers(&staps);
    assert!(
        threads < 100,
        "{threads} reader threads for 150 idle connections"
    );
    // Each is served again (within the 3 s an idle one is kept).
    for s in &mut conns {
        s.write_all(post.as_bytes()).unwrap();
        answered(s);
    }
    for _ in 0..300 {
        assert_eq!(recv(&mut member), Message::text("hi"));
    }
    // Then, idle for longer than that, each is closed.
    for s in &mut conns {
        let mut buf = [0u8; 16];
        assert_eq!(
            s.read(&mut buf).unwrap_or(0),
            0,
            "an idle connection stays open"
        );
    }
}

/// An honest burst from one address (a page opening 200 websockets at
/// once) is not refused.
#[test]
fn an_honest_burst_from_one_address_is_served_whole() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let addr = staps.addr();
    let ch = channel();
    // All connected before any sends its head: 200 in their handshake at once.
    let mut socks: Vec<TcpStream> = (0..200).map(|_| tcp_from("127.0.0.2", addr)).collect();
    for s in &mut socks {
        s.write_all(upgrade_request(&ch).as_bytes()).unwrap();
    }
    for s in &mut socks {
        let head = read_until_seen(s, "\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
}

/// Sockets that never complete their head and take every descriptor the
/// process has keep nobody out: once they have waited a second, the loop
/// closes the oldest to take a new connection (the build before held them
/// for the whole handshake_timeout).
#[test]
fn waiting_sockets_give_way_when_descriptors_run_out() {
    if skip(
        "waiting_sockets_give_way_when_descriptors_run_out",
        needs_program("prlimit", "util-linux"),
    ) {
        return;
    }
    let staps = Staps::start(&tcp_config("handshake_timeout = 60"), &[]);
    let addr = staps.addr();
    // Room for about twenty sockets.
    limit_descriptors(staps.pid(), 20);
    // Twice as many sockets as there are descriptors, each with the start
    // of a head that never ends.
    let waiting: Vec<TcpStream> = (0..40)
        .map(|i| {
            let mut s = tcp_from(&format!("127.0.0.{}", 2 + i % 4), addr);
            let _ = s.write_all(b"GET /");
            s
        })
        .collect();
    // Honest clients still get in.
    wait_until(
        "a client served while waiting sockets hold the descriptors",
        || try_connect_from("127.0.0.50", addr, &channel()).is_ok(),
    );
    drop(waiting);
}

/// A shutdown closes what waits in the loop as well as the clients.
#[test]
fn shutdown_closes_the_sockets_that_wait() {
    let mut staps = Staps::start(&tcp_config("handshake_timeout = 60"), &[]);
    let addr = staps.addr();
    let mut silent: Vec<TcpStream> = (0..50)
        .map(|i| tcp_from(&format!("127.0.0.{}", 2 + i % 5), addr))
        .collect();
    let mut kept = tcp_from("127.0.0.9", addr);
    kept.write_all(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
            channel()
        )
        .as_bytes(),
    )
    .unwrap();
    read_until_seen(&mut kept, "}\n");
    let mut ws = connect(addr, &channel());
    // Every socket is in: a client after them was served.
    drop(connect(addr, &channel()));
    staps.signal(libc::SIGTERM);
    assert_eq!(close_code(&mut ws), 1001);
    for s in silent.iter_mut().chain([&mut kept]) {
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    }
    assert_eq!(staps.wait_exit().code(), Some(0));
}

// ---------------------------------------------------------- resting members
//
// SPEC §3: a websocket client silent for a quarter of a second, and a stream
// listener from its `200` on, wait in the event loop without a thread
// (`staps_connections_resting` counts them); nothing the client sees changes.

/// staps with a metrics listener and extra `[limits]` lines; where /metrics is.
fn with_metrics(limits: &str) -> (Staps, std::net::SocketAddr) {
    let config = tcp_config(limits).replace("[limits]", "metrics = 127.0.0.1:0\n[limits]");
    let mut staps = Staps::start(&config, &[]);
    let at = staps.metrics_addr();
    (staps, at)
}

/// A gauge from /metrics (`staps_` and `name`).
fn gauge(metrics: std::net::SocketAddr, name: &str) -> u64 {
    let text = get(metrics, "/metrics", "");
    let key = format!("staps_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {key} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Wait until `n` clients rest in the loop.
fn wait_resting(metrics: std::net::SocketAddr, n: u64) {
    wait_until(&format!("{n} resting clients"), || {
        gauge(metrics, "connections_resting") == n
    });
}

/// An SSE listener on `path` by a raw request; its socket after the head.
/// HTTP/1.0: the events come as they are, not in chunks.
fn sse_from(source: &str, addr: std::net::SocketAddr, path: &str) -> TcpStream {
    let mut s = tcp_from(source, addr);
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let head = read_until_seen(&mut s, "\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Silent clients from many addresses give their threads back; each is
/// taken again by its own message, which reaches every other client.
#[test]
fn silent_clients_rest_without_a_thread_and_wake_on_their_messages() {
    let (staps, metrics) = with_metrics("");
    let addr = staps.addr();
    let ch = channel();
    let mut clients: Vec<Ws> = (0..150)
        .map(|i| connect_from(&format!("127.0.0.{}", 2 + i % 50), addr, &ch))
        .collect();
    wait_resting(metrics, 150);
    // A thread each would be 150 readers; the pool keeps at most 64 idle.
    let threads = readers(&staps);
    assert!(
        threads < 100,
        "{threads} reader threads for 150 silent clients"
    );
    for sender in [0, 75, 149] {
        let text = format!("from {sender}");
        clients[sender].send(Message::text(text.clone())).unwrap();
        for (i, c) in clients.iter_mut().enumerate() {
            if i != sender {
                assert_eq!(recv(c), Message::text(text.clone()));
            }
        }
    }
    // Silent again, all of them rest again.
    wait_resting(metrics, 150);
}

/// New websocket clients and stream listeners join on the event loop and
/// wait there from their answer on, and those that leave without a word
/// are seen off there: a crowd that comes, says nothing and goes never
/// takes a reader thread. A message, right behind a request head or later,
/// is read by one.
#[test]
fn clients_that_come_and_go_in_silence_take_no_reader_thread() {
    // No /metrics: its scrapes are answered by reader threads. The debug
    // log tells when clients leave.
    let staps = Staps::start(&tcp_config(""), &["-v"]);
    let addr = staps.addr();
    let ch = channel();
    let clients: Vec<Ws> = (0..100)
        .map(|i| connect_from(&format!("127.0.0.{}", 2 + i % 20), addr, &ch))
        .collect();
    let streams: Vec<TcpStream> = (0..5)
        .map(|i| sse_from(&format!("127.0.0.{}", 30 + i), addr, &ch))
        .collect();
    // Each answer went out from the loop, which kept the connection.
    let threads = readers(&staps);
    assert_eq!(threads, 0, "reader threads for clients that said nothing");
    // Their sockets close without a close frame, as most clients leave.
    drop(clients);
    drop(streams);
    wait_until("the clients gone", || {
        let lines = staps.lines();
        lines
            .iter()
            .filter(|l| l.contains(" left channel "))
            .count()
            == 105
    });
    let threads = readers(&staps);
    assert_eq!(threads, 0, "reader threads woken to read clients' ends");
    let mut listener = connect_from("127.0.0.40", addr, &ch);
    let mut eager = tcp_from("127.0.0.41", addr);
    let mut request = upgrade_request(&ch).into_bytes();
    request.extend(client_frame(true, 0x1, b"right behind the head"));
    eager.write_all(&request).unwrap();
    assert_eq!(recv(&mut listener), Message::text("right behind the head"));
    assert!(readers(&staps) > 0, "no reader thread read the message");
}

/// A resting client's ping is answered, and its close is answered and
/// ends its membership: the loop hands it to a reader for both.
#[test]
fn a_resting_client_is_woken_by_a_ping_and_by_a_close() {
    let (_staps, metrics) = with_metrics("");
    let ch = channel();
    let mut raw = raw_ws(_staps.addr(), &ch);
    wait_resting(metrics, 1);
    raw.write_all(&client_frame(true, 0x9, b"are you there"))
        .unwrap();
    assert_eq!(server_frame(&mut raw), (0xA, b"are you there".to_vec()));
    wait_resting(metrics, 1);
    let mut close = 4000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    raw.write_all(&client_frame(true, 0x8, &close)).unwrap();
    assert_eq!(raw_close_code(&mut raw), 4000);
    // The server ends the connection, and the client is gone.
    let mut buf = [0u8; 16];
    assert_eq!(raw.read(&mut buf).unwrap_or(0), 0);
    wait_until("the closed client gone", || {
        gauge(metrics, "connections") == 0 && gauge(metrics, "connections_resting") == 0
    });
}

/// The loop pings resting clients; one that answers stays, one that does
/// not is closed with 1001 after two intervals, as a reader would.
#[test]
fn the_loop_pings_resting_clients_and_closes_those_that_stop_answering() {
    let (staps, metrics) = with_metrics("ping_interval = 1");
    let addr = staps.addr();
    let ch = channel();
    let mut answers = raw_ws(addr, &ch);
    let mut silent = raw_ws(addr, &ch);
    wait_resting(metrics, 2);
    // One client answers every ping (until the server stops pinging it).
    let answering = std::thread::spawn(move || {
        let mut answered = 0;
        loop {
            match server_frame(&mut answers) {
                (0x9, payload) => {
                    answers
                        .write_all(&client_frame(true, 0xA, &payload))
                        .unwrap();
                    answered += 1;
                }
                (0x8, payload) => {
                    return (answered, u16::from_be_bytes([payload[0], payload[1]]));
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
    });
    // The silent one gets its pings, then 1001.
    let mut pings = 0;
    let code = loop {
        match server_frame(&mut silent) {
            (0x9, _) => pings += 1,
            (0x8, payload) => break u16::from_be_bytes([payload[0], payload[1]]),
            other => panic!("unexpected frame {other:?}"),
        }
    };
    assert_eq!(code, 1001);
    assert!(pings >= 1, "closed without a ping");
    // The other, answering, is still there, and resting between pings.
    wait_until("the silent client gone", || {
        gauge(metrics, "connections") == 1
    });
    wait_resting(metrics, 1);
    // Its pings go on until the server stops; then it is closed with 1001.
    staps.signal(libc::SIGTERM);
    let (answered, code) = answering.join().unwrap();
    assert_eq!(code, 1001);
    assert!(answered >= 2, "{answered} pings answered");
}

/// A resting receiver, websocket or SSE, gets every message in order, by
/// direct writes and a writer thread, without being woken.
#[test]
fn resting_receivers_get_every_message_in_order() {
    let (staps, metrics) = with_metrics("");
    let addr = staps.addr();
    let ch = channel();
    let mut receiver = connect_from("127.0.0.2", addr, &ch);
    let mut sse = sse_from("127.0.0.3", addr, &ch);
    wait_resting(metrics, 2);
    let mut sender = connect_from("127.0.0.4", addr, &ch);
    let n = 2000;
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            sender.send(Message::text(format!("m{i}"))).unwrap();
        }
        sender
    });
    for i in 0..n {
        assert_eq!(recv(&mut receiver), Message::text(format!("m{i}")));
    }
    let mut seen = String::new();
    let want = format!("data: m{}\n\n", n - 1);
    let mut buf = [0u8; 65536];
    while !seen.ends_with(&want) {
        let got = sse.read(&mut buf).expect("SSE stream");
        assert!(got > 0, "SSE stream ended");
        seen.push_str(std::str::from_utf8(&buf[..got]).unwrap());
    }
    // Each message's event starts with its id.
    let events: Vec<&str> = seen
        .split("\n\n")
        .filter_map(|e| e.split_once('\n').filter(|(id, _)| id.starts_with("id: ")))
        .map(|(_, data)| data)
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("data: m{i}")).collect();
    assert_eq!(events, expected);
    drop(writer.join().unwrap());
    // An HTTP publish reaches the resting ones too.
    let answer = post(addr, &ch, "Content-Type: text/plain\r\n", b"posted");
    assert!(answer.contains("{\"clients\": 2}"), "{answer}");
    assert_eq!(recv(&mut receiver), Message::text("posted"));
}

/// A shutdown closes resting clients with 1001 and ends resting streams;
/// clients that answer let staps stop at once, not after the close timeout.
#[test]
fn shutdown_closes_resting_clients() {
    let (mut staps, metrics) = with_metrics("");
    let addr = staps.addr();
    let ch = channel();
    let mut clients: Vec<Ws> = (0..40)
        .map(|i| connect_from(&format!("127.0.0.{}", 2 + i % 10), addr, &ch))
        .collect();
    let mut streams: Vec<TcpStream> = (0..5)
        .map(|i| sse_from(&format!("127.0.0.{}", 20 + i), addr, &ch))
        .collect();
    wait_resting(metrics, 45);
    staps.signal(libc::SIGTERM);
    for c in &mut clients {
        assert_eq!(close_code(c), 1001);
        // The answer goes out; then the server ends the connection.
        let _ = c.flush();
    }
    for c in &mut clients {
        assert!(
            matches!(c.read(), Err(tungstenite::Error::ConnectionClosed)),
            "the connection stays open after the close handshake"
        );
    }
    for s in &mut streams {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("stream ends");
    }
    assert_eq!(staps.wait_exit().code(), Some(0));
    assert!(
        !staps
            .lines()
            .iter()
            .any(|l| l.contains("did not finish the close handshake")),
        "resting clients answered the close, yet staps waited for them"
    );
}
