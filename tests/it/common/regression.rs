//! PostgreSQL 15's regression database (what `make installcheck` leaves behind: hundreds of tables,
//! partitions, inheritance, matviews, domains, ranges, rules, policies, large objects...) as a fixture.
//!
//! `.ci/prepare` builds the regression suite under `/opt/hikkoshi/regress15` (`HIKKOSHI_REGRESS15_DIR`). The
//! first test that asks for the database runs `pg_regress` against a throwaway 15 server (a few minutes),
//! dumps `regression` (`pg_dump -Fc`) and the roles (`pg_dumpall --globals-only`) next to the build, and
//! derives from PostgreSQL 18's `pg_restore` errors a `--use-list` without the entries 18 cannot hold. Later
//! calls restore the cached dump into a fresh server. A file lock makes concurrent first uses wait for one
//! build.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use hikkoshi::localserver::LocalServer;

use super::{install, server};

/// The cached fixture: the dump, the roles, and the restore list 18 accepts.
pub struct Fixture {
    pub dump: PathBuf,
    pub globals: PathBuf,
    /// `pg_restore -l` of the dump with the entries 18 refused commented out.
    pub list_18: PathBuf,
    /// The TOC lines left out of `list_18`, each followed by the error 18's pg_restore gave for it.
    pub refused_18: PathBuf,
}

/// Which copy of the regression database to restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    /// Everything installcheck left behind.
    Full,
    /// Without the archive entries PostgreSQL 18's pg_restore refuses (and what depends on them).
    For18,
}

/// Where `.ci/prepare` built the regression suite.
pub fn regress_dir() -> PathBuf {
    std::env::var_os("HIKKOSHI_REGRESS15_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/hikkoshi/regress15".into())
}

/// The cached fixture, built on first use (by one process at a time).
pub fn fixture() -> Fixture {
    let dir = regress_dir();
    let fixture = Fixture {
        dump: dir.join("regression.dump"),
        globals: dir.join("regression-globals.sql"),
        list_18: dir.join("regression-18.list"),
        refused_18: dir.join("regression-18.refused"),
    };
    let suite = dir.join("src/src/test/regress");
    assert!(
        dir.join(".built").exists(),
        "PostgreSQL 15's regression suite is not built under {}: run .ci/prepare (or set \
         HIKKOSHI_REGRESS15_DIR)",
        dir.display()
    );
    let lock = File::create(dir.join(".fixture.lock")).expect("creating the fixture lock");
    lock.lock().expect("locking the fixture");
    if !fixture.dump.exists() || !fixture.globals.exists() {
        build_dump(&suite, &fixture);
    }
    if !fixture.list_18.exists() || !fixture.refused_18.exists() {
        build_list_18(&fixture);
    }
    fixture
}

/// A PostgreSQL 15 server holding database `regression` (and the roles the regression tests left).
pub fn regression_server(copy: Copy) -> LocalServer {
    let f = fixture();
    let s = server(15);
    restore_globals(&s, &f);
    create_database(&s, "regression");
    let list = (copy == Copy::For18).then_some(f.list_18.as_path());
    let errors = pg_restore(&s, &f.dump, "regression", list, 2);
    assert!(
        errors.is_empty(),
        "restoring the regression dump into 15 failed:\n{errors}"
    );
    s
}

/// Creates the fixture's roles on a server (the ones that already exist, `postgres`, are reported and left).
pub fn restore_globals(s: &LocalServer, f: &Fixture) {
    s.run(
        "psql",
        &[
            "-X",
            "-q",
            "-h",
            &s.dir.to_string_lossy(),
            "-p",
            &s.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-f",
            &f.globals.to_string_lossy(),
        ],
    )
    .expect("restoring the regression roles");
}

pub fn create_database(s: &LocalServer, name: &str) {
    s.psql("postgres", &format!("CREATE DATABASE \"{name}\""))
        .expect("CREATE DATABASE");
}

/// Restores `dump` into `dbname` with the server's own pg_restore (`jobs` workers, `list` to select),
/// returning pg_restore's error output (empty when it restored everything).
pub fn pg_restore(
    s: &LocalServer,
    dump: &Path,
    dbname: &str,
    list: Option<&Path>,
    jobs: u32,
) -> String {
    let mut cmd = Command::new(s.install.bin.join("pg_restore"));
    if jobs == 1 {
        // names the archive entry before each error (`from TOC entry`), which only --verbose shows
        cmd.arg("--verbose");
    }
    cmd.arg("--dbname")
        .arg(s.socket_url(dbname))
        .arg(format!("--jobs={jobs}"));
    if let Some(l) = list {
        cmd.arg("--use-list").arg(l);
    }
    let out = cmd.arg(dump).output().expect("running pg_restore");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        // warnings and progress only
        String::new()
    } else {
        assert!(
            !stderr.is_empty(),
            "pg_restore failed without a message: {:?}",
            out.status
        );
        stderr
    }
}

/// Runs installcheck against a throwaway 15 server and dumps what it leaves behind.
fn build_dump(suite: &Path, f: &Fixture) {
    let start = std::time::Instant::now();
    let s = server(15);
    let outdir = s.dir.join("regress");
    let out = as_server_user(&suite.join("pg_regress"))
        .current_dir(&s.dir)
        .arg(format!("--host={}", s.dir.display()))
        .arg(format!("--port={}", s.port))
        .arg("--user=postgres")
        .arg(format!("--bindir={}", install(15).bin.display()))
        .arg(format!("--dlpath={}", suite.display()))
        .arg(format!("--inputdir={}", suite.display()))
        .arg(format!("--outputdir={}", outdir.display()))
        .arg(format!(
            "--schedule={}",
            suite.join("parallel_schedule").display()
        ))
        .arg("--max-connections=20")
        .output()
        .expect("running pg_regress");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.contains("tests failed") || l.contains("tests passed"))
        .unwrap_or("no summary")
        .trim()
        .to_string();
    eprintln!(
        "installcheck against PostgreSQL 15 in {:?}: {summary}",
        start.elapsed()
    );
    let bin = install(15).bin;
    let tmp = f.dump.with_extension("dump.tmp");
    let dump = Command::new(bin.join("pg_dump"))
        .args(["-Fc", "-f"])
        .arg(&tmp)
        .arg("--dbname")
        .arg(s.socket_url("regression"))
        .output()
        .expect("running pg_dump");
    assert!(
        dump.status.success(),
        "pg_dump of the regression database failed (pg_regress: {summary}):\n{}\n{}",
        String::from_utf8_lossy(&dump.stderr),
        String::from_utf8_lossy(&out.stderr)
    );
    let globals_tmp = f.globals.with_extension("sql.tmp");
    let globals = Command::new(bin.join("pg_dumpall"))
        .args(["--globals-only", "--no-tablespaces", "-f"])
        .arg(&globals_tmp)
        .arg("--dbname")
        .arg(s.socket_url("postgres"))
        .output()
        .expect("running pg_dumpall");
    assert!(
        globals.status.success(),
        "pg_dumpall --globals-only failed:\n{}",
        String::from_utf8_lossy(&globals.stderr)
    );
    std::fs::rename(&globals_tmp, &f.globals).unwrap();
    std::fs::rename(&tmp, &f.dump).unwrap();
}

/// Restores the dump into PostgreSQL 18 until it restores without an error, leaving out each round the
/// entries pg_restore named in its errors: what depends on a refused object fails in the next round (or the
/// same one) and is left out in turn.
fn build_list_18(f: &Fixture) {
    let t = server(18);
    restore_globals(&t, f);
    let list = Command::new(t.install.bin.join("pg_restore"))
        .arg("-l")
        .arg(&f.dump)
        .output()
        .expect("pg_restore -l");
    assert!(list.status.success());
    let toc = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut refused: BTreeSet<u32> = BTreeSet::new();
    let mut reasons = String::new();
    let tmp_list = f.list_18.with_extension("list.tmp");
    for round in 1..=5 {
        std::fs::write(&tmp_list, list_without(&toc, &refused)).unwrap();
        let db = format!("round{round}");
        create_database(&t, &db);
        // one worker: each error follows the line naming its entry
        let errors = pg_restore(&t, &f.dump, &db, Some(&tmp_list), 1);
        let failed = failed_entries(&errors);
        if errors.is_empty() {
            std::fs::write(&f.refused_18, &reasons).unwrap();
            std::fs::rename(&tmp_list, &f.list_18).unwrap();
            eprintln!(
                "PostgreSQL 18 refuses {} archive entries of the regression dump (round {round} clean)",
                refused.len()
            );
            return;
        }
        assert!(
            !failed.is_empty(),
            "pg_restore into 18 failed without naming an archive entry:\n{errors}"
        );
        reasons.push_str(&refusal_report(&errors));
        refused.extend(failed);
    }
    panic!("pg_restore into 18 still fails after leaving out {refused:?}");
}

/// The archive entries (dump ids) pg_restore's output names as failing: with --verbose, `pg_restore: from
/// TOC entry 1234; 1259 16390 TABLE foo postgres` (id; catalog, oid, kind, tag, owner) precedes each error.
pub fn failed_entries(stderr: &str) -> BTreeSet<u32> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("pg_restore: from TOC entry "))
        .filter_map(|rest| rest.split(';').next()?.trim().parse().ok())
        .collect()
}

/// Each failing entry's line and its error, one pair a paragraph.
fn refusal_report(stderr: &str) -> String {
    let mut out = String::new();
    let mut lines = stderr.lines().peekable();
    while let Some(l) = lines.next() {
        if let Some(entry) = l.strip_prefix("pg_restore: from TOC entry ") {
            out.push_str(entry);
            out.push('\n');
            if let Some(e) = lines.next_if(|n| n.starts_with("pg_restore: error:")) {
                out.push_str("    ");
                out.push_str(e);
                out.push('\n');
            }
        }
    }
    out
}

/// A `pg_restore -l` listing with the given entries commented out.
pub fn list_without(toc: &str, left_out: &BTreeSet<u32>) -> String {
    toc.lines()
        .map(|l| {
            let id = l
                .split(';')
                .next()
                .and_then(|i| i.trim().parse::<u32>().ok());
            match id {
                Some(id) if left_out.contains(&id) => format!(";{l}\n"),
                _ => format!("{l}\n"),
            }
        })
        .collect()
}

/// A command run as the server user when we are root (as the harness runs servers).
fn as_server_user(program: &Path) -> Command {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        let user = std::env::var("HIKKOSHI_SERVER_USER").unwrap_or_else(|_| "postgres".into());
        let mut c = Command::new("runuser");
        c.arg("-u").arg(user).arg("--").arg(program);
        c
    } else {
        Command::new(program)
    }
}

#[test]
fn failed_entries_are_read_from_pg_restore_errors() {
    let stderr = "pg_restore: from TOC entry 1234; 1259 16390 TABLE foo postgres\n\
                  pg_restore: error: could not execute query: ERROR:  x\n\
                  pg_restore: from TOC entry 77; 0 0 ACL - SCHEMA public pg_database_owner\n\
                  pg_restore: error: could not execute query: ERROR:  y\n\
                  pg_restore: warning: errors ignored on restore: 2\n";
    assert_eq!(failed_entries(stderr), BTreeSet::from([77, 1234]));
    let list = list_without(
        "; comment\n1234; 1259 16390 TABLE foo postgres\n5; 1 2 X\n",
        &failed_entries(stderr),
    );
    assert_eq!(
        list,
        "; comment\n;1234; 1259 16390 TABLE foo postgres\n5; 1 2 X\n"
    );
}
