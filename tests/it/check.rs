//! `hikkoshi check`: every blocker found before anything is touched, each with its fix; nothing created.

use crate::common::scenario::*;
use crate::common::*;
use hikkoshi::localserver::ServerOptions;

fn findings(out: &std::process::Output) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json prints JSON ({e}):\n{}", text(out)));
    v["findings"].as_array().cloned().unwrap_or_default()
}

fn blockers(f: &[serde_json::Value]) -> Vec<String> {
    f.iter()
        .filter(|x| x["level"] == "blocker")
        .map(|x| x["check"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ready_pair_passes_and_nothing_is_created() {
    let Sides { pair, src, tgt } = Pair::new(15, 18).app().await;
    let out = pair.hikkoshi(&["check", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let f = findings(&out);
    assert!(blockers(&f).is_empty(), "{f:?}");
    for c in [
        "wal_level",
        "replication slots",
        "extensions",
        "encoding",
        "target",
        "size",
        "cutover proof",
    ] {
        assert!(f.iter().any(|x| x["check"] == c), "{c} was checked: {f:?}");
    }
    let human = pair.hikkoshi(&["check"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("ready: no blocker"),
        "{}",
        text(&human)
    );
    assert!(hikkoshi_slots(&src).await.is_empty());
    assert!(!has_state(&tgt).await);
    let pubs = publication_count(&src).await;
    assert_eq!(pubs, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_blocker_is_named_with_its_fix_in_one_run() {
    let s = server_with(
        15,
        ServerOptions {
            conf: vec![
                "wal_level = replica".into(),
                "max_slot_wal_keep_size = 64MB".into(),
            ],
            ..Default::default()
        },
    );
    let t = server_with(
        15,
        ServerOptions {
            conf: vec!["wal_level = replica".into()],
            ..Default::default()
        },
    );
    let Sides { pair, src, tgt } = Pair::of(s, t)
        .source(
            "CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE logs (at timestamptz, line text);
             CREATE ROLE reader LOGIN PASSWORD 'reader-pw'; GRANT SELECT ON orders TO reader;",
        )
        .await;
    tgt.batch_execute("CREATE TABLE orders (id int)")
        .await
        .unwrap();
    // what an abandoned earlier migration leaves behind
    src.batch_execute("CREATE PUBLICATION hikkoshi_0badc0de FOR TABLE orders")
        .await
        .unwrap();
    let source = format!(
        "postgresql://reader:reader-pw@127.0.0.1:{}/app?sslmode=disable",
        pair.s.port
    );
    let out = hikkoshi(&[
        "check",
        "--source",
        &source,
        "--target",
        &pair.target_url(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let f = findings(&out);
    let b = blockers(&f);
    for c in [
        "wal_level",
        "replication privilege",
        "read access",
        "replica identity",
        "target",
        "publication",
    ] {
        assert!(b.contains(&c.to_string()), "{c} blocks: {b:?}");
    }
    for x in f.iter().filter(|x| x["level"] != "ok") {
        assert!(x["fix"].is_string(), "every problem carries its fix: {x}");
    }
    let fixes: String = f
        .iter()
        .filter_map(|x| x["fix"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        fixes.contains("ALTER SYSTEM SET wal_level = logical"),
        "{fixes}"
    );
    assert!(fixes.contains("ALTER ROLE reader REPLICATION"), "{fixes}");
    assert!(
        fixes.contains("ALTER TABLE public.logs REPLICA IDENTITY FULL"),
        "{fixes}"
    );
    assert!(fixes.contains("GRANT SELECT ON"), "{fixes}");
    assert!(
        f.iter()
            .any(|x| x["check"] == "max_slot_wal_keep_size" && x["level"] == "warning"),
        "{f:?}"
    );
    // a target that cannot stream its own changes: the cutover would verify inside its pause
    assert!(
        f.iter().any(|x| x["check"] == "cutover proof"
            && x["level"] == "warning"
            && x["fix"]
                .as_str()
                .unwrap_or("")
                .contains("wal_level = logical on the target")),
        "{f:?}"
    );
    assert!(
        f.iter().any(|x| x["check"] == "leftovers"
            && x["message"]
                .as_str()
                .unwrap_or("")
                .contains("hikkoshi_0badc0de")),
        "{f:?}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("reader-pw"));
    assert!(!has_state(&tgt).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extension_the_target_cannot_create_is_a_blocker_with_the_package_to_install() {
    let Sides {
        pair, tgt: _tgt, ..
    } = Pair::new(18, 15).db("api").source(FIXTURE_VECTOR).await;
    let out = pair.hikkoshi(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("extension vector") && stdout.contains("pgvector"),
        "{stdout}"
    );
    assert!(
        stdout.contains("older than the source"),
        "a downgrade is named: {stdout}"
    );
}

/// Issue 22: `check` blocks only on what the command it prepares needs. For `clone --follow` (the default),
/// partitions without replica identity and unlogged tables are blockers, and the fix it prints works as
/// printed, partitions included; with `--no-follow` (a plain clone) they are warnings. Once fixed, `check`
/// says ready and the following clone starts.
#[tokio::test(flavor = "multi_thread")]
async fn check_blocks_only_for_the_command_it_prepares_and_its_fixes_work_as_printed() {
    let Sides { pair, src, tgt } = Pair::new(15, 18)
        .source(
            "CREATE TABLE measures (day date NOT NULL, v int) PARTITION BY RANGE (day);
             CREATE TABLE measures_2024 PARTITION OF measures FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
             CREATE TABLE measures_2025 PARTITION OF measures FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
             INSERT INTO measures VALUES ('2024-03-01', 1), ('2025-03-01', 2);
             CREATE UNLOGGED TABLE scratch (k int PRIMARY KEY, v text);
             INSERT INTO scratch VALUES (1, 'x');
             CREATE TABLE keyed (id int PRIMARY KEY);",
        )
        .await;
    let out = pair.hikkoshi(&["check", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let f = findings(&out);
    let b = blockers(&f);
    assert!(b.contains(&"replica identity".to_string()), "{f:?}");
    assert!(b.contains(&"unlogged tables".to_string()), "{f:?}");
    let plain = pair.hikkoshi(&["check", "--no-follow", "--json"]);
    assert_eq!(plain.status.code(), Some(0), "{}", text(&plain));
    assert!(blockers(&findings(&plain)).is_empty());
    // the printed fixes, as printed
    for check in ["replica identity", "unlogged tables"] {
        let fix = f
            .iter()
            .find(|x| x["check"] == check)
            .and_then(|x| x["fix"].as_str())
            .unwrap()
            .to_string();
        let statements: Vec<&str> = fix
            .split(['(', ')', '—'])
            .flat_map(|part| part.split(';'))
            .map(str::trim)
            .filter(|s| s.starts_with("ALTER TABLE"))
            .collect();
        assert!(!statements.is_empty(), "{fix}");
        for s in statements {
            src.batch_execute(s)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }
    let out = pair.hikkoshi(&["check", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut f = pair.follower(&[]);
    crate::common::live::wait_in_sync(&src, &tgt, &mut f).await;
    src.batch_execute("UPDATE measures SET v = v + 1; DELETE FROM scratch")
        .await
        .unwrap();
    crate::common::live::wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
}

/// Issue 22: what the target cannot hold is named by `check`, every object, before anything is created —
/// not found by the clone's schema step at the first one. PostgreSQL 18 here is built without ICU and lz4.
#[tokio::test(flavor = "multi_thread")]
async fn check_names_every_object_the_target_cannot_hold_and_creates_nothing() {
    let Sides { pair, tgt, .. } = Pair::new(15, 18)
        .source(
            "CREATE COLLATION und_icu (provider = icu, locale = 'und');
             CREATE TABLE uses_icu (id int PRIMARY KEY, name text COLLATE und_icu);
             CREATE TABLE packed (id int PRIMARY KEY, doc text COMPRESSION lz4);
             CREATE TABLE plain (id int PRIMARY KEY, note text);",
        )
        .await;
    // whether this PostgreSQL 18 build has ICU, tried in a transaction that is rolled back
    let icu = tgt
        .batch_execute("BEGIN; CREATE COLLATION probe (provider = icu, locale = 'und')")
        .await
        .is_ok();
    tgt.batch_execute("ROLLBACK").await.unwrap();
    let out = pair.hikkoshi(&["check", "--json"]);
    let f = findings(&out);
    let schema: Vec<String> = f
        .iter()
        .filter(|x| x["check"] == "schema")
        .map(|x| format!("{} {} | {}", x["level"], x["message"], x["fix"]))
        .collect();
    if icu {
        // a target built with ICU (and lz4) holds it all
        assert!(schema.iter().all(|s| s.starts_with("\"ok\"")), "{schema:?}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = schema.join("\n");
    for needle in [
        "COLLATION public.und_icu",
        "TABLE public.uses_icu",
        "TABLE public.packed",
    ] {
        assert!(said.contains(needle), "{needle} not named:\n{said}");
    }
    assert!(!said.contains("TABLE public.plain"), "{said}");
    assert!(
        said.contains("ICU") && said.contains("SET COMPRESSION"),
        "{said}"
    );
    assert_eq!(user_tables(&tgt).await.len(), 0, "check created something");
}
