//! Stopping: the files a running instance leaves on disk, removed in one
//! place however it ends, and the graceful shutdown SIGTERM starts.

use std::sync::Arc;
use std::time::Instant;

use crate::config::Settings;
use crate::listener::Listener;
use crate::peer::CLOSE_TIMEOUT;
use crate::peer::Close;
use crate::server::Server;
use crate::{daemon, systemd};

/// What a running instance has on disk and must remove when it ends: its
/// listeners' socket files (where still its own) and the pid file.
pub struct Files {
    /// The public listeners.
    pub listeners: Vec<Arc<Listener>>,
    /// The metrics listener, if any.
    pub metrics: Option<Arc<Listener>>,
    settings: Settings,
}

impl Files {
    /// The files of `listeners`, `metrics` and the pid file of `settings`.
    pub fn new(
        listeners: Vec<Arc<Listener>>,
        metrics: Option<Arc<Listener>>,
        settings: &Settings,
    ) -> Files {
        Files {
            listeners,
            metrics,
            settings: settings.clone(),
        }
    }

    /// Remove the socket files and the pid file, where they are still ours.
    pub fn remove(&self) {
        for listener in self.listeners.iter().chain(&self.metrics) {
            listener.remove_file();
        }
        daemon::remove_pid_file(&self.settings);
    }
}

/// Stop accepting, close every client with 1001, give them [`CLOSE_TIMEOUT`]
/// to answer, and remove the files.
pub fn shutdown(server: &Server, files: &Files) {
    systemd::notify("STOPPING=1");
    server.begin_stopping();
    // The metrics listener goes on answering: /healthz says 503 meanwhile.
    for listener in &files.listeners {
        listener.stop();
    }
    server.registry.close_all(Close::with(1001, "going away"));
    let all_closed = server.registry.wait_empty(Instant::now() + CLOSE_TIMEOUT);
    if !all_closed {
        log::info!(
            "{} client(s) did not finish the close handshake in time",
            server.registry.counts().0
        );
    }
    files.remove();
}
