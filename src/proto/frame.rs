//! Server frames: a message, ping, pong or close frame encoded once, header
//! and payload, and shared by every connection it goes to.

use std::sync::{Arc, LazyLock};

use crate::memory::budget::BUDGET;

/// One encoded server frame, header and payload, shared by all its receivers.
/// Server frames are not masked, so the same bytes fit every connection.
///
/// An `Arc` of the bytes, 16 bytes: every queue slot and every writer's batch
/// holds these, so their size is paid per idle connection (`Bytes` is 32).
/// Its bytes count in the memory budget from its making until the last
/// receiver, batch or replay ring lets go of it.
#[derive(Clone, Debug)]
pub struct Frame(Arc<Counted>);

/// Frame bytes counted in the memory budget while they exist.
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct Counted([u8]);

impl Drop for Counted {
    fn drop(&mut self) {
        BUDGET.release(self.0.len());
    }
}

/// The kind of a data message; staps never changes it on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A text message (valid UTF-8).
    Text,
    /// A binary message.
    Binary,
}

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

impl Frame {
    fn encode(opcode: u8, parts: &[&[u8]]) -> Frame {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut buf = Vec::with_capacity(10 + len);
        buf.push(0x80 | opcode); // FIN: staps sends every message in one frame
        match len {
            0..=125 => buf.push(len as u8),
            126..=0xffff => {
                buf.push(126);
                buf.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                buf.push(127);
                buf.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        for part in parts {
            buf.extend_from_slice(part);
        }
        Frame::counted(buf)
    }

    /// Bytes that are not a websocket frame (an HTTP listener's chunk),
    /// shared and counted like one. `kind` and `payload` mean nothing for it.
    pub fn raw(parts: &[&[u8]]) -> Frame {
        Frame::counted(parts.concat())
    }

    fn counted(buf: Vec<u8>) -> Frame {
        let bytes: Arc<[u8]> = buf.into();
        BUDGET.charge(bytes.len());
        // SAFETY: `Counted` is a transparent wrapper of `[u8]`: the same
        // layout and pointer metadata, so the allocation fits it as it is.
        Frame(unsafe { Arc::from_raw(Arc::into_raw(bytes) as *const Counted) })
    }

    /// A complete data message.
    pub fn message(kind: Kind, payload: &[u8]) -> Frame {
        let opcode = match kind {
            Kind::Text => OP_TEXT,
            Kind::Binary => OP_BINARY,
        };
        Frame::encode(opcode, &[payload])
    }

    /// A close frame; `code` 0 means a close frame without a status code.
    pub fn close(code: u16, reason: &str) -> Frame {
        if code == 0 {
            return Frame::encode(OP_CLOSE, &[]);
        }
        Frame::encode(OP_CLOSE, &[&code.to_be_bytes(), reason.as_bytes()])
    }

    /// A ping with an empty payload (one for all: pinging allocates nothing).
    pub fn ping() -> Frame {
        static PING: LazyLock<Frame> = LazyLock::new(|| Frame::encode(OP_PING, &[]));
        PING.clone()
    }

    /// The answer to a ping.
    pub fn pong(payload: &[u8]) -> Frame {
        Frame::encode(OP_PONG, &[payload])
    }

    /// The bytes to put on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0.0
    }

    /// The kind of a data frame.
    pub fn kind(&self) -> Kind {
        match self.as_bytes()[0] & 0x0f {
            OP_TEXT => Kind::Text,
            _ => Kind::Binary,
        }
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        let header = match self.as_bytes()[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        &self.as_bytes()[header..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_headers_use_the_shortest_length() {
        assert_eq!(Frame::message(Kind::Text, b"hi").as_bytes(), b"\x81\x02hi");
        let f = Frame::message(Kind::Binary, &[0; 126]);
        assert_eq!(&f.as_bytes()[..4], &[0x82, 126, 0, 126]);
        let f = Frame::message(Kind::Binary, &[0; 70000]);
        assert_eq!(
            &f.as_bytes()[..10],
            &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]
        );
        assert_eq!(Frame::close(1001, "bye").as_bytes(), b"\x88\x05\x03\xe9bye");
        assert_eq!(Frame::close(0, "").as_bytes(), b"\x88\x00");
    }
}
