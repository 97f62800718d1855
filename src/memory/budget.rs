//! The process-wide memory budget (`[limits] memory_budget`, SPEC §3).
//!
//! Per-connection bounds alone let a few thousand clients pin gigabytes, so
//! the bytes that clients can make staps hold are counted in one place:
//! - partial incoming messages and HTTP bodies: the bytes that have arrived
//!   (never what a header announced), for those larger than [`FREE`];
//! - every message frame while anything holds it (receivers' queues, writers'
//!   batches, replay rings), once however many receivers share it.
//!
//! Replay rings are a cache: their bytes never make anything be refused.
//! What refusals look at is the **firm** part, everything but the rings; when
//! the whole nears the limit, the registry (the [`Cache`]) evicts ring
//! entries, oldest first, until it is back under a lower mark.
//!
//! Partial messages may take at most half of the budget, so that clients
//! stalling half-sent messages cannot stop delivery. When the firm part
//! reaches the budget, a new large message is refused (1009) and receivers
//! with a backlog are treated as slow consumers; joins are refused (503)
//! when less than a sixteenth of it is left. Refusals are logged once a
//! minute and counted.

use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::os::logging::Throttle;

/// A partial message up to this size is not counted: it is the reader's own
/// small buffer, and refusing it would stop even chat-sized messages.
pub(crate) const FREE: usize = 4096;

/// What holds the bytes the budget may take back: the replay rings.
pub trait Cache: Send + Sync {
    /// Let go of cached bytes, oldest first, until the budget uses at most
    /// `down_to` or nothing is cached. Must not wait for a lock: it runs
    /// wherever a frame is made, which may be under any lock.
    fn shed(&self, down_to: usize);
}

/// One client address's part of the budget: its partial messages, and its
/// receivers' backlogs (a frame queued for several of them counts for each).
/// What either may hold: [`Budget::set_share_limit`].
#[derive(Debug, Default)]
pub struct Share {
    incoming: AtomicUsize,
    backlog: AtomicUsize,
}

impl Share {
    /// `n` more bytes of backlog for the address's receivers (`grew`), or less.
    pub fn backlog(&self, n: usize, grew: bool) {
        if grew {
            self.backlog.fetch_add(n, Relaxed);
        } else {
            self.backlog.fetch_sub(n, Relaxed);
        }
    }

    /// Bytes of backlog of the address's receivers now.
    pub fn backlog_bytes(&self) -> usize {
        self.backlog.load(Relaxed)
    }
}

/// What a partial message was refused for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    /// The memory budget.
    Budget,
    /// The client address's share of it.
    Share,
}

/// Counters of the bytes in the budget.
pub struct Budget {
    limit: AtomicUsize,
    used: AtomicUsize,
    incoming: AtomicUsize,
    /// Of `used`, the bytes replay rings hold (a frame also queued for a
    /// receiver counts here too, until it is evicted).
    cached: AtomicUsize,
    refused: AtomicU64,
    throttle: Throttle,
    cache: Mutex<Option<Weak<dyn Cache>>>,
    /// One thread sheds at a time; the others go on.
    shedding: AtomicBool,
    /// What the backlogs of one address's receivers may hold ([`Share`]);
    /// its partial messages, half of it.
    share_limit: AtomicUsize,
}

/// The one budget of the process.
pub static BUDGET: Budget = Budget::new();

impl Budget {
    /// A budget without a limit until [`Budget::set_limit`].
    pub const fn new() -> Budget {
        Budget {
            limit: AtomicUsize::new(usize::MAX),
            used: AtomicUsize::new(0),
            incoming: AtomicUsize::new(0),
            cached: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            throttle: Throttle::new(),
            cache: Mutex::new(None),
            shedding: AtomicBool::new(false),
            share_limit: AtomicUsize::new(usize::MAX),
        }
    }

    /// Set what one address's [`Share`] may hold (at startup): `limit` of
    /// backlogs, half of it of partial messages (which may take half the
    /// budget in all).
    pub fn set_share_limit(&self, limit: usize) {
        self.share_limit.store(limit, Relaxed);
    }

    /// Whether the receivers of an address count as slow consumers: their
    /// backlogs hold all its share while half the budget is in use. A frame
    /// queued for several of them counts once for each, which only matters
    /// when memory is getting scarce; until then a crowd behind one address
    /// (a NAT, a proxy that names nobody) may hold more.
    pub fn is_over(&self, share: &Share) -> bool {
        share.backlog_bytes() >= self.share_limit.load(Relaxed) && self.firm() >= self.limit() / 2
    }

    /// Set the limit, in bytes (at startup).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    /// Give the budget what it may evict from.
    pub fn set_cache(&self, cache: Weak<dyn Cache>) {
        *self.cache.lock() = Some(cache);
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Bytes counted now.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Bytes that replay rings hold now.
    pub fn cached(&self) -> usize {
        self.cached.load(Relaxed)
    }

    /// Bytes counted now that are not a cache: what refusals look at.
    fn firm(&self) -> usize {
        self.used().saturating_sub(self.cached())
    }

    /// Times something was refused for the budget.
    pub fn refusals(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// Whether the budget is used up: new large messages are refused,
    /// backlogged receivers count as slow.
    pub fn is_full(&self) -> bool {
        self.firm() >= self.limit()
    }

    /// Whether a new client may join: a sixteenth of the budget must be left
    /// for it. Deliveries stop at the limit itself, so the count settles just
    /// below it while they are refused; joins must stop before that.
    pub fn admits_joins(&self) -> bool {
        let limit = self.limit();
        self.firm() < limit - limit / 16
    }

    /// Whether `n` more bytes of partial messages would fit now (without
    /// counting them: a body announced but not arrived yet).
    pub fn admits_incoming(&self, n: usize) -> bool {
        self.incoming_fits(
            self.incoming.load(Relaxed).saturating_add(n),
            self.used().saturating_add(n),
        )
    }

    /// Whether partial messages of `incoming` bytes in all, with `used`
    /// bytes counted in all, are within the budget: their half of it, and
    /// the whole less what rings hold (rings give way: they are evicted,
    /// not in the way).
    fn incoming_fits(&self, incoming: usize, used: usize) -> bool {
        let limit = self.limit();
        incoming <= limit / 2 && used.saturating_sub(self.cached()) <= limit
    }

    /// Count `n` bytes that are held already (a frame that exists).
    pub fn charge(&self, n: usize) {
        self.used.fetch_add(n, Relaxed);
        self.relieve();
    }

    /// Stop counting `n` bytes.
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Relaxed);
    }

    /// `n` bytes counted already are now also held by a replay ring.
    pub fn cache(&self, n: usize) {
        self.cached.fetch_add(n, Relaxed);
    }

    /// A replay ring let go of `n` bytes (they may still be held elsewhere).
    pub fn uncache(&self, n: usize) {
        self.cached.fetch_sub(n, Relaxed);
    }

    /// Count `n` more bytes of a partial incoming message from the address
    /// of `share`, if the budget, the partial messages' half of it and the
    /// address's share all have room.
    pub fn try_charge_incoming(&self, n: usize, share: Option<&Share>) -> Result<(), Over> {
        if let Some(share) = share {
            let mine = share.incoming.fetch_add(n, Relaxed) + n;
            if mine > self.share_limit.load(Relaxed) / 2 {
                share.incoming.fetch_sub(n, Relaxed);
                return Err(Over::Share);
            }
        }
        let incoming = self.incoming.fetch_add(n, Relaxed) + n;
        let used = self.used.fetch_add(n, Relaxed) + n;
        if self.incoming_fits(incoming, used) {
            self.relieve();
            return Ok(());
        }
        self.release_incoming(n, share);
        Err(Over::Budget)
    }

    /// Stop counting `n` bytes of partial incoming messages.
    pub fn release_incoming(&self, n: usize, share: Option<&Share>) {
        if let Some(share) = share {
            share.incoming.fetch_sub(n, Relaxed);
        }
        self.incoming.fetch_sub(n, Relaxed);
        self.release(n);
    }

    /// Once the whole budget nears its limit (where joins would stop), evict
    /// replay ring entries down to a lower mark: the gap between the two
    /// makes evictions rare passes rather than one per message.
    #[inline(always)]
    fn relieve(&self) {
        let limit = self.limit();
        if self.cached() != 0 && self.used() > limit - limit / 16 {
            self.shed(limit - limit / 8);
        }
    }

    /// Evict down to `down_to`. Cold and out of line: every frame's making
    /// looks whether it is needed, and its frame must stay small.
    #[cold]
    #[inline(never)]
    fn shed(&self, down_to: usize) {
        if self.shedding.swap(true, Relaxed) {
            return;
        }
        let cache = self.cache.lock().as_ref().and_then(Weak::upgrade);
        if let Some(cache) = cache {
            cache.shed(down_to);
        }
        self.shedding.store(false, Relaxed);
    }

    /// Count a refusal for the budget, and say so once a minute.
    pub fn refuse(&self, what: &str) {
        self.refused.fetch_add(1, Relaxed);
        if self.throttle.ready() {
            log::warn!(
                "memory budget reached ({} of {} bytes in use): {what} (logged once a minute)",
                self.used(),
                self.limit()
            );
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new()
    }
}

/// The default budget: a quarter of the machine's memory, at most 1 GiB.
pub(crate) fn default_limit() -> usize {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ram = (pages.max(0) as usize).saturating_mul(size.max(0) as usize);
    match ram {
        0 => 1 << 30,
        ram => (ram / 4).min(1 << 30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_messages_take_at_most_half() {
        let b = Budget::new();
        b.set_limit(1000);
        assert!(b.try_charge_incoming(500, None).is_ok());
        assert_eq!(
            b.try_charge_incoming(1, None),
            Err(Over::Budget),
            "over half"
        );
        assert_eq!(b.used(), 500);
        b.charge(400);
        assert!(!b.is_full());
        b.release_incoming(500, None);
        b.charge(500);
        assert!(b.admits_joins());
        assert!(b.try_charge_incoming(100, None).is_ok());
        assert!(b.is_full());
        assert!(!b.admits_joins());
        assert!(
            b.try_charge_incoming(1, None).is_err(),
            "over the whole budget"
        );
        b.release(900);
        b.release_incoming(100, None);
        assert_eq!(b.used(), 0);
        assert!(!b.is_full());
    }

    #[test]
    fn an_address_takes_its_share_and_no_more() {
        let b = Budget::new();
        b.set_limit(1000);
        b.set_share_limit(250);
        let (one, other) = (Share::default(), Share::default());
        assert!(b.try_charge_incoming(100, Some(&one)).is_ok());
        assert_eq!(b.try_charge_incoming(26, Some(&one)), Err(Over::Share));
        assert!(b.try_charge_incoming(100, Some(&other)).is_ok());
        // Backlogs do not take from partial messages' part, nor the reverse.
        one.backlog(249, true);
        assert!(!b.is_over(&one));
        assert!(b.try_charge_incoming(25, Some(&one)).is_ok());
        one.backlog(1, true);
        assert!(!b.is_over(&one), "the budget is not half used");
        b.charge(300);
        assert!(b.is_over(&one) && !b.is_over(&other));
        b.release(300);
        one.backlog(250, false);
        b.release_incoming(125, Some(&one));
        b.release_incoming(100, Some(&other));
        assert_eq!(b.used(), 0);
        assert_eq!(one.incoming.load(Relaxed), 0);
    }

    #[test]
    fn rings_are_a_cache_that_refuses_nothing() {
        let b = Budget::new();
        b.set_limit(1000);
        b.charge(990);
        b.cache(990);
        assert!(b.admits_joins() && !b.is_full());
        assert!(b.try_charge_incoming(400, None).is_ok());
        b.release_incoming(400, None);
        b.uncache(990);
        assert!(!b.admits_joins());
        b.release(990);
    }
}
