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

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, Table};
use crate::conninfo::ConnInfo;
use crate::copy::{self, CopyContext, TableCopy};
use crate::error::{Error, Side};
use crate::ident::QualifiedName;
use crate::plan::{Resolved, Selection, resolve};
use crate::progress::{Progress, Reporter};
use crate::replication::{self, ReplicationConn};
use crate::schema::{self, DumpFilter, DumpTools};
use crate::sequence;
use crate::session;
use crate::state::{self, Phase};

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
    pub ended_by: Option<String>,
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
            let _ = state::event(&client, "error", &crate::error::chain(e)).await;
        }
    }
    result
}

async fn run_inner(opts: &CloneOptions) -> Result<CloneReport, Error> {
    let src_info = session::resolve(Side::Source, &opts.source)?;
    let tgt_info = session::resolve(Side::Target, &opts.target)?;
    // One process per migration: this session holds the lock for the whole run.
    let mut target = lock(&tgt_info).await?;
    // A restart of either server or a dropped connection during the copy: the copy resumes by itself
    // (copied chunks stay; the rest is copied in a new snapshot), as a second run would.
    let mut backoff = Duration::from_millis(500);
    let mut attempts = 0;
    let mut report = loop {
        let started = Instant::now();
        let e = match copy_part(opts, &src_info, &tgt_info).await {
            Ok(r) => break r,
            Err(e) => e,
        };
        if started.elapsed() > Duration::from_secs(30) {
            (attempts, backoff) = (0, Duration::from_millis(500));
        }
        attempts += 1;
        if !e.retryable() || opts.stop.is_cancelled() || attempts > 8 {
            return Err(e);
        }
        crate::monitor::count_error(e.kind());
        tracing::warn!(
            "the copy was interrupted ({}); retrying in {:.1}s, it resumes where it stopped",
            crate::error::chain(&e),
            backoff.as_secs_f64()
        );
        tokio::select! {
            _ = opts.stop.cancelled() => return Err(Error::Interrupted),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(15));
        if let Err(e) = relock(&mut target, &tgt_info).await
            && matches!(e, Error::Blocked(_))
        {
            return Err(e);
        }
    };
    relock(&mut target, &tgt_info).await?;
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
    let cutover = state::cutover_step(&target)
        .await
        .map_err(Error::sql(Side::Target, "reading the cutover state"))?;
    let forward = crate::stream::follow::FollowPlan {
        source: src_info.clone(),
        target: tgt_info.clone(),
        control: tgt_info.clone(),
        direction: crate::stream::follow::Direction::Forward,
        slot,
        publication,
    };
    let reverse = forward.reverse();
    let plan = match cutover.as_ref().map(|(s, r)| (s.as_str(), *r)) {
        Some((state::step::SWITCHED, true)) => reverse.clone(),
        Some((state::step::SWITCHED, false)) => {
            return Err(Error::Blocked(
                "the cutover of this migration is done and it kept no reverse stream: there is nothing \
                 left to follow. `hikkoshi clean` removes hikkoshi's state"
                    .into(),
            ));
        }
        Some((state::step::ROLLING_BACK | state::step::ROLLED_BACK, _)) => {
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
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = tokio::spawn(keep_lock(
        tgt_info.clone(),
        target,
        follow_stop.clone(),
        keeper_done.clone(),
        lost.clone(),
    ));
    let result = follow_then_reverse(plan, reverse, &tgt_info, &follow_stop, &mut report).await;
    keeper_done.cancel();
    let _ = keeper.await;
    if lost.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(another_process(&tgt_info));
    }
    result?;
    Ok(report)
}

/// The forward stream, then, when a cutover with --reverse ended it, the reverse stream.
async fn follow_then_reverse(
    plan: crate::stream::follow::FollowPlan,
    reverse: crate::stream::follow::FollowPlan,
    tgt_info: &ConnInfo,
    stop: &CancellationToken,
    report: &mut CloneReport,
) -> Result<(), Error> {
    let followed = crate::stream::follow::run_on_own_thread(plan, stop.clone()).await?;
    report.applied_lsn = Some(followed.applied.to_string());
    report.transactions_applied = followed.transactions;
    // A cutover with --reverse ended the forward stream: this process keeps the old source current.
    if followed.ended_by.as_deref() == Some(state::step::SWITCHED)
        && state::cutover_step(&session::connect(tgt_info, Side::Target).await?)
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

/// Keeps the migration lock until `done`: checks its session every 2 s and, when it has ended, takes the
/// lock on a new one. When another process holds it by then, sets `lost` and cancels `follow`.
async fn keep_lock(
    tgt_info: ConnInfo,
    mut session: Client,
    follow: CancellationToken,
    done: CancellationToken,
    lost: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let alive = !session.is_closed()
            && tokio::time::timeout(Duration::from_secs(10), session.simple_query("SELECT 1"))
                .await
                .is_ok_and(|r| r.is_ok());
        if alive {
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(10), lock(&tgt_info)).await {
            Ok(Ok(s)) => {
                tracing::info!("the migration lock's session had ended: lock taken again");
                session = s;
            }
            Ok(Err(Error::Blocked(why))) => {
                tracing::error!("{why}: this process stops following");
                lost.store(true, std::sync::atomic::Ordering::Relaxed);
                follow.cancel();
                return;
            }
            _ => {} // the target is not back yet
        }
    }
}

/// Takes the migration lock again on a new session when its session has ended (a restart of the target,
/// a dropped connection).
async fn relock(target: &mut Client, tgt_info: &ConnInfo) -> Result<(), Error> {
    let alive = !target.is_closed()
        && tokio::time::timeout(Duration::from_secs(10), target.simple_query("SELECT 1"))
            .await
            .is_ok_and(|r| r.is_ok());
    if !alive {
        *target = lock(tgt_info).await?;
    }
    Ok(())
}

/// Connects to the target and takes the migration lock, which lives as long as the returned session.
async fn lock(tgt_info: &ConnInfo) -> Result<Client, Error> {
    let target = session::connect(tgt_info, Side::Target).await?;
    if !state::try_lock(&target)
        .await
        .map_err(Error::sql(Side::Target, "taking the migration lock"))?
    {
        return Err(another_process(tgt_info));
    }
    Ok(target)
}

fn another_process(tgt_info: &ConnInfo) -> Error {
    Error::Blocked(format!(
        "another hikkoshi process is already working on the migration into {tgt_info}: wait for it to \
         finish, or stop it (its sessions show application_name 'hikkoshi' in pg_stat_activity)"
    ))
}

/// Copies (or resumes copying) schema, rows, indexes and sequences. The caller holds the migration lock.
async fn copy_part(
    opts: &CloneOptions,
    src_info: &ConnInfo,
    tgt_info: &ConnInfo,
) -> Result<CloneReport, Error> {
    let started = Instant::now();
    let selection =
        Selection::parse(&opts.include, &opts.exclude).map_err(|e| Error::Usage(format!("{e}")))?;
    let source = session::connect(src_info, Side::Source).await?;
    let target = session::connect(tgt_info, Side::Target).await?;

    let cat = Catalog::load(&source)
        .await
        .map_err(Error::sql(Side::Source, "reading the source catalog"))?;
    let resolved = resolve(&cat, &selection)?;
    let target_version: i32 = target
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(Error::sql(Side::Target, "reading the server version"))?
        .get(0);
    let existing = state::load(&target)
        .await
        .map_err(Error::sql(Side::Target, "reading hikkoshi state"))?;
    let mut report = CloneReport {
        tables: resolved.tables.iter().map(|t| t.name.to_string()).collect(),
        ..Default::default()
    };
    let options_json = serde_json::json!({
        "include": opts.include,
        "exclude": opts.exclude,
        "follow": opts.follow,
    });
    let (migration_id, mut phase) = match &existing {
        Some(m) if m.phase == Phase::Done => {
            report.migration_id = m.id.clone();
            report.already_done = true;
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        Some(m) => {
            if m.options.get("include") != options_json.get("include")
                || m.options.get("exclude") != options_json.get("exclude")
            {
                return Err(Error::Blocked(format!(
                    "the clone recorded on the target was started with another selection ({}); run it again \
                     with the same --include/--exclude to resume, or `hikkoshi clean` and start over",
                    m.options
                )));
            }
            if opts.follow && m.options.get("follow") != Some(&serde_json::Value::Bool(true)) {
                return Err(Error::Blocked(
                    "the clone recorded on the target was started without --follow: no slot kept the \
                     changes since its snapshot. Finish it without --follow, or `hikkoshi clean`, drop the \
                     copied tables and clone again with --follow"
                        .into(),
                ));
            }
            report.resumed = true;
            (m.id.clone(), m.phase)
        }
        None => {
            // The preflight of `hikkoshi check`, before anything is created anywhere.
            let preflight = crate::check::evaluate(&crate::check::Inputs {
                source: &source,
                target: &target,
                catalog: &cat,
                tables: &resolved.tables,
                pg_bin: opts.pg_bin.as_deref(),
                follow: opts.follow,
                measure: false,
            })
            .await?;
            for w in preflight
                .findings
                .iter()
                .filter(|f| f.level == crate::check::Level::Warning)
            {
                tracing::warn!("{}: {}", w.check, w.message);
                report.warnings.push(w.message.clone());
            }
            if preflight.blocked() {
                return Err(Error::Blocked(format!(
                    "the preflight found what would make this clone fail. Nothing was changed on either \
                     server. Fix these and run again (`hikkoshi check` shows the full report):\n{}",
                    preflight.blockers_text()
                )));
            }
            (new_migration_id(), Phase::Schema)
        }
    };
    report.migration_id = migration_id.clone();
    let tools = DumpTools::find(
        opts.pg_bin.as_deref(),
        cat.major_version() as u32,
        (target_version / 10000) as u32,
    )?;
    tracing::info!(
        pg_dump = %tools.bin.display(),
        version = %tools.version,
        "selected {} table(s), {} sequence(s)",
        resolved.tables.len(),
        resolved.sequences.len()
    );

    // The snapshot every reader shares. Nothing exists on either server yet if this fails.
    let repl = ReplicationConn::connect(src_info)
        .await
        .map_err(Error::replication("opening a replication connection"))?;
    let fresh_follow = existing.is_none() && opts.follow;
    let publication = crate::stream::names::stream(&migration_id);
    if fresh_follow {
        // The publication must exist before the slot: pgoutput reads it as of each change's time.
        create_publication(&source, &publication, &resolved.tables).await?;
    }
    // A following clone keeps its slot (the stream starts at its snapshot); any other run, and a resumed
    // one, takes a temporary slot just for a snapshot.
    let slot_name = if fresh_follow {
        publication.clone()
    } else {
        crate::stream::names::temporary_slot(&migration_id, std::process::id())
    };
    let snap = match replication::create_with_snapshot(repl, &slot_name, !fresh_follow).await {
        Ok(s) => s,
        Err(e) => {
            if fresh_follow {
                drop_publication(&source, &publication).await;
            }
            return Err(Error::replication(
                "creating a logical replication slot with an exported snapshot",
            )(e));
        }
    };
    report.snapshot_lsn = snap.lsn.to_string();
    tracing::info!(slot = %snap.slot, lsn = %snap.lsn, snapshot = %snap.snapshot, "exported snapshot");

    // Schema archive and the last checks. A fresh following clone made a slot and a publication already:
    // if anything fails before the state records them, they are dropped again.
    let prepared: Result<(schema::Archive, bool), Error> = async {
        let archive = schema::dump(
            &tools,
            src_info,
            Some(&snap.snapshot),
            &DumpFilter {
                excluded: &resolved.excluded,
            },
        )
        .await?;
        let owners = schema::archive_owners(&tools, &archive, tgt_info).await?;
        let missing = missing_roles(&source, &target, &owners).await?;
        if !missing.is_empty() {
            let w = format!(
                "roles {} do not exist on the target: objects will belong to the target user and grants \
                 are not copied (create the roles first, e.g. from `pg_dumpall --roles-only`, to keep them)",
                missing.join(", ")
            );
            tracing::warn!("{w}");
            report.warnings.push(w);
        }
        let large_objects: i64 = source
            .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
            .await
            .map_err(Error::sql(Side::Source, "counting large objects"))?
            .get(0);
        if large_objects > 0 {
            let w = format!(
                "the source has {large_objects} large object(s) (pg_largeobject); hikkoshi does not copy \
                 them yet: move them separately (e.g. `pg_dump --large-objects --data-only -t none`) \
                 before switching over"
            );
            tracing::warn!("{w}");
            report.warnings.push(w);
        }
        Ok((archive, missing.is_empty()))
    }
    .await;
    let (archive, keep_owners) = match prepared {
        Ok(p) => p,
        Err(e) => {
            if fresh_follow {
                undo_slot(snap, &source, &publication).await;
            }
            return Err(e);
        }
    };

    // Every check is done: from here on the target holds state that a rerun resumes from.
    if existing.is_none() {
        state::create(&target).await.map_err(Error::sql(
            Side::Target,
            "creating the hikkoshi state schema",
        ))?;
        state::insert_migration(&target, &migration_id, &src_info.to_string(), &options_json)
            .await
            .map_err(Error::sql(Side::Target, "recording the migration"))?;
        if fresh_follow {
            state::insert_stream(&target, &slot_name, &publication, snap.lsn)
                .await
                .map_err(Error::sql(Side::Target, "recording the slot"))?;
        }
        record(
            &target,
            "start",
            &format!(
                "clone of {} table(s) from {src_info}, snapshot at {}",
                resolved.tables.len(),
                snap.lsn
            ),
        )
        .await?;
    } else {
        record(
            &target,
            "resume",
            &format!(
                "resumed in phase {}, new snapshot at {}",
                phase.as_str(),
                snap.lsn
            ),
        )
        .await?;
    }

    if phase == Phase::Schema {
        // pre-data runs in one transaction: the tables are all there (an earlier run restored them) or none
        if !all_tables_exist(&target, &resolved.tables).await?
            && let Err(e) = schema::restore_pre_data(&tools, &archive, tgt_info, keep_owners).await
        {
            if existing.is_none() {
                // nothing of the schema stayed: dropping our state leaves the target as it was
                let _ = target.batch_execute("DROP SCHEMA hikkoshi CASCADE").await;
                if fresh_follow {
                    undo_slot(snap, &source, &publication).await;
                }
            }
            return Err(e.into());
        }
        record(
            &target,
            "schema",
            "pre-data restored (extensions, types, tables)",
        )
        .await?;
        plan_chunks(&source, &target, &resolved.tables, opts.chunk_bytes).await?;
        phase = Phase::Copy;
    }

    if phase == Phase::Copy {
        let t = Instant::now();
        let (chunks, rows, bytes) =
            copy_phase(opts, src_info, tgt_info, &target, &resolved, &snap).await?;
        tracing::info!("copy phase done in {:.1}s", t.elapsed().as_secs_f64());
        report.chunks_copied = chunks;
        report.rows = rows;
        report.bytes = bytes;
        record(
            &target,
            "copy",
            &format!("{chunks} chunk(s), {rows} rows, {bytes} bytes copied by this run"),
        )
        .await?;
        state::set_phase(&target, Phase::PostData)
            .await
            .map_err(Error::sql(Side::Target, "recording the phase"))?;
        phase = Phase::PostData;
    }
    let snapshot_lsn = snap.lsn;
    snap.conn.close().await;

    if phase == Phase::PostData {
        let t = Instant::now();
        let skipped = schema::restore_post_data(
            &tools,
            &archive,
            tgt_info,
            &target,
            &schema::PostDataOptions {
                jobs: opts.jobs,
                keep_owners,
                maintenance_work_mem: &opts.maintenance_work_mem,
                own_publication: &crate::stream::names::stream(&migration_id),
            },
        )
        .await?;
        tracing::info!(
            skipped_existing = skipped,
            "indexes, constraints and triggers built in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        refresh_matviews(&source, &target, &resolved.matviews).await?;
        let positions = sequence::read(&source, Side::Source, &resolved.sequences).await?;
        sequence::apply(&target, &positions).await?;
        report.sequences = positions.len();
        let t = Instant::now();
        analyze(tgt_info, &resolved.tables, opts.jobs).await?;
        tracing::info!(
            "analyzed {} table(s) in {:.1}s",
            resolved.tables.len(),
            t.elapsed().as_secs_f64()
        );
        target
            .batch_execute("UPDATE hikkoshi.tables SET state = 'indexed'")
            .await
            .map_err(Error::sql(Side::Target, "recording table states"))?;
        state::set_phase(&target, Phase::Done)
            .await
            .map_err(Error::sql(Side::Target, "recording the phase"))?;
        record(
            &target,
            "done",
            &format!("clone complete at source LSN {snapshot_lsn}"),
        )
        .await?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn create_publication(source: &Client, name: &str, tables: &[Table]) -> Result<(), Error> {
    let mut names: Vec<String> = tables
        .iter()
        .map(|t| t.root.as_ref().unwrap_or(&t.name).quoted())
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(Error::Usage(
            "--follow needs at least one selected table".into(),
        ));
    }
    let via_root = source
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 130000",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "reading the server version"))?
        .get::<_, bool>(0);
    source
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {}{}",
            crate::ident::quote_ident(name),
            names.join(", "),
            if via_root {
                " WITH (publish_via_partition_root = true)"
            } else {
                ""
            }
        ))
        .await
        .map_err(Error::sql(Side::Source, "creating the publication"))
}

/// Drops the slot (on the session that made it) and the publication of a following clone that failed
/// before it began.
async fn undo_slot(snap: replication::ExportedSnapshot, source: &Client, publication: &str) {
    let mut conn = snap.conn;
    if let Err(e) = conn
        .simple_query(&format!(
            "DROP_REPLICATION_SLOT {}",
            crate::ident::quote_ident(&snap.slot)
        ))
        .await
    {
        tracing::warn!(
            "could not drop slot {} ({}): `hikkoshi clean` or pg_drop_replication_slot removes it",
            snap.slot,
            crate::error::chain(&e)
        );
    }
    conn.close().await;
    drop_publication(source, publication).await;
}

async fn drop_publication(source: &Client, name: &str) {
    let _ = source
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            crate::ident::quote_ident(name)
        ))
        .await;
}

async fn all_tables_exist(target: &Client, tables: &[Table]) -> Result<bool, Error> {
    let names: Vec<String> = tables.iter().map(|t| t.name.quoted()).collect();
    Ok(target
        .query_one(
            "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest($1::text[]) n",
            &[&names],
        )
        .await
        .map_err(Error::sql(Side::Target, "checking for tables"))?
        .get::<_, Option<bool>>(0)
        .unwrap_or(true))
}

/// Roles that own objects in the archive on the source and do not exist on the target. The owner column of
/// `pg_restore --list` is empty for some entries (extensions), so a word there is a role only if the source
/// has that role.
async fn missing_roles(
    source: &Client,
    target: &Client,
    owners: &HashSet<String>,
) -> Result<Vec<String>, Error> {
    let owners: Vec<&String> = owners.iter().collect();
    let owners: Vec<String> = source
        .query(
            "SELECT o FROM unnest($1::text[]) o WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = o)",
            &[&owners],
        )
        .await
        .map_err(Error::sql(Side::Source, "checking roles"))?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let rows = target
        .query(
            "SELECT o FROM unnest($1::text[]) o WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = o)
             ORDER BY o",
            &[&owners],
        )
        .await
        .map_err(Error::sql(Side::Target, "checking roles"))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Records every table and its chunks, and moves the migration to the copy phase, in one transaction.
async fn plan_chunks(
    source: &Client,
    target: &Client,
    tables: &[Table],
    chunk_bytes: i64,
) -> Result<(), Error> {
    let planned = crate::plan::plan_chunks(source, tables, chunk_bytes).await?;
    let sql = |e| Error::sql(Side::Target, "recording the copy plan")(e);
    target.batch_execute("BEGIN").await.map_err(sql)?;
    for p in &planned {
        let t = p.table;
        target
            .execute(
                "INSERT INTO hikkoshi.tables (schema_name, table_name, root_schema, root_name, copy_format,
                                              chunk_method, est_bytes)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (schema_name, table_name) DO NOTHING",
                &[
                    &t.name.schema,
                    &t.name.name,
                    &t.root.as_ref().map(|r| r.schema.clone()),
                    &t.root.as_ref().map(|r| r.name.clone()),
                    &if t.binary_portable() { "binary" } else { "text" },
                    &p.method.as_str(),
                    &t.bytes,
                ],
            )
            .await
            .map_err(sql)?;
        for s in &p.chunks {
            target
                .execute(
                    "INSERT INTO hikkoshi.chunks (schema_name, table_name, chunk_no, predicate, est_bytes)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[&t.name.schema, &t.name.name, &s.no, &s.predicate, &s.est_bytes],
                )
                .await
                .map_err(sql)?;
        }
    }
    target
        .execute(
            "UPDATE hikkoshi.migration SET phase = 'copy', updated_at = now()",
            &[],
        )
        .await
        .map_err(sql)?;
    target.batch_execute("COMMIT").await.map_err(sql)?;
    tracing::info!("{}", crate::plan::describe(&planned));
    Ok(())
}

/// Copies every chunk not yet copied; returns chunks, rows and bytes copied by this run.
async fn copy_phase(
    opts: &CloneOptions,
    src_info: &ConnInfo,
    tgt_info: &ConnInfo,
    target: &Client,
    resolved: &Resolved,
    snap: &replication::ExportedSnapshot,
) -> Result<(u64, u64, u64), Error> {
    let sql = |what: &'static str| Error::sql(Side::Target, what);
    // Claims of a dead run hold no rows: their transactions rolled back.
    target
        .batch_execute("UPDATE hikkoshi.chunks SET state = 'pending', started_at = NULL WHERE state = 'copying'")
        .await
        .map_err(sql("resetting interrupted chunks"))?;
    // Page ranges of two different snapshots do not partition the rows: a ctid-split table that was left
    // half copied starts over. So does a partition tree left half copied, unless every partition is split
    // by key: the stream names only the root, so one window (one snapshot, or convergence by key) must
    // serve all its partitions.
    let partial = target
        .query(
            "WITH chunk AS (
                 SELECT c.state, t.schema_name, t.table_name,
                        coalesce(t.root_schema, t.schema_name) AS rs, coalesce(t.root_name, t.table_name) AS rn
                 FROM hikkoshi.chunks c JOIN hikkoshi.tables t USING (schema_name, table_name)),
             tree AS (
                 SELECT coalesce(root_schema, schema_name) AS rs, coalesce(root_name, table_name) AS rn,
                        bool_and(chunk_method = 'key') AS by_key
                 FROM hikkoshi.tables GROUP BY 1, 2)
             SELECT t.schema_name, t.table_name FROM hikkoshi.tables t
             WHERE (t.chunk_method = 'ctid'
                    AND EXISTS (SELECT 1 FROM chunk c WHERE (c.schema_name, c.table_name) = (t.schema_name, t.table_name) AND c.state = 'copied')
                    AND EXISTS (SELECT 1 FROM chunk c WHERE (c.schema_name, c.table_name) = (t.schema_name, t.table_name) AND c.state <> 'copied'))
                OR (t.root_name IS NOT NULL
                    AND EXISTS (SELECT 1 FROM tree r WHERE (r.rs, r.rn) = (t.root_schema, t.root_name) AND NOT r.by_key)
                    AND EXISTS (SELECT 1 FROM chunk c WHERE (c.rs, c.rn) = (t.root_schema, t.root_name) AND c.state = 'copied')
                    AND EXISTS (SELECT 1 FROM chunk c WHERE (c.rs, c.rn) = (t.root_schema, t.root_name) AND c.state <> 'copied'))",
            &[],
        )
        .await
        .map_err(sql("finding half-copied tables"))?;
    for r in partial {
        let name = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        tracing::info!(table = %name, "restarting a half-copied table split by ctid, or a partition of a half-copied tree");
        target
            .batch_execute(&format!(
                "BEGIN; TRUNCATE ONLY {q};
                 UPDATE hikkoshi.chunks SET state = 'pending', rows_copied = NULL, bytes_copied = NULL,
                        snapshot_lsn = NULL, finished_at = NULL
                 WHERE schema_name = {s} AND table_name = {t};
                 COMMIT;",
                q = name.quoted(),
                s = crate::ident::quote_literal(&name.schema),
                t = crate::ident::quote_literal(&name.name),
            ))
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
        if c.state == "copied" {
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
    });
    let pending = chunk_states.iter().filter(|c| c.state != "copied").count();
    tracing::info!(
        "copying {pending} chunk(s) with {} worker(s)",
        opts.jobs.max(1).min(pending.max(1))
    );
    let reporter = Reporter::start(progress.clone(), Duration::from_secs(5));
    let result = copy::run(ctx, opts.jobs.max(1).min(pending.max(1))).await;
    reporter.finish().await;
    result?;
    // The phase moves on only when every chunk is recorded as copied.
    let left: i64 = target
        .query_one(
            "SELECT count(*) FROM hikkoshi.chunks WHERE state <> 'copied'",
            &[],
        )
        .await
        .map_err(sql("checking the copy"))?
        .get(0);
    if left > 0 {
        return Err(Error::Blocked(format!(
            "{left} chunk(s) are not copied although every worker finished: run the same command again to \
             copy them"
        )));
    }
    target
        .batch_execute(
            "UPDATE hikkoshi.tables t SET state = 'copied'
             WHERE NOT EXISTS (SELECT 1 FROM hikkoshi.chunks c
                               WHERE (c.schema_name, c.table_name) = (t.schema_name, t.table_name)
                                 AND c.state <> 'copied')",
        )
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

/// Fills the materialized views that are populated on the source (the schema creates them empty).
async fn refresh_matviews(
    source: &Client,
    target: &Client,
    matviews: &[QualifiedName],
) -> Result<(), Error> {
    for m in matviews {
        let populated: Option<bool> = source
            .query_opt(
                "SELECT relispopulated FROM pg_class WHERE oid = to_regclass($1)",
                &[&m.quoted()],
            )
            .await
            .map_err(Error::sql(Side::Source, "reading materialized views"))?
            .map(|r| r.get(0));
        let exists: bool = target
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&m.quoted()])
            .await
            .map_err(Error::sql(Side::Target, "reading materialized views"))?
            .get(0);
        if populated == Some(true) && exists {
            target
                .batch_execute(&format!("REFRESH MATERIALIZED VIEW {}", m.quoted()))
                .await
                .map_err(Error::sql(
                    Side::Target,
                    format!("refreshing materialized view {m}"),
                ))?;
        }
    }
    Ok(())
}

/// Gathers planner statistics on the copied tables, `jobs` at a time, so the new server plans well at once.
async fn analyze(tgt_info: &ConnInfo, tables: &[Table], jobs: usize) -> Result<(), Error> {
    let queue = Arc::new(std::sync::Mutex::new(
        tables.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
    ));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..jobs.max(1).min(tables.len().max(1)) {
        let queue = queue.clone();
        let info = tgt_info.clone();
        set.spawn(async move {
            let client = session::connect(&info, Side::Target).await?;
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some(t) = next else { break };
                client
                    .batch_execute(&format!("ANALYZE {}", t.quoted()))
                    .await
                    .map_err(Error::sql(Side::Target, format!("analyzing {t}")))?;
            }
            Ok::<(), Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| Error::Blocked(format!("an analyze task failed: {e}")))??;
    }
    Ok(())
}

/// Appends to the migration's event log.
async fn record(target: &Client, kind: &str, message: &str) -> Result<(), Error> {
    state::event(target, kind, message)
        .await
        .map_err(Error::sql(Side::Target, "recording an event"))
}

fn new_migration_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mixed = (nanos as u64) ^ ((std::process::id() as u64) << 40);
    format!("{:08x}", (mixed ^ (mixed >> 29)) as u32)
}
