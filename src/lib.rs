//! staps: Simple Throw-Away Publish/Subscribe.
//!
//! Websocket clients that connect to the same URL path form a channel; each
//! message one of them sends goes to all the others. The daemon (`main.rs`)
//! wires these modules together. The crate is a library too so that the fuzz
//! targets (`fuzz/`) reach the parsers the daemon runs on what the network and
//! files give it.
//!
//! # Layers
//!
//! The folders of `src/` are the layers: a module uses only modules of the
//! folders below its own, and of its own folder those listed below it
//! (`tests/layers.rs` checks it), so they read bottom to top:
//!
//! ```text
//!  run.rs      wiring only (`main.rs` calls it)
//!  process/    the process
//!     signals     SIGTERM, SIGHUP, SIGUSR1
//!     event_loop  every socket that only waits, on one thread
//!     metrics     /metrics and /healthz
//!     shutdown    stopping, and the files on disk removed in one place
//!     listener    listening sockets, the metrics listener's accept loop
//!     relay       the broker thread (amiquip stays in here)
//!     detach      detaching, privileges, the pid file
//!     secret      the secret of read-only URLs, read or made
//!  conn/       a connection's threads
//!     http        the HTTP server of a connection: its requests one after
//!                 another, a publish's body
//!     client      a member, from its join on: reader, resting, closing
//!     server      the state every thread shares: settings, registry,
//!                 counters, thread pools, the link to the relay
//!  hub/        the channels
//!     link        the relay's queue and state, as the rest holds them
//!     channels    the registry and the fan-out
//!     peer        a member as others see it: who writes to its socket,
//!                 closing; its queue, gathered sends, writer and batches
//!  proto/      what goes over a connection
//!     http        request heads, answers, routes
//!     wire        a message as websocket frame, SSE event or raw chunk
//!     frame       a server frame, encoded once and shared
//!     incoming    a client's partial message, frame header by header
//!     query       a request's query string, the channel options in it
//!     twin        the read-only URLs' cipher
//!  config/     the settings
//!     resolve     users, groups and systemd's sockets, looked up once
//!     (mod.rs)    INI files and the command line, parsed and checked
//!     amqp_url    AMQP URLs
//!     cli address percent    the command line, client addresses, %XX
//!  memory/     budget (the memory budget and its cache), stats (counters)
//!  os/         logging, and below it: files sys stream systemd threads
//! ```
//!
//! # A message's way
//!
//! The `event_loop` accepts a connection on a `listener`, reads its
//! request head as it arrives, and gives it a reader thread once the head
//! is complete; the reader answers it (`conn::http`, with the heads and
//! routes of `proto::http`) and joins the channel in
//! the registry (`channels`), the client address (`address`) counted
//! against its limits (`server`). The reader (`client`) gets each message
//! whole from tungstenite, its bytes passed through `incoming` (large
//! frames split, the memory budget charged as they arrive: `budget`),
//! encodes it once into a `frame::Frame`, and
//! publishes it: a reference goes to every other member (`peer`), and
//! onto the `link` to the `relay` thread, which publishes it to the
//! broker. Before it waits for its client again, the reader sends what it
//! published to each receiver that keeps up, with one non-blocking send;
//! a receiver whose socket is full gets a writer thread that drains its
//! queue with vectored writes until the backlog is gone. Messages from the
//! broker take the same way from the relay thread onwards, and so does the
//! body of an HTTP `POST` (`conn::http`). A receiver that is an HTTP streaming
//! listener gets each message in its format (`wire`: a Server-Sent Event or
//! a raw chunk), encoded once for all such listeners of the channel.

// Everything is crate-private but what the fuzz targets reach (`fuzz`):
// a `pub` that nothing outside can reach is a lie about the crate's surface.
#![warn(unreachable_pub)]

mod config;
mod conn;
mod hub;
mod memory;
mod os;
mod process;
mod proto;
mod run;

pub use run::run;

/// What the fuzz targets (`fuzz/`) reach: the parsers staps runs on what the
/// network and files give it. Not an interface.
#[doc(hidden)]
pub mod fuzz {
    pub use crate::config::resolve::resolve;
    pub use crate::config::{Settings, from_text};
    pub use crate::conn::client::{Event, next_event, websocket};
    pub use crate::memory::budget::BUDGET;
    pub use crate::proto::frame::Kind;
    pub use crate::proto::http::{Length, Route, decode_path, is_uuid4_path, parse_head, route};
    pub use crate::proto::incoming::{Incoming, MinRate, Reframed, Source};
    pub use crate::proto::twin::{Access, SECRET_LEN, Twins};
}
