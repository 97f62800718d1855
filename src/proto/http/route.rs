//! What a request gets: the checks of an upgrade, a stream, a publish.

use super::head::{Request, accepts};
use super::response::{METHODS, Response, too_large};
use super::usage::{base_url, url_of, usage};
use crate::config::Settings;
use crate::config::percent::percent_decode;
use crate::proto::query::{Options, parse_options, query_keys};
use crate::proto::twin::{Access, Twins};
use crate::proto::wire::Wire;

/// What a request head gets.
#[derive(Debug)]
pub enum Route {
    /// A valid websocket upgrade for channel `path`.
    Upgrade {
        /// The channel: the decoded path (of the channel a twin names).
        path: String,
        /// What its URL allows (SPEC §12): a read-only twin's client may
        /// only listen, a publish-only twin's only send.
        access: Access,
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
        /// What its URL allows: the channel's own, or its read-only twin
        /// (a publish-only twin cannot listen).
        access: Access,
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
            for (key, twin) in [
                ("readonly", Access::ReadOnly),
                ("writeonly", Access::WriteOnly),
            ] {
                if has(key) {
                    let named = channel_path(req, settings, twins)?;
                    // A twin does not lead to the other: a webhook's
                    // publish-only URL must not give away the listeners'.
                    if named.access != Access::Full && named.access != twin {
                        return Err(Response::error(403, "a twin URL names only itself"));
                    }
                    let url = url_of(&base_url(req, settings), &twins.twin(twin, &named.path));
                    return Ok(Route::Respond(
                        Response::new(200, "text/plain; charset=utf-8", format!("{url}\n"))
                            .with("Cache-Control", "no-store")
                            .with("Vary", "Host, X-Forwarded-Proto")
                            .head_only(head_only),
                    ));
                }
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
            let Named { path, access } = channel_path(req, settings, twins)?;
            if !access.may_listen() {
                return Err(Response::error(403, "a publish-only URL cannot listen"));
            }
            let mut options = parse_options(&req.target, &settings.limits)
                .map_err(|e| Response::error(400, &e))?;
            if let Some(last) = req.header("Last-Event-ID").filter(|_| wire.has_ids()) {
                // What EventSource sends by itself when it reconnects: newer
                // than the URL's `since`. An id staps never gave is one it
                // does not hold (0 is never a message's id).
                options.since = Some(last.trim().parse().unwrap_or(0));
            }
            Ok(Route::Listen {
                path,
                access,
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
    if !named.access.may_send() {
        return Err(Response::error(403, "a read-only URL cannot publish"));
    }
    let path = named.path;
    let bad = |reason: &str| Response::error(400, reason);
    let lengths: Vec<&str> = req
        .header_values("Content-Length")
        .into_iter()
        .map(str::trim)
        .collect();
    let codings = req.header_values("Transfer-Encoding").len();
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
    let text = is_text(req)?;
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

/// Whether a publish's body is text, by its `Content-Type`: what people
/// send text as is no type, text/*, JSON, a form (curl -d), or any type that
/// says it is UTF-8. Text in another charset is refused (415).
fn is_text(req: &Request) -> Result<bool, Response> {
    let mut media = req.header("Content-Type").unwrap_or("").split(';');
    let kind = media.next().unwrap_or("").trim();
    let charset = media.filter_map(|p| p.split_once('=')).find_map(|(k, v)| {
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| v.trim().trim_matches('"'))
    });
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
    Ok(text)
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
    let Named { path, access } = channel_path(req, settings, twins)?;
    let mut options = parse_options(&req.target, &settings.limits).map_err(|e| bad(&e))?;
    // A websocket client's wire has no ids: it uses `replay`.
    options.since = None;
    if !access.may_listen() {
        // A publish-only twin's client receives nothing, not even a replay.
        options.replay = 0;
    }
    Ok(Route::Upgrade {
        path,
        access,
        accept: tungstenite::handshake::derive_accept_key(key.as_bytes()),
        options,
    })
}

/// The channel a request names.
struct Named {
    /// The channel's path.
    path: String,
    /// What the URL that names it allows.
    access: Access,
}

/// The channel a request names, checked as a websocket upgrade's is: its
/// path, or the channel of a twin URL (a `/r/` or `/w/` path whose token
/// does not decrypt is an ordinary path).
fn channel_path(req: &Request, settings: &Settings, twins: &Twins) -> Result<Named, Response> {
    let bad = |reason: &str| Response::error(400, reason);
    if !req.target.starts_with('/') {
        return Err(bad("the request target must be a path"));
    }
    let path = decode_path(&req.target)
        .ok_or_else(|| bad("the channel path is not valid UTF-8 once decoded"))?;
    let (path, access) = twins.channel(&path).unwrap_or((path, Access::Full));
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
    Ok(Named { path, access })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::http::parse_head;

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
}
