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

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, LazyLock, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::config::{Limits, SlowClient};
use crate::memory::budget::{BUDGET, Share};
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
}

impl Close {
    /// A close frame with `code` and `reason`.
    pub const fn with(code: u16, reason: &'static str) -> Close {
        Close {
            code,
            reason,
            send: true,
        }
    }

    /// The connection is gone or broken: send nothing, just close the socket.
    pub const ABORT: Close = Close {
        code: 0,
        reason: "",
        send: false,
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

/// What the write lock guards.
#[derive(Debug)]
struct Write {
    state: State,
    /// Frames taken from the queue but not sent, first in line; the first
    /// has `sent` bytes out already.
    head: VecDeque<Frame>,
    sent: usize,
    /// The close frame is in `head` already (a direct send took part of it).
    close_queued: bool,
    /// The writer thread, while it waits for the reader to finish.
    writer: Option<Thread>,
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
    /// Receives its own messages too (`echo=1`).
    pub echo: bool,
    /// What its connection carries: websocket frames, or an HTTP stream.
    pub wire: Wire,
    tx: Sender<Frame>,
    rx: Receiver<Frame>,
    /// Bytes of the frames waiting to be sent (queued, owed by a publisher,
    /// or in `head`).
    queued: AtomicUsize,
    /// How many frames those are.
    count: AtomicUsize,
    closing: AtomicBool,
    close: Mutex<Option<Close>>,
    write: Mutex<Write>,
    /// `write.state`, for the lock-free look of every delivery.
    state: AtomicU8,
    /// The publisher that holds frames for this idle peer, and where
    /// ([`Flushes`]): its id in the high half, the entry + 1 in the low; 0
    /// when none does.
    owed: AtomicU64,
    sink: OnceLock<Sink>,
    /// The reader thread is finished with the connection.
    reader_done: AtomicBool,
    /// Publishers waiting for room under `slow_client = wait`.
    waiting: AtomicUsize,
    /// Under `slow_client = wait`: since when it has been full without
    /// taking anything ([`since_epoch`] + 1); 0 while it makes progress.
    stalled: AtomicU64,
    room: Mutex<()>,
    roomy: Condvar,
    /// The client address's part of the memory budget: the bytes of this
    /// peer's backlog (its queue and the frames a writer has yet to take)
    /// count there. Frames a publisher sends at once never do.
    share: Option<Arc<Share>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // What no writer took: the address's share must not keep it.
        while self.pop().is_some() {}
        let head: usize = self
            .write
            .get_mut()
            .head
            .iter()
            .map(|f| f.as_bytes().len())
            .sum();
        self.backlog(head, false);
    }
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
    pub(crate) fn new(id: u64, echo: bool, wire: Wire, share: Option<Arc<Share>>) -> Arc<Peer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Arc::new(Peer {
            id,
            echo,
            wire,
            tx,
            rx,
            queued: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            close: Mutex::new(None),
            write: Mutex::new(Write {
                state: State::Pending,
                head: VecDeque::new(),
                sent: 0,
                close_queued: false,
                writer: None,
            }),
            state: AtomicU8::new(State::Pending as u8),
            owed: AtomicU64::new(0),
            sink: OnceLock::new(),
            reader_done: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            stalled: AtomicU64::new(0),
            room: Mutex::new(()),
            roomy: Condvar::new(),
            share,
        })
    }

    /// `bytes` more of backlog (`grew`) or less, for the address's share.
    fn backlog(&self, bytes: usize, grew: bool) {
        if let Some(share) = &self.share {
            share.backlog(bytes, grew);
        }
    }

    /// Into the queue, as backlog.
    fn push(&self, frame: Frame) {
        self.backlog(frame.as_bytes().len(), true);
        // The queue is never disconnected while the peer exists.
        let _ = self.tx.send(frame);
    }

    /// Out of the queue: no longer backlog.
    fn pop(&self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.backlog(frame.as_bytes().len(), false);
        Some(frame)
    }

    fn set_state(&self, write: &mut Write, state: State) {
        write.state = state;
        self.state.store(state as u8, Ordering::SeqCst);
    }

    /// Hand `frame` on for sending. While the peer is idle, the frames a
    /// publisher delivers stay with it (`flushes`) until it sends them all at
    /// once; otherwise they go into the queue, for the writer, or for the
    /// publisher that holds this peer's frames already.
    ///
    /// Frames a publisher holds do not count against the queue's bounds
    /// until they fail to go out: a receiver that keeps up never looks slow
    /// for what its publishers have not tried to send yet (they send at the
    /// latest once they hold a writer's batch for it).
    #[inline(always)]
    fn enqueue(self: &Arc<Self>, frame: Frame, flushes: &mut Flushes) {
        let owed = self.owed.load(Ordering::Acquire);
        if owed >> 32 == u64::from(flushes.id) {
            // Ours: everything this publisher sends here goes the same way,
            // so its messages keep their order. (Checked: ids come round
            // again after 2^32 publishers.)
            let entry = (owed as u32 - 1) as usize;
            if flushes
                .entries
                .get(entry)
                .is_some_and(|(peer, ..)| Arc::ptr_eq(peer, self))
            {
                flushes.hold(entry, frame);
                return;
            }
        }
        if owed == 0 && self.state.load(Ordering::Acquire) == State::Idle as u8 {
            if let Some(entry) = self.claim(flushes) {
                flushes.hold(entry, frame);
                return;
            }
        }
        self.waits(1, frame.as_bytes().len());
        self.push(frame);
        // Pairs with the fences in `go_idle` and `send_owed`: if the peer
        // went idle, or its publisher sent what it held, before this frame
        // was queued, nobody else will send it: this publisher must.
        fence(Ordering::SeqCst);
        if self.state.load(Ordering::Relaxed) == State::Idle as u8
            && self.owed.load(Ordering::Relaxed) == 0
        {
            self.claim(flushes);
        }
    }

    /// Make `flushes` the publisher that sends to this peer; its entry.
    #[inline(never)]
    fn claim(self: &Arc<Self>, flushes: &mut Flushes) -> Option<usize> {
        let entry = flushes.entries.len();
        let mark = (u64::from(flushes.id) << 32) | (entry as u64 + 1);
        self.owed
            .compare_exchange(0, mark, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        flushes.entries.push((Arc::clone(self), Vec::new(), 0));
        Some(entry)
    }

    /// For the reader, once the `101` answer is out: the socket, and how to
    /// start a writer for a backlog. What came during the handshake (replayed
    /// messages, a close) goes out now.
    pub(crate) fn ready(self: &Arc<Self>, stream: Arc<Stream>, launch: Launch) {
        let _ = self.sink.set(Sink { stream, launch });
        {
            let mut write = self.write.lock();
            if write.state != State::Pending {
                return;
            }
            self.set_state(&mut write, State::Idle);
        }
        match self.close_reason() {
            Some(close) => self.send_close(close),
            None => self.send_owed(Vec::new(), 0),
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
    /// `101`, for [`Peer::ready`]).
    /// `mark`: the caller's owner mark (`owed`), 0 for none.
    fn send_owed(self: &Arc<Self>, mine: Vec<Frame>, mark: u64) {
        // From here on they count, like what is queued.
        let bytes = mine.iter().map(|f| f.as_bytes().len()).sum();
        self.waits(mine.len(), bytes);
        let mut write = self.write.lock();
        if mark != 0 {
            // Under the lock and before the queue is read: a frame queued
            // after this finds no owner and its publisher sends it itself.
            let _ = self
                .owed
                .compare_exchange(mark, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        let sink = self.sink.get();
        let (State::Idle, Some(sink), false) = (write.state, sink, self.is_closing()) else {
            if matches!(write.state, State::Pending | State::Busy) && !self.is_closing() {
                for frame in mine {
                    self.push(frame);
                }
            } else {
                self.taken(mine.len(), bytes);
            }
            return;
        };
        // What others queued first; most often there is none, and `mine`
        // is all (its allocation is reused).
        let mut frames = VecDeque::from(mine);
        if !self.rx.is_empty() {
            let queued: Vec<Frame> = std::iter::from_fn(|| self.pop()).collect();
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
                Ok(None) => self.taken(batch.frames.len(), batch.size),
                Ok(Some(sent)) => {
                    // What is left goes first, to a writer; Busy before the
                    // lock goes, or another sender could overtake it.
                    let mut head = batch.into_frames();
                    head.extend(frames);
                    self.backlog(head.iter().map(|f| f.as_bytes().len()).sum(), true);
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
                    self.taken(batch.frames.len() + frames.len(), batch.size + bytes);
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
        self.reader_done.store(true, Ordering::Release);
        if let Some(writer) = &self.write.lock().writer {
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
                    self.waits(1, batch.size);
                    self.backlog(batch.size, true);
                    write.head = batch.into_frames();
                    write.sent = sent;
                    write.close_queued = true;
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
        let mut slot = self.close.lock();
        if slot.is_some() {
            return false;
        }
        *slot = Some(close);
        self.closing.store(true, Ordering::Release);
        drop(slot);
        let (mut count, mut bytes) = (0, 0);
        while let Some(frame) = self.pop() {
            count += 1;
            bytes += frame.as_bytes().len();
        }
        self.taken(count, bytes);
        true
    }

    /// `count` frames of `bytes` wait to be sent: they count against the
    /// queue's bounds.
    fn waits(&self, count: usize, bytes: usize) {
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        self.count.fetch_add(count, Ordering::Relaxed);
    }

    /// `count` frames of `bytes` are no longer waiting (sent, in a writer's
    /// hands, or let go of).
    fn taken(&self, count: usize, bytes: usize) {
        if count == 0 {
            return;
        }
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
        self.count.fetch_sub(count, Ordering::Relaxed);
        if self.stalled.load(Ordering::Relaxed) != 0 {
            // Progress: a publisher that waits for it starts timing anew.
            self.stalled.store(0, Ordering::Relaxed);
        }
        // Pairs with the fence in `wait_for_room`.
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            let _room = self.room.lock();
            self.roomy.notify_all();
        }
    }

    /// Bytes of the frames waiting to be sent.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether the connection is closing; it then takes no more messages.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// How the connection is closing, once it is.
    pub(crate) fn close_reason(&self) -> Option<Close> {
        *self.close.lock()
    }

    /// Whether another frame of `len` bytes would be over the queue's bounds.
    fn is_full(&self, len: usize, limits: &Limits) -> bool {
        let queued = self.queued_bytes();
        // A receiver with nothing queued takes any frame: otherwise a message
        // larger than queue_bytes could never reach anyone.
        (queued > 0 && queued + len > limits.queue_bytes)
            || (limits.queue_length > 0 && self.count.load(Ordering::Relaxed) >= limits.queue_length)
            // Under memory pressure a receiver with a backlog is a slow
            // one: its backlog is what can be given back.
            || (queued >= PRESSURE_BACKLOG && BUDGET.is_full())
            // A backlog over its address's share of the budget: that
            // address's receivers are the slow ones, nobody else's.
            || (queued > 0 && self.share.as_ref().is_some_and(|s| BUDGET.is_over(s)))
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
        if !self.is_closing() && !self.is_full(frame.as_bytes().len(), limits) {
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
        if self.is_full(frame.as_bytes().len(), limits) {
            let make_room = policy == SlowClient::Wait && flushes.may_wait;
            if !(make_room && self.wait_for_room(frame, limits, flushes)) {
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

    /// Under `slow_client = wait`, before a publisher waits for any
    /// receiver: a receiver that a frame of `len` bytes would find full is
    /// stalled from now on, unless it was already. So every dead receiver of
    /// a channel is timed from the same moment, and the publisher waits
    /// about `slow_timeout` once, not once for each.
    pub(crate) fn note_if_full(&self, len: usize, limits: &Limits) {
        if !self.is_closing() && self.is_full(len, limits) {
            self.stalled_since();
        }
    }

    /// Since when the receiver has been stalled; now, if it was not.
    fn stalled_since(&self) -> Instant {
        let now = since_epoch(Instant::now()) + 1;
        let since =
            match self
                .stalled
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => now,
                Err(since) => since,
            };
        *EPOCH + Duration::from_nanos(since - 1)
    }

    /// Wait until `frame` fits, for as long as the receiver keeps taking
    /// frames and at most `slow_timeout` from when it stopped; false when
    /// it took nothing for that long.
    fn wait_for_room(
        self: &Arc<Self>,
        frame: &Frame,
        limits: &Limits,
        flushes: &mut Flushes,
    ) -> bool {
        // What this caller owes may be what the receiver is waiting for.
        flushes.flush();
        let len = frame.as_bytes().len();
        let mut room = self.room.lock();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let fits = loop {
            if self.is_closing() || !self.is_full(len, limits) {
                break true;
            }
            // Anything it takes sets the clock back (`taken`).
            let deadline = self.stalled_since() + limits.slow_timeout;
            if Instant::now() >= deadline {
                break false;
            }
            self.roomy.wait_until(&mut room, deadline);
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        fits
    }
}

/// The clock of [`Peer::stalled`]: nanoseconds since the first look.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(*EPOCH).as_nanos() as u64
}

/// The peers a publishing thread owes a send, sent before it waits for
/// anything.
///
/// A reader that publishes several messages from one socket read sends to
/// each idle receiver once for all of them instead of once per message: a
/// send (a system call) costs more than a 64 B delivery does. The sends go
/// out at [`Flushes::flush`], at the latest when this is dropped; until
/// then no other thread sends what this one queued for those peers.
#[derive(Debug)]
pub(crate) struct Flushes {
    /// Unique among the live ones: the owner marks of `Peer::owed`.
    id: u32,
    /// Each idle peer this publisher sends to, the frames it holds for it,
    /// and their bytes.
    entries: Vec<(Arc<Peer>, Vec<Frame>, usize)>,
    /// The most bytes held for one peer.
    largest: usize,
    /// The owner may wait for room under `slow_client = wait` (the relay
    /// thread, which serves every channel, may not).
    may_wait: bool,
}

impl Flushes {
    /// For a thread that may wait for a receiver's room (`may_wait`) or not.
    pub(crate) fn new(may_wait: bool) -> Flushes {
        static IDS: AtomicU32 = AtomicU32::new(1);
        let mut id = IDS.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            // 0 is no owner; the ids of ended publishers come round again.
            id = IDS.fetch_add(1, Ordering::Relaxed);
        }
        Flushes {
            id,
            entries: Vec::new(),
            largest: 0,
            may_wait,
        }
    }

    /// Whether its owner may wait for room under `slow_client = wait`.
    pub(crate) fn may_wait(&self) -> bool {
        self.may_wait
    }

    /// Whether no send is owed.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether one peer is owed so much that the sends should go out now:
    /// what a publisher holds counts against the peer's queue bound, and a
    /// receiver that keeps up must never look slow for it.
    pub(crate) fn is_due(&self) -> bool {
        self.largest >= FLUSH_BYTES
    }

    /// Hold `frame` for the peer of `entry`.
    fn hold(&mut self, entry: usize, frame: Frame) {
        let (_, frames, bytes) = &mut self.entries[entry];
        *bytes += frame.as_bytes().len();
        self.largest = self.largest.max(*bytes);
        frames.push(frame);
    }

    /// Send to every peer owed a send.
    pub(crate) fn flush(&mut self) {
        self.largest = 0;
        for (i, (peer, frames, _)) in std::mem::take(&mut self.entries).into_iter().enumerate() {
            peer.send_owed(frames, (u64::from(self.id) << 32) | (i as u64 + 1));
        }
    }
}

impl Drop for Flushes {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Bytes a publisher holds for one idle peer at most before it sends: a
/// writer's batch.
const FLUSH_BYTES: usize = BATCH_BYTES;

/// A receiver with this many bytes queued is treated as a slow consumer
/// while the memory budget is used up.
pub(crate) const PRESSURE_BACKLOG: usize = 64 * 1024;

// ------------------------------------------------------------ the writer

impl Peer {
    /// A writer thread's work: send the backlog with blocking writes until
    /// it is gone, then give the socket back ([`State::Idle`]); or, once
    /// the peer is closing, send the close frame and cut the connection when
    /// the reader is done or after [`CLOSE_TIMEOUT`]. `stall`: a client that
    /// takes nothing for this long is gone.
    pub(crate) fn write_backlog(&self, stall: Duration) {
        let Some(sink) = self.sink.get() else {
            return;
        };
        let out = &*sink.stream;
        // Writes wake this often to see whether the client closed meanwhile.
        let _ = out.set_write_timeout(Some(CLOSE_TIMEOUT.min(stall)));
        let close = match self.write_until_idle(out, stall) {
            Ok(true) => return,
            Ok(false) => self.close_reason().unwrap_or(Close::ABORT),
            Err(e) => {
                log::debug!("client {}: write failed: {e}", self.id);
                let _ = self.start_closing(Close::ABORT);
                Close::ABORT
            }
        };
        let close_queued = {
            let mut write = self.write.lock();
            write.writer = Some(thread::current());
            std::mem::take(&mut write.close_queued)
        };
        if close.send {
            let _ = out.set_write_timeout(Some(CLOSE_TIMEOUT));
            let sent = close_queued
                || self
                    .wire
                    .close(close.code, close.reason)
                    .is_none_or(|last| out.send_all(last.as_bytes()).is_ok());
            if sent && self.after_last() == Shutdown::Write {
                let _ = out.shutdown(Shutdown::Write);
                self.wait_for_reader(CLOSE_TIMEOUT);
            }
        }
        let _ = out.shutdown(Shutdown::Both);
        let mut write = self.write.lock();
        write.writer = None;
        self.set_state(&mut write, State::Done);
    }

    /// Write the head and the queue in batches; Ok(true) once the socket went
    /// back to idle, Ok(false) when the peer is closing.
    fn write_until_idle(&self, out: &Stream, stall: Duration) -> io::Result<bool> {
        let mut batch = Batch::default();
        {
            let mut write = self.write.lock();
            batch.skip = std::mem::take(&mut write.sent);
            for frame in std::mem::take(&mut write.head) {
                self.backlog(frame.as_bytes().len(), false);
                batch.push(frame);
            }
        }
        loop {
            while !batch.is_full() {
                match self.pop() {
                    Some(frame) => batch.push(frame),
                    None => break,
                }
            }
            // Each round starts with an empty batch (`write` empties it).
            self.taken(batch.frames.len(), batch.size);
            if self.is_closing() {
                // The close frame goes after a frame begun, never inside it.
                if batch.skip > 0 {
                    batch.write(out, stall, || self.is_closing())?;
                }
                return Ok(false);
            }
            if batch.size == 0 {
                if self.go_idle() {
                    return Ok(true);
                }
                continue;
            }
            batch.write(out, stall, || self.is_closing())?;
        }
    }

    /// Turn idle if nothing is queued; false when something is after all.
    fn go_idle(&self) -> bool {
        let mut write = self.write.lock();
        self.set_state(&mut write, State::Idle);
        // Pairs with the fence in `enqueue`: a publisher that queued before
        // this saw `Busy` and left its frame to us.
        fence(Ordering::SeqCst);
        if self.rx.is_empty() && !self.is_closing() {
            return true;
        }
        self.set_state(&mut write, State::Busy);
        false
    }

    /// Wait until the reader is done, at most `timeout`.
    fn wait_for_reader(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.reader_done.load(Ordering::Acquire) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::park_timeout(left);
        }
    }
}

/// Frames up to this size are copied into the batch's buffer: the kernel
/// copies one segment faster than many small ones (figures: BENCHMARKS.md,
/// "Measurements behind the constants").
const COPY_MAX: usize = 512;

/// Bytes gathered for one write at most.
const BATCH_BYTES: usize = 64 * 1024;

/// Larger frames gathered for one write at most, each written from where it
/// is (shared by all receivers) rather than copied.
const BATCH_LARGE: usize = 32;

/// What goes out with one vectored write, in queue order: runs of small
/// frames copied into one buffer, larger frames (and a small one alone) by
/// reference, from where they are (shared by all receivers).
#[derive(Default)]
struct Batch {
    frames: Vec<Frame>,
    /// Frames over [`COPY_MAX`] among them.
    large: usize,
    /// Bytes of its frames.
    size: usize,
    /// Bytes of the batch already sent.
    skip: usize,
    /// The copies, made when the batch is sent.
    bytes: Vec<u8>,
}

/// A piece of what a batch sends.
enum Part {
    Copied(usize, usize),
    Frame(usize),
}

impl Batch {
    fn push(&mut self, frame: Frame) {
        let len = frame.as_bytes().len();
        self.size += len;
        self.large += usize::from(len > COPY_MAX);
        self.frames.push(frame);
    }

    fn is_full(&self) -> bool {
        self.size >= BATCH_BYTES || self.large >= BATCH_LARGE
    }

    /// The slices to write, in queue order, past what was sent.
    fn slices(&mut self) -> Vec<IoSlice<'_>> {
        self.bytes.clear();
        let mut parts = Vec::with_capacity(2 * self.large + 1);
        let mut run = 0..0;
        let small = |f: &Frame| f.as_bytes().len() <= COPY_MAX;
        for i in 0..=self.frames.len() {
            if self.frames.get(i).is_some_and(small) {
                if run.is_empty() {
                    run = i..i;
                }
                run.end = i + 1;
                continue;
            }
            match run.len() {
                0 => {}
                1 => parts.push(Part::Frame(run.start)),
                _ => {
                    if self.bytes.capacity() == 0 {
                        // A page to start with rather than growing from a few bytes.
                        self.bytes.reserve(4096);
                    }
                    let from = self.bytes.len();
                    for frame in &self.frames[run.clone()] {
                        self.bytes.extend_from_slice(frame.as_bytes());
                    }
                    parts.push(Part::Copied(from, self.bytes.len()));
                }
            }
            run = 0..0;
            if i < self.frames.len() {
                parts.push(Part::Frame(i));
            }
        }
        let mut slices: Vec<IoSlice<'_>> = parts
            .into_iter()
            .map(|part| match part {
                Part::Copied(from, to) => IoSlice::new(&self.bytes[from..to]),
                Part::Frame(i) => IoSlice::new(self.frames[i].as_bytes()),
            })
            .collect();
        let mut view = &mut slices[..];
        IoSlice::advance_slices(&mut view, self.skip);
        let left = view.len();
        let done = slices.len() - left;
        // advance_slices left the first slice shortened in place.
        slices.drain(..done);
        slices
    }

    /// Send without waiting: None when all went out, else how much of it did.
    fn send_now(&mut self, out: &Stream) -> io::Result<Option<usize>> {
        let (skip, size) = (self.skip, self.size);
        let sent = match self.frames.as_slice() {
            // The common case of a receiver that keeps up: nothing to gather.
            [frame] => out.send_now(&[IoSlice::new(&frame.as_bytes()[skip..])]),
            _ => out.send_now(&self.slices()),
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        Ok((skip + sent < size).then_some(skip + sent))
    }

    /// Its frames in queue order, for whoever sends the rest.
    fn into_frames(self) -> VecDeque<Frame> {
        self.frames.into()
    }

    /// Write it all and empty it, keeping its buffers; see
    /// [`Stream::write_all_vectored`] for `stall` and `closing`.
    fn write(
        &mut self,
        out: &Stream,
        stall: Duration,
        closing: impl Fn() -> bool,
    ) -> io::Result<()> {
        if self.size > self.skip {
            let mut slices = self.slices();
            out.write_all_vectored(&mut slices, stall, CLOSE_TIMEOUT, closing)?;
        }
        self.frames.clear();
        self.large = 0;
        self.size = 0;
        self.skip = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::Kind;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn frames(sizes: &[usize]) -> (Batch, Vec<u8>) {
        let mut batch = Batch::default();
        let mut expected = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let frame = Frame::message(Kind::Binary, &vec![i as u8; *size]);
            expected.extend_from_slice(frame.as_bytes());
            batch.push(frame);
        }
        (batch, expected)
    }

    /// Small frames are copied and large ones written in place, so the order
    /// on the wire must still be the queue's, whatever the mix.
    #[test]
    fn batches_keep_queue_order_across_copied_and_shared_frames() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let out = Stream::Unix(a);
        let sizes = [10, 600, 20, 30, 4000, 5, COPY_MAX, COPY_MAX + 1, 0, 70_000];
        let (mut batch, expected) = frames(&sizes);
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
        // Emptied for the next batch.
        assert_eq!((batch.size, batch.frames.len(), batch.large), (0, 0, 0));
        assert!(!batch.is_full());
    }

    /// What a send without waiting leaves, a writer sends from where it
    /// stopped: the bytes on the wire are the queue's, once each.
    #[test]
    fn a_partial_send_is_finished_from_where_it_stopped() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let out = Stream::Unix(a);
        let sizes = [30, 40, 300_000, 7, 8, 100_000, 50];
        let (mut batch, expected) = frames(&sizes);
        let left = batch.send_now(&out).unwrap();
        let sent = left.expect("a socket pair takes less than 400 kB at once");
        assert!(sent > 0 && sent < expected.len(), "{sent}");
        let mut rest = Batch {
            skip: sent,
            ..Batch::default()
        };
        for frame in batch.into_frames() {
            rest.push(frame);
        }
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; expected.len()];
            b.read_exact(&mut got).unwrap();
            assert_eq!(got, expected);
        });
        rest.write(&out, Duration::from_secs(30), || false).unwrap();
        reader.join().unwrap();
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
