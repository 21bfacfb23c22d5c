//! The error a hikkoshi command ends with: what failed, where, what to do, and which exit status it gives.
//!
//! Exit status (DESIGN.md): 1 when the operation found a problem (a blocker, a mismatch, a failed step),
//! 2 for usage and connection errors.

use std::fmt;

use crate::conninfo::ConnInfoError;
use crate::ident::QualifiedName;
use crate::replication::ReplicationError;
use crate::schema::SchemaError;

/// Which server an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// What a caller can do about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Bad arguments or connection settings: fix the command line.
    Usage,
    /// A server could not be reached or refused the login.
    Connection,
    /// Passing (a restart, a dropped connection): running the command again resumes.
    Transient,
    /// Needs a decision or a fix by the operator before running again.
    Definite,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the {side} connection string is not valid")]
    ConnInfo {
        side: Side,
        #[source]
        source: ConnInfoError,
    },
    #[error("cannot connect to the {side} ({endpoint})")]
    Connect {
        side: Side,
        endpoint: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the TLS settings for the {side} cannot be used")]
    Tls {
        side: Side,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("cannot connect to the {side} ({endpoint}): no answer within {secs} s")]
    ConnectTimeout {
        side: Side,
        endpoint: String,
        secs: u64,
    },
    #[error("{what} (on the {side})")]
    Sql {
        side: Side,
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what} (replication connection to the source)")]
    Replication {
        what: String,
        #[source]
        source: ReplicationError,
    },
    #[error("copying {table} chunk {chunk} failed")]
    Copy {
        table: QualifiedName,
        chunk: i32,
        side: Side,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("schema step failed")]
    Schema(#[from] SchemaError),
    #[error("{0}")]
    Usage(String),
    /// A precondition that stops the run before anything is created; the message carries the fix.
    #[error("{0}")]
    Blocked(String),
    /// A table was truncated or rewritten on the source after the copy's snapshot: a new snapshot copies it.
    #[error(
        "{0} was truncated or rewritten on the source after the copy's snapshot was taken, so that snapshot \
         cannot copy it"
    )]
    Rewritten(QualifiedName),
    /// A connection stopped answering without closing (a network partition, a stalled proxy).
    #[error("{0}")]
    Stalled(String),
    /// SIGINT or SIGTERM arrived before the work was done.
    #[error("interrupted before the clone was complete")]
    Interrupted,
}

impl Error {
    pub fn sql(side: Side, what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let what = what.into();
        move |source| Error::Sql { side, what, source }
    }

    pub fn replication(what: impl Into<String>) -> impl FnOnce(ReplicationError) -> Error {
        let what = what.into();
        move |source| Error::Replication { what, source }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Error::ConnInfo { .. } | Error::Usage(_) | Error::Tls { .. } => Kind::Usage,
            Error::Connect { .. } | Error::ConnectTimeout { .. } => Kind::Connection,
            Error::Replication { source, .. } => match source {
                ReplicationError::Connect { .. }
                | ReplicationError::Timeout { .. }
                | ReplicationError::PasswordMissing
                | ReplicationError::UnsupportedAuth(_)
                | ReplicationError::TlsRefused(_)
                | ReplicationError::TlsHandshake { .. }
                | ReplicationError::TlsSetup(_) => Kind::Connection,
                ReplicationError::Server { code, .. } if code.starts_with("28") => Kind::Connection,
                // the slot is still held by the session of a process that just died: it is let go soon
                ReplicationError::Server { code, .. } if code == "55006" => Kind::Transient,
                ReplicationError::Io(_) => Kind::Transient,
                _ => Kind::Definite,
            },
            Error::Sql { source, .. } | Error::Copy { source, .. } => classify(source),
            Error::Schema(_) | Error::Blocked(_) => Kind::Definite,
            Error::Interrupted | Error::Stalled(_) | Error::Rewritten(_) => Kind::Transient,
        }
    }

    /// Whether trying the same step again shortly may succeed without anyone changing anything: a server
    /// restarting or a dropped connection, but not a refused password, certificate or TLS setting, which
    /// only a person can fix (retrying those only delays the error).
    pub fn retryable(&self) -> bool {
        match self {
            Error::Connect { source, .. } => connection_may_come_back(source),
            Error::ConnectTimeout { .. } => true,
            Error::Replication { source, .. } => match source {
                ReplicationError::Connect { .. }
                | ReplicationError::Timeout { .. }
                | ReplicationError::Io(_) => true,
                ReplicationError::Server { code, .. } => {
                    code == "55006" || code.starts_with("57P") || code.starts_with("53")
                }
                _ => false,
            },
            Error::Blocked(_) => false,
            e => e.kind() == Kind::Transient,
        }
    }

    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self.kind() {
            Kind::Usage | Kind::Connection => 2,
            Kind::Transient | Kind::Definite => 1,
        }
    }

    /// What the user should do next.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Connect {
                side,
                endpoint,
                source,
            } => Some(connect_hint(*side, endpoint, source)),
            Error::ConnectTimeout { side, .. } => Some(format!(
                "check the host, the port and any firewall or security group between here and the {side} \
                 (connect_timeout=N in the URL sets the wait)"
            )),
            Error::Replication { source, .. } => match source {
                ReplicationError::Server { code, hint, .. } => Some(match code.as_str() {
                    "42501" => "the source role needs the REPLICATION attribute (ALTER ROLE ... REPLICATION; \
                         on Amazon RDS: GRANT rds_replication TO ...)"
                        .into(),
                    "55000" => "logical decoding needs wal_level = logical on the source \
                         (ALTER SYSTEM SET wal_level = logical, then restart; on RDS set \
                         rds.logical_replication = 1 in the parameter group)"
                        .into(),
                    "53400" => "all replication slots are in use: raise max_replication_slots on the source \
                         or drop unused slots (SELECT pg_drop_replication_slot(slot_name) FROM \
                         pg_replication_slots WHERE NOT active)"
                        .into(),
                    c if c.starts_with("28") => {
                        "check the user, the password and pg_hba.conf on the source (a `replication` line \
                         is not needed for logical replication, but the database line must allow the user)"
                            .into()
                    }
                    _ => hint.clone().unwrap_or_else(|| "run the same command again to retry".into()),
                }),
                ReplicationError::Connect { .. } | ReplicationError::Timeout { .. } => {
                    Some("check that the source is running and reachable from this machine".into())
                }
                ReplicationError::PasswordMissing => Some(
                    "give the password in the URL, in PGPASSWORD or in ~/.pgpass".into(),
                ),
                ReplicationError::Io(_) => {
                    Some("the connection dropped: run the same command again to resume".into())
                }
                _ => None,
            },
            Error::Rewritten(_) => Some(
                "the copy resumes by itself in a new snapshot; run the same command again if it stopped"
                    .into(),
            ),
            Error::Stalled(_) => Some(
                "check the network between here and both servers; run the same command again to resume"
                    .into(),
            ),
            Error::Interrupted => Some(
                "what is copied is kept: run the same command again to resume where it stopped".into(),
            ),
            Error::Copy { table, chunk, .. } => Some(format!(
                "the chunk was rolled back on the target; fix the cause and run the same command again: \
                 it resumes with {table} chunk {chunk} and copies nothing twice"
            )),
            Error::Schema(SchemaError::Failed { hint, .. }) if !hint.is_empty() => {
                Some(hint.to_string())
            }
            Error::Sql { source, .. } if classify(source) == Kind::Transient => Some(
                "the server restarted or the connection dropped: run the same command again to resume"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// Sorts a server error by its SQLSTATE class: connection and resource troubles pass, the rest stay.
fn classify(e: &tokio_postgres::Error) -> Kind {
    match e.code() {
        None => Kind::Transient, // no SQLSTATE: the connection itself failed
        Some(code) => {
            let c = code.code();
            if c.starts_with("08") // connection exception
                || c.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                || c.starts_with("53") // insufficient resources
                || c == "40001"
                || c == "40P01"
            {
                Kind::Transient
            } else if c.starts_with("28") || c == "3D000" {
                Kind::Connection
            } else {
                Kind::Definite
            }
        }
    }
}

/// A failed connection attempt that a restart or a network blip explains: the server refusing or
/// dropping the connection, or saying it is starting or shutting down; not a TLS failure or a refusal of the
/// credentials or the database.
fn connection_may_come_back(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let c = db.code().code();
        return c.starts_with("57P") || c.starts_with("53") || c.starts_with("08");
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | BrokenPipe
                    | UnexpectedEof
                    | TimedOut
                    | HostUnreachable
                    | NetworkUnreachable
                    | AddrNotAvailable
            );
        }
        cause = c.source();
    }
    e.is_closed()
}

fn connect_hint(side: Side, endpoint: &str, e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.code().code() {
            "28P01" => format!(
                "the password was refused for {endpoint}: check the password in the {side} URL, \
                 PGPASSWORD or ~/.pgpass"
            ),
            "28000" => format!(
                "the {side} server refused this user or host: check pg_hba.conf and the user name"
            ),
            "3D000" => format!(
                "the database does not exist on the {side}: create it first (createdb, or CREATE DATABASE)"
            ),
            "53300" => {
                format!("the {side} has no free connection slots: raise max_connections or retry")
            }
            "57P03" => format!("the {side} is starting up or shutting down: retry in a moment"),
            _ => format!("the {side} refused the connection: {}", db.message()),
        };
    }
    let full = chain(e);
    if full.contains("TLS") || full.contains("certificate") {
        return if full.contains("does not support TLS") {
            format!(
                "the {side} does not accept TLS, and the sslmode asks for it: enable ssl on the server, or \
                 use sslmode=prefer on a network you trust (hikkoshi never downgrades on its own)"
            )
        } else {
            format!(
                "the {side}'s TLS certificate was refused: check that sslrootcert names the CA that signed \
                 it and, with sslmode=verify-full, that the host name in the URL is one the certificate \
                 lists. hikkoshi did not fall back to an unverified connection"
            )
        };
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => format!(
                    "nothing listens at {endpoint}: check the {side} host and port, and that the server runs"
                ),
                std::io::ErrorKind::TimedOut => format!(
                    "{endpoint} did not answer in time: check the host, the port and any firewall or \
                     security group between here and the {side} (connect_timeout=N sets the wait)"
                ),
                _ => format!(
                    "check the {side} host name and that it is reachable from this machine ({io})"
                ),
            };
        }
        cause = c.source();
    }
    let text = e.to_string();
    if text.contains("timeout") || text.contains("timed out") {
        format!(
            "{endpoint} did not answer in time: check the host, the port and any firewall between here and \
             the {side} (connect_timeout=N sets the wait)"
        )
    } else {
        format!("check the {side} host name, port and that the server is reachable")
    }
}

/// The error and its causes on one line (for log lines).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let line = c.to_string();
        if line != "db error" {
            out.push_str(": ");
            out.push_str(&line);
        }
        cause = c.source();
    }
    out
}
