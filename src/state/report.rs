//! What `status`, the status page, `/metrics` and `/health` read of the state: the migration, its tables with
//! their chunks' progress, the stream, the recent events and the cutover, in one picture.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Error, Side};

/// One table's line in the status.
#[derive(Debug, Serialize)]
pub struct TableStatus {
    pub table: String,
    pub state: String,
    pub copy_format: String,
    pub chunk_method: Option<String>,
    pub chunks: i64,
    pub chunks_copied: i64,
    pub rows_copied: i64,
    pub bytes_copied: i64,
    /// The planner's estimate of the table's size, for progress and ETA.
    pub est_bytes: i64,
}

/// A cutover or rollback as recorded.
#[derive(Debug, Serialize)]
pub struct CutoverStatus {
    pub step: String,
    pub reverse: bool,
    pub fence_lsn: Option<String>,
    pub pause_seconds: Option<f64>,
    pub message: Option<String>,
}

/// The change stream of a following clone.
#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub slot: String,
    /// Source LSN up to which every change is committed on the target.
    pub applied_lsn: String,
    /// Source LSN up to which the target is known to be in sync (applied, or nothing to apply).
    pub synced_lsn: String,
    /// The source's WAL position last reported to the follower.
    pub source_lsn: String,
    pub lag_bytes: i64,
    /// How old the last applied source commit is, while behind; 0 when in sync.
    pub lag_seconds: f64,
    pub transactions_applied: i64,
    pub apply_rate_tps: f64,
    /// A follower holds the migration lock and reported within the last 10 s.
    pub follower_running: bool,
    /// How long the source may stay silent before the follower reconnects (from its wal_sender_timeout).
    pub stall_limit_seconds: Option<i32>,
    /// The source's wal_sender_timeout in milliseconds, as the follower read it.
    pub source_wal_sender_timeout_ms: Option<i64>,
}

/// The whole picture.
#[derive(Debug, Serialize)]
pub struct Status {
    pub migration_id: Option<String>,
    pub source: Option<String>,
    pub phase: Option<String>,
    pub tables: Vec<TableStatus>,
    pub stream: Option<StreamStatus>,
    pub recent_events: Vec<(String, String, String)>,
    /// The last DDL commands the stream applied or passed over, newest first.
    pub recent_ddl: Vec<super::ddl::Logged>,
    pub cutover: Option<CutoverStatus>,
    /// The last error recorded by a hikkoshi process, if nothing has progressed since.
    pub last_error: Option<String>,
    /// Large objects on the target. Logical decoding does not carry them: the stream does not move their
    /// changes; the cutover compares them and copies what changed.
    pub large_objects: i64,
}

/// Reads the whole picture from the target (an empty one when there is no migration).
pub async fn read(client: &Client) -> Result<Status, Error> {
    let sql = |w: &'static str| Error::sql(Side::Target, w);
    let Some(m) = super::load(client)
        .await
        .map_err(sql("reading hikkoshi.migration"))?
    else {
        return Ok(Status {
            migration_id: None,
            source: None,
            phase: None,
            tables: vec![],
            stream: None,
            recent_events: vec![],
            recent_ddl: vec![],
            cutover: None,
            last_error: None,
            large_objects: 0,
        });
    };
    let rows = client
        .query(
            "SELECT t.schema_name, t.table_name, t.state, t.copy_format, t.chunk_method,
                    count(c.*), count(c.*) FILTER (WHERE c.state = 'copied'),
                    coalesce(sum(c.rows_copied), 0)::bigint, coalesce(sum(c.bytes_copied), 0)::bigint,
                    greatest(t.est_bytes, coalesce(sum(c.est_bytes), 0))::bigint
             FROM hikkoshi.tables t
             LEFT JOIN hikkoshi.chunks c USING (schema_name, table_name)
             GROUP BY t.schema_name, t.table_name, t.state, t.copy_format, t.chunk_method, t.est_bytes
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(sql("reading hikkoshi.tables"))?;
    let tables = rows
        .iter()
        .map(|r| TableStatus {
            table: crate::ident::QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1))
                .to_string(),
            state: r.get(2),
            copy_format: r.get(3),
            chunk_method: r.get(4),
            chunks: r.get(5),
            chunks_copied: r.get(6),
            rows_copied: r.get(7),
            bytes_copied: r.get(8),
            est_bytes: r.get(9),
        })
        .collect();
    let stream = client
        .query_opt(
            &format!(
                "SELECT slot_name, applied_lsn::text, synced_lsn::text, source_lsn::text,
                        greatest(pg_wal_lsn_diff(source_lsn, synced_lsn), 0)::bigint,
                        CASE WHEN synced_lsn >= source_lsn OR last_commit_time IS NULL THEN 0
                             ELSE greatest(extract(epoch FROM now() - last_commit_time), 0) END::float8,
                        applied_txns, coalesce(rate_tps, 0),
                        coalesce(seen_at > now() - interval '10 seconds', false)
                        AND EXISTS ({}),
                        stall_seconds, sender_timeout_ms
                 FROM hikkoshi.stream",
                super::lock_holders_sql()
            ),
            &[],
        )
        .await
        .map_err(sql("reading hikkoshi.stream"))?
        .map(|r| StreamStatus {
            slot: r.get(0),
            applied_lsn: r.get(1),
            synced_lsn: r.get(2),
            source_lsn: r.get(3),
            lag_bytes: r.get(4),
            lag_seconds: r.get(5),
            transactions_applied: r.get(6),
            apply_rate_tps: r.get(7),
            follower_running: r.get(8),
            stall_limit_seconds: r.get(9),
            source_wal_sender_timeout_ms: r.get(10),
        });
    let events = client
        .query(
            "SELECT to_char(at, 'YYYY-MM-DD HH24:MI:SS'), kind, message
             FROM hikkoshi.events ORDER BY id DESC LIMIT 10",
            &[],
        )
        .await
        .map_err(sql("reading hikkoshi.events"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let cutover = match super::cutover::recorded(client)
        .await
        .map_err(sql("reading hikkoshi.cutover"))?
    {
        None => None,
        Some(_) => client
            .query_opt(
                "SELECT step, reverse, fence_lsn::text, pause_seconds, message FROM hikkoshi.cutover",
                &[],
            )
            .await
            .map_err(sql("reading hikkoshi.cutover"))?
            .map(|r| CutoverStatus {
                step: r.get(0),
                reverse: r.get(1),
                fence_lsn: r.get(2),
                pause_seconds: r.get(3),
                message: r.get(4),
            }),
    };
    // an error counts until something newer than it happened: the stream reported, or a phase moved on
    let last_error: Option<String> = client
        .query_opt(
            "SELECT e.message FROM hikkoshi.events e
             WHERE e.kind = 'error'
               AND e.at >= coalesce((SELECT max(seen_at) FROM hikkoshi.stream), '-infinity')
               AND NOT EXISTS (SELECT 1 FROM hikkoshi.events l WHERE l.id > e.id AND l.kind <> 'error')
             ORDER BY e.id DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(sql("reading hikkoshi.events"))?
        .map(|r| r.get(0));
    let large_objects: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_largeobject_metadata",
            &[],
        )
        .await
        .map_err(sql("counting large objects"))?
        .get(0);
    Ok(Status {
        cutover,
        last_error,
        large_objects,
        migration_id: Some(m.id),
        source: Some(m.source),
        phase: Some(m.phase.as_str().to_string()),
        tables,
        stream,
        recent_events: events,
        recent_ddl: super::ddl::recent(client, 20).await,
    })
}
