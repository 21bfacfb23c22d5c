//! A switch the application does not see (issue 24): the application connects only through PgBouncer
//! (transaction pooling) and writes about 1 000 transactions a second; `cutover --pgbouncer` and `rollback
//! --pgbouncer` PAUSE it just before the fence, the shipped hook (`deploy/pgbouncer/repoint.sh`) repoints
//! it, hikkoshi RELOADs and RESUMEs it. The application sees no error; its longest wait is reported next to
//! hikkoshi's pause. A failure after the PAUSE ends with PgBouncer resumed towards the old primary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::pgbouncer::Bouncer;
use crate::common::scenario::*;
use crate::common::*;

const TICKETS: &str = "CREATE TABLE app.tickets (id bigserial PRIMARY KEY, note text NOT NULL);
     INSERT INTO app.tickets (note) SELECT 'before ' || g FROM generate_series(1, 100) g;
     GRANT USAGE ON SCHEMA app TO app_writer;
     GRANT SELECT, INSERT ON app.tickets TO app_writer;
     GRANT USAGE ON SEQUENCE app.tickets_id_seq TO app_writer;";

/// What the application saw.
#[derive(Debug, Default)]
struct Seen {
    committed: Vec<i64>,
    errors: Vec<String>,
    longest_wait: Duration,
}

/// `clients` sessions through the pooler, each inserting a ticket every `clients` ms (about 1 000
/// transactions a second in all), each insert its own transaction; an error is recorded, never retried.
struct App {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
}

impl App {
    async fn start(url: &str, clients: u32) -> App {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for k in 0..clients {
            let (stop, client) = (stop.clone(), connect(url).await);
            tasks.push(tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut tick = tokio::time::interval(Duration::from_millis(clients as u64));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    i += 1;
                    let started = Instant::now();
                    // simple query: transaction pooling keeps no prepared statement
                    match client
                        .simple_query(&format!(
                            "INSERT INTO app.tickets (note) VALUES ('app {k} {i}') RETURNING id"
                        ))
                        .await
                    {
                        Ok(messages) => {
                            for m in messages {
                                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                                    seen.committed.push(r.get(0).unwrap().parse().unwrap());
                                }
                            }
                        }
                        Err(e) => seen.errors.push(hikkoshi::error::chain(&e)),
                    }
                    seen.longest_wait = seen.longest_wait.max(started.elapsed());
                }
                seen
            }));
        }
        App { stop, tasks }
    }

    async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Seen::default();
        for t in self.tasks {
            let s = t.await.unwrap();
            all.committed.extend(s.committed);
            all.errors.extend(s.errors);
            all.longest_wait = all.longest_wait.max(s.longest_wait);
        }
        all
    }
}

fn repoint_hook(b: &Bouncer) -> String {
    format!(
        "{}/deploy/pgbouncer/repoint.sh {} app",
        env!("CARGO_MANIFEST_DIR"),
        b.include_file().display()
    )
}

/// The pause the clients saw, from the report.
fn pooler_pause(out: &std::process::Output) -> f64 {
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["pooler_pause_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no pooler pause in the report: {report:#}"))
}

/// Every ticket the application was told is committed is on `primary`, once.
async fn assert_every_ticket_on(primary: &tokio_postgres::Client, ids: &[i64]) {
    let found: i64 = primary
        .query_one(
            "SELECT count(*) FROM app.tickets WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, ids.len() as i64, "committed tickets are missing");
}

#[tokio::test(flavor = "multi_thread")]
async fn through_pgbouncer_the_application_sees_no_error_during_cutover_and_rollback() {
    let Live { pair, f, .. } = Pair::new(15, 18)
        .app()
        .await
        .with_writer(TICKETS)
        .await
        .following()
        .await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    let bouncer = Bouncer::start(&pair.s);
    let check = pair.hikkoshi(&["check", "--pgbouncer", &bouncer.admin_url()]);
    assert!(
        text(&check).contains(&format!(
            "the cutover pauses PgBouncer 127.0.0.1:{} (app)",
            bouncer.port
        )),
        "{}",
        text(&check)
    );
    let app = App::start(&bouncer.app_url(), 4).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let out = pair.hikkoshi(&[
        "cutover",
        "--reverse",
        "--json",
        "--pgbouncer",
        &bouncer.admin_url(),
        "--hook",
        &repoint_hook(&bouncer),
    ]);
    assert_success(&out);
    let cutover_pause = pooler_pause(&out);
    let include = std::fs::read_to_string(bouncer.include_file()).unwrap();
    assert!(
        include.contains(&format!("port={}", pair.t.port)),
        "{include}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = pair.hikkoshi(&[
        "rollback",
        "--json",
        "--pgbouncer",
        &bouncer.admin_url(),
        "--hook",
        &repoint_hook(&bouncer),
    ]);
    assert_success(&out);
    let rollback_pause = pooler_pause(&out);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let seen = app.stop().await;
    eprintln!(
        "application: {} transactions, {} errors, longest wait {:.3}s; pooler paused {cutover_pause:.3}s \
         (cutover) and {rollback_pause:.3}s (rollback)",
        seen.committed.len(),
        seen.errors.len(),
        seen.longest_wait.as_secs_f64()
    );
    assert!(
        seen.errors.is_empty(),
        "the application saw errors: {:?}",
        &seen.errors[..seen.errors.len().min(5)]
    );
    assert!(
        seen.committed.len() > 1000,
        "the application hardly wrote: {}",
        seen.committed.len()
    );
    // written on both sides in turn (the switches ended the sessions they found: new ones), and every
    // committed ticket on the old primary again, once (the key); what was written after the rollback is
    // there only, as no stream runs forward any more
    let src = connect(&pair.s.socket_url("app")).await;
    let tgt = connect(&pair.t.socket_url("app")).await;
    let on_target: i64 = tgt
        .query_one(
            "SELECT count(*) FROM app.tickets WHERE note LIKE 'app %' AND id = ANY($1)",
            &[&seen.committed],
        )
        .await
        .unwrap()
        .get(0);
    assert!(on_target > 0);
    assert_every_ticket_on(&src, &seen.committed).await;
    app_can_write(&pair.s).await.unwrap();
}

/// A hook that fails after the pooler was paused and repointed: the cutover is undone, the repoint hook
/// runs again towards the old primary, PgBouncer is resumed there, and the application saw no error and
/// lost no write.
#[tokio::test(flavor = "multi_thread")]
async fn a_failure_after_the_pause_resumes_pgbouncer_towards_the_old_primary() {
    let Live { pair, f, .. } = Pair::new(15, 18)
        .app()
        .await
        .with_writer(TICKETS)
        .await
        .following()
        .await;
    let bouncer = Bouncer::start(&pair.s);
    let app = App::start(&bouncer.app_url(), 4).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = pair.hikkoshi(&[
        "cutover",
        "--pgbouncer",
        &bouncer.admin_url(),
        "--hook",
        &repoint_hook(&bouncer),
        "--hook",
        "echo 'the load balancer refused' >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("exit status 3"), "{}", text(&out));
    let include = std::fs::read_to_string(bouncer.include_file()).unwrap();
    assert!(
        include.contains(&format!("port={}", pair.s.port)) && include.contains("undo"),
        "the entry points at the old primary again:\n{include}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let seen = app.stop().await;
    assert!(
        seen.errors.is_empty(),
        "the application saw errors: {:?}",
        &seen.errors[..seen.errors.len().min(5)]
    );
    let src = connect(&pair.s.socket_url("app")).await;
    assert_every_ticket_on(&src, &seen.committed).await;
    app_can_write(&pair.s).await.unwrap();
    // the follower streams on: what the application wrote after the undo reaches the target
    let mut f = f;
    let tgt = connect(&pair.t.socket_url("app")).await;
    crate::common::live::wait_in_sync(&src, &tgt, &mut f).await;
    assert_same_rows_and_schema(&src, &tgt).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
}

/// `check --pgbouncer` says what the cutover's PAUSE will wait for: an entry that pools by session waits
/// for its clients to disconnect (a warning with the fix); a console that does not answer, or a pooler with
/// no entry for the source's database, blocks.
#[tokio::test(flavor = "multi_thread")]
async fn check_names_a_pooler_that_pools_by_session_or_lacks_the_database() {
    let Sides { pair, .. } = Pair::new(15, 18).app().await.with_writer(TICKETS).await;
    let bouncer = Bouncer::start(&pair.s);
    bouncer
        .set_entries(&format!(
            "app = host=127.0.0.1 port={} dbname=app pool_mode=session",
            pair.s.port
        ))
        .await;
    let out = pair.hikkoshi(&["check", "--pgbouncer", &bouncer.admin_url()]);
    assert!(
        text(&out).contains("pools by session") && text(&out).contains("pool_mode = transaction"),
        "{}",
        text(&out)
    );
    // an entry for another database only: the cutover could not pause the application's
    bouncer
        .set_entries(&format!(
            "other = host=127.0.0.1 port={} dbname=postgres",
            pair.s.port
        ))
        .await;
    let out = pair.hikkoshi(&["check", "--pgbouncer", &bouncer.admin_url()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("has no database entry for database app"),
        "{}",
        text(&out)
    );
}
