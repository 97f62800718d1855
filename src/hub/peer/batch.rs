//! What a writer sends with one system call: a batch of queued frames,
//! small ones copied together, large ones written from where they are.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::time::Duration;

use super::CLOSE_TIMEOUT;
use crate::os::stream::Stream;
use crate::proto::frame::Frame;

/// Frames up to this size are copied into the batch's buffer: the kernel
/// copies one segment faster than many small ones (figures: BENCHMARKS.md,
/// "Measurements behind the constants").
const COPY_MAX: usize = 512;

/// Bytes gathered for one write at most.
pub(super) const BATCH_BYTES: usize = 64 * 1024;

/// Larger frames gathered for one write at most, each written from where it
/// is (shared by all receivers) rather than copied.
const BATCH_LARGE: usize = 32;

/// What goes out with one vectored write, in queue order: runs of small
/// frames copied into one buffer, larger frames (and a small one alone) by
/// reference, from where they are (shared by all receivers).
#[derive(Default)]
pub(super) struct Batch {
    pub(super) frames: Vec<Frame>,
    /// Frames over [`COPY_MAX`] among them.
    large: usize,
    /// Bytes of its frames.
    pub(super) size: usize,
    /// Bytes of the batch already sent.
    pub(super) skip: usize,
    /// The copies, made when the batch is sent.
    bytes: Vec<u8>,
}

/// A piece of what a batch sends.
enum Part {
    Copied(usize, usize),
    Frame(usize),
}

impl Batch {
    pub(super) fn push(&mut self, frame: Frame) {
        let len = frame.as_bytes().len();
        self.size += len;
        self.large += usize::from(len > COPY_MAX);
        self.frames.push(frame);
    }

    pub(super) fn is_full(&self) -> bool {
        self.size >= BATCH_BYTES || self.large >= BATCH_LARGE
    }

    /// The slices to write, in queue order, past what was sent.
    fn slices(&mut self) -> Vec<IoSlice<'_>> {
        self.bytes.clear();
        let mut parts = Vec::with_capacity(2 * self.large + 1);
        let mut run = 0..0;
        let small = |f: &Frame| f.as_bytes().len() <= COPY_MAX;
        for i in 0..=self.frames.len() {
            if self.frames.get(i).is_some_and(small) {
                if run.is_empty() {
                    run = i..i;
                }
                run.end = i + 1;
                continue;
            }
            match run.len() {
                0 => {}
                1 => parts.push(Part::Frame(run.start)),
                _ => {
                    if self.bytes.capacity() == 0 {
                        // A page to start with rather than growing from a few bytes.
                        self.bytes.reserve(4096);
                    }
                    let from = self.bytes.len();
                    for frame in &self.frames[run.clone()] {
                        self.bytes.extend_from_slice(frame.as_bytes());
                    }
                    parts.push(Part::Copied(from, self.bytes.len()));
                }
            }
            run = 0..0;
            if i < self.frames.len() {
                parts.push(Part::Frame(i));
            }
        }
        let mut slices: Vec<IoSlice<'_>> = parts
            .into_iter()
            .map(|part| match part {
                Part::Copied(from, to) => IoSlice::new(&self.bytes[from..to]),
                Part::Frame(i) => IoSlice::new(self.frames[i].as_bytes()),
            })
            .collect();
        let mut view = &mut slices[..];
        IoSlice::advance_slices(&mut view, self.skip);
        let left = view.len();
        let done = slices.len() - left;
        // advance_slices left the first slice shortened in place.
        slices.drain(..done);
        slices
    }

    /// Send without waiting: None when all went out, else how much of it did.
    pub(super) fn send_now(&mut self, out: &Stream) -> io::Result<Option<usize>> {
        let (skip, size) = (self.skip, self.size);
        let sent = match self.frames.as_slice() {
            // The common case of a receiver that keeps up: nothing to gather.
            [frame] => out.send_now(&[IoSlice::new(&frame.as_bytes()[skip..])]),
            _ => out.send_now(&self.slices()),
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        Ok((skip + sent < size).then_some(skip + sent))
    }

    /// Its frames in queue order, for whoever sends the rest.
    pub(super) fn into_frames(self) -> VecDeque<Frame> {
        self.frames.into()
    }

    /// Write it all and empty it, keeping its buffers; see
    /// [`Stream::write_all_vectored`] for `stall` and `closing`.
    pub(super) fn write(
        &mut self,
        out: &Stream,
        stall: Duration,
        closing: impl Fn() -> bool,
    ) -> io::Result<()> {
        if self.size > self.skip {
            let mut slices = self.slices();
            out.write_all_vectored(&mut slices, stall, CLOSE_TIMEOUT, closing)?;
        }
        self.frames.clear();
        self.large = 0;
        self.size = 0;
        self.skip = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::Kind;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn frames(sizes: &[usize]) -> (Batch, Vec<u8>) {
        let mut batch = Batch::default();
        let mut expected = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let frame = Frame::message(Kind::Binary, &vec![i as u8; *size]);
            expected.extend_from_slice(frame.as_bytes());
            batch.push(frame);
        }
        (batch, expected)
    }

    /// Small frames are copied and large ones written in place, so the order
    /// on the wire must still be the queue's, whatever the mix.
    #[test]
    fn batches_keep_queue_order_across_copied_and_shared_frames() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let out = Stream::Unix(a);
        let sizes = [10, 600, 20, 30, 4000, 5, COPY_MAX, COPY_MAX + 1, 0, 70_000];
        let (mut batch, expected) = frames(&sizes);
        // The 70 000-byte frame alone passes BATCH_BYTES.
        assert!(batch.is_full());
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; expected.len()];
            b.read_exact(&mut got).unwrap();
            assert_eq!(got, expected);
        });
        batch
            .write(&out, Duration::from_secs(30), || false)
            .unwrap();
        reader.join().unwrap();
        // Emptied for the next batch.
        assert_eq!((batch.size, batch.frames.len(), batch.large), (0, 0, 0));
        assert!(!batch.is_full());
    }

    /// What a send without waiting leaves, a writer sends from where it
    /// stopped: the bytes on the wire are the queue's, once each.
    #[test]
    fn a_partial_send_is_finished_from_where_it_stopped() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let out = Stream::Unix(a);
        let sizes = [30, 40, 300_000, 7, 8, 100_000, 50];
        let (mut batch, expected) = frames(&sizes);
        let left = batch.send_now(&out).unwrap();
        let sent = left.expect("a socket pair takes less than 400 kB at once");
        assert!(sent > 0 && sent < expected.len(), "{sent}");
        let mut rest = Batch {
            skip: sent,
            ..Batch::default()
        };
        for frame in batch.into_frames() {
            rest.push(frame);
        }
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; expected.len()];
            b.read_exact(&mut got).unwrap();
            assert_eq!(got, expected);
        });
        rest.write(&out, Duration::from_secs(30), || false).unwrap();
        reader.join().unwrap();
    }

    #[test]
    fn a_batch_is_full_at_its_count_of_large_frames() {
        let mut batch = Batch::default();
        for _ in 0..BATCH_LARGE {
            assert!(!batch.is_full());
            batch.push(Frame::message(Kind::Binary, &[0; COPY_MAX + 1]));
        }
        assert!(batch.is_full());
    }
}
