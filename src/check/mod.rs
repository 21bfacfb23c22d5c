//! `hikkoshi check`: the preflight. Everything a migration needs is looked at before anything is touched,
//! and every finding that is not ok carries its fix (the setting, the SQL, the cloud parameter). Nothing is
//! created on either server.

mod roles;
pub mod schema;
mod source;
mod target;
mod versions;

use std::path::PathBuf;

use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::{Catalog, Table};
use crate::error::{Error, Side};
use crate::plan::{Selection, resolve};
use crate::progress::human_bytes;
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
    /// The command checked for is `clone --follow` (and a cutover), not a plain clone.
    pub follow: bool,
    /// PgBouncer admin consoles the cutover will pause (`--pgbouncer`).
    pub pgbouncer: Vec<String>,
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
    let mut report = evaluate(&Inputs {
        source: &source,
        target: &target,
        catalog: &cat,
        tables: &resolved.tables,
        pg_bin: opts.pg_bin.as_deref(),
        // the change stream is what hikkoshi is for: checked for unless --no-follow says otherwise
        follow: opts.follow,
        measure: true,
    })
    .await?;
    rehearse_schema(
        &mut report,
        opts,
        (&src_info, &tgt_info),
        (&cat, &target),
        &resolved,
    )
    .await?;
    check_poolers(&mut report, &opts.pgbouncer, src_info.dbname()).await;
    report.findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    Ok(report)
}

/// `--pgbouncer`: each pooler answers and has an entry for the source's database; an entry that pools by
/// session makes the cutover's PAUSE wait until its clients disconnect.
async fn check_poolers(r: &mut Report, urls: &[String], dbname: &str) {
    if urls.is_empty() {
        return;
    }
    match crate::cutover::pgbouncer::connect(urls, dbname).await {
        Ok((poolers, warnings)) => {
            let names: Vec<String> = poolers
                .iter()
                .map(|p| format!("{} ({})", p.name(), p.databases.join(", ")))
                .collect();
            r.add(
                Level::Ok,
                "pgbouncer",
                None,
                format!("the cutover pauses {}", names.join("; ")),
                None,
            );
            for w in warnings {
                r.add(
                    Level::Warning,
                    "pgbouncer",
                    None,
                    w,
                    Some(
                        "set pool_mode = transaction for this database in pgbouncer.ini (the application \
                         must then not rely on session state), or expect the switch to wait for its clients"
                            .into(),
                    ),
                );
            }
        }
        Err(e) => r.add(
            Level::Blocker,
            "pgbouncer",
            None,
            crate::error::chain(&e),
            Some(
                "give --pgbouncer the admin console (dbname=pgbouncer, a user in admin_users) of each pooler \
                 in front of the source's database"
                    .into(),
            ),
        ),
    }
}

/// The schema step rehearsed on the target (see `schema`), where the target has none of the selected
/// tables yet (a resume finds them there, and the clone skips what exists).
async fn rehearse_schema(
    r: &mut Report,
    opts: &CheckOptions,
    infos: (&crate::conninfo::ConnInfo, &crate::conninfo::ConnInfo),
    (cat, target): (&Catalog, &Client),
    resolved: &crate::plan::Resolved,
) -> Result<(), Error> {
    let names: Vec<String> = resolved.tables.iter().map(|t| t.name.quoted()).collect();
    let existing: i64 = target
        .query_one(
            "SELECT count(*) FROM unnest($1::text[]) n WHERE to_regclass(n) IS NOT NULL",
            &[&names],
        )
        .await
        .map_err(Error::sql(Side::Target, "looking for the selected tables"))?
        .get(0);
    if existing > 0 {
        return Ok(());
    }
    let target_major: u32 = setting(target, Side::Target, "server_version_num")
        .await?
        .parse::<u32>()
        .unwrap_or(0)
        / 10000;
    let tools = match crate::schema::DumpTools::find(
        opts.pg_bin.as_deref(),
        cat.major_version() as u32,
        target_major,
    ) {
        Ok(t) => t,
        // the versions line says what is missing
        Err(_) => return Ok(()),
    };
    if let Err(e) = schema::pre_data(r, infos, target, resolved, &tools).await {
        r.add(
            Level::Warning,
            "schema",
            Some(Side::Target),
            format!(
                "the schema restore could not be rehearsed ({}): the clone's schema step is not predicted",
                crate::error::chain(&e)
            ),
            None,
        );
    }
    Ok(())
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
    roles::roles(&mut r, source, target, source_major).await?;
    if i.follow {
        cutover_proof(&mut r, (source_major, target_major), target).await?;
        write_fence(&mut r, source, i.tables).await?;
        ddl_mode(&mut r, source).await;
    }
    if i.measure {
        estimate(&mut r, source, i.tables).await;
    }
    r.findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    Ok(r)
}

/// Which way DDL during the follow will go (`stream::ddl::capture`).
async fn ddl_mode(r: &mut Report, source: &Client) {
    let mode = crate::stream::ddl::capture::probe(source).await;
    let (level, fix) = match &mode {
        crate::stream::ddl::capture::Mode::Capture => (Level::Ok, None),
        crate::stream::ddl::capture::Mode::Stop(_) => (
            Level::Warning,
            Some(
                "To have schema changes replicated during the follow, clone as a role that may create \
                 event triggers (a superuser; rds_superuser on RDS). Otherwise apply each schema change \
                 on the target too, before or when the stream names it"
                    .to_string(),
            ),
        ),
    };
    r.add(level, "ddl", Some(Side::Source), mode.describe(), fix);
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

pub(super) async fn setting(c: &Client, side: Side, name: &str) -> Result<String, Error> {
    Ok(c.query_one("SELECT current_setting($1)", &[&name])
        .await
        .map_err(Error::sql(side, format!("reading {name}")))?
        .get(0))
}

use source::{estimate, source_settings, tables, write_fence};
use target::{cutover_proof, encodings, extensions, target_state};
use versions::versions;
pub use versions::{TESTED_PAIRS, support};

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
