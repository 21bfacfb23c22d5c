//! The statement pipeline: each statement is sent as soon as it is built, in order, and its result is
//! collected later, so no change waits for a round trip. At most `PIPELINE` statements (and
//! `PIPELINE_BYTES` of parameters) are in flight; each result is checked against what the statement had to
//! affect, and a failure rolls the target transaction back with its cause described.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_postgres::types::Type;

use super::statements::{Expect, Param, Sql};
use super::{Applier, ApplyError};

/// Statements in flight before the oldest is awaited.
const PIPELINE: usize = 256;

/// Parameter bytes in flight before the pipeline is drained: 256 statements of 2 MB values each would
/// otherwise hold half a gigabyte (twice: the parameters and the encoded request).
const PIPELINE_BYTES: usize = 8 << 20;

pub(super) type InFlight = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;

impl Applier {
    /// Sends a statement now (prepared once per shape) and keeps its result for later; waits for the
    /// oldest results when the pipeline is full.
    pub(super) async fn send(&mut self, q: Sql, expect: Option<Expect>) -> Result<(), ApplyError> {
        let statement = match self.statements.get(&q.text) {
            Some(s) => s.clone(),
            None => {
                let types: Vec<Type> = q.params.iter().map(Param::sql_type).collect();
                let prepared = self.client.prepare_typed(&q.text, &types).await;
                let s = match prepared {
                    Ok(s) => s,
                    Err(source) => {
                        // A statement in flight may have failed first and aborted the transaction (the
                        // prepare then only says so): that one is the cause to report.
                        self.drain().await?;
                        return Err(self.fail(source).await);
                    }
                };
                if self.statements.len() > 10_000 {
                    self.statements.clear();
                }
                self.statements.insert(q.text, s.clone());
                s
            }
        };
        let client = self.client.clone();
        let params = q.params;
        let size: usize = params.iter().map(Param::size).sum();
        let mut fut: InFlight = Box::pin(async move {
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                params.iter().map(Param::as_sql).collect();
            client.execute(&statement, &refs).await
        });
        // The first poll hands the request to the connection: statements go out in the order made.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            fut = Box::pin(std::future::ready(r));
        }
        self.inflight.push_back((fut, expect));
        self.inflight_bytes += size;
        if self.inflight_bytes > PIPELINE_BYTES {
            self.drain().await?;
        }
        while self.inflight.len() > PIPELINE {
            self.await_oldest().await?;
        }
        Ok(())
    }

    /// Sends `SELECT pg_current_wal_insert_lsn()` down the pipeline; its answer is in the returned slot
    /// once the statements before it are drained.
    pub(super) async fn send_position(
        &mut self,
    ) -> Result<Arc<std::sync::Mutex<Option<String>>>, ApplyError> {
        let statement = match &self.position_statement {
            Some(s) => s.clone(),
            None => {
                let s = match self
                    .client
                    .prepare("SELECT pg_current_wal_insert_lsn()::text")
                    .await
                {
                    Ok(s) => s,
                    Err(source) => return Err(self.fail(source).await),
                };
                self.position_statement = Some(s.clone());
                s
            }
        };
        let slot = Arc::new(std::sync::Mutex::new(None));
        let (client, answer) = (self.client.clone(), slot.clone());
        let mut fut: InFlight = Box::pin(async move {
            let row = client.query_one(&statement, &[]).await?;
            if let Ok(mut a) = answer.lock() {
                *a = Some(row.get::<_, String>(0));
            }
            Ok(1)
        });
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            fut = Box::pin(std::future::ready(r));
        }
        self.inflight.push_back((fut, None));
        Ok(slot)
    }

    async fn await_oldest(&mut self) -> Result<(), ApplyError> {
        let Some((fut, expect)) = self.inflight.pop_front() else {
            return Ok(());
        };
        match (fut.await, expect) {
            (Ok(n), Some(expect)) if n != expect.rows => {
                self.reset().await;
                let missing = match expect.probe {
                    Some(probe) => self.probe(probe).await,
                    None => String::new(),
                };
                Err(ApplyError::Drift(format!(
                    "{} found {} of its {} row(s) on the target{missing}: the target has drifted from the \
                     source (a row changed or deleted there directly?). Nothing of this batch was applied. \
                     Compare the row on both sides, repair the target, then run again",
                    expect.what, n, expect.rows
                )))
            }
            (Ok(_), _) => Ok(()),
            (Err(source), _) => Err(self.fail(source).await),
        }
    }

    /// The keys a set-based statement expected and the target lacks (after the rollback), as text.
    async fn probe(&self, probe: Sql) -> String {
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            probe.params.iter().map(Param::as_sql).collect();
        match self.client.query(&probe.text, &refs).await {
            Ok(rows) if !rows.is_empty() => format!(
                " (missing: {})",
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            _ => String::new(),
        }
    }

    /// Waits for every statement in flight.
    pub(super) async fn drain(&mut self) -> Result<(), ApplyError> {
        while !self.inflight.is_empty() {
            self.await_oldest().await?;
        }
        self.inflight_bytes = 0;
        Ok(())
    }

    async fn fail(&mut self, source: tokio_postgres::Error) -> ApplyError {
        self.reset().await;
        describe_failure(source)
    }

    /// Forgets what is in flight and rolls the target transaction back.
    pub(super) async fn reset(&mut self) {
        while let Some((fut, _)) = self.inflight.pop_front() {
            let _ = fut.await;
        }
        self.inflight_bytes = 0;
        if self.in_target_tx {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        self.in_target_tx = false;
        self.pending = None;
        self.commit_after = false;
        self.folded.clear();
        self.runs.clear();
        self.held_rows = 0;
        self.held_bytes = 0;
    }
}

fn describe_failure(source: tokio_postgres::Error) -> ApplyError {
    let what = match source.as_db_error() {
        Some(db) if db.code().code() == "23505" => format!(
            "a change from the source collides with a row that exists only on the target ({}{}): the \
             target has drifted (a row written there directly?). Nothing of this batch was applied; remove \
             or fix the row on the target, then run again",
            db.table()
                .map(|t| format!("table {}.{t}, ", db.schema().unwrap_or("?")))
                .unwrap_or_default(),
            db.detail().unwrap_or("duplicate key")
        ),
        Some(db) => format!(
            "applying changes on the target failed{}",
            db.table()
                .map(|t| format!(" on {}.{t}", db.schema().unwrap_or("?")))
                .unwrap_or_default()
        ),
        None => "lost the connection to the target while applying".to_string(),
    };
    ApplyError::Target { what, source }
}
