//! A switch the application does not see, through PgBouncer (`--pgbouncer ADMIN_URL`, repeatable).
//!
//! Just before the fence, each pooler's databases that lead to the old primary are PAUSEd: PgBouncer lets the
//! transactions in flight finish (transaction pooling), closes its server connections and holds every new
//! query. The hooks then repoint the pooler (`deploy/pgbouncer/repoint.sh` rewrites the include file that
//! holds the `[databases]` entry); hikkoshi sends RELOAD and RESUME, and the held queries go to the new
//! primary. The application sees a slow query, not an error. On any failure after the PAUSE, the hooks
//! that ran are run again towards the old primary (see `Switch::undo`) and the pooler is RESUMEd there.
//!
//! The admin console takes only the simple-query protocol and no SET: its sessions are opened bare
//! (`session::open`). A pooler left paused by a hikkoshi that died is RESUMEd when the next `cutover` or
//! `rollback` with the same `--pgbouncer` starts.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::quote_ident;
use crate::session;

/// One pooler's admin console, and its databases that lead to the old primary.
pub struct Pooler {
    info: ConnInfo,
    client: Client,
    /// PgBouncer's names of the databases to pause.
    pub databases: Vec<String>,
    paused: bool,
}

/// What `SHOW DATABASES` says of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub host: String,
    pub port: String,
    pub database: String,
    pub pool_mode: String,
    pub paused: bool,
}

impl Pooler {
    /// `host:port` of the console, never its password.
    pub fn name(&self) -> String {
        format!("PgBouncer {}:{}", self.info.host(), self.info.port())
    }
}

/// Connects to each pooler's console and finds its entries for `dbname` (the old primary's database); a
/// pooler without one refuses the switch before anything is fenced. Entries left paused by an earlier run
/// are resumed. Returns the poolers and a warning for each entry whose pool mode makes PAUSE wait for
/// clients to disconnect (session pooling).
pub async fn connect(urls: &[String], dbname: &str) -> Result<(Vec<Pooler>, Vec<String>), Error> {
    let mut poolers = Vec::new();
    let mut warnings = Vec::new();
    for url in urls {
        let info = ConnInfo::resolve(url).map_err(|e| {
            Error::Usage(format!(
                "--pgbouncer: the admin console's connection string does not parse: {e}"
            ))
        })?;
        let client = session::open(&info, Side::Source).await.map_err(|e| {
            Error::Blocked(format!(
                "cannot reach the PgBouncer admin console {}:{} ({}): nothing was paused or fenced. \
                 Check --pgbouncer (dbname=pgbouncer, a user in admin_users)",
                info.host(),
                info.port(),
                crate::error::chain(&e)
            ))
        })?;
        let mut pooler = Pooler {
            info,
            client,
            databases: vec![],
            paused: false,
        };
        let entries = entries(&pooler).await?;
        let mine: Vec<&Entry> = entries.iter().filter(|e| e.database == dbname).collect();
        if mine.is_empty() {
            return Err(Error::Blocked(format!(
                "{} has no database entry for database {dbname} (its entries: {}): nothing was paused or \
                 fenced. Give --pgbouncer only for the poolers in front of this database",
                pooler.name(),
                entries
                    .iter()
                    .map(|e| format!("{} → {}:{}/{}", e.name, e.host, e.port, e.database))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for e in &mine {
            if e.pool_mode == "session" {
                warnings.push(format!(
                    "{}: database {} pools by session, so PAUSE waits until every client of it has \
                     disconnected (up to --timeout); transaction pooling waits only for the transactions \
                     in flight",
                    pooler.name(),
                    e.name
                ));
            }
            if e.paused {
                tracing::warn!(
                    "{}: database {} was left paused (by a run that died?): resumed",
                    pooler.name(),
                    e.name
                );
                console(&pooler, &format!("RESUME {}", quote_ident(&e.name))).await?;
            }
        }
        pooler.databases = mine.iter().map(|e| e.name.clone()).collect();
        poolers.push(pooler);
    }
    Ok((poolers, warnings))
}

/// `SHOW DATABASES`, by column name (the columns differ between PgBouncer versions).
async fn entries(p: &Pooler) -> Result<Vec<Entry>, Error> {
    let messages = p
        .client
        .simple_query("SHOW DATABASES")
        .await
        .map_err(|e| console_error(p, "SHOW DATABASES", &e))?;
    let mut out = Vec::new();
    for m in messages {
        if let SimpleQueryMessage::Row(r) = m {
            let get = |c: &str| r.try_get(c).ok().flatten().unwrap_or_default().to_string();
            out.push(Entry {
                name: get("name"),
                host: get("host"),
                port: get("port"),
                database: get("database"),
                pool_mode: get("pool_mode"),
                paused: get("paused") == "1",
            });
        }
    }
    Ok(out)
}

async fn console(p: &Pooler, command: &str) -> Result<(), Error> {
    p.client
        .simple_query(command)
        .await
        .map(|_| ())
        .map_err(|e| console_error(p, command, &e))
}

fn console_error(p: &Pooler, command: &str, e: &tokio_postgres::Error) -> Error {
    Error::Blocked(format!(
        "{}: `{command}` failed ({})",
        p.name(),
        crate::error::chain(e)
    ))
}

/// PAUSEs every pooler's databases, each PAUSE waiting at most `timeout` for the transactions in flight.
/// On any failure, what was paused is resumed and the error says nothing was fenced.
pub async fn pause(poolers: &mut [Pooler], timeout: Duration) -> Result<Instant, Error> {
    let started = Instant::now();
    for i in 0..poolers.len() {
        let mut failed = None;
        for db in poolers[i].databases.clone() {
            let command = format!("PAUSE {}", quote_ident(&db));
            match tokio::time::timeout(timeout, console(&poolers[i], &command)).await {
                Ok(Ok(())) => poolers[i].paused = true,
                Ok(Err(e)) => failed = Some(crate::error::chain(&e)),
                Err(_) => {
                    // the PAUSE still waits: this connection is busy, a RESUME on another one cancels it
                    if let Ok(other) = session::open(&poolers[i].info, Side::Source).await {
                        poolers[i].client = other;
                    }
                    poolers[i].paused = true;
                    failed = Some(format!(
                        "{}: PAUSE {db} did not end within {}s (a transaction or, in session pooling, a \
                         client held a server connection)",
                        poolers[i].name(),
                        timeout.as_secs()
                    ));
                }
            }
            if failed.is_some() {
                break;
            }
        }
        if let Some(why) = failed {
            let left = resume(poolers).await;
            return Err(Error::Blocked(format!(
                "{why}: nothing was fenced, the poolers were resumed{}",
                if left.is_empty() {
                    String::new()
                } else {
                    format!(" except: {}", left.join("; "))
                }
            )));
        }
    }
    Ok(started)
}

/// RELOADs (the hooks rewrote the configuration) and RESUMEs every paused pooler; returns what failed.
pub async fn resume(poolers: &mut [Pooler]) -> Vec<String> {
    let mut failed = Vec::new();
    for p in poolers.iter_mut().filter(|p| p.paused) {
        if let Err(e) = console(p, "RELOAD").await {
            failed.push(crate::error::chain(&e));
        }
        for db in p.databases.clone() {
            match console(p, &format!("RESUME {}", quote_ident(&db))).await {
                Ok(()) => {}
                // "database is not paused": a RESUME on another console (or of a timed-out PAUSE) came first
                Err(e) if crate::error::chain(&e).contains("not paused") => {}
                Err(e) => failed.push(format!(
                    "{} (run `RESUME {db};` on its console)",
                    crate::error::chain(&e)
                )),
            }
        }
        p.paused = false;
    }
    failed
}
