//! `hikkoshi clone --rehearse`: predicts how long the clone will take, from measurements on both servers,
//! and leaves nothing behind on either.
//!
//! What it measures, and how it stays throwaway:
//! - the schema step: `pg_dump --schema-only` of the source (timed), then the pre-data script
//!   (`pg_restore --file=-`) run on the target inside one transaction that is always rolled back;
//! - every selected table's copy rate: a bounded sample (`TABLESAMPLE ... REPEATABLE`) streamed from the
//!   source's `COPY ... TO STDOUT` into the table just created in that transaction with `COPY ... FROM
//!   STDIN`, in the format the clone will use (binary where portable) — the same pipeline as `copy`, so wide
//!   TOASTed documents and narrow rows each get their own rate;
//! - the index and constraint builds: the post-data script run on those samples, one entry at a time;
//! - `ANALYZE` of each sample;
//! - how the copy scales with parallel workers: the largest table's sample copied by one stream, then by
//!   `--jobs` streams at once, each into a table in a schema of its own created in a transaction that is
//!   rolled back as well.
//!
//! The target transaction writes WAL and data files like the real run; rolling it back removes the files
//! (a crash removes them at recovery). No slot, no publication, no `hikkoshi` schema: the source is only
//! read.
//!
//! The prediction scales each measurement to the table's full size: copy time by the stored bytes of the
//! rows (exact sums over the heap when it is small, else the planner's row count; TOAST values count by their
//! stored size without being read), index builds by `n log n` of the row counts, `ANALYZE` by the rows it
//! samples. It then schedules the real plan (`plan::plan_chunks`, claimed largest first as `copy` claims
//! them) over `--jobs` workers, and the index builds over `--jobs` builders, largest first, with
//! constraints of one table one at a time (they lock it), as `pg_restore --jobs` does.

use std::path::PathBuf;
use std::pin::pin;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::Table;
use crate::conninfo::ConnInfo;
use crate::copy;
use crate::error::{Error, Side};
use crate::ident::{QualifiedName, quote_ident};
use crate::plan::{Selection, resolve};
use crate::progress::{human_bytes, human_count, human_duration};
use crate::schema::{self, DumpFilter, DumpTools};
use crate::session;

/// Heaps up to this size are scanned whole for exact row and byte totals (cheap: TOAST is not read).
const SMALL_HEAP: i64 = 64 << 20;
/// Pages (and rows) `ANALYZE` samples at the default statistics target (300 × 100).
const ANALYZE_ROWS: f64 = 30_000.0;
/// How many times each index or constraint build on a sample is timed (the median counts).
const BUILD_RUNS: usize = 3;
/// The seed of every sample: the copy sample and the size query see the same rows.
const SEED: i32 = 20_261_123;

/// What `clone --rehearse` was asked to do (the clone's own options, and the sample size).
#[derive(Clone, Debug)]
pub struct RehearseOptions {
    pub source: String,
    pub target: String,
    pub jobs: usize,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub chunk_bytes: i64,
    pub pg_bin: Option<PathBuf>,
    pub maintenance_work_mem: String,
    /// Bytes sampled from each table (all of a smaller table).
    pub sample_bytes: i64,
}

/// The prediction.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rehearsal {
    pub jobs: usize,
    pub tables: Vec<TablePrediction>,
    /// Catalog, preflight and chunk planning, as measured here.
    pub prepare_seconds: f64,
    /// pg_dump of the schema and the pre-data restore, as measured here.
    pub schema_seconds: f64,
    /// Every chunk copied by `jobs` workers.
    pub copy_seconds: f64,
    /// Indexes, constraints and triggers built by `jobs` builders.
    pub index_seconds: f64,
    pub analyze_seconds: f64,
    pub total_seconds: f64,
    /// Aggregate copy rate of `jobs` parallel streams over one stream's, measured.
    pub parallel_speedup: f64,
    pub rows: f64,
    pub bytes: i64,
    pub chunks: usize,
    /// Bytes read from the source and written to the target to measure.
    pub sample_bytes: u64,
    /// How long the rehearsal itself took.
    pub rehearsal_seconds: f64,
    /// What the preflight (`hikkoshi check`) would block on: the real clone refuses to start until fixed.
    pub blockers: Vec<String>,
    pub warnings: Vec<String>,
}

/// One table's share.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TablePrediction {
    pub name: String,
    /// Rows (exact when the heap was scanned, else the planner's estimate).
    pub rows: f64,
    pub heap_bytes: i64,
    /// TOAST, with the free space and visibility maps (pg_table_size less the heap).
    pub toast_bytes: i64,
    pub chunks: usize,
    pub chunk_method: &'static str,
    pub format: &'static str,
    pub sample_rows: u64,
    /// COPY bytes of the sample.
    pub sample_bytes: u64,
    pub sample_copy_seconds: f64,
    /// Full size over sample size (by stored bytes).
    pub scale: f64,
    /// Copy time of the whole table by one worker.
    pub copy_seconds: f64,
    /// Index, constraint and trigger builds of the table, one after the other.
    pub index_seconds: f64,
    pub analyze_seconds: f64,
    pub indexes: Vec<IndexPrediction>,
}

/// One post-data entry (index, constraint, trigger...).
#[derive(Clone, Debug, Default, Serialize)]
pub struct IndexPrediction {
    pub kind: String,
    pub name: String,
    pub sample_seconds: f64,
    /// None when it could not be measured on the sample (e.g. a foreign key whose parent rows were not
    /// sampled).
    pub seconds: Option<f64>,
    pub note: Option<String>,
}

/// Runs the rehearsal. Errors as `clone` does for bad arguments and unreachable servers.
pub async fn run(opts: &RehearseOptions) -> Result<Rehearsal, Error> {
    let started = Instant::now();
    let selection =
        Selection::parse(&opts.include, &opts.exclude).map_err(|e| Error::Usage(format!("{e}")))?;
    let src_info = session::resolve(Side::Source, &opts.source)?;
    let tgt_info = session::resolve(Side::Target, &opts.target)?;
    let source = session::connect(&src_info, Side::Source).await?;
    let target = session::connect(&tgt_info, Side::Target).await?;
    let cat = crate::catalog::Catalog::load(&source)
        .await
        .map_err(Error::sql(Side::Source, "reading the source catalog"))?;
    let resolved = resolve(&cat, &selection)?;
    let mut r = Rehearsal {
        jobs: opts.jobs.max(1),
        ..Default::default()
    };
    let preflight = crate::check::evaluate(&crate::check::Inputs {
        source: &source,
        target: &target,
        catalog: &cat,
        tables: &resolved.tables,
        pg_bin: opts.pg_bin.as_deref(),
        follow: false,
        measure: false,
    })
    .await?;
    for f in &preflight.findings {
        match f.level {
            crate::check::Level::Blocker => r.blockers.push(format!(
                "{}: {}{}",
                f.check,
                f.message,
                f.fix
                    .as_ref()
                    .map(|x| format!(" (fix: {x})"))
                    .unwrap_or_default()
            )),
            crate::check::Level::Warning => r.warnings.push(f.message.clone()),
            crate::check::Level::Ok => {}
        }
    }
    let target_version: i32 = target
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(Error::sql(Side::Target, "reading the server version"))?
        .get(0);
    let planned = crate::plan::plan_chunks(&source, &resolved.tables, opts.chunk_bytes).await?;
    r.prepare_seconds = started.elapsed().as_secs_f64();

    let tools = DumpTools::find(
        opts.pg_bin.as_deref(),
        cat.major_version() as u32,
        (target_version / 10000) as u32,
    )?;
    let t = Instant::now();
    let archive = schema::dump(
        &tools,
        &src_info,
        None,
        &DumpFilter {
            excluded: &resolved.excluded,
        },
    )
    .await?;
    let dump_seconds = t.elapsed().as_secs_f64();
    let pre = schema::script(&tools, &archive, "pre-data", &tgt_info).await?;
    let post = schema::script(&tools, &archive, "post-data", &tgt_info).await?;

    // The copy's parallel scaling, before the long transaction (its tables would be locked by it).
    let eff_jobs = r
        .jobs
        .min(planned.iter().map(|p| p.chunks.len()).sum::<usize>().max(1));
    if let Some(big) = resolved.tables.iter().max_by_key(|t| t.bytes)
        && eff_jobs > 1
        && big.bytes > 0
    {
        match parallel_speedup(&src_info, &tgt_info, big, eff_jobs, opts.sample_bytes).await {
            Ok((speedup, bytes)) => {
                r.parallel_speedup = speedup;
                r.sample_bytes += bytes;
            }
            Err(e) => {
                // (e.g. no CREATE right on the target database for the probe's throwaway schema)
                r.parallel_speedup = eff_jobs as f64;
                r.warnings.push(format!(
                    "the parallel copy could not be measured ({}): assumed {eff_jobs} streams copy \
                     {eff_jobs} times as fast as one, which is the best case",
                    crate::error::chain(&e)
                ));
            }
        }
    } else {
        r.parallel_speedup = 1.0;
    }

    let wal_level: String = target
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(Error::sql(Side::Target, "reading wal_level"))?
        .get(0);
    if wal_level == "minimal" {
        r.warnings.push(
            "the target runs with wal_level = minimal: the samples go into tables created in the same \
             transaction, which skip WAL there, while the clone's copy does not; the copy may take longer \
             than predicted"
                .into(),
        );
    }

    // One throwaway transaction on the target: schema, samples, post-data, ANALYZE; then ROLLBACK.
    target
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit = off; SET LOCAL maintenance_work_mem = '{}'",
            opts.maintenance_work_mem.replace('\'', "")
        ))
        .await
        .map_err(Error::sql(
            Side::Target,
            "starting the rehearsal transaction",
        ))?;
    let measured =
        measure_in_transaction(opts, &source, &target, &resolved.tables, &pre, &post).await;
    let _ = target.batch_execute("ROLLBACK").await;
    let _ = source.batch_execute("ROLLBACK").await;
    let (schema_restore_seconds, samples, entries) = measured?;
    r.schema_seconds = dump_seconds + schema_restore_seconds;

    // Copy: the real plan, per chunk, scheduled like copy's workers.
    let mut copy_jobs: Vec<(i64, &QualifiedName, i32, f64)> = Vec::new();
    for p in &planned {
        let s = samples.iter().find(|s| s.name == p.table.name);
        let table_secs = s.map(|s| s.copy_seconds).unwrap_or(0.0);
        let total_est: i64 = p.chunks.iter().map(|c| c.est_bytes.max(0)).sum();
        for c in &p.chunks {
            let share = if total_est > 0 {
                c.est_bytes.max(0) as f64 / total_est as f64
            } else {
                1.0 / p.chunks.len() as f64
            };
            copy_jobs.push((c.est_bytes, &p.table.name, c.no, table_secs * share));
        }
    }
    // the order of copy::claim: est_bytes DESC, schema, table, chunk_no
    copy_jobs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)).then(a.2.cmp(&b.2)));
    let speedup = r.parallel_speedup;
    let workers = eff_jobs;
    r.copy_seconds = schedule(
        &copy_jobs
            .iter()
            .map(|j| Job {
                work: j.3,
                group: None,
                exclusive: false,
            })
            .collect::<Vec<_>>(),
        workers,
        |k| stream_speed(k, workers, speedup),
    );

    // Post-data: every measured entry, largest first, constraints of one table one at a time.
    let mut post_jobs: Vec<Job> = entries
        .iter()
        .filter_map(|e| {
            Some(Job {
                work: e.seconds?,
                group: e.table,
                exclusive: e.exclusive,
            })
        })
        .collect();
    post_jobs.sort_by(|a, b| b.work.total_cmp(&a.work));
    r.index_seconds = schedule(&post_jobs, r.jobs, |k| k as f64);
    let analyze_jobs: Vec<Job> = samples
        .iter()
        .map(|s| Job {
            work: s.analyze_seconds,
            group: None,
            exclusive: false,
        })
        .collect();
    r.analyze_seconds = schedule(&analyze_jobs, r.jobs, |k| k as f64);

    for (i, p) in planned.iter().enumerate() {
        let Some(s) = samples.iter().find(|s| s.name == p.table.name) else {
            continue;
        };
        let indexes: Vec<IndexPrediction> = entries
            .iter()
            .filter(|e| e.table == Some(i))
            .map(|e| IndexPrediction {
                kind: e.kind.clone(),
                name: e.name.clone(),
                sample_seconds: e.sample_seconds,
                seconds: e.seconds,
                note: e.note.clone(),
            })
            .collect();
        let heap = p.table.pages * 8192;
        r.tables.push(TablePrediction {
            name: p.table.name.to_string(),
            rows: s.rows,
            heap_bytes: heap,
            toast_bytes: (p.table.bytes - heap).max(0),
            chunks: p.chunks.len(),
            chunk_method: p.method.as_str(),
            format: if p.table.binary_portable() {
                "binary"
            } else {
                "text"
            },
            sample_rows: s.sample_rows,
            sample_bytes: s.sample_bytes,
            sample_copy_seconds: s.sample_seconds,
            scale: s.scale,
            copy_seconds: s.copy_seconds,
            index_seconds: indexes.iter().filter_map(|x| x.seconds).sum::<f64>() + 0.0,
            analyze_seconds: s.analyze_seconds,
            indexes,
        });
        r.sample_bytes += s.sample_bytes;
    }
    for e in &entries {
        if let Some(n) = &e.note {
            r.warnings.push(format!(
                "{} {}: not measured, not in the prediction ({n})",
                e.kind, e.name
            ));
        }
    }
    r.rows = r.tables.iter().map(|t| t.rows).sum();
    r.bytes = resolved.tables.iter().map(|t| t.bytes).sum();
    r.chunks = planned.iter().map(|p| p.chunks.len()).sum();
    r.total_seconds =
        r.prepare_seconds + r.schema_seconds + r.copy_seconds + r.index_seconds + r.analyze_seconds;
    r.rehearsal_seconds = started.elapsed().as_secs_f64();
    Ok(r)
}

/// One table's measurements, scaled to its full size.
struct Sampled {
    name: QualifiedName,
    rows: f64,
    sample_rows: u64,
    sample_bytes: u64,
    sample_seconds: f64,
    scale: f64,
    /// Full rows over sampled rows.
    row_scale: f64,
    copy_seconds: f64,
    analyze_seconds: f64,
}

/// One post-data entry of the script, measured.
struct Entry {
    kind: String,
    name: String,
    /// Index into the selected tables.
    table: Option<usize>,
    /// Takes a lock that keeps other builds on the table waiting (ALTER TABLE).
    exclusive: bool,
    sample_seconds: f64,
    seconds: Option<f64>,
    note: Option<String>,
}

type Measured = (f64, Vec<Sampled>, Vec<Entry>);

/// Everything measured inside the target's throwaway transaction (the caller rolls it back).
async fn measure_in_transaction(
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
async fn sample_table(
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
fn stored_expr(t: &Table) -> String {
    let mut parts = vec!["28".to_string()];
    for c in &t.columns {
        parts.push(format!(
            "coalesce(pg_column_size({}), 0)",
            quote_ident(&c.name)
        ));
    }
    parts.join(" + ")
}

/// A build measured on `sample_rows` rows, scaled to `row_scale` times as many by n log n.
fn scale_build(secs: f64, row_scale: f64, sample_rows: u64) -> f64 {
    if row_scale <= 1.0 {
        return secs;
    }
    let n = (sample_rows as f64).max(2.0);
    let full = n * row_scale;
    secs * row_scale * (full.ln() / n.ln())
}

/// The aggregate speed of `k` copy streams, in single streams: 1 for one, the measured speedup for `n`,
/// linear in between.
fn stream_speed(k: usize, n: usize, speedup_n: f64) -> f64 {
    if k <= 1 || n <= 1 {
        return k.min(1) as f64;
    }
    1.0 + (speedup_n - 1.0) * (k - 1) as f64 / (n - 1) as f64
}

/// A piece of work for `schedule`.
#[derive(Clone, Copy, Debug)]
struct Job {
    /// Seconds it takes alone.
    work: f64,
    /// Jobs of one group (a table) conflict when either is exclusive.
    group: Option<usize>,
    exclusive: bool,
}

/// When the last job finishes: `workers` workers each take the first job of the list that does not
/// conflict with a running one; with `k` jobs running, together they advance at `speed(k)` single speeds.
fn schedule(jobs: &[Job], workers: usize, speed: impl Fn(usize) -> f64) -> f64 {
    let workers = workers.max(1);
    let mut pending: Vec<usize> = (0..jobs.len()).collect();
    let mut running: Vec<(usize, f64)> = Vec::new();
    let mut now = 0.0;
    loop {
        while running.len() < workers {
            let next = pending.iter().position(|&j| {
                running.iter().all(|&(r, _)| {
                    jobs[r].group.is_none()
                        || jobs[r].group != jobs[j].group
                        || !(jobs[r].exclusive || jobs[j].exclusive)
                })
            });
            match next {
                Some(p) => {
                    let j = pending.remove(p);
                    running.push((j, jobs[j].work.max(0.0)));
                }
                None => break,
            }
        }
        if running.is_empty() {
            return now;
        }
        let k = running.len();
        let each = (speed(k) / k as f64).max(1e-9);
        let shortest = running
            .iter()
            .map(|&(_, left)| left)
            .fold(f64::INFINITY, f64::min);
        let dt = shortest / each;
        now += dt;
        for r in running.iter_mut() {
            r.1 -= each * dt;
        }
        running.retain(|&(_, left)| left > 1e-9);
    }
}

/// One entry of a `pg_restore --file=-` script: its header's type and name, the table it is on, its SQL.
#[derive(Debug, PartialEq)]
struct Block {
    kind: String,
    name: String,
    table: Option<String>,
    sql: String,
}

/// Splits a post-data script at pg_restore's `-- Name: ...; Type: ...;` headers.
fn post_data_entries(script: &str) -> Vec<Block> {
    let mut blocks: Vec<Block> = Vec::new();
    for line in script.lines() {
        if let Some(rest) = line.strip_prefix("-- Name: ") {
            let mut name = String::new();
            let mut kind = String::new();
            for part in rest.split("; ") {
                if let Some(t) = part.strip_prefix("Type: ") {
                    kind = t.to_string();
                } else if name.is_empty() {
                    name = part.to_string();
                }
            }
            blocks.push(Block {
                kind,
                name,
                table: None,
                sql: String::new(),
            });
        } else if let Some(b) = blocks.last_mut()
            && !line.starts_with("--")
        {
            b.sql.push_str(line);
            b.sql.push('\n');
        }
    }
    // settings before the first entry (search_path, ...) go with every entry: each runs on its own
    let preamble: String = script
        .lines()
        .take_while(|l| !l.starts_with("-- Name: "))
        .filter(|l| !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    blocks.retain(|b| !b.sql.trim().is_empty());
    for b in &mut blocks {
        b.table = table_of(&b.sql);
        b.sql = format!("{preamble}\n{}", b.sql);
    }
    blocks
}

/// The table an index or ALTER TABLE statement is on, as pg_dump writes it (`schema.name`, quoted where
/// needed).
fn table_of(sql: &str) -> Option<String> {
    let s = sql.trim_start();
    let rest = if let Some(r) = s.strip_prefix("ALTER TABLE ") {
        r
    } else if (s.starts_with("CREATE ") && s.contains(" INDEX "))
        || s.starts_with("CREATE TRIGGER")
        || s.starts_with("CREATE CONSTRAINT TRIGGER")
    {
        let at = s.find(" ON ")?;
        &s[at + 4..]
    } else {
        return None;
    };
    let rest = rest.trim_start();
    let rest = rest.strip_prefix("ONLY ").unwrap_or(rest).trim_start();
    // a name is quoted parts and plain characters up to the first space outside quotes
    let mut out = String::new();
    let mut quoted = false;
    for c in rest.chars() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted && (c.is_whitespace() || c == '(') {
            break;
        }
        out.push(c);
    }
    (!out.is_empty()).then_some(out)
}

/// Copies a sample of the largest table with one stream, then with `jobs` streams at once, then with one
/// again, each into a table of the same column types (text where the target lacks a type) in a schema of
/// its own created in a transaction that is rolled back. Returns the aggregate speedup and the bytes moved.
async fn parallel_speedup(
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
async fn probe_streams(
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

impl std::fmt::Display for Rehearsal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "rehearsal: {} table(s), {} rows, {} on disk, {} chunk(s), --jobs {}",
            self.tables.len(),
            human_count(self.rows.max(0.0) as u64),
            human_bytes(self.bytes.max(0) as u64),
            self.chunks,
            self.jobs
        )?;
        writeln!(
            f,
            "{:<32} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9}",
            "table", "rows", "heap", "toast", "chunks", "copy", "indexes"
        )?;
        for t in &self.tables {
            writeln!(
                f,
                "{:<32} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9}",
                t.name,
                human_count(t.rows.max(0.0) as u64),
                human_bytes(t.heap_bytes.max(0) as u64),
                human_bytes(t.toast_bytes.max(0) as u64),
                t.chunks,
                secs(t.copy_seconds),
                secs(t.index_seconds)
            )?;
        }
        writeln!(
            f,
            "(copy and indexes per table: one worker's time; measured on samples of {} in all)",
            human_bytes(self.sample_bytes)
        )?;
        writeln!(
            f,
            "predicted with --jobs {} (parallel copy streams measured at {:.2}x one stream):",
            self.jobs, self.parallel_speedup
        )?;
        for (what, s) in [
            ("prepare (catalog, checks, plan)", self.prepare_seconds),
            ("schema (dump, pre-data)", self.schema_seconds),
            ("copy", self.copy_seconds),
            ("indexes, constraints", self.index_seconds),
            ("analyze", self.analyze_seconds),
        ] {
            writeln!(f, "  {what:<34} {:>9}", secs(s))?;
        }
        writeln!(
            f,
            "  {:<34} {:>9}   ({})",
            "total",
            secs(self.total_seconds),
            human_duration(self.total_seconds)
        )?;
        writeln!(
            f,
            "nothing was kept on either server (the target's samples were rolled back); rehearsal took {:.1}s",
            self.rehearsal_seconds
        )?;
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        for b in &self.blockers {
            writeln!(f, "BLOCKER: {b}")?;
        }
        if !self.blockers.is_empty() {
            writeln!(
                f,
                "the clone would refuse to start until these are fixed (`hikkoshi check` shows them in full)"
            )?;
        }
        Ok(())
    }
}

fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2}s")
    } else {
        format!("{s:.1}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(work: f64) -> Job {
        Job {
            work,
            group: None,
            exclusive: false,
        }
    }

    #[test]
    fn schedule_takes_jobs_in_order_on_free_workers() {
        // 4, 3, 2, 1 on two workers: 4 | 3 then 2 at 3, then 1 at 4 on the first: ends at 5
        let jobs = [job(4.0), job(3.0), job(2.0), job(1.0)];
        assert!((schedule(&jobs, 2, |k| k as f64) - 5.0).abs() < 1e-9);
        assert!((schedule(&jobs, 1, |k| k as f64) - 10.0).abs() < 1e-9);
        assert_eq!(schedule(&[], 4, |k| k as f64), 0.0);
    }

    #[test]
    fn schedule_shares_a_slower_aggregate_between_running_jobs() {
        // two equal jobs, two streams together only 1.5x one: each takes 2/0.75
        let jobs = [job(2.0), job(2.0)];
        let t = schedule(&jobs, 2, |k| stream_speed(k, 2, 1.5));
        assert!((t - 2.0 / 0.75).abs() < 1e-9, "{t}");
    }

    #[test]
    fn exclusive_jobs_of_one_table_run_one_at_a_time() {
        let jobs = [
            Job {
                work: 2.0,
                group: Some(0),
                exclusive: true,
            },
            Job {
                work: 2.0,
                group: Some(0),
                exclusive: false,
            },
            Job {
                work: 1.0,
                group: Some(1),
                exclusive: true,
            },
        ];
        assert!((schedule(&jobs, 2, |k| k as f64) - 4.0).abs() < 1e-9);
    }

    #[test]
    fn post_data_scripts_split_into_entries_with_their_tables() {
        let script = "SET search_path = '';\n\n--\n-- Name: accounts accounts_pkey; Type: CONSTRAINT; Schema: public; Owner: -\n--\n\nALTER TABLE ONLY public.accounts\n    ADD CONSTRAINT accounts_pkey PRIMARY KEY (aid);\n\n--\n-- Name: ev_idx; Type: INDEX; Schema: app; Owner: -\n--\n\nCREATE INDEX ev_idx ON app.\"Events\" USING btree (created_at);\n";
        let b = post_data_entries(script);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].kind, "CONSTRAINT");
        assert_eq!(b[0].table.as_deref(), Some("public.accounts"));
        assert!(b[0].sql.starts_with("SET search_path = '';"));
        assert_eq!(b[1].kind, "INDEX");
        assert_eq!(b[1].name, "ev_idx");
        assert_eq!(b[1].table.as_deref(), Some("app.\"Events\""));
    }

    #[test]
    fn builds_scale_by_n_log_n() {
        assert_eq!(scale_build(1.0, 1.0, 1000), 1.0);
        let s = scale_build(1.0, 100.0, 1000);
        assert!((s - 100.0 * (100_000f64.ln() / 1000f64.ln())).abs() < 1e-9);
    }
}
