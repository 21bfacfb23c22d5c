//! `hikkoshi clone --rehearse`: a complete, sane prediction for every selected table, and nothing left on
//! either server; bad input fails as `clone` does. (No timing thresholds: the figures depend on the machine.)

use crate::common::scenario::*;
use crate::common::*;

fn report(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("clone --rehearse --json prints JSON ({e}):\n{}", text(out)))
}

fn finite_non_negative(v: &serde_json::Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is a number: {v}"));
    assert!(x.is_finite() && x >= 0.0, "{what} = {x}");
    x
}

/// Schemas and relations of a database, apart from the system's.
async fn objects(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT 'schema ' || nspname FROM pg_namespace
         WHERE nspname NOT IN ('information_schema') AND nspname NOT LIKE 'pg\\_%'
         UNION ALL
         SELECT 'relation ' || n.nspname || '.' || c.relname FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
         UNION ALL
         SELECT 'extension ' || extname FROM pg_extension
         UNION ALL
         SELECT 'type ' || typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
         ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn source_leftovers(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT 'slot ' || slot_name FROM pg_replication_slots
         UNION ALL SELECT 'publication ' || pubname FROM pg_publication",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rehearse_predicts_every_table_and_leaves_both_servers_as_they_were() {
    let Sides { pair, src, tgt } = Pair::new(15, 18).app().await;
    let source_objects = objects(&src).await;
    let target_objects = objects(&tgt).await;
    let tables = user_tables(&src).await;

    let out = pair.hikkoshi(&["clone", "--rehearse", "--jobs", "2", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let r = report(&out);
    let listed: Vec<String> = r["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    // user_tables quotes as PostgreSQL's quote_ident does: only where needed, like the report's names
    let mut want = tables.clone();
    want.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(got, want, "every selected table is listed");

    for t in r["tables"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let rows = finite_non_negative(&t["rows"], &format!("{name} rows"));
        let copy = finite_non_negative(&t["copy_seconds"], &format!("{name} copy_seconds"));
        finite_non_negative(&t["index_seconds"], &format!("{name} index_seconds"));
        finite_non_negative(&t["analyze_seconds"], &format!("{name} analyze_seconds"));
        assert!(t["chunks"].as_u64().unwrap() >= 1, "{name}: {t}");
        if rows > 0.0 {
            assert!(copy > 0.0, "{name} has rows and a copy time: {t}");
            assert!(
                t["sample_rows"].as_u64().unwrap() > 0,
                "{name} was sampled: {t}"
            );
        }
        // small tables are sampled whole: the row count is exact
        let quoted = tables.iter().find(|q| *q == name).unwrap();
        let count: i64 = src
            .query_one(&format!("SELECT count(*) FROM ONLY {quoted}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows as i64, count, "{name}: {t}");
    }
    let mut parts = 0.0;
    for k in [
        "prepare_seconds",
        "schema_seconds",
        "copy_seconds",
        "index_seconds",
        "analyze_seconds",
    ] {
        parts += finite_non_negative(&r[k], k);
    }
    let total = finite_non_negative(&r["total_seconds"], "total_seconds");
    assert!(total > 0.0 && (total - parts).abs() < 1e-6, "{r}");
    assert!(r["copy_seconds"].as_f64().unwrap() > 0.0, "{r}");
    let speedup = finite_non_negative(&r["parallel_speedup"], "parallel_speedup");
    assert!(speedup > 0.0, "{r}");
    assert_eq!(r["jobs"], 2);
    // indexes and constraints of the fixture were measured on the samples
    let measured: usize = r["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["indexes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["seconds"].is_number())
                .count()
        })
        .sum();
    assert!(measured > 0, "{r}");

    assert_eq!(source_leftovers(&src).await, Vec::<String>::new());
    assert_eq!(
        objects(&src).await,
        source_objects,
        "the source is unchanged"
    );
    assert_eq!(
        objects(&tgt).await,
        target_objects,
        "nothing stayed on the target"
    );
    assert!(user_tables(&tgt).await.is_empty());
    assert!(!has_state(&tgt).await);

    // the text report, with a selection: only the selected tables
    let out = pair.hikkoshi(&["clone", "--rehearse", "--include", "app.orders"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("app.orders"), "{stdout}");
    assert!(stdout.contains("total"), "{stdout}");
    assert!(
        stdout.contains("rehearsal: 1 table(s)"),
        "only the selected table: {stdout}"
    );
    assert_eq!(
        objects(&tgt).await,
        target_objects,
        "nothing stayed on the target"
    );
    assert_eq!(source_leftovers(&src).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn rehearse_fails_on_bad_input_like_clone_and_creates_nothing() {
    let Sides { pair, src, tgt } = Pair::new(15, 15)
        .source(
            "CREATE TABLE orders (id int primary key, note text);
             INSERT INTO orders SELECT i, md5(i::text) FROM generate_series(1, 1000) i;",
        )
        .await;
    let before = objects(&tgt).await;

    // a pattern that matches nothing: usage error, exit 2
    let out = pair.hikkoshi(&["clone", "--rehearse", "--include", "public.order"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("\"public.order\" matches no table"), "{e}");

    // nothing listens: connection error, exit 2, says which side
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let out = hikkoshi(&[
        "clone",
        "--rehearse",
        "--source",
        &pair.source_url(),
        "--target",
        &format!("host=127.0.0.1 port={port} user=postgres dbname=x"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("cannot connect to the target"), "{e}");

    // --rehearse with --follow makes no sense: usage error
    let out = pair.hikkoshi(&["clone", "--rehearse", "--follow"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // a target that already has the table: the preflight's blocker, and the schema cannot be rehearsed
    tgt.batch_execute("CREATE TABLE orders (id int)")
        .await
        .unwrap();
    let out = pair.hikkoshi(&["clone", "--rehearse"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("hikkoshi check"), "{e}");
    tgt.batch_execute("DROP TABLE orders").await.unwrap();

    assert_eq!(objects(&tgt).await, before, "nothing stayed on the target");
    assert_eq!(source_leftovers(&src).await, Vec::<String>::new());
}
