//! Durability: a batch of source transactions commits on the target together with its end LSN
//! (`hikkoshi.stream.applied_lsn`), asynchronously; the source may forget a transaction only once the target
//! has flushed that commit to disk.

use super::statements::Sql;
use super::{Applier, ApplyError};
use crate::lsn::Lsn;

impl Applier {
    /// Starts from what the target holds: `applied` is durable once the target's WAL is flushed up to where
    /// it is now (a restart may come right after an asynchronous commit).
    pub async fn start(&mut self) -> Result<(), ApplyError> {
        let now = self.wal_position("pg_current_wal_insert_lsn").await?;
        self.unflushed.push_back((self.applied, now));
        // usually long flushed: then the stream may confirm the source's position from the first keepalive
        self.durable().await?;
        Ok(())
    }

    async fn wal_position(&self, function: &str) -> Result<Lsn, ApplyError> {
        let row = self
            .client
            .query_one(&format!("SELECT {function}()::text"), &[])
            .await
            .map_err(|source| ApplyError::Target {
                what: "reading the target's WAL position".into(),
                source,
            })?;
        Ok(row.get::<_, String>(0).parse().unwrap_or_default())
    }

    /// The end LSN of the last source transaction whose target commit is flushed: what the source may
    /// forget.
    pub async fn durable(&mut self) -> Result<Lsn, ApplyError> {
        if self.unflushed.is_empty() {
            return Ok(self.durable);
        }
        let flushed = self.wal_position("pg_current_wal_flush_lsn").await?;
        while let Some(&(end, at)) = self.unflushed.front() {
            if at > flushed {
                break;
            }
            self.durable = self.durable.max(end);
            self.unflushed.pop_front();
        }
        Ok(self.durable)
    }

    /// Whether every commit is flushed (as of the last `durable`).
    pub fn all_durable(&self) -> bool {
        self.unflushed.is_empty()
    }

    /// Commits the open target transaction with the applied LSN, if there is one at a source-transaction
    /// boundary. Returns the LSN now applied on the target (durable once `durable` says so).
    pub async fn commit(&mut self) -> Result<Lsn, ApplyError> {
        if self.current.is_some() {
            return Ok(self.applied);
        }
        let Some(end) = self.pending else {
            if self.in_target_tx {
                // only skipped transactions: nothing to keep
                self.send(Sql::new("COMMIT", vec![]), None).await?;
                self.drain().await?;
                self.in_target_tx = false;
            }
            self.commit_after = false;
            return Ok(self.applied);
        };
        self.flush_all().await?;
        let commit_time = (self.last_commit_time as f64 / 1e6) + 946_684_800.0;
        self.send(
            Sql::new(
                crate::state::stream::RECORD_APPLIED,
                vec![
                    Some(end.to_string()),
                    Some(commit_time.to_string()),
                    Some(self.txns_in_batch.to_string()),
                ],
            ),
            None,
        )
        .await?;
        crate::failpoint::hit(crate::failpoint::APPLY_BEFORE_COMMIT);
        // COMMIT and the WAL position after it go out behind the batch: one round trip in all
        self.send(Sql::new("COMMIT", vec![]), None).await?;
        let position = self.send_position().await?;
        self.drain().await?;
        crate::failpoint::hit(crate::failpoint::APPLY_AFTER_COMMIT);
        let at = position
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .and_then(|p| p.parse().ok())
            .unwrap_or_default();
        self.unflushed.push_back((end, at));
        self.in_target_tx = false;
        self.pending = None;
        self.commit_after = false;
        self.txns_in_batch = 0;
        self.applied = end;
        Ok(end)
    }
}
