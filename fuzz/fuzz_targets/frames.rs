//! What a client sends after its handshake, as the reader thread reads it:
//! through staps' reframing (large frames split, the memory budget charged
//! as bytes arrive) into tungstenite with staps' limits, then staps'
//! handling of each result (the frame it publishes, the pong it queues, the
//! close code it answers). Whatever the bytes, every byte counted in the
//! budget is given back.
#![no_main]

use std::io::{self, Read};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use staps::fuzz::{self as client, BUDGET, Event, Incoming, Kind, MinRate, Reframed, Source};

/// The client's bytes, handed out in chunks of the size the input's first
/// byte says, so that frames split across reads are explored too.
struct Input<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Input<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl Source for Input<'_> {}

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else {
        return;
    };
    // A budget small enough that large frames meet its limit too.
    BUDGET.set_limit(1 << 17);
    let before = BUDGET.used();
    let input = Reframed {
        incoming: Box::new(Incoming::new(
            1 << 16,
            MinRate {
                period: Duration::from_secs(3600),
                min_rate: 0,
            },
            &BUDGET,
            None,
            first & 0x80 != 0,
        )),
        inner: Input {
            data,
            chunk: usize::from(first % 16) + 1,
        },
    };
    let mut ws = client::websocket(input, Vec::new(), 1 << 16);
    run(&mut ws, data.len());
    drop(ws);
    assert_eq!(BUDGET.used(), before, "bytes counted and never given back");
});

fn run(ws: &mut tungstenite::WebSocket<Reframed<Input<'_>>>, len: usize) {
    // Every read consumes input or ends the connection; the bound is a guard.
    for _ in 0..=len + 1 {
        match client::next_event(ws.read(), 0) {
            Event::Message(frame) => {
                let payload = frame.payload();
                assert!(payload.len() <= 1 << 16);
                if frame.kind() == Kind::Text {
                    assert!(std::str::from_utf8(payload).is_ok());
                }
            }
            Event::Ping(pong) => assert!(pong.payload().len() <= 125),
            Event::Nothing | Event::Quiet => {}
            Event::End(close) => {
                assert!(!close.send || close.code == 0 || (1000..5000).contains(&close.code));
                return;
            }
        }
    }
    panic!("the reader neither ended nor consumed its input");
}
