//! An HTTP publish (SPEC §11): `POST` or `PUT /P` with a body is one message
//! to channel `/P`, for its members here and, through the relay, on every
//! linked instance. No channel is created for it.
//!
//! The head was checked by `http` (path rules, a known length within
//! `max_message_size`, a UTF-8 charset for text); here the body is read
//! (`Content-Length` or chunked, counted in the memory budget while it
//! grows, all of it within `handshake_timeout`), published the way a
//! websocket client's message is, and answered with the number of local
//! members it was queued for. The connection then stays open for the next
//! request unless the client asked otherwise.

use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use crate::budget::{BUDGET, FREE};
use crate::frame::{Frame, Kind};
use crate::http::{self, Length, Publish, Response, respond};
use crate::logging::fingerprint;
use crate::peer::Flushes;
use crate::server::Server;
use crate::stats;
use crate::stream::Stream;

/// What one read of a body takes at most.
const READ_SIZE: usize = 16 * 1024;

/// Who publishes over one connection, for the relay: other instances learn
/// a message's sender (0.1.x's correlation id), and the registry's members
/// never match its id, so every member gets its messages.
pub struct Publisher {
    id: u64,
    sender: Uuid,
}

impl Publisher {
    /// The publisher of a new connection.
    pub fn new(server: &Server) -> Publisher {
        Publisher {
            id: server.next_id(),
            sender: Uuid::new_v4(),
        }
    }
}

/// Read the body of `publish` (after `rest`, the bytes that came with its
/// head), publish it and answer. Returns what came after the body when the
/// connection stays open for another request.
pub fn publish(
    stream: &Stream,
    server: &Server,
    publisher: &Publisher,
    publish: Publish,
    rest: Vec<u8>,
    deadline: Instant,
) -> Option<Vec<u8>> {
    if server.is_stopping() {
        server.refuse();
        respond(stream, &Response::error(503, "server is shutting down"));
        return None;
    }
    let mut input = Input {
        stream,
        buf: rest,
        pos: 0,
        deadline,
    };
    if publish.expect_continue
        && input.buf.is_empty()
        && stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
    {
        return None;
    }
    let max = server.settings.limits.max_message_size;
    let body = match read_body(&mut input, publish.length, max) {
        Ok(body) => body,
        Err(e) => {
            let response = match e {
                BodyError::Gone => return None,
                BodyError::TimedOut => {
                    Response::error(408, "the message did not arrive within handshake_timeout")
                }
                BodyError::TooLarge => http::too_large(max),
                BodyError::Malformed(why) => Response::error(400, why),
                BodyError::Budget => {
                    BUDGET.refuse("HTTP publishes of large messages get 503");
                    Response::error(503, "server memory budget reached").with("Retry-After", "5")
                }
            };
            server.refuse();
            respond(stream, &response);
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

/// Publish `frame` as `publisher`'s message to channel `path`: to its local
/// members (how many it was queued for is returned) and to the relay.
fn deliver(server: &Server, publisher: &Publisher, path: &str, frame: &Frame) -> u64 {
    stats::add(&server.stats.messages_in, 1);
    stats::add(&server.stats.bytes_in, frame.payload().len() as u64);
    let limits = &server.settings.limits;
    let clients = server.registry.get(path).map_or(0, |channel| {
        // The sends go out when this is dropped, before the answer: a
        // publisher whose answer came has its message on its way to all.
        let mut flushes = Flushes::new(true);
        channel.publish(publisher.id, frame, limits, &server.stats, &mut flushes)
    });
    if let Some(relay) = &server.relay {
        let path: Arc<str> = path.into();
        relay.publish(&path, frame, publisher.sender, &server.stats);
    }
    log::debug!(
        "HTTP publisher {} published {} bytes to channel {} ({clients} here)",
        publisher.id,
        frame.payload().len(),
        fingerprint(path)
    );
    clients
}

/// Why no body could be read.
#[derive(Debug)]
enum BodyError {
    /// The client closed or the connection failed.
    Gone,
    /// Not all of it within the deadline.
    TimedOut,
    /// Over `max_message_size`.
    TooLarge,
    /// Broken chunked framing.
    Malformed(&'static str),
    /// The memory budget cannot take it.
    Budget,
}

/// A body being read, its bytes counted in the memory budget once past
/// [`FREE`], like a websocket client's partial message.
struct Body {
    bytes: Vec<u8>,
    charged: usize,
}

impl Body {
    /// Make room for `more` bytes.
    fn grow(&mut self, more: usize) -> Result<(), BodyError> {
        let total = self.bytes.len() + more;
        if total > FREE && total > self.charged {
            let charge = total - self.charged;
            if !BUDGET.try_charge_incoming(charge) {
                return Err(BodyError::Budget);
            }
            self.charged = total;
        }
        self.bytes.reserve(more);
        Ok(())
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        BUDGET.release_incoming(self.charged);
    }
}

/// The bytes of the connection: what came with the head, then reads.
struct Input<'a> {
    stream: &'a Stream,
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    pos: usize,
    deadline: Instant,
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
        let read = self.stream.read_until(&mut self.buf[from..], self.deadline);
        self.buf.truncate(from + *read.as_ref().unwrap_or(&0));
        match read {
            Ok(0) => Err(BodyError::Gone),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(BodyError::TimedOut),
            Err(_) => Err(BodyError::Gone),
        }
    }

    /// Move `n` bytes of what has arrived into `body`, waiting for them.
    fn take(&mut self, mut n: usize, body: &mut Body) -> Result<(), BodyError> {
        while n > 0 {
            if self.ready().is_empty() {
                self.more(n)?;
            }
            let take = n.min(self.ready().len());
            body.bytes
                .extend_from_slice(&self.buf[self.pos..self.pos + take]);
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
fn read_body(input: &mut Input, length: Length, max: usize) -> Result<Body, BodyError> {
    let mut body = Body {
        bytes: Vec::new(),
        charged: 0,
    };
    match length {
        Length::Fixed(n) => {
            body.grow(n)?;
            input.take(n, &mut body)?;
        }
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
            body.grow(size)?;
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
