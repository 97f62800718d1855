//! `make bench`: a load generator that starts the servers itself and measures
//! staps side by side with wsbroad (a tokio websocket broadcaster), on fresh
//! servers, alternately, several runs each; it prints medians and the ratio
//! staps/wsbroad as Markdown (BENCHMARKS.md is made from it).
//!
//! Scenarios, all on loopback and bounded in count and time:
//! - `fanout`: one channel, 1 publisher + 100 subscribers, 20 000 messages of
//!   64 B and of 4 KiB back to back: delivered msg/s and MB/s, loss and order,
//!   latency p50/p99, server CPU per delivery.
//! - `many`: 500 channels x 2 clients, each sending 20 msg/s of 128 B for 10 s:
//!   delivered/expected, latency p50/p99/p99.9.
//! - `idle`: 2 000 and 10 000 connections, 2 per channel: server RSS and
//!   whole-machine memory per connection (MemAvailable, KernelStack,
//!   SUnreclaim), threads, connect rate, and that messages still cross.
//!
//! staps runs with its shipped defaults; the clients connect from 64
//! loopback source addresses, as a crowd of hosts would.
//! - `churn`: connect two clients, exchange one message, disconnect; 16 in
//!   parallel for 5 s: round trips/s, server CPU per round trip.
//! - `relay` (staps only): two instances on RabbitMQ, one channel with 1 and
//!   with 5 clients on each, and three instances with 1 on each (the
//!   publisher on the first, the others receive): relayed msg/s, latency,
//!   staps CPU per message (every instance's).
//!
//! - `soak` (staps only, not part of the default run; `make soak`): 10 000
//!   connections held, 100 000 connect/exchange/disconnect cycles, and that
//!   threads and descriptors return to the baseline.
//!
//! Every measurement reports the CPU of the server, of this generator, and of
//! everything else on the machine, so a noisy run shows.
//! Usage: `cargo bench --bench load -- [SCENARIO...] [--runs N]`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

const DEADLINE: Duration = Duration::from_secs(60);
/// A receiver that hears nothing for this long after the senders are done stops.
const QUIET: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------- CPU and memory

fn ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU seconds (user + system) of a process, from /proc.
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    // utime and stime are fields 14 and 15 of stat: 11 and 12 after the ')'
    // (the first one after it, the state, is a letter).
    (field(11) + field(12)) / ticks()
}

/// Context switches of a process's live threads (voluntary and not): each is
/// a thread that slept and was woken, the main cost of a thread-per-connection
/// server at low rates, and countable where CPU time is noisy.
fn context_switches(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Busy CPU seconds of the whole machine, and of them the kernel's softirq
/// time (loopback TCP is processed there, charged to no process).
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: f64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    (busy / ticks(), v.get(6).copied().unwrap_or(0.0) / ticks())
}

/// A field of /proc/PID/status, as a number (VmRSS in KiB, Threads).
fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// CPU used over an interval by the servers, this generator, and the rest.
struct Cpu {
    pids: Vec<u32>,
    at: (f64, f64, (f64, f64)),
    switches: f64,
    started: Instant,
}

#[derive(Clone, Copy, Default)]
struct CpuUse {
    server: f64,
    generator: f64,
    softirq: f64,
    others: f64,
    /// The servers' context switches.
    switches: f64,
    wall: f64,
}

impl Cpu {
    fn start(pids: &[u32]) -> Cpu {
        Cpu {
            pids: pids.to_vec(),
            at: Cpu::now(pids),
            switches: pids.iter().map(|p| context_switches(*p)).sum(),
            started: Instant::now(),
        }
    }

    fn now(pids: &[u32]) -> (f64, f64, (f64, f64)) {
        (
            pids.iter().map(|p| process_cpu(*p)).sum(),
            process_cpu(std::process::id()),
            machine_cpu(),
        )
    }

    fn stop(&self) -> CpuUse {
        let (server, generator, (machine, softirq)) = Cpu::now(&self.pids);
        let server = server - self.at.0;
        let generator = generator - self.at.1;
        let softirq = softirq - self.at.2.1;
        CpuUse {
            server,
            generator,
            softirq,
            others: (machine - self.at.2.0 - server - generator - softirq).max(0.0),
            switches: self.pids.iter().map(|p| context_switches(*p)).sum::<f64>() - self.switches,
            wall: self.started.elapsed().as_secs_f64(),
        }
    }
}

// ---------------------------------------------------------------- servers

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Staps,
    Wsbroad,
}

/// A server started for one measurement, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// staps' configuration, removed with the server.
    _dir: Option<tempfile::TempDir>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wsbroad() -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("wsbroad"))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

impl Server {
    fn start(kind: Kind, extra: &str) -> Server {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut dir = None;
        let mut cmd = match kind {
            Kind::Staps => {
                let dir = dir
                    .insert(tempfile::tempdir().expect("a temporary directory"))
                    .path();
                let conf = dir.join("staps.conf");
                // The secret of read-only URLs in the run's own directory.
                let secret = dir.join("secret");
                std::fs::write(
                    &conf,
                    format!(
                        "[staps]\nlisten = {addr}\nsecret_file = {}\n{extra}",
                        secret.display()
                    ),
                )
                .unwrap();
                // STAPS_BIN: another build to compare (the default is this one).
                let bin = std::env::var("STAPS_BIN")
                    .unwrap_or_else(|_| env!("CARGO_BIN_EXE_staps").to_owned());
                let mut cmd = Command::new(bin);
                cmd.arg("-c").arg(conf).arg("-q");
                cmd
            }
            Kind::Wsbroad => {
                let mut cmd = Command::new(wsbroad().expect("wsbroad on the PATH"));
                // Its default is 64 URLs at most; the scenarios need thousands.
                cmd.args(["--max-urls", "1000000"]).arg(addr.to_string());
                cmd
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server");
        let server = Server {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + DEADLINE;
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "{kind:?} did not start");
            thread::sleep(Duration::from_millis(10));
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- clients

type Ws = WebSocket<TcpStream>;

/// Source addresses the generator's connections take in turn: a crowd
/// comes from many hosts, and staps' default `max_connections_per_address`
/// (625) is meant for one host, not for all of a benchmark's clients.
const SOURCES: usize = 64;

/// A TCP connection to `addr` from the next of [`SOURCES`] loopback
/// addresses (127.0.1.1, 127.0.1.2, ...).
fn tcp(addr: SocketAddr) -> std::io::Result<TcpStream> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as usize % SOURCES;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    // The port is picked at connect(2), as without a bind: bind(2) with port
    // 0 searches for one no socket uses, TIME_WAIT ones included, which
    // slows the generator down in `churn`.
    let yes: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a valid pointer; the socket is open.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&yes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let from: SocketAddr = ([127, 0, 1, 1 + n as u8], 0).into();
    socket.bind(&from.into())?;
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

fn connect(addr: SocketAddr, path: &str) -> Ws {
    let stream = tcp(addr).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{addr}{path}"), stream).expect("handshake");
    ws
}

/// Nanoseconds since `epoch` and a sequence number, in a message's first 16 bytes.
fn stamp(epoch: Instant, payload: &mut [u8], seq: u64) {
    let now = epoch.elapsed().as_nanos() as u64;
    payload[..8].copy_from_slice(&now.to_be_bytes());
    payload[8..16].copy_from_slice(&seq.to_be_bytes());
}

/// When a stamped payload was sent, in nanoseconds since the epoch.
fn sent_at(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().unwrap())
}

fn read_stamp(epoch: Instant, payload: &[u8]) -> (u64, u64) {
    let sent = sent_at(payload);
    let seq = u64::from_be_bytes(payload[8..16].try_into().unwrap());
    (
        (epoch.elapsed().as_nanos() as u64).saturating_sub(sent),
        seq,
    )
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// What one receiver saw.
#[derive(Default)]
struct Received {
    count: u64,
    out_of_order: u64,
    latencies: Vec<u64>,
    /// It stopped after waiting [`QUIET`] for more (not closed by the server).
    quiet: bool,
}

/// Read binary messages until `expected` arrived, or the senders are `done`
/// and nothing came for [`QUIET`]: lossy servers must not stall the run.
fn receive(
    mut ws: Ws,
    epoch: Instant,
    expected: u64,
    done: &AtomicBool,
    progress: &AtomicU64,
) -> Received {
    let mut r = Received {
        latencies: Vec::with_capacity(expected as usize),
        ..Received::default()
    };
    let _ = ws.get_mut().set_read_timeout(Some(QUIET));
    let mut next = 0;
    let deadline = Instant::now() + DEADLINE;
    while r.count < expected && Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Binary(data)) => {
                let (latency, seq) = read_stamp(epoch, &data);
                if seq != next {
                    r.out_of_order += 1;
                }
                next = seq + 1;
                r.count += 1;
                r.latencies.push(latency);
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if done.load(Ordering::Relaxed) {
                    r.quiet = true;
                    break;
                }
            }
            Err(_) => break,
        }
    }
    r
}

/// Receivers on one channel and what they share: the clock of the stamps,
/// the flag that ends a lossy run, their progress, and the barrier that lets
/// them start reading with the sender (its last party).
struct Audience {
    epoch: Instant,
    done: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    start: Arc<Barrier>,
    threads: Vec<thread::JoinHandle<Received>>,
}

impl Audience {
    /// `n` clients on `path`, each reading `expected` messages in a thread of
    /// its own once [`Audience::go`] is called.
    fn join(addr: SocketAddr, path: &str, n: usize, expected: u64) -> Audience {
        Audience::spread(&[addr], path, n, expected)
    }

    /// `n` clients on `path` at each of `addrs` (linked instances).
    fn spread(addrs: &[SocketAddr], path: &str, n: usize, expected: u64) -> Audience {
        let epoch = Instant::now();
        let done = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let start = Arc::new(Barrier::new(n * addrs.len() + 1));
        let threads = addrs
            .iter()
            .flat_map(|addr| std::iter::repeat_n(*addr, n))
            .map(|addr| {
                let ws = connect(addr, path);
                let (done, progress, start) =
                    (Arc::clone(&done), Arc::clone(&progress), Arc::clone(&start));
                spawn_small(move || {
                    start.wait();
                    receive(ws, epoch, expected, &done, &progress)
                })
            })
            .collect();
        Audience {
            epoch,
            done,
            progress,
            start,
            threads,
        }
    }

    /// Let the receivers read.
    fn go(&self) {
        self.start.wait();
    }

    /// The sender is done: collect what each receiver saw.
    fn finish(self) -> Vec<Received> {
        self.done.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

/// Every receiver's latencies, sorted.
fn latencies(results: &[Received]) -> Vec<u64> {
    let mut lat: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    lat.sort_unstable();
    lat
}

fn spawn_small<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(f)
        .expect("a generator thread")
}

// ---------------------------------------------------------------- results

/// One measured run: named values.
type Row = Vec<(&'static str, f64)>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Print a Markdown table: each metric's median for staps and wsbroad, and the ratio.
///
/// The ratio is taken per pair of runs (each staps run and the wsbroad run
/// right after it, so both saw the machine in the same state), then the
/// median of those, with their range when there are several.
fn table(title: &str, staps: &[Row], wsbroad: &[Row]) {
    println!("\n### {title}\n");
    println!("| metric | staps | wsbroad | staps/wsbroad per run pair |");
    println!("| --- | ---: | ---: | ---: |");
    let Some(first) = staps.first() else { return };
    for (i, (name, _)) in first.iter().enumerate() {
        let s = median(staps.iter().map(|r| r[i].1).collect());
        let w = median(wsbroad.iter().map(|r| r[i].1).collect());
        let ratios: Vec<f64> = staps
            .iter()
            .zip(wsbroad)
            .map(|(s, w)| s[i].1 / w[i].1)
            .filter(|r| r.is_finite())
            .collect();
        let w = if wsbroad.is_empty() {
            "—".to_owned()
        } else {
            fmt(w)
        };
        let ratio = match ratios.len() {
            0 if wsbroad.is_empty() => "—".to_owned(),
            0 => "n/a".to_owned(),
            1 => format!("{:.2}", ratios[0]),
            _ => {
                let (lo, hi) = ratios
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                        (lo.min(*r), hi.max(*r))
                    });
                format!("{:.2} ({lo:.2}-{hi:.2})", median(ratios))
            }
        };
        println!("| {name} | {} | {w} | {ratio} |", fmt(s));
    }
    println!("\n(medians of {} run(s) each)", staps.len());
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn cpu_rows(row: &mut Row, cpu: CpuUse, units: f64) {
    row.push((
        "server CPU per unit (ns)",
        cpu.server * 1e9 / units.max(1.0),
    ));
    row.push((
        "server context switches per unit",
        cpu.switches / units.max(1.0),
    ));
    row.push(("server CPU (% of a core)", 100.0 * cpu.server / cpu.wall));
    row.push((
        "generator CPU (% of a core)",
        100.0 * cpu.generator / cpu.wall,
    ));
    row.push((
        "kernel softirq (% of a core)",
        100.0 * cpu.softirq / cpu.wall,
    ));
    row.push(("others CPU (% of a core)", 100.0 * cpu.others / cpu.wall));
}

// ---------------------------------------------------------------- scenarios

/// `config`: staps' `[limits]` beyond its shipped defaults (none, or the
/// lossless policy); wsbroad has no such setting.
fn fanout(kind: Kind, size: usize, config: &str) -> Row {
    const SUBSCRIBERS: usize = 100;
    const MESSAGES: u64 = 20_000;
    let server = Server::start(kind, config);
    let path = format!("/{}", uuid::Uuid::new_v4());
    let subscribers = Audience::join(server.addr, &path, SUBSCRIBERS, MESSAGES);
    let epoch = subscribers.epoch;
    let mut publisher = connect(server.addr, &path);
    subscribers.go();
    let cpu = Cpu::start(&[server.pid()]);
    let mut payload = vec![0u8; size];
    for seq in 0..MESSAGES {
        stamp(epoch, &mut payload, seq);
        publisher.write(Message::binary(payload.clone())).unwrap();
        if seq % 64 == 63 {
            publisher.flush().unwrap();
        }
    }
    publisher.flush().unwrap();
    let results = subscribers.finish();
    let mut cpu = cpu.stop();
    // The receivers' quiet wait is not the server's time (receivers the
    // server closed did not wait).
    if results.iter().any(|r| r.count < MESSAGES && r.quiet) {
        cpu.wall -= QUIET.as_secs_f64();
    }
    let delivered: u64 = results.iter().map(|r| r.count).sum();
    let lat = latencies(&results);
    let expected = (MESSAGES * SUBSCRIBERS as u64) as f64;
    let mut row = vec![
        ("delivered msg/s", delivered as f64 / cpu.wall),
        ("MB/s", delivered as f64 * size as f64 / cpu.wall / 1e6),
        ("lost (%)", 100.0 * (expected - delivered as f64) / expected),
        (
            "out of order",
            results.iter().map(|r| r.out_of_order).sum::<u64>() as f64,
        ),
        ("latency p50 (ms)", percentile(&lat, 0.5) / 1000.0),
        ("latency p99 (ms)", percentile(&lat, 0.99) / 1000.0),
    ];
    cpu_rows(&mut row, cpu, delivered as f64);
    row
}

fn many(kind: Kind) -> Row {
    const CHANNELS: usize = 500;
    const RATE: u64 = 20;
    const SECONDS: u64 = 10;
    let server = Server::start(kind, "");
    let epoch = Instant::now();
    let start = Arc::new(Barrier::new(2 * CHANNELS + 1));
    let clients: Vec<_> = (0..CHANNELS)
        .flat_map(|_| {
            let path = format!("/{}", uuid::Uuid::new_v4());
            [connect(server.addr, &path), connect(server.addr, &path)]
        })
        .enumerate()
        .map(|(n, mut ws)| {
            let start = Arc::clone(&start);
            spawn_small(move || {
                let mut got = Received::default();
                // Latencies of messages sent after the first second: without
                // what a burst of first messages costs (staps starts a
                // client's writer thread with its first message).
                let mut steady = Vec::new();
                let mut payload = vec![0u8; 128];
                start.wait();
                let warm = (epoch.elapsed() + Duration::from_secs(1)).as_nanos() as u64;
                // Spread the clients' send times over the first interval.
                let interval = Duration::from_nanos(1_000_000_000 / RATE);
                let mut next = Instant::now() + interval * (n as u32 % 50) / 50;
                let end = Instant::now() + Duration::from_secs(SECONDS);
                let mut seq = 0;
                loop {
                    let now = Instant::now();
                    if now >= next && now < end {
                        stamp(epoch, &mut payload, seq);
                        seq += 1;
                        if ws.send(Message::binary(payload.clone())).is_err() {
                            break;
                        }
                        next += interval;
                        continue;
                    }
                    if now >= end + QUIET {
                        break;
                    }
                    let wait = if now < end {
                        next - now
                    } else {
                        end + QUIET - now
                    };
                    let _ = ws
                        .get_mut()
                        .set_read_timeout(Some(wait.max(Duration::from_millis(1))));
                    match ws.read() {
                        Ok(Message::Binary(data)) => {
                            let (latency, _) = read_stamp(epoch, &data);
                            got.count += 1;
                            got.latencies.push(latency);
                            if sent_at(&data) >= warm {
                                steady.push(latency);
                            }
                        }
                        Ok(_) => {}
                        Err(tungstenite::Error::Io(e))
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
                (got, steady)
            })
        })
        .collect();
    start.wait();
    let cpu = Cpu::start(&[server.pid()]);
    let (results, steady): (Vec<Received>, Vec<Vec<u64>>) =
        clients.into_iter().map(|t| t.join().unwrap()).unzip();
    let mut steady: Vec<u64> = steady.into_iter().flatten().collect();
    steady.sort_unstable();
    let mut cpu = cpu.stop();
    cpu.wall -= QUIET.as_secs_f64();
    let delivered: u64 = results.iter().map(|r| r.count).sum();
    let lat = latencies(&results);
    let expected = (2 * CHANNELS as u64 * RATE * SECONDS) as f64;
    let mut row = vec![
        (
            "delivered/expected (%)",
            100.0 * delivered as f64 / expected,
        ),
        ("latency p50 (ms)", percentile(&lat, 0.5) / 1000.0),
        ("latency p99 (ms)", percentile(&lat, 0.99) / 1000.0),
        ("latency p99.9 (ms)", percentile(&lat, 0.999) / 1000.0),
        (
            "latency p99 after the first second (ms)",
            percentile(&steady, 0.99) / 1000.0,
        ),
        (
            "latency p99.9 after the first second (ms)",
            percentile(&steady, 0.999) / 1000.0,
        ),
    ];
    cpu_rows(&mut row, cpu, delivered as f64);
    row
}

/// A raw websocket connection: the handshake by hand, no thread, no buffer
/// beyond the kernel's, so that thousands cost the generator little.
fn raw_connect(addr: SocketAddr, path: &str) -> std::io::Result<TcpStream> {
    let mut s = tcp(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    // Peek for the end of the head, then take exactly the head: a frame that
    // follows stays in the socket (reading byte by byte made the generator
    // the bottleneck of `churn`).
    let mut buf = [0u8; 512];
    let head = loop {
        let n = s.peek(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            let mut head = vec![0u8; end + 4];
            s.read_exact(&mut head)?;
            break head;
        }
        if n == buf.len() {
            return Err(std::io::Error::other("response head too long"));
        }
        thread::yield_now();
    };
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&head).into_owned(),
        ));
    }
    Ok(s)
}

/// A masked client text frame.
fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// Read one small server frame's payload.
fn raw_read(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let mut p = vec![0u8; (h[1] & 0x7f) as usize];
    s.read_exact(&mut p)?;
    Ok(p)
}

/// A field of /proc/meminfo, in KiB: the whole machine's.
fn meminfo(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What the whole machine has given out, in KiB: memory no longer
/// available, kernel stacks, unreclaimable kernel memory (socket buffers and
/// structures, tasks), and the sum of what processes and the kernel hold
/// (anonymous pages, kernel stacks, page tables, slab), which the page
/// cache's swings (other processes' files) do not blur as they do the first.
fn machine_memory() -> [u64; 4] {
    let total = meminfo("MemTotal");
    [
        total.saturating_sub(meminfo("MemAvailable")),
        meminfo("KernelStack"),
        meminfo("SUnreclaim"),
        ["AnonPages", "KernelStack", "PageTables", "Slab"]
            .iter()
            .map(|f| meminfo(f))
            .sum(),
    ]
}

fn idle(kind: Kind, connections: usize) -> Row {
    let server = Server::start(kind, "");
    // Settle, then measure what the server holds before any client.
    let base_rss = status_field(server.pid(), "VmRSS");
    let base_machine = machine_memory();
    let started = Instant::now();
    let mut held = Vec::with_capacity(connections);
    let mut failure = None;
    for _ in 0..connections / 2 {
        let path = format!("/{}", uuid::Uuid::new_v4());
        match (
            raw_connect(server.addr, &path),
            raw_connect(server.addr, &path),
        ) {
            (Ok(a), Ok(b)) => held.extend([a, b]),
            (Err(e), _) | (_, Err(e)) => {
                failure = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failure {
        println!(
            "\nidle {connections}: the server stopped taking connections after {}: {e}",
            held.len()
        );
    }
    let connections = held.len().max(2);
    let connect_rate = connections as f64 / started.elapsed().as_secs_f64();
    // Let the server's threads settle into their idle waits (staps: its
    // clients into the event loop).
    thread::sleep(Duration::from_secs(2));
    let rss = status_field(server.pid(), "VmRSS");
    let threads = status_field(server.pid(), "Threads");
    // Messages still cross: ten pairs, spread over the connections.
    let mut crossed = 0;
    for k in 0..10 {
        let i = (k * connections / 10) & !1;
        let (a, b) = held.split_at_mut(i + 1);
        let sender = &mut a[i];
        let receiver = &mut b[0];
        let message = format!("pair {k}");
        if sender.write_all(&raw_frame(message.as_bytes())).is_ok()
            && raw_read(receiver).is_ok_and(|p| p == message.as_bytes())
        {
            crossed += 1;
        }
    }
    // A message each way on every pair: what a connection costs once it
    // has talked (buffers grown, a thread taken and given back).
    for pair in held.chunks_exact_mut(2) {
        for (from, to) in [(0, 1), (1, 0)] {
            let _ = pair[from].write_all(&raw_frame(b"both ways"));
            let _ = raw_read(&mut pair[to]);
        }
    }
    thread::sleep(Duration::from_secs(2));
    let rss_both = status_field(server.pid(), "VmRSS");
    let threads_both = status_field(server.pid(), "Threads");
    let machine = machine_memory();
    let per_connection = |now: u64, base: u64| now.saturating_sub(base) as f64 / connections as f64;
    vec![
        ("connections held", connections as f64),
        (
            "RSS per connection, before any frame (KiB)",
            per_connection(rss, base_rss),
        ),
        ("server threads, before any frame", threads as f64),
        (
            "RSS per connection, after a message each way (KiB)",
            per_connection(rss_both, base_rss),
        ),
        (
            "server threads, after a message each way",
            threads_both as f64,
        ),
        (
            "whole machine per connection, after (KiB, generator included)",
            per_connection(machine[0], base_machine[0]),
        ),
        (
            "the same, anonymous pages, kernel stacks, page tables, slab (KiB)",
            per_connection(machine[3], base_machine[3]),
        ),
        (
            "of which kernel stacks (KiB)",
            per_connection(machine[1], base_machine[1]),
        ),
        (
            "of which unreclaimable kernel memory (KiB)",
            per_connection(machine[2], base_machine[2]),
        ),
        ("server RSS at the end (MiB)", rss_both as f64 / 1024.0),
        ("connections/s", connect_rate),
        ("pairs that crossed (of 10)", crossed as f64),
    ]
}

fn churn(kind: Kind) -> Row {
    const WORKERS: usize = 16;
    const SECONDS: u64 = 5;
    let server = Server::start(kind, "");
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let trips = Arc::new(AtomicU64::new(0));
    let cpu = Cpu::start(&[server.pid()]);
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (stop, trips) = (Arc::clone(&stop), Arc::clone(&trips));
            spawn_small(move || {
                while !stop.load(Ordering::Relaxed) {
                    let path = format!("/{}", uuid::Uuid::new_v4());
                    let (Ok(mut a), Ok(mut b)) =
                        (raw_connect(addr, &path), raw_connect(addr, &path))
                    else {
                        continue;
                    };
                    if a.write_all(&raw_frame(b"hello")).is_ok() && raw_read(&mut b).is_ok() {
                        trips.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(SECONDS));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let cpu = cpu.stop();
    let trips = trips.load(Ordering::Relaxed) as f64;
    let mut row = vec![("round trips/s", trips / cpu.wall)];
    cpu_rows(&mut row, cpu, trips);
    row
}

/// HTTP publish (staps only: wsbroad has none): one keep-alive connection
/// posting 20 000 messages of 64 B to a channel with one websocket member,
/// `window` requests at a time (1: one after another, as a script does,
/// which measures the round trip more than staps).
fn http_publish(window: usize) -> Row {
    const MESSAGES: u64 = 20_000;
    let server = Server::start(Kind::Staps, "");
    let path = format!("/{}", uuid::Uuid::new_v4());
    let mut member = connect(server.addr, &path);
    let receiver = spawn_small(move || {
        let mut got = 0u64;
        while got < MESSAGES && member.read().is_ok() {
            got += 1;
        }
        got
    });
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 64\r\n\r\n{}",
        "x".repeat(64)
    );
    let batch = request.repeat(window);
    let cpu = Cpu::start(&[server.pid()]);
    let mut buf = [0u8; 16 * 1024];
    let mut answered = 0u64;
    while answered < MESSAGES {
        s.write_all(batch.as_bytes()).unwrap();
        // One answer per request; each ends with its JSON body.
        let mut got = 0;
        let mut tail = Vec::new();
        while got < window {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the connection closed");
            tail.extend_from_slice(&buf[..n]);
            got += tail.windows(2).filter(|w| *w == b"}\n").count();
            let keep = tail.len().min(1);
            tail.drain(..tail.len() - keep);
        }
        answered += window as u64;
    }
    let delivered = receiver.join().unwrap();
    let cpu = cpu.stop();
    let mut row = vec![
        ("publishes/s", answered as f64 / cpu.wall),
        (
            "lost (%)",
            100.0 * (MESSAGES - delivered) as f64 / MESSAGES as f64,
        ),
    ];
    cpu_rows(&mut row, cpu, answered as f64);
    row
}

/// Fan-out to Server-Sent Events listeners (staps only): a websocket member
/// publishes 20 000 messages of 64 B to 100 SSE listeners.
fn sse_fanout() -> Row {
    const LISTENERS: usize = 100;
    const MESSAGES: u64 = 20_000;
    let server = Server::start(Kind::Staps, "");
    let path = format!("/{}", uuid::Uuid::new_v4());
    let addr = server.addr;
    let ready = Arc::new(AtomicU64::new(0));
    let listeners: Vec<_> = (0..LISTENERS)
        .map(|_| {
            let (path, ready) = (path.clone(), Arc::clone(&ready));
            spawn_small(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(QUIET)).unwrap();
                write!(s, "GET {path}?sse HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                // Every event ends its chunk with "\n\n\r\n"; the head ends
                // with "\r\n\r\n". Count the events across reads.
                let mut buf = vec![0u8; 64 * 1024];
                let (mut tail, mut events, mut head) = (Vec::new(), 0u64, true);
                while events < MESSAGES {
                    let Ok(n) = s.read(&mut buf) else { break };
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if head {
                        let Some(end) = tail.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        tail.drain(..end + 4);
                        head = false;
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                    events += tail.windows(4).filter(|w| *w == b"\n\n\r\n").count() as u64;
                    let keep = tail.len().min(3);
                    tail.drain(..tail.len() - keep);
                }
                events
            })
        })
        .collect();
    while ready.load(Ordering::Relaxed) < LISTENERS as u64 {
        thread::sleep(Duration::from_millis(10));
    }
    let mut publisher = connect(addr, &path);
    let cpu = Cpu::start(&[server.pid()]);
    let payload = "y".repeat(64);
    for seq in 0..MESSAGES {
        publisher.write(Message::text(payload.clone())).unwrap();
        if seq % 64 == 63 {
            publisher.flush().unwrap();
        }
    }
    publisher.flush().unwrap();
    let delivered: u64 = listeners.into_iter().map(|l| l.join().unwrap()).sum();
    let mut cpu = cpu.stop();
    let expected = MESSAGES as f64 * LISTENERS as f64;
    if (delivered as f64) < expected {
        cpu.wall -= QUIET.as_secs_f64();
    }
    let mut row = vec![
        ("delivered msg/s", delivered as f64 / cpu.wall),
        ("lost (%)", 100.0 * (expected - delivered as f64) / expected),
    ];
    cpu_rows(&mut row, cpu, delivered as f64);
    row
}

fn open_fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()) as f64
}

/// `make soak` (staps only): 10 000 connections held, then 100 000
/// connect/exchange/disconnect cycles while 50 of the held pairs keep
/// exchanging numbered messages; then everything closes. Threads, descriptors
/// and RSS at each stage; the run fails if anything leaks, a stayer's message
/// is lost or reordered, or the counts do not return to the baseline.
fn soak() {
    const HELD: usize = 10_000;
    const CYCLES: u64 = 100_000;
    const STAYERS: usize = 50;
    const WORKERS: usize = 16;
    // The raw clients never answer pings: pinging would close the held ones.
    let server = Server::start(
        Kind::Staps,
        "[limits]\nmax_connections = 0\nping_interval = 0\n",
    );
    let (pid, addr) = (server.pid(), server.addr);
    let sample = |stage: &str| {
        let row = (
            status_field(pid, "Threads") as f64,
            open_fds(pid),
            status_field(pid, "VmRSS") as f64 / 1024.0,
        );
        println!("| {stage} | {} | {} | {:.1} |", row.0, row.1, row.2);
        row
    };
    println!("\n### soak: {HELD} held, {CYCLES} cycles, {STAYERS} pairs exchanging throughout\n");
    println!("| stage | threads | open fds | RSS (MiB) |\n| --- | ---: | ---: | ---: |");
    let base = sample("started");
    let mut held = Vec::with_capacity(HELD);
    for _ in 0..HELD / 2 {
        let path = format!("/{}", uuid::Uuid::new_v4());
        held.push(raw_connect(addr, &path).expect("connect a held client"));
        held.push(raw_connect(addr, &path).expect("connect a held client"));
    }
    let loaded = sample(&format!("{HELD} held"));

    let stop = Arc::new(AtomicBool::new(false));
    let stayers: Vec<TcpStream> = held.drain(..2 * STAYERS).collect();
    let stayer = {
        let stop = Arc::clone(&stop);
        spawn_small(move || {
            let mut pairs = stayers;
            let (mut sent, mut bad) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                for pair in pairs.chunks_mut(2) {
                    let message = sent.to_string();
                    pair[0]
                        .write_all(&raw_frame(message.as_bytes()))
                        .expect("stayer send");
                    let got = raw_read(&mut pair[1]).expect("stayer receive");
                    bad += u64::from(got != message.as_bytes());
                    sent += 1;
                }
            }
            (sent, bad, pairs)
        })
    };
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (next, failed) = (Arc::clone(&next), Arc::clone(&failed));
            spawn_small(move || {
                while next.fetch_add(1, Ordering::Relaxed) < CYCLES {
                    let path = format!("/{}", uuid::Uuid::new_v4());
                    let ok = match (raw_connect(addr, &path), raw_connect(addr, &path)) {
                        (Ok(mut a), Ok(mut b)) => {
                            a.write_all(&raw_frame(b"cycle")).is_ok()
                                && raw_read(&mut b).is_ok_and(|p| p == b"cycle")
                        }
                        _ => false,
                    };
                    failed.fetch_add(u64::from(!ok), Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (sent, bad, stayers) = stayer.join().unwrap();
    let cycled = sample(&format!("after {CYCLES} cycles ({took:.0} s)"));
    drop((held, stayers));
    // Cached connection threads wait 10 s for new work before they exit.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (status_field(pid, "Threads") as f64 > base.0 || open_fds(pid) > base.1)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(200));
    }
    let closed = sample("all closed, threads lingered out");
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "\ncycles: {CYCLES} in {took:.1} s ({:.0}/s), failed {failed}; stayers: {sent} \
         messages, {bad} lost or out of order",
        CYCLES as f64 / took
    );
    let leaked = closed.0 > base.0 || closed.1 > base.1;
    // With the held connections still open, cycling must not have left
    // threads or descriptors behind beyond the thread cache (64 per kind).
    let grew = cycled.1 > loaded.1 || cycled.0 > loaded.0 + 128.0;
    if failed > 0 || bad > 0 || leaked || grew {
        println!("SOAK FAILED: failed={failed} bad={bad} leaked={leaked} grew={grew}");
        std::process::exit(1);
    }
    println!("soak passed: threads and descriptors back to the baseline");
}

/// `per_instance` clients on each of `instances` instances: one publishes
/// on the first, every client of the others receives.
fn relay(instances: usize, per_instance: usize) -> Option<Row> {
    const MESSAGES: u64 = 20_000;
    const WINDOW: u64 = 256;
    if TcpStream::connect("127.0.0.1:5672").is_err() {
        println!("\nrelay: SKIPPED, no broker on 127.0.0.1:5672");
        return None;
    }
    let exchange = format!("staps-bench-{}", uuid::Uuid::new_v4());
    let config = format!("amqp = amqp://guest:guest@127.0.0.1:5672/\nexchange = {exchange}\n");
    let servers: Vec<Server> = (0..instances)
        .map(|_| Server::start(Kind::Staps, &config))
        .collect();
    let (one, others) = servers.split_first().expect("instances");
    let path = format!("/{}", uuid::Uuid::new_v4());
    let addrs: Vec<SocketAddr> = others.iter().map(|s| s.addr).collect();
    let receivers = Audience::spread(&addrs, &path, per_instance, MESSAGES);
    let _locals: Vec<Ws> = (1..per_instance)
        .map(|_| connect(one.addr, &path))
        .collect();
    let mut publisher = connect(one.addr, &path);
    // Every relay is connected and its binding in place once a probe crosses
    // to each instance.
    for addr in &addrs {
        let mut probe = connect(*addr, &path);
        probe
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            publisher.send(Message::text("probe")).unwrap();
            if let Ok(Message::Text(_)) = probe.read() {
                break;
            }
            assert!(Instant::now() < deadline, "the relay never carried a probe");
        }
    }
    receivers.go();
    let pids: Vec<u32> = servers.iter().map(Server::pid).collect();
    let cpu = Cpu::start(&pids);
    let mut payload = vec![0u8; 64];
    let n = (per_instance * others.len()) as u64;
    for seq in 0..MESSAGES {
        // A window on what has crossed: the sustained rate, not how fast the
        // relay's queue fills up and drops.
        while seq * n > receivers.progress.load(Ordering::Relaxed) + WINDOW * n {
            thread::sleep(Duration::from_micros(100));
        }
        stamp(receivers.epoch, &mut payload, seq);
        publisher.send(Message::binary(payload.clone())).unwrap();
    }
    let results = receivers.finish();
    let cpu = cpu.stop();
    let crossed: u64 = results.iter().map(|r| r.count).sum();
    let lat = latencies(&results);
    let mut row = vec![
        ("relayed msg/s", MESSAGES as f64 / cpu.wall),
        (
            "crossed/expected (%)",
            100.0 * crossed as f64 / (MESSAGES * n) as f64,
        ),
        ("latency p50 (ms)", percentile(&lat, 0.5) / 1000.0),
        ("latency p99 (ms)", percentile(&lat, 0.99) / 1000.0),
    ];
    // Per relayed message: every instance, their local deliveries included.
    cpu_rows(&mut row, cpu, MESSAGES as f64);
    Some(row)
}

/// Make room for 10 000 connections (staps' default `max_connections`)
/// where this process may: a descriptor each here and in the server (which
/// inherits the limit; the Debian package's unit sets 65 536). Nothing else
/// is raised: idle clients take no thread in staps. Returns how many
/// connections fit.
fn raise_limits() -> usize {
    const WANTED: usize = 10_000;
    let mut files = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut files);
        let want = (WANTED as u64 + 64).max(files.rlim_max);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Without CAP_SYS_RESOURCE: up to the hard limit.
            files.rlim_cur = files.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &files);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut files);
    }
    // Room for the other descriptors of both processes.
    let fit = (files.rlim_cur as usize).saturating_sub(64).min(WANTED) & !1;
    if fit < WANTED {
        println!(
            "\nNOTE: the open files limit is {} and may not be raised: {fit} connections",
            files.rlim_cur
        );
    }
    fit
}

/// Run `scenario` `runs` times against each server, alternating, fresh each
/// time, and each first in every other pair: what a run leaves behind (the
/// kernel's slab caches grown for its sockets, reused by the next) favours
/// neither.
fn compare(title: &str, runs: usize, with_wsbroad: bool, scenario: impl Fn(Kind) -> Row) {
    let (mut s, mut w) = (Vec::new(), Vec::new());
    for run in 0..runs {
        if with_wsbroad && run % 2 == 1 {
            w.push(scenario(Kind::Wsbroad));
        }
        s.push(scenario(Kind::Staps));
        if with_wsbroad && run % 2 == 0 {
            w.push(scenario(Kind::Wsbroad));
        }
    }
    table(title, &s, &w);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let names: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with('-') && a.parse::<usize>().is_err())
        .collect();
    let wanted = |name: &str| names.is_empty() || names.iter().any(|a| *a == name);
    if names.iter().any(|a| *a == "soak") {
        soak();
        return;
    }
    let with_wsbroad = wsbroad().is_some();
    if !with_wsbroad {
        println!("NOTE: wsbroad is not on the PATH (`cargo install wsbroad`); staps alone.");
    }
    println!(
        "## staps {} load run, {} cores, {}",
        env!("CARGO_PKG_VERSION"),
        thread::available_parallelism().map_or(0, |n| n.get()),
        String::from_utf8_lossy(
            &Command::new("date")
                .arg("-u")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .trim()
    );
    // staps as shipped, then with the lossless policy, which must lose nothing.
    for (size, name) in [(64, "64"), (4096, "4k")] {
        let shown = if size == 64 { "64 B" } else { "4 KiB" };
        if wanted("fanout") || wanted(&format!("fanout-{name}")) {
            compare(
                &format!("fan-out, {shown}, 1 -> 100, 20 000 messages (defaults)"),
                runs,
                with_wsbroad,
                |k| fanout(k, size, ""),
            );
        }
        if wanted("fanout") || wanted(&format!("fanout-{name}-wait")) {
            compare(
                &format!("fan-out, {shown}, 1 -> 100, 20 000 messages (slow_client = wait)"),
                runs,
                with_wsbroad,
                |k| fanout(k, size, "[limits]\nslow_client = wait\n"),
            );
        }
    }
    if wanted("many") {
        compare(
            "many channels: 500 x 2 clients, 20 msg/s of 128 B each, 10 s",
            runs,
            with_wsbroad,
            many,
        );
    }
    if wanted("idle") {
        compare("idle: 2 000 connections", runs, with_wsbroad, |k| {
            idle(k, 2_000)
        });
        let held = raise_limits();
        compare(
            &format!("idle: {held} connections"),
            runs,
            with_wsbroad,
            |k| idle(k, held),
        );
    }
    if wanted("churn") {
        compare(
            "churn: connect 2, one message, disconnect; 16 in parallel, 5 s",
            runs,
            with_wsbroad,
            churn,
        );
    }
    if wanted("http") {
        for window in [1, 32] {
            compare(
                &format!(
                    "HTTP publish: 20 000 POSTs of 64 B on one keep-alive connection, \
                     {window} at a time, one member"
                ),
                runs,
                false,
                |_| http_publish(window),
            );
        }
        compare(
            "SSE fan-out: 64 B, 1 -> 100 SSE listeners, 20 000 messages (defaults)",
            runs,
            false,
            |_| sse_fanout(),
        );
    }
    if wanted("relay") {
        for (instances, n) in [(2, 1), (2, 5), (3, 1)] {
            let rows: Vec<Row> = (0..runs.min(2))
                .filter_map(|_| relay(instances, n))
                .collect();
            if !rows.is_empty() {
                let clients = vec![n.to_string(); instances].join("+");
                table(
                    &format!(
                        "relay: {instances} instances on RabbitMQ, {clients} clients, 20 000 messages of 64 B"
                    ),
                    &rows,
                    &[],
                );
            }
        }
    }
}
