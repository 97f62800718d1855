//! The answers: any response, and the heads that make a client a member.

use std::fmt::Write as _;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use crate::os::stream::Stream;
use crate::proto::wire::Wire;

/// An HTTP response to write before closing the connection.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    head_only: bool,
    keep_alive: bool,
    /// Pages of any origin may read it (see [`CORS`]).
    cors: bool,
}

/// Pages on other origins may read staps' answers and streams: the URL is
/// the secret, and no cookie or credential is ever used, so nothing is
/// exposed to a page that the page did not already know. Without this,
/// `EventSource` and `fetch` from another origin were blocked by browsers
/// (websockets from other origins always worked).
const CORS: &str = "Access-Control-Allow-Origin: *\r\n";

/// The methods the public listeners answer.
pub(super) const METHODS: &str = "GET, HEAD, POST, PUT, OPTIONS";

impl Response {
    /// A response with a body of `content_type`.
    pub fn new(status: u16, content_type: &str, body: String) -> Response {
        Response {
            body,
            ..Response::empty(status)
        }
        .with("Content-Type", content_type)
    }

    /// A response with no header of its own and no body.
    fn empty(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: String::new(),
            head_only: false,
            keep_alive: false,
            cors: true,
        }
    }

    /// The answer to a CORS preflight (`OPTIONS`): any origin may publish
    /// with any `Content-Type`, and listen with `Last-Event-ID`; browsers
    /// keep the answer for a day (Chromium for two hours at most).
    pub(crate) fn preflight() -> Response {
        Response::empty(204)
            .with("Access-Control-Allow-Methods", METHODS)
            .with(
                "Access-Control-Allow-Headers",
                "Content-Type, Last-Event-ID",
            )
            .with("Access-Control-Max-Age", "86400")
    }

    /// Not for pages on other origins: the metrics listener's answers.
    pub(crate) fn private(mut self) -> Response {
        self.cors = false;
        self
    }

    /// An error: `reason` as one line of plain text.
    pub fn error(status: u16, reason: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{reason}\n"))
    }

    /// Answer a `HEAD` request: the headers only.
    pub fn head_only(mut self, head_only: bool) -> Response {
        self.head_only = head_only;
        self
    }

    /// Leave the connection open for another request (after a publish).
    pub fn keep_alive(mut self, keep_alive: bool) -> Response {
        self.keep_alive = keep_alive;
        self
    }

    /// Add a header.
    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes to send: status line, headers, and the body unless it answers HEAD.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if self.cors {
            head.push_str(CORS);
        }
        head.push_str(GUARDS);
        // A 204 has no body, and says no length (RFC 9110, 8.6).
        if self.status != 204 {
            let _ = write!(head, "Content-Length: {}\r\n", self.body.len());
        }
        let _ = write!(
            head,
            "{}\r\n",
            if self.keep_alive {
                ""
            } else {
                "Connection: close\r\n"
            }
        );
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Send `response` and close. Failures mean the client is gone: nothing to do.
pub(crate) fn respond(stream: &Stream, response: &Response) {
    let _ = stream.send_all(&response.to_bytes());
    let _ = stream.shutdown(Shutdown::Write);
    // Read what the client still sends until it closes, so that closing does not
    // reset the connection and destroy the response before the client reads it.
    stream.drain(Instant::now() + Duration::from_secs(1));
}

/// Headers of every HTTP answer: none may be sniffed into HTML (a 400
/// quotes the request), and no page may send its URL, the channel's secret,
/// on as a referrer.
const GUARDS: &str = "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n";

/// The head of a streaming listener's `200` answer (a websocket client's is
/// [`switching_protocols`]).
pub(crate) fn listening(wire: Wire) -> Vec<u8> {
    let (content_type, chunked) = match wire {
        Wire::WebSocket => return Vec::new(),
        Wire::EventStream { chunked } => ("text/event-stream; charset=utf-8", chunked),
        Wire::Raw { chunked } => ("application/octet-stream", chunked),
    };
    let framing = if chunked {
        "Transfer-Encoding: chunked\r\n"
    } else {
        "Connection: close\r\n"
    };
    // X-Accel-Buffering: nginx passes each event on at once even where
    // proxy_buffering is on.
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-store\r\n\
         X-Accel-Buffering: no\r\n{CORS}{GUARDS}{framing}\r\n"
    )
    .into_bytes()
}

/// The `101 Switching Protocols` answer to a valid upgrade.
pub(crate) fn switching_protocols(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// The answer to a message over `max_message_size`.
pub(crate) fn too_large(max: usize) -> Response {
    Response::error(
        413,
        &format!("message larger than max_message_size ({max} bytes)"),
    )
}

/// The answer to a publish: the local members it was queued for.
pub(crate) fn published(clients: u64, keep_alive: bool) -> Response {
    clients_response(clients as usize).keep_alive(keep_alive)
}

/// The answer to `GET /P?stats`.
pub(crate) fn stats_response(clients: usize, head_only: bool) -> Response {
    clients_response(clients).head_only(head_only)
}

/// `{"clients": N}`, as `?stats` and a publish answer it.
fn clients_response(clients: usize) -> Response {
    Response::new(
        200,
        "application/json",
        format!("{{\"clients\": {clients}}}\n"),
    )
    .with("Cache-Control", "no-store")
}
