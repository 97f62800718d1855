//! SPEC §3: limits, slow clients, liveness and protocol errors.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

#[test]
fn too_big_messages_close_the_sender_with_1009_and_relay_nothing() {
    let staps = Staps::start(&tcp_config("max_message_size = 1000"), &[]);
    let ch = channel();
    let mut big = connect(staps.addr(), &ch);
    let mut frag = raw_ws(staps.addr(), &ch);
    let mut header_only = raw_ws(staps.addr(), &ch);
    let mut ok = connect(staps.addr(), &ch);
    let mut rx = connect(staps.addr(), &ch);
    big.send(Message::binary(vec![7u8; 1001])).unwrap();
    assert_eq!(close_code(&mut big), 1009);
    // Fragments that add up to too much.
    let mut frames = client_frame(false, 0x2, &[1u8; 600]);
    frames.extend(client_frame(true, 0x0, &[2u8; 600]));
    frag.write_all(&frames).unwrap();
    assert_eq!(raw_close_code(&mut frag), 1009);
    // A header announcing 2^62 bytes: refused at once, nothing reserved.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 62).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    header_only.write_all(&header).unwrap();
    assert_eq!(raw_close_code(&mut header_only), 1009);
    // Exactly the limit is fine, and it is the first thing the receiver sees.
    ok.send(Message::binary(vec![9u8; 1000])).unwrap();
    assert_eq!(recv(&mut rx), Message::binary(vec![9u8; 1000]));
}

#[test]
fn protocol_errors_close_with_rfc_codes() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut rx = connect(staps.addr(), &ch);
    let cases: [(&str, Vec<u8>, u16); 7] = [
        (
            "invalid UTF-8 text",
            client_frame(true, 0x1, &[0x66, 0xff, 0x80]),
            1007,
        ),
        (
            "invalid UTF-8 across fragments",
            [
                client_frame(false, 0x1, &[0xe2, 0x82]),
                client_frame(true, 0x0, &[0x41]),
            ]
            .concat(),
            1007,
        ),
        ("unmasked frame", vec![0x81, 0x02, b'h', b'i'], 1002),
        ("reserved opcode", client_frame(true, 0x3, b"x"), 1002),
        (
            "continuation without a start",
            client_frame(true, 0x0, b"x"),
            1002,
        ),
        // RFC 6455 5.2: the minimal number of bytes must encode the length.
        (
            "2 bytes in a 16-bit length",
            [&[0x82, 0x80 | 126, 0, 2, 0, 0, 0, 0][..], b"hi"].concat(),
            1002,
        ),
        (
            "300 bytes in a 64-bit length",
            [frame_header(true, 2, 300), vec![0; 300]].concat(),
            1002,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut raw = raw_ws(staps.addr(), &ch);
        raw.write_all(&bytes).unwrap();
        assert_eq!(raw_close_code(&mut raw), code, "{what}");
    }
    // Nothing of it reached the channel.
    let mut tx = connect(staps.addr(), &ch);
    tx.send(Message::text("clean")).unwrap();
    assert_eq!(recv(&mut rx), Message::text("clean"));
}

#[test]
fn full_channels_get_503_with_retry_after() {
    let staps = Staps::start(&tcp_config("max_clients_per_channel = 2"), &[]);
    let ch = channel();
    let _a = connect(staps.addr(), &ch);
    let b = connect(staps.addr(), &ch);
    let e = try_connect(staps.addr(), &ch).unwrap_err();
    assert_eq!(status_of(&e), 503);
    let tungstenite::Error::Http(response) = e else {
        unreachable!()
    };
    assert!(response.headers().contains_key("Retry-After"));
    // Another channel is not affected, and a freed place can be taken.
    connect(staps.addr(), &channel());
    drop(b);
    let deadline = std::time::Instant::now() + DEADLINE;
    while try_connect(staps.addr(), &ch).is_err() {
        assert!(std::time::Instant::now() < deadline, "place never freed");
        thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_full_server_gets_503() {
    let mut staps = Staps::start(&tcp_config("max_connections = 2"), &[]);
    let _a = connect(staps.addr(), &channel());
    let _b = connect(staps.addr(), &channel());
    assert_eq!(
        status_of(&try_connect(staps.addr(), &channel()).unwrap_err()),
        503
    );
    let line = staps.stats();
    assert_eq!(counter(&line, "connections"), 2);
    assert!(counter(&line, "refused") >= 1);
}

/// Publish `n` messages of 16 KiB with a window on the fast receiver, so that
/// only the stalled client can fall behind; returns what the fast one got.
fn publish_past_a_stalled_client(staps: &Staps, ch: &str, n: usize) -> usize {
    let mut publisher = connect(staps.addr(), ch);
    let mut fast = connect(staps.addr(), ch);
    let (ack_tx, ack_rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for i in 0..n {
            let Message::Binary(data) = recv(&mut fast) else {
                panic!("not binary")
            };
            assert_eq!(
                &data[..8],
                &(i as u64).to_be_bytes(),
                "fast receiver lost or reordered"
            );
            ack_tx.send(()).unwrap();
        }
        n
    });
    for i in 0..n {
        if i >= 16 {
            ack_rx
                .recv_timeout(DEADLINE)
                .expect("fast receiver is stuck");
        }
        let mut data = vec![0u8; 16 * 1024];
        data[..8].copy_from_slice(&(i as u64).to_be_bytes());
        publisher.send(Message::binary(data)).unwrap();
    }
    reader.join().unwrap()
}

#[test]
fn a_stalled_receiver_is_disconnected_and_delays_no_one() {
    let mut staps = Staps::start(&tcp_config("queue_length = 64"), &[]);
    let ch = channel();
    let stalled = stalled_client(&staps, &ch);
    assert_eq!(publish_past_a_stalled_client(&staps, &ch, 2000), 2000);
    let line = staps.wait_stats(|l| counter(l, "slow_disconnects") == 1);
    assert_eq!(counter(&line, "dropped"), 0);
    // The stalled client finds, after what it had been sent, a 1008 close.
    let mut ws =
        tungstenite::WebSocket::from_raw_socket(stalled, tungstenite::protocol::Role::Client, None);
    let mut expected = 0u64;
    loop {
        match ws.read() {
            Ok(Message::Binary(data)) => {
                assert_eq!(
                    &data[..8],
                    &expected.to_be_bytes(),
                    "nothing skipped before the close"
                );
                expected += 1;
            }
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 1008);
                assert_eq!(frame.reason.as_str(), "slow consumer");
                break;
            }
            Ok(Message::Ping(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(expected < 2000);
}

#[test]
fn with_drop_a_stalled_receiver_misses_messages_counted_and_stays() {
    let mut staps = Staps::start(&tcp_config("queue_length = 64\nslow_client = drop"), &[]);
    let ch = channel();
    let stalled = stalled_client(&staps, &ch);
    assert_eq!(publish_past_a_stalled_client(&staps, &ch, 2000), 2000);
    // Counters are added after the deliveries are queued: wait until all
    // 4 000 (two receivers) are accounted for, queued or dropped.
    let line = staps.wait_stats(|l| counter(l, "messages_out") + counter(l, "dropped") == 4000);
    assert_eq!(counter(&line, "slow_disconnects"), 0);
    let dropped = counter(&line, "dropped");
    assert!(dropped > 0, "{line}");
    // It is still a member, and what it gets is in order.
    let mut ws =
        tungstenite::WebSocket::from_raw_socket(stalled, tungstenite::protocol::Role::Client, None);
    let mut last = None;
    let mut got = 0;
    while got + dropped < 2000 {
        match ws.read().expect("still connected") {
            Message::Binary(data) => {
                let i = u64::from_be_bytes(data[..8].try_into().unwrap());
                assert!(last.is_none_or(|l| i > l), "out of order");
                last = Some(i);
                got += 1;
            }
            Message::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got + dropped, 2000);
}

#[test]
fn clients_are_pinged_and_silent_ones_closed_after_two_intervals() {
    let staps = Staps::start(&tcp_config("ping_interval = 0.5"), &[]);
    let ch = channel();
    // tungstenite answers pings while it reads: this one stays.
    let mut alive = connect(staps.addr(), &ch);
    let alive = thread::spawn(move || {
        let mut pings = 0;
        // Six pings: three intervals, more than the two that close a silent client.
        while pings < 6 {
            if let Message::Ping(_) = alive.read().expect("alive client closed") {
                pings += 1;
            }
        }
        alive
    });
    // A raw client never answers.
    let mut silent = raw_ws(staps.addr(), &ch);
    let (op, _) = server_frame(&mut silent);
    assert_eq!(op, 0x9, "the first thing a silent client gets is a ping");
    assert_eq!(raw_close_code(&mut silent), 1001);
    let mut alive = alive.join().unwrap();
    let mut other = connect(staps.addr(), &ch);
    other.send(Message::text("alive")).unwrap();
    assert_eq!(recv(&mut alive), Message::text("alive"));
}

#[test]
fn a_client_that_only_sends_is_pinged_too() {
    // Nothing is ever queued for a client alone in its channel, so its writer
    // starts for the first ping; the reader, never idle for a whole interval
    // here, must see to that.
    let staps = Staps::start(&tcp_config("ping_interval = 0.5"), &[]);
    let mut raw = raw_ws(staps.addr(), &channel());
    raw.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let first = loop {
        assert!(
            Instant::now() < deadline,
            "a sending client was never pinged"
        );
        raw.write_all(&client_frame(true, 0x1, b"still here"))
            .unwrap();
        let mut byte = [0u8; 1];
        match raw.read(&mut byte) {
            Ok(1) => break byte[0],
            Ok(_) => panic!("the server closed the connection"),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(e) => panic!("read: {e}"),
        }
    };
    assert_eq!(first, 0x89, "the first frame is a ping");
}

#[test]
fn client_pings_are_answered_with_pongs() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let mut raw = raw_ws(staps.addr(), &channel());
    raw.write_all(&client_frame(true, 0x9, b"are you there"))
        .unwrap();
    assert_eq!(server_frame(&mut raw), (0xA, b"are you there".to_vec()));
}

#[test]
fn queue_bytes_bounds_a_stalled_receiver_by_default() {
    // No queue_length: the byte bound alone (1 MiB of 16 KiB messages; four
    // times the fast receiver's window, so that only the stalled one passes
    // it however the machine is loaded).
    let mut staps = Staps::start(&tcp_config("queue_bytes = 1048576"), &[]);
    let ch = channel();
    let _stalled = stalled_client(&staps, &ch);
    assert_eq!(publish_past_a_stalled_client(&staps, &ch, 2000), 2000);
    let line = staps.wait_stats(|l| counter(l, "slow_disconnects") == 1);
    assert_eq!(counter(&line, "dropped"), 0, "{line}");
}

/// Under `wait` a receiver gets every message, the publisher waiting for
/// room; one that never reads holds everyone up for `slow_timeout`, then is
/// closed with 1008, and the others go on, nothing lost.
#[test]
fn wait_loses_nothing_and_closes_a_dead_receiver_after_slow_timeout() {
    const N: usize = 2000;
    let mut staps = Staps::start(
        &tcp_config("slow_client = wait\nqueue_bytes = 1048576\nslow_timeout = 3"),
        &[],
    );
    let ch = channel();
    let mut publisher = connect(staps.addr(), &ch);
    let mut reader = connect(staps.addr(), &ch);
    let stalled = stalled_client(&staps, &ch);
    let reader = thread::spawn(move || {
        for i in 0..N {
            let Message::Binary(data) = recv(&mut reader) else {
                panic!("not binary")
            };
            assert_eq!(&data[..8], &(i as u64).to_be_bytes(), "lost or reordered");
        }
    });
    // 32 MB: far more than the socket buffers and the 1 MiB queue hold.
    let sender = thread::spawn(move || {
        for i in 0..N {
            let mut data = vec![0u8; 16 * 1024];
            data[..8].copy_from_slice(&(i as u64).to_be_bytes());
            publisher.send(Message::binary(data)).unwrap();
        }
        publisher
    });
    // The dead receiver holds everyone up for slow_timeout, then goes.
    let line = staps.wait_stats(|l| counter(l, "slow_disconnects") == 1);
    assert_eq!(counter(&line, "dropped"), 0, "{line}");
    let mut ws =
        tungstenite::WebSocket::from_raw_socket(stalled, tungstenite::protocol::Role::Client, None);
    let code = loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => break u16::from(frame.code),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, 1008);
    reader.join().expect("the reader got everything");
    sender.join().expect("the publisher finished");
    let line = staps.stats();
    assert_eq!(counter(&line, "dropped"), 0, "{line}");
    assert_eq!(counter(&line, "slow_disconnects"), 1, "{line}");
}

#[test]
fn the_creator_picks_the_slow_client_policy() {
    let mut staps = Staps::start(&tcp_config("queue_bytes = 1048576"), &[]);
    let bad = try_connect(staps.addr(), &format!("{}?slow=never", channel()));
    assert_eq!(bad.map(|_| 0).unwrap_or_else(|e| status_of(&e)), 400);
    // The server's policy is disconnect; this channel drops instead.
    let ch = channel();
    let _creator = connect(staps.addr(), &format!("{ch}?slow=drop"));
    let _stalled = stalled_client(&staps, &ch);
    assert_eq!(publish_past_a_stalled_client(&staps, &ch, 2000), 2000);
    let line = staps.wait_stats(|l| counter(l, "dropped") > 0);
    assert_eq!(counter(&line, "slow_disconnects"), 0, "{line}");
}
