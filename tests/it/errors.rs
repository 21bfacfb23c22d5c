//! Bad input gets one clear paragraph, the right exit status (2 usage/connection, 1 a problem found), and
//! leaves nothing behind on either server.

use crate::common::scenario::*;
use crate::common::*;
use hikkoshi::localserver::ServerOptions;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn assert_nothing_left(src: &tokio_postgres::Client, tgt: &tokio_postgres::Client) {
    assert!(
        hikkoshi_slots(src).await.is_empty(),
        "slot left on the source"
    );
    assert!(!has_state(tgt).await, "hikkoshi state left on the target");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_wrong_password_missing_database_and_malformed_urls_exit_2() {
    let s = server(15);
    let src = create_db(&s, "app").await;
    src.batch_execute("CREATE TABLE t (id int primary key)")
        .await
        .unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let cases: Vec<(String, &str)> = vec![
        (
            format!("host=127.0.0.1 port={port} user=postgres dbname=x"),
            "nothing listens",
        ),
        (
            format!("postgresql://postgres:wrong@127.0.0.1:{}/app", s.port),
            "password was refused",
        ),
        (s.url("no_such_db"), "does not exist"),
        (
            "postgresql://h:notaport/db".to_string(),
            "not a port number",
        ),
        (
            "host=x bogus_option=1".to_string(),
            "unknown connection option",
        ),
    ];
    for (target, expect) in cases {
        let out = hikkoshi(&["clone", "--source", &s.url("app"), "--target", &target]);
        assert_eq!(out.status.code(), Some(2), "{target}: {}", text(&out));
        let e = stderr(&out);
        assert!(
            e.contains(expect),
            "{target}: expected \"{expect}\" in:\n{e}"
        );
        assert!(e.contains("target"), "the error says which side: {e}");
        assert!(
            !e.contains("wrong"),
            "the password must not be printed: {e}"
        );
    }
    assert!(hikkoshi_slots(&src).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_times_out_instead_of_hanging() {
    let s = server(15);
    let _src = create_db(&s, "app").await;
    // accepts connections, never speaks
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let start = std::time::Instant::now();
    let out = hikkoshi(&[
        "clone",
        "--source",
        &s.url("app"),
        "--target",
        &format!("host=127.0.0.1 port={port} user=u dbname=d connect_timeout=2"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("no answer within 2 s"),
        "{}",
        text(&out)
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    drop(silent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_table_that_already_exists_is_refused_before_anything_is_created() {
    let Sides { pair, src, tgt } = Pair::new(15, 18).source(FIXTURE_APP).await;
    tgt.batch_execute(
        "CREATE SCHEMA app; CREATE TABLE app.orders (id int); INSERT INTO app.orders VALUES (1)",
    )
    .await
    .unwrap();
    let out = pair.hikkoshi(&["clone"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = stderr(&out);
    assert!(e.contains("app.orders (has rows)"), "{e}");
    assert!(e.contains("--exclude"), "the error says what to do: {e}");
    assert_nothing_left(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_selection_pattern_that_matches_nothing_is_a_usage_error() {
    let Sides { pair, src, tgt } = Pair::new(15, 15)
        .source("CREATE TABLE orders (id int primary key)")
        .await;
    let out = pair.hikkoshi(&["clone", "--include", "public.order"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let e = stderr(&out);
    assert!(
        e.contains("\"public.order\" matches no table") && e.contains("public.orders"),
        "{e}"
    );
    assert_nothing_left(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pg_dump_older_than_the_source_is_refused_with_the_fix() {
    let Sides { pair, src, tgt } = Pair::new(18, 18)
        .source("CREATE TABLE orders (id int primary key)")
        .await;
    let out = pair.hikkoshi_env(
        &["clone"],
        &[("HIKKOSHI_PG_BIN", install(15).bin.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = stderr(&out);
    assert!(
        e.contains("version 15, older than the source's PostgreSQL 18"),
        "{e}"
    );
    assert!(e.contains("--pg-bin"), "{e}");
    assert_nothing_left(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_without_logical_wal_level_is_refused_with_the_setting_to_change() {
    let s = server_with(
        15,
        ServerOptions {
            conf: vec!["wal_level = replica".into()],
            ..Default::default()
        },
    );
    let Sides { pair, src, tgt } = Pair::of(s, server(15))
        .source("CREATE TABLE orders (id int primary key)")
        .await;
    let out = pair.hikkoshi(&["clone"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = stderr(&out);
    assert!(
        e.contains("wal_level = replica") && e.contains("ALTER SYSTEM SET wal_level = logical"),
        "{e}"
    );
    assert_nothing_left(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_without_replication_is_refused_with_the_grant_to_run() {
    let Sides { pair, src, tgt } = Pair::new(15, 15)
        .source(
            "CREATE TABLE orders (id int primary key);
             CREATE ROLE app_reader LOGIN PASSWORD 'reader-pw';
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO app_reader;",
        )
        .await;
    let source = format!(
        "postgresql://app_reader:reader-pw@127.0.0.1:{}/app?sslmode=disable",
        pair.s.port
    );
    let out = hikkoshi(&["clone", "--source", &source, "--target", &pair.target_url()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = stderr(&out);
    assert!(e.contains("ALTER ROLE app_reader REPLICATION"), "{e}");
    assert!(!e.contains("reader-pw"), "{e}");
    assert_nothing_left(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extension_missing_on_the_target_is_refused_by_the_preflight() {
    // (no pgvector for PostgreSQL 15 here)
    let Sides { pair, src, tgt } = Pair::new(18, 15).db("api").source(FIXTURE_VECTOR).await;
    let out = pair.hikkoshi(&["clone"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = stderr(&out);
    assert!(
        e.contains("extension vector") && e.contains("pgvector"),
        "{e}"
    );
    assert!(e.contains("Nothing was changed"), "{e}");
    assert_nothing_left(&src, &tgt).await;
    assert!(user_tables(&tgt).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_step_that_fails_leaves_the_target_as_it_was() {
    let pair = Pair::new(15, 18);
    let (src, tgt) = schema_conflict_pair(&pair.s, &pair.t).await;
    let out = pair.hikkoshi(&["clone"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = stderr(&out);
    assert!(
        e.contains("mood") && e.contains("nothing of it was created"),
        "{e}"
    );
    assert_nothing_left(&src, &tgt).await;
    assert!(
        user_tables(&tgt).await.is_empty(),
        "pre-data is all or nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn all_replication_slots_in_use_is_a_blocker_with_the_setting_to_raise() {
    let s = server_with(
        15,
        ServerOptions {
            conf: vec!["max_replication_slots = 2".into()],
            ..Default::default()
        },
    );
    let pair = Pair::of(s, server(15));
    let src = create_db(&pair.s, "app").await;
    // (each slot in a statement of its own: a slot cannot be made in a transaction that wrote)
    for sql in [
        "CREATE TABLE a (id int PRIMARY KEY)",
        "SELECT pg_create_logical_replication_slot('busy_1', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('busy_2', 'pgoutput')",
    ] {
        src.execute(sql, &[]).await.unwrap();
    }
    let tgt = create_db(&pair.t, "app").await;
    let out = pair.hikkoshi(&["clone"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = stderr(&out);
    assert!(
        e.contains("2 of 2 replication slots in use") && e.contains("max_replication_slots"),
        "{e}"
    );
    assert!(!has_state(&tgt).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_host_is_a_connection_error() {
    let s = server(15);
    let _src = create_db(&s, "app").await;
    let out = hikkoshi(&[
        "clone",
        "--source",
        &s.url("app"),
        "--target",
        "postgresql://u@no-such-host.invalid:5432/db?connect_timeout=5",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let e = stderr(&out);
    assert!(
        e.contains("cannot connect to the target") && e.contains("no-such-host.invalid"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_come_from_pgpass_and_the_environment_and_never_reach_output_or_state() {
    let Sides { pair, src, tgt } = Pair::new(15, 15)
        .source("CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a VALUES (1, 'x');")
        .await;
    let home = tempfile::tempdir().unwrap();
    let pgpass = home.path().join(".pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "127.0.0.1:{}:*:postgres:{}\n",
            pair.s.port,
            hikkoshi::localserver::PASSWORD
        ),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let source = format!(
        "host=127.0.0.1 port={} user=postgres dbname=app sslmode=disable",
        pair.s.port
    );
    let target = format!(
        "postgresql://postgres@127.0.0.1:{}/app?sslmode=disable",
        pair.t.port
    );
    let out = hikkoshi_env(
        &["clone", "--source", &source, "--target", &target],
        &[
            ("HOME", home.path().to_str().unwrap()),
            ("PGPASSWORD", hikkoshi::localserver::PASSWORD),
        ],
    );
    // the source's password came from ~/.pgpass, the target's from PGPASSWORD (pgpass has no line for it)
    assert_success(&out);
    assert_eq!(rows_of(&tgt, "a").await, rows_of(&src, "a").await);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(hikkoshi::localserver::PASSWORD), "{all}");
    // nor in the state tables
    let state: String = tgt
        .query_one(
            "SELECT concat_ws(' ', (SELECT string_agg(m::text, ' ') FROM hikkoshi.migration m),
                                   (SELECT string_agg(e::text, ' ') FROM hikkoshi.events e),
                                   (SELECT string_agg(c::text, ' ') FROM hikkoshi.chunks c))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        state.contains("postgres@127.0.0.1"),
        "the endpoint is recorded: {state}"
    );
    assert!(!state.contains(hikkoshi::localserver::PASSWORD), "{state}");
    let status = hikkoshi(&["status", "--target", &pair.target_url()]);
    assert!(!String::from_utf8_lossy(&status.stdout).contains(hikkoshi::localserver::PASSWORD));
}

/// A chunk the target refuses for a reason no retry fixes (issue 22). The target's columns are changed
/// after the copy began (bigint → integer, as an operator might). Pass:
/// - the binary rows of `fits` are refused, so that table goes as text (recorded) and is copied whole;
/// - `too_big` holds a value integer cannot hold: the clone exits 1 naming the table, the column, its type
///   and both ways on, and `status` shows that error;
/// - the fix the message gives (the column changed back) and the same command end identical, nothing
///   copied twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_the_target_refuses_goes_as_text_or_stops_naming_table_column_and_type() {
    use hikkoshi::failpoint;
    let Sides { pair, src, tgt } = Pair::new(15, 18)
        .source(
            "CREATE TABLE big (id int PRIMARY KEY, pad text);
             INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g;
             CREATE TABLE fits (id int PRIMARY KEY, n bigint);
             INSERT INTO fits SELECT g, g * 7 FROM generate_series(1, 1000) g;
             CREATE TABLE too_big (id int PRIMARY KEY, n bigint);
             INSERT INTO too_big SELECT g, g FROM generate_series(1, 1000) g;
             INSERT INTO too_big VALUES (1001, 4294967296);",
        )
        .await;
    // the largest table's only chunk commits first, then the process dies
    let out = pair.hikkoshi_env(
        &["clone", "--jobs", "1"],
        &[(
            "HIKKOSHI_FAILPOINT",
            &failpoint::nth(failpoint::COPY_AFTER_CHUNK_COMMIT, 1),
        )],
    );
    assert!(!out.status.success(), "{}", text(&out));
    tgt.batch_execute(
        "ALTER TABLE fits ALTER COLUMN n TYPE integer;
         ALTER TABLE too_big ALTER COLUMN n TYPE integer;",
    )
    .await
    .unwrap();

    let out = pair.hikkoshi(&["clone", "--jobs", "1"]);
    let said = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for needle in [
        "public.too_big",
        "column n, of type bigint on the source",
        "out of range",
        "ALTER COLUMN n TYPE",
        "--exclude public.too_big",
        "hikkoshi clean",
    ] {
        assert!(said.contains(needle), "{needle:?} not in:\n{said}");
    }
    assert!(
        said.contains("copied as text"),
        "the refused binary rows of fits are said:\n{said}"
    );
    let format: String = tgt
        .query_one(
            "SELECT copy_format FROM hikkoshi.tables WHERE table_name = 'fits'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(format, "text");
    assert_eq!(rows_of(&src, "fits").await, rows_of(&tgt, "fits").await);
    let status = text(&hikkoshi(&["status", "--target", &pair.target_url()]));
    assert!(
        status.contains("last error: copying public.too_big chunk 0 failed")
            && status.contains("column n, of type bigint"),
        "{status}"
    );

    tgt.batch_execute(
        "ALTER TABLE fits ALTER COLUMN n TYPE bigint;
         ALTER TABLE too_big ALTER COLUMN n TYPE bigint;",
    )
    .await
    .unwrap();
    assert_success(&pair.hikkoshi(&["clone", "--jobs", "1"]));
    assert_same_rows_and_schema(&src, &tgt).await;
    assert_success(&pair.hikkoshi(&["verify"]));
}

/// Shell completions and the manual pages come from the same definitions as the command line: every command
/// and a flag added late (`--pgbouncer`) are in them, and bash parses its script.
#[test]
fn completions_and_manual_pages_come_from_the_command_line_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = hikkoshi(&["completions", shell]);
        assert_success(&out);
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["clone", "cutover", "rollback", "pgbouncer", "role-password"] {
            assert!(script.contains(word), "{shell}: {word} missing");
        }
        if shell == "bash" {
            let file =
                std::env::temp_dir().join(format!("hikkoshi-completion-{}", std::process::id()));
            std::fs::write(&file, script.as_bytes()).unwrap();
            let parsed = std::process::Command::new("bash")
                .arg("-n")
                .arg(&file)
                .status()
                .unwrap();
            let _ = std::fs::remove_file(&file);
            assert!(parsed.success(), "bash cannot parse its completion script");
        }
    }
    let out = hikkoshi(&["man"]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(".ie"));
    let dir = std::env::temp_dir().join(format!("hikkoshi-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert_success(&hikkoshi(&["man", "--dir", dir.to_str().unwrap()]));
    let cutover = std::fs::read_to_string(dir.join("hikkoshi-cutover.1")).unwrap();
    assert!(cutover.contains("pgbouncer"), "{cutover}");
    assert!(dir.join("hikkoshi-clone.1").exists() && dir.join("hikkoshi.1").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
