//! A connection's threads: the state they all share (`server`), the HTTP
//! server of a connection, its requests and publishes (`http`), and a
//! member's life from its join on: its reader, resting, closing (`client`).

pub(crate) mod client;
pub(crate) mod http;
pub(crate) mod server;
