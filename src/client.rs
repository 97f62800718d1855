//! One connection: the handshake, then a reader thread and a writer thread.
//!
//! The way of a message: the sender's **reader** (`read_loop`) gets it whole
//! from tungstenite, encodes it once into a [`Frame`] and hands it to
//! [`Channel::publish`], which queues it for every other member; writers that
//! sleep are woken once the reader has published what its last socket read
//! brought (`ReadHalf`). Each member's **writer** (`write_loop`) drains
//! its queue and writes the batch with one vectored write. The writer owns
//! every websocket frame written to the socket: pongs and close frames that
//! the reader decides on go through the same queue, so frames can never
//! interleave. The reader writes only the `101` answer, before the writer
//! exists; the writer starts when there is first something to write.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};
use uuid::Uuid;

use crate::budget::BUDGET;
use crate::channels::{Channel, JoinError};
use crate::frame::{Frame, Kind};
use crate::http::{self, HeadError, Options, Route, respond};
use crate::incoming::Incoming;
use crate::logging::{Throttle, escape, fingerprint};
use crate::peer::{Close, Launch, Out, Peer, Wakes};
use crate::server::{self, CLOSE_TIMEOUT, Handshake, Server, Slot};
use crate::stats;
use crate::stream::{Stream, is_timeout};

/// A new connection sends its first byte within this (or handshake_timeout,
/// if shorter): a client sends its request right after connecting, and a
/// socket that stays silent only holds a place among the handshakes.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);

/// What tungstenite reads from the socket at a time; it grows the buffer only
/// for a frame that needs it, so idle connections keep this much.
const READ_BUFFER: usize = 1024;

/// Serve one accepted connection from its handshake to its end.
///
/// Three steps in functions of their own, each called from this shallow frame:
/// the deepest moment of a reader thread's life sets how many stack pages
/// stay resident for as long as its connection is idle; in one frame they
/// would keep a page more per connection (figures: BENCHMARKS.md, "Measurements behind the constants").
pub fn serve(stream: Stream, server: Arc<Server>, slot: Slot, place: Handshake) {
    let handshaken = handshake(stream, &server);
    drop(place);
    let Some((joined, writer)) = handshaken else {
        return;
    };
    let ping = server.settings.limits.ping_interval;
    // Pings are due from the handshake on, whenever the writer starts.
    let first_ping = (!ping.is_zero()).then(|| Instant::now() + ping);
    if joined.answer(&server, slot, writer, first_ping) {
        joined.run(&server, first_ping);
    }
}

/// Read the request and answer it; for a websocket upgrade, join its channel.
#[inline(never)]
fn handshake(stream: Stream, server: &Arc<Server>) -> Option<(Joined, WriterStart)> {
    let limits = &server.settings.limits;
    let now = Instant::now();
    let deadline = now + limits.handshake_timeout;
    let first_byte = now + limits.handshake_timeout.min(FIRST_BYTE_TIMEOUT);
    // A client that does not read its answer must not hold the thread forever.
    let _ = stream.set_write_timeout(Some(limits.handshake_timeout));
    let (request, rest) = match http::read_head(&stream, first_byte, deadline) {
        Ok(head) => head,
        Err(e) => {
            let response = match e {
                HeadError::TooLarge => http::Response::error(431, "request head too large"),
                HeadError::Malformed(why) => {
                    http::Response::error(400, &format!("malformed request: {why}"))
                }
                HeadError::Closed | HeadError::TimedOut => {
                    log::debug!("connection closed before a complete request: {e:?}");
                    return None;
                }
            };
            server.refuse();
            respond(&stream, &response);
            return None;
        }
    };
    match http::route(&request, &server.settings) {
        Route::Respond(response) => {
            if response.status >= 400 {
                server.refuse();
            }
            respond(&stream, &response);
            None
        }
        Route::Stats { path, head_only } => {
            let clients = server.registry.get(&path).map_or(0, |c| c.clients());
            respond(&stream, &http::stats_response(clients, head_only));
            None
        }
        Route::Upgrade {
            path,
            accept,
            options,
        } => join(stream, server, path, accept, options, rest),
    }
}

/// A client that has joined its channel, before its writer starts. However
/// its thread ends, even by a panic, dropping it leaves the channel, so that
/// no client stays counted (against `max_connections`, or by a shutdown that
/// waits for every client to leave) after its thread is gone.
struct Joined {
    server: Arc<Server>,
    /// Shared by reader and writer: one descriptor per client.
    stream: Arc<Stream>,
    path: Arc<str>,
    channel: Arc<Channel>,
    peer: Arc<Peer>,
    /// Bytes the client sent after its request head.
    rest: Vec<u8>,
}

/// What the reader needs to let a writer start: the `101` answer to send
/// first and the client's queue for the writer.
struct WriterStart {
    queue: Receiver<Out>,
    handshake: Vec<u8>,
}

/// Join the channel at `path`, or refuse with 503. Returns the client and
/// what its writer starts with.
fn join(
    stream: Stream,
    server: &Arc<Server>,
    path: String,
    accept: String,
    options: Options,
    rest: Vec<u8>,
) -> Option<(Joined, WriterStart)> {
    let id = server.next_id();
    let path: Arc<str> = path.into();
    let (peer, queue) = Peer::new(id, options.echo);
    let channel = match server
        .registry
        .join(&path, &peer, &options, &server.settings.limits)
    {
        Ok(channel) => channel,
        Err(e) => {
            server.refuse();
            let response = match e {
                JoinError::ChannelFull => {
                    http::Response::error(503, "channel is full").with("Retry-After", "5")
                }
                JoinError::ServerFull => http::Response::error(503, "server is full"),
                JoinError::ShuttingDown => http::Response::error(503, "server is shutting down"),
                JoinError::MemoryFull => http::Response::error(503, "server memory budget reached")
                    .with("Retry-After", "5"),
            };
            log::debug!("client {id} refused on {}: {e:?}", escape(&path));
            respond(&stream, &response);
            return None;
        }
    };
    log::debug!(
        "client {id} joined channel {} ({})",
        fingerprint(&path),
        escape(&path)
    );
    stats::add(&server.stats.connections_total, 1);
    let joined = Joined {
        server: Arc::clone(server),
        stream: Arc::new(stream),
        path,
        channel,
        peer,
        rest,
    };
    let writer = WriterStart {
        queue,
        handshake: http::switching_protocols(&accept),
    };
    Some((joined, writer))
}

impl Joined {
    /// Send the `101` answer, then let the writer start when there is first
    /// something to write ([`Peer`]); false if the client is gone already.
    ///
    /// The reader writes the answer, as it writes every other HTTP answer:
    /// no writer exists yet, so nothing can interleave with it, and every
    /// websocket frame still goes through the writer.
    #[inline(never)]
    fn answer(
        &self,
        server: &Arc<Server>,
        slot: Slot,
        writer: WriterStart,
        first_ping: Option<Instant>,
    ) -> bool {
        let WriterStart { queue, handshake } = writer;
        if let Err(e) = self.stream.send_all(&handshake) {
            log::debug!("client {}: cannot answer: {e}", self.peer.id);
            return false;
        }
        let out = Arc::clone(&self.stream);
        let server = Arc::clone(server);
        // Weak: the peer holds this until it runs.
        let peer = Arc::downgrade(&self.peer);
        self.peer.ready_to_launch(Launch::new(move || {
            let Some(peer) = peer.upgrade() else {
                return;
            };
            let (cut, failed) = (Arc::clone(&out), Arc::clone(&peer));
            let writers = Arc::clone(&server.writers);
            let started = writers.run(move || {
                let _slot = slot;
                write_loop(out, &queue, &peer, first_ping, &server);
            });
            if let Err(e) = started {
                // Past the 101 no answer is possible: cut the connection, which
                // ends the reader.
                static THROTTLE: Throttle = Throttle::new();
                if THROTTLE.ready() {
                    log::warn!("cannot start a writer thread (once a minute at most): {e}");
                }
                failed.close(Close::ABORT);
                let _ = cut.shutdown(Shutdown::Both);
            }
        }));
        true
    }

    /// Leave the channel (again: a no-op); the last client to leave gives
    /// memory back.
    fn leave(&self) {
        if self
            .server
            .registry
            .leave(&self.path, &self.channel, &self.peer)
        {
            server::release_free_memory();
        }
    }

    /// Read and publish until the connection ends, then leave the channel.
    #[inline(never)]
    fn run(mut self, server: &Server, first_ping: Option<Instant>) {
        let rest = std::mem::take(&mut self.rest);
        let (close, stream) = read_loop(&self, rest, server, first_ping);
        // A failed connection gets no close frame: a writer that has not
        // started need not start for it.
        let unwritten = !close.send && self.peer.forgo_writer();
        self.peer.close(close);
        self.leave();
        log::debug!(
            "client {} left channel {}: {close:?}",
            self.peer.id,
            fingerprint(&self.path)
        );
        if unwritten {
            let _ = stream.shutdown(Shutdown::Both);
        } else {
            // Read what is left until the client closes (it has our close frame, or
            // the connection failed) or the writer cuts it after CLOSE_TIMEOUT.
            stream.drain(Instant::now() + CLOSE_TIMEOUT + Duration::from_secs(1));
        }
        self.peer.reader_finished();
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        // After a normal end these are no-ops; after a panic they end the
        // writer, free the client's place and let a shutdown stop waiting.
        self.peer.close(Close::ABORT);
        self.leave();
        self.peer.reader_finished();
    }
}

/// The reader's half of the socket. tungstenite wants to write pongs itself;
/// staps queues them for the writer instead, so writes here go nowhere.
struct ReadHalf {
    stream: Arc<Stream>,
    peer: Arc<Peer>,
    last_rx: Instant,
    /// Receivers' writers owed a wake-up by what this reader has published.
    wakes: Wakes,
    /// Messages published and reads done since those writers were last woken.
    deferred: usize,
    /// The last read filled the buffer: more has probably arrived.
    full: bool,
    /// The first ping, while the writer has not started.
    writer_due: Option<Instant>,
    /// The ping interval, the read timeout (shortened while the first ping
    /// nears, or while a large message is in progress).
    ping: Duration,
    shortened: bool,
    /// What the client has sent of a message not complete yet. On the heap:
    /// the reader's stack stays within two resident pages.
    incoming: Box<Incoming>,
    /// How long a large message may go without progress (`handshake_timeout`).
    stall: Duration,
    /// The read timeout is `stall` for a large message in progress.
    watching: bool,
}

/// Messages a reader publishes (or reads it does) at most before it wakes the
/// writers it owes.
///
/// A publisher whose client sends faster than one read takes goes on with
/// what is already in the socket before waking the receivers' writers, so
/// that each writer wakes once for all of it and writes it at once: at
/// fan-out, wake-ups (the publisher's futex calls, the writers' context
/// switches) and one small write per wake-up were most of the cost, and the
/// gain flattens past 128 (figures: BENCHMARKS.md, "Measurements behind the constants"). This bounds the delay it adds to a
/// receiver's first message: the fan-out of 128 messages. Reads count too, so that a large
/// frame streaming in behind a message does not hold back its wake-ups until
/// the frame is whole. A client that sends one message at a time leaves the
/// socket empty after each, so its messages are not delayed at all.
const WAKE_AFTER: usize = 128;

impl ReadHalf {
    /// Publish `frame` to `channel` for client `from`; the writers it owes a
    /// wake-up are woken with those of the messages before it, at the latest
    /// with the [`WAKE_AFTER`]th.
    fn publish(&mut self, channel: &Channel, from: u64, frame: &Frame, server: &Server) {
        let limits = &server.settings.limits;
        channel.publish(from, frame, limits, &server.stats, &mut self.wakes);
        self.defer();
    }

    /// One more message or read since the writers were woken.
    fn defer(&mut self) {
        self.deferred += 1;
        if self.deferred >= WAKE_AFTER {
            self.wake_writers();
        }
    }

    fn wake_writers(&mut self) {
        self.wakes.flush();
        self.deferred = 0;
    }

    /// A writer that has not started still starts in time for the client's
    /// first ping: the reader, which always runs, sees to it before it
    /// waits. The timeout of that wait is shortened only when it would
    /// otherwise end over an eighth of an interval past the first ping, so
    /// that short connections pay no extra system call.
    fn start_writer_when_due(&mut self) {
        let Some(due) = self.writer_due else {
            return;
        };
        let now = Instant::now();
        if now >= due || self.peer.writer_started() {
            self.peer.start_writer();
            self.writer_due = None;
            if self.shortened {
                let _ = self.stream.set_read_timeout(self.read_timeout());
            }
        } else if due - now < self.ping - self.ping / 8 {
            let _ = self.stream.set_read_timeout(Some(due - now));
            self.shortened = true;
        }
    }

    /// The timeout of a blocking read: the ping interval, or `stall` while a
    /// large message is in progress, so that its stalling is seen in time.
    fn read_timeout(&self) -> Option<Duration> {
        match (self.watching, self.ping.is_zero()) {
            (true, true) => Some(self.stall),
            (true, false) => Some(self.stall.min(self.ping)),
            (false, true) => None,
            (false, false) => Some(self.ping),
        }
    }

    /// Follow what was read; refuse a message the memory budget cannot take.
    fn follow(&mut self, bytes: &[u8], now: Instant) -> io::Result<()> {
        if !self.incoming.follow(bytes, now) {
            return Err(refused());
        }
        if self.incoming.in_large_message() != self.watching {
            self.watching = !self.watching;
            let _ = self.stream.set_read_timeout(self.read_timeout());
        }
        Ok(())
    }
}

/// The read error of a message the memory budget refused; the read loop
/// answers it with 1009.
fn refused() -> io::Error {
    io::Error::other("memory budget reached")
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.incoming.refused() {
            return Err(refused());
        }
        let limit = self.incoming.read_limit(buf.len());
        let buf = &mut buf[..limit];
        let ready = if self.full {
            self.stream.read_ready(buf)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        };
        let n = match ready {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // About to wait for the client: wake the writers first.
                self.wake_writers();
                self.start_writer_when_due();
                (&mut &*self.stream).read(buf)?
            }
            ready => {
                let n = ready?;
                self.defer();
                n
            }
        };
        self.full = n == buf.len();
        if n > 0 {
            self.last_rx = Instant::now();
            self.follow(&buf[..n], self.last_rx)?;
        }
        Ok(n)
    }
}

impl Write for ReadHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Read messages and publish them until the connection ends; returns how it
/// ends, and the socket for the last reads.
fn read_loop(
    client: &Joined,
    rest: Vec<u8>,
    server: &Server,
    first_ping: Option<Instant>,
) -> (Close, Arc<Stream>) {
    let Joined {
        stream,
        path,
        channel,
        peer,
        ..
    } = client;
    let limits = &server.settings.limits;
    let ping = limits.ping_interval;
    let _ = stream.set_read_timeout((!ping.is_zero()).then_some(ping));
    let mut half = ReadHalf {
        stream: Arc::clone(stream),
        peer: Arc::clone(peer),
        last_rx: Instant::now(),
        wakes: Wakes::default(),
        deferred: 0,
        full: false,
        writer_due: first_ping,
        ping,
        shortened: false,
        incoming: Box::new(Incoming::new(limits.max_message_size, &BUDGET)),
        stall: limits.handshake_timeout,
        watching: false,
    };
    // Bytes that came with the request head are the first tungstenite reads;
    // a refusal shows at the first read.
    let _ = half.follow(&rest, half.last_rx);
    let mut ws = websocket(half, rest, limits.max_message_size);
    // Other instances learn who sent a message (0.1.x's correlation_id).
    let sender = server.relay.as_ref().map(|_| Uuid::new_v4());
    let close = loop {
        let event = next_event(ws.read(), peer.id);
        if peer.is_closing() {
            // Closed by someone else (shutdown, slow consumer): the writer has sent
            // the close frame; whatever arrived now is not published.
            break Close::ABORT;
        }
        let incoming = &ws.get_ref().incoming;
        if incoming.stalled(limits.handshake_timeout) {
            // Trickled pings keep a connection alive, not a half-sent message.
            log::debug!("client {}: message stalled", peer.id);
            break Close::with(1008, "message stalled");
        }
        let frame = match event {
            Event::Message(frame) => {
                if incoming.clean_end() {
                    // tungstenite's buffer grew to the message and is empty
                    // now: start over with a small one.
                    ws = websocket(ws.into_inner(), Vec::new(), limits.max_message_size);
                }
                frame
            }
            Event::Ping(pong) => {
                peer.send_control(pong, limits);
                continue;
            }
            Event::Nothing => continue,
            Event::Quiet => {
                if ws.get_ref().last_rx.elapsed() >= 2 * ping {
                    break Close::with(1001, "ping timeout");
                }
                continue;
            }
            Event::End(_) if incoming.refused() => {
                BUDGET.refuse("large messages are refused with 1009");
                break Close::with(1009, "server memory budget reached");
            }
            Event::End(close) => break close,
        };
        stats::add(&server.stats.messages_in, 1);
        stats::add(&server.stats.bytes_in, frame.payload().len() as u64);
        ws.get_mut().publish(channel, peer.id, &frame, server);
        if let (Some(relay), Some(sender)) = (&server.relay, sender) {
            relay.publish(path, &frame, sender, &server.stats);
        }
    };
    (close, ws.into_inner().stream)
}

/// The server side of a websocket over `stream`, whose first bytes `rest`
/// were read with the request head, with staps' buffer and size limits.
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
        Ok(Message::Close(frame)) => {
            Event::End(Close::with(frame.map_or(0, |f| f.code.into()), ""))
        }
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

/// Write everything queued, in batches, with a ping when one is due, until the
/// connection closes; then the close frame, and cut the connection when the
/// reader is done or after [`CLOSE_TIMEOUT`].
fn write_loop(
    out: Arc<Stream>,
    queue: &Receiver<Out>,
    peer: &Peer,
    first_ping: Option<Instant>,
    server: &Server,
) {
    peer.attach_writer();
    let ping = server.settings.limits.ping_interval;
    // A client that takes nothing for as long as the ping timeout is gone.
    let stall = if ping.is_zero() {
        Duration::from_secs(60)
    } else {
        2 * ping
    };
    // Writes wake this often to see whether the client closed meanwhile.
    let _ = out.set_write_timeout(Some(CLOSE_TIMEOUT.min(stall)));
    let result = write_batches(&out, queue, peer, ping, first_ping, stall);
    let close = match result {
        Ok(()) => peer.close_reason().unwrap_or(Close::ABORT),
        Err(e) => {
            log::debug!("client {}: write failed: {e}", peer.id);
            peer.close(Close::ABORT);
            Close::ABORT
        }
    };
    if close.send {
        let _ = out.set_write_timeout(Some(CLOSE_TIMEOUT));
        if out
            .send_all(Frame::close(close.code, close.reason).as_bytes())
            .is_ok()
        {
            let _ = out.shutdown(Shutdown::Write);
            peer.wait_for_reader(CLOSE_TIMEOUT);
        }
    }
    let _ = out.shutdown(Shutdown::Both);
}

/// Drain the queue into the socket until the peer is closing.
fn write_batches(
    out: &Stream,
    queue: &Receiver<Out>,
    peer: &Peer,
    ping: Duration,
    first_ping: Option<Instant>,
    stall: Duration,
) -> io::Result<()> {
    let mut next_ping = first_ping;
    let mut batch = Batch::default();
    loop {
        match peer.next(queue, next_ping) {
            Ok(Out::Frame(frame)) => batch.push(frame),
            Ok(Out::Wake) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        while !batch.is_full() {
            match queue.try_recv() {
                Ok(Out::Frame(frame)) => batch.push(frame),
                Ok(Out::Wake) => {}
                Err(_) => break,
            }
        }
        peer.taken(batch.size);
        if let Some(at) = next_ping {
            let now = Instant::now();
            if now >= at {
                batch.push(Frame::ping());
                next_ping = Some(now + ping);
            }
        }
        if peer.is_closing() {
            return Ok(());
        }
        batch.write(out, stall, || peer.is_closing())?;
        if queue.is_empty() {
            // About to sleep: an idle connection keeps no buffer.
            batch = Batch::default();
        }
    }
}

/// Frames up to this size are copied into the batch's buffer: the kernel
/// copies one segment faster than many small ones (figures: BENCHMARKS.md, "Measurements behind the constants").
const COPY_MAX: usize = 512;

/// Bytes gathered for one write at most.
const BATCH_BYTES: usize = 64 * 1024;

/// Larger frames gathered for one write at most, each written from where it
/// is (shared by all receivers) rather than copied.
const BATCH_LARGE: usize = 32;

/// What the writer sends with its next vectored write: small frames copied
/// into one buffer, larger ones by reference, in queue order.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// Each large frame, after `bytes[..at]`.
    large: Vec<(usize, Frame)>,
    size: usize,
}

impl Batch {
    fn push(&mut self, frame: Frame) {
        let data = frame.as_bytes();
        self.size += data.len();
        if data.len() <= COPY_MAX {
            // A page to start with rather than growing from a few bytes.
            if self.bytes.capacity() == 0 {
                self.bytes.reserve_exact(4096);
            }
            self.bytes.extend_from_slice(data);
        } else {
            self.large.push((self.bytes.len(), frame));
        }
    }

    fn is_full(&self) -> bool {
        self.size >= BATCH_BYTES || self.large.len() >= BATCH_LARGE
    }

    /// Write it all and empty it, keeping its buffers; see
    /// [`Stream::write_all_vectored`] for `stall` and `closing`.
    fn write(
        &mut self,
        out: &Stream,
        stall: Duration,
        closing: impl Fn() -> bool,
    ) -> io::Result<()> {
        if self.size == 0 {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); 2 * BATCH_LARGE + 1];
        let mut n = 0;
        let mut from = 0;
        for (at, frame) in &self.large {
            if *at > from {
                slices[n] = IoSlice::new(&self.bytes[from..*at]);
                n += 1;
            }
            slices[n] = IoSlice::new(frame.as_bytes());
            n += 1;
            from = *at;
        }
        if self.bytes.len() > from {
            slices[n] = IoSlice::new(&self.bytes[from..]);
            n += 1;
        }
        out.write_all_vectored(&mut slices[..n], stall, CLOSE_TIMEOUT, closing)?;
        self.bytes.clear();
        self.large.clear();
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Small frames are copied and large ones written in place, so the order
    /// on the wire must still be the queue's, whatever the mix.
    #[test]
    fn batches_keep_queue_order_across_copied_and_shared_frames() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let out = Stream::Unix(a);
        let sizes = [10, 600, 20, 30, 4000, 5, COPY_MAX, COPY_MAX + 1, 0, 70_000];
        let mut batch = Batch::default();
        let mut expected = Vec::new();
        for (i, size) in sizes.into_iter().enumerate() {
            let frame = Frame::message(Kind::Binary, &vec![i as u8; size]);
            expected.extend_from_slice(frame.as_bytes());
            batch.push(frame);
        }
        // The 70 000-byte frame alone passes BATCH_BYTES.
        assert!(batch.is_full());
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; expected.len()];
            b.read_exact(&mut got).unwrap();
            assert_eq!(got, expected);
        });
        batch
            .write(&out, Duration::from_secs(30), || false)
            .unwrap();
        reader.join().unwrap();
        // Emptied for the next batch, keeping its buffers.
        assert_eq!(
            (batch.size, batch.bytes.len(), batch.large.len()),
            (0, 0, 0)
        );
        assert!(!batch.is_full());
    }

    /// A reader thread that panics must not leave its client registered.
    #[test]
    fn a_panicking_reader_leaves_its_channel() {
        let settings = crate::config::Settings::default();
        let server = Arc::new(Server::new(settings, None));
        let (a, _b) = UnixStream::pair().unwrap();
        let (joined, _writer) = join(
            Stream::Unix(a),
            &server,
            "/p".into(),
            String::new(),
            Options::default(),
            Vec::new(),
        )
        .expect("joined");
        assert_eq!(server.registry.counts(), (1, 1));
        let peer = Arc::clone(&joined.peer);
        let died = std::thread::spawn(move || {
            let _joined = joined;
            panic!("a bug in the read loop");
        })
        .join();
        assert!(died.is_err());
        assert_eq!(server.registry.counts(), (0, 0));
        assert!(peer.is_closing());
    }

    #[test]
    fn a_batch_is_full_at_its_count_of_large_frames() {
        let mut batch = Batch::default();
        for _ in 0..BATCH_LARGE {
            assert!(!batch.is_full());
            batch.push(Frame::message(Kind::Binary, &[0; COPY_MAX + 1]));
        }
        assert!(batch.is_full());
    }
}
