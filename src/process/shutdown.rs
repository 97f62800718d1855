//! Stopping: the files a running instance leaves on disk, removed in one
//! place however it ends, and the graceful shutdown SIGTERM starts.

use std::sync::Arc;
use std::time::Instant;

use std::path::Path;

use crate::config::Settings;
use crate::conn::server::Server;
use crate::hub::peer::CLOSE_TIMEOUT;
use crate::hub::peer::Close;
use crate::os::logging;
use crate::os::systemd;
use crate::process::detach;
use crate::process::listener::Listener;

/// What a running instance has on disk and must remove when it ends: its
/// listeners' socket files (where still its own) and the pid file.
pub(crate) struct Files {
    /// The public listeners.
    pub listeners: Vec<Arc<Listener>>,
    /// The metrics listener, if any.
    pub metrics: Option<Arc<Listener>>,
    settings: Settings,
}

impl Files {
    /// The files of `listeners`, `metrics` and the pid file of `settings`.
    pub(crate) fn new(
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
    ///
    /// After privileges are dropped that takes write access to their
    /// directories: `/run/staps` belongs to the staps user (the unit's
    /// `RuntimeDirectory=`, the init script's `install -d -o staps`); in a
    /// directory only root may write, they stay behind, and that is said once.
    pub(crate) fn remove(&self) {
        let mut left = Vec::new();
        for (listener, what) in self
            .listeners
            .iter()
            .chain(&self.metrics)
            .map(|l| (l, "socket"))
        {
            if let Err(e) = listener.remove_file() {
                left.push(format!("{what} {}: {e}", listener_path(listener)));
            }
        }
        if let Err(e) = detach::remove_pid_file(&self.settings) {
            let path = self.settings.pid_file.as_deref().unwrap_or(Path::new(""));
            left.push(format!("pid file {}: {e}", logging::escape_path(path)));
        }
        if !left.is_empty() {
            log::warn!(
                "could not remove {}; the user staps runs as needs write access to their directory",
                left.join(", ")
            );
        }
    }
}

/// A unix listener's path, escaped for the log.
fn listener_path(listener: &Listener) -> String {
    match listener {
        Listener::Unix { path, .. } => logging::escape_path(path),
        _ => String::new(),
    }
}

/// Stop accepting, close every client with 1001, give them [`CLOSE_TIMEOUT`]
/// to answer, and remove the files.
pub(crate) fn shutdown(server: &Server, files: &Files) {
    systemd::notify("STOPPING=1");
    server.begin_stopping();
    // The metrics listener goes on answering: /healthz says 503 meanwhile.
    for listener in &files.listeners {
        listener.stop();
    }
    server.registry().close_all(Close::with(1001, "going away"));
    let all_closed = server.registry().wait_empty(Instant::now() + CLOSE_TIMEOUT);
    if !all_closed {
        log::info!(
            "{} client(s) did not finish the close handshake in time",
            server.registry().counts().0
        );
    }
    files.remove();
}
