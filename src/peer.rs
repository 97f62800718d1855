//! A channel member as the others see it, and the protocol between a
//! client's reader, its writer and the publishers that queue for it: the
//! queue, the writer's start and wake-ups, and closing.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use parking_lot::Mutex;

use crate::budget::BUDGET;
use crate::config::{Limits, SlowClient};
use crate::frame::Frame;

/// What a writer thread finds in its queue.
#[derive(Debug)]
pub enum Out {
    /// Bytes to send.
    Frame(Frame),
    /// Look at the peer's state: it is closing.
    Wake,
}

/// How a connection ends, as the writer will tell the client.
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

/// A channel member as the other members see it: a queue and a way to close it.
///
/// The writer sleeps with `park`, not in crossbeam's blocking `recv`: that one
/// spins and calls `sched_yield` before it sleeps, every time a queue runs
/// empty, which with thousands of writers cost more than the messages did.
/// `idle` says the writer is (about to be) parked; a sender that finds it set
/// unparks it, so a busy writer costs its senders no wake-up at all.
///
/// The writer thread starts when there is first something to write: the first
/// frame queued, a close, or the first ping (`start` says where it is in its
/// life; once the `101` answer is out, it holds how to start it). A client that only sends and then leaves, the common
/// short-lived one, never costs a second thread, and one that receives costs
/// none of the writer's own wake-ups before its first frame.
#[derive(Debug)]
pub struct Peer {
    /// Unique for the life of the process.
    pub id: u64,
    /// Receives its own messages too (`echo=1`).
    pub echo: bool,
    tx: Sender<Out>,
    /// The queue's other end, for emptying it the moment the peer closes.
    rx: Receiver<Out>,
    /// Bytes of the frames in the queue.
    queued: AtomicUsize,
    closing: AtomicBool,
    close: Mutex<Option<Close>>,
    /// The writer thread, once it runs: who senders unpark. Read on every
    /// delivery, so apart from `start`, which only starting takes.
    writer: OnceLock<Thread>,
    idle: AtomicBool,
    /// The reader thread is finished with the connection.
    reader_done: AtomicBool,
    start: Mutex<WriterStart>,
}

/// Where a client's writer thread is in its life.
#[derive(Debug)]
enum WriterStart {
    /// The `101` answer is not out yet: nothing may be written.
    Pending,
    /// The `101` is out; the writer starts with the first thing to write.
    Ready(Launch),
    /// Started (its thread may still be on its way to `writer`).
    Started,
    /// The connection failed before anything was written: it never starts.
    Forgone,
}

/// Starts a client's writer thread.
pub struct Launch(Box<dyn FnOnce() + Send>);

impl Launch {
    /// A launch that runs `start`.
    pub fn new(start: impl FnOnce() + Send + 'static) -> Launch {
        Launch(Box::new(start))
    }
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Launch")
    }
}

impl Peer {
    /// A new peer and the receiving end of its queue, for its writer thread.
    pub fn new(id: u64, echo: bool) -> (Arc<Peer>, Receiver<Out>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let peer = Peer {
            id,
            echo,
            tx,
            rx: rx.clone(),
            queued: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            close: Mutex::new(None),
            writer: OnceLock::new(),
            idle: AtomicBool::new(false),
            reader_done: AtomicBool::new(false),
            start: Mutex::new(WriterStart::Pending),
        };
        (Arc::new(peer), rx)
    }

    /// Queue `out` and wake the writer if it sleeps.
    fn push(&self, out: Out) {
        if let Some(writer) = self.queue(out) {
            writer.unpark();
        }
    }

    /// Queue `out`; the writer if it sleeps and this call must wake it (then
    /// no other call will). A writer that has not started is started. The
    /// queue is never disconnected while the peer exists, so sending cannot
    /// fail.
    #[inline(always)]
    fn queue(&self, out: Out) -> Option<&Thread> {
        if let Out::Frame(frame) = &out {
            self.queued
                .fetch_add(frame.as_bytes().len(), Ordering::Relaxed);
        }
        let _ = self.tx.send(out);
        // Pairs with the fence in `next`: either the writer sees the message
        // before it parks, or we see it idle and wake it.
        fence(Ordering::SeqCst);
        if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::AcqRel) {
            self.writer.get()
        } else {
            if self.writer.get().is_none() {
                self.start_writer();
            }
            None
        }
    }

    /// For the reader, once the `101` answer is out: how to start the writer,
    /// which starts now if something is queued already (replayed messages,
    /// messages that came during the handshake, a close).
    pub fn ready_to_launch(&self, launch: Launch) {
        *self.start.lock() = WriterStart::Ready(launch);
        // The lock orders this against `queue`: a sender either queued before
        // it took the lock (and the queue is not empty here) or finds `Ready`.
        if !self.tx.is_empty() {
            self.start_writer();
        }
    }

    /// Start the writer if it is ready and has not started.
    pub fn start_writer(&self) {
        // Marked started before it runs: starting may fail and close the
        // peer, which comes back here.
        let launch = {
            let mut start = self.start.lock();
            match std::mem::replace(&mut *start, WriterStart::Started) {
                WriterStart::Ready(launch) => Some(launch),
                other => {
                    *start = other;
                    None
                }
            }
        };
        if let Some(Launch(start)) = launch {
            start();
        }
    }

    /// Whether the writer has started, or never will.
    pub fn writer_started(&self) -> bool {
        matches!(
            *self.start.lock(),
            WriterStart::Started | WriterStart::Forgone
        )
    }

    /// For the reader, when the connection failed: a writer that has not
    /// started never will. Returns whether none ever started, so that the
    /// reader closes the socket itself.
    pub fn forgo_writer(&self) -> bool {
        let mut start = self.start.lock();
        let ready = matches!(*start, WriterStart::Ready(_));
        if ready {
            *start = WriterStart::Forgone;
        }
        ready
    }

    /// For the writer thread, once, before it reads its queue: who to unpark.
    pub fn attach_writer(&self) {
        let _ = self.writer.set(thread::current());
    }

    /// For the reader thread: it is done with the connection.
    pub fn reader_finished(&self) {
        self.reader_done.store(true, Ordering::Release);
        if let Some(writer) = self.writer.get() {
            writer.unpark();
        }
    }

    /// For the writer thread: wait until the reader is done, at most `timeout`.
    pub fn wait_for_reader(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.reader_done.load(Ordering::Acquire) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::park_timeout(left);
        }
    }

    /// The writer's next item, waiting until `deadline` (or forever).
    pub fn next(
        &self,
        rx: &Receiver<Out>,
        deadline: Option<Instant>,
    ) -> Result<Out, RecvTimeoutError> {
        loop {
            match rx.try_recv() {
                Ok(out) => return Ok(out),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            self.idle.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if let Ok(out) = rx.try_recv() {
                self.idle.store(false, Ordering::Relaxed);
                return Ok(out);
            }
            match deadline {
                Some(at) => {
                    let now = Instant::now();
                    if now >= at {
                        self.idle.store(false, Ordering::Relaxed);
                        return Err(RecvTimeoutError::Timeout);
                    }
                    thread::park_timeout(at - now);
                }
                None => thread::park(),
            }
            self.idle.store(false, Ordering::Relaxed);
        }
    }

    /// Start closing with `close`; the first call wins. Returns whether this call did.
    ///
    /// What is queued will never be sent (the writer sends the close frame
    /// next), so it is let go of at once: a slow consumer's backlog goes back
    /// to the memory budget now, not when its socket finally gives way.
    pub fn close(&self, close: Close) -> bool {
        let mut slot = self.close.lock();
        if slot.is_some() {
            return false;
        }
        *slot = Some(close);
        self.closing.store(true, Ordering::Release);
        drop(slot);
        let mut freed = 0;
        while let Ok(out) = self.rx.try_recv() {
            if let Out::Frame(frame) = out {
                freed += frame.as_bytes().len();
            }
        }
        self.taken(freed);
        self.push(Out::Wake);
        true
    }

    /// For the writer: it took frames of `bytes` from the queue.
    pub fn taken(&self, bytes: usize) {
        if bytes > 0 {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Bytes of the frames waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether the connection is closing; it then takes no more messages.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// How the connection is closing, once it is.
    pub fn close_reason(&self) -> Option<Close> {
        *self.close.lock()
    }

    /// Queue a control frame (a pong). Skipped when the queue is full: a client
    /// that floods pings and never reads must not grow the server's memory.
    pub fn send_control(&self, frame: Frame, limits: &Limits) {
        if !self.is_closing() && self.tx.len() < limits.queue_length {
            self.push(Out::Frame(frame));
        }
    }
}

/// What happened to one delivery.
pub enum Delivery {
    Queued,
    Dropped,
    Disconnected,
    Skipped,
}

/// Writers to wake before the publishing thread waits for anything.
///
/// A reader that publishes several messages from one socket read wakes each
/// sleeping writer once for all of them instead of once per message, and the
/// writer then finds them all in its queue for one write: a wake-up (a futex
/// call, often a context switch) costs more than a 64 B delivery does. The
/// writers are woken by [`Wakes::flush`], at the latest when this is dropped;
/// until then no one else wakes them.
#[derive(Debug, Default)]
pub struct Wakes(Vec<Thread>);

impl Wakes {
    /// Wake every writer owed a wake-up.
    pub fn flush(&mut self) {
        for writer in self.0.drain(..) {
            writer.unpark();
        }
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Peer {
    /// Queue `frame` for this member, or apply its slow-client policy when
    /// its queue is full; a writer to wake goes to `wakes`.
    #[inline(always)]
    pub fn deliver(&self, frame: &Frame, limits: &Limits, wakes: &mut Wakes) -> Delivery {
        if self.is_closing() {
            return Delivery::Skipped;
        }
        // Under memory pressure a receiver with a backlog is a slow one: its
        // backlog is what can be given back.
        if self.tx.len() >= limits.queue_length
            || (self.queued_bytes() >= PRESSURE_BACKLOG && BUDGET.is_full())
        {
            return match limits.slow_client {
                SlowClient::Drop => Delivery::Dropped,
                SlowClient::Disconnect => {
                    if self.close(Close::with(1008, "slow consumer")) {
                        Delivery::Disconnected
                    } else {
                        Delivery::Skipped
                    }
                }
            };
        }
        if let Some(writer) = self.queue(Out::Frame(frame.clone())) {
            wakes.0.push(writer.clone());
        }
        Delivery::Queued
    }
}

/// A receiver with this many bytes queued is treated as a slow consumer
/// while the memory budget is used up.
pub const PRESSURE_BACKLOG: usize = 64 * 1024;
