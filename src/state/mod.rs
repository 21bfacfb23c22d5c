//! Migration state, kept in the target database in schema `hikkoshi`, so that any machine that reaches the
//! target can resume or inspect the migration.
//!
//! Every statement on `hikkoshi.*` lives here, one file per record: `copy` (tables and chunks), `stream`
//! (the stream's row), `cutover` (the cutover's step), `lock` (the migration lock), `report` (what `status`
//! reads); the migration and its event log here. The applier's two statements (`stream::RECORD_APPLIED`,
//! `copy::MARK_STREAMED`) are here too, as text: it sends them in the same target transaction as the data
//! they cover.

pub mod copy;
pub mod cutover;
pub mod ddl;
pub mod lock;
pub mod report;
pub mod roles;
pub mod stream;

use tokio_postgres::Client;

pub use copy::{ChunkState, ChunkStatus, TableState, TableStatus, chunks, tables};
pub use cutover::Step;
pub use lock::{LOCK_KEY, lock_holders_sql, try_lock};
pub use stream::{insert_stream, stream_names};

const DDL: &str = "
CREATE SCHEMA IF NOT EXISTS hikkoshi;
CREATE TABLE IF NOT EXISTS hikkoshi.migration (
    id          text PRIMARY KEY,
    source      text NOT NULL,
    phase       text NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- whether the restore kept the source's owners and grants (then verify and the cutover compare them)
ALTER TABLE hikkoshi.migration ADD COLUMN IF NOT EXISTS owners_kept boolean;
CREATE TABLE IF NOT EXISTS hikkoshi.tables (
    schema_name  text NOT NULL,
    table_name   text NOT NULL,
    root_schema  text,
    root_name    text,
    state        text NOT NULL DEFAULT 'pending',
    copy_format  text NOT NULL,
    chunk_method text,
    est_bytes    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (schema_name, table_name)
);
CREATE TABLE IF NOT EXISTS hikkoshi.chunks (
    schema_name  text NOT NULL,
    table_name   text NOT NULL,
    chunk_no     int NOT NULL,
    predicate    text,
    state        text NOT NULL DEFAULT 'pending',
    est_bytes    bigint NOT NULL DEFAULT 0,
    rows_copied  bigint,
    bytes_copied bigint,
    snapshot_lsn pg_lsn,
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (schema_name, table_name, chunk_no),
    FOREIGN KEY (schema_name, table_name) REFERENCES hikkoshi.tables ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS hikkoshi.stream (
    slot_name        text NOT NULL,
    publication      text NOT NULL,
    start_lsn        pg_lsn NOT NULL,
    applied_lsn      pg_lsn NOT NULL,
    applied_at       timestamptz,
    last_commit_time timestamptz,
    applied_txns     bigint NOT NULL DEFAULT 0,
    synced_lsn       pg_lsn NOT NULL,
    source_lsn       pg_lsn NOT NULL,
    seen_at          timestamptz,
    rate_tps         double precision
);
ALTER TABLE hikkoshi.tables ADD COLUMN IF NOT EXISTS streamed boolean NOT NULL DEFAULT false;
ALTER TABLE hikkoshi.stream ADD COLUMN IF NOT EXISTS stall_seconds integer;
ALTER TABLE hikkoshi.stream ADD COLUMN IF NOT EXISTS sender_timeout_ms bigint;
CREATE TABLE IF NOT EXISTS hikkoshi.cutover (
    one              boolean PRIMARY KEY DEFAULT true CHECK (one),
    step             text NOT NULL,
    reverse          boolean NOT NULL DEFAULT false,
    fence_lsn        pg_lsn,
    fence_means      text,
    source_prior     text,
    target_prior     text,
    started_at       timestamptz NOT NULL DEFAULT now(),
    fenced_at        timestamptz,
    finished_at      timestamptz,
    pause_seconds    double precision,
    message          text
);
CREATE TABLE IF NOT EXISTS hikkoshi.roles (
    name        text PRIMARY KEY,
    created     boolean NOT NULL,
    can_log_in  boolean NOT NULL
);
ALTER TABLE hikkoshi.roles ADD COLUMN IF NOT EXISTS source_version bigint;
ALTER TABLE hikkoshi.roles ADD COLUMN IF NOT EXISTS password_given boolean NOT NULL DEFAULT false;
CREATE TABLE IF NOT EXISTS hikkoshi.events (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    kind    text NOT NULL,
    message text NOT NULL
);
";

/// Where the migration stands as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// State created; the pre-data schema may or may not be on the target yet.
    Schema,
    /// Tables exist on the target; chunks are being copied.
    Copy,
    /// All rows copied; indexes and constraints being built.
    PostData,
    /// Everything copied, indexed and sequences set.
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Schema => "schema",
            Phase::Copy => "copy",
            Phase::PostData => "post-data",
            Phase::Done => "done",
        }
    }
    fn parse(s: &str) -> Phase {
        match s {
            "copy" => Phase::Copy,
            "post-data" => Phase::PostData,
            "done" => Phase::Done,
            _ => Phase::Schema,
        }
    }
}

/// The migration recorded on a target.
#[derive(Clone, Debug)]
pub struct Migration {
    pub id: String,
    pub source: String,
    pub phase: Phase,
    pub options: serde_json::Value,
}

/// Whether the target has hikkoshi state at all.
pub async fn exists(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT to_regclass('hikkoshi.migration') IS NOT NULL", &[])
        .await?
        .get(0))
}

/// Creates the state schema (idempotent).
pub async fn create(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(DDL).await
}

/// The migration on this target, if any.
pub async fn load(client: &Client) -> Result<Option<Migration>, tokio_postgres::Error> {
    if !exists(client).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT id, source, phase, options FROM hikkoshi.migration ORDER BY created_at LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|r| Migration {
        id: r.get(0),
        source: r.get(1),
        phase: Phase::parse(r.get::<_, &str>(2)),
        options: r.get::<_, serde_json::Value>(3),
    }))
}

pub async fn insert_migration(
    client: &Client,
    id: &str,
    source: &str,
    options: &serde_json::Value,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO hikkoshi.migration (id, source, phase, options) VALUES ($1, $2, 'schema', $3)",
            &[&id, &source, options],
        )
        .await?;
    Ok(())
}

pub async fn set_phase(client: &Client, phase: Phase) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE hikkoshi.migration SET phase = $1, updated_at = now()",
            &[&phase.as_str()],
        )
        .await?;
    event(client, "phase", &format!("phase {}", phase.as_str())).await
}

/// Appends to the migration's event log (never row values or secrets).
pub async fn event(
    client: &Client,
    kind: &str,
    message: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO hikkoshi.events (kind, message) VALUES ($1, $2)",
            &[&kind, &message],
        )
        .await?;
    Ok(())
}
