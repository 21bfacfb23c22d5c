//! `hikkoshi cutover` and `hikkoshi rollback`: the switch from the old primary to the new one, in seconds,
//! with proof.
//!
//! Both are the same walk, in opposite directions (cutover: source → target; rollback: target → source over
//! the reverse stream that `cutover --reverse` started):
//! 1. Refuse early: the clone must be complete and streaming, the slot healthy, the fence possible.
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

pub mod fence;
pub mod hook;
pub mod proof;

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::{QualifiedName, quote_ident};
use crate::lsn::Lsn;
use crate::plan::{Selection, resolve};
use crate::session;
use crate::state::{self, step};
use crate::stream::follow::{Direction, FollowPlan, FollowReport};

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
}

/// What the switch did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SwitchReport {
    pub migration_id: String,
    /// `cutover` or `rollback`.
    pub step: String,
    pub new_primary: String,
    pub fence_means: String,
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
    pub verify: String,
    pub tables_verified: usize,
    pub rows_verified: i64,
    pub hooks: Vec<hook::HookRun>,
    /// With --reverse: the slot on the new primary that keeps its changes for the old one.
    pub reverse_slot: Option<String>,
    /// From the fence until the hooks were done: how long nothing could be written anywhere.
    pub write_pause_seconds: f64,
    pub seconds: f64,
    pub warnings: Vec<String>,
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
        for w in &self.warnings {
            writeln!(f, "  warning:    {w}")?;
        }
        writeln!(
            f,
            "  write pause: {:.3}s (fence → hooks done); total {:.1}s",
            self.write_pause_seconds, self.seconds
        )
    }
}

/// Which way a switch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Cutover,
    Rollback,
}

/// What a switch does, given what the target recorded.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Nothing to do, or nothing allowed: the reason, with what to do instead.
    Refuse(String),
    /// A rollback of a cutover that died after its fence: lift the fence, nothing else was done.
    UndoInterrupted,
    /// The whole walk.
    Walk,
    /// A run died after raising its fence: arm and raise again (both idempotent) and go on from there.
    Resume,
}

/// Decides from the recorded cutover step (and whether that cutover took `--reverse`) and the clone's phase.
fn decide(way: Way, recorded: Option<(&str, bool)>, phase: state::Phase) -> Decision {
    let refuse = |why: &str| Decision::Refuse(why.to_string());
    match (way, recorded) {
        (Way::Cutover, Some((step::SWITCHED, _))) => refuse(
            "this migration was cut over already: the target is the primary. `hikkoshi rollback` switches \
             back (after a cutover with --reverse)",
        ),
        (Way::Cutover, Some((step::ROLLING_BACK | step::ROLLED_BACK, _))) => refuse(
            "this migration was rolled back: to migrate again, `hikkoshi clean` and clone again",
        ),
        (Way::Cutover, _) if phase != state::Phase::Done => Decision::Refuse(format!(
            "the clone is not complete (phase {}): keep `hikkoshi clone --follow` running until every \
             table is copied and streaming, then cut over",
            phase.as_str()
        )),
        (Way::Cutover, Some((step::FENCED, _))) => Decision::Resume,
        (Way::Cutover, _) => Decision::Walk,
        (Way::Rollback, Some((step::FENCED, _))) => Decision::UndoInterrupted,
        (Way::Rollback, Some((step::SWITCHED, true))) => Decision::Walk,
        (Way::Rollback, Some((step::ROLLING_BACK, true))) => Decision::Resume,
        (Way::Rollback, Some((step::SWITCHED, false))) => refuse(
            "this cutover was made without --reverse: no stream kept the target's writes for the source, so \
             a rollback would lose them. Copy them back by hand, or clone the target into the source as a \
             new migration",
        ),
        (Way::Rollback, Some((step::ROLLED_BACK, _))) => {
            refuse("this migration was rolled back already: the source is the primary")
        }
        (Way::Rollback, _) => {
            refuse("there is no cutover to roll back: the source is still the primary")
        }
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
    let recorded = ctl
        .query_opt("SELECT step, reverse FROM hikkoshi.cutover", &[])
        .await
        .map_err(Error::sql(Side::Target, "reading the cutover state"))?
        .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)));
    let forward = FollowPlan {
        source: src_info.clone(),
        target: tgt_info.clone(),
        control: tgt_info.clone(),
        direction: Direction::Forward,
        slot: slot.clone(),
        publication: publication.clone(),
    };
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
    let decision = decide(
        way,
        recorded.as_ref().map(|(s, r)| (s.as_str(), *r)),
        migration.phase,
    );
    let resumed_fence = match decision {
        Decision::Refuse(why) => return Err(Error::Blocked(why)),
        Decision::UndoInterrupted => {
            report.warnings = fence::lift(&src, Side::Source).await?;
            drop_reverse(&ctl, &src, &forward.reverse()).await;
            set_step(&ctl, step::ABORTED, "rollback undid an interrupted cutover").await?;
            report.undid_interrupted_cutover = true;
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        Decision::Walk => false,
        Decision::Resume => true,
    };
    let (old_info, new_info, old_side, new_side, feeding) = match way {
        Way::Cutover => (
            src_info.clone(),
            tgt_info.clone(),
            Side::Source,
            Side::Target,
            forward,
        ),
        Way::Rollback => (
            tgt_info.clone(),
            src_info.clone(),
            Side::Target,
            Side::Source,
            forward.reverse(),
        ),
    };
    report.new_primary = new_info.to_string();
    let old = open(&old_info, old_side).await?;
    let new = open(&new_info, new_side).await?;

    // 1. Refuse early.
    slot_healthy(&old, old_side, &feeding.slot).await?;
    let resolved = selected(&migration, &old, old_side).await?;
    let fenced_relations = fence::relations(
        &old,
        old_side,
        &resolved
            .tables
            .iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>(),
    )
    .await?;
    if !resumed_fence {
        let warnings = fence::preflight(&old, old_side, &fenced_relations)
            .await?
            .into_result(old_side)?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        report.warnings.extend(warnings);
    }
    if way == Way::Cutover && opts.reverse {
        reverse_preflight(&new).await?;
    }

    // 2. Whoever streams does the catch-up: a running follower, or our own.
    let ours = state::try_lock(&ctl)
        .await
        .map_err(Error::sql(Side::Target, "taking the migration lock"))?;
    let follower_stop = CancellationToken::new();
    let mut follower = ours.then(|| {
        tokio::spawn(crate::stream::follow::run_on_own_thread(
            feeding.clone(),
            follower_stop.clone(),
        ))
    });
    tracing::info!(
        "{}: {} streams the changes",
        report.step,
        if ours {
            "this process"
        } else {
            "the running `hikkoshi clone --follow`"
        }
    );
    let deadline = Instant::now() + opts.timeout;
    let proof_publication = crate::stream::names::proof(&migration.id);
    let mut proof = None;
    if !resumed_fence {
        wait_for_lag(
            (&old, old_side),
            (&new, new_side),
            opts,
            &mut follower,
            &follower_stop,
            deadline,
        )
        .await?;
        if opts.verify != VerifyMode::None {
            let pair = Pair {
                old: (&old, old_side, &old_info),
                new: (&new, new_side, &new_info),
            };
            proof = prove_before_fence(
                opts,
                &pair,
                resolved.tables.clone(),
                &ctl,
                &feeding,
                &proof_publication,
                &mut report,
            )
            .await
            .inspect_err(|_| follower_stop.cancel())?;
            // the lag may have grown while the tables were hashed
            if let Err(e) = wait_for_lag(
                (&old, old_side),
                (&new, new_side),
                opts,
                &mut follower,
                &follower_stop,
                Instant::now() + opts.timeout,
            )
            .await
            {
                if let Some(p) = proof.take() {
                    p.abandon(&new).await;
                }
                return Err(e);
            }
        }
    }

    // 3. Fence: armed before the pause (the triggers, one table at a time, letting writes pass), raised
    // in it. The step is recorded before the raise, so that a crash from here on is found by the next run.
    let notice = fence::Notice {
        step: report.step.clone(),
        migration_id: migration.id.clone(),
        new_primary: format!(
            "{}:{}/{}",
            new_info.host(),
            new_info.port(),
            new_info.dbname()
        ),
        pass: feeding.fence_pass().to_string(),
    };
    let armed = Instant::now();
    if let Err(e) = fence::arm(
        &old,
        old_side,
        &fenced_relations,
        &notice,
        Instant::now() + opts.timeout,
    )
    .await
    {
        follower_stop.cancel();
        if let Some(p) = proof.take() {
            p.abandon(&new).await;
        }
        if !resumed_fence {
            let _ = fence::lift(&old, old_side).await;
        }
        return Err(e);
    }
    report.fence_arm_seconds = armed.elapsed().as_secs_f64();
    report.tables_fenced = fenced_relations.len();
    match way {
        Way::Cutover => {
            ctl.execute(
                "INSERT INTO hikkoshi.cutover (step, reverse, started_at)
                 VALUES ($1, $2, now())
                 ON CONFLICT (one) DO UPDATE SET step = $1, reverse = $2,
                     started_at = now(), finished_at = NULL, message = NULL",
                &[&step::FENCED, &opts.reverse],
            )
            .await
            .map_err(Error::sql(Side::Target, "recording the cutover"))?;
        }
        Way::Rollback => {
            ctl.execute(
                "UPDATE hikkoshi.cutover SET step = $1, message = NULL",
                &[&step::ROLLING_BACK],
            )
            .await
            .map_err(Error::sql(Side::Target, "recording the rollback"))?;
        }
    }
    let lag_before = lag_bytes(&old, old_side, &new, new_side)
        .await
        .unwrap_or_default();
    let fenced_at = Instant::now();
    // the catch-up gets its own --timeout (the first part of the proof may have taken longer)
    let deadline = fenced_at + opts.timeout;
    let undo = Undo {
        way,
        ctl: &ctl,
        old: &old,
        new: &new,
        proof_publication: &proof_publication,
        old_side,
        follower_stop: follower_stop.clone(),
    };
    let f = match fence::raise(&old, old_side, opts.timeout).await {
        Ok(f) => f,
        Err(e) => return Err(undo.run(e, None).await),
    };
    report.fence_seconds = fenced_at.elapsed().as_secs_f64();
    report.fence_means = f.means.clone();
    report.sessions_ended = f.sessions_ended.clone();
    for w in &f.warnings {
        tracing::warn!("{w}");
    }
    report.warnings.extend(f.warnings);
    report.lag_bytes_at_fence = lag_before;
    tracing::info!(
        "{}: writes fenced on the {old_side} ({})",
        report.step,
        f.means
    );
    let marker = match fence_marker(&old, old_side, &migration.id).await {
        Ok(m) => m,
        Err(e) => return Err(undo.run(e, None).await),
    };
    report.fence_lsn = marker.to_string();
    let _ = ctl
        .execute(
            "UPDATE hikkoshi.cutover SET fence_lsn = $1::text::pg_lsn, fence_means = $2, fenced_at = now()",
            &[&marker.to_string(), &f.means],
        )
        .await;
    crate::failpoint::hit(crate::failpoint::CUTOVER_FENCED);

    // 4. Catch up to the marker. A source of 14+ sends the marker through the stream, and only the applied
    // position proves it arrived; before 14 the in-sync position has to do.
    let old_version: i32 = old
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    let messages = old_version >= 140000;
    if !messages {
        report.warnings.push(format!(
            "the {old_side} runs PostgreSQL {}, whose pgoutput carries no logical messages (14+): the \
             catch-up waited for the stream's confirmed position to pass the fence marker, not for the \
             marker itself",
            old_version / 10000
        ));
    }
    loop {
        let done: bool = match new
            .query_one(
                "SELECT CASE WHEN $2 THEN applied_lsn ELSE greatest(applied_lsn, synced_lsn) END
                        >= $1::text::pg_lsn FROM hikkoshi.stream",
                &[&marker.to_string(), &messages],
            )
            .await
        {
            Ok(r) => r.get(0),
            Err(e) => {
                let e = Error::sql(new_side, "reading the applied position")(e);
                return Err(undo.run(e, None).await);
            }
        };
        if done {
            break;
        }
        if let Some(e) = follower_failed(&mut follower).await {
            return Err(undo.run(e, None).await);
        }
        if Instant::now() > deadline || opts.stop.is_cancelled() {
            let e = Error::Blocked(format!(
                "the {new_side} did not apply everything up to the fence (LSN {marker}) within {}s{}",
                opts.timeout.as_secs(),
                if opts.stop.is_cancelled() {
                    " (interrupted)"
                } else {
                    ""
                }
            ));
            return Err(undo.run(e, None).await);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    report.catch_up_seconds = fenced_at.elapsed().as_secs_f64();
    let verify_started = Instant::now();

    // 5. Sequences, read now that the fence holds, 6. verify.
    let sequences = match crate::sequence::existing(&new, new_side, &resolved.sequences).await {
        Ok(s) => s,
        Err(e) => return Err(undo.run(e, None).await),
    };
    let positions = match crate::sequence::read(&old, old_side, &sequences).await {
        Ok(positions) => positions,
        Err(e) => return Err(undo.run(e, None).await),
    };
    if let Err(e) = crate::sequence::apply(&new, &positions).await {
        return Err(undo.run(e, None).await);
    }
    report.sequences_moved = positions.len();
    if opts.verify != VerifyMode::None {
        let streamed = streamed_tables(&new).await;
        let tables: Vec<_> = resolved
            .tables
            .iter()
            .filter(|t| opts.verify == VerifyMode::Full || streamed.contains(&t.name))
            .cloned()
            .collect();
        crate::failpoint::pause(crate::failpoint::CUTOVER_VERIFY, &opts.stop).await;
        let outcome = match proof.take() {
            Some(p) => p
                .conclude(
                    (&old, old_side),
                    (&new, new_side),
                    tables,
                    crate::verify::SourceSequences::Fenced(&positions),
                    opts.jobs,
                    opts.timeout,
                )
                .await
                .map(|(v, pause)| {
                    report.rows_compared_in_pause = pause.rows_compared;
                    report.tables_hashed_in_pause = pause.hashed_whole;
                    if let Some(why) = pause.streams_failed {
                        // the first part's hashes did not count: everything was hashed here
                        report.rows_hashed_before_fence = 0;
                        report.warnings.push(format!(
                            "the proof's key streams failed ({why}): the tables were hashed in the \
                             write pause"
                        ));
                    }
                    v
                }),
            None => {
                crate::verify::compare(
                    &old_info,
                    &new_info,
                    tables,
                    crate::verify::SourceSequences::Fenced(&positions),
                    opts.jobs,
                )
                .await
            }
        };
        let v = match outcome {
            Ok(v) => v,
            Err(e) => return Err(undo.run(e, None).await),
        };
        report.tables_verified = v.tables.len();
        report.rows_verified =
            report.rows_hashed_before_fence + v.tables.iter().map(|t| t.source_rows).sum::<i64>();
        if !v.equal() {
            let e = Error::Blocked(format!(
                "the fenced verification found differences, so the {} was not done:\n{v}",
                report.step
            ));
            return Err(undo.run(e, None).await);
        }
    }

    report.verify_seconds = verify_started.elapsed().as_secs_f64();

    // 7. The reverse stream, before the application can write on the new primary.
    let reverse = (way == Way::Cutover && opts.reverse).then(|| feeding.reverse());
    if let Some(plan) = &reverse {
        if let Err(e) = setup_reverse(&ctl, &old, &new, &feeding, plan).await {
            return Err(undo.run(e, reverse.as_ref()).await);
        }
        report.reverse_slot = Some(plan.slot.clone());
    }

    // `nextval` on the fenced old primary is no write: a session may still take values there. The new
    // primary takes no writes before the hooks, so whatever moved since the read above moves again now.
    match crate::sequence::advanced(&old, old_side, &positions).await {
        Ok(moved) if !moved.is_empty() => {
            if let Err(e) = crate::sequence::apply(&new, &moved).await {
                return Err(undo.run(e, reverse.as_ref()).await);
            }
            report.warnings.push(format!(
                "{} sequence(s) advanced on the {old_side} after the fence (nextval without a row, e.g. {}):                  moved again before the hooks; values the {old_side} hands out after this are in no row                  of it",
                moved.len(),
                moved[0].name
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(undo.run(e, reverse.as_ref()).await),
    }

    // 8. The user's switch.
    let (step_name, fence_lsn) = (report.step.clone(), report.fence_lsn.clone());
    let ctx = hook::HookContext {
        step: &step_name,
        migration_id: &migration.id,
        fence_lsn: &fence_lsn,
        new_primary: &new_info,
        old_primary: &old_info,
    };
    for h in &opts.hooks {
        match hook::run(h, &ctx, opts.timeout, &opts.stop).await {
            Ok(run) => report.hooks.push(run),
            Err(why) => {
                let e = Error::Blocked(format!("{why}: the {} was undone", report.step));
                return Err(undo.run(e, reverse.as_ref()).await);
            }
        }
    }
    if opts.stop.is_cancelled() {
        let e = Error::Blocked(format!(
            "the {} was interrupted before its end",
            report.step
        ));
        return Err(undo.run(e, reverse.as_ref()).await);
    }

    // 9. The point of no return: from here on, everything runs to completion.
    report.write_pause_seconds = fenced_at.elapsed().as_secs_f64();
    crate::failpoint::hit(crate::failpoint::CUTOVER_POINT_OF_NO_RETURN);
    let done_step = match way {
        Way::Cutover => step::SWITCHED,
        Way::Rollback => step::ROLLED_BACK,
    };
    ctl.execute(
        "UPDATE hikkoshi.cutover SET step = $1, finished_at = now(), pause_seconds = $2",
        &[&done_step, &report.write_pause_seconds],
    )
    .await
    .map_err(Error::sql(Side::Target, "recording the end of the cutover"))?;
    let _ = state::event(
        &ctl,
        &report.step,
        &format!(
            "{} done: write pause {:.3}s, fence at {}",
            report.step, report.write_pause_seconds, report.fence_lsn
        ),
    )
    .await;
    if way == Way::Rollback {
        // the source is the primary again
        report.warnings.extend(fence::lift(&new, new_side).await?);
    }
    follower_stop.cancel();
    if let Some(handle) = follower.take() {
        let _ = handle.await;
    }
    // The stream that fed the new primary is over: its slot would hold WAL on the old one for ever.
    if let Err(w) = drop_stream(&old, old_side, &feeding.slot, &feeding.publication).await {
        report.warnings.push(w);
    }
    // the proof's streams ended in the pause; their publication goes now, outside it
    proof::drop_publication(&new, &proof_publication).await;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What to undo before the point of no return.
struct Undo<'a> {
    way: Way,
    ctl: &'a Client,
    old: &'a Client,
    new: &'a Client,
    proof_publication: &'a str,
    old_side: Side,
    follower_stop: CancellationToken,
}

impl Undo<'_> {
    /// Lifts the fence, removes a reverse stream set up for this run, records the step, and returns the
    /// error to report (with the undo's own failure, if any, added).
    async fn run(self, e: Error, reverse: Option<&FollowPlan>) -> Error {
        let mut failed = Vec::new();
        match fence::lift(self.old, self.old_side).await {
            Ok(warnings) => warnings.iter().for_each(|w| tracing::warn!("{w}")),
            Err(u) => failed.push(crate::error::chain(&u)),
        }
        if let Some(plan) = reverse {
            drop_reverse(self.ctl, self.old, plan).await;
        }
        proof::drop_publication(self.new, self.proof_publication).await;
        let back = match self.way {
            Way::Cutover => step::ABORTED,
            Way::Rollback => step::SWITCHED,
        };
        let why = crate::error::chain(&e);
        let _ = set_step(self.ctl, back, &format!("undone: {why}")).await;
        self.follower_stop.cancel();
        if failed.is_empty() {
            tracing::warn!("undone: the {} is writable again", self.old_side);
            e
        } else {
            Error::Blocked(format!(
                "{why}; and lifting the write fence failed too ({}): the {} still refuses writes. Run \
                 `hikkoshi rollback` (or `hikkoshi clean`) to lift it, or `SELECT setval('hikkoshi_fence.up', \
                 1, false)` on it",
                failed.join("; "),
                self.old_side
            ))
        }
    }
}

/// The stream's slot must exist and be able to stream.
async fn slot_healthy(old: &Client, side: Side, slot: &str) -> Result<(), Error> {
    let row = old
        .query_opt(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(Error::sql(side, "reading the replication slot"))?;
    match row.map(|r| r.get::<_, String>(0)) {
        None => Err(Error::Blocked(format!(
            "the replication slot {slot} does not exist on the {side}: the change stream is broken and a \
             cutover would lose writes. Nothing was fenced. Run `hikkoshi clean` and clone again"
        ))),
        Some(s) if s == "lost" => Err(Error::Blocked(format!(
            "the replication slot {slot} on the {side} was invalidated (the server removed WAL it needed, \
             see max_slot_wal_keep_size): the target misses changes and a cutover would lose them. Nothing \
             was fenced. Run `hikkoshi clean` and clone again"
        ))),
        Some(_) => Ok(()),
    }
}

/// The new primary must be able to hold a slot for the reverse stream.
async fn reverse_preflight(new: &Client) -> Result<(), Error> {
    let row = new
        .query_one(
            "SELECT current_setting('wal_level'),
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_setting('max_replication_slots')::int
                      - (SELECT count(*) FROM pg_replication_slots)::int",
            &[],
        )
        .await
        .map_err(Error::sql(
            Side::Target,
            "checking the target for a reverse stream",
        ))?;
    let (wal_level, may_replicate, free): (String, bool, i32) =
        (row.get(0), row.get(1), row.get(2));
    let mut problems = Vec::new();
    if wal_level != "logical" {
        problems.push(format!(
            "wal_level is {wal_level}: set `wal_level = logical` on the target and restart it"
        ));
    }
    if !may_replicate {
        problems.push(
            "the target's role lacks REPLICATION: `ALTER ROLE <role> REPLICATION` (rds_replication on RDS)"
                .into(),
        );
    }
    if free < 1 {
        problems.push("no free replication slot on the target: raise max_replication_slots".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Blocked(format!(
            "--reverse needs a logical slot on the target, which it cannot have: {}. Nothing was fenced",
            problems.join("; ")
        )))
    }
}

/// The stream's lag: the old primary's WAL position minus what the new one has applied or is in sync with.
async fn lag_bytes(
    old: &Client,
    old_side: Side,
    new: &Client,
    new_side: Side,
) -> Result<i64, Error> {
    let pos: String = old
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(Error::sql(old_side, "reading the WAL position"))?
        .get(0);
    Ok(new
        .query_one(
            "SELECT greatest(0, $1::text::pg_lsn - greatest(applied_lsn, synced_lsn))::bigint
             FROM hikkoshi.stream",
            &[&pos],
        )
        .await
        .map_err(Error::sql(new_side, "reading the stream state"))?
        .get(0))
}

/// A transactional logical message, after the fence: once the new primary has applied it, it has applied
/// every transaction that committed before the fence. (A source before 14 cannot send messages through
/// pgoutput; there the follower's in-sync position passes the marker as soon as it has caught up.)
async fn fence_marker(old: &Client, side: Side, migration: &str) -> Result<Lsn, Error> {
    let lsn: String = old
        .query_one(
            "SELECT pg_logical_emit_message(true, 'hikkoshi', $1)::text",
            &[&format!("fence {migration}")],
        )
        .await
        .map_err(Error::sql(side, "writing the fence marker"))?
        .get(0);
    lsn.parse()
        .map_err(|e| Error::Blocked(format!("the fence marker's LSN: {e}")))
}

/// Whether our own follower stopped with an error (it only stops by itself on one).
async fn follower_failed(
    follower: &mut Option<tokio::task::JoinHandle<Result<FollowReport, Error>>>,
) -> Option<Error> {
    if !follower.as_ref().is_some_and(|h| h.is_finished()) {
        return None;
    }
    let handle = follower.take()?;
    match handle.await {
        Ok(Ok(_)) => Some(Error::Blocked(
            "the follower stopped before the cutover was done".into(),
        )),
        Ok(Err(e)) => Some(e),
        Err(e) => Some(Error::Blocked(format!("the follower failed: {e}"))),
    }
}

/// The two servers of a switch, each with its side and connection info: the old primary and the new one.
struct Pair<'a> {
    old: (&'a Client, Side, &'a ConnInfo),
    new: (&'a Client, Side, &'a ConnInfo),
}

/// The first part of the proof, while the application still writes (see `proof`). Returns the selection
/// and the prepared proof, or no proof (with a warning in the report) when it could not be made: then the
/// tables are hashed in the pause.
async fn prove_before_fence(
    opts: &CutoverOptions,
    pair: &Pair<'_>,
    tables: Vec<crate::catalog::Table>,
    ctl: &Client,
    feeding: &FollowPlan,
    proof_publication: &str,
    report: &mut SwitchReport,
) -> Result<Option<proof::Prepared>, Error> {
    let ((old, old_side, old_info), (new, new_side, new_info)) = (pair.old, pair.new);
    let streamed = streamed_tables(new).await;
    let plan = proof::Plan {
        old: old_info.clone(),
        new: new_info.clone(),
        old_side,
        new_side,
        old_publication: feeding.publication.clone(),
        new_publication: proof_publication.to_string(),
        // the proof's slots share its publication's name, hikkoshi_<id>_proof
        slot: proof_publication.to_string(),
        tables: tables.clone(),
        hash: tables
            .iter()
            .filter(|t| opts.verify == VerifyMode::Full || streamed.contains(&t.name))
            .map(|t| t.name.clone())
            .collect(),
        ranges: crate::verify::key_ranges(ctl).await.unwrap_or_default(),
        jobs: opts.jobs,
        wait: opts.timeout.min(Duration::from_secs(30)),
    };
    let prepared = tokio::select! {
        p = proof::prepare(plan, old, new) => p,
        _ = opts.stop.cancelled() => Err(Error::Interrupted),
    };
    match prepared {
        Ok(p) => {
            tracing::info!(
                "{}: {} row(s) hashed in snapshots before the fence in {:.1}s",
                report.step,
                p.rows_hashed,
                p.seconds
            );
            report.verify_before_fence_seconds = p.seconds;
            report.rows_hashed_before_fence = p.rows_hashed;
            crate::failpoint::pause(crate::failpoint::CUTOVER_PROVED_BEFORE_FENCE, &opts.stop)
                .await;
            Ok(Some(p))
        }
        Err(e) => {
            proof::drop_publication(new, proof_publication).await;
            if opts.stop.is_cancelled() {
                return Err(Error::Blocked(format!(
                    "interrupted before the fence: nothing was fenced, the {old_side} is the primary as \
                     before"
                )));
            }
            let w = format!(
                "the proof could not be prepared before the fence ({}): the tables were hashed in the \
                 write pause",
                crate::error::chain(&e)
            );
            tracing::warn!("{w}");
            report.warnings.push(w);
            Ok(None)
        }
    }
}

/// Waits until the stream's lag is under `--max-lag`; nothing is fenced yet, so giving up changes nothing.
async fn wait_for_lag(
    (old, old_side): (&Client, Side),
    (new, new_side): (&Client, Side),
    opts: &CutoverOptions,
    follower: &mut Option<tokio::task::JoinHandle<Result<FollowReport, Error>>>,
    follower_stop: &CancellationToken,
    deadline: Instant,
) -> Result<(), Error> {
    loop {
        let lag = lag_bytes(old, old_side, new, new_side).await?;
        if lag <= opts.max_lag {
            return Ok(());
        }
        if let Some(e) = follower_failed(follower).await {
            return Err(e);
        }
        if Instant::now() > deadline || opts.stop.is_cancelled() {
            follower_stop.cancel();
            return Err(Error::Blocked(format!(
                "the stream's lag ({lag} bytes) did not drop under --max-lag {} within {}s{}: nothing \
                 was fenced, the {old_side} is the primary as before. Let the follower catch up (see \
                 `hikkoshi status`) and run the cutover again, or raise --max-lag/--timeout",
                opts.max_lag,
                opts.timeout.as_secs(),
                if opts.stop.is_cancelled() {
                    " (interrupted)"
                } else {
                    ""
                }
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The migration's tables and sequences, resolved on the old primary's catalog.
async fn selected(
    m: &state::Migration,
    old: &Client,
    side: Side,
) -> Result<crate::plan::Resolved, Error> {
    let selection = selection_of(m)?;
    let cat = Catalog::load(old)
        .await
        .map_err(Error::sql(side, "reading the catalog"))?;
    resolve(&cat, &selection)
}

/// The migration's table selection, as recorded by the clone.
fn selection_of(m: &state::Migration) -> Result<Selection, Error> {
    let list = |key: &str| -> Vec<String> {
        m.options
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Selection::parse(&list("include"), &list("exclude")).map_err(|e| Error::Usage(format!("{e}")))
}

/// Tables the stream changed since the copy, as the applier marked them on the downstream server.
async fn streamed_tables(new: &Client) -> std::collections::HashSet<QualifiedName> {
    new.query(
        "SELECT schema_name, table_name FROM hikkoshi.tables WHERE streamed",
        &[],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect()
    })
    .unwrap_or_default()
}

/// Publication and slot on the new primary, stream state on the old one.
async fn setup_reverse(
    ctl: &Client,
    old: &Client,
    new: &Client,
    forward: &FollowPlan,
    plan: &FollowPlan,
) -> Result<(), Error> {
    let tables: Vec<String> = old
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = $1",
            &[&forward.publication],
        )
        .await
        .map_err(Error::sql(Side::Source, "reading the publication's tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if tables.is_empty() {
        return Err(Error::Blocked(format!(
            "the publication {} on the source lists no table: nothing to stream back",
            forward.publication
        )));
    }
    new.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {pubname}; CREATE PUBLICATION {pubname} FOR TABLE {} \
         WITH (publish_via_partition_root = true)",
        tables.join(", "),
        pubname = quote_ident(&plan.publication)
    ))
    .await
    .map_err(Error::sql(Side::Target, "creating the reverse publication"))?;
    let lsn: String = new
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&plan.slot],
        )
        .await
        .map_err(Error::sql(Side::Target, "creating the reverse slot"))?
        .get(0);
    state::create(old).await.map_err(Error::sql(
        Side::Source,
        "creating the reverse stream's state",
    ))?;
    let rows = ctl
        .query(
            "SELECT schema_name, table_name, root_schema, root_name, copy_format FROM hikkoshi.tables",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Target, "reading the migrated tables"))?;
    let tx = "BEGIN; TRUNCATE hikkoshi.stream; DELETE FROM hikkoshi.tables;";
    old.batch_execute(tx)
        .await
        .map_err(Error::sql(Side::Source, "recording the reverse stream"))?;
    for r in &rows {
        old.execute(
            "INSERT INTO hikkoshi.tables (schema_name, table_name, root_schema, root_name, state, copy_format)
             VALUES ($1, $2, $3, $4, 'streaming', $5)",
            &[
                &r.get::<_, String>(0),
                &r.get::<_, String>(1),
                &r.get::<_, Option<String>>(2),
                &r.get::<_, Option<String>>(3),
                &r.get::<_, String>(4),
            ],
        )
        .await
        .map_err(Error::sql(Side::Source, "recording the reverse stream"))?;
    }
    old.execute(
        "INSERT INTO hikkoshi.stream (slot_name, publication, start_lsn, applied_lsn, synced_lsn, source_lsn)
         VALUES ($1, $2, $3::text::pg_lsn, $3::text::pg_lsn, $3::text::pg_lsn, $3::text::pg_lsn)",
        &[&plan.slot, &plan.publication, &lsn],
    )
    .await
    .map_err(Error::sql(Side::Source, "recording the reverse stream"))?;
    old.batch_execute("COMMIT")
        .await
        .map_err(Error::sql(Side::Source, "recording the reverse stream"))?;
    Ok(())
}

/// Removes a reverse stream set up by a cutover that was then undone (best effort: `clean` removes leftovers).
async fn drop_reverse(ctl: &Client, old: &Client, plan: &FollowPlan) {
    let _ = drop_stream(ctl, Side::Target, &plan.slot, &plan.publication).await;
    let _ = old
        .batch_execute("DROP SCHEMA IF EXISTS hikkoshi CASCADE")
        .await;
}

/// Drops a finished stream's slot and publication on its upstream, once its follower has let go of it.
async fn drop_stream(
    upstream: &Client,
    side: Side,
    slot: &str,
    publication: &str,
) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let r = upstream
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        let dropped = match r {
            Ok(None) => true,
            Ok(Some(row)) if !row.get::<_, bool>(0) => upstream
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .is_ok(),
            _ => false,
        };
        if dropped {
            break;
        }
        if Instant::now() > until {
            return Err(format!(
                "the slot {slot} on the {side} is still in use, so it was left; `hikkoshi clean` removes it \
                 (it holds WAL on the {side} until then)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    upstream
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            quote_ident(publication)
        ))
        .await
        .map_err(|e| {
            format!(
                "the publication {publication} on the {side} could not be dropped ({}); `hikkoshi clean` \
                 removes it",
                crate::error::chain(&e)
            )
        })
}

async fn set_step(ctl: &Client, to: &str, why: &str) -> Result<(), Error> {
    ctl.execute(
        "UPDATE hikkoshi.cutover SET step = $1, message = $2",
        &[&to, &why],
    )
    .await
    .map_err(Error::sql(Side::Target, "recording the cutover step"))?;
    let _ = state::event(ctl, "cutover", why).await;
    Ok(())
}

#[cfg(test)]
mod decision_tests {
    use super::*;
    use crate::state::Phase;

    #[test]
    fn a_cutover_walks_resumes_or_refuses_by_the_recorded_step() {
        assert_eq!(decide(Way::Cutover, None, Phase::Done), Decision::Walk);
        assert_eq!(
            decide(Way::Cutover, Some((step::ABORTED, false)), Phase::Done),
            Decision::Walk
        );
        assert_eq!(
            decide(Way::Cutover, Some((step::FENCED, false)), Phase::Done),
            Decision::Resume
        );
        for s in [step::SWITCHED, step::ROLLING_BACK, step::ROLLED_BACK] {
            assert!(matches!(
                decide(Way::Cutover, Some((s, true)), Phase::Done),
                Decision::Refuse(_)
            ));
        }
        let Decision::Refuse(why) = decide(Way::Cutover, None, Phase::Copy) else {
            panic!("an incomplete clone was cut over");
        };
        assert!(why.contains("not complete"), "{why}");
    }

    #[test]
    fn a_rollback_needs_a_reverse_stream_and_undoes_an_interrupted_cutover() {
        assert_eq!(
            decide(Way::Rollback, Some((step::FENCED, false)), Phase::Done),
            Decision::UndoInterrupted
        );
        assert_eq!(
            decide(Way::Rollback, Some((step::SWITCHED, true)), Phase::Done),
            Decision::Walk
        );
        assert_eq!(
            decide(Way::Rollback, Some((step::ROLLING_BACK, true)), Phase::Done),
            Decision::Resume
        );
        let Decision::Refuse(why) =
            decide(Way::Rollback, Some((step::SWITCHED, false)), Phase::Done)
        else {
            panic!("a rollback without a reverse stream went ahead");
        };
        assert!(why.contains("without --reverse"), "{why}");
        for r in [
            None,
            Some((step::ABORTED, false)),
            Some((step::ROLLED_BACK, true)),
        ] {
            assert!(matches!(
                decide(Way::Rollback, r, Phase::Done),
                Decision::Refuse(_)
            ));
        }
    }
}
