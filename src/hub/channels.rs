//! The registry of channels and the fan-out of one message to a channel's members.
//!
//! A channel is a list of `Peer`s (`peer.rs`), each with its own unbounded
//! crossbeam queue. Publishing encodes the message once into a [`Frame`] and
//! pushes a reference to it onto every other member's queue, to be sent by
//! the publisher itself or by the receiver's writer (`peer.rs` says who); it
//! never blocks unless the channel is lossless (`slow_client = wait`), so a
//! slow receiver costs the others nothing. The queue bounds (`queue_bytes`,
//! `queue_length`) are enforced by the peer, not by crossbeam: a bounded
//! crossbeam channel allocates all its slots up front, which idle
//! connections should not pay.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};

use crate::config::{Limits, SlowClient};
use crate::hub::peer::{Close, Delivery, Flushes, Peer};
use crate::memory::budget::{BUDGET, Cache};
use crate::memory::stats::{self, Stats};
use crate::proto::frame::Frame;
use crate::proto::query::Options;
use crate::proto::wire::Encodings;

/// The members of one channel path.
#[derive(Debug)]
pub(crate) struct Channel {
    state: Mutex<State>,
    /// Most members, set by the client that created the channel (`max=N`).
    cap: Option<usize>,
    /// The slow-client policy, if the creator chose one (`slow=`).
    slow: Option<SlowClient>,
    /// How long it keeps its ring and relay binding once emptied, as its
    /// creator asked (`linger=S`); zero: it goes with its last member.
    linger: Duration,
    /// The creator's client address, whose lingering channels the budget
    /// ends first when that address holds the most of them.
    owner: Option<IpAddr>,
}

#[derive(Debug, Default)]
struct State {
    /// Copy-on-write: publishing clones the `Arc` and sends without holding the lock;
    /// joins and leaves (rare next to messages) build a new list.
    members: Arc<[Arc<Peer>]>,
    /// The last messages, local and relayed, for clients that join with
    /// `replay=N` or resume; gone with the channel.
    ring: Ring,
    /// While it lingers, emptied: until when, and what the budget counts
    /// for it.
    lingers: Option<(Instant, usize)>,
}

/// What the memory budget counts for a lingering channel besides its ring
/// (the channel, its place in the registry and among the lingering ones),
/// and its path: a cache like its ring, so that channels nobody listens to
/// cannot hold memory others need.
const LINGER_COST: usize = 512;

/// A channel's replay ring: its last `replay_length` messages within
/// `replay_bytes`, each with its id; ids grow across all channels, so the
/// memory budget can evict the oldest of all rings first. Its bytes count
/// as the budget's cache ([`crate::memory::budget::Cache`]).
#[derive(Debug, Default)]
struct Ring {
    frames: VecDeque<(u64, Frame)>,
    /// Bytes of the frames in it.
    bytes: usize,
}

/// The id of the next message a channel of this instance carries (SPEC
/// §11). Ids start at the instance's start time in microseconds and grow by
/// one per message, so that no restart gives an id again (an instance would
/// have to carry a message per microsecond for that): an id a listener
/// brings from an earlier start, or from another instance, is simply not
/// held here.
static NEXT_ID: LazyLock<AtomicU64> = LazyLock::new(|| {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    AtomicU64::new(now.max(1))
});

impl Ring {
    /// Keep `frame`, dropping the oldest to stay within the bounds. A frame
    /// larger than the ring empties it: replay must never skip a message,
    /// so it gives fewer, all of them the most recent.
    fn keep(&mut self, id: u64, frame: &Frame, limits: &Limits) {
        let len = frame.as_bytes().len();
        if len > limits.replay_bytes {
            self.clear();
            return;
        }
        while self.frames.len() >= limits.replay_length || self.bytes + len > limits.replay_bytes {
            if !self.evict() {
                break;
            }
        }
        self.frames.push_back((id, frame.clone()));
        self.bytes += len;
        BUDGET.cache(len);
    }

    /// Let go of the oldest entry; false when there was none.
    fn evict(&mut self) -> bool {
        let Some((_, old)) = self.frames.pop_front() else {
            return false;
        };
        let len = old.as_bytes().len();
        self.bytes -= len;
        BUDGET.uncache(len);
        true
    }

    /// The sequence number of the oldest entry.
    fn oldest(&self) -> Option<u64> {
        self.frames.front().map(|(seq, _)| *seq)
    }

    fn clear(&mut self) {
        while self.evict() {}
    }

    /// The last `n` messages, oldest first.
    fn last(&self, n: usize) -> impl Iterator<Item = &(u64, Frame)> {
        let skip = self.frames.len().saturating_sub(n);
        self.frames.iter().skip(skip)
    }

    /// The messages after the one of id `since`, oldest first, if the ring
    /// still holds that one.
    fn after(&self, since: u64) -> Option<impl Iterator<Item = &(u64, Frame)>> {
        let at = self.frames.iter().position(|(id, _)| *id == since)?;
        Some(self.frames.iter().skip(at + 1))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        BUDGET.uncache(self.bytes);
    }
}

impl State {
    /// End its linger if `over` says so of its end: its ring goes, and
    /// what the budget counted for it. Whether it did.
    fn end_linger(&mut self, over: impl Fn(Instant) -> bool) -> bool {
        match self.lingers {
            Some((until, cost)) if self.members.is_empty() && over(until) => {
                self.lingers = None;
                self.ring.clear();
                uncount(cost);
                true
            }
            _ => false,
        }
    }
}

/// The budget no longer counts `cost` for a lingering channel.
fn uncount(cost: usize) {
    BUDGET.uncache(cost);
    BUDGET.release(cost);
}

impl Channel {
    /// How many members the channel has here that receive its messages
    /// (a publish-only twin's client does not).
    pub(crate) fn clients(&self) -> usize {
        self.state
            .lock()
            .members
            .iter()
            .filter(|p| p.listens())
            .count()
    }

    /// The slow-client policy of its members.
    pub(crate) fn policy(&self, limits: &Limits) -> SlowClient {
        self.slow.unwrap_or(limits.slow_client)
    }

    /// Send `frame` to every member but `from` (unless it asked for its own
    /// messages), each in its wire format. Never blocks, but for room under
    /// `slow_client = wait`. The sends this caller owes go to `flushes`.
    /// Returns how many members it was queued for.
    pub(crate) fn publish(
        &self,
        from: u64,
        frame: &Frame,
        limits: &Limits,
        stats: &Stats,
        flushes: &mut Flushes,
    ) -> u64 {
        let policy = self.policy(limits);
        let (id, members) = {
            let mut state = self.state.lock();
            // Under the lock: the ring holds a channel's messages in the
            // order of their ids.
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            if limits.replay_length > 0 {
                state.ring.keep(id, frame, limits);
            }
            (id, Arc::clone(&state.members))
        };
        if policy == SlowClient::Wait && flushes.may_wait() {
            let len = frame.as_bytes().len();
            for peer in members.iter().filter(|p| p.hears(from)) {
                peer.note_if_full(len, limits);
            }
        }
        let (mut queued, mut dropped, mut kicked) = (0, 0, 0);
        let mut encodings = Encodings::new(frame, id);
        for peer in members.iter().filter(|p| p.hears(from)) {
            match peer.deliver(encodings.get(peer.wire), limits, policy, flushes) {
                Delivery::Queued => queued += 1,
                Delivery::Dropped => dropped += 1,
                Delivery::Disconnected => kicked += 1,
                Delivery::Skipped => {}
            }
        }
        stats::add(&stats.messages_out, queued);
        stats::add(&stats.bytes_out, queued * frame.payload().len() as u64);
        if dropped > 0 {
            stats::add(&stats.dropped, dropped);
        }
        if kicked > 0 {
            stats::add(&stats.slow_disconnects, kicked);
            log::debug!("closed {kicked} slow consumer(s)");
        }
        queued
    }
}

/// What the registry tells the relay. Sent while the registry is locked, so
/// the order of binds and unbinds is the order of the channels' lives.
#[derive(Debug)]
pub(crate) enum Control {
    /// The first local client joined channel `path`.
    Bind(Arc<str>),
    /// The last local client left channel `path`.
    Unbind(Arc<str>),
}

/// Why a client could not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinError {
    /// `max_connections` reached.
    ServerFull,
    /// `max_clients_per_channel` reached.
    ChannelFull,
    /// The server is shutting down.
    ShuttingDown,
    /// The memory budget is used up.
    MemoryFull,
}

#[derive(Default)]
struct Inner {
    channels: HashMap<Arc<str>, Arc<Channel>>,
    clients: usize,
    stopping: bool,
    /// Emptied channels that linger, by when their linger ends, soonest
    /// first. An entry whose channel was joined again, or lingers anew
    /// until later, is passed over when it comes up.
    lingering: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
}

/// All channels of this instance.
#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    /// Signalled when the last client leaves, for a graceful shutdown.
    empty: Condvar,
    /// Signalled when a channel starts to linger ([`Registry::end_lingers`]).
    linger_due: Condvar,
    /// Where channels' births and deaths go when a relay links instances.
    relay: Option<Sender<Control>>,
}

impl Registry {
    /// A registry that tells `relay` (when there is one) which channels exist.
    pub(crate) fn new(relay: Option<Sender<Control>>) -> Registry {
        Registry {
            relay,
            ..Registry::default()
        }
    }

    /// Tell the relay, under the registry lock so that the order is kept.
    fn tell_relay(&self, control: impl FnOnce() -> Control) {
        if let Some(relay) = &self.relay {
            // Unbounded: bindings must never be lost; there are no more of them
            // than channel births and deaths.
            let _ = relay.send(control());
        }
    }

    /// The channel `path`, if it has local members.
    pub(crate) fn get(&self, path: &str) -> Option<Arc<Channel>> {
        self.inner.lock().channels.get(path).cloned()
    }

    /// Add `peer`, from client address `from`, to channel `path`, creating
    /// the channel if it is new.
    pub(crate) fn join(
        &self,
        path: &Arc<str>,
        peer: &Arc<Peer>,
        from: Option<IpAddr>,
        options: &Options,
        limits: &Limits,
    ) -> Result<Arc<Channel>, JoinError> {
        let mut inner = self.inner.lock();
        if inner.stopping {
            return Err(JoinError::ShuttingDown);
        }
        if limits.max_connections > 0 && inner.clients >= limits.max_connections {
            return Err(JoinError::ServerFull);
        }
        if !BUDGET.admits_joins() {
            BUDGET.refuse("new clients get 503");
            return Err(JoinError::MemoryFull);
        }
        let channel = match inner.channels.get(path) {
            Some(channel) => Arc::clone(channel),
            None => {
                let channel = Arc::new(Channel {
                    state: Mutex::default(),
                    cap: options.max,
                    slow: options.slow,
                    linger: options.linger,
                    owner: from,
                });
                inner
                    .channels
                    .insert(Arc::clone(path), Arc::clone(&channel));
                self.tell_relay(|| Control::Bind(Arc::clone(path)));
                channel
            }
        };
        let mut state = channel.state.lock();
        if let Some((_, cost)) = state.lingers.take() {
            uncount(cost);
        }
        let members = state.members.len();
        if (limits.max_clients_per_channel > 0 && members >= limits.max_clients_per_channel)
            || channel.cap.is_some_and(|cap| members >= cap)
        {
            // Caps are at least 1, so the channel already had members.
            return Err(JoinError::ChannelFull);
        }
        state.members = state
            .members
            .iter()
            .cloned()
            .chain([Arc::clone(peer)])
            .collect();
        // Under the channel's lock: the replayed messages come before any new one.
        // Its 101 is not out yet: what is queued goes out once it is.
        let mut flushes = Flushes::new(false);
        let policy = channel.policy(limits);
        let ring = &state.ring;
        // A resume from an id not held: the listener may have missed
        // messages; it is told so, then gets all that is held.
        let (gap, entries): (bool, Vec<&(u64, Frame)>) = match options.since {
            None => (false, ring.last(options.replay).collect()),
            Some(since) => match ring.after(since) {
                Some(after) => (false, after.collect()),
                None => (true, ring.last(usize::MAX).collect()),
            },
        };
        if let Some(gap) = peer.wire.gap().filter(|_| gap) {
            peer.deliver(&gap, limits, policy, &mut flushes);
        }
        for (id, frame) in entries {
            let mut encodings = Encodings::new(frame, *id);
            peer.deliver(encodings.get(peer.wire), limits, policy, &mut flushes);
        }
        drop(state);
        inner.clients += 1;
        Ok(channel)
    }

    /// Remove `peer` from channel `path`; the channel goes with its last member.
    /// Returns whether that was the instance's last client.
    pub(crate) fn leave(&self, path: &str, channel: &Arc<Channel>, peer: &Peer) -> bool {
        let mut inner = self.inner.lock();
        let mut state = channel.state.lock();
        let before = state.members.len();
        state.members = state
            .members
            .iter()
            .filter(|p| p.id != peer.id)
            .cloned()
            .collect();
        if state.members.len() == before {
            return false;
        }
        if state.members.is_empty() {
            let key = inner
                .channels
                .get_key_value(path)
                .map(|(k, _)| Arc::clone(k));
            match key {
                Some(path) if !channel.linger.is_zero() && !inner.stopping => {
                    let until = Instant::now() + channel.linger;
                    let cost = LINGER_COST + path.len();
                    state.lingers = Some((until, cost));
                    inner.lingering.push(Reverse((until, path)));
                    self.linger_due.notify_one();
                    BUDGET.charge(cost);
                    BUDGET.cache(cost);
                }
                _ => self.remove(&mut inner, path),
            }
        }
        drop(state);
        inner.clients -= 1;
        if inner.clients == 0 {
            self.empty.notify_all();
        }
        inner.clients == 0
    }

    /// Channel `path` is gone: the relay no longer needs its binding.
    fn remove(&self, inner: &mut Inner, path: &str) {
        if let Some((path, _)) = inner.channels.remove_entry(path) {
            self.tell_relay(|| Control::Unbind(path));
        }
    }

    /// End the lingers that are due, for ever: the work of the thread that
    /// `run` starts for it. Nothing of a channel survives its linger.
    pub(crate) fn end_lingers(&self) {
        let mut inner = self.inner.lock();
        loop {
            let now = Instant::now();
            let due = match inner.lingering.peek() {
                Some(Reverse((due, _))) if *due <= now => None,
                Some(Reverse((due, _))) => Some(*due),
                None => {
                    self.linger_due.wait(&mut inner);
                    continue;
                }
            };
            if let Some(due) = due {
                self.linger_due.wait_until(&mut inner, due);
                continue;
            }
            if let Some(Reverse((_, path))) = inner.lingering.pop() {
                let ended = inner
                    .channels
                    .get(&path)
                    .is_some_and(|channel| channel.state.lock().end_linger(|until| until <= now));
                if ended {
                    self.remove(&mut inner, &path);
                }
            }
        }
    }

    /// Clients and channels now.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.clients, inner.channels.len())
    }

    /// Refuse new clients and start closing every member with `close`.
    pub(crate) fn close_all(&self, close: Close) {
        // Collected under the locks, closed after them: closing empties queues
        // and may start writer threads, which no lock should wait for.
        let members: Vec<Arc<[Arc<Peer>]>> = {
            let mut inner = self.inner.lock();
            inner.stopping = true;
            inner
                .channels
                .values()
                .map(|channel| Arc::clone(&channel.state.lock().members))
                .collect()
        };
        for peer in members.iter().flat_map(|m| m.iter()) {
            peer.close(close);
        }
    }

    /// Wait until every client has left, or `deadline`; true when all left.
    pub(crate) fn wait_empty(&self, deadline: Instant) -> bool {
        let mut inner = self.inner.lock();
        while inner.clients > 0 {
            if self.empty.wait_until(&mut inner, deadline).timed_out() {
                return inner.clients == 0;
            }
        }
        true
    }
}

/// A lingering channel as the budget weighs it: when its linger ends, its
/// path, and the bytes it holds.
type Lingering = (Instant, Arc<str>, usize);

/// The lingering channels, by their creator's address: what each address's
/// hold in all, and its channels, the one whose linger ends soonest last.
/// Channels whose state is busy are left out (see [`Registry::shed`]).
fn lingering_by_owner(inner: &Inner) -> Vec<(usize, Vec<Lingering>)> {
    let mut owners: HashMap<Option<IpAddr>, Vec<Lingering>> = HashMap::new();
    for Reverse((_, path)) in &inner.lingering {
        let Some(channel) = inner.channels.get(path) else {
            continue;
        };
        let Some(state) = channel.state.try_lock() else {
            continue;
        };
        if let Some((until, cost)) = state.lingers {
            let bytes = cost + state.ring.bytes;
            let owner = owners.entry(channel.owner).or_default();
            owner.push((until, Arc::clone(path), bytes));
        }
    }
    owners
        .into_values()
        .map(|mut channels| {
            // A channel that lingered again is in the heap twice.
            channels.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            channels.dedup_by(|a, b| a.1 == b.1);
            (channels.iter().map(|c| c.2).sum(), channels)
        })
        .collect()
}

impl Cache for Registry {
    /// Evict ring entries across all channels, oldest first. Only locks
    /// that are free are taken: this runs wherever a frame is made, under
    /// whatever lock its maker holds, and a channel that is busy is passed.
    ///
    /// Lingering channels go first, whole: nobody listens to them now. They
    /// go address by address, the one whose lingering channels hold the
    /// most first, so that an address that makes many cannot end everyone
    /// else's; within an address, those whose linger ends soonest first.
    fn shed(&self, down_to: usize) {
        let Some(mut inner) = self.inner.try_lock() else {
            return;
        };
        let mut owners = lingering_by_owner(&inner);
        let mut ended = 0;
        while BUDGET.used() > down_to {
            // The owner holding the most; its channel that ends soonest.
            let Some(owner) = owners.iter_mut().max_by_key(|(held, _)| *held) else {
                break;
            };
            let Some((_, path, bytes)) = owner.1.pop() else {
                break;
            };
            owner.0 -= bytes;
            if owner.1.is_empty() {
                owners.retain(|(_, channels)| !channels.is_empty());
            }
            let end = inner.channels.get(&path).is_some_and(|channel| {
                channel
                    .state
                    .try_lock()
                    .is_some_and(|mut state| state.end_linger(|_| true))
            });
            if end {
                self.remove(&mut inner, &path);
                ended += 1;
            }
        }
        if ended > 0 {
            log::debug!("memory budget: ended {ended} lingering channels");
        }
        let channels: Vec<Arc<Channel>> = inner.channels.values().cloned().collect();
        drop(inner);
        let mut oldest: BinaryHeap<Reverse<(u64, usize)>> = channels
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some(Reverse((c.state.try_lock()?.ring.oldest()?, i))))
            .collect();
        let mut evicted = 0;
        while BUDGET.used() > down_to {
            let Some(Reverse((_, i))) = oldest.pop() else {
                break;
            };
            let Some(mut state) = channels[i].state.try_lock() else {
                continue;
            };
            if state.ring.evict() {
                evicted += 1;
            }
            if let Some(seq) = state.ring.oldest() {
                oldest.push(Reverse((seq, i)));
            }
        }
        log::debug!("memory budget: evicted {evicted} replayable messages");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::peer::Hears;
    use crate::proto::wire::Wire;
    use std::sync::atomic::Ordering;

    #[test]
    fn channels_vanish_with_their_last_member_and_limits_hold() {
        let reg = Registry::default();
        let limits = Limits {
            max_clients_per_channel: 2,
            max_connections: 3,
            ..Limits::default()
        };
        let peers: Vec<_> = (0..4)
            .map(|i| Peer::new(i, Hears::Others, Wire::WebSocket, None))
            .collect();
        let a = reg
            .join(&"/a".into(), &peers[0], None, &Options::default(), &limits)
            .unwrap();
        reg.join(&"/a".into(), &peers[1], None, &Options::default(), &limits)
            .unwrap();
        assert_eq!(
            reg.join(&"/a".into(), &peers[2], None, &Options::default(), &limits)
                .unwrap_err(),
            JoinError::ChannelFull
        );
        let b = reg
            .join(&"/b".into(), &peers[2], None, &Options::default(), &limits)
            .unwrap();
        assert_eq!(
            reg.join(&"/c".into(), &peers[3], None, &Options::default(), &limits)
                .unwrap_err(),
            JoinError::ServerFull
        );
        assert_eq!(reg.counts(), (3, 2));
        reg.leave("/b", &b, &peers[2]);
        reg.leave("/a", &a, &peers[0]);
        reg.leave("/a", &a, &peers[0]);
        assert_eq!(reg.counts(), (1, 1));
        reg.leave("/a", &a, &peers[1]);
        assert_eq!(reg.counts(), (0, 0));
    }

    #[test]
    fn slow_receivers_are_closed_or_skipped_never_blocking() {
        let stats = Stats::default();
        let reg = Registry::default();
        for policy in [SlowClient::Disconnect, SlowClient::Drop] {
            let limits = Limits {
                queue_length: 2,
                slow_client: policy,
                ..Limits::default()
            };
            let sender = Peer::new(10, Hears::Others, Wire::WebSocket, None);
            let slow = Peer::new(11, Hears::Others, Wire::WebSocket, None);
            let ch = reg
                .join(&"/s".into(), &sender, None, &Options::default(), &limits)
                .unwrap();
            reg.join(&"/s".into(), &slow, None, &Options::default(), &limits)
                .unwrap();
            let frame = Frame::message(crate::proto::frame::Kind::Text, b"x");
            for _ in 0..5 {
                ch.publish(sender.id, &frame, &limits, &stats, &mut Flushes::new(true));
            }
            // A slow consumer's queue is emptied the moment it is closed.
            let closed = policy == SlowClient::Disconnect;
            assert_eq!(slow.queued_bytes(), if closed { 0 } else { 6 });
            assert_eq!(slow.is_closing(), closed);
            reg.leave("/s", &ch, &sender);
            reg.leave("/s", &ch, &slow);
        }
        assert_eq!(stats.slow_disconnects.load(Ordering::Relaxed), 1);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 3);
    }
}
