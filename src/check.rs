//! `hikkoshi check`: the preflight. Everything a migration needs is looked at before anything is touched,
//! and every finding that is not ok carries its fix (the setting, the SQL, the cloud parameter). Nothing is
//! created on either server.

use std::path::PathBuf;
use std::time::Instant;

use futures_util::StreamExt;
use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::{Catalog, Table};
use crate::error::{Error, Side};
use crate::ident::QualifiedName;
use crate::plan::{Selection, resolve};
use crate::progress::{human_bytes, human_duration};
use crate::schema::DumpTools;
use crate::session;

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Blocker,
}

/// One thing checked.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub level: Level,
    /// Short name of what was checked (`wal_level`, `extensions`, ...).
    pub check: &'static str,
    pub side: Option<&'static str>,
    pub message: String,
    /// The exact fix, when not ok.
    pub fix: Option<String>,
}

/// What `check` found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub source_version: String,
    pub target_version: String,
    pub tables: usize,
    pub bytes: i64,
    /// Seconds the copy is expected to take, from the sizes and a measured read sample.
    pub estimated_copy_seconds: Option<f64>,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn blocked(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Blocker)
    }

    fn add(
        &mut self,
        level: Level,
        check: &'static str,
        side: Option<Side>,
        message: impl Into<String>,
        fix: Option<String>,
    ) {
        self.findings.push(Finding {
            level,
            check,
            side: side.map(|s| {
                if s == Side::Source {
                    "source"
                } else {
                    "target"
                }
            }),
            message: message.into(),
            fix,
        });
    }
}

/// What to check.
pub struct CheckOptions {
    pub source: String,
    pub target: String,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub pg_bin: Option<PathBuf>,
}

/// Runs every check. Errors only when a server cannot be reached or the arguments are wrong.
pub async fn run(opts: &CheckOptions) -> Result<Report, Error> {
    let selection =
        Selection::parse(&opts.include, &opts.exclude).map_err(|e| Error::Usage(format!("{e}")))?;
    let src_info = session::resolve(Side::Source, &opts.source)?;
    let tgt_info = session::resolve(Side::Target, &opts.target)?;
    let source = session::connect(&src_info, Side::Source).await?;
    let target = session::connect(&tgt_info, Side::Target).await?;
    let cat = Catalog::load(&source)
        .await
        .map_err(Error::sql(Side::Source, "reading the source catalog"))?;
    let resolved = resolve(&cat, &selection)?;
    evaluate(&Inputs {
        source: &source,
        target: &target,
        catalog: &cat,
        tables: &resolved.tables,
        pg_bin: opts.pg_bin.as_deref(),
        // the change stream is what hikkoshi is for: check for it
        follow: true,
        measure: true,
    })
    .await
}

/// What `evaluate` looks at; `clone` passes its own sessions and selection.
pub struct Inputs<'a> {
    pub source: &'a Client,
    pub target: &'a Client,
    pub catalog: &'a Catalog,
    pub tables: &'a [Table],
    pub pg_bin: Option<&'a std::path::Path>,
    /// Tables without replica identity block a following clone only.
    pub follow: bool,
    /// Time a read sample for the estimate.
    pub measure: bool,
}

/// Every check on open sessions.
pub async fn evaluate(i: &Inputs<'_>) -> Result<Report, Error> {
    let (source, target) = (i.source, i.target);
    let mut r = Report {
        source_version: setting(source, Side::Source, "server_version").await?,
        target_version: setting(target, Side::Target, "server_version").await?,
        tables: i.tables.len(),
        bytes: i.tables.iter().map(|t| t.bytes).sum(),
        ..Default::default()
    };
    let target_major: u32 = setting(target, Side::Target, "server_version_num")
        .await?
        .parse::<u32>()
        .unwrap_or(0)
        / 10000;
    let source_major = i.catalog.major_version() as u32;

    versions(&mut r, source_major, target_major, i.pg_bin);
    if support(source_major, target_major).0 == Level::Blocker {
        // the other checks read settings and catalogs such a server may not have
        return Ok(r);
    }
    source_settings(&mut r, source, i.follow).await?;
    tables(&mut r, source, i.tables, i.follow).await?;
    extensions(&mut r, source, target).await?;
    encodings(&mut r, source, target).await?;
    target_state(&mut r, source, target, i.tables).await?;
    if i.follow {
        cutover_proof(&mut r, (source_major, target_major), target).await?;
        write_fence(&mut r, source, i.tables).await?;
    }
    if i.measure {
        estimate(&mut r, source, i.tables).await;
    }
    r.findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    Ok(r)
}

impl Report {
    /// The blockers and their fixes, as one paragraph per blocker.
    pub fn blockers_text(&self) -> String {
        self.findings
            .iter()
            .filter(|f| f.level == Level::Blocker)
            .map(|f| {
                format!(
                    "- {}{}: {}{}",
                    f.check,
                    f.side.map(|s| format!(" ({s})")).unwrap_or_default(),
                    f.message,
                    f.fix
                        .as_ref()
                        .map(|x| format!("\n  fix: {x}"))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn setting(c: &Client, side: Side, name: &str) -> Result<String, Error> {
    Ok(c.query_one("SELECT current_setting($1)", &[&name])
        .await
        .map_err(Error::sql(side, format!("reading {name}")))?
        .get(0))
}

/// The version pairs `.ci/run` migrates end to end (clone, follow under writes, cutover, verify, rows
/// compared): `tests/versions.rs`, `tests/cutover.rs`, `tests/follow.rs`.
pub const TESTED_PAIRS: &[(u32, u32)] = &[
    (13, 15),
    (13, 16),
    (13, 18),
    (14, 17),
    (15, 15),
    (15, 18),
    (16, 18),
    (17, 16),
    (18, 18),
];

/// How well hikkoshi supports migrating from PostgreSQL `source` to `target`: tested in CI, expected to
/// work, or refused (with the reason and what to do instead).
pub fn support(source: u32, target: u32) -> (Level, String) {
    let oldest = 13;
    if source < oldest || target < oldest {
        let which = if source < oldest { "source" } else { "target" };
        let v = source.min(target);
        return (
            Level::Blocker,
            format!(
                "PostgreSQL {source} → {target} is not supported: the {which} runs PostgreSQL {v}, and                  hikkoshi supports {oldest} and later (older servers lack what its stream and cutover rely                  on, and none is tested). Upgrade the {which} in place first (pg_upgrade), or move it with                  pg_dump/pg_restore in a maintenance window"
            ),
        );
    }
    if TESTED_PAIRS.contains(&(source, target)) {
        (
            Level::Ok,
            format!(
                "PostgreSQL {source} → {target}: tested in CI (clone, follow, cutover, verify)"
            ),
        )
    } else if target + 1 < source {
        (
            Level::Warning,
            format!(
                "PostgreSQL {source} → {target} is a downgrade by {} majors: not tested; the schema may                  use what the target lacks",
                source - target
            ),
        )
    } else {
        (
            Level::Ok,
            format!(
                "PostgreSQL {source} → {target}: expected to work (every major from 13 to 18 is tested,                  not this pair)"
            ),
        )
    }
}

fn versions(r: &mut Report, source: u32, target: u32, pg_bin: Option<&std::path::Path>) {
    let (level, message) = support(source, target);
    r.add(
        level,
        "version pair",
        None,
        message,
        (level != Level::Ok).then(|| {
            "upgrade the older server first (pg_upgrade), or migrate to a target of the source's major \
             or newer"
                .to_string()
        }),
    );
    if target < source {
        r.add(
            Level::Warning,
            "versions",
            None,
            format!(
                "the target (PostgreSQL {target}) is older than the source ({source}): a downgrade; the \
                 schema may use features the target lacks"
            ),
            Some("test the schema step first (hikkoshi clone into a scratch database)".into()),
        );
    } else {
        r.add(
            Level::Ok,
            "versions",
            None,
            format!("PostgreSQL {source} → {target}"),
            None,
        );
    }
    match DumpTools::find(pg_bin, source, target) {
        Ok(t) if t.restores_through_script() => r.add(
            Level::Ok,
            "pg_dump",
            None,
            format!(
                "pg_dump {} in {}; it is newer than the target (PostgreSQL {target}), so the schema is \
                 restored through a SQL script that hikkoshi filters (settings the target does not know \
                 are left out) and runs itself",
                t.version,
                t.bin.display()
            ),
            None,
        ),
        Ok(t) => r.add(
            Level::Ok,
            "pg_dump",
            None,
            format!("pg_dump {} in {}", t.version, t.bin.display()),
            None,
        ),
        Err(e) => r.add(
            Level::Blocker,
            "pg_dump",
            None,
            e.to_string(),
            Some(format!(
                "install the PostgreSQL {source} (or newer) client programs, or give --pg-bin DIR"
            )),
        ),
    }
}

async fn source_settings(r: &mut Report, source: &Client, follow: bool) -> Result<(), Error> {
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
    let can_replicate: bool = row.get(6);
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
    Ok(())
}

async fn tables(
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
    let mut no_identity: Vec<String> = tables
        .iter()
        .filter(|t| t.replica_identity == 'n' || (t.replica_identity == 'd' && t.key.is_empty()))
        .map(|t| t.root.as_ref().unwrap_or(&t.name).to_string())
        .collect();
    no_identity.sort();
    no_identity.dedup();
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
                no_identity
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
            Level::Warning,
            "unlogged tables",
            Some(Side::Source),
            format!(
                "{} are unlogged: copied once, but their changes are not in the WAL and cannot be streamed",
                unlogged.join(", ")
            ),
            Some("ALTER TABLE ... SET LOGGED; on the source before the migration, or accept that the \
                  target has their rows as of the copy"
                .into()),
        );
    }
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
    if lobs > 0 {
        r.add(
            Level::Warning,
            "large objects",
            Some(Side::Source),
            format!("{lobs} large object(s): not copied, not streamed"),
            Some("move them separately before the switch (pg_dump --large-objects)".into()),
        );
    }
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

async fn extensions(r: &mut Report, source: &Client, target: &Client) -> Result<(), Error> {
    let used: Vec<(String, String)> = source
        .query(
            "SELECT extname::text, extversion FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "listing extensions"))?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut ok = Vec::new();
    for (name, version) in &used {
        let avail = target
            .query_opt(
                "SELECT default_version, installed_version FROM pg_available_extensions WHERE name = $1",
                &[name],
            )
            .await
            .map_err(Error::sql(Side::Target, "listing available extensions"))?;
        match avail {
            None => r.add(
                Level::Blocker,
                "extensions",
                Some(Side::Target),
                format!(
                    "extension {name} ({version} on the source) is not available on the target: the \
                     schema step would fail on its first use"
                ),
                Some(if name == "vector" {
                    "install pgvector on the target (Debian/Ubuntu: apt install postgresql-<version>-pgvector; \
                     Amazon RDS and most clouds ship it: it is then available to CREATE EXTENSION)"
                        .into()
                } else {
                    format!(
                        "install the {name} extension's package on the target server (it must appear in \
                         pg_available_extensions), or exclude the tables that use it"
                    )
                }),
            ),
            Some(row) => {
                let default: String = row.get(0);
                if version_lt(&default, version) {
                    r.add(
                        Level::Warning,
                        "extensions",
                        Some(Side::Target),
                        format!(
                            "extension {name}: source has {version}, the target offers {default}: objects of \
                             the newer version may not restore"
                        ),
                        Some(format!("install {name} {version} or newer on the target")),
                    );
                } else {
                    ok.push(format!("{name} {version}"));
                }
            }
        }
    }
    if used.is_empty() {
        r.add(
            Level::Ok,
            "extensions",
            None,
            "the source uses no extension besides plpgsql",
            None,
        );
    } else if !ok.is_empty() {
        r.add(
            Level::Ok,
            "extensions",
            Some(Side::Target),
            format!("available on the target: {}", ok.join(", ")),
            None,
        );
    }
    Ok(())
}

/// Compares dotted versions numerically ("0.8.0" < "0.10.1").
fn version_lt(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> {
        v.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    parse(a) < parse(b)
}

async fn encodings(r: &mut Report, source: &Client, target: &Client) -> Result<(), Error> {
    // the locale provider (libc or ICU) changes ordering as much as the collation name; before 15 there is
    // no column for it and it is always libc
    let q = "SELECT pg_encoding_to_char(encoding), datcollate,
                    datctype || ' (' || CASE WHEN current_setting('server_version_num')::int >= 150000
                                             THEN to_jsonb(d) ->> 'datlocprovider' ELSE 'c' END || ')'
             FROM pg_database d WHERE datname = current_database()";
    let s = source
        .query_one(q, &[])
        .await
        .map_err(Error::sql(Side::Source, "reading the encoding"))?;
    let t = target
        .query_one(q, &[])
        .await
        .map_err(Error::sql(Side::Target, "reading the encoding"))?;
    let (se, te): (String, String) = (s.get(0), t.get(0));
    if se != te {
        r.add(
            Level::Blocker,
            "encoding",
            Some(Side::Target),
            format!("the source database is {se}, the target {te}: text may not convert, or convert wrongly"),
            Some(format!(
                "create the target database with ENCODING '{se}' (CREATE DATABASE ... ENCODING '{se}' \
                 TEMPLATE template0)"
            )),
        );
    } else {
        r.add(Level::Ok, "encoding", None, format!("both {se}"), None);
    }
    let (sc, tc): (String, String) = (s.get(1), t.get(1));
    let (sk, tk): (String, String) = (s.get(2), t.get(2));
    if sc != tc || sk != tk {
        r.add(
            Level::Warning,
            "collation",
            Some(Side::Target),
            format!(
                "collation or locale provider differs (source {sc}/{sk}, target {tc}/{tk}; c = libc, i = \
                 ICU): text ordering, and so indexes, range queries and uniqueness under case-insensitive \
                 collations, may behave differently"
            ),
            Some(format!(
                "create the target database with LC_COLLATE '{sc}' LC_CTYPE '{sk}' TEMPLATE template0, \
                 unless the change is intended"
            )),
        );
    } else {
        r.add(
            Level::Ok,
            "collation",
            None,
            format!("both {sc}/{sk}"),
            None,
        );
    }
    Ok(())
}

/// Whether `cutover` can verify before its write fence (see docs/cutover.md, "The proof in two parts"):
/// both servers 14+, and the target able to stream its own changes. Without it the cutover still works, but
/// hashes the streamed tables inside its write pause.
async fn cutover_proof(
    r: &mut Report,
    (source_major, target_major): (u32, u32),
    target: &Client,
) -> Result<(), Error> {
    let row = target
        .query_one(
            "SELECT current_setting('wal_level'),
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)
                    OR EXISTS (SELECT 1 FROM pg_auth_members m
                               JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member
                               WHERE g.rolname = 'rds_replication' AND u.rolname = current_user)",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Target, "reading replication settings"))?;
    let (wal_level, can_replicate): (String, bool) = (row.get(0), row.get(1));
    let mut missing = Vec::new();
    if source_major < 14 || target_major < 14 {
        missing.push(format!(
            "PostgreSQL 14 or later on both servers (source {source_major}, target {target_major})"
        ));
    }
    if wal_level != "logical" {
        missing.push(format!(
            "wal_level = logical on the target (it is {wal_level}; RDS: rds.logical_replication = 1)"
        ));
    }
    if !can_replicate {
        missing.push(
            "the REPLICATION attribute for this role on the target (RDS: GRANT rds_replication)"
                .into(),
        );
    }
    if missing.is_empty() {
        r.add(
            Level::Ok,
            "cutover proof",
            Some(Side::Target),
            "the cutover can hash the tables before its write fence and compare only the rows changed \
             since inside it",
            None,
        );
    } else {
        r.add(
            Level::Warning,
            "cutover proof",
            Some(Side::Target),
            "the cutover will hash the streamed tables inside its write pause (seconds per GB), not \
             before its fence",
            Some(format!("for a sub-second pause: {}", missing.join("; "))),
        );
    }
    Ok(())
}

/// Whether `cutover` can fence the source's writes (see `cutover::fence`): the trigger right on every
/// selected table, and whether it can also end the application's sessions (faster, not needed).
async fn write_fence(r: &mut Report, source: &Client, tables: &[Table]) -> Result<(), Error> {
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
    Ok(())
}

async fn target_state(
    r: &mut Report,
    source: &Client,
    target: &Client,
    tables: &[Table],
) -> Result<(), Error> {
    let names: Vec<String> = tables.iter().map(|t| t.name.quoted()).collect();
    let mut existing: Vec<String> = Vec::new();
    for (t, quoted) in tables.iter().zip(&names) {
        let found = target
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[quoted])
            .await
            .map_err(Error::sql(Side::Target, "looking for existing tables"))?
            .get::<_, bool>(0);
        if found {
            let rows: bool = target
                .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {quoted})"), &[])
                .await
                .map_err(Error::sql(Side::Target, "looking for existing rows"))?
                .get(0);
            existing.push(format!(
                "{} ({})",
                t.name,
                if rows { "has rows" } else { "empty" }
            ));
            if existing.len() > 10 {
                break;
            }
        }
    }
    let has_state = crate::state::exists(target)
        .await
        .map_err(Error::sql(Side::Target, "looking for hikkoshi state"))?;
    if has_state {
        r.add(
            Level::Ok,
            "target",
            Some(Side::Target),
            "holds a hikkoshi migration: `clone` resumes it (`hikkoshi status` shows where it is)",
            None,
        );
    } else if existing.is_empty() {
        r.add(
            Level::Ok,
            "target",
            Some(Side::Target),
            "none of the selected tables exists on the target",
            None,
        );
    } else {
        r.add(
            Level::Blocker,
            "target",
            Some(Side::Target),
            format!(
                "the target already has table(s) that the clone would create: {}{}",
                existing.iter().take(10).cloned().collect::<Vec<_>>().join(", "),
                if existing.len() > 10 { ", ..." } else { "" }
            ),
            Some("hikkoshi clones into an empty database: use a new one (CREATE DATABASE ...), drop these \
                  tables, or leave them out with --exclude"
                .into()),
        );
    }
    let rights = target
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE'),
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                    OR (current_setting('server_version_num')::int >= 150000
                        AND has_parameter_privilege('session_replication_role', 'SET')),
                    current_user",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Target, "checking privileges"))?;
    let user: String = rights.get(2);
    if rights.get::<_, bool>(0) {
        r.add(
            Level::Ok,
            "target privileges",
            Some(Side::Target),
            format!("{user} may create schemas"),
            None,
        );
    } else {
        r.add(
            Level::Blocker,
            "target privileges",
            Some(Side::Target),
            format!("{user} may not create schemas in this database"),
            Some(format!(
                "GRANT CREATE ON DATABASE <target database> TO {user};"
            )),
        );
    }
    if !rights.get::<_, bool>(1) {
        r.add(
            Level::Warning,
            "target privileges",
            Some(Side::Target),
            format!(
                "{user} may not set session_replication_role: the target's triggers will fire for streamed \
                 changes (they ran on the source already)"
            ),
            Some(format!(
                "GRANT SET ON PARAMETER session_replication_role TO {user}; (PostgreSQL 15+; on RDS the \
                 rds_superuser can)"
            )),
        );
    }
    let leftovers: Vec<(String, bool)> = source
        .query(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_name LIKE 'hikkoshi\\_%'
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "listing replication slots"))?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let publications: Vec<String> = source
        .query(
            "SELECT pubname::text FROM pg_publication WHERE pubname LIKE 'hikkoshi\\_%' ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "listing publications"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !publications.is_empty() {
        r.add(
            Level::Warning,
            "leftovers",
            Some(Side::Source),
            format!("hikkoshi publication(s) on the source: {}", publications.join(", ")),
            Some(
                "if their migration is over or abandoned: `hikkoshi clean --source ... --target <its \
                 target>`, or DROP PUBLICATION <name>;"
                    .into(),
            ),
        );
    }
    if !leftovers.is_empty() {
        let inactive: Vec<&str> = leftovers
            .iter()
            .filter(|(_, a)| !a)
            .map(|(n, _)| n.as_str())
            .collect();
        r.add(
            Level::Warning,
            "leftovers",
            Some(Side::Source),
            format!(
                "hikkoshi slot(s) on the source: {} ({} inactive: an inactive slot holds WAL back)",
                leftovers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                inactive.len()
            ),
            Some(
                "if their migration is over or abandoned: `hikkoshi clean --source ... --target <its \
                 target>`, or SELECT pg_drop_replication_slot('<name>');"
                    .into(),
            ),
        );
    }
    Ok(())
}

/// Times reading a sample of the largest table and scales it to the selection's size.
async fn estimate(r: &mut Report, source: &Client, tables: &[Table]) {
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

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "source PostgreSQL {}, target PostgreSQL {}; {} table(s), {}",
            self.source_version,
            self.target_version,
            self.tables,
            human_bytes(self.bytes.max(0) as u64)
        )?;
        for x in &self.findings {
            let mark = match x.level {
                Level::Ok => "ok     ",
                Level::Warning => "WARNING",
                Level::Blocker => "BLOCKER",
            };
            writeln!(
                f,
                "{mark} {:<22} {}{}",
                x.check,
                x.side.map(|s| format!("[{s}] ")).unwrap_or_default(),
                x.message
            )?;
            if let Some(fix) = &x.fix {
                writeln!(f, "        {:<22} fix: {fix}", "")?;
            }
        }
        let blockers = self
            .findings
            .iter()
            .filter(|x| x.level == Level::Blocker)
            .count();
        let warnings = self
            .findings
            .iter()
            .filter(|x| x.level == Level::Warning)
            .count();
        if blockers > 0 {
            writeln!(
                f,
                "{blockers} blocker(s), {warnings} warning(s): fix the blockers, then run check again"
            )
        } else {
            writeln!(f, "ready: no blocker, {warnings} warning(s)")
        }
    }
}

#[cfg(test)]
mod support_tests {
    use super::*;

    #[test]
    fn every_pair_says_tested_expected_or_refused() {
        assert_eq!(support(13, 18).0, Level::Ok);
        assert!(support(13, 18).1.contains("tested in CI"));
        assert!(support(14, 16).1.contains("expected to work"));
        assert_eq!(support(12, 18).0, Level::Blocker);
        assert!(support(12, 18).1.contains("source runs PostgreSQL 12"));
        assert_eq!(support(15, 11).0, Level::Blocker);
        assert_eq!(support(18, 15).0, Level::Warning);
        assert!(support(17, 16).1.contains("tested in CI"));
    }
}

#[cfg(test)]
mod tests {
    use super::version_lt;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_lt("0.8.0", "0.10.1"));
        assert!(!version_lt("1.2", "1.2"));
        assert!(version_lt("1.2", "1.2.1"));
    }
}
