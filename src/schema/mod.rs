//! The schema: the source's DDL through `pg_dump --schema-only --snapshot`, restored in two halves with
//! `pg_restore`: pre-data (extensions, schemas, types, tables, functions) before the rows, in one
//! transaction; post-data (primary keys, indexes, constraints, triggers) after them, `--jobs` at a time.
//!
//! pg_dump must be at least as new as the source server; hikkoshi looks for one (an explicit `--pg-bin`,
//! then `PATH`, then the usual install directories) and prefers one no newer than the target, whose output
//! the target is sure to read. When only a newer one is at hand, the sections are restored through a SQL
//! script that hikkoshi filters and runs itself (see `script`). The password reaches pg_dump through
//! `PGPASSWORD`, never its command line.

pub mod grants;
pub mod script;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;
use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::ident::QualifiedName;

/// A failure of the schema step.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "no pg_dump of version {need} or newer found (looked in {looked}); the source runs PostgreSQL {need}. \
         Install the PostgreSQL {need} client programs (e.g. `apt-get install postgresql-client-{need}`) or \
         point hikkoshi at them with --pg-bin DIR"
    )]
    NoPgDump { need: u32, looked: String },
    #[error(
        "{program} in {dir} is version {found}, older than the source's PostgreSQL {need}: use --pg-bin with \
         the bin directory of PostgreSQL {need} or newer"
    )]
    TooOld {
        program: String,
        dir: String,
        found: u32,
        need: u32,
    },
    #[error("could not run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} failed: {stderr}")]
    Failed {
        step: String,
        stderr: String,
        /// What the user can do, given where in the clone this step is.
        hint: &'static str,
    },
    #[error("could not write a temporary file")]
    Io(#[from] std::io::Error),
    #[error("reading the target's catalog failed")]
    Target(#[from] tokio_postgres::Error),
}

/// A matching pair of pg_dump and pg_restore.
#[derive(Clone, Debug)]
pub struct DumpTools {
    pub bin: PathBuf,
    pub major: u32,
    pub version: String,
    /// The target's major version, which the restore must suit.
    pub target_major: u32,
}

impl DumpTools {
    /// Finds pg_dump/pg_restore able to dump a server of major version `source_major`. `explicit` is a
    /// PATH-like list of bin directories (`--pg-bin`); without it, PATH and the usual install places.
    pub fn find(
        explicit: Option<&Path>,
        source_major: u32,
        target_major: u32,
    ) -> Result<DumpTools, SchemaError> {
        let dirs: Vec<PathBuf> = match explicit {
            Some(list) => std::env::split_paths(list).collect(),
            None => default_dirs(),
        };
        let found: Vec<DumpTools> = dirs.iter().filter_map(|d| probe(d)).collect();
        let usable = found.iter().filter(|t| t.major >= source_major);
        // pg_restore writes settings of its own version (17 added `SET transaction_timeout`), so the best
        // is the newest version the target knows; else the oldest that can still read the source.
        let best = usable
            .clone()
            .filter(|t| t.major <= target_major.max(source_major))
            .max_by_key(|t| t.major)
            .or_else(|| usable.min_by_key(|t| t.major));
        if let Some(b) = best {
            return Ok(DumpTools {
                target_major,
                ..b.clone()
            });
        }
        match (explicit, found.iter().max_by_key(|t| t.major)) {
            (Some(_), Some(newest)) => Err(SchemaError::TooOld {
                program: "pg_dump".into(),
                dir: newest.bin.display().to_string(),
                found: newest.major,
                need: source_major,
            }),
            _ => Err(SchemaError::NoPgDump {
                need: source_major,
                looked: if found.is_empty() {
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .take(8)
                        .collect::<Vec<_>>()
                        .join(", ")
                } else {
                    found
                        .iter()
                        .map(|t| format!("{} ({})", t.bin.display(), t.major))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        }
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Whether pg_restore is newer than the target, so that its sessions' settings could be unknown there:
    /// then the schema is restored through a filtered SQL script (see `script`).
    pub fn restores_through_script(&self) -> bool {
        self.major > self.target_major
    }
}

/// PATH, then where packages put PostgreSQL's programs.
fn default_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for parent in [
        "/usr/lib/postgresql",
        "/usr/local/lib/postgresql",
        "/opt/homebrew/opt",
        "/usr/local/opt",
    ] {
        if let Ok(rd) = std::fs::read_dir(parent) {
            let mut found: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("bin")).collect();
            found.sort();
            dirs.extend(found);
        }
    }
    if let Ok(rd) = std::fs::read_dir("/usr") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("pgsql-") {
                dirs.push(e.path().join("bin"));
            }
        }
    }
    dirs.push("/usr/local/pgsql/bin".into());
    dirs
}

fn probe(dir: &Path) -> Option<DumpTools> {
    let dump = dir.join("pg_dump");
    if !dump.is_file() || !dir.join("pg_restore").is_file() {
        return None;
    }
    let out = std::process::Command::new(&dump)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    let version = text.split_whitespace().nth(2)?.to_string();
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(DumpTools {
        bin: dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
        major,
        version,
        target_major: major,
    })
}

/// The schema-only archive of the source, in pg_dump's custom format.
pub struct Archive {
    file: tempfile::NamedTempFile,
}

/// What to leave out of the dump: the relations not selected.
pub struct DumpFilter<'a> {
    pub excluded: &'a [QualifiedName],
}

/// Dumps the source's schema, as of `snapshot` when one is given.
pub async fn dump(
    tools: &DumpTools,
    source: &ConnInfo,
    snapshot: Option<&str>,
    filter: &DumpFilter<'_>,
) -> Result<Archive, SchemaError> {
    let file = tempfile::Builder::new()
        .prefix("hikkoshi-schema-")
        .suffix(".dump")
        .tempfile()?;
    let mut cmd = Command::new(tools.program("pg_dump"));
    cmd.arg("--schema-only")
        .arg("--format=custom")
        .arg("--no-subscriptions")
        .arg("--exclude-schema=hikkoshi")
        .arg(format!("--file={}", file.path().display()));
    if let Some(s) = snapshot {
        cmd.arg(format!("--snapshot={s}"));
    }
    for t in filter.excluded {
        cmd.arg(format!("--exclude-table={}", pattern_for(t)));
    }
    cmd.arg(format!("--dbname={}", source.to_libpq_string()));
    run(
        cmd,
        source,
        "pg_dump --schema-only of the source",
        "nothing was created on the target; fix the cause and run the same command again",
    )
    .await?;
    Ok(Archive { file })
}

/// A pg_dump pattern that matches exactly this relation (quoted, so no wildcard or case folding applies).
fn pattern_for(t: &QualifiedName) -> String {
    t.quoted()
}

/// Restores the pre-data section in one transaction: all of it is on the target, or none.
pub async fn restore_pre_data(
    tools: &DumpTools,
    archive: &Archive,
    target: &ConnInfo,
    keep_owners: bool,
) -> Result<(), SchemaError> {
    let step = "restoring the schema (pre-data: extensions, types, tables) on the target";
    let hint = "the schema is restored in one transaction, so nothing of it was created on the target; fix \
                the cause (a missing extension must be installable on the target: see \
                pg_available_extensions) and run the same command again";
    let mut cmd = Command::new(tools.program("pg_restore"));
    cmd.arg("--section=pre-data");
    // with owners kept, the target's own public schema stays as it is there (see `without_public`)
    let _list;
    if keep_owners {
        let list = without_public(tools, archive, target).await?;
        cmd.arg(format!("--use-list={}", list.path().display()));
        _list = list;
    } else {
        cmd.arg("--no-owner").arg("--no-privileges");
    }
    if tools.restores_through_script() {
        cmd.arg("--file=-").arg(archive.file.path());
        let sql = output(cmd, target, "writing the pre-data schema as SQL").await?;
        return script::run_in_one_transaction(target, &sql, step, hint).await;
    }
    cmd.arg("--single-transaction")
        .arg("--exit-on-error")
        .arg(format!("--dbname={}", target.to_libpq_string()))
        .arg(archive.file.path());
    run(cmd, target, step, hint).await
}

/// How post-data is built.
pub struct PostDataOptions<'a> {
    /// Index builds at once.
    pub jobs: usize,
    pub keep_owners: bool,
    /// maintenance_work_mem of each build.
    pub maintenance_work_mem: &'a str,
}

/// Restores the post-data section (`jobs` at a time), skipping what an interrupted earlier run already built.
pub async fn restore_post_data(
    tools: &DumpTools,
    archive: &Archive,
    target: &ConnInfo,
    target_client: &Client,
    opts: &PostDataOptions<'_>,
) -> Result<usize, SchemaError> {
    let mut cmd = Command::new(tools.program("pg_restore"));
    cmd.arg("--list")
        .arg("--section=post-data")
        .arg(archive.file.path());
    let list = output(cmd, target, "listing the post-data schema").await?;
    let existing = existing_post_data(target_client).await?;
    let mut kept = Vec::new();
    let mut skipped = 0;
    for line in list.lines() {
        if line.starts_with(';') || line.trim().is_empty() {
            continue;
        }
        let Some(key) = toc_key(line) else {
            continue;
        };
        // hikkoshi's own publications and event triggers exist on the source since before the snapshot: not
        // the user's
        if is_hikkoshi_object(key) {
            continue;
        }
        if existing.iter().any(|e| key.starts_with(e.as_str())) {
            skipped += 1;
            continue;
        }
        kept.push(line);
    }
    if kept.is_empty() {
        return Ok(skipped);
    }
    let mut listfile = tempfile::NamedTempFile::new()?;
    std::io::Write::write_all(&mut listfile, kept.join("\n").as_bytes())?;
    let step = "building indexes, constraints and triggers (post-data) on the target";
    let hint = "the rows are all copied; fix the cause and run the same command again: it builds only what \
                is still missing";
    let mut cmd = Command::new(tools.program("pg_restore"));
    cmd.arg("--section=post-data")
        .arg(format!("--use-list={}", listfile.path().display()));
    if !opts.keep_owners {
        cmd.arg("--no-owner").arg("--no-privileges");
    }
    if tools.restores_through_script() {
        cmd.arg("--file=-").arg(archive.file.path());
        let sql = output(cmd, target, "writing the post-data schema as SQL").await?;
        let settings = format!(
            "SET maintenance_work_mem = {}",
            crate::ident::quote_literal(opts.maintenance_work_mem)
        );
        script::run_entries(target, &sql, opts.jobs, &settings, step, hint).await?;
        return Ok(skipped);
    }
    // Index builds sort in memory up to maintenance_work_mem: the default 64 MB spills big tables to disk.
    // The password stays out of PGOPTIONS, which only carries settings.
    cmd.env(
        "PGOPTIONS",
        format!("-c maintenance_work_mem={}", opts.maintenance_work_mem),
    );
    cmd.arg("--exit-on-error")
        .arg(format!("--jobs={}", opts.jobs.max(1)))
        .arg(format!("--dbname={}", target.to_libpq_string()))
        .arg(archive.file.path());
    run(cmd, target, step, hint).await?;
    Ok(skipped)
}

/// One section of the archive as a SQL script (`pg_restore --file=-`), without owners and grants, for
/// `clone --rehearse` to run in a transaction it rolls back. psql meta-commands (`\restrict`, which
/// pg_dump 17.6+ writes) are left out: they are not SQL; so are settings the target does not know.
pub async fn script(
    tools: &DumpTools,
    archive: &Archive,
    section: &str,
    conn: &ConnInfo,
) -> Result<String, SchemaError> {
    let mut cmd = Command::new(tools.program("pg_restore"));
    cmd.arg(format!("--section={section}"))
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg("--file=-")
        .arg(archive.file.path());
    let text = output(cmd, conn, &format!("writing the {section} schema as SQL")).await?;
    let known = match crate::session::connect(conn, crate::error::Side::Target).await {
        Ok(c) => script::known_settings(&c).await?,
        Err(e) => {
            return Err(SchemaError::Failed {
                step: "reading the target's settings".into(),
                stderr: crate::error::chain(&e),
                hint: "",
            });
        }
    };
    Ok(script::filter(&text, &known))
}

/// Whether a TOC entry is the public schema itself, or its comment or grants.
fn is_public_schema(line: &str) -> bool {
    toc_key(line)
        .is_some_and(|k| k.starts_with("SCHEMA - public ") || k.contains(" - SCHEMA public "))
}

/// The archive's table of contents without the public schema's own entries (the schema, its comment, its
/// grants), for a restore that keeps owners: the target has its public schema already, owned there by the
/// database's owner (15+) or a superuser, and a source before 15 gives it to its bootstrap superuser, which
/// a managed target's role may not act as.
async fn without_public(
    tools: &DumpTools,
    archive: &Archive,
    target: &ConnInfo,
) -> Result<tempfile::NamedTempFile, SchemaError> {
    let mut cmd = Command::new(tools.program("pg_restore"));
    cmd.arg("--list").arg(archive.file.path());
    let list = output(cmd, target, "listing the schema archive").await?;
    let kept: String = list
        .lines()
        .filter(|l| !is_public_schema(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let fail = |e: std::io::Error| SchemaError::Failed {
        step: "writing the archive's table of contents".into(),
        stderr: e.to_string(),
        hint: "",
    };
    let file = tempfile::NamedTempFile::new().map_err(fail)?;
    std::fs::write(file.path(), kept).map_err(fail)?;
    // pg_restore runs as the server's user when we are root: it must read the list
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644));
    }
    Ok(file)
}

/// The roles that own objects in the archive.
pub async fn archive_owners(
    tools: &DumpTools,
    archive: &Archive,
    target: &ConnInfo,
) -> Result<HashSet<String>, SchemaError> {
    let mut cmd = Command::new(tools.program("pg_restore"));
    cmd.arg("--list").arg(archive.file.path());
    let list = output(cmd, target, "listing the schema archive").await?;
    Ok(list
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        // the public schema (and its comment and grants) exists on the target already: pg_dump (15+) gives
        // it no owner to restore unless the source changed it, and then that owner owns more than it
        .filter(|l| !is_public_schema(l))
        .filter(|l| !toc_key(l).is_some_and(is_hikkoshi_object))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|o| *o != "-")
        .map(str::to_string)
        .collect())
}

/// An object hikkoshi made on the source: a stream's publication (and its tables) or a DDL capture's event
/// trigger (`stream::ddl::capture`), this migration's or another's. Not the user's: never restored (a
/// capture's functions are in the schema hikkoshi, which the dump leaves out), and its owner is hikkoshi's
/// role, not an owner the target must keep. `key` is `toc_key`'s.
fn is_hikkoshi_object(key: &str) -> bool {
    (key.starts_with("EVENT TRIGGER") || key.starts_with("PUBLICATION"))
        && key.split_whitespace().any(crate::stream::names::is_ours)
}

/// `TYPE SCHEMA NAME OWNER` of a TOC line (`ID; CATALOG-OID OBJECT-OID TYPE SCHEMA NAME OWNER`).
fn toc_key(line: &str) -> Option<&str> {
    let mut rest = line.split_once("; ")?.1;
    for _ in 0..2 {
        rest = rest.trim_start().split_once(' ')?.1;
    }
    Some(rest)
}

/// The post-data objects present on the target, as the `TYPE SCHEMA NAME ` prefix of a TOC line.
async fn existing_post_data(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT 'INDEX ' || n.nspname || ' ' || i.relname || ' '
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
             JOIN pg_namespace n ON n.oid = i.relnamespace
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi')
               AND n.nspname NOT LIKE 'pg\\_toast%'
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid AND c.contype IN ('p','u','x'))
             UNION ALL
             SELECT CASE WHEN c.contype = 'f' THEN 'FK CONSTRAINT ' ELSE 'CONSTRAINT ' END
                    || n.nspname || ' ' || t.relname || ' ' || c.conname || ' '
             FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi')
             UNION ALL
             SELECT 'TRIGGER ' || n.nspname || ' ' || t.relname || ' ' || g.tgname || ' '
             FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE NOT g.tgisinternal AND g.tgname <> 'hikkoshi_fence'
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi')
             UNION ALL
             SELECT 'POLICY ' || n.nspname || ' ' || t.relname || ' ' || p.polname || ' '
             FROM pg_policy p JOIN pg_class t ON t.oid = p.polrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             UNION ALL
             -- a NOT VALID CHECK of a table or a domain is dumped apart from its object, as CHECK CONSTRAINT
             SELECT 'CHECK CONSTRAINT ' || n.nspname || ' ' || t.relname || ' ' || c.conname || ' '
             FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE c.contype = 'c' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi')
             UNION ALL
             SELECT 'CHECK CONSTRAINT ' || n.nspname || ' ' || y.typname || ' ' || c.conname || ' '
             FROM pg_constraint c JOIN pg_type y ON y.oid = c.contypid
             JOIN pg_namespace n ON n.oid = y.typnamespace
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi')
             UNION ALL
             SELECT 'RULE ' || n.nspname || ' ' || t.relname || ' ' || r.rulename || ' '
             FROM pg_rewrite r JOIN pg_class t ON t.oid = r.ev_class
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE r.rulename <> '_RETURN' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi')
             UNION ALL
             SELECT 'STATISTICS ' || n.nspname || ' ' || x.stxname || ' '
             FROM pg_statistic_ext x JOIN pg_namespace n ON n.oid = x.stxnamespace",
            &[],
        )
        .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

async fn run(
    cmd: Command,
    conn: &ConnInfo,
    step: &str,
    hint: &'static str,
) -> Result<(), SchemaError> {
    output(cmd, conn, step)
        .await
        .map(|_| ())
        .map_err(|e| match e {
            SchemaError::Failed { step, stderr, .. } => SchemaError::Failed { step, stderr, hint },
            e => e,
        })
}

async fn output(mut cmd: Command, conn: &ConnInfo, step: &str) -> Result<String, SchemaError> {
    for (k, v) in conn.child_env() {
        cmd.env(k, v);
    }
    cmd.env_remove("PGSERVICE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let out = cmd.output().await.map_err(|source| SchemaError::Spawn {
        program: program.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(SchemaError::Failed {
            hint: "",
            step: step.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toc_lines_give_type_schema_name_owner() {
        assert_eq!(
            toc_key("3456; 2606 16410 CONSTRAINT app orders orders_pkey alice"),
            Some("CONSTRAINT app orders orders_pkey alice")
        );
        assert_eq!(
            toc_key("12; 1259 16390 INDEX public Mixed Case_idx bob"),
            Some("INDEX public Mixed Case_idx bob")
        );
        assert_eq!(toc_key("; comment"), None);
    }
}
