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
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a finished thread waits for new work before it exits.
const LINGER: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// Threads of one kind (name and stack size) and the ones waiting for work.
pub(crate) struct Pool {
    name: &'static str,
    stack: usize,
    max_idle: usize,
    spare: bool,
    /// A spare thread is on its way.
    starting: AtomicBool,
    /// The threads waiting for work, the last to finish on top: its stack
    /// and caches are the warmest.
    idle: Mutex<Vec<Arc<Waiter>>>,
}

/// A thread waiting for work, and the job handed to it.
///
/// Handing over is a store and an unpark (one futex wake when the thread
/// sleeps). crossbeam's zero-capacity channel did the same, but its waiting
/// threads spun and called sched_yield(2) a few times before sleeping: a
/// system call, often a context switch, for every connection handed over
/// (issue 25, churn).
struct Waiter {
    thread: Thread,
    job: Mutex<Option<Job>>,
}

impl Pool {
    /// A pool of threads called `name` with `stack` bytes of stack; at most
    /// `max_idle` wait for work at a time (each keeps its stack's pages).
    /// With `spare`, a thread that takes work starts another when none is
    /// left waiting, so that the next [`Pool::run`] need not create one on
    /// its caller's stack.
    pub(crate) fn new(name: &'static str, stack: usize, max_idle: usize, spare: bool) -> Arc<Pool> {
        Arc::new(Pool {
            name,
            stack,
            max_idle,
            spare,
            starting: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Run `job` on a waiting thread, or on a new one.
    pub(crate) fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        let mut idle = self.idle.lock();
        let Some(waiter) = idle.pop() else {
            drop(idle);
            return self.spawn(Some(job));
        };
        // Under the pool's lock: a waiter that times out finds either
        // itself still listed or its job here.
        *waiter.job.lock() = Some(job);
        drop(idle);
        waiter.thread.unpark();
        Ok(())
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
        if !self.spare || !self.idle.lock().is_empty() || self.starting.swap(true, Ordering::AcqRel)
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
        let me = Arc::new(Waiter {
            thread: thread::current(),
            job: Mutex::new(None),
        });
        loop {
            {
                let mut idle = self.idle.lock();
                self.starting.store(false, Ordering::Release);
                if idle.len() >= self.max_idle {
                    return;
                }
                idle.push(Arc::clone(&me));
            }
            let Some(job) = self.wait(&me) else {
                return;
            };
            self.keep_one_waiting();
            job();
        }
    }

    /// The job handed to `me`, or `None` after [`LINGER`] without one.
    fn wait(&self, me: &Arc<Waiter>) -> Option<Job> {
        let deadline = Instant::now() + LINGER;
        loop {
            if let Some(job) = me.job.lock().take() {
                return Some(job);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let mut idle = self.idle.lock();
                if let Some(at) = idle.iter().position(|w| Arc::ptr_eq(w, me)) {
                    idle.swap_remove(at);
                    return None;
                }
                // Taken off the list by `run`, which gave it a job under
                // the lock it holds no more.
                drop(idle);
                return me.job.lock().take();
            }
            // Wakes spuriously too: the job is looked at again.
            thread::park_timeout(left);
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
        while pool.idle.lock().is_empty() {
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
        while pool.idle.lock().is_empty() {
            assert!(std::time::Instant::now() < deadline, "no spare thread");
            thread::yield_now();
        }
        drop(release);
    }
}
