//! A cache of connection threads: a thread whose connection ended waits a
//! while for the next one instead of exiting, so a server with clients coming
//! and going does not pay for creating and tearing down two threads (stack
//! mapping, guard page, TLB shootdowns) per connection. Still one thread per
//! reader and per writer; new ones start whenever none is waiting.
//!
//! Writers are started by readers deep in their read loop, and creating a
//! thread takes more stack than a reader otherwise does: each reader that
//! did it kept one more resident page (BENCHMARKS.md, "Measurements behind the
//! constants"). So a writer taking work first makes sure another one waits
//! ([`Pool::new`]'s `spare`), and a reader starting a writer hands over to a
//! waiting thread instead of creating one.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// How long a finished thread waits for new work before it exits.
const LINGER: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// Threads of one kind (name and stack size) and the ones waiting for work.
pub(crate) struct Pool {
    name: &'static str,
    stack: usize,
    max_idle: usize,
    idle: AtomicUsize,
    spare: bool,
    /// A spare thread is on its way.
    starting: AtomicBool,
    tx: Sender<Job>,
    rx: Receiver<Job>,
}

impl Pool {
    /// A pool of threads called `name` with `stack` bytes of stack; at most
    /// `max_idle` wait for work at a time (each keeps its stack's pages).
    /// With `spare`, a thread that takes work starts another when none is
    /// left waiting, so that the next [`Pool::run`] need not create one on
    /// its caller's stack.
    pub(crate) fn new(name: &'static str, stack: usize, max_idle: usize, spare: bool) -> Arc<Pool> {
        // Zero capacity: handing over succeeds only to a thread that waits.
        let (tx, rx) = crossbeam_channel::bounded(0);
        Arc::new(Pool {
            name,
            stack,
            max_idle,
            idle: AtomicUsize::new(0),
            spare,
            starting: AtomicBool::new(false),
            tx,
            rx,
        })
    }

    /// Run `job` on a waiting thread, or on a new one.
    pub(crate) fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = match self.tx.try_send(Box::new(job)) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
        };
        self.spawn(Some(job))
    }

    /// A new thread that runs `job`, if any, then waits for more.
    fn spawn(self: &Arc<Self>, job: Option<Job>) -> io::Result<()> {
        let pool = Arc::clone(self);
        thread::Builder::new()
            .name(self.name.into())
            .stack_size(self.stack)
            .spawn(move || {
                if let Some(job) = job {
                    pool.keep_one_waiting();
                    job();
                }
                pool.linger();
            })
            .map(drop)
    }

    /// For a thread about to run a job, while its stack is still shallow:
    /// start a spare thread if no other one waits for work.
    fn keep_one_waiting(self: &Arc<Self>) {
        if !self.spare
            || self.idle.load(Ordering::Acquire) > 0
            || self.starting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        if let Err(e) = self.spawn(None) {
            self.starting.store(false, Ordering::Release);
            log::debug!("cannot start a spare {} thread: {e}", self.name);
        }
    }

    /// Wait for more work while there is room among the waiting threads.
    fn linger(self: &Arc<Self>) {
        loop {
            let full = self.idle.fetch_add(1, Ordering::AcqRel) >= self.max_idle;
            self.starting.store(false, Ordering::Release);
            if full {
                self.idle.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            let job = self.rx.recv_timeout(LINGER);
            self.idle.fetch_sub(1, Ordering::AcqRel);
            match job {
                Ok(job) => {
                    self.keep_one_waiting();
                    job();
                }
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
        let pool = Pool::new("test", 64 * 1024, 4, false);
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

    #[test]
    fn a_thread_taking_work_leaves_a_spare_waiting() {
        let pool = Pool::new("test", 64 * 1024, 4, true);
        let (release, wait) = crossbeam_channel::bounded::<()>(0);
        pool.run(move || {
            let _ = wait.recv();
        })
        .unwrap();
        // The job still runs, yet another thread now waits for the next one.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while pool.idle.load(Ordering::Acquire) == 0 {
            assert!(std::time::Instant::now() < deadline, "no spare thread");
            thread::yield_now();
        }
        drop(release);
    }
}
