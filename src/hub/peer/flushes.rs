//! The gathered sends: a publisher holds what it delivers to idle peers and
//! sends to each once for all of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use super::batch::BATCH_BYTES;
use super::{Peer, State};
use crate::proto::frame::Frame;

/// Bytes a publisher holds for one idle peer at most before it sends: a
/// writer's batch.
const FLUSH_BYTES: usize = BATCH_BYTES;

/// The publisher that holds frames for an idle peer, and where: the
/// [`Flushes`] by its id, and the peer's entry in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Owner {
    publisher: u32,
    entry: u32,
}

impl Owner {
    /// Both halves in one word, so that a delivery reads them in one atomic
    /// load; 0 is nobody (entries count from 1 there).
    fn pack(self) -> u64 {
        (u64::from(self.publisher) << 32) | (u64::from(self.entry) + 1)
    }

    fn unpack(word: u64) -> Option<Owner> {
        (word != 0).then(|| Owner {
            publisher: (word >> 32) as u32,
            entry: (word as u32).wrapping_sub(1),
        })
    }
}

/// A peer's [`Owner`], if any: read without a lock by every delivery.
#[derive(Debug, Default)]
pub(super) struct Owed(AtomicU64);

impl Owed {
    fn get(&self, order: Ordering) -> Option<Owner> {
        Owner::unpack(self.0.load(order))
    }

    /// Make `owner` the owner, if there is none.
    fn claim(&self, owner: Owner) -> bool {
        self.0
            .compare_exchange(0, owner.pack(), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Nobody owns it any more, if `owner` still did.
    pub(super) fn release(&self, owner: Option<Owner>) {
        if let Some(owner) = owner {
            let _ = self
                .0
                .compare_exchange(owner.pack(), 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
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
    /// Unique among the live ones: the publisher of [`Owner`].
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
            // The ids of ended publishers come round again; 0 is skipped
            // so that no owner packs to 0 (nobody).
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

    fn owner(&self, entry: usize) -> Owner {
        Owner {
            publisher: self.id,
            entry: entry as u32,
        }
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
            peer.send_owed(frames, Some(self.owner(i)));
        }
    }
}

impl Drop for Flushes {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Peer {
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
    pub(super) fn enqueue(self: &Arc<Self>, frame: Frame, flushes: &mut Flushes) {
        let owner = self.owed.get(Ordering::Acquire);
        if let Some(owner) = owner.filter(|o| o.publisher == flushes.id) {
            // Ours: everything this publisher sends here goes the same way,
            // so its messages keep their order. (Checked: ids come round
            // again after 2^32 publishers.)
            let entry = owner.entry as usize;
            if flushes
                .entries
                .get(entry)
                .is_some_and(|(peer, ..)| Arc::ptr_eq(peer, self))
            {
                flushes.hold(entry, frame);
                return;
            }
        }
        if owner.is_none() && self.is_open_and(State::Idle, Ordering::Acquire) {
            if let Some(entry) = self.claim(flushes) {
                flushes.hold(entry, frame);
                return;
            }
        }
        self.queue.waits(1, frame.as_bytes().len());
        self.queue.push(frame);
        // Pairs with the fences in `go_idle` and `send_owed`: if the peer
        // went idle, or its publisher sent what it held, before this frame
        // was queued, nobody else will send it: this publisher must.
        fence(Ordering::SeqCst);
        if self.is_open_and(State::Idle, Ordering::Relaxed)
            && self.owed.get(Ordering::Relaxed).is_none()
        {
            self.claim(flushes);
        }
    }

    /// Make `flushes` the publisher that sends to this peer; its entry.
    #[inline(never)]
    fn claim(self: &Arc<Self>, flushes: &mut Flushes) -> Option<usize> {
        let entry = flushes.entries.len();
        if !self.owed.claim(flushes.owner(entry)) {
            return None;
        }
        flushes.entries.push((Arc::clone(self), Vec::new(), 0));
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_packs_and_unpacks_both_halves() {
        for (publisher, entry) in [(1, 0), (u32::MAX, 7), (3, u32::MAX - 1)] {
            let owner = Owner { publisher, entry };
            assert_ne!(owner.pack(), 0);
            assert_eq!(Owner::unpack(owner.pack()), Some(owner));
        }
        assert_eq!(Owner::unpack(0), None);
    }
}
