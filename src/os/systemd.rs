//! What systemd gives and asks: listening sockets (`LISTEN_FDS`, socket
//! activation) and notifications of readiness (`NOTIFY_SOCKET`,
//! `Type=notify`). A few lines instead of a crate.

use std::os::fd::FromRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use socket2::Socket;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Whether systemd passed listening sockets to this process (`LISTEN_PID`/`LISTEN_FDS`).
pub(crate) fn socket_activated() -> bool {
    let ours = std::env::var("LISTEN_PID").is_ok_and(|pid| pid == std::process::id().to_string());
    ours && std::env::var("LISTEN_FDS").is_ok_and(|n| n.parse::<u32>().is_ok_and(|n| n > 0))
}

/// Take the descriptors systemd passed, each with its number. Must run
/// before any thread exists (it clears the variables).
pub(crate) fn take_listen_fds() -> Result<Vec<(i32, Socket)>, String> {
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or("LISTEN_FDS is not a number")?;
    // SAFETY: no other thread exists yet to read the environment concurrently.
    unsafe {
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
    }
    Ok((LISTEN_FDS_START..LISTEN_FDS_START + count)
        .map(|fd| {
            // SAFETY: systemd hands these descriptors to us alone; from here we
            // own them. FD_CLOEXEC keeps them from leaking into anything we exec.
            let socket = unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                Socket::from_raw_fd(fd)
            };
            (fd, socket)
        })
        .collect())
}

/// Tell systemd about a state change (`READY=1`, `STOPPING=1`) when it asked
/// for it with `NOTIFY_SOCKET` (`Type=notify`). A few lines instead of a crate.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)
            .and_then(|a| socket.send_to_addr(state.as_bytes(), &a)),
        None => socket.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        log::warn!("cannot notify systemd ({state}): {e}");
    }
}
