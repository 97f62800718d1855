//! Signals: SIGTERM/SIGINT stop gracefully (a second one at once), SIGHUP reopens
//! `log_file`, SIGUSR1 logs the counters.
//!
//! signal-hook's handlers only write to a pipe; the main thread reads it here, so
//! nothing runs inside a signal handler.

use std::io;
use std::process;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::conn::server::Server;
use crate::os::logging;
use crate::process::shutdown::{self, Files};

/// Take over the signals; done before binding. Until [`Starting::done`],
/// SIGTERM and SIGINT end the process at once (exit 1): a start that hangs
/// (a slow name service, a file that never answers) must still stop. A
/// socket file it bound is then stale, and replaced at the next start.
pub(crate) fn install() -> io::Result<(Signals, Starting)> {
    let starting = Arc::new(AtomicBool::new(true));
    for signal in [SIGTERM, SIGINT] {
        // Registered first: it runs before the handler that feeds `Signals`.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&starting))?;
    }
    Ok((
        Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])?,
        Starting(starting),
    ))
}

/// The start is still going: SIGTERM and SIGINT end the process at once.
pub(crate) struct Starting(Arc<AtomicBool>);

impl Starting {
    /// The start is over: from now on SIGTERM and SIGINT stop gracefully.
    pub(crate) fn done(self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Handle signals until the process exits.
pub(crate) fn run(mut signals: Signals, server: Arc<Server>, files: Files) -> ! {
    let files = Arc::new(files);
    let mut stopping = false;
    for signal in signals.forever() {
        match signal {
            SIGTERM | SIGINT if !stopping => {
                stopping = true;
                log::info!("shutting down on {}", name(signal));
                let (server, files) = (Arc::clone(&server), Arc::clone(&files));
                // Shut down beside this loop, which must stay free for a second signal.
                let stop = move || {
                    shutdown::shutdown(&server, &files);
                    log::info!("stopped: {}", server.stats_line());
                    process::exit(0);
                };
                if let Err(e) = thread::Builder::new()
                    .name("staps-stop".into())
                    .spawn(stop.clone())
                {
                    log::warn!("cannot start the shutdown thread ({e}); shutting down here");
                    stop();
                }
            }
            SIGTERM | SIGINT => {
                log::warn!("second {}: exiting at once", name(signal));
                files.remove();
                process::exit(1);
            }
            SIGHUP => match &server.settings().log_file {
                Some(path) => match logging::redirect_to(path) {
                    Ok(()) => log::info!("reopened log file {}", logging::escape_path(path)),
                    Err(e) => {
                        log::error!("cannot reopen log file {}: {e}", logging::escape_path(path))
                    }
                },
                None => log::debug!("SIGHUP: no log_file to reopen"),
            },
            SIGUSR1 => log::info!("{}", server.stats_line()),
            _ => {}
        }
    }
    // forever() ends only if the signal pipe breaks; without signals we cannot
    // stop cleanly, so stop now rather than run unstoppable.
    log::error!("signal handling failed; stopping");
    shutdown::shutdown(&server, &files);
    process::exit(1);
}

fn name(signal: i32) -> &'static str {
    match signal {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "signal",
    }
}
