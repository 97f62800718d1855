//! The HTTP server of one connection: its requests, one after another on a
//! kept-alive connection, each answered as `proto::http` routes it (usage
//! page, error, `?stats`, preflight), a publish's body read and published
//! here, and a websocket upgrade or a streaming listener handed to `client`
//! as a channel member.
//!
//! # Publishing over HTTP (SPEC §11)
//!
//! `POST` or `PUT /P` with a body is one message to channel `/P`, for its
//! members here and, through the relay, on every linked instance. No channel
//! is created for it. The head was checked by `proto::http` (path rules, a
//! known length within `max_message_size`, a UTF-8 charset for text); here
//! the body is read (`Content-Length` or chunked, counted in the memory
//! budget as it arrives, never as announced, at `min_rate` at least),
//! published the way a websocket client's message is, and answered with the
//! number of local members it was queued for. The connection then waits in
//! the event loop for the next request unless the client asked otherwise.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::config::address::client_address;
use crate::conn::client::{self, Member};
use crate::conn::server::{Handshake, Reason, Server, Waiting};
use crate::hub::peer::Flushes;
use crate::memory::budget::{BUDGET, FREE, Over, Share};
use crate::os::logging::fingerprint;
use crate::os::stream::Stream;
use crate::proto::frame::{Frame, Kind};
use crate::proto::http::{
    self, HeadError, Length, MAX_HEAD, Publish, Request, Response, Route, respond,
};
use crate::proto::incoming::{MinRate, Pace};
use crate::proto::wire::Wire;

/// A new connection sends its first byte within this (or handshake_timeout,
/// if shorter): a client sends its request right after connecting, and a
/// socket that stays silent only holds a place among the handshakes.
pub(crate) const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);

/// Serve a connection whose request head has arrived (the event loop read
/// it, `event_loop`) to its end, or until it waits for its next request.
/// The loop routes a head it could parse itself ([`Routed::new`]) and
/// starts [`serve_routed`] instead; this serves the heads it could not
/// (too large, malformed) and those that came with a kept-alive body.
///
/// The requests and the member's life are functions of their own, each
/// called from this shallow frame: the deepest moment of a reader thread's
/// life sets how many stack pages stay resident for as long as its
/// connection is idle; in one frame they would keep a page more per
/// connection (figures: BENCHMARKS.md, "Measurements behind the constants").
pub(crate) fn serve(waiting: Waiting, server: Arc<Server>) {
    if let Some(routed) = next(waiting, &server) {
        serve_routed(routed, server);
    }
}

/// Serve a connection from its routed request on (see [`serve`]).
pub(crate) fn serve_routed(routed: Routed, server: Arc<Server>) {
    if let Some(member) = requests(routed, &server) {
        client::converse(member, &server);
    }
}

/// A request whose head is complete, and what it gets.
pub(crate) struct Routed {
    stream: Stream,
    peer: Option<IpAddr>,
    place: Handshake,
    /// The client address (`trusted_proxies` applied).
    from: Option<IpAddr>,
    route: Route,
    /// The bytes that came after the head.
    rest: Vec<u8>,
}

impl Routed {
    /// Route `request`, whose head is the first `len` bytes of what
    /// `waiting` holds. Never waits: the event loop calls it.
    pub(crate) fn new(waiting: Waiting, request: &Request, len: usize, server: &Server) -> Routed {
        let Waiting {
            stream,
            peer,
            place,
            mut head,
            request: _,
        } = waiting;
        let headers = |name: &str| request.header_values(name);
        let from = client_address(peer, &server.settings().trusted_proxies, &headers);
        let route = http::route(request, server.settings(), server.twins());
        Routed {
            stream,
            peer,
            place,
            from,
            route,
            rest: head.split_off(len),
        }
    }

    /// The channel member this request asks to be (a websocket upgrade or
    /// a streaming listener), or the request back when it is anything
    /// else (boxed: most requests are members, and the error is large).
    pub(crate) fn member(self) -> Result<Member, Box<Routed>> {
        let (path, access, wire, options, answer) = match self.route {
            Route::Upgrade {
                path,
                access,
                accept,
                options,
            } => (
                path,
                access,
                Wire::WebSocket,
                options,
                http::switching_protocols(&accept),
            ),
            Route::Listen {
                path,
                access,
                wire,
                options,
            } => (path, access, wire, options, http::listening(wire)),
            _ => return Err(Box::new(self)),
        };
        // No longer waiting for a head: the place goes back.
        drop(self.place);
        Ok(Member {
            stream: self.stream,
            path,
            access,
            wire,
            options,
            from: self.from,
            rest: self.rest,
            answer,
        })
    }
}

/// The request whose head `waiting` holds (parsed already, when the event
/// loop parsed it), routed; `None` when it was answered here (a head that
/// cannot be used) or the connection went back to the loop for the rest of
/// its head (a kept-alive connection's next request).
fn next(mut waiting: Waiting, server: &Server) -> Option<Routed> {
    let parsed = match waiting.request.take() {
        Some(parsed) => Ok(Some(*parsed)),
        None => http::parse_head(&waiting.head),
    };
    match parsed {
        Ok(Some((request, len))) => Some(Routed::new(waiting, &request, len, server)),
        Ok(None) if waiting.head.len() < MAX_HEAD => {
            server.park(waiting);
            None
        }
        Ok(None) => {
            refuse_head(&waiting.stream, server, HeadError::TooLarge);
            None
        }
        Err(e) => {
            refuse_head(&waiting.stream, server, e);
            None
        }
    }
}

/// Answer the requests of a connection, starting with `routed`, until one
/// asks to be a channel member (a websocket upgrade or a streaming
/// listener): that one is returned. Publishes (`POST`/`PUT`) may come one
/// after another on a kept-alive connection; between them it waits in the
/// event loop, without this thread.
#[inline(never)]
fn requests(mut routed: Routed, server: &Arc<Server>) -> Option<Member> {
    // The accept loop gave the socket its write timeout (handshake_timeout).
    let mut publisher = None;
    loop {
        let Routed {
            stream,
            peer,
            place,
            from,
            route,
            rest,
        } = match routed.member() {
            Ok(member) => return Some(member),
            Err(routed) => *routed,
        };
        match route {
            Route::Respond(response) => {
                if response.status >= 400 {
                    server.refuse();
                }
                respond(&stream, &response);
                return None;
            }
            Route::Stats { path, head_only } => {
                let clients = server.registry().get(&path).map_or(0, |c| c.clients());
                respond(&stream, &http::stats_response(clients, head_only));
                return None;
            }
            Route::Publish(publish) => {
                let publisher = publisher.get_or_insert_with(|| Publisher::new(server));
                let head = self::publish(&stream, server, publisher, publish, rest, from)?;
                // The next request of a kept-alive connection; its head may
                // have come with the last body.
                let waiting = Waiting {
                    stream,
                    peer,
                    place,
                    head,
                    request: None,
                };
                routed = next(waiting, server)?;
            }
            // Returned above, as members.
            Route::Upgrade { .. } | Route::Listen { .. } => return None,
        }
    }
}

/// What one read of a body takes at most.
const READ_SIZE: usize = 16 * 1024;

/// Who publishes over one connection, for the relay: other instances learn
/// a message's sender (0.1.x's correlation id), and the registry's members
/// never match its id, so every member gets its messages.
pub(crate) struct Publisher {
    id: u64,
    sender: Uuid,
}

impl Publisher {
    /// The publisher of a new connection.
    pub(crate) fn new(server: &Server) -> Publisher {
        Publisher {
            id: server.next_id(),
            sender: Uuid::new_v4(),
        }
    }
}

/// Answer a request head that cannot be used: 431 or 400.
fn refuse_head(stream: &Stream, server: &Server, e: HeadError) {
    server.refuse();
    let response = match e {
        HeadError::TooLarge => Response::error(431, "request head too large"),
        HeadError::Malformed(why) => Response::error(400, &format!("malformed request: {why}")),
    };
    respond(stream, &response);
}

/// Read the body of `publish` (after `rest`, the bytes that came with its
/// head) from client address `from`, publish it and answer. Returns what
/// came after the body when the connection stays open for another request.
/// Not inlined: its buffers would stay in the frame of [`requests`], below
/// the join of every websocket client (a stack page per connection).
#[inline(never)]
pub(crate) fn publish(
    stream: &Stream,
    server: &Arc<Server>,
    publisher: &Publisher,
    publish: Publish,
    rest: Vec<u8>,
    from: Option<IpAddr>,
) -> Option<Vec<u8>> {
    if server.is_stopping() {
        server.refuse();
        respond(stream, &Response::error(503, "server is shutting down"));
        return None;
    }
    let limits = server.limits();
    // A body is admitted when the budget could take all of it now; it is
    // charged only as it arrives. A client that waits for 100 Continue
    // sends nothing of a body that would not be.
    let announced = match publish.length {
        Length::Fixed(n) if n > FREE => n,
        _ => 0,
    };
    if !BUDGET.admits_incoming(announced) {
        BUDGET.refuse("HTTP publishes of large messages get 503");
        server.refuse();
        respond(stream, &budget_reached());
        return None;
    }
    // A publish is no member: it only holds its address's share.
    let visit = server.visit(from, false).ok().flatten();
    let mut input = Input {
        stream,
        buf: rest,
        pos: 0,
        pace: Pace::new(MinRate::of(limits), Instant::now()),
    };
    if publish.expect_continue
        && input.buf.is_empty()
        && stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
    {
        return None;
    }
    let max = limits.max_message_size;
    let share = visit.as_ref().map(|v| &**v.share());
    let body = match read_body(&mut input, publish.length, max, share) {
        Ok(body) => body,
        Err(e) => {
            if let Some(response) = body_refused(e, server, from, max) {
                server.refuse();
                respond(stream, &response);
            }
            return None;
        }
    };
    let kind = if publish.text && std::str::from_utf8(&body.bytes).is_ok() {
        Kind::Text
    } else {
        Kind::Binary
    };
    let frame = Frame::message(kind, &body.bytes);
    drop(body);
    let clients = deliver(server, publisher, &publish.path, &frame);
    let answer = http::published(clients, publish.keep_alive);
    if !publish.keep_alive {
        respond(stream, &answer);
        return None;
    }
    stream.send_all(&answer.to_bytes()).ok()?;
    Some(input.buf.split_off(input.pos))
}

/// The answer to a body that could not be read, counted where it is
/// counted; `None` when the client is gone.
fn body_refused(
    e: BodyError,
    server: &Server,
    from: Option<IpAddr>,
    max: usize,
) -> Option<Response> {
    Some(match e {
        BodyError::Gone => return None,
        BodyError::TimedOut => {
            server.refuse_for(Reason::Rate, from);
            Response::error(408, "the message arrived slower than min_rate")
        }
        BodyError::TooLarge => http::too_large(max),
        BodyError::Malformed(why) => Response::error(400, why),
        BodyError::Budget(Over::Budget) => {
            BUDGET.refuse("HTTP publishes of large messages get 503");
            budget_reached()
        }
        BodyError::Budget(Over::Share) => {
            server.refuse_for(Reason::AddressMemory, from);
            address_share_reached()
        }
    })
}

/// The answer to a body the memory budget cannot take.
fn budget_reached() -> Response {
    Response::error(503, "server memory budget reached").with("Retry-After", "5")
}

/// The answer to a body the address's share of the budget cannot take.
fn address_share_reached() -> Response {
    Response::error(503, "your address holds its share of the server's memory")
        .with("Retry-After", "5")
}

/// Publish `frame` as `publisher`'s message to channel `path`: to its local
/// members (how many it was queued for is returned) and to the relay.
fn deliver(server: &Server, publisher: &Publisher, path: &str, frame: &Frame) -> u64 {
    let channel = server.registry().get(path);
    // The sends go out when this is dropped, before the answer: a
    // publisher whose answer came has its message on its way to all.
    let mut flushes = Flushes::new(true);
    let path: Arc<str> = path.into();
    let clients = server.publish(
        channel.as_deref(),
        &path,
        publisher.id,
        Some(publisher.sender),
        frame,
        &mut flushes,
    );
    drop(flushes);
    log::debug!(
        "HTTP publisher {} published {} bytes to channel {} ({clients} here)",
        publisher.id,
        frame.payload().len(),
        fingerprint(&path)
    );
    clients
}

/// Why no body could be read.
#[derive(Debug)]
enum BodyError {
    /// The client closed or the connection failed.
    Gone,
    /// It arrived slower than `min_rate`.
    TimedOut,
    /// Over `max_message_size`.
    TooLarge,
    /// Broken chunked framing.
    Malformed(&'static str),
    /// The memory budget, or the address's share of it, cannot take it.
    Budget(Over),
}

/// A body being read, its bytes counted in the memory budget once past
/// [`FREE`], like a websocket client's partial message: as they arrive and
/// the buffer holding them grows (doubling).
struct Body<'a> {
    bytes: Vec<u8>,
    charged: usize,
    /// The client address's part of the budget, when it has one.
    share: Option<&'a Share>,
}

impl Body<'_> {
    /// Add `more`, which has arrived.
    fn extend(&mut self, more: &[u8]) -> Result<(), BodyError> {
        let total = self.bytes.len() + more.len();
        if total > FREE {
            let holds = total.next_power_of_two();
            if holds > self.charged {
                BUDGET
                    .try_charge_incoming(holds - self.charged, self.share)
                    .map_err(BodyError::Budget)?;
                self.charged = holds;
            }
            // Grown as charged, not by whatever the allocator would choose.
            self.bytes.reserve_exact(holds - self.bytes.len());
        }
        self.bytes.extend_from_slice(more);
        Ok(())
    }
}

impl Drop for Body<'_> {
    fn drop(&mut self) {
        BUDGET.release_incoming(self.charged, self.share);
    }
}

/// The bytes of the connection: what came with the head, then reads.
struct Input<'a> {
    stream: &'a Stream,
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    pos: usize,
    /// The body's progress against `min_rate`; a read waits at most until
    /// the end of its current period.
    pace: Pace,
}

impl Input<'_> {
    /// What has arrived and is not consumed yet.
    fn ready(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Wait for more, at most `limit` bytes of it.
    fn more(&mut self, limit: usize) -> Result<(), BodyError> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let from = self.buf.len();
        self.buf.resize(from + limit.clamp(1, READ_SIZE), 0);
        loop {
            let read = self
                .stream
                .read_until(&mut self.buf[from..], self.pace.deadline());
            let n = *read.as_ref().unwrap_or(&0);
            self.buf.truncate(from + n);
            self.pace.add(n as u64);
            return match read {
                Ok(0) => Err(BodyError::Gone),
                Ok(_) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    // The read timed out at the end of a period: the next
                    // starts if this one brought enough.
                    if self.pace.keeps_up(Instant::now()) {
                        self.buf.resize(from + limit.clamp(1, READ_SIZE), 0);
                        continue;
                    }
                    Err(BodyError::TimedOut)
                }
                Err(_) => Err(BodyError::Gone),
            };
        }
    }

    /// Move `n` bytes of what has arrived into `body`, waiting for them.
    fn take(&mut self, mut n: usize, body: &mut Body) -> Result<(), BodyError> {
        while n > 0 {
            if self.ready().is_empty() {
                self.more(n)?;
            }
            let take = n.min(self.ready().len());
            body.extend(&self.buf[self.pos..self.pos + take])?;
            self.pos += take;
            n -= take;
        }
        Ok(())
    }

    /// Skip the line ending the bytes must begin with.
    fn crlf(&mut self) -> Result<(), BodyError> {
        while self.ready().len() < 2 {
            self.more(2)?;
        }
        if !self.ready().starts_with(b"\r\n") {
            return Err(BodyError::Malformed("a chunk does not end with CRLF"));
        }
        self.pos += 2;
        Ok(())
    }
}

/// Read a body of `length`, at most `max` bytes.
fn read_body<'a>(
    input: &mut Input,
    length: Length,
    max: usize,
    share: Option<&'a Share>,
) -> Result<Body<'a>, BodyError> {
    let mut body = Body {
        bytes: Vec::new(),
        charged: 0,
        share,
    };
    match length {
        Length::Fixed(n) => input.take(n, &mut body)?,
        Length::Chunked => loop {
            let size = loop {
                match httparse::parse_chunk_size(input.ready()) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        input.pos += used;
                        break size;
                    }
                    Ok(httparse::Status::Partial) if input.ready().len() < 1024 => {
                        input.more(READ_SIZE)?
                    }
                    _ => return Err(BodyError::Malformed("invalid chunk size")),
                }
            };
            if size == 0 {
                skip_trailers(input)?;
                break;
            }
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if size > max - body.bytes.len() {
                return Err(BodyError::TooLarge);
            }
            input.take(size, &mut body)?;
            input.crlf()?;
        },
    }
    Ok(body)
}

/// Skip the trailer lines after the last chunk, up to the empty line.
fn skip_trailers(input: &mut Input) -> Result<(), BodyError> {
    loop {
        match input.ready().windows(2).position(|w| w == b"\r\n") {
            Some(0) => {
                input.pos += 2;
                return Ok(());
            }
            Some(end) => input.pos += end + 2,
            None if input.ready().len() < http::MAX_HEAD => input.more(READ_SIZE)?,
            None => return Err(BodyError::Malformed("trailers too large")),
        }
    }
}
