//! PostgreSQL's own regression database (see `common::regression`) migrated 15 → 18: hikkoshi's clone must
//! hold what `pg_dump | pg_restore` gives, and `check` must name what 18 cannot hold. Each test starts two or
//! three servers and restores hundreds of tables: nextest runs them one at a time (.config/nextest.toml).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use crate::common::regression::*;
use crate::common::*;
use hikkoshi::localserver::LocalServer;
use tokio_postgres::Client;

#[tokio::test(flavor = "multi_thread")]
async fn the_regression_database_cloned_15_to_18_matches_pg_dump_and_pg_restore() {
    let (s, t) = reference_and_empty_clone();
    let out = hikkoshi(&clone_args(
        &s.url("regression"),
        &t.url("cloned"),
        "2",
        "16MB",
    ));
    assert_success(&out);

    assert_like_the_reference_and_verified(&s, &t).await;
}

/// The regression database's source server, and an 18 target with its roles, the reference database
/// (what a user gets with PostgreSQL 18's own tools: `pg_dump | pg_restore`) and an empty database
/// `cloned` for hikkoshi's copy.
fn reference_and_empty_clone() -> (LocalServer, LocalServer) {
    let f = fixture();
    let s = regression_server(Copy::For18);
    let t = server(18);
    restore_globals(&t, &f);
    create_database(&t, "reference");
    dump_into(&s, &t, "reference");
    create_database(&t, "cloned");
    (s, t)
}

/// Database `cloned` is like the reference (`assert_like_the_reference`) and `verify` says it equals the
/// source.
async fn assert_like_the_reference_and_verified(s: &LocalServer, t: &LocalServer) {
    assert_like_the_reference(t, "cloned").await;
    let verify = hikkoshi(&[
        "verify",
        "--source",
        &s.url("regression"),
        "--target",
        &t.url("cloned"),
    ]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "verify between the source and the clone:\n{}",
        text(&verify)
    );
}

/// Compares database `cloned` of `t` with database `reference` (pg_dump | pg_restore's copy): rows of every
/// table and populated materialized view, sequences, large objects and the schema dump.
async fn assert_like_the_reference(t: &LocalServer, cloned_db: &str) {
    let reference = connect(&t.socket_url("reference")).await;
    let cloned = connect(&t.socket_url(cloned_db)).await;
    let mut differences = compare_rows(&reference, &cloned).await;
    let (rs, cs) = (sequences(&reference).await, sequences(&cloned).await);
    differences.extend(compare_maps("sequence", &rs, &cs));
    let (rm, cm) = (matviews(&reference).await, matviews(&cloned).await);
    differences.extend(compare_maps("materialized view (populated)", &rm, &cm));
    let (rl, cl) = (
        large_objects(&reference).await,
        large_objects(&cloned).await,
    );
    if rl != cl {
        differences.push(format!(
            "large objects: {rl} in the reference, {cl} in the clone"
        ));
    }
    let (rd, cd) = (schema_dump(t, "reference"), schema_dump(t, cloned_db));
    differences.extend(compare_schema_dumps(&rd, &cd));
    let compared = relations(&reference).await.len();
    eprintln!(
        "compared {compared} tables and populated matviews, {} sequences, {} matviews, {rl} large objects, \
         {} schema dump lines: {} difference(s)",
        rs.len(),
        rm.len(),
        rd.len(),
        differences.len()
    );
    assert!(
        compared > 400 && rd.len() > 5000,
        "the reference holds too little to prove anything: {compared} tables, {} schema lines",
        rd.len()
    );
    assert!(
        differences.is_empty(),
        "hikkoshi's clone differs from pg_dump | pg_restore in {} ways:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

/// A clone of the regression database killed (kill -9 of hikkoshi and its pg_restore) in the middle of its
/// post-data step, while pg_restore builds indexes and constraints; run again, it skips what exists and ends
/// like pg_dump | pg_restore's copy, and `verify` says equal.
#[tokio::test(flavor = "multi_thread")]
async fn the_regression_database_clone_killed_in_post_data_resumes_to_what_pg_restore_gives() {
    use std::os::unix::process::CommandExt;
    let (s, t) = reference_and_empty_clone();
    let (source, target) = (s.url("regression"), t.url("cloned"));
    let args = clone_args(&source, &target, "2", "16MB");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hikkoshi"))
        .args(args)
        .env("HIKKOSHI_PG_BIN", pg_bin_for_dump())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let tgt = connect(&t.socket_url("cloned")).await;
    // in post-data, once pg_restore has built part of the indexes (the regression database has >1000)
    let (mut phase, mut indexes) = (String::new(), 0i64);
    for _ in 0..3000 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let Ok(r) = tgt
            .query_one(
                "SELECT (SELECT phase FROM hikkoshi.migration),
                        (SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
                         WHERE c.relnamespace <> 'pg_catalog'::regnamespace
                           AND c.relnamespace <> 'pg_toast'::regnamespace
                           AND c.relnamespace <> 'hikkoshi'::regnamespace)",
                &[],
            )
            .await
        else {
            continue;
        };
        (phase, indexes) = (r.get(0), r.get(1));
        if phase == "post-data" && indexes >= 100 {
            break;
        }
    }
    let group = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed before it finished");
    assert!(
        phase == "post-data" && indexes >= 100,
        "killed in the middle of post-data (phase {phase}, {indexes} indexes)"
    );
    let out = hikkoshi(&args);
    assert_success(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resumed"),
        "{}",
        text(&out)
    );
    assert_like_the_reference_and_verified(&s, &t).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_what_the_regression_database_holds_that_18_cannot() {
    let f = fixture();
    let s = regression_server(Copy::Full);
    let t = server(18);
    restore_globals(&t, &f);
    create_database(&t, "regression");
    // a plain clone's preflight: the follow's blockers (tables without replica identity, unlogged tables)
    // are not what this test is about
    let out = hikkoshi(&[
        "check",
        "--no-follow",
        "--source",
        &s.url("regression"),
        "--target",
        &t.url("regression"),
    ]);
    let refused = std::fs::read_to_string(&f.refused_18).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "check must block on what PostgreSQL 18 refuses:\n{refused}\n{}",
        text(&out)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    let unnamed: Vec<String> = refused_objects(&refused)
        .into_iter()
        .filter(|name| !said.contains(name.as_str()))
        .collect();
    assert!(
        unnamed.is_empty(),
        "check does not name {} objects 18 refuses: {unnamed:?}\n{}",
        unnamed.len(),
        text(&out)
    );
}

/// The names of the objects 18's pg_restore refused for a reason of their own, from the cached report: an
/// entry line (`1234; 1259 16390 TABLE foo postgres`: id; catalog, oid, kind, tag, owner) and its error.
/// Entries that fail only because another one did ("does not exist", "is only a shell") are left out; a
/// table whose rows alone were refused (xml without libxml) is named by its table.
fn refused_objects(report: &str) -> Vec<String> {
    const KINDS: &[&str] = &[
        "TABLE",
        "TABLE DATA",
        "TABLE ATTACH",
        "VIEW",
        "MATERIALIZED VIEW",
        "MATERIALIZED VIEW DATA",
        "FUNCTION",
        "PROCEDURE",
        "TYPE",
        "DOMAIN",
        "INDEX",
        "INDEX ATTACH",
        "AGGREGATE",
        "OPERATOR",
        "OPERATOR CLASS",
        "OPERATOR FAMILY",
        "COLLATION",
        "CONVERSION",
        "TEXT SEARCH DICTIONARY",
        "TEXT SEARCH CONFIGURATION",
        "CONSTRAINT",
        "FK CONSTRAINT",
        "TRIGGER",
        "RULE",
        "POLICY",
        "STATISTICS",
        "PUBLICATION",
        "PUBLICATION TABLE",
        "SEQUENCE",
        "CAST",
        "ACL",
        "COMMENT",
        "DEFAULT",
    ];
    let mut names = Vec::new();
    let mut lines = report.lines().peekable();
    while let Some(line) = lines.next() {
        let error = lines.next_if(|l| l.starts_with(' ')).unwrap_or_default();
        if error.contains("does not exist") || error.contains("is only a shell") {
            continue;
        }
        // "<id>; <catalog> <oid> <kind...> <tag...> <owner>"
        let Some((_, rest)) = line.split_once("; ") else {
            continue;
        };
        let words: Vec<&str> = rest.split(' ').skip(2).collect();
        let joined = words.join(" ");
        let Some(kind) = KINDS
            .iter()
            .filter(|k| joined.starts_with(&format!("{k} ")))
            .max_by_key(|k| k.len())
        else {
            continue;
        };
        let after = &words[kind.split(' ').count()..];
        if after.len() < 2 {
            continue;
        }
        // the tag without its owner; a function's tag without its arguments
        let tag = after[..after.len() - 1].join(" ");
        let tag = tag.split('(').next().unwrap_or(&tag).trim().to_string();
        if !tag.is_empty() && !names.contains(&tag) {
            names.push(tag);
        }
    }
    names
}

/// `pg_dump -Fc` of the source's regression database piped into 18's pg_restore, both 18's programs.
fn dump_into(s: &LocalServer, t: &LocalServer, dbname: &str) {
    let mut dump = Command::new(t.install.bin.join("pg_dump"))
        .args(["-Fc", "--dbname"])
        .arg(s.socket_url("regression"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running pg_dump");
    let restore = Command::new(t.install.bin.join("pg_restore"))
        .arg("--dbname")
        .arg(t.socket_url(dbname))
        .stdin(dump.stdout.take().unwrap())
        .output()
        .expect("running pg_restore");
    let dumped = dump.wait_with_output().unwrap();
    assert!(
        dumped.status.success(),
        "pg_dump of the regression database: {}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    assert!(
        restore.status.success(),
        "pg_dump | pg_restore into 18 of the reduced regression database fails:\n{}",
        String::from_utf8_lossy(&restore.stderr)
    );
}

/// Every differing table (its rows as a multiset), and tables on one side only. Populated materialized
/// views are compared too.
async fn compare_rows(a: &Client, b: &Client) -> Vec<String> {
    let (ta, tb) = (relations(a).await, relations(b).await);
    let mut out = Vec::new();
    for t in ta.iter().filter(|t| !tb.contains(t)) {
        out.push(format!("{t}: in the reference, not in the clone"));
    }
    for t in tb.iter().filter(|t| !ta.contains(t)) {
        out.push(format!("{t}: in the clone, not in the reference"));
    }
    for t in ta.iter().filter(|t| tb.contains(t)) {
        let (ra, rb) = (try_rows(a, t).await, try_rows(b, t).await);
        match (ra, rb) {
            (Ok(ra), Ok(rb)) if ra == rb => {}
            (Ok(ra), Ok(rb)) => {
                let (ma, mb) = (multiset(&ra), multiset(&rb));
                let missing: usize = ma
                    .iter()
                    .map(|(r, n)| n.saturating_sub(*mb.get(r).unwrap_or(&0)))
                    .sum();
                let extra: usize = mb
                    .iter()
                    .map(|(r, n)| n.saturating_sub(*ma.get(r).unwrap_or(&0)))
                    .sum();
                let example = ra
                    .iter()
                    .find(|r| !mb.contains_key(r.as_str()))
                    .or_else(|| rb.iter().find(|r| !ma.contains_key(r.as_str())))
                    .map(|r| r.chars().take(120).collect::<String>())
                    .unwrap_or_default();
                out.push(format!(
                    "{t}: reference {} rows, clone {}; {missing} missing from the clone, {extra} extra \
                     (e.g. {example:?})",
                    ra.len(),
                    rb.len()
                ));
            }
            (ra, rb) => out.push(format!(
                "{t}: cannot compare: reference {:?}, clone {:?}",
                ra.err(),
                rb.err()
            )),
        }
    }
    out
}

fn multiset(rows: &[String]) -> BTreeMap<&str, usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(r.as_str()).or_insert(0) += 1;
    }
    m
}

/// Plain tables, leaf partitions and populated materialized views, as `schema.name`.
async fn relations(c: &Client) -> Vec<String> {
    let mut all = user_tables(c).await;
    for (name, populated) in matviews(c).await {
        if populated {
            all.push(name);
        }
    }
    all.sort();
    all
}

async fn try_rows(c: &Client, table: &str) -> Result<Vec<String>, String> {
    let mut rows: Vec<String> = c
        .query(&format!("SELECT t::text FROM ONLY {table} t"), &[])
        .await
        .map_err(|e| format!("{e:?}"))?
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect();
    rows.sort();
    Ok(rows)
}

async fn matviews(c: &Client) -> BTreeMap<String, bool> {
    c.query(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relispopulated
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'm'",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

async fn large_objects(c: &Client) -> i64 {
    c.query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
        .await
        .unwrap()
        .get(0)
}

fn compare_maps<V: PartialEq + std::fmt::Debug>(
    what: &str,
    a: &BTreeMap<String, V>,
    b: &BTreeMap<String, V>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            Some(w) if w == v => {}
            Some(w) => out.push(format!("{what} {k}: reference {v:?}, clone {w:?}")),
            None => out.push(format!("{what} {k}: in the reference, not in the clone")),
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push(format!("{what} {k}: in the clone, not in the reference"));
    }
    out
}

/// `pg_dump --schema-only` by 18's pg_dump of a database on the 18 server. Both sides are PostgreSQL 18,
/// so nothing differs by major: only the dump's random `\restrict` key and hikkoshi's own state are left out.
fn schema_dump(t: &LocalServer, dbname: &str) -> Vec<String> {
    let out = Command::new(t.install.bin.join("pg_dump"))
        .args([
            "--schema-only",
            "--exclude-schema=hikkoshi",
            "--exclude-schema=hikkoshi_fence",
            "--dbname",
        ])
        .arg(t.socket_url(dbname))
        .output()
        .expect("running pg_dump");
    assert!(
        out.status.success(),
        "pg_dump --schema-only {dbname}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            !(l.trim().is_empty()
                || l.starts_with("-- Dumped")
                || l.starts_with("\\restrict")
                || l.starts_with("\\unrestrict"))
        })
        .map(str::to_string)
        .collect()
}

/// Lines of one schema dump missing from the other (as multisets), each a difference.
fn compare_schema_dumps(reference: &[String], cloned: &[String]) -> Vec<String> {
    let owned_r: Vec<String> = reference.to_vec();
    let owned_c: Vec<String> = cloned.to_vec();
    let (mr, mc) = (multiset(&owned_r), multiset(&owned_c));
    let mut out = Vec::new();
    for (l, n) in &mr {
        let m = mc.get(l).copied().unwrap_or(0);
        if m < *n {
            out.push(format!("schema: only in the reference: {l}"));
        }
    }
    for (l, n) in &mc {
        let m = mr.get(l).copied().unwrap_or(0);
        if m < *n {
            out.push(format!("schema: only in the clone: {l}"));
        }
    }
    out
}

#[test]
fn refused_objects_are_the_causes_not_the_consequences() {
    let report = "6171; 3456 28945 COLLATION coll_icu_upgrade postgres\n    pg_restore: error: ICU is not supported\n\
                  1041; 1255 18503 FUNCTION int44in(cstring) postgres\n    pg_restore: error: could not load library\n\
                  2323; 1247 18502 TYPE city_budget postgres\n    pg_restore: error: function public.int44in(cstring) does not exist\n\
                  7938; 0 34092 TABLE DATA xmltest postgres\n    pg_restore: error: unsupported XML feature\n";
    assert_eq!(
        refused_objects(report),
        ["coll_icu_upgrade", "int44in", "xmltest"]
    );
}

/// The regression database followed 15 → 18 under a write mix, then switched: `clone --follow` accepts it
/// once the fixes `check` prints are applied as printed (replica identity for every table without a key,
/// partitions and partitioned roots included; unlogged tables made logged), inserts, updates, deletes and
/// truncates on plain, inherited and partitioned tables reach the target, `verify` says equal, and after
/// the cutover the two hold the same rows.
#[tokio::test(flavor = "multi_thread")]
async fn the_regression_database_followed_under_writes_and_switched_ends_identical() {
    let f = fixture();
    let s = regression_server(Copy::For18);
    let t = server(18);
    restore_globals(&t, &f);
    create_database(&t, "regression");
    let (source, target) = (s.url("regression"), t.url("regression"));
    let src = connect(&s.socket_url("regression")).await;
    let check = |extra: &[&str]| {
        let mut args = vec!["check", "--source", &source, "--target", &target, "--json"];
        args.extend(extra);
        hikkoshi(&args)
    };
    let out = check(&[]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = report["findings"].as_array().cloned().unwrap_or_default();
    // what check tells the user to do, as printed
    for name in ["replica identity", "unlogged tables"] {
        let Some(fix) = findings
            .iter()
            .find(|x| x["check"] == name && x["level"] == "blocker")
            .and_then(|x| x["fix"].as_str())
        else {
            continue;
        };
        let statements: Vec<String> = fix
            .split(['(', ')', '—'])
            .flat_map(|part| part.split(';'))
            .map(str::trim)
            .filter(|s| s.starts_with("ALTER TABLE"))
            .map(String::from)
            .collect();
        assert!(!statements.is_empty(), "{fix}");
        for s in statements {
            src.batch_execute(&s)
                .await
                .unwrap_or_else(|e| panic!("check's fix `{s}` failed: {e}"));
        }
    }
    let out = check(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check after its fixes:\n{}",
        text(&out)
    );
    let mut follower = crate::common::live::Follower::start_between(&source, &target, &[], &[]);
    let tgt = connect(&t.socket_url("regression")).await;
    crate::common::live::wait_in_sync_within(&src, &tgt, &mut follower, 600).await;
    // the write mix: on a sample of every kind of table, each statement on its own (a constraint may
    // refuse one: that is the source's business)
    let kinds = [
        (
            "plain",
            "c.relkind = 'r' AND NOT c.relispartition AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid OR i.inhparent = c.oid)",
        ),
        (
            "inheritance parent",
            "c.relkind = 'r' AND EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid)",
        ),
        ("partitioned", "c.relkind = 'p'"),
    ];
    let mut done = BTreeMap::new();
    for (kind, filter) in kinds {
        let tables: Vec<(String, String)> = src
            .query(
                &format!(
                    "SELECT c.oid::regclass::text,
                            coalesce((SELECT quote_ident(a.attname) FROM pg_attribute a
                                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                        AND a.attgenerated = '' AND a.attidentity <> 'a'
                                      ORDER BY a.attnum LIMIT 1), '')
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE {filter} AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                       AND n.nspname NOT LIKE 'pg\\_%' AND c.relpersistence = 'p'
                     ORDER BY c.relname LIMIT 40"
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (table, column) in tables {
            for sql in [
                format!("INSERT INTO {table} SELECT * FROM {table} LIMIT 2"),
                format!(
                    "UPDATE {table} SET {column} = {column} WHERE ctid = (SELECT ctid FROM ONLY {table} LIMIT 1)"
                ),
                format!("DELETE FROM {table} WHERE ctid = (SELECT ctid FROM ONLY {table} LIMIT 1)"),
            ] {
                if src.batch_execute(&sql).await.is_ok() {
                    *done
                        .entry((kind, sql.split(' ').next().unwrap().to_string()))
                        .or_insert(0) += 1;
                }
            }
        }
    }
    // an UPDATE that changes rows, and a TRUNCATE, on tables that take them
    for sql in [
        "UPDATE onek SET stringu2 = stringu2 || '' WHERE unique1 < 50",
        "UPDATE tenk1 SET string4 = string4 WHERE unique1 < 100",
        "TRUNCATE int8_tbl",
    ] {
        if src.batch_execute(sql).await.is_ok() {
            *done
                .entry(("named", sql.split(' ').next().unwrap().to_string()))
                .or_insert(0) += 1;
        }
    }
    eprintln!("writes that committed on the source: {done:?}");
    for kind in ["plain", "inheritance parent", "partitioned"] {
        assert!(
            done.keys().any(|(k, op)| *k == kind && op == "INSERT")
                && done.keys().any(|(k, op)| *k == kind && op == "DELETE"),
            "no {kind} table took an INSERT and a DELETE: {done:?}"
        );
    }
    crate::common::live::wait_in_sync_within(&src, &tgt, &mut follower, 600).await;
    let verify = hikkoshi(&["verify", "--source", &source, "--target", &target]);
    assert_eq!(verify.status.code(), Some(0), "verify:\n{}", text(&verify));
    let out = hikkoshi(&["cutover", "--source", &source, "--target", &target]);
    assert_success(&out);
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
    let src = connect(&s.socket_url("regression")).await;
    let differences = compare_rows(&src, &tgt).await;
    assert!(
        differences.is_empty(),
        "after the cutover the two differ in {} table(s):\n{}",
        differences.len(),
        differences.join("\n")
    );
}
