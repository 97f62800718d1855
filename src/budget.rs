//! The process-wide memory budget (`[limits] memory_budget`, SPEC §3).
//!
//! Per-connection bounds alone let a few thousand clients pin gigabytes, so
//! the bytes that clients can make staps hold are counted in one place:
//! - partial incoming messages: each data frame's announced length, from the
//!   moment its header arrives (tungstenite reserves that much) until the
//!   message is complete, for messages larger than [`FREE`];
//! - every message frame while anything holds it (receivers' queues, writers'
//!   batches, replay rings), once however many receivers share it.
//!
//! Partial messages may take at most half of the budget, so that clients
//! stalling half-sent messages cannot stop delivery. When the budget is
//! reached, a new large message is refused (1009), receivers with a backlog
//! are treated as slow consumers, and replay rings are emptied; joins are
//! refused (503) when less than a sixteenth of it is left. Refusals are
//! logged once a minute and counted.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::logging::Throttle;

/// A partial message up to this size is not counted: it is the reader's own
/// small buffer, and refusing it would stop even chat-sized messages.
pub const FREE: usize = 4096;

/// Counters of the bytes in the budget.
pub struct Budget {
    limit: AtomicUsize,
    used: AtomicUsize,
    incoming: AtomicUsize,
    refused: AtomicU64,
    throttle: Throttle,
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
            refused: AtomicU64::new(0),
            throttle: Throttle::new(),
        }
    }

    /// Set the limit, in bytes (at startup).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Bytes counted now.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Times something was refused for the budget.
    pub fn refusals(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// Whether the budget is used up: new large messages are refused,
    /// backlogged receivers count as slow, replay rings are emptied.
    pub fn is_full(&self) -> bool {
        self.used() >= self.limit()
    }

    /// Whether a new client may join: a sixteenth of the budget must be left
    /// for it. Deliveries stop at the limit itself, so the count settles just
    /// below it while they are refused; joins must stop before that.
    pub fn admits_joins(&self) -> bool {
        let limit = self.limit();
        self.used() < limit - limit / 16
    }

    /// Count `n` bytes that are held already (a frame that exists).
    pub fn charge(&self, n: usize) {
        self.used.fetch_add(n, Relaxed);
    }

    /// Stop counting `n` bytes.
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Relaxed);
    }

    /// Count `n` more bytes of a partial incoming message, if both the
    /// budget and the partial messages' half of it have room.
    pub fn try_charge_incoming(&self, n: usize) -> bool {
        let limit = self.limit();
        let incoming = self.incoming.fetch_add(n, Relaxed) + n;
        let used = self.used.fetch_add(n, Relaxed) + n;
        if incoming <= limit / 2 && used <= limit {
            return true;
        }
        self.release_incoming(n);
        false
    }

    /// Stop counting `n` bytes of partial incoming messages.
    pub fn release_incoming(&self, n: usize) {
        self.incoming.fetch_sub(n, Relaxed);
        self.release(n);
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
pub fn default_limit() -> usize {
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
        assert!(b.try_charge_incoming(500));
        assert!(!b.try_charge_incoming(1), "over half for partial messages");
        assert_eq!(b.used(), 500);
        b.charge(400);
        assert!(!b.is_full());
        b.release_incoming(500);
        b.charge(500);
        assert!(b.admits_joins());
        assert!(b.try_charge_incoming(100));
        assert!(b.is_full());
        assert!(!b.admits_joins());
        assert!(!b.try_charge_incoming(1), "over the whole budget");
        b.release(900);
        b.release_incoming(100);
        assert_eq!(b.used(), 0);
        assert!(!b.is_full());
    }
}
