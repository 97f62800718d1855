//! HTTP as staps speaks it: the request head, what a request gets (usage
//! page, error, `?stats`, a publish, a stream, a websocket upgrade), and the
//! answers. Text in, text out: the connection that carries it, with a
//! publish's body and a kept-alive connection's next request, is
//! `conn::http`.
//!
//! tungstenite's server handshake never shows us a request that is not an
//! upgrade, so the head is read and parsed here (httparse); only a valid upgrade
//! goes on to tungstenite, with whatever bytes followed the head.
//!
//! # The parts
//!
//! - [`head`]: the request head, read and parsed;
//! - [`route`]: what a request gets, and the checks behind it;
//! - [`response`]: the answers;
//! - [`usage`]: the usage page.

mod head;
mod response;
mod route;
mod usage;

pub use self::head::*;
pub(crate) use self::response::*;
pub use self::route::*;
