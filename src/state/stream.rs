//! The stream's record: one row of `hikkoshi.stream` on the server the stream applies to (the target, or
//! the old source for a reverse stream). `applied_lsn` itself is written by the applier in the same target
//! transaction as the changes it covers (`stream::apply`); everything else about the stream is here.

use tokio_postgres::Client;

use crate::lsn::Lsn;

/// Records the slot and publication a stream reads (once, when they are created), starting at `start`.
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

/// The applier's record of a batch, sent in the target transaction that applies it: $1 the end LSN of its
/// last source transaction, $2 that transaction's commit time (seconds since the epoch), $3 how many source
/// transactions it holds.
pub const RECORD_APPLIED: &str = "UPDATE hikkoshi.stream SET applied_lsn = greatest(applied_lsn, $1::text::pg_lsn), \
     applied_at = now(), last_commit_time = to_timestamp($2::text::float8), \
     applied_txns = applied_txns + $3::text::bigint";

fn lsn_of(text: Option<String>) -> Lsn {
    text.and_then(|s| s.parse().ok()).unwrap_or_default()
}

/// The end of the last source transaction committed here.
pub async fn applied_lsn(client: &Client) -> Result<Lsn, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT applied_lsn::text FROM hikkoshi.stream", &[])
        .await?;
    Ok(lsn_of(row.get(0)))
}

/// Where the stream started: the following clone's snapshot.
pub async fn start_lsn(client: &Client) -> Result<Lsn, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT start_lsn::text FROM hikkoshi.stream", &[])
        .await?;
    Ok(lsn_of(row.get(0)))
}

/// How long the follower lets the source stay silent, and the source's wal_sender_timeout it derived that
/// from (for `status`).
pub async fn record_stall_limit(
    status: &Client,
    stall_seconds: i32,
    sender_timeout_ms: i64,
) -> Result<(), tokio_postgres::Error> {
    status
        .execute(
            "UPDATE hikkoshi.stream SET stall_seconds = $1, sender_timeout_ms = $2",
            &[&stall_seconds, &sender_timeout_ms],
        )
        .await?;
    Ok(())
}

/// How far the source is, how far we are in sync and how fast we apply.
pub async fn record_progress(
    status: &Client,
    synced: Lsn,
    server_end: Lsn,
    rate_tps: f64,
) -> Result<(), tokio_postgres::Error> {
    status
        .execute(
            "UPDATE hikkoshi.stream SET synced_lsn = greatest(synced_lsn, $1::text::pg_lsn),
                    source_lsn = greatest(source_lsn, $2::text::pg_lsn), seen_at = now(), rate_tps = $3",
            &[&synced.to_string(), &server_end.to_string(), &rate_tps],
        )
        .await?;
    Ok(())
}

/// Bytes of WAL between `upstream_position` and what this side has applied or is in sync with.
pub async fn lag_bytes(
    client: &Client,
    upstream_position: &str,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT greatest(0, $1::text::pg_lsn - greatest(applied_lsn, synced_lsn))::bigint
             FROM hikkoshi.stream",
            &[&upstream_position],
        )
        .await?
        .get(0))
}

/// Whether this side has applied `marker` (with `applied_only`; else applied or in sync past it).
pub async fn reached(
    client: &Client,
    marker: &str,
    applied_only: bool,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT CASE WHEN $2 THEN applied_lsn ELSE greatest(applied_lsn, synced_lsn) END
                    >= $1::text::pg_lsn FROM hikkoshi.stream",
            &[&marker, &applied_only],
        )
        .await?
        .get(0))
}

/// Whether a follower reported within the last 10 s (false when there is no stream).
pub async fn follower_reporting(client: &Client) -> bool {
    client
        .query_one(
            "SELECT to_regclass('hikkoshi.stream') IS NOT NULL
                    AND (SELECT coalesce(bool_or(seen_at > now() - interval '10 seconds'), false)
                         FROM hikkoshi.stream)",
            &[],
        )
        .await
        .map(|r| r.get::<_, Option<bool>>(0).unwrap_or(false))
        .unwrap_or(false)
}

/// Whether the applied or in-sync position has passed `lsn`.
pub async fn synced_past(client: &Client, lsn: &str) -> bool {
    client
        .query_one(
            "SELECT coalesce(bool_or(greatest(applied_lsn, synced_lsn) >= $1::text::pg_lsn), false) FROM hikkoshi.stream",
            &[&lsn],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}

/// The reverse stream's record on the old source, in one transaction: its tables (copied from the forward
/// stream's record, all streaming) and its stream row, starting at the reverse slot's `start`.
pub async fn record_reverse(
    old: &Client,
    forward: &Client,
    (slot, publication): (&str, &str),
    start: &str,
) -> Result<(), tokio_postgres::Error> {
    let rows = forward
        .query(
            "SELECT schema_name, table_name, root_schema, root_name, copy_format FROM hikkoshi.tables",
            &[],
        )
        .await?;
    old.batch_execute("BEGIN; TRUNCATE hikkoshi.stream; DELETE FROM hikkoshi.tables;")
        .await?;
    for r in &rows {
        old.execute(
            "INSERT INTO hikkoshi.tables (schema_name, table_name, root_schema, root_name, state, copy_format)
             VALUES ($1, $2, $3, $4, 'streaming', $5)",
            &[
                &r.get::<_, String>(0),
                &r.get::<_, String>(1),
                &r.get::<_, Option<String>>(2),
                &r.get::<_, Option<String>>(3),
                &r.get::<_, String>(4),
            ],
        )
        .await?;
    }
    old.execute(
        "INSERT INTO hikkoshi.stream (slot_name, publication, start_lsn, applied_lsn, synced_lsn, source_lsn)
         VALUES ($1, $2, $3::text::pg_lsn, $3::text::pg_lsn, $3::text::pg_lsn, $3::text::pg_lsn)",
        &[&slot, &publication, &start],
    )
    .await?;
    old.batch_execute("COMMIT").await
}
