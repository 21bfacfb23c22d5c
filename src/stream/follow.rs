//! Following the source: the replication stream from hikkoshi's slot, decoded and applied, until a signal
//! says stop. Transient faults (a restart of either server, a dropped connection) reconnect with backoff and
//! resume from the LSN recorded in the target; definite ones stop with the reason.
//!
//! Feedback to the source (the slot's confirmed flush position) never runs ahead of what the target has
//! committed and flushed: the applier commits asynchronously (as native subscriptions do) and the feedback
//! is the applied LSN of the last commit the target's WAL flush has passed, or a keepalive's position once
//! every commit received before it is flushed (`confirm` says why that is safe). A crash of the target
//! loses its unflushed commits and their `applied_lsn` together, and the source still has them.
//!
//! A connection can also die silently (a network partition, a stalled proxy: no FIN, no RST, TCP keepalives
//! answered by a middlebox). Two checks turn that into a transient error, and so into a reconnect:
//! - the source: we ask for a keepalive every idle second. The walsender answers at once when it waits for
//!   WAL, but while it replays a large transaction it reads our requests, and sends a keepalive, only about
//!   every `wal_sender_timeout / 2` (PostgreSQL 15 sends nothing else through a run of changes we do not
//!   get, or of TOAST chunks). So the source may stay silent for [`stall_limit`], derived from its
//!   `wal_sender_timeout`, before the stream counts as dead: a shorter limit would reconnect in the middle
//!   of such a replay and restart it, again and again;
//! - the target: a session that makes no progress for [`stall_timeout`] is checked from a fresh
//!   connection; unless the apply session is busy with our statement (`pg_stat_activity.state =
//!   'active'`: a slow statement or a lock wait), it is dead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::apply::{TargetTable, Window};
use crate::backoff::Backoff;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::QualifiedName;
use crate::lsn::Lsn;
use crate::session;

/// Which way a stream runs: the migration's own (source → target), or the reverse stream a cutover with
/// `--reverse` starts (new primary → old source), which keeps a rollback lossless.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Reverse,
}

/// Where to stream from and to. `source` is the upstream, `target` the downstream, which holds the
/// stream's `hikkoshi.stream` row; `control` is the migration's target, where a cutover records its steps.
#[derive(Clone, Debug)]
pub struct FollowPlan {
    pub source: ConnInfo,
    pub target: ConnInfo,
    pub control: ConnInfo,
    pub direction: Direction,
    pub slot: String,
    pub publication: String,
}

impl FollowPlan {
    /// A migration's own stream (source → target, recorded on the target), reading `slot` and `publication`.
    pub fn forward(
        source: &ConnInfo,
        target: &ConnInfo,
        slot: String,
        publication: String,
    ) -> FollowPlan {
        FollowPlan {
            source: source.clone(),
            target: target.clone(),
            control: target.clone(),
            direction: Direction::Forward,
            slot,
            publication,
        }
    }

    /// The reverse stream of a migration whose forward stream this is: from the new primary back to the
    /// old one, which a `cutover --reverse` starts so that a rollback loses nothing.
    pub fn reverse(&self) -> FollowPlan {
        FollowPlan {
            source: self.target.clone(),
            target: self.source.clone(),
            control: self.target.clone(),
            direction: Direction::Reverse,
            slot: super::names::reverse(&self.slot),
            publication: super::names::reverse(&self.publication),
        }
    }
}

/// Runs a follower on a thread of its own: a change goes from the stream to the applier to the target
/// connection without waking another thread (cross-thread wake-ups cost more CPU than the work itself,
/// measured with bench/stream.sh).
pub async fn run_on_own_thread(
    plan: FollowPlan,
    stop: CancellationToken,
) -> Result<FollowReport, Error> {
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Blocked(format!("cannot start the follower's runtime: {e}")))?;
        runtime.block_on(run(&plan, stop))
    })
    .await
    .map_err(|e| Error::Blocked(format!("the follower stopped unexpectedly: {e}")))?
}

/// How the follower ended.
#[derive(Debug, Default)]
pub struct FollowReport {
    pub applied: Lsn,
    pub transactions: u64,
    /// The cutover step that ended the stream, when a cutover (or rollback) ended it rather than a signal.
    pub ended_by: Option<crate::state::Step>,
}

/// Streams until `stop` is cancelled. Reconnects after transient failures.
pub async fn run(plan: &FollowPlan, stop: CancellationToken) -> Result<FollowReport, Error> {
    let mut report = FollowReport::default();
    let mut backoff = Backoff::new(None);
    loop {
        let started = Instant::now();
        let pulse = Pulse::default();
        let outcome = tokio::select! {
            r = super::session::run(plan, &stop, &mut report, &pulse) => r,
            e = watchdog(plan, &pulse) => Err(e),
        };
        match outcome {
            Ok(()) => return Ok(report),
            Err(e) if transient(&e) && !stop.is_cancelled() => {
                crate::monitor::count_error(e.kind());
                let wait = backoff.next(started).unwrap_or(Duration::from_secs(15));
                tracing::warn!(
                    "streaming interrupted ({}); reconnecting in {:.1}s",
                    crate::error::chain(&e),
                    wait.as_secs_f64()
                );
                note_interruption(plan, &e).await;
                tokio::select! {
                    _ = stop.cancelled() => return Ok(report),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long the target's apply session may make no progress before it counts as dead (see the module
/// doc). 30 s, or `HIKKOSHI_STALL_SECS` (the fault tests shorten it).
pub fn stall_timeout() -> Duration {
    stall_override().unwrap_or(Duration::from_secs(30))
}

fn stall_override() -> Option<Duration> {
    std::env::var("HIKKOSHI_STALL_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

/// How long the source may send nothing at all before the stream counts as dead, given its
/// `wal_sender_timeout` in milliseconds (0: disabled): twice that (a replaying walsender sends a keepalive
/// about every half of it), at least 30 s; 5 minutes when the timeout is disabled (the walsender then sends
/// nothing while it replays). `HIKKOSHI_STALL_SECS` overrides it.
pub fn stall_limit(wal_sender_timeout_ms: i64) -> Duration {
    if let Some(d) = stall_override() {
        return d;
    }
    source_stall_limit(wal_sender_timeout_ms)
}

fn source_stall_limit(wal_sender_timeout_ms: i64) -> Duration {
    if wal_sender_timeout_ms <= 0 {
        Duration::from_secs(300)
    } else {
        Duration::from_millis(wal_sender_timeout_ms as u64 * 2).max(Duration::from_secs(30))
    }
}

/// Signs of life of one streaming session, for the watchdog.
pub(super) struct Pulse {
    /// The last time the streaming loop went round.
    beat: Mutex<Instant>,
    /// The backend pid of the apply session on the target (0 until known).
    pub(super) apply_pid: AtomicI32,
}

impl Default for Pulse {
    fn default() -> Self {
        Pulse {
            beat: Mutex::new(Instant::now()),
            apply_pid: AtomicI32::new(0),
        }
    }
}

impl Pulse {
    pub(super) fn beat(&self) {
        *self.beat.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn since(&self) -> Duration {
        self.beat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

/// Returns when the session has made no progress for [`stall_timeout`] and the target's apply session is
/// not working on a statement of ours: a connection died without saying so.
async fn watchdog(plan: &FollowPlan, pulse: &Pulse) -> Error {
    let limit = stall_timeout();
    loop {
        let since = pulse.since();
        if since < limit {
            tokio::time::sleep(limit - since).await;
            continue;
        }
        let pid = pulse.apply_pid.load(Ordering::Relaxed);
        if pid != 0 && apply_session_busy(plan, pid, limit).await {
            tracing::info!("the target is still working on the apply session's statement");
            pulse.beat();
            continue;
        }
        return Error::Stalled(format!(
            "the stream made no progress for {} s and the target's apply session is not working on a \
             statement: a connection to the source or the target stalled",
            limit.as_secs()
        ));
    }
}

/// Whether the target answers on a fresh connection that the apply session runs a statement.
async fn apply_session_busy(plan: &FollowPlan, pid: i32, limit: Duration) -> bool {
    let probe = async {
        let c = session::connect(&plan.target, Side::Target).await.ok()?;
        c.query_opt(
            "SELECT state = 'active' FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .ok()?
        .and_then(|r| r.get::<_, Option<bool>>(0))
    };
    matches!(tokio::time::timeout(limit, probe).await, Ok(Some(true)))
}

/// Records a transient failure in the event log, for `status` and `/health` (best effort: the target may
/// be what failed).
async fn note_interruption(plan: &FollowPlan, e: &Error) {
    let note = async {
        let c = session::connect(&plan.target, Side::Target).await.ok()?;
        crate::state::event(&c, "interrupted", &crate::error::chain(e))
            .await
            .ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), note).await;
}

/// Ends the apply sessions of earlier attempts that the target still runs, and waits until they are gone.
/// One can outlive its client (a stalled or half-closed connection, statements still queued in its
/// socket, up to a COMMIT): read before it ends, the applied LSN would be older than its late commit, and
/// the changes in between would be applied twice. Only one process streams a migration (the migration
/// lock), so any other apply session on this database is a leftover.
pub(super) async fn end_earlier_appliers(target: &Client) -> Result<(), Error> {
    for _ in 0..300 {
        let left: i64 = match target
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = 'hikkoshi apply' AND datname = current_database()
                   AND pid <> pg_backend_pid()",
                &[],
            )
            .await
        {
            Ok(r) => r.get(0),
            Err(e) if e.code().is_some_and(|c| c.code() == "42501") => {
                tracing::warn!(
                    "cannot end an earlier apply session on the target ({}): if it still commits, \
                     changes may be applied twice",
                    crate::error::chain(&e)
                );
                return Ok(());
            }
            Err(e) => return Err(Error::sql(Side::Target, "ending earlier apply sessions")(e)),
        };
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Stalled(
        "an earlier apply session on the target did not end within 30 s of pg_terminate_backend"
            .into(),
    ))
}

fn transient(e: &Error) -> bool {
    e.retryable()
}

/// Loads the target's tables with their convergence windows from the copy's chunk records.
pub async fn target_tables(target: &Client) -> Result<HashMap<QualifiedName, TargetTable>, Error> {
    read_target_tables(target)
        .await
        .map_err(Error::sql(Side::Target, "reading the target's tables"))
}

/// `target_tables`, with the driver's error (the applier rereads them after DDL, in its transaction).
pub async fn read_target_tables(
    target: &Client,
) -> Result<HashMap<QualifiedName, TargetTable>, tokio_postgres::Error> {
    let rows = target
        .query(
            "SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                    a.attidentity = 'a'
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi')
               AND n.nspname NOT LIKE 'pg\\_toast%'",
            &[],
        )
        .await?;
    let mut tables: HashMap<QualifiedName, TargetTable> = HashMap::new();
    for r in rows {
        let name = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        let t = tables.entry(name.clone()).or_insert_with(|| TargetTable {
            name,
            columns: HashMap::new(),
            key: Vec::new(),
            always_identity: Vec::new(),
            window: Window::default(),
            foldable: false,
        });
        let column: String = r.get(2);
        if r.get::<_, bool>(4) {
            t.always_identity.push(column.clone());
        }
        t.columns.insert(column, r.get(3));
    }
    let keys = target
        .query(
            "SELECT n.nspname, c.relname, array_agg(a.attname ORDER BY k.ord)
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indisprimary GROUP BY 1, 2",
            &[],
        )
        .await?;
    for r in keys {
        let name = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        if let Some(t) = tables.get_mut(&name) {
            t.key = r.get(2);
        }
    }
    // Tables whose primary key is their only unique or exclusion constraint (see `fold`).
    let single = target
        .query(
            "SELECT n.nspname, c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             GROUP BY 1, 2
             HAVING count(*) FILTER (WHERE i.indisprimary) = 1
                AND count(*) FILTER (WHERE (i.indisunique OR i.indisexclusion) AND NOT i.indisprimary) = 0",
            &[],
        )
        .await?;
    for r in single {
        let name = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        if let Some(t) = tables.get_mut(&name) {
            t.foldable = !t.key.is_empty();
        }
    }
    // Windows: per copied table (a partition's window applies to its root, which the stream names).
    let windows = crate::state::copy::copy_windows(target).await?;
    let start = crate::state::stream::start_lsn(target).await?;
    for (name, min, max, whole_snapshot) in windows {
        let (min, max) = (min.unwrap_or(start), max.unwrap_or(start));
        if let Some(t) = tables.get_mut(&name) {
            if min == max || whole_snapshot {
                t.window.skip_before = min;
            } else {
                t.window.skip_before = min;
                t.window.converge_before = max;
            }
        }
    }
    Ok(tables)
}

#[cfg(test)]
mod stall_tests {
    use super::*;

    #[test]
    fn the_stall_limit_follows_wal_sender_timeout() {
        assert_eq!(source_stall_limit(60_000), Duration::from_secs(120));
        assert_eq!(source_stall_limit(5_000), Duration::from_secs(30));
        assert_eq!(source_stall_limit(600_000), Duration::from_secs(1200));
        assert_eq!(source_stall_limit(0), Duration::from_secs(300));
    }
}
