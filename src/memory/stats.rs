//! Counters of a running instance, logged on SIGUSR1 and at exit.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::memory::budget::BUDGET;

/// Monotonic counters, and the event loop's gauge. The other gauges
/// (connections now, channels) live in the registry.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Members whose client is silent, waiting in the event loop without a
    /// thread (a gauge, kept by the loop).
    pub resting: AtomicU64,
    /// Websocket clients accepted since start.
    pub connections_total: AtomicU64,
    /// Connections turned away before or during the handshake (limits, errors).
    pub refused: AtomicU64,
    /// Messages received from clients.
    pub messages_in: AtomicU64,
    /// Deliveries queued to receivers (one message to ten receivers counts ten).
    pub messages_out: AtomicU64,
    /// Payload bytes of the messages received from clients.
    pub bytes_in: AtomicU64,
    /// Payload bytes of the deliveries queued to receivers.
    pub bytes_out: AtomicU64,
    /// Deliveries dropped under `slow_client = drop`.
    pub dropped: AtomicU64,
    /// Receivers closed under `slow_client = disconnect`.
    pub slow_disconnects: AtomicU64,
    /// Messages the relay published to the broker.
    pub relay_published: AtomicU64,
    /// Messages from other instances the relay delivered here.
    pub relay_received: AtomicU64,
    /// Messages not relayed: the broker was away or the relay behind.
    pub relay_dropped: AtomicU64,
    /// Times the relay connected again after losing the broker.
    pub relay_reconnects: AtomicU64,
    /// Messages from the broker over `max_message_size`, not delivered.
    pub oversize_dropped: AtomicU64,
    /// Clients refused: their address held `max_connections_per_address`.
    pub address_refusals: AtomicU64,
    /// Messages and bodies refused: their address held its share of the budget.
    pub address_memory_refusals: AtomicU64,
    /// Messages and bodies closed for arriving slower than `min_rate`.
    pub rate_closes: AtomicU64,
}

/// Add `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

impl Stats {
    /// One line of `key=value` pairs; `clients`, `channels` and `relay` (off,
    /// down, up) are the gauges.
    pub(crate) fn line(&self, clients: usize, channels: usize, relay: &str) -> String {
        let get = |c: &AtomicU64| c.load(Relaxed);
        format!(
            "connections={clients} connections_total={} channels={channels} refused={} \
             messages_in={} messages_out={} dropped={} slow_disconnects={} relay={relay} \
             relay_published={} relay_received={} relay_dropped={} relay_reconnects={} \
             oversize_dropped={} memory_used={} memory_refusals={} address_refusals={} \
             address_memory_refusals={} rate_closes={}",
            get(&self.connections_total),
            get(&self.refused),
            get(&self.messages_in),
            get(&self.messages_out),
            get(&self.dropped),
            get(&self.slow_disconnects),
            get(&self.relay_published),
            get(&self.relay_received),
            get(&self.relay_dropped),
            get(&self.relay_reconnects),
            get(&self.oversize_dropped),
            BUDGET.used(),
            BUDGET.refusals(),
            get(&self.address_refusals),
            get(&self.address_memory_refusals),
            get(&self.rate_closes),
        )
    }
}
