//! A channel member as the others see it, and the protocol between a
//! client's reader, its writer and the publishers that queue for it: the
//! queue, who may write to the socket, and closing.
//!
//! # Who writes to a client's socket
//!
//! Frames must never interleave, so one thread at a time owns the right to
//! write, and that right is the client's **write lock**: the `write` mutex,
//! and the [`State::Busy`] it hands to a writer thread.
//!
//! - While the client has no backlog ([`State::Idle`]) no writer thread
//!   exists. A thread that has queued frames for it (a publishing reader,
//!   the relay thread, its own reader with a pong or ping, whoever closes
//!   it) takes the lock and writes what is queued itself, with one
//!   non-blocking vectored send (`MSG_DONTWAIT`), holding the lock only for
//!   that call: it never waits on the client's socket.
//! - Whatever that send leaves (the socket is full, or took part of it)
//!   stays first in line: the lock turns `Busy` and a writer thread from the
//!   pool takes over, writes it and then the queue with blocking writes,
//!   without the mutex (it owns `Busy`), and goes back to the pool once the
//!   queue is empty, turning the state `Idle` again under the mutex.
//! - A publisher that finds the state `Busy` only queues: the writer finds
//!   the frame before it lets go ([`Peer::go_idle`] pairs with
//!   [`Peer::deliver`]).
//!
//! Messages of one sender keep their order: each sender is one thread, and
//! whatever it queued goes out in queue order, by its own send or by the
//! writer that takes over the rest.

//!
//! # The parts
//!
//! - [`queue`]: the frames waiting for a peer and their bounds;
//! - [`flushes`]: the sends a publisher gathers for idle peers;
//! - [`writer`]: the writer thread;
//! - [`batch`]: what one write sends.

mod batch;
mod flushes;
mod queue;
mod writer;

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU8, Ordering, fence};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use parking_lot::Mutex;

use self::batch::Batch;
pub(crate) use self::flushes::Flushes;
use self::flushes::{Owed, Owner};
use self::queue::Queue;
use crate::config::{Limits, SlowClient};
use crate::memory::budget::Share;
use crate::os::stream::Stream;
use crate::proto::frame::Frame;
use crate::proto::wire::Wire;

/// How long clients get to answer the close frame when the server stops,
/// how long one connection lingers after its close frame before it is cut,
/// and how long a writer whose closed client still takes a trickle goes on.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a connection ends, as the client will be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Close {
    /// Status code of the close frame; 0 sends a close frame without one.
    pub code: u16,
    /// Reason text of the close frame.
    pub reason: &'static str,
    /// Whether to send a close frame at all (not when the connection already failed).
    pub send: bool,
    /// It answers the client's close frame: once it is out, the closing
    /// handshake is complete.
    pub answers: bool,
}

impl Close {
    /// A close frame with `code` and `reason`.
    pub const fn with(code: u16, reason: &'static str) -> Close {
        Close {
            code,
            reason,
            send: true,
            answers: false,
        }
    }

    /// The answer to the client's close frame, echoing its `code`.
    pub const fn answer(code: u16) -> Close {
        Close {
            answers: true,
            ..Close::with(code, "")
        }
    }

    /// The connection is gone or broken: send nothing, just close the socket.
    pub const ABORT: Close = Close {
        code: 0,
        reason: "",
        send: false,
        answers: false,
    };
}

/// Who may write to the socket (see the module's doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    /// The `101` answer is not out yet: nothing may be written.
    Pending = 0,
    /// No backlog: whoever holds the mutex may send without blocking.
    Idle = 1,
    /// A writer thread owns the socket.
    Busy = 2,
    /// Nothing more is written (the close frame is out, or the connection failed).
    Done = 3,
}

/// In [`Peer::state`], beside the [`State`]: the peer is closing.
const CLOSING: u8 = 4;

/// How a peer closes, once it does. Closing does not change who writes: an
/// idle peer's closer sends the close frame itself, a writer that owns the
/// socket sends it after the frame it is writing, a pending one once ready.
#[derive(Debug)]
struct Closing {
    close: Close,
    /// The close frame is in the head already (a send without waiting took
    /// part of it).
    queued: bool,
    /// The writer thread, while it waits for the reader to finish.
    writer: Option<Thread>,
}

/// What the write lock guards: who writes, what is half sent, and closing.
#[derive(Debug)]
struct Write {
    state: State,
    /// Frames taken from the queue but not sent, first in line; the first
    /// has `sent` bytes out already.
    head: VecDeque<Frame>,
    sent: usize,
    closing: Option<Closing>,
    /// The reader thread is finished with the connection.
    reader_done: bool,
}

/// Starts a writer thread for a peer: given by the reader once the `101` is
/// out, called whenever a backlog needs one.
pub(crate) type Launch = Box<dyn Fn(Arc<Peer>) -> io::Result<()> + Send + Sync>;

/// The socket and how to start a writer for it.
struct Sink {
    stream: Arc<Stream>,
    launch: Launch,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink")
    }
}

/// A channel member as the other members see it: a queue and a way to close it.
#[derive(Debug)]
pub(crate) struct Peer {
    /// Unique for the life of the process.
    pub id: u64,
    /// Whose messages it receives.
    hears: Hears,
    /// What its connection carries: websocket frames, or an HTTP stream.
    pub wire: Wire,
    queue: Queue,
    write: Mutex<Write>,
    /// What `write` says of its state, and [`CLOSING`] once it closes, for
    /// the lock-free look of every delivery; set only under the lock.
    state: AtomicU8,
    /// The publisher that holds frames for this idle peer.
    owed: Owed,
    sink: OnceLock<Sink>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let head: usize = self
            .write
            .get_mut()
            .head
            .iter()
            .map(|f| f.as_bytes().len())
            .sum();
        self.queue.backlog(head, false);
    }
}

/// Whose messages a member receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hears {
    /// Everyone's but its own: a channel member's way.
    Others,
    /// Its own too (`echo=1`).
    Everyone,
    /// Nobody's: a publish-only twin's client (SPEC §12) only sends.
    Nobody,
}

/// What happened to one delivery.
pub(crate) enum Delivery {
    Queued,
    Dropped,
    Disconnected,
    Skipped,
}

impl Peer {
    /// A new peer, before its `101` (or `200`) is out; its backlog counts in
    /// `share`, its client address's part of the budget, when there is one.
    pub(crate) fn new(id: u64, hears: Hears, wire: Wire, share: Option<Arc<Share>>) -> Arc<Peer> {
        Arc::new(Peer {
            id,
            hears,
            wire,
            queue: Queue::new(share),
            write: Mutex::new(Write {
                state: State::Pending,
                head: VecDeque::new(),
                sent: 0,
                closing: None,
                reader_done: false,
            }),
            state: AtomicU8::new(State::Pending as u8),
            owed: Owed::default(),
            sink: OnceLock::new(),
        })
    }

    /// Whether it receives a message of member `from`.
    pub(crate) fn hears(&self, from: u64) -> bool {
        match self.hears {
            Hears::Others => from != self.id,
            Hears::Everyone => true,
            Hears::Nobody => false,
        }
    }

    /// Whether it receives any message at all.
    pub(crate) fn listens(&self) -> bool {
        self.hears != Hears::Nobody
    }

    fn set_state(&self, write: &mut Write, state: State) {
        write.state = state;
        self.mirror(write);
    }

    /// Copy what `write` says into [`Peer::state`].
    fn mirror(&self, write: &Write) {
        let closing = if write.closing.is_some() { CLOSING } else { 0 };
        self.state
            .store(write.state as u8 | closing, Ordering::SeqCst);
    }

    /// Whether the peer is in `state` and not closing.
    fn is_open_and(&self, state: State, order: Ordering) -> bool {
        self.state.load(order) == state as u8
    }

    /// For the reader, once the `101` answer is out: the socket, and how to
    /// start a writer for a backlog. What came during the handshake (replayed
    /// messages, a close) goes out now.
    pub(crate) fn ready(self: &Arc<Self>, stream: Arc<Stream>, launch: Launch) {
        let _ = self.sink.set(Sink { stream, launch });
        let close = {
            let mut write = self.write.lock();
            if write.state != State::Pending {
                return;
            }
            self.set_state(&mut write, State::Idle);
            write.closing.as_ref().map(|c| c.close)
        };
        match close {
            Some(close) => self.send_close(close),
            None => self.send_owed(Vec::new(), None),
        }
    }

    /// For the reader, when the connection failed before its `101` went out:
    /// nothing will ever be written.
    pub(crate) fn never_ready(&self) {
        let mut write = self.write.lock();
        if write.state == State::Pending {
            self.set_state(&mut write, State::Done);
        }
    }

    /// Send what is queued, and `mine` after it, without waiting, if the
    /// peer is idle; what does not go out at once goes to a writer thread.
    /// Otherwise `mine` joins the queue, for the writer (or, before the
    /// `101`, for [`Peer::ready`]). `owner`: the caller, when it is the
    /// publisher that held `mine`.
    fn send_owed(self: &Arc<Self>, mine: Vec<Frame>, owner: Option<Owner>) {
        // From here on they count, like what is queued.
        let bytes = mine.iter().map(|f| f.as_bytes().len()).sum();
        self.queue.waits(mine.len(), bytes);
        let mut write = self.write.lock();
        // Under the lock and before the queue is read: a frame queued
        // after this finds no owner and its publisher sends it itself.
        self.owed.release(owner);
        fence(Ordering::SeqCst);
        let sink = self.sink.get();
        let closing = write.closing.is_some();
        let (State::Idle, Some(sink), false) = (write.state, sink, closing) else {
            if matches!(write.state, State::Pending | State::Busy) && !closing {
                for frame in mine {
                    self.queue.push(frame);
                }
            } else {
                self.queue.taken(mine.len(), bytes);
            }
            return;
        };
        // What others queued first; most often there is none, and `mine`
        // is all (its allocation is reused).
        let mut frames = VecDeque::from(mine);
        if !self.queue.is_empty() {
            let queued: Vec<Frame> = std::iter::from_fn(|| self.queue.pop()).collect();
            for frame in queued.into_iter().rev() {
                frames.push_front(frame);
            }
        }
        while !frames.is_empty() {
            let mut batch = Batch::default();
            while !batch.is_full() {
                let Some(frame) = frames.pop_front() else {
                    break;
                };
                batch.push(frame);
            }
            match batch.send_now(&sink.stream) {
                Ok(None) => self.queue.taken(batch.frames.len(), batch.size),
                Ok(Some(sent)) => {
                    // What is left goes first, to a writer; Busy before the
                    // lock goes, or another sender could overtake it.
                    let mut head = batch.into_frames();
                    head.extend(frames);
                    self.queue
                        .backlog(head.iter().map(|f| f.as_bytes().len()).sum(), true);
                    write.head = head;
                    write.sent = sent;
                    self.set_state(&mut write, State::Busy);
                    drop(write);
                    self.launch(sink);
                    return;
                }
                Err(e) => {
                    drop(write);
                    log::debug!("client {}: write failed: {e}", self.id);
                    let bytes = frames.iter().map(|f| f.as_bytes().len()).sum::<usize>();
                    self.queue
                        .taken(batch.frames.len() + frames.len(), batch.size + bytes);
                    self.close(Close::ABORT);
                    return;
                }
            }
        }
    }

    /// Start a writer thread for the state turned `Busy`.
    #[inline(never)]
    fn launch(self: &Arc<Self>, sink: &Sink) {
        if let Err(e) = (sink.launch)(Arc::clone(self)) {
            // Past the 101 no answer is possible: cut the connection, which
            // ends the reader.
            log::debug!("client {}: no writer thread: {e}", self.id);
            self.set_state(&mut self.write.lock(), State::Done);
            self.close(Close::ABORT);
            let _ = sink.stream.shutdown(Shutdown::Both);
        }
    }

    /// For the reader: it is done with the connection.
    pub(crate) fn reader_finished(&self) {
        let mut write = self.write.lock();
        write.reader_done = true;
        if let Some(writer) = write.closing.as_ref().and_then(|c| c.writer.as_ref()) {
            writer.unpark();
        }
    }

    /// Start closing with `close`; the first call wins. Returns whether this
    /// call did.
    ///
    /// What is queued will never be sent (the close frame goes next), so it
    /// is let go of at once: a slow consumer's backlog goes back to the
    /// memory budget now, not when its socket finally gives way. An idle
    /// peer's close frame is sent from here, without waiting: a shutdown
    /// that closes thousands of idle clients needs no thread for each. A
    /// writer takes over only what the socket does not take; a busy writer
    /// sends the close frame after the frame it is writing.
    pub(crate) fn close(self: &Arc<Self>, close: Close) -> bool {
        if !self.start_closing(close) {
            return false;
        }
        self.send_close(close);
        true
    }

    /// Send the close frame of an idle peer (a pending one sends it once
    /// ready), or cut the connection when there is none to send.
    fn send_close(self: &Arc<Self>, close: Close) {
        let Some(sink) = self.sink.get() else {
            return;
        };
        let mut write = self.write.lock();
        if write.state != State::Idle {
            return;
        }
        if !close.send {
            self.set_state(&mut write, State::Done);
            // Wakes the reader, if it waits for the client.
            let _ = sink.stream.shutdown(Shutdown::Both);
            return;
        }
        let Some(last) = self.wire.close(close.code, close.reason) else {
            // An HTTP/1.0 stream ends with the connection.
            self.set_state(&mut write, State::Done);
            let _ = sink.stream.shutdown(self.after_last());
            return;
        };
        let mut batch = Batch::default();
        batch.push(last);
        match batch.send_now(&sink.stream) {
            Ok(None) => {
                self.set_state(&mut write, State::Done);
                let _ = sink.stream.shutdown(self.after_last());
            }
            Ok(Some(sent)) => {
                // A writer finishes it, from where it stopped, or sends it
                // whole when nothing went out.
                if sent > 0 {
                    // Counted like a queued frame: the writer takes it.
                    self.queue.waits(1, batch.size);
                    self.queue.backlog(batch.size, true);
                    write.head = batch.into_frames();
                    write.sent = sent;
                    if let Some(closing) = &mut write.closing {
                        closing.queued = true;
                    }
                }
                self.set_state(&mut write, State::Busy);
                drop(write);
                self.launch(sink);
            }
            Err(_) => {
                self.set_state(&mut write, State::Done);
                let _ = sink.stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// What ends the connection once its last frame is out: a websocket
    /// client answers the close frame, so only the sending side closes; an
    /// HTTP stream is over, and closing both sides wakes its reader, which
    /// waits for nothing else.
    fn after_last(&self) -> Shutdown {
        if self.wire == Wire::WebSocket {
            Shutdown::Write
        } else {
            Shutdown::Both
        }
    }

    /// Mark the peer closing and empty its queue; false if it was already.
    fn start_closing(&self, close: Close) -> bool {
        {
            let mut write = self.write.lock();
            if write.closing.is_some() {
                return false;
            }
            write.closing = Some(Closing {
                close,
                queued: false,
                writer: None,
            });
            self.mirror(&write);
        }
        self.queue.drop_all();
        true
    }

    /// Bytes of the frames waiting to be sent.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queue.bytes()
    }

    /// Whether the connection is closing; it then takes no more messages.
    pub(crate) fn is_closing(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSING != 0
    }

    /// Whether nothing more will be written: its last frame is out, or the
    /// connection failed.
    pub(crate) fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) & !CLOSING == State::Done as u8
    }

    /// How the connection is closing, once it is.
    pub(crate) fn close_reason(&self) -> Option<Close> {
        self.write.lock().closing.as_ref().map(|c| c.close)
    }

    /// Queue a control frame (a pong, a ping) for the reader, which sends it
    /// with `flushes`. Skipped when the queue is full: a client that floods
    /// pings and never reads must not grow the server's memory.
    pub(crate) fn send_control(
        self: &Arc<Self>,
        frame: Frame,
        limits: &Limits,
        flushes: &mut Flushes,
    ) {
        if !self.is_closing() && !self.queue.is_full(frame.as_bytes().len(), limits) {
            self.enqueue(frame, flushes);
        }
    }

    /// Queue `frame` for this member, or apply `policy` when its queue is
    /// full; a send this caller owes goes to `flushes`. Under
    /// [`SlowClient::Wait`] a caller that may wait waits for room (one that
    /// may not, the relay thread, disconnects the receiver instead).
    #[inline(always)]
    pub(crate) fn deliver(
        self: &Arc<Self>,
        frame: &Frame,
        limits: &Limits,
        policy: SlowClient,
        flushes: &mut Flushes,
    ) -> Delivery {
        if self.is_closing() {
            return Delivery::Skipped;
        }
        let len = frame.as_bytes().len();
        if self.queue.is_full(len, limits) {
            let make_room = policy == SlowClient::Wait && flushes.may_wait();
            if !(make_room && self.wait_for_room(len, limits, flushes)) {
                return match policy {
                    SlowClient::Drop => Delivery::Dropped,
                    SlowClient::Disconnect | SlowClient::Wait => {
                        if self.close(Close::with(1008, "slow consumer")) {
                            Delivery::Disconnected
                        } else {
                            Delivery::Skipped
                        }
                    }
                };
            }
            if self.is_closing() {
                return Delivery::Skipped;
            }
        }
        self.enqueue(frame.clone(), flushes);
        Delivery::Queued
    }

    /// Wait for room for `len` bytes (see [`Queue::wait_for_room`]), after
    /// sending what this caller owes: it may be what the receiver waits for.
    fn wait_for_room(&self, len: usize, limits: &Limits, flushes: &mut Flushes) -> bool {
        flushes.flush();
        self.queue.wait_for_room(len, limits, || self.is_closing())
    }

    /// Under `slow_client = wait`, before a publisher waits for any
    /// receiver: a receiver that a frame of `len` bytes would find full is
    /// stalled from now on, unless it was already. So every dead receiver of
    /// a channel is timed from the same moment, and the publisher waits
    /// about `slow_timeout` once, not once for each.
    pub(crate) fn note_if_full(&self, len: usize, limits: &Limits) {
        if !self.is_closing() && self.queue.is_full(len, limits) {
            self.queue.stalled_since();
        }
    }
}
