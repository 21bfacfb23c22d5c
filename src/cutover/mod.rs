//! `hikkoshi cutover` and `hikkoshi rollback`: the switch from the old primary to the new one, in seconds,
//! with proof.
//!
//! Both are the same walk, in opposite directions (cutover: source → target; rollback: target → source over
//! the reverse stream that `cutover --reverse` started):
//! 1. Refuse early: the clone must be complete and streaming, the slot healthy, the fence possible. Then
//!    the roles again (see `logins`): what changed on the source since the clone is carried, and every
//!    LOGIN role of the source must be able to log in on the new primary.
//! 2. Wait until the stream's lag is under `--max-lag`. Unless `--verify none`, make the first part of the
//!    proof while the application still writes (see `proof`: the tables hashed in snapshots of both
//!    servers, and a stream of the keys each server changes from then on), and wait for the lag again.
//! 3. Fence writes on the old primary (see `fence`): its triggers are armed before the pause, raised in
//!    it; emit a logical message, the fence marker, and note its LSN. The write pause starts at the raise.
//! 4. Wait until the new primary has applied everything up to the marker. Whoever streams does the work: a
//!    running `clone --follow` (it holds the migration lock), or, when none runs, a follower of our own.
//! 5. Move every sequence (owned, identity, standalone) to the old primary's position, read once the fence
//!    holds (verification compares against that read; a later `nextval` there stores no row).
//! 6. Verify (quick: the tables the stream changed since the copy; full: all; or none), fenced, so exactly:
//!    the second part of the proof compares the rows changed since the snapshots, by key. When the first
//!    part could not be made, the tables are hashed whole here.
//! 7. With `--reverse`: a publication and slot on the new primary, and stream state on the old one, so that
//!    what is written on the new primary from now on can flow back.
//! 8. Run the hooks (the user's switch). The write pause ends here.
//! 9. The point of no return: the step is recorded as done and the stream that fed the new primary ends.
//!
//! Until step 9, a failure, a timeout or a signal undoes what was done (the fence first) and leaves the old
//! primary writable; from step 9 on, the cutover runs to completion. A process killed after the fence
//! leaves the step recorded: `hikkoshi cutover` again finishes it, `hikkoshi rollback` undoes it.
//!
//! Where each part lives: `decide` (what a run does, from the recorded step: pure), `steps` (one method per
//! step, and the one undo), `logins` (the roles, before the fence), `servers` (the two servers and what is read and recorded on them), `fence`,
//! `proof`, `reverse` (the reverse stream's set-up), `hook`.

mod decide;
pub mod fence;
pub mod hook;
mod logins;
pub mod pgbouncer;
pub mod proof;
mod reverse;
mod servers;
mod steps;

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use self::decide::{Decision, Way, decide};
use self::servers::Server;
use self::steps::Switch;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::session;
use crate::state::{self, Step};
use crate::stream::follow::FollowPlan;

/// Another advisory key: one cutover or rollback at a time ("hikc").
const CUTOVER_LOCK: i64 = 0x6869_6b63;

/// How much to verify once fenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// The tables the stream changed since the copy (the copy itself was verified by construction).
    Quick,
    /// Every table.
    Full,
    /// Nothing (the pause is shortest; the proof is left to a later `hikkoshi verify`).
    None,
}

/// What `cutover` (or `rollback`) was asked to do.
#[derive(Clone, Debug)]
pub struct CutoverOptions {
    pub source: String,
    pub target: String,
    pub hooks: Vec<String>,
    /// Start the reverse stream (cutover only).
    pub reverse: bool,
    /// Fence only once the stream is this close (bytes of WAL).
    pub max_lag: i64,
    /// For the lag to drop, for the catch-up after the fence, and for each hook.
    pub timeout: Duration,
    pub verify: VerifyMode,
    pub jobs: usize,
    /// Cancelled on SIGINT/SIGTERM: before the point of no return, undo and leave the old primary writable.
    pub stop: CancellationToken,
    /// Cut over although a LOGIN role of the source cannot log in on the new primary.
    pub allow_nologin_roles: bool,
    /// PgBouncer admin consoles: their databases that lead to the old primary are paused around the fence.
    pub pgbouncer: Vec<String>,
}

/// What the switch did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SwitchReport {
    pub migration_id: String,
    /// `cutover` or `rollback`.
    pub step: String,
    pub new_primary: String,
    pub fence_means: String,
    /// The DDL fence: how, or why not.
    pub ddl_fence: String,
    /// Subscriptions into the old primary that the switch disabled, each with how to move it.
    pub subscriptions_disabled: Vec<String>,
    pub sessions_ended: Vec<String>,
    pub fence_lsn: String,
    /// Lag when the fence went up.
    pub lag_bytes_at_fence: i64,
    /// Raising the fence (in the pause): the flag, ending the other sessions, waiting for the writers.
    pub fence_seconds: f64,
    /// Arming the fence before the pause: a trigger on each fenced table.
    pub fence_arm_seconds: f64,
    /// Tables (with partitions and partitioned parents) under the fence.
    pub tables_fenced: usize,
    /// From the fence until the new primary had applied everything.
    pub catch_up_seconds: f64,
    /// Moving sequences and verifying.
    pub verify_seconds: f64,
    /// The first part of the proof, before the fence: hashing the tables in two snapshots (0 when the
    /// whole proof was made in the pause).
    pub verify_before_fence_seconds: f64,
    pub rows_hashed_before_fence: i64,
    /// The second part, in the pause: rows changed since the snapshots, compared by key, and the tables
    /// hashed whole (with the reason).
    pub rows_compared_in_pause: usize,
    pub tables_hashed_in_pause: Vec<String>,
    pub sequences_moved: usize,
    /// Large objects (in no stream): compared and copied before the fence, and again in the pause.
    pub large_objects_before_fence: String,
    pub large_objects_in_pause: String,
    /// Materialized views whose contents differed, refreshed on both servers in the pause.
    pub matviews_refreshed: Vec<String>,
    pub verify: String,
    pub tables_verified: usize,
    pub rows_verified: i64,
    pub hooks: Vec<hook::HookRun>,
    /// With --reverse: the slot on the new primary that keeps its changes for the old one.
    pub reverse_slot: Option<String>,
    /// From the fence until the hooks were done: how long nothing could be written anywhere.
    pub write_pause_seconds: f64,
    /// With --pgbouncer: from the PAUSE until the RESUME, how long the poolers held their clients' queries
    /// (what the application saw as its longest wait).
    pub pooler_pause_seconds: Option<f64>,
    pub seconds: f64,
    pub warnings: Vec<String>,
    /// Role changes made on the source since the clone and carried before the fence (`role: what`, such
    /// as `app: password`; never a verifier).
    pub roles_carried: Vec<String>,
    /// A rollback that found an interrupted cutover only lifted its fence.
    pub undid_interrupted_cutover: bool,
}

impl std::fmt::Display for SwitchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.undid_interrupted_cutover {
            return writeln!(
                f,
                "the interrupted cutover of migration {} was undone: the fence is lifted and the source \
                 is the primary",
                self.migration_id
            );
        }
        writeln!(
            f,
            "{} of migration {} done: {} is the primary",
            self.step, self.migration_id, self.new_primary
        )?;
        writeln!(
            f,
            "  fence:      {} ({} table(s), armed in {:.3}s before the pause)",
            self.fence_means, self.tables_fenced, self.fence_arm_seconds
        )?;
        writeln!(f, "  ddl:        {}", self.ddl_fence)?;
        for s in &self.subscriptions_disabled {
            writeln!(f, "  subscription: {s}")?;
        }
        if !self.sessions_ended.is_empty() {
            writeln!(
                f,
                "              sessions ended: {}",
                self.sessions_ended.join(", ")
            )?;
        }
        writeln!(
            f,
            "  caught up:  {:.3}s after the fence (fence itself {:.3}s; lag {} bytes at the fence, marker at {})",
            self.catch_up_seconds, self.fence_seconds, self.lag_bytes_at_fence, self.fence_lsn
        )?;
        writeln!(f, "  sequences:  {} moved", self.sequences_moved)?;
        for m in &self.matviews_refreshed {
            writeln!(f, "  matview:    {m}")?;
        }
        if !self.large_objects_in_pause.is_empty() {
            writeln!(
                f,
                "  large objects: before the fence {}; in the pause {}",
                self.large_objects_before_fence, self.large_objects_in_pause
            )?;
        }
        writeln!(
            f,
            "  verify:     {} ({} table(s), {} row(s) equal; sequences and verify {:.3}s)",
            self.verify, self.tables_verified, self.rows_verified, self.verify_seconds
        )?;
        if self.verify_before_fence_seconds > 0.0 {
            writeln!(
                f,
                "              {} row(s) hashed before the fence ({:.3}s); in the pause {} changed row(s) \
                 compared by key{}",
                self.rows_hashed_before_fence,
                self.verify_before_fence_seconds,
                self.rows_compared_in_pause,
                if self.tables_hashed_in_pause.is_empty() {
                    String::new()
                } else {
                    format!(", hashed whole: {}", self.tables_hashed_in_pause.join(", "))
                }
            )?;
        }
        for h in &self.hooks {
            writeln!(f, "  hook:       `{}` ok in {:.3}s", h.command, h.seconds)?;
        }
        if let Some(s) = &self.reverse_slot {
            writeln!(
                f,
                "  reverse:    slot {s} on the new primary keeps its changes for the old one; keep \
                 `hikkoshi clone --follow` running (or let `hikkoshi rollback` catch up by itself)"
            )?;
        }
        for r in &self.roles_carried {
            writeln!(
                f,
                "  role:       {r} (changed on the source since the clone, carried)"
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "  warning:    {w}")?;
        }
        if let Some(p) = self.pooler_pause_seconds {
            writeln!(
                f,
                "  poolers:    paused {p:.3}s (PAUSE → RESUME: the application's queries waited, none failed)"
            )?;
        }
        writeln!(
            f,
            "  write pause: {:.3}s (fence → hooks done); total {:.1}s",
            self.write_pause_seconds, self.seconds
        )
    }
}

/// Switches from the source to the target.
pub async fn cutover(opts: &CutoverOptions) -> Result<SwitchReport, Error> {
    switch(opts, Way::Cutover).await
}

/// Switches back to the source after a `cutover --reverse`, losing nothing written on the target since.
pub async fn rollback(opts: &CutoverOptions) -> Result<SwitchReport, Error> {
    switch(opts, Way::Rollback).await
}

/// Sessions on one server, with hikkoshi's own sessions writable on a fenced database.
async fn open(info: &ConnInfo, side: Side) -> Result<Client, Error> {
    let c = session::connect(info, side).await?;
    c.batch_execute(
        "SET application_name = 'hikkoshi cutover'; SET default_transaction_read_only = off;
         SET statement_timeout = 0; SET synchronous_commit = on; SET client_min_messages = warning",
    )
    .await
    .map_err(Error::sql(side, "preparing a session"))?;
    Ok(c)
}

/// The walk (see the module doc): decide from the recorded state, then the steps in order. Every step
/// before the fence changes nothing that needs undoing; every step in the pause is undone by `fenced`.
async fn switch(opts: &CutoverOptions, way: Way) -> Result<SwitchReport, Error> {
    let started = Instant::now();
    let src_info = session::resolve(Side::Source, &opts.source)?;
    let tgt_info = session::resolve(Side::Target, &opts.target)?;
    let ctl = open(&tgt_info, Side::Target).await?;
    let src = open(&src_info, Side::Source).await?;
    let migration = state::load(&ctl)
        .await
        .map_err(Error::sql(Side::Target, "reading hikkoshi state"))?
        .ok_or_else(|| {
            Error::Blocked(format!(
                "there is no migration into {tgt_info}: run `hikkoshi clone --follow` first"
            ))
        })?;
    if !ctl
        .query_one("SELECT pg_try_advisory_lock($1)", &[&CUTOVER_LOCK])
        .await
        .map_err(Error::sql(Side::Target, "taking the cutover lock"))?
        .get::<_, bool>(0)
    {
        return Err(Error::Blocked(
            "another hikkoshi cutover or rollback is running on this migration: wait for it".into(),
        ));
    }
    let (slot, publication) = state::stream_names(&ctl)
        .await
        .map_err(Error::sql(Side::Target, "reading the stream state"))?
        .ok_or_else(|| {
            Error::Blocked(
                "this migration was cloned without --follow: there is no change stream to cut over with. \
                 Clean it and clone again with --follow"
                    .into(),
            )
        })?;
    state::create(&ctl)
        .await
        .map_err(Error::sql(Side::Target, "updating the state schema"))?;
    let recorded = state::cutover::recorded(&ctl)
        .await
        .map_err(Error::sql(Side::Target, "reading the cutover state"))?;
    let forward = FollowPlan::forward(&src_info, &tgt_info, slot, publication);
    let mut report = SwitchReport {
        migration_id: migration.id.clone(),
        step: match way {
            Way::Cutover => "cutover",
            Way::Rollback => "rollback",
        }
        .into(),
        verify: format!("{:?}", opts.verify).to_lowercase(),
        ..Default::default()
    };

    // Where we stand, and what this run must do.
    let decision = decide(way, recorded, migration.phase);
    let resumed_fence = match decision {
        Decision::Refuse(why) => return Err(Error::Blocked(why)),
        Decision::UndoInterrupted => {
            report.warnings =
                fence::lift(&src, Side::Source, fence::subscriptions::AtLift::Resume).await?;
            reverse::drop(&ctl, &src, &forward.reverse()).await;
            state::cutover::set_step(&ctl, Step::Aborted, "rollback undid an interrupted cutover")
                .await
                .map_err(Error::sql(Side::Target, "recording the cutover step"))?;
            report.undid_interrupted_cutover = true;
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        Decision::Walk => false,
        Decision::Resume => true,
    };
    let (servers, feeding) = match way {
        Way::Cutover => (
            (
                Server::open(&src_info, Side::Source).await?,
                Server::open(&tgt_info, Side::Target).await?,
            ),
            forward,
        ),
        Way::Rollback => (
            (
                Server::open(&tgt_info, Side::Target).await?,
                Server::open(&src_info, Side::Source).await?,
            ),
            forward.reverse(),
        ),
    };
    let mut s = Switch::open(opts, way, ctl, servers, feeding, migration, report).await?;
    s.refuse_early(resumed_fence).await?;
    s.logins(resumed_fence).await?;
    s.catch_up(resumed_fence).await?;
    s.arm_fence(resumed_fence).await?;
    let fenced_at = Instant::now();
    s.fenced(fenced_at).await?;
    s.point_of_no_return(fenced_at).await?;
    s.report.seconds = started.elapsed().as_secs_f64();
    Ok(s.report)
}
