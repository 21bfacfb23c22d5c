//! A following clone run as a user runs it, and the write workloads that run against it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hikkoshi::localserver::LocalServer;
use tokio_postgres::Client;

use super::{connect, pg_bin_for_dump};

pub struct Follower {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Follower {
    pub fn start(s: &LocalServer, t: &LocalServer, db: &str, env: &[(&str, &str)]) -> Follower {
        Follower::start_between(&s.url(db), &t.url(db), &[], env)
    }

    /// A following clone between two connection strings (e.g. through a proxy), with more arguments.
    pub fn start_between(
        source: &str,
        target: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Follower {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "hikkoshi-follow-{}-{}.log",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hikkoshi"));
        cmd.args([
            "clone",
            "--follow",
            "--source",
            source,
            "--target",
            target,
            "--jobs",
            "2",
            "--chunk-size",
            "1MB",
        ])
        .args(extra)
        .env("HIKKOSHI_PG_BIN", pg_bin_for_dump())
        .env_remove("HIKKOSHI_FAILPOINT")
        .stdout(Stdio::null())
        .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Follower {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    /// Any hikkoshi command in the background, its stderr in a log file.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Follower {
        static SPAWNED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "hikkoshi-bg-{}-{}.log",
            std::process::id(),
            SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hikkoshi"));
        cmd.args(args)
            .env("HIKKOSHI_PG_BIN", pg_bin_for_dump())
            .env_remove("HIKKOSHI_FAILPOINT")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Follower {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    /// Sends a signal (`-STOP`, `-CONT`, `-INT`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits up to 60 s until the follower's log shows `needle`; fails if it exits first.
    pub async fn wait_for_log(&mut self, needle: &str) {
        for _ in 0..600 {
            if self.log().contains(needle) {
                return;
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!(
                    "the follower exited ({s}) before {needle:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the follower never logged {needle:?}:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to 30 s for the follower to exit on its own.
    pub async fn exits_by_itself(&mut self) -> std::process::ExitStatus {
        for _ in 0..300 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the follower kept going:\n{}", self.log());
    }

    /// Waits until the follower stops on a definite error (exit status 1); returns its log.
    pub async fn stops_with_an_error(&mut self) -> String {
        let status = self.exits_by_itself().await;
        let log = self.log();
        assert_eq!(status.code(), Some(1), "{log}");
        log
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        (status, self.log())
    }
}

/// A test that fails does not leave its follower running.
impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peak resident memory of the follower so far (VmHWM).
pub fn peak_rss(f: &Follower) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", f.child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Waits until the follower has applied everything the source wrote so far.
pub async fn wait_in_sync(src: &Client, tgt: &Client, f: &mut Follower) {
    wait_in_sync_within(src, tgt, f, 120).await
}

/// The same, for at most `secs` seconds.
pub async fn wait_in_sync_within(src: &Client, tgt: &Client, f: &mut Follower, secs: u32) {
    let lsn: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..secs * 10 {
        if let Ok(Some(status)) = f.child.try_wait() {
            panic!("the follower exited ({status}):\n{}", f.log());
        }
        // seen_at is set only by the streaming loop: the copy is over and the stream has caught up
        let synced = tgt
            .query_opt(
                "SELECT synced_lsn >= $1::text::pg_lsn AND seen_at IS NOT NULL FROM hikkoshi.stream",
                &[&lsn],
            )
            .await;
        if let Ok(Some(r)) = synced
            && r.get::<_, bool>(0)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stream: String = tgt
        .query_one("SELECT s::text FROM hikkoshi.stream s", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or_default();
    let activity: String = tgt
        .query_one(
            "SELECT string_agg(application_name || ':' || state || ':' || coalesce(wait_event, '-') || ':' || left(query, 60), E'\n')
             FROM pg_stat_activity WHERE datname = current_database()",
            &[],
        )
        .await
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .unwrap_or_default();
    panic!(
        "the follower did not catch up with {lsn}: stream {stream}\ntarget sessions:\n{activity}\n{}",
        f.log()
    );
}

/// Every kind of change, in many small transactions.
pub async fn workload(url: String, base: i32, rounds: i32) {
    let c = connect(&url).await;
    for k in base..base + rounds {
        let q = k % 12 + 1;
        c.batch_execute(&format!(
            "BEGIN;
             INSERT INTO app.events (id, kind, occurred_at, payload)
                 VALUES ({id}, 'view', '2024-01-01'::timestamptz + {k} * interval '1 min', '{{\"k\": {k}}}');
             UPDATE app.queries SET updated_at = '2024-06-01'::timestamptz + {k} * interval '1 s' WHERE id = {q};
             UPDATE app.events SET amount = {k} WHERE id = {upd};
             DELETE FROM app.events WHERE id = {del};
             UPDATE app.clicks SET url = url || '?r={k}'
                 WHERE ctid = (SELECT ctid FROM app.clicks WHERE customer_id = {c} LIMIT 1);
             DELETE FROM app.clicks WHERE ctid = (SELECT ctid FROM app.clicks WHERE customer_id = {d} LIMIT 1);
             INSERT INTO app.audit_log (logged_at, actor, action) VALUES ('2024-01-01', 'w', 'same'), ('2024-01-01', 'w', 'same');
             INSERT INTO app.measurements (sensor, taken_on, value) VALUES ('s{k}', '2024-02-0{day}', {k});
             COMMIT;",
            id = 500_000 + k,
            upd = 2 + k * 7,
            del = 3 + k * 7,
            c = k % 150 + 1,
            d = (k + 75) % 150 + 1,
            day = k % 9 + 1,
        ))
        .await
        .unwrap_or_else(|e| panic!("workload round {k}: {e:?}"));
        if k % 10 == 0 {
            // a change that rewrites a big TOASTed document, and a primary-key change
            c.batch_execute(&format!(
                "UPDATE app.queries SET doc = doc || '{{\"touched\": {k}}}' WHERE id = {q};
                 UPDATE app.events SET id = id + 1000000 WHERE id = {pk};",
                pk = 5 + k * 7
            ))
            .await
            .unwrap();
        }
    }
}

/// Writes until told to stop; returns how many rounds it ran.
pub fn background_writer(
    url: String,
    base: i32,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<i32>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = tokio::spawn(async move {
        let mut k = base;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            workload(url.clone(), k, 5).await;
            k += 5;
        }
        k - base
    });
    (stop, handle)
}
