//! A client's connection, unix or TCP: one descriptor shared by its reader
//! and writer threads, with the few ways of reading and writing they need
//! beyond std's (without waiting, by a deadline, giving up on a stalled
//! writer).

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// One accepted connection, unix or TCP.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A unix domain socket connection.
    Unix(UnixStream),
}

macro_rules! both {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl Stream {
    /// The socket's descriptor, for the event loop.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        both!(self, s => s.as_fd())
    }

    /// Shut down one or both directions; wakes a thread blocked on the socket.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        both!(self, s => s.shutdown(how))
    }

    /// Timeout of blocking reads (`None`: wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_read_timeout(t))
    }

    /// Timeout of blocking writes (`None`: wait forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        both!(self, s => s.set_write_timeout(t))
    }

    /// Write all of `buf` through a shared reference (reader and writer share
    /// the socket).
    pub fn send_all(&self, buf: &[u8]) -> io::Result<()> {
        (&mut &*self).write_all(buf)
    }

    /// Write every slice, however many calls it takes (`write_all` for
    /// iovecs). Fails when the client takes nothing for `stall`, or when
    /// `closing` has said yes for `grace`: a receiver closed as a slow
    /// consumer that still takes a trickle is cut, and its batch freed,
    /// instead of being fed for minutes. The socket's write timeout, which
    /// must be `grace.min(stall)`, sets how often both are looked at.
    pub fn write_all_vectored(
        &self,
        mut bufs: &mut [IoSlice<'_>],
        stall: Duration,
        grace: Duration,
        closing: impl Fn() -> bool,
    ) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        // Since when no byte went out; the clock is read only once a write
        // times out, not on the way of every batch.
        let mut stalled_since: Option<Instant> = None;
        let mut closed_at = None;
        while !bufs.is_empty() {
            match (&mut &*self).write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    IoSlice::advance_slices(&mut bufs, n);
                    stalled_since = None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    // The write waited one timeout already.
                    let since = *stalled_since.get_or_insert_with(|| {
                        let now = Instant::now();
                        now.checked_sub(grace.min(stall)).unwrap_or(now)
                    });
                    if since.elapsed() >= stall {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
            if !bufs.is_empty() && closing() {
                let since = *closed_at.get_or_insert_with(Instant::now);
                if since.elapsed() >= grace {
                    return Err(io::Error::other("closed while its writes stalled"));
                }
            }
        }
        Ok(())
    }

    /// Send what the socket takes now, without waiting (`WouldBlock` when it
    /// takes nothing): for threads that must never wait on this client.
    pub fn send_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let fd = both!(self, s => s.as_raw_fd());
        // SAFETY: an all-zero msghdr is valid; IoSlice is ABI-compatible
        // with iovec, and the slices outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(1024) as _;
        loop {
            // SAFETY: `msg` points at valid iovecs; `fd` is open while `self` is.
            let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Read and discard until the peer closes, the connection fails, or `deadline`.
    pub fn drain(&self, deadline: Instant) {
        let mut sink = [0u8; 512];
        while matches!(self.read_until(&mut sink, deadline), Ok(n) if n > 0) {}
    }

    /// Answer `response` and close without waiting for anything: for the
    /// accept loop, which must not block. What the client already sent is read
    /// first, so that closing does not reset the connection and destroy the
    /// answer; a client that sends more afterwards may still see a reset.
    pub fn refuse_now(&self, response: &[u8]) {
        let mut sink = [0u8; 512];
        if both!(self, s => s.set_nonblocking(true)).is_err() {
            return;
        }
        while matches!((&mut &*self).read(&mut sink), Ok(n) if n > 0) {}
        let _ = (&mut &*self).write(response);
        let _ = self.shutdown(Shutdown::Write);
        while matches!((&mut &*self).read(&mut sink), Ok(n) if n > 0) {}
    }

    /// Write all of `buf` without waiting, or fail: for a short answer
    /// into a new connection, whose socket buffer is empty, from a thread
    /// that must never wait. A part written leaves the connection unusable.
    pub fn send_whole_now(&self, buf: &[u8]) -> io::Result<()> {
        match self.send_now(&[IoSlice::new(buf)])? {
            n if n == buf.len() => Ok(()),
            _ => Err(io::ErrorKind::WriteZero.into()),
        }
    }

    /// Read what has already arrived without waiting for more: `WouldBlock`
    /// when nothing has.
    pub fn read_ready(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf, libc::MSG_DONTWAIT)
    }

    /// Whether the client has closed its end, without waiting or taking
    /// anything: `Ok(true)` at the end of the stream, `Ok(false)` when
    /// bytes wait to be read, `WouldBlock` when nothing has arrived.
    pub fn has_ended(&self) -> io::Result<bool> {
        self.recv(&mut [0u8], libc::MSG_DONTWAIT | libc::MSG_PEEK)
            .map(|n| n == 0)
    }

    fn recv(&self, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
        let fd = both!(self, s => s.as_raw_fd());
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes and `fd` is
        // open for as long as `self` is.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Read until `deadline`, then fail with `TimedOut`. What has already
    /// arrived (a request sent right after connecting, usually) is taken
    /// without setting the socket's read timeout first: one system call
    /// instead of two. Past `deadline` nothing is read, arrived or not, so
    /// that a client trickling bytes cannot outlast it.
    pub fn read_until(&self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            match self.read_ready(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                ready => return ready,
            }
            self.set_read_timeout(Some(left))?;
            match (&mut &*self).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(io::ErrorKind::TimedOut.into()),
                other => return other,
            }
        }
    }
}

/// Whether an I/O error is a socket timeout (SO_RCVTIMEO/SO_SNDTIMEO give EAGAIN).
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

// Reader and writer threads share one socket (one descriptor per client, not
// two): reads and writes go through shared references, as std allows.
impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        both!(self, s => (&mut &*s).read(buf))
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        both!(self, s => (&mut &*s).write(buf))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        both!(self, s => (&mut &*s).write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_until_takes_what_arrived_but_nothing_past_its_deadline() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let stream = Stream::Unix(ours);
        theirs.write_all(b"GET").unwrap();
        let mut buf = [0u8; 8];
        let past = Instant::now() - Duration::from_millis(1);
        let late = stream.read_until(&mut buf, past).unwrap_err();
        assert_eq!(
            late.kind(),
            io::ErrorKind::TimedOut,
            "read past the deadline"
        );
        let soon = Instant::now() + Duration::from_secs(30);
        assert_eq!(stream.read_until(&mut buf, soon).unwrap(), 3);
        let Stream::Unix(inner) = &stream else {
            unreachable!()
        };
        assert_eq!(inner.read_timeout().unwrap(), None, "no timeout set for it");
        let near = Instant::now() + Duration::from_millis(50);
        let waited = stream.read_until(&mut buf, near).unwrap_err();
        assert_eq!(waited.kind(), io::ErrorKind::TimedOut);
    }
}
