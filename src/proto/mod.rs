//! What goes over a connection: request heads, answers and routes
//! (`http`), the query string's channel options (`query`), a client's frames
//! as they arrive (`incoming`), a server frame
//! encoded once (`frame`) in each wire format (`wire`), and the read-only
//! URLs' cipher (`twin`).

pub(crate) mod frame;
pub(crate) mod http;
pub(crate) mod incoming;
pub(crate) mod query;
pub(crate) mod twin;
pub(crate) mod wire;
