//! A channel member's connection, from its join on: a reader thread while
//! it talks, the event loop while it rests, a writer thread for a backlog.
//!
//! The way of a message: the sender's **reader** (`read_loop`) gets it whole
//! from tungstenite, encodes it once into a [`Frame`] and hands it to
//! [`Server::publish`], the one way a client's message goes out (an HTTP
//! publish takes it too): [`Channel::publish`] queues it for every other
//! member, and the relay takes it to other instances. Once the
//! reader has published what its last socket read brought (`ReadHalf`), it
//! sends to each idle receiver what it queued there, with one non-blocking
//! send; a receiver with a backlog has a **writer** thread that drains it
//! (`Peer::write_backlog`). Who may write to a socket when is the write lock
//! of `peer.rs`: pongs, pings and close frames take the same way, so frames
//! never interleave. Whoever joins the client writes the `101` answer
//! before anyone else may write: the event loop, without waiting
//! ([`welcome`]), or a reader thread for an upgrade that came behind a
//! kept-alive publish ([`converse`]). The reader sends its client's pings;
//! the loop sends those of a client resting there.
//!
//! An HTTP streaming listener (`?sse`, `?raw`) is a member the same way: it
//! gets the `200` head instead of the `101` and then only waits in the
//! event loop for the connection to end; its messages come in its wire
//! format (`wire.rs`) through the same queue and writer. A `POST` or `PUT`
//! is not a member: the HTTP server (`conn::http`) publishes its body and
//! waits for the connection's next request.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};
use uuid::Uuid;

use crate::conn::server::{self, Next, Reason, Resting, Server, Visit};
use crate::hub::channels::{Channel, JoinError};
use crate::hub::peer::{CLOSE_TIMEOUT, Close, Flushes, Hears, Launch, Peer};
use crate::memory::budget::BUDGET;
use crate::memory::stats;
use crate::os::logging::{Throttle, escape, fingerprint};
use crate::os::stream::{Stream, is_timeout};
use crate::proto::frame::{Frame, Kind};
use crate::proto::http::{self, respond};
use crate::proto::incoming::{Incoming, MinRate, Reframed, Refusal, Source};
use crate::proto::query::Options;
use crate::proto::twin::Access;
use crate::proto::wire::Wire;

/// What tungstenite reads from the socket at a time; it grows the buffer only
/// for a frame that needs it, so idle connections keep this much.
const READ_BUFFER: usize = 1024;

/// Why a client could not join.
enum Refused {
    /// Its address holds `max_connections_per_address` clients.
    Address,
    /// The registry said no.
    Join(JoinError),
}

/// Answer a client that could not join. Out of line, as the rare paths of
/// joining are: their frames would stay below every read of the
/// connection's life (see [`converse`] on stack pages).
#[cold]
#[inline(never)]
fn refuse_join(stream: &Stream, server: &Server, why: Refused, id: u64, path: &str, on: On) {
    server.refuse();
    let response = match why {
        Refused::Address => http::Response::error(503, "too many connections from your address")
            .with("Retry-After", "5"),
        Refused::Join(JoinError::ChannelFull) => {
            http::Response::error(503, "channel is full").with("Retry-After", "5")
        }
        Refused::Join(JoinError::ServerFull) => http::Response::error(503, "server is full"),
        Refused::Join(JoinError::ShuttingDown) => {
            http::Response::error(503, "server is shutting down")
        }
        Refused::Join(JoinError::MemoryFull) => {
            http::Response::error(503, "server memory budget reached").with("Retry-After", "5")
        }
    };
    log::debug!("client {id} refused on {}", escape(path));
    match on {
        On::Thread => respond(stream, &response),
        On::Loop => stream.refuse_now(&response.to_bytes()),
    }
}

/// The debug line of a join: the client's address and channel. Out of line
/// (see [`refuse_join`]).
#[cold]
#[inline(never)]
fn log_join(id: u64, from: Option<IpAddr>, path: &str, access: Access) {
    let who = from.map_or_else(|| "an unknown address".into(), |ip| ip.to_string());
    if access != Access::Full {
        // A twin URL is a secret too: only the channel's fingerprint.
        let how = if access.may_send() {
            "publish-only"
        } else {
            "read-only"
        };
        log::debug!(
            "client {id} from {who} joined channel {} {how}",
            fingerprint(path)
        );
    } else {
        log::debug!(
            "client {id} from {who} joined channel {} ({})",
            fingerprint(path),
            escape(path)
        );
    }
}

/// A client that has joined its channel, before its `101` is out. However
/// its thread ends, even by a panic, dropping it leaves the channel, so that
/// no client stays counted (against `max_connections`, or by a shutdown that
/// waits for every client to leave) after its thread is gone.
struct Joined {
    server: Arc<Server>,
    /// Shared by reader and writer: one descriptor per client.
    stream: Arc<Stream>,
    path: Arc<str>,
    /// What its URL allows: a message from a read-only twin's client
    /// closes it.
    access: Access,
    channel: Arc<Channel>,
    peer: Arc<Peer>,
    /// Bytes the client sent after its request head.
    rest: Vec<u8>,
    /// Its client address's place, and the address's part of the budget.
    visit: Option<Visit>,
    /// The client address, for the refusal counts.
    from: Option<IpAddr>,
}

/// A request to be in a channel, as the HTTP server (`conn::http`) took it.
pub(crate) struct Member {
    pub(crate) stream: Stream,
    /// The channel.
    pub(crate) path: String,
    /// What its URL allows (SPEC §12).
    pub(crate) access: Access,
    /// How its messages are sent.
    pub(crate) wire: Wire,
    /// What its query string asks for.
    pub(crate) options: Options,
    /// Its client address (`None` when it cannot be known).
    pub(crate) from: Option<IpAddr>,
    /// Bytes the client sent after its request head.
    pub(crate) rest: Vec<u8>,
    /// The answer that makes it a member: the `101`, or a listener's `200`.
    pub(crate) answer: Vec<u8>,
}

/// A member's life: join its channel, answer, then read and publish until
/// the client is silent or gone. Each step is a function of its own, called
/// from this shallow frame (see `conn::http::serve` on stack pages).
pub(crate) fn converse(mut member: Member, server: &Arc<Server>) {
    let answer = std::mem::take(&mut member.answer);
    let Some(mut conversation) = join(member, server, On::Thread) else {
        return;
    };
    if conversation.answer(server, &answer, On::Thread) {
        conversation.talk();
    }
}

/// A member's first steps on the event loop, which takes most of them:
/// join, answer without waiting, and give the conversation back to wait
/// there for its client's first bytes (or, a stream listener, for good).
/// `None` when it was refused or its client is gone.
///
/// A client that connects, sends a message and leaves then wakes a reader
/// thread once, for its message, instead of once for its handshake and
/// once for every read that waits (the churn of issue 25).
pub(crate) fn welcome(mut member: Member, server: &Arc<Server>) -> Option<Box<dyn Resting>> {
    let answer = std::mem::take(&mut member.answer);
    let mut conversation = join(member, server, On::Loop)?;
    let answered = conversation.answer(server, &answer, On::Loop);
    answered.then_some(conversation)
}

/// Where a member's first steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum On {
    /// A reader thread, which may wait on its client (up to the socket's
    /// write timeout).
    Thread,
    /// The event loop, which never waits: an answer goes out whole at once
    /// (a new connection's socket buffer is empty) or not at all.
    Loop,
}

/// Join the channel as `member` asks, or refuse with 503. Not inlined: see
/// [`converse`].
#[inline(never)]
fn join(member: Member, server: &Arc<Server>, on: On) -> Option<Box<Conversation>> {
    let Member {
        stream,
        path,
        access,
        wire,
        options,
        from,
        rest,
        answer: _,
    } = member;
    let id = server.next_id();
    let visit = match server.visit(from, true) {
        Ok(visit) => visit,
        Err(reason) => {
            server.refuse_for(reason, from);
            refuse_join(&stream, server, Refused::Address, id, &path, on);
            return None;
        }
    };
    let path: Arc<str> = path.into();
    // Streaming listeners never send: echo means nothing for them.
    let share = visit.as_ref().map(|v| Arc::clone(v.share()));
    let hears = match (access.may_listen(), options.echo) {
        (false, _) => Hears::Nobody,
        (true, true) => Hears::Everyone,
        (true, false) => Hears::Others,
    };
    let peer = Peer::new(id, hears, wire, share);
    let channel = match server
        .registry()
        .join(&path, &peer, from, &options, server.limits())
    {
        Ok(channel) => channel,
        Err(e) => {
            refuse_join(&stream, server, Refused::Join(e), id, &path, on);
            return None;
        }
    };
    if log::log_enabled!(log::Level::Debug) {
        log_join(id, from, &path, access);
    }
    stats::add(&server.stats().connections_total, 1);
    // On the heap: the frame of `converse`, below every read and send of the
    // connection's life, holds it (a stack page per idle connection).
    Some(Box::new(Conversation {
        joined: Joined {
            server: Arc::clone(server),
            stream: Arc::new(stream),
            path,
            access,
            channel,
            peer,
            rest,
            visit,
            from,
        },
        reader: None,
        sender: None,
        keepalive: None,
        closing: None,
    }))
}

impl Joined {
    /// Leave the channel (again: a no-op); the last client to leave gives
    /// memory back.
    fn leave(&self) {
        if self
            .server
            .registry()
            .leave(&self.path, &self.channel, &self.peer)
        {
            server::release_free_memory();
        }
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        // After a normal end the first two are no-ops; after a panic they
        // end the writer, free the client's place and let a shutdown stop
        // waiting.
        self.peer.close(Close::ABORT);
        self.leave();
        log::debug!(
            "client {} left channel {}: {:?}",
            self.peer.id,
            fingerprint(&self.path),
            self.peer.close_reason()
        );
        self.peer.reader_finished();
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// How long a talking websocket client may be silent before its reader
/// gives its thread back and the connection waits in the event loop: long
/// enough that a client sending every 50 ms keeps its thread (taking it
/// back costs two wake-ups), short enough that a crowd of idle clients
/// holds only the threads of those who spoke in the last quarter second.
///
/// A client is talking once two of its messages came within this of each
/// other; until then (and after a message that came later than this) its
/// reader goes back as soon as the socket is empty. A new client waits in
/// the loop from its `101` on, as a stream listener, which has nothing to
/// say, from its `200`.
pub(crate) const PARK_AFTER: Duration = Duration::from_millis(250);

/// How a client that stopped answering pings is closed.
const PING_TIMEOUT: Close = Close::with(1001, "ping timeout");

/// A member's connection from its `101` (or `200`) on: what its reader
/// thread works with, and what waits in the event loop while the client is
/// silent ([`PARK_AFTER`]). On the heap, and moved between the two.
struct Conversation {
    joined: Joined,
    /// A websocket client's reading side; `None` for a stream listener.
    reader: Option<Client>,
    /// Other instances learn who sent a message (0.1.x's correlation_id).
    sender: Option<Uuid>,
    /// When a stream listener's next keepalive (its wire's ping) is due.
    keepalive: Option<Instant>,
    /// Its close is out and the client's end of the connection is awaited
    /// in the event loop, at most until then.
    closing: Option<Instant>,
}

/// What a reader's tungstenite reads from.
type Client = Reframed<ReadHalf>;

impl Conversation {
    /// Send the `101` (or a listener's `200`) answer, then let others write
    /// to the client ([`Peer::ready`]); false if the client is gone already.
    ///
    /// Whoever joined writes the answer, as the reader writes every other
    /// HTTP answer: until the peer is ready nobody else writes, so nothing
    /// can interleave with it.
    #[inline(never)]
    fn answer(&mut self, server: &Arc<Server>, handshake: &[u8], on: On) -> bool {
        let Joined { stream, peer, .. } = &self.joined;
        let sent = match on {
            On::Thread => stream.send_all(handshake),
            On::Loop => stream.send_whole_now(handshake),
        };
        if let Err(e) = sent {
            log::debug!("client {}: cannot answer: {e}", peer.id);
            peer.never_ready();
            return false;
        }
        let writers = Arc::clone(server.writers());
        let ping = server.limits().ping_interval;
        // A client that takes nothing for as long as the ping timeout is gone.
        let stall = if ping.is_zero() {
            Duration::from_secs(60)
        } else {
            2 * ping
        };
        let launch: Launch = Box::new(move |peer: Arc<Peer>| {
            let started = writers.run(move || peer.write_backlog(stall));
            if let Err(e) = &started {
                static THROTTLE: Throttle = Throttle::new();
                if THROTTLE.ready() {
                    log::warn!("cannot start a writer thread (once a minute at most): {e}");
                }
            }
            started
        });
        peer.ready(Arc::clone(stream), launch);
        if peer.wire == Wire::WebSocket {
            self.reader = Some(open(&mut self.joined, server));
            self.sender = server.relay().map(|_| Uuid::new_v4());
        } else if peer.wire.ping().is_some() && !ping.is_zero() {
            self.keepalive = Some(Instant::now() + ping);
        }
        true
    }

    /// Read and publish until the client is silent, then wait in the event
    /// loop; or until the connection ends. A stream listener has nothing to
    /// say: it goes to the loop at once.
    fn talk(mut self: Box<Self>) {
        let server = Arc::clone(&self.joined.server);
        match read_loop(&mut self, &server) {
            None => server.rest(self),
            Some(close) => self.end(close, &server),
        }
    }

    /// The connection ends with `close`: leave the channel now; with a
    /// close frame, the client's answer is awaited in the event loop (read
    /// and dropped), at most [`CLOSE_TIMEOUT`] and a second.
    ///
    /// When the client closed first and the answer is out, the closing
    /// handshake is complete: nothing is awaited, and the server closes the
    /// connection first, as RFC 6455 (7.1.1) asks, so that the TIME_WAIT is
    /// the server's and the client may reconnect at once. That saves the
    /// event loop a connection to watch for every client that says goodbye.
    fn end(mut self: Box<Self>, close: Close, server: &Server) {
        let peer = &self.joined.peer;
        peer.close(close);
        let reason = peer.close_reason();
        let complete = reason.is_some_and(|c| c.answers) && peer.is_done();
        if !complete && reason.is_some_and(|c| c.send) {
            self.wait_for_end(Instant::now());
            server.rest(self);
        }
        // Otherwise dropped here: Joined's drop leaves the channel and cuts
        // the connection.
    }

    /// Its close is out: leave the channel now, and from now on await only
    /// the client's end of the connection.
    ///
    /// In a shutdown it stays counted until then, or until the client's
    /// answer ([`Resting::ready`]): the shutdown waits for the close
    /// handshakes (SPEC §6), up to [`CLOSE_TIMEOUT`], and drops it with the
    /// rest once that is over.
    fn wait_for_end(&mut self, now: Instant) -> Next {
        if !self.joined.server.is_stopping() {
            self.joined.leave();
        }
        let deadline = now + CLOSE_TIMEOUT + Duration::from_secs(1);
        self.closing = Some(deadline);
        // Its buffers and its part of a message go back now.
        self.reader = None;
        Next::Wait(Some(deadline))
    }
}

impl Resting for Conversation {
    fn stream(&self) -> &Stream {
        &self.joined.stream
    }

    fn tick(&mut self, now: Instant) -> Next {
        if let Some(deadline) = self.closing {
            return if now >= deadline {
                Next::Over
            } else {
                Next::Wait(Some(deadline))
            };
        }
        let Joined { server, peer, .. } = &self.joined;
        if peer.is_closing() {
            // Closed while it waited here (shutdown, a slow consumer).
            return self.wait_for_end(now);
        }
        let ping = server.limits().ping_interval;
        let Some(reader) = &mut self.reader else {
            // A stream listener: its keepalive also lets its writer see a
            // listener that is gone.
            if let (Some(due), Some(frame)) = (self.keepalive, peer.wire.ping()) {
                if now >= due {
                    let mut flushes = Flushes::new(false);
                    peer.send_control(frame, server.limits(), &mut flushes);
                    self.keepalive = Some(now + ping);
                }
            }
            return Next::Wait(self.keepalive);
        };
        if !self.joined.rest.is_empty() {
            // Its first bytes came with its request head: read them now.
            return Next::Resume;
        }
        let half = &mut reader.inner;
        let Some(silent_until) = half.silent_until() else {
            return Next::Wait(None);
        };
        if now >= silent_until {
            peer.close(PING_TIMEOUT);
            return self.wait_for_end(now);
        }
        half.catch_up();
        Next::Wait(Some(
            half.ping_due
                .map_or(silent_until, |due| due.min(silent_until)),
        ))
    }

    fn ready(&mut self, now: Instant) -> Next {
        let closing = self.closing.is_some() || self.joined.peer.is_closing();
        if !closing && self.reader.is_some() {
            // A client that left without a word (most do) is seen off here:
            // waking a reader only to read the end would cost two switches.
            return match self.joined.stream.has_ended() {
                Ok(false) => Next::Resume,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tick(now),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Next::Resume,
                // The end, or a failed connection: as a reader would.
                _ => Next::Over,
            };
        }
        // What a listener or a closing client sends is read and dropped
        // here; a flood is taken a bounded bite at a time. In a shutdown,
        // a client past its close frame answers it: the handshake is
        // complete, and the server closes first (RFC 6455 7.1.1). A message
        // it sent before it saw the close may come first and end it early;
        // that costs the client a clean end, never the shutdown a wait.
        let answered = closing && self.joined.server.is_stopping();
        let mut sink = [0u8; 1024];
        for _ in 0..64 {
            match self.joined.stream.read_ready(&mut sink) {
                Ok(0) => return Next::Over,
                Ok(_) if answered => return Next::Over,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Next::Over,
            }
        }
        self.tick(now)
    }

    fn resume(mut self: Box<Self>) {
        if let Some(reader) = &mut self.reader {
            // What woke it may be a pong or a ping only: then it waits in
            // the loop again at its first read that finds nothing.
            reader.inner.park_now = true;
        }
        self.talk();
    }
}

/// The reader's half of the socket, under [`Reframed`].
struct ReadHalf {
    stream: Arc<Stream>,
    peer: Arc<Peer>,
    server: Arc<Server>,
    last_rx: Instant,
    /// Receivers owed a send of what this reader has queued for them.
    flushes: Flushes,
    /// Messages published and reads done since those were last sent.
    deferred: usize,
    /// The last read filled the buffer: more has probably arrived.
    full: bool,
    /// When the client's next ping is due.
    ping_due: Option<Instant>,
    /// The ping interval.
    ping: Duration,
    /// The socket's read timeout now: the ping interval, shortened while a
    /// ping nears or while a large message is in progress; `None` until the
    /// reader first waits.
    timeout: Option<Duration>,
    /// How often a large message in progress is looked at (`handshake_timeout`).
    stall: Duration,
    /// The read timeout is `stall` for a large message in progress.
    watching: bool,
    /// The first read that finds nothing sends the connection back to the
    /// event loop: it was taken from there and no message came since, or
    /// its last message came [`PARK_AFTER`] or more after the one before.
    park_now: bool,
    /// When the last message's last bytes were read.
    last_message: Option<Instant>,
}

/// Messages a reader publishes (or reads it does) at most before it sends
/// to the receivers it owes.
///
/// A publisher whose client sends faster than one read takes goes on with
/// what is already in the socket before sending to the receivers, so that
/// each receiver gets all of it with one send (or its writer, one wake-up):
/// at fan-out, system calls and wake-ups per message were most of the cost,
/// and the gain flattens past 128 (figures: BENCHMARKS.md, "Measurements
/// behind the constants"). This bounds the delay it adds to a receiver's
/// first message: the fan-out of 128 messages. Reads count too, so that a
/// large frame streaming in behind a message does not hold back the sends
/// until the frame is whole. A client that sends one message at a time
/// leaves the socket empty after each, so its messages are not delayed at
/// all.
const FLUSH_AFTER: usize = 128;

impl ReadHalf {
    /// Publish `frame`, a message of `client` (known to other instances as
    /// `sender`); it is sent with the messages before it, at the latest
    /// with the [`FLUSH_AFTER`]th.
    fn publish(&mut self, client: &Joined, sender: Option<Uuid>, frame: &Frame, server: &Server) {
        let Joined {
            path,
            channel,
            peer,
            ..
        } = client;
        server.publish(
            Some(channel),
            path,
            peer.id,
            sender,
            frame,
            &mut self.flushes,
        );
        self.deferred += 1;
        // A client waits on this thread only once it has shown that it
        // talks faster than PARK_AFTER: after a lone message (its first, or
        // one after a silence) the thread goes back at once, instead of
        // waiting a quarter second to learn that the client is silent, or
        // to read its end (a client that connects, says one thing and
        // leaves).
        let at = self.last_rx;
        self.park_now = self
            .last_message
            .is_none_or(|last| at.duration_since(last) >= PARK_AFTER);
        self.last_message = Some(at);
    }

    /// When the client, silent since its last byte, counts as gone: two
    /// ping intervals on (`None` with pings off), on a thread or resting.
    fn silent_until(&self) -> Option<Instant> {
        (!self.ping.is_zero()).then(|| self.last_rx + 2 * self.ping)
    }

    /// Whether the sends owed must go out before the next read: after
    /// [`FLUSH_AFTER`] messages or reads, or a writer's batch for one peer.
    fn is_due(&self) -> bool {
        self.deferred >= FLUSH_AFTER || self.flushes.is_due()
    }

    /// Whether the reader owes a send (to receivers, or its client's ping)
    /// before it may wait for its client.
    fn owes(&self) -> bool {
        self.is_due()
            || !self.flushes.is_empty()
            || self.ping_due.is_some_and(|due| Instant::now() >= due)
    }

    /// Send what is owed: to the receivers, and the client's ping if due.
    ///
    /// The read loop calls this between calls of [`read_events`], from its
    /// own shallow frame, never from inside tungstenite's read (which
    /// [`ReadHalf::read`] leaves with `WouldBlock` instead): the deepest
    /// moment of a reader's life sets how many stack pages stay resident
    /// while its connection is idle, and sending from down there kept a page
    /// more per connection (BENCHMARKS.md, "Measurements behind the
    /// constants"). The event loop calls it for the ping of a client that
    /// waits there.
    #[inline(never)]
    fn catch_up(&mut self) {
        if let Some(due) = self.ping_due {
            let now = Instant::now();
            if now >= due {
                let limits = &self.server.limits();
                self.peer
                    .send_control(Frame::ping(), limits, &mut self.flushes);
                self.ping_due = Some(now + self.ping);
            }
        }
        self.flushes.flush();
        self.deferred = 0;
    }

    /// Before a blocking read: its timeout is shortened only when the read
    /// could otherwise end over an eighth of an interval past the next
    /// ping, to the time left, so that a busy connection sets it at most
    /// eight times an interval rather than before every read. A timeout
    /// shorter than needed costs only a wake-up; it goes back to the usual
    /// one once the ping is out.
    fn time_the_wait(&mut self) {
        let Some(due) = self.ping_due else {
            return;
        };
        let left = due.saturating_duration_since(Instant::now());
        let latest = left + self.ping / 8;
        let usual = self.read_timeout();
        if self.timeout.is_none_or(|t| t > latest) {
            self.set_timeout(Some(left.max(Duration::from_millis(1))));
        } else if self.timeout != usual
            && left >= self.ping - self.ping / 8
            && usual.is_some_and(|t| t <= latest)
        {
            self.set_timeout(usual);
        }
    }

    /// Set the socket's read timeout, if it is not that already.
    fn set_timeout(&mut self, timeout: Option<Duration>) {
        if timeout != self.timeout {
            self.timeout = timeout;
            let _ = self.stream.set_read_timeout(timeout);
        }
    }

    /// The timeout of a blocking read: [`PARK_AFTER`] (or the ping interval,
    /// if shorter), or `stall` while a large message is in progress, so
    /// that its stalling is seen in time.
    fn read_timeout(&self) -> Option<Duration> {
        let wait = if self.watching {
            self.stall
        } else {
            PARK_AFTER
        };
        if self.ping.is_zero() {
            Some(wait)
        } else {
            Some(wait.min(self.ping))
        }
    }
}

impl Source for ReadHalf {
    fn watch(&mut self, large: bool) {
        if large != self.watching {
            self.watching = large;
            self.set_timeout(self.read_timeout());
        }
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.is_due() {
            // Reads count too, so that a large frame streaming in does not
            // hold back what was published before it until it is whole.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let ready = if self.full || self.park_now {
            self.stream.read_ready(buf)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        };
        let n = match ready {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if self.owes() || self.park_now {
                    // About to wait for the client: the read loop sends
                    // what is owed first, and reads again, or lets the
                    // event loop wait.
                    return Err(e);
                }
                if self.timeout.is_none() {
                    // Set at its first wait: most clients never make the
                    // reader wait (they send one message, or none).
                    self.set_timeout(self.read_timeout());
                }
                self.time_the_wait();
                (&mut &*self.stream).read(buf)?
            }
            ready => {
                self.deferred += 1;
                ready?
            }
        };
        self.full = n == buf.len();
        if n > 0 {
            self.last_rx = Instant::now();
        }
        Ok(n)
    }
}

/// The client's reading side; the bytes that came with its request head
/// (`rest`) are rewritten as reads would have been, for its first
/// websocket.
#[inline(never)]
fn open(client: &mut Joined, server: &Arc<Server>) -> Client {
    let limits = server.limits();
    let ping = limits.ping_interval;
    let now = Instant::now();
    let half = ReadHalf {
        stream: Arc::clone(&client.stream),
        peer: Arc::clone(&client.peer),
        server: Arc::clone(server),
        last_rx: now,
        flushes: Flushes::new(true),
        deferred: 0,
        full: false,
        ping_due: (!ping.is_zero()).then(|| now + ping),
        ping,
        timeout: None,
        stall: limits.handshake_timeout,
        watching: false,
        park_now: false,
        last_message: None,
    };
    let share = client.visit.as_ref().map(|v| Arc::clone(v.share()));
    let mut incoming = Box::new(Incoming::new(
        limits.max_message_size,
        MinRate::of(limits),
        &BUDGET,
        share,
        !client.access.may_send(),
    ));
    // Bytes that came with the request head are the first tungstenite reads;
    // a refusal shows at the first read.
    incoming.take_rest(&mut client.rest, now);
    Reframed {
        incoming,
        inner: half,
    }
}

/// Read messages and publish them until the client is silent (`None`: the
/// connection waits in the event loop) or the connection ends (how).
fn read_loop(conversation: &mut Conversation, server: &Server) -> Option<Close> {
    let Conversation {
        joined,
        reader: Some(reader),
        sender,
        ..
    } = conversation
    else {
        return None;
    };
    let limits = server.limits();
    let rest = std::mem::take(&mut joined.rest);
    let mut ws = websocket(reader, rest, limits.max_message_size);
    // The sends the reader owes go out from here, between calls of
    // `read_events`, whose frame (tungstenite's read inlined) is the deep
    // one: sending from inside it kept a third stack page per connection.
    loop {
        match read_events(&mut ws, joined, server, *sender) {
            Step::CatchUp => ws.get_mut().inner.catch_up(),
            Step::Rebuild => {
                // tungstenite's buffer grew to a large message and is empty
                // now: start over with a small one.
                ws = websocket(ws.into_inner(), Vec::new(), limits.max_message_size);
            }
            Step::Park => return None,
            Step::End(close) => return Some(close),
        }
    }
}

/// Why [`read_events`] returned.
enum Step {
    /// The reader owes sends before it may wait for its client.
    CatchUp,
    /// tungstenite's read buffer should start small again.
    Rebuild,
    /// The client is silent between messages: the connection waits in the
    /// event loop (tungstenite holds nothing of it then).
    Park,
    /// The connection ends so.
    End(Close),
}

/// Read and publish until the reader owes sends, its websocket wants
/// rebuilding, the client is silent, or the connection ends.
#[inline(never)]
fn read_events(
    ws: &mut WebSocket<&mut Client>,
    client: &Joined,
    server: &Server,
    sender: Option<Uuid>,
) -> Step {
    let peer = &client.peer;
    let limits = server.limits();
    loop {
        let event = next_event(ws.read(), peer.id);
        if peer.is_closing() {
            // Closed by someone else (shutdown, slow consumer): the close
            // frame is on its way; whatever arrived now is not published.
            return Step::End(Close::ABORT);
        }
        let Reframed { incoming, inner } = &mut **ws.get_mut();
        // Pings keep a connection alive, not a half-sent message: timed here
        // when the client is silent or sends only pings, and by the reads
        // of a trickle.
        if incoming.too_slow(Instant::now()) {
            return Step::End(refused(Refusal::Slow, client, server));
        }
        let frame = match event {
            Event::Message(frame) => frame,
            Event::Ping(pong) => {
                peer.send_control(pong, limits, &mut inner.flushes);
                continue;
            }
            Event::Nothing => continue,
            Event::Quiet => {
                if inner.silent_until().is_some_and(|t| Instant::now() >= t) {
                    return Step::End(PING_TIMEOUT);
                }
                if inner.owes() {
                    return Step::CatchUp;
                }
                if incoming.at_rest() {
                    return Step::Park;
                }
                // Within a message: the rest is awaited on this thread,
                // timed by `min_rate`.
                inner.park_now = false;
                return Step::CatchUp;
            }
            Event::End(close) => {
                return Step::End(match incoming.refusal() {
                    Some(refusal) => refused(refusal, client, server),
                    None => close,
                });
            }
        };
        let rebuild = incoming.clean_end();
        inner.publish(client, sender, &frame, server);
        if rebuild {
            return Step::Rebuild;
        }
        if inner.is_due() {
            return Step::CatchUp;
        }
    }
}

/// How a client whose message was refused is closed. Out of line, as the
/// rest of the read loop's rare paths: see [`converse`] on stack pages.
#[cold]
#[inline(never)]
fn refused(refusal: Refusal, client: &Joined, server: &Server) -> Close {
    log::debug!("client {}: message refused: {refusal:?}", client.peer.id);
    match refusal {
        Refusal::Budget => {
            BUDGET.refuse("large messages are refused with 1009");
            Close::with(1009, "server memory budget reached")
        }
        Refusal::Address => {
            server.refuse_for(Reason::AddressMemory, client.from);
            Close::with(1009, "address memory share reached")
        }
        Refusal::ReadOnly => Close::with(1008, "read-only URL"),
        Refusal::Slow => {
            server.refuse_for(Reason::Rate, client.from);
            Close::with(1008, "message slower than min_rate")
        }
        Refusal::Protocol => Close::with(1002, "protocol error"),
    }
}

/// The server side of a websocket over `stream`, whose first bytes `rest`
/// were read with the request head, with staps' buffer and size limits.
/// Not inlined: its temporaries would stay in the read loop's frame, below
/// every send the reader makes.
#[inline(never)]
pub fn websocket<S: Read + Write>(
    stream: S,
    rest: Vec<u8>,
    max_message_size: usize,
) -> WebSocket<S> {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size));
    WebSocket::from_partially_read(stream, rest, Role::Server, Some(config))
}

/// What the reader does with the result of one read.
#[derive(Debug)]
pub enum Event {
    /// A message, encoded for the channel.
    Message(Frame),
    /// A ping: queue this pong.
    Ping(Frame),
    /// Nothing to do (a pong, an interrupted read).
    Nothing,
    /// The read timed out: time to check the client's liveness.
    Quiet,
    /// The connection ends: tell the client this.
    End(Close),
}

/// Turn what tungstenite read into what the reader does; `id` names the
/// client in debug logs.
pub fn next_event(read: tungstenite::Result<Message>, id: u64) -> Event {
    match read {
        Ok(Message::Text(text)) => Event::Message(Frame::message(Kind::Text, text.as_bytes())),
        Ok(Message::Binary(data)) => Event::Message(Frame::message(Kind::Binary, &data)),
        Ok(Message::Ping(data)) => Event::Ping(Frame::pong(&data)),
        Ok(Message::Pong(_) | Message::Frame(_)) => Event::Nothing,
        // Echo the client's status code, as RFC 6455 suggests.
        Ok(Message::Close(frame)) => Event::End(Close::answer(frame.map_or(0, |f| f.code.into()))),
        Err(WsError::Io(e)) if is_timeout(&e) => Event::Quiet,
        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => Event::Nothing,
        Err(e) => Event::End(close_for(&e, id)),
    }
}

/// The close code for a failed read: RFC 6455 section 7.4.1.
fn close_for(e: &WsError, id: u64) -> Close {
    use tungstenite::error::ProtocolError as P;
    let close = match e {
        WsError::Capacity(_) => Close::with(1009, "message too big"),
        WsError::Utf8(_) => Close::with(1007, "invalid UTF-8"),
        WsError::Protocol(P::ResetWithoutClosingHandshake)
        | WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Io(_) => Close::ABORT,
        WsError::Protocol(_) => Close::with(1002, "protocol error"),
        _ => Close::with(1011, "internal error"),
    };
    if close.send {
        log::debug!("client {id}: {e}");
    }
    close
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A reader thread that panics must not leave its client registered.
    #[test]
    fn a_panicking_reader_leaves_its_channel() {
        let settings = crate::config::Settings::default();
        let twins = crate::proto::twin::Twins::new([0; crate::proto::twin::SECRET_LEN]);
        let server = Arc::new(Server::new(settings, None, twins));
        let (a, _b) = UnixStream::pair().unwrap();
        let member = Member {
            stream: Stream::Unix(a),
            path: "/p".into(),
            access: Access::Full,
            wire: Wire::WebSocket,
            options: Options::default(),
            from: None,
            rest: Vec::new(),
            answer: Vec::new(),
        };
        let joined = join(member, &server, On::Thread).expect("joined");
        assert_eq!(server.registry().counts(), (1, 1));
        let peer = Arc::clone(&joined.joined.peer);
        let died = std::thread::spawn(move || {
            let _joined = joined;
            panic!("a bug in the read loop");
        })
        .join();
        assert!(died.is_err());
        assert_eq!(server.registry().counts(), (0, 0));
        assert!(peer.is_closing());
    }
}
