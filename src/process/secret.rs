//! The server's secret (`[staps] secret_file`): 32 random bytes under which
//! read-only URLs are derived (`twin.rs`). Read, or created at first start,
//! after privileges are dropped: it lives in the service user's directory
//! (`/var/lib/staps`), so it is owned by that user, and it is opened without
//! following a symlink and checked through its descriptor like every file
//! in a directory someone else may write.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::os::files;
use crate::os::logging::escape_path;
use crate::proto::twin::{SECRET_LEN, Twins};

/// Read-only URLs under the secret at `path` (read, or created when
/// absent); when there is none to read or make, or `path` is `None`, under
/// a secret of this process only, with a warning for the first case: its
/// twins die with the process and do not work across linked instances.
/// When `path` is only the default (no configuration names it) and its
/// directory does not exist, staps is not installed there (`make run` on a
/// fresh machine): that is said at info level, not warned about.
pub(crate) fn twins(path: Option<&Path>, default: bool) -> io::Result<Twins> {
    let Some(path) = path else {
        return ephemeral().map(Twins::new);
    };
    match load(path) {
        Ok((secret, origin)) => {
            if origin == Origin::Created {
                log::info!(
                    "created the secret of read-only URLs in {}",
                    escape_path(path)
                );
            }
            Ok(Twins::new(secret))
        }
        Err(e) if default && is_not_installed(path, &e) => {
            log::info!(
                "no {}: read-only URLs use a secret of this process only (set \
                 secret_file to keep them across starts)",
                escape_path(path)
            );
            ephemeral().map(Twins::new)
        }
        Err(e) => {
            log::warn!(
                "cannot read or create the secret file {}: {e}; read-only URLs use a secret \
                 of this process only: they change at every start and do not work across \
                 linked instances",
                escape_path(path)
            );
            ephemeral().map(Twins::new)
        }
    }
}

/// Whether `e`, from making the secret at `path`, says that its directory
/// does not exist.
fn is_not_installed(path: &Path, e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound && path.parent().is_some_and(|dir| !dir.exists())
}

/// Where the secret came from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Read from the file.
    Read,
    /// The file was absent and has been created.
    Created,
}

/// Read the secret at `path`, or create it (mode 0600) when it is absent.
pub(crate) fn load(path: &Path) -> io::Result<([u8; SECRET_LEN], Origin)> {
    // Without blocking: a fifo put there would wait for a writer forever.
    let reading = libc::O_RDONLY | libc::O_NONBLOCK;
    match open(path, reading) {
        Ok(file) => read(file).map(|secret| (secret, Origin::Read)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match create(path) {
            Ok(secret) => Ok((secret, Origin::Created)),
            // Another instance made it meanwhile: use that one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                read(open(path, reading)?).map(|secret| (secret, Origin::Read))
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// A secret for this process only, for when none can be read or created.
pub(crate) fn ephemeral() -> io::Result<[u8; SECRET_LEN]> {
    let mut secret = [0; SECRET_LEN];
    random(&mut secret)?;
    Ok(secret)
}

fn open(path: &Path, flags: libc::c_int) -> io::Result<File> {
    files::open_no_follow(path, flags, 0o600)
}

fn read(mut file: File) -> io::Result<[u8; SECRET_LEN]> {
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("it is not a regular file"));
    }
    if meta.nlink() != 1 {
        // Another name for it may be in a place others can read.
        return Err(io::Error::other("it has more than one hard link"));
    }
    if meta.len() != SECRET_LEN as u64 {
        return Err(io::Error::other(format!(
            "it holds {} bytes, not {SECRET_LEN}",
            meta.len()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        log::warn!(
            "the secret file is readable by others (mode {:o}): anyone who reads it can \
             derive every channel's read-only URL and its channel; chmod 600 it",
            meta.mode() & 0o777
        );
    }
    let mut secret = [0; SECRET_LEN];
    file.read_exact(&mut secret)?;
    Ok(secret)
}

fn create(path: &Path) -> io::Result<[u8; SECRET_LEN]> {
    let secret = ephemeral()?;
    let mut file = open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)?;
    let written = file.write_all(&secret).and_then(|()| file.sync_all());
    if let Err(e) = written {
        // A short secret would be refused at the next start: leave none.
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(secret)
}

/// Fill `buf` from the kernel's random source (getrandom(2)).
fn random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_0600_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let (made, origin) = load(&path).unwrap();
        assert_eq!(origin, Origin::Created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, origin) = load(&path).unwrap();
        assert_eq!((again, origin), (made, Origin::Read));
        assert_ne!(made, ephemeral().unwrap());
    }

    /// `make run` on a machine without /var/lib/staps is not warned about;
    /// a secret that cannot be made where its directory exists is.
    #[test]
    fn only_a_missing_directory_means_not_installed() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("nowhere").join("secret");
        let e = load(&absent).unwrap_err();
        assert!(is_not_installed(&absent, &e), "{e}");
        // Its directory is there but is a file: a broken installation.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let under_a_file = file.join("secret");
        let e = load(&under_a_file).unwrap_err();
        assert!(!is_not_installed(&under_a_file, &e), "{e}");
        // Made where its directory exists: nothing to say.
        assert!(twins(Some(&dir.path().join("secret")), true).is_ok());
    }

    #[test]
    fn symlinks_and_wrong_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, [0; SECRET_LEN]).unwrap();
        let link = dir.path().join("secret");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = load(&link).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        // A dangling symlink is not followed to create its target either.
        std::fs::remove_file(&target).unwrap();
        assert!(load(&link).is_err());
        assert!(!target.exists());
        let short = dir.path().join("short");
        std::fs::write(&short, [0; 7]).unwrap();
        assert!(load(&short).unwrap_err().to_string().contains("7 bytes"));
    }

    #[test]
    fn a_fifo_or_a_second_hard_link_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opened without a writer: this would hang if it blocked.
        let e = load(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let secret = dir.path().join("secret");
        load(&secret).unwrap();
        std::fs::hard_link(&secret, dir.path().join("copy")).unwrap();
        let e = load(&secret).unwrap_err();
        assert!(e.to_string().contains("hard link"), "{e}");
    }
}
