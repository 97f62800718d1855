//! The wiring of the staps daemon: the modules of the library together, from
//! the command line to the signal loop (layer 8 in `lib.rs`). Startup
//! failures come back here as exit codes; only the signal loop, which runs
//! until the process ends, exits it itself.

use std::process::ExitCode;
use std::sync::Arc;

use crate::config;
use crate::config::cli;
use crate::config::resolve;
use crate::conn::server;
use crate::os::logging;
use crate::process::detach;
use crate::process::event_loop;
use crate::process::listener;
use crate::process::metrics;
use crate::process::relay;
use crate::process::shutdown;
use crate::process::signals;
use clap::Parser;

/// Exit code for a command line that cannot be parsed (`EX_USAGE`).
const EX_USAGE: u8 = 64;

/// The public listeners and the metrics listener, if any.
type Bound = (
    Vec<Arc<listener::Listener>>,
    Option<Arc<listener::Listener>>,
);

/// The privileged step: take systemd's sockets or bind the configured ones,
/// and the metrics listener, then drop privileges; on failure nothing is left
/// behind.
fn bind_and_drop_privileges(
    settings: &config::Settings,
    host: &resolve::Host,
) -> Result<Bound, String> {
    let listeners = if host.socket_activated {
        listener::take_activated()?
    } else {
        listener::bind_all(settings, host)?
    };
    let bound = listener::bind_metrics(settings, host).and_then(|metrics| {
        if let Err(e) = detach::drop_privileges(settings, host) {
            metrics.iter().for_each(|l| drop(l.remove_file()));
            return Err(e);
        }
        Ok(metrics)
    });
    match bound {
        Ok(metrics) => Ok((
            listeners.into_iter().map(Arc::new).collect(),
            metrics.map(Arc::new),
        )),
        Err(e) => {
            listeners.iter().for_each(|l| drop(l.remove_file()));
            Err(e)
        }
    }
}

/// Run staps: parse the command line and the configuration, bind, detach
/// or not, serve until a signal stops it.
pub fn run() -> ExitCode {
    server::tune_allocator();
    let (cli, loaded, host) = match configure() {
        Ok(configured) => configured,
        Err(code) => return code,
    };
    let settings = loaded.settings.clone();
    if let Err(code) = start_logging(&cli, &loaded) {
        return code;
    }
    let (signals, starting) = match signals::install() {
        Ok(installed) => installed,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bind = {
        let (settings, host) = (settings.clone(), host.clone());
        move || bind_and_drop_privileges(&settings, &host)
    };
    let (bound, mut readiness) = if settings.daemon {
        match detach::detach(&settings, &host, bind) {
            Ok(detached) => detached,
            // The parent, done waiting, or a child that could not start.
            Err(code) => return code,
        }
    } else {
        match bind() {
            Ok(bound) => (bound, detach::Readiness::foreground()),
            Err(e) => {
                log::error!("{e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let files = shutdown::Files::new(bound.0, bound.1, &settings);
    let server = match start(settings, &files) {
        Ok(server) => server,
        Err(e) => {
            // The files go first: whoever waits for the start's end finds
            // them gone.
            files.remove();
            return readiness.fail(1, &e);
        }
    };
    starting.done();
    log::info!("staps {} ready", env!("CARGO_PKG_VERSION"));
    readiness.ready();
    signals::run(signals, server, files)
}

/// The command line, the configuration and the host's users, groups and
/// sockets, checked; `Err` is how staps exits now: on an error, after
/// `--check-config` or `--help`.
fn configure() -> Result<(cli::Cli, config::Loaded, resolve::Host), ExitCode> {
    let cli = cli::Cli::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(EX_USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })?;
    let config_error = |e: config::ConfigError| {
        eprintln!("staps: {e}");
        ExitCode::from(config::EX_CONFIG as u8)
    };
    let loaded = config::load(&cli, &resolve::default_files()).map_err(config_error)?;
    let host = resolve::resolve(&loaded.settings).map_err(config_error)?;
    if !cli.check_config {
        return Ok((cli, loaded, host));
    }
    print!("{}", loaded.settings.render());
    for warning in &loaded.deprecated {
        eprintln!("staps: warning: {warning}");
    }
    for warning in &loaded.warnings {
        eprintln!("staps: error: {warning}");
    }
    Err(if loaded.warnings.is_empty() {
        eprintln!("staps: configuration is valid");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(config::EX_CONFIG as u8)
    })
}

/// The log, at the level asked for, and the configuration's warnings in it.
fn start_logging(cli: &cli::Cli, loaded: &config::Loaded) -> Result<(), ExitCode> {
    let settings = &loaded.settings;
    // A daemon's output is redirected when it detaches; until then its errors
    // belong on the terminal.
    if let Some(path) = settings.log_file.as_ref().filter(|_| !settings.daemon) {
        if let Err(e) = logging::redirect_to(path) {
            eprintln!("staps: cannot open log file {}: {e}", path.display());
            return Err(ExitCode::FAILURE);
        }
    }
    logging::init(cli.verbosity(), settings.log_level);
    for warning in loaded.deprecated.iter().chain(&loaded.warnings) {
        log::warn!("{warning}");
    }
    Ok(())
}

/// Everything after binding: the memory budget, the secret, the shared
/// state, the relay, the metrics listener and the event loop; the server,
/// or why it cannot start.
fn start(
    settings: config::Settings,
    files: &shutdown::Files,
) -> Result<Arc<server::Server>, String> {
    // Checked with the configuration; parsing again cannot fail.
    let nodes: Vec<relay::Broker> = match &settings.amqp {
        Some(urls) => crate::config::amqp_url::parse_all(urls)?
            .into_iter()
            .map(relay::Broker::new)
            .collect(),
        None => Vec::new(),
    };
    let (relay, relay_ends) = if nodes.is_empty() {
        (None, None)
    } else {
        let names = nodes.iter().map(|node| node.node().to_owned()).collect();
        let (relay, ends) = crate::hub::link::Link::new(names);
        (Some(relay), Some(ends))
    };
    crate::memory::budget::BUDGET.set_limit(settings.limits.memory_budget);
    if settings.limits.per_address() > 0 {
        crate::memory::budget::BUDGET.set_share_limit(settings.limits.address_share());
    }
    // Privileges are dropped: the secret's directory is the service user's.
    let default = settings.secret_file.as_deref()
        == Some(std::path::Path::new(crate::config::DEFAULT_SECRET_FILE));
    let twins = crate::process::secret::twins(settings.secret_file.as_deref(), default)
        .map_err(|e| format!("no random source for the secret: {e}"))?;
    let server = Arc::new(server::Server::new(settings, relay, twins));
    server.check_system_limits();
    if let Some(ends) = relay_ends {
        relay::spawn(nodes, ends, Arc::clone(&server))
            .map_err(|e| format!("cannot start the relay thread: {e}"))?;
    }
    // The metrics listener answers through a shutdown, for /healthz.
    if let Some(m) = &files.metrics {
        listener::spawn_accept_loop(
            Arc::clone(m),
            Arc::clone(&server),
            "staps-metrics",
            metrics::scrapes,
        )
        .map_err(|e| format!("cannot start the accept thread for {m}: {e}"))?;
        log::info!("metrics on {m}");
    }
    if !server.limits().max_linger.is_zero() {
        let registry = Arc::clone(server.registry());
        std::thread::Builder::new()
            .name("staps-linger".into())
            .stack_size(64 * 1024)
            .spawn(move || registry.end_lingers())
            .map_err(|e| format!("cannot start the thread that ends lingers: {e}"))?;
    }
    event_loop::spawn(files.listeners.clone(), Arc::clone(&server))
        .map_err(|e| format!("cannot start the event loop: {e}"))?;
    for l in &files.listeners {
        log::info!("listening on {l}");
    }
    Ok(server)
}
