//! Migration state, kept in the target database in schema `hikkoshi`, so that any machine that reaches the
//! target can resume or inspect the migration.
//!
//! Tables move through `pending → copying → copied → indexed → streaming` (the last set by a follower); chunks through `pending → copying → copied`.
//! A chunk's rows and its `copied` mark commit in one target transaction, so a crash anywhere leaves either
//! both or neither: a rerun copies exactly the chunks that are not marked. `copying` only says a worker
//! claimed the chunk; on start, a run (holding the migration lock) turns leftover claims back to `pending`.

use tokio_postgres::Client;

use crate::ident::QualifiedName;
use crate::lsn::Lsn;

/// The advisory lock key that makes one process at a time the owner of a migration ("hiks").
pub const LOCK_KEY: i64 = 0x6869_6b73;

/// SQL listing the backends that hold the migration lock in the current database (a bigint advisory key
/// shows in pg_locks as classid = high 32 bits, objid = low 32 bits, objsubid = 1).
pub fn lock_holders_sql() -> String {
    format!(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND classid = {} AND objid = {} AND objsubid = 1
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        LOCK_KEY >> 32,
        LOCK_KEY & 0xffff_ffff
    )
}

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

/// A table as recorded in the state.
#[derive(Clone, Debug)]
pub struct TableState {
    pub name: QualifiedName,
    pub state: String,
    pub copy_format: String,
    pub chunk_method: Option<String>,
}

/// A chunk as recorded in the state.
#[derive(Clone, Debug)]
pub struct ChunkState {
    pub table: QualifiedName,
    pub no: i32,
    pub predicate: Option<String>,
    pub state: String,
    pub est_bytes: i64,
    pub rows: Option<i64>,
    pub bytes: Option<i64>,
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

/// Tries to become the one process working on this migration; the lock lives as long as `client`'s session.
pub async fn try_lock(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await?
        .get(0))
}

pub async fn tables(client: &Client) -> Result<Vec<TableState>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT schema_name, table_name, state, copy_format, chunk_method
             FROM hikkoshi.tables ORDER BY schema_name, table_name",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| TableState {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            state: r.get(2),
            copy_format: r.get(3),
            chunk_method: r.get(4),
        })
        .collect())
}

pub async fn chunks(client: &Client) -> Result<Vec<ChunkState>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT schema_name, table_name, chunk_no, predicate, state, est_bytes, rows_copied, bytes_copied
             FROM hikkoshi.chunks ORDER BY schema_name, table_name, chunk_no",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| ChunkState {
            table: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            no: r.get(2),
            predicate: r.get(3),
            state: r.get(4),
            est_bytes: r.get(5),
            rows: r.get(6),
            bytes: r.get(7),
        })
        .collect())
}

/// Records the slot and publication a following clone streams from (once, when they are created).
pub async fn insert_stream(
    client: &Client,
    slot: &str,
    publication: &str,
    start: Lsn,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO hikkoshi.stream (slot_name, publication, start_lsn, applied_lsn, synced_lsn, source_lsn)
             VALUES ($1, $2, $3::text::pg_lsn, $3::text::pg_lsn, $3::text::pg_lsn, $3::text::pg_lsn)",
            &[&slot, &publication, &start.to_string()],
        )
        .await?;
    Ok(())
}

/// The slot and publication of a following clone, if this migration follows.
pub async fn stream_names(
    client: &Client,
) -> Result<Option<(String, String)>, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT slot_name, publication FROM hikkoshi.stream", &[])
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Steps of a cutover as recorded in `hikkoshi.cutover` on the migration's target.
pub mod step {
    /// The source is being fenced or is fenced; the target catches up.
    pub const FENCED: &str = "fenced";
    /// Given up before the point of no return: the source is the primary again.
    pub const ABORTED: &str = "aborted";
    /// Done: the target is the primary; the forward stream has ended.
    pub const SWITCHED: &str = "switched";
    /// A rollback has fenced the target and waits for the old source to catch up.
    pub const ROLLING_BACK: &str = "rolling-back";
    /// Rolled back: the old source is the primary again; the reverse stream has ended.
    pub const ROLLED_BACK: &str = "rolled-back";
}

/// The recorded cutover: its step and whether it keeps a reverse stream.
pub async fn cutover_step(
    client: &Client,
) -> Result<Option<(String, bool)>, tokio_postgres::Error> {
    if !client
        .query_one("SELECT to_regclass('hikkoshi.cutover') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0)
    {
        return Ok(None);
    }
    Ok(client
        .query_opt("SELECT step, reverse FROM hikkoshi.cutover", &[])
        .await?
        .map(|r| (r.get(0), r.get(1))))
}
