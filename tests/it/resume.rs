//! A clone killed at any point and run again ends identical to the source: chunks are copied exactly once.

use hikkoshi::failpoint;

use crate::common::scenario::*;
use crate::common::*;

async fn copied_chunks(tgt: &tokio_postgres::Client) -> i64 {
    tgt.query_one(
        "SELECT count(*) FROM hikkoshi.chunks WHERE state = 'copied'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn crash_at_then_resume(failpoint: &str) {
    let Sides { pair, src, tgt } = Pair::new(15, 18).source(FIXTURE_APP).await;
    let (su, tu) = (pair.source_url(), pair.target_url());
    let out = hikkoshi_env(
        &clone_args(&su, &tu, "2", "1MB"),
        &[("HIKKOSHI_FAILPOINT", failpoint)],
    );
    assert!(
        !out.status.success(),
        "the failpoint must kill the run:\n{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failpoint"),
        "{}",
        text(&out)
    );
    let before = copied_chunks(&tgt).await;
    assert!(before > 0, "some chunks were copied before the crash");
    // the temporary slot died with the process
    assert!(
        localserver_wait(|| async { hikkoshi_slots(&src).await.is_empty() }).await,
        "slot left behind"
    );
    // a resume must name the roles as the first run did
    let mut other = clone_args(&su, &tu, "2", "1MB").to_vec();
    other.extend(["--role-map", "postgres=someone_else"]);
    let out = hikkoshi(&other);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("another --role-map"), "{}", text(&out));
    let out = hikkoshi(&clone_args(&su, &tu, "2", "1MB"));
    assert_success(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resumed"),
        "{}",
        text(&out)
    );
    assert_identical(&src, &tgt).await;
    // a third run has nothing left to do
    let out = hikkoshi(&clone_args(&su, &tu, "2", "1MB"));
    assert_success(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already complete"),
        "{}",
        text(&out)
    );
}

async fn localserver_wait<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_after_crash_right_after_a_chunk_commit_doubles_nothing() {
    crash_at_then_resume(&failpoint::nth(failpoint::COPY_AFTER_CHUNK_COMMIT, 5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_after_crash_between_copy_and_commit_loses_nothing() {
    crash_at_then_resume(&failpoint::nth(failpoint::COPY_BEFORE_CHUNK_COMMIT, 4)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_after_kill_9_during_copy_is_identical() {
    let Sides { pair, src, tgt } = Pair::new(15, 18).source(FIXTURE_APP).await;
    let (su, tu) = (pair.source_url(), pair.target_url());
    // jobs 1 and small chunks make the copy long enough to be killed in the middle
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hikkoshi"))
        .args(clone_args(&su, &tu, "1", "256kB"))
        .env("HIKKOSHI_PG_BIN", pg_bin_for_dump())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = 0;
    for _ in 0..600 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if has_state(&tgt).await
            && let Ok(r) = tgt
                .query_one(
                    "SELECT count(*) FROM hikkoshi.chunks WHERE state = 'copied'",
                    &[],
                )
                .await
        {
            seen = r.get::<_, i64>(0);
            if seen >= 3 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed before it finished");
    assert!(
        seen >= 3,
        "the copy was under way when killed ({seen} chunks)"
    );
    let total: i64 = tgt
        .query_one("SELECT count(*) FROM hikkoshi.chunks", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        copied_chunks(&tgt).await < total,
        "killed before the copy ended"
    );
    let out = hikkoshi(&clone_args(&su, &tu, "2", "1MB"));
    assert_success(&out);
    assert_identical(&src, &tgt).await;
}
