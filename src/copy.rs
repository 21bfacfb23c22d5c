//! The copy: workers that each hold one source transaction in the exported snapshot and move chunks with
//! `COPY ... TO STDOUT` streamed into `COPY ... FROM STDIN`, one row message at a time (the driver's
//! channels apply back-pressure, so memory stays at a few rows whatever the table's size).
//!
//! Exactly once: a chunk's rows and its `copied` mark in `hikkoshi.chunks` commit in the same target
//! transaction. A worker that dies takes its uncommitted rows with it; the chunk is copied again later.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::failpoint;
use crate::ident::{QualifiedName, quote_ident};
use crate::lsn::Lsn;
use crate::progress::Progress;
use crate::session;

/// How a table's rows travel.
#[derive(Clone, Debug)]
pub struct TableCopy {
    pub name: QualifiedName,
    /// Quoted column list, the same on both sides (empty for a table without columns).
    pub columns: String,
    /// Each column's name and SQL type, to name them in an error.
    pub types: Vec<(String, String)>,
    pub binary: bool,
}

/// What every worker needs.
pub struct CopyContext {
    pub source: ConnInfo,
    pub target: ConnInfo,
    pub snapshot: String,
    pub snapshot_lsn: Lsn,
    pub tables: HashMap<QualifiedName, TableCopy>,
    pub progress: Arc<Progress>,
    pub cancel: CancellationToken,
    /// Tables whose binary rows the target refused: copied as text from then on (recorded, so a resume
    /// does the same).
    pub text_after_refusal: std::sync::Mutex<std::collections::HashSet<QualifiedName>>,
}

impl CopyContext {
    fn binary(&self, table: &TableCopy) -> bool {
        table.binary
            && !self
                .text_after_refusal
                .lock()
                .unwrap()
                .contains(&table.name)
    }
}

/// Runs `jobs` workers until no chunk is pending; the first error stops the others.
pub async fn run(ctx: Arc<CopyContext>, jobs: usize) -> Result<(), Error> {
    let mut set = tokio::task::JoinSet::new();
    for n in 0..jobs.max(1) {
        let ctx = ctx.clone();
        set.spawn(async move {
            let r = worker(&ctx, n).await;
            if r.is_err() {
                ctx.cancel.cancel();
            }
            r
        });
    }
    let mut first = None;
    while let Some(r) = set.join_next().await {
        // (a worker that saw the cancel stops without an error of its own)
        let r = r.unwrap_or_else(|e| Err(Error::Blocked(format!("a copy worker panicked: {e}"))));
        if let Err(e) = r
            && first.is_none()
        {
            first = Some(e);
        }
    }
    match first {
        Some(e) => Err(e),
        None if ctx.cancel.is_cancelled() => Err(Error::Interrupted),
        None => Ok(()),
    }
}

async fn worker(ctx: &CopyContext, n: usize) -> Result<(), Error> {
    let source = session::connect(&ctx.source, Side::Source).await?;
    source
        .batch_execute(&format!("SET application_name = 'hikkoshi copy {n}'"))
        .await
        .map_err(Error::sql(Side::Source, "preparing a copy session"))?;
    session::begin_in_snapshot(
        &source,
        Side::Source,
        &ctx.snapshot,
        "importing the exported snapshot",
    )
    .await?;
    let mut target = session::connect(&ctx.target, Side::Target).await?;
    // A chunk and its record are lost together on a target crash, so the commit need not wait for the disk.
    target
        .batch_execute(&format!(
            "SET application_name = 'hikkoshi copy {n}'; SET synchronous_commit = off;"
        ))
        .await
        .map_err(Error::sql(Side::Target, "preparing a copy session"))?;
    while !ctx.cancel.is_cancelled() {
        let Some(chunk) = claim(&target).await? else {
            break;
        };
        match copy_chunk(ctx, &source, &mut target, &chunk).await {
            Ok(()) => {}
            Err(Refusal::Binary(e)) => text_from_now_on(ctx, &target, &chunk, &e).await?,
            Err(Refusal::Other(e)) => return Err(e),
        }
    }
    let _ = source.batch_execute("COMMIT").await;
    Ok(())
}

struct Claimed {
    table: QualifiedName,
    no: i32,
    predicate: Option<String>,
}

/// Takes the largest pending chunk (largest first keeps the workers' finish times close).
async fn claim(target: &Client) -> Result<Option<Claimed>, Error> {
    let claimed = crate::state::copy::claim_chunk(target)
        .await
        .map_err(Error::sql(
            Side::Target,
            "claiming a chunk in hikkoshi.chunks",
        ))?;
    Ok(claimed.map(|(table, no, predicate)| Claimed {
        table,
        no,
        predicate,
    }))
}

/// How a chunk failed: the target could not read its binary rows (a type whose binary form differs between
/// the servers: the same chunk then goes as text), or anything else.
enum Refusal {
    Binary(tokio_postgres::Error),
    Other(Error),
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        Refusal::Other(e)
    }
}

/// The target refused a table's binary rows: it goes as text from now on, recorded in `hikkoshi.tables`,
/// and the chunk is given back to be copied again.
async fn text_from_now_on(
    ctx: &CopyContext,
    target: &Client,
    chunk: &Claimed,
    refused: &tokio_postgres::Error,
) -> Result<(), Error> {
    tracing::warn!(
        table = %chunk.table,
        "the target refused the binary rows of {} chunk {} ({}); the table is copied as text from now on",
        chunk.table,
        chunk.no,
        crate::error::chain(refused)
    );
    ctx.text_after_refusal
        .lock()
        .unwrap()
        .insert(chunk.table.clone());
    if let Some(p) = ctx.progress.table(&chunk.table) {
        p.active.fetch_sub(1, Ordering::Relaxed);
    }
    crate::state::copy::copy_as_text(target, &chunk.table, chunk.no)
        .await
        .map_err(Error::sql(
            Side::Target,
            "recording that a table is copied as text",
        ))
}

/// A failure no retry fixes, with the column PostgreSQL named in the error's context and its type.
fn refused(table: &TableCopy, chunk: i32, side: Side, source: tokio_postgres::Error) -> Error {
    let column = source
        .as_db_error()
        .and_then(|db| db.where_())
        .and_then(column_in_context)
        .and_then(|c| table.types.iter().find(|(name, _)| *name == c).cloned());
    Error::CopyRefused {
        table: table.name.clone(),
        chunk,
        side,
        column,
        source,
    }
}

/// The column in a COPY error's context: `COPY t, line 3, column c: "value"` (or without the value).
fn column_in_context(context: &str) -> Option<String> {
    let line = context.lines().find(|l| l.starts_with("COPY "))?;
    let (_, rest) = line.split_once(", column ")?;
    let name = match rest.split_once(": ") {
        Some((name, _)) => name,
        None => rest,
    };
    Some(name.to_string())
}

async fn copy_chunk(
    ctx: &CopyContext,
    source: &Client,
    target: &mut Client,
    chunk: &Claimed,
) -> Result<(), Refusal> {
    let table = ctx.tables.get(&chunk.table).ok_or_else(|| {
        Error::Blocked(format!(
            "hikkoshi.chunks lists {} but the source has no such table any more: \
             run `hikkoshi clean` and start the clone again",
            chunk.table
        ))
    })?;
    let progress = ctx.progress.table(&chunk.table);
    if let Some(p) = &progress {
        p.active.fetch_add(1, Ordering::Relaxed);
    }
    let binary = ctx.binary(table);
    let copy_err = |side: Side| {
        let no = chunk.no;
        move |source: tokio_postgres::Error| {
            // the target cannot read a value's binary form: another version of its type, an array or record
            // of another element type, a value cut short ("insufficient data left in message")
            let binary_refused = binary
                && side == Side::Target
                && source
                    .code()
                    .is_some_and(|c| matches!(c.code(), "22P03" | "42804" | "08P01"));
            if binary_refused {
                Refusal::Binary(source)
            } else if !crate::error::is_definite(&source) {
                Refusal::Other(Error::Copy {
                    table: table.name.clone(),
                    chunk: no,
                    side,
                    source,
                })
            } else {
                Refusal::Other(refused(table, no, side, source))
            }
        }
    };
    let format = if binary { " (FORMAT binary)" } else { "" };
    let list = if table.columns.is_empty() {
        String::new()
    } else {
        format!(" ({})", table.columns)
    };
    let out_sql = match &chunk.predicate {
        None => format!("COPY {}{list} TO STDOUT{format}", table.name.quoted()),
        Some(p) => format!(
            "COPY (SELECT {} FROM ONLY {} WHERE {p}) TO STDOUT{format}",
            table.columns,
            table.name.quoted()
        ),
    };
    let in_sql = format!("COPY {}{list} FROM STDIN{format}", table.name.quoted());

    // TRUNCATE (like any rewrite: VACUUM FULL, CLUSTER, ALTER TABLE ... TYPE) is not MVCC-safe: a table
    // rewritten after the snapshot reads as empty, or as its new contents, in it (docs, "Caveats" of MVCC).
    // Locked first (a rewrite now waits for this worker), its file as the snapshot's catalog names it and
    // as it is now tell whether that happened: then only a new snapshot can copy it.
    source
        .batch_execute(&format!(
            "LOCK TABLE ONLY {} IN ACCESS SHARE MODE",
            table.name.quoted()
        ))
        .await
        .map_err(copy_err(Side::Source))?;
    let rewritten: bool = source
        .query_one(
            "SELECT relfilenode <> pg_relation_filenode(oid) FROM pg_class WHERE oid = $1::text::regclass",
            &[&table.name.quoted()],
        )
        .await
        .map_err(copy_err(Side::Source))?
        .get(0);
    if rewritten {
        return Err(Error::Rewritten(chunk.table.clone()).into());
    }

    let tx = target.transaction().await.map_err(copy_err(Side::Target))?;
    let sink = tx.copy_in(&in_sql).await.map_err(copy_err(Side::Target))?;
    let mut sink = pin!(sink);
    let stream = source
        .copy_out(&out_sql)
        .await
        .map_err(copy_err(Side::Source))?;
    let mut stream = pin!(stream);
    let mut bytes: u64 = 0;
    let mut rows_seen: u64 = 0;
    while let Some(data) = stream.next().await {
        let data = data.map_err(copy_err(Side::Source))?;
        let len = data.len() as u64;
        bytes += len;
        rows_seen += 1;
        sink.feed(data).await.map_err(copy_err(Side::Target))?;
        if let Some(p) = &progress {
            p.bytes.fetch_add(len, Ordering::Relaxed);
            if rows_seen.is_multiple_of(1024) {
                p.rows.fetch_add(1024, Ordering::Relaxed);
            }
        }
        if ctx.cancel.is_cancelled() {
            // Dropping the transaction rolls the chunk back; it stays claimed and is reset on the next run.
            return Err(Error::Interrupted.into());
        }
    }
    let rows = sink
        .as_mut()
        .finish()
        .await
        .map_err(copy_err(Side::Target))?;
    if let Some(p) = &progress {
        p.rows.fetch_add(
            rows.saturating_sub(rows_seen / 1024 * 1024),
            Ordering::Relaxed,
        );
    }
    failpoint::hit(failpoint::COPY_BEFORE_CHUNK_COMMIT);
    crate::state::copy::mark_chunk_copied(
        &tx,
        (&chunk.table, chunk.no),
        (rows as i64, bytes as i64),
        ctx.snapshot_lsn,
    )
    .await
    .map_err(copy_err(Side::Target))?;
    tx.commit().await.map_err(copy_err(Side::Target))?;
    failpoint::hit(failpoint::COPY_AFTER_CHUNK_COMMIT);
    failpoint::pause(failpoint::COPY_AFTER_CHUNK_COMMIT, &ctx.cancel).await;
    if let Some(p) = &progress {
        p.chunks_done.fetch_add(1, Ordering::Relaxed);
        p.active.fetch_sub(1, Ordering::Relaxed);
    }
    tracing::debug!(table = %chunk.table, chunk = chunk.no, rows, bytes, "chunk copied");
    Ok(())
}

/// The quoted column list COPY uses for a table.
pub fn column_list(columns: &[crate::catalog::Column]) -> String {
    columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::column_in_context;

    #[test]
    fn the_column_comes_from_the_copy_context_of_either_format() {
        // text COPY names the value, binary COPY does not; a name may hold spaces and commas
        assert_eq!(
            column_in_context("COPY t, line 3, column n: \"4294967296\"").as_deref(),
            Some("n")
        );
        assert_eq!(
            column_in_context("COPY big table, line 1, column a, b").as_deref(),
            Some("a, b")
        );
        assert_eq!(
            column_in_context("SQL function \"f\"\nCOPY t, line 9, column c: \"x\"").as_deref(),
            Some("c")
        );
        assert_eq!(column_in_context("COPY t, line 2"), None);
        assert_eq!(column_in_context("PL/pgSQL function g() line 3"), None);
    }
}
