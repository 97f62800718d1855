//! A websocket client that sends back every message it receives, unchanged
//! (text stays text, binary stays binary).
//!
//! staps never echoes a message to its sender, so a protocol test suite that
//! expects an echo server (Autobahn|Testsuite) is pointed at a channel with
//! this client on it: what the suite sends reaches the mirror through staps,
//! and comes back through staps. `make conformance` runs it.
//!
//! Usage: `cargo run --release --example mirror -- ws://127.0.0.1:9001/a ws://127.0.0.1:9001/b`
//! (one connection per URL, each mirroring its own channel).

use std::process::ExitCode;
use std::thread;

use tungstenite::Message;
use tungstenite::protocol::WebSocketConfig;

fn main() -> ExitCode {
    let urls: Vec<String> = std::env::args().skip(1).collect();
    if urls.is_empty() {
        eprintln!("usage: mirror ws://HOST:PORT/PATH...");
        return ExitCode::from(64);
    }
    // One connection per channel, each connected before any is served, so that
    // "on N channels" means they are all there.
    let mut sockets = Vec::new();
    for url in &urls {
        match connect(url) {
            Ok(ws) => sockets.push((url.clone(), ws)),
            Err(e) => {
                eprintln!("mirror: cannot connect to {url}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("mirror: on {} channel(s)", sockets.len());
    let threads: Vec<_> = sockets
        .into_iter()
        .map(|(url, ws)| {
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || mirror(&url, ws))
        })
        .collect();
    // Runs until stopped; a channel whose connection ends says so on stderr.
    for t in threads {
        match t {
            Ok(t) => {
                let _ = t.join();
            }
            Err(e) => {
                eprintln!("mirror: cannot start a thread: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

fn connect(url: &str) -> tungstenite::Result<Ws> {
    // Autobahn's largest messages are 16 MiB.
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, _) = tungstenite::client::connect_with_config(url, Some(config), 3)?;
    if let tungstenite::stream::MaybeTlsStream::Plain(tcp) = ws.get_ref() {
        tcp.set_nodelay(true)?;
    }
    Ok(ws)
}

/// Send back every message until the connection ends.
fn mirror(url: &str, mut ws: Ws) {
    let mut mirrored: u64 = 0;
    loop {
        let reply = match ws.read() {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => m,
            Ok(Message::Close(frame)) => {
                eprintln!(
                    "mirror: {url} closed by the server ({frame:?}) after {mirrored} messages"
                );
                return;
            }
            Ok(_) => continue,
            Err(e) => {
                eprintln!("mirror: {url}: {e} after {mirrored} messages");
                return;
            }
        };
        if let Err(e) = ws.send(reply) {
            eprintln!("mirror: {url}: {e} after {mirrored} messages");
            return;
        }
        mirrored += 1;
    }
}
