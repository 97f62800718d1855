//! The link from local channels to the relay thread (`relay.rs`): the
//! bounded queue of messages for the broker, and the relay's state. What the
//! rest of staps holds, without the broker thread or its AMQP client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use uuid::Uuid;

use crate::hub::channels::Control;
use crate::memory::stats;
use crate::proto::frame::Frame;

/// A message a local client published, on its way to the broker.
pub(crate) struct Outbound {
    /// The channel.
    pub path: Arc<str>,
    /// The message.
    pub frame: Frame,
    /// The client that sent it (0.1.x's `correlation_id`).
    pub sender: Uuid,
}

/// The relay's state, as the counters show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum State {
    /// Not connected: connecting or waiting to retry.
    Down = 1,
    /// Connected, bindings in place.
    Up = 2,
}

/// The handle the rest of staps holds: where to send what goes to the broker.
pub(crate) struct Link {
    outbound: Sender<Outbound>,
    control: Sender<Control>,
    state: AtomicU8,
    /// The broker's nodes, by URL without credentials, in the order they
    /// are tried.
    nodes: Vec<String>,
    /// The node connected to: its index + 1, 0 for none.
    node: AtomicUsize,
    /// This instance's id, sent as `app_id`.
    pub instance: Uuid,
}

/// The relay thread's ends of the queues, until it starts.
pub(crate) struct Ends {
    /// Messages for the broker.
    pub outbound: Receiver<Outbound>,
    /// Binds and unbinds from the registry.
    pub control: Receiver<Control>,
}

/// Messages waiting for the broker at most; more are counted as relay
/// dropped. A burst of this many fits while the relay publishes (about 30 µs
/// a message); a broker slower than the clients for longer loses them.
const OUTBOUND: usize = 4096;

impl Link {
    /// A relay handle to a broker of `nodes` (URLs without credentials),
    /// and the ends its thread will read.
    pub(crate) fn new(nodes: Vec<String>) -> (Link, Ends) {
        let (outbound_tx, outbound_rx) = crossbeam_channel::bounded(OUTBOUND);
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let relay = Link {
            outbound: outbound_tx,
            control: control_tx,
            state: AtomicU8::new(State::Down as u8),
            nodes,
            node: AtomicUsize::new(0),
            instance: Uuid::new_v4(),
        };
        (
            relay,
            Ends {
                outbound: outbound_rx,
                control: control_rx,
            },
        )
    }

    /// The queue for binds and unbinds, for the registry.
    pub(crate) fn control(&self) -> Sender<Control> {
        self.control.clone()
    }

    /// Hand a message from local client `sender` on `path` to the broker. Never
    /// waits: when the relay is down or behind, the message is counted as dropped.
    pub(crate) fn publish(
        &self,
        path: &Arc<str>,
        frame: &Frame,
        sender: Uuid,
        stats: &stats::Stats,
    ) {
        if self.state() != State::Up {
            stats::add(&stats.relay_dropped, 1);
            return;
        }
        let message = Outbound {
            path: Arc::clone(path),
            frame: frame.clone(),
            sender,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.outbound.try_send(message)
        {
            stats::add(&stats.relay_dropped, 1);
        }
    }

    /// The state's name for counters and `/healthz`: `down` or `up`
    /// (`off` is the name when there is no link).
    pub(crate) fn state_name(link: Option<&Link>) -> &'static str {
        match link.map(Link::state) {
            None => "off",
            Some(State::Down) => "down",
            Some(State::Up) => "up",
        }
    }

    /// Whether the broker is connected.
    pub(crate) fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            2 => State::Up,
            _ => State::Down,
        }
    }

    /// For the relay thread: connected to node `node` (an index of
    /// [`Link::nodes`]), or not connected.
    pub(crate) fn set_node(&self, node: Option<usize>) {
        self.node
            .store(node.map_or(0, |n| n + 1), Ordering::Relaxed);
        let state = if node.is_some() {
            State::Up
        } else {
            State::Down
        };
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// The broker's nodes, in the order they are tried.
    pub(crate) fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The node connected to, if any.
    pub(crate) fn node(&self) -> Option<&str> {
        let n = self.node.load(Ordering::Relaxed).checked_sub(1)?;
        self.nodes.get(n).map(String::as_str)
    }
}
