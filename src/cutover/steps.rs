//! The steps of a switch, in the order `switch` takes them (the module doc of `cutover` says why each is
//! there). A `Switch` holds both servers, the stream that feeds the new primary and what has been done so
//! far; each step is one method. Every step after the fence is raised runs inside `fenced`, so a failure
//! there is undone from one place (`undo`): the fence lifted, a reverse stream removed, the step recorded.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::decide::Way;
use super::servers::{
    Server, drop_stream, fence_marker, follower_failed, lag_bytes, selected, slot_healthy,
};
use super::{CutoverOptions, SwitchReport, VerifyMode, fence, hook, pgbouncer, proof, reverse};
use crate::error::{Error, Side};
use crate::ident::QualifiedName;
use crate::plan::Resolved;
use crate::sequence::Position;
use crate::state::{self, Step};
use crate::stream::follow::{FollowPlan, FollowReport};

/// A switch under way.
pub(super) struct Switch<'a> {
    pub(super) opts: &'a CutoverOptions,
    pub(super) way: Way,
    /// The session that records the state (on the target, whichever way).
    pub(super) ctl: Client,
    /// The primary until now, and the primary after the switch.
    pub(super) old: Server,
    pub(super) new: Server,
    /// The stream that feeds the new primary.
    pub(super) feeding: FollowPlan,
    pub(super) migration: state::Migration,
    pub(super) report: SwitchReport,
    /// The migration's tables and sequences, and the relations the fence covers.
    resolved: Resolved,
    fenced_relations: Vec<String>,
    /// Our own follower, when no `clone --follow` runs.
    follower: Option<JoinHandle<Result<FollowReport, Error>>>,
    follower_stop: CancellationToken,
    proof_publication: String,
    proof: Option<proof::Prepared>,
    /// The reverse stream, once this run started setting it up (the undo removes it).
    reverse: Option<FollowPlan>,
    /// The DDL fence, once this run raised it (or found it cannot), and whether the schema was compared
    /// behind it (then the pause need not compare it again).
    ddl: Option<fence::ddl::DdlFence>,
    shape_fenced: bool,
    /// Materialized views whose contents differed before the pause (name, rows on the old and the new
    /// primary), in refresh order.
    matviews_differing: Vec<(String, i64, i64)>,
    /// Whether the clone kept the source's owners (then the shape comparison includes them), and the roles
    /// `--role-map` renamed, old primary's name → new primary's: read once, not in the pause.
    owners_kept: bool,
    renamed: Vec<(String, String)>,
    /// `--pgbouncer`: the poolers in front of the old primary, paused around the fence.
    poolers: Vec<pgbouncer::Pooler>,
}

impl<'a> Switch<'a> {
    /// Opens both servers and resolves the selection on the old primary.
    pub(super) async fn open(
        opts: &'a CutoverOptions,
        way: Way,
        ctl: Client,
        (old, new): (Server, Server),
        feeding: FollowPlan,
        migration: state::Migration,
        mut report: SwitchReport,
    ) -> Result<Switch<'a>, Error> {
        report.new_primary = new.info.to_string();
        let resolved = selected(&migration, &old.client, old.side).await?;
        let proof_publication = crate::stream::names::proof(&migration.id);
        let owners_kept = state::roles::owners_kept(&ctl).await;
        // `--role-map` renamed roles from the source to the target: a rollback compares the other way
        let mut renamed = state::roles::renamed(&ctl).await;
        if way == Way::Rollback {
            renamed = renamed.into_iter().map(|(a, b)| (b, a)).collect();
        }
        Ok(Switch {
            opts,
            way,
            ctl,
            old,
            new,
            feeding,
            migration,
            report,
            resolved,
            fenced_relations: Vec::new(),
            follower: None,
            follower_stop: CancellationToken::new(),
            proof_publication,
            proof: None,
            reverse: None,
            ddl: None,
            shape_fenced: false,
            matviews_differing: Vec::new(),
            owners_kept,
            renamed,
            poolers: Vec::new(),
        })
    }

    /// Step 1: Refuse early: a broken slot, a fence that cannot hold, a new primary that cannot keep a reverse
    /// slot. Nothing is changed yet. (The roles come right after: `logins`.)
    pub(super) async fn refuse_early(&mut self, resumed_fence: bool) -> Result<(), Error> {
        let (old, old_side) = self.old.at();
        slot_healthy(old, old_side, &self.feeding.slot).await?;
        self.fenced_relations = self.relations_to_fence().await?;
        if !resumed_fence {
            let warnings = fence::preflight(old, old_side, &self.fenced_relations)
                .await?
                .into_result(old_side)?;
            for w in &warnings {
                tracing::warn!("{w}");
            }
            self.report.warnings.extend(warnings);
        }
        if self.way == Way::Cutover && self.opts.reverse {
            reverse::preflight(&self.new.client).await?;
        }
        if !self.opts.pgbouncer.is_empty() {
            let (poolers, warnings) =
                pgbouncer::connect(&self.opts.pgbouncer, self.old.info.dbname()).await?;
            for w in &warnings {
                tracing::warn!("{w}");
            }
            self.report.warnings.extend(warnings);
            self.poolers = poolers;
        }
        Ok(())
    }

    /// In the pause, where DDL was not fenced: a selected table created on the old primary since the
    /// selection was resolved is neither fenced nor compared, so it refuses the switch.
    async fn no_table_created_since(&self) -> Result<(), Error> {
        let (old, old_side) = self.old.at();
        let created =
            super::servers::created_since(&self.migration, old, old_side, &self.fenced_relations)
                .await?;
        if created.is_empty() {
            return Ok(());
        }
        Err(Error::Blocked(format!(
            "table(s) {} were created on the {old_side} during the {}, which cannot refuse schema changes \
             there (its role may not create event triggers): their writes would not be fenced. Nothing was \
             switched; run the {} again once the deploy is done",
            created.join(", "),
            self.report.step,
            self.report.step
        )))
    }

    /// Brings the new primary's large objects level with the old one's (see `large_objects`); `in_pause`
    /// says which of the two passes this is, for the report.
    async fn sync_large_objects(&mut self, in_pause: bool) -> Result<(), Error> {
        let done = crate::large_objects::sync(self.old.at(), self.new.at(), &self.renamed).await?;
        for w in &done.warnings {
            tracing::warn!("{w}");
        }
        self.report.warnings.extend(done.warnings.iter().cloned());
        if done.compared > 0 {
            let line = format!(
                "{} compared, {} copied, {} removed in {:.3}s",
                done.compared, done.copied, done.removed, done.seconds
            );
            if in_pause {
                self.report.large_objects_in_pause = line;
            } else {
                self.report.large_objects_before_fence = line;
            }
        }
        Ok(())
    }

    /// In the pause, once the tables are equal: the materialized views that differed are refreshed on both
    /// servers (in dependency order), so that both hold what a refresh at the switch gives.
    async fn refresh_differing_matviews(&mut self) -> Result<(), Error> {
        if !self.shape_fenced {
            // REFRESH was not refused on the old primary: compare again
            let levels = crate::matviews::levels(&self.old.client, self.old.side).await?;
            self.matviews_differing =
                crate::matviews::differing(self.old.at(), self.new.at(), &levels).await?;
        }
        if self.matviews_differing.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self
            .matviews_differing
            .iter()
            .map(|(n, _, _)| n.clone())
            .collect();
        let (a, b) = futures_util::future::join(
            crate::matviews::refresh(&self.old.client, self.old.side, &names),
            crate::matviews::refresh(&self.new.client, self.new.side, &names),
        )
        .await;
        a?;
        b?;
        self.report.matviews_refreshed = self
            .matviews_differing
            .iter()
            .map(|(n, o, w)| {
                format!(
                    "{n} ({o} row(s) on the {}, {w} on the {}): refreshed on both",
                    self.old.side, self.new.side
                )
            })
            .collect();
        Ok(())
    }

    /// What the fence tells the application.
    fn notice(&self) -> fence::Notice {
        fence::Notice {
            step: self.report.step.clone(),
            migration_id: self.migration.id.clone(),
            new_primary: format!(
                "{}:{}/{}",
                self.new.info.host(),
                self.new.info.port(),
                self.new.info.dbname()
            ),
        }
    }

    /// `same_shape` before the fence: a difference may still be in the stream (DDL the capture carries), so
    /// on a difference, wait until the new side has applied everything the old one holds now, and compare
    /// again.
    async fn same_shape_when_applied(&mut self, deadline: Instant) -> Result<(), Error> {
        if self.same_shape("nothing was fenced").await.is_ok() {
            return Ok(());
        }
        let (old, old_side) = self.old.at();
        let now: String = old
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(Error::sql(old_side, "reading the WAL position"))?
            .get(0);
        let new_side = self.new.side;
        while Instant::now() < deadline && !self.opts.stop.is_cancelled() {
            let done = state::stream::reached(&self.new.client, &now, false)
                .await
                .map_err(Error::sql(new_side, "reading the applied position"))?;
            if done {
                break;
            }
            if let Some(e) = follower_failed(&mut self.follower).await {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.same_shape("nothing was fenced").await
    }

    /// The selected tables have the same columns, indexes and constraints on both servers, whatever
    /// `--verify` says: equal rows in a table whose shape differs would still break the application after
    /// the switch (a column added on the old primary, with no row changed since, is in no stream).
    async fn same_shape(&self, then: &str) -> Result<(), Error> {
        let names: Vec<QualifiedName> = self
            .resolved
            .tables
            .iter()
            .map(|t| t.name.clone())
            .collect();
        let access = crate::verify::shape::Access {
            compare: self.owners_kept,
            renamed: &self.renamed,
        };
        let differences =
            crate::verify::shape::differences(self.old.at(), self.new.at(), &names, access).await?;
        if differences.is_empty() {
            return Ok(());
        }
        Err(Error::Blocked(format!(
            "the tables' schema differs between the {old} and the {new}, so the {step} was not done \
             ({then}):\n- {}\nThe stream did not carry these changes: DDL is captured only where the role \
             that started the stream may create event triggers (`hikkoshi check` says which). Apply the \
             same DDL on the {new}, then run the {step} again (`hikkoshi verify` lists the differences)",
            differences.join("\n- "),
            old = self.old.side,
            new = self.new.side,
            step = self.report.step,
        )))
    }

    /// Step 2: Whoever streams does the catch-up: a running `clone --follow` (it holds the migration lock), or
    /// a follower of our own. Then, unless resuming a raised fence, wait for the lag and make the first
    /// part of the proof while the application still writes.
    pub(super) async fn catch_up(&mut self, resumed_fence: bool) -> Result<(), Error> {
        let ours = state::try_lock(&self.ctl)
            .await
            .map_err(Error::sql(Side::Target, "taking the migration lock"))?;
        self.follower = ours.then(|| {
            tokio::spawn(crate::stream::follow::run_on_own_thread(
                self.feeding.clone(),
                self.follower_stop.clone(),
            ))
        });
        tracing::info!(
            "{}: {} streams the changes",
            self.report.step,
            if ours {
                "this process"
            } else {
                "the running `hikkoshi clone --follow`"
            }
        );
        if resumed_fence {
            // the fence of the interrupted run: this run's pass, and the DDL fence (again)
            self.fence_ddl().await?;
            return Ok(());
        }
        self.wait_for_lag(Instant::now() + self.opts.timeout)
            .await?;
        let fenced = match self.fence_ddl().await {
            Ok(()) => self.before_pause().await,
            Err(e) => Err(e),
        };
        match fenced {
            Ok(()) => Ok(()),
            Err(e) => {
                self.follower_stop.cancel();
                let (old, old_side) = self.old.at();
                if let Err(u) =
                    fence::lift(old, old_side, fence::subscriptions::AtLift::Resume).await
                {
                    tracing::warn!(
                        "lifting the DDL fence on the {old_side} failed ({}): `hikkoshi clean` lifts it",
                        crate::error::chain(&u)
                    );
                }
                Err(e)
            }
        }
    }

    /// The fence's schema on the old primary (flags down) and this process's pass; then the DDL fence, where
    /// the role may create event triggers. From here on the selection cannot change on the old primary, so
    /// it is resolved again (tables created since the clone began join it).
    async fn fence_ddl(&mut self) -> Result<(), Error> {
        let notice = self.notice();
        let (old, old_side) = self.old.at();
        fence::prepare(old, old_side, &notice).await?;
        let ddl = fence::ddl::raise(old, old_side, self.opts.timeout).await?;
        if let fence::ddl::DdlFence::Open(why) = &ddl {
            let w = format!(
                "{why}: a table created or changed on the {old_side} during the switch is found by the \
                 comparisons in the pause, which then grow with the number of tables"
            );
            tracing::warn!("{w}");
            self.report.warnings.push(w);
        }
        self.report.ddl_fence = ddl.describe();
        self.ddl = Some(ddl);
        self.resolved = selected(&self.migration, old, old_side).await?;
        self.fenced_relations = self.relations_to_fence().await?;
        Ok(())
    }

    /// The relations the fence covers for the resolved selection (its tables, their partitions and
    /// partitioned ancestors).
    async fn relations_to_fence(&self) -> Result<Vec<String>, Error> {
        let tables: Vec<QualifiedName> = self
            .resolved
            .tables
            .iter()
            .map(|t| t.name.clone())
            .collect();
        let (old, old_side) = self.old.at();
        fence::relations(old, old_side, &tables).await
    }

    /// Behind the DDL fence, before the write fence: the schema compared, the first part of the proof, the
    /// lag again.
    async fn before_pause(&mut self) -> Result<(), Error> {
        // a schema change the stream carries (DDL capture) reaches the new side with the stream; one it does
        // not carry stops everything before the fence
        self.same_shape_when_applied(Instant::now() + self.opts.timeout)
            .await?;
        self.shape_fenced = self.ddl == Some(fence::ddl::DdlFence::Up);
        // large objects are in no stream: the bulk of them now, what changes since in the pause
        self.sync_large_objects(false).await?;
        // materialized views change only by REFRESH, which the DDL fence now refuses on the old primary
        let levels = crate::matviews::levels(&self.old.client, self.old.side).await?;
        self.matviews_differing =
            crate::matviews::differing(self.old.at(), self.new.at(), &levels).await?;
        if self.opts.verify == VerifyMode::None {
            return Ok(());
        }
        self.proof = self.prove_before_fence().await?;
        // the lag may have grown while the tables were hashed
        if let Err(e) = self.wait_for_lag(Instant::now() + self.opts.timeout).await {
            if let Some(p) = self.proof.take() {
                p.abandon(&self.new.client).await;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Step 3a: Arms the fence before the pause (the triggers, one table at a time, letting writes pass), then
    /// records the step, so that a crash from the raise on is found by the next run.
    pub(super) async fn arm_fence(&mut self, resumed_fence: bool) -> Result<(), Error> {
        let (old, old_side) = self.old.at();
        let armed = Instant::now();
        let deadline = Instant::now() + self.opts.timeout;
        let armed_result = match fence::arm(old, old_side, &self.fenced_relations, deadline).await {
            Ok(w) => fence::subscriptions::disable(old, old_side, self.opts.timeout)
                .await
                .map(|subs| (w, subs)),
            Err(e) => Err(e),
        };
        let (warning, subscriptions) = match armed_result {
            Ok(done) => done,
            Err(e) => {
                self.follower_stop.cancel();
                if let Some(p) = self.proof.take() {
                    p.abandon(&self.new.client).await;
                }
                if !resumed_fence {
                    let _ = fence::lift(old, old_side, fence::subscriptions::AtLift::Resume).await;
                }
                return Err(e);
            }
        };
        if let Some(w) = warning {
            tracing::warn!("{w}");
            self.report.warnings.push(w);
        }
        self.report.subscriptions_disabled = subscriptions
            .iter()
            .map(fence::subscriptions::how_to_move)
            .collect();
        self.report.fence_arm_seconds = armed.elapsed().as_secs_f64();
        self.report.tables_fenced = self.fenced_relations.len();
        match self.way {
            Way::Cutover => state::cutover::record_fenced(&self.ctl, self.opts.reverse)
                .await
                .map_err(Error::sql(Side::Target, "recording the cutover"))?,
            Way::Rollback => state::cutover::record_rolling_back(&self.ctl)
                .await
                .map_err(Error::sql(Side::Target, "recording the rollback"))?,
        }
        self.report.lag_bytes_at_fence = lag_bytes(self.old.at(), self.new.at())
            .await
            .unwrap_or_default();
        Ok(())
    }

    /// Steps 3b–8: everything in the write pause, from the raise to the hooks. A failure is undone here, in one
    /// place; the pause ends with the hooks.
    /// With `--pgbouncer`, the poolers are paused first and resumed at the end, whichever way it ends.
    pub(super) async fn fenced(&mut self, fenced_at: Instant) -> Result<(), Error> {
        let paused_at = if self.poolers.is_empty() {
            None
        } else {
            // (a PAUSE that fails resumes what it paused; the armed fence and the recorded step are undone)
            let at = match pgbouncer::pause(&mut self.poolers, self.opts.timeout).await {
                Ok(at) => at,
                Err(e) => return Err(self.undo(e).await),
            };
            tracing::info!(
                "{}: {} pooler(s) paused",
                self.report.step,
                self.poolers.len()
            );
            Some(at)
        };
        let result = match self.in_pause(fenced_at).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.undo(e).await),
        };
        if let Some(at) = paused_at {
            let failed = pgbouncer::resume(&mut self.poolers).await;
            self.report.pooler_pause_seconds = Some(at.elapsed().as_secs_f64());
            for f in &failed {
                tracing::error!("resuming a pooler failed: {f}");
            }
            if !failed.is_empty() {
                let why = format!(
                    "a pooler could not be resumed, so its clients wait: {}",
                    failed.join("; ")
                );
                return match result {
                    Ok(()) => {
                        self.report.warnings.push(why);
                        Ok(())
                    }
                    Err(e) => Err(Error::Blocked(format!(
                        "{}; and {why}",
                        crate::error::chain(&e)
                    ))),
                };
            }
        }
        result
    }

    async fn in_pause(&mut self, fenced_at: Instant) -> Result<(), Error> {
        self.raise_fence(fenced_at).await?;
        crate::failpoint::hit(crate::failpoint::CUTOVER_FENCED);
        // the catch-up gets its own --timeout (the first part of the proof may have taken longer)
        self.wait_for_marker(fenced_at + self.opts.timeout).await?;
        self.report.catch_up_seconds = fenced_at.elapsed().as_secs_f64();
        let verify_started = Instant::now();
        let positions = self.move_sequences().await?;
        self.sync_large_objects(true).await?;
        self.refresh_differing_matviews().await?;
        if !self.shape_fenced {
            // DDL was not fenced before the schema was compared: compare it again, now that nothing else
            // moves, and look for tables created since the selection was resolved
            self.no_table_created_since().await?;
            self.same_shape("undone").await?;
        }
        self.verify(&positions).await?;
        self.report.verify_seconds = verify_started.elapsed().as_secs_f64();
        if self.way == Way::Cutover && self.opts.reverse {
            self.set_up_reverse().await?;
        }
        self.move_sequences_again(&positions).await?;
        self.run_hooks().await
    }

    /// Step 3b: Raises the fence (the pause starts), then writes the marker behind the last write.
    async fn raise_fence(&mut self, fenced_at: Instant) -> Result<(), Error> {
        let (old, old_side) = self.old.at();
        let f = fence::raise(old, old_side, self.opts.timeout).await?;
        self.report.fence_seconds = fenced_at.elapsed().as_secs_f64();
        self.report.fence_means = f.means.clone();
        self.report.sessions_ended = f.sessions_ended.clone();
        for w in &f.warnings {
            tracing::warn!("{w}");
        }
        self.report.warnings.extend(f.warnings);
        tracing::info!(
            "{}: writes fenced on the {old_side} ({})",
            self.report.step,
            f.means
        );
        let marker = fence_marker(old, old_side, &self.migration.id).await?;
        self.report.fence_lsn = marker.to_string();
        let _ = state::cutover::record_fence(&self.ctl, &self.report.fence_lsn, &f.means).await;
        Ok(())
    }

    /// Step 4: Catches up to the marker. A source of 14+ sends the marker through the stream, and only the
    /// applied position proves it arrived; before 14 the in-sync position has to do.
    async fn wait_for_marker(&mut self, deadline: Instant) -> Result<(), Error> {
        let (old_side, new_side) = (self.old.side, self.new.side);
        let marker = self.report.fence_lsn.clone();
        let old_version: i32 = self
            .old
            .client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        let messages = old_version >= 140000;
        if !messages {
            self.report.warnings.push(format!(
                "the {old_side} runs PostgreSQL {}, whose pgoutput carries no logical messages (14+): the \
                 catch-up waited for the stream's confirmed position to pass the fence marker, not for the \
                 marker itself",
                old_version / 10000
            ));
        }
        loop {
            let done = state::stream::reached(&self.new.client, &marker, messages)
                .await
                .map_err(Error::sql(new_side, "reading the applied position"))?;
            if done {
                return Ok(());
            }
            if let Some(e) = follower_failed(&mut self.follower).await {
                return Err(e);
            }
            if Instant::now() > deadline || self.opts.stop.is_cancelled() {
                return Err(Error::Blocked(format!(
                    "the {new_side} did not apply everything up to the fence (LSN {marker}) within {}s{}",
                    self.opts.timeout.as_secs(),
                    interrupted(&self.opts.stop)
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Step 5: Every sequence to the old primary's position, read now that the fence holds.
    async fn move_sequences(&mut self) -> Result<Vec<Position>, Error> {
        let (new, new_side) = self.new.at();
        let (old, old_side) = self.old.at();
        let sequences = crate::sequence::existing(new, new_side, &self.resolved.sequences).await?;
        let positions = crate::sequence::read(old, old_side, &sequences).await?;
        crate::sequence::apply(new, &positions).await?;
        self.report.sequences_moved = positions.len();
        Ok(positions)
    }

    /// Step 6: Verifies, fenced, so exactly: the second part of the proof, or the tables hashed whole.
    async fn verify(&mut self, positions: &[Position]) -> Result<(), Error> {
        if self.opts.verify == VerifyMode::None {
            return Ok(());
        }
        let opts = self.opts;
        let streamed = state::copy::streamed_tables(&self.new.client).await;
        let tables: Vec<_> = self
            .resolved
            .tables
            .iter()
            .filter(|t| opts.verify == VerifyMode::Full || streamed.contains(&t.name))
            .cloned()
            .collect();
        crate::failpoint::pause(crate::failpoint::CUTOVER_VERIFY, &opts.stop).await;
        let sequences = crate::verify::SourceSequences::Fenced(positions);
        let v = match self.proof.take() {
            Some(p) => {
                let (v, pause) = p
                    .conclude(
                        self.old.at(),
                        self.new.at(),
                        tables,
                        sequences,
                        opts.jobs,
                        opts.timeout,
                    )
                    .await?;
                self.report.rows_compared_in_pause = pause.rows_compared;
                self.report.tables_hashed_in_pause = pause.hashed_whole;
                if let Some(why) = pause.streams_failed {
                    // the first part's hashes did not count: everything was hashed here
                    self.report.rows_hashed_before_fence = 0;
                    self.report.warnings.push(format!(
                        "the proof's key streams failed ({why}): the tables were hashed in the write pause"
                    ));
                }
                v
            }
            None => {
                crate::verify::compare(&self.old.info, &self.new.info, tables, sequences, opts.jobs)
                    .await?
            }
        };
        self.report.tables_verified = v.tables.len();
        self.report.rows_verified = self.report.rows_hashed_before_fence
            + v.tables.iter().map(|t| t.source_rows).sum::<i64>();
        if !v.equal() {
            return Err(Error::Blocked(format!(
                "the fenced verification found differences, so the {} was not done:\n{v}",
                self.report.step
            )));
        }
        Ok(())
    }

    /// Step 7: The reverse stream, before the application can write on the new primary.
    async fn set_up_reverse(&mut self) -> Result<(), Error> {
        let plan = self.feeding.reverse();
        self.reverse = Some(plan.clone());
        if let Some(w) = reverse::set_up(
            &self.ctl,
            &self.old.client,
            &self.new.client,
            &self.feeding,
            &plan,
        )
        .await?
        {
            tracing::warn!("{w}");
            self.report.warnings.push(w);
        }
        self.report.reverse_slot = Some(plan.slot);
        Ok(())
    }

    /// `nextval` on the fenced old primary is no write: a session may still take values there. The new
    /// primary takes no writes before the hooks, so whatever moved since the read moves again now.
    async fn move_sequences_again(&mut self, positions: &[Position]) -> Result<(), Error> {
        let old_side = self.old.side;
        let moved = crate::sequence::advanced(&self.old.client, old_side, positions).await?;
        if moved.is_empty() {
            return Ok(());
        }
        crate::sequence::apply(&self.new.client, &moved).await?;
        self.report.warnings.push(format!(
            "{} sequence(s) advanced on the {old_side} after the fence (nextval without a row, e.g. {}): \
             moved again before the hooks; values the {old_side} hands out after this are in no row of it",
            moved.len(),
            moved[0].name
        ));
        Ok(())
    }

    /// Step 8: The user's switch. The write pause ends here.
    async fn run_hooks(&mut self) -> Result<(), Error> {
        let opts = self.opts;
        let (step_name, fence_lsn) = (self.report.step.clone(), self.report.fence_lsn.clone());
        let ctx = hook::HookContext {
            step: &step_name,
            migration_id: &self.migration.id,
            fence_lsn: &fence_lsn,
            new_primary: &self.new.info,
            old_primary: &self.old.info,
        };
        for h in &opts.hooks {
            match hook::run(h, &ctx, opts.timeout, &opts.stop).await {
                Ok(run) => self.report.hooks.push(run),
                Err(why) => {
                    return Err(Error::Blocked(format!(
                        "{why}: the {} was undone",
                        self.report.step
                    )));
                }
            }
        }
        if opts.stop.is_cancelled() {
            return Err(Error::Blocked(format!(
                "the {} was interrupted before its end",
                self.report.step
            )));
        }
        Ok(())
    }

    /// On an undo: the hooks that ran point the application (or a pooler) at the new primary; each runs
    /// again, last first, with the old primary as `HIKKOSHI_NEW_PRIMARY_*` and `HIKKOSHI_STEP=undo`, so it
    /// points back. Returns what failed.
    async fn hooks_back(&mut self) -> Vec<String> {
        if self.report.hooks.is_empty() {
            return Vec::new();
        }
        let fence_lsn = self.report.fence_lsn.clone();
        let ctx = hook::HookContext {
            step: "undo",
            migration_id: &self.migration.id,
            fence_lsn: &fence_lsn,
            new_primary: &self.old.info,
            old_primary: &self.new.info,
        };
        let mut failed = Vec::new();
        // the undo must not be cancelled by the signal that caused it
        let stop = CancellationToken::new();
        for h in self.report.hooks.iter().rev() {
            match hook::run(&h.command, &ctx, self.opts.timeout, &stop).await {
                Ok(_) => tracing::warn!(
                    "undone: hook `{}` ran again towards the old primary",
                    h.command
                ),
                Err(why) => failed.push(format!("{why} (run again towards the old primary)")),
            }
        }
        failed
    }

    /// Step 9: The point of no return: from here on, everything runs to completion.
    pub(super) async fn point_of_no_return(&mut self, fenced_at: Instant) -> Result<(), Error> {
        self.report.write_pause_seconds = fenced_at.elapsed().as_secs_f64();
        crate::failpoint::hit(crate::failpoint::CUTOVER_POINT_OF_NO_RETURN);
        let done_step = match self.way {
            Way::Cutover => Step::Switched,
            Way::Rollback => Step::RolledBack,
        };
        state::cutover::record_done(&self.ctl, done_step, self.report.write_pause_seconds)
            .await
            .map_err(Error::sql(Side::Target, "recording the end of the cutover"))?;
        let _ = state::event(
            &self.ctl,
            &self.report.step,
            &format!(
                "{} done: write pause {:.3}s, fence at {}",
                self.report.step, self.report.write_pause_seconds, self.report.fence_lsn
            ),
        )
        .await;
        if self.way == Way::Rollback {
            // the source is the primary again
            let (new, new_side) = self.new.at();
            self.report
                .warnings
                .extend(fence::lift(new, new_side, fence::subscriptions::AtLift::Resume).await?);
        }
        self.follower_stop.cancel();
        if let Some(handle) = self.follower.take() {
            let _ = handle.await;
        }
        // The stream that fed the new primary is over: its slot would hold WAL on the old one for ever.
        let (old, old_side) = self.old.at();
        if let Err(w) =
            drop_stream(old, old_side, &self.feeding.slot, &self.feeding.publication).await
        {
            self.report.warnings.push(w);
        }
        // the proof's streams ended in the pause; their publication goes now, outside it
        proof::drop_publication(&self.new.client, &self.proof_publication).await;
        Ok(())
    }

    /// Before the point of no return: lifts the fence, removes a reverse stream set up by this run, records
    /// the step, and returns the error to report (with the undo's own failure, if any, added).
    async fn undo(&mut self, e: Error) -> Error {
        // the hooks point back while the old primary still refuses writes: the application reaches it only
        // once it is writable again
        let hooks_failed = self.hooks_back().await;
        let (old, old_side) = self.old.at();
        let mut failed = Vec::new();
        match fence::lift(old, old_side, fence::subscriptions::AtLift::Resume).await {
            Ok(warnings) => warnings.iter().for_each(|w| tracing::warn!("{w}")),
            Err(u) => failed.push(crate::error::chain(&u)),
        }
        if let Some(plan) = &self.reverse {
            reverse::drop(&self.ctl, old, plan).await;
        }
        proof::drop_publication(&self.new.client, &self.proof_publication).await;
        let back = match self.way {
            Way::Cutover => Step::Aborted,
            Way::Rollback => Step::Switched,
        };
        let mut why = crate::error::chain(&e);
        if !hooks_failed.is_empty() {
            why = format!(
                "{why}; and a hook that had run failed to point back at the {old_side}, so check what it \
                 switches: {}",
                hooks_failed.join("; ")
            );
        }
        let _ = state::cutover::set_step(&self.ctl, back, &format!("undone: {why}")).await;
        self.follower_stop.cancel();
        if failed.is_empty() && hooks_failed.is_empty() {
            tracing::warn!("undone: the {old_side} is writable again");
            e
        } else if failed.is_empty() {
            Error::Blocked(why)
        } else {
            Error::Blocked(format!(
                "{why}; and lifting the write fence failed too ({}): the {old_side} still refuses writes. \
                 Run `hikkoshi rollback` (or `hikkoshi clean`) to lift it, or `SELECT \
                 setval('hikkoshi_fence.up', 1, false), setval('hikkoshi_fence.ddl', 1, false)` on it",
                failed.join("; ")
            ))
        }
    }

    /// Waits until the stream's lag is under `--max-lag`; nothing is fenced yet, so giving up changes
    /// nothing.
    async fn wait_for_lag(&mut self, deadline: Instant) -> Result<(), Error> {
        let opts = self.opts;
        loop {
            let lag = lag_bytes(self.old.at(), self.new.at()).await?;
            if lag <= opts.max_lag {
                return Ok(());
            }
            if let Some(e) = follower_failed(&mut self.follower).await {
                return Err(e);
            }
            if Instant::now() > deadline || opts.stop.is_cancelled() {
                self.follower_stop.cancel();
                return Err(Error::Blocked(format!(
                    "the stream's lag ({lag} bytes) did not drop under --max-lag {} within {}s{}: nothing \
                     was fenced, the {} is the primary as before. Let the follower catch up (see \
                     `hikkoshi status`) and run the cutover again, or raise --max-lag/--timeout",
                    opts.max_lag,
                    opts.timeout.as_secs(),
                    interrupted(&opts.stop),
                    self.old.side
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first part of the proof, while the application still writes (see `proof`). No proof (with a
    /// warning in the report) when it could not be made: then the tables are hashed in the pause.
    async fn prove_before_fence(&mut self) -> Result<Option<proof::Prepared>, Error> {
        let opts = self.opts;
        let streamed = state::copy::streamed_tables(&self.new.client).await;
        let tables = self.resolved.tables.clone();
        let plan = proof::Plan {
            old: self.old.info.clone(),
            new: self.new.info.clone(),
            old_side: self.old.side,
            new_side: self.new.side,
            old_publication: self.feeding.publication.clone(),
            new_publication: self.proof_publication.clone(),
            // the proof's slots share its publication's name, hikkoshi_<id>_proof
            slot: self.proof_publication.clone(),
            hash: tables
                .iter()
                .filter(|t| opts.verify == VerifyMode::Full || streamed.contains(&t.name))
                .map(|t| t.name.clone())
                .collect(),
            tables,
            ranges: crate::verify::key_ranges(&self.ctl)
                .await
                .unwrap_or_default(),
            jobs: opts.jobs,
            wait: opts.timeout.min(Duration::from_secs(30)),
        };
        let prepared = tokio::select! {
            p = proof::prepare(plan, &self.old.client, &self.new.client) => p,
            _ = opts.stop.cancelled() => Err(Error::Interrupted),
        };
        match prepared {
            Ok(p) => {
                tracing::info!(
                    "{}: {} row(s) hashed in snapshots before the fence in {:.1}s",
                    self.report.step,
                    p.rows_hashed,
                    p.seconds
                );
                self.report.verify_before_fence_seconds = p.seconds;
                self.report.rows_hashed_before_fence = p.rows_hashed;
                crate::failpoint::pause(crate::failpoint::CUTOVER_PROVED_BEFORE_FENCE, &opts.stop)
                    .await;
                Ok(Some(p))
            }
            Err(e) => {
                proof::drop_publication(&self.new.client, &self.proof_publication).await;
                if opts.stop.is_cancelled() {
                    return Err(Error::Blocked(format!(
                        "interrupted before the fence: nothing was fenced, the {} is the primary as before",
                        self.old.side
                    )));
                }
                let w = format!(
                    "the proof could not be prepared before the fence ({}): the tables were hashed in the \
                     write pause",
                    crate::error::chain(&e)
                );
                tracing::warn!("{w}");
                self.report.warnings.push(w);
                Ok(None)
            }
        }
    }
}

fn interrupted(stop: &CancellationToken) -> &'static str {
    if stop.is_cancelled() {
        " (interrupted)"
    } else {
        ""
    }
}
