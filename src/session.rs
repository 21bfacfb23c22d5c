//! Opening ordinary (non-replication) sessions on the source and the target.

use tokio_postgres::{Client, NoTls};

use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::tls::{self, TlsPlan};

/// Parses and completes a connection string for one side.
pub fn resolve(side: Side, url: &str) -> Result<ConnInfo, Error> {
    ConnInfo::resolve(url).map_err(|source| Error::ConnInfo { side, source })
}

/// Opens a session (with TLS as `sslmode` says); its connection task runs until the client is dropped.
pub async fn connect(info: &ConnInfo, side: Side) -> Result<Client, Error> {
    let client = open(info, side).await?;
    // hikkoshi's own DDL (its state, a fence, a publication) is not the application's: the capture of a
    // following stream passes over it (see `stream::ddl::capture`). The process's pass past a cutover's
    // fence (it passes only where a fence registered it: see `cutover::fence::pass`); shown in
    // pg_stat_activity only to this role's members and pg_read_all_stats, until the session's next
    // statement. NOTICEs ("schema hikkoshi already exists, skipping") tell the user nothing. Where the
    // server has it (14+), a statement running for a client that is gone ends within a second (a follower
    // killed while applying lets its successor take over at once). Simple-query protocol: an extended
    // query here made the apply session stall on its first error (tests/it/faults.rs, duplicate key).
    let _ = client
        .batch_execute(&format!(
            "SET {} = off; SET {} = {}; SET client_min_messages = warning;
             SELECT set_config('client_connection_check_interval', '1000', false)
             WHERE current_setting('server_version_num')::int >= 140000",
            crate::stream::ddl::capture::OFF_SETTING,
            crate::cutover::fence::pass::SETTING,
            crate::ident::quote_literal(crate::cutover::fence::pass::secret()),
        ))
        .await;
    Ok(client)
}

/// Starts a read-only REPEATABLE READ transaction on `client` that reads an exported snapshot (the copy's
/// workers, the clone's large objects, the proof's hashing sessions).
pub async fn begin_in_snapshot(
    client: &Client,
    side: Side,
    snapshot: &str,
    what: &str,
) -> Result<(), Error> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::ident::quote_literal(snapshot)
        ))
        .await
        .map_err(Error::sql(side, what))
}

/// A session without hikkoshi's settings: for servers that take no SET, such as a PgBouncer admin console.
pub async fn open(info: &ConnInfo, side: Side) -> Result<Client, Error> {
    let config = info.to_driver_config("hikkoshi");
    let tls = tls::plan(info).map_err(|source| Error::Tls { side, source })?;
    let timeout = info.connect_timeout();
    let timed_out = || Error::ConnectTimeout {
        side,
        endpoint: info.to_string(),
        secs: timeout.as_secs(),
    };
    let refused = |source| Error::Connect {
        side,
        endpoint: info.to_string(),
        source,
    };
    match tls {
        TlsPlan::Off => {
            let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
                .await
                .map_err(|_| timed_out())?
                .map_err(refused)?;
            tokio::spawn(drive(connection));
            Ok(client)
        }
        TlsPlan::On { config: tls, .. } => {
            let make = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = tokio::time::timeout(timeout, config.connect(make))
                .await
                .map_err(|_| timed_out())?
                .map_err(refused)?;
            tokio::spawn(drive(connection));
            Ok(client)
        }
    }
}

async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "session ended");
    }
}
