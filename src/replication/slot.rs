//! Logical replication slots with an exported snapshot.
//!
//! `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput EXPORT_SNAPSHOT` returns the slot's
//! consistent point (the LSN from which the slot will decode) and the name of a snapshot that shows the
//! database exactly as of that point (docs, "Streaming Replication Protocol", and "Exported snapshots"
//! under `pg_export_snapshot`). Sessions that import the snapshot see every transaction that committed
//! before the consistent point and none after: a copy made in it and a stream started at that LSN meet with
//! no gap and no overlap. The snapshot can be imported only while the replication session that made it
//! stays idle, so the session is kept open, untouched, until every reader has imported it.

use super::conn::{ReplicationConn, ReplicationError};
use crate::lsn::Lsn;

/// A slot just created, with its snapshot. Dropping the connection ends the snapshot (and a temporary slot).
pub struct ExportedSnapshot {
    pub conn: ReplicationConn,
    pub slot: String,
    pub snapshot: String,
    pub lsn: Lsn,
}

/// Creates a pgoutput slot on `conn` and returns the snapshot it exported.
pub async fn create_with_snapshot(
    mut conn: ReplicationConn,
    slot: &str,
    temporary: bool,
) -> Result<ExportedSnapshot, ReplicationError> {
    // The pre-15 spelling EXPORT_SNAPSHOT is still accepted by every later version.
    let sql = format!(
        "CREATE_REPLICATION_SLOT {} {}LOGICAL pgoutput EXPORT_SNAPSHOT",
        quote_ident(slot),
        if temporary { "TEMPORARY " } else { "" }
    );
    let rows = conn.simple_query(&sql).await?;
    let row = rows.first().ok_or_else(|| {
        ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
    })?;
    let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let lsn = field(1)
        .parse()
        .map_err(|e: crate::lsn::ParseLsnError| ReplicationError::Protocol(e.to_string()))?;
    let snapshot = field(2);
    if snapshot.is_empty() {
        return Err(ReplicationError::Protocol(
            "CREATE_REPLICATION_SLOT exported no snapshot".into(),
        ));
    }
    Ok(ExportedSnapshot {
        conn,
        slot: slot.to_string(),
        snapshot,
        lsn,
    })
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
