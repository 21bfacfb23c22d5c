//! Schema changes on the source during a follow (issue 15): captured by an event trigger, applied on the
//! target in order with the rows, under a concurrent write load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hikkoshi::localserver::Install;
use tokio_postgres::Client;

use crate::common::live::{Follower, wait_in_sync};
use crate::common::scenario::{Live, Pair, Sides, managed_target};
use crate::common::*;

const TICKETS: &str = "CREATE TABLE app.tickets (id bigserial PRIMARY KEY, note text NOT NULL,
                                                 created_at timestamptz NOT NULL DEFAULT now());
     INSERT INTO app.tickets (note) SELECT 'before ' || g FROM generate_series(1, 500) g;";

/// The app fixture and app.tickets on a source of major `source`, followed by a target of major `target`.
async fn following_with_tickets(source: u32, target: u32) -> Live {
    Pair::new(source, target)
        .app()
        .await
        .then(TICKETS)
        .await
        .following()
        .await
}

/// Inserts into app.tickets on `url`, one transaction each, until stopped; counts the commits.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (s, d) = (stop.clone(), done.clone());
        let c = connect(&url).await;
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                // the shape changes under it: an insert that names only the first columns stays valid
                if c.batch_execute("INSERT INTO app.tickets (note) VALUES ('load')")
                    .await
                    .is_ok()
                {
                    d.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        });
        Load { stop, done, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.done.load(Ordering::Relaxed)
    }
}

/// `pg_dump --schema-only` of `url` with one pg_dump for both sides, without what differs by design:
/// comments, settings, hikkoshi's own objects (its state, the capture, the fence), publications.
fn schema_dump(url: &str) -> String {
    let bin = Install::discover()
        .into_iter()
        .max_by_key(|i| i.major)
        .expect("a PostgreSQL install")
        .bin;
    let out = std::process::Command::new(bin.join("pg_dump"))
        .args([
            "--schema-only",
            "--no-publications",
            "--no-subscriptions",
            "--exclude-schema=hikkoshi",
            "--exclude-schema=hikkoshi_fence",
            "--dbname",
            url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            !(l.trim().is_empty()
                || l.starts_with("--")
                || l.starts_with("SET ")
                || l.starts_with("SELECT pg_catalog.set_config")
                || l.starts_with("\\restrict")
                || l.starts_with("\\unrestrict")
                || l.contains("hikkoshi"))
        })
        // PostgreSQL 18 names the NOT NULL constraints a partition inherits; 13 to 17 have no such names
        .map(
            |l| match (l.find(" CONSTRAINT "), l.find("_not_null NOT NULL")) {
                (Some(a), Some(b)) if a < b => {
                    format!("{}{}", &l[..a], &l[b + "_not_null".len()..])
                }
                _ => l.to_string(),
            },
        )
        // a view's body: 16 and later leave out the table of a column when the view reads one table
        .map(|l| {
            if l.starts_with(' ') {
                unqualified(&l)
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `line` without `name.` qualifiers (outside quotes).
fn unqualified(line: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        if c == '\'' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_') {
            word.push(c);
            continue;
        }
        let qualifier = !quoted
            && c == '.'
            && word
                .chars()
                .next()
                .is_some_and(|f| f.is_ascii_alphabetic() || f == '_');
        if !qualifier {
            out.push_str(&word);
            out.push(c);
        }
        word.clear();
    }
    out.push_str(&word);
    out
}

/// The lines only one of two schema dumps has.
fn schema_difference(source: &str, target: &str) -> Vec<String> {
    let a: Vec<&str> = source.lines().collect();
    let b: Vec<&str> = target.lines().collect();
    let mut diff: Vec<String> = a
        .iter()
        .filter(|l| !b.contains(l))
        .map(|l| format!("source only: {l}"))
        .collect();
    diff.extend(
        b.iter()
            .filter(|l| !a.contains(l))
            .map(|l| format!("target only: {l}")),
    );
    diff
}

/// Runs `sql` on the source, each string as the client sends it (one string may hold several statements).
async fn run(src: &Client, steps: &[&str]) {
    for s in steps {
        src.batch_execute(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alembic_like_migration_during_a_follow_reaches_the_target_in_order() {
    let Live {
        pair,
        src,
        tgt,
        f: mut follower,
    } = following_with_tickets(15, 18).await;
    let load = Load::start(pair.s.socket_url("app")).await;
    run(
        &src,
        &[
            // a constant default (no rewrite), then a volatile one (the source computes every value)
            "ALTER TABLE app.tickets ADD COLUMN priority int NOT NULL DEFAULT 3",
            "ALTER TABLE app.tickets ADD COLUMN public_id uuid NOT NULL DEFAULT gen_random_uuid()",
            "ALTER TABLE app.tickets RENAME COLUMN priority TO urgency",
            "ALTER TABLE app.tickets ALTER COLUMN urgency TYPE bigint",
            "CREATE INDEX CONCURRENTLY tickets_urgency ON app.tickets (urgency)",
            "CREATE INDEX CONCURRENTLY tickets_created ON app.tickets (created_at)",
            "DROP INDEX CONCURRENTLY app.tickets_created",
            // a new table, rows into it, then a foreign key to it
            "BEGIN; CREATE TABLE app.labels (id int PRIMARY KEY, name text NOT NULL); \
             INSERT INTO app.labels SELECT g, 'label ' || g FROM generate_series(1, 50) g; COMMIT",
            "ALTER TABLE app.tickets ADD COLUMN label_id int REFERENCES app.labels (id)",
            "UPDATE app.tickets SET label_id = 1 + id % 50 WHERE id % 7 = 0",
            // DDL and DML in one string: the UPDATE must be applied once
            "ALTER TABLE app.labels ADD COLUMN hits int NOT NULL DEFAULT 0; \
             UPDATE app.labels SET hits = hits + 1 WHERE id <= 10",
            "ALTER TABLE app.tickets DROP COLUMN urgency",
            // an enum value, then rows using it
            "CREATE TYPE app.mood AS ENUM ('calm', 'busy')",
            "ALTER TABLE app.tickets ADD COLUMN mood app.mood",
            "ALTER TYPE app.mood ADD VALUE 'frantic'",
            "UPDATE app.tickets SET mood = 'frantic' WHERE id % 3 = 0",
            // a partitioned table, and a filled table attached to it as a partition
            "CREATE TABLE app.readings (id bigint, day date, value numeric, PRIMARY KEY (id, day)) \
             PARTITION BY RANGE (day)",
            "CREATE TABLE app.readings_2026 PARTITION OF app.readings \
             FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
            "CREATE TABLE app.readings_2027 (id bigint, day date, value numeric, PRIMARY KEY (id, day))",
            "INSERT INTO app.readings_2027 SELECT g, '2027-03-01', g / 3.0 FROM generate_series(1, 40) g",
            "ALTER TABLE app.readings ATTACH PARTITION app.readings_2027 \
             FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
            "INSERT INTO app.readings SELECT g, '2026-06-01', g FROM generate_series(1, 30) g",
            "UPDATE app.readings SET value = value + 1 WHERE id % 2 = 0",
            // a partition detached keeps travelling as a table of its own
            "ALTER TABLE app.readings DETACH PARTITION app.readings_2026",
            "INSERT INTO app.readings_2026 VALUES (1000, '2026-02-02', 7)",
            // a sequence, and a trigger that changes rows on the source (the stream carries its result)
            "CREATE SEQUENCE app.ticket_no START 100",
            "CREATE FUNCTION app.stamp() RETURNS trigger LANGUAGE plpgsql \
             AS $$ BEGIN NEW.note := NEW.note || ' #' || nextval('app.ticket_no'); RETURN NEW; END $$",
            "CREATE TRIGGER tickets_stamp BEFORE UPDATE ON app.tickets FOR EACH ROW EXECUTE FUNCTION app.stamp()",
            "UPDATE app.tickets SET label_id = 2 WHERE id % 11 = 0",
            // unqualified names, found through the session's search_path
            "SET search_path = app; CREATE TABLE notes (id int PRIMARY KEY, body text); \
             INSERT INTO notes VALUES (1, 'first'); RESET search_path",
            // an extension at an older version, then updated
            "CREATE EXTENSION pg_trgm VERSION '1.4'",
            "ALTER EXTENSION pg_trgm UPDATE TO '1.5'",
            // a view and a function over the new shape
            "CREATE VIEW app.frantic AS SELECT id, note FROM app.tickets WHERE mood = 'frantic'",
            "CREATE FUNCTION app.label_of(t bigint) RETURNS text LANGUAGE sql STABLE \
             AS $$ SELECT l.name FROM app.tickets k JOIN app.labels l ON l.id = k.label_id WHERE k.id = t $$",
        ],
    )
    .await;
    let writes = load.stop().await;
    assert!(writes > 0, "the load wrote nothing");
    wait_in_sync(&src, &tgt, &mut follower).await;
    // rows identical before any cutover: the stream carried everything, including the volatile default
    assert_same_rows_and_schema(&src, &tgt).await;
    let version: String = tgt
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_trgm'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        version, "1.5",
        "ALTER EXTENSION UPDATE did not reach the target"
    );
    let hits: i64 = tgt
        .query_one("SELECT sum(hits)::bigint FROM app.labels", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        hits, 10,
        "the UPDATE in the DDL's string was applied more than once"
    );
    let (a, b) = (
        schema_dump(&pair.s.socket_url("app")),
        schema_dump(&pair.t.socket_url("app")),
    );
    assert_eq!(schema_difference(&a, &b), Vec::<String>::new());
    assert_eq!(a, b, "the schemas differ in order");
    // status lists the DDL applied
    let out = hikkoshi(&["status", "--target", &pair.target_url()]);
    let said = text(&out);
    assert!(
        said.contains("CREATE TRIGGER tickets_stamp") && said.contains("ATTACH PARTITION"),
        "{said}"
    );
    let out = pair.hikkoshi(&["cutover", "--reverse"]);
    assert!(out.status.success(), "{}", text(&out));
    let src = connect(&pair.s.socket_url("app")).await;
    assert_same_rows_and_schema(&src, &tgt).await;
    assert_sequences_at_least(&src, &tgt).await;
    // the forward capture went with the forward stream; the reverse one stands on the new primary
    assert_eq!(event_triggers(&src).await, 0);
    assert_eq!(event_triggers(&tgt).await, 3);
    // the follower goes on as the reverse stream: DDL on the new primary reaches the old one, in order
    run(
        &tgt,
        &[
            "ALTER TABLE app.labels ADD COLUMN archived boolean NOT NULL DEFAULT false",
            "UPDATE app.labels SET archived = true WHERE id > 40",
            "CREATE TABLE app.after_switch (id int PRIMARY KEY, v text NOT NULL)",
            "INSERT INTO app.after_switch SELECT g, 'v' || g FROM generate_series(1, 25) g",
            "ALTER TYPE app.mood ADD VALUE 'relieved'",
            "UPDATE app.tickets SET mood = 'relieved' WHERE id % 4 = 0",
        ],
    )
    .await;
    wait_in_sync(&tgt, &src, &mut follower).await;
    assert_same_rows_and_schema(&src, &tgt).await;
    let (a, b) = (
        schema_dump(&pair.s.socket_url("app")),
        schema_dump(&pair.t.socket_url("app")),
    );
    assert_eq!(schema_difference(&a, &b), Vec::<String>::new());
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
    assert_success(&pair.hikkoshi(&["clean"]));
    assert_eq!(event_triggers(&src).await + event_triggers(&tgt).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_killed_while_applying_ddl_applies_it_exactly_once_after_a_restart() {
    let Live { pair, src, tgt, f } = following_with_tickets(15, 15).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    let mut f = pair.follower(&[("HIKKOSHI_FAILPOINT", hikkoshi::failpoint::APPLY_AFTER_DDL)]);
    let load = Load::start(pair.s.socket_url("app")).await;
    run(
        &src,
        &[
            "ALTER TABLE app.tickets ADD COLUMN edits int NOT NULL DEFAULT 0; \
           UPDATE app.tickets SET edits = edits + 1, note = note || '+' WHERE id <= 20",
        ],
    )
    .await;
    let status = f.exits_by_itself().await;
    assert!(
        !status.success(),
        "the failpoint did not kill it:\n{}",
        f.log()
    );
    assert!(f.log().contains("failpoint"), "{}", f.log());
    // killed after the DDL ran on the target, before its commit: nothing of it stayed
    assert!(
        !has_column(&tgt, "app.tickets", "edits").await,
        "the killed batch left the column behind"
    );
    run(
        &src,
        &["UPDATE app.tickets SET edits = edits + 1 WHERE id <= 5"],
    )
    .await;
    assert!(load.stop().await > 0);
    let mut f = pair.follower(&[]);
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
    let (edits, logged): (i64, i64) = {
        let r = tgt
            .query_one(
                "SELECT (SELECT sum(edits) FROM app.tickets)::bigint,
                        (SELECT count(*) FROM hikkoshi.ddl WHERE statement LIKE 'ALTER TABLE app.tickets ADD COLUMN edits%')",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(edits, 25, "an UPDATE was applied twice or not at all");
    assert_eq!(logged, 1);
    // clean leaves nothing of the capture on the source
    assert_success(&pair.hikkoshi(&["clean"]));
    assert_eq!(event_triggers(&src).await, 0);
    let schema: bool = src
        .query_one("SELECT to_regnamespace('hikkoshi') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!schema, "the capture's schema stayed on the source");
}

#[tokio::test(flavor = "multi_thread")]
async fn new_tables_follow_the_selection_and_ddl_that_cannot_travel_stops_with_the_way_out() {
    let Sides { pair, src, tgt } = Pair::new(13, 16)
        .app()
        .await
        .then(
            "CREATE TABLE app.scratch_0 (id int PRIMARY KEY);
             CREATE ROLE app_owner NOLOGIN; GRANT CREATE, USAGE ON SCHEMA app TO app_owner;
             CREATE TABLE app.owned_before (id int PRIMARY KEY); ALTER TABLE app.owned_before OWNER TO app_owner;",
        )
        .await;
    let mut f = Follower::start_between(
        &pair.source_url(),
        &pair.target_url(),
        &["--exclude", "app.scratch_*"],
        &[],
    );
    wait_in_sync(&src, &tgt, &mut f).await;
    let check = pair.hikkoshi(&["check"]);
    assert!(
        text(&check).contains("captured by an event trigger"),
        "{}",
        text(&check)
    );
    run(
        &src,
        &[
            // one string: a table the selection leaves out, one it takes, rows into both
            "CREATE TABLE app.scratch_1 (id int PRIMARY KEY, v text); \
             CREATE TABLE app.kept (id int PRIMARY KEY, v text); \
             INSERT INTO app.scratch_1 VALUES (1, 'a'); INSERT INTO app.kept VALUES (1, 'a'), (2, 'b')",
            "ALTER TABLE app.scratch_1 ADD COLUMN w int; ALTER TABLE app.kept ADD COLUMN w int DEFAULT 5",
            "UPDATE app.kept SET w = 6 WHERE id = 2",
        ],
    )
    .await;
    wait_in_sync(&src, &tgt, &mut f).await;
    assert_eq!(
        rows_of(&tgt, "app.kept").await,
        rows_of(&src, "app.kept").await
    );
    let (scratch, skipped): (bool, i64) = {
        let r = tgt
            .query_one(
                "SELECT to_regclass('app.scratch_1') IS NOT NULL,
                        (SELECT count(*) FROM hikkoshi.ddl WHERE outcome LIKE 'skipped%')",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(!scratch, "a table outside the selection reached the target");
    assert_eq!(
        skipped, 2,
        "the commands on the excluded table were not passed over"
    );
    // DDL run as the application's role: the new table has the same owner on the target
    run(
        &src,
        &["SET ROLE app_owner; CREATE TABLE app.owned (id int PRIMARY KEY); RESET ROLE"],
    )
    .await;
    wait_in_sync(&src, &tgt, &mut f).await;
    for c in [&src, &tgt] {
        assert_eq!(owner_of(c, "app.owned").await, "app_owner");
    }
    // DDL from a DO block cannot be cut out of its string: a definite stop that says how to go on
    run(
        &src,
        &["DO $$ BEGIN EXECUTE 'ALTER TABLE app.kept ADD COLUMN z int'; END $$"],
    )
    .await;
    let log = f.stops_with_an_error().await;
    assert!(log.contains("a DO block"), "{log}");
    // the way out it names: the same change by hand on the target, recorded, then the same command
    let record = log
        .split("INSERT INTO hikkoshi.ddl")
        .nth(1)
        .and_then(|rest| rest.split(" — ").next())
        .unwrap_or_else(|| panic!("no record to make in:\n{log}"))
        .to_string();
    tgt.batch_execute(&format!(
        "ALTER TABLE app.kept ADD COLUMN z int; INSERT INTO hikkoshi.ddl{record}"
    ))
    .await
    .unwrap();
    let mut f = Follower::start_between(
        &pair.source_url(),
        &pair.target_url(),
        &["--exclude", "app.scratch_*"],
        &[],
    );
    run(&src, &["UPDATE app.kept SET z = id * 10"]).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    assert_eq!(
        rows_of(&tgt, "app.kept").await,
        rows_of(&src, "app.kept").await
    );
    // rows written before the table joined the stream were never streamed: a definite stop
    run(
        &src,
        &["CREATE TABLE app.copied AS SELECT id, v FROM app.kept"],
    )
    .await;
    let log = f.stops_with_an_error().await;
    assert!(
        log.contains("CREATE TABLE app.copied AS") && log.contains("already has rows"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ddl_the_capture_fails_on_still_runs_on_the_source_and_stops_the_stream_there() {
    let Live {
        pair: _pair,
        src,
        tgt,
        mut f,
    } = following_with_tickets(15, 15).await;
    // a session setting the capture reads, spoiled: its work fails inside the application's DDL
    run(
        &src,
        &[
            "SET hikkoshi.rewrites = 'not an oid:2,'; ALTER TABLE app.tickets ADD COLUMN x int; \
           RESET hikkoshi.rewrites",
        ],
    )
    .await;
    assert!(
        has_column(&src, "app.tickets", "x").await,
        "the application's DDL failed with the capture"
    );
    let log = f.stops_with_an_error().await;
    assert!(
        log.contains("ALTER TABLE app.tickets ADD COLUMN x int")
            && log.contains("the capture failed on the source"),
        "{log}"
    );
    assert!(!has_column(&tgt, "app.tickets", "x").await);
}

/// The usual managed move: a self-hosted source (superuser, so DDL is captured) to a target whose role may
/// create roles but is no superuser (RDS's, Neon's). DDL the application runs as its own role arrives as that
/// role, so the owners still match and the cutover, which compares them, goes through.
#[tokio::test(flavor = "multi_thread")]
async fn ddl_as_the_application_role_reaches_a_managed_target_with_its_owner() {
    use hikkoshi::localserver::PASSWORD;
    let s = server(15);
    let t = server(18);
    let admin = connect(&s.socket_url("postgres")).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE app_owner LOGIN PASSWORD '{PASSWORD}'"
        ))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE app OWNER app_owner")
        .await
        .unwrap();
    let owner_url = format!(
        "host=127.0.0.1 port={} user=app_owner password={PASSWORD} dbname=app sslmode=disable",
        s.port
    );
    let app = connect(&owner_url).await;
    app.batch_execute(
        "CREATE SCHEMA app;
         CREATE TABLE app.items (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO app.items SELECT g, 'item ' || g FROM generate_series(1, 200) g;",
    )
    .await
    .unwrap();
    let target = managed_target(&t).await;
    let src = connect(&s.socket_url("app")).await;
    let tgt = connect(&target).await;
    let mut f = Follower::start_between(&s.url("app"), &target, &[], &[]);
    wait_in_sync(&src, &tgt, &mut f).await;
    app.batch_execute(
        "CREATE TABLE app.extra (id int PRIMARY KEY, item_id int REFERENCES app.items (id), v text);
         INSERT INTO app.extra SELECT g, g, 'x' FROM generate_series(1, 30) g;
         ALTER TABLE app.items ADD COLUMN note text NOT NULL DEFAULT 'none';
         CREATE INDEX items_note ON app.items (note);
         UPDATE app.items SET note = 'changed' WHERE id % 10 = 0;",
    )
    .await
    .unwrap();
    wait_in_sync(&src, &tgt, &mut f).await;
    for table in ["app.items", "app.extra"] {
        assert_eq!(
            rows_of(&tgt, table).await,
            rows_of(&src, table).await,
            "{table}"
        );
        assert_eq!(owner_of(&tgt, table).await, "app_owner", "{table}");
    }
    let out = hikkoshi(&["cutover", "--source", &s.url("app"), "--target", &target]);
    assert_success(&out);
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
}

/// Source and target hold the same rows, the same schema objects and the same `pg_dump --schema-only`.
async fn assert_same_rows_and_dump(pair: &Pair, src: &Client, tgt: &Client) {
    assert_same_rows_and_schema(src, tgt).await;
    let (a, b) = (
        schema_dump(&pair.s.socket_url("app")),
        schema_dump(&pair.t.socket_url("app")),
    );
    assert_eq!(schema_difference(&a, &b), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renamed_or_moved_table_streams_on_under_its_new_name_and_a_name_outside_the_selection_stops()
 {
    let Sides { pair, src, tgt } = Pair::new(15, 18)
        .app()
        .await
        .then(TICKETS)
        .await
        .then(
            "CREATE TABLE app.scratch_0 (id int PRIMARY KEY);
             CREATE TABLE app.jobs (id int PRIMARY KEY, v text NOT NULL);
             INSERT INTO app.jobs SELECT g, 'job ' || g FROM generate_series(1, 300) g;",
        )
        .await;
    let mut f = Follower::start_between(
        &pair.source_url(),
        &pair.target_url(),
        &["--exclude", "app.scratch_*"],
        &[],
    );
    wait_in_sync(&src, &tgt, &mut f).await;
    let load = Load::start(pair.s.socket_url("app")).await;
    run(
        &src,
        &[
            // the table the selection leaves out goes (passed over on the target, which never had it)
            "DROP TABLE app.scratch_0",
            "CREATE SCHEMA archive",
            "ALTER TABLE app.jobs RENAME TO tasks",
            "INSERT INTO app.tasks SELECT g, 'task ' || g FROM generate_series(301, 350) g",
            "UPDATE app.tasks SET v = v || '!' WHERE id % 10 = 0",
            "ALTER TABLE app.tasks SET SCHEMA archive",
            "DELETE FROM archive.tasks WHERE id % 25 = 0",
            "ALTER TABLE archive.tasks RENAME COLUMN v TO label",
            "UPDATE archive.tasks SET label = upper(label) WHERE id < 20",
            // the rename and rows under the new name in one transaction
            "BEGIN; ALTER TABLE archive.tasks RENAME TO jobs; \
             INSERT INTO archive.jobs VALUES (1000, 'late'); UPDATE archive.jobs SET label = 'moved' WHERE id = 1; \
             COMMIT",
        ],
    )
    .await;
    assert!(load.stop().await > 0, "the load wrote nothing");
    wait_in_sync(&src, &tgt, &mut f).await;
    assert_same_rows_and_dump(&pair, &src, &tgt).await;
    // the migration's record follows the name (verification and the cutover compare by it)
    let recorded: Vec<String> = tgt
        .query(
            "SELECT schema_name || '.' || table_name FROM hikkoshi.tables
             WHERE table_name IN ('jobs', 'tasks') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(recorded, vec!["archive.jobs"]);
    let skipped: i64 = tgt
        .query_one(
            "SELECT count(*) FROM hikkoshi.ddl WHERE outcome LIKE 'skipped%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(skipped, 1, "a rename was passed over");
    // a name the selection leaves out: the stream stops at the command, with the choice named
    run(
        &src,
        &[
            "ALTER TABLE archive.jobs SET SCHEMA app",
            "ALTER TABLE app.jobs RENAME TO scratch_jobs",
            "INSERT INTO app.scratch_jobs VALUES (2000, 'after')",
        ],
    )
    .await;
    let log = f.stops_with_an_error().await;
    assert!(
        log.contains("ALTER TABLE app.jobs RENAME TO scratch_jobs")
            && log.contains("leaves app.scratch_jobs out")
            && log.contains("'by hand'"),
        "{log}"
    );
    assert!(
        !log.contains("added to the publication after the clone"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volatile_default_added_to_a_replica_identity_full_table_streams_on_without_drift() {
    let Live {
        pair,
        src,
        tgt,
        mut f,
    } = Pair::new(15, 18)
        .app()
        .await
        .then(TICKETS)
        .await
        .then(
            "CREATE TABLE app.readings_log (id int NOT NULL, kind text NOT NULL);
             ALTER TABLE app.readings_log REPLICA IDENTITY FULL;
             INSERT INTO app.readings_log SELECT g, 'k' || g % 9 FROM generate_series(1, 600) g;",
        )
        .await
        .following()
        .await;
    let load = Load::start(pair.s.socket_url("app")).await;
    run(
        &src,
        &[
            "ALTER TABLE app.readings_log ADD COLUMN score double precision DEFAULT random()",
            "UPDATE app.readings_log SET kind = kind || '+' WHERE id % 5 = 0",
            "DELETE FROM app.readings_log WHERE id % 7 = 0",
            // the rewrite, then the application's changes in the same transaction
            "BEGIN; ALTER TABLE app.readings_log ADD COLUMN tag uuid DEFAULT gen_random_uuid(); \
             UPDATE app.readings_log SET kind = 'x' WHERE id < 10; DELETE FROM app.readings_log WHERE id = 11; \
             COMMIT",
            // a value computed once (no rewrite) on the same table
            "ALTER TABLE app.readings_log ADD COLUMN seen timestamptz DEFAULT now()",
            "UPDATE app.readings_log SET kind = 'y' WHERE id % 3 = 0",
            "DELETE FROM app.readings_log WHERE id % 13 = 0",
        ],
    )
    .await;
    assert!(load.stop().await > 0, "the load wrote nothing");
    wait_in_sync(&src, &tgt, &mut f).await;
    assert_same_rows_and_dump(&pair, &src, &tgt).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("drifted"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn values_the_source_computed_at_ddl_time_reach_the_target_unchanged() {
    let Live {
        pair,
        src,
        tgt,
        mut f,
    } = following_with_tickets(15, 18).await;
    let load = Load::start(pair.s.socket_url("app")).await;
    run(
        &src,
        &[
            // now() is stable: no rewrite, every row reads the value of the ALTER's moment
            "ALTER TABLE app.tickets ADD COLUMN seen_at timestamptz NOT NULL DEFAULT now()",
            "ALTER TABLE app.tickets ADD COLUMN seen_on date DEFAULT current_date",
            // a rewrite whose values depend on the session's TimeZone
            "SET TimeZone = 'Asia/Tokyo'; \
             ALTER TABLE app.tickets ALTER COLUMN created_at TYPE timestamp; RESET TimeZone",
            "UPDATE app.tickets SET note = note || '.' WHERE id % 9 = 0",
        ],
    )
    .await;
    assert!(load.stop().await > 0, "the load wrote nothing");
    wait_in_sync(&src, &tgt, &mut f).await;
    assert_same_rows_and_dump(&pair, &src, &tgt).await;
    // hikkoshi's own comparison agrees (sequences move at the cutover)
    let out = pair.hikkoshi(&["verify"]);
    assert!(text(&out).contains(" 0 different"), "{}", text(&out));
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
}
