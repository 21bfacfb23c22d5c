//! hikkoshi's integration tests, one binary: each module is a command or a concern, run on real PostgreSQL
//! servers through the harness in `common`.

mod common;

mod check;
mod clone;
mod cutover;
mod ddl;
mod demo;
mod deploy;
mod errors;
mod faults;
mod fence;
mod follow;
mod image;
mod logins;
mod monitor;
mod pgbouncer;
mod regression;
mod rehearse;
mod resume;
mod soak;
mod tls;
mod unstreamed;
mod verify;
mod versions;
