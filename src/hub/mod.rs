//! The channels: a member's queue, who writes to its socket and closing
//! (`peer`), the registry and the fan-out (`channels`), and the relay's
//! queue as the rest holds it (`link`).

pub(crate) mod channels;
pub(crate) mod link;
pub(crate) mod peer;
