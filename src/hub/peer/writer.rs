//! The writer thread: it takes over a peer's socket when a send without
//! waiting could not take everything, writes the backlog with blocking
//! writes, and finishes the close.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{Ordering, fence};
use std::thread;
use std::time::{Duration, Instant};

use super::batch::Batch;
use super::{CLOSE_TIMEOUT, Close, Peer, State};
use crate::os::stream::Stream;

impl Peer {
    /// A writer thread's work: send the backlog with blocking writes until
    /// it is gone, then give the socket back ([`State::Idle`]); or, once
    /// the peer is closing, send the close frame and cut the connection when
    /// the reader is done or after [`CLOSE_TIMEOUT`]. `stall`: a client that
    /// takes nothing for this long is gone.
    pub(crate) fn write_backlog(&self, stall: Duration) {
        let Some(sink) = self.sink.get() else {
            return;
        };
        let out = &*sink.stream;
        // Writes wake this often to see whether the client closed meanwhile.
        let _ = out.set_write_timeout(Some(CLOSE_TIMEOUT.min(stall)));
        let failed = match self.write_until_idle(out, stall) {
            Ok(true) => return,
            Ok(false) => false,
            Err(e) => {
                log::debug!("client {}: write failed: {e}", self.id);
                let _ = self.start_closing(Close::ABORT);
                true
            }
        };
        // The peer is closing now: its close is set, and this thread waits
        // for the reader under it.
        let (close, close_queued) = {
            let mut write = self.write.lock();
            match &mut write.closing {
                Some(closing) => {
                    closing.writer = Some(thread::current());
                    (closing.close, std::mem::take(&mut closing.queued))
                }
                None => (Close::ABORT, false),
            }
        };
        if close.send && !failed {
            let _ = out.set_write_timeout(Some(CLOSE_TIMEOUT));
            let sent = close_queued
                || self
                    .wire
                    .close(close.code, close.reason)
                    .is_none_or(|last| out.send_all(last.as_bytes()).is_ok());
            if sent && self.after_last() == Shutdown::Write {
                let _ = out.shutdown(Shutdown::Write);
                self.wait_for_reader(CLOSE_TIMEOUT);
            }
        }
        let _ = out.shutdown(Shutdown::Both);
        let mut write = self.write.lock();
        if let Some(closing) = &mut write.closing {
            closing.writer = None;
        }
        self.set_state(&mut write, State::Done);
    }

    /// Write the head and the queue in batches; Ok(true) once the socket went
    /// back to idle, Ok(false) when the peer is closing.
    fn write_until_idle(&self, out: &Stream, stall: Duration) -> io::Result<bool> {
        let mut batch = Batch::default();
        {
            let mut write = self.write.lock();
            batch.skip = std::mem::take(&mut write.sent);
            for frame in std::mem::take(&mut write.head) {
                self.queue.backlog(frame.as_bytes().len(), false);
                batch.push(frame);
            }
        }
        loop {
            while !batch.is_full() {
                match self.queue.pop() {
                    Some(frame) => batch.push(frame),
                    None => break,
                }
            }
            // Each round starts with an empty batch (`write` empties it).
            self.queue.taken(batch.frames.len(), batch.size);
            if self.is_closing() {
                // The close frame goes after a frame begun, never inside it.
                if batch.skip > 0 {
                    batch.write(out, stall, || self.is_closing())?;
                }
                return Ok(false);
            }
            if batch.size == 0 {
                if self.go_idle() {
                    return Ok(true);
                }
                continue;
            }
            batch.write(out, stall, || self.is_closing())?;
        }
    }

    /// Turn idle if nothing is queued; false when something is after all.
    fn go_idle(&self) -> bool {
        let mut write = self.write.lock();
        self.set_state(&mut write, State::Idle);
        // Pairs with the fence in `enqueue`: a publisher that queued before
        // this saw `Busy` and left its frame to us.
        fence(Ordering::SeqCst);
        if self.queue.is_empty() && write.closing.is_none() {
            return true;
        }
        self.set_state(&mut write, State::Busy);
        false
    }

    /// Wait until the reader is done, at most `timeout`.
    fn wait_for_reader(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.write.lock().reader_done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::park_timeout(left);
        }
    }
}
