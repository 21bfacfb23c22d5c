//! The copy's record: `hikkoshi.tables` (one row per table) and `hikkoshi.chunks` (one row per piece of a
//! table that one worker copies in one target transaction).
//!
//! Tables move through `pending → copying → copied → indexed → streaming`; chunks through
//! `pending → copying → copied`. A chunk's rows and its `copied` mark commit in one target transaction, so a
//! crash anywhere leaves either both or neither: a rerun copies exactly the chunks that are not marked.
//! `copying` only says a worker claimed the chunk; on start, a run (holding the migration lock) turns
//! leftover claims back to `pending`.

use std::collections::HashSet;

use tokio_postgres::{Client, GenericClient};

use crate::ident::{QualifiedName, quote_literal};
use crate::lsn::Lsn;
use crate::plan::Planned;

/// Where a table stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TableStatus {
    /// Planned by the clone; no chunk copied yet.
    Pending,
    /// Set by the copy worker that commits the table's first chunk.
    Copying,
    /// Set by the clone once every chunk of the table is copied.
    Copied,
    /// Set by the clone once indexes, constraints and statistics are built.
    Indexed,
    /// Set by the follower when it starts: the table moves with the stream.
    Streaming,
}

impl TableStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TableStatus::Pending => "pending",
            TableStatus::Copying => "copying",
            TableStatus::Copied => "copied",
            TableStatus::Indexed => "indexed",
            TableStatus::Streaming => "streaming",
        }
    }

    /// Reads a recorded status; an unknown word (a newer hikkoshi) reads as `Pending`.
    pub fn parse(s: &str) -> TableStatus {
        [
            TableStatus::Copying,
            TableStatus::Copied,
            TableStatus::Indexed,
            TableStatus::Streaming,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
        .unwrap_or(TableStatus::Pending)
    }
}

/// Where a chunk stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkStatus {
    /// Planned, or its claim was reset after a dead run.
    Pending,
    /// Claimed by a copy worker (whose transaction may have died: reset on start).
    Copying,
    /// Its rows are on the target: committed with this mark.
    Copied,
}

impl ChunkStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkStatus::Pending => "pending",
            ChunkStatus::Copying => "copying",
            ChunkStatus::Copied => "copied",
        }
    }

    pub fn parse(s: &str) -> ChunkStatus {
        match s {
            "copying" => ChunkStatus::Copying,
            "copied" => ChunkStatus::Copied,
            _ => ChunkStatus::Pending,
        }
    }
}

/// A table as recorded in the state.
#[derive(Clone, Debug)]
pub struct TableState {
    pub name: QualifiedName,
    pub state: TableStatus,
    pub copy_format: String,
    pub chunk_method: Option<String>,
}

/// A chunk as recorded in the state.
#[derive(Clone, Debug)]
pub struct ChunkState {
    pub table: QualifiedName,
    pub no: i32,
    pub predicate: Option<String>,
    pub state: ChunkStatus,
    pub est_bytes: i64,
    pub rows: Option<i64>,
    pub bytes: Option<i64>,
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
            state: TableStatus::parse(r.get(2)),
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
            state: ChunkStatus::parse(r.get(4)),
            est_bytes: r.get(5),
            rows: r.get(6),
            bytes: r.get(7),
        })
        .collect())
}

/// Records every table and its chunks, and moves the migration to the copy phase, in one transaction.
pub async fn record_plan(
    target: &Client,
    planned: &[Planned<'_>],
) -> Result<(), tokio_postgres::Error> {
    target.batch_execute("BEGIN").await?;
    for p in planned {
        let t = p.table;
        target
            .execute(
                "INSERT INTO hikkoshi.tables (schema_name, table_name, root_schema, root_name, copy_format,
                                              chunk_method, est_bytes)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (schema_name, table_name) DO NOTHING",
                &[
                    &t.name.schema,
                    &t.name.name,
                    &t.root.as_ref().map(|r| r.schema.clone()),
                    &t.root.as_ref().map(|r| r.name.clone()),
                    &if t.binary_portable() { "binary" } else { "text" },
                    &p.method.as_str(),
                    &t.bytes,
                ],
            )
            .await?;
        for s in &p.chunks {
            target
                .execute(
                    "INSERT INTO hikkoshi.chunks (schema_name, table_name, chunk_no, predicate, est_bytes)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[&t.name.schema, &t.name.name, &s.no, &s.predicate, &s.est_bytes],
                )
                .await?;
        }
    }
    target
        .execute(
            "UPDATE hikkoshi.migration SET phase = 'copy', updated_at = now()",
            &[],
        )
        .await?;
    target.batch_execute("COMMIT").await
}

/// Claims of a dead run hold no rows (their transactions rolled back): back to pending.
pub async fn reset_claims(target: &Client) -> Result<(), tokio_postgres::Error> {
    target
        .batch_execute(
            "UPDATE hikkoshi.chunks SET state = 'pending', started_at = NULL WHERE state = 'copying'",
        )
        .await
}

/// Tables to copy again from the start: a table split by ctid that is half copied (page ranges of two
/// different snapshots do not partition the rows), and the partitions of a half-copied partition tree that
/// is not split by key throughout (the stream names only the root, so one window — one snapshot, or
/// convergence by key — must serve all its partitions).
pub async fn half_copied(target: &Client) -> Result<Vec<QualifiedName>, tokio_postgres::Error> {
    Ok(target
        .query(
            "WITH chunk AS (
                 SELECT c.state, t.schema_name, t.table_name,
                        coalesce(t.root_schema, t.schema_name) AS rs, coalesce(t.root_name, t.table_name) AS rn
                 FROM hikkoshi.chunks c JOIN hikkoshi.tables t USING (schema_name, table_name)),
             tree AS (
                 SELECT coalesce(root_schema, schema_name) AS rs, coalesce(root_name, table_name) AS rn,
                        bool_and(chunk_method = 'key') AS by_key
                 FROM hikkoshi.tables GROUP BY 1, 2)
             SELECT t.schema_name, t.table_name FROM hikkoshi.tables t
             WHERE (t.chunk_method = 'ctid'
                    AND EXISTS (SELECT 1 FROM chunk c WHERE (c.schema_name, c.table_name) = (t.schema_name, t.table_name) AND c.state = 'copied')
                    AND EXISTS (SELECT 1 FROM chunk c WHERE (c.schema_name, c.table_name) = (t.schema_name, t.table_name) AND c.state <> 'copied'))
                OR (t.root_name IS NOT NULL
                    AND EXISTS (SELECT 1 FROM tree r WHERE (r.rs, r.rn) = (t.root_schema, t.root_name) AND NOT r.by_key)
                    AND EXISTS (SELECT 1 FROM chunk c WHERE (c.rs, c.rn) = (t.root_schema, t.root_name) AND c.state = 'copied')
                    AND EXISTS (SELECT 1 FROM chunk c WHERE (c.rs, c.rn) = (t.root_schema, t.root_name) AND c.state <> 'copied'))",
            &[],
        )
        .await?
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Empties a table on the target and marks all its chunks pending, in one transaction.
pub async fn restart_table(
    target: &Client,
    name: &QualifiedName,
) -> Result<(), tokio_postgres::Error> {
    target
        .batch_execute(&format!(
            "BEGIN; TRUNCATE ONLY {q};
             UPDATE hikkoshi.chunks SET state = 'pending', rows_copied = NULL, bytes_copied = NULL,
                    snapshot_lsn = NULL, finished_at = NULL
             WHERE schema_name = {s} AND table_name = {t};
             COMMIT;",
            q = name.quoted(),
            s = quote_literal(&name.schema),
            t = quote_literal(&name.name),
        ))
        .await
}

/// The target refused a table's binary rows: the table is copied as text from now on, and the chunk that
/// failed (its rows rolled back) goes back to pending.
pub async fn copy_as_text(
    target: &Client,
    table: &QualifiedName,
    chunk: i32,
) -> Result<(), tokio_postgres::Error> {
    target
        .execute(
            "UPDATE hikkoshi.tables SET copy_format = 'text' WHERE schema_name = $1 AND table_name = $2",
            &[&table.schema, &table.name],
        )
        .await?;
    target
        .execute(
            "UPDATE hikkoshi.chunks SET state = 'pending', started_at = NULL
             WHERE schema_name = $1 AND table_name = $2 AND chunk_no = $3 AND state = 'copying'",
            &[&table.schema, &table.name, &chunk],
        )
        .await?;
    Ok(())
}

/// Takes the largest pending chunk (largest first keeps the workers' finish times close): its table, number
/// and predicate.
pub async fn claim_chunk(
    target: &Client,
) -> Result<Option<(QualifiedName, i32, Option<String>)>, tokio_postgres::Error> {
    let row = target
        .query_opt(
            "UPDATE hikkoshi.chunks c SET state = 'copying', started_at = now()
             FROM (SELECT schema_name, table_name, chunk_no FROM hikkoshi.chunks
                   WHERE state = 'pending'
                   ORDER BY est_bytes DESC, schema_name, table_name, chunk_no
                   LIMIT 1 FOR UPDATE SKIP LOCKED) p
             WHERE (c.schema_name, c.table_name, c.chunk_no) = (p.schema_name, p.table_name, p.chunk_no)
             RETURNING c.schema_name, c.table_name, c.chunk_no, c.predicate",
            &[],
        )
        .await?;
    Ok(row.map(|r| {
        (
            QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            r.get(2),
            r.get(3),
        )
    }))
}

/// Marks a chunk copied, in the transaction `tx` that wrote its rows (and its table as being copied).
pub async fn mark_chunk_copied(
    tx: &impl GenericClient,
    (table, no): (&QualifiedName, i32),
    (rows, bytes): (i64, i64),
    snapshot_lsn: Lsn,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE hikkoshi.chunks SET state = 'copied', rows_copied = $4, bytes_copied = $5,
                snapshot_lsn = $6::text::pg_lsn, finished_at = now()
         WHERE schema_name = $1 AND table_name = $2 AND chunk_no = $3",
        &[
            &table.schema,
            &table.name,
            &no,
            &rows,
            &bytes,
            &snapshot_lsn.to_string(),
        ],
    )
    .await?;
    tx.execute(
        "UPDATE hikkoshi.tables SET state = 'copying'
         WHERE schema_name = $1 AND table_name = $2 AND state = 'pending'",
        &[&table.schema, &table.name],
    )
    .await?;
    Ok(())
}

/// How many chunks are not copied.
pub async fn chunks_left(target: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(target
        .query_one(
            "SELECT count(*) FROM hikkoshi.chunks WHERE state <> 'copied'",
            &[],
        )
        .await?
        .get(0))
}

/// Every table whose chunks are all copied is `copied`.
pub async fn mark_tables_copied(target: &Client) -> Result<(), tokio_postgres::Error> {
    target
        .batch_execute(
            "UPDATE hikkoshi.tables t SET state = 'copied'
             WHERE NOT EXISTS (SELECT 1 FROM hikkoshi.chunks c
                               WHERE (c.schema_name, c.table_name) = (t.schema_name, t.table_name)
                                 AND c.state <> 'copied')",
        )
        .await
}

/// Every table is `indexed` (post-data is done).
pub async fn mark_tables_indexed(target: &Client) -> Result<(), tokio_postgres::Error> {
    target
        .batch_execute("UPDATE hikkoshi.tables SET state = 'indexed'")
        .await
}

/// A follower starts: copied and indexed tables move with the stream from here on.
pub async fn mark_tables_streaming(target: &Client) -> Result<(), tokio_postgres::Error> {
    target
        .batch_execute("UPDATE hikkoshi.tables SET state = 'streaming' WHERE state = 'indexed'")
        .await
}

/// Tables the stream changed since the copy, as the applier marked them: a quick verification compares
/// exactly those.
pub async fn streamed_tables(target: &Client) -> HashSet<QualifiedName> {
    target
        .query(
            "SELECT schema_name, table_name FROM hikkoshi.tables WHERE streamed",
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect()
        })
        .unwrap_or_default()
}

/// The key ranges (predicates) of the tables the copy split by key, in chunk order: `verify` and the
/// cutover's proof hash by the same ranges.
pub async fn key_ranges(
    target: &Client,
) -> Result<Vec<(QualifiedName, String)>, tokio_postgres::Error> {
    Ok(target
        .query(
            "SELECT c.schema_name, c.table_name, c.predicate FROM hikkoshi.chunks c
             JOIN hikkoshi.tables t USING (schema_name, table_name)
             WHERE t.chunk_method = 'key' AND c.predicate IS NOT NULL
             ORDER BY 1, 2, c.chunk_no",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            (
                QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
            )
        })
        .collect())
}

/// Which snapshots copied each table (a partition's counts for its root, which the stream names): the
/// oldest and newest chunk's snapshot LSN, and whether the table was copied whole in one snapshot's
/// order (not split by key).
pub async fn copy_windows(
    target: &Client,
) -> Result<Vec<(QualifiedName, Option<Lsn>, Option<Lsn>, bool)>, tokio_postgres::Error> {
    Ok(target
        .query(
            "SELECT coalesce(t.root_schema, t.schema_name), coalesce(t.root_name, t.table_name),
                    min(c.snapshot_lsn)::text, max(c.snapshot_lsn)::text,
                    bool_and(t.chunk_method <> 'key')
             FROM hikkoshi.tables t JOIN hikkoshi.chunks c USING (schema_name, table_name)
             GROUP BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let lsn = |i: usize| {
                r.get::<_, Option<String>>(i)
                    .and_then(|s| s.parse::<Lsn>().ok())
            };
            (
                QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                lsn(2),
                lsn(3),
                r.get::<_, Option<bool>>(4).unwrap_or(true),
            )
        })
        .collect())
}

/// The applier's mark that the stream changed a table (or a partition of it) since the copy, sent in the
/// target transaction of the change itself: $1 schema, $2 table (the stream names roots).
pub const MARK_STREAMED: &str = "UPDATE hikkoshi.tables SET streamed = true WHERE NOT streamed \
     AND ((schema_name = $1 AND table_name = $2) OR (root_schema = $1 AND root_name = $2))";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_back_as_written() {
        for t in [
            TableStatus::Pending,
            TableStatus::Copying,
            TableStatus::Copied,
            TableStatus::Indexed,
            TableStatus::Streaming,
        ] {
            assert_eq!(TableStatus::parse(t.as_str()), t);
        }
        for c in [
            ChunkStatus::Pending,
            ChunkStatus::Copying,
            ChunkStatus::Copied,
        ] {
            assert_eq!(ChunkStatus::parse(c.as_str()), c);
        }
    }
}
