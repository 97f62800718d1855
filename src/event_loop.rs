//! One event loop for every socket that is only waiting (SPEC §3), as
//! Apache's event MPM keeps the connections it is not serving: a new
//! connection until its request head is complete, and a kept-alive HTTP
//! connection between requests. Such a socket holds no thread. The loop
//! thread accepts on every public listener until the kernel has no more,
//! reads what arrives into a buffer of the connection's own (allocated with
//! the first byte, at most [`MAX_HEAD`], counted in the memory budget),
//! keeps the first-byte and head deadlines, and hands a connection to a
//! reader thread from the pool once its head is complete (or cannot be: too
//! large, malformed), with the bytes read so far. What the conversation does
//! from there is plain blocking code (`client`); a kept-alive connection
//! comes back here through [`Lobby::park`].
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
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use polling::{Event, Events, Poller};

use crate::budget::BUDGET;
use crate::client::FIRST_BYTE_TIMEOUT;
use crate::http::{self, MAX_HEAD};
use crate::listener::{Listener, refuse_out_of_fds};
use crate::logging::Throttle;
use crate::server::{Crowded, Lobby, Server, Waiting};
use crate::stream::Stream;

/// How long a socket may wait for its head to complete before the loop
/// closes it to take a new connection when descriptors run out: a client
/// sends its request within a round trip of connecting.
const SILENT: Duration = Duration::from_secs(1);

/// Start the loop on its own thread, taking the connections of `listeners`.
pub fn spawn(listeners: Vec<Arc<Listener>>, server: Arc<Server>) -> io::Result<()> {
    let poller = Arc::new(Poller::new()?);
    for (key, listener) in listeners.iter().enumerate() {
        listener.set_nonblocking()?;
        // SAFETY: the listener outlives its registration: the loop deletes
        // it before the listener can be dropped (it holds an Arc of it).
        unsafe { poller.add(listener.as_fd().as_raw_fd(), Event::readable(key))? };
    }
    let options = listeners
        .iter()
        .map(|l| l.prepare(server.settings.limits.handshake_timeout))
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
    tx: Sender<Waiting>,
}

impl Lobby for Door {
    fn park(&self, waiting: Waiting) {
        // The loop ends only with the process: the queue is never closed.
        let _ = self.tx.send(waiting);
        self.wake();
    }

    fn wake(&self) {
        let _ = self.poller.notify();
    }
}

/// A connection the loop keeps.
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
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Deadlines, soonest first: (when, place, generation).
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    parked: Receiver<Waiting>,
    /// What each listener's connections still need set ([`Listener::prepare`]).
    options: Vec<Option<Duration>>,
    /// A descriptor held in reserve: when the process runs out, it is given
    /// up to take the waiting connection and answer it 503 (see `accept`).
    spare: Option<File>,
    next_gen: u64,
    throttle: Throttle,
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
            if self.server.is_stopping() {
                self.stop();
                return;
            }
            for event in events.iter() {
                match event.key.checked_sub(self.listeners.len()) {
                    None => self.accept(event.key),
                    Some(place) => self.ready(place),
                }
            }
            while let Ok(waiting) = self.parked.try_recv() {
                self.keep(waiting, Instant::now());
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
            .filter_map(|(i, c)| {
                c.as_ref()
                    .filter(|c| now.duration_since(c.since) >= SILENT)
                    .map(|c| (c.since, i))
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
        let place = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let key = self.listeners.len() + place;
        // SAFETY: the socket is deleted from the poller before it is
        // dropped or handed over (`take`).
        let added = unsafe {
            self.poller.add(
                conn.waiting.stream.as_fd().as_raw_fd(),
                Event::readable(key),
            )
        };
        if let Err(e) = added {
            self.complain("cannot watch a connection", &e);
            self.free.push(place);
            return;
        }
        let expiry = conn.expiry(self.handshake_timeout());
        self.timers.push(Reverse((expiry, place, generation)));
        self.conns[place] = Some(conn);
    }

    /// Bytes arrived on the connection at `place`.
    fn ready(&mut self, place: usize) {
        let timeout = self.handshake_timeout();
        let Some(conn) = self.conns.get_mut(place).and_then(Option::as_mut) else {
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
                let key = self.listeners.len() + place;
                let armed = self
                    .poller
                    .modify(conn.waiting.stream.as_fd(), Event::readable(key));
                if let Err(e) = armed {
                    self.complain("cannot watch a connection", &e);
                    self.close(place);
                }
            }
            Read::Ready => {
                if let Some(conn) = self.take(place) {
                    self.hand_over(conn);
                }
            }
            Read::Gone => self.close(place),
        }
    }

    /// Give a connection with a complete head to a reader thread; from
    /// there on its head is the thread's, not counted.
    fn hand_over(&self, conn: Conn) {
        let server = Arc::clone(&self.server);
        let Conn { waiting, .. } = conn;
        let started = self
            .server
            .readers
            .run(move || crate::client::serve(waiting, server));
        if let Err(e) = started {
            self.server.refuse();
            self.complain("cannot start a thread for a new connection", &e);
        }
    }

    /// Close connections whose head did not come in time.
    fn expire(&mut self) {
        let now = Instant::now();
        let timeout = self.handshake_timeout();
        while let Some(&Reverse((when, place, generation))) = self.timers.peek() {
            if when > now {
                break;
            }
            self.timers.pop();
            let due = self.conns[place]
                .as_ref()
                .is_some_and(|c| c.generation == generation && c.expiry(timeout) <= now);
            if due {
                log::debug!("connection closed before a complete request: timed out");
                self.close(place);
            }
        }
    }

    /// Out of the poller and the table.
    fn take(&mut self, place: usize) -> Option<Conn> {
        let conn = self.conns.get_mut(place)?.take()?;
        let _ = self.poller.delete(conn.waiting.stream.as_fd());
        self.free.push(place);
        Some(conn)
    }

    fn close(&mut self, place: usize) {
        drop(self.take(place));
    }

    /// Shutdown: close what waits and stop watching the listeners.
    fn stop(&mut self) {
        for place in 0..self.conns.len() {
            self.close(place);
        }
        for listener in &self.listeners {
            let _ = self.poller.delete(listener.as_fd());
        }
    }

    fn handshake_timeout(&self) -> Duration {
        self.server.settings.limits.handshake_timeout
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
