//! Issue 23: a cutover that exits 0 never locks a login role out of the new primary. The harness's servers
//! ask for `scram-sha-256` on every TCP line of pg_hba.conf (PostgreSQL 18's default), and the application
//! logs in over TCP with its password, as it will after the switch.

use crate::common::live::*;
use crate::common::scenario::*;
use crate::common::*;
use hikkoshi::localserver::{LocalServer, ServerOptions};
use tokio_postgres::{Client, NoTls};

/// The application's role and the grants it writes with.
const APP_GRANTS: &str = "GRANT USAGE ON SCHEMA app TO app_writer;
                          GRANT SELECT, INSERT, UPDATE ON app.orders TO app_writer;";

/// Whether `user` logs in to `app` on `server` over TCP with `password`: Ok, or why not.
async fn logs_in(server: &LocalServer, user: &str, password: &str) -> Result<(), String> {
    let url = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=app sslmode=disable",
        server.port
    );
    let why = |e: tokio_postgres::Error| {
        e.as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string())
    };
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await.map_err(why)?;
    tokio::spawn(conn);
    c.query_one("SELECT count(*) FROM app.orders", &[])
        .await
        .map(|_| ())
        .map_err(why)
}

async fn verifier(c: &Client, role: &str) -> String {
    c.query_one(
        "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
        &[&role],
    )
    .await
    .unwrap()
    .get(0)
}

/// PostgreSQL 13 hashes passwords with md5 by default (and its pg_hba.conf says md5); the clone copies
/// that verifier as it is, and 18's `scram-sha-256` lines refuse it. `check` says so before the clone, the cutover refuses before the fence
/// with the fix (and the application indeed cannot log in there yet); once `--role-password` gives the
/// role a SCRAM password, the cutover goes through and the application logs in to the new primary with
/// its password. No verifier or password is printed.
#[tokio::test(flavor = "multi_thread")]
async fn an_md5_password_from_13_is_refused_before_the_fence_until_the_role_can_log_in_on_18() {
    // a source as PostgreSQL 13 was set up: md5 in pg_hba.conf (which accepts md5 verifiers)
    let md5_host = ServerOptions {
        host_auth: Some("md5".into()),
        ..Default::default()
    };
    let sides = Pair::of(server_with(13, md5_host), server(18))
        .app()
        .await
        .then(&format!(
            "SET password_encryption = 'md5'; CREATE ROLE app_writer LOGIN PASSWORD 'pw-13'; {APP_GRANTS}"
        ))
        .await;
    let md5 = verifier(
        &connect(&sides.pair.s.socket_url("postgres")).await,
        "app_writer",
    )
    .await;
    assert!(md5.starts_with("md5"), "the source's verifier is not md5");
    let check = sides.pair.hikkoshi(&["check"]);
    assert!(
        text(&check).contains("role app_writer logs in on the source but could not on the target")
            && text(&check).contains("md5"),
        "{}",
        text(&check)
    );
    let Live { pair, src, tgt, f } = sides.following().await;
    let out = pair.hikkoshi(&["cutover"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for needle in [
        "role app_writer",
        "md5 password verifier",
        "scram-sha-256",
        "--role-password 'app_writer=env:VARIABLE'",
        "Nothing was fenced",
    ] {
        assert!(said.contains(needle), "{needle:?} not in:\n{said}");
    }
    assert!(!said.contains(&md5) && !said.contains("pw-13"), "{said}");
    logs_in(&pair.s, "app_writer", "pw-13").await.unwrap();
    // the refusal was no false alarm: the copied md5 verifier does not let the application in
    assert!(logs_in(&pair.t, "app_writer", "pw-13").await.is_err());

    let (status, log) = f.stop();
    assert!(status.success(), "{log}");
    let mut f = Follower::start_between(
        &pair.source_url(),
        &pair.target_url(),
        &["--role-password", "app_writer=env:APP_WRITER_PW"],
        &[("APP_WRITER_PW", "pw-13")],
    );
    wait_in_sync(&src, &tgt, &mut f).await;
    let out = pair.hikkoshi(&["cutover"]);
    assert_success(&out);
    assert!(!text(&out).contains("pw-13"), "{}", text(&out));
    assert!(f.exits_by_itself().await.success(), "{}", f.log());
    logs_in(&pair.t, "app_writer", "pw-13").await.unwrap();
}

/// A password changed on the source while the clone follows is carried at the cutover, before the fence:
/// the report names the role (never the verifier), the new password logs in to the new primary and the
/// old one no longer does.
#[tokio::test(flavor = "multi_thread")]
async fn a_password_changed_on_the_source_during_the_follow_works_on_the_new_primary() {
    let Live {
        pair, src, mut f, ..
    } = Pair::new(15, 18)
        .app()
        .await
        .then(&format!(
            "CREATE ROLE app_writer LOGIN PASSWORD 'before'; {APP_GRANTS}"
        ))
        .await
        .following()
        .await;
    logs_in(&pair.t, "app_writer", "before").await.unwrap();
    src.batch_execute("ALTER ROLE app_writer PASSWORD 'after' VALID UNTIL '2999-01-01'")
        .await
        .unwrap();
    let new = verifier(&connect(&pair.s.socket_url("postgres")).await, "app_writer").await;
    let out = pair.hikkoshi(&["cutover"]);
    assert_success(&out);
    let said = text(&out);
    assert!(said.contains("app_writer: password"), "{said}");
    assert!(said.contains("app_writer: VALID UNTIL"), "{said}");
    assert!(!said.contains(&new) && !said.contains("after'"), "{said}");
    assert!(f.exits_by_itself().await.success(), "{}", f.log());
    logs_in(&pair.t, "app_writer", "after").await.unwrap();
    assert!(logs_in(&pair.t, "app_writer", "before").await.is_err());
}

/// A role left NOLOGIN on the target by an earlier, abandoned migration is kept as it is there by the
/// clone; the cutover looks at it all the same and refuses, naming it with the fix, before anything is
/// fenced. Once `ALTER ROLE … LOGIN` ran on the target, the cutover passes and the application logs in.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_left_nologin_on_the_target_blocks_the_cutover_until_it_may_log_in() {
    let pair = Pair::new(15, 18);
    connect(&pair.t.socket_url("postgres"))
        .await
        .batch_execute("CREATE ROLE app_writer NOLOGIN PASSWORD 'pw'")
        .await
        .unwrap();
    let Live {
        pair, mut f, tgt, ..
    } = pair
        .app()
        .await
        .then(&format!(
            "CREATE ROLE app_writer LOGIN PASSWORD 'pw'; {APP_GRANTS}"
        ))
        .await
        .following()
        .await;
    let out = pair.hikkoshi(&["cutover"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for needle in [
        "role app_writer: it is NOLOGIN on the target",
        "ALTER ROLE \"app_writer\" LOGIN",
        "Nothing was fenced",
    ] {
        assert!(said.contains(needle), "{needle:?} not in:\n{said}");
    }
    logs_in(&pair.s, "app_writer", "pw").await.unwrap();
    tgt.batch_execute("ALTER ROLE app_writer LOGIN")
        .await
        .unwrap();
    let out = pair.hikkoshi(&["cutover"]);
    assert_success(&out);
    assert!(f.exits_by_itself().await.success(), "{}", f.log());
    logs_in(&pair.t, "app_writer", "pw").await.unwrap();
}
