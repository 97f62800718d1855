//! A real browser for the tests: headless Chromium, a page served from an
//! origin of its own that reports what it sees, and a TCP proxy whose
//! connections can be cut, as a flaky network would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::DEADLINE;

/// Headless Chromium with its profile in `profile`, and the flags that
/// keep it off the network (closed here).
pub fn headless_chromium(profile: &Path) -> Command {
    let mut chromium = Command::new("chromium");
    chromium
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    chromium
}

/// A page on an origin of its own, open in headless Chromium: what the
/// page reports (`fetch('/report?' + encodeURIComponent(what))`) arrives
/// on `reports`. The browser is killed when this is dropped.
pub struct Page {
    browser: Child,
    reports: Receiver<String>,
    seen: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Page {
    /// Serve `html` at `/page` of a new origin and open it.
    pub fn open(html: String) -> Page {
        let origin = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/page", origin.local_addr().unwrap());
        let (tx, reports) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for stream in origin.incoming() {
                let Ok(mut stream) = stream else { continue };
                stream.set_read_timeout(Some(DEADLINE)).unwrap();
                // Chromium also opens sockets it closes unused: skip them.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                let (status, body) = if target == "/page" {
                    ("200 OK", html.clone())
                } else if let Some(what) = target.strip_prefix("/report?") {
                    let _ = tx.send(percent_decoded(what));
                    ("200 OK", String::new())
                } else {
                    ("404 Not Found", String::new())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let profile = tempfile::tempdir().unwrap();
        let browser = headless_chromium(profile.path())
            .arg(&url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run chromium");
        Page {
            browser,
            reports,
            seen: Vec::new(),
            _profile: profile,
        }
    }

    /// Wait until what the page reported makes `done` true; false if it
    /// did not within [`DEADLINE`].
    pub fn wait(&mut self, done: impl Fn(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + DEADLINE;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(report) => self.seen.push(report),
                Err(_) => return false,
            }
        }
        true
    }

    /// Wait until the page has reported `what`; false if it did not
    /// within [`DEADLINE`].
    pub fn wait_for(&mut self, what: &str) -> bool {
        self.wait(|seen| seen.iter().any(|s| s == what))
    }

    /// Everything it reported so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        let _ = self.browser.kill();
        let _ = self.browser.wait();
    }
}

/// `%XX` decoded (what `encodeURIComponent` made).
fn percent_decoded(s: &str) -> String {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TCP proxy to a target: [`Proxy::cut`] breaks every connection through
/// it and holds new ones until [`Proxy::mend`].
pub struct Proxy {
    addr: SocketAddr,
    open: Arc<(Mutex<bool>, Condvar)>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn to(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new((Mutex::new(true), Condvar::new()));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (gate, held) = (Arc::clone(&open), Arc::clone(&conns));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                // Held, not refused, while the network is cut.
                let (lock, cvar) = &*gate;
                let _open = cvar
                    .wait_while(lock.lock().unwrap(), |open| !*open)
                    .unwrap();
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut conns = held.lock().unwrap();
                conns.push(client.try_clone().unwrap());
                conns.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Proxy { addr, open, conns }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Break every connection, and hold new ones.
    pub fn cut(&self) {
        *self.open.0.lock().unwrap() = false;
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Let connections through again, the held ones first.
    pub fn mend(&self) {
        *self.open.0.lock().unwrap() = true;
        self.open.1.notify_all();
    }
}
