//! What staps asks of the system: files opened without following links
//! (`files`), a few libc calls (`sys`), a client's socket (`stream`),
//! systemd's notifications and sockets (`systemd`), the thread pools
//! (`threads`), and the log (`logging`). Nothing here knows of channels.

pub(crate) mod files;
pub(crate) mod logging;
pub(crate) mod stream;
pub(crate) mod sys;
pub(crate) mod systemd;
pub(crate) mod threads;
