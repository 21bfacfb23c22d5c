//! Streaming changes from the source: the pgoutput decoder, the replication stream around it, and the
//! applier that writes each source transaction to the target exactly once.

pub mod apply;
pub mod confirm;
pub mod ddl;
pub mod fold;
pub mod follow;
pub mod names;
pub mod pgoutput;
mod session;
