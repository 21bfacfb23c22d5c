//! `hikkoshi cutover` and `hikkoshi rollback` on real servers: an application role keeps writing through the
//! switch; afterwards the two sides are compared row by row, sequences are checked, and the old primary must
//! refuse the application's writes.

use hikkoshi::failpoint;

use std::path::PathBuf;
use std::time::Duration;

use crate::common::live::*;
use crate::common::scenario::*;
use crate::common::*;
use hikkoshi::demo::app::App;
use hikkoshi::localserver::{LocalServer, PASSWORD, ServerOptions};
use tokio_postgres::Client;

/// The table the application writes through the switch, and the writer role's grants.
const TICKETS: &str = "CREATE TABLE app.tickets (id bigserial PRIMARY KEY, note text NOT NULL,
                                   created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO app.tickets (note) SELECT 'before ' || g FROM generate_series(1, 500) g;
         GRANT USAGE ON SCHEMA app TO app_writer;
         GRANT SELECT, INSERT ON app.tickets TO app_writer;
         GRANT USAGE ON SEQUENCE app.tickets_id_seq TO app_writer;
         GRANT SELECT, INSERT, UPDATE ON app.orders TO app_writer;
         GRANT USAGE ON SEQUENCE app.orders_id_seq TO app_writer;";

/// The app on `pair` with the writer role, a following clone that has caught up after `writes` rounds of
/// the mixed workload during the copy and the stream.
async fn following(pair: Pair, writes: i32) -> Live {
    pair.app()
        .await
        .with_writer(TICKETS)
        .await
        .following_under_workload(writes)
        .await
}

/// A file the application reads to find its database (the "load balancer"), pointing at `server`.
fn switch_file(server: &LocalServer) -> PathBuf {
    let f = std::env::temp_dir().join(format!(
        "hikkoshi-switch-{}-{}",
        std::process::id(),
        server.port
    ));
    std::fs::write(&f, server.port.to_string()).unwrap();
    f
}

#[tokio::test(flavor = "multi_thread")]
async fn cutover_under_live_writes_fences_the_source_and_loses_nothing() {
    let Sides { pair, tgt, .. } = Pair::new(15, 18).app().await.with_writer(TICKETS).await;
    let mut follower = pair.follower(&[]);
    // the application writes through all of it, wherever the switch file points
    let switch = switch_file(&pair.s);
    let writer = App::start(
        format!("host=127.0.0.1 user=app_writer password={PASSWORD} dbname=app"),
        switch.clone(),
        |_| "INSERT INTO app.tickets (note) VALUES ('from the app') RETURNING id".into(),
        Duration::from_millis(2),
    );
    let src = connect(&pair.s.socket_url("app")).await;
    wait_in_sync(&src, &tgt, &mut follower).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let hook = format!(
        "echo \"$HIKKOSHI_NEW_PRIMARY_PORT\" > {} && test \"$PGPORT\" = {} && test \"$HIKKOSHI_STEP\" = cutover",
        switch.display(),
        pair.t.port
    );
    let out = pair.hikkoshi(&["cutover", "--hook", &hook, "--json"]);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["fence_means"]
            .as_str()
            .unwrap()
            .contains("trigger hikkoshi_fence refuses writes"),
        "{report}"
    );
    assert!(report["write_pause_seconds"].as_f64().unwrap() > 0.0);
    assert!(report["sequences_moved"].as_u64().unwrap() >= 5, "{report}");
    assert!(report["tables_verified"].as_u64().unwrap() >= 1, "{report}");
    // the application now writes on the target
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = writer.stop().await;
    eprintln!(
        "cutover report: {report:#}\napplication: {} writes ok, {} failed, longest gap {:?}",
        stats.committed, stats.failed, stats.longest_gap
    );
    assert!(
        stats.committed > 50,
        "the application hardly wrote: {stats:?}"
    );

    // the follower saw the cutover and ended by itself
    let status = follower.exits_by_itself().await;
    assert!(status.success(), "{}", follower.log());

    // every row the source committed is on the target, once; the target has the app's later rows too
    let src = connect(&pair.s.socket_url("app")).await;
    let tgt = connect(&pair.t.socket_url("app")).await;
    assert_no_ticket_lost(&src, &tgt, &stats.ids).await;
    // the other tables are identical (the app only wrote tickets after the switch)
    assert_equal_but_tickets(&pair);
    // every sequence is at or past the source; new inserts on the target take fresh keys
    assert_sequences_at_least(&src, &tgt).await;
    app_can_write(&pair.t).await.unwrap();
    tgt.batch_execute(
        "INSERT INTO app.orders (customer_id, ordered_at, total, invoice_no)
         SELECT customer_id, ordered_at, total, nextval('app.invoice_no') FROM app.orders LIMIT 3",
    )
    .await
    .unwrap();
    // the old source refuses the application's writes
    assert_eq!(app_can_write(&pair.s).await, Err("25006".to_string()));
    assert_eq!(cutover_step(&pair.t).await.as_deref(), Some("switched"));
    // the forward slot is gone; clean leaves nothing behind
    assert!(hikkoshi_slots(&src).await.is_empty());
    assert_success(&pair.hikkoshi(&["clean"]));
    assert!(!has_state(&tgt).await && !has_state(&src).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn cutover_reverse_then_rollback_brings_the_new_primarys_writes_back() {
    let Live {
        pair, f: follower, ..
    } = following(Pair::new(15, 18), 30).await;
    // no follower runs at the cutover: the cutover streams the rest itself
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
    workload(pair.source_url(), 30, 30).await;

    let out = pair.hikkoshi(&["cutover", "--reverse"]);
    assert_success(&out);
    assert!(text(&out).contains("reverse"), "{}", text(&out));
    assert_eq!(app_can_write(&pair.s).await, Err("25006".to_string()));

    // the application writes on the new primary: inserts, updates, deletes, on several tables
    let tgt = connect(&pair.t.socket_url("app")).await;
    app_can_write(&pair.t).await.unwrap();
    tgt.batch_execute(
        "INSERT INTO app.tickets (note) SELECT 'after ' || g FROM generate_series(1, 300) g;
         UPDATE app.tickets SET note = note || ' (edited)' WHERE id % 7 = 0;
         DELETE FROM app.tickets WHERE id % 11 = 0;
         UPDATE app.queries SET doc = doc || '{\"after\": true}' WHERE id <= 3;
         DELETE FROM app.audit_log WHERE ctid = (SELECT ctid FROM app.audit_log LIMIT 1);",
    )
    .await
    .unwrap();
    // DDL on the new primary travels back with the reverse stream (issue 15)
    tgt.batch_execute(
        "ALTER TABLE app.tickets ADD COLUMN channel text NOT NULL DEFAULT 'web';
         UPDATE app.tickets SET channel = 'phone' WHERE id % 5 = 0;
         CREATE INDEX tickets_channel ON app.tickets (channel);",
    )
    .await
    .unwrap();

    let hook_log = std::env::temp_dir().join(format!("hikkoshi-rollback-{}", pair.t.port));
    let out = pair.hikkoshi(&[
        "rollback",
        "--hook",
        &format!(
            "echo \"$HIKKOSHI_STEP $HIKKOSHI_NEW_PRIMARY_PORT\" > {}",
            hook_log.display()
        ),
        "--verify",
        "full",
    ]);
    assert_success(&out);
    assert_eq!(
        std::fs::read_to_string(&hook_log).unwrap().trim(),
        format!("rollback {}", pair.s.port)
    );
    // the old source has everything written on the target, and is the primary again
    let src = connect(&pair.s.socket_url("app")).await;
    let tgt = connect(&pair.t.socket_url("app")).await;
    assert_identical(&src, &tgt).await;
    app_can_write(&pair.s).await.unwrap();
    assert_eq!(app_can_write(&pair.t).await, Err("25006".to_string()));
    assert_eq!(cutover_step(&pair.t).await.as_deref(), Some("rolled-back"));
    // the reverse slot is gone with the rollback; clean removes the rest on both sides
    assert!(hikkoshi_slots(&tgt).await.is_empty());
    let phones: i64 = src
        .query_one(
            "SELECT count(*) FROM app.tickets WHERE channel = 'phone'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        phones > 0,
        "the reverse stream carried no row of the new column"
    );
    assert_success(&pair.hikkoshi(&["clean"]));
    assert!(!has_state(&src).await && !has_state(&tgt).await);
    assert_eq!(
        publication_count(&src).await + publication_count(&tgt).await,
        0
    );
    // nothing of the DDL capture stays on either side
    assert_eq!(event_triggers(&src).await + event_triggers(&tgt).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_hook_undoes_the_fence_and_the_source_stays_primary() {
    let Live {
        pair,
        f: mut follower,
        ..
    } = following(Pair::new(15, 18), 0).await;
    let out = pair.hikkoshi(&["cutover", "--reverse", "--hook", "echo switching; exit 3"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("exit status 3"), "{}", text(&out));
    assert!(text(&out).contains("undone"), "{}", text(&out));
    // the source takes the application's writes again; the follower never stopped and carries them
    app_can_write(&pair.s).await.unwrap();
    assert_eq!(cutover_step(&pair.t).await.as_deref(), Some("aborted"));
    let src = connect(&pair.s.socket_url("app")).await;
    let tgt = connect(&pair.t.socket_url("app")).await;
    assert!(
        hikkoshi_slots(&tgt).await.is_empty(),
        "the reverse slot stayed"
    );
    wait_in_sync(&src, &tgt, &mut follower).await;
    let rows: i64 = tgt
        .query_one("SELECT count(*) FROM app.tickets WHERE note = 'probe'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cutover_killed_after_the_fence_is_finished_by_running_it_again() {
    let Live {
        pair, f: follower, ..
    } = following(Pair::new(15, 18), 20).await;
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
    workload(pair.source_url(), 20, 20).await;

    let out = pair.hikkoshi_env(
        &["cutover"],
        &[("HIKKOSHI_FAILPOINT", failpoint::CUTOVER_FENCED)],
    );
    assert!(!out.status.success(), "the failpoint did not fire");
    // killed while fenced: the source is read-only, and says so to the application
    assert_eq!(app_can_write(&pair.s).await, Err("25006".to_string()));
    assert_eq!(cutover_step(&pair.t).await.as_deref(), Some("fenced"));
    let out = pair.hikkoshi(&["cutover"]);
    assert_success(&out);
    let src = connect(&pair.s.socket_url("app")).await;
    let tgt = connect(&pair.t.socket_url("app")).await;
    assert_identical_rows_and_sequences_at_least(&src, &tgt).await;
    assert_eq!(cutover_step(&pair.t).await.as_deref(), Some("switched"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_of_a_cutover_killed_after_the_fence_lifts_the_fence() {
    let Live {
        pair,
        tgt,
        f: mut follower,
        ..
    } = following(Pair::new(15, 15), 0).await;
    let out = pair.hikkoshi_env(
        &["cutover"],
        &[("HIKKOSHI_FAILPOINT", failpoint::CUTOVER_FENCED)],
    );
    assert!(!out.status.success());
    assert_eq!(app_can_write(&pair.s).await, Err("25006".to_string()));
    let out = pair.hikkoshi(&["rollback"]);
    assert_success(&out);
    assert!(text(&out).contains("undone"), "{}", text(&out));
    app_can_write(&pair.s).await.unwrap();
    // the follower keeps streaming: the probe row reaches the target
    let src = connect(&pair.s.socket_url("app")).await;
    wait_in_sync(&src, &tgt, &mut follower).await;
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cutover_refuses_without_a_stream_and_when_the_fence_cannot_hold() {
    let Sides { pair, src, .. } = Pair::new(15, 18).app().await.with_writer(TICKETS).await;
    // nothing cloned yet
    let out = pair.hikkoshi(&["cutover"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("clone --follow"), "{}", text(&out));
    let tgt = connect(&pair.t.socket_url("app")).await;
    let mut follower = pair.follower(&[]);
    wait_in_sync(&src, &tgt, &mut follower).await;
    // a role whose own setting turns its sessions read-write no longer weakens the fence
    src.batch_execute("ALTER ROLE app_writer SET default_transaction_read_only = off")
        .await
        .unwrap();
    // an application transaction that wrote and stays open: the fence waits for it, then gives up
    let open = connect(&app_url(&pair.s)).await;
    open.batch_execute("BEGIN; INSERT INTO app.tickets (note) VALUES ('open')")
        .await
        .unwrap();
    let out = pair.hikkoshi(&["cutover", "--timeout", "3"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("app_writer"), "{}", text(&out));
    assert!(text(&out).contains("Nothing was fenced"), "{}", text(&out));
    // the open transaction can still commit: nothing was fenced
    open.batch_execute("COMMIT").await.unwrap();
    app_can_write(&pair.s).await.unwrap();
    assert!(
        !fence_triggers_left(&src).await,
        "the fence's triggers stayed"
    );
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
}

/// Whether any of the fence's triggers is still on a table.
async fn fence_triggers_left(c: &Client) -> bool {
    c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'hikkoshi_fence')
                OR to_regnamespace('hikkoshi_fence') IS NOT NULL",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The cutover's own verification, in its two parts (`src/cutover/proof.rs`), under live writes:
/// - a row edited by hand on the target before the cutover differs in the snapshots hashed before the fence;
/// - rows edited, deleted and added by hand on the target after those snapshots (while the cutover is held
///   at `cutover.proved-before-fence`) reach the pause only through the target's key stream, also in a
///   table the stream never changed (which `--verify quick` would otherwise take as copied);
/// each time the cutover stops with exit 1 naming the rows, the fence is lifted and the source stays the
/// primary. Repaired, the cutover goes through, with the first part made before the fence.
#[tokio::test(flavor = "multi_thread")]
async fn differences_found_by_the_cutover_are_named_and_undo_it() {
    let Live {
        pair,
        tgt,
        f: mut follower,
        ..
    } = following(Pair::new(15, 18), 2).await;
    let switch = switch_file(&pair.s);
    let writer = App::start(
        format!("host=127.0.0.1 user=app_writer password={PASSWORD} dbname=app"),
        switch.clone(),
        |_| "INSERT INTO app.tickets (note) VALUES ('from the app') RETURNING id".into(),
        Duration::from_millis(5),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. edited before the cutover: found in the snapshots
    edited_row_stops_the_cutover(&pair, &tgt, &["cutover"]).await;

    // 2. edited, deleted and added after the snapshots: found by the target's key stream
    let mut held = pair.spawn(
        &["cutover"],
        &[
            ("HIKKOSHI_PAUSE", failpoint::CUTOVER_PROVED_BEFORE_FENCE),
            ("HIKKOSHI_PAUSE_SECS", "4"),
        ],
    );
    held.wait_for_log("paused at cutover.proved-before-fence")
        .await;
    tgt.batch_execute(
        "UPDATE app.tickets SET note = 'edited later' WHERE id = 8;
         DELETE FROM app.tickets WHERE id = 9;
         INSERT INTO app.tickets (id, note) VALUES (900000000, 'only on the target');
         UPDATE app.customers SET notes = 'edited on the target' WHERE id = 3",
    )
    .await
    .unwrap();
    let log = held.stops_with_an_error().await;
    for named in [
        "different on the target: (8)",
        "missing on the target: (9)",
        "only on the target: (900000000)",
    ] {
        assert!(log.contains(named), "`{named}` is not reported:\n{log}");
    }
    let customers = log.find("app.customers").map(|i| &log[i..]).unwrap_or("");
    assert!(
        customers.contains("different on the target: (3)"),
        "the customer edited on the target is not reported:\n{log}"
    );
    app_can_write(&pair.s).await.unwrap();
    let src = connect(&pair.s.socket_url("app")).await;
    let row9 = src
        .query_one(
            "SELECT note, created_at::text FROM app.tickets WHERE id = 9",
            &[],
        )
        .await
        .unwrap();
    tgt.execute(
        "INSERT INTO app.tickets (id, note, created_at) VALUES (9, $1, $2::text::timestamptz)",
        &[&row9.get::<_, String>(0), &row9.get::<_, String>(1)],
    )
    .await
    .unwrap();
    tgt.batch_execute(
        "UPDATE app.tickets SET note = 'before 8' WHERE id = 8;
         DELETE FROM app.tickets WHERE id = 900000000",
    )
    .await
    .unwrap();
    let notes: Option<String> = src
        .query_one("SELECT notes FROM app.customers WHERE id = 3", &[])
        .await
        .unwrap()
        .get(0);
    tgt.execute(
        "UPDATE app.customers SET notes = $1 WHERE id = 3",
        &[&notes],
    )
    .await
    .unwrap();

    // 3. repaired: the cutover goes through, and proves most of it before the fence. Between the snapshots
    // and the fence the source changes in every way the stream carries (inserts, updates of TOASTed values,
    // primary-key changes, deletes, rows of a partitioned table, a truncate, quoted names, composite keys):
    // none of it may count as a difference, and afterwards the servers are equal.
    let hook = format!("echo \"$HIKKOSHI_NEW_PRIMARY_PORT\" > {}", switch.display());
    let mut held = pair.spawn(
        &["cutover", "--hook", &hook],
        &[
            ("HIKKOSHI_PAUSE", failpoint::CUTOVER_PROVED_BEFORE_FENCE),
            ("HIKKOSHI_PAUSE_SECS", "4"),
        ],
    );
    held.wait_for_log("paused at cutover.proved-before-fence")
        .await;
    workload(pair.source_url(), 100, 6).await;
    connect(&pair.s.socket_url("app"))
        .await
        .batch_execute(
            "TRUNCATE app.translations;
             INSERT INTO app.translations VALUES ('xx', 1, 'after the truncate');
             UPDATE public.\"Mixed Case\" SET \"Order\" = 5 WHERE \"ID\" = 1;
             UPDATE public.settings SET value = '{\"v\": 2}' WHERE key = (SELECT min(key) FROM public.settings)",
        )
        .await
        .unwrap();
    let status = held.exits_by_itself().await;
    let log = held.log();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("hashed in snapshots before the fence")
            && !log.contains("could not be prepared"),
        "{log}"
    );
    let stats = writer.stop().await;
    assert!(stats.committed > 20, "{stats:?}");
    let status = follower.exits_by_itself().await;
    assert!(status.success(), "{}", follower.log());
    let src = connect(&pair.s.socket_url("app")).await;
    assert!(hikkoshi_slots(&src).await.is_empty());
    assert!(hikkoshi_slots(&tgt).await.is_empty());
    assert_eq!(publication_count(&tgt).await, 0);
    // (the application wrote tickets on the target after the switch)
    assert_equal_but_tickets(&pair);
}

/// Where the first part of the proof cannot be made (here a target without `wal_level = logical`, which
/// cannot stream its own changes), the cutover says so and hashes the tables in the pause, as it did before
/// the proof had two parts: a row edited by hand on the target still stops it; repaired, it goes through.
#[tokio::test(flavor = "multi_thread")]
async fn without_decoding_on_the_target_the_cutover_verifies_in_the_pause() {
    let s = server(15);
    let t = server_with(
        18,
        ServerOptions {
            conf: vec!["wal_level = replica".into()],
            ..Default::default()
        },
    );
    let Live {
        pair,
        tgt,
        f: mut follower,
        ..
    } = following(Pair::of(s, t), 2).await;
    // (full: no table was written while streaming, so quick would have nothing to compare)
    let cutover = ["cutover", "--verify", "full", "--json"];
    let log = edited_row_stops_the_cutover(&pair, &tgt, &cutover).await;
    assert!(
        log.contains("could not be prepared before the fence"),
        "{log}"
    );
    let out = pair.hikkoshi(&cutover);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rows_hashed_before_fence"], 0, "{report:#}");
    assert!(
        report["tables_verified"].as_u64().unwrap() >= 1,
        "{report:#}"
    );
    assert!(
        report["warnings"][0]
            .as_str()
            .unwrap()
            .contains("hashed in the write pause"),
        "{report:#}"
    );
    assert!(
        follower.exits_by_itself().await.success(),
        "{}",
        follower.log()
    );
    assert_eq!(publication_count(&tgt).await, 0);
}

/// Ticket 7 edited by hand on the target makes `cutover` (run with `args`) stop with exit 1 and name it;
/// the source stays the primary; the ticket is then put back. Returns the cutover's output.
async fn edited_row_stops_the_cutover(pair: &Pair, tgt: &Client, args: &[&str]) -> String {
    tgt.batch_execute("UPDATE app.tickets SET note = 'edited on the target' WHERE id = 7")
        .await
        .unwrap();
    let out = pair.hikkoshi(args);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("different on the target: (7)"),
        "the edited row is not named:\n{log}"
    );
    app_can_write(&pair.s).await.unwrap();
    assert_eq!(cutover_step(&pair.t).await.as_deref(), Some("aborted"));
    tgt.batch_execute("UPDATE app.tickets SET note = 'before 7' WHERE id = 7")
        .await
        .unwrap();
    log
}

/// Rows identical, sequences on the target at or past the source (a cutover moves them to the source's
/// position; the target may have handed out more since).
async fn assert_identical_rows_and_sequences_at_least(src: &Client, tgt: &Client) {
    assert_same_rows_and_schema(src, tgt).await;
    assert_sequences_at_least(src, tgt).await;
}

/// A file the application reads to find its database, under its own name (several applications in one
/// test), pointing at `server`.
fn named_switch_file(server: &LocalServer, name: &str) -> PathBuf {
    let f = std::env::temp_dir().join(format!(
        "hikkoshi-switch-{}-{}-{name}",
        std::process::id(),
        server.port
    ));
    std::fs::write(&f, server.port.to_string()).unwrap();
    f
}

/// An application session that turns itself read-write before every transaction, as drivers and pools do
/// when the application marks work as read-write, and reconnects after any error.
fn read_write_app(user: &str, switch: PathBuf) -> App {
    App::start(
        format!("host=127.0.0.1 user={user} password={PASSWORD} dbname=app"),
        switch,
        |_| {
            "SET default_transaction_read_only = off;
             SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE;
             BEGIN READ WRITE;
             INSERT INTO app.tickets (note) VALUES ('read-write') RETURNING id;
             COMMIT"
                .into()
        },
        Duration::from_millis(2),
    )
}

/// Every ticket on the old primary is on the new one, and so is every ticket the application was told was
/// committed, wherever it wrote it; no id was handed out twice.
async fn assert_no_ticket_lost(old: &Client, new: &Client, acknowledged: &[i64]) {
    let (on_old, on_new) = (ticket_ids(old).await, ticket_ids(new).await);
    for id in &on_old {
        assert!(
            on_new.binary_search(id).is_ok(),
            "ticket {id} is on the old primary only"
        );
    }
    let mut acked = acknowledged.to_vec();
    acked.sort();
    acked.dedup();
    assert_eq!(
        acked.len(),
        acknowledged.len(),
        "an id was handed out twice"
    );
    for id in &acked {
        assert!(
            on_new.binary_search(id).is_ok(),
            "ticket {id} acknowledged but not on the new primary"
        );
    }
}

/// `hikkoshi verify` finds every table but app.tickets (which the application writes after the switch) equal.
fn assert_equal_but_tickets(pair: &Pair) {
    assert_success(&pair.hikkoshi(&["verify", "--exclude", "app.tickets"]));
}

async fn ticket_ids(c: &Client) -> Vec<i64> {
    c.query("SELECT id FROM app.tickets ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Errors the application got from the fence: SQLSTATE 25006, naming the new primary.
fn assert_fence_named(errors: &[String], new_primary: &LocalServer) {
    let wanted = format!("127.0.0.1:{}/app", new_primary.port);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("25006") && e.contains(&wanted)),
        "no fence error naming {wanted}: {errors:?}"
    );
}

/// Drivers and pools that turn their sessions read-write (`SET default_transaction_read_only = off`,
/// `SET SESSION CHARACTERISTICS … READ WRITE`, `BEGIN READ WRITE`) and reconnect after being ended keep
/// writing through the cutover: none of their commits may stay on the old primary only, and the errors they
/// get name the new primary. A session that only calls `nextval` on the old primary, before and after the
/// fence, does not make the fenced verification fail, and the new primary hands out fresh keys.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_that_turn_themselves_read_write_cannot_write_past_the_fence() {
    let Live {
        pair,
        f: mut follower,
        ..
    } = following(Pair::new(15, 18), 0).await;
    let switch = named_switch_file(&pair.s, "rw");
    let writer = read_write_app("app_writer", switch.clone());
    let numbers = App::start(
        format!("host=127.0.0.1 user=app_writer password={PASSWORD} dbname=app"),
        named_switch_file(&pair.s, "nextval"),
        |_| "SELECT nextval('app.tickets_id_seq')".into(),
        Duration::from_millis(1),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = pair.hikkoshi(&[
        "cutover",
        "--hook",
        &format!("echo {} > {}", pair.t.port, switch.display()),
        "--json",
    ]);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stats, taken) = (writer.stop().await, numbers.stop().await);
    eprintln!(
        "{report:#}
read-write app: {stats:?}"
    );
    assert!(
        stats.committed > 50,
        "the application hardly wrote: {stats:?}"
    );
    assert!(taken.committed > 50, "nextval hardly ran: {taken:?}");
    assert!(
        report["tables_fenced"].as_u64().unwrap() >= 10,
        "{report:#}"
    );
    assert!(
        follower.exits_by_itself().await.success(),
        "the follower did not end"
    );
    // (the fence ended every other session, these tests' own too)
    let src = connect(&pair.s.socket_url("app")).await;
    let tgt = connect(&pair.t.socket_url("app")).await;
    assert_no_ticket_lost(&src, &tgt, &stats.ids).await;
    // the old primary still refuses, also a session that says it is read-write, also the tables' owner
    assert_eq!(app_can_write(&pair.s).await, Err("25006".to_string()));
    let owner = src
        .batch_execute(
            "SET default_transaction_read_only = off; BEGIN READ WRITE;
             UPDATE app.orders SET total = total + 1; COMMIT",
        )
        .await
        .unwrap_err();
    assert_eq!(owner.code().unwrap().code(), "25006", "{owner}");
    src.batch_execute("ROLLBACK").await.unwrap();
    let mut both = stats.errors.clone();
    both.push(owner.as_db_error().unwrap().message().to_string());
    assert_fence_named(&both, &pair.t);
    assert!(
        src.batch_execute("TRUNCATE app.tickets").await.is_err(),
        "TRUNCATE passed the fence"
    );
    let copier = connect(&pair.s.socket_url("app")).await;
    let copied = async {
        use futures_util::SinkExt;
        let sink = copier
            .copy_in::<_, bytes::Bytes>("COPY app.tickets (note) FROM STDIN")
            .await?;
        let mut sink = Box::pin(sink);
        sink.send(bytes::Bytes::from_static(b"copied past the fence\n"))
            .await?;
        sink.as_mut().finish().await
    }
    .await;
    let copy_error = copied.expect_err("COPY FROM passed the fence");
    assert_eq!(
        copy_error.code().map(|c| c.code()),
        Some("25006"),
        "{copy_error}"
    );
    // the new primary's sequence is past every key the old one stored, and past what it handed out
    // before the hooks
    let top: i64 = tgt
        .query_one("SELECT last_value FROM app.tickets_id_seq", &[])
        .await
        .unwrap()
        .get(0);
    assert!(top >= *ticket_ids(&src).await.last().unwrap());
    tgt.batch_execute("INSERT INTO app.tickets (note) VALUES ('on the new primary')")
        .await
        .unwrap();
    assert_equal_but_tickets(&pair);
    // clean lifts the fence, and says so
    let out = pair.hikkoshi(&["clean"]);
    assert_success(&out);
    assert!(
        text(&out).contains("lifted the cutover's write fence on the source"),
        "{}",
        text(&out)
    );
    assert!(!fence_triggers_left(&src).await);
    app_can_write(&pair.s).await.unwrap();
}

/// The managed-server shape (RDS, Neon) on both sides: the source's migrating role owns the database and
/// its tables and has REPLICATION; the target's admin has CREATEDB and REPLICATION and may set
/// session_replication_role; neither is superuser nor a member of pg_signal_backend, so neither can end the
/// application's sessions. `check` and the cutover say so, with the grant; the cutover still succeeds while
/// the application (another role, turning itself read-write) writes, because the fence refuses its writes.
/// The rollback fences the new primary the same way and brings everything back; the reverse stream, which
/// this role cannot run as a replica session, passes the old primary's fence as hikkoshi's own. A table
/// the role may not put a trigger on stops the cutover before anything is fenced.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_role_without_superuser_or_pg_signal_backend_cuts_over_and_rolls_back() {
    let s = server(15);
    let t = server(18);
    let (source, src) = managed_source(&s).await;
    let target = managed_target(&t).await;
    src.batch_execute(TICKETS).await.unwrap();
    let check = hikkoshi(&["check", "--source", &source, "--target", &target]);
    assert!(
        text(&check).contains("GRANT pg_signal_backend TO \"migrator\""),
        "{}",
        text(&check)
    );
    let tgt = connect(&target).await;
    let mut follower = Follower::start_between(&source, &target, &[], &[]);
    wait_in_sync(&src, &tgt, &mut follower).await;
    // The roles came along (issue 14): the owner and the application's role, with its grants; the
    // application's password cannot be read on a source without superuser, so its role cannot log in yet.
    let owners = owners_and_grants(&src).await;
    assert_eq!(owners, owners_and_grants(&tgt).await);
    assert!(
        owners
            .iter()
            .any(|o| o.contains("app.tickets owner migrator")),
        "{owners:?}"
    );
    assert!(
        owners
            .iter()
            .any(|o| o
                .contains("app.tickets owner migrator grants app_writer=INSERT,app_writer=SELECT")),
        "{owners:?}"
    );
    let can_log_in: bool = tgt
        .query_one(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'app_writer'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!can_log_in);
    let out = hikkoshi(&["cutover", "--source", &source, "--target", &target]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("app_writer") && text(&out).contains("--role-password"),
        "{}",
        text(&out)
    );
    app_can_write(&s).await.unwrap();
    // the follower again, with the passwords (the owner logs in too): the roles log in on the target with
    // their old passwords
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
    let mut follower = Follower::start_between(
        &source,
        &target,
        &[
            "--role-password",
            "app_writer=env:APP_WRITER_PASSWORD",
            "--role-password",
            "migrator=env:APP_WRITER_PASSWORD",
        ],
        &[("APP_WRITER_PASSWORD", PASSWORD)],
    );
    wait_in_sync(&src, &tgt, &mut follower).await;
    assert!(!follower.log().contains(PASSWORD), "{}", follower.log());

    // a table without the trigger right: refused before anything is fenced
    src.batch_execute("REVOKE TRIGGER ON app.tickets FROM migrator")
        .await
        .unwrap();
    let out = hikkoshi(&["cutover", "--source", &source, "--target", &target]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("app.tickets"), "{}", text(&out));
    assert!(text(&out).contains("GRANT TRIGGER"), "{}", text(&out));
    app_can_write(&s).await.unwrap();
    src.batch_execute("GRANT TRIGGER ON app.tickets TO migrator")
        .await
        .unwrap();

    let switch = named_switch_file(&s, "managed");
    let writer = read_write_app("app_writer", switch.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = hikkoshi(&[
        "cutover",
        "--source",
        &source,
        "--target",
        &target,
        "--reverse",
        "--hook",
        &format!("echo {} > {}", t.port, switch.display()),
    ]);
    assert_success(&out);
    assert!(
        text(&out).contains("GRANT pg_signal_backend TO \"migrator\""),
        "{}",
        text(&out)
    );
    // neither side's role may create event triggers: the report says DDL will not travel back
    assert!(
        text(&out).contains("the reverse stream does not carry DDL"),
        "{}",
        text(&out)
    );
    assert!(
        !text(&out).contains("NOTICE"),
        "expected notices reached the output:\n{}",
        text(&out)
    );
    // the application writes on the new primary for a while, then the rollback brings it back
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = hikkoshi(&[
        "rollback",
        "--source",
        &source,
        "--target",
        &target,
        "--hook",
        &format!("echo {} > {}", s.port, switch.display()),
    ]);
    assert_success(&out);
    assert!(
        text(&out).contains("GRANT pg_signal_backend TO \"tadmin\""),
        "{}",
        text(&out)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = writer.stop().await;
    eprintln!("application: {stats:?}");
    assert!(
        stats.committed > 100,
        "the application hardly wrote: {stats:?}"
    );
    assert_fence_named(&stats.errors, &t);
    assert_fence_named(&stats.errors, &s);
    let src = connect(&s.socket_url("app")).await;
    let tgt = connect(&t.socket_url("app")).await;
    // the source is the primary again and has everything; the target refuses writes
    assert_no_ticket_lost(&tgt, &src, &stats.ids).await;
    assert_eq!(app_can_write(&t).await, Err("25006".to_string()));
    app_can_write(&s).await.unwrap();
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
}

/// Issue #15's report, where DDL is not captured (the source's role may not create event triggers): a column
/// added on the source during the follow, with no row of its table changed since, leaves every row equal and
/// is in no stream. `check` and the clone say DDL will not travel; `verify` names the change, and no cutover
/// passes it, whatever `--verify`; once the target has the same column, the cutover goes through.
#[tokio::test(flavor = "multi_thread")]
async fn without_ddl_capture_a_schema_change_stops_every_cutover() {
    let pair = Pair::new(15, 18);
    let (source, src) = managed_source(&pair.s).await;
    let t_admin = connect(&pair.t.socket_url("postgres")).await;
    t_admin
        .batch_execute(&format!(
            "CREATE ROLE app_writer LOGIN PASSWORD '{PASSWORD}'"
        ))
        .await
        .unwrap();
    t_admin.batch_execute("CREATE DATABASE app").await.unwrap();
    src.batch_execute(TICKETS).await.unwrap();
    let check = hikkoshi(&["check", "--source", &source, "--target", &pair.target_url()]);
    assert!(
        text(&check).contains("DDL on the source is not captured"),
        "{}",
        text(&check)
    );
    let tgt = connect(&pair.t.socket_url("app")).await;
    let mut follower = Follower::start_between(&source, &pair.target_url(), &["--no-roles"], &[]);
    wait_in_sync(&src, &tgt, &mut follower).await;
    assert_eq!(event_triggers(&src).await, 0, "a capture was installed");
    src.batch_execute(
        "ALTER TABLE app.customers ADD COLUMN tier text NOT NULL DEFAULT 'basic';
         CREATE INDEX customers_tier ON app.customers (tier);
         ALTER TABLE app.categories ALTER COLUMN name TYPE varchar(200);",
    )
    .await
    .unwrap();
    pair.verify_finds(&[
        "column tier (text NOT NULL DEFAULT 'basic'::text) is on the source only",
        "index customers_tier",
        // the rows are still compared, on the columns both sides have
        "app.customers ",
        "column name is character varying(200) NOT NULL on the source, text NOT NULL on the target",
    ]);
    for verify in ["none", "quick", "full"] {
        let out = pair.hikkoshi(&["cutover", "--verify", verify]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "--verify {verify}: {said}");
        assert!(
            said.contains("schema differs")
                && said.contains("column tier")
                && said.contains("nothing was fenced"),
            "--verify {verify}: {said}"
        );
        app_can_write(&pair.s).await.unwrap();
        assert!(
            !fence_triggers_left(&src).await,
            "the fence's triggers stayed"
        );
    }
    // the same DDL on the target: nothing differs any more, and the switch goes through
    tgt.batch_execute(
        "ALTER TABLE app.customers ADD COLUMN tier text NOT NULL DEFAULT 'basic';
         CREATE INDEX customers_tier ON app.customers (tier);
         ALTER TABLE app.categories ALTER COLUMN name TYPE varchar(200);",
    )
    .await
    .unwrap();
    let out = pair.hikkoshi(&["cutover"]);
    assert!(out.status.success(), "{}", text(&out));
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
    // the fence ended the old primary's other sessions, this one too
    let src = connect(&pair.s.socket_url("app")).await;
    // --no-roles left the grants behind (the source's role could not read passwords): the same on both
    tgt.batch_execute(&TICKETS[TICKETS.find("GRANT").unwrap()..])
        .await
        .unwrap();
    assert_identical_rows_and_sequences_at_least(&src, &tgt).await;
}

/// Each selected table's owner and the privileges granted to other roles (`schema.table owner role grants
/// grantee=PRIVILEGE,...`; the owner's own implicit privileges differ between versions), to compare servers.
async fn owners_and_grants(c: &Client) -> Vec<String> {
    c.query(
        "SELECT format('%s.%s owner %s grants %s', n.nspname, c.relname, pg_get_userbyid(c.relowner),
                       coalesce((SELECT string_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                        ELSE pg_get_userbyid(a.grantee) END
                                                   || '=' || a.privilege_type, ',' ORDER BY 1)
                                 FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner), '-'))
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'app' AND c.relkind IN ('r', 'p', 'S', 'v') ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}
