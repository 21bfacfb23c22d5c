//! hikkoshi moves a live PostgreSQL database to another server. The modules follow the pipeline in
//! DESIGN.md: `check` → `plan` → `schema` → `copy` → `stream` → `cutover`, with `state` kept in the target.

pub mod catalog;
pub mod check;
pub mod clean;
pub mod clone;
pub mod conninfo;
pub mod copy;
pub mod cutover;
pub mod demo;
pub mod error;
pub mod failpoint;
pub mod ident;
pub mod localserver;
pub mod lsn;
pub mod monitor;
pub mod plan;
pub mod progress;
pub mod rehearse;
pub mod replication;
pub mod schema;
pub mod sequence;
pub mod session;
pub mod state;
pub mod status;
pub mod stream;
pub mod tls;
pub mod verify;

pub use error::{Error, Side};
