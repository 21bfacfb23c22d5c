//! Changes held before they are written: folded into net changes per key (`fold`), or runs of inserts into
//! tables that cannot be folded. Held changes are written as set-based statements once they are many or
//! large, before a change that goes on its own, and at the commit.

use super::statements;
use super::{Applier, ApplyError};
use crate::stream::fold::{Folded, Unfoldable};
use crate::stream::pgoutput::Value;

/// Held changes are written once they are this many rows or bytes: memory stays bounded in a transaction of
/// any size, and one statement's arrays stay a size the planner joins by index.
const HOLD_ROWS: usize = 4000;
const HOLD_BYTES: usize = 8 << 20;

impl Applier {
    /// Folds a change into the table's held changes; false when it cannot be folded (the held changes
    /// are then written, and the change goes on its own after them).
    pub(super) async fn fold(
        &mut self,
        oid: u32,
        change: impl FnOnce(&mut Folded) -> Result<(), Unfoldable>,
    ) -> Result<bool, ApplyError> {
        if !self.reorder_allows(oid) {
            self.flush_all().await?;
        }
        let folded = self.folded.entry(oid).or_default();
        let (rows, bytes) = (folded.rows.len(), folded.bytes);
        if change(folded).is_err() {
            return Ok(false);
        }
        self.held_rows += folded.rows.len() - rows;
        self.held_bytes += folded.bytes - bytes;
        self.bound().await?;
        Ok(true)
    }

    /// Holds an insert into a table that cannot be folded, to be written with the rest of its run.
    pub(super) async fn hold_insert(
        &mut self,
        oid: u32,
        row: Vec<Value>,
    ) -> Result<(), ApplyError> {
        if !self.reorder_allows(oid) {
            self.flush_all().await?;
        }
        self.held_bytes += row
            .iter()
            .map(|v| match v {
                Value::Text(b) | Value::Binary(b) => b.len() + 16,
                _ => 16,
            })
            .sum::<usize>();
        self.held_rows += 1;
        self.runs.entry(oid).or_default().push(row);
        self.bound().await
    }

    /// Whether changes of `oid` may be held while other tables' changes are held too.
    fn reorder_allows(&self, oid: u32) -> bool {
        self.reorder
            || self
                .folded
                .keys()
                .chain(self.runs.keys())
                .all(|&held| held == oid)
    }

    /// Writes held changes once they are many or large.
    async fn bound(&mut self) -> Result<(), ApplyError> {
        if self.held_rows >= HOLD_ROWS || self.held_bytes >= HOLD_BYTES {
            self.flush_all().await?;
        }
        Ok(())
    }

    /// Before a change written on its own: the changes held for its table (for every table, when tables
    /// must keep the source's order) are written first.
    pub(super) async fn before_direct(&mut self, oid: u32) -> Result<(), ApplyError> {
        if self.reorder {
            self.flush_table(oid).await
        } else {
            self.flush_all().await
        }
    }

    pub(super) async fn flush_all(&mut self) -> Result<(), ApplyError> {
        let mut oids: Vec<u32> = self
            .folded
            .keys()
            .chain(self.runs.keys())
            .copied()
            .collect();
        oids.sort_unstable();
        oids.dedup();
        for oid in oids {
            self.flush_table(oid).await?;
        }
        self.held_rows = 0;
        self.held_bytes = 0;
        Ok(())
    }

    /// Writes the changes held for one table: deletes, updates, inserts.
    pub(super) async fn flush_table(&mut self, oid: u32) -> Result<(), ApplyError> {
        let folded = self.folded.remove(&oid).unwrap_or_default();
        let run = self.runs.remove(&oid).unwrap_or_default();
        if folded.is_empty() && run.is_empty() {
            return Ok(());
        }
        self.held_rows = self.held_rows.saturating_sub(folded.rows.len() + run.len());
        self.held_bytes = self.held_bytes.saturating_sub(folded.bytes);
        let rel = self.rel(oid)?;
        for (q, expect) in statements::held(rel, folded.split(), run) {
            self.send(q, expect).await?;
        }
        Ok(())
    }
}
