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
    /// A chunk that no retry can copy: a server refused its data (a value, a type, a constraint).
    #[error(
        "copying {table} chunk {chunk} failed: the {side} refused it{}",
        column.as_ref().map(|(c, t)| format!(" at column {c}, of type {t} on the source")).unwrap_or_default()
    )]
    CopyRefused {
        table: QualifiedName,
        chunk: i32,
        side: Side,
        /// The column PostgreSQL named in the error's context, with its type.
        column: Option<(String, String)>,
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
    /// Another hikkoshi process holds the migration lock (the message names the migration and what to do).
    #[error("{0}")]
    Locked(String),
    /// A message of the replication stream could not be decoded.
    #[error("undecodable message from the source at {at}")]
    Decode {
        at: crate::lsn::Lsn,
        #[source]
        source: crate::stream::pgoutput::DecodeError,
    },
    /// The stream's replication slot is gone or invalidated: the stream cannot continue.
    #[error("{0}")]
    SlotLost(String),
    /// The applier refused a change (the target drifted, the schema changed): the message carries the fix.
    #[error(transparent)]
    Apply(crate::stream::apply::ApplyError),
}

/// What a caller does about an error, decided in one place (`Error::policy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub kind: Kind,
    /// Whether trying the same step again shortly may succeed without anyone changing anything: a server
    /// restarting or a dropped connection, but not a refused password, certificate or TLS setting, which
    /// only a person can fix (retrying those only delays the error).
    pub retry: bool,
    /// What the user should do next.
    pub hint: Option<String>,
}

impl Policy {
    fn of(kind: Kind) -> Policy {
        Policy {
            kind,
            retry: kind == Kind::Transient,
            hint: None,
        }
    }

    fn retry(mut self, retry: bool) -> Policy {
        self.retry = retry;
        self
    }

    fn hint(mut self, hint: impl Into<String>) -> Policy {
        self.hint = Some(hint.into());
        self
    }

    /// The process exit status (DESIGN.md): 2 for usage and connection errors, else 1.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            Kind::Usage | Kind::Connection => 2,
            Kind::Transient | Kind::Definite => 1,
        }
    }
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

    /// Kind, retry and hint of this error, together.
    pub fn policy(&self) -> Policy {
        const RESUME: &str =
            "the server restarted or the connection dropped: run the same command again to resume";
        match self {
            Error::ConnInfo { .. } | Error::Usage(_) | Error::Tls { .. } => Policy::of(Kind::Usage),
            Error::Connect {
                side,
                endpoint,
                source,
            } => Policy::of(Kind::Connection)
                .retry(connection_may_come_back(source))
                .hint(connect_hint(*side, endpoint, source)),
            Error::ConnectTimeout { side, .. } => Policy::of(Kind::Connection).retry(true).hint(
                format!(
                    "check the host, the port and any firewall or security group between here and the \
                     {side} (connect_timeout=N in the URL sets the wait)"
                ),
            ),
            Error::Replication { source, .. } => replication_policy(source),
            Error::Sql { source, .. } => {
                let p = Policy::of(classify(source));
                if p.kind == Kind::Transient {
                    p.hint(RESUME)
                } else {
                    p
                }
            }
            Error::Copy {
                table,
                chunk,
                source,
                ..
            } => Policy::of(classify(source)).hint(format!(
                "the chunk was rolled back on the target; fix the cause and run the same command again: \
                 it resumes with {table} chunk {chunk} and copies nothing twice"
            )),
            Error::CopyRefused {
                table,
                side,
                column,
                ..
            } => Policy::of(Kind::Definite).hint(copy_refused_hint(table, *side, column.as_ref())),
            Error::Schema(SchemaError::Failed { hint, .. }) if !hint.is_empty() => {
                Policy::of(Kind::Definite).hint(hint.to_string())
            }
            Error::Schema(_)
            | Error::Blocked(_)
            | Error::Locked(_)
            | Error::SlotLost(_)
            | Error::Decode { .. }
            | Error::Apply(_) => Policy::of(Kind::Definite),
            Error::Rewritten(_) => Policy::of(Kind::Transient).hint(
                "the copy resumes by itself in a new snapshot; run the same command again if it stopped",
            ),
            Error::Stalled(_) => Policy::of(Kind::Transient).hint(
                "check the network between here and both servers; run the same command again to resume",
            ),
            Error::Interrupted => Policy::of(Kind::Transient).hint(
                "what is copied is kept: run the same command again to resume where it stopped",
            ),
        }
    }

    pub fn kind(&self) -> Kind {
        self.policy().kind
    }

    /// See `Policy::retry`.
    pub fn retryable(&self) -> bool {
        self.policy().retry
    }

    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        self.policy().exit_code()
    }

    /// What the user should do next.
    pub fn hint(&self) -> Option<String> {
        self.policy().hint
    }
}

/// What to do about a chunk that no retry copies: the clone stops there, with every chunk copied so far
/// kept, and says both ways on.
fn copy_refused_hint(
    table: &QualifiedName,
    side: Side,
    column: Option<&(String, String)>,
) -> String {
    let fix = match (side, column) {
        (Side::Target, Some((c, t))) => format!(
            "make the target's column {c} accept the source's {t} values: the same type and extension \
             version, no stricter constraint or domain (compare `\\d {table}` on both servers; a column \
             changed on the target since the clone began goes back with ALTER TABLE … ALTER COLUMN {c} \
             TYPE …), then run the same command again: it resumes and copies nothing twice"
        ),
        (Side::Target, None) => "make the target accept the source's rows (compare the table on both \
             servers: types, extension versions, constraints, triggers), then run the same command again: \
             it resumes and copies nothing twice"
            .to_string(),
        (Side::Source, _) => "make the source able to output every row (a type whose output function \
             fails, a damaged page), then run the same command again: it resumes and copies nothing twice"
            .to_string(),
    };
    format!(
        "a retry fails the same way, so the clone stopped; the chunks copied so far are kept. Either {fix}; \
         or leave the table out: `hikkoshi clean`, then clone again with --exclude {table} and copy it \
         another way"
    )
}

/// Whether an error is one no retry of the same statement fixes (a value, a type, a constraint).
pub fn is_definite(e: &tokio_postgres::Error) -> bool {
    classify(e) == Kind::Definite
}

/// The replication connection's errors: refused logins and TLS are the operator's; a dropped connection, a
/// server starting or out of resources, and a slot still held by a process that just died pass.
fn replication_policy(e: &ReplicationError) -> Policy {
    match e {
        ReplicationError::Connect { .. } | ReplicationError::Timeout { .. } => {
            Policy::of(Kind::Connection)
                .retry(true)
                .hint("check that the source is running and reachable from this machine")
        }
        ReplicationError::PasswordMissing => Policy::of(Kind::Connection)
            .hint("give the password in the URL, in PGPASSWORD or in ~/.pgpass"),
        ReplicationError::UnsupportedAuth(_)
        | ReplicationError::TlsRefused(_)
        | ReplicationError::TlsHandshake { .. }
        | ReplicationError::TlsSetup(_) => Policy::of(Kind::Connection),
        ReplicationError::Io(_) => Policy::of(Kind::Transient)
            .hint("the connection dropped: run the same command again to resume"),
        ReplicationError::Server { code, hint, .. } => {
            let kind = if code.starts_with("28") {
                Kind::Connection
            } else if code == "55006" {
                // the slot is still held by the session of a process that just died: it is let go soon
                Kind::Transient
            } else {
                Kind::Definite
            };
            let retry = code == "55006" || code.starts_with("57P") || code.starts_with("53");
            let hint = match code.as_str() {
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
                _ => hint
                    .clone()
                    .unwrap_or_else(|| "run the same command again to retry".into()),
            };
            Policy::of(kind).retry(retry).hint(hint)
        }
        ReplicationError::Protocol(_) => Policy::of(Kind::Definite),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> Error {
        Error::Replication {
            what: "streaming changes".into(),
            source: ReplicationError::Server {
                code: code.into(),
                message: "m".into(),
                detail: None,
                hint: None,
            },
        }
    }

    fn summary(e: &Error) -> (Kind, i32, bool, bool) {
        let p = e.policy();
        (p.kind, p.exit_code(), p.retry, p.hint.is_some())
    }

    #[test]
    fn one_policy_gives_kind_exit_status_retry_and_hint() {
        assert_eq!(
            summary(&Error::Usage("--jobs".into())),
            (Kind::Usage, 2, false, false)
        );
        assert_eq!(
            summary(&Error::Interrupted),
            (Kind::Transient, 1, true, true)
        );
        assert_eq!(
            summary(&Error::Locked("another process".into())),
            (Kind::Definite, 1, false, false)
        );
        assert_eq!(
            summary(&Error::SlotLost("gone".into())),
            (Kind::Definite, 1, false, false)
        );
        // a slot held by a process that just died is let go soon: retried
        assert_eq!(summary(&server("55006")), (Kind::Transient, 1, true, true));
        // a refused login is the operator's: not retried, exit 2
        assert_eq!(
            summary(&server("28P01")),
            (Kind::Connection, 2, false, true)
        );
        // a server shutting down is retried, though the error itself is definite if it lasts
        assert_eq!(summary(&server("57P01")), (Kind::Definite, 1, true, true));
        let lost = Error::Replication {
            what: "streaming".into(),
            source: ReplicationError::Io(std::io::Error::other("reset")),
        };
        assert_eq!(summary(&lost), (Kind::Transient, 1, true, true));
        let no_password = Error::Replication {
            what: "connecting".into(),
            source: ReplicationError::PasswordMissing,
        };
        assert_eq!(summary(&no_password), (Kind::Connection, 2, false, true));
    }

    #[test]
    fn an_applier_refusal_keeps_its_cause_and_is_definite() {
        let e = Error::Apply(crate::stream::apply::ApplyError::Drift(
            "an UPDATE of public.t with key (id=1) found 0 of its 1 row(s)".into(),
        ));
        assert_eq!(summary(&e), (Kind::Definite, 1, false, false));
        assert!(e.to_string().contains("id=1"), "{e}");
    }
}
