//! What a client has sent of a message that is not complete yet.
//!
//! tungstenite parses the frames; the reader follows their headers in the
//! bytes it hands over, which tells three things tungstenite does not:
//! - how much a partial message holds, for the memory budget: tungstenite
//!   reserves a data frame's announced length when its header arrives, so
//!   that length is charged then, or the message refused (1009);
//! - whether a message makes progress: payload must keep arriving, and pings
//!   between its fragments do not count;
//! - when a large message ended exactly where the bytes handed over end, so
//!   that tungstenite's buffer, grown to the message's size, is empty and can
//!   be replaced by a small one.

use std::time::{Duration, Instant};

use crate::budget::{Budget, FREE};

/// The incoming side of one connection, frame by frame.
pub struct Incoming {
    /// Header bytes of the next frame, while it is incomplete.
    head: [u8; 14],
    head_len: usize,
    /// Payload bytes of the current frame still to come; `None` while a
    /// header is being read.
    left: Option<u64>,
    /// The current frame carries message data (not a control frame).
    data: bool,
    /// The current frame is the last of its message.
    fin: bool,
    /// Announced payload of the message in progress, and the part charged.
    message: usize,
    charged: usize,
    /// While a message larger than [`FREE`] is in progress: when its payload
    /// last grew.
    progress: Option<Instant>,
    max_message_size: usize,
    budget: &'static Budget,
    /// The memory budget refused a message: the connection closes with 1009.
    refused: bool,
    /// The last bytes followed ended a large message exactly.
    clean_end: bool,
}

impl Incoming {
    /// Nothing received yet; partial messages count in `budget`, those over
    /// `max_message_size` are left for tungstenite to refuse.
    pub fn new(max_message_size: usize, budget: &'static Budget) -> Incoming {
        Incoming {
            head: [0; 14],
            head_len: 0,
            left: None,
            data: false,
            fin: false,
            message: 0,
            charged: 0,
            progress: None,
            max_message_size,
            budget,
            refused: false,
            clean_end: false,
        }
    }

    /// How much of a buffer of `len` bytes the next read may fill: a large
    /// message's last frame is read up to its end and no further, so that
    /// when it is complete nothing else waits in tungstenite's buffer.
    pub fn read_limit(&self, len: usize) -> usize {
        match self.left {
            Some(left) if self.data && self.fin && self.progress.is_some() && left < len as u64 => {
                left as usize
            }
            _ => len,
        }
    }

    /// Follow `bytes`, as they are handed to tungstenite; false (and from
    /// then on [`Incoming::refused`]) when the budget refuses the message
    /// they begin or continue.
    pub fn follow(&mut self, mut bytes: &[u8], now: Instant) -> bool {
        self.clean_end = false;
        while !bytes.is_empty() && !self.refused {
            match self.left {
                None => {
                    let take = (self.head_needed() - self.head_len).min(bytes.len());
                    self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
                    self.head_len += take;
                    bytes = &bytes[take..];
                    if self.head_len == self.head_needed() {
                        self.start_frame(now);
                    }
                }
                Some(left) => {
                    let take = left.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    self.left = Some(left - take);
                    if self.data && self.progress.is_some() {
                        self.progress = Some(now);
                    }
                    if left == take {
                        self.end_frame();
                    }
                }
            }
        }
        !self.refused
    }

    /// Header bytes the frame being read has: 2, the extended length and
    /// the mask, as far as the bytes so far tell.
    fn head_needed(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn start_frame(&mut self, now: Instant) {
        let len = match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => u64::from_be_bytes(self.head[2..10].try_into().unwrap_or_default()),
            n => u64::from(n),
        };
        self.head_len = 0;
        self.fin = self.head[0] & 0x80 != 0;
        // Opcodes 0 to 7 carry data (tungstenite refuses the reserved ones).
        self.data = self.head[0] & 0x08 == 0;
        self.left = Some(len);
        if self.data {
            self.message = self
                .message
                .saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
            // Past max_message_size tungstenite refuses it and reserves nothing.
            if self.message > FREE && self.message <= self.max_message_size {
                let more = self.message - self.charged;
                if self.budget.try_charge_incoming(more) {
                    self.charged = self.message;
                    self.progress = Some(now);
                } else {
                    self.refused = true;
                }
            }
        }
        if len == 0 {
            self.end_frame();
        }
    }

    fn end_frame(&mut self) {
        self.left = None;
        if self.data && self.fin {
            // tungstenite holds the complete message now and hands it over
            // with this read; from then on its frame is counted instead.
            self.clean_end = self.progress.is_some();
            self.release();
        }
    }

    fn release(&mut self) {
        self.budget.release_incoming(self.charged);
        self.charged = 0;
        self.message = 0;
        self.progress = None;
    }

    /// Whether the memory budget refused a message.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Whether a message larger than `FREE` is in progress.
    pub fn in_large_message(&self) -> bool {
        self.progress.is_some()
    }

    /// Whether a large message in progress has had no payload for `timeout`.
    pub fn stalled(&self, timeout: Duration) -> bool {
        self.progress.is_some_and(|t| t.elapsed() >= timeout)
    }

    /// Whether the bytes followed last ended a large message exactly: once
    /// tungstenite has handed that message over, its buffer is empty.
    pub fn clean_end(&self) -> bool {
        self.clean_end
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A budget of the test's own: the process's is shared by every test.
    fn budget(limit: usize) -> &'static Budget {
        let budget = Box::leak(Box::new(Budget::new()));
        budget.set_limit(limit);
        budget
    }

    /// A masked client frame with `len` payload bytes (zeros).
    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.resize(f.len() + len, 0);
        f
    }

    #[test]
    fn a_large_message_is_charged_from_its_header_until_its_end() {
        let b = budget(1 << 30);
        let mut inc = Incoming::new(1 << 20, b);
        let f = frame(true, 2, 100_000);
        // Byte by byte through the header: charged once it is whole.
        for b in &f[..14] {
            assert!(inc.follow(&[*b], Instant::now()));
        }
        assert!(inc.in_large_message());
        assert_eq!(b.used(), 100_000);
        assert_eq!(inc.read_limit(1 << 20), f.len() - 14);
        assert!(inc.follow(&f[14..], Instant::now()));
        assert!(!inc.in_large_message());
        assert!(inc.clean_end());
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn pings_between_fragments_are_no_progress_and_small_messages_are_free() {
        let b = budget(1 << 30);
        let mut inc = Incoming::new(1 << 20, b);
        let t0 = Instant::now();
        inc.follow(&frame(true, 1, 10), t0);
        assert!(!inc.in_large_message());
        assert_eq!(b.used(), 0);
        inc.follow(&frame(false, 2, 5000), t0);
        assert!(inc.in_large_message());
        // A ping a minute later does not move the message on.
        inc.follow(&frame(true, 9, 4), t0 + Duration::from_secs(60));
        assert_eq!(inc.progress, Some(t0));
        inc.follow(&frame(true, 0, 3000), t0 + Duration::from_secs(61));
        assert!(!inc.in_large_message());
        // The ping's end is not a message's: its buffer is not known empty.
        inc.follow(&frame(true, 9, 0), t0);
        assert!(!inc.clean_end());
    }

    #[test]
    fn a_message_over_the_budget_is_refused_and_oversized_ones_left_to_tungstenite() {
        let b = budget(1 << 20);
        // Half the budget is for partial messages: 600 KiB is over it.
        let mut inc = Incoming::new(1 << 20, b);
        assert!(!inc.follow(&frame(true, 2, 600 << 10)[..14], Instant::now()));
        assert!(inc.refused());
        assert_eq!(b.used(), 0);
        drop(inc);
        let mut inc = Incoming::new(1 << 20, b);
        assert!(inc.follow(&frame(false, 2, 300 << 10)[..14], Instant::now()));
        // Dropped mid-message (the connection ended): all of it given back.
        drop(inc);
        assert_eq!(b.used(), 0);
        // Over max_message_size: tungstenite refuses it, nothing is reserved.
        let mut inc = Incoming::new(1000, b);
        assert!(inc.follow(&frame(true, 2, 600 << 10)[..14], Instant::now()));
        assert_eq!(b.used(), 0);
    }
}
