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

mod measure;
mod schedule;

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use self::measure::{Entry, Sampled, measure_in_transaction, parallel_speedup};
use self::schedule::{Job, schedule, stream_speed};
use crate::catalog::Table;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::QualifiedName;
use crate::plan::{Planned, Selection, resolve};
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
    note_preflight(&mut r, &preflight);
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
    measure_parallel(
        &mut r,
        opts,
        (&src_info, &tgt_info),
        &resolved.tables,
        eff_jobs,
    )
    .await;

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

    predict(&mut r, &planned, &samples, &entries, eff_jobs);
    r.rows = r.tables.iter().map(|t| t.rows).sum();
    r.bytes = resolved.tables.iter().map(|t| t.bytes).sum();
    r.chunks = planned.iter().map(|p| p.chunks.len()).sum();
    r.total_seconds =
        r.prepare_seconds + r.schema_seconds + r.copy_seconds + r.index_seconds + r.analyze_seconds;
    r.rehearsal_seconds = started.elapsed().as_secs_f64();
    Ok(r)
}

/// Blockers and warnings of `check`'s preflight, in the rehearsal's report.
fn note_preflight(r: &mut Rehearsal, preflight: &crate::check::Report) {
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
}

/// How the copy scales with parallel workers: the largest table's sample copied by one stream, then by
/// `eff_jobs` at once (1 when one worker copies everything).
async fn measure_parallel(
    r: &mut Rehearsal,
    opts: &RehearseOptions,
    (src_info, tgt_info): (&ConnInfo, &ConnInfo),
    tables: &[Table],
    eff_jobs: usize,
) {
    if let Some(big) = tables.iter().max_by_key(|t| t.bytes)
        && eff_jobs > 1
        && big.bytes > 0
    {
        match parallel_speedup(src_info, tgt_info, big, eff_jobs, opts.sample_bytes).await {
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
}

/// The prediction: the real chunk plan scheduled like the copy's workers, the post-data entries like
/// `pg_restore --jobs`, and each table's own numbers.
fn predict(
    r: &mut Rehearsal,
    planned: &[Planned<'_>],
    samples: &[Sampled],
    entries: &[Entry],
    eff_jobs: usize,
) {
    // Copy: the real plan, per chunk, scheduled like copy's workers.
    let mut copy_jobs: Vec<(i64, &QualifiedName, i32, f64)> = Vec::new();
    for p in planned {
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
    for e in entries {
        if let Some(n) = &e.note {
            r.warnings.push(format!(
                "{} {}: not measured, not in the prediction ({n})",
                e.kind, e.name
            ));
        }
    }
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
