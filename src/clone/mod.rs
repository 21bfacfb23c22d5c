//! `hikkoshi clone`: one consistent, parallel copy of the source (schema, rows, indexes, sequences).
//!
//! Order of work, and why:
//! 1. Read the source catalog and resolve the selection; refuse bad patterns and a non-empty target before
//!    anything is created anywhere.
//! 2. Create a temporary logical slot with an exported snapshot: pg_dump and every copy worker read in it.
//!    A temporary slot dies with its session, so a killed run leaves no slot behind.
//! 3. Record the migration, its tables and chunks in `hikkoshi` on the target; restore pre-data in one
//!    transaction.
//! 4. Copy chunks in parallel (see `copy`), then build post-data `--jobs` at a time, refresh materialized
//!    views, set sequences and analyze.
//!
//! Running the same command again resumes: done phases are skipped, copied chunks stay, and chunks of a
//! table split by `ctid` restart as a whole (page ranges do not partition the rows of two different
//! snapshots), as do the partitions of a half-copied partition tree not split by key throughout (the
//! stream names only the root, so one window must serve the whole tree; see docs/stream.md, "Resumed
//! copies").
//!
//! Files: `phases` (one run of the copy, phase by phase), `chunks` (the chunk plan and the parallel copy),
//! `objects` (the publication, the slot's undo, materialized views, statistics); the retry around a run
//! and the follow after it here. The migration lock is `state::lock`.

mod chunks;
mod objects;
mod phases;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::session;
use crate::state::{self, Step, lock};
use crate::stream::follow::FollowPlan;

/// What `clone` was asked to do.
#[derive(Clone, Debug)]
pub struct CloneOptions {
    pub source: String,
    pub target: String,
    pub jobs: usize,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Tables larger than this many bytes on disk are split into chunks of about this size.
    pub chunk_bytes: i64,
    /// Where pg_dump and pg_restore live, when not found on their own.
    pub pg_bin: Option<PathBuf>,
    /// maintenance_work_mem of each index build on the target (e.g. "512MB").
    pub maintenance_work_mem: String,
    /// After the copy, stream the source's changes until `stop`.
    pub follow: bool,
    /// Create the roles the objects need on the target, and restore owners and grants (`roles`); false:
    /// every object belongs to the target's role and no grant is copied.
    pub roles: bool,
    /// `ROLE=env:VAR` or `ROLE=file:PATH`: passwords for roles whose verifier cannot be read on the source.
    pub role_passwords: Vec<String>,
    /// `OLD=NEW`: a carried role's name on the target.
    pub role_map: Vec<String>,
    /// Cancelled on SIGINT/SIGTERM: the copy stops (resumable), the follower drains and exits.
    pub stop: CancellationToken,
}

/// What `clone` did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CloneReport {
    pub migration_id: String,
    pub resumed: bool,
    pub already_done: bool,
    pub tables: Vec<String>,
    pub chunks_copied: u64,
    pub rows: u64,
    pub bytes: u64,
    pub sequences: usize,
    pub snapshot_lsn: String,
    pub seconds: f64,
    pub warnings: Vec<String>,
    /// With --follow: the source LSN applied on the target when the follower stopped.
    pub applied_lsn: Option<String>,
    pub transactions_applied: u64,
    /// The cutover step that ended the stream (`switched`, `rolled-back`), if one did.
    pub ended_by: Option<Step>,
}

/// Runs (or resumes) a clone, then, with `follow`, streams changes until `opts.stop` is cancelled.
/// A failure is also recorded in the target's event log, where `status` and `/health` find it.
pub async fn run(opts: &CloneOptions) -> Result<CloneReport, Error> {
    let result = run_inner(opts).await;
    if let Err(e) = &result {
        crate::monitor::count_error(e.kind());
        if let Ok(info) = session::resolve(Side::Target, &opts.target)
            && let Ok(client) = session::connect(&info, Side::Target).await
            && state::exists(&client).await.unwrap_or(false)
        {
            let message = match e.hint() {
                Some(hint) => format!("{} ({hint})", crate::error::chain(e)),
                None => crate::error::chain(e),
            };
            let _ = state::event(&client, "error", &message).await;
        }
    }
    result
}

async fn run_inner(opts: &CloneOptions) -> Result<CloneReport, Error> {
    let src_info = session::resolve(Side::Source, &opts.source)?;
    let tgt_info = session::resolve(Side::Target, &opts.target)?;
    // One process per migration: this session holds the lock for the whole run.
    let mut target = lock::lock(&tgt_info).await?;
    // A restart of either server or a dropped connection during the copy: the copy resumes by itself
    // (copied chunks stay; the rest is copied in a new snapshot), as a second run would.
    let mut backoff = Backoff::new(Some(8));
    let mut report = loop {
        let started = Instant::now();
        let e = match phases::copy_part(opts, &src_info, &tgt_info).await {
            Ok(r) => break r,
            Err(e) => e,
        };
        let wait = match backoff.next(started) {
            Some(wait) if e.retryable() && !opts.stop.is_cancelled() => wait,
            _ => return Err(e),
        };
        crate::monitor::count_error(e.kind());
        tracing::warn!(
            "the copy was interrupted ({}); retrying in {:.1}s, it resumes where it stopped",
            crate::error::chain(&e),
            wait.as_secs_f64()
        );
        tokio::select! {
            _ = opts.stop.cancelled() => return Err(Error::Interrupted),
            _ = tokio::time::sleep(wait) => {}
        }
        if let Err(e) = lock::relock(&mut target, &tgt_info).await
            && matches!(e, Error::Locked(_))
        {
            return Err(e);
        }
    };
    lock::relock(&mut target, &tgt_info).await?;
    if !opts.follow {
        return Ok(report);
    }
    let (slot, publication) = state::stream_names(&target)
        .await
        .map_err(Error::sql(Side::Target, "reading the stream state"))?
        .ok_or_else(|| {
            Error::Blocked(
                "this clone was made without --follow, so no slot kept the changes since its snapshot: \
                 run `hikkoshi clean`, drop the copied tables, and clone again with --follow"
                    .into(),
            )
        })?;
    let cutover = state::cutover::recorded(&target)
        .await
        .map_err(Error::sql(Side::Target, "reading the cutover state"))?;
    let forward = FollowPlan::forward(&src_info, &tgt_info, slot, publication);
    let reverse = forward.reverse();
    let plan = match cutover {
        Some((Step::Switched, true)) => reverse.clone(),
        Some((Step::Switched, false)) => {
            return Err(Error::Blocked(
                "the cutover of this migration is done and it kept no reverse stream: there is nothing \
                 left to follow. `hikkoshi clean` removes hikkoshi's state"
                    .into(),
            ));
        }
        Some((Step::RollingBack | Step::RolledBack, _)) => {
            return Err(Error::Blocked(
                "this migration was rolled back (or a rollback is under way): the source is the primary \
                 and there is nothing to follow. To migrate again, `hikkoshi clean` and clone again"
                    .into(),
            ));
        }
        _ => forward,
    };
    // The lock's session can end with a restart of the target: a keeper takes the lock again, and stops
    // this follower if another process took it in between (never two appliers).
    let follow_stop = opts.stop.child_token();
    let keeper_done = CancellationToken::new();
    let lost = Arc::new(AtomicBool::new(false));
    let keeper = tokio::spawn(lock::keep(
        tgt_info.clone(),
        target,
        follow_stop.clone(),
        keeper_done.clone(),
        lost.clone(),
    ));
    let result = follow_then_reverse(plan, reverse, &tgt_info, &follow_stop, &mut report).await;
    keeper_done.cancel();
    let _ = keeper.await;
    if lost.load(Ordering::Relaxed) {
        return Err(lock::another_process(&tgt_info));
    }
    result?;
    Ok(report)
}

/// The forward stream, then, when a cutover with --reverse ended it, the reverse stream.
async fn follow_then_reverse(
    plan: FollowPlan,
    reverse: FollowPlan,
    tgt_info: &ConnInfo,
    stop: &CancellationToken,
    report: &mut CloneReport,
) -> Result<(), Error> {
    let followed = crate::stream::follow::run_on_own_thread(plan, stop.clone()).await?;
    report.applied_lsn = Some(followed.applied.to_string());
    report.transactions_applied = followed.transactions;
    // A cutover with --reverse ended the forward stream: this process keeps the old source current.
    if followed.ended_by == Some(Step::Switched)
        && state::cutover::recorded(&session::connect(tgt_info, Side::Target).await?)
            .await
            .map_err(Error::sql(Side::Target, "reading the cutover state"))?
            .is_some_and(|(_, reverse)| reverse)
    {
        tracing::info!("cutover done: streaming the new primary's changes back to the old source");
        let back = crate::stream::follow::run_on_own_thread(reverse, stop.clone()).await?;
        report.transactions_applied += back.transactions;
        report.ended_by = back.ended_by;
    } else {
        report.ended_by = followed.ended_by;
    }
    Ok(())
}

pub(super) fn new_migration_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mixed = (nanos as u64) ^ ((std::process::id() as u64) << 40);
    format!("{:08x}", (mixed ^ (mixed >> 29)) as u32)
}
