//! Counters of a running instance, logged on SIGUSR1 and at exit.

use std::fmt::Write as _;
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

/// How a counter shows: its key in the line of counters (SIGUSR1, and at
/// exit; `None`: only on /metrics), and its /metrics family (after
/// `staps_`), labels and the family's help (given by its first sample). The
/// one place a counter is named beside its field.
pub(crate) struct Shown {
    pub(crate) key: Option<&'static str>,
    pub(crate) family: &'static str,
    pub(crate) labels: &'static str,
    pub(crate) help: &'static str,
    /// On /metrics only when instances are linked.
    pub(crate) relay: bool,
    pub(crate) value: fn(&Stats) -> u64,
}

const DROPPED: &str = "Messages not delivered, by reason: slow_client (a full queue under \
    slow_client = drop; per receiver), relay (not handed to the broker), oversize (from the \
    broker, over max_message_size).";

const LIMITS: &str = "Clients and messages turned away by a limit, by reason: address (the \
    client address holds max_connections_per_address), address_memory (it holds its share of \
    memory_budget), rate (a message or body slower than min_rate), budget (the memory budget).";

/// Every counter, in the order /metrics and the line show them; a family's
/// samples follow each other.
pub(crate) const COUNTERS: &[Shown] = &[
    Shown {
        key: Some("connections_total"),
        family: "connections_total",
        labels: "",
        help: "Clients accepted: websocket members and HTTP streaming listeners.",
        relay: false,
        value: |s| get(&s.connections_total),
    },
    Shown {
        key: Some("refused"),
        family: "refused_total",
        labels: "",
        help: "Connections turned away: limits, bad requests, shutdown, no descriptors.",
        relay: false,
        value: |s| get(&s.refused),
    },
    Shown {
        key: Some("messages_in"),
        family: "messages_in_total",
        labels: "",
        help: "Messages received from clients.",
        relay: false,
        value: |s| get(&s.messages_in),
    },
    Shown {
        key: Some("messages_out"),
        family: "messages_out_total",
        labels: "",
        help: "Deliveries queued to receivers (a message to ten receivers counts ten).",
        relay: false,
        value: |s| get(&s.messages_out),
    },
    Shown {
        key: None,
        family: "bytes_in_total",
        labels: "",
        help: "Payload bytes received from clients.",
        relay: false,
        value: |s| get(&s.bytes_in),
    },
    Shown {
        key: None,
        family: "bytes_out_total",
        labels: "",
        help: "Payload bytes of the deliveries queued to receivers.",
        relay: false,
        value: |s| get(&s.bytes_out),
    },
    Shown {
        key: Some("slow_disconnects"),
        family: "slow_disconnects_total",
        labels: "",
        help: "Receivers closed with 1008 under slow_client = disconnect.",
        relay: false,
        value: |s| get(&s.slow_disconnects),
    },
    Shown {
        key: Some("dropped"),
        family: "dropped_total",
        labels: "{reason=\"slow_client\"}",
        help: DROPPED,
        relay: false,
        value: |s| get(&s.dropped),
    },
    Shown {
        key: Some("relay_dropped"),
        family: "dropped_total",
        labels: "{reason=\"relay\"}",
        help: DROPPED,
        relay: false,
        value: |s| get(&s.relay_dropped),
    },
    Shown {
        key: Some("oversize_dropped"),
        family: "dropped_total",
        labels: "{reason=\"oversize\"}",
        help: DROPPED,
        relay: false,
        value: |s| get(&s.oversize_dropped),
    },
    Shown {
        key: Some("memory_refusals"),
        family: "memory_refusals_total",
        labels: "",
        help: "Large messages (1009) and joins (503) refused because the memory budget was \
               used up.",
        relay: false,
        value: |_| BUDGET.refusals(),
    },
    Shown {
        key: Some("address_refusals"),
        family: "limit_refusals_total",
        labels: "{reason=\"address\"}",
        help: LIMITS,
        relay: false,
        value: |s| get(&s.address_refusals),
    },
    Shown {
        key: Some("address_memory_refusals"),
        family: "limit_refusals_total",
        labels: "{reason=\"address_memory\"}",
        help: LIMITS,
        relay: false,
        value: |s| get(&s.address_memory_refusals),
    },
    Shown {
        key: Some("rate_closes"),
        family: "limit_refusals_total",
        labels: "{reason=\"rate\"}",
        help: LIMITS,
        relay: false,
        value: |s| get(&s.rate_closes),
    },
    Shown {
        key: None,
        family: "limit_refusals_total",
        labels: "{reason=\"budget\"}",
        help: LIMITS,
        relay: false,
        value: |_| BUDGET.refusals(),
    },
    Shown {
        key: Some("relay_published"),
        family: "relay_published_total",
        labels: "",
        help: "Messages published to the broker.",
        relay: true,
        value: |s| get(&s.relay_published),
    },
    Shown {
        key: Some("relay_received"),
        family: "relay_received_total",
        labels: "",
        help: "Messages from other instances delivered here.",
        relay: true,
        value: |s| get(&s.relay_received),
    },
    Shown {
        key: Some("relay_reconnects"),
        family: "relay_reconnects_total",
        labels: "",
        help: "Times the relay connected again after losing the broker.",
        relay: true,
        value: |s| get(&s.relay_reconnects),
    },
];

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Relaxed)
}

impl Stats {
    /// One line of `key=value` pairs: the gauges `clients`, `channels`,
    /// `relay` (off, down, up) and the memory used, then every counter
    /// that has a key.
    pub(crate) fn line(&self, clients: usize, channels: usize, relay: &str) -> String {
        let mut line = format!(
            "connections={clients} channels={channels} relay={relay} memory_used={}",
            BUDGET.used()
        );
        for shown in COUNTERS {
            if let Some(key) = shown.key {
                let _ = write!(line, " {key}={}", (shown.value)(self));
            }
        }
        line
    }
}
