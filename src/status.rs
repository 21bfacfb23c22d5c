//! `hikkoshi status`: the migration as recorded in the target, readable from any machine.

use crate::error::{Error, Side};
use crate::session;

pub use crate::state::report::{CutoverStatus, Status, StreamStatus, TableStatus};

/// Connects to the target and reads where the migration stands.
pub async fn read(target_url: &str) -> Result<Status, Error> {
    let info = session::resolve(Side::Target, target_url)?;
    let client = session::connect(&info, Side::Target).await?;
    crate::state::report::read(&client).await
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
        if let Some(st) = &self.stream {
            writeln!(
                f,
                "stream from slot {}: {} — applied up to {}, source at {}, lag {} ({:.1}s), {} transaction(s) \
                 applied, {:.0} tx/s",
                st.slot,
                if st.follower_running {
                    "follower running"
                } else {
                    "no follower running"
                },
                st.applied_lsn,
                st.source_lsn,
                crate::progress::human_bytes(st.lag_bytes.max(0) as u64),
                st.lag_seconds,
                st.transactions_applied,
                st.apply_rate_tps
            )?;
            if self.large_objects > 0 {
                writeln!(
                    f,
                    "  large objects ({} on the target): their changes are not streamed (logical decoding \
                     does not carry them); the cutover compares every one and copies what changed",
                    self.large_objects
                )?;
            }
            if let (Some(stall), Some(timeout)) =
                (st.stall_limit_seconds, st.source_wal_sender_timeout_ms)
            {
                writeln!(
                    f,
                    "  a silent source counts as stalled after {stall}s (its wal_sender_timeout is {}s)",
                    timeout as f64 / 1000.0
                )?;
            }
        }
        if let Some(c) = &self.cutover {
            writeln!(
                f,
                "cutover: {}{}{}",
                c.step,
                c.pause_seconds
                    .map(|p| format!(", write pause {p:.3}s"))
                    .unwrap_or_default(),
                c.message
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            )?;
        }
        if let Some(e) = &self.last_error {
            writeln!(f, "last error: {e}")?;
        }
        if !self.recent_ddl.is_empty() {
            writeln!(f, "schema changes from the stream (newest last):")?;
            for d in self.recent_ddl.iter().rev() {
                let statement: String =
                    d.statement.split_whitespace().collect::<Vec<_>>().join(" ");
                let statement = if statement.chars().count() > 160 {
                    format!("{}…", statement.chars().take(160).collect::<String>())
                } else {
                    statement
                };
                writeln!(
                    f,
                    "  {}  {}: {statement}",
                    d.source_at.as_deref().unwrap_or(&d.applied_at),
                    d.outcome
                )?;
            }
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
