//! The state one running instance shares among its threads: settings,
//! channels, counters, thread pools, the link to the relay, and the counts
//! of sockets that bound new connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;
use uuid::Uuid;

use crate::config::address::host_of;
use crate::config::{Limits, Settings};
use crate::hub::channels::{Channel, Registry};
use crate::hub::link::Link;
use crate::hub::peer::Flushes;
use crate::memory::budget::Share;
use crate::memory::stats::{self, Stats};
use crate::os::logging::Throttle;
use crate::os::stream::Stream;
use crate::os::threads::Pool;
use crate::proto::frame::Frame;
use crate::proto::http::Request;
use crate::proto::twin::Twins;

/// Stack of the thread that reads a connection (handshake, frames, fan-out).
/// Its deepest path is the handshake plus logging; the rest is on the heap.
pub(crate) const READER_STACK: usize = 128 * 1024;

/// Stack of a writer thread: it only moves bytes from its queue to the socket.
pub(crate) const WRITER_STACK: usize = 64 * 1024;

/// Finished connection threads kept waiting for new connections, per kind:
/// enough for bursts of reconnecting clients, few enough that idle ones cost
/// little (a few stack pages each).
const IDLE_THREADS: usize = 64;

/// Everything the connection threads share.
pub(crate) struct Server {
    /// The effective settings.
    settings: Settings,
    /// The channels; their replay rings are the memory budget's cache.
    registry: Arc<Registry>,
    /// The counters.
    stats: Stats,
    /// The link to other instances, when `amqp` is set.
    relay: Option<Link>,
    /// Read-only URLs, under the server's secret.
    twins: Twins,
    /// Threads that read connections (handshake, then frames).
    readers: Arc<Pool>,
    /// Threads that write to connections.
    writers: Arc<Pool>,
    next_id: AtomicU64,
    per_address: Mutex<HashMap<IpAddr, Tenant>>,
    stopping: AtomicBool,
    /// The once-a-minute line about refused clients.
    refusals: Throttle,
    /// Where connections wait for a request head without a thread.
    lobby: OnceLock<Arc<dyn Lobby>>,
}

/// A connection waiting for a request head: its socket, its place among its
/// address's, and what has arrived of the head.
pub(crate) struct Waiting {
    /// The socket.
    pub stream: Stream,
    /// The TCP peer's address (`None` on a unix socket).
    pub peer: Option<IpAddr>,
    /// Its place among the handshakes, and its address's.
    pub place: Handshake,
    /// The bytes of the head so far (and what followed it).
    pub head: Vec<u8>,
    /// The head, parsed, once it is complete, and its length in `head`.
    /// Boxed: a reader thread's first frames hold this for the life of the
    /// connection, and every byte there counts (see `http::serve`).
    pub request: Option<Box<(Request, usize)>>,
}

/// Where a connection waits without a thread: the event loop
/// (`event_loop`), which hands it to a reader thread again once there is
/// something to read.
pub(crate) trait Lobby: Send + Sync {
    /// Keep `waiting` until its next head is complete.
    fn park(&self, waiting: Waiting);
    /// Keep a member whose client is silent until it sends again.
    fn rest(&self, member: Box<dyn Resting>);
    /// Look at the server's state now (it is stopping).
    fn wake(&self);
}

/// A websocket client or stream listener that waits without a thread
/// (`client`: from its answer until its client sends, and again once its
/// reader finds it silent), as the event loop keeps it: it is watched for
/// bytes and looked at when its next timer is due (a ping to send, a client
/// that stopped answering). Messages still reach it without a thread: by
/// direct writes, or a writer thread for a backlog.
pub(crate) trait Resting: Send {
    /// Its socket.
    fn stream(&self) -> &Stream;
    /// Do what is due at `now`: send a ping, close a client that stopped
    /// answering, end one whose close took too long.
    fn tick(&mut self, now: Instant) -> Next;
    /// Bytes (or the end) arrived, and the socket is no longer watched:
    /// what it takes is done without waiting here; [`Next::Resume`] when
    /// the client's reader must read them on a thread.
    fn ready(&mut self, now: Instant) -> Next;
    /// Read on the calling thread (a reader from the pool) until the client
    /// is silent again or the connection ends.
    fn resume(self: Box<Self>);
}

/// What the event loop does next with a [`Resting`] member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Watch its socket, and look at it again at this time (or only when
    /// bytes come).
    Wait(Option<Instant>),
    /// Hand it to a reader thread ([`Resting::resume`]).
    Resume,
    /// Its connection is over: drop it, which closes it.
    Over,
}

/// What one client address holds now; gone when it holds nothing.
#[derive(Default)]
struct Tenant {
    /// Sockets of its in their handshake (by TCP peer address).
    handshakes: u32,
    /// Its websocket clients and stream listeners.
    members: u32,
    /// Its HTTP publishes in progress.
    visits: u32,
    /// Its part of the memory budget.
    share: Arc<Share>,
}

impl Tenant {
    fn is_empty(&self) -> bool {
        self.handshakes == 0 && self.members == 0 && self.visits == 0
    }
}

/// Why a client was turned away, as the metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Its address holds `max_connections_per_address` clients (503).
    Address,
    /// Its address holds its share of the memory budget (1009 / 503).
    AddressMemory,
    /// Its message or body came slower than `min_rate` (1008 / 408).
    Rate,
}

/// A client address's hold on its place: a member counted against
/// `max_connections_per_address`, or a publish; it carries the address's
/// part of the memory budget. Let go on drop.
pub(crate) struct Visit {
    server: Arc<Server>,
    ip: IpAddr,
    member: bool,
    share: Arc<Share>,
}

impl Visit {
    /// The address's part of the memory budget.
    pub(crate) fn share(&self) -> &Arc<Share> {
        &self.share
    }
}

impl Drop for Visit {
    fn drop(&mut self) {
        let member = self.member;
        self.server.let_go(self.ip, |tenant| {
            if member {
                tenant.members -= 1;
            } else {
                tenant.visits -= 1;
            }
        });
    }
}

/// Set up the allocator so that RSS follows what the memory budget counts.
///
/// glibc serves a large block from its heaps once a block of that size was
/// freed (its mmap threshold rises up to 32 MiB), and a thread's heap keeps
/// what is freed in it: after a burst of 1 MB messages, RSS stayed at 2.5
/// times what the budget counted (BENCHMARKS.md, "RSS and the budget").
/// A fixed threshold keeps every block of 128 KiB or more in a mapping of its
/// own, unmapped when freed; small blocks (frames of chat-sized messages,
/// an idle connection's buffers) stay in the heaps as before.
pub(crate) fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's parameters; it is called
    // before any thread exists.
    unsafe {
        // Fixed values also turn glibc's dynamic thresholds off.
        libc::mallopt(libc::M_MMAP_THRESHOLD, ALLOCATOR_MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * ALLOCATOR_MMAP_THRESHOLD);
    }
}

/// Blocks this large or larger are mapped on their own (glibc's initial
/// threshold, kept from rising).
const ALLOCATOR_MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Give the heap that a crowd of clients left behind back to the system.
/// glibc keeps freed memory in its arenas for reuse, tens of MiB after a
/// spike of clients (figures: BENCHMARKS.md, "Measurements behind the constants"). Called when the
/// last client leaves, so it costs nothing while anyone is connected.
pub(crate) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sockets one address (an IPv4 address, an IPv6 /64) may have waiting for
/// a request head at once. Generous: a waiting socket holds no thread, only
/// a descriptor (and, once bytes come, a buffer counted in the memory
/// budget), so an honest burst of a few hundred from one host goes through;
/// bounded, so that one host cannot take every descriptor.
pub(crate) const HANDSHAKES_PER_ADDRESS: u32 = 256;

/// A connection's place among its address's sockets waiting for a request
/// head; freed when it is no longer waiting.
pub(crate) struct Handshake {
    server: Arc<Server>,
    from: Option<IpAddr>,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if let Some(ip) = self.from {
            self.server.let_go(ip, |tenant| tenant.handshakes -= 1);
        }
    }
}

/// Why a connection was turned away before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crowded {
    /// As many waiting for a head from this address as one may have.
    Address,
    /// The memory budget takes no new connection.
    Memory,
}

impl Server {
    /// The effective settings.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The limits of the settings.
    pub(crate) fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    /// The channels; their replay rings are the memory budget's cache.
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The counters.
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The link to other instances, when `amqp` is set.
    pub(crate) fn relay(&self) -> Option<&Link> {
        self.relay.as_ref()
    }

    /// Read-only URLs, under the server's secret.
    pub(crate) fn twins(&self) -> &Twins {
        &self.twins
    }

    /// Threads that read connections (a request, then a member's frames).
    pub(crate) fn readers(&self) -> &Arc<Pool> {
        &self.readers
    }

    /// Threads that write a member's backlog.
    pub(crate) fn writers(&self) -> &Arc<Pool> {
        &self.writers
    }

    /// A server for `settings`, with `relay` when instances are linked and
    /// `twins` for read-only URLs.
    pub(crate) fn new(settings: Settings, relay: Option<Link>, twins: Twins) -> Server {
        let registry = Arc::new(Registry::new(relay.as_ref().map(Link::control)));
        let cache: Arc<dyn crate::memory::budget::Cache> = registry.clone();
        crate::memory::budget::BUDGET.set_cache(Arc::downgrade(&cache));
        Server {
            registry,
            relay,
            twins,
            // Readers are started by the event loop, whose stack is not per connection.
            readers: Pool::new("staps-client", READER_STACK, IDLE_THREADS, false),
            writers: Pool::new("staps-writer", WRITER_STACK, IDLE_THREADS, true),
            per_address: Mutex::new(HashMap::new()),
            settings,
            stats: Stats::default(),
            next_id: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            refusals: Throttle::new(),
            lobby: OnceLock::new(),
        }
    }

    /// The event loop that keeps waiting connections (at startup).
    pub(crate) fn set_lobby(&self, lobby: Arc<dyn Lobby>) {
        let _ = self.lobby.set(lobby);
    }

    /// Give `waiting` to the event loop until its next request head is
    /// complete (without one, as in unit tests, it is closed).
    pub(crate) fn park(&self, waiting: Waiting) {
        if let Some(lobby) = self.lobby.get() {
            lobby.park(waiting);
        }
    }

    /// Give `member` to the event loop until its client sends again
    /// (without one, as in unit tests, it is closed).
    pub(crate) fn rest(&self, member: Box<dyn Resting>) {
        if let Some(lobby) = self.lobby.get() {
            lobby.rest(member);
        }
    }

    /// A new connection id.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A place among the sockets waiting for a request head, for a new
    /// connection from `from` (a TCP peer's address; `None` for unix sockets
    /// and trusted proxies, which send complete request heads only). No
    /// count bounds them all: what they hold is descriptors, which the event
    /// loop takes back from the oldest silent socket when they run out, and
    /// buffers, which the memory budget counts.
    pub(crate) fn admit(self: &Arc<Self>, from: Option<IpAddr>) -> Result<Handshake, Crowded> {
        if !crate::memory::budget::BUDGET.admits_joins() {
            crate::memory::budget::BUDGET.refuse("new connections get 503");
            return Err(Crowded::Memory);
        }
        let from = from
            .filter(|ip| !self.settings.trusted_proxies.trusts(Some(*ip)))
            .map(host_of);
        let mine = from.map(|ip| {
            let mut per_address = self.per_address.lock();
            let tenant = per_address.entry(ip).or_default();
            tenant.handshakes += 1;
            tenant.handshakes
        });
        let handshake = Handshake {
            server: Arc::clone(self),
            from,
        };
        if mine > Some(HANDSHAKES_PER_ADDRESS) {
            return Err(Crowded::Address);
        }
        Ok(handshake)
    }

    /// A place for client address `from` (`None` when it cannot be known:
    /// no per-address limits apply), as a `member` (a websocket client or
    /// stream listener, at most `max_connections_per_address` of them) or
    /// for a publish. `Ok(None)` when per-address limits are off.
    #[inline(never)]
    pub(crate) fn visit(
        self: &Arc<Self>,
        from: Option<IpAddr>,
        member: bool,
    ) -> Result<Option<Visit>, Reason> {
        let max = self.settings.limits.per_address();
        let (Some(ip), true) = (from, max > 0) else {
            return Ok(None);
        };
        let mut per_address = self.per_address.lock();
        let tenant = per_address.entry(ip).or_default();
        if member && tenant.members as usize >= max {
            if tenant.is_empty() {
                per_address.remove(&ip);
            }
            return Err(Reason::Address);
        }
        if member {
            tenant.members += 1;
        } else {
            tenant.visits += 1;
        }
        Ok(Some(Visit {
            server: Arc::clone(self),
            ip,
            member,
            share: Arc::clone(&tenant.share),
        }))
    }

    /// Let go of one of `ip`'s holds (`release` counts it down); an address
    /// that holds nothing more is forgotten.
    fn let_go(&self, ip: IpAddr, release: impl FnOnce(&mut Tenant)) {
        let mut per_address = self.per_address.lock();
        if let Some(tenant) = per_address.get_mut(&ip) {
            release(tenant);
            if tenant.is_empty() {
                per_address.remove(&ip);
            }
        }
    }

    /// Count a client turned away for `reason`, from client address `from`;
    /// one line a minute says so (the address only at debug level).
    #[cold]
    #[inline(never)]
    pub(crate) fn refuse_for(&self, reason: Reason, from: Option<IpAddr>) {
        let counter = match reason {
            Reason::Address => &self.stats.address_refusals,
            Reason::AddressMemory => &self.stats.address_memory_refusals,
            Reason::Rate => &self.stats.rate_closes,
        };
        stats::add(counter, 1);
        let what = match reason {
            Reason::Address => "an address holds max_connections_per_address clients",
            Reason::AddressMemory => "an address holds its share of memory_budget",
            Reason::Rate => "a message or body came slower than min_rate",
        };
        match from {
            Some(ip) => log::debug!("refused a client from {ip}: {what}"),
            None => log::debug!("refused a client: {what}"),
        }
        if self.refusals.ready() {
            log::warn!(
                "refusing clients: {what} (this is logged once a minute; -v shows each \
                 with its address; /metrics counts them by reason)"
            );
        }
    }

    /// Warn when the system would stop staps short of `max_connections`
    /// clients all talking at once: a client takes a descriptor, and a
    /// thread while it talks (it sent within `client::PARK_AFTER`, or has
    /// a backlog), with four memory mappings (stack, its guard page, the
    /// signal stack and its guard); a silent one waits in the event loop
    /// without. Quiet when all is well.
    pub(crate) fn check_system_limits(&self) {
        if self.settings.limits.max_connections == 0 {
            return;
        }
        let clients = self.settings.limits.max_connections as u64;
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        // `per_client` of the resource for each client, `reserve` for the rest.
        let check = |what: &str, have: Option<u64>, per_client: u64, reserve: u64, fix: &str| {
            let need = clients.saturating_mul(per_client).saturating_add(reserve);
            if let Some(have) = have.filter(|have| *have < need) {
                log::warn!(
                    "{what} is {have}, about {} clients' worth; max_connections needs {need}: {fix}",
                    have.saturating_sub(reserve) / per_client
                );
            }
        };
        check(
            "vm.max_map_count",
            read("/proc/sys/vm/max_map_count"),
            4,
            1024,
            "raise it (the Debian package ships /usr/lib/sysctl.d/50-staps.conf)",
        );
        check(
            "kernel.pid_max",
            read("/proc/sys/kernel/pid_max"),
            1,
            1024,
            "raise kernel.pid_max",
        );
        let mut nofile = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct we own.
        let have = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) } == 0)
            .then_some(nofile.rlim_cur);
        check(
            "the open files limit",
            have,
            1,
            64,
            "raise it (LimitNOFILE= under systemd, ulimit -n elsewhere)",
        );
    }

    /// Publish `frame`, a message of local client `from` (known to other
    /// instances as `sender`), to the members of `channel` here (`None`:
    /// nobody is here), the sends it owes going to `flushes`, and to the
    /// relay. How many members it was queued for. The one way a client's
    /// message goes out, from a websocket reader or an HTTP publish.
    pub(crate) fn publish(
        &self,
        channel: Option<&Channel>,
        path: &Arc<str>,
        from: u64,
        sender: Option<Uuid>,
        frame: &Frame,
        flushes: &mut Flushes,
    ) -> u64 {
        stats::add(&self.stats.messages_in, 1);
        stats::add(&self.stats.bytes_in, frame.payload().len() as u64);
        let limits = &self.settings.limits;
        let clients = channel.map_or(0, |c| c.publish(from, frame, limits, &self.stats, flushes));
        if let (Some(relay), Some(sender)) = (&self.relay, sender) {
            relay.publish(path, frame, sender, &self.stats);
        }
        clients
    }

    /// Count a connection that was turned away.
    pub(crate) fn refuse(&self) {
        stats::add(&self.stats.refused, 1);
    }

    /// Whether shutdown has begun.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// One line of counters.
    pub(crate) fn stats_line(&self) -> String {
        let (clients, channels) = self.registry.counts();
        self.stats
            .line(clients, channels, Link::state_name(self.relay.as_ref()))
    }

    /// From now on the accept loops stop and new clients are refused.
    pub(crate) fn begin_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(lobby) = self.lobby.get() {
            lobby.wake();
        }
    }
}
