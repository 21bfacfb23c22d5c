//! The replication side of the source: a replication-mode connection and the slots made on it.

pub mod conn;
pub mod slot;

pub use conn::{ReplicationConn, ReplicationError};
pub use slot::{ExportedSnapshot, create_with_snapshot};
