//! `hikkoshi status`: the migration as recorded in the target, readable from any machine.

use serde::Serialize;

use crate::error::{Error, Side};
use crate::session;
use crate::state;

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
}

/// The whole picture.
#[derive(Debug, Serialize)]
pub struct Status {
    pub migration_id: Option<String>,
    pub source: Option<String>,
    pub phase: Option<String>,
    pub tables: Vec<TableStatus>,
    pub recent_events: Vec<(String, String, String)>,
}

pub async fn read(target_url: &str) -> Result<Status, Error> {
    let info = session::resolve(Side::Target, target_url)?;
    let client = session::connect(&info, Side::Target).await?;
    let sql = |w: &'static str| Error::sql(Side::Target, w);
    let Some(m) = state::load(&client)
        .await
        .map_err(sql("reading hikkoshi.migration"))?
    else {
        return Ok(Status {
            migration_id: None,
            source: None,
            phase: None,
            tables: vec![],
            recent_events: vec![],
        });
    };
    let rows = client
        .query(
            "SELECT t.schema_name, t.table_name, t.state, t.copy_format, t.chunk_method,
                    count(c.*), count(c.*) FILTER (WHERE c.state = 'copied'),
                    coalesce(sum(c.rows_copied), 0)::bigint, coalesce(sum(c.bytes_copied), 0)::bigint
             FROM hikkoshi.tables t
             LEFT JOIN hikkoshi.chunks c USING (schema_name, table_name)
             GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2",
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
        })
        .collect();
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
    Ok(Status {
        migration_id: Some(m.id),
        source: Some(m.source),
        phase: Some(m.phase.as_str().to_string()),
        tables,
        recent_events: events,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(id) = &self.migration_id else {
            return writeln!(f, "no hikkoshi migration on this target");
        };
        writeln!(
            f,
            "migration {id} from {} — phase {}",
            self.source.as_deref().unwrap_or("?"),
            self.phase.as_deref().unwrap_or("?")
        )?;
        writeln!(
            f,
            "{:<40} {:<9} {:<6} {:>9} {:>12} {:>12}",
            "table", "state", "format", "chunks", "rows", "bytes"
        )?;
        for t in &self.tables {
            writeln!(
                f,
                "{:<40} {:<9} {:<6} {:>9} {:>12} {:>12}",
                t.table,
                t.state,
                t.copy_format,
                format!("{}/{}", t.chunks_copied, t.chunks),
                t.rows_copied,
                crate::progress::human_bytes(t.bytes_copied.max(0) as u64)
            )?;
        }
        if !self.recent_events.is_empty() {
            writeln!(f, "recent events:")?;
            for (at, kind, msg) in self.recent_events.iter().rev() {
                writeln!(f, "  {at}  {kind:<8} {msg}")?;
            }
        }
        Ok(())
    }
}
