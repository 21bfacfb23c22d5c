//! The log of DDL the stream applied (or skipped) on the target: `status` shows it, and a command applied
//! by hand is recorded here so that the stream passes over it. Also the record of a table the stream
//! created, so that verification covers it.

use tokio_postgres::Client;

const DDL: &str = "
CREATE SCHEMA IF NOT EXISTS hikkoshi;
CREATE TABLE IF NOT EXISTS hikkoshi.ddl (
    stream      text NOT NULL,
    id          bigint NOT NULL,
    source_at   timestamptz,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    tag         text,
    statement   text,
    outcome     text NOT NULL,
    PRIMARY KEY (stream, id)
)";

/// Creates the log where the stream is applied (idempotent).
pub async fn ensure(client: &Client) -> Result<(), tokio_postgres::Error> {
    let there: bool = client
        .query_one("SELECT to_regclass('hikkoshi.ddl') IS NOT NULL", &[])
        .await?
        .get(0);
    if there {
        return Ok(());
    }
    client.batch_execute(DDL).await
}

/// Records a command: $1 stream, $2 id, $3 source time, $4 tag, $5 statement, $6 outcome. Sent in the
/// target transaction that applies it.
pub const RECORD: &str = "INSERT INTO hikkoshi.ddl (stream, id, source_at, tag, statement, outcome) \
     VALUES ($1, $2::bigint, $3::timestamptz, $4, $5, $6) ON CONFLICT DO NOTHING";

/// What became of a command already: $1 stream, $2 id.
pub const OUTCOME: &str = "SELECT outcome FROM hikkoshi.ddl WHERE stream = $1 AND id = $2";

/// After DDL: the tables it touched or created ($1, `schema.table` quoted) that exist on the target are
/// recorded as changed by the stream (so a quick verification compares them; a new or renamed one is added),
/// and tables that no longer exist leave the record.
pub const TRACK_TABLES: &str = "WITH gone AS (DELETE FROM hikkoshi.tables
         WHERE to_regclass(format('%I.%I', schema_name, table_name)) IS NULL)
     INSERT INTO hikkoshi.tables (schema_name, table_name, state, copy_format, streamed)
     SELECT p[1], p[2], 'streaming', 'text', true
     FROM (SELECT DISTINCT name FROM unnest($1::text[]) AS u(name)) AS t, parse_ident(t.name) AS p
     WHERE cardinality(p) = 2 AND to_regclass(t.name) IS NOT NULL
     ON CONFLICT (schema_name, table_name) DO UPDATE SET streamed = true";

/// After DDL that renamed tables ($1 old names, $2 new names, `schema.table` quoted): their records, chunks
/// (the copy's windows) and the partitions' roots follow the new name. One statement: the chunks' foreign
/// key is checked once both have moved.
pub const RENAME_TABLES: &str = "WITH r AS (
         SELECT parse_ident(o) AS o, parse_ident(n) AS n FROM unnest($1::text[], $2::text[]) AS u(o, n)),
     chunks AS (UPDATE hikkoshi.chunks c SET schema_name = r.n[1], table_name = r.n[2] FROM r
         WHERE ARRAY[c.schema_name, c.table_name] = r.o)
     UPDATE hikkoshi.tables t SET
         schema_name = coalesce((SELECT r.n[1] FROM r WHERE r.o = ARRAY[t.schema_name, t.table_name]), t.schema_name),
         table_name = coalesce((SELECT r.n[2] FROM r WHERE r.o = ARRAY[t.schema_name, t.table_name]), t.table_name),
         root_schema = coalesce((SELECT r.n[1] FROM r WHERE r.o = ARRAY[t.root_schema, t.root_name]), t.root_schema),
         root_name = coalesce((SELECT r.n[2] FROM r WHERE r.o = ARRAY[t.root_schema, t.root_name]), t.root_name)
     WHERE ARRAY[t.schema_name, t.table_name] IN (SELECT o FROM r)
        OR ARRAY[t.root_schema, t.root_name] IN (SELECT o FROM r)";

/// One logged command, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Logged {
    pub stream: String,
    pub id: i64,
    pub source_at: Option<String>,
    pub applied_at: String,
    pub statement: String,
    pub outcome: String,
}

/// The last `n` commands, newest first (none when there is no log).
pub async fn recent(client: &Client, n: i64) -> Vec<Logged> {
    let rows = client
        .query(
            "SELECT stream, id, to_char(source_at, 'YYYY-MM-DD HH24:MI:SS'),
                    to_char(applied_at, 'YYYY-MM-DD HH24:MI:SS'), coalesce(statement, ''), outcome
             FROM hikkoshi.ddl ORDER BY applied_at DESC, id DESC LIMIT $1",
            &[&n],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| Logged {
            stream: r.get(0),
            id: r.get(1),
            source_at: r.get(2),
            applied_at: r.get(3),
            statement: r.get(4),
            outcome: r.get(5),
        })
        .collect()
}
