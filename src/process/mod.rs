//! The process: the listening sockets (`listener`) and the event loop
//! that keeps every waiting socket (`event_loop`), the broker thread
//! (`relay`), detaching and privileges (`detach`), the secret of read-only
//! URLs (`secret`), `/metrics` (`metrics`), stopping (`shutdown`) and
//! signals (`signals`).

pub(crate) mod detach;
pub(crate) mod event_loop;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod relay;
pub(crate) mod secret;
pub(crate) mod shutdown;
pub(crate) mod signals;
