//! SPEC §10: channel options in the handshake's query string (`echo`,
//! `replay`, `max`) and `GET /P?stats`.

mod common;

use common::*;
use tungstenite::Message;

fn text(s: &str) -> Message {
    Message::text(s)
}

/// The first data message, which must arrive before `marker` is sent back:
/// proves what a client did *not* get.
fn next_is(ws: &mut Ws, expected: Message) {
    assert_eq!(recv(ws), expected);
}

#[test]
fn echo_1_gets_its_own_messages_others_do_not() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut echo = connect(staps.addr(), &format!("{ch}?echo=1"));
    let mut plain = connect(staps.addr(), &ch);
    echo.send(text("mine")).unwrap();
    next_is(&mut echo, text("mine"));
    next_is(&mut plain, text("mine"));
    // The plain client does not hear itself: the echo client's reply is next.
    plain.send(text("not back to me")).unwrap();
    next_is(&mut echo, text("not back to me"));
    echo.send(text("marker")).unwrap();
    next_is(&mut echo, text("marker"));
    next_is(&mut plain, text("marker"));
    // echo=0 is the default.
    let mut zero = connect(staps.addr(), &format!("{ch}?echo=0"));
    zero.send(Message::binary(vec![1, 2])).unwrap();
    next_is(&mut plain, Message::binary(vec![1, 2]));
    zero.send(text("second")).unwrap();
    next_is(&mut echo, Message::binary(vec![1, 2]));
    next_is(&mut echo, text("second"));
}

#[test]
fn options_do_not_change_the_channel_and_unknown_ones_are_ignored() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut a = connect(staps.addr(), &format!("{ch}?max=10&color=blue&replay=0"));
    let mut b = connect(staps.addr(), &format!("{ch}?x"));
    a.send(text("same channel")).unwrap();
    next_is(&mut b, text("same channel"));
}

#[test]
fn malformed_values_get_400_naming_the_option() {
    let staps = Staps::start(&tcp_config(""), &[]);
    for (query, needle) in [
        ("echo=yes", "echo=yes"),
        ("echo=", "echo="),
        ("replay=-1", "replay=-1"),
        ("replay=lots", "replay=lots"),
        ("max=0", "max=0"),
        ("max=+3", "max=+3"),
        ("max=99999999999999999999999", "max=9999"),
    ] {
        let response = raw_http(
            staps.addr(),
            upgrade_request(&format!("{}?{query}", channel())).as_bytes(),
        );
        assert!(response.starts_with("HTTP/1.1 400 "), "{query}: {response}");
        assert!(response.contains(needle), "{query}: {response}");
    }
}

#[test]
fn replay_n_sends_the_last_n_messages_first_in_order_and_type() {
    let staps = Staps::start(&tcp_config("replay_length = 16"), &[]);
    let ch = channel();
    let mut publisher = connect(staps.addr(), &ch);
    let sent: Vec<Message> = (0..20)
        .map(|i| match i % 2 {
            0 => text(&format!("t{i}")),
            _ => Message::binary(vec![i as u8]),
        })
        .collect();
    for m in &sent {
        publisher.send(m.clone()).unwrap();
    }
    // Wait until the publisher's messages are all in: a witness gets the
    // last one (replayed or live).
    let mut witness = connect(staps.addr(), &format!("{ch}?replay=1"));
    while recv(&mut witness) != sent[19] {}

    let mut late = connect(staps.addr(), &format!("{ch}?replay=5"));
    for m in &sent[15..] {
        next_is(&mut late, m.clone());
    }
    // More than replay_length gives replay_length.
    let mut greedy = connect(staps.addr(), &format!("{ch}?replay=1000"));
    for m in &sent[4..] {
        next_is(&mut greedy, m.clone());
    }
    // Then live messages, after the replayed ones.
    publisher.send(text("live")).unwrap();
    for ws in [&mut late, &mut greedy, &mut witness] {
        next_is(ws, text("live"));
    }
    // Without replay, only what comes after joining.
    let mut plain = connect(staps.addr(), &ch);
    publisher.send(text("after")).unwrap();
    next_is(&mut plain, text("after"));
}

#[test]
fn the_replay_ring_goes_with_its_channel_and_replay_length_0_turns_it_off() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    {
        let mut a = connect(staps.addr(), &ch);
        let mut b = connect(staps.addr(), &ch);
        a.send(text("old")).unwrap();
        next_is(&mut b, text("old"));
    }
    let mut staps = staps;
    staps.wait_stats(|l| counter(l, "channels") == 0);
    let mut fresh = connect(staps.addr(), &format!("{ch}?replay=5"));
    let mut other = connect(staps.addr(), &ch);
    other.send(text("new")).unwrap();
    next_is(&mut fresh, text("new"));

    let off = Staps::start(&tcp_config("replay_length = 0"), &[]);
    let ch = channel();
    let mut a = connect(off.addr(), &ch);
    let mut b = connect(off.addr(), &ch);
    a.send(text("unkept")).unwrap();
    // Published (and, were replay on, kept) before the late client joins.
    next_is(&mut b, text("unkept"));
    let mut late = connect(off.addr(), &format!("{ch}?replay=5"));
    a.send(text("kept")).unwrap();
    next_is(&mut late, text("kept"));
}

#[test]
fn max_n_is_set_by_the_creator_and_ignored_when_joining() {
    let mut staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let mut creator = connect(staps.addr(), &format!("{ch}?max=2"));
    // Asking for more when joining changes nothing.
    let mut second = connect(staps.addr(), &format!("{ch}?max=5"));
    for query in ["", "?max=5"] {
        let e = try_connect(staps.addr(), &format!("{ch}{query}")).unwrap_err();
        assert_eq!(status_of(&e), 503);
    }
    creator.send(text("pair")).unwrap();
    next_is(&mut second, text("pair"));
    // A seat frees up when a member leaves.
    drop(second);
    staps.wait_stats(|l| counter(l, "connections") == 1);
    let mut third = connect(staps.addr(), &ch);
    creator.send(text("again")).unwrap();
    next_is(&mut third, text("again"));
}

#[test]
fn stats_tells_how_many_clients_a_channel_has_as_json() {
    let staps = Staps::start(&tcp_config(""), &[]);
    let ch = channel();
    let empty = get(staps.addr(), &format!("{ch}?stats"), "");
    assert!(empty.starts_with("HTTP/1.1 200 "), "{empty}");
    assert!(
        empty.contains("Content-Type: application/json\r\n"),
        "{empty}"
    );
    assert!(empty.contains("Cache-Control: no-store\r\n"), "{empty}");
    assert_eq!(body(&empty), "{\"clients\": 0}\n");
    let _a = connect(staps.addr(), &ch);
    let _b = connect(staps.addr(), &format!("{ch}?echo=1"));
    let _other = connect(staps.addr(), &channel());
    let two = get(staps.addr(), &format!("{ch}?stats"), "");
    assert_eq!(body(&two), "{\"clients\": 2}\n");
    // HEAD: the headers only. The same path rules as for joining.
    let head = raw_http(
        staps.addr(),
        format!("HEAD {ch}?stats HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    );
    assert!(
        head.starts_with("HTTP/1.1 200 ") && body(&head).is_empty(),
        "{head}"
    );
    assert!(get(staps.addr(), "/?stats", "").starts_with("HTTP/1.1 404 "));
}
