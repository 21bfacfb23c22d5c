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
