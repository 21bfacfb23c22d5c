//! `hikkoshi clone` end to end on real servers: 15 → 18 and 18 → 18 (pgvector), compared row by row.

use crate::common::scenario::*;
use crate::common::*;
use hikkoshi::localserver::LocalServer;

#[tokio::test(flavor = "multi_thread")]
async fn clone_15_to_18_copies_schema_rows_indexes_and_sequences_identically() {
    let s = server(15);
    let t = server(18);
    let src = create_db(&s, "app").await;
    src.batch_execute(FIXTURE_APP)
        .await
        .expect("loading the fixture");
    let tgt = create_db(&t, "app_copy").await;
    let out = hikkoshi(&clone_args(&s.url("app"), &t.uri("app_copy"), "2", "1MB"));
    assert_success(&out);
    assert_identical(&src, &tgt).await;
    assert!(
        hikkoshi_slots(&src).await.is_empty(),
        "a plain clone leaves no slot"
    );
    // big tables were really split: by key where there is one, by ctid where there is none
    let methods: Vec<(String, String, i64)> = tgt
        .query(
            "SELECT t.table_name, t.chunk_method, count(*) FROM hikkoshi.tables t
             JOIN hikkoshi.chunks c USING (schema_name, table_name)
             WHERE t.table_name IN ('events', 'clicks') GROUP BY 1, 2 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(methods.len(), 2, "{methods:?}");
    assert_eq!(methods[0].0, "clicks");
    assert_eq!(methods[0].1, "ctid");
    assert!(methods[0].2 > 1, "{methods:?}");
    assert_eq!(methods[1].1, "key");
    assert!(methods[1].2 > 1, "{methods:?}");
    // sequences moved: new rows get fresh keys on the target
    tgt.batch_execute("INSERT INTO app.orders (customer_id, status, ordered_at) SELECT id, 'pending', now() FROM app.customers LIMIT 1")
        .await
        .expect("inserting on the target after the clone");
}

#[tokio::test(flavor = "multi_thread")]
async fn clone_18_to_18_carries_pgvector_embeddings_and_large_json() {
    let s = server(18);
    let t = server(18);
    let src = create_db(&s, "api").await;
    src.batch_execute(FIXTURE_APP)
        .await
        .expect("loading app.sql");
    src.batch_execute(FIXTURE_VECTOR)
        .await
        .expect("loading vector.sql");
    // the HNSW index on vector(1536): .ci/prepare builds pgvector portably, so this runs on every CPU
    src.batch_execute(FIXTURE_VECTOR_HNSW).await.expect("hnsw");
    // an application role with grants, present on both servers as a migration prepares it: the grants must
    // survive next to an extension (whose archive entry has no owner)
    for server in [&s, &t] {
        connect(&server.socket_url("postgres"))
            .await
            .batch_execute("CREATE ROLE api_app LOGIN")
            .await
            .unwrap();
    }
    src.batch_execute(
        "GRANT USAGE ON SCHEMA app TO api_app; GRANT SELECT, INSERT ON public.documents TO api_app;",
    )
    .await
    .unwrap();
    let tgt = create_db(&t, "api").await;
    let out = hikkoshi(&clone_args(&s.uri("api"), &t.url("api"), "3", "512kB"));
    assert_success(&out);
    assert_identical(&src, &tgt).await;
    let n: i64 = tgt
        .query_one(
            "SELECT count(*) FROM public.documents WHERE vector_dims(embedding) = 1536",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 294);
}

#[tokio::test(flavor = "multi_thread")]
async fn include_and_exclude_patterns_select_what_is_created_and_copied() {
    let Sides { pair, src, tgt } = Pair::new(15, 18).source(FIXTURE_APP).await;
    let out = pair.hikkoshi(&[
        "clone",
        "--include",
        "app.*",
        "--exclude",
        "*.audit_*",
        "--exclude",
        "app.clicks",
    ]);
    assert_success(&out);
    let tables = user_tables(&tgt).await;
    assert!(
        !tables.iter().any(|t| t.contains("audit_log")),
        "{tables:?}"
    );
    assert!(!tables.iter().any(|t| t.contains("clicks")), "{tables:?}");
    assert!(
        !tables.iter().any(|t| t.starts_with("public.")),
        "{tables:?}"
    );
    // partitions follow their root
    assert!(
        tables.iter().any(|t| t.starts_with("app.measurements_")),
        "{tables:?}"
    );
    let expected: Vec<String> = user_tables(&src)
        .await
        .into_iter()
        .filter(|t| t.starts_with("app.") && !t.contains("audit_log") && !t.contains("clicks"))
        .collect();
    assert_eq!(tables, expected);
    for table in &tables {
        assert_eq!(
            rows_of(&src, table).await,
            rows_of(&tgt, table).await,
            "{table}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("selected"),
        "the user sees the selection: {stderr}"
    );
}

/// Money moves between accounts while the clone runs; every transfer also writes a ledger row. If all
/// chunks of both tables were read in one snapshot, each account's balance on the target equals its opening
/// balance plus its ledger entries on the target, and the total is unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn copy_is_one_instant_while_the_source_is_written() {
    let Sides { pair, src, tgt } = Pair::new(15, 18)
        .db("bank")
        .source(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, pad text);
             INSERT INTO accounts SELECT i, 1000, repeat('x', 200) FROM generate_series(1, 100000) i;
             CREATE TABLE ledger (id bigserial PRIMARY KEY, account int NOT NULL, delta bigint NOT NULL);
             CREATE TABLE movements (account int, delta bigint); -- no primary key: split by ctid
             ANALYZE;",
        )
        .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let url = pair.source_url();
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = connect(&url).await;
            let mut n: i64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let a = (n * 7919) % 100000 + 1;
                let b = (n * 104729) % 100000 + 1;
                c.batch_execute(&format!(
                    "BEGIN;
                     UPDATE accounts SET balance = balance - 5 WHERE id = {a};
                     UPDATE accounts SET balance = balance + 5 WHERE id = {b};
                     INSERT INTO ledger (account, delta) VALUES ({a}, -5), ({b}, 5);
                     INSERT INTO movements VALUES ({a}, -5), ({b}, 5);
                     COMMIT;"
                ))
                .await
                .unwrap();
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let out = pair.hikkoshi(&["clone", "--jobs", "3", "--chunk-size", "1MB"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let transfers = writer.await.unwrap();
    assert_success(&out);
    assert!(transfers > 10, "the writer ran ({transfers} transfers)");
    let chunks: i64 = tgt
        .query_one(
            "SELECT count(*) FROM hikkoshi.chunks WHERE table_name = 'accounts'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(chunks > 2, "accounts was split ({chunks} chunks)");
    let r = tgt
        .query_one(
            "SELECT (SELECT sum(balance) FROM accounts)::bigint,
                    (SELECT count(*) FROM accounts a WHERE a.balance <> 1000 + coalesce(
                        (SELECT sum(delta) FROM ledger l WHERE l.account = a.id), 0)),
                    (SELECT count(*) FROM ledger),
                    (SELECT count(*) FROM movements)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 100000 * 1000, "total balance changed");
    assert_eq!(
        r.get::<_, i64>(1),
        0,
        "balances disagree with the ledger: not one instant"
    );
    assert_eq!(
        r.get::<_, i64>(2),
        r.get::<_, i64>(3),
        "ledger and movements from different instants"
    );
    // the target's ledger is a prefix of the source's: what committed before the snapshot
    let n = r.get::<_, i64>(2);
    let src_prefix: i64 = src
        .query_one("SELECT count(*) FROM ledger WHERE id <= $1", &[&n])
        .await
        .unwrap()
        .get(0);
    assert_eq!(src_prefix, n);
}

/// Peak resident memory of a child process, read from /proc while it runs (VmHWM only grows).
fn run_measuring_peak_rss(args: &[&str]) -> (std::process::ExitStatus, u64) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hikkoshi"))
        .args(args)
        .env("HIKKOSHI_PG_BIN", pg_bin_for_dump())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_file)
            && let Some(kb) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status, peak_kb * 1024);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_stays_bounded_with_400_mb_of_2_mb_values() {
    let Sides { pair, src, tgt } = Pair::new(15, 18)
        .db("docs")
        .source(
            "CREATE TABLE docs (id int PRIMARY KEY, body jsonb NOT NULL, raw text NOT NULL);
             INSERT INTO docs SELECT i, jsonb_build_object('i', i, 'blob', repeat(md5(i::text), 31250)),
                                    repeat(md5((i + 1)::text), 31250)
             FROM generate_series(1, 200) i;",
        )
        .await;
    let (su, tu) = (pair.source_url(), pair.target_url());
    let (status, peak) = run_measuring_peak_rss(&clone_args(&su, &tu, "2", "1MB"));
    assert!(status.success());
    assert_identical(&src, &tgt).await;
    let moved: i64 = src
        .query_one(
            "SELECT sum(octet_length(body::text) + octet_length(raw))::bigint FROM docs",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(moved > 390_000_000, "the test moves ~400 MB ({moved})");
    assert!(peak > 0, "memory was measured");
    assert!(
        peak < 100 * 1024 * 1024,
        "peak RSS {} MB while moving {} MB: memory is not bounded",
        peak >> 20,
        moved >> 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unusual_tables_clone_identically() {
    let Sides { pair, src, tgt } = Pair::new(15, 15)
        .db("odd")
        .source(
            "CREATE TABLE no_columns ();
             INSERT INTO no_columns DEFAULT VALUES; INSERT INTO no_columns DEFAULT VALUES;
             CREATE TABLE dropped (a int, b text, c int PRIMARY KEY);
             INSERT INTO dropped SELECT i, 'x' || i, i FROM generate_series(1, 1000) i;
             ALTER TABLE dropped DROP COLUMN b;
             CREATE UNLOGGED TABLE scratch (k text PRIMARY KEY, v bytea);
             INSERT INTO scratch SELECT 'k' || i, decode(md5(i::text), 'hex') FROM generate_series(1, 500) i;
             CREATE TABLE parent (id int, kind text);
             CREATE TABLE child (extra int) INHERITS (parent);
             INSERT INTO parent VALUES (1, 'p'); INSERT INTO child VALUES (2, 'c', 9);
             CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
             CREATE DOMAIN moods AS mood[];
             CREATE TABLE feelings (id serial PRIMARY KEY, m moods, r int4range, h numeric);
             INSERT INTO feelings (m, r, h) VALUES ('{sad,happy}', '[1,5)', 1e100), (NULL, 'empty', 'NaN');
             CREATE SEQUENCE lonely INCREMENT 7; SELECT nextval('lonely'); SELECT nextval('lonely');",
        )
        .await;
    // shift the target's OIDs so that a value carrying a type OID would not read back
    tgt.batch_execute(
        "CREATE SCHEMA shift; CREATE TYPE shift.a AS ENUM ('x'); CREATE TYPE shift.b AS (x int);
         CREATE DOMAIN shift.c AS int;",
    )
    .await
    .unwrap();
    let out = pair.hikkoshi(&["clone", "--chunk-size", "8kB"]);
    assert_success(&out);
    assert_identical(&src, &tgt).await;
    let fmt: String = tgt
        .query_one(
            "SELECT copy_format FROM hikkoshi.tables WHERE table_name = 'feelings'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fmt, "text", "arrays of user types travel as text");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_the_migration_and_clean_removes_every_trace() {
    let Sides { pair, src, tgt } = Pair::new(15, 15)
        .source(
            "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a SELECT generate_series(1, 100);",
        )
        .await;
    let tu = pair.target_url();
    let out = hikkoshi(&["status", "--target", &tu]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no hikkoshi migration"));
    assert_success(&pair.hikkoshi(&["clone"]));
    let out = hikkoshi(&["status", "--target", &tu, "--json"]);
    assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["phase"], "done");
    assert_eq!(v["tables"][0]["table"], "public.a");
    assert_eq!(v["tables"][0]["state"], "indexed");
    assert_eq!(v["tables"][0]["rows_copied"], 100);
    assert!(
        !v.to_string().contains(hikkoshi::localserver::PASSWORD),
        "no secret in status"
    );
    let out = hikkoshi(&["status", "--target", &tu]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("public.a"),
        "{}",
        text(&out)
    );
    assert_success(&pair.hikkoshi(&["clean"]));
    assert!(!has_state(&tgt).await);
    assert!(hikkoshi_slots(&src).await.is_empty());
    assert_eq!(
        rows_of(&tgt, "a").await.len(),
        100,
        "clean keeps the copied data"
    );
    // idempotent
    assert_success(&pair.hikkoshi(&["clean"]));
}

/// Issue 14 with a superuser source: the roles that own or are granted objects, and their members, are
/// created on the target with their SCRAM verifiers copied (the same password logs in), their memberships
/// (WITH ADMIN OPTION), settings and database grants; names with quotes, spaces and Unicode; a grant to
/// PUBLIC; a role that exists on the target with other attributes is kept and the difference named; no
/// verifier reaches the output.
#[tokio::test(flavor = "multi_thread")]
async fn roles_owners_and_grants_come_along_with_their_passwords() {
    let pair = Pair::new(15, 18);
    for (server, sql) in [
        (
            &pair.s,
            "CREATE ROLE \"Owner \"\"Q\"\"\" NOLOGIN;
             CREATE ROLE readers NOLOGIN;
             CREATE ROLE \"ユーザー 1\" LOGIN PASSWORD 'unicode-pw' CONNECTION LIMIT 7;
             CREATE ROLE old_app LOGIN PASSWORD 'old-pw' CREATEDB;
             GRANT readers TO \"ユーザー 1\" WITH ADMIN OPTION;
             ALTER ROLE \"ユーザー 1\" SET statement_timeout = '5s';",
        ),
        // the target knows old_app already, without CREATEDB and with its own password
        (&pair.t, "CREATE ROLE old_app LOGIN PASSWORD 'target-pw';"),
    ] {
        connect(&server.socket_url("postgres"))
            .await
            .batch_execute(sql)
            .await
            .unwrap();
    }
    let Sides { pair, src, tgt } = pair
        .source(
            "CREATE SCHEMA shop AUTHORIZATION \"Owner \"\"Q\"\"\";
             SET ROLE \"Owner \"\"Q\"\"\";
             CREATE TABLE shop.items (id int PRIMARY KEY, name text);
             INSERT INTO shop.items SELECT g, 'item ' || g FROM generate_series(1, 50) g;
             GRANT USAGE ON SCHEMA shop TO readers, old_app;
             GRANT SELECT ON shop.items TO readers;
             GRANT SELECT ON shop.items TO PUBLIC;
             GRANT UPDATE (name) ON shop.items TO old_app;
             RESET ROLE;
             GRANT CONNECT ON DATABASE app TO \"ユーザー 1\";",
        )
        .await;
    // and one role takes another name on the target
    let out = pair.hikkoshi(&["clone", "--role-map", "readers=shop_readers"]);
    assert_success(&out);
    let said = text(&out);
    assert!(
        said.contains(
            "role old_app exists on the target with other attributes (CREATEDB on the source)"
        ),
        "{said}"
    );
    assert!(
        !said.contains("SCRAM-SHA-256$"),
        "a verifier reached the output:\n{said}"
    );
    // (privileges differ by the mapped name: compared below)
    assert_eq!(
        rows_of(&src, "shop.items").await,
        rows_of(&tgt, "shop.items").await
    );
    // owners and grants as on the source
    // (the owner's own implicit privileges differ between versions: 17 adds MAINTAIN)
    let acl = "SELECT pg_get_userbyid(c.relowner)::text,
                      (SELECT string_agg(a.grantee::regrole::text || '=' || a.privilege_type, ',' ORDER BY 1)
                       FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner),
                      (SELECT attacl::text FROM pg_attribute WHERE attrelid = c.oid AND attname = 'name')
               FROM pg_class c WHERE c.oid = 'shop.items'::regclass";
    let (s, t) = (
        src.query_one(acl, &[]).await.unwrap(),
        tgt.query_one(acl, &[]).await.unwrap(),
    );
    assert_eq!(t.get::<_, String>(0), "Owner \"Q\"");
    for i in [1, 2] {
        assert_eq!(
            s.get::<_, Option<String>>(i)
                .map(|g| g.replace("readers=", "shop_readers=")),
            t.get::<_, Option<String>>(i),
            "grants differ"
        );
    }
    assert!(
        t.get::<_, Option<String>>(1)
            .is_some_and(|g| g.contains("shop_readers=SELECT") && g.contains("-=SELECT")),
        "{:?}",
        t.get::<_, Option<String>>(1)
    );
    let readers: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'readers'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(readers, 0, "the mapped role kept its source name");
    // the verifier is the source's, so the old password logs in on the target
    let verifier = "SELECT rolpassword FROM pg_authid WHERE rolname = 'ユーザー 1'";
    assert_eq!(
        src.query_one(verifier, &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        tgt.query_one(verifier, &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    );
    let login = format!(
        "host=127.0.0.1 port={} user='ユーザー 1' password=unicode-pw dbname=app sslmode=disable",
        pair.t.port
    );
    let app = connect(&login).await;
    let n: i64 = app
        .query_one("SELECT count(*) FROM shop.items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50);
    let facts = "SELECT r.rolconnlimit, m.admin_option, s.setconfig::text
                 FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid
                 JOIN pg_roles g ON g.oid = m.roleid AND g.rolname = 'shop_readers'
                 LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid
                 WHERE r.rolname = 'ユーザー 1'";
    let row = tgt.query_one(facts, &[]).await.unwrap();
    assert_eq!(
        (
            row.get::<_, i32>(0),
            row.get::<_, bool>(1),
            row.get::<_, Option<String>>(2)
        ),
        (7, true, Some("{statement_timeout=5s}".to_string()))
    );
    // owners and grants changed on the source afterwards are differences that verify names
    let out = pair.hikkoshi(&["verify"]);
    assert_success(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 table(s) equal, 0 different"),
        "{}",
        text(&out)
    );
    src.batch_execute(
        "REVOKE SELECT ON shop.items FROM PUBLIC; ALTER TABLE shop.items OWNER TO readers;",
    )
    .await
    .unwrap();
    pair.verify_finds(&[
        // (named as the target names the role: --role-map made readers shop_readers)
        "shop.items: owner is shop_readers on the source, \"Owner \"\"Q\"\"\" on the target",
        "shop.items: grants is",
        "1 table(s) equal, 0 different",
    ]);
    // the role that was there keeps its password
    let kept = format!(
        "host=127.0.0.1 port={} user=old_app password=target-pw dbname=app sslmode=disable",
        pair.t.port
    );
    connect(&kept).await;
}

/// Issue 14 on PostgreSQL 13 → 15 with managed-server roles: the source's owner has REPLICATION and no
/// superuser (it cannot read passwords); the target's admin has CREATEROLE and no superuser (before 16 it
/// may grant itself any role it created). Owners and grants arrive as on the source; the LOGIN roles are
/// NOLOGIN until given a password, then log in with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_createrole_admin_before_16_carries_owners_and_grants() {
    let (s, t) = (server(13), server(15));
    let source = managed_db(
        &s,
        "CREATE ROLE migrator LOGIN REPLICATION PASSWORD 'src-pw';
         CREATE ROLE shop_rw NOLOGIN;
         CREATE ROLE shop_app LOGIN PASSWORD 'app-pw' IN ROLE shop_rw;",
        "migrator",
        "src-pw",
    )
    .await;
    let target = managed_db(
        &t,
        "CREATE ROLE tadmin LOGIN CREATEDB CREATEROLE PASSWORD 'tgt-pw';",
        "tadmin",
        "tgt-pw",
    )
    .await;
    let src = connect(&source).await;
    src.batch_execute(
        "CREATE TABLE public.items (id int PRIMARY KEY, name text);
         INSERT INTO public.items SELECT g, 'item ' || g FROM generate_series(1, 20) g;
         GRANT SELECT, INSERT ON public.items TO shop_rw;
         ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO shop_rw;",
    )
    .await
    .unwrap();
    let check = hikkoshi(&["check", "--source", &source, "--target", &target]);
    assert!(
        text(&check).contains("--role-password 'shop_app=env:VARIABLE'"),
        "{}",
        text(&check)
    );
    let out = hikkoshi(&["clone", "--source", &source, "--target", &target]);
    assert_success(&out);
    assert!(text(&out).contains("created NOLOGIN"), "{}", text(&out));
    let tgt = connect(&target).await;
    assert_identical(&src, &tgt).await;
    let access = "SELECT pg_get_userbyid(relowner)::text,
                         (SELECT string_agg(a.grantee::regrole::text || '=' || a.privilege_type, ',' ORDER BY 1)
                          FROM aclexplode(relacl) a WHERE a.grantee <> relowner),
                         (SELECT defaclacl::text FROM pg_default_acl)
                  FROM pg_class WHERE oid = 'public.items'::regclass";
    let (a, b) = (
        src.query_one(access, &[]).await.unwrap(),
        tgt.query_one(access, &[]).await.unwrap(),
    );
    for i in 0..3 {
        assert_eq!(a.get::<_, Option<String>>(i), b.get::<_, Option<String>>(i));
    }
    assert_eq!(b.get::<_, Option<String>>(0).as_deref(), Some("migrator"));
    // the password, given on a later run, lets the application log in on the target
    let out = hikkoshi_env(
        &[
            "clone",
            "--source",
            &source,
            "--target",
            &target,
            "--role-password",
            "shop_app=env:SHOP_APP_PW",
        ],
        &[("SHOP_APP_PW", "app-pw")],
    );
    assert_success(&out);
    assert!(!text(&out).contains("app-pw"), "{}", text(&out));
    let app = connect(&format!(
        "host=127.0.0.1 port={} user=shop_app password=app-pw dbname=shop sslmode=disable",
        t.port
    ))
    .await;
    app.batch_execute("INSERT INTO public.items VALUES (100, 'by the app')")
        .await
        .unwrap();
}

/// A database `shop` owned by `owner` after `roles_sql` ran on `server`; its connection string as `owner`.
async fn managed_db(server: &LocalServer, roles_sql: &str, owner: &str, password: &str) -> String {
    let admin = connect(&server.socket_url("postgres")).await;
    admin.batch_execute(roles_sql).await.unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE shop OWNER {owner}"))
        .await
        .unwrap();
    format!(
        "host=127.0.0.1 port={} user={owner} password={password} dbname=shop sslmode=disable",
        server.port
    )
}
