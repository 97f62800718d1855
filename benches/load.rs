//! `make bench`: a load generator that starts staps itself and measures it.
//!
//! Scenarios (all on loopback, bounded in count and time):
//! - `fanout`: one channel, 1 publisher and 100 subscribers, 20 000 messages of
//!   64 B and of 4 KiB back to back: delivered msg/s and MB/s, loss and order
//!   per subscriber, latency p50/p99, server CPU per delivery.
//! - `relay`: two instances on RabbitMQ, one channel with 1 and with 5
//!   clients on each: cross-instance msg/s, p99 latency, staps CPU (both
//!   instances, local deliveries included) per relayed message.
//!
//! Every run reports the CPU of staps, of this generator and of everything
//! else on the machine, so a noisy run shows. Usage:
//! `cargo bench --bench load -- [fanout] [relay]` (none named: all).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

const DEADLINE: Duration = Duration::from_secs(60);

/// Clock ticks per second for /proc CPU times.
fn ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the ')'.
    (get(11) + get(12)) / ticks()
}

/// Busy CPU seconds of the whole machine, from /proc/stat.
fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum::<f64>();
    busy / ticks()
}

/// CPU seconds of a process's threads, summed by thread name.
fn threads_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut by_name: Vec<(String, f64)> = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or("?", |(n, _)| n)
            .to_owned();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<f64> = after
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let cpu = (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / ticks();
        match by_name.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += cpu,
            None => by_name.push((name, cpu)),
        }
    }
    by_name.sort_by(|a, b| b.1.total_cmp(&a.1));
    by_name
}

fn own_cpu() -> f64 {
    process_cpu(std::process::id())
}

/// CPU use over an interval: staps processes, this generator, the rest.
struct Cpu {
    pids: Vec<u32>,
    staps: f64,
    own: f64,
    machine: f64,
    started: Instant,
}

impl Cpu {
    fn start(pids: &[u32]) -> Cpu {
        Cpu {
            pids: pids.to_vec(),
            staps: pids.iter().map(|p| process_cpu(*p)).sum(),
            own: own_cpu(),
            machine: machine_cpu(),
            started: Instant::now(),
        }
    }

    /// (staps, generator, others) CPU seconds, and the wall time. With
    /// STAPS_BENCH_THREADS=1, also staps' CPU by thread name (since start).
    fn stop(&self) -> (f64, f64, f64, f64) {
        if std::env::var_os("STAPS_BENCH_THREADS").is_some() {
            for pid in &self.pids {
                let threads: Vec<String> = threads_cpu(*pid)
                    .iter()
                    .map(|(n, c)| format!("{n} {c:.2}s"))
                    .collect();
                println!("  threads of {pid}: {}", threads.join(", "));
            }
        }
        let staps = self.pids.iter().map(|p| process_cpu(*p)).sum::<f64>() - self.staps;
        let own = own_cpu() - self.own;
        let machine = machine_cpu() - self.machine;
        (
            staps,
            own,
            (machine - staps - own).max(0.0),
            self.started.elapsed().as_secs_f64(),
        )
    }
}

/// A staps started for one measurement.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(config: &str) -> Server {
        let dir = std::env::temp_dir().join(format!("staps-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("staps.conf");
        std::fs::write(&conf, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_staps"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start staps");
        let mut stderr = child.stderr.take().unwrap();
        let mut log = String::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + DEADLINE;
        while !(log.contains("ready")
            && (!config.contains("amqp") || log.contains("relay: connected")))
        {
            assert!(Instant::now() < deadline, "staps did not start:\n{log}");
            let n = stderr.read(&mut buf).unwrap_or(0);
            assert!(n > 0, "staps exited:\n{log}");
            log.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        // Keep draining its stderr so it never blocks on a full pipe.
        thread::spawn(move || {
            let mut sink = [0u8; 4096];
            while matches!(stderr.read(&mut sink), Ok(n) if n > 0) {}
        });
        let addr = log
            .lines()
            .find_map(|l| l.split("listening on ").nth(1))
            .and_then(|a| a.trim().parse().ok())
            .expect("listen address");
        Server { child, addr }
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

type Ws = WebSocket<TcpStream>;

fn connect(addr: SocketAddr, path: &str) -> Ws {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{addr}{path}"), stream).expect("handshake");
    ws
}

/// Nanoseconds since `epoch`, written into the first 8 bytes of every message.
fn stamp(epoch: Instant, payload: &mut [u8], seq: u64) {
    let now = epoch.elapsed().as_nanos() as u64;
    payload[..8].copy_from_slice(&now.to_be_bytes());
    payload[8..16].copy_from_slice(&seq.to_be_bytes());
}

fn read_stamp(epoch: Instant, payload: &[u8]) -> (u64, u64) {
    let sent = u64::from_be_bytes(payload[..8].try_into().unwrap());
    let seq = u64::from_be_bytes(payload[8..16].try_into().unwrap());
    (epoch.elapsed().as_nanos() as u64 - sent, seq)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// What one receiver saw.
struct Received {
    count: u64,
    out_of_order: u64,
    latencies: Vec<u64>,
}

/// Read `expected` binary messages (or until the deadline), checking order.
fn receive(mut ws: Ws, epoch: Instant, expected: u64, progress: Arc<AtomicU64>) -> Received {
    let mut r = Received {
        count: 0,
        out_of_order: 0,
        latencies: Vec::with_capacity(expected as usize),
    };
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
            Err(_) => break,
        }
    }
    r
}

fn report_cpu(what: &str, cpu: (f64, f64, f64, f64), units: f64, unit: &str) {
    let (staps, own, others, wall) = cpu;
    println!(
        "  {what}: staps CPU {:.2} s ({:.0}% of a core), {:.0} ns per {unit}; generator {:.2} s; others {:.2} s; wall {:.2} s",
        staps,
        100.0 * staps / wall,
        staps * 1e9 / units,
        own,
        others,
        wall
    );
}

fn fanout(size: usize) {
    const SUBSCRIBERS: usize = 100;
    const MESSAGES: u64 = 20_000;
    // Room for the whole burst, so that loss would be staps' doing.
    let server = Server::start(&format!(
        "[staps]\nlisten = 127.0.0.1:0\n[limits]\nqueue_length = {MESSAGES}\nmax_clients_per_channel = 0\n"
    ));
    let path = format!("/{}", uuid::Uuid::new_v4());
    let epoch = Instant::now();
    let progress = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(SUBSCRIBERS + 1));
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            let ws = connect(server.addr, &path);
            let (progress, barrier) = (Arc::clone(&progress), Arc::clone(&barrier));
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    barrier.wait();
                    receive(ws, epoch, MESSAGES, progress)
                })
                .unwrap()
        })
        .collect();
    let mut publisher = connect(server.addr, &path);
    barrier.wait();
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
    let results: Vec<Received> = subscribers.into_iter().map(|t| t.join().unwrap()).collect();
    let cpu = cpu.stop();
    let delivered: u64 = results.iter().map(|r| r.count).sum();
    let disorder: u64 = results.iter().map(|r| r.out_of_order).sum();
    let mut lat: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    lat.sort_unstable();
    let expected = MESSAGES * SUBSCRIBERS as u64;
    println!(
        "fanout {size} B: {delivered}/{expected} delivered, {disorder} out of order, {:.0} msg/s, {:.1} MB/s, latency p50 {:.0} µs p99 {:.0} µs",
        delivered as f64 / cpu.3,
        delivered as f64 * size as f64 / cpu.3 / 1e6,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    );
    report_cpu("fanout", cpu, delivered as f64, "delivery");
}

/// `per_instance` clients on each of two instances: one publishes on the
/// first, all of the second's receive.
fn relay(per_instance: usize) {
    const MESSAGES: u64 = 20_000;
    const WINDOW: u64 = 256;
    let exchange = format!("staps-bench-{}", uuid::Uuid::new_v4());
    let config = format!(
        "[staps]\nlisten = 127.0.0.1:0\namqp = amqp://guest:guest@127.0.0.1:5672/\nexchange = {exchange}\n"
    );
    if TcpStream::connect("127.0.0.1:5672").is_err() {
        println!("relay: SKIPPED, no broker on 127.0.0.1:5672");
        return;
    }
    let one = Server::start(&config);
    let two = Server::start(&config);
    let path = format!("/{}", uuid::Uuid::new_v4());
    let epoch = Instant::now();
    // Receivers on instance two; the publisher and the rest on instance one.
    let progress = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(per_instance + 1));
    let receivers: Vec<_> = (0..per_instance)
        .map(|_| {
            let ws = connect(two.addr, &path);
            let (progress, barrier) = (Arc::clone(&progress), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                receive(ws, epoch, MESSAGES, progress)
            })
        })
        .collect();
    let _locals: Vec<Ws> = (1..per_instance)
        .map(|_| connect(one.addr, &path))
        .collect();
    let mut publisher = connect(one.addr, &path);
    // Wait until the binding is in place: a probe crosses over.
    let mut probe = connect(two.addr, &path);
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
    drop(probe);
    // The receivers' queues hold the probes; they skip text.
    barrier.wait();
    let cpu = Cpu::start(&[one.pid(), two.pid()]);
    let mut payload = vec![0u8; 64];
    let receivers_total = per_instance as u64;
    for seq in 0..MESSAGES {
        // A window on what has crossed, so that the measure is the sustained
        // rate, not how fast the relay's queue fills and drops.
        while seq * receivers_total > progress.load(Ordering::Relaxed) + WINDOW * receivers_total {
            // Sleep, not spin: on two cores a spinning generator would take
            // the CPU that staps and the broker need.
            thread::sleep(Duration::from_micros(100));
        }
        stamp(epoch, &mut payload, seq);
        publisher.send(Message::binary(payload.clone())).unwrap();
    }
    let results: Vec<Received> = receivers.into_iter().map(|t| t.join().unwrap()).collect();
    let cpu = cpu.stop();
    let crossed: u64 = results.iter().map(|r| r.count).sum();
    let mut lat: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    lat.sort_unstable();
    println!(
        "relay 64 B, {per_instance}+{per_instance} clients: {crossed}/{} crossed, {:.0} relayed msg/s, latency p50 {:.0} µs p99 {:.0} µs",
        MESSAGES * receivers_total,
        MESSAGES as f64 / cpu.3,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    );
    report_cpu("relay", cpu, MESSAGES as f64, "relayed message");
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    println!(
        "staps load generator, {} cores",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    if wanted("fanout") {
        fanout(64);
        fanout(4096);
    }
    if wanted("relay") {
        relay(1);
        relay(5);
    }
}
