//! SPEC §8: instances linked through a real RabbitMQ on 127.0.0.1:5672.
//! Without a broker these tests skip loudly; under STAPS_TEST_STRICT=1 (as
//! `.ci/run` sets) a missing broker is a failure.
//!
//! Each test uses an exchange of its own, so tests do not hear each other;
//! the ones that stop or cut the broker hold the lock exclusively.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Connection, ConsumerMessage, ConsumerOptions, ExchangeDeclareOptions,
    ExchangeType, FieldTable, Publish, QueueDeclareOptions,
};
use common::*;
use tungstenite::Message;

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/";

static BROKER_LOCK: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    BROKER_LOCK.read().unwrap_or_else(|e| e.into_inner())
}

/// The shared lock, or `None` (after a loud skip) when there is no broker.
/// Locked first: while a test has the broker stopped, it is not missing.
fn shared_broker(test: &str) -> Option<RwLockReadGuard<'static, ()>> {
    let lock = shared();
    (!skip(test, no_broker())).then_some(lock)
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    BROKER_LOCK.write().unwrap_or_else(|e| e.into_inner())
}

fn no_broker() -> Option<String> {
    let up = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5672".parse().unwrap(),
        Duration::from_secs(2),
    )
    .is_ok();
    (!up).then(|| "no AMQP broker on 127.0.0.1:5672 (.ci/run starts RabbitMQ)".to_owned())
}

/// A fresh exchange name, deleted when dropped.
struct Exchange(String);

impl Exchange {
    fn new() -> Exchange {
        Exchange(format!("staps-test-{}", uuid::Uuid::new_v4()))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Ok(mut conn) = Connection::insecure_open(BROKER) {
            if let Ok(ch) = conn.open_channel(None) {
                let _ = ch.exchange_delete(self.0.as_str(), false);
            }
            let _ = conn.close();
        }
    }
}

fn instance(exchange: &Exchange, extra: &str) -> Staps {
    instance_on(exchange, BROKER, extra, &[])
}

/// An instance linked through the broker's nodes `amqp`, with `env`.
fn instance_on(exchange: &Exchange, amqp: &str, extra: &str, env: &[(&str, &str)]) -> Staps {
    let mut staps = Staps::start_env(
        &format!(
            "[staps]\nlisten = 127.0.0.1:0\namqp = {amqp}\nexchange = {}\n{extra}",
            exchange.0
        ),
        &["-v"],
        env,
    );
    staps.wait_log("relay: connected");
    staps
}

/// Routing keys bound from `exchange`, with how many queues each.
fn bindings(exchange: &Exchange) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_bindings", "source_name", "routing_key"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (source, key) = l.split_once('\t')?;
            (source == exchange.0).then(|| key.to_owned())
        })
        .collect()
}

/// Wait until `key` is bound `n` times (once per instance with local clients).
fn wait_bound(exchange: &Exchange, key: &str, n: usize) {
    wait_until(&format!("{n} binding(s) of {key}"), || {
        bindings(exchange).iter().filter(|k| *k == key).count() == n
    });
}

#[test]
fn two_instances_share_a_channel_exactly_once_in_order() {
    let Some(_lock) = shared_broker("two_instances_share_a_channel") else {
        return;
    };
    let exchange = Exchange::new();
    let one = instance(&exchange, "");
    let two = instance(&exchange, "");
    let ch = channel();
    let mut a = connect(one.addr(), &ch);
    let mut b = connect(two.addr(), &ch);
    let mut c = connect(two.addr(), &ch);
    wait_bound(&exchange, &ch[1..], 2);
    a.send(Message::text("from one")).unwrap();
    assert_eq!(recv(&mut b), Message::text("from one"));
    assert_eq!(recv(&mut c), Message::text("from one"));
    b.send(Message::binary(vec![0, 159, 146, 150])).unwrap();
    assert_eq!(recv(&mut a), Message::binary(vec![0, 159, 146, 150]));
    assert_eq!(recv(&mut c), Message::binary(vec![0, 159, 146, 150]));
    // Numbered messages from a, then a marker from b: c sees every number once,
    // in order, and a never gets its own back.
    for i in 0..500 {
        a.write(Message::text(format!("{i}"))).unwrap();
    }
    a.flush().unwrap();
    for i in 0..500 {
        assert_eq!(recv(&mut c), Message::text(format!("{i}")));
        assert_eq!(recv(&mut b), Message::text(format!("{i}")));
    }
    c.send(Message::text("end")).unwrap();
    assert_eq!(
        recv(&mut a),
        Message::text("end"),
        "a got something else first"
    );
    assert_eq!(recv(&mut b), Message::text("end"));
}

#[test]
fn three_instances_every_client_gets_each_message_once() {
    let Some(_lock) = shared_broker("three_instances") else {
        return;
    };
    let exchange = Exchange::new();
    let instances: Vec<Staps> = (0..3).map(|_| instance(&exchange, "")).collect();
    let ch = channel();
    let mut clients: Vec<Ws> = instances
        .iter()
        .flat_map(|s| [connect(s.addr(), &ch), connect(s.addr(), &ch)])
        .collect();
    wait_bound(&exchange, &ch[1..], 3);
    // Three messages from each client, all at once.
    const EACH: usize = 3;
    for k in 0..EACH {
        for (n, client) in clients.iter_mut().enumerate() {
            client
                .send(Message::text(format!("from {n} #{k}")))
                .unwrap();
        }
    }
    for (n, client) in clients.iter_mut().enumerate() {
        let mut got = HashSet::new();
        // Per sender, the next number this client must see from it.
        let mut next = [0usize; 6];
        for _ in 0..5 * EACH {
            let Message::Text(t) = recv(client) else {
                panic!("not text")
            };
            assert!(got.insert(t.to_string()), "client {n} got {t} twice");
            let (from, k) = t
                .strip_prefix("from ")
                .and_then(|r| r.split_once(" #"))
                .and_then(|(m, k)| Some((m.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
                .unwrap_or_else(|| panic!("{t}"));
            assert_eq!(k, next[from], "client {n}: {t} out of its sender's order");
            next[from] += 1;
        }
        let expected: HashSet<String> = (0..6)
            .filter(|m| *m != n)
            .flat_map(|m| (0..EACH).map(move |k| format!("from {m} #{k}")))
            .collect();
        assert_eq!(got, expected, "client {n}");
    }
    // Nothing more is on its way: a last message is the next thing everyone sees.
    clients[0].send(Message::text("last")).unwrap();
    for client in &mut clients[1..] {
        assert_eq!(recv(client), Message::text("last"));
    }
}

#[test]
fn bindings_follow_local_channels() {
    let Some(_lock) = shared_broker("bindings_follow_local_channels") else {
        return;
    };
    let exchange = Exchange::new();
    let mut staps = instance(&exchange, "");
    let ch = channel();
    let a = connect(staps.addr(), &ch);
    let b = connect(staps.addr(), &ch);
    wait_bound(&exchange, &ch[1..], 1);
    drop(a);
    // One client left: still bound.
    staps.wait_stats(|l| counter(l, "connections") == 1);
    assert_eq!(
        bindings(&exchange)
            .iter()
            .filter(|k| **k == ch[1..])
            .count(),
        1
    );
    drop(b);
    wait_bound(&exchange, &ch[1..], 0);
}

/// Publish as 0.1.x did: routing key, body and correlation_id only.
fn publish_plain(exchange: &Exchange, key: &str, body: &[u8]) {
    let mut conn = Connection::insecure_open(BROKER).unwrap();
    let channel = conn.open_channel(None).unwrap();
    let properties = AmqpProperties::default().with_correlation_id("0.1.x-client".into());
    channel
        .basic_publish(
            exchange.0.as_str(),
            Publish::with_properties(body, key, properties),
        )
        .unwrap();
    conn.close().unwrap();
}

#[test]
fn a_0_1_x_publisher_reaches_clients_and_a_plain_consumer_sees_staps() {
    let Some(_lock) = shared_broker("a_0_1_x_publisher_reaches_clients") else {
        return;
    };
    let exchange = Exchange::new();
    let staps = instance(&exchange, "");
    let ch = channel();
    let key = &ch[1..];
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    wait_bound(&exchange, key, 1);
    publish_plain(&exchange, key, "héllo from 0.1.x".as_bytes());
    publish_plain(&exchange, key, &[0xff, 0x00, 0xfe]);
    for client in [&mut a, &mut b] {
        assert_eq!(recv(client), Message::text("héllo from 0.1.x"));
        assert_eq!(recv(client), Message::binary(vec![0xff, 0x00, 0xfe]));
    }

    // A plain consumer bound to the exchange sees what staps publishes.
    let mut conn = Connection::insecure_open(BROKER).unwrap();
    let channel = conn.open_channel(None).unwrap();
    // Declaring the exchange as 0.1.x does must match staps' declaration.
    let amqp_exchange = channel
        .exchange_declare(
            ExchangeType::Direct,
            exchange.0.as_str(),
            ExchangeDeclareOptions::default(),
        )
        .expect("exchange declared as 0.1.x does");
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
        )
        .unwrap();
    queue
        .bind(&amqp_exchange, key, FieldTable::default())
        .unwrap();
    let consumer = queue
        .consume(ConsumerOptions {
            no_ack: true,
            ..ConsumerOptions::default()
        })
        .unwrap();
    a.send(Message::text("text from staps")).unwrap();
    a.send(Message::binary(vec![1, 2, 3])).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match consumer
            .receiver()
            .recv_timeout(DEADLINE)
            .expect("a delivery")
        {
            ConsumerMessage::Delivery(d) => seen.push(d),
            other => panic!("{other:?}"),
        }
    }
    for (d, body, content_type) in [
        (
            &seen[0],
            &b"text from staps"[..],
            "text/plain; charset=utf-8",
        ),
        (&seen[1], &[1u8, 2, 3][..], "application/octet-stream"),
    ] {
        assert_eq!(d.routing_key, key);
        assert_eq!(d.body, body);
        assert_eq!(d.properties.content_type().as_deref(), Some(content_type));
        let correlation = d
            .properties
            .correlation_id()
            .clone()
            .expect("correlation_id");
        uuid::Uuid::parse_str(&correlation).expect("correlation_id is the client's UUID");
        assert!(d.properties.app_id().is_some(), "app_id");
    }
    assert_eq!(
        seen[0].properties.correlation_id(),
        seen[1].properties.correlation_id()
    );
    // b got a's messages once, locally, not again through the broker.
    assert_eq!(recv(&mut b), Message::text("text from staps"));
    assert_eq!(recv(&mut b), Message::binary(vec![1, 2, 3]));
    a.send(Message::text("marker")).unwrap();
    assert_eq!(recv(&mut b), Message::text("marker"));
    let _ = conn.close();
}

#[test]
fn a_missing_broker_does_not_stop_local_delivery() {
    // Nothing listens on port 1.
    let mut staps = Staps::start(
        "[staps]\nlisten = 127.0.0.1:0\namqp = amqp://guest:guest@127.0.0.1:1/\n",
        &["-v"],
    );
    staps.wait_log("relay: cannot reach");
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    a.send(Message::text("local")).unwrap();
    assert_eq!(recv(&mut b), Message::text("local"));
    // It keeps trying, with backoff, and says so once at warning level.
    staps.wait_log("(attempt 3)");
    let line = staps.stats();
    assert!(line.contains("relay=down"), "{line}");
    assert!(counter(&line, "relay_dropped") >= 1, "{line}");
    let warnings = staps
        .lines()
        .iter()
        .filter(|l| l.contains("relay: cannot reach"))
        .count();
    assert_eq!(warnings, 1, "state changes are logged once");
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Local delivery goes on while the broker is away; the relay comes back by
/// itself, re-binds, and nothing is delivered twice.
fn survive(
    staps: &mut [Staps],
    exchange: &Exchange,
    break_broker: impl FnOnce(),
    mend_broker: impl FnOnce(),
) {
    let ch = channel();
    let mut a = connect(staps[0].addr(), &ch);
    let mut b = connect(staps[0].addr(), &ch);
    let mut r = connect(staps[1].addr(), &ch);
    wait_bound(exchange, &ch[1..], 2);
    a.send(Message::text("before")).unwrap();
    assert_eq!(recv(&mut r), Message::text("before"));
    assert_eq!(recv(&mut b), Message::text("before"));
    let skips: Vec<usize> = staps.iter().map(|s| s.lines().len()).collect();
    break_broker();
    staps[0].wait_log_after(skips[0], "relay: lost");
    // Local delivery is untouched.
    for i in 0..50 {
        a.send(Message::text(format!("local {i}"))).unwrap();
        assert_eq!(recv(&mut b), Message::text(format!("local {i}")));
    }
    mend_broker();
    let started = Instant::now();
    for (s, skip) in staps.iter_mut().zip(skips) {
        s.wait_log_after(skip, "relay: connected");
    }
    wait_bound(exchange, &ch[1..], 2);
    assert!(
        started.elapsed() < Duration::from_secs(35 + 30),
        "relay took too long"
    );
    a.send(Message::text("after")).unwrap();
    // r may have seen none of the local messages, and sees "after" exactly once.
    loop {
        let Message::Text(t) = recv(&mut r) else {
            panic!("not text")
        };
        if t == "after" {
            break;
        }
        assert!(t.starts_with("local "), "unexpected {t}");
    }
    b.send(Message::text("check")).unwrap();
    assert_eq!(
        recv(&mut r),
        Message::text("check"),
        "a duplicate of 'after'?"
    );
    assert_eq!(recv(&mut b), Message::text("after"));
    let line = staps[0].stats();
    assert!(counter(&line, "relay_reconnects") >= 1, "{line}");
    assert!(line.contains("relay=up"), "{line}");
}

/// Two instances through a broker fault: skipped without a broker or rabbitmqctl.
fn survive_fault(test: &str, break_broker: impl FnOnce(), mend_broker: impl FnOnce()) {
    // The lock first: while another test has the broker stopped, it is not missing.
    let _lock = exclusive();
    if skip(
        test,
        no_broker().or_else(|| needs_program("rabbitmqctl", "rabbitmq-server")),
    ) {
        return;
    }
    let exchange = Exchange::new();
    let mut staps = [instance(&exchange, ""), instance(&exchange, "")];
    survive(&mut staps, &exchange, break_broker, mend_broker);
}

#[test]
fn the_relay_survives_a_broker_restart() {
    survive_fault(
        "the_relay_survives_a_broker_restart",
        || rabbitmqctl(&["stop_app"]),
        || rabbitmqctl(&["start_app"]),
    );
}

#[test]
fn the_relay_survives_a_closed_connection() {
    survive_fault(
        "the_relay_survives_a_closed_connection",
        || rabbitmqctl(&["close_all_connections", "staps test"]),
        || {},
    );
}

#[test]
fn echo_replay_and_stats_with_the_relay() {
    let Some(_lock) = shared_broker("echo_replay_and_stats_with_the_relay") else {
        return;
    };
    let exchange = Exchange::new();
    let mut one = instance(&exchange, "metrics = 127.0.0.1:0");
    let two = instance(&exchange, "");
    let ch = channel();
    let mut a = connect(one.addr(), &format!("{ch}?echo=1"));
    let mut b = connect(two.addr(), &ch);
    wait_bound(&exchange, &ch[1..], 2);
    // An echo client gets its own message once (not again from the broker).
    a.send(Message::text("first")).unwrap();
    assert_eq!(recv(&mut a), Message::text("first"));
    assert_eq!(recv(&mut b), Message::text("first"));
    a.send(Message::text("second")).unwrap();
    assert_eq!(recv(&mut b), Message::text("second"));
    b.send(Message::text("from two")).unwrap();
    assert_eq!(recv(&mut a), Message::text("second"));
    assert_eq!(recv(&mut a), Message::text("from two"));
    // Remote messages enter the replay ring of the instance they reach.
    let mut late = connect(two.addr(), &format!("{ch}?replay=3"));
    for m in ["first", "second", "from two"] {
        assert_eq!(recv(&mut late), Message::text(m));
    }
    // stats counts this instance's clients only.
    let body = |addr| get(addr, &format!("{ch}?stats"), "");
    assert!(body(one.addr()).ends_with("{\"clients\": 1}\n"));
    assert!(body(two.addr()).ends_with("{\"clients\": 2}\n"));
    // The metrics tell the relay's state and counters.
    let at = one.metrics_addr();
    let metrics = get(at, "/metrics", "");
    for sample in [
        "staps_relay_up 1\n",
        "staps_relay_published_total 2\n",
        "staps_relay_received_total 1\n",
    ] {
        assert!(metrics.contains(sample), "{sample} in {metrics}");
    }
    assert!(get(at, "/healthz", "").ends_with("ok\nrelay: up\nnode: amqp://127.0.0.1:5672/\n"));
}

/// A broker message larger than this instance's max_message_size (another
/// instance with a higher limit, or any AMQP publisher) is dropped and
/// counted, never delivered or kept for replay.
#[test]
fn broker_messages_over_max_message_size_are_dropped_and_counted() {
    let Some(_lock) = shared_broker("broker_messages_over_max_message_size") else {
        return;
    };
    let exchange = Exchange::new();
    let mut staps = instance(&exchange, "[limits]\nmax_message_size = 1000\n");
    let ch = channel();
    let key = &ch[1..];
    let mut a = connect(staps.addr(), &ch);
    wait_bound(&exchange, key, 1);
    publish_plain(&exchange, key, &[7u8; 5000]);
    publish_plain(&exchange, key, b"small");
    assert_eq!(recv(&mut a), Message::text("small"));
    let line = staps.wait_stats(|l| counter(l, "oversize_dropped") == 1);
    assert_eq!(counter(&line, "relay_received"), 1, "{line}");
    // Not in the replay ring either.
    let mut late = connect(staps.addr(), &format!("{ch}?replay=16"));
    a.send(Message::text("after")).unwrap();
    assert_eq!(recv(&mut late), Message::text("small"));
    assert_eq!(recv(&mut late), Message::text("after"));
}

#[test]
fn http_publishes_and_streaming_listeners_cross_instances_both_ways() {
    let Some(_lock) = shared_broker("http_publishes_cross_instances") else {
        return;
    };
    let exchange = Exchange::new();
    let one = instance(&exchange, "");
    let two = instance(&exchange, "");
    let ch = channel();
    let mut b = connect(two.addr(), &ch);
    wait_bound(&exchange, &ch[1..], 1);
    // Published at one, where the channel has nobody: 0 here, and the
    // member at two gets it.
    let r = post(
        one.addr(),
        &ch,
        "Content-Type: text/plain\r\n",
        b"over http",
    );
    assert!(r.ends_with("{\"clients\": 0}\n"), "{r}");
    assert_eq!(recv(&mut b), Message::text("over http"));
    // A streaming listener at one gets what the member at two sends.
    let mut sse = sse_at(one.addr(), &ch);
    wait_bound(&exchange, &ch[1..], 2);
    b.send(Message::text("to the listener")).unwrap();
    read_until_seen(&mut sse, "data: to the listener\n\n");
}

#[test]
fn a_read_only_url_works_across_instances_that_share_the_secret() {
    let Some(_lock) = shared_broker("read_only_across_instances") else {
        return;
    };
    let exchange = Exchange::new();
    let shared = tempfile::tempdir().unwrap();
    let secret = format!("secret_file = {}\n", shared.path().join("secret").display());
    let one = instance(&exchange, &secret);
    let two = instance(&exchange, &secret);
    // Its own secret (the harness gives each instance one).
    let three = instance(&exchange, "");
    let ch = channel();
    let answer = get(one.addr(), &format!("{ch}?readonly"), "");
    let url = body(&answer).trim();
    let twin = &url[url.find("/r/").expect(url)..];
    let mut a = connect(one.addr(), &ch);
    let mut listener = connect(two.addr(), twin);
    // At three the token is an ordinary path: a channel nobody else is on.
    let mut stranger = connect(three.addr(), twin);
    wait_bound(&exchange, &ch[1..], 2);
    wait_bound(&exchange, &twin[1..], 1);
    a.send(Message::text("to the twin at two")).unwrap();
    assert_eq!(recv(&mut listener), Message::text("to the twin at two"));
    listener.send(Message::text("no")).unwrap();
    assert_eq!(close_code(&mut listener), 1008);
    // The stranger got nothing of /P: the next it hears is its own channel's.
    let mut other = connect(three.addr(), twin);
    other.send(Message::text("ordinary at three")).unwrap();
    assert_eq!(recv(&mut stranger), Message::text("ordinary at three"));
}

/// An SSE stream at `addr` on `target`, its head sent.
fn sse_at(addr: std::net::SocketAddr, target: &str) -> std::net::TcpStream {
    let mut sse = std::net::TcpStream::connect(addr).unwrap();
    sse.set_read_timeout(Some(DEADLINE)).unwrap();
    std::io::Write::write_all(
        &mut sse,
        format!("GET {target} HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n").as_bytes(),
    )
    .unwrap();
    sse
}

/// SPEC §10-11 with the relay: a lingering channel keeps its binding, so
/// what another instance's members send meanwhile enters its ring, with an
/// id of this instance, for the listener that comes back.
#[test]
fn a_lingering_channel_keeps_its_binding_and_takes_remote_messages() {
    let Some(_lock) = shared_broker("a_lingering_channel_keeps_its_binding") else {
        return;
    };
    let exchange = Exchange::new();
    let mut one = instance(&exchange, "");
    let two = instance(&exchange, "");
    let ch = channel();
    let mut sse = sse_at(one.addr(), &format!("{ch}?sse&linger=30"));
    wait_bound(&exchange, &ch[1..], 1);
    let mut b = connect(two.addr(), &ch);
    wait_bound(&exchange, &ch[1..], 2);
    b.send(Message::text("first")).unwrap();
    let seen = read_until_seen(&mut sse, "data: first\n\n");
    let id: u64 = seen
        .rsplit_once("id: ")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(id, _)| id.parse().ok())
        .unwrap_or_else(|| panic!("no id before the message: {seen:?}"));
    drop(sse);
    one.wait_stats(|l| counter(l, "connections") == 0);
    // Emptied at one, but lingering: still bound there.
    assert_eq!(
        bindings(&exchange)
            .iter()
            .filter(|k| **k == ch[1..])
            .count(),
        2
    );
    b.send(Message::text("while away")).unwrap();
    one.wait_stats(|l| counter(l, "relay_received") == 2);
    let mut back = sse_at(one.addr(), &format!("{ch}?sse&since={id}"));
    let got = read_until_seen(&mut back, "data: while away\n\n");
    assert!(!got.contains("event: gap"), "{got}");
    assert!(got.contains("id: "), "{got}");
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// socat in front of the machine's RabbitMQ, on a port of its own: a second
/// address of the broker. In a process group of its own, so that killing it
/// cuts every connection through it, as a node that dies would.
struct Forwarder {
    child: std::process::Child,
    port: u16,
}

impl Forwarder {
    /// Forward `listen` (a socat address taking the port) to the broker.
    fn start(listen: impl Fn(u16) -> String) -> Forwarder {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let child = Command::new("socat")
            .args([listen(port).as_str(), "TCP:127.0.0.1:5672"])
            .process_group(0)
            .spawn()
            .expect("socat runs");
        wait_until("socat listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Forwarder { child, port }
    }

    fn plain() -> Forwarder {
        Forwarder::start(|port| format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
    }

    fn kill(&mut self) {
        // SAFETY: signalling the process group socat leads.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What `/healthz` and `/metrics` of `staps` say.
fn health_and_metrics(staps: &mut Staps) -> (String, String) {
    let addr = staps.metrics_addr();
    (
        body(&get(addr, "/healthz", "")).to_owned(),
        body(&get(addr, "/metrics", "")).to_owned(),
    )
}

/// Issue 28: `amqp` lists the broker's nodes; the relay uses the first
/// that answers, and when it dies, moves to the next, binds every channel
/// again there and relays on, each message once. The metrics say which
/// node, without credentials.
#[test]
fn the_relay_fails_over_to_the_next_node_when_one_dies() {
    let Some(_lock) = shared_broker("the_relay_fails_over_to_the_next_node") else {
        return;
    };
    if skip(
        "the_relay_fails_over_to_the_next_node",
        needs_program("socat", "socat"),
    ) {
        return;
    }
    let exchange = Exchange::new();
    let mut first = Forwarder::plain();
    let a = format!("amqp://127.0.0.1:{}/", first.port);
    let b = "amqp://127.0.0.1:5672/".to_owned();
    let amqp = format!(
        "amqp://guest:guest@127.0.0.1:{}/, amqp://guest:guest@127.0.0.1:5672/",
        first.port
    );
    let mut one = instance_on(&exchange, &amqp, "metrics = 127.0.0.1:0", &[]);
    let mut two = instance_on(&exchange, &amqp, "", &[]);
    for staps in [&mut one, &mut two] {
        staps.wait_log(&format!("relay: connected to {a}, "));
    }
    let (health, metrics) = health_and_metrics(&mut one);
    assert!(
        health.contains(&format!("relay: up\nnode: {a}\n")),
        "{health}"
    );
    assert!(
        metrics.contains(&format!("staps_relay_node{{node=\"{a}\"}} 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("staps_relay_node{{node=\"{b}\"}} 0")),
        "{metrics}"
    );
    assert!(!metrics.contains("guest"), "no credentials: {metrics}");

    let ch = channel();
    let mut x = connect(one.addr(), &ch);
    let mut y = connect(two.addr(), &ch);
    wait_bound(&exchange, &ch[1..], 2);
    x.send(Message::text("through the first")).unwrap();
    assert_eq!(recv(&mut y), Message::text("through the first"));

    first.kill();
    for staps in [&mut one, &mut two] {
        staps.wait_log(&format!("relay: node changed from {a} to {b}"));
    }
    wait_bound(&exchange, &ch[1..], 2);
    x.send(Message::text("through the second")).unwrap();
    y.send(Message::text("and back")).unwrap();
    assert_eq!(recv(&mut y), Message::text("through the second"));
    assert_eq!(recv(&mut x), Message::text("and back"));
    // Once each: the next message is the next one sent.
    x.send(Message::text("next")).unwrap();
    assert_eq!(recv(&mut y), Message::text("next"));
    let (health, metrics) = health_and_metrics(&mut one);
    assert!(health.contains(&format!("node: {b}\n")), "{health}");
    assert!(
        metrics.contains(&format!("staps_relay_node{{node=\"{b}\"}} 1")),
        "{metrics}"
    );
    assert!(
        one.stats().contains("relay_reconnects=1"),
        "{}",
        one.stats()
    );
}

/// Files of a test CA and a server certificate it signed for `localhost`
/// (and 127.0.0.1), made with the openssl command; and a second CA that
/// signed nothing.
fn test_pki(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
            "-subj",
            &format!("/CN=staps test {ca}"),
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    let pem = [
        std::fs::read(dir.join("server.crt")).unwrap(),
        std::fs::read(dir.join("server.key")).unwrap(),
    ]
    .concat();
    std::fs::write(dir.join("server.pem"), pem).unwrap();
}

/// Issue 28: `amqps://` in the shipped build, through a TLS terminator in
/// front of RabbitMQ: the broker's certificate is checked against the CA
/// store (here a test CA, by SSL_CERT_FILE as OpenSSL reads it) and its
/// name; with another CA the link is refused with a clear line, and staps
/// serves locally.
#[test]
fn amqps_links_through_tls_and_a_wrong_ca_is_refused() {
    let Some(_lock) = shared_broker("amqps_links_through_tls") else {
        return;
    };
    for (program, package) in [("socat", "socat"), ("openssl", "openssl")] {
        if skip("amqps_links_through_tls", needs_program(program, package)) {
            return;
        }
    }
    let pki = tempfile::tempdir().unwrap();
    test_pki(pki.path());
    let pem = pki.path().join("server.pem");
    let _tls = Forwarder::start(|port| {
        format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},verify=0",
            pem.display()
        )
    });
    let port = _tls.port;
    let exchange = Exchange::new();
    let amqp = format!("amqps://guest:guest@localhost:{port}/");
    let ca = pki.path().join("ca.crt");
    let trust = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let mut one = instance_on(&exchange, &amqp, "", &trust);
    let two = instance_on(&exchange, &amqp, "", &trust);
    one.wait_log(&format!("relay: connected to amqps://localhost:{port}/, "));
    let ch = channel();
    let mut x = connect(one.addr(), &ch);
    let mut y = connect(two.addr(), &ch);
    wait_bound(&exchange, &ch[1..], 2);
    x.send(Message::text("over TLS")).unwrap();
    assert_eq!(recv(&mut y), Message::text("over TLS"));

    let other = pki.path().join("other-ca.crt");
    let mut wrong = Staps::start_env(
        &format!(
            "[staps]\nlisten = 127.0.0.1:0\namqp = {amqp}\nexchange = {}\n",
            exchange.0
        ),
        &[],
        &[("SSL_CERT_FILE", other.to_str().unwrap())],
    );
    let line = wrong.wait_log(&format!("relay: cannot reach amqps://localhost:{port}/"));
    assert!(line.contains("certificate verify failed"), "{line}");
    assert!(!line.contains("guest:guest"), "{line}");
    let mut p = connect(wrong.addr(), &ch);
    let mut q = connect(wrong.addr(), &ch);
    p.send(Message::text("local still")).unwrap();
    assert_eq!(recv(&mut q), Message::text("local still"));
}

/// A second real RabbitMQ node on this machine: its own node name, AMQP
/// and distribution ports, and directories (the rabbitmq user's, as the
/// Debian wrapper runs the server as that user). Stopped when dropped.
struct SecondNode {
    name: String,
    port: u16,
    _dir: tempfile::TempDir,
}

impl SecondNode {
    fn start() -> SecondNode {
        let (port, dist) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("plugins"), "[].\n").unwrap();
        std::fs::write(
            d.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(d)
            .status()
            .unwrap();
        assert!(owned.success());
        let name = format!("staps-test-{port}@localhost");
        let env = [
            ("RABBITMQ_NODENAME", name.clone()),
            ("RABBITMQ_DIST_PORT", dist.to_string()),
            (
                "RABBITMQ_CONFIG_FILE",
                d.join("rabbitmq.conf").display().to_string(),
            ),
            (
                "RABBITMQ_MNESIA_BASE",
                d.join("mnesia").display().to_string(),
            ),
            ("RABBITMQ_LOG_BASE", d.join("log").display().to_string()),
            ("RABBITMQ_PID_FILE", d.join("pid").display().to_string()),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                d.join("plugins").display().to_string(),
            ),
            (
                "RABBITMQ_FEATURE_FLAGS_FILE",
                d.join("feature_flags").display().to_string(),
            ),
        ];
        let started = Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(env)
            .status()
            .expect("rabbitmq-server runs");
        assert!(started.success(), "the second node did not start");
        wait_until("the second RabbitMQ node", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        SecondNode {
            name,
            port,
            _dir: dir,
        }
    }

    fn stop(&self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name, "stop"])
            .output();
    }
}

impl Drop for SecondNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Issue 28 with a second real broker node: the instances link through it
/// first, and when it stops (as a node taken down for maintenance closes
/// its connections) they move to the machine's broker and relay on.
#[test]
fn the_relay_moves_from_a_stopped_node_to_the_next() {
    let Some(_lock) = shared_broker("the_relay_moves_from_a_stopped_node") else {
        return;
    };
    for missing in [
        needs_root(),
        needs_program("rabbitmq-server", "rabbitmq-server"),
    ] {
        if skip("the_relay_moves_from_a_stopped_node", missing) {
            return;
        }
    }
    let node = SecondNode::start();
    let exchange = Exchange::new();
    let amqp = format!(
        "amqp://guest:guest@127.0.0.1:{}/ amqp://guest:guest@127.0.0.1:5672/",
        node.port
    );
    let b = format!("amqp://127.0.0.1:{}/", node.port);
    let mut one = instance_on(&exchange, &amqp, "", &[]);
    let mut two = instance_on(&exchange, &amqp, "", &[]);
    for staps in [&mut one, &mut two] {
        staps.wait_log(&format!("relay: connected to {b}, "));
    }
    let ch = channel();
    let mut x = connect(one.addr(), &ch);
    let mut y = connect(two.addr(), &ch);
    // Both bound on the second node: a message crosses there.
    let deadline = Instant::now() + DEADLINE;
    y.get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    loop {
        x.send(Message::text("probe")).unwrap();
        if let Ok(Message::Text(_)) = y.read() {
            break;
        }
        assert!(Instant::now() < deadline, "nothing crossed the second node");
    }
    y.get_mut().set_read_timeout(Some(DEADLINE)).unwrap();
    node.stop();
    for staps in [&mut one, &mut two] {
        staps.wait_log(&format!(
            "relay: node changed from {b} to amqp://127.0.0.1:5672/"
        ));
    }
    wait_bound(&exchange, &ch[1..], 2);
    x.send(Message::text("after the move")).unwrap();
    // Probes still on their way come first; then the message, once.
    loop {
        match recv(&mut y) {
            Message::Text(t) if t.as_str() == "probe" => {}
            m => {
                assert_eq!(m, Message::text("after the move"));
                break;
            }
        }
    }
    x.send(Message::text("next")).unwrap();
    assert_eq!(recv(&mut y), Message::text("next"));
}
