//! The applier: writes each source transaction to the target, in commit order, exactly once.
//!
//! Several source transactions share one target transaction (fewer commits, fewer round trips); the end LSN
//! of the last source commit in it is written to `hikkoshi.stream.applied_lsn` in the same target
//! transaction. After a crash the target holds either all of a batch and its LSN or neither, and a
//! restarted stream skips every source transaction that ends at or before `applied_lsn`.
//!
//! Statements are prepared once per shape (table and set of columns), with every value a text parameter
//! cast to its column type (`$1::integer`), and pipelined: each is sent as soon as it is built, in order, and
//! its result is collected later, so the target parses nothing twice and no change waits for a round trip.
//! The pipeline holds a bounded number of statements, so memory stays bounded in a 1 M-row transaction.
//! Each statement's row count is checked: an UPDATE or DELETE that finds no row means the target has
//! drifted from the source, which stops the stream with the table and key named — except inside a table's
//! convergence window (see `Window`), where replaying older changes onto newer rows is expected to find
//! nothing.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::pgoutput::{
    Begin, Commit, Delete, Insert, Message, OldRow, Relation, Truncate, Tuple, Update, Value,
};
use crate::ident::{QualifiedName, quote_ident};
use crate::lsn::Lsn;

/// A failure while applying.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Definite(String),
    #[error("{what}")]
    Target {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what}")]
    Source {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Decode(#[from] super::pgoutput::DecodeError),
}

impl ApplyError {
    /// Whether running again may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Target { source, .. } | ApplyError::Source { source, .. } => {
                match source.code() {
                    None => true,
                    Some(c) => {
                        let c = c.code();
                        c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")
                    }
                }
            }
            _ => false,
        }
    }
}

/// Per table: which changes the copy already contains. A table whose chunks were all copied in one snapshot
/// at LSN `skip_before` already holds every transaction that committed before it: those are skipped. A
/// table split by key whose chunks were copied in different snapshots (a resumed copy) replays changes
/// before the newest chunk's LSN in convergence mode: inserts become upserts, updates and deletes may find
/// nothing; since every change carries the full new row, the rows end as the source has them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    pub skip_before: Lsn,
    pub converge_before: Lsn,
}

/// A target table's columns as the applier writes them.
#[derive(Clone, Debug)]
pub struct TargetTable {
    pub name: QualifiedName,
    /// Writable columns (not generated, not dropped): name → SQL type.
    pub columns: HashMap<String, String>,
    /// Primary-key columns, for upserts.
    pub key: Vec<String>,
    /// `GENERATED ALWAYS AS IDENTITY` columns: inserted with OVERRIDING SYSTEM VALUE, never updated (the
    /// source cannot change them either).
    pub always_identity: Vec<String>,
    pub window: Window,
}

struct Rel {
    table: TargetTable,
    /// Column names in the order the source sends values.
    columns: Vec<String>,
    key_positions: Vec<usize>,
    identity: char,
}

/// Applies decoded messages to the target.
pub struct Applier {
    client: Arc<Client>,
    source: Client,
    tables: HashMap<QualifiedName, TargetTable>,
    relations: HashMap<u32, Rel>,
    /// Prepared statements by SQL text.
    statements: HashMap<String, Statement>,
    /// Tables whose `streamed` mark this session has written.
    streamed: std::collections::HashSet<QualifiedName>,
    /// Statements sent and not yet answered, oldest first, each with what it must affect (Some: a row).
    inflight: VecDeque<(InFlight, Option<String>)>,
    /// Parameter bytes sent since the pipeline was last empty (an upper bound of what is in flight).
    inflight_bytes: usize,
    in_target_tx: bool,
    current: Option<Begin>,
    skipping: bool,
    /// End LSN of the last source transaction committed on the target.
    pub applied: Lsn,
    /// End LSN of the last source transaction applied in the open target transaction.
    pending: Option<Lsn>,
    pub txns_in_batch: usize,
    /// Commit time (µs since 2000) of the last applied source transaction.
    pub last_commit_time: i64,
    pub applied_txns: u64,
}

/// Statements in flight before the oldest is awaited.
const PIPELINE: usize = 256;

/// Parameter bytes in flight before the pipeline is drained: 256 statements of 2 MB values each would
/// otherwise hold half a gigabyte (twice: the parameters and the encoded request).
const PIPELINE_BYTES: usize = 8 << 20;

type InFlight = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;

/// A statement being built: SQL text and its parameters (text, or NULL).
#[derive(Default)]
struct Sql {
    text: String,
    params: Vec<Option<String>>,
}

impl Sql {
    /// A parameter cast to `sql_type`, as SQL.
    fn param(&mut self, v: &Value, sql_type: &str) -> String {
        self.params.push(match v {
            Value::Text(b) | Value::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Null | Value::Unchanged => None,
        });
        format!("${}::{sql_type}", self.params.len())
    }
}

impl Applier {
    /// `applied`: the LSN recorded on the target; `tables`: target tables by name.
    /// `source`: a session on the source, to name the types a Relation message lists.
    pub fn new(
        client: Client,
        source: Client,
        applied: Lsn,
        tables: HashMap<QualifiedName, TargetTable>,
    ) -> Self {
        Applier {
            client: Arc::new(client),
            source,
            tables,
            relations: HashMap::new(),
            statements: HashMap::new(),
            streamed: Default::default(),
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            in_target_tx: false,
            current: None,
            skipping: false,
            applied,
            pending: None,
            txns_in_batch: 0,
            last_commit_time: 0,
            applied_txns: 0,
        }
    }

    /// Whether a source transaction is half applied (its Commit not seen yet).
    pub fn inside_source_transaction(&self) -> bool {
        self.current.is_some()
    }

    /// Whether a target transaction with applied source transactions waits for its commit.
    pub fn has_uncommitted(&self) -> bool {
        self.pending.is_some()
    }

    pub async fn handle(&mut self, msg: Message) -> Result<(), ApplyError> {
        match msg {
            Message::Begin(b) => {
                self.skipping = b.final_lsn < self.applied;
                self.current = Some(b);
                if !self.skipping && !self.in_target_tx {
                    self.send(
                        Sql {
                            text: "BEGIN".into(),
                            params: vec![],
                        },
                        None,
                    )
                    .await?;
                    self.in_target_tx = true;
                }
            }
            Message::Commit(c) => self.commit_source(c).await?,
            Message::Relation(r) => self.relation(r).await?,
            Message::Insert(i) if !self.skipping => {
                self.mark_streamed(i.relation).await?;
                self.insert(i).await?
            }
            Message::Update(u) if !self.skipping => {
                self.mark_streamed(u.relation).await?;
                self.update(u).await?
            }
            Message::Delete(d) if !self.skipping => {
                self.mark_streamed(d.relation).await?;
                self.delete(d).await?
            }
            Message::Truncate(t) if !self.skipping => {
                for oid in &t.relations {
                    self.mark_streamed(*oid).await?;
                }
                self.truncate(t).await?
            }
            _ => {}
        }
        Ok(())
    }

    async fn relation(&mut self, r: Relation) -> Result<(), ApplyError> {
        let name = QualifiedName::new(r.namespace.clone(), r.name.clone());
        let table = self.tables.get(&name).cloned().ok_or_else(|| {
            ApplyError::Definite(format!(
                "the source sends changes of {name}, which the target does not have: it was added to the \
                 publication after the clone. Create it on the target and copy it, or remove it from the \
                 publication"
            ))
        })?;
        let source_cols: Vec<&str> = r.columns.iter().map(|c| c.name.as_str()).collect();
        let added: Vec<&str> = source_cols
            .iter()
            .filter(|c| !table.columns.contains_key(**c))
            .copied()
            .collect();
        let dropped: Vec<&String> = table
            .columns
            .keys()
            .filter(|c| !source_cols.contains(&c.as_str()))
            .collect();
        if !added.is_empty() || !dropped.is_empty() {
            let mut diff = Vec::new();
            if !added.is_empty() {
                diff.push(format!(
                    "column(s) {} added on the source",
                    added.join(", ")
                ));
            }
            if !dropped.is_empty() {
                diff.push(format!(
                    "column(s) {} missing on the source",
                    dropped
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            return Err(ApplyError::Definite(format!(
                "the schema of {name} changed on the source during streaming: {}. hikkoshi stops rather \
                 than apply rows to the wrong columns. Apply the same ALTER TABLE on the target, then run \
                 the same command again: it resumes where it stopped",
                diff.join("; ")
            )));
        }
        // Same names; now the same types (an ALTER COLUMN ... TYPE on the source changes them).
        let oids: Vec<u32> = r.columns.iter().map(|c| c.type_oid).collect();
        let mods: Vec<i32> = r.columns.iter().map(|c| c.type_modifier).collect();
        let source_types: Vec<String> = self
            .source
            .query(
                "SELECT format_type(o, m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(o, m, n)
                 ORDER BY n",
                &[&oids, &mods],
            )
            .await
            .map_err(|source| ApplyError::Source {
                what: "reading column types on the source".into(),
                source,
            })?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for (c, source_type) in r.columns.iter().zip(&source_types) {
            let target_type = &table.columns[&c.name];
            if source_type != target_type {
                return Err(ApplyError::Definite(format!(
                    "the type of {name}.{} changed on the source during streaming: {source_type} there, \
                     {target_type} on the target. hikkoshi stops rather than convert values silently. Apply \
                     the same ALTER TABLE ... ALTER COLUMN ... TYPE on the target, then run the same command \
                     again: it resumes where it stopped",
                    crate::ident::display_ident(&c.name)
                )));
            }
        }
        let key_positions = r
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect();
        self.relations.insert(
            r.oid,
            Rel {
                table,
                columns: r.columns.iter().map(|c| c.name.clone()).collect(),
                key_positions,
                identity: r.replica_identity,
            },
        );
        Ok(())
    }

    /// Records, once per table and session, that the stream changed the table since the copy: a quick
    /// verification at cutover compares exactly those tables. Written in the target transaction of the
    /// change itself, so the mark is there whenever the change is.
    async fn mark_streamed(&mut self, oid: u32) -> Result<(), ApplyError> {
        let name = self.rel(oid)?.table.name.clone();
        if self.streamed.contains(&name) {
            return Ok(());
        }
        self.send(
            Sql {
                text: "UPDATE hikkoshi.tables SET streamed = true WHERE NOT streamed \
                       AND ((schema_name = $1 AND table_name = $2) OR (root_schema = $1 AND root_name = $2))"
                    .into(),
                params: vec![Some(name.schema.clone()), Some(name.name.clone())],
            },
            None,
        )
        .await?;
        self.streamed.insert(name);
        Ok(())
    }

    fn rel(&self, oid: u32) -> Result<&Rel, ApplyError> {
        self.relations.get(&oid).ok_or_else(|| {
            ApplyError::Definite(format!(
                "a change refers to relation {oid}, which the stream never described"
            ))
        })
    }

    fn commit_lsn(&self) -> Lsn {
        self.current
            .as_ref()
            .map(|b| b.final_lsn)
            .unwrap_or_default()
    }

    /// Whether this change is already in the copy (skip), and whether to replay it in convergence mode.
    fn mode(&self, rel: &Rel) -> (bool, bool) {
        let lsn = self.commit_lsn();
        (
            lsn < rel.table.window.skip_before,
            lsn < rel.table.window.converge_before,
        )
    }

    async fn insert(&mut self, i: Insert) -> Result<(), ApplyError> {
        let rel = self.rel(i.relation)?;
        let (skip, converge) = self.mode(rel);
        if skip {
            return Ok(());
        }
        let mut q = Sql::default();
        let mut cols = Vec::new();
        let mut vals = Vec::new();
        for (c, v) in rel.columns.iter().zip(&i.new.0) {
            if matches!(v, Value::Unchanged) {
                continue;
            }
            cols.push(quote_ident(c));
            vals.push(q.param(v, &rel.table.columns[c]));
        }
        q.text = format!(
            "INSERT INTO {} ({}){} VALUES ({})",
            rel.table.name.quoted(),
            cols.join(", "),
            if rel.table.always_identity.is_empty() {
                ""
            } else {
                " OVERRIDING SYSTEM VALUE"
            },
            vals.join(", ")
        );
        if converge && !rel.table.key.is_empty() {
            let sets: Vec<String> = rel
                .columns
                .iter()
                .zip(&i.new.0)
                .filter(|(c, v)| {
                    !matches!(v, Value::Unchanged) && !rel.table.always_identity.contains(c)
                })
                .map(|(c, _)| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
                .collect();
            let _ = write!(
                q.text,
                " ON CONFLICT ({}) DO UPDATE SET {}",
                rel.table
                    .key
                    .iter()
                    .map(|k| quote_ident(k))
                    .collect::<Vec<_>>()
                    .join(", "),
                sets.join(", ")
            );
        }
        self.send(q, None).await
    }

    async fn update(&mut self, u: Update) -> Result<(), ApplyError> {
        let rel = self.rel(u.relation)?;
        let (skip, converge) = self.mode(rel);
        if skip {
            return Ok(());
        }
        let target = rel.table.name.quoted();
        let set_cols: Vec<(&String, &Value)> = rel
            .columns
            .iter()
            .zip(&u.new.0)
            .filter(|(c, v)| {
                !matches!(v, Value::Unchanged) && !rel.table.always_identity.contains(c)
            })
            .collect();
        if set_cols.is_empty() {
            return Ok(());
        }
        // SET list and WHERE condition of one statement
        let build = |q: &mut Sql, by: &Tuple, key_only: bool, full: bool| {
            let sets: Vec<String> = set_cols
                .iter()
                .map(|(c, v)| {
                    format!(
                        "{} = {}",
                        quote_ident(c),
                        q.param(v, &rel.table.columns[*c])
                    )
                })
                .collect();
            let (cond, what) = if full {
                full_match(q, rel, by)
            } else {
                key_match(q, rel, by, key_only)
            };
            (sets.join(", "), cond, what)
        };
        if converge && let Some(OldRow::Key(old)) = &u.old {
            // A key change replayed onto rows copied later: the row may already carry the new key (then it
            // takes the new values and the old key goes), still carry the old one (then it moves), or be
            // gone (deleted later: a later change in the stream says so). Each statement may find nothing.
            let mut q = Sql::default();
            let (sets, new_key, _) = build(&mut q, &u.new, false, false);
            q.text = format!("UPDATE {target} SET {sets} WHERE {new_key}");
            self.send(q, None).await?;
            let rel = self.rel(u.relation)?;
            let mut q = Sql::default();
            let (old_key, _) = key_match(&mut q, rel, old, true);
            let (new_key, _) = key_match(&mut q, rel, &u.new, false);
            q.text = format!(
                "DELETE FROM {target} WHERE {old_key} AND EXISTS (SELECT 1 FROM {target} WHERE {new_key})"
            );
            self.send(q, None).await?;
            let rel = self.rel(u.relation)?;
            let mut q = Sql::default();
            let sets: Vec<String> = rel
                .columns
                .iter()
                .zip(&u.new.0)
                .filter(|(c, v)| {
                    !matches!(v, Value::Unchanged) && !rel.table.always_identity.contains(c)
                })
                .map(|(c, v)| format!("{} = {}", quote_ident(c), q.param(v, &rel.table.columns[c])))
                .collect();
            let (old_key, _) = key_match(&mut q, rel, old, true);
            q.text = format!("UPDATE {target} SET {} WHERE {old_key}", sets.join(", "));
            return self.send(q, None).await;
        }
        let mut q = Sql::default();
        let (sets, condition, what) = match &u.old {
            Some(OldRow::Full(old)) => build(&mut q, old, false, true),
            Some(OldRow::Key(old)) => build(&mut q, old, true, false),
            None => build(&mut q, &u.new, false, false),
        };
        q.text = format!(
            "UPDATE {target} SET {sets} WHERE {}",
            one_row(rel, &target, &condition)
        );
        let expect = (!converge).then(|| format!("UPDATE of {} {what}", rel.table.name));
        self.send(q, expect).await
    }

    async fn delete(&mut self, d: Delete) -> Result<(), ApplyError> {
        let rel = self.rel(d.relation)?;
        let (skip, converge) = self.mode(rel);
        if skip {
            return Ok(());
        }
        let mut q = Sql::default();
        let (condition, what) = match &d.old {
            OldRow::Full(old) => full_match(&mut q, rel, old),
            OldRow::Key(old) => key_match(&mut q, rel, old, true),
        };
        let target = rel.table.name.quoted();
        q.text = format!(
            "DELETE FROM {target} WHERE {}",
            one_row(rel, &target, &condition)
        );
        let expect = (!converge).then(|| format!("DELETE of {} {what}", rel.table.name));
        self.send(q, expect).await
    }

    async fn truncate(&mut self, t: Truncate) -> Result<(), ApplyError> {
        let mut names = Vec::new();
        for oid in &t.relations {
            let rel = self.rel(*oid)?;
            if !self.mode(rel).0 {
                names.push(rel.table.name.quoted());
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        let text = format!(
            "TRUNCATE {}{}{}",
            names.join(", "),
            if t.restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            },
            if t.cascade { " CASCADE" } else { "" }
        );
        self.send(
            Sql {
                text,
                params: vec![],
            },
            None,
        )
        .await
    }

    /// Sends a statement now (prepared once per shape) and keeps its result for later; waits for the
    /// oldest results when the pipeline is full.
    async fn send(&mut self, q: Sql, expect: Option<String>) -> Result<(), ApplyError> {
        let statement = match self.statements.get(&q.text) {
            Some(s) => s.clone(),
            None => {
                let types = vec![Type::TEXT; q.params.len()];
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
        let size: usize = params.iter().flatten().map(|p| p.len()).sum();
        let mut fut: InFlight = Box::pin(async move {
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
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

    async fn await_oldest(&mut self) -> Result<(), ApplyError> {
        let Some((fut, expect)) = self.inflight.pop_front() else {
            return Ok(());
        };
        match fut.await {
            Ok(0) if expect.is_some() => {
                let what = expect.unwrap_or_default();
                self.reset().await;
                Err(ApplyError::Definite(format!(
                    "{what} found no row on the target: the target has drifted from the source (a row \
                     changed or deleted there directly?). Nothing of this batch was applied. Compare the \
                     row on both sides, repair the target, then run again"
                )))
            }
            Ok(_) => Ok(()),
            Err(source) => Err(self.fail(source).await),
        }
    }

    /// Waits for every statement in flight.
    async fn drain(&mut self) -> Result<(), ApplyError> {
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
    async fn reset(&mut self) {
        while let Some((fut, _)) = self.inflight.pop_front() {
            let _ = fut.await;
        }
        self.inflight_bytes = 0;
        if self.in_target_tx {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        self.in_target_tx = false;
        self.pending = None;
    }

    async fn commit_source(&mut self, c: Commit) -> Result<(), ApplyError> {
        self.current = None;
        if self.skipping {
            self.skipping = false;
            return Ok(());
        }
        self.pending = Some(c.end_lsn);
        self.last_commit_time = c.commit_time;
        self.txns_in_batch += 1;
        self.applied_txns += 1;
        Ok(())
    }

    /// Commits the open target transaction with the applied LSN, if there is one at a source-transaction
    /// boundary. Returns the LSN now durable on the target.
    pub async fn commit(&mut self) -> Result<Lsn, ApplyError> {
        if self.current.is_some() {
            return Ok(self.applied);
        }
        let Some(end) = self.pending else {
            if self.in_target_tx {
                // only skipped transactions: nothing to keep
                self.send(
                    Sql {
                        text: "COMMIT".into(),
                        params: vec![],
                    },
                    None,
                )
                .await?;
                self.drain().await?;
                self.in_target_tx = false;
            }
            return Ok(self.applied);
        };
        let commit_time = (self.last_commit_time as f64 / 1e6) + 946_684_800.0;
        self.send(
            Sql {
                text: "UPDATE hikkoshi.stream SET applied_lsn = greatest(applied_lsn, $1::text::pg_lsn), \
                       applied_at = now(), last_commit_time = to_timestamp($2::text::float8), \
                       applied_txns = applied_txns + $3::text::bigint"
                    .into(),
                params: vec![
                    Some(end.to_string()),
                    Some(commit_time.to_string()),
                    Some(self.txns_in_batch.to_string()),
                ],
            },
            None,
        )
        .await?;
        self.drain().await?;
        crate::failpoint::hit("apply.before-commit");
        self.send(
            Sql {
                text: "COMMIT".into(),
                params: vec![],
            },
            None,
        )
        .await?;
        self.drain().await?;
        crate::failpoint::hit("apply.after-commit");
        self.in_target_tx = false;
        self.pending = None;
        self.txns_in_batch = 0;
        self.applied = end;
        Ok(end)
    }

    /// Drops a half-applied source transaction (on shutdown): the target rolls back to the last commit.
    pub async fn abandon(&mut self) {
        self.reset().await;
        self.streamed.clear();
        self.current = None;
        self.txns_in_batch = 0;
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

/// The WHERE clause that picks the row a change is about: the key condition itself, or, when rows are
/// matched on all their values (REPLICA IDENTITY FULL), exactly one of the equal rows, so duplicates stay
/// as many as on the source.
fn one_row(rel: &Rel, target: &str, condition: &str) -> String {
    if rel.identity == 'f' || rel.key_positions.is_empty() {
        format!(
            "(tableoid, ctid) = (SELECT tableoid, ctid FROM {target} WHERE {condition} LIMIT 1)"
        )
    } else {
        condition.to_string()
    }
}

/// Types without an equality operator: compared through their text form.
fn compare_as_text(sql_type: &str) -> bool {
    let base = sql_type.trim_end_matches("[]");
    matches!(
        base,
        "json" | "xml" | "point" | "line" | "lseg" | "box" | "path" | "polygon" | "circle"
    )
}

/// WHERE condition on the replica-identity key, and a description for errors (key values are shown:
/// they identify the row, the operator needs them; other values never are).
fn key_match(q: &mut Sql, rel: &Rel, tuple: &Tuple, key_only: bool) -> (String, String) {
    let mut conds = Vec::new();
    let mut shown = Vec::new();
    for (n, &pos) in rel.key_positions.iter().enumerate() {
        let name = &rel.columns[pos];
        let v = if key_only {
            // the K tuple carries every column, with NULLs outside the key
            tuple.0.get(pos).or(tuple.0.get(n))
        } else {
            tuple.0.get(pos)
        };
        let v = v.cloned().unwrap_or(Value::Null);
        let ty = &rel.table.columns[name];
        conds.push(format!("{} = {}", quote_ident(name), q.param(&v, ty)));
        if let Value::Text(b) = &v {
            shown.push(format!("{name}={}", String::from_utf8_lossy(b)));
        }
    }
    (
        conds.join(" AND "),
        format!("with key ({})", shown.join(", ")),
    )
}

fn full_match(q: &mut Sql, rel: &Rel, old: &Tuple) -> (String, String) {
    let mut conds = Vec::new();
    for (c, v) in rel.columns.iter().zip(&old.0) {
        let ty = &rel.table.columns[c];
        let col = quote_ident(c);
        match v {
            Value::Unchanged => {}
            Value::Null => conds.push(format!("{col} IS NULL")),
            _ if compare_as_text(ty) => {
                let p = q.param(v, ty);
                conds.push(format!("{col}::text = {p}::text"))
            }
            _ => {
                let p = q.param(v, ty);
                conds.push(format!("{col} = {p}"))
            }
        }
    }
    (
        if conds.is_empty() {
            "true".into()
        } else {
            conds.join(" AND ")
        },
        "(matched on all columns)".into(),
    )
}
