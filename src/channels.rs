//! The registry of channels and the fan-out of one message to a channel's members.
//!
//! A channel is a list of [`Peer`]s, each with its own unbounded crossbeam queue
//! that only its writer thread reads. Publishing encodes the message once into a
//! [`Frame`] and pushes a reference to it onto every other member's queue; it
//! never blocks, so a slow receiver costs the others nothing. The queue bound
//! (`queue_length`) is enforced here, not by crossbeam: a bounded crossbeam
//! channel allocates all its slots up front, which idle connections should not pay.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use parking_lot::{Condvar, Mutex};

use crate::budget::BUDGET;
use crate::config::{Limits, SlowClient};
use crate::frame::Frame;
use crate::http::Options;
use crate::stats::{self, Stats};

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
/// frame queued, a close, or the first ping (`launch` holds how, once the
/// `101` answer is out). A client that only sends and then leaves, the common
/// short-lived one, never costs a second thread, and one that receives costs
/// none of the writer's own wake-ups before its first frame.
#[derive(Debug)]
pub struct Peer {
    /// Unique for the life of the process.
    pub id: u64,
    /// Receives its own messages too (`echo=1`).
    echo: bool,
    tx: Sender<Out>,
    /// The queue's other end, for emptying it the moment the peer closes.
    rx: Receiver<Out>,
    /// Bytes of the frames in the queue.
    queued: AtomicUsize,
    closing: AtomicBool,
    close: Mutex<Option<Close>>,
    writer: OnceLock<Thread>,
    idle: AtomicBool,
    /// The reader thread is finished with the connection.
    reader_done: AtomicBool,
    /// How to start the writer while it has not started.
    launch: Mutex<Option<Launch>>,
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
            launch: Mutex::new(None),
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
        *self.launch.lock() = Some(launch);
        // The lock orders this against `queue`: a sender either queued before
        // it took the lock (and the queue is not empty here) or finds `launch`.
        if !self.tx.is_empty() {
            self.start_writer();
        }
    }

    /// Start the writer unless it has started (or cannot yet).
    pub fn start_writer(&self) {
        // Taken out first: starting may fail and close the peer, which comes back here.
        let launch = self.launch.lock().take();
        if let Some(Launch(start)) = launch {
            start();
        }
    }

    /// Whether the writer has been started (or forgone), once
    /// [`Peer::ready_to_launch`] has been called; before that, with nothing
    /// to launch yet, this says true as well.
    pub fn writer_started(&self) -> bool {
        self.writer.get().is_some() || self.launch.lock().is_none()
    }

    /// For the reader, when the connection failed: a writer that has not
    /// started never will. Returns whether no writer ever started, so that
    /// the reader closes the socket itself.
    pub fn forgo_writer(&self) -> bool {
        self.launch.lock().take().is_some()
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
enum Delivery {
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
    #[inline(always)]
    fn deliver(&self, frame: &Frame, limits: &Limits, wakes: &mut Wakes) -> Delivery {
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

/// The members of one channel path.
#[derive(Debug)]
pub struct Channel {
    state: Mutex<State>,
    /// Most members, set by the client that created the channel (`max=N`).
    cap: Option<usize>,
}

#[derive(Debug, Default)]
struct State {
    /// Copy-on-write: publishing clones the `Arc` and sends without holding the lock;
    /// joins and leaves (rare next to messages) build a new list.
    members: Arc<[Arc<Peer>]>,
    /// The last `replay_length` messages, local and relayed, for clients that
    /// join with `replay=N`, within `replay_bytes`; gone with the channel.
    recent: VecDeque<Frame>,
    /// Bytes of the frames in `recent`.
    recent_bytes: usize,
}

impl State {
    /// Keep `frame` for replay, dropping the oldest to stay within the
    /// ring's bounds. A frame that cannot be kept (larger than the ring, or
    /// the memory budget used up) empties the ring: replay must never skip
    /// a message, so it gives fewer, all of them the most recent.
    fn remember(&mut self, frame: &Frame, limits: &Limits) {
        let len = frame.as_bytes().len();
        if len > limits.replay_bytes || BUDGET.is_full() {
            self.recent.clear();
            self.recent_bytes = 0;
            return;
        }
        while self.recent.len() >= limits.replay_length
            || self.recent_bytes + len > limits.replay_bytes
        {
            let Some(old) = self.recent.pop_front() else {
                break;
            };
            self.recent_bytes -= old.as_bytes().len();
        }
        self.recent.push_back(frame.clone());
        self.recent_bytes += len;
    }
}

impl Channel {
    /// How many members the channel has here.
    pub fn clients(&self) -> usize {
        self.state.lock().members.len()
    }

    /// Send `frame` to every member but `from` (unless it asked for its own
    /// messages). Never blocks. The writers it must wake go to `wakes`.
    pub fn publish(
        &self,
        from: u64,
        frame: &Frame,
        limits: &Limits,
        stats: &Stats,
        wakes: &mut Wakes,
    ) {
        let members = {
            let mut state = self.state.lock();
            if limits.replay_length > 0 {
                state.remember(frame, limits);
            }
            Arc::clone(&state.members)
        };
        let (mut queued, mut dropped, mut kicked) = (0, 0, 0);
        for peer in members.iter().filter(|p| p.id != from || p.echo) {
            match peer.deliver(frame, limits, wakes) {
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
    }
}

/// What the registry tells the relay. Sent while the registry is locked, so
/// the order of binds and unbinds is the order of the channels' lives.
#[derive(Debug)]
pub enum Control {
    /// The first local client joined channel `path`.
    Bind(Arc<str>),
    /// The last local client left channel `path`.
    Unbind(Arc<str>),
}

/// Why a client could not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
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
}

/// All channels of this instance.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    /// Signalled when the last client leaves, for a graceful shutdown.
    empty: Condvar,
    /// Where channels' births and deaths go when a relay links instances.
    relay: Option<Sender<Control>>,
}

impl Registry {
    /// A registry that tells `relay` (when there is one) which channels exist.
    pub fn new(relay: Option<Sender<Control>>) -> Registry {
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
    pub fn get(&self, path: &str) -> Option<Arc<Channel>> {
        self.inner.lock().channels.get(path).cloned()
    }

    /// Add `peer` to channel `path`, creating the channel if it is new.
    pub fn join(
        &self,
        path: &Arc<str>,
        peer: &Arc<Peer>,
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
                });
                inner
                    .channels
                    .insert(Arc::clone(path), Arc::clone(&channel));
                self.tell_relay(|| Control::Bind(Arc::clone(path)));
                channel
            }
        };
        let mut state = channel.state.lock();
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
        let skip = state.recent.len().saturating_sub(options.replay);
        // Its writer has not started yet: nothing to wake.
        let mut wakes = Wakes::default();
        for frame in state.recent.iter().skip(skip) {
            peer.deliver(frame, limits, &mut wakes);
        }
        drop(state);
        inner.clients += 1;
        Ok(channel)
    }

    /// Remove `peer` from channel `path`; the channel goes with its last member.
    /// Returns whether that was the instance's last client.
    pub fn leave(&self, path: &str, channel: &Arc<Channel>, peer: &Peer) -> bool {
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
            if let Some((path, _)) = inner.channels.remove_entry(path) {
                self.tell_relay(|| Control::Unbind(path));
            }
        }
        drop(state);
        inner.clients -= 1;
        if inner.clients == 0 {
            self.empty.notify_all();
        }
        inner.clients == 0
    }

    /// Clients and channels now.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.clients, inner.channels.len())
    }

    /// Refuse new clients and start closing every member with `close`.
    pub fn close_all(&self, close: Close) {
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
    pub fn wait_empty(&self, deadline: Instant) -> bool {
        let mut inner = self.inner.lock();
        while inner.clients > 0 {
            if self.empty.wait_until(&mut inner, deadline).timed_out() {
                return inner.clients == 0;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_vanish_with_their_last_member_and_limits_hold() {
        let reg = Registry::default();
        let limits = Limits {
            max_clients_per_channel: 2,
            max_connections: 3,
            ..Limits::default()
        };
        let peers: Vec<_> = (0..4).map(|i| Peer::new(i, false).0).collect();
        let a = reg
            .join(&"/a".into(), &peers[0], &Options::default(), &limits)
            .unwrap();
        reg.join(&"/a".into(), &peers[1], &Options::default(), &limits)
            .unwrap();
        assert_eq!(
            reg.join(&"/a".into(), &peers[2], &Options::default(), &limits)
                .unwrap_err(),
            JoinError::ChannelFull
        );
        let b = reg
            .join(&"/b".into(), &peers[2], &Options::default(), &limits)
            .unwrap();
        assert_eq!(
            reg.join(&"/c".into(), &peers[3], &Options::default(), &limits)
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
            let (sender, _) = Peer::new(10, false);
            let (slow, rx) = Peer::new(11, false);
            let ch = reg
                .join(&"/s".into(), &sender, &Options::default(), &limits)
                .unwrap();
            reg.join(&"/s".into(), &slow, &Options::default(), &limits)
                .unwrap();
            let frame = Frame::message(crate::frame::Kind::Text, b"x");
            for _ in 0..5 {
                ch.publish(sender.id, &frame, &limits, &stats, &mut Wakes::default());
            }
            let queued = rx.try_iter().filter(|o| matches!(o, Out::Frame(_))).count();
            // A slow consumer's queue is emptied the moment it is closed.
            let closed = policy == SlowClient::Disconnect;
            assert_eq!(queued, if closed { 0 } else { 2 });
            assert_eq!(slow.queued_bytes(), if closed { 0 } else { 6 });
            assert_eq!(slow.is_closing(), closed);
            reg.leave("/s", &ch, &sender);
            reg.leave("/s", &ch, &slow);
        }
        assert_eq!(stats.slow_disconnects.load(Ordering::Relaxed), 1);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 3);
    }
}
