//! The status page, /metrics and /health of a running migration: served by `clone --follow --listen` and by
//! `status --listen`, read by a Prometheus text parser and rendered by headless Chromium.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::live::{Follower, workload};
use crate::common::scenario::*;
use crate::common::*;

/// A following clone that serves its status page, /metrics and /health on `port`.
fn following_with_listen(pair: &Pair, port: u16) -> Follower {
    Follower::start_between(
        &pair.source_url(),
        &pair.target_url(),
        &["--listen", &port.to_string()],
        &[],
    )
}

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!("no headless Chromium found: run .ci/run once (it installs Debian's chromium package)");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_health_follows_the_stream() {
    let Sides { pair, src, tgt } = Pair::new(15, 18).app().await;
    let port = free_port();
    let mut follower = following_with_listen(&pair, port);
    workload(pair.source_url(), 0, 20).await;
    let (_, health) = wait_for(port, "/health", 30, |c, b| {
        c == 200 && b.contains("streaming")
    })
    .await;
    assert!(health.contains("\"healthy\":true"), "{health}");

    let (code, text) = wait_for(port, "/metrics", 30, |c, b| {
        c == 200 && b.contains("hikkoshi_transactions_applied_total")
    })
    .await;
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no sample {name} {label:?} in\n{text}"));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} has an unexpected type"),
        }
    };
    let events: i64 = src
        .query_one("SELECT count(*) FROM app.events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(value("hikkoshi_table_rows_copied", Some(("table", "app.events"))) > 0.0);
    assert!(value("hikkoshi_table_rows_copied", Some(("table", "app.events"))) <= events as f64);
    assert!(value("hikkoshi_tables", Some(("state", "streaming"))) >= 10.0);
    assert!(value("hikkoshi_applied_lsn", None) > 0.0);
    assert_eq!(value("hikkoshi_follower_running", None), 1.0);
    assert_eq!(value("hikkoshi_healthy", None), 1.0);
    value("hikkoshi_lag_bytes", None);
    value("hikkoshi_errors_total", Some(("kind", "transient")));

    // the follower dies: `status --listen`, from anywhere, says streaming stopped
    let lsn: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let mut synced = false;
    for _ in 0..300 {
        synced = tgt
            .query_one(
                "SELECT synced_lsn >= $1::text::pg_lsn FROM hikkoshi.stream",
                &[&lsn],
            )
            .await
            .unwrap()
            .get(0);
        if synced {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(synced, "the follower did not catch up");
    follower.child.kill().unwrap();
    follower.child.wait().unwrap();
    let port2 = free_port();
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_hikkoshi"))
        .args([
            "status",
            "--target",
            &pair.target_url(),
            "--listen",
            &port2.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (code, body) = wait_for(port2, "/health", 30, |c, _| c == 503).await;
    assert_eq!(code, 503);
    assert!(body.contains("streaming has stopped"), "{body}");
    watcher.kill().unwrap();
    watcher.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_renders_a_running_migration_in_chromium() {
    let browser = chromium();
    let Sides { pair, .. } = Pair::new(15, 18).app().await;
    let port = free_port();
    let mut follower = following_with_listen(&pair, port);
    workload(pair.source_url(), 0, 20).await;
    wait_for(port, "/health", 30, |c, b| {
        c == 200 && b.contains("streaming")
    })
    .await;
    // let the sampler collect a few points for the chart
    tokio::time::sleep(Duration::from_secs(5)).await;
    let url = format!("http://127.0.0.1:{port}/");
    let profile = tempfile::tempdir().unwrap();
    let common_args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ];
    let dom = Command::new(&browser)
        .args(common_args)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    // what a person sees: the tables with their state, the stream, the health
    for expected in [
        "app.events",
        "app.measurements_2024_01",
        "streaming",
        "healthy",
        "running",
        "tx/s",
        "<polyline",
    ] {
        assert!(
            dom.contains(expected),
            "the rendered page lacks {expected:?}:\n{dom}"
        );
    }
    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new(&browser)
        .args(common_args)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1280,1100")
        .arg(&url)
        .output()
        .unwrap();
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "no screenshot at {} ({size} bytes): {}",
        shot.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("screenshot: {}", shot.display());
    follower.child.kill().unwrap();
    follower.child.wait().unwrap();
}

/// Every /proc/PID/cmdline on the machine that holds `needle` (hikkoshi's and its children's included).
fn command_lines_holding(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            if line.contains(needle) {
                found.push(line);
            }
        }
    }
    found
}

/// Secrets given the way tasks get them (issue 24): connection strings in HIKKOSHI_SOURCE/HIKKOSHI_TARGET, a
/// role's password in a variable named by `--role-password`, the pooler's admin URL in HIKKOSHI_PGBOUNCER.
/// None of them appears in any process's command line (sampled while the schema step runs pg_dump and
/// pg_restore, and during the stream and the cutover), in the JSON log, on the status page, in /api/status,
/// /metrics, /health, or in `status`.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_logs_command_lines_the_status_page_or_metrics() {
    const SECRET: &str = "Zq8w-unguessable-7Kp";
    let Sides { pair, src, tgt } = Pair::new(15, 18).app().await;
    for server in [&pair.s, &pair.t] {
        connect(&server.socket_url("postgres"))
            .await
            .batch_execute(&format!(
                "CREATE ROLE mover SUPERUSER LOGIN PASSWORD '{SECRET}';
                 CREATE ROLE app_writer LOGIN PASSWORD '{SECRET}';"
            ))
            .await
            .unwrap();
    }
    let url = |s: &hikkoshi::localserver::LocalServer| {
        format!(
            "host=127.0.0.1 port={} user=mover password={SECRET} dbname=app sslmode=disable",
            s.port
        )
    };
    let (source, target) = (url(&pair.s), url(&pair.t));
    let port = free_port();
    let port_s = port.to_string();
    let env = [
        ("HIKKOSHI_SOURCE", source.as_str()),
        ("HIKKOSHI_TARGET", target.as_str()),
        ("APP_PW", SECRET),
    ];
    let mut follower = Follower::spawn(
        &[
            "--log-format",
            "json",
            "clone",
            "--follow",
            "--listen",
            &port_s,
            "--role-password",
            "app_writer=env:APP_PW",
        ],
        &env,
    );
    // sampled every few milliseconds until the stream runs: pg_dump and pg_restore come and go meanwhile
    let mut seen = Vec::new();
    for _ in 0..3000 {
        seen.extend(command_lines_holding(SECRET));
        if follower.log().contains("streaming") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    workload(pair.source_url(), 0, 5).await;
    crate::common::live::wait_in_sync(&src, &tgt, &mut follower).await;
    seen.extend(command_lines_holding(SECRET));
    for path in ["/", "/api/status", "/metrics", "/health"] {
        let (_, body) = get(port, path).unwrap_or_default();
        assert!(!body.is_empty(), "{path} answered nothing");
        assert!(!body.contains(SECRET), "{path} shows the secret");
    }
    let status = hikkoshi_env(&["status", "--json"], &env);
    assert_success(&status);
    assert!(!text(&status).contains(SECRET), "{}", text(&status));
    // the cutover, with the pooler's admin URL as a secret too (no pooler answers there: refused early)
    let cut = hikkoshi_env(
        &["cutover", "--json"],
        &[
            env[0],
            env[1],
            (
                "HIKKOSHI_PGBOUNCER",
                &format!("postgresql://admin:{SECRET}@127.0.0.1:1/pgbouncer?connect_timeout=2"),
            ),
        ],
    );
    assert_eq!(cut.status.code(), Some(1), "{}", text(&cut));
    assert!(text(&cut).contains("PgBouncer"), "{}", text(&cut));
    assert!(!text(&cut).contains(SECRET), "{}", text(&cut));
    let (status, log) = follower.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.lines().count() > 5
            && log
                .lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "one JSON object a line:\n{log}"
    );
    assert!(!log.contains(SECRET), "the log shows the secret");
    assert!(seen.is_empty(), "command lines with the secret: {seen:?}");
}
