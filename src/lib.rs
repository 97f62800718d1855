//! staps: Simple Throw-Away Publish/Subscribe.
//!
//! Websocket clients that connect to the same URL path form a channel; each
//! message one of them sends goes to all the others. The daemon (`main.rs`)
//! wires these modules together; a message's way through them is told in
//! [`client`]. The crate is a library too so that the fuzz targets (`fuzz/`)
//! reach the parsers the daemon runs on what the network and files give it.

pub mod amqp_url;
pub mod budget;
pub mod channels;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod files;
pub mod frame;
pub mod http;
pub mod incoming;
pub mod link;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod resolve;
pub mod server;
pub mod shutdown;
pub mod signals;
pub mod stats;
pub mod stream;
pub mod sys;
pub mod systemd;
pub mod threads;
