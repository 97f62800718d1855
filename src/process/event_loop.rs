//! One event loop for every socket that is only waiting (SPEC §3), as
//! Apache's event MPM keeps the connections it is not serving: a new
//! connection until its request head is complete, a kept-alive HTTP
//! connection between requests, and a channel member whose client is
//! silent. Such a socket holds no thread.
//!
//! The loop thread accepts on every public listener until the kernel has no
//! more, reads what arrives into a buffer of the connection's own
//! (allocated with the first byte, at most [`MAX_HEAD`], counted in the
//! memory budget), and keeps the first-byte and head deadlines. Once a head
//! is complete, a websocket upgrade or a stream listener joins its channel
//! here and is answered without waiting (`client::welcome`): it then rests
//! here like any silent member. Any other request (a publish, the usage
//! page, a head that cannot be used) goes to a reader thread from the pool
//! with the bytes read so far, and is served with plain blocking code
//! (`conn::http`); a kept-alive connection comes back here through
//! [`Lobby::park`].
//!
//! A member rests here ([`Resting`]) from its answer until its client
//! sends, and again once its reader finds it silent (`client::PARK_AFTER`).
//! Messages reach it as before, by direct writes or a writer thread; the
//! loop sends its pings, closes those that stopped answering, reads and
//! drops what listeners and closing clients send, sees off a client that
//! closed its end, and gives a websocket client that sends to a reader
//! thread, which reads on as if it had never left.
//!
//! epoll through the `polling` crate: a small, well-kept wrapper (the one
//! smol and async-io stand on) whose one-shot interest suits sockets that
//! come and go between this thread and the pool, without an async runtime.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use polling::{Event, Events, Poller};

use crate::conn::client;
use crate::conn::http::{self as http_conn, FIRST_BYTE_TIMEOUT, Routed};
use crate::conn::server::{Crowded, Lobby, Next, Resting, Server, Waiting};
use crate::memory::budget::BUDGET;
use crate::os::logging::Throttle;
use crate::os::stream::Stream;
use crate::process::listener::{Listener, refuse_out_of_fds};
use crate::proto::http::{self, MAX_HEAD};

/// How long a socket may wait for its head to complete before the loop
/// closes it to take a new connection when descriptors run out: a client
/// sends its request within a round trip of connecting.
const SILENT: Duration = Duration::from_secs(1);

/// Start the loop on its own thread, taking the connections of `listeners`.
pub(crate) fn spawn(listeners: Vec<Arc<Listener>>, server: Arc<Server>) -> io::Result<()> {
    let poller = Arc::new(Poller::new()?);
    for (key, listener) in listeners.iter().enumerate() {
        listener.set_nonblocking()?;
        // SAFETY: the listener outlives its registration: the loop deletes
        // it before the listener can be dropped (it holds an Arc of it).
        unsafe { poller.add(listener.as_fd().as_raw_fd(), Event::readable(key))? };
    }
    let options = listeners
        .iter()
        .map(|l| l.prepare(server.limits().handshake_timeout))
        .collect();
    let (tx, rx) = crossbeam_channel::unbounded();
    server.set_lobby(Arc::new(Door {
        poller: Arc::clone(&poller),
        tx,
    }));
    let mut lp = Loop {
        poller,
        listeners,
        server,
        conns: Vec::new(),
        free: Vec::new(),
        timers: BinaryHeap::new(),
        parked: rx,
        options,
        spare: File::open("/dev/null").ok(),
        next_gen: 0,
        throttle: Throttle::new(),
        stopped: false,
    };
    thread::Builder::new()
        .name("staps-loop".into())
        .spawn(move || lp.run())
        .map(drop)
}

/// How the pool gives a connection back: into a queue the loop drains when
/// woken.
struct Door {
    poller: Arc<Poller>,
    tx: Sender<Parked>,
}

/// A connection given back to the loop.
enum Parked {
    Head(Waiting),
    Member(Box<dyn Resting>),
}

impl Lobby for Door {
    fn park(&self, waiting: Waiting) {
        // The loop ends only with the process: the queue is never closed.
        let _ = self.tx.send(Parked::Head(waiting));
        self.wake();
    }

    fn rest(&self, member: Box<dyn Resting>) {
        let _ = self.tx.send(Parked::Member(member));
        self.wake();
    }

    fn wake(&self) {
        let _ = self.poller.notify();
    }
}

/// A connection the loop keeps: one waiting for a request head, or a
/// member whose client is silent.
enum Kept {
    Head(Conn),
    Member(Member),
}

/// A resting member, and when it is to be looked at next.
struct Member {
    member: Box<dyn Resting>,
    due: Option<Instant>,
    generation: u64,
}

impl Kept {
    fn stream(&self) -> &Stream {
        match self {
            Kept::Head(conn) => &conn.waiting.stream,
            Kept::Member(m) => m.member.stream(),
        }
    }
}

/// A connection waiting for its request head.
struct Conn {
    waiting: Waiting,
    /// When it came to the loop (accepted, or given back).
    since: Instant,
    /// Its bytes have begun to arrive.
    started: bool,
    /// Tells a timer of this connection from one of an earlier one that
    /// had the same place.
    generation: u64,
    /// Its buffer, as the memory budget counts it.
    charged: Charged,
}

/// Bytes counted in the memory budget until dropped.
struct Charged(usize);

impl Drop for Charged {
    fn drop(&mut self) {
        BUDGET.release(self.0);
    }
}

impl Conn {
    /// When it is closed if its head is not complete by then: its first
    /// byte within [`FIRST_BYTE_TIMEOUT`] (or `handshake_timeout`, if
    /// shorter), all of it within `handshake_timeout`.
    fn expiry(&self, handshake_timeout: Duration) -> Instant {
        if self.started {
            self.since + handshake_timeout
        } else {
            self.since + handshake_timeout.min(FIRST_BYTE_TIMEOUT)
        }
    }
}

/// The loop's state; only its thread touches it.
struct Loop {
    poller: Arc<Poller>,
    listeners: Vec<Arc<Listener>>,
    server: Arc<Server>,
    /// The connections, by key (less the listeners' count); `None` is free.
    conns: Vec<Option<Kept>>,
    free: Vec<usize>,
    /// Deadlines, soonest first: (when, place, generation).
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    parked: Receiver<Parked>,
    /// What each listener's connections still need set ([`Listener::prepare`]).
    options: Vec<Option<Duration>>,
    /// A descriptor held in reserve: when the process runs out, it is given
    /// up to take the waiting connection and answer it 503 (see `accept`).
    spare: Option<File>,
    next_gen: u64,
    throttle: Throttle,
    /// Shutdown has begun: the listeners are no longer watched, and heads
    /// are no longer waited for.
    stopped: bool,
}

/// What reading a waiting connection found.
enum Read {
    /// Nothing more now: wait for the socket again.
    Wait,
    /// A complete head (or one that cannot be): hand it to a reader thread.
    Ready,
    /// The client closed, or the connection failed.
    Gone,
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::new();
        loop {
            let timeout = self
                .timers
                .peek()
                .map(|Reverse((when, ..))| when.saturating_duration_since(Instant::now()));
            events.clear();
            if let Err(e) = self.poller.wait(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.complain("waiting for sockets", &e);
                    thread::sleep(Duration::from_millis(100));
                }
            }
            if self.server.is_stopping() && !self.stopped {
                self.stop();
            }
            for event in events.iter() {
                match event.key.checked_sub(self.listeners.len()) {
                    None if !self.stopped => self.accept(event.key),
                    None => {}
                    Some(place) => self.ready(place),
                }
            }
            let now = Instant::now();
            while let Ok(parked) = self.parked.try_recv() {
                match parked {
                    Parked::Head(waiting) if !self.stopped => self.keep(waiting, now),
                    Parked::Head(_) => {}
                    Parked::Member(member) => self.rest(member, now),
                }
            }
            self.expire();
        }
    }

    /// Take every connection `listeners[key]` has waiting.
    fn accept(&mut self, key: usize) {
        let listener = Arc::clone(&self.listeners[key]);
        loop {
            match listener.accept(self.options[key]) {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        self.out_of_descriptors(key, &e);
                    } else if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM)) {
                        self.complain(
                            "cannot accept, refusing connections until memory frees up",
                            &e,
                        );
                    } else {
                        log::debug!("{listener}: accept: {e}");
                    }
                    break;
                }
            }
        }
        // Oneshot: armed again for the next connection.
        if let Err(e) = self.poller.modify(listener.as_fd(), Event::readable(key)) {
            self.complain("cannot watch a listener", &e);
        }
    }

    /// The process has no descriptor left: close the oldest connection that
    /// has waited [`SILENT`] or longer without completing its head (a
    /// waiting socket must not keep others out), or, when there is none,
    /// answer the waiting connection (if any)
    /// 503 with the spare descriptor, so that clients learn at once instead
    /// of hanging. Linux's accept(2) takes the descriptor before it looks
    /// for a connection, so EMFILE may come with nobody waiting, right after
    /// the last descriptor went to a client whose request is on its way:
    /// that one must not be the one closed.
    fn out_of_descriptors(&mut self, key: usize, e: &io::Error) {
        self.complain(
            "out of file descriptors, closing waiting sockets and refusing connections",
            e,
        );
        let now = Instant::now();
        let oldest = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c {
                Some(Kept::Head(c)) if now.duration_since(c.since) >= SILENT => Some((c.since, i)),
                _ => None,
            })
            .min();
        if let Some((_, place)) = oldest {
            log::debug!("closed a waiting socket to take a new connection");
            self.close(place);
            return;
        }
        match self.spare.take() {
            Some(file) => {
                drop(file);
                if let Ok((stream, _)) = self.listeners[key].accept(self.options[key]) {
                    refuse_out_of_fds(stream, &self.server);
                }
            }
            // The spare is in use (by the last refusal): wait instead of
            // spinning on the same error.
            None => thread::sleep(Duration::from_millis(100)),
        }
        // Succeeds once a descriptor is free again.
        self.spare = self.spare.take().or_else(|| File::open("/dev/null").ok());
    }

    /// A new connection: a place among its address's, or a canned 503
    /// written without waiting.
    fn admit(&mut self, stream: Stream, peer: Option<IpAddr>) {
        match self.server.admit(peer) {
            Ok(place) => {
                let waiting = Waiting {
                    stream,
                    peer,
                    place,
                    head: Vec::new(),
                    request: None,
                };
                self.keep(waiting, Instant::now());
            }
            Err(crowded) => {
                self.server.refuse();
                log::debug!("refused a connection: {crowded:?}");
                let why = match crowded {
                    Crowded::Address => "too many handshakes from your address at once",
                    Crowded::Memory => "server memory budget reached",
                };
                let response = http::Response::error(503, why).with("Retry-After", "5");
                stream.refuse_now(&response.to_bytes());
            }
        }
    }

    /// Keep `waiting` until its head is complete; what has arrived already
    /// (a client sends its request as it connects) is read first, so that
    /// most connections go to a thread without waiting here at all.
    fn keep(&mut self, waiting: Waiting, now: Instant) {
        let generation = self.next_gen;
        self.next_gen += 1;
        let started = !waiting.head.is_empty();
        let mut conn = Conn {
            charged: Charged(0),
            waiting,
            since: now,
            started,
            generation,
        };
        conn.charge();
        match read(&mut conn) {
            Read::Ready => return self.hand_over(conn),
            Read::Gone => return,
            Read::Wait => {}
        }
        let expiry = conn.expiry(self.handshake_timeout());
        if let Some(place) = self.watch(Kept::Head(conn)) {
            self.timers.push(Reverse((expiry, place, generation)));
        }
    }

    /// Keep a member whose client is silent: what is due is done first.
    fn rest(&mut self, mut member: Box<dyn Resting>, now: Instant) {
        match member.tick(now) {
            Next::Over => {}
            Next::Resume => self.resume(member),
            Next::Wait(due) => {
                let generation = self.next_gen;
                self.next_gen += 1;
                let kept = Kept::Member(Member {
                    member,
                    due,
                    generation,
                });
                if let (Some(place), Some(due)) = (self.watch(kept), due) {
                    self.timers.push(Reverse((due, place, generation)));
                }
            }
        }
    }

    /// Give `kept` a place and watch its socket; None (and it is closed)
    /// when it cannot be watched.
    fn watch(&mut self, kept: Kept) -> Option<usize> {
        let place = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let key = self.listeners.len() + place;
        // SAFETY: the socket is deleted from the poller before it is
        // dropped or handed over (`take`).
        let added = unsafe {
            self.poller
                .add(kept.stream().as_fd().as_raw_fd(), Event::readable(key))
        };
        if let Err(e) = added {
            self.complain("cannot watch a connection", &e);
            self.free.push(place);
            return None;
        }
        if matches!(kept, Kept::Member(_)) {
            self.server.stats().resting.fetch_add(1, Ordering::Relaxed);
        }
        self.conns[place] = Some(kept);
        Some(place)
    }

    /// Bytes arrived on the connection at `place`.
    fn ready(&mut self, place: usize) {
        match self.conns.get(place) {
            Some(Some(Kept::Head(_))) => self.head_ready(place),
            Some(Some(Kept::Member(_))) => {
                let now = Instant::now();
                self.member_next(place, now, |member| member.ready(now), true);
            }
            _ => {}
        }
    }

    /// Bytes of a request head arrived.
    fn head_ready(&mut self, place: usize) {
        let timeout = self.handshake_timeout();
        let Some(Some(Kept::Head(conn))) = self.conns.get_mut(place) else {
            return;
        };
        let was_started = conn.started;
        match read(conn) {
            Read::Wait => {
                if !was_started && conn.started {
                    let expiry = conn.expiry(timeout);
                    let generation = conn.generation;
                    self.timers.push(Reverse((expiry, place, generation)));
                }
                self.rearm(place);
            }
            Read::Ready => {
                if let Some(Kept::Head(conn)) = self.take(place) {
                    self.hand_over(conn);
                }
            }
            Read::Gone => self.close(place),
        }
    }

    /// Do with the member at `place` what `step` says (its socket is
    /// watched again when `rearm`: it reported bytes, which disarmed it).
    fn member_next(
        &mut self,
        place: usize,
        now: Instant,
        step: impl FnOnce(&mut dyn Resting) -> Next,
        rearm: bool,
    ) {
        let Some(Some(Kept::Member(m))) = self.conns.get_mut(place) else {
            return;
        };
        match step(&mut *m.member) {
            Next::Wait(due) => {
                if due != m.due || m.due.is_some_and(|d| d <= now) {
                    m.due = due;
                    if let Some(due) = due {
                        self.timers.push(Reverse((due, place, m.generation)));
                    }
                }
                if rearm {
                    self.rearm(place);
                }
            }
            Next::Resume => {
                if let Some(Kept::Member(m)) = self.take(place) {
                    self.resume(m.member);
                }
            }
            Next::Over => self.close(place),
        }
    }

    /// Watch the socket at `place` for its next bytes (interest is one-shot).
    fn rearm(&mut self, place: usize) {
        let Some(Some(kept)) = self.conns.get(place) else {
            return;
        };
        let key = self.listeners.len() + place;
        if let Err(e) = self
            .poller
            .modify(kept.stream().as_fd(), Event::readable(key))
        {
            self.complain("cannot watch a connection", &e);
            self.close(place);
        }
    }

    /// A silent client sent again: a reader thread reads on.
    fn resume(&self, member: Box<dyn Resting>) {
        if let Err(e) = self.server.readers().run(move || member.resume()) {
            // The member is dropped with the job: its connection is cut.
            self.complain("cannot start a thread for a client that sent again", &e);
        }
    }

    /// A connection whose head is complete: a websocket client or stream
    /// listener joins its channel here and waits on for its client; any
    /// other request (and a head that cannot be used) goes to a reader
    /// thread. From there on its head is not counted.
    fn hand_over(&mut self, conn: Conn) {
        let server = Arc::clone(&self.server);
        let Conn { mut waiting, .. } = conn;
        let started = match waiting.request.take() {
            Some(parsed) => {
                // Routing and joining run here, for every client: a bug in
                // them (a panic) must cost its connection, not the loop
                // that all others wait in.
                let joined = panic::catch_unwind(AssertUnwindSafe(|| {
                    let (request, len) = &*parsed;
                    Routed::new(waiting, request, *len, &server)
                        .member()
                        .map(|member| client::welcome(member, &server))
                }));
                match joined {
                    Ok(Ok(Some(member))) => return self.rest(member, Instant::now()),
                    Ok(Ok(None)) => return,
                    Ok(Err(routed)) => self
                        .server
                        .readers()
                        .run(move || http_conn::serve_routed(*routed, server)),
                    Err(panic) => {
                        let why = panic
                            .downcast_ref::<&str>()
                            .copied()
                            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                            .unwrap_or("a panic");
                        // Its membership, if any, went with the unwinding.
                        self.complain("a bug dropped a new connection, please report it", &why);
                        return;
                    }
                }
            }
            None => self
                .server
                .readers()
                .run(move || http_conn::serve(waiting, server)),
        };
        if let Err(e) = started {
            self.server.refuse();
            self.complain("cannot start a thread for a new connection", &e);
        }
    }

    /// Close connections whose head did not come in time; do what is due
    /// for resting members.
    fn expire(&mut self) {
        let now = Instant::now();
        let timeout = self.handshake_timeout();
        while let Some(&Reverse((when, place, generation))) = self.timers.peek() {
            if when > now {
                break;
            }
            self.timers.pop();
            match &self.conns[place] {
                Some(Kept::Head(c)) if c.generation == generation && c.expiry(timeout) <= now => {
                    log::debug!("connection closed before a complete request: timed out");
                    self.close(place);
                }
                Some(Kept::Member(m))
                    if m.generation == generation && m.due.is_some_and(|d| d <= now) =>
                {
                    self.member_next(place, now, |member| member.tick(now), false);
                }
                _ => {}
            }
        }
    }

    /// Out of the poller and the table.
    fn take(&mut self, place: usize) -> Option<Kept> {
        let kept = self.conns.get_mut(place)?.take()?;
        let _ = self.poller.delete(kept.stream().as_fd());
        if matches!(kept, Kept::Member(_)) {
            self.server.stats().resting.fetch_sub(1, Ordering::Relaxed);
        }
        self.free.push(place);
        Some(kept)
    }

    fn close(&mut self, place: usize) {
        drop(self.take(place));
    }

    /// Shutdown: stop watching the listeners and close what waits for a
    /// request head. Resting members stay: the shutdown's close frames
    /// reach them by direct writes, and their answers are awaited here.
    fn stop(&mut self) {
        self.stopped = true;
        for place in 0..self.conns.len() {
            if matches!(self.conns[place], Some(Kept::Head(_))) {
                self.close(place);
            }
        }
        for listener in &self.listeners {
            let _ = self.poller.delete(listener.as_fd());
        }
    }

    fn handshake_timeout(&self) -> Duration {
        self.server.limits().handshake_timeout
    }

    fn complain(&self, what: &str, e: &dyn std::fmt::Display) {
        if self.throttle.ready() {
            log::warn!("{what}: {e} (logged once a minute)");
        }
    }
}

impl Conn {
    /// Count the buffer's growth in the memory budget.
    fn charge(&mut self) {
        let now = self.waiting.head.capacity();
        if now > self.charged.0 {
            BUDGET.charge(now - self.charged.0);
            self.charged.0 = now;
        }
    }
}

/// Read what has arrived, without waiting, into the connection's buffer (a
/// silent socket has none: it is allocated as bytes come, up to MAX_HEAD).
/// What the buffer held before is known to be no complete head: a new
/// connection's is empty, and a reader gives one back only when it is not.
fn read(conn: &mut Conn) -> Read {
    let mut scratch = [0u8; 2048];
    loop {
        let head = &mut conn.waiting.head;
        let room = (MAX_HEAD - head.len().min(MAX_HEAD)).clamp(1, scratch.len());
        match conn.waiting.stream.read_ready(&mut scratch[..room]) {
            Ok(0) => return Read::Gone,
            Ok(n) => {
                conn.started = true;
                head.extend_from_slice(&scratch[..n]);
                conn.charge();
                let head = &conn.waiting.head;
                match http::parse_head(head) {
                    // Parsed once: the reader takes it as it is.
                    Ok(Some(parsed)) => {
                        conn.waiting.request = Some(Box::new(parsed));
                        return Read::Ready;
                    }
                    // The reader answers these (431, 400).
                    Err(_) => return Read::Ready,
                    Ok(None) if head.len() >= MAX_HEAD => return Read::Ready,
                    Ok(None) => {}
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Read::Gone,
        }
    }
}
