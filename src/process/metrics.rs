//! The metrics listener (`[staps] metrics`): `/metrics` in the Prometheus
//! text format and `/healthz`, on an address or socket of its own, never on
//! the public listeners. It counts and never names a channel: channel paths
//! are the only secret staps has.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::conn::server::Server;
use crate::hub::link::Link;
use crate::memory::budget::BUDGET;
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
    server.readers.run(move || answer(&stream, &server2))
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
            let relay = relay_state(server);
            if server.is_stopping() {
                Response::new(
                    503,
                    "text/plain; charset=utf-8",
                    format!("stopping\nrelay: {relay}\n"),
                )
            } else {
                Response::new(
                    200,
                    "text/plain; charset=utf-8",
                    format!("ok\nrelay: {relay}\n"),
                )
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
    Link::state_name(server.relay.as_ref())
}

/// The metrics, in the Prometheus text exposition format 0.0.4.
pub(crate) fn exposition(server: &Server) -> String {
    let (clients, channels) = server.registry.counts();
    let s = &server.stats;
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
    let local = [
        (
            "connections_total",
            "Clients accepted: websocket members and HTTP streaming listeners.",
            &s.connections_total,
        ),
        (
            "refused_total",
            "Connections turned away: limits, bad requests, shutdown, no descriptors.",
            &s.refused,
        ),
        (
            "messages_in_total",
            "Messages received from clients.",
            &s.messages_in,
        ),
        (
            "messages_out_total",
            "Deliveries queued to receivers (a message to ten receivers counts ten).",
            &s.messages_out,
        ),
        (
            "bytes_in_total",
            "Payload bytes received from clients.",
            &s.bytes_in,
        ),
        (
            "bytes_out_total",
            "Payload bytes of the deliveries queued to receivers.",
            &s.bytes_out,
        ),
        (
            "slow_disconnects_total",
            "Receivers closed with 1008 under slow_client = disconnect.",
            &s.slow_disconnects,
        ),
    ];
    counters(&mut out, &local);
    family(
        &mut out,
        "dropped_total",
        "counter",
        "Messages not delivered, by reason: slow_client (a full queue under \
         slow_client = drop; per receiver), relay (not handed to the broker), \
         oversize (from the broker, over max_message_size).",
        &[
            ("{reason=\"slow_client\"}", s.dropped.load(Relaxed)),
            ("{reason=\"relay\"}", s.relay_dropped.load(Relaxed)),
            ("{reason=\"oversize\"}", s.oversize_dropped.load(Relaxed)),
        ],
    );
    family(
        &mut out,
        "memory_budget_bytes",
        "gauge",
        "The memory budget: [limits] memory_budget.",
        &[("", BUDGET.limit() as u64)],
    );
    family(
        &mut out,
        "memory_used_bytes",
        "gauge",
        "Bytes counted in the memory budget: partial messages, queued messages, replay rings.",
        &[("", BUDGET.used() as u64)],
    );
    family(
        &mut out,
        "memory_refusals_total",
        "counter",
        "Large messages (1009) and joins (503) refused because the memory budget was used up.",
        &[("", BUDGET.refusals())],
    );
    family(
        &mut out,
        "memory_cached_bytes",
        "gauge",
        "Of memory_used_bytes, what replay rings hold: a cache, evicted first.",
        &[("", BUDGET.cached() as u64)],
    );
    family(
        &mut out,
        "limit_refusals_total",
        "counter",
        "Clients and messages turned away by a limit, by reason: address (the client \
         address holds max_connections_per_address), address_memory (it holds its share \
         of memory_budget), rate (a message or body slower than min_rate), budget (the \
         memory budget).",
        &[
            ("{reason=\"address\"}", s.address_refusals.load(Relaxed)),
            (
                "{reason=\"address_memory\"}",
                s.address_memory_refusals.load(Relaxed),
            ),
            ("{reason=\"rate\"}", s.rate_closes.load(Relaxed)),
            ("{reason=\"budget\"}", BUDGET.refusals()),
        ],
    );
    if server.relay.is_some() {
        family(
            &mut out,
            "relay_up",
            "gauge",
            "1 when the relay is connected to the broker.",
            &[("", u64::from(relay_state(server) == "up"))],
        );
        let relay = [
            (
                "relay_published_total",
                "Messages published to the broker.",
                &s.relay_published,
            ),
            (
                "relay_received_total",
                "Messages from other instances delivered here.",
                &s.relay_received,
            ),
            (
                "relay_reconnects_total",
                "Times the relay connected again after losing the broker.",
                &s.relay_reconnects,
            ),
        ];
        counters(&mut out, &relay);
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

/// Counter families without labels: name, help, counter.
fn counters(out: &mut String, list: &[(&str, &str, &AtomicU64)]) {
    for (name, help, counter) in list {
        family(out, name, "counter", help, &[("", counter.load(Relaxed))]);
    }
}
