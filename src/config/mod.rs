//! Settings: built-in defaults, then INI files, then the command line.
//!
//! The files are read in order (`/etc/staps/staps.conf`, then `~/.staps.conf`, or
//! only the file named with `-c`); a key set in a later file wins. Every value is
//! checked here, before anything is bound or started, so a typo stops staps with
//! exit code 78 and a message that names the file, line, key and accepted form.

// What the configuration is made from and resolved with: the command
// line, client addresses, AMQP URLs and their escapes, and the one look at
// the host.
pub(crate) mod address;
pub(crate) mod amqp_url;
pub(crate) mod cli;
pub(crate) mod percent;
pub(crate) mod resolve;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ini::{Ini, ParseOption};
use log::LevelFilter;

use crate::config::address::Trusted;
use crate::config::amqp_url::redact;
use crate::config::cli::Cli;

/// Exit code for a configuration error (`EX_CONFIG` of sysexits.h, as `nginx -t`).
pub(crate) const EX_CONFIG: i32 = 78;

/// What to do with a receiver whose queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowClient {
    /// Close it with 1008 "slow consumer": it never silently misses a message.
    Disconnect,
    /// Drop the message for that receiver only, and count it.
    Drop,
    /// Lossless: the publisher waits for room; a receiver that takes nothing
    /// for `slow_timeout` is closed with 1008.
    Wait,
}

impl SlowClient {
    /// The policy named `name` (`disconnect`, `drop`, `wait`; any case).
    pub fn from_name(name: &str) -> Option<SlowClient> {
        match name.to_ascii_lowercase().as_str() {
            "disconnect" => Some(SlowClient::Disconnect),
            "drop" => Some(SlowClient::Drop),
            "wait" => Some(SlowClient::Wait),
            _ => None,
        }
    }

    /// The policy's name, as the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            SlowClient::Disconnect => "disconnect",
            SlowClient::Drop => "drop",
            SlowClient::Wait => "wait",
        }
    }
}

/// `ADDRESS:PORT` as configured: an address, or a host name that
/// [`crate::config::resolve`] looks up once at startup (to its first address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// An IP address and port.
    Ip(SocketAddr),
    /// `HOST:PORT`, not looked up yet.
    Host(String),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(addr) => write!(f, "{addr}"),
            Address::Host(host) => f.write_str(host),
        }
    }
}

/// Where the metrics listener is: an address or a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `ADDRESS:PORT`.
    Tcp(Address),
    /// A path (anything with a `/`).
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", crate::os::logging::escape_path(path)),
        }
    }
}

/// A TCP listener as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpSpec {
    /// `port`/`--port`: every interface, IPv6 and IPv4, as 0.1.x did.
    AllInterfaces(u16),
    /// `listen`/`--listen`: one address.
    Addr(Address),
}

impl fmt::Display for TcpSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TcpSpec::AllInterfaces(port) => write!(f, "*:{port}"),
            TcpSpec::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// The largest `max_message_size` accepted: a message is held whole in
/// memory, and a larger bound invites allocations the system cannot make.
pub(crate) const MAX_MESSAGE_SIZE: usize = 1 << 30;

/// `queue_bytes` unless configured: a burst of a few thousand messages
/// queued for every receiver of a busy channel, while the memory budget
/// (frames shared by all receivers count once) bounds them all together.
pub(crate) const DEFAULT_QUEUE_BYTES: usize = 4 << 20;

/// The `[limits]` section.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest message a client may send, in bytes; larger ones close it with 1009.
    pub max_message_size: usize,
    /// Members of one channel (0 = no limit); one more is answered 503.
    pub max_clients_per_channel: usize,
    /// Websocket clients of the whole instance (0 = no limit); one more is answered 503.
    pub max_connections: usize,
    /// Bytes of frames waiting for one receiver before `slow_client` applies
    /// (a receiver with nothing queued takes one frame of any size).
    pub queue_bytes: usize,
    /// Messages waiting for one receiver before `slow_client` applies; 0: no
    /// bound by count.
    pub queue_length: usize,
    /// What happens to a receiver whose queue is full.
    pub slow_client: SlowClient,
    /// Under `slow_client = wait`, how long a full receiver may take nothing
    /// before it is closed with 1008.
    pub slow_timeout: Duration,
    /// How often every client is pinged; silence for two intervals closes it. Zero: never.
    pub ping_interval: Duration,
    /// Time a new connection has to send its complete request head.
    pub handshake_timeout: Duration,
    /// Longest decoded channel path in bytes; longer ones are answered 414.
    pub max_path_length: usize,
    /// Accept only UUID4 channel paths.
    pub uuid_only: bool,
    /// Messages each channel keeps for clients that join with `replay=N`; 0: none.
    pub replay_length: usize,
    /// Bytes each channel's replay ring keeps at most.
    pub replay_bytes: usize,
    /// Longest `linger=S` a channel's creator may ask: how long an emptied
    /// channel keeps its ring and relay binding; 0: no channel lingers.
    pub max_linger: Duration,
    /// Bytes of partial incoming messages, queued frames and replay rings
    /// the whole process may hold ([`crate::memory::budget`]).
    pub memory_budget: usize,
    /// Bytes a second a message or request body in progress must average
    /// over every `handshake_timeout`; slower ones are closed (1008 / 408).
    pub min_rate: u64,
    /// Websocket clients and stream listeners one client address may hold
    /// (0 = no limit; `None`: [`default_per_address`]); its partial messages
    /// and queued bytes may take at most [`ADDRESS_SHARE`] of the memory
    /// budget. See [`Limits::per_address`].
    pub max_connections_per_address: Option<usize>,
}

impl Limits {
    /// What one address's receivers' backlogs may hold, half of it its
    /// partial messages: an eighth of the budget, but room for one message
    /// of `max_message_size` at least (as the buffer it grows into).
    pub fn address_share(&self) -> usize {
        (self.memory_budget / ADDRESS_SHARE).max(2 * self.max_message_size.next_power_of_two())
    }

    /// Websocket clients and stream listeners one address may hold; 0: no
    /// per-address limits at all.
    pub fn per_address(&self) -> usize {
        self.max_connections_per_address
            .unwrap_or_else(|| default_per_address(self.max_connections))
    }
}

/// The part of the memory budget one client address may hold at most: an
/// eighth of what each kind may take, its partial messages (which may take
/// half the budget) and its receivers' backlogs (once half the budget is in
/// use: [`crate::memory::budget::Budget::is_over`]).
pub(crate) const ADDRESS_SHARE: usize = 8;

/// `min_rate` unless configured, in bytes a second: a 1 MiB message over a
/// link of 8 kbit/s still arrives; a trickle of a byte every few seconds
/// does not hold memory for long.
pub(crate) const DEFAULT_MIN_RATE: u64 = 1024;

/// `max_connections_per_address` unless configured: a sixteenth of
/// `max_connections`, at least 64; no limit without `max_connections`.
pub(crate) fn default_per_address(max_connections: usize) -> usize {
    match max_connections {
        0 => 0,
        max => (max / 16).max(64),
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 1 << 20,
            max_clients_per_channel: 1024,
            max_connections: 10_000,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            queue_length: 0,
            slow_client: SlowClient::Disconnect,
            slow_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_path_length: 255,
            uuid_only: false,
            replay_length: 16,
            replay_bytes: 1 << 20,
            max_linger: Duration::from_secs(60),
            memory_budget: crate::memory::budget::default_limit(),
            min_rate: DEFAULT_MIN_RATE,
            max_connections_per_address: None,
        }
    }
}

/// Everything staps runs with, after files and command line are merged.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Unix domain sockets to listen on.
    pub sockets: Vec<PathBuf>,
    /// Permissions of the socket files.
    pub mode: u32,
    /// Group that owns the socket files, when it is not `group`.
    pub socket_group: Option<String>,
    /// TCP listeners.
    pub tcp: Vec<TcpSpec>,
    /// Broker URL; `None` runs standalone.
    pub amqp: Option<String>,
    /// AMQP exchange that links instances.
    pub exchange: String,
    /// Scheme, host and prefix of the channel URLs the usage page shows.
    pub public_url: Option<String>,
    /// Log level from the files (`-v`/`-q` and `RUST_LOG` come first).
    pub log_level: Option<LevelFilter>,
    /// The secret of read-only URLs; `None`: a new one at every start.
    pub secret_file: Option<PathBuf>,
    /// Peers whose forwarding headers name the client (SPEC §3).
    pub trusted_proxies: Trusted,
    /// Detach classic-style.
    pub daemon: bool,
    /// User to run as after binding, when started as root.
    pub user: Option<String>,
    /// Group to run as after binding, when started as root.
    pub group: Option<String>,
    /// Working directory of the daemon.
    pub dir: PathBuf,
    /// Pid file of the daemon.
    pub pid_file: Option<PathBuf>,
    /// File mode creation mask of the daemon.
    pub umask: u32,
    /// Where stdout and stderr go; reopened on SIGHUP.
    pub log_file: Option<PathBuf>,
    /// The metrics listener (`/metrics`, `/healthz`), apart from the public ones.
    pub metrics: Option<Endpoint>,
    /// The `[limits]` section.
    pub limits: Limits,
    /// The files that were read, in order.
    pub files: Vec<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sockets: Vec::new(),
            mode: 0o660,
            socket_group: None,
            tcp: Vec::new(),
            amqp: None,
            exchange: "staps".into(),
            public_url: None,
            log_level: None,
            secret_file: Some(PathBuf::from(DEFAULT_SECRET_FILE)),
            trusted_proxies: Trusted::default(),
            daemon: false,
            user: None,
            group: None,
            dir: PathBuf::from("/"),
            pid_file: None,
            umask: 0o022,
            log_file: None,
            metrics: None,
            limits: Limits::default(),
            files: Vec::new(),
        }
    }
}

/// Where the secret of read-only URLs is kept unless configured: the
/// service user's directory (the package's and the unit's `/var/lib/staps`).
pub(crate) const DEFAULT_SECRET_FILE: &str = "/var/lib/staps/secret";

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A line of a configuration file (1-based; 0 when it could not be found).
    File(PathBuf, usize),
    /// A command-line option.
    CommandLine,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path, 0) => write!(f, "{}", path.display()),
            Origin::File(path, line) => write!(f, "{}:{line}", path.display()),
            Origin::CommandLine => f.write_str("command line"),
        }
    }
}

/// A value that staps cannot use; startup stops with [`EX_CONFIG`].
#[derive(Debug)]
pub struct ConfigError {
    /// Where the value is.
    pub origin: Origin,
    /// The key (`[section] key`) or option (`--flag`).
    pub key: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about `settings` as a whole, blamed on the last file read
    /// (or the command line, when no file was).
    pub fn of_whole(settings: &Settings, key: &str, message: String) -> ConfigError {
        ConfigError {
            origin: settings
                .files
                .last()
                .map_or(Origin::CommandLine, |f| Origin::File(f.clone(), 0)),
            key: key.to_owned(),
            message,
        }
    }
}

/// The result of loading: the settings and what deserves a warning.
pub struct Loaded {
    /// The effective settings.
    pub settings: Settings,
    /// What is ignored (unknown keys and sections), one line each, already
    /// naming file and line. `--check-config` treats these as errors.
    pub warnings: Vec<String>,
    /// 0.1.x forms that still work, each with its modern form: warnings,
    /// also under `--check-config`.
    pub deprecated: Vec<String>,
}

/// The socket 0.1.6 served when no listener was configured.
pub(crate) const LEGACY_SOCKET: &str = "/var/run/staps/staps.sock";

/// One configuration key, defined once: its section and name, what it
/// means, how a value is read into the settings (from a file or the command
/// line) and how the effective value is shown (`--check-config`). The
/// defaults are [`Settings::default`]'s.
struct Key {
    section: &'static str,
    name: &'static str,
    doc: &'static str,
    set: fn(&mut Settings, &str) -> Result<(), String>,
    get: fn(&Settings) -> String,
}

/// `Some` for a non-empty value, `None` for an empty one (a key set to
/// nothing turns its feature off).
fn optional(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn show_path(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn show_tcp(s: &Settings, all_interfaces: bool) -> String {
    let shown: Vec<String> = s
        .tcp
        .iter()
        .filter_map(|t| match (t, all_interfaces) {
            (TcpSpec::AllInterfaces(p), true) => Some(p.to_string()),
            (TcpSpec::Addr(a), false) => Some(a.to_string()),
            _ => None,
        })
        .collect();
    shown.join(" ")
}

/// Every key staps knows, in the order `--check-config` shows them;
/// anything else in a file is reported.
const KEYS: &[Key] = &[
    Key {
        section: "staps",
        name: "socket",
        doc: "unix sockets to listen on",
        set: |s, v| {
            s.sockets = split_list(v).map(PathBuf::from).collect();
            Ok(())
        },
        get: |s| {
            let shown: Vec<String> = s.sockets.iter().map(|p| p.display().to_string()).collect();
            shown.join(" ")
        },
    },
    Key {
        section: "staps",
        name: "mode",
        doc: "permissions of the socket files",
        set: |s, v| {
            s.mode = parse_octal(v, 0o7777)?;
            Ok(())
        },
        get: |s| format!("{:04o}", s.mode),
    },
    Key {
        section: "staps",
        name: "amqp",
        doc: "broker that links instances; empty: standalone",
        set: |s, v| {
            s.amqp = optional(v);
            Ok(())
        },
        get: |s| s.amqp.as_deref().map(redact).unwrap_or_default(),
    },
    Key {
        section: "staps",
        name: "port",
        doc: "TCP ports on every interface",
        set: |s, v| {
            s.tcp.retain(|t| !matches!(t, TcpSpec::AllInterfaces(_)));
            for port in split_list(v) {
                s.tcp.push(TcpSpec::AllInterfaces(parse_port(port)?));
            }
            Ok(())
        },
        get: |s| show_tcp(s, true),
    },
    Key {
        section: "staps",
        name: "listen",
        doc: "TCP addresses to listen on",
        set: |s, v| {
            s.tcp.retain(|t| !matches!(t, TcpSpec::Addr(_)));
            for addr in split_list(v) {
                s.tcp.push(TcpSpec::Addr(parse_listen(addr)?));
            }
            Ok(())
        },
        get: |s| show_tcp(s, false),
    },
    Key {
        section: "staps",
        name: "socket_group",
        doc: "group of the socket files, when it is not [daemon] group",
        set: |s, v| {
            s.socket_group = optional(v);
            Ok(())
        },
        get: |s| s.socket_group.clone().unwrap_or_default(),
    },
    Key {
        section: "staps",
        name: "exchange",
        doc: "AMQP exchange that links instances",
        set: |s, v| {
            s.exchange = v.to_owned();
            Ok(())
        },
        get: |s| s.exchange.clone(),
    },
    Key {
        section: "staps",
        name: "public_url",
        doc: "scheme, host and prefix of the usage page's channel URLs",
        set: |s, v| {
            s.public_url = match v {
                "" => None,
                v => Some(parse_public_url(v)?),
            };
            Ok(())
        },
        get: |s| s.public_url.clone().unwrap_or_default(),
    },
    Key {
        section: "staps",
        name: "secret_file",
        doc: "the 32-byte secret of read-only URLs, created 0600 when absent; share it \
              between linked instances; empty: a new secret at every start",
        set: |s, v| {
            s.secret_file = optional(v).map(PathBuf::from);
            Ok(())
        },
        get: |s| show_path(&s.secret_file),
    },
    Key {
        section: "staps",
        name: "trusted_proxies",
        doc: "peers whose X-Forwarded-For (Forwarded, X-Real-IP) names the client for \
              the per-address limits: unix (unix-socket peers), addresses, CIDR ranges; \
              empty: nobody",
        set: |s, v| {
            s.trusted_proxies = Trusted::parse(split_list(v))?;
            Ok(())
        },
        get: |s| s.trusted_proxies.to_string(),
    },
    Key {
        section: "staps",
        name: "log_level",
        doc: "off, error, warn, info, debug or trace (-v, -q and RUST_LOG come first)",
        set: |s, v| {
            s.log_level = Some(v.parse().map_err(|_| {
                format!("'{v}' is not a log level (off, error, warn, info, debug, trace)")
            })?);
            Ok(())
        },
        get: |s| {
            s.log_level
                .map(|l| l.to_string().to_lowercase())
                .unwrap_or_default()
        },
    },
    Key {
        section: "staps",
        name: "metrics",
        doc: "ADDRESS:PORT or socket path of /metrics and /healthz",
        set: |s, v| {
            s.metrics = match v {
                "" => None,
                v if v.contains('/') => Some(Endpoint::Unix(PathBuf::from(v))),
                v => Some(Endpoint::Tcp(
                    parse_listen(v).map_err(|e| format!("{e}, or a unix socket path"))?,
                )),
            };
            Ok(())
        },
        get: |s| match &s.metrics {
            Some(Endpoint::Tcp(addr)) => addr.to_string(),
            Some(Endpoint::Unix(path)) => path.display().to_string(),
            None => String::new(),
        },
    },
    Key {
        section: "daemon",
        name: "user",
        doc: "user to run as after binding, when started as root",
        set: |s, v| {
            s.user = optional(v);
            Ok(())
        },
        get: |s| s.user.clone().unwrap_or_default(),
    },
    Key {
        section: "daemon",
        name: "group",
        doc: "group to run as after binding (with user)",
        set: |s, v| {
            s.group = optional(v);
            Ok(())
        },
        get: |s| s.group.clone().unwrap_or_default(),
    },
    Key {
        section: "daemon",
        name: "dir",
        doc: "working directory of the daemon",
        set: |s, v| {
            s.dir = PathBuf::from(v);
            Ok(())
        },
        get: |s| s.dir.display().to_string(),
    },
    Key {
        section: "daemon",
        name: "pid_file",
        doc: "pid file of the daemon",
        set: |s, v| {
            s.pid_file = optional(v).map(PathBuf::from);
            Ok(())
        },
        get: |s| show_path(&s.pid_file),
    },
    Key {
        section: "daemon",
        name: "umask",
        doc: "file mode creation mask of the daemon",
        set: |s, v| {
            s.umask = parse_octal(v, 0o777)?;
            Ok(())
        },
        get: |s| format!("{:04o}", s.umask),
    },
    Key {
        section: "daemon",
        name: "log_file",
        doc: "where stdout and stderr go; reopened on SIGHUP",
        set: |s, v| {
            s.log_file = optional(v).map(PathBuf::from);
            Ok(())
        },
        get: |s| show_path(&s.log_file),
    },
    Key {
        section: "limits",
        name: "max_message_size",
        doc: "largest message in bytes (at most 1 GiB); larger closes with 1009",
        set: |s, v| {
            let n = parse_count(v, 1)?;
            if n > MAX_MESSAGE_SIZE {
                return Err(format!(
                    "'{v}' is more than staps takes: at most {MAX_MESSAGE_SIZE} (1 GiB)"
                ));
            }
            s.limits.max_message_size = n;
            Ok(())
        },
        get: |s| s.limits.max_message_size.to_string(),
    },
    Key {
        section: "limits",
        name: "max_clients_per_channel",
        doc: "members of one channel (0: no limit); one more gets 503",
        set: |s, v| {
            s.limits.max_clients_per_channel = parse_count(v, 0)?;
            Ok(())
        },
        get: |s| s.limits.max_clients_per_channel.to_string(),
    },
    Key {
        section: "limits",
        name: "max_connections",
        doc: "websocket clients in all (0: no limit); one more gets 503",
        set: |s, v| {
            s.limits.max_connections = parse_count(v, 0)?;
            Ok(())
        },
        get: |s| s.limits.max_connections.to_string(),
    },
    Key {
        section: "limits",
        name: "queue_bytes",
        doc: "bytes waiting for one receiver before slow_client applies",
        // Less than a frame header would make every receiver slow.
        set: |s, v| {
            s.limits.queue_bytes = parse_count(v, 1024)?;
            Ok(())
        },
        get: |s| s.limits.queue_bytes.to_string(),
    },
    Key {
        section: "limits",
        name: "queue_length",
        doc: "messages waiting for one receiver before slow_client applies (0: no bound)",
        set: |s, v| {
            s.limits.queue_length = parse_count(v, 0)?;
            Ok(())
        },
        get: |s| s.limits.queue_length.to_string(),
    },
    Key {
        section: "limits",
        name: "slow_client",
        doc: "disconnect (1008), drop, or wait (lossless), for a receiver whose queue is full",
        set: |s, v| {
            s.limits.slow_client = SlowClient::from_name(v)
                .ok_or_else(|| format!("'{v}' is not one of: disconnect, drop, wait"))?;
            Ok(())
        },
        get: |s| s.limits.slow_client.name().to_owned(),
    },
    Key {
        section: "limits",
        name: "slow_timeout",
        doc: "seconds a full receiver may take nothing under slow_client = wait",
        set: |s, v| {
            s.limits.slow_timeout = parse_seconds(v, false)?;
            Ok(())
        },
        get: |s| s.limits.slow_timeout.as_secs_f64().to_string(),
    },
    Key {
        section: "limits",
        name: "ping_interval",
        doc: "seconds between pings (0: none); two silent intervals close a client",
        set: |s, v| {
            s.limits.ping_interval = parse_seconds(v, true)?;
            Ok(())
        },
        get: |s| s.limits.ping_interval.as_secs_f64().to_string(),
    },
    Key {
        section: "limits",
        name: "handshake_timeout",
        doc: "seconds a connection has for its request head",
        set: |s, v| {
            s.limits.handshake_timeout = parse_seconds(v, false)?;
            Ok(())
        },
        get: |s| s.limits.handshake_timeout.as_secs_f64().to_string(),
    },
    Key {
        section: "limits",
        name: "max_path_length",
        doc: "longest decoded channel path in bytes; longer gets 414",
        set: |s, v| {
            s.limits.max_path_length = parse_count(v, 1)?;
            Ok(())
        },
        get: |s| s.limits.max_path_length.to_string(),
    },
    Key {
        section: "limits",
        name: "uuid_only",
        doc: "accept only UUID4 channel paths",
        set: |s, v| {
            s.limits.uuid_only = parse_bool(v)?;
            Ok(())
        },
        get: |s| s.limits.uuid_only.to_string(),
    },
    Key {
        section: "limits",
        name: "replay_length",
        doc: "messages each channel keeps for replay=N (0: none)",
        set: |s, v| {
            s.limits.replay_length = parse_count(v, 0)?;
            Ok(())
        },
        get: |s| s.limits.replay_length.to_string(),
    },
    Key {
        section: "limits",
        name: "replay_bytes",
        doc: "bytes each channel's replay ring keeps",
        set: |s, v| {
            s.limits.replay_bytes = parse_count(v, 0)?;
            Ok(())
        },
        get: |s| s.limits.replay_bytes.to_string(),
    },
    Key {
        section: "limits",
        name: "max_linger",
        doc: "seconds an emptied channel may keep its ring for a listener's return (linger=S; 0: off)",
        set: |s, v| {
            s.limits.max_linger = parse_seconds(v, true)?;
            Ok(())
        },
        get: |s| s.limits.max_linger.as_secs_f64().to_string(),
    },
    Key {
        section: "limits",
        name: "memory_budget",
        doc: "bytes of partial, queued and replayed messages the process may hold",
        // Less than a megabyte would refuse nearly everything.
        set: |s, v| {
            s.limits.memory_budget = parse_count(v, 1 << 20)?;
            Ok(())
        },
        get: |s| s.limits.memory_budget.to_string(),
    },
    Key {
        section: "limits",
        name: "min_rate",
        doc: "bytes a second a message or body in progress must average over \
              handshake_timeout; slower closes it (1008 / 408)",
        set: |s, v| {
            s.limits.min_rate = parse_count(v, 0)? as u64;
            Ok(())
        },
        get: |s| s.limits.min_rate.to_string(),
    },
    Key {
        section: "limits",
        name: "max_connections_per_address",
        doc: "clients one address may hold (0: no limit; default a sixteenth of \
              max_connections, at least 64); one more gets 503",
        set: |s, v| {
            s.limits.max_connections_per_address = Some(parse_count(v, 0)?);
            Ok(())
        },
        get: |s| s.limits.per_address().to_string(),
    },
];

/// The sections, in order.
const SECTIONS: [&str; 3] = ["staps", "daemon", "limits"];

/// The key `name` of `section`.
fn key(section: &str, name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.section == section && k.name == name)
}

/// The section name 0.1.6 actually read (cement's), accepted as `[staps]`.
const LEGACY_SECTION: &str = "controller.base";

/// Load the files (`defaults`, those that exist, or only `cli.config`),
/// then apply the command line.
pub(crate) fn load(cli: &Cli, defaults: &[PathBuf]) -> Result<Loaded, ConfigError> {
    let mut settings = Settings::default();
    let mut warnings = Vec::new();
    let mut deprecated = Vec::new();
    let files = match &cli.config {
        Some(path) => vec![(path.clone(), true)],
        None => defaults.iter().map(|p| (p.clone(), false)).collect(),
    };
    for (path, required) in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(ConfigError {
                    origin: Origin::File(path, 0),
                    key: "file".into(),
                    message: format!("cannot read: {e}"),
                });
            }
        };
        apply_file(&mut settings, &mut warnings, &mut deprecated, &path, &text)?;
        settings.files.push(path);
    }
    apply_cli(&mut settings, &mut deprecated, cli)?;
    // `--socket` alone says: no socket.
    if cli.socket.as_ref().is_none_or(|s| !s.is_empty()) {
        default_listener(&mut settings, &mut deprecated);
    }
    validate(&settings)?;
    Ok(Loaded {
        settings,
        warnings,
        deprecated,
    })
}

/// With no listener configured, 0.1.6 served its default socket: so does
/// staps, saying how to write that down.
fn default_listener(settings: &mut Settings, deprecated: &mut Vec<String>) {
    if settings.sockets.is_empty() && settings.tcp.is_empty() {
        settings.sockets.push(PathBuf::from(LEGACY_SOCKET));
        deprecated.push(format!(
            "no listener configured: serving 0.1.x's default socket {LEGACY_SOCKET}; \
             say so with `socket = /run/staps/staps.sock` in [staps] (or give port or listen)"
        ));
    }
}

/// The settings of one file's text alone, checked as `--check-config` checks
/// them (the fuzz target's entry).
pub fn from_text(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let mut settings = Settings::default();
    let mut warnings = Vec::new();
    let mut deprecated = Vec::new();
    apply_file(&mut settings, &mut warnings, &mut deprecated, path, text)?;
    settings.files.push(path.to_owned());
    default_listener(&mut settings, &mut deprecated);
    validate(&settings)?;
    Ok(Loaded {
        settings,
        warnings,
        deprecated,
    })
}

/// Parse one file's text into `settings`.
pub(crate) fn apply_file(
    settings: &mut Settings,
    warnings: &mut Vec<String>,
    deprecated: &mut Vec<String>,
    path: &Path,
    text: &str,
) -> Result<(), ConfigError> {
    let options = ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        // Values stay on one line: rust-ini 0.21 mixes up inline comments and
        // continuation lines (a comment swallows the next key).
        enabled_indented_mutiline_value: false,
        ..ParseOption::default()
    };
    let ini = Ini::load_from_str_opt(text, options).map_err(|e| ConfigError {
        origin: Origin::File(path.to_owned(), e.line + 1),
        key: "syntax".into(),
        message: e.msg.into_owned(),
    })?;
    for (section, props) in ini.iter() {
        let Some(raw_section) = section else {
            for (key, _) in props.iter() {
                let line = line_of(text, None, key);
                warnings.push(format!(
                    "{}: key '{key}' outside any section is ignored",
                    Origin::File(path.to_owned(), line)
                ));
            }
            continue;
        };
        let lower = raw_section.to_ascii_lowercase();
        let name = if lower == LEGACY_SECTION {
            deprecated.push(format!(
                "{}: section [{raw_section}] is the 0.1.x name; it still works, but call it [staps]",
                Origin::File(path.to_owned(), line_of(text, Some(raw_section), ""))
            ));
            "staps"
        } else {
            lower.as_str()
        };
        if !SECTIONS.contains(&name) {
            warnings.push(format!(
                "{}: unknown section [{raw_section}] is ignored",
                Origin::File(path.to_owned(), line_of(text, Some(raw_section), ""))
            ));
            continue;
        }
        for (raw_key, value) in props.iter() {
            let origin = Origin::File(path.to_owned(), line_of(text, Some(raw_section), raw_key));
            let Some(key) = key(name, &raw_key.to_ascii_lowercase()) else {
                warnings.push(format!(
                    "{origin}: unknown key '{raw_key}' in [{raw_section}] is ignored"
                ));
                continue;
            };
            (key.set)(settings, value.trim()).map_err(|message| ConfigError {
                origin,
                key: format!("[{}] {}", key.section, key.name),
                message,
            })?;
        }
    }
    Ok(())
}

/// 1-based line of `key` in `section` (of the section header when `key` is empty);
/// 0 when not found. rust-ini keeps no positions, so look the key up in the text.
fn line_of(text: &str, section: Option<&str>, key: &str) -> usize {
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix('[') {
            let name = rest.split(']').next().unwrap_or("").trim();
            current = Some(name.to_ascii_lowercase());
            if key.is_empty() && section.is_some_and(|s| s.eq_ignore_ascii_case(name)) {
                return n + 1;
            }
            continue;
        }
        let in_section = match (section, &current) {
            (None, None) => true,
            (Some(s), Some(c)) => s.eq_ignore_ascii_case(c),
            _ => false,
        };
        if in_section && !key.is_empty() && !line.starts_with([' ', '\t']) {
            let name = trimmed.split(['=', ':']).next().unwrap_or("").trim();
            if name.eq_ignore_ascii_case(key) {
                return n + 1;
            }
        }
    }
    0
}

/// Apply the command line over the files. Listeners given on the command line
/// replace every listener of the files, so `staps --listen 127.0.0.1:8080` on a
/// machine with an installed config does not also try to take its socket.
fn apply_cli(s: &mut Settings, deprecated: &mut Vec<String>, cli: &Cli) -> Result<(), ConfigError> {
    let err = |key: &str, message: String| ConfigError {
        origin: Origin::CommandLine,
        key: key.to_owned(),
        message,
    };
    // Each option sets its key as a file would, so it is read the same way.
    let mut options: Vec<(&str, &str, String)> = Vec::new();
    let sockets = cli.socket.as_deref().unwrap_or_default();
    if cli.socket.is_some() || !cli.port.is_empty() || !cli.listen.is_empty() {
        // Every listener, also those not given, so none of the files' stays.
        options.extend([
            ("--socket", "socket", sockets.join(" ")),
            ("--port", "port", cli.port.join(" ")),
            ("--listen", "listen", cli.listen.join(" ")),
        ]);
    }
    options.extend(cli.mode.iter().map(|v| ("--mode", "mode", v.clone())));
    options.extend(cli.amqp.iter().map(|v| ("--amqp", "amqp", v.clone())));
    for (flag, name, value) in options {
        if let Some(key) = key("staps", name) {
            (key.set)(s, &value).map_err(|m| err(flag, m))?;
        }
    }
    if let Some(urls) = cli.amqp.as_deref().filter(|u| !u.trim().is_empty()) {
        // Checked here, so that an error names the command line, not a file.
        crate::config::amqp_url::parse_all(urls).map_err(|m| err("--amqp", m))?;
    }
    if cli.debug {
        deprecated.push("--debug is the 0.1.x name of -v (--verbose)".into());
    }
    s.daemon |= cli.daemon;
    Ok(())
}

/// Checks that need the whole picture.
fn validate(s: &Settings) -> Result<(), ConfigError> {
    let err = |key: &str, message: String| ConfigError::of_whole(s, key, message);
    if let Some(urls) = &s.amqp {
        crate::config::amqp_url::parse_all(urls).map_err(|m| err("[staps] amqp", m))?;
        // The routing key is the path without its slash, an AMQP short string.
        if s.limits.max_path_length > 256 {
            return Err(err(
                "[limits] max_path_length",
                "with amqp set, at most 256 (routing keys have at most 255 bytes)".into(),
            ));
        }
    }
    if s.exchange.is_empty() || s.exchange.len() > 255 {
        return Err(err(
            "[staps] exchange",
            "an exchange name has 1 to 255 bytes".into(),
        ));
    }
    if s.user.is_none() && s.group.is_some() {
        // Root that switched only its group would still be root.
        return Err(err(
            "[daemon] group",
            "group is set without user: set [daemon] user too (staps switches to both), \
             or use socket_group to give only the socket files to a group"
                .into(),
        ));
    }
    Ok(())
}

/// Values that may list several items: separated by white space or commas.
fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|v| !v.is_empty())
}

fn parse_octal(value: &str, max: u32) -> Result<u32, String> {
    let digits = value.strip_prefix("0o").unwrap_or(value);
    match u32::from_str_radix(digits, 8) {
        Ok(v) if v <= max && !digits.is_empty() => Ok(v),
        _ => Err(format!(
            "'{value}' is not an octal mode (e.g. 0660, at most {max:o})"
        )),
    }
}

fn parse_port(value: &str) -> Result<u16, String> {
    value
        .parse()
        .map_err(|_| format!("'{value}' is not a port number (0 to 65535)"))
}

/// How `ADDRESS:PORT` is written; for errors.
pub(crate) const ADDRESS_FORM: &str = "expected ADDRESS:PORT, e.g. 127.0.0.1:8080 or [::1]:8080";

fn parse_listen(value: &str) -> Result<Address, String> {
    if let Ok(addr) = value.parse() {
        return Ok(Address::Ip(addr));
    }
    // A host name: looked up at startup (resolve), not while parsing.
    let host_port = value.rsplit_once(':').filter(|(host, port)| {
        !host.is_empty()
            && port.parse::<u16>().is_ok()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    });
    match host_port {
        Some(_) => Ok(Address::Host(value.to_owned())),
        None => Err(format!("'{value}': not an address; {ADDRESS_FORM}")),
    }
}

fn parse_count(value: &str, min: usize) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(v) if v >= min => Ok(v),
        _ => Err(format!("'{value}' is not a whole number of at least {min}")),
    }
}

fn parse_seconds(value: &str, zero_ok: bool) -> Result<Duration, String> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) && v < 1e9 => {
            Ok(Duration::from_secs_f64(v))
        }
        _ => Err(format!(
            "'{value}' is not a number of seconds{}",
            if zero_ok {
                " (0 turns it off)"
            } else {
                " above 0"
            }
        )),
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Ok(true),
        "0" | "no" | "false" | "off" => Ok(false),
        _ => Err(format!(
            "'{value}' is not a boolean (true/false, yes/no, on/off, 1/0)"
        )),
    }
}

/// `public_url` is `ws://` or `wss://`, a host, and optionally a path prefix;
/// stored with a trailing slash so a UUID can be appended.
fn parse_public_url(value: &str) -> Result<String, String> {
    let hint = "expected ws://HOST/ or wss://HOST/PREFIX/";
    let rest = value
        .strip_prefix("ws://")
        .or_else(|| value.strip_prefix("wss://"))
        .ok_or_else(|| format!("'{value}' does not start with ws:// or wss://; {hint}"))?;
    let host = rest.split('/').next().unwrap_or("");
    let valid = |c: char| c.is_ascii_alphanumeric() || "-._~:[]%".contains(c);
    if host.is_empty() || !host.chars().all(valid) {
        return Err(format!("'{value}' has no valid host; {hint}"));
    }
    let path_ok = rest
        .chars()
        .all(|c| c.is_ascii_graphic() && !"\"<>\\^`{|}?#".contains(c));
    if !path_ok {
        return Err(format!(
            "'{value}' has characters a URL cannot hold; {hint}"
        ));
    }
    let mut url = value.to_owned();
    if !url.ends_with('/') {
        url.push('/');
    }
    Ok(url)
}

impl Settings {
    /// The effective settings as an INI file, for `--check-config`: every
    /// key, with what it means as a comment.
    pub fn render(&self) -> String {
        let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        let mut out = format!("; files read: {}\n", files.join(" "));
        for section in SECTIONS {
            out.push_str(&format!("\n[{section}]\n"));
            for key in KEYS.iter().filter(|k| k.section == section) {
                out.push_str(&format!(
                    "; {}\n{} = {}\n",
                    key.doc,
                    key.name,
                    (key.get)(self)
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings of `text`, and every warning (deprecations first).
    fn parse(text: &str) -> Result<(Settings, Vec<String>), ConfigError> {
        let mut s = Settings::default();
        let (mut w, mut d) = (Vec::new(), Vec::new());
        apply_file(&mut s, &mut w, &mut d, Path::new("t.conf"), text)?;
        d.extend(w);
        Ok((s, d))
    }

    /// 0.1.x's forms are deprecations (warnings even under --check-config),
    /// not errors like an unknown key.
    #[test]
    fn legacy_forms_are_deprecations() {
        let loaded = from_text(Path::new("t.conf"), "[controller.base]\nmode = 0660\n").unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.deprecated.len(), 2, "{:?}", loaded.deprecated);
        assert!(loaded.deprecated[0].contains("[staps]"));
        assert!(loaded.deprecated[1].contains(LEGACY_SOCKET));
        assert_eq!(loaded.settings.sockets, vec![PathBuf::from(LEGACY_SOCKET)]);
        let loaded = from_text(Path::new("t.conf"), "[staps]\nmood = 1\nport = 1\n").unwrap();
        assert_eq!(loaded.warnings.len(), 1);
        assert!(loaded.deprecated.is_empty());
    }

    /// Found by the `config` fuzz target: a file with no listener was
    /// reported as a command-line error.
    #[test]
    fn whole_file_errors_name_the_file() {
        let Err(e) = from_text(Path::new("t.conf"), "[staps]\nport = 1\namqp = x\n") else {
            panic!("a bad amqp URL was accepted");
        };
        assert_eq!(e.to_string().split(':').next(), Some("t.conf"), "{e}");
    }

    #[test]
    fn legacy_keys_and_inline_comments() {
        let (s, w) = parse(
            "[staps]\nsocket = /a.sock, /b.sock /c.sock\nmode = 0600\namqp = amqp://staps:@localhost/  ; comment\n\
             [daemon]\nuser =\numask = 0\n",
        )
        .unwrap();
        assert_eq!(s.sockets.len(), 3);
        assert_eq!(s.mode, 0o600);
        assert_eq!(s.amqp.as_deref(), Some("amqp://staps:@localhost/"));
        assert_eq!(s.user, None);
        assert_eq!(s.umask, 0);
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn legacy_section_is_an_alias_with_a_warning() {
        let (s, w) = parse("# c\n[controller.base]\nmode = 640\n").unwrap();
        assert_eq!(s.mode, 0o640);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("t.conf:2:") && w[0].contains("[staps]"),
            "{w:?}"
        );
    }

    #[test]
    fn unknown_keys_are_warnings_with_lines() {
        let (_, w) = parse("[staps]\nmode = 0660\nmood = 1\n[nope]\nx = 1\n").unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("t.conf:3:") && w[0].contains("mood"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("t.conf:4:") && w[1].contains("[nope]"),
            "{w:?}"
        );
    }

    #[test]
    fn bad_values_name_line_key_and_form() {
        let e = parse("[staps]\n\nmode = 0999\n").err().unwrap().to_string();
        assert!(
            e.starts_with("t.conf:3: [staps] mode: '0999' is not an octal mode"),
            "{e}"
        );
        let e = parse("[limits]\nslow_client = maybe\n")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("t.conf:2") && e.contains("disconnect, drop"),
            "{e}"
        );
        let e = parse("[staps]\nlisten = nonsense\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ADDRESS:PORT"), "{e}");
        assert_eq!(
            parse("[limits]\nqueue_length = 0\n")
                .unwrap()
                .0
                .limits
                .queue_length,
            0
        );
        assert!(parse("[limits]\nqueue_bytes = 10\n").is_err());
        let (s, _) = parse("[limits]\nslow_client = WAIT\nslow_timeout = 2.5\n").unwrap();
        assert_eq!(s.limits.slow_client, SlowClient::Wait);
        assert_eq!(s.limits.slow_timeout, Duration::from_millis(2500));
        assert!(parse("[limits]\nmax_message_size = 1073741824\n").is_ok());
        let e = parse("[limits]\nmax_message_size = 1000000000000\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("t.conf:2") && e.contains("1 GiB"), "{e}");
        assert!(parse("[limits]\nping_interval = -1\n").is_err());
    }

    #[test]
    fn listen_accepts_ipv6_and_port_all_interfaces() {
        let (s, _) = parse("[staps]\nlisten = [::1]:8080 127.0.0.1:81\nport = 90\n").unwrap();
        assert_eq!(
            s.tcp,
            vec![
                TcpSpec::Addr(Address::Ip("[::1]:8080".parse().unwrap())),
                TcpSpec::Addr(Address::Ip("127.0.0.1:81".parse().unwrap())),
                TcpSpec::AllInterfaces(90),
            ]
        );
    }

    #[test]
    fn public_url_gets_a_trailing_slash() {
        let (s, _) = parse("[staps]\npublic_url = wss://example.org/ws\n").unwrap();
        assert_eq!(s.public_url.as_deref(), Some("wss://example.org/ws/"));
        assert!(parse("[staps]\npublic_url = http://x/\n").is_err());
        assert!(parse("[staps]\npublic_url = ws://<script>/\n").is_err());
    }

    /// Every key reads back what it shows: --check-config's output is a
    /// configuration file with the same settings.
    #[test]
    fn rendered_settings_read_back_the_same() {
        let (s, w) = parse(
            "[staps]\nsocket = /a.sock /b.sock\nmode = 0600\nport = 81\nlisten = [::1]:82\n\
             socket_group = g\nexchange = ex\npublic_url = wss://h/p\nlog_level = debug\n\
             metrics = /m.sock\n[daemon]\nuser = u\ngroup = g\ndir = /d\npid_file = /p\n\
             umask = 0027\nlog_file = /l\n[limits]\nmax_message_size = 99\n\
             max_clients_per_channel = 3\nmax_connections = 4\nqueue_length = 5\n\
             queue_bytes = 4096\nslow_client = drop\nslow_timeout = 3\nping_interval = 1.5\nhandshake_timeout = 2\n\
             max_path_length = 6\nuuid_only = true\nreplay_length = 7\nreplay_bytes = 8\n\
             memory_budget = 2097152\n",
        )
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
        let shown = s.render();
        let (again, w) = parse(&shown).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(again.render(), shown);
        for key in KEYS {
            assert!(
                shown.contains(&format!("\n{} = ", key.name)),
                "{}",
                key.name
            );
        }
    }

    #[test]
    fn the_shipped_config_is_valid_and_complete() {
        let (s, w) = parse(include_str!("../../staps.conf")).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.sockets, vec![PathBuf::from("/run/staps/staps.sock")]);
        assert_eq!(s.user.as_deref(), Some("staps"));
        // Every key staps knows is mentioned, so the file documents them all.
        let text = include_str!("../../staps.conf");
        for section in SECTIONS {
            assert!(text.contains(&format!("[{section}]")), "{section}");
        }
        for key in KEYS {
            assert!(
                text.contains(&format!("{} =", key.name)),
                "{} missing from staps.conf",
                key.name
            );
        }
    }
}
