//! The command line. The options of staps 0.1.x keep their names and meaning;
//! every value is checked by [`crate::config`], so a bad one is reported like a
//! bad value in a file (exit code 78).

use std::path::PathBuf;

use clap::{ArgAction, Parser};

/// Simple Throw-Away Publish/Subscribe: websocket clients that connect to the
/// same URL path form a channel; each message one of them sends goes to all the
/// others.
#[derive(Debug, Default, Parser)]
#[command(name = "staps", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Listen on these unix domain sockets (several after one flag, or repeat
    /// it). Listeners given on the command line replace those of the files;
    /// `--socket` alone, as in 0.1.x, listens on no socket (with --port).
    #[arg(long, value_name = "PATH", num_args = 0.., action = ArgAction::Append)]
    pub socket: Option<Vec<String>>,

    /// Listen on these TCP ports on every interface, IPv6 and IPv4 (as 0.1.x).
    #[arg(long, value_name = "PORT", num_args = 1.., action = ArgAction::Append)]
    pub port: Vec<String>,

    /// Listen on these TCP addresses only, e.g. 127.0.0.1:8080 or `[::1]:8080`.
    #[arg(long, value_name = "ADDR:PORT", num_args = 1.., action = ArgAction::Append)]
    pub listen: Vec<String>,

    /// Permissions of the socket files, in octal (default 0660).
    #[arg(long, value_name = "OCTAL")]
    pub mode: Option<String>,

    /// Link instances through this AMQP broker (empty: standalone).
    #[arg(long, value_name = "URL")]
    pub amqp: Option<String>,

    /// Detach from the terminal and run as a classic daemon.
    #[arg(long)]
    pub daemon: bool,

    /// Read only this configuration file instead of /etc/staps/staps.conf and
    /// ~/.staps.conf.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Parse and validate the configuration, print the effective settings and
    /// exit: 0 when valid, 78 when not. Unknown keys count as errors here.
    #[arg(long)]
    pub check_config: bool,

    /// Log more: -v for debug, -vv for trace.
    #[arg(short, long, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// 0.1.x's name of -v.
    #[arg(long, hide = true, conflicts_with = "quiet")]
    pub debug: bool,

    /// Log less: -q for warnings and errors only, -qq for errors only.
    #[arg(short, long, action = ArgAction::Count)]
    pub quiet: u8,
}

impl Cli {
    /// How much more than the default to log (negative: less).
    pub(crate) fn verbosity(&self) -> i8 {
        (self.verbose + u8::from(self.debug)) as i8 - self.quiet as i8
    }
}
