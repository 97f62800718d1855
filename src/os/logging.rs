//! Logging to stderr (or `log_file`), with journald priorities under systemd, and
//! the fingerprints that stand for channel paths in logs.
//!
//! Channel paths are secrets: at `info` and above a channel appears only as
//! [`fingerprint`]; the path itself is logged at `debug` at most.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use log::{Level, LevelFilter};

use crate::os::files;

/// Where the level comes from, strongest first: `-v`/`-q`, then `RUST_LOG`
/// (which may also name modules), then `log_level` in the files, then `info`.
pub(crate) fn init(verbosity: i8, file_level: Option<LevelFilter>) {
    let mut builder = env_logger::Builder::new();
    let rust_log = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    match (verbosity, rust_log) {
        (0, Some(filters)) => {
            builder.parse_filters(&filters);
        }
        _ => {
            let level = match verbosity {
                0 => file_level.unwrap_or(LevelFilter::Info),
                1 => LevelFilter::Debug,
                2.. => LevelFilter::Trace,
                -1 => LevelFilter::Warn,
                _ => LevelFilter::Error,
            };
            // Libraries are quiet unless something is wrong; RUST_LOG opens them up.
            builder
                .filter_level(level.min(LevelFilter::Warn))
                .filter_module("staps", level);
        }
    }
    let journald = under_journald();
    builder.format(move |buf, record| {
        if journald {
            writeln!(buf, "<{}>{}", priority(record.level()), record.args())
        } else {
            let ts = buf.timestamp_seconds();
            writeln!(buf, "{ts} {:<5} {}", record.level(), record.args())
        }
    });
    builder.init();
}

/// syslog priority of a level, for journald's `<N>` prefixes.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Whether stderr is the journal stream systemd gave us (`JOURNAL_STREAM` is
/// `device:inode` of that stream; it is inherited, so compare, don't just test).
fn under_journald() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let value = value.to_string_lossy();
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(stderr) = io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    File::from(stderr)
        .metadata()
        .is_ok_and(|meta| meta.dev() == dev && meta.ino() == ino)
}

/// Open `log_file` for appending, never through a symlink (it is opened as
/// root at startup, and may sit in a directory the service user owns).
pub(crate) fn open_log(path: &Path) -> io::Result<File> {
    files::open_for_writing(path, files::Write::Append, 0o640)
}

/// Point stdout and stderr at `path` (appending), for `log_file` and SIGHUP.
pub(crate) fn redirect_to(path: &Path) -> io::Result<()> {
    let file = open_log(path)?;
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: both descriptors are valid; dup2 atomically replaces fd.
        if unsafe { libc::dup2(file.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A short stand-in for a channel path in logs: 8 hex digits of a hash keyed
/// at random for this process, so it cannot be looked up in a table of common
/// paths. Stable for the life of the process.
pub(crate) fn fingerprint(path: &str) -> String {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    let hash = KEY.get_or_init(RandomState::new).hash_one(path);
    format!("{:08x}", (hash >> 32) as u32)
}

/// A condition that repeats with every connection while it lasts (out of
/// descriptors, threads or memory) is logged once a minute, not thousands of
/// times a second.
pub(crate) struct Throttle(std::sync::Mutex<Option<Instant>>);

impl Throttle {
    /// A throttle that lets the first line through.
    pub(crate) const fn new() -> Throttle {
        Throttle(std::sync::Mutex::new(None))
    }

    /// Whether a line may be logged now; if so, the next one waits a minute.
    pub(crate) fn ready(&self) -> bool {
        let Ok(mut last) = self.0.lock() else {
            return false;
        };
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

/// `text` as it may be logged: control characters escaped (`\n`, `\u{1b}`),
/// so that a channel path or file name from outside can neither start a
/// forged log line (journald reads `<0>` at a line's start as a priority)
/// nor send escape sequences to a terminal.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A file path as it may be logged: see [`escape`].
pub(crate) fn escape_path(path: &Path) -> String {
    escape(&path.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_a_minute_through() {
        let throttle = Throttle::new();
        assert!(throttle.ready());
        assert!(!throttle.ready());
        assert!(!throttle.ready());
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("/a\n<0>b\u{1b}[2Jc\t"), "/a\\n<0>b\\u{1b}[2Jc\\t");
        assert_eq!(escape("/ünïcode ok"), "/ünïcode ok");
    }
}
