//! One streaming session: the target's apply session, the source's replication connection, and where the
//! stream stands. `follow::run` opens one after another (a reconnect is a new session); each kind of event
//! has its method: a change (`data`), a keepalive, an idle second (`idle`), and the periodic `tick` that
//! answers the source, records progress and notices the cutover that ends the stream.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::apply::{Applier, ApplyError, DdlContext};
use super::confirm::Confirm;
use super::follow::{
    Direction, FollowPlan, FollowReport, Pulse, end_earlier_appliers, stall_limit, target_tables,
};
use super::pgoutput::Message;
use crate::error::{Error, Side};
use crate::lsn::Lsn;
use crate::replication::conn::StreamMessage;
use crate::replication::{ReplicationConn, ReplicationError};
use crate::session;

/// Source transactions per target transaction at most (and at most 200 ms of them): many small ones share a
/// commit, and their changes are folded (a row updated by every one of them is written once, see `fold`).
const MAX_BATCH_TXNS: usize = 1000;

/// Streams until `stop`, a failure, or a cutover that ends the stream.
pub(super) async fn run(
    plan: &FollowPlan,
    stop: &CancellationToken,
    report: &mut FollowReport,
    pulse: &Pulse,
) -> Result<(), Error> {
    let mut s = Session::open(plan, pulse).await?;
    s.applier.start().await.map_err(apply_err)?;
    // time spent waiting for the source without a single message
    let mut silent = Duration::ZERO;
    loop {
        pulse.beat();
        // Commit when idle or when the batch is old: latency stays low, throughput high.
        let wait = if s.applier.has_uncommitted() && !s.applier.inside_source_transaction() {
            Duration::from_millis(5)
        } else {
            Duration::from_secs(1)
        };
        let next = tokio::select! {
            _ = stop.cancelled() => {
                s.finish(report).await.map_err(apply_err)?;
                return Ok(());
            }
            m = tokio::time::timeout(wait, s.repl.next_stream_message()) => m,
        };
        match next {
            Ok(Ok(Some(StreamMessage::XLogData {
                start, end, data, ..
            }))) => {
                silent = Duration::ZERO;
                s.data(start, end, data).await?;
            }
            Ok(Ok(Some(StreamMessage::Keepalive { end, reply, .. }))) => {
                silent = Duration::ZERO;
                s.keepalive(end, reply).await?;
            }
            Ok(Ok(None)) => {
                return Err(Error::Replication {
                    what: "the source ended the replication stream".into(),
                    source: ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "stream ended",
                    )),
                });
            }
            Ok(Err(e)) => return Err(slot_error(e, &plan.slot)),
            Err(_) => {
                silent += wait;
                if silent >= s.stall {
                    return Err(Error::Stalled(format!(
                        "no message from the source for {} s although a keepalive was asked for every \
                         second (the limit is twice the source's wal_sender_timeout of {} ms, at least \
                         30 s): the replication connection stalled",
                        silent.as_secs(),
                        s.sender_timeout
                    )));
                }
                s.idle(wait).await?;
            }
        }
        if s.tick(report).await? {
            return Ok(());
        }
        report.applied = s.confirmed;
    }
}

/// A streaming session and where it stands.
struct Session<'a> {
    plan: &'a FollowPlan,
    applier: Applier,
    repl: ReplicationConn,
    /// Records progress (on the fenced old source, for a reverse stream).
    status: Client,
    /// Where a reverse stream reads the cutover's step (the migration's target).
    control: Option<Client>,
    /// The start of the last change received, the end of the server's WAL as last heard, and what the
    /// source may forget.
    received: Lsn,
    server_end: Lsn,
    confirmed: Lsn,
    rule: Confirm,
    last_status: Instant,
    last_record: Instant,
    txns_at_record: u64,
    batch_started: Option<Instant>,
    stall: Duration,
    sender_timeout: i64,
}

impl<'a> Session<'a> {
    /// Opens the apply session, the status session and the replication connection, from the LSN the
    /// target recorded.
    async fn open(plan: &'a FollowPlan, pulse: &Pulse) -> Result<Session<'a>, Error> {
        let (target, reorder) = apply_session(plan, pulse).await?;
        let applied = crate::state::stream::applied_lsn(&target)
            .await
            .map_err(Error::sql(Side::Target, "reading the applied LSN"))?;
        let tables = target_tables(&target).await?;
        let status = session::connect(&plan.target, Side::Target).await?;
        if plan.direction == Direction::Forward {
            // copied and indexed: from here on the tables move with the stream
            let _ = crate::state::copy::mark_tables_streaming(&status).await;
        }
        // a reverse stream writes its records on the fenced old source
        status
            .batch_execute(
                "SET application_name = 'hikkoshi status'; SET default_transaction_read_only = off",
            )
            .await
            .map_err(Error::sql(Side::Target, "preparing the status session"))?;
        let control = match plan.direction {
            Direction::Forward => None,
            Direction::Reverse => Some(session::connect(&plan.control, Side::Target).await?),
        };
        let source = session::connect(&plan.source, Side::Source).await?;
        let sender_timeout: i64 = source
            .query_one(
                "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(60_000);
        let stall = stall_limit(sender_timeout);
        let _ = crate::state::stream::record_stall_limit(
            &status,
            stall.as_secs() as i32,
            sender_timeout,
        )
        .await;
        let ddl = ddl_context(plan, control.as_ref().unwrap_or(&status)).await;
        crate::state::ddl::ensure(&target)
            .await
            .map_err(Error::sql(Side::Target, "creating the DDL log"))?;
        let search_path: String = target
            .query_one("SELECT current_setting('search_path')", &[])
            .await
            .map_err(Error::sql(Side::Target, "preparing the apply session"))?
            .get(0);
        let applier = Applier::new(target, source, applied, tables, reorder, ddl, search_path);
        let mut repl = ReplicationConn::connect(&plan.source)
            .await
            .map_err(Error::replication("opening the replication connection"))?;
        repl.start_logical(&plan.slot, applied, &plan.publication)
            .await
            .map_err(|e| slot_error(e, &plan.slot))?;
        tracing::info!(slot = %plan.slot, from = %applied, "streaming changes");
        Ok(Session {
            plan,
            applier,
            repl,
            status,
            control,
            received: applied,
            server_end: applied,
            confirmed: applied,
            rule: Confirm::new(applied),
            last_status: Instant::now(),
            last_record: Instant::now(),
            txns_at_record: 0,
            batch_started: None,
            stall,
            sender_timeout,
        })
    }

    /// A change: applied, and the batch committed when it is full or old.
    async fn data(&mut self, start: Lsn, end: Lsn, data: Bytes) -> Result<(), Error> {
        self.received = self.received.max(start);
        self.server_end = self.server_end.max(end);
        let msg = Message::decode(data).map_err(|source| Error::Decode { at: start, source })?;
        if matches!(msg, Message::Begin(_)) && self.batch_started.is_none() {
            self.batch_started = Some(Instant::now());
        }
        if let Message::Commit(c) = &msg {
            self.rule.commit_received(c.end_lsn);
        }
        let is_commit = matches!(msg, Message::Commit(_));
        self.applier.handle(msg).await.map_err(apply_err)?;
        if is_commit
            && (self.applier.wants_commit()
                || self.applier.txns_in_batch >= MAX_BATCH_TXNS
                || self
                    .batch_started
                    .is_some_and(|t| t.elapsed() > Duration::from_millis(200)))
        {
            self.applier.commit().await.map_err(apply_err)?;
            self.batch_started = None;
        }
        Ok(())
    }

    /// A keepalive. The walsender sends one whenever it has caught up, which in a live stream is after
    /// nearly every transaction: batches are not cut here (the idle timer commits them), and the target is
    /// asked for its flush position only when the source asks for an answer.
    async fn keepalive(&mut self, end: Lsn, reply: bool) -> Result<(), Error> {
        self.server_end = self.server_end.max(end);
        self.rule.keepalive(end);
        if reply {
            self.confirm().await?;
            self.repl
                .send_status(self.received, self.confirmed, false)
                .await
                .map_err(Error::replication("answering a keepalive"))?;
            self.last_status = Instant::now();
        }
        Ok(())
    }

    /// Nothing came for `waited`: commit what waits, and after a whole idle second ask for a keepalive. The
    /// walsender answers with how far it has decoded, which moves our in-sync position past WAL that holds
    /// nothing for us (vacuum, other databases), at once rather than after wal_sender_timeout / 2.
    async fn idle(&mut self, waited: Duration) -> Result<(), Error> {
        if !self.applier.inside_source_transaction() {
            self.applier.commit().await.map_err(apply_err)?;
            self.batch_started = None;
        }
        if waited >= Duration::from_secs(1) {
            self.confirm().await?;
            self.repl
                .send_status(self.received, self.confirmed, true)
                .await
                .map_err(Error::replication("asking for a keepalive"))?;
            self.last_status = Instant::now();
        }
        Ok(())
    }

    /// After every event: a status update every 5 s; every second, progress recorded and the cutover's
    /// step read. True when a cutover that reached its point of no return (or a finished rollback) ended
    /// this stream: everything up to the fence is applied, and the other side is the primary now.
    async fn tick(&mut self, report: &mut FollowReport) -> Result<bool, Error> {
        if self.last_status.elapsed() > Duration::from_secs(5) {
            self.confirm().await?;
            self.repl
                .send_status(self.received, self.confirmed, false)
                .await
                .map_err(Error::replication("sending a status update"))?;
            self.last_status = Instant::now();
        }
        if self.last_record.elapsed() <= Duration::from_secs(1) {
            return Ok(false);
        }
        self.confirm().await?;
        let rate = (self.applier.applied_txns - self.txns_at_record) as f64
            / self.last_record.elapsed().as_secs_f64();
        record(&self.status, self.confirmed, self.server_end, rate).await;
        self.txns_at_record = self.applier.applied_txns;
        self.last_record = Instant::now();
        let step = crate::state::cutover::recorded(self.control.as_ref().unwrap_or(&self.status))
            .await
            .ok()
            .flatten();
        let forward = self.plan.direction == Direction::Forward;
        let Some((step, _)) = step.filter(|(s, _)| s.ends_stream(forward)) else {
            return Ok(false);
        };
        let done = self.finish(report).await.map_err(apply_err)?;
        report.ended_by = Some(step);
        tracing::info!(
            "the cutover ended this stream ({:?}) at {done}",
            self.plan.direction
        );
        Ok(true)
    }

    /// Moves the confirmed position to what the target has made durable, as the confirm rule allows.
    async fn confirm(&mut self) -> Result<(), Error> {
        let durable = self.applier.durable().await.map_err(apply_err)?;
        self.confirmed = self.confirmed.max(self.rule.confirmable(durable));
        Ok(())
    }

    /// Ends the stream cleanly: commits the whole source transactions received (a half-received one is
    /// rolled back, to be streamed again), tells the source, records, and returns the LSN now applied.
    async fn finish(&mut self, report: &mut FollowReport) -> Result<Lsn, ApplyError> {
        let applier = &mut self.applier;
        applier.commit().await?;
        // the commits are asynchronous: the source may forget only what the target's disk has
        let mut done = applier.durable().await?;
        for _ in 0..40 {
            if applier.all_durable() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            done = applier.durable().await?;
        }
        applier.abandon().await;
        let _ = self.repl.send_status(self.received, done, false).await;
        record(&self.status, done, self.server_end, 0.0).await;
        report.applied = done;
        report.transactions += applier.applied_txns;
        Ok(done)
    }
}

/// What the applier needs for DDL: the publication, and whether (and as whom) the clone kept owners, read
/// where the migration's state is.
async fn ddl_context(plan: &FollowPlan, state: &Client) -> DdlContext {
    let renamed = crate::state::roles::renamed(state).await;
    let role_map = match plan.direction {
        Direction::Forward => renamed.into_iter().collect(),
        Direction::Reverse => renamed.into_iter().map(|(old, new)| (new, old)).collect(),
    };
    DdlContext {
        publication: plan.publication.clone(),
        keep_owners: crate::state::roles::owners_kept(state).await,
        role_map,
    }
}

/// The apply session on the target: settings for applying (and for a dead client to be noticed), the
/// fence's pass, earlier appliers ended. Returns it, and whether it may reorder changes of different tables
/// (`session_replication_role = replica`: foreign keys and triggers do not fire).
async fn apply_session(plan: &FollowPlan, pulse: &Pulse) -> Result<(Client, bool), Error> {
    let target = session::connect(&plan.target, Side::Target).await?;
    // The keepalive settings let the target end this session when its client is gone for good (with the
    // server defaults, a dead peer can hold its locks for hours).
    target
        .batch_execute(
            "SET application_name = 'hikkoshi apply'; SET standard_conforming_strings = on;
             SET synchronous_commit = off; SET datestyle = ISO; SET intervalstyle = postgres;
             SET default_transaction_read_only = off;
             SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3;",
        )
        .await
        .map_err(Error::sql(Side::Target, "preparing the apply session"))?;
    let pid: i32 = target
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(Error::sql(Side::Target, "preparing the apply session"))?
        .get(0);
    pulse.apply_pid.store(pid, Ordering::Relaxed);
    // a reverse stream applies on a fenced old primary: this process's secret passes there once registered
    // (nobody else's does, replica sessions included)
    if let Err(e) = crate::cutover::fence::pass::admit(&target).await {
        tracing::warn!(
            "could not register the apply session with the write fence on the {} ({}): its writes will be              refused there; run the follower as the role that ran the cutover",
            Side::Target,
            crate::error::chain(&e)
        );
    }
    end_earlier_appliers(&target).await?;
    // Triggers and foreign-key checks ran on the source already (as in native logical replication). Set-based
    // statements join their arrays to the table by its key, row by row through the index, whatever the
    // planner guesses of the arrays' length.
    target
        .batch_execute("SET enable_hashjoin = off; SET enable_mergejoin = off")
        .await
        .map_err(Error::sql(Side::Target, "preparing the apply session"))?;
    let reorder = target
        .batch_execute("SET session_replication_role = replica")
        .await;
    if let Err(e) = &reorder {
        tracing::warn!(
            "cannot set session_replication_role on the target ({}): triggers will fire for applied \
             changes; grant it with `GRANT SET ON PARAMETER session_replication_role TO <user>` (PostgreSQL \
             15+) or connect as a superuser",
            crate::error::chain(e)
        );
    }
    Ok((target, reorder.is_ok()))
}

fn apply_err(e: ApplyError) -> Error {
    match e {
        ApplyError::Target { what, source } => Error::Sql {
            side: Side::Target,
            what,
            source,
        },
        ApplyError::Source { what, source } => Error::Sql {
            side: Side::Source,
            what,
            source,
        },
        e => Error::Apply(e),
    }
}

/// Notes how far the source is, how far we are in sync and how fast we apply, for `status` (best effort).
async fn record(status: &Client, synced: Lsn, server_end: Lsn, rate_tps: f64) {
    let _ = crate::state::stream::record_progress(status, synced, server_end, rate_tps).await;
}

fn slot_error(e: ReplicationError, slot: &str) -> Error {
    let what = match e.code() {
        Some("42704") => format!(
            "the replication slot {slot} no longer exists on the source: the change stream cannot continue. \
             Run `hikkoshi clean` and clone again"
        ),
        Some("55000") => format!(
            "the replication slot {slot} can no longer stream (invalidated: the source removed WAL it needed, \
             see max_slot_wal_keep_size). The change stream cannot continue: run `hikkoshi clean` and clone \
             again"
        ),
        _ => return Error::replication("streaming changes")(e),
    };
    Error::SlotLost(what)
}
