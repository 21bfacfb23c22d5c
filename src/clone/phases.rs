//! One run of the copy (the caller holds the migration lock and retries transient failures): decide from
//! what the target recorded, take the snapshot, dump the schema, then each phase not yet done — pre-data,
//! the chunks, post-data — recording each on the target as it ends.

use std::time::Instant;

use tokio_postgres::Client;

use super::objects::{
    all_tables_exist, analyze, create_publication, drop_publication, lend_create, missing_roles,
    refresh_matviews, take_back_create, undo_slot,
};
use super::{CloneOptions, CloneReport, chunks};
use crate::catalog::Catalog;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::plan::{Resolved, Selection, resolve};
use crate::replication::{self, ExportedSnapshot, ReplicationConn};
use crate::roles;
use crate::schema::{self, DumpFilter, DumpTools};
use crate::sequence;
use crate::session;
use crate::state::{self, Migration, Phase};

/// What the target recorded leaves to do.
enum Begun<'a> {
    /// The clone is complete already.
    Done(CloneReport),
    /// This run, from this phase.
    Run(Box<Run<'a>>, Phase),
}

/// One run: both sessions, the selection, and what the target recorded before it.
struct Run<'a> {
    opts: &'a CloneOptions,
    src_info: &'a ConnInfo,
    tgt_info: &'a ConnInfo,
    source: Client,
    target: Client,
    resolved: Resolved,
    existing: Option<Migration>,
    migration_id: String,
    options_json: serde_json::Value,
    tools: DumpTools,
    report: CloneReport,
}

/// Copies (or resumes copying) schema, rows, indexes and sequences. The caller holds the migration lock.
pub(super) async fn copy_part(
    opts: &CloneOptions,
    src_info: &ConnInfo,
    tgt_info: &ConnInfo,
) -> Result<CloneReport, Error> {
    let started = Instant::now();
    let (mut run, mut phase) = match Run::begin(opts, src_info, tgt_info, started).await? {
        Begun::Done(report) => return Ok(report),
        Begun::Run(run, phase) => (*run, phase),
    };
    let snap = run.snapshot().await?;
    // Schema archive and the last checks. A fresh following clone made a slot and a publication already:
    // if anything fails before the state records them, they are dropped again.
    let archive = match run.dump_schema(&snap).await {
        Ok(p) => p,
        Err(e) => {
            if run.fresh_follow() {
                undo_slot(snap, &run.source, &run.publication()).await;
            }
            return Err(e);
        }
    };
    // Every check is done: from here on the target holds state that a rerun resumes from.
    run.record_start(&snap, phase).await?;
    if phase == Phase::Schema {
        if let Err(e) = run.carry_roles().await {
            run.undo_new(snap).await;
            return Err(e);
        }
    } else {
        run.give_passwords().await?;
    }
    let keep_owners = run.keep_owners(&archive).await?;
    if phase == Phase::Schema {
        if let Err(e) = run.pre_data(&archive, keep_owners).await {
            run.undo_new(snap).await;
            return Err(e);
        }
        phase = Phase::Copy;
    }
    if phase == Phase::Copy {
        run.copy(&snap).await?;
        phase = Phase::PostData;
    }
    let snapshot_lsn = snap.lsn;
    snap.conn.close().await;
    if phase == Phase::PostData {
        run.post_data(&archive, keep_owners, snapshot_lsn).await?;
    }
    run.report.seconds = started.elapsed().as_secs_f64();
    Ok(run.report)
}

impl<'a> Run<'a> {
    /// Reads the selection and what the target recorded. A new migration passes `check`'s preflight first,
    /// before anything is created anywhere; a recorded one must have been started the same way.
    async fn begin(
        opts: &'a CloneOptions,
        src_info: &'a ConnInfo,
        tgt_info: &'a ConnInfo,
        started: Instant,
    ) -> Result<Begun<'a>, Error> {
        let selection = Selection::parse(&opts.include, &opts.exclude)
            .map_err(|e| Error::Usage(format!("{e}")))?;
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
        let role_map = roles::role_map(&opts.role_map)?;
        let options_json = serde_json::json!({
            "include": opts.include,
            "exclude": opts.exclude,
            "follow": opts.follow,
            "role_map": role_map,
        });
        let (migration_id, phase) = match &existing {
            Some(m) if m.phase == Phase::Done => {
                give_passwords(&target, &opts.role_passwords).await?;
                report.migration_id = m.id.clone();
                report.already_done = true;
                report.seconds = started.elapsed().as_secs_f64();
                return Ok(Begun::Done(report));
            }
            Some(m) => {
                resumable(m, opts, &options_json)?;
                report.resumed = true;
                (m.id.clone(), m.phase)
            }
            None => {
                preflight(opts, &source, &target, &cat, &resolved, &mut report).await?;
                (super::new_migration_id(), Phase::Schema)
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
        Ok(Begun::Run(
            Box::new(Run {
                opts,
                src_info,
                tgt_info,
                source,
                target,
                resolved,
                existing,
                migration_id,
                options_json,
                tools,
                report,
            }),
            phase,
        ))
    }

    /// A new migration that failed before its schema was restored: nothing of the schema stayed, so dropping
    /// our state (and a following clone's slot and publication) leaves the target as it was; roles created
    /// by this run are named, since they stay.
    async fn undo_new(&self, snap: ExportedSnapshot) {
        if self.existing.is_none() {
            let roles = state::roles::created(&self.target)
                .await
                .unwrap_or_default();
            if !roles.is_empty() {
                tracing::warn!(
                    "role(s) {} created by this run stay on the target (roles are the cluster's): a \
                     rerun uses them; DROP ROLE removes them",
                    roles.join(", ")
                );
            }
            // nothing of the schema stayed: dropping our state leaves the target as it was
            let _ = self
                .target
                .batch_execute("DROP SCHEMA hikkoshi CASCADE")
                .await;
            if self.fresh_follow() {
                undo_slot(snap, &self.source, &self.publication()).await;
            }
        }
    }

    /// A new following clone: it creates the publication and keeps its slot.
    fn fresh_follow(&self) -> bool {
        self.existing.is_none() && self.opts.follow
    }

    fn publication(&self) -> String {
        crate::stream::names::stream(&self.migration_id)
    }

    /// The snapshot every reader shares. Nothing exists on either server yet if this fails.
    async fn snapshot(&mut self) -> Result<ExportedSnapshot, Error> {
        let repl = ReplicationConn::connect(self.src_info)
            .await
            .map_err(Error::replication("opening a replication connection"))?;
        let publication = self.publication();
        if self.fresh_follow() {
            // The publication must exist before the slot: pgoutput reads it as of each change's time.
            create_publication(&self.source, &publication, &self.resolved.tables).await?;
            self.capture_ddl(&publication).await?;
        }
        // A following clone keeps its slot (the stream starts at its snapshot); any other run, and a
        // resumed one, takes a temporary slot just for a snapshot.
        let slot_name = if self.fresh_follow() {
            publication.clone()
        } else {
            crate::stream::names::temporary_slot(&self.migration_id, std::process::id())
        };
        let snap =
            match replication::create_with_snapshot(repl, &slot_name, !self.fresh_follow()).await {
                Ok(s) => s,
                Err(e) => {
                    if self.fresh_follow() {
                        drop_publication(&self.source, &publication).await;
                    }
                    return Err(Error::replication(
                        "creating a logical replication slot with an exported snapshot",
                    )(e));
                }
            };
        self.report.snapshot_lsn = snap.lsn.to_string();
        tracing::info!(slot = %snap.slot, lsn = %snap.lsn, snapshot = %snap.snapshot, "exported snapshot");
        Ok(snap)
    }

    /// Installs the DDL capture for the new stream (in the publication before the slot exists, so that no
    /// command goes uncaptured), or says why DDL will stop the stream instead.
    async fn capture_ddl(&mut self, publication: &str) -> Result<(), Error> {
        use crate::stream::ddl::capture;
        let selection = Selection::parse(&self.opts.include, &self.opts.exclude)
            .map_err(|e| Error::Usage(format!("{e}")))?;
        match capture::install_on(&self.source, publication, &selection).await {
            Ok(capture::Mode::Capture) => {
                tracing::info!("{}", capture::Mode::Capture.describe());
                Ok(())
            }
            Ok(mode) => {
                tracing::warn!("{}", mode.describe());
                self.report.warnings.push(mode.describe());
                Ok(())
            }
            Err(e) => {
                drop_publication(&self.source, publication).await;
                Err(Error::sql(Side::Source, "installing the DDL capture")(e))
            }
        }
    }

    /// The schema archive in the snapshot. Warns of what the clone does not carry.
    async fn dump_schema(&mut self, snap: &ExportedSnapshot) -> Result<schema::Archive, Error> {
        let archive = schema::dump(
            &self.tools,
            self.src_info,
            Some(&snap.snapshot),
            &DumpFilter {
                excluded: &self.resolved.excluded,
            },
        )
        .await?;
        Ok(archive)
    }

    /// Records the migration (a new one, with its stream) or the resume.
    async fn record_start(&self, snap: &ExportedSnapshot, phase: Phase) -> Result<(), Error> {
        let target = &self.target;
        if self.existing.is_some() {
            return record(
                target,
                "resume",
                &format!(
                    "resumed in phase {}, new snapshot at {}",
                    phase.as_str(),
                    snap.lsn
                ),
            )
            .await;
        }
        state::create(target).await.map_err(Error::sql(
            Side::Target,
            "creating the hikkoshi state schema",
        ))?;
        state::insert_migration(
            target,
            &self.migration_id,
            &self.src_info.to_string(),
            &self.options_json,
        )
        .await
        .map_err(Error::sql(Side::Target, "recording the migration"))?;
        if self.fresh_follow() {
            state::insert_stream(target, &self.publication(), &self.publication(), snap.lsn)
                .await
                .map_err(Error::sql(Side::Target, "recording the slot"))?;
        }
        record(
            target,
            "start",
            &format!(
                "clone of {} table(s) from {}, snapshot at {}",
                self.resolved.tables.len(),
                self.src_info,
                snap.lsn
            ),
        )
        .await
    }

    /// Pre-data in one transaction (the tables are all there, an earlier run restored them, or none), then
    /// the chunk plan.
    async fn pre_data(
        &mut self,
        archive: &schema::Archive,
        keep_owners: bool,
    ) -> Result<(), Error> {
        if !all_tables_exist(&self.target, &self.resolved.tables).await? {
            let lent = if keep_owners {
                lend_create(&self.source, &self.target).await?
            } else {
                Vec::new()
            };
            let restored =
                schema::restore_pre_data(&self.tools, archive, self.tgt_info, keep_owners).await;
            take_back_create(&self.target, &lent).await;
            restored?;
        }
        if keep_owners {
            // the restore leaves the target's own schema public as it is: its grants come here
            for w in schema::grants::carry_public(&self.source, &self.target).await? {
                self.warn(w);
            }
        }
        state::roles::set_owners_kept(&self.target, keep_owners)
            .await
            .map_err(Error::sql(
                Side::Target,
                "recording whether owners were kept",
            ))?;
        record(
            &self.target,
            "schema",
            "pre-data restored (extensions, types, tables)",
        )
        .await?;
        chunks::plan(
            &self.source,
            &self.target,
            &self.resolved.tables,
            self.opts.chunk_bytes,
        )
        .await
    }

    /// Every chunk not yet copied, then the phase moves on.
    async fn copy(&mut self, snap: &ExportedSnapshot) -> Result<(), Error> {
        let t = Instant::now();
        let (chunks, rows, bytes) = chunks::copy(
            self.opts,
            (self.src_info, self.tgt_info),
            &self.target,
            &self.resolved,
            snap,
        )
        .await?;
        // large objects are in no stream and no table: copied whole, in the snapshot (a resume compares
        // them again and copies what differs; a cutover levels them again)
        let objects = crate::large_objects::copy_in_snapshot(
            (self.src_info, self.tgt_info),
            &snap.snapshot,
            self.opts.jobs,
        )
        .await?;
        if objects.compared > 0 {
            tracing::info!(
                "large objects: {} copied, {} removed in {:.1}s",
                objects.copied,
                objects.removed,
                objects.seconds
            );
        }
        for w in objects.warnings {
            tracing::warn!("{w}");
            self.report.warnings.push(w);
        }
        tracing::info!("copy phase done in {:.1}s", t.elapsed().as_secs_f64());
        self.report.chunks_copied = chunks;
        self.report.rows = rows;
        self.report.bytes = bytes;
        record(
            &self.target,
            "copy",
            &format!("{chunks} chunk(s), {rows} rows, {bytes} bytes copied by this run"),
        )
        .await?;
        state::set_phase(&self.target, Phase::PostData)
            .await
            .map_err(Error::sql(Side::Target, "recording the phase"))
    }

    /// Indexes, constraints and triggers, materialized views, sequences and statistics; then done.
    async fn post_data(
        &mut self,
        archive: &schema::Archive,
        keep_owners: bool,
        snapshot_lsn: crate::lsn::Lsn,
    ) -> Result<(), Error> {
        let (opts, target) = (self.opts, &self.target);
        let t = Instant::now();
        let skipped = schema::restore_post_data(
            &self.tools,
            archive,
            self.tgt_info,
            target,
            &schema::PostDataOptions {
                jobs: opts.jobs,
                keep_owners,
                maintenance_work_mem: &opts.maintenance_work_mem,
            },
        )
        .await?;
        tracing::info!(
            skipped_existing = skipped,
            "indexes, constraints and triggers built in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        crate::failpoint::hit(crate::failpoint::CLONE_AFTER_POST_DATA);
        let t = Instant::now();
        refresh_matviews(
            &self.source,
            (target, self.tgt_info),
            &self.resolved.matviews,
            opts.jobs,
        )
        .await?;
        if !self.resolved.matviews.is_empty() {
            tracing::info!(
                "materialized views refreshed in {:.1}s",
                t.elapsed().as_secs_f64()
            );
        }
        let positions =
            sequence::read(&self.source, Side::Source, &self.resolved.sequences).await?;
        sequence::apply(target, &positions).await?;
        self.report.sequences = positions.len();
        let t = Instant::now();
        analyze(self.tgt_info, &self.resolved.tables, opts.jobs).await?;
        tracing::info!(
            "analyzed {} table(s) in {:.1}s",
            self.resolved.tables.len(),
            t.elapsed().as_secs_f64()
        );
        // everything the renamed roles own is restored: they take their names on the target
        let map = roles::role_map(&opts.role_map)?;
        roles::rename(target, &map).await?;
        for (old, new) in &map {
            let _ = state::roles::rename(target, old, new).await;
        }
        state::copy::mark_tables_indexed(target)
            .await
            .map_err(Error::sql(Side::Target, "recording table states"))?;
        state::set_phase(target, Phase::Done)
            .await
            .map_err(Error::sql(Side::Target, "recording the phase"))?;
        record(
            target,
            "done",
            &format!("clone complete at source LSN {snapshot_lsn}"),
        )
        .await
    }

    /// The roles the objects need, created on the target before the schema (see `roles`), unless
    /// `--no-roles`. Recorded in the state, for the cutover to check that every LOGIN role can log in.
    async fn carry_roles(&mut self) -> Result<(), Error> {
        if !self.opts.roles {
            return self.give_passwords().await;
        }
        let given: Vec<roles::GivenPassword> = self
            .opts
            .role_passwords
            .iter()
            .map(|s| roles::given_password(s))
            .collect::<Result<_, _>>()?;
        let source_version = roles::major(&self.source, Side::Source).await?;
        let source_roles = roles::read(&self.source, source_version).await?;
        let target_side = roles::target_side(&self.target).await?;
        let created_earlier = state::roles::created(&self.target)
            .await
            .map_err(Error::sql(Side::Target, "reading the carried roles"))?;
        roles::check_map(
            &roles::role_map(&self.opts.role_map)?,
            &source_roles,
            &target_side,
            &created_earlier,
        )?;
        let plan = roles::plan(&source_roles, &target_side, &given);
        if !plan.created.is_empty() && !target_side.superuser && !target_side.createrole {
            self.warn(format!(
                "roles {} do not exist on the target and {} may not create roles (CREATEROLE): objects will \
                 belong to the target user and grants are not copied. Give it CREATEROLE (the RDS master \
                 user has it) and clone into a fresh target to carry them",
                plan.created.join(", "),
                target_side.admin
            ));
            return Ok(());
        }
        roles::carry(&self.target, &plan).await?;
        for n in plan.notices.clone() {
            self.warn(n);
        }
        let given_names: Vec<String> = given.iter().map(|g| g.role.clone()).collect();
        for (name, verdict) in
            roles::judge(&self.target, &source_roles, &plan, &given_names).await?
        {
            match verdict {
                roles::Verdict::LogsIn => {}
                roles::Verdict::Doubt(why) => {
                    self.warn(format!("role {name} may not log in on the target: {why}"))
                }
                roles::Verdict::Refused(why) => self.warn(format!(
                    "role {name} cannot log in on the target, and the cutover refuses until it can: {why}"
                )),
            }
        }
        if !plan.cannot_log_in.is_empty() {
            self.warn(format!(
                "role(s) {} log in on the source, but their passwords cannot be read there: created NOLOGIN \
                 on the target. Give each one with --role-password ROLE=env:VARIABLE (run the clone again \
                 with it); the cutover refuses until they can log in",
                plan.cannot_log_in.join(", ")
            ));
        }
        state::roles::record(&self.target, &plan.created, &plan.cannot_log_in)
            .await
            .map_err(Error::sql(Side::Target, "recording the carried roles"))?;
        let sources: Vec<(String, Option<i64>, bool)> = source_roles
            .roles
            .iter()
            .filter(|r| plan.created.contains(&r.name))
            .map(|r| {
                let given = given.iter().any(|g| g.role == r.name);
                (r.name.clone(), r.row_version, given)
            })
            .collect();
        state::roles::record_sources(&self.target, &sources)
            .await
            .map_err(Error::sql(Side::Target, "recording the carried roles"))?;
        if !plan.created.is_empty() {
            record(
                &self.target,
                "roles",
                &format!(
                    "created role(s) {} ({} cannot log in yet)",
                    plan.created.join(", "),
                    plan.cannot_log_in.len()
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// `--role-password` on a later run: the roles get their password and may log in.
    async fn give_passwords(&mut self) -> Result<(), Error> {
        give_passwords(&self.target, &self.opts.role_passwords).await
    }

    /// Whether the restore keeps owners and grants: every owner in the archive exists on the target, and
    /// the target's role may give objects to it (a superuser, or a member). Otherwise every object belongs
    /// to the target's role and no grant is copied, as with `--no-roles`, and the clone says so.
    async fn keep_owners(&mut self, archive: &schema::Archive) -> Result<bool, Error> {
        if !self.opts.roles {
            return Ok(false);
        }
        let owners = schema::archive_owners(&self.tools, archive, self.tgt_info).await?;
        let missing = missing_roles(&self.source, &self.target, &owners).await?;
        if !missing.is_empty() {
            self.warn(format!(
                "roles {} do not exist on the target: objects will belong to the target user and grants \
                 are not copied (run the clone without --no-roles on a fresh target to carry them, or create \
                 them first)",
                missing.join(", ")
            ));
            return Ok(false);
        }
        let owners: Vec<&String> = owners.iter().collect();
        let foreign: Vec<String> = self
            .target
            .query(
                "SELECT o FROM unnest($1::text[]) o
                 WHERE EXISTS (SELECT FROM pg_roles WHERE rolname = o)
                   AND NOT pg_has_role(current_user, o, 'MEMBER')
                   AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                 ORDER BY 1",
                &[&owners],
            )
            .await
            .map_err(Error::sql(Side::Target, "checking role memberships"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !foreign.is_empty() {
            self.warn(format!(
                "the target's role is not a member of {}, which own objects: they will belong to the target \
                 user and grants are not copied (GRANT {} TO <target user>; then clone again, to keep them)",
                foreign.join(", "),
                foreign.join(", ")
            ));
            return Ok(false);
        }
        Ok(true)
    }

    fn warn(&mut self, w: String) {
        tracing::warn!("{w}");
        self.report.warnings.push(w);
    }
}

/// A recorded clone resumes only as it was started: the same selection, and --follow only if it followed.
fn resumable(
    m: &Migration,
    opts: &CloneOptions,
    options_json: &serde_json::Value,
) -> Result<(), Error> {
    if m.options.get("include") != options_json.get("include")
        || m.options.get("exclude") != options_json.get("exclude")
    {
        return Err(Error::Blocked(format!(
            "the clone recorded on the target was started with another selection ({}); run it again \
             with the same --include/--exclude to resume, or `hikkoshi clean` and start over",
            m.options
        )));
    }
    if !same_role_map(m.options.get("role_map"), options_json.get("role_map")) {
        return Err(Error::Blocked(format!(
            "the clone recorded on the target was started with another --role-map ({}); run it again \
             with the same --role-map to resume (the roles already created carry the old names), or \
             `hikkoshi clean` and start over",
            m.options
                .get("role_map")
                .unwrap_or(&serde_json::Value::Null)
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
    Ok(())
}

/// Whether two recorded role maps are the same; a clone recorded before `--role-map` existed has none, which
/// is the same as an empty one.
fn same_role_map(recorded: Option<&serde_json::Value>, new: Option<&serde_json::Value>) -> bool {
    let empty = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Array(a)) => a.is_empty(),
        Some(serde_json::Value::Object(o)) => o.is_empty(),
        _ => false,
    };
    let sorted = |v: Option<&serde_json::Value>| -> Option<Vec<String>> {
        let mut pairs: Vec<String> = v?.as_array()?.iter().map(|p| p.to_string()).collect();
        pairs.sort();
        Some(pairs)
    };
    (empty(recorded) && empty(new))
        || recorded == new
        || sorted(recorded).is_some_and(|r| Some(r) == sorted(new))
}

/// The preflight of `hikkoshi check`, before anything is created anywhere: blockers refuse the clone,
/// warnings go into the report.
async fn preflight(
    opts: &CloneOptions,
    source: &Client,
    target: &Client,
    cat: &Catalog,
    resolved: &Resolved,
    report: &mut CloneReport,
) -> Result<(), Error> {
    let preflight = crate::check::evaluate(&crate::check::Inputs {
        source,
        target,
        catalog: cat,
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
    Ok(())
}

/// Appends to the migration's event log.
async fn record(target: &Client, kind: &str, message: &str) -> Result<(), Error> {
    state::event(target, kind, message)
        .await
        .map_err(Error::sql(Side::Target, "recording an event"))
}

/// `--role-password` for roles that exist on the target: each gets its password (as a SCRAM verifier made
/// here) and may log in; the state records that it can.
pub(super) async fn give_passwords(target: &Client, specs: &[String]) -> Result<(), Error> {
    let given: Vec<roles::GivenPassword> = specs
        .iter()
        .map(|s| roles::given_password(s))
        .collect::<Result<_, _>>()?;
    for g in given {
        let exists: bool = target
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)",
                &[&g.role],
            )
            .await
            .map_err(Error::sql(Side::Target, "looking for a role"))?
            .get(0);
        if !exists {
            return Err(Error::Usage(format!(
                "--role-password names role {}, which does not exist on the target",
                g.role
            )));
        }
        target
            .batch_execute(&format!(
                "ALTER ROLE {} WITH LOGIN PASSWORD {}",
                crate::ident::quote_ident(&g.role),
                crate::ident::quote_literal(&roles::scram(&g.password))
            ))
            .await
            .map_err(Error::sql(
                Side::Target,
                format!("setting the password of role {}", g.role),
            ))?;
        if state::exists(target).await.unwrap_or(false) {
            let _ = state::roles::logs_in(target, &g.role).await;
        }
        tracing::info!("role {} may log in on the target (--role-password)", g.role);
    }
    Ok(())
}

#[cfg(test)]
mod role_map_tests {
    use super::same_role_map;
    use serde_json::json;

    #[test]
    fn a_resume_must_use_the_recorded_role_map() {
        assert!(same_role_map(None, Some(&json!([]))));
        assert!(same_role_map(Some(&json!([])), Some(&json!([]))));
        let a = json!([["app", "app_new"]]);
        assert!(same_role_map(Some(&a), Some(&a.clone())));
        assert!(!same_role_map(None, Some(&a)));
        assert!(!same_role_map(Some(&a), Some(&json!([]))));
        assert!(!same_role_map(Some(&a), Some(&json!([["app", "other"]]))));
        // the order on the command line does not matter
        let ab = json!([["a", "x"], ["b", "y"]]);
        assert!(same_role_map(
            Some(&ab),
            Some(&json!([["b", "y"], ["a", "x"]]))
        ));
    }
}
