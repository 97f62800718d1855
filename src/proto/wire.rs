//! How a member's messages look on its connection: websocket frames, or, for
//! an HTTP streaming listener (SPEC §11), Server-Sent Events or raw payloads
//! in a chunked response.
//!
//! A message is encoded once per wire format and the encoding shared by all
//! the members that use it ([`Encodings`]): websocket members share the
//! publisher's frame, SSE listeners one `data:` event, raw listeners one
//! chunk. Every encoding is a [`Frame`], so it counts in the memory budget
//! and goes through the same queues and writers.

use data_encoding::BASE64;

use crate::proto::frame::{Frame, Kind};

/// The wire format of one member's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Websocket frames, after a `101`.
    WebSocket,
    /// `text/event-stream`: each message an event (`GET /P` with
    /// `Accept: text/event-stream`, or `?sse`).
    EventStream {
        /// In HTTP/1.1 chunks; an HTTP/1.0 response ends with the connection.
        chunked: bool,
    },
    /// Each payload and a newline (`?raw`).
    Raw {
        /// In HTTP/1.1 chunks; an HTTP/1.0 response ends with the connection.
        chunked: bool,
    },
}

impl Wire {
    /// Where its encoding is kept in [`Encodings`].
    fn slot(self) -> usize {
        match self {
            Wire::WebSocket => 0,
            Wire::EventStream { chunked } => 1 + usize::from(chunked),
            Wire::Raw { chunked } => 3 + usize::from(chunked),
        }
    }

    fn chunked(self) -> bool {
        matches!(
            self,
            Wire::EventStream { chunked: true } | Wire::Raw { chunked: true }
        )
    }

    /// The message of websocket frame `frame`, whose id is `id`, in this
    /// format: an SSE event carries the id (`id:`), for a listener that
    /// reconnects to resume from (SPEC §11).
    fn encode(self, frame: &Frame, id: u64) -> Frame {
        let payload = frame.payload();
        let mut body = Vec::with_capacity(payload.len() + 40);
        if self.has_ids() {
            body.extend_from_slice(format!("id: {id}\n").as_bytes());
        }
        match (self, frame.kind()) {
            (Wire::WebSocket, _) => return frame.clone(),
            (Wire::Raw { .. }, _) => {
                body.extend_from_slice(payload);
                body.push(b'\n');
            }
            (Wire::EventStream { .. }, Kind::Text) => {
                // A line of an event cannot hold a line break: each line of
                // the text is a `data:` line, and the client joins them with
                // "\n" again (CR and CRLF, which SSE also splits at, come
                // back as "\n").
                let text = String::from_utf8_lossy(payload);
                for line in text.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
                    body.extend_from_slice(b"data: ");
                    body.extend_from_slice(line.as_bytes());
                    body.push(b'\n');
                }
                body.push(b'\n');
            }
            (Wire::EventStream { .. }, Kind::Binary) => {
                body.extend_from_slice(b"event: binary\ndata: ");
                body.extend_from_slice(BASE64.encode(payload).as_bytes());
                body.extend_from_slice(b"\n\n");
            }
        }
        self.frame(&body)
    }

    /// `body` as the bytes of this wire: a chunk, or as it is.
    fn frame(self, body: &[u8]) -> Frame {
        if !self.chunked() {
            return Frame::raw(&[body]);
        }
        let size = format!("{:x}\r\n", body.len());
        Frame::raw(&[size.as_bytes(), body, b"\r\n"])
    }

    /// Whether its messages carry their ids (SSE's `id:`).
    pub(crate) fn has_ids(self) -> bool {
        matches!(self, Wire::EventStream { .. })
    }

    /// What tells a listener that resumed from an id no longer held that it
    /// may have missed messages: an SSE `gap` event (with empty data, or
    /// EventSource would not dispatch it). Websocket and raw streams have
    /// no room for it.
    pub(crate) fn gap(self) -> Option<Frame> {
        match self {
            Wire::EventStream { .. } => Some(self.frame(b"event: gap\ndata: \n\n")),
            _ => None,
        }
    }

    /// What keeps the connection alive every `ping_interval`: a ping, an SSE
    /// comment, or nothing (a raw stream has no room for anything but
    /// payloads).
    pub fn ping(self) -> Option<Frame> {
        match self {
            Wire::WebSocket => Some(Frame::ping()),
            Wire::EventStream { .. } => Some(self.frame(b": ping\n\n")),
            Wire::Raw { .. } => None,
        }
    }

    /// The last bytes of a connection closed with `code` and `reason`: a
    /// close frame, the last chunk, or none (an HTTP/1.0 response ends when
    /// the connection does).
    pub fn close(self, code: u16, reason: &str) -> Option<Frame> {
        match self {
            Wire::WebSocket => Some(Frame::close(code, reason)),
            _ if self.chunked() => Some(Frame::raw(&[b"0\r\n\r\n"])),
            _ => None,
        }
    }
}

/// One message in every wire format its receivers use, each encoded at most
/// once.
pub(crate) struct Encodings<'a> {
    frame: &'a Frame,
    id: u64,
    http: [Option<Frame>; 4],
}

impl<'a> Encodings<'a> {
    /// The encodings of the message of websocket frame `frame`, whose id is
    /// `id`.
    pub(crate) fn new(frame: &'a Frame, id: u64) -> Encodings<'a> {
        Encodings {
            frame,
            id,
            http: Default::default(),
        }
    }

    /// The message as `wire` carries it.
    pub(crate) fn get(&mut self, wire: Wire) -> &Frame {
        match wire.slot() {
            0 => self.frame,
            slot => self.http[slot - 1].get_or_insert_with(|| wire.encode(self.frame, self.id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(wire: Wire, kind: Kind, payload: &[u8]) -> Vec<u8> {
        let frame = Frame::message(kind, payload);
        Encodings::new(&frame, 7).get(wire).as_bytes().to_vec()
    }

    #[test]
    fn text_lines_become_data_lines_and_binary_base64() {
        let sse = Wire::EventStream { chunked: false };
        assert_eq!(
            encoded(sse, Kind::Text, b"one\ntwo\r\nthree\rfour"),
            b"id: 7\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
        );
        assert_eq!(encoded(sse, Kind::Text, b""), b"id: 7\ndata: \n\n");
        assert_eq!(
            encoded(sse, Kind::Binary, &[0, 255, 10]),
            b"id: 7\nevent: binary\ndata: AP8K\n\n"
        );
        assert_eq!(sse.gap().unwrap().as_bytes(), b"event: gap\ndata: \n\n");
        assert!(Wire::WebSocket.gap().is_none());
        let raw = Wire::Raw { chunked: false };
        assert_eq!(encoded(raw, Kind::Binary, &[0, 255]), b"\x00\xff\n");
    }

    #[test]
    fn chunked_wires_frame_each_message_and_end_with_the_last_chunk() {
        let raw = Wire::Raw { chunked: true };
        assert_eq!(encoded(raw, Kind::Text, b"hello"), b"6\r\nhello\n\r\n");
        let long = vec![b'x'; 300];
        assert!(encoded(raw, Kind::Text, &long).starts_with(b"12d\r\n"));
        assert_eq!(raw.close(1001, "bye").unwrap().as_bytes(), b"0\r\n\r\n");
        assert!(raw.ping().is_none());
        assert!(Wire::Raw { chunked: false }.close(1001, "").is_none());
        let sse = Wire::EventStream { chunked: true };
        assert_eq!(sse.ping().unwrap().as_bytes(), b"8\r\n: ping\n\n\r\n");
    }

    #[test]
    fn each_format_is_encoded_once_and_websocket_members_share_the_frame() {
        let frame = Frame::message(Kind::Text, b"x");
        let mut encodings = Encodings::new(&frame, 1);
        let sse = Wire::EventStream { chunked: true };
        let first = encodings.get(sse).as_bytes().as_ptr();
        assert_eq!(encodings.get(sse).as_bytes().as_ptr(), first);
        assert_eq!(
            encodings.get(Wire::WebSocket).as_bytes().as_ptr(),
            frame.as_bytes().as_ptr()
        );
    }
}
