//! A cache of connection threads: a thread whose connection ended waits a
//! while for the next one instead of exiting, so a server with clients coming
//! and going does not pay for creating and tearing down two threads (stack
//! mapping, guard page, TLB shootdowns) per connection. Still one thread per
//! reader and per writer; new ones start whenever none is waiting.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// How long a finished thread waits for new work before it exits.
const LINGER: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// Threads of one kind (name and stack size) and the ones waiting for work.
pub struct Pool {
    name: &'static str,
    stack: usize,
    max_idle: usize,
    idle: AtomicUsize,
    tx: Sender<Job>,
    rx: Receiver<Job>,
}

impl Pool {
    /// A pool of threads called `name` with `stack` bytes of stack; at most
    /// `max_idle` wait for work at a time (each keeps its stack's pages).
    pub fn new(name: &'static str, stack: usize, max_idle: usize) -> Arc<Pool> {
        // Zero capacity: handing over succeeds only to a thread that waits.
        let (tx, rx) = crossbeam_channel::bounded(0);
        Arc::new(Pool {
            name,
            stack,
            max_idle,
            idle: AtomicUsize::new(0),
            tx,
            rx,
        })
    }

    /// Run `job` on a waiting thread, or on a new one.
    pub fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = match self.tx.try_send(Box::new(job)) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
        };
        let pool = Arc::clone(self);
        thread::Builder::new()
            .name(self.name.into())
            .stack_size(self.stack)
            .spawn(move || {
                job();
                pool.linger();
            })
            .map(drop)
    }

    /// Wait for more work while there is room among the waiting threads.
    fn linger(&self) {
        loop {
            if self.idle.fetch_add(1, Ordering::AcqRel) >= self.max_idle {
                self.idle.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            let job = self.rx.recv_timeout(LINGER);
            self.idle.fetch_sub(1, Ordering::AcqRel);
            match job {
                Ok(job) => job(),
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_threads_are_reused() {
        let pool = Pool::new("test", 64 * 1024, 4);
        let (tx, rx) = crossbeam_channel::unbounded();
        let tx1 = tx.clone();
        pool.run(move || tx1.send(thread::current().id()).unwrap())
            .unwrap();
        let first = rx.recv().unwrap();
        // Wait until the thread waits for work, then hand it some.
        while pool.idle.load(Ordering::Acquire) == 0 {
            thread::yield_now();
        }
        pool.run(move || tx.send(thread::current().id()).unwrap())
            .unwrap();
        assert_eq!(rx.recv().unwrap(), first);
    }
}
