//! The request head: read, parsed, and asked about.

use std::time::Instant;

use crate::os::stream::Stream;

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
    pub(super) fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// Whether the `Accept` header names one of `types` (not `*/*`), with a
/// quality above 0.
pub(super) fn accepts(req: &Request, types: &[&str]) -> bool {
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
