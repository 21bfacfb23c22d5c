//! `hikkoshi clone --follow` on real servers: a live workload during the copy and the stream, then the
//! target compared with the source row by row.

use hikkoshi::failpoint;

use std::time::Duration;

use crate::common::live::*;
use crate::common::scenario::*;
use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn follow_applies_a_live_workload_exactly_once() {
    let Sides { pair, src, tgt } = Pair::new(15, 18).app().await;
    // writes start before the clone and go on during the copy and the stream
    let writer = tokio::spawn(workload(pair.source_url(), 0, 300));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut f = pair.follower(&[]);
    writer.await.unwrap();
    // a 200 000-row transaction, a truncate of several tables, and more small ones
    src.batch_execute(
        "INSERT INTO app.events (id, kind, occurred_at)
             SELECT 2000000 + i, 'click', '2024-03-01' FROM generate_series(1, 200000) i;
         TRUNCATE app.audit_log, app.translations;",
    )
    .await
    .unwrap();
    workload(pair.source_url(), 300, 40).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    let peak = peak_rss(&f);
    assert!(
        peak > 0 && peak < 150 << 20,
        "the follower's peak memory, with a 200 000-row transaction and MB-sized values: {} MB",
        peak >> 20
    );
    let (status, log) = f.stop();
    assert!(
        status.success(),
        "SIGTERM ends the follower cleanly:\n{log}"
    );
    assert_same_rows_and_schema(&src, &tgt).await;
    let applied: i64 = tgt
        .query_one("SELECT applied_txns FROM hikkoshi.stream", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        applied > 40,
        "transactions went through the stream ({applied})"
    );
    let own = publication_count(&tgt).await;
    assert_eq!(
        own, 0,
        "hikkoshi's publication is not part of the user's schema"
    );
    // the slot stays for the next run, which resumes
    assert_eq!(hikkoshi_slots(&src).await.len(), 1);
    let mut f = pair.follower(&[]);
    workload(pair.source_url(), 340, 20).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_around_the_apply_commit_replays_nothing_twice() {
    let Live { pair, src, tgt, f } = Pair::new(15, 15).app().await.following().await;
    let (status, _) = f.stop();
    assert!(status.success());
    let points = [
        failpoint::nth(failpoint::APPLY_BEFORE_COMMIT, 3),
        failpoint::nth(failpoint::APPLY_AFTER_COMMIT, 3),
    ];
    for (n, point) in points.iter().enumerate() {
        let mut f = pair.follower(&[("HIKKOSHI_FAILPOINT", point)]);
        // write in small bursts until the failpoint (the third commit on the target) kills the follower
        let mut k = n as i32 * 1000;
        let status = loop {
            if let Some(status) = f.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                k < n as i32 * 1000 + 500,
                "the failpoint was never reached:\n{}",
                f.log()
            );
            workload(pair.source_url(), k, 5).await;
            k += 5;
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        assert!(
            !status.success(),
            "{point} killed the follower:\n{}",
            f.log()
        );
        assert!(f.log().contains("failpoint"), "{}", f.log());
        let mut f = pair.follower(&[]);
        wait_in_sync(&src, &tgt, &mut f).await;
        let (status, log) = f.stop();
        assert!(status.success(), "{log}");
        assert_same_rows_and_schema(&src, &tgt).await;
    }
}

/// DDL that the capture does not see: its event triggers dropped here; in life, a source role that may not
/// create event triggers (see `cutover::without_ddl_capture_a_schema_change_stops_every_cutover`).
async fn without_ddl_capture(src: &tokio_postgres::Client) {
    src.batch_execute(
        "DO $$ DECLARE e text; BEGIN
             FOR e IN SELECT evtname FROM pg_event_trigger WHERE evtname LIKE 'hikkoshi%' LOOP
                 EXECUTE format('DROP EVENT TRIGGER %I', e);
             END LOOP;
         END $$",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_added_on_the_source_stops_the_stream_with_the_table_named() {
    let Live {
        pair: _pair,
        src,
        tgt,
        mut f,
    } = Pair::new(15, 18).app().await.following().await;
    without_ddl_capture(&src).await;
    src.batch_execute(
        "ALTER TABLE app.customers ADD COLUMN tier text;
         UPDATE app.customers SET tier = 'gold' WHERE id = 1;",
    )
    .await
    .unwrap();
    let log = f.stops_with_an_error().await;
    assert!(
        log.contains("app.customers") && log.contains("tier") && log.contains("ALTER TABLE"),
        "{log}"
    );
    // nothing of the offending transaction reached the target
    let n: i64 = tgt
        .query_one("SELECT count(*) FROM app.customers", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_identity_is_refused_before_the_publication_breaks_the_application() {
    let Sides { pair, src, tgt } = Pair::new(15, 15)
        .source(
            "CREATE TABLE logs (at timestamptz, line text); INSERT INTO logs VALUES (now(), 'x');",
        )
        .await;
    let out = pair.hikkoshi(&["clone", "--follow"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("ALTER TABLE public.logs REPLICA IDENTITY FULL"),
        "{e}"
    );
    assert!(hikkoshi_slots(&src).await.is_empty());
    let pubs = publication_count(&src).await;
    assert_eq!(pubs, 0);
    assert!(!has_state(&tgt).await);
    // the application can still update the table
    src.batch_execute("UPDATE logs SET line = 'y'")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_killed_and_resumed_under_writes_ends_identical_after_the_stream() {
    let Sides { pair, src, tgt } = Pair::new(15, 18).app().await;
    let (stop, writer) = background_writer(pair.source_url(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut f = pair.follower(&[(
        "HIKKOSHI_FAILPOINT",
        &failpoint::nth(failpoint::COPY_AFTER_CHUNK_COMMIT, 12),
    )]);
    let status = f.child.wait().unwrap();
    assert!(
        !status.success(),
        "the failpoint killed the copy:\n{}",
        f.log()
    );
    let copied: i64 = tgt
        .query_one(
            "SELECT count(*) FROM hikkoshi.chunks WHERE state = 'copied'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(copied >= 12, "{copied}");
    // more writes between the two runs, then the resumed copy in a new snapshot
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut f = pair.follower(&[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    assert!(rounds > 10, "the writer ran during both runs ({rounds})");
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    // chunks really were copied in two snapshots
    let snapshots: i64 = tgt
        .query_one(
            "SELECT count(DISTINCT snapshot_lsn) FROM hikkoshi.chunks",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(snapshots, 2);
    assert_same_rows_and_schema(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_of_source_and_target_during_streaming_recover_by_themselves() {
    let Live {
        pair, tgt, mut f, ..
    } = Pair::new(15, 18).app().await.following().await;
    workload(pair.source_url(), 0, 30).await;
    pair.s.restart("immediate").unwrap();
    let src = connect(&pair.source_url()).await;
    workload(pair.source_url(), 30, 30).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    pair.t.restart("immediate").unwrap();
    let tgt = connect(&pair.target_url()).await;
    workload(pair.source_url(), 60, 30).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("reconnecting"),
        "the follower noticed and recovered:\n{log}"
    );
    assert_same_rows_and_schema(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_type_changed_on_the_source_stops_the_stream_with_both_types_named() {
    let Live {
        pair, src, mut f, ..
    } = Pair::new(15, 15).app().await.following().await;
    // status sees a running, caught-up follower
    let out = hikkoshi(&["status", "--target", &pair.target_url(), "--json"]);
    assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stream"]["follower_running"], true, "{v}");
    assert_eq!(v["phase"], "done");
    without_ddl_capture(&src).await;
    src.batch_execute(
        "ALTER TABLE app.events ALTER COLUMN amount TYPE numeric(14,4);
         UPDATE app.events SET amount = 1.2345 WHERE id = 1;",
    )
    .await
    .unwrap();
    let log = f.stops_with_an_error().await;
    assert!(
        log.contains("app.events.amount")
            && log.contains("numeric(14,4)")
            && log.contains("numeric(10,2)"),
        "{log}"
    );
    let out = hikkoshi(&["status", "--target", &pair.target_url(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stream"]["follower_running"], false, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_slot_is_a_definite_error_that_says_what_to_do() {
    let Live { pair, src, f, .. } = Pair::new(15, 15).app().await.following().await;
    let (status, _) = f.stop();
    assert!(status.success());
    let slots = hikkoshi_slots(&src).await;
    assert_eq!(slots.len(), 1);
    // the stopped follower's walsender lets go of the slot a moment after the process exits
    for _ in 0..100 {
        let active: bool = src
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slots[0]],
            )
            .await
            .unwrap()
            .get(0);
        if !active {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    src.execute("SELECT pg_drop_replication_slot($1)", &[&slots[0]])
        .await
        .unwrap();
    let mut f = pair.follower(&[]);
    let status = f.child.wait().unwrap();
    let log = f.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("no longer exists") && log.contains("hikkoshi clean"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_following_clone_that_fails_in_the_schema_step_leaves_no_slot_or_publication() {
    let pair = Pair::new(15, 18);
    let (src, tgt) = schema_conflict_pair(&pair.s, &pair.t).await;
    let out = pair.hikkoshi(&["clone", "--follow"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(hikkoshi_slots(&src).await.is_empty(), "{}", text(&out));
    let pubs = publication_count(&src).await;
    assert_eq!(pubs, 0, "{}", text(&out));
    // nor the DDL capture
    assert_eq!(event_triggers(&src).await, 0, "{}", text(&out));
    assert!(!has_state(&tgt).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_during_streaming_rechecks_until_the_target_catches_up() {
    let Live {
        pair,
        src,
        tgt,
        mut f,
    } = Pair::new(15, 18).app().await.following().await;
    // verify starts while the source is being written; the writes stop a little later, and the ranges
    // that differed because the target trailed are checked again until they settle
    let (stop, writer) = background_writer(pair.source_url(), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (su, tu) = (pair.source_url(), pair.target_url());
    let verify = std::thread::spawn(move || {
        hikkoshi(&[
            "verify", "--source", &su, "--target", &tu, "--json", "--jobs", "1",
        ])
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let out = verify.join().unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    for table in v["tables"].as_array().unwrap() {
        assert_eq!(table["matched"], true, "{table}");
    }
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
}

/// The applier folds the changes of a target transaction into net changes per key (`stream::fold`). Every
/// case where the net form differs from the source's sequence of statements, in single source transactions
/// (one target transaction each, at least), then a target that drifted: the set-based update names the key.
#[tokio::test(flavor = "multi_thread")]
async fn folded_changes_end_exactly_as_on_the_source() {
    let Live {
        pair: _pair,
        src,
        tgt,
        mut f,
    } = Pair::new(15, 18)
        .db("fold")
        .source(
            "CREATE TABLE kv (id int PRIMARY KEY, v text, doc text);
             ALTER TABLE kv ALTER doc SET STORAGE EXTERNAL;
             CREATE TABLE uniq (id int PRIMARY KEY, code text UNIQUE, n int);
             CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tag text,
                                 no int GENERATED ALWAYS AS IDENTITY (START 100) UNIQUE);
             CREATE TABLE pair (a int, b text, v int, PRIMARY KEY (a, b));
             CREATE TABLE part (id int, region text, v int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
             CREATE TABLE part_eu PARTITION OF part FOR VALUES IN ('eu');
             CREATE TABLE part_us PARTITION OF part FOR VALUES IN ('us');
             INSERT INTO kv SELECT i, 'v' || i, repeat(md5(i::text), 400) FROM generate_series(1, 50) i;
             INSERT INTO uniq SELECT i, 'c' || i, 0 FROM generate_series(1, 10) i;
             INSERT INTO ident (tag) SELECT 't' || i FROM generate_series(1, 10) i;
             INSERT INTO pair SELECT i % 5, 'b' || i, i FROM generate_series(1, 20) i;
             INSERT INTO part SELECT i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, i FROM generate_series(1, 20) i;",
        )
        .await
        .following()
        .await;
    let cases = [
        // inserted, updated and deleted: nothing; a row updated many times with its document untouched
        "INSERT INTO kv VALUES (100, 'new', 'd'); UPDATE kv SET v = 'newer' WHERE id = 100;
         DELETE FROM kv WHERE id = 100;
         UPDATE kv SET v = 'a' WHERE id = 1; UPDATE kv SET v = 'b' WHERE id = 1; UPDATE kv SET v = 'c' WHERE id = 1;",
        // deleted and inserted again with other values; a document rewritten, then another column
        "DELETE FROM kv WHERE id = 2; INSERT INTO kv VALUES (2, 'again', 'short');
         UPDATE kv SET doc = repeat('x', 5000) WHERE id = 3; UPDATE kv SET v = 'after doc' WHERE id = 3;",
        // keys that move onto each other's places: 5 -> 60, 4 -> 5, 60 -> 4
        "UPDATE kv SET id = 60 WHERE id = 5; UPDATE kv SET id = 5 WHERE id = 4; UPDATE kv SET id = 4 WHERE id = 60;",
        // a key change of a row whose document is not sent (unchanged TOAST, row not in this transaction)
        "UPDATE kv SET id = 70, v = 'moved' WHERE id = 6;",
        // a key change of a row inserted in the same transaction, then its document left unchanged
        "INSERT INTO kv VALUES (80, 'w', repeat('y', 6000)); UPDATE kv SET id = 81 WHERE id = 80;
         UPDATE kv SET v = 'w2' WHERE id = 81;",
        // a unique column other than the key: values swapped through a spare one (order matters)
        "UPDATE uniq SET code = 'tmp' WHERE id = 1; UPDATE uniq SET code = 'c1' WHERE id = 2;
         UPDATE uniq SET code = 'c2' WHERE id = 1; UPDATE uniq SET n = n + 1;",
        // identity columns: deleted and put back with their old values, updated
        "DELETE FROM ident WHERE id = 3;
         INSERT INTO ident (id, tag, no) OVERRIDING SYSTEM VALUE VALUES (3, 'back', 555);
         UPDATE ident SET tag = 'changed' WHERE id = 4; INSERT INTO ident (tag) VALUES ('eleven');",
        // a composite key, one part changed; rows moving between partitions
        "UPDATE pair SET b = b || '!' WHERE a = 1; UPDATE pair SET v = -v WHERE a = 2; DELETE FROM pair WHERE a = 3;
         UPDATE part SET region = 'us' WHERE id = 2; UPDATE part SET v = v * 10 WHERE region = 'eu';
         DELETE FROM part WHERE id = 3; INSERT INTO part VALUES (3, 'eu', 33);",
    ];
    for case in cases {
        src.batch_execute(&format!("BEGIN; {case} COMMIT;"))
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
    }
    // the same, as many small transactions that share a target transaction
    for k in 0..200 {
        src.batch_execute(&format!(
            "UPDATE kv SET v = 'k{k}' WHERE id = {};
             INSERT INTO kv VALUES ({}, 'x', NULL) ON CONFLICT (id) DO UPDATE SET v = 'upserted';
             DELETE FROM kv WHERE id = {};",
            k % 40 + 7,
            1000 + k % 13,
            1000 + (k + 5) % 13,
        ))
        .await
        .unwrap();
    }
    wait_in_sync(&src, &tgt, &mut f).await;
    assert_same_rows_and_schema(&src, &tgt).await;

    // drift: a row deleted on the target, then updated on the source
    tgt.batch_execute("DELETE FROM kv WHERE id = 9")
        .await
        .unwrap();
    src.batch_execute("UPDATE kv SET v = 'lost' WHERE id = 9")
        .await
        .unwrap();
    let status = f.exits_by_itself().await;
    let log = f.log();
    assert_eq!(status.code(), Some(1), "a definite error:\n{log}");
    assert!(
        log.contains("public.kv") && log.contains("(id)=(9)") && log.contains("drifted"),
        "the error names the table and the key:\n{log}"
    );
}

/// verify while the source is written for the whole run: the tables being written never settle as a whole,
/// so their differing rows are settled one by one. Only the row changed on the target is reported.
#[tokio::test(flavor = "multi_thread")]
async fn verify_under_constant_writes_reports_only_the_row_that_really_differs() {
    let Live { pair, tgt, f, .. } = Pair::new(15, 18).app().await.following().await;
    // the workload never touches event 1
    tgt.batch_execute(
        "UPDATE app.events SET occurred_at = occurred_at + interval '1 day' WHERE id = 1",
    )
    .await
    .unwrap();
    let (stop, writer) = background_writer(pair.source_url(), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (su, tu) = (pair.source_url(), pair.target_url());
    let out = tokio::task::spawn_blocking(move || {
        hikkoshi(&["verify", "--source", &su, "--target", &tu, "--json"])
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    assert!(rounds > 0, "the source was written during the verify");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    for table in v["tables"].as_array().unwrap() {
        if table["table"] == "app.events" {
            assert_eq!(table["matched"], false, "{table}");
            assert_eq!(table["changed"], serde_json::json!(["(1)"]), "{table}");
            assert_eq!(table["missing_on_target"], serde_json::json!([]), "{table}");
            assert_eq!(table["extra_on_target"], serde_json::json!([]), "{table}");
        } else {
            assert_eq!(table["matched"], true, "{table}");
        }
    }
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
}

/// A partition tree left half copied — some partitions copied in the first snapshot, the others not yet —
/// restarts whole in the resumed copy's snapshot: the stream names only the root, so one window must serve
/// every partition. Before, rows written between the two snapshots into a partition copied in the second
/// one came once from that copy and once more from the stream (a duplicate key stopped the follower).
#[tokio::test(flavor = "multi_thread")]
async fn a_half_copied_partition_tree_resumes_without_doubling_rows() {
    let mut ddl = String::from(
        "CREATE TABLE m (id int, p int, v text, PRIMARY KEY (id, p)) PARTITION BY LIST (p);",
    );
    for p in 0..6 {
        ddl.push_str(&format!(
            "CREATE TABLE m_{p} PARTITION OF m FOR VALUES IN ({p});"
        ));
    }
    ddl.push_str("INSERT INTO m SELECT g, g % 6, 'before' FROM generate_series(1, 600) g;");
    let Sides { pair, src, tgt } = Pair::new(15, 18).source(&ddl).await;
    let mut f = pair.follower(&[(
        "HIKKOSHI_FAILPOINT",
        &failpoint::nth(failpoint::COPY_AFTER_CHUNK_COMMIT, 2),
    )]);
    assert!(
        !f.child.wait().unwrap().success(),
        "the failpoint killed the copy"
    );
    let (copied, pending): (i64, i64) = tgt
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'copied'), count(*) FILTER (WHERE state <> 'copied')
             FROM hikkoshi.chunks",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(
        copied >= 2 && pending >= 1,
        "copied {copied}, pending {pending}"
    );
    // rows into every partition between the two snapshots, and after the second
    src.batch_execute(
        "INSERT INTO m SELECT g, g % 6, 'between' FROM generate_series(1000, 1059) g",
    )
    .await
    .unwrap();
    let mut f = pair.follower(&[]);
    src.batch_execute(
        "INSERT INTO m SELECT g, g % 6, 'after' FROM generate_series(2000, 2059) g;
         UPDATE m SET v = v || ' (updated)' WHERE id % 7 = 0;
         DELETE FROM m WHERE id % 11 = 0;",
    )
    .await
    .unwrap();
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("half-copied tree"), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
}
