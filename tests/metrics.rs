//! SPEC §10: the metrics listener (`/metrics`, `/healthz`).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::*;
use tungstenite::Message;

/// staps with its metrics listener at `at` (`{dir}` for the temporary directory).
fn with_metrics(at: &str) -> Staps {
    Staps::start(
        &tcp_config("").replace("[limits]", &format!("metrics = {at}\n[limits]")),
        &[],
    )
}

/// GET `path` from the metrics listener at `at` (an address or `unix:PATH`).
fn fetch(at: &str, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: metrics\r\n\r\n");
    let response = match at.strip_prefix("unix:") {
        Some(socket) => {
            let mut s = UnixStream::connect(socket).expect("unix connect");
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        }
        None => raw_http(at.parse().unwrap(), request.as_bytes()),
    };
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A small parser of the Prometheus text format 0.0.4: every sample belongs to
/// a family with HELP and TYPE, names and labels are well formed, values are
/// numbers. Returns the samples by name with labels.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let (mut helps, mut types) = (HashSet::new(), HashMap::new());
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP text");
            assert!(name_ok(name) && !help.is_empty(), "{line}");
            assert!(helps.insert(name.to_owned()), "HELP twice: {line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line}"
            );
        } else {
            assert!(
                !line.starts_with('#') && !line.is_empty(),
                "stray line: {line:?}"
            );
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let name = series.split('{').next().unwrap();
            assert!(name_ok(name), "{line}");
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .expect("{labels}");
                for pair in inner.split(',') {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    assert!(
                        name_ok(k) && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
            }
            assert!(
                types.contains_key(name) && helps.contains(name),
                "no TYPE/HELP before {line}"
            );
            if types[name] == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            samples.insert(series.to_owned(), value);
        }
    }
    samples
}

#[test]
fn metrics_are_prometheus_text_and_count_traffic() {
    let mut staps = with_metrics("127.0.0.1:0");
    let at = staps.metrics_at();
    let before = parse_exposition(&fetch(&at, "/metrics").1);
    assert_eq!(before["staps_connections"], 0.0);
    assert_eq!(before["staps_build_info{version=\"0.2.0\"}"], 1.0);
    let ch = channel();
    let mut a = connect(staps.addr(), &ch);
    let mut b = connect(staps.addr(), &ch);
    let mut c = connect(staps.addr(), &ch);
    a.send(Message::text("12345")).unwrap();
    assert_eq!(recv(&mut b), Message::text("12345"));
    assert_eq!(recv(&mut c), Message::text("12345"));
    // Counters are added after the deliveries are queued.
    let mut after = HashMap::new();
    wait_until("the deliveries counted", || {
        after = parse_exposition(&fetch(&at, "/metrics").1);
        after["staps_messages_out_total"] == 2.0
    });
    assert_eq!(after["staps_connections"], 3.0);
    assert_eq!(after["staps_channels"], 1.0);
    assert_eq!(after["staps_messages_in_total"], 1.0);
    assert_eq!(after["staps_messages_out_total"], 2.0);
    assert_eq!(after["staps_bytes_in_total"], 5.0);
    assert_eq!(after["staps_bytes_out_total"], 10.0);
    assert_eq!(after["staps_dropped_total{reason=\"slow_client\"}"], 0.0);
    assert!(!after.contains_key("staps_relay_up"), "no relay configured");
    // Only the metrics listener serves them.
    let public = get(staps.addr(), "/metrics", "");
    assert!(!public.contains("staps_connections"), "{public}");
    assert_eq!(fetch(&at, "/nothing").0, 404);
    // An HTTP streaming listener is a connection like the others, and an
    // HTTP publish a message in.
    let mut sse = std::net::TcpStream::connect(staps.addr()).unwrap();
    sse.write_all(format!("GET {ch}?sse HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    wait_until("the listener counted", || {
        parse_exposition(&fetch(&at, "/metrics").1)["staps_connections"] == 4.0
    });
    let posted = post(staps.addr(), &ch, "", b"abc");
    assert!(posted.contains("{\"clients\": 4}"), "{posted}");
    let now = parse_exposition(&fetch(&at, "/metrics").1);
    assert_eq!(now["staps_messages_in_total"], 2.0);
    assert_eq!(now["staps_bytes_in_total"], 8.0);
}

#[test]
fn no_channel_path_appears_in_metrics_or_healthz() {
    let mut staps = with_metrics("{dir}/metrics.sock");
    let at = staps.metrics_at();
    assert!(at.starts_with("unix:"), "{at}");
    let paths: Vec<String> = (0..100).map(|_| channel()).collect();
    let mut clients = Vec::new();
    for path in &paths {
        let mut a = connect(staps.addr(), path);
        let mut b = connect(staps.addr(), &format!("{path}?echo=1&replay=3"));
        a.send(Message::text(path.as_str())).unwrap();
        assert_eq!(recv(&mut b), Message::text(path.as_str()));
        clients.push((a, b));
    }
    let metrics = fetch(&at, "/metrics").1;
    let health = fetch(&at, "/healthz").1;
    assert_eq!(parse_exposition(&metrics)["staps_channels"], 100.0);
    for path in &paths {
        let uuid = &path[1..];
        assert!(
            !metrics.contains(uuid) && !health.contains(uuid),
            "{path} leaked"
        );
    }
    let socket = at.strip_prefix("unix:").unwrap().to_owned();
    drop(clients);
    staps.signal(libc::SIGTERM);
    assert_eq!(staps.wait_exit().code(), Some(0));
    assert!(
        !std::path::Path::new(&socket).exists(),
        "metrics socket left behind"
    );
}

#[test]
fn healthz_is_200_when_serving_and_503_during_shutdown() {
    let mut staps = with_metrics("127.0.0.1:0");
    let at = staps.metrics_at();
    assert_eq!(fetch(&at, "/healthz"), (200, "ok\nrelay: off\n".to_owned()));
    // A client that never answers the close frame holds the shutdown open.
    let silent = raw_ws(staps.addr(), &channel());
    staps.signal(libc::SIGTERM);
    wait_until("/healthz to say 503", || fetch(&at, "/healthz").0 == 503);
    assert_eq!(fetch(&at, "/healthz").1, "stopping\nrelay: off\n");
    assert_eq!(
        parse_exposition(&fetch(&at, "/metrics").1)["staps_stopping"],
        1.0
    );
    drop(silent);
    assert_eq!(staps.wait_exit().code(), Some(0));
}
