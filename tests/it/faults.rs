//! The fault scenarios of issue #7, each a named test on real servers (no mock of PostgreSQL). Each test
//! states its pass criterion in its doc and checks it. Scenario → test:
//!
//! 1. kill -9 during the copy, then resume: `resume::resume_after_kill_9_during_copy_is_identical` (SIGKILL
//!    in the middle of the copy) and `follow::a_copy_killed_and_resumed_under_writes_ends_identical_after_the_stream`
//!    (killed at a chunk boundary under writes, resumed in a second snapshot, identical after the stream).
//! 2. kill -9 after a chunk's COPY committed, before its state was recorded:
//!    `resume::resume_after_crash_right_after_a_chunk_commit_doubles_nothing` and
//!    `resume::resume_after_crash_between_copy_and_commit_loses_nothing`.
//! 3. kill -9 during a target transaction of the apply, and after its commit before the feedback:
//!    `follow::kill_9_around_the_apply_commit_replays_nothing_twice`.
//! 4. Source restarted (`immediate`) during the copy: `source_restarted_during_the_copy_recovers_by_itself`;
//!    during streaming: `follow::restarts_of_source_and_target_during_streaming_recover_by_themselves`.
//! 5. Target restarted during the copy: `target_restarted_during_the_copy_recovers_by_itself`; during
//!    streaming: the same `follow::restarts_of_source_and_target_during_streaming_recover_by_themselves`.
//! 6. A connection that stalls silently: `a_stalled_source_connection_is_detected_reported_and_recovered`,
//!    `a_stalled_target_connection_is_detected_reported_and_recovered`.
//! 7. A second hikkoshi on the same migration: `a_second_follower_is_refused_and_never_applies`.
//! 8. A 1 M-row transaction and 2 MB values: `a_million_row_transaction_and_2mb_values_stay_in_bounded_memory`.
//! 9. Slot invalidated: `an_invalidated_slot_stops_the_stream_with_what_to_do_and_cutover_refuses`.
//! 10. Target disk full: `a_full_target_disk_stops_progress_and_resumes_once_freed`.
//! 11. Duplicate key on the target: `a_duplicate_key_on_the_target_names_table_and_key`.
//! 12. Cutover cancelled before the point of no return: `cutover_cancelled_while_waiting_for_the_lag`,
//!     `cutover_cancelled_while_catching_up_after_the_fence`, `cutover_cancelled_during_verify`,
//!     `cutover_cancelled_during_a_hook` (SIGINT, SIGTERM and --timeout), plus
//!     `cutover::a_failing_hook_undoes_the_fence_and_the_source_stays_primary`.
//!
//! 13. A long, silent replay (2 M rows outside the publication, spilled): `a_long_silent_replay_completes_without_reconnecting`.
//!
//! Found by the soak: `a_table_truncated_during_the_copy_is_copied_again_in_a_new_snapshot`.
//! Issue 23, a restart at once after kill -9 while applying:
//! `a_follower_restarted_at_once_after_kill_9_mid_apply_waits_for_the_old_sessions_and_loses_nothing`.
//!
//! The randomized mix of all of these is `tests/it/soak.rs`.

use hikkoshi::failpoint;

use crate::common::live::*;
use crate::common::proxy;
use crate::common::scenario::*;
use crate::common::*;

/// Which server a fault hits.
#[derive(Clone, Copy, Debug)]
enum Side {
    Source,
    Target,
}

/// Restarts `server` (`immediate`: a crash, as the TAP tests of logical replication do) while a following
/// clone is in the middle of its copy (paused after its third chunk commit, so the copy is surely under
/// way). Pass: the follower recovers by itself (it is never run again), catches up, and the target ends
/// identical to the source, row by row.
async fn restart_during_the_copy(side: Side, major_source: u32) {
    let Sides { pair, src, tgt } = Pair::new(major_source, 18).app().await;
    let mut f = pair.follower(&[
        (
            "HIKKOSHI_PAUSE",
            &failpoint::nth(failpoint::COPY_AFTER_CHUNK_COMMIT, 3),
        ),
        ("HIKKOSHI_PAUSE_SECS", "3"),
    ]);
    f.wait_for_log("paused at copy.after-chunk-commit").await;
    let copied: i64 = tgt
        .query_one(
            "SELECT count(*) FROM hikkoshi.chunks WHERE state = 'copied'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let total: i64 = tgt
        .query_one("SELECT count(*) FROM hikkoshi.chunks", &[])
        .await
        .unwrap()
        .get(0);
    assert!(copied < total, "the copy is under way ({copied}/{total})");
    match side {
        Side::Source => pair.s.restart("immediate").unwrap(),
        Side::Target => pair.t.restart("immediate").unwrap(),
    }
    let src = match side {
        Side::Source => connect(&pair.source_url()).await,
        Side::Target => src,
    };
    // writes after the restart, during the rest of the copy and the stream
    workload(pair.source_url(), 0, 30).await;
    let tgt = connect(&pair.target_url()).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("retrying") || log.contains("reconnecting"),
        "the follower saw the restart:\n{log}"
    );
    assert_same_rows_and_schema(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn source_restarted_during_the_copy_recovers_by_itself() {
    restart_during_the_copy(Side::Source, 15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn target_restarted_during_the_copy_recovers_by_itself() {
    restart_during_the_copy(Side::Target, 18).await;
}

/// Stalls every connection between the follower and one server (a proxy stops moving bytes and closes
/// nothing, as a network partition does) while the source is written. Pass: the follower detects it (its
/// log names the stall; `HIKKOSHI_STALL_SECS=5` here, 30 s by default), `/health` answers 503 with the
/// reason while it lasts, and once the stall ends the follower catches up by itself, `/health` is 200
/// again and the target is identical to the source.
async fn stall(side: Side) {
    let Sides { pair, src, tgt } = Pair::new(15, 18).app().await;
    let proxy = proxy::Proxy::start(match side {
        Side::Source => pair.s.port,
        Side::Target => pair.t.port,
    });
    let (su, tu) = match side {
        Side::Source => (proxy.url("app"), pair.target_url()),
        Side::Target => (pair.source_url(), proxy.url("app")),
    };
    let port = free_port();
    let mut f = Follower::start_between(
        &su,
        &tu,
        &["--listen", &format!("127.0.0.1:{port}")],
        &[("HIKKOSHI_STALL_SECS", "5")],
    );
    wait_in_sync(&src, &tgt, &mut f).await;
    wait_for(port, "/health", 90, |c, b| {
        c == 200 && b.contains("streaming")
    })
    .await;
    proxy.stall();
    workload(pair.source_url(), 0, 20).await;
    f.wait_for_log("stalled").await;
    let (_, body) = wait_for(port, "/health", 90, |c, _| c == 503).await;
    let expected = match side {
        Side::Source => "interrupted",
        Side::Target => "cannot read the migration state",
    };
    assert!(body.contains(expected), "{body}");
    proxy.resume();
    workload(pair.source_url(), 20, 20).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    wait_for(port, "/health", 90, |c, b| {
        c == 200 && b.contains("streaming")
    })
    .await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_source_connection_is_detected_reported_and_recovered() {
    stall(Side::Source).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_target_connection_is_detected_reported_and_recovered() {
    stall(Side::Target).await;
}

/// Scenario 7. Pass: while a following clone runs, a second `clone --follow` (and a plain `clone`) on the
/// same migration exits with status 1 and a message that says another process works on it; it never
/// applies anything (no "streaming changes" in its log, one apply session on the target), and the first
/// follower goes on and ends identical.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_follower_is_refused_and_never_applies() {
    let Live {
        pair,
        src,
        tgt,
        mut f,
    } = Pair::new(15, 18).app().await.following().await;
    for follow in [true, false] {
        let mut second = if follow {
            pair.follower(&[])
        } else {
            pair.spawn(&["clone"], &[])
        };
        let log = second.stops_with_an_error().await;
        assert!(
            log.contains("another hikkoshi process is already working on the migration"),
            "{log}"
        );
        assert!(!log.contains("streaming changes"), "{log}");
    }
    workload(pair.source_url(), 0, 20).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    let appliers: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hikkoshi apply'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(appliers, 1);
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
}

/// Scenario 11. Pass: a row written directly on the target, then the same key inserted on the source,
/// stops the follower with exit status 1 and a message that names the table and the key and says what to
/// do; nothing of the failing batch is applied; once the row is removed on the target, a new run resumes
/// and ends identical.
#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_key_on_the_target_names_table_and_key() {
    let Live {
        pair,
        src,
        tgt,
        mut f,
    } = Pair::new(15, 18).app().await.following().await;
    tgt.batch_execute(
        "INSERT INTO app.events (id, kind, occurred_at) VALUES (9000001, 'view', '2024-01-01')",
    )
    .await
    .unwrap();
    src.batch_execute(
        "BEGIN;
         INSERT INTO app.events (id, kind, occurred_at) VALUES (9000000, 'view', '2024-01-01');
         INSERT INTO app.events (id, kind, occurred_at) VALUES (9000001, 'click', '2024-01-02');
         COMMIT;",
    )
    .await
    .unwrap();
    let log = f.stops_with_an_error().await;
    assert!(
        log.contains("app.events") && log.contains("(id)=(9000001)"),
        "the table and the key are named:\n{log}"
    );
    assert!(log.contains("remove or fix the row on the target"), "{log}");
    let partial: i64 = tgt
        .query_one("SELECT count(*) FROM app.events WHERE id = 9000000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(partial, 0, "half of the failing transaction was applied");
    tgt.batch_execute("DELETE FROM app.events WHERE id = 9000001")
        .await
        .unwrap();
    let mut f = pair.follower(&[]);
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
}

/// Scenario 9, on a source of version `major`. Pass: with the follower stopped, a source with a small
/// `max_slot_wal_keep_size` removes WAL the slot needs (the slot shows `wal_status = 'lost'`); the next
/// follower exits with status 1 and says that the stream cannot continue and to clean and clone again;
/// `hikkoshi cutover` refuses with status 1 and the source stays writable.
async fn invalidated_slot(major: u32) {
    let s = server_with(
        major,
        hikkoshi::localserver::ServerOptions {
            conf: vec![
                "max_slot_wal_keep_size = 1MB".into(),
                "max_wal_size = 64MB".into(),
            ],
            ..Default::default()
        },
    );
    let Live { pair, src, f, .. } = Pair::of(s, server(18)).app().await.following().await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    let slot = hikkoshi_slots(&src).await.pop().unwrap();
    src.batch_execute("CREATE TABLE wal_filler (x text)")
        .await
        .unwrap();
    let mut lost = String::new();
    for _ in 0..20 {
        src.batch_execute(
            "INSERT INTO wal_filler SELECT repeat('x', 1000) FROM generate_series(1, 20000);
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .unwrap();
        lost = src
            .query_one(
                "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if lost == "lost" {
            break;
        }
    }
    assert_eq!(lost, "lost", "the slot was not invalidated");
    let mut f = pair.follower(&[]);
    let log = f.stops_with_an_error().await;
    assert!(
        log.contains("cannot continue") && log.contains("hikkoshi clean"),
        "{log}"
    );
    let out = pair.hikkoshi(&["cutover", "--timeout", "10"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    src.batch_execute("INSERT INTO wal_filler VALUES ('still writable')")
        .await
        .unwrap();
    let step = cutover_step(&pair.t).await;
    assert!(
        step.is_none() || step.as_deref() == Some("aborted"),
        "{step:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalidated_slot_stops_the_stream_with_what_to_do_and_cutover_refuses() {
    invalidated_slot(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalidated_slot_on_a_18_source_stops_the_stream_and_cutover_refuses() {
    invalidated_slot(18).await;
}

/// The table the application role `app_writer` writes, and its grants.
const TICKETS: &str = "CREATE TABLE app.tickets (id bigserial PRIMARY KEY, note text NOT NULL);
         GRANT USAGE ON SCHEMA app TO app_writer;
         GRANT SELECT, INSERT ON app.tickets TO app_writer;
         GRANT USAGE ON SEQUENCE app.tickets_id_seq TO app_writer;";

/// The app fixture, app.tickets that the application role `app_writer` writes (the role on both servers),
/// and a following clone that has caught up.
async fn app_following() -> Live {
    Pair::new(15, 18)
        .app()
        .await
        .with_writer(TICKETS)
        .await
        .following()
        .await
}

/// Runs a cutover that must be cancelled: waits for `needle` in its log, sends `signal` (if any), and
/// returns its log. Pass for one attempt: exit status 1, the source still the primary — the application
/// role can write there (no fence left), and the recorded step is none or `aborted`.
async fn cancelled_cutover(
    pair: &Pair,
    extra: &[&str],
    env: &[(&str, &str)],
    needle: &str,
    signal: Option<&str>,
) -> String {
    let mut args = vec!["cutover"];
    args.extend_from_slice(extra);
    let mut c = pair.spawn(&args, env);
    c.wait_for_log(needle).await;
    if let Some(sig) = signal {
        c.signal(sig);
    }
    let log = c.stops_with_an_error().await;
    let app = connect(&app_url(&pair.s)).await;
    app.batch_execute("INSERT INTO app.tickets (note) VALUES ('after a cancelled cutover')")
        .await
        .unwrap_or_else(|e| panic!("the source refuses the application's writes ({e:?}):\n{log}"));
    let step = cutover_step(&pair.t).await;
    assert!(
        step.is_none() || step.as_deref() == Some("aborted"),
        "{step:?}\n{log}"
    );
    log
}

/// Ends a scenario-12 test: the follower goes on, and every write the application made on the source
/// after the cancelled cutovers reaches the target.
/// (The fence ended the test's own sessions on the source: a new one.)
async fn still_streaming(pair: &Pair, tgt: &tokio_postgres::Client, mut f: Follower) {
    let src = connect(&pair.s.socket_url("app")).await;
    wait_in_sync(&src, tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, tgt).await;
}

/// Scenario 12, step "waiting for the lag": the follower is frozen (SIGSTOP) while the source is written,
/// so the lag stays above --max-lag. Cancelled by --timeout, SIGINT and SIGTERM in turn: each time nothing
/// is fenced and the source stays writable (see `cancelled_cutover`).
#[tokio::test(flavor = "multi_thread")]
async fn cutover_cancelled_while_waiting_for_the_lag() {
    let Live { pair, tgt, f, .. } = app_following().await;
    f.signal("-STOP");
    workload(pair.source_url(), 0, 5).await;
    let log = cancelled_cutover(
        &pair,
        &["--max-lag", "1", "--timeout", "2"],
        &[],
        "did not drop under --max-lag",
        None,
    )
    .await;
    assert!(log.contains("nothing was fenced"), "{log}");
    for sig in ["-INT", "-TERM"] {
        let log = cancelled_cutover(
            &pair,
            &["--max-lag", "1", "--timeout", "600"],
            &[],
            "streams the changes",
            Some(sig),
        )
        .await;
        assert!(
            log.contains("nothing was fenced") && log.contains("interrupted"),
            "{log}"
        );
    }
    f.signal("-CONT");
    still_streaming(&pair, &tgt, f).await;
}

/// Scenario 12, step "fenced, catching up": the follower is frozen, so the target never reaches the fence
/// marker. Cancelled by --timeout, SIGINT and SIGTERM after the fence went up: each time the fence is
/// lifted and the source stays writable.
#[tokio::test(flavor = "multi_thread")]
async fn cutover_cancelled_while_catching_up_after_the_fence() {
    let Live { pair, tgt, f, .. } = app_following().await;
    f.signal("-STOP");
    let log = cancelled_cutover(
        &pair,
        &["--timeout", "3"],
        &[],
        "did not apply everything up to the fence",
        None,
    )
    .await;
    assert!(log.contains("writes fenced"), "{log}");
    for sig in ["-INT", "-TERM"] {
        let log = cancelled_cutover(
            &pair,
            &["--timeout", "600"],
            &[],
            "writes fenced",
            Some(sig),
        )
        .await;
        assert!(log.contains("interrupted"), "{log}");
    }
    f.signal("-CONT");
    still_streaming(&pair, &tgt, f).await;
}

/// Scenario 12, step "verify" (held there by the pause `cutover.verify`): SIGINT and SIGTERM undo the
/// cutover, the fence is lifted and the source stays writable. (--timeout bounds the lag wait, the
/// catch-up and each hook, not the verification.)
#[tokio::test(flavor = "multi_thread")]
async fn cutover_cancelled_during_verify() {
    let Live { pair, tgt, f, .. } = app_following().await;
    for sig in ["-INT", "-TERM"] {
        let log = cancelled_cutover(
            &pair,
            &["--verify", "full"],
            &[
                ("HIKKOSHI_PAUSE", failpoint::CUTOVER_VERIFY),
                ("HIKKOSHI_PAUSE_SECS", "600"),
            ],
            "paused at cutover.verify",
            Some(sig),
        )
        .await;
        assert!(
            log.contains("interrupted") && log.contains("undone"),
            "{log}"
        );
    }
    still_streaming(&pair, &tgt, f).await;
}

/// Scenario 12, step "hooks": a hook that hangs, cancelled by --timeout, SIGINT and SIGTERM: the cutover
/// is undone, the fence lifted, the source stays writable.
#[tokio::test(flavor = "multi_thread")]
async fn cutover_cancelled_during_a_hook() {
    let Live { pair, tgt, f, .. } = app_following().await;
    let hook = ["--hook", "echo hook-started >&2; sleep 600"];
    let log = cancelled_cutover(
        &pair,
        &[hook[0], hook[1], "--timeout", "3"],
        &[],
        "undone",
        None,
    )
    .await;
    assert!(log.contains("hook-started"), "{log}");
    for sig in ["-INT", "-TERM"] {
        let log = cancelled_cutover(
            &pair,
            &[hook[0], hook[1], "--timeout", "600"],
            &[],
            "hook-started",
            Some(sig),
        )
        .await;
        assert!(log.contains("undone"), "{log}");
    }
    still_streaming(&pair, &tgt, f).await;
}

/// Scenario 8. Pass: a follower in sync receives one source transaction of 1 000 000 rows and one of
/// fifty 2 MB values (100 MB); its peak resident memory (VmHWM) grows by less than 64 MB over what it was
/// once in sync — less than either transaction would take if it were held whole (a million decoded rows
/// alone take over 100 MB) — and the target ends identical.
#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_transaction_and_2mb_values_stay_in_bounded_memory() {
    let Live {
        pair: _pair,
        src,
        tgt,
        mut f,
    } = Pair::new(15, 18)
        .source(
            "CREATE TABLE big (id bigint PRIMARY KEY, pad text NOT NULL);
             CREATE TABLE blobs (id int PRIMARY KEY, v text NOT NULL);
             INSERT INTO big VALUES (0, 'seed');",
        )
        .await
        .following()
        .await;
    let baseline = peak_rss(&f);
    assert!(baseline > 0);
    src.batch_execute("INSERT INTO big SELECT i, md5(i::text) FROM generate_series(1, 1000000) i;")
        .await
        .unwrap();
    src.batch_execute(
        "BEGIN;
         INSERT INTO blobs SELECT b, (SELECT string_agg(md5(random()::text || g::text || b::text), '')
                                      FROM generate_series(1, 65536) g)
         FROM generate_series(1, 50) b;
         COMMIT;",
    )
    .await
    .unwrap();
    // a debug build applies a million rows in a few minutes
    wait_in_sync_within(&src, &tgt, &mut f, 420).await;
    let peak = peak_rss(&f);
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert!(
        peak < baseline + (64 << 20),
        "the follower's peak memory grew from {} MB to {} MB",
        baseline >> 20,
        peak >> 20
    );
    let n: i64 = tgt
        .query_one("SELECT count(*) FROM big", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1_000_001);
    assert_same_rows_and_schema(&src, &tgt).await;
}

/// A long, silent replay: a 2 M-row transaction on a table outside the publication (the walsender decodes
/// and spills it with `logical_decoding_work_mem = 64kB`, then replays it at commit and sends nothing of
/// it), then 2 MB values, with the source's `wal_sender_timeout` at 2 minutes. While it replays, the
/// walsender reads our keepalive requests and answers only about every minute. The follower must wait for
/// it (its stall limit follows `wal_sender_timeout`: 4 minutes here) and not reconnect and restart the
/// replay, and `status` shows the limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_silent_replay_completes_without_reconnecting() {
    let s = server_with(
        15,
        hikkoshi::localserver::ServerOptions {
            conf: vec![
                "logical_decoding_work_mem = '64kB'".into(),
                "wal_sender_timeout = '2min'".into(),
            ],
            ..Default::default()
        },
    );
    let Sides { pair, src, tgt } = Pair::of(s, server(18))
        .source(
            "CREATE TABLE outside (id bigint PRIMARY KEY, pad text NOT NULL);
             CREATE TABLE blobs (id int PRIMARY KEY, v text NOT NULL);",
        )
        .await;
    let mut f = Follower::start_between(
        &pair.source_url(),
        &pair.target_url(),
        &["--exclude", "public.outside"],
        &[],
    );
    wait_in_sync(&src, &tgt, &mut f).await;
    src.batch_execute(
        "INSERT INTO outside SELECT i, md5(i::text) FROM generate_series(1, 2000000) i;
         INSERT INTO blobs SELECT b, (SELECT string_agg(md5(random()::text || g::text || b::text), '')
                                      FROM generate_series(1, 65536) g)
         FROM generate_series(1, 50) b;",
    )
    .await
    .unwrap();
    wait_in_sync_within(&src, &tgt, &mut f, 540).await;
    let status = hikkoshi(&["status", "--target", &pair.target_url(), "--json"]);
    assert_success(&status);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["stream"]["stall_limit_seconds"], 240, "{st:#}");
    assert_eq!(
        st["stream"]["source_wal_sender_timeout_ms"], 120000,
        "{st:#}"
    );
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert!(
        !log.contains("reconnecting"),
        "the follower gave up on the replay and restarted it:\n{log}"
    );
    let n: i64 = tgt
        .query_one("SELECT count(*) FROM blobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50);
    assert_eq!(
        rows_of(&src, "public.blobs").await,
        rows_of(&tgt, "public.blobs").await
    );
}

/// A tmpfs of a given size, owned by the user the servers run as; unmounted when dropped.
struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(owner: &std::path::Path, megabytes: u32) -> Tmpfs {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(owner).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("hikkoshi-tmpfs-")
            .tempdir()
            .unwrap()
            .keep();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!(
                    "size={megabytes}m,mode=0700,uid={},gid={}",
                    meta.uid(),
                    meta.gid()
                ),
                "tmpfs",
                &dir.to_string_lossy(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (root, or a container with CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    /// Frees space: the filesystem grows to `megabytes`.
    fn grow(&self, megabytes: u32) {
        let ok = std::process::Command::new("mount")
            .args([
                "-o",
                &format!("remount,size={megabytes}m"),
                &self.dir.to_string_lossy(),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "remounting the tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", &self.dir.to_string_lossy()])
            .status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Scenario 10: the target database lives in a tablespace on an 8 MB tmpfs, too small for the copy.
/// Pass: the copy stops short of its end with an error that says the disk is full (ENOSPC, SQLSTATE
/// 53100, in the follower's log) and keeps retrying; once the filesystem grows (space freed), it resumes
/// by itself, streams, and the target ends identical.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_target_disk_stops_progress_and_resumes_once_freed() {
    let pair = Pair::new(15, 18);
    let src = app_source(&pair.s, "app").await;
    let fs = Tmpfs::mount(&pair.t.dir, 8);
    let admin = connect(&pair.t.socket_url("postgres")).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLESPACE small LOCATION '{}'",
            fs.dir.display()
        ))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE app TABLESPACE small")
        .await
        .unwrap();
    let tgt = connect(&pair.t.socket_url("app")).await;
    let mut f = pair.follower(&[]);
    f.wait_for_log("No space left on device").await;
    let (copied, total): (i64, i64) = {
        let r = tgt
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'copied'), count(*) FROM hikkoshi.chunks",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(copied < total, "the copy stopped short ({copied}/{total})");
    assert!(f.log().contains("retrying"), "{}", f.log());
    fs.grow(512);
    workload(pair.source_url(), 0, 20).await;
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
    drop(tgt);
    drop(admin);
    pair.t.stop("immediate").unwrap();
}

/// Found by the soak: TRUNCATE is not MVCC-safe, so a table truncated on the source after the copy's
/// snapshot, before a worker reached it, read as empty in that snapshot, and the stream then failed on (or
/// silently doubled) the changes made before the truncate. Pass: the copy notices, copies the table again
/// in a new snapshot by itself, and the target ends identical.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_truncated_during_the_copy_is_copied_again_in_a_new_snapshot() {
    let Sides { pair, src, tgt } = Pair::new(15, 18).app().await;
    src.batch_execute(
        "CREATE TABLE app.small (id int PRIMARY KEY, v text);
         INSERT INTO app.small SELECT g, 'before' FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    // one worker, largest chunks first: app.small is copied last
    let mut f = pair.spawn(
        &["clone", "--follow", "--jobs", "1", "--chunk-size", "1MB"],
        &[
            (
                "HIKKOSHI_PAUSE",
                &failpoint::nth(failpoint::COPY_AFTER_CHUNK_COMMIT, 2),
            ),
            ("HIKKOSHI_PAUSE_SECS", "3"),
        ],
    );
    f.wait_for_log("paused at copy.after-chunk-commit").await;
    src.batch_execute(
        "UPDATE app.small SET v = 'changed' WHERE id = 1;
         DELETE FROM app.small WHERE id = 3;
         TRUNCATE app.small;
         INSERT INTO app.small VALUES (1, 'after'), (2, 'after');",
    )
    .await
    .unwrap();
    wait_in_sync(&src, &tgt, &mut f).await;
    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("truncated or rewritten"), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
}

/// Issue 23: a follower killed with `kill -9` while it applies a large transaction, started again at once
/// (as systemd or Kubernetes would): the new process waits for the dead one's sessions on the target to
/// end instead of exiting with "another hikkoshi process", then applies everything exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_restarted_at_once_after_kill_9_mid_apply_waits_for_the_old_sessions_and_loses_nothing()
 {
    let Live {
        pair,
        src,
        tgt,
        mut f,
    } = Pair::new(15, 18)
        .app()
        .await
        .then("CREATE TABLE app.bulk (id int PRIMARY KEY, pad text NOT NULL)")
        .await
        .following()
        .await;
    src.batch_execute(
        "INSERT INTO app.bulk SELECT g, repeat('x', 200) FROM generate_series(1, 400000) g",
    )
    .await
    .unwrap();
    // kill it while its apply session runs a statement on the target
    let mut busy = false;
    for _ in 0..600 {
        busy = tgt
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                WHERE application_name = 'hikkoshi apply' AND state = 'active')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if busy {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(busy, "the follower never applied the transaction");
    f.signal("-KILL");
    let _ = f.child.wait();
    let mut again = pair.follower(&[]);
    wait_in_sync(&src, &tgt, &mut again).await;
    let log = again.log();
    assert!(!log.contains("another hikkoshi process"), "{log}");
    let (status, log) = again.stop();
    assert!(status.success(), "{log}");
    assert_same_rows_and_schema(&src, &tgt).await;
}
