//! Issue 23: every way around the cutover's fence that lost writes, each ending with the two sides compared
//! row by row and schema by schema after a cutover that exits 0: a deploy (CREATE, INSERT, ALTER) during the
//! switch, a subscription that feeds the source, an application role that sets the old fence's pass, and a
//! table owner who disables the fence's trigger (or a superuser who writes as a replica session).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::live::wait_in_sync;
use crate::common::scenario::*;
use crate::common::*;

const TICKETS: &str = "CREATE TABLE app.tickets (id bigserial PRIMARY KEY, note text NOT NULL);
     INSERT INTO app.tickets (note) SELECT 'before ' || g FROM generate_series(1, 200) g;
     GRANT USAGE ON SCHEMA app TO app_writer;
     GRANT SELECT, INSERT ON app.tickets TO app_writer;
     GRANT USAGE ON SEQUENCE app.tickets_id_seq TO app_writer;";

/// The SQLSTATE of an error (empty when there is none).
fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// A deploy that loops until stopped, each round in its own transaction: a new table with a row, and a
/// column added to the previous round's table. Counts the rounds that committed.
fn deploy(url: String) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(u32, Vec<String>)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = tokio::spawn(async move {
        let c = connect(&url).await;
        let mut committed = 0;
        let mut errors = Vec::new();
        let mut n = 0;
        while !flag.load(Ordering::Relaxed) {
            n += 1;
            let alter = if committed > 0 {
                format!(
                    "ALTER TABLE app.deploy_{} ADD COLUMN extra_{n} int DEFAULT {n};",
                    committed - 1
                )
            } else {
                String::new()
            };
            let sql = format!(
                "BEGIN;
                 CREATE TABLE app.deploy_{committed} (id int PRIMARY KEY, note text);
                 INSERT INTO app.deploy_{committed} VALUES (1, 'round {n}');
                 {alter}
                 COMMIT;"
            );
            match c.batch_execute(&sql).await {
                Ok(()) => committed += 1,
                Err(e) => {
                    let _ = c.batch_execute("ROLLBACK").await;
                    errors.push(format!(
                        "{} {}",
                        code(&e),
                        e.as_db_error().map(|d| d.message()).unwrap_or("")
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (committed, errors)
    });
    (stop, handle)
}

/// A deploy that creates tables, fills them and adds columns all through the switch: what committed on the
/// old primary before the DDL fence reached the new one with the stream, what came after was refused (by
/// name of the switch), and a DROP TABLE after the switch is refused too. The two sides end identical.
#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_during_the_switch_is_refused_at_the_fence_and_loses_nothing() {
    let Live { pair, src, tgt, f } = Pair::new(15, 18)
        .app()
        .await
        .with_writer(TICKETS)
        .await
        .following()
        .await;
    let (stop, deploying) = deploy(pair.s.socket_url("app"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = pair.hikkoshi(&["cutover", "--json"]);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (committed, errors) = deploying.await.unwrap();
    assert!(
        committed > 3,
        "the deploy hardly ran: {committed} {errors:?}"
    );
    assert!(
        report["ddl_fence"]
            .as_str()
            .unwrap()
            .contains("refuse CREATE, ALTER and DROP"),
        "{report:#}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("25006") && e.contains("refuses schema changes")),
        "the deploy was never refused by the fence: {errors:?}"
    );
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    // no PostgreSQL NOTICE reaches hikkoshi's output ("… already exists, skipping")
    for said in [text(&out), log] {
        assert!(
            !said.contains("NOTICE") && !said.contains("skipping"),
            "{said}"
        );
    }
    // the fence ended the old primary's sessions: fresh ones
    let src = {
        drop(src);
        connect(&pair.s.socket_url("app")).await
    };
    let drop_after = src
        .batch_execute("DROP TABLE app.deploy_0")
        .await
        .unwrap_err();
    assert_eq!(code(&drop_after), "25006", "{drop_after}");
    // temporary tables stay allowed (an application's reads use them)
    src.batch_execute("CREATE TEMP TABLE scratch (x int); DROP TABLE scratch")
        .await
        .unwrap();
    assert_same_rows_and_schema(&src, &tgt).await;
}

/// A feed from another database (a logical replication subscription into the source): its apply worker
/// fires no statement trigger, so the cutover disables the subscription before the pause and names it
/// with how to move it. Moved to the new primary on its own slot as the report says, the feed loses and
/// doubles nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_into_the_source_is_stopped_by_the_switch_and_its_feed_goes_on_on_the_new_primary()
 {
    let pair = Pair::new(15, 18);
    let admin = connect(&pair.s.socket_url("postgres")).await;
    admin.batch_execute("CREATE DATABASE feed").await.unwrap();
    let feed = connect(&pair.s.socket_url("feed")).await;
    feed.batch_execute(
        "CREATE TABLE feed_rows (id bigserial PRIMARY KEY, note text NOT NULL);
         CREATE PUBLICATION feedpub FOR TABLE feed_rows;",
    )
    .await
    .unwrap();
    feed.batch_execute("SELECT pg_create_logical_replication_slot('feedsub', 'pgoutput')")
        .await
        .unwrap();
    let Sides { pair, src, tgt } = pair.app().await.with_writer(TICKETS).await;
    src.batch_execute(&format!(
        "CREATE TABLE public.feed_rows (id bigint PRIMARY KEY, note text NOT NULL);
         CREATE SUBSCRIPTION feedsub CONNECTION '{}' PUBLICATION feedpub
             WITH (create_slot = false, slot_name = 'feedsub', copy_data = false);",
        pair.s.url("feed")
    ))
    .await
    .unwrap();
    let check = pair.hikkoshi(&["check"]);
    assert!(text(&check).contains("feedsub"), "{}", text(&check));
    let mut f = pair.follower(&[]);
    // the feed writes all through the switch
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let feeding = tokio::spawn(async move {
        let mut n = 0;
        while !flag.load(Ordering::Relaxed) {
            feed.batch_execute("INSERT INTO feed_rows (note) VALUES ('fed')")
                .await
                .unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (feed, n)
    });
    wait_in_sync(&src, &tgt, &mut f).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = pair.hikkoshi(&["cutover", "--json"]);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let moved = report["subscriptions_disabled"].to_string();
    assert!(
        moved.contains("feedsub") && moved.contains("create_slot = false"),
        "{report:#}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (feed, fed) = feeding.await.unwrap();
    assert!(fed > 50, "the feed hardly wrote: {fed}");
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    let src = connect(&pair.s.socket_url("app")).await;
    // nothing landed on the old primary after the switch
    assert_eq!(
        rows_of(&src, "public.feed_rows").await,
        rows_of(&tgt, "public.feed_rows").await
    );
    // the old primary refuses to re-enable it (DDL is fenced)
    let e = src
        .batch_execute("ALTER SUBSCRIPTION feedsub ENABLE")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25006", "{e}");
    // the move the report gives, from where the feed stopped on the old primary
    let advance = moved
        .split("pg_replication_origin_advance(")
        .nth(1)
        .and_then(|rest| rest.split(')').find(|part| part.contains(", '")))
        .and_then(|part| part.rsplit('\'').nth(1))
        .expect("the position to start from")
        .to_string();
    assert!(advance.contains('/'), "{advance}: {moved}");
    tgt.batch_execute(&format!(
        "CREATE SUBSCRIPTION feedsub CONNECTION '{}' PUBLICATION feedpub
             WITH (create_slot = false, slot_name = 'feedsub', copy_data = false, enabled = false);
         SELECT pg_replication_origin_advance('pg_' || (SELECT oid FROM pg_subscription
                                                         WHERE subname = 'feedsub'), '{advance}');
         ALTER SUBSCRIPTION feedsub ENABLE;",
        pair.s.url("feed")
    ))
    .await
    .unwrap();
    let all: i64 = feed
        .query_one("SELECT count(*) FROM feed_rows", &[])
        .await
        .unwrap()
        .get(0);
    let mut arrived = 0;
    for _ in 0..600 {
        arrived = tgt
            .query_one("SELECT count(*) FROM public.feed_rows", &[])
            .await
            .unwrap()
            .get(0);
        if arrived == all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(arrived, all, "the feed did not reach the new primary");
    assert_eq!(
        rows_of(&feed, "public.feed_rows").await,
        rows_of(&tgt, "public.feed_rows").await
    );
    tgt.batch_execute("DROP SUBSCRIPTION feedsub")
        .await
        .unwrap();
    assert_success(&pair.hikkoshi(&["clean"]));
    let src = connect(&pair.s.socket_url("app")).await;
    src.batch_execute(
        "ALTER SUBSCRIPTION feedsub SET (slot_name = NONE); DROP SUBSCRIPTION feedsub",
    )
    .await
    .unwrap();
}

/// Nobody but hikkoshi passes the fence: an application role that sets `hikkoshi.fence_pass` (to the
/// migration's name, which the fence's error prints, or to anything) is refused; it cannot read what
/// would let it pass. A table's owner cannot take the fence off its table (`DISABLE TRIGGER`), and a
/// superuser writing as a replica session is refused too. A rollback still brings the new primary's writes
/// back through the fence, as hikkoshi's own.
#[tokio::test(flavor = "multi_thread")]
async fn only_hikkoshi_passes_the_fence_not_the_owner_nor_a_replica_session_nor_a_guessed_pass() {
    let Live { pair, src, tgt, f } = Pair::new(15, 18)
        .app()
        .await
        .with_writer(&format!(
            "{TICKETS}
             CREATE TABLE app.owned (id int PRIMARY KEY, note text);
             INSERT INTO app.owned VALUES (1, 'before');
             ALTER TABLE app.owned OWNER TO app_writer;"
        ))
        .await
        .following()
        .await;
    let out = pair.hikkoshi(&["cutover", "--reverse"]);
    assert_success(&out);
    drop(src);
    let app = connect(&app_url(&pair.s)).await;
    let refused = app
        .batch_execute("INSERT INTO app.tickets (note) VALUES ('no pass')")
        .await
        .unwrap_err();
    let said = refused.as_db_error().unwrap().message().to_string();
    let migration: String = tgt
        .query_one("SELECT id FROM hikkoshi.migration", &[])
        .await
        .unwrap()
        .get(0);
    assert!(said.contains(&migration), "{said}");
    for guess in [
        format!("hikkoshi_{migration}"),
        migration.clone(),
        "hikkoshi".to_string(),
    ] {
        app.batch_execute(&format!("SET hikkoshi.fence_pass = '{guess}'"))
            .await
            .unwrap();
        let e = app
            .batch_execute("INSERT INTO app.tickets (note) VALUES ('guessed')")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "25006", "{guess}: {e}");
    }
    let unreadable = app
        .batch_execute("SELECT * FROM hikkoshi_fence.pass")
        .await
        .unwrap_err();
    assert_eq!(code(&unreadable), "42501", "{unreadable}");
    // the owner of app.owned
    let disable = app
        .batch_execute("ALTER TABLE app.owned DISABLE TRIGGER ALL")
        .await
        .unwrap_err();
    assert_eq!(code(&disable), "25006", "{disable}");
    let e = app
        .batch_execute("INSERT INTO app.owned VALUES (2, 'owner')")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25006", "{e}");
    // a superuser as a replica session
    let su = connect(&pair.s.socket_url("app")).await;
    let e = su
        .batch_execute(
            "SET session_replication_role = replica; INSERT INTO app.owned VALUES (3, 'replica')",
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25006", "{e}");
    // the way back still works: the reverse stream passes as hikkoshi's own
    let new_app = connect(&app_url(&pair.t)).await;
    new_app
        .batch_execute("INSERT INTO app.tickets (note) VALUES ('on the new primary')")
        .await
        .unwrap();
    let out = pair.hikkoshi(&["rollback"]);
    assert_success(&out);
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    let src = connect(&pair.s.socket_url("app")).await;
    let tgt = connect(&pair.t.socket_url("app")).await;
    assert!(
        rows_of(&src, "app.tickets")
            .await
            .iter()
            .any(|r| r.contains("on the new primary")),
        "the new primary's write did not come back"
    );
    assert_same_rows_and_schema(&src, &tgt).await;
    // the source is the primary again, for its application and its owners
    app_can_write(&pair.s).await.unwrap();
}

/// A prepared transaction belongs to no session: it could commit after the fence, and no pid can be
/// ended. The cutover refuses before anything is fenced, naming it by its gid with the way out; once it is
/// resolved, the switch goes through.
#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_transaction_is_named_by_its_gid_and_the_cutover_waits_for_it_to_be_resolved() {
    let pair = Pair::of(
        server_with(
            15,
            hikkoshi::localserver::ServerOptions {
                conf: vec!["max_prepared_transactions = 5".into()],
                ..Default::default()
            },
        ),
        server(18),
    );
    let Live { pair, src, tgt, f } = pair
        .app()
        .await
        .with_writer(TICKETS)
        .await
        .following()
        .await;
    src.batch_execute(
        "BEGIN; INSERT INTO app.tickets (note) VALUES ('in doubt'); PREPARE TRANSACTION 'payment-42'",
    )
    .await
    .unwrap();
    let out = pair.hikkoshi(&["cutover"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("'payment-42'") && said.contains("COMMIT PREPARED"),
        "{said}"
    );
    app_can_write(&pair.s).await.unwrap();
    src.batch_execute("COMMIT PREPARED 'payment-42'")
        .await
        .unwrap();
    let out = pair.hikkoshi(&["cutover"]);
    assert_success(&out);
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    let src = connect(&pair.s.socket_url("app")).await;
    assert!(
        rows_of(&tgt, "app.tickets")
            .await
            .iter()
            .any(|r| r.contains("in doubt")),
        "the prepared transaction's row did not reach the new primary"
    );
    assert_same_rows_and_schema(&src, &tgt).await;
}
