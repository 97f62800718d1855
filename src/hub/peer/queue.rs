//! A peer's queue and its bounds: what waits to be sent, when that is too
//! much, and publishers waiting for room under `slow_client = wait`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::config::Limits;
use crate::memory::budget::{BUDGET, Share};
use crate::proto::frame::Frame;

/// A receiver with this many bytes queued is treated as a slow consumer
/// while the memory budget is used up.
const PRESSURE_BACKLOG: usize = 64 * 1024;

/// The frames waiting for one peer, and what they weigh.
#[derive(Debug)]
pub(super) struct Queue {
    tx: Sender<Frame>,
    rx: Receiver<Frame>,
    /// Bytes of the frames waiting to be sent (queued, owed by a publisher,
    /// or in the writer's head).
    bytes: AtomicUsize,
    /// How many frames those are.
    count: AtomicUsize,
    /// Publishers waiting for room under `slow_client = wait`.
    waiting: AtomicUsize,
    /// Under `slow_client = wait`: since when it has been full without
    /// taking anything ([`since_epoch`] + 1); 0 while it makes progress.
    stalled: AtomicU64,
    room: Mutex<()>,
    roomy: Condvar,
    /// The client address's part of the memory budget: the bytes of the
    /// backlog (the queue and the frames a writer has yet to take) count
    /// there. Frames a publisher sends at once never do.
    share: Option<Arc<Share>>,
}

impl Drop for Queue {
    fn drop(&mut self) {
        // What no writer took: the address's share must not keep it.
        while self.pop().is_some() {}
    }
}

impl Queue {
    pub(super) fn new(share: Option<Arc<Share>>) -> Queue {
        let (tx, rx) = crossbeam_channel::unbounded();
        Queue {
            tx,
            rx,
            bytes: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            stalled: AtomicU64::new(0),
            room: Mutex::new(()),
            roomy: Condvar::new(),
            share,
        }
    }

    /// `bytes` more of backlog (`grew`) or less, for the address's share.
    pub(super) fn backlog(&self, bytes: usize, grew: bool) {
        if let Some(share) = &self.share {
            share.backlog(bytes, grew);
        }
    }

    /// Into the queue, as backlog.
    pub(super) fn push(&self, frame: Frame) {
        self.backlog(frame.as_bytes().len(), true);
        // The queue is never disconnected while the peer exists.
        let _ = self.tx.send(frame);
    }

    /// Out of the queue: no longer backlog.
    pub(super) fn pop(&self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.backlog(frame.as_bytes().len(), false);
        Some(frame)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Let go of everything queued: it will never be sent.
    pub(super) fn drop_all(&self) {
        let (mut count, mut bytes) = (0, 0);
        while let Some(frame) = self.pop() {
            count += 1;
            bytes += frame.as_bytes().len();
        }
        self.taken(count, bytes);
    }

    /// `count` frames of `bytes` wait to be sent: they count against the
    /// queue's bounds.
    pub(super) fn waits(&self, count: usize, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.count.fetch_add(count, Ordering::Relaxed);
    }

    /// `count` frames of `bytes` are no longer waiting (sent, in a writer's
    /// hands, or let go of).
    pub(super) fn taken(&self, count: usize, bytes: usize) {
        if count == 0 {
            return;
        }
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
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
    pub(super) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether another frame of `len` bytes would be over the bounds.
    pub(super) fn is_full(&self, len: usize, limits: &Limits) -> bool {
        let queued = self.bytes();
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

    /// Since when the receiver has been stalled; now, if it was not.
    pub(super) fn stalled_since(&self) -> Instant {
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

    /// Wait until a frame of `len` bytes fits, for as long as the receiver
    /// keeps taking frames and at most `slow_timeout` from when it stopped;
    /// false when it took nothing for that long. A receiver that starts
    /// `closing` needs no room.
    pub(super) fn wait_for_room(
        &self,
        len: usize,
        limits: &Limits,
        closing: impl Fn() -> bool,
    ) -> bool {
        let mut room = self.room.lock();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let fits = loop {
            if closing() || !self.is_full(len, limits) {
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

/// The clock of [`Queue::stalled`]: nanoseconds since the first look.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(*EPOCH).as_nanos() as u64
}
