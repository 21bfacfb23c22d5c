//! The source's findings: settings for logical decoding, the selected tables (access, identity, what is
//! not carried), the write fence the cutover will raise there, and the time the copy will take.

use std::time::Instant;

use futures_util::StreamExt;
use tokio_postgres::Client;

use super::{Level, Report};
use crate::catalog::Table;
use crate::error::{Error, Side};
use crate::ident::QualifiedName;
use crate::progress::{human_bytes, human_duration};

pub(super) async fn source_settings(
    r: &mut Report,
    source: &Client,
    follow: bool,
) -> Result<(), Error> {
    // a following clone keeps one slot and takes a temporary one more when a copy resumes; a plain
    // clone needs one temporary slot
    let need: i32 = if follow { 2 } else { 1 };
    let row = source
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int,
                    (SELECT count(*) FROM pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*) FROM pg_stat_replication)::int,
                    current_setting('max_slot_wal_keep_size'),
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)
                    OR EXISTS (SELECT 1 FROM pg_auth_members m
                               JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member
                               WHERE g.rolname = 'rds_replication' AND u.rolname = current_user),
                    current_user,
                    EXISTS (SELECT 1 FROM pg_settings WHERE name LIKE 'rds.%')",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "reading replication settings"))?;
    let wal_level: String = row.get(0);
    let rds: bool = row.get(8);
    let user: String = row.get(7);
    if wal_level == "logical" {
        r.add(
            Level::Ok,
            "wal_level",
            Some(Side::Source),
            "wal_level = logical",
            None,
        );
    } else {
        r.add(
            Level::Blocker,
            "wal_level",
            Some(Side::Source),
            format!("wal_level = {wal_level}: logical decoding needs logical"),
            Some(if rds {
                "set rds.logical_replication = 1 in the DB parameter group and reboot the instance".into()
            } else {
                "ALTER SYSTEM SET wal_level = logical; then restart the server (Neon: enable logical \
                 replication in the project settings)"
                    .into()
            }),
        );
    }
    let (max_slots, used_slots): (i32, i32) = (row.get(1), row.get(2));
    if max_slots - used_slots >= need {
        r.add(
            Level::Ok,
            "replication slots",
            Some(Side::Source),
            format!(
                "{} of {max_slots} replication slots free",
                max_slots - used_slots
            ),
            None,
        );
    } else {
        r.add(
            Level::Blocker,
            "replication slots",
            Some(Side::Source),
            format!(
                "{used_slots} of {max_slots} replication slots in use; hikkoshi needs {need} free"
            ),
            Some(format!(
                "ALTER SYSTEM SET max_replication_slots = {}; then restart (or drop unused slots: SELECT \
                 pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active)",
                used_slots + 4
            )),
        );
    }
    let (max_senders, senders): (i32, i32) = (row.get(3), row.get(4));
    if max_senders - senders >= need {
        r.add(
            Level::Ok,
            "wal senders",
            Some(Side::Source),
            format!(
                "{} of {max_senders} WAL senders free",
                max_senders - senders
            ),
            None,
        );
    } else {
        r.add(
            Level::Blocker,
            "wal senders",
            Some(Side::Source),
            format!("{senders} of {max_senders} WAL senders in use; hikkoshi needs {need}"),
            Some(format!(
                "ALTER SYSTEM SET max_wal_senders = {}; then restart",
                senders + 4
            )),
        );
    }
    let keep: String = row.get(5);
    if keep == "-1" {
        r.add(
            Level::Ok,
            "max_slot_wal_keep_size",
            Some(Side::Source),
            "max_slot_wal_keep_size = -1: the slot keeps WAL as long as needed (a stopped follower lets \
             WAL grow on the source's disk; `hikkoshi clean` when you give up a migration)",
            None,
        );
    } else {
        r.add(
            Level::Warning,
            "max_slot_wal_keep_size",
            Some(Side::Source),
            format!(
                "max_slot_wal_keep_size = {keep}: if the follower falls more than that behind (or is \
                 stopped that long), the source invalidates the slot and the migration must start over"
            ),
            Some("ALTER SYSTEM SET max_slot_wal_keep_size = -1; SELECT pg_reload_conf(); (or a size that \
                  covers the longest pause you expect)"
                .into()),
        );
    }
    replication_privilege(r, row.get(6), &user, rds);
    Ok(())
}

/// REPLICATION (or rds_replication) for the slots.
fn replication_privilege(r: &mut Report, can_replicate: bool, user: &str, rds: bool) {
    if can_replicate {
        r.add(
            Level::Ok,
            "replication privilege",
            Some(Side::Source),
            format!("{user} may create replication slots"),
            None,
        );
    } else {
        r.add(
            Level::Blocker,
            "replication privilege",
            Some(Side::Source),
            format!("{user} has neither REPLICATION nor rds_replication"),
            Some(if rds {
                format!("GRANT rds_replication TO {user};")
            } else {
                format!("ALTER ROLE {user} REPLICATION;")
            }),
        );
    }
}

/// Whether the selected tables can be read, published and streamed.
pub(super) async fn tables(
    r: &mut Report,
    source: &Client,
    tables: &[Table],
    follow: bool,
) -> Result<(), Error> {
    access(r, source, tables, follow).await?;
    let roots = roots_without_identity(source, tables).await?;
    identity(r, tables, &roots, follow);
    other_objects(r, source).await
}

/// SELECT on every table; with --follow, ownership (a publication needs it).
async fn access(
    r: &mut Report,
    source: &Client,
    tables: &[Table],
    follow: bool,
) -> Result<(), Error> {
    let names: Vec<String> = tables.iter().map(|t| t.name.quoted()).collect();
    let unreadable: Vec<String> = source
        .query(
            "SELECT n FROM unnest($1::text[]) n WHERE NOT has_table_privilege(n, 'SELECT') ORDER BY n",
            &[&names],
        )
        .await
        .map_err(Error::sql(Side::Source, "checking table privileges"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if unreadable.is_empty() {
        r.add(
            Level::Ok,
            "read access",
            Some(Side::Source),
            format!("every selected table is readable ({})", tables.len()),
            None,
        );
    } else {
        r.add(
            Level::Blocker,
            "read access",
            Some(Side::Source),
            format!("no SELECT on {}", unreadable.join(", ")),
            Some(format!(
                "GRANT SELECT ON {} TO <source user>; (or leave them out with --exclude)",
                unreadable.join(", ")
            )),
        );
    }
    if follow {
        // CREATE PUBLICATION ... FOR TABLE needs ownership of every table
        let not_owned: Vec<String> = source
            .query(
                "SELECT n FROM unnest($1::text[]) n
                 WHERE NOT pg_has_role((SELECT relowner FROM pg_class WHERE oid = to_regclass(n)), 'USAGE')
                 ORDER BY n",
                &[&names],
            )
            .await
            .map_err(Error::sql(Side::Source, "checking table ownership"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if !not_owned.is_empty() {
            r.add(
                Level::Blocker,
                "publication",
                Some(Side::Source),
                format!(
                    "the change stream needs a publication, which only the tables' owner may create; this \
                     role does not own {}",
                    not_owned.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
                ),
                Some("GRANT <the tables' owner role> TO <source user>; (or run as that role)".into()),
            );
        }
    }
    Ok(())
}

/// The partitioned roots of selected partitions that have neither a primary key nor a replica identity of
/// their own: the stream publishes partitions through their root, and an UPDATE or DELETE then carries the
/// root's identity, whatever the partition's.
async fn roots_without_identity(source: &Client, tables: &[Table]) -> Result<Vec<String>, Error> {
    let mut roots: Vec<String> = tables
        .iter()
        .filter_map(|t| t.root.as_ref().map(|r| r.quoted()))
        .collect();
    roots.sort();
    roots.dedup();
    if roots.is_empty() {
        return Ok(Vec::new());
    }
    Ok(source
        .query(
            "SELECT format('%s.%s', quote_ident(n.nspname), quote_ident(c.relname))
             FROM unnest($1::text[]) r JOIN pg_class c ON c.oid = r::regclass
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relreplident = 'n'
                OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_index i
                                                          WHERE i.indrelid = c.oid AND i.indisprimary))
             ORDER BY 1",
            &[&roots],
        )
        .await
        .map_err(Error::sql(Side::Source, "reading the partitioned tables' replica identity"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A key or replica identity for every table (its updates and deletes are streamed by it), partitioned
/// roots included (`roots`: those without one), and logged tables (unlogged ones are not in the WAL).
fn identity(r: &mut Report, tables: &[Table], roots: &[String], follow: bool) {
    let lacking: Vec<&Table> = tables
        .iter()
        .filter(|t| t.replica_identity == 'n' || (t.replica_identity == 'd' && t.key.is_empty()))
        .collect();
    // named by their root; fixed table by table (a partition does not take its parent's replica identity)
    let mut no_identity: Vec<String> = lacking
        .iter()
        .map(|t| t.root.as_ref().unwrap_or(&t.name).to_string())
        .chain(roots.iter().cloned())
        .collect();
    no_identity.sort();
    no_identity.dedup();
    let mut to_fix: Vec<String> = lacking
        .iter()
        .map(|t| t.name.to_string())
        .chain(roots.iter().cloned())
        .collect();
    to_fix.sort();
    to_fix.dedup();
    if no_identity.is_empty() {
        r.add(
            Level::Ok,
            "replica identity",
            Some(Side::Source),
            "every selected table has a primary key or replica identity",
            None,
        );
    } else {
        r.add(
            if follow { Level::Blocker } else { Level::Warning },
            "replica identity",
            Some(Side::Source),
            format!(
                "{} have no primary key or replica identity: their UPDATE and DELETE cannot be streamed \
                 (and would fail on the source once published). `clone --follow` refuses them; a plain \
                 clone is not affected",
                no_identity.join(", ")
            ),
            Some(format!(
                "{} — or leave them out with --exclude",
                to_fix
                    .iter()
                    .map(|t| format!("ALTER TABLE {t} REPLICA IDENTITY FULL;"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        );
    }
    let unlogged: Vec<String> = tables
        .iter()
        .filter(|t| t.unlogged)
        .map(|t| t.name.to_string())
        .collect();
    if !unlogged.is_empty() {
        r.add(
            if follow { Level::Blocker } else { Level::Warning },
            "unlogged tables",
            Some(Side::Source),
            format!(
                "{} are unlogged: their changes are not in the WAL, so no publication can hold them and \
                 `clone --follow` cannot stream them (it refuses them); a plain clone copies their rows once",
                unlogged.join(", ")
            ),
            Some(format!(
                "either make them logged on the source ({}) or leave them out ({}), and say so to whoever \
                 relies on their rows after the switch",
                unlogged
                    .iter()
                    .map(|t| format!("ALTER TABLE {t} SET LOGGED;"))
                    .collect::<Vec<_>>()
                    .join(" "),
                unlogged
                    .iter()
                    .map(|t| format!("--exclude {t}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        );
    }
}

/// What the clone does not carry as rows: large objects, foreign tables; materialized views are refreshed.
async fn other_objects(r: &mut Report, source: &Client) -> Result<(), Error> {
    let other = source
        .query(
            "SELECT (SELECT count(*) FROM pg_largeobject_metadata),
                    (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.relkind = 'm' AND n.nspname NOT IN ('pg_catalog', 'information_schema')),
                    (SELECT count(*) FROM pg_class WHERE relkind = 'f')",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "counting large objects and views"))?;
    let (lobs, matviews, foreign): (i64, i64, i64) =
        (other[0].get(0), other[0].get(1), other[0].get(2));
    r.add(
        Level::Ok,
        "large objects",
        Some(Side::Source),
        format!(
            "{lobs} large object(s) now: the clone copies them with owners and grants. Logical decoding \
             does not carry their changes, so during a follow they are not streamed: the cutover compares \
             every large object on both servers (owner, grants, contents) and copies what changed, before \
             the fence and again in the write pause, whose length then grows with their total size"
        ),
        None,
    );
    if matviews > 0 {
        r.add(
            Level::Ok,
            "materialized views",
            Some(Side::Source),
            format!("{matviews} materialized view(s): created, and refreshed after the copy"),
            None,
        );
    }
    if foreign > 0 {
        r.add(
            Level::Warning,
            "foreign tables",
            Some(Side::Source),
            format!(
                "{foreign} foreign table(s): their definitions are copied, their data stays where it is; \
                 the target needs the same foreign servers and user mappings"
            ),
            None,
        );
    }
    Ok(())
}

/// Whether `cutover` can fence the source's writes (see `cutover::fence`): the trigger right on every
/// selected table, and whether it can also end the application's sessions (faster, not needed).
pub(super) async fn write_fence(
    r: &mut Report,
    source: &Client,
    tables: &[Table],
) -> Result<(), Error> {
    let names: Vec<QualifiedName> = tables.iter().map(|t| t.name.clone()).collect();
    let relations = crate::cutover::fence::relations(source, Side::Source, &names).await?;
    let found = crate::cutover::fence::preflight(source, Side::Source, &relations).await?;
    match found.refusal {
        None => r.add(
            Level::Ok,
            "write fence",
            Some(Side::Source),
            format!(
                "the cutover can refuse writes on the {} selected table(s) and their partitions for every \
                 role and session (a statement trigger)",
                relations.len()
            ),
            None,
        ),
        Some(c) => r.add(
            Level::Warning,
            "write fence",
            Some(Side::Source),
            format!("the cutover will refuse until this is fixed: {}", c.problem),
            Some(c.fix),
        ),
    }
    for w in found.warnings {
        r.add(
            Level::Warning,
            "write fence",
            Some(Side::Source),
            w.problem,
            Some(w.fix),
        );
    }
    let subscriptions = crate::cutover::fence::subscriptions::list(source, Side::Source).await?;
    for s in subscriptions.iter().filter(|s| s.enabled && s.may_alter) {
        r.add(
            Level::Warning,
            "subscriptions",
            Some(Side::Source),
            format!(
                "subscription {} (owner {}) writes into this database as a replica session, which no \
                 trigger can refuse: the cutover disables it before the write pause (enabled again if the \
                 switch is undone), and its report says how to move it to the new primary on its slot {}",
                s.name,
                s.owner,
                s.slot.as_deref().unwrap_or("(none)")
            ),
            None,
        );
    }
    Ok(())
}

/// Times reading a sample of the largest table and scales it to the selection's size.
pub(super) async fn estimate(r: &mut Report, source: &Client, tables: &[Table]) {
    let Some(big) = tables.iter().max_by_key(|t| t.bytes) else {
        return;
    };
    if r.bytes <= 0 {
        return;
    }
    let sample_bytes: i64 = 32 << 20;
    let pct = (100.0 * sample_bytes as f64 / big.bytes.max(1) as f64).clamp(0.01, 100.0);
    let sql = format!(
        "COPY (SELECT * FROM ONLY {} TABLESAMPLE SYSTEM ({pct})) TO STDOUT",
        big.name.quoted()
    );
    let started = Instant::now();
    let Ok(stream) = source.copy_out(&sql).await else {
        return;
    };
    let mut stream = std::pin::pin!(stream);
    let mut read: u64 = 0;
    while let Some(Ok(chunk)) = stream.next().await {
        read += chunk.len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    if read < (1 << 20) || secs <= 0.0 {
        return;
    }
    // Reading is about half of the work per byte (the target writes, indexes are built after);
    // the factor comes from the bench: copy + indexes take about 2.5x the read time.
    let rate = read as f64 / secs;
    let est = r.bytes as f64 / rate * 2.5;
    r.estimated_copy_seconds = Some(est);
    r.add(
        Level::Ok,
        "size",
        Some(Side::Source),
        format!(
            "{} table(s), {} on disk; read {} in {:.1}s: the clone should take about {}",
            r.tables,
            human_bytes(r.bytes.max(0) as u64),
            human_bytes(read),
            secs,
            human_duration(est)
        ),
        None,
    );
}
