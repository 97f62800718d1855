//! A connection's threads: the state they all share (`server`), an HTTP
//! publish's body (`publish`), and a member's reader, from its handshake on
//! (`client`).

pub(crate) mod client;
pub(crate) mod publish;
pub(crate) mod server;
