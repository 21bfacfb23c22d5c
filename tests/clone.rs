//! `hikkoshi clone` end to end on real servers: 15 → 18 and 18 → 18 (pgvector), compared row by row.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn clone_15_to_18_copies_schema_rows_indexes_and_sequences_identically() {
    let s = server(15);
    let t = server(18);
    let src = create_db(&s, "app").await;
    src.batch_execute(FIXTURE_APP).await.expect("loading the fixture");
    let tgt = create_db(&t, "app_copy").await;
    let out = hikkoshi(&[
        "clone",
        "--source",
        &s.url("app"),
        "--target",
        &t.uri("app_copy"),
        "--jobs",
        "2",
        "--chunk-size",
        "1MB",
    ]);
    assert_success(&out);
    assert_identical(&src, &tgt).await;
    assert!(hikkoshi_slots(&src).await.is_empty(), "a plain clone leaves no slot");
    // big tables were really split: by key where there is one, by ctid where there is none
    let methods: Vec<(String, String, i64)> = tgt
        .query(
            "SELECT t.table_name, t.chunk_method, count(*) FROM hikkoshi.tables t
             JOIN hikkoshi.chunks c USING (schema_name, table_name)
             WHERE t.table_name IN ('events', 'clicks') GROUP BY 1, 2 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(methods.len(), 2, "{methods:?}");
    assert_eq!(methods[0].0, "clicks");
    assert_eq!(methods[0].1, "ctid");
    assert!(methods[0].2 > 1, "{methods:?}");
    assert_eq!(methods[1].1, "key");
    assert!(methods[1].2 > 1, "{methods:?}");
    // sequences moved: new rows get fresh keys on the target
    tgt.batch_execute("INSERT INTO app.orders (customer_id, status, ordered_at) SELECT id, 'pending', now() FROM app.customers LIMIT 1")
        .await
        .expect("inserting on the target after the clone");
}
