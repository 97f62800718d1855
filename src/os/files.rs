//! Files a daemon opens while it may still be root: the pid file and the log
//! file. Their directories may belong to the service user (`/run/staps` is
//! the staps user's), so a path there is treated as hostile: it is opened
//! without following a symlink, checked through the descriptor to be a
//! regular file with one link (a hard link to a root-owned file has two),
//! and changed only through that descriptor.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// How a file is opened for writing.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Write {
    /// Keep what is there and add at the end (logs).
    Append,
    /// Keep the contents until the caller truncates (a pid file is truncated
    /// only once it is locked, so that a running daemon's pid survives).
    Keep,
}

/// Open `path` for writing, creating it with `mode` if absent, never through a
/// symlink; refuse anything but a regular file with one link.
pub(crate) fn open_for_writing(path: &Path, how: Write, mode: libc::mode_t) -> io::Result<File> {
    let append = match how {
        Write::Append => libc::O_APPEND,
        Write::Keep => 0,
    };
    let file = open_no_follow(path, libc::O_WRONLY | libc::O_CREAT | append, mode)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("it is not a regular file"));
    }
    if std::os::unix::fs::MetadataExt::nlink(&meta) != 1 {
        return Err(io::Error::other(
            "it has more than one hard link; refusing to write to it",
        ));
    }
    Ok(file)
}

/// open(2) `path` with `flags` (and `mode`, when it creates), never through
/// a symlink: one there is an error that says so.
pub(crate) fn open_no_follow(
    path: &Path,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<File> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: a valid C string and plain flags; the result is checked.
    let fd = unsafe { libc::open(cpath.as_ptr(), flags, libc::c_uint::from(mode)) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::other("it is a symlink; refusing to follow it"),
            _ => e,
        });
    }
    // SAFETY: the descriptor is fresh and ours alone.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Give `file` to `uid`/`gid` through its descriptor (`None` leaves one as it is).
pub(crate) fn chown(
    file: &File,
    uid: Option<libc::uid_t>,
    gid: Option<libc::gid_t>,
) -> io::Result<()> {
    std::os::unix::fs::fchown(file, uid, gid)
}

/// Take the pid file's lock without waiting: false if another process holds it.
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}
