//! The metrics listener (`[staps] metrics`): `/metrics` in the Prometheus
//! text format and `/healthz`, on an address or socket of its own, never on
//! the public listeners. It counts and never names a channel: channel paths
//! are the only secret staps has.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::conn::server::Server;
use crate::hub::link::Link;
use crate::memory::budget::BUDGET;
use crate::memory::stats::{COUNTERS, Shown, Stats};
use crate::os::stream::Stream;
use crate::proto::http::{self, Request, Response};

/// How long a scraper has to send its request and read the answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The metrics listener's [`crate::process::listener::Serve`]: each scrape on a
/// connection thread.
pub(crate) fn scrapes(
    server: &Arc<Server>,
    stream: Stream,
    _: Option<IpAddr>,
) -> std::io::Result<()> {
    let server2 = Arc::clone(server);
    server.readers().run(move || answer(&stream, &server2))
}

fn answer(stream: &Stream, server: &Server) {
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let deadline = Instant::now() + TIMEOUT;
    if let Some(request) = http::read_head(stream, deadline) {
        http::respond(stream, &respond_to(&request, server));
    }
}

/// What a request to the metrics listener gets.
pub(crate) fn respond_to(request: &Request, server: &Server) -> Response {
    let head_only = match http::get_or_head(request, "GET, HEAD") {
        Ok(head_only) => head_only,
        Err(refusal) => return refusal.private(),
    };
    let path = request.target.split('?').next().unwrap_or("");
    let response = match path {
        "/metrics" => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            exposition(server),
        ),
        "/healthz" => {
            let mut relay = format!("relay: {}\n", relay_state(server));
            if let Some(node) = server.relay().and_then(Link::node) {
                relay.push_str(&format!("node: {node}\n"));
            }
            if server.is_stopping() {
                Response::new(
                    503,
                    "text/plain; charset=utf-8",
                    format!("stopping\n{relay}"),
                )
            } else {
                Response::new(200, "text/plain; charset=utf-8", format!("ok\n{relay}"))
            }
        }
        _ => Response::error(404, "/metrics and /healthz are served here"),
    };
    response
        .with("Cache-Control", "no-store")
        .head_only(head_only)
        .private()
}

fn relay_state(server: &Server) -> &'static str {
    Link::state_name(server.relay())
}

/// The metrics, in the Prometheus text exposition format 0.0.4.
pub(crate) fn exposition(server: &Server) -> String {
    let (clients, channels) = server.registry().counts();
    let s = &server.stats();
    let mut out = String::with_capacity(4096);
    let version = format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    family(
        &mut out,
        "build_info",
        "gauge",
        "The running staps' version.",
        &[(&version, 1)],
    );
    family(
        &mut out,
        "connections",
        "gauge",
        "Clients connected now: websocket members and HTTP streaming listeners.",
        &[("", clients as u64)],
    );
    family(
        &mut out,
        "connections_resting",
        "gauge",
        "Of those, clients silent for a while: they wait in the event loop and hold no thread.",
        &[("", s.resting.load(Relaxed))],
    );
    family(
        &mut out,
        "channels",
        "gauge",
        "Channels with clients on this instance.",
        &[("", channels as u64)],
    );
    family(
        &mut out,
        "stopping",
        "gauge",
        "1 while shutting down.",
        &[("", u64::from(server.is_stopping()))],
    );
    counters(&mut out, s, server.relay().is_some());
    let memory: [(&str, &str, usize); 3] = [
        (
            "memory_budget_bytes",
            "The memory budget: [limits] memory_budget.",
            BUDGET.limit(),
        ),
        (
            "memory_used_bytes",
            "Bytes counted in the memory budget: partial messages, queued messages, replay rings.",
            BUDGET.used(),
        ),
        (
            "memory_cached_bytes",
            "Of memory_used_bytes, what replay rings hold: a cache, evicted first.",
            BUDGET.cached(),
        ),
    ];
    for (name, help, value) in memory {
        family(&mut out, name, "gauge", help, &[("", value as u64)]);
    }
    if let Some(link) = server.relay() {
        family(
            &mut out,
            "relay_up",
            "gauge",
            "1 when the relay is connected to the broker.",
            &[("", u64::from(relay_state(server) == "up"))],
        );
        // URLs without credentials; a quote or backslash in a label value
        // is escaped, as the format asks.
        let labels: Vec<(String, u64)> = link
            .nodes()
            .iter()
            .map(|node| {
                let value = node.replace('\\', "\\\\").replace('"', "\\\"");
                let on = link.node() == Some(node.as_str());
                (format!("{{node=\"{value}\"}}"), u64::from(on))
            })
            .collect();
        let samples: Vec<(&str, u64)> = labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        family(
            &mut out,
            "relay_node",
            "gauge",
            "1 for the broker node the relay is connected to, 0 for the others (amqp URLs, in the order tried).",
            &samples,
        );
    }
    out
}

/// One metric family: HELP, TYPE and its samples (`labels` may be empty).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP staps_{name} {help}");
    let _ = writeln!(out, "# TYPE staps_{name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "staps_{name}{labels} {value}");
    }
}

/// Every counter (`stats::COUNTERS`), family by family; the relay's only
/// when instances are linked.
fn counters(out: &mut String, stats: &Stats, linked: bool) {
    let shown: Vec<&Shown> = COUNTERS.iter().filter(|c| linked || !c.relay).collect();
    for family_of in shown.chunk_by(|a, b| a.family == b.family) {
        let samples: Vec<(&str, u64)> = family_of
            .iter()
            .map(|c| (c.labels, (c.value)(stats)))
            .collect();
        let first = family_of[0];
        family(out, first.family, "counter", first.help, &samples);
    }
}
