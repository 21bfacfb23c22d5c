//! What no change stream carries, and the switch must all the same (issue 23): large objects written during
//! the follow, and a materialized view whose replayed REFRESH saw other rows on the target than on the
//! source. Both are found by `verify`, and levelled by the cutover, after which the two sides are equal.

use std::time::Duration;

use tokio_postgres::Client;

use crate::common::scenario::*;
use crate::common::*;

/// Every large object as `oid owner md5`, to compare servers.
async fn large_objects(c: &Client) -> Vec<String> {
    c.query(
        "SELECT format('%s %s %s', oid, pg_get_userbyid(lomowner), md5(lo_get(oid)))
         FROM pg_largeobject_metadata ORDER BY oid",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Files the application stores as large objects before the clone and during the follow (new ones, one
/// rewritten in place with `lo_put`, one removed): `verify` names the differences, and after the cutover
/// every row points at an object with the same contents on the new primary, and nothing else is there.
#[tokio::test(flavor = "multi_thread")]
async fn large_objects_written_during_the_follow_are_on_the_new_primary_after_the_cutover() {
    let Live {
        pair, src, tgt, f, ..
    } = Pair::new(15, 18)
        .app()
        .await
        .then(
            "CREATE TABLE app.files (id int PRIMARY KEY, blob oid NOT NULL);
             INSERT INTO app.files
                 SELECT g, lo_from_bytea(0, convert_to(repeat('before ' || g, 1000 * g), 'UTF8'))
                 FROM generate_series(1, 3) g;",
        )
        .await
        .following()
        .await;
    assert_eq!(
        large_objects(&tgt).await,
        large_objects(&src).await,
        "the clone did not copy them"
    );
    // during the follow: 20 new files, one of them large (3 MB, several chunks), one rewritten, one gone
    src.batch_execute(
        "INSERT INTO app.files
             SELECT g, lo_from_bytea(0, convert_to(repeat('during ' || g, 100 * g), 'UTF8'))
             FROM generate_series(4, 23) g;
         INSERT INTO app.files VALUES (24, lo_from_bytea(0, decode(repeat('ab', 3 << 20), 'hex')));
         SELECT lo_put(blob, 10, 'REWRITTEN') FROM app.files WHERE id = 2;
         SELECT lo_unlink(blob) FROM app.files WHERE id = 3;
         DELETE FROM app.files WHERE id = 3;",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = text(&hikkoshi(&["status", "--target", &pair.target_url()]));
    assert!(
        status.contains("large objects (3 on the target): their changes are not streamed"),
        "status says the stream does not carry them:\n{status}"
    );
    pair.verify_finds(&[
        "is on the source only",
        "has other contents",
        "is on the target only",
    ]);
    let out = pair.hikkoshi(&["cutover", "--json"]);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["large_objects_before_fence"]
            .as_str()
            .unwrap()
            .contains("22 copied, 1 removed"),
        "{report:#}"
    );
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    let src = connect(&pair.s.socket_url("app")).await;
    assert_eq!(large_objects(&tgt).await, large_objects(&src).await);
    let dangling: i64 = tgt
        .query_one(
            "SELECT count(*) FROM app.files f
             WHERE NOT EXISTS (SELECT 1 FROM pg_largeobject_metadata m WHERE m.oid = f.blob)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        dangling, 0,
        "rows point at large objects the new primary does not have"
    );
    assert_same_rows_and_schema(&src, &tgt).await;
}

/// A REFRESH in a REPEATABLE READ transaction sees the rows of its snapshot on the source; replayed on the
/// target at its commit, it also sees a row committed in between. `verify` finds the view different, and
/// the cutover refreshes it on both servers, naming it: afterwards the two hold the same rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_materialized_view_refreshed_differently_is_refreshed_on_both_by_the_cutover() {
    let Live {
        pair, src, tgt, f, ..
    } = Pair::new(15, 18)
        .app()
        .await
        .then(
            "CREATE TABLE app.sales (id int PRIMARY KEY, amount int NOT NULL);
             INSERT INTO app.sales SELECT g, g FROM generate_series(1, 100) g;
             CREATE VIEW app.big_sales AS SELECT * FROM app.sales WHERE amount > 10;
             CREATE MATERIALIZED VIEW app.sales_total AS SELECT id, amount FROM app.big_sales;
             CREATE MATERIALIZED VIEW app.sales_summary AS SELECT count(*) AS n FROM app.sales_total;",
        )
        .await
        .following()
        .await;
    let other = connect(&pair.s.socket_url("app")).await;
    src.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM app.sales")
        .await
        .unwrap();
    other
        .batch_execute("INSERT INTO app.sales VALUES (1000, 1000)")
        .await
        .unwrap();
    src.batch_execute("REFRESH MATERIALIZED VIEW app.sales_total; COMMIT")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    pair.verify_finds(&["materialized view app.sales_total has other contents"]);
    let out = pair.hikkoshi(&["cutover", "--json"]);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["matviews_refreshed"]
            .to_string()
            .contains("app.sales_total"),
        "{report:#}"
    );
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    let src = connect(&pair.s.socket_url("app")).await;
    for mv in ["app.sales_total", "app.sales_summary"] {
        assert_eq!(rows_of(&src, mv).await, rows_of(&tgt, mv).await, "{mv}");
    }
    assert_eq!(rows_of(&tgt, "app.sales_total").await.len(), 91);
}
