//! What a client sends after its handshake, frame by frame, on its way to
//! tungstenite.
//!
//! tungstenite parses the frames; the reader passes every byte through here
//! first, which does what tungstenite does not:
//! - **no reservation ahead.** tungstenite reserves a frame's announced
//!   length as soon as its header arrives, so 14 bytes could make it hold a
//!   megabyte. A data frame longer than [`CHUNK`] is handed over as
//!   fragments of at most `CHUNK` (the same payload, mask and message; a
//!   client cannot tell), so tungstenite's buffer grows only with what has
//!   arrived;
//! - **the memory budget** is charged with the payload that has arrived, as
//!   the buffer holding it grows (doubling), never with what a header
//!   announces; a message it cannot take is refused (1009);
//! - **progress**: a message in progress must average `min_rate` bytes a
//!   second over every `handshake_timeout` (pings between its fragments do
//!   not count), or it is closed (1008);
//! - a frame length not in its minimal form (RFC 6455 §5.2) is a protocol
//!   error (1002), and a data frame from a read-only client is refused at its
//!   header (1008), before its payload is read;
//! - when a large message ends exactly where the bytes handed over end,
//!   tungstenite's buffer is empty and can be replaced by a small one.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Limits;
use crate::memory::budget::{Budget, FREE, Over, Share};

/// The largest frame tungstenite is handed: longer data frames are split
/// into fragments of this size (a multiple of 4, so each keeps the mask).
pub(crate) const CHUNK: usize = 16 * 1024;

/// Why a client's message was refused; the reader closes it so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The memory budget cannot take the message: 1009.
    Budget,
    /// The client's address holds its share of the budget: 1009.
    Address,
    /// A data frame from a read-only client: 1008.
    ReadOnly,
    /// A frame length not in its minimal form: 1002.
    Protocol,
    /// A message arriving slower than `min_rate`: 1008.
    Slow,
}

/// How fast a message or HTTP body in progress must arrive: `min_rate`
/// bytes a second, averaged over every `period` (`handshake_timeout`).
#[derive(Clone, Copy, Debug)]
pub struct MinRate {
    /// The period averaged over.
    pub period: Duration,
    /// Bytes a second.
    pub min_rate: u64,
}

impl MinRate {
    /// The rate `limits` ask for.
    pub fn of(limits: &Limits) -> MinRate {
        MinRate {
            period: limits.handshake_timeout,
            min_rate: limits.min_rate,
        }
    }
}

/// One message's or body's progress against its [`MinRate`]: each period
/// of its life must bring `min_rate` × `period` bytes, and at least one (so
/// `min_rate = 0` still ends one that stopped).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    period: Duration,
    needed: u64,
    /// When the current period started, and what it brought so far.
    since: Instant,
    got: u64,
}

impl Pace {
    /// Timed from `now`.
    pub(crate) fn new(rate: MinRate, now: Instant) -> Pace {
        Pace {
            period: rate.period,
            needed: ((rate.min_rate as f64 * rate.period.as_secs_f64()) as u64).max(1),
            since: now,
            got: 0,
        }
    }

    /// `n` more bytes arrived.
    pub(crate) fn add(&mut self, n: u64) {
        self.got += n;
    }

    /// When the current period ends.
    pub(crate) fn deadline(&self) -> Instant {
        self.since + self.period
    }

    /// Whether it keeps up at `now`: false once a whole period brought less
    /// than it must; a period that brought enough starts the next.
    pub(crate) fn keeps_up(&mut self, now: Instant) -> bool {
        if now < self.deadline() {
            return true;
        }
        if self.got < self.needed {
            return false;
        }
        self.since = now;
        self.got = 0;
        true
    }
}

/// A data frame being handed over in fragments.
#[derive(Clone, Copy)]
struct Split {
    mask: [u8; 4],
    /// The frame's own FIN, for its last fragment.
    fin: bool,
}

/// The incoming side of one connection.
pub struct Incoming {
    /// Header bytes of the next frame, held back while it is incomplete: it
    /// may have to be rewritten once it is whole.
    head: [u8; 14],
    head_len: usize,
    /// The header of the next fragment, to hand over before its payload.
    pending: [u8; 8],
    pending_len: u8,
    pending_pos: u8,
    /// Payload bytes of the current frame still to come; `None` while a
    /// header is being read.
    left: Option<u64>,
    /// Of those, the ones of the fragment tungstenite is reading (all of
    /// them when the frame is not split).
    piece: u64,
    split: Option<Split>,
    /// The current frame carries message data (not a control frame).
    data: bool,
    /// The current frame is the last of its message.
    fin: bool,
    /// Announced payload of the message in progress (for telling a large
    /// one), what has arrived of it, and the part charged.
    announced: u64,
    arrived: usize,
    charged: usize,
    /// While a message is in progress: its payload's pace.
    pace: Option<Pace>,
    max_message_size: usize,
    rate: MinRate,
    budget: &'static Budget,
    /// The client address's part of the budget, when it has one.
    share: Option<Arc<Share>>,
    /// A read-only client: any data frame is refused.
    readonly: bool,
    refusal: Option<Refusal>,
    /// The last bytes handed over ended a large message exactly.
    clean_end: bool,
}

impl Incoming {
    /// Nothing received yet; partial messages count in `budget` (and in
    /// `share`, the client address's part of it), those over
    /// `max_message_size` are left for tungstenite to refuse; a `readonly`
    /// client may send no message at all.
    pub fn new(
        max_message_size: usize,
        rate: MinRate,
        budget: &'static Budget,
        share: Option<Arc<Share>>,
        readonly: bool,
    ) -> Incoming {
        Incoming {
            head: [0; 14],
            head_len: 0,
            pending: [0; 8],
            pending_len: 0,
            pending_pos: 0,
            left: None,
            piece: 0,
            split: None,
            data: false,
            fin: false,
            announced: 0,
            arrived: 0,
            charged: 0,
            pace: None,
            max_message_size,
            rate,
            budget,
            share,
            readonly,
            refusal: None,
            clean_end: false,
        }
    }

    /// Read from the client through `raw` into `buf`, as tungstenite's
    /// `Read` would: a fragment header of ours, or what `raw` gives, with
    /// headers rewritten and incomplete ones held back. `raw` reads into the
    /// slice it is given; its errors pass through. A refusal is an error
    /// too ([`Incoming::refusal`] says which).
    pub fn read_with(
        &mut self,
        buf: &mut [u8],
        now: impl Fn() -> Instant,
        mut raw: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        loop {
            if let Some(refusal) = self.refusal {
                return Err(refused(refusal));
            }
            if let Some(n) = self.pending_into(buf) {
                return Ok(n);
            }
            let held = self.head_len;
            if buf.len() <= held {
                return Err(io::Error::other("read buffer smaller than a frame header"));
            }
            buf[..held].copy_from_slice(&self.head[..held]);
            let limit = self.read_limit(buf.len() - held);
            let n = raw(&mut buf[held..held + limit])?;
            if n == 0 {
                return Ok(0);
            }
            let now = now();
            let out = self.process(&mut buf[..held + n], now);
            // A trickle never lets the read time out: it is timed here,
            // with what this read brought.
            if out.is_ok() && self.too_slow(now) {
                return Err(refused(self.refuse(Refusal::Slow)));
            }
            match out {
                Ok(0) => {}
                Ok(out) => return Ok(out),
                Err(refusal) => return Err(refused(refusal)),
            }
        }
    }

    /// Rewrite `rest`, the bytes that came with the request head, as reads
    /// would have: tungstenite starts from them.
    pub fn take_rest(&mut self, rest: &mut Vec<u8>, now: Instant) {
        // The head is at most MAX_HEAD (less than CHUNK): no fragment ends
        // inside it, so rewriting never needs more room.
        match self.process(rest, now) {
            Ok(len) => rest.truncate(len),
            // Shows at the first read.
            Err(_) => rest.clear(),
        }
    }

    /// The fragment header waiting to be handed over, copied into `buf`.
    fn pending_into(&mut self, buf: &mut [u8]) -> Option<usize> {
        let (pos, len) = (usize::from(self.pending_pos), usize::from(self.pending_len));
        if pos == len {
            return None;
        }
        let n = (len - pos).min(buf.len());
        buf[..n].copy_from_slice(&self.pending[pos..pos + n]);
        self.pending_pos += n as u8;
        Some(n)
    }

    /// How much the next read may take into a buffer of `len` bytes: a
    /// fragment up to its end and no further (the next one needs its header
    /// first), and so a large message's last frame, so that when it is
    /// complete nothing else waits in tungstenite's buffer.
    fn read_limit(&self, len: usize) -> usize {
        let limit = match self.left {
            Some(_) if self.split.is_some() => self.piece,
            Some(left) if self.data && self.fin && self.is_large() => left,
            // A header and the payload after it: less than a fragment, so
            // the first fragment never ends inside one read.
            _ => (CHUNK - 14) as u64,
        };
        limit.min(len as u64) as usize
    }

    /// Walk `buf` (bytes in the order they arrived, starting where the last
    /// call stopped): rewrite the header of a frame to split, follow the
    /// payload, hold back an incomplete header. Returns how many bytes of
    /// `buf` (from its start) tungstenite gets.
    ///
    /// Not inlined: its locals would stay in the frame of [`Self::read_with`],
    /// which is on the stack while an idle reader waits for its client, and
    /// cost every idle connection a stack page (BENCHMARKS.md).
    #[inline(never)]
    fn process(&mut self, buf: &mut [u8], now: Instant) -> Result<usize, Refusal> {
        self.clean_end = false;
        self.head_len = 0;
        let mut len = buf.len();
        let mut at = 0;
        while at < len {
            let Some(left) = self.left else {
                let Some(header) = Header::parse(&buf[at..len]) else {
                    // Incomplete: held back until the rest of it arrives.
                    self.head_len = len - at;
                    self.head[..len - at].copy_from_slice(&buf[at..len]);
                    len = at;
                    break;
                };
                if !header.minimal {
                    return Err(self.refuse(Refusal::Protocol));
                }
                let wrote = self.start_frame(&header, &mut buf[at..len], now)?;
                len -= header.len - wrote;
                at += wrote;
                continue;
            };
            let take = self.piece.min((len - at) as u64);
            at += take as usize;
            self.piece -= take;
            self.left = Some(left - take);
            if self.data {
                self.arrive(take)?;
            }
            if left == take {
                self.end_frame();
            } else if self.piece == 0 {
                self.next_piece(left - take);
            }
        }
        Ok(len)
    }

    /// A frame's header is whole at the start of `bytes`: follow the frame,
    /// and rewrite its header in place when it is split. Returns how many
    /// bytes its header takes now.
    fn start_frame(
        &mut self,
        header: &Header,
        bytes: &mut [u8],
        now: Instant,
    ) -> Result<usize, Refusal> {
        self.fin = header.fin;
        // Opcodes 0 to 7 carry data (tungstenite refuses the reserved ones).
        self.data = header.opcode & 0x08 == 0;
        self.left = Some(header.length);
        self.piece = header.length;
        self.split = None;
        let mut wrote = header.len;
        if self.data {
            if self.readonly {
                return Err(self.refuse(Refusal::ReadOnly));
            }
            if self.pace.is_none() {
                self.pace = Some(Pace::new(self.rate, now));
            }
            self.announced = self.announced.saturating_add(header.length);
            // Past max_message_size tungstenite refuses it at once, and an
            // unmasked frame is a protocol error: both as they are.
            if header.length > CHUNK as u64
                && header.length <= self.max_message_size as u64
                && let Some(mask) = header.mask
            {
                wrote = self.split(header, mask, bytes);
            }
        }
        if header.length == 0 {
            self.end_frame();
        }
        Ok(wrote)
    }

    /// Rewrite the header of the frame at the start of `bytes` as its first
    /// fragment's; how many bytes that header takes. Out of line: a reader
    /// that passes a chat message here must not pay a stack page for it.
    #[cold]
    #[inline(never)]
    fn split(&mut self, header: &Header, mask: [u8; 4], bytes: &mut [u8]) -> usize {
        let mut first = [
            bytes[0] & 0x7f,
            0x80 | 126,
            (CHUNK >> 8) as u8,
            CHUNK as u8,
            0,
            0,
            0,
            0,
        ];
        first[4..].copy_from_slice(&mask);
        bytes.copy_within(header.len.., first.len());
        bytes[..first.len()].copy_from_slice(&first);
        self.split = Some(Split {
            mask,
            fin: header.fin,
        });
        self.piece = CHUNK as u64;
        first.len()
    }

    /// The fragment after the one just handed over, `left` bytes of the
    /// frame still to come: its header goes out before its payload.
    fn next_piece(&mut self, left: u64) {
        let Some(split) = self.split else {
            return;
        };
        let size = left.min(CHUNK as u64);
        let last = left <= CHUNK as u64;
        let h = &mut self.pending;
        h[0] = if last && split.fin { 0x80 } else { 0 };
        let n = if size < 126 {
            h[1] = 0x80 | size as u8;
            2
        } else {
            h[1] = 0x80 | 126;
            h[2..4].copy_from_slice(&(size as u16).to_be_bytes());
            4
        };
        h[n..n + 4].copy_from_slice(&split.mask);
        self.pending_len = (n + 4) as u8;
        self.pending_pos = 0;
        self.piece = size;
    }

    /// `n` bytes of payload of the message in progress arrived: they count
    /// for its rate, and in the budget once it is past [`FREE`], as the
    /// buffer holding it grows.
    fn arrive(&mut self, n: u64) -> Result<(), Refusal> {
        if let Some(pace) = &mut self.pace {
            pace.add(n);
        }
        self.arrived = self.arrived.saturating_add(n as usize);
        if self.arrived <= FREE || self.arrived > self.max_message_size {
            return Ok(());
        }
        let holds = self.arrived.next_power_of_two();
        if holds > self.charged {
            let charged = self
                .budget
                .try_charge_incoming(holds - self.charged, self.share.as_deref());
            if let Err(over) = charged {
                return Err(self.refuse(match over {
                    Over::Budget => Refusal::Budget,
                    Over::Share => Refusal::Address,
                }));
            }
            self.charged = holds;
        }
        Ok(())
    }

    fn end_frame(&mut self) {
        self.left = None;
        self.split = None;
        if self.data && self.fin {
            // tungstenite holds the complete message now and hands it over
            // with this read; from then on its frame is counted instead.
            self.clean_end = self.is_large();
            self.release();
        }
    }

    fn release(&mut self) {
        self.budget
            .release_incoming(self.charged, self.share.as_deref());
        self.charged = 0;
        self.arrived = 0;
        self.announced = 0;
        self.pace = None;
    }

    fn refuse(&mut self, refusal: Refusal) -> Refusal {
        self.refusal = Some(refusal);
        refusal
    }

    /// Why the client's message was refused, once it was.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }

    /// Whether everything handed over so far ended a message, and nothing is
    /// held back: tungstenite then holds no part of one, and the
    /// connection may wait without a reader (`client`).
    pub fn at_rest(&self) -> bool {
        self.left.is_none()
            && self.head_len == 0
            && self.pace.is_none()
            && self.pending_pos == self.pending_len
            && self.refusal.is_none()
    }

    /// Whether a message larger than [`FREE`] is in progress.
    pub fn in_large_message(&self) -> bool {
        self.pace.is_some() && self.is_large()
    }

    fn is_large(&self) -> bool {
        self.announced > FREE as u64
    }

    /// Whether the message in progress falls short of its [`Pace`]. Pings
    /// between its fragments are no progress.
    #[inline(never)]
    pub fn too_slow(&mut self, now: Instant) -> bool {
        self.pace.as_mut().is_some_and(|pace| !pace.keeps_up(now))
    }

    /// Whether the bytes handed over last ended a large message exactly:
    /// once tungstenite has handed that message over, its buffer is empty.
    pub fn clean_end(&self) -> bool {
        self.clean_end
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.release();
    }
}

/// What tungstenite reads from: the client's bytes through [`Incoming`].
pub struct Reframed<S> {
    /// What the client has sent of a message not complete yet. On the heap:
    /// a reader's stack stays within two resident pages.
    pub incoming: Box<Incoming>,
    /// Where the bytes come from.
    pub inner: S,
}

/// The socket side of [`Reframed`]: told whether a large message is in
/// progress after each read (a reader waits for one with a shorter timeout).
pub trait Source: io::Read {
    /// A large message is in progress, or not.
    fn watch(&mut self, _large: bool) {}
}

impl<S: Source> io::Read for Reframed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let inner = &mut self.inner;
        let read = self
            .incoming
            .read_with(buf, Instant::now, |b| inner.read(b));
        self.inner.watch(self.incoming.in_large_message());
        read
    }
}

/// tungstenite wants to write pongs itself; staps queues them like every
/// other frame instead, so writes here go nowhere.
impl<S> io::Write for Reframed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The error a read gives for a refusal.
fn refused(refusal: Refusal) -> io::Error {
    io::Error::other(format!("message refused: {refusal:?}"))
}

/// A client frame's header.
struct Header {
    /// Its bytes: 2, the extended length, the mask.
    len: usize,
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    length: u64,
    /// The length is in its shortest form (RFC 6455 §5.2), and a 64-bit one
    /// has its top bit clear.
    minimal: bool,
}

impl Header {
    /// The header at the start of `bytes`, once all of it is there.
    fn parse(bytes: &[u8]) -> Option<Header> {
        let (&b0, rest) = bytes.split_first()?;
        let &b1 = rest.first()?;
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let masked = b1 & 0x80 != 0;
        let len = 2 + ext + if masked { 4 } else { 0 };
        let bytes = bytes.get(..len)?;
        let (length, minimal) = match ext {
            2 => {
                let n = u64::from(u16::from_be_bytes([bytes[2], bytes[3]]));
                (n, n >= 126)
            }
            8 => {
                let n = u64::from_be_bytes(bytes[2..10].try_into().ok()?);
                (n, n > 0xffff && n >> 63 == 0)
            }
            _ => (u64::from(b1 & 0x7f), true),
        };
        let mask = masked.then(|| {
            let mut key = [0; 4];
            key.copy_from_slice(&bytes[len - 4..]);
            key
        });
        Some(Header {
            len,
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            mask,
            length,
            minimal,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slow enough for any test.
    const RATE: MinRate = MinRate {
        period: Duration::from_secs(3600),
        min_rate: 0,
    };

    /// A budget of the test's own: the process's is shared by every test.
    fn budget(limit: usize) -> &'static Budget {
        let budget = Box::leak(Box::new(Budget::new()));
        budget.set_limit(limit);
        budget
    }

    /// A masked client frame with `len` payload bytes (counting up, masked
    /// with a key that is not zero).
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
        let key = [1, 2, 3, 4];
        f.extend_from_slice(&key);
        f.extend((0..len).map(|i| (i as u8) ^ key[i % 4]));
        f
    }

    /// Hand `input` over in reads of at most `chunk` bytes into buffers of
    /// `buf` bytes; everything handed over, or the refusal.
    fn pass(
        inc: &mut Incoming,
        input: &[u8],
        chunk: usize,
        buf: usize,
    ) -> (Vec<u8>, Option<Refusal>) {
        let mut input = input;
        let mut out = Vec::new();
        let mut b = vec![0; buf];
        loop {
            let read = inc.read_with(&mut b, Instant::now, |into: &mut [u8]| {
                let n = into.len().min(chunk).min(input.len());
                into[..n].copy_from_slice(&input[..n]);
                input = &input[n..];
                Ok(n)
            });
            match read {
                Ok(0) => return (out, None),
                Ok(n) => out.extend_from_slice(&b[..n]),
                Err(_) => return (out, inc.refusal()),
            }
        }
    }

    impl Source for std::io::Cursor<Vec<u8>> {}

    /// What tungstenite makes of `bytes`: each message's payload.
    fn messages(bytes: Vec<u8>) -> Vec<Vec<u8>> {
        let config = tungstenite::protocol::WebSocketConfig::default()
            .max_frame_size(Some(CHUNK))
            .read_buffer_size(1024);
        // Through a second Reframed (which finds nothing to split): its
        // pongs go nowhere, as the reader's do.
        let mut ws = tungstenite::WebSocket::from_raw_socket(
            Reframed {
                incoming: Box::new(Incoming::new(
                    usize::MAX,
                    RATE,
                    budget(usize::MAX),
                    None,
                    false,
                )),
                inner: std::io::Cursor::new(bytes),
            },
            tungstenite::protocol::Role::Server,
            Some(config),
        );
        let mut got = Vec::new();
        while let Ok(m) = ws.read() {
            got.push(m.into_data().to_vec());
        }
        got
    }

    #[test]
    fn large_frames_reach_tungstenite_as_fragments_of_the_same_message() {
        let b = budget(1 << 30);
        for (chunk, buf) in [(1, 20), (7, 1024), (1024, 1024), (5000, 1038)] {
            let mut inc = Incoming::new(1 << 20, RATE, b, None, false);
            let mut input = frame(true, 2, 100_000);
            input.extend(frame(true, 1, 5));
            input.extend(frame(false, 2, 40_000));
            input.extend(frame(true, 9, 3));
            input.extend(frame(true, 0, 20_000));
            let (out, refusal) = pass(&mut inc, &input, chunk, buf);
            assert_eq!(refusal, None);
            let got = messages(out);
            let expect = |len: usize| (0..len).map(|i| i as u8).collect::<Vec<u8>>();
            let mut second = expect(40_000);
            second.extend(expect(20_000));
            assert_eq!(
                got.iter().map(Vec::len).collect::<Vec<_>>(),
                [100_000, 5, 3, 60_000],
                "chunk {chunk}"
            );
            assert_eq!(got[0], expect(100_000));
            assert_eq!(got[1], expect(5));
            assert_eq!(got[2], expect(3), "the ping between fragments");
            assert_eq!(got[3], second);
            assert_eq!(b.used(), 0);
        }
    }

    #[test]
    fn a_large_message_is_charged_as_it_arrives_not_as_announced() {
        let b = budget(1 << 30);
        let mut inc = Incoming::new(1 << 20, RATE, b, None, false);
        let f = frame(true, 2, 1 << 20);
        // The header alone and a few bytes: nothing charged.
        let (_, refusal) = pass(&mut inc, &f[..100], 50, 1024);
        assert_eq!(refusal, None);
        assert!(inc.in_large_message());
        assert_eq!(b.used(), 0);
        let (_, _) = pass(&mut inc, &f[100..100_000], 1000, 1024);
        assert_eq!(b.used(), (100_000usize - 14).next_power_of_two());
        let (_, _) = pass(&mut inc, &f[100_000..], 1000, 1024);
        assert!(!inc.in_large_message());
        assert!(inc.clean_end());
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn refusals_come_at_the_header_or_as_bytes_arrive() {
        // Half the budget is for partial messages: the 600th KiB is over it.
        let b = budget(1 << 20);
        let mut inc = Incoming::new(1 << 20, RATE, b, None, false);
        let (_, refusal) = pass(&mut inc, &frame(true, 2, 600 << 10), 1000, 1024);
        assert_eq!(refusal, Some(Refusal::Budget));
        drop(inc);
        assert_eq!(b.used(), 0);
        // Dropped mid-message (the connection ended): all of it given back.
        let mut inc = Incoming::new(1 << 20, RATE, b, None, false);
        pass(&mut inc, &frame(false, 2, 300 << 10)[..200_000], 1000, 1024);
        assert!(b.used() > 0);
        drop(inc);
        assert_eq!(b.used(), 0);
        // A read-only client: at the first data frame's header, not its end.
        let mut inc = Incoming::new(1 << 20, RATE, b, None, true);
        let (_, refusal) = pass(&mut inc, &frame(true, 9, 2), 1000, 1024);
        assert_eq!(refusal, None, "a ping is fine");
        let (out, refusal) = pass(&mut inc, &frame(false, 2, 1 << 20)[..20], 1000, 1024);
        assert_eq!(refusal, Some(Refusal::ReadOnly));
        assert!(out.is_empty());
        // A length that could be shorter: 5 in 16 bits, 200 in 64 bits.
        for long in [
            vec![0x82, 0x80 | 126, 0, 5, 0, 0, 0, 0],
            [&[0x82, 0x80 | 127][..], &200u64.to_be_bytes(), &[0; 4]].concat(),
        ] {
            let mut inc = Incoming::new(1 << 20, RATE, b, None, false);
            let (_, refusal) = pass(&mut inc, &long, 1000, 1024);
            assert_eq!(refusal, Some(Refusal::Protocol));
        }
    }

    #[test]
    fn a_message_must_keep_the_minimum_rate() {
        let b = budget(1 << 30);
        let second = Duration::from_secs(1);
        let rate = MinRate {
            period: second,
            min_rate: 1000,
        };
        let mut inc = Incoming::new(1 << 20, rate, b, None, false);
        let t0 = Instant::now();
        let f = frame(true, 2, 50_000);
        assert!(inc.process(&mut f[..2000].to_vec(), t0).is_ok());
        assert!(!inc.too_slow(t0 + second / 2));
        // 1986 payload bytes in the first second: above 1000 a second.
        assert!(!inc.too_slow(t0 + second));
        // Then 500 in the next: too slow.
        assert!(inc.process(&mut f[2000..2500].to_vec(), t0).is_ok());
        assert!(inc.too_slow(t0 + 2 * second));
        // No message in progress: never too slow.
        let mut idle = Incoming::new(1 << 20, rate, b, None, false);
        assert!(!idle.too_slow(t0 + 100 * second));
    }
}
