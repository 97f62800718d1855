//! The AMQP relay: links instances through a broker so that a channel spans
//! machines, wire-compatible with staps 0.1.x.
//!
//! One thread per instance owns the broker connection (amiquip, blocking). It
//! selects over three queues: messages local clients published (bounded; when
//! it is full or the broker is away they are counted as dropped, and local
//! delivery never waits), bind/unbind commands from the registry (in registry
//! order, so the broker's bindings follow the local channels), and deliveries
//! from the broker. The wire format is 0.1.x's: a non-durable, non-auto-delete
//! `direct` exchange; routing key = channel path without its leading slash;
//! body = payload; `correlation_id` = the sending client's UUID. staps adds
//! `app_id` (this instance, whose own messages come back and are ignored) and
//! `content_type`, so text and binary survive the trip.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Channel as AmqpChannel, Connection, ConnectionTuning, ConsumerMessage,
    ConsumerOptions, Delivery, ExchangeDeclareOptions, ExchangeType, FieldTable, Publish,
    QueueDeclareOptions,
};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError, select};
use uuid::Uuid;

use crate::channels::{Frame, Kind};
use crate::config::redact_url;
use crate::server::Server;
use crate::stats;

const TEXT: &str = "text/plain; charset=utf-8";
const BINARY: &str = "application/octet-stream";

/// First and longest wait between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Unacknowledged deliveries the broker may send ahead: with acknowledgements
/// (in batches) this bounds what waits in memory for the relay thread.
const PREFETCH: u16 = 1000;

/// Acknowledge at least every this many deliveries.
const ACK_BATCH: usize = 100;

/// Heartbeat (seconds) and connection timeout (milliseconds) unless the URL says.
const DEFAULT_HEARTBEAT: u32 = 30;
const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 10_000;

/// A message a local client published, on its way to the broker.
struct Outbound {
    path: Arc<str>,
    kind: Kind,
    payload: Bytes,
    sender: Uuid,
}

/// What the registry tells the relay. Sent while the registry is locked, so
/// the order of binds and unbinds is the order of the channels' lives.
#[derive(Debug)]
pub enum Control {
    /// The first local client joined channel `path`.
    Bind(Arc<str>),
    /// The last local client left channel `path`.
    Unbind(Arc<str>),
}

/// The relay's state, as the counters show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Not connected: connecting or waiting to retry.
    Down = 1,
    /// Connected, bindings in place.
    Up = 2,
}

/// The handle the rest of staps holds: where to send what goes to the broker.
pub struct Relay {
    outbound: Sender<Outbound>,
    control: Sender<Control>,
    state: AtomicU8,
    /// This instance's id, sent as `app_id`.
    pub instance: Uuid,
}

/// The relay thread's ends of the queues, until it starts.
pub struct Ends {
    outbound: Receiver<Outbound>,
    control: Receiver<Control>,
}

impl Relay {
    /// A relay handle and the ends its thread will read; `queue_length` bounds
    /// the messages waiting for the broker, as it bounds each receiver's.
    pub fn new(queue_length: usize) -> (Relay, Ends) {
        let (outbound_tx, outbound_rx) = crossbeam_channel::bounded(queue_length);
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let relay = Relay {
            outbound: outbound_tx,
            control: control_tx,
            state: AtomicU8::new(State::Down as u8),
            instance: Uuid::new_v4(),
        };
        (
            relay,
            Ends {
                outbound: outbound_rx,
                control: control_rx,
            },
        )
    }

    /// The queue for binds and unbinds, for the registry.
    pub fn control(&self) -> Sender<Control> {
        self.control.clone()
    }

    /// Hand a message from local client `sender` on `path` to the broker. Never
    /// waits: when the relay is down or behind, the message is counted as dropped.
    pub fn publish(&self, path: &Arc<str>, frame: &Frame, sender: Uuid, stats: &stats::Stats) {
        if self.state() != State::Up {
            stats::add(&stats.relay_dropped, 1);
            return;
        }
        let message = Outbound {
            path: Arc::clone(path),
            kind: frame.kind(),
            payload: frame.payload(),
            sender,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.outbound.try_send(message)
        {
            stats::add(&stats.relay_dropped, 1);
        }
    }

    /// Whether the broker is connected.
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            2 => State::Up,
            _ => State::Down,
        }
    }

    fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::Relaxed);
    }
}

/// Start the relay thread for `url`.
pub fn spawn(url: String, ends: Ends, server: Arc<Server>) -> std::io::Result<()> {
    thread::Builder::new()
        .name("staps-relay".into())
        .spawn(move || run(&url, &ends, &server))
        .map(drop)
}

/// `url` with the heartbeat and connection timeout staps wants unless it names them.
fn tuned_url(url: &str) -> String {
    let mut url = url.to_owned();
    for (key, value) in [
        ("heartbeat", DEFAULT_HEARTBEAT),
        ("connection_timeout", DEFAULT_CONNECT_TIMEOUT_MS),
    ] {
        let query = url.split_once('?').map_or("", |(_, q)| q);
        if !query.split('&').any(|kv| kv.split('=').next() == Some(key)) {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("{key}={value}"));
        }
    }
    url
}

/// Check an AMQP URL without connecting: `amqp[s]://[user[:pass]@]host[:port][/vhost][?k=v&...]`.
pub fn check_url(url: &str) -> Result<(), String> {
    let form = "expected amqp://user:pass@host:port/vhost";
    let rest = if let Some(rest) = url.strip_prefix("amqp://") {
        rest
    } else if let Some(rest) = url.strip_prefix("amqps://") {
        if !cfg!(feature = "tls") {
            return Err("amqps:// needs staps built with the cargo feature 'tls'".into());
        }
        rest
    } else {
        return Err(format!("not an AMQP URL; {form}"));
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = match host_port.rsplit_once(':') {
        Some((_, port)) if !host_port.ends_with(']') => Some(port),
        _ => None,
    };
    if let Some(port) = port {
        port.parse::<u16>()
            .map_err(|_| format!("port '{port}' is not a number; {form}"))?;
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "heartbeat" | "connection_timeout" | "channel_max" => {
                value
                    .parse::<u32>()
                    .map_err(|_| format!("query parameter {key}={value} is not a number"))?;
            }
            "auth_mechanism" if value == "external" => {}
            _ => {
                return Err(format!(
                    "unsupported query parameter '{pair}' (heartbeat, connection_timeout, channel_max, auth_mechanism=external)"
                ));
            }
        }
    }
    Ok(())
}

fn open(url: &str) -> amiquip::Result<Connection> {
    #[cfg(feature = "tls")]
    if url.starts_with("amqps://") {
        return Connection::open_tuned(url, ConnectionTuning::default());
    }
    Connection::insecure_open_tuned(url, ConnectionTuning::default())
}

/// The relay thread: connect, serve, and reconnect with backoff, forever.
fn run(url: &str, ends: &Ends, server: &Server) {
    let Some(relay) = server.relay.as_ref() else {
        return;
    };
    let shown = redact_url(url);
    let url = tuned_url(url);
    let mut bound: HashSet<Arc<str>> = HashSet::new();
    let mut backoff = BACKOFF_MIN;
    let mut attempt: u64 = 0;
    let mut ever_connected = false;
    let mut failing_logged = false;
    loop {
        attempt += 1;
        log::debug!("relay: connecting to {shown} (attempt {attempt})");
        // Commands that came while we were away still shape what to bind.
        drain_control(&ends.control, &mut bound);
        let mut was_up = false;
        let result = open(&url).and_then(|mut connection| {
            let session = Session::start(&mut connection, server, relay, &bound)?;
            relay.set_state(State::Up);
            was_up = true;
            if ever_connected {
                stats::add(&server.stats.relay_reconnects, 1);
            }
            ever_connected = true;
            failing_logged = false;
            backoff = BACKOFF_MIN;
            log::info!(
                "relay: connected to {shown}, {} channel(s) bound",
                bound.len()
            );
            session.serve(ends, &mut bound)
        });
        relay.set_state(State::Down);
        let reason = match result {
            Ok(()) => "the broker closed the connection".to_owned(),
            Err(e) => e.to_string(),
        };
        if was_up || !failing_logged {
            log::warn!(
                "relay: {} {shown}: {reason}; local delivery goes on, retrying with backoff up to {}s",
                if was_up { "lost" } else { "cannot reach" },
                BACKOFF_MAX.as_secs()
            );
            failing_logged = true;
        } else {
            log::debug!("relay: attempt {attempt} failed: {reason}");
        }
        // Wait out the backoff, still consuming what clients publish (dropped)
        // and what the registry says (remembered).
        let until = Instant::now() + backoff;
        loop {
            select! {
                recv(ends.outbound) -> _ => stats::add(&server.stats.relay_dropped, 1),
                recv(ends.control) -> cmd => {
                    if let Ok(cmd) = cmd {
                        apply(&mut bound, cmd);
                    }
                }
                default(until.saturating_duration_since(Instant::now())) => break,
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn apply(bound: &mut HashSet<Arc<str>>, cmd: Control) {
    match cmd {
        Control::Bind(path) => bound.insert(path),
        Control::Unbind(path) => bound.remove(&path),
    };
}

fn drain_control(control: &Receiver<Control>, bound: &mut HashSet<Arc<str>>) {
    while let Ok(cmd) = control.try_recv() {
        apply(bound, cmd);
    }
}

/// The routing key of a channel: its path without the leading slash (0.1.x).
fn routing_key(path: &str) -> &str {
    path.strip_prefix('/').unwrap_or(path)
}

/// One connection's worth of relaying.
struct Session<'c> {
    channel: AmqpChannel,
    queue: String,
    server: &'c Server,
    exchange: String,
    /// This instance's id as the `app_id` it sends and ignores.
    instance: String,
}

impl<'c> Session<'c> {
    /// Declare the exchange and our queue, and bind every live channel.
    fn start(
        connection: &mut Connection,
        server: &'c Server,
        relay: &'c Relay,
        bound: &HashSet<Arc<str>>,
    ) -> amiquip::Result<Session<'c>> {
        let channel = connection.open_channel(None)?;
        let exchange = server.settings.exchange.clone();
        // Exactly as 0.1.x declares it, or the broker refuses one of the two.
        channel.exchange_declare(
            ExchangeType::Direct,
            exchange.as_str(),
            ExchangeDeclareOptions::default(),
        )?;
        let queue = channel.queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        )?;
        let queue = queue.name().to_owned();
        channel.qos(0, PREFETCH, false)?;
        for path in bound {
            channel.queue_bind(
                queue.as_str(),
                exchange.as_str(),
                routing_key(path),
                FieldTable::default(),
            )?;
        }
        Ok(Session {
            channel,
            queue,
            server,
            exchange,
            instance: relay.instance.to_string(),
        })
    }

    /// Relay until the connection fails.
    fn serve(self, ends: &Ends, bound: &mut HashSet<Arc<str>>) -> amiquip::Result<()> {
        let consumer = self.channel.basic_consume(
            self.queue.as_str(),
            ConsumerOptions {
                exclusive: true,
                ..ConsumerOptions::default()
            },
        )?;
        let deliveries = consumer.receiver();
        let mut unacked: Option<Delivery> = None;
        let mut since_ack = 0;
        loop {
            select! {
                recv(ends.outbound) -> message => {
                    if let Ok(message) = message {
                        self.publish(message)?;
                    }
                }
                recv(ends.control) -> cmd => {
                    if let Ok(cmd) = cmd {
                        self.bind(&cmd)?;
                        apply(bound, cmd);
                    }
                }
                recv(deliveries) -> message => match message {
                    Ok(ConsumerMessage::Delivery(delivery)) => {
                        self.deliver(&delivery);
                        unacked = Some(delivery);
                        since_ack += 1;
                    }
                    // The consumer was cancelled or the connection died.
                    Ok(_) | Err(_) => return Ok(()),
                },
            }
            // Acknowledge in batches: once the broker's burst is handled.
            if since_ack >= ACK_BATCH || (since_ack > 0 && deliveries.is_empty()) {
                if let Some(delivery) = unacked.take() {
                    consumer.ack_multiple(delivery)?;
                }
                since_ack = 0;
            }
        }
    }

    fn publish(&self, message: Outbound) -> amiquip::Result<()> {
        let content_type = match message.kind {
            Kind::Text => TEXT,
            Kind::Binary => BINARY,
        };
        let properties = AmqpProperties::default()
            .with_correlation_id(message.sender.to_string())
            .with_app_id(self.instance.clone())
            .with_content_type(content_type.to_owned());
        self.channel.basic_publish(
            self.exchange.as_str(),
            Publish::with_properties(&message.payload, routing_key(&message.path), properties),
        )?;
        stats::add(&self.server.stats.relay_published, 1);
        Ok(())
    }

    fn bind(&self, cmd: &Control) -> amiquip::Result<()> {
        match cmd {
            Control::Bind(path) => self.channel.queue_bind(
                self.queue.as_str(),
                self.exchange.as_str(),
                routing_key(path),
                FieldTable::default(),
            ),
            Control::Unbind(path) => self.channel.queue_unbind(
                self.queue.as_str(),
                self.exchange.as_str(),
                routing_key(path),
                FieldTable::default(),
            ),
        }
    }

    /// A message from the broker: to every local client of its channel, unless
    /// this instance sent it (it was delivered locally already).
    fn deliver(&self, delivery: &Delivery) {
        let properties = &delivery.properties;
        if properties.app_id().as_deref() == Some(self.instance.as_str()) {
            return;
        }
        let kind = kind_of(properties.content_type().as_deref(), &delivery.body);
        let path = format!("/{}", delivery.routing_key);
        stats::add(&self.server.stats.relay_received, 1);
        if let Some(channel) = self.server.registry.get(&path) {
            let frame = Frame::message(kind, &delivery.body);
            // No local client sent it: every local member receives it.
            channel.publish(0, &frame, &self.server.settings.limits, &self.server.stats);
        }
    }
}

/// Text or binary: by `content_type` when staps sent it; otherwise (0.1.x or
/// any plain AMQP publisher) text when the body is UTF-8. A text frame must be
/// UTF-8, so a body that is not goes out as binary whatever it claims.
fn kind_of(content_type: Option<&str>, body: &[u8]) -> Kind {
    let utf8 = std::str::from_utf8(body).is_ok();
    match content_type {
        Some(BINARY) => Kind::Binary,
        _ if utf8 => Kind::Text,
        _ => Kind::Binary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_heartbeat_and_timeout_unless_they_say() {
        assert_eq!(
            tuned_url("amqp://h/"),
            "amqp://h/?heartbeat=30&connection_timeout=10000"
        );
        assert_eq!(
            tuned_url("amqp://h/v?heartbeat=5"),
            "amqp://h/v?heartbeat=5&connection_timeout=10000"
        );
    }

    #[test]
    fn url_checks() {
        assert!(check_url("amqp://staps:@localhost/").is_ok());
        assert!(check_url("amqp://u:p@[::1]:5672/vh?heartbeat=10").is_ok());
        assert!(check_url("amqp://h:notaport/").is_err());
        assert!(check_url("amqp://h/?frobnicate=1").is_err());
        assert!(check_url("http://h/").is_err());
    }

    #[test]
    fn kinds_survive_and_0_1_x_bodies_are_guessed() {
        assert_eq!(kind_of(Some(TEXT), b"hi"), Kind::Text);
        assert_eq!(kind_of(Some(BINARY), b"hi"), Kind::Binary);
        assert_eq!(kind_of(None, "héllo".as_bytes()), Kind::Text);
        assert_eq!(kind_of(None, &[0xff, 0xfe]), Kind::Binary);
        assert_eq!(kind_of(Some(TEXT), &[0xff]), Kind::Binary);
    }

    #[test]
    fn routing_keys_drop_the_leading_slash() {
        assert_eq!(routing_key("/abc/def"), "abc/def");
    }
}
