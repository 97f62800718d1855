//! SPEC §1: channels and messages, over TCP and unix sockets.

mod common;

use std::io::Write;

use common::*;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn messages_reach_every_other_member_never_the_sender() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    let mut c = connect(staps.addr(), &ch);
    a.send(Message::text("from a")).unwrap();
    assert_eq!(recv(&mut b), Message::text("from a"));
    assert_eq!(recv(&mut c), Message::text("from a"));
    b.send(Message::text("from b")).unwrap();
    // a got nothing of its own: the next thing it sees is b's message.
    assert_eq!(recv(&mut a), Message::text("from b"));
    assert_eq!(recv(&mut c), Message::text("from b"));
}

#[test]
fn other_channels_hear_nothing() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let (one, two) = (channel(), channel());
    let mut a = connect(staps.addr(), &one);
    let mut b = connect(staps.addr(), &one);
    let mut x = connect(staps.addr(), &two);
    let mut y = connect(staps.addr(), &two);
    a.send(Message::text("secret")).unwrap();
    assert_eq!(recv(&mut b), Message::text("secret"));
    y.send(Message::text("mine")).unwrap();
    // x's first message is y's, so a's never reached channel two.
    assert_eq!(recv(&mut x), Message::text("mine"));
}

#[test]
fn text_stays_text_binary_stays_binary_byte_identical() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    let binary: Vec<u8> = (0..=255).cycle().take(70_000).collect();
    a.send(Message::binary(binary.clone())).unwrap();
    a.send(Message::text("héllo ✓")).unwrap();
    a.send(Message::binary(Vec::new())).unwrap();
    a.send(Message::text("")).unwrap();
    assert_eq!(recv(&mut b), Message::binary(binary));
    assert_eq!(recv(&mut b), Message::text("héllo ✓"));
    assert_eq!(recv(&mut b), Message::binary(Vec::new()));
    assert_eq!(recv(&mut b), Message::text(""));
}

#[test]
fn order_per_sender_is_kept() {
    // The receiver reads only after everything is sent: room for all of it.
    let staps = Staps::start(&tcp_config("queue_length = 5000"), &[]);
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    let mut r = connect(staps.addr(), &ch);
    for i in 0..2000 {
        a.write(Message::text(format!("a{i}"))).unwrap();
        b.write(Message::text(format!("b{i}"))).unwrap();
    }
    a.flush().unwrap();
    b.flush().unwrap();
    let (mut na, mut nb) = (0, 0);
    while na < 2000 || nb < 2000 {
        let Message::Text(t) = recv(&mut r) else {
            panic!("not text")
        };
        if let Some(i) = t.strip_prefix('a') {
            assert_eq!(i.parse::<i32>().unwrap(), na, "a out of order");
            na += 1;
        } else {
            assert_eq!(t.strip_prefix('b').unwrap().parse::<i32>().unwrap(), nb);
            nb += 1;
        }
    }
}

/// A reader that publishes a burst wakes the receivers' writers once it has
/// read what its client sent (or after a bounded number of messages), not per
/// message: whatever the burst's size, and however its end falls against the
/// reader's 1 KiB reads, the receivers get all of it while the sender stays
/// connected and silent. Without pings nothing else would wake a writer.
#[test]
fn bursts_arrive_whole_while_the_sender_stays_silent() {
    let staps = Staps::start(&tcp_config("ping_interval = 0\nqueue_length = 5000"), &[]);
    let ch = channel();
    let mut receivers: Vec<_> = (0..3).map(|_| connect(staps.addr(), &ch)).collect();
    let mut sender = raw_ws(staps.addr(), &ch);
    let mut seq = 0u32;
    // 122 B payloads make 128 B frames: 8 of them fill a read exactly.
    for (count, size) in [
        (1, 10),
        (8, 122),
        (16, 122),
        (15, 60),
        (64, 60),
        (65, 60),
        (1000, 122),
    ] {
        let mut burst = Vec::new();
        let first = seq;
        for _ in 0..count {
            let mut payload = vec![b'.'; size];
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            burst.extend(client_frame(true, 0x2, &payload));
            seq += 1;
        }
        sender.write_all(&burst).unwrap();
        for r in &mut receivers {
            for want in first..seq {
                let Message::Binary(data) = recv(r) else {
                    panic!("not binary")
                };
                assert_eq!(data.len(), size);
                assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), want);
            }
        }
    }
}

#[test]
fn fragmented_messages_are_delivered_whole() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut raw = raw_ws(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    let mut frames = client_frame(false, 0x1, "hel".as_bytes());
    frames.extend(client_frame(true, 0x9, b"ping in between"));
    frames.extend(client_frame(false, 0x0, "lo ".as_bytes()));
    // A multi-byte character split across fragments must survive.
    let word = "wörld".as_bytes();
    frames.extend(client_frame(false, 0x0, &word[..2]));
    frames.extend(client_frame(true, 0x0, &word[2..]));
    raw.write_all(&frames).unwrap();
    assert_eq!(recv(&mut b), Message::text("hello wörld"));
    // The ping was answered with a pong carrying its payload.
    let (op, payload) = server_frame(&mut raw);
    assert_eq!((op, payload.as_slice()), (0xA, &b"ping in between"[..]));
}

#[test]
fn paths_are_percent_decoded_and_queries_ignored_but_slashes_count() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let mut plain = connect(staps.addr(), "/a%20b");
    let mut query = connect(staps.addr(), "/%61%20%62?k=1");
    let mut slash = connect(staps.addr(), "/a%20b/");
    let mut bad_escape = connect(staps.addr(), "/%zz");
    let mut bad_escape2 = connect(staps.addr(), "/%zz?x");
    plain.send(Message::text("1")).unwrap();
    assert_eq!(recv(&mut query), Message::text("1"));
    slash.send(Message::text("2")).unwrap();
    query.send(Message::text("3")).unwrap();
    // plain's next message is 3: 2 went to "/a b/", another channel.
    assert_eq!(recv(&mut plain), Message::text("3"));
    bad_escape.send(Message::text("4")).unwrap();
    assert_eq!(recv(&mut bad_escape2), Message::text("4"));
}

#[test]
fn unix_socket_and_tcp_clients_share_channels() {
    let staps = Staps::start(
        "[staps]\nsocket = {dir}/one.sock {dir}/two.sock\nlisten = 127.0.0.1:0\n",
        &[],
    );
    assert_eq!(staps.sockets.len(), 2);
    let ch = channel();
    let mut u1 = connect_unix(&staps.sockets[0], &ch);
    let mut u2 = connect_unix(&staps.sockets[1], &ch);
    let mut t = connect(staps.addr(), &ch);
    u1.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(recv(&mut u2), Message::binary(vec![1, 2, 3]));
    assert_eq!(recv(&mut t), Message::binary(vec![1, 2, 3]));
    t.send(Message::text("tcp")).unwrap();
    assert_eq!(recv(&mut u1), Message::text("tcp"));
}

#[test]
fn ipv6_listener_works() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("NOTICE: no IPv6 loopback here; ipv6_listener_works skipped");
        return;
    }
    let staps = Staps::start("[staps]\nlisten = [::1]:0\n", &[]);
    assert!(staps.addr().is_ipv6());
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    a.send(Message::text("v6")).unwrap();
    assert_eq!(recv(&mut b), Message::text("v6"));
}

#[test]
fn channels_vanish_with_their_last_client() {
    let mut staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let b = connect(staps.addr(), &ch);
    let _c = connect(staps.addr(), &channel());
    let line = staps.wait_stats(|l| counter(l, "connections") == 3);
    assert_eq!(counter(&line, "channels"), 2);
    drop(b);
    a.close(None).unwrap();
    assert_eq!(close_code(&mut a), 0);
    let line = staps.wait_stats(|l| counter(l, "connections") == 1);
    assert_eq!(counter(&line, "channels"), 1, "{line}");
    // A newcomer on the old path starts from nothing: it gets what is sent after it.
    let mut d = connect(staps.addr(), &ch);
    let mut e = connect(staps.addr(), &ch);
    d.send(Message::text("fresh")).unwrap();
    assert_eq!(recv(&mut e), Message::text("fresh"));
}

#[test]
fn a_client_that_leaves_mid_stream_does_not_disturb_the_rest() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    let c = connect(staps.addr(), &ch);
    let stream = c.get_ref().try_clone().unwrap();
    // Vanish without a close frame.
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    for i in 0..100 {
        a.send(Message::text(format!("{i}"))).unwrap();
    }
    for i in 0..100 {
        assert_eq!(recv(&mut b), Message::text(format!("{i}")));
    }
}

/// A receiver that keeps up gets its messages straight from the publisher's
/// thread (one non-blocking send), and its close reply from its own reader:
/// no writer thread for any of it. One starts only for a backlog.
#[test]
fn a_writer_thread_starts_only_for_a_backlog() {
    let mut staps = Staps::start(
        &tcp_config("ping_interval = 0\nqueue_bytes = 100000000"),
        &[],
    );
    let pid = staps.pid();
    // Senders alone in their channels: nothing to write to any of them.
    let mut alone: Vec<_> = (0..10).map(|_| connect(staps.addr(), &channel())).collect();
    for ws in &mut alone {
        ws.send(Message::text("anyone?")).unwrap();
    }
    // Read by reader threads (a lone message's reader goes back to the
    // pool at once, so one thread may have read them all).
    staps.wait_stats(|line| counter(line, "messages_in") >= 10);
    assert!(threads_named(pid, "staps-client") >= 1, "no reader thread");
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    for i in 0..20 {
        a.send(Message::text(format!("for b {i}"))).unwrap();
        assert_eq!(recv(&mut b), Message::text(format!("for b {i}")));
        b.send(Message::text(format!("for a {i}"))).unwrap();
        assert_eq!(recv(&mut a), Message::text(format!("for a {i}")));
    }
    // The close handshake, answered by the reader.
    let mut first = alone.swap_remove(0);
    first
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .unwrap();
    assert_eq!(close_code(&mut first), 1000);
    assert_eq!(
        threads_named(pid, "staps-writer"),
        0,
        "no backlog, no writer"
    );
    // 40 MB for a client that does not read: more than loopback's socket
    // buffers take, so a writer takes over, and everything arrives once b
    // reads, in order.
    for i in 0..40u8 {
        a.send(Message::binary(vec![i; 1_000_000])).unwrap();
    }
    wait_until("a writer for the backlog", || {
        threads_named(pid, "staps-writer") >= 1
    });
    for i in 0..40u8 {
        assert_eq!(recv(&mut b), Message::binary(vec![i; 1_000_000]));
    }
    a.send(Message::text("after")).unwrap();
    assert_eq!(recv(&mut b), Message::text("after"));
}
