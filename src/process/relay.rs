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
use std::thread;
use std::time::{Duration, Instant};

use std::net::ToSocketAddrs;

use amiquip::{
    AmqpProperties, Auth, Channel as AmqpChannel, Connection, ConnectionOptions, ConnectionTuning,
    ConsumerMessage, ConsumerOptions, Delivery, ExchangeDeclareOptions, ExchangeType, FieldTable,
    Publish, QueueDeclareOptions,
};
use crossbeam_channel::{Receiver, select};

use crate::config::amqp_url::{BrokerUrl, Credentials};
use crate::conn::server::Server;
use crate::hub::channels::Control;
use crate::hub::link::{Ends, Link, Outbound};
use crate::hub::peer::Flushes;
use crate::memory::stats;
use crate::proto::frame::{Frame, Kind};

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

/// Start the relay thread for a broker of `nodes`, tried in order.
pub(crate) fn spawn(nodes: Vec<Broker>, ends: Ends, server: Arc<Server>) -> std::io::Result<()> {
    thread::Builder::new()
        .name("staps-relay".into())
        .spawn(move || run(&nodes, &ends, &server))
        .map(drop)
}

/// Where and how to reach the broker: an `amqp[s]://` URL read as amiquip
/// reads it, so that staps can open the TCP connection itself. amiquip leaves
/// Nagle's algorithm on, and small publishes then wait for delayed ACKs
/// (40 ms each) from the broker.
#[derive(Clone, Debug)]
pub(crate) struct Broker {
    /// Its URL without credentials, for logs and the metrics.
    node: String,
    tls: bool,
    host: String,
    port: u16,
    timeout: Duration,
    options: ConnectionOptions<Auth>,
}

impl Broker {
    /// The broker `url` names, with amiquip's connection options.
    pub(crate) fn new(url: BrokerUrl) -> Broker {
        let node = url.node();
        let mut options = ConnectionOptions::<Auth>::default()
            .heartbeat(url.heartbeat)
            .connection_timeout(Some(url.connect_timeout));
        options = match url.credentials {
            Credentials::Guest => options,
            Credentials::Plain { username, password } => {
                options.auth(Auth::Plain { username, password })
            }
            Credentials::External => options.auth(Auth::External),
        };
        if let Some(vhost) = url.vhost {
            options = options.virtual_host(vhost);
        }
        if let Some(channel_max) = url.channel_max {
            options = options.channel_max(channel_max);
        }
        Broker {
            node,
            tls: url.tls,
            host: url.host,
            port: url.port,
            timeout: url.connect_timeout,
            options,
        }
    }

    /// Its URL without credentials.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// Connect: TCP with TCP_NODELAY, then AMQP (over TLS for amqps).
    fn open(&self) -> Result<Connection, String> {
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?;
        let mut last = format!("{} has no address", self.host);
        for addr in addrs {
            let stream = match std::net::TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(stream) => stream,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            let opened = stream
                .set_nodelay(true)
                .and_then(|()| stream.set_nonblocking(true))
                .and_then(|()| mio::net::TcpStream::from_stream(stream))
                .map_err(|e| e.to_string())
                .and_then(|stream| self.handshake(stream).map_err(|e| e.to_string()));
            match opened {
                Ok(connection) => return Ok(connection),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }

    fn handshake(&self, stream: mio::net::TcpStream) -> amiquip::Result<Connection> {
        let tuning = ConnectionTuning::default();
        #[cfg(feature = "tls")]
        if self.tls {
            let connector = native_tls::TlsConnector::new()
                .map_err(|e| amiquip::Error::CreateTlsConnector { source: e })?;
            return Connection::open_tls_stream(
                connector,
                &self.host,
                stream,
                self.options.clone(),
                tuning,
            );
        }
        debug_assert!(
            !self.tls,
            "amqps without the tls feature is refused by parse"
        );
        Connection::insecure_open_stream(stream, self.options.clone(), tuning)
    }
}

/// The relay thread, forever: connect to the first node that answers,
/// serve, and when the link is lost try the nodes again in order, waiting
/// out a backoff between rounds that reach none.
fn run(nodes: &[Broker], ends: &Ends, server: &Server) {
    let Some(relay) = server.relay() else {
        return;
    };
    let mut bound: HashSet<Arc<str>> = HashSet::new();
    let mut backoff = BACKOFF_MIN;
    let mut round: u64 = 0;
    // The node of the last connection, to say when it changes.
    let mut last: Option<usize> = None;
    let mut failing_logged = false;
    loop {
        round += 1;
        let mut failures = Vec::new();
        for (at, node) in nodes.iter().enumerate() {
            log::debug!("relay: connecting to {} (attempt {round})", node.node);
            // Commands that came while we were away still shape what to bind.
            drain_control(&ends.control, &mut bound);
            let mut was_up = false;
            let result = node.open().and_then(|mut connection| {
                let session = Session::start(&mut connection, server, relay, &bound)
                    .map_err(|e| e.to_string())?;
                relay.set_node(Some(at));
                was_up = true;
                if let Some(before) = last {
                    stats::add(&server.stats().relay_reconnects, 1);
                    if before != at {
                        log::info!(
                            "relay: node changed from {} to {}",
                            nodes[before].node,
                            node.node
                        );
                    }
                }
                last = Some(at);
                failing_logged = false;
                backoff = BACKOFF_MIN;
                log::info!(
                    "relay: connected to {}, {} channel(s) bound",
                    node.node,
                    bound.len()
                );
                session.serve(ends, &mut bound).map_err(|e| e.to_string())
            });
            relay.set_node(None);
            let reason = match result {
                Ok(()) => "the broker closed the connection".to_owned(),
                Err(e) => e,
            };
            if was_up {
                log::warn!(
                    "relay: lost {}: {reason}; local delivery goes on, trying the broker's nodes again",
                    node.node
                );
                failures.clear();
                break;
            }
            log::debug!("relay: attempt {round} at {} failed: {reason}", node.node);
            failures.push(format!("{}: {reason}", node.node));
        }
        if !failures.is_empty() && !failing_logged {
            log::warn!(
                "relay: cannot reach {}; local delivery goes on, retrying with backoff up to {}s",
                failures.join("; "),
                BACKOFF_MAX.as_secs()
            );
            failing_logged = true;
        }
        // Wait out the backoff, still consuming what clients publish (dropped)
        // and what the registry says (remembered).
        let until = Instant::now() + backoff;
        loop {
            select! {
                recv(ends.outbound) -> _ => stats::add(&server.stats().relay_dropped, 1),
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
        relay: &'c Link,
        bound: &HashSet<Arc<str>>,
    ) -> amiquip::Result<Session<'c>> {
        let channel = connection.open_channel(None)?;
        let exchange = server.settings().exchange.clone();
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
        // What a burst from the broker queued for idle clients goes out
        // with one send per client, once the burst is handled. The relay
        // serves every channel: it never waits for one client's room.
        let mut flushes = Flushes::new(false);
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
                        self.deliver(&delivery, &mut flushes);
                        unacked = Some(delivery);
                        since_ack += 1;
                    }
                    // The consumer was cancelled or the connection died.
                    Ok(_) | Err(_) => return Ok(()),
                },
            }
            // Acknowledge in batches: once the broker's burst is handled.
            if flushes.is_due() {
                flushes.flush();
            }
            if since_ack >= ACK_BATCH || (since_ack > 0 && deliveries.is_empty()) {
                flushes.flush();
                if let Some(delivery) = unacked.take() {
                    consumer.ack_multiple(delivery)?;
                }
                since_ack = 0;
            }
        }
    }

    fn publish(&self, message: Outbound) -> amiquip::Result<()> {
        let content_type = match message.frame.kind() {
            Kind::Text => TEXT,
            Kind::Binary => BINARY,
        };
        let properties = AmqpProperties::default()
            .with_correlation_id(message.sender.to_string())
            .with_app_id(self.instance.clone())
            .with_content_type(content_type.to_owned());
        self.channel.basic_publish(
            self.exchange.as_str(),
            Publish::with_properties(
                message.frame.payload(),
                routing_key(&message.path),
                properties,
            ),
        )?;
        stats::add(&self.server.stats().relay_published, 1);
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
    fn deliver(&self, delivery: &Delivery, flushes: &mut Flushes) {
        let properties = &delivery.properties;
        if properties.app_id().as_deref() == Some(self.instance.as_str()) {
            return;
        }
        if delivery.body.len() > self.server.limits().max_message_size {
            // Another instance, or any AMQP publisher, may send more than
            // this one lets its clients send: never pass it on or keep it.
            stats::add(&self.server.stats().oversize_dropped, 1);
            log::debug!(
                "dropped a {} byte message from the broker: over max_message_size",
                delivery.body.len()
            );
            return;
        }
        let kind = kind_of(properties.content_type().as_deref(), &delivery.body);
        let path = format!("/{}", delivery.routing_key);
        stats::add(&self.server.stats().relay_received, 1);
        if let Some(channel) = self.server.registry().get(&path) {
            let frame = Frame::message(kind, &delivery.body);
            // No local client sent it: every local member receives it.
            channel.publish(
                0,
                &frame,
                self.server.limits(),
                self.server.stats(),
                flushes,
            );
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

    fn broker(text: &str) -> Broker {
        Broker::new(BrokerUrl::parse(text).unwrap())
    }

    #[test]
    fn urls_become_amiquip_options() {
        let b =
            broker("amqp://staps:s%40cret@[::1]:5673/v%2fh?heartbeat=5&connection_timeout=2500");
        assert_eq!((b.host.as_str(), b.port, b.tls), ("::1", 5673, false));
        assert_eq!(b.timeout, Duration::from_millis(2500));
        let expected = ConnectionOptions::<Auth>::default()
            .heartbeat(5)
            .connection_timeout(Some(Duration::from_millis(2500)))
            .auth(Auth::Plain {
                username: "staps".into(),
                password: "s@cret".into(),
            })
            .virtual_host("v/h");
        assert_eq!(format!("{:?}", b.options), format!("{expected:?}"));
        let d = broker("amqp://h/");
        let defaults = ConnectionOptions::<Auth>::default()
            .heartbeat(30)
            .connection_timeout(Some(Duration::from_secs(10)));
        assert_eq!(format!("{:?}", d.options), format!("{defaults:?}"));
        assert_eq!(d.port, 5672);
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
