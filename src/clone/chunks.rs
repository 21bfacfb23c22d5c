//! The chunk plan and the parallel copy of every chunk not yet copied (the workers are in `copy`).
//! Page ranges of two different snapshots do not partition the rows: a table split by ctid that was left
//! half copied starts over, and so does a partition tree left half copied unless every partition is split
//! by key (see `state::copy::half_copied`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use super::CloneOptions;
use crate::catalog::Table;
use crate::conninfo::ConnInfo;
use crate::copy::{self, CopyContext, TableCopy};
use crate::error::{Error, Side};
use crate::ident::QualifiedName;
use crate::plan::Resolved;
use crate::progress::{Progress, Reporter};
use crate::replication;
use crate::state::{self, ChunkStatus};

/// Records every table and its chunks, and moves the migration to the copy phase, in one transaction.
pub(super) async fn plan(
    source: &Client,
    target: &Client,
    tables: &[Table],
    chunk_bytes: i64,
) -> Result<(), Error> {
    let planned = crate::plan::plan_chunks(source, tables, chunk_bytes).await?;
    state::copy::record_plan(target, &planned)
        .await
        .map_err(Error::sql(Side::Target, "recording the copy plan"))?;
    tracing::info!("{}", crate::plan::describe(&planned));
    Ok(())
}

/// Copies every chunk not yet copied; returns chunks, rows and bytes copied by this run.
pub(super) async fn copy(
    opts: &CloneOptions,
    (src_info, tgt_info): (&ConnInfo, &ConnInfo),
    target: &Client,
    resolved: &Resolved,
    snap: &replication::ExportedSnapshot,
) -> Result<(u64, u64, u64), Error> {
    let sql = |what: &'static str| Error::sql(Side::Target, what);
    state::copy::reset_claims(target)
        .await
        .map_err(sql("resetting interrupted chunks"))?;
    for name in state::copy::half_copied(target)
        .await
        .map_err(sql("finding half-copied tables"))?
    {
        tracing::info!(table = %name, "restarting a half-copied table split by ctid, or a partition of a half-copied tree");
        state::copy::restart_table(target, &name)
            .await
            .map_err(sql("restarting a half-copied table"))?;
    }

    let chunk_states = state::chunks(target)
        .await
        .map_err(sql("reading the copy plan"))?;
    let mut per_table: HashMap<QualifiedName, (u64, u64, u64)> = HashMap::new();
    for c in &chunk_states {
        let e = per_table.entry(c.table.clone()).or_default();
        e.1 += 1;
        if c.state == ChunkStatus::Copied {
            e.2 += 1;
        } else {
            e.0 += c.est_bytes.max(0) as u64;
        }
    }
    let formats: HashMap<QualifiedName, String> = state::tables(target)
        .await
        .map_err(sql("reading the copy plan"))?
        .into_iter()
        .map(|t| (t.name, t.copy_format))
        .collect();
    let mut names: Vec<&QualifiedName> = per_table.keys().collect();
    names.sort();
    let progress = Progress::new(
        names
            .iter()
            .map(|n| {
                let (est, total, done) = per_table[*n];
                ((*n).clone(), est, total, done)
            })
            .collect(),
    );
    let tables = resolved
        .tables
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TableCopy {
                    name: t.name.clone(),
                    columns: copy::column_list(&t.columns),
                    types: t
                        .columns
                        .iter()
                        .map(|c| (c.name.clone(), c.type_sql.clone()))
                        .collect(),
                    binary: formats.get(&t.name).map(String::as_str) == Some("binary"),
                },
            )
        })
        .collect();
    let ctx = Arc::new(CopyContext {
        source: src_info.clone(),
        target: tgt_info.clone(),
        snapshot: snap.snapshot.clone(),
        snapshot_lsn: snap.lsn,
        tables,
        progress: progress.clone(),
        cancel: opts.stop.child_token(),
        text_after_refusal: Default::default(),
    });
    let pending = chunk_states
        .iter()
        .filter(|c| c.state != ChunkStatus::Copied)
        .count();
    tracing::info!(
        "copying {pending} chunk(s) with {} worker(s)",
        opts.jobs.max(1).min(pending.max(1))
    );
    let reporter = Reporter::start(progress.clone(), Duration::from_secs(5));
    let result = copy::run(ctx, opts.jobs.max(1).min(pending.max(1))).await;
    reporter.finish().await;
    result?;
    // The phase moves on only when every chunk is recorded as copied.
    let left = state::copy::chunks_left(target)
        .await
        .map_err(sql("checking the copy"))?;
    if left > 0 {
        return Err(Error::Blocked(format!(
            "{left} chunk(s) are not copied although every worker finished: run the same command again to \
             copy them"
        )));
    }
    state::copy::mark_tables_copied(target)
        .await
        .map_err(sql("recording table states"))?;
    let (mut chunks, mut rows, mut bytes) = (0, 0, 0);
    for t in &progress.tables {
        use std::sync::atomic::Ordering::Relaxed;
        rows += t.rows.load(Relaxed);
        bytes += t.bytes.load(Relaxed);
        chunks += t.chunks_done.load(Relaxed);
    }
    let done_before: u64 = per_table.values().map(|v| v.2).sum();
    tracing::info!("{}", progress.summary());
    Ok((chunks - done_before, rows, bytes))
}
