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
