//! The rehearsal's measurements: the schema and samples in one throwaway target transaction, each sample
//! copied in the clone's own format, the post-data entries built on it, and the copy's parallel scaling.

use std::pin::pin;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use super::schedule::{post_data_entries, scale_build};
use super::{ANALYZE_ROWS, BUILD_RUNS, RehearseOptions, SEED, SMALL_HEAP};
use crate::catalog::Table;
use crate::conninfo::ConnInfo;
use crate::copy;
use crate::error::{Error, Side};
use crate::ident::{QualifiedName, quote_ident};
use crate::session;

/// One table's measurements, scaled to its full size.
pub(super) struct Sampled {
    pub(super) name: QualifiedName,
    pub(super) rows: f64,
    pub(super) sample_rows: u64,
    pub(super) sample_bytes: u64,
    pub(super) sample_seconds: f64,
    pub(super) scale: f64,
    /// Full rows over sampled rows.
    pub(super) row_scale: f64,
    pub(super) copy_seconds: f64,
    pub(super) analyze_seconds: f64,
}

/// One post-data entry of the script, measured.
pub(super) struct Entry {
    pub(super) kind: String,
    pub(super) name: String,
    /// Index into the selected tables.
    pub(super) table: Option<usize>,
    /// Takes a lock that keeps other builds on the table waiting (ALTER TABLE).
    pub(super) exclusive: bool,
    pub(super) sample_seconds: f64,
    pub(super) seconds: Option<f64>,
    pub(super) note: Option<String>,
}

pub(super) type Measured = (f64, Vec<Sampled>, Vec<Entry>);

/// Everything measured inside the target's throwaway transaction (the caller rolls it back).
pub(super) async fn measure_in_transaction(
    opts: &RehearseOptions,
    source: &Client,
    target: &Client,
    tables: &[Table],
    pre: &str,
    post: &str,
) -> Result<Measured, Error> {
    let t = Instant::now();
    target.batch_execute(pre).await.map_err(|e| {
        Error::Blocked(format!(
            "restoring the source's schema on the target (in a transaction that is rolled back) failed: {}. \
             The clone would fail the same way: `hikkoshi check` names the cause (a selected table that \
             already exists on the target, an extension the target lacks)",
            crate::error::chain(&Error::sql(Side::Target, "restoring pre-data")(e))
        ))
    })?;
    let schema_seconds = t.elapsed().as_secs_f64();
    source
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(Error::sql(Side::Source, "starting a read-only transaction"))?;

    let mut samples = Vec::new();
    for t in tables {
        samples.push(sample_table(source, target, t, opts.sample_bytes).await?);
    }

    let mut entries = Vec::new();
    for (n, block) in post_data_entries(post).into_iter().enumerate() {
        let table = block
            .table
            .as_deref()
            .and_then(|name| tables.iter().position(|t| t.name.to_string() == name));
        let sp = format!("hikkoshi_rehearse_{n}");
        target
            .batch_execute(&format!("SAVEPOINT {sp}"))
            .await
            .map_err(Error::sql(Side::Target, "setting a savepoint"))?;
        // A build scaled from a fraction of a second is at the mercy of whatever else the server does in
        // that moment: builds on a table are timed BUILD_RUNS times (undone in between), and the median
        // counts.
        let runs = if table.is_some() && matches!(block.kind.as_str(), "INDEX" | "CONSTRAINT") {
            BUILD_RUNS
        } else {
            1
        };
        let mut times = Vec::new();
        let mut result = Ok(());
        for run in 0..runs {
            let started = Instant::now();
            result = target.batch_execute(&block.sql).await;
            times.push(started.elapsed().as_secs_f64());
            if result.is_err() || run + 1 == runs {
                break;
            }
            target
                .batch_execute(&format!("ROLLBACK TO SAVEPOINT {sp}"))
                .await
                .map_err(Error::sql(Side::Target, "undoing a timed build"))?;
        }
        times.sort_by(f64::total_cmp);
        let secs = times[times.len() / 2];
        let (seconds, note) = match result {
            Ok(()) => {
                target
                    .batch_execute(&format!("RELEASE SAVEPOINT {sp}"))
                    .await
                    .map_err(Error::sql(Side::Target, "releasing a savepoint"))?;
                let scaled = match table {
                    Some(i) => scale_build(secs, samples[i].row_scale, samples[i].sample_rows),
                    None => secs,
                };
                (Some(scaled), None)
            }
            Err(e) => {
                target
                    .batch_execute(&format!("ROLLBACK TO SAVEPOINT {sp}"))
                    .await
                    .map_err(Error::sql(Side::Target, "rolling back to a savepoint"))?;
                let msg = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                (None, Some(format!("failed on the sample: {msg}")))
            }
        };
        entries.push(Entry {
            exclusive: block.kind != "INDEX",
            kind: block.kind,
            name: block.name,
            table,
            sample_seconds: secs,
            seconds,
            note,
        });
    }

    for (i, t) in tables.iter().enumerate() {
        let started = Instant::now();
        target
            .batch_execute(&format!("ANALYZE {}", t.name.quoted()))
            .await
            .map_err(Error::sql(
                Side::Target,
                format!("analyzing the sample of {}", t.name),
            ))?;
        let secs = started.elapsed().as_secs_f64();
        // ANALYZE reads up to 30 000 pages, then up to 30 000 rows of them: its time goes with the pages
        let sample_pages: i64 = target
            .query_one(
                "SELECT pg_relation_size(to_regclass($1)) / current_setting('block_size')::int",
                &[&t.name.quoted()],
            )
            .await
            .map_err(Error::sql(Side::Target, "measuring a sample table"))?
            .get(0);
        let s = &mut samples[i];
        let sampled = (sample_pages as f64).clamp(1.0, ANALYZE_ROWS);
        let full = (t.pages as f64).clamp(1.0, ANALYZE_ROWS);
        s.analyze_seconds = secs * (full / sampled).max(1.0);
    }
    Ok((schema_seconds, samples, entries))
}

/// Copies a sample of `t` into the (throwaway) table of the same name on the target and scales its time.
pub(super) async fn sample_table(
    source: &Client,
    target: &Client,
    t: &Table,
    sample_bytes: i64,
) -> Result<Sampled, Error> {
    let small_heap = t.pages * 8192 <= SMALL_HEAP;
    let method = if small_heap { "BERNOULLI" } else { "SYSTEM" };
    let mut pct = (100.0 * sample_bytes as f64 / t.bytes.max(1) as f64).clamp(0.0001, 100.0);
    let stored = stored_expr(t);
    let columns = copy::column_list(&t.columns);
    let format = if t.binary_portable() {
        " (FORMAT binary)"
    } else {
        ""
    };
    let list = if columns.is_empty() {
        String::new()
    } else {
        format!(" ({columns})")
    };
    let totals = if small_heap {
        let row = source
            .query_one(
                &format!(
                    "SELECT count(*)::float8, coalesce(sum({stored}), 0)::float8 FROM ONLY {}",
                    t.name.quoted()
                ),
                &[],
            )
            .await
            .map_err(Error::sql(Side::Source, format!("measuring {}", t.name)))?;
        Some((row.get::<_, f64>(0), row.get::<_, f64>(1)))
    } else {
        None
    };
    loop {
        let from = if pct >= 100.0 {
            format!("ONLY {}", t.name.quoted())
        } else {
            format!(
                "ONLY {} TABLESAMPLE {method} ({pct}) REPEATABLE ({SEED})",
                t.name.quoted()
            )
        };
        let select = if columns.is_empty() {
            format!("SELECT FROM {from}")
        } else {
            format!("SELECT {columns} FROM {from}")
        };
        let out_sql = format!("COPY ({select}) TO STDOUT{format}");
        let in_sql = format!("COPY {}{list} FROM STDIN{format}", t.name.quoted());
        let copy_err = |side: Side| {
            let table = t.name.clone();
            move |source| Error::Copy {
                table,
                chunk: -1,
                side,
                source,
            }
        };
        let started = Instant::now();
        let sink = target
            .copy_in(&in_sql)
            .await
            .map_err(copy_err(Side::Target))?;
        let mut sink = pin!(sink);
        let stream = source
            .copy_out(&out_sql)
            .await
            .map_err(copy_err(Side::Source))?;
        let mut stream = pin!(stream);
        let mut bytes = 0u64;
        while let Some(data) = stream.next().await {
            let data = data.map_err(copy_err(Side::Source))?;
            bytes += data.len() as u64;
            sink.feed(data).await.map_err(copy_err(Side::Target))?;
        }
        let rows = sink
            .as_mut()
            .finish()
            .await
            .map_err(copy_err(Side::Target))?;
        let secs = started.elapsed().as_secs_f64();
        let sample_stored: f64 = source
            .query_one(
                &format!("SELECT coalesce(sum({stored}), 0)::float8 FROM {from}"),
                &[],
            )
            .await
            .map_err(Error::sql(Side::Source, format!("measuring {}", t.name)))?
            .get(0);
        let (full_rows, full_stored) = match totals {
            Some(x) => x,
            None => {
                let rows_est = if t.rows_estimate >= 0.0 {
                    t.rows_estimate
                } else {
                    rows as f64 * 100.0 / pct
                };
                let per_row = if rows > 0 {
                    sample_stored / rows as f64
                } else {
                    0.0
                };
                (rows_est, rows_est * per_row)
            }
        };
        // An empty sample of a table with rows: sample more, up to all of it.
        if rows == 0 && full_rows >= 1.0 && pct < 100.0 {
            pct = (pct * 10.0).min(100.0);
            target
                .batch_execute(&format!("TRUNCATE {}", t.name.quoted()))
                .await
                .map_err(Error::sql(Side::Target, "emptying a sample table"))?;
            continue;
        }
        let scale = if sample_stored > 0.0 {
            (full_stored / sample_stored).max(1.0)
        } else {
            1.0
        };
        let row_scale = if rows > 0 {
            (full_rows / rows as f64).max(1.0)
        } else {
            1.0
        };
        return Ok(Sampled {
            name: t.name.clone(),
            rows: full_rows,
            sample_rows: rows,
            sample_bytes: bytes,
            sample_seconds: secs,
            scale,
            row_scale,
            copy_seconds: secs * scale,
            analyze_seconds: 0.0,
        });
    }
}

/// A row's stored size: its columns as stored (a TOASTed value by its stored size, without reading it),
/// plus the tuple header and line pointer.
pub(super) fn stored_expr(t: &Table) -> String {
    let mut parts = vec!["28".to_string()];
    for c in &t.columns {
        parts.push(format!(
            "coalesce(pg_column_size({}), 0)",
            quote_ident(&c.name)
        ));
    }
    parts.join(" + ")
}

/// Copies a sample of the largest table with one stream, then with `jobs` streams at once, then with one
/// again, each into a table of the same column types (text where the target lacks a type) in a schema of
/// its own created in a transaction that is rolled back. Returns the aggregate speedup and the bytes moved.
pub(super) async fn parallel_speedup(
    src_info: &ConnInfo,
    tgt_info: &ConnInfo,
    t: &Table,
    jobs: usize,
    sample_bytes: i64,
) -> Result<(f64, u64), Error> {
    // twice the sample per stream: a second or two of each is too short to see past the noise of a busy
    // machine. One stream before and after the parallel run: the load of the servers drifts.
    // (but no more than a quarter of the table per stream: on a small table the probe would be the rehearsal)
    let sample_bytes = sample_bytes.saturating_mul(2).min(t.bytes / 4).max(1 << 20);
    let before = probe_streams(src_info, tgt_info, t, 1, sample_bytes).await?;
    let many = probe_streams(src_info, tgt_info, t, jobs, sample_bytes).await?;
    let after = probe_streams(src_info, tgt_info, t, 1, sample_bytes).await?;
    let one = (before.0 + after.0, before.1 + after.1);
    let (r1, rn) = (one.0 as f64 / one.1, many.0 as f64 / many.1);
    let speedup = if r1 > 0.0 && rn > 0.0 {
        (rn / r1).clamp(0.5, jobs as f64)
    } else {
        1.0
    };
    tracing::debug!(
        one_stream = r1,
        streams = jobs,
        aggregate = rn,
        "parallel copy probe"
    );
    Ok((speedup, one.0 + many.0))
}

/// `n` streams at once; returns bytes and wall seconds.
pub(super) async fn probe_streams(
    src_info: &ConnInfo,
    tgt_info: &ConnInfo,
    t: &Table,
    n: usize,
    sample_bytes: i64,
) -> Result<(u64, f64), Error> {
    let pct = (100.0 * sample_bytes as f64 / t.bytes.max(1) as f64).clamp(0.0001, 100.0);
    let method = if t.pages * 8192 <= SMALL_HEAP {
        "BERNOULLI"
    } else {
        "SYSTEM"
    };
    // the table's own column types where the target knows them (built-in ones), else text
    let types: Vec<String> = t.columns.iter().map(|c| c.type_sql.clone()).collect();
    let target = session::connect(tgt_info, Side::Target).await?;
    let known: bool = target
        .query_one(
            "SELECT coalesce(bool_and(to_regtype(x) IS NOT NULL), true) FROM unnest($1::text[]) x",
            &[&types],
        )
        .await
        .map_err(Error::sql(Side::Target, "looking up column types"))?
        .get(0);
    drop(target);
    let binary = known && t.binary_portable();
    let cols = if t.columns.is_empty() {
        "c text".to_string()
    } else {
        types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("c{i} {}", if known { ty.as_str() } else { "text" }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let format = if binary { " (FORMAT binary)" } else { "" };
    let select = if t.columns.is_empty() {
        "NULL::text".to_string()
    } else {
        copy::column_list(&t.columns)
    };
    let mut sessions = Vec::new();
    for k in 0..n {
        let source = session::connect(src_info, Side::Source).await?;
        let target = session::connect(tgt_info, Side::Target).await?;
        let schema = format!("hikkoshi_rehearse_{}_{k}", std::process::id());
        target
            .batch_execute(&format!(
                "BEGIN; SET LOCAL synchronous_commit = off; CREATE SCHEMA {schema}; \
                 CREATE TABLE {schema}.probe ({cols})"
            ))
            .await
            .map_err(Error::sql(
                Side::Target,
                "creating a throwaway table (rolled back) to measure parallel copies",
            ))?;
        // a different sample for each stream, as different chunks are
        let from = if pct >= 100.0 {
            format!("ONLY {}", t.name.quoted())
        } else {
            format!(
                "ONLY {} TABLESAMPLE {method} ({pct}) REPEATABLE ({})",
                t.name.quoted(),
                SEED + 1 + k as i32
            )
        };
        sessions.push((
            source,
            target,
            format!("COPY (SELECT {select} FROM {from}) TO STDOUT{format}"),
            format!("COPY {schema}.probe FROM STDIN{format}"),
        ));
    }
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (source, target, out_sql, in_sql) in sessions {
        set.spawn(async move {
            let moved: Result<u64, tokio_postgres::Error> = async {
                let sink = target.copy_in(&in_sql).await?;
                let mut sink = pin!(sink);
                let stream = source.copy_out(&out_sql).await?;
                let mut stream = pin!(stream);
                let mut bytes = 0u64;
                while let Some(data) = stream.next().await {
                    let data = data?;
                    bytes += data.len() as u64;
                    sink.feed(data).await?;
                }
                sink.as_mut().finish().await?;
                Ok(bytes)
            }
            .await;
            let _ = target.batch_execute("ROLLBACK").await;
            moved
        });
    }
    let mut bytes = 0;
    while let Some(r) = set.join_next().await {
        let r =
            r.map_err(|e| Error::Blocked(format!("a probe stream stopped unexpectedly: {e}")))?;
        bytes += r.map_err(|e| Error::Copy {
            table: t.name.clone(),
            chunk: -1,
            side: Side::Target,
            source: e,
        })?;
    }
    Ok((bytes, started.elapsed().as_secs_f64().max(1e-6)))
}
