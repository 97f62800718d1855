//! What the process holds and counts: the memory budget and its cache
//! (`budget`), and the counters (`stats`).

pub(crate) mod budget;
pub(crate) mod stats;
