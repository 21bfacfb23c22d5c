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

use super::fold::{self, Folded, Key, Unfoldable};
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
    /// The primary key is the table's only unique or exclusion constraint: its changes may be folded
    /// (see `fold`).
    pub foldable: bool,
}

struct Rel {
    table: TargetTable,
    /// Column names in the order the source sends values.
    columns: Vec<String>,
    key_positions: Vec<usize>,
    identity: char,
    /// Changes are folded into net changes per key (see `fold`).
    foldable: bool,
}

impl Rel {
    /// The key of a row image (`positions` of the full tuple), when every key value is there.
    fn key_of(&self, tuple: &Tuple) -> Option<Key> {
        self.key_positions
            .iter()
            .map(|&p| match tuple.0.get(p) {
                Some(Value::Text(b) | Value::Binary(b)) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    /// Key columns with their SQL types.
    fn key_columns(&self) -> Vec<(String, String)> {
        self.key_positions
            .iter()
            .map(|&p| {
                let c = &self.columns[p];
                (c.clone(), self.table.columns[c].clone())
            })
            .collect()
    }
}

/// Applies decoded messages to the target.
pub struct Applier {
    client: Arc<Client>,
    source: Client,
    tables: HashMap<QualifiedName, TargetTable>,
    relations: HashMap<u32, Rel>,
    /// Prepared statements by SQL text.
    statements: HashMap<String, Statement>,
    position_statement: Option<Statement>,
    /// Tables whose `streamed` mark this session has written.
    streamed: std::collections::HashSet<QualifiedName>,
    /// Folded changes per relation, not yet written (see `fold`).
    folded: HashMap<u32, Folded>,
    /// Inserts into tables that cannot be folded, not yet written: one statement per run.
    runs: HashMap<u32, Vec<Vec<Value>>>,
    /// Rows and bytes held in `folded` and `runs`.
    held_rows: usize,
    held_bytes: usize,
    /// Changes of different tables may be written in another order than the source's (foreign keys and
    /// triggers do not run for the applier).
    reorder: bool,
    /// Statements sent and not yet answered, oldest first, each with what it must affect (Some: a row).
    inflight: VecDeque<(InFlight, Option<Expect>)>,
    /// Parameter bytes sent since the pipeline was last empty (an upper bound of what is in flight).
    inflight_bytes: usize,
    in_target_tx: bool,
    current: Option<Begin>,
    skipping: bool,
    /// End LSN of the last source transaction committed on the target.
    pub applied: Lsn,
    /// Target commits not yet known to be flushed to the target's disk (the apply session commits with
    /// `synchronous_commit = off`, as native subscriptions do): (source end LSN, target WAL position after
    /// the commit). Feedback to the source waits for the flush.
    unflushed: VecDeque<(Lsn, Lsn)>,
    /// End LSN of the last source transaction durable on the target.
    durable: Lsn,
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

/// Held changes are written once they are this many rows or bytes: memory stays bounded in a transaction of
/// any size, and one statement's arrays stay a size the planner joins by index.
const HOLD_ROWS: usize = 4000;
const HOLD_BYTES: usize = 8 << 20;

type InFlight = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;

/// A statement being built: SQL text and its parameters.
#[derive(Default)]
struct Sql {
    text: String,
    params: Vec<Param>,
}

/// A parameter: one value as text (or NULL), or an array of them (for a set-based statement).
enum Param {
    Text(Option<String>),
    Array(Vec<Option<String>>),
}

impl Param {
    fn sql_type(&self) -> Type {
        match self {
            Param::Text(_) => Type::TEXT,
            Param::Array(_) => Type::TEXT_ARRAY,
        }
    }

    fn size(&self) -> usize {
        match self {
            Param::Text(v) => v.as_ref().map_or(0, |v| v.len()),
            Param::Array(a) => a.iter().flatten().map(|v| v.len() + 4).sum(),
        }
    }

    fn as_sql(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Param::Text(v) => v,
            Param::Array(v) => v,
        }
    }
}

impl Sql {
    fn new(text: impl Into<String>, params: Vec<Option<String>>) -> Sql {
        Sql {
            text: text.into(),
            params: params.into_iter().map(Param::Text).collect(),
        }
    }

    /// A parameter cast to `sql_type`, as SQL.
    fn param(&mut self, v: &Value, sql_type: &str) -> String {
        self.params.push(Param::Text(fold::element(v)));
        format!("${}::{sql_type}", self.params.len())
    }

    /// Array parameters, one per column; returns the number of the first.
    fn arrays(&mut self, columns: Vec<Vec<Option<String>>>) -> usize {
        let first = self.params.len() + 1;
        self.params.extend(columns.into_iter().map(Param::Array));
        first
    }
}

/// What a statement must affect: `rows` rows, else the target has drifted. `probe` finds the keys that
/// are missing on the target, to name them.
struct Expect {
    rows: u64,
    what: String,
    probe: Option<Sql>,
}

impl Applier {
    /// `applied`: the LSN recorded on the target; `tables`: target tables by name.
    /// `source`: a session on the source, to name the types a Relation message lists.
    pub fn new(
        client: Client,
        source: Client,
        applied: Lsn,
        tables: HashMap<QualifiedName, TargetTable>,
        reorder: bool,
    ) -> Self {
        Applier {
            client: Arc::new(client),
            source,
            tables,
            relations: HashMap::new(),
            folded: HashMap::new(),
            runs: HashMap::new(),
            held_rows: 0,
            held_bytes: 0,
            reorder,
            statements: HashMap::new(),
            position_statement: None,
            streamed: Default::default(),
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            in_target_tx: false,
            current: None,
            skipping: false,
            applied,
            unflushed: VecDeque::new(),
            durable: Lsn::default(),
            pending: None,
            txns_in_batch: 0,
            last_commit_time: 0,
            applied_txns: 0,
        }
    }

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
                    self.send(Sql::new("BEGIN", vec![]), None).await?;
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
        let key_positions: Vec<usize> = r
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect();
        let mut key_names: Vec<&str> = key_positions
            .iter()
            .map(|&p| r.columns[p].name.as_str())
            .collect();
        key_names.sort();
        let mut pk: Vec<&str> = table.key.iter().map(|k| k.as_str()).collect();
        pk.sort();
        let foldable =
            self.reorder && table.foldable && r.replica_identity != 'f' && key_names == pk;
        // changes held under the old description are written with it
        self.flush_table(r.oid).await?;
        self.relations.insert(
            r.oid,
            Rel {
                table,
                columns: r.columns.iter().map(|c| c.name.clone()).collect(),
                key_positions,
                identity: r.replica_identity,
                foldable,
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
            Sql::new(
                "UPDATE hikkoshi.tables SET streamed = true WHERE NOT streamed \
                 AND ((schema_name = $1 AND table_name = $2) OR (root_schema = $1 AND root_name = $2))",
                vec![Some(name.schema.clone()), Some(name.name.clone())],
            ),
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
        if !converge {
            if rel.foldable {
                if let Some(key) = rel.key_of(&i.new) {
                    let image = i.new.0.clone();
                    if self.fold(i.relation, |f| f.insert(key, image)).await? {
                        return Ok(());
                    }
                }
            } else if !i.new.0.iter().any(|v| matches!(v, Value::Unchanged)) {
                return self.hold_insert(i.relation, i.new.0).await;
            }
        }
        self.before_direct(i.relation).await?;
        let rel = self.rel(i.relation)?;
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
        if !converge && rel.foldable {
            let new = rel.key_of(&u.new);
            let old = match &u.old {
                None => new.clone(),
                Some(OldRow::Key(old)) => rel.key_of(old),
                Some(OldRow::Full(_)) => None,
            };
            let image = u.new.0.clone();
            let folded = match (old, new) {
                (Some(old), Some(new)) if old == new => {
                    self.fold(u.relation, |f| f.update(new, image)).await?
                }
                (Some(old), Some(new)) => {
                    self.fold(u.relation, |f| f.rekey(old, new, image)).await?
                }
                _ => false,
            };
            if folded {
                return Ok(());
            }
        }
        self.before_direct(u.relation).await?;
        let rel = self.rel(u.relation)?;
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
        let expect = (!converge).then(|| Expect {
            rows: 1,
            what: format!("an UPDATE of {} {what}", rel.table.name),
            probe: None,
        });
        self.send(q, expect).await
    }

    async fn delete(&mut self, d: Delete) -> Result<(), ApplyError> {
        let rel = self.rel(d.relation)?;
        let (skip, converge) = self.mode(rel);
        if skip {
            return Ok(());
        }
        if !converge
            && rel.foldable
            && let OldRow::Key(old) = &d.old
            && let Some(key) = rel.key_of(old)
            && self.fold(d.relation, |f| f.delete(key)).await?
        {
            return Ok(());
        }
        self.before_direct(d.relation).await?;
        let rel = self.rel(d.relation)?;
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
        let expect = (!converge).then(|| Expect {
            rows: 1,
            what: format!("a DELETE of {} {what}", rel.table.name),
            probe: None,
        });
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
        // CASCADE reaches tables the message may not list
        self.flush_all().await?;
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
        self.send(Sql::new(text, vec![]), None).await
    }

    /// Folds a change into the table's held changes; false when it cannot be folded (the held changes
    /// are then written, and the change goes on its own after them).
    async fn fold(
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
    async fn hold_insert(&mut self, oid: u32, row: Vec<Value>) -> Result<(), ApplyError> {
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
    async fn before_direct(&mut self, oid: u32) -> Result<(), ApplyError> {
        if self.reorder {
            self.flush_table(oid).await
        } else {
            self.flush_all().await
        }
    }

    async fn flush_all(&mut self) -> Result<(), ApplyError> {
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
    async fn flush_table(&mut self, oid: u32) -> Result<(), ApplyError> {
        let folded = self.folded.remove(&oid).unwrap_or_default();
        let run = self.runs.remove(&oid).unwrap_or_default();
        if folded.is_empty() && run.is_empty() {
            return Ok(());
        }
        self.held_rows = self.held_rows.saturating_sub(folded.rows.len() + run.len());
        self.held_bytes = self.held_bytes.saturating_sub(folded.bytes);
        let rel = self.rel(oid)?;
        let target = rel.table.name.quoted();
        let keys = rel.key_columns();
        let split = folded.split();
        let mut statements: Vec<(Sql, Option<Expect>)> = Vec::new();
        if !split.delete.is_empty() {
            let n = split.delete.len();
            let key_arrays = key_arrays(&keys, split.delete.iter());
            let mut q = Sql::default();
            let first = q.arrays(key_arrays.clone());
            q.text = format!(
                "DELETE FROM {target} AS t USING {} WHERE {}",
                fold::rows_from(keys.len(), first),
                fold::key_join(&keys)
            );
            let probe = probe(&target, &keys, key_arrays);
            statements.push((
                q,
                Some(Expect {
                    rows: n as u64,
                    what: format!("{n} DELETE(s) of {}", rel.table.name),
                    probe: Some(probe),
                }),
            ));
        }
        // updates, one statement per set of changed columns (a TOASTed value left unchanged is not set)
        let mut shapes: HashMap<Vec<usize>, Vec<(Key, Vec<Value>)>> = HashMap::new();
        for (key, image) in split.update {
            let shape: Vec<usize> = image
                .iter()
                .enumerate()
                .filter(|(p, v)| {
                    !matches!(v, Value::Unchanged)
                        && !rel.key_positions.contains(p)
                        && !rel.table.always_identity.contains(&rel.columns[*p])
                })
                .map(|(p, _)| p)
                .collect();
            if !shape.is_empty() {
                shapes.entry(shape).or_default().push((key, image));
            }
        }
        for (shape, rows) in shapes {
            let n = rows.len();
            let key_arrays = key_arrays(&keys, rows.iter().map(|(k, _)| k));
            let mut arrays = key_arrays.clone();
            for &p in &shape {
                arrays.push(rows.iter().map(|(_, img)| fold::element(&img[p])).collect());
            }
            let mut q = Sql::default();
            let first = q.arrays(arrays);
            let sets: Vec<String> = shape
                .iter()
                .enumerate()
                .map(|(i, &p)| {
                    let c = &rel.columns[p];
                    format!(
                        "{} = {}",
                        quote_ident(c),
                        fold::cell(keys.len() + i, &rel.table.columns[c])
                    )
                })
                .collect();
            q.text = format!(
                "UPDATE {target} AS t SET {} FROM {} WHERE {}",
                sets.join(", "),
                fold::rows_from(keys.len() + shape.len(), first),
                fold::key_join(&keys)
            );
            let probe = probe(&target, &keys, key_arrays);
            statements.push((
                q,
                Some(Expect {
                    rows: n as u64,
                    what: format!("{n} UPDATE(s) of {}", rel.table.name),
                    probe: Some(probe),
                }),
            ));
        }
        // inserts, one statement per set of columns given
        let mut shapes: Vec<(Vec<usize>, Vec<Vec<Value>>)> = Vec::new();
        for image in split.insert.into_iter().chain(run) {
            let shape: Vec<usize> = image
                .iter()
                .enumerate()
                .filter(|(_, v)| !matches!(v, Value::Unchanged))
                .map(|(p, _)| p)
                .collect();
            match shapes.iter_mut().find(|(s, _)| *s == shape) {
                Some((_, rows)) => rows.push(image),
                None => shapes.push((shape, vec![image])),
            }
        }
        for (shape, rows) in shapes {
            let arrays: Vec<Vec<Option<String>>> = shape
                .iter()
                .map(|&p| rows.iter().map(|img| fold::element(&img[p])).collect())
                .collect();
            let mut q = Sql::default();
            let first = q.arrays(arrays);
            let cells: Vec<String> = shape
                .iter()
                .enumerate()
                .map(|(i, &p)| fold::cell(i, &rel.table.columns[&rel.columns[p]]))
                .collect();
            q.text = format!(
                "INSERT INTO {target} ({}){} SELECT {} FROM {}",
                shape
                    .iter()
                    .map(|&p| quote_ident(&rel.columns[p]))
                    .collect::<Vec<_>>()
                    .join(", "),
                if rel.table.always_identity.is_empty() {
                    ""
                } else {
                    " OVERRIDING SYSTEM VALUE"
                },
                cells.join(", "),
                fold::rows_from(shape.len(), first)
            );
            statements.push((q, None));
        }
        for (q, expect) in statements {
            self.send(q, expect).await?;
        }
        Ok(())
    }

    /// Sends a statement now (prepared once per shape) and keeps its result for later; waits for the
    /// oldest results when the pipeline is full.
    async fn send(&mut self, q: Sql, expect: Option<Expect>) -> Result<(), ApplyError> {
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
    async fn send_position(&mut self) -> Result<Arc<std::sync::Mutex<Option<String>>>, ApplyError> {
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
                Err(ApplyError::Definite(format!(
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
        self.folded.clear();
        self.runs.clear();
        self.held_rows = 0;
        self.held_bytes = 0;
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
            return Ok(self.applied);
        };
        self.flush_all().await?;
        let commit_time = (self.last_commit_time as f64 / 1e6) + 946_684_800.0;
        self.send(
            Sql::new(
                "UPDATE hikkoshi.stream SET applied_lsn = greatest(applied_lsn, $1::text::pg_lsn), \
                 applied_at = now(), last_commit_time = to_timestamp($2::text::float8), \
                 applied_txns = applied_txns + $3::text::bigint",
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

/// One text array per key column, over `keys_of` rows.
fn key_arrays<'a>(
    keys: &[(String, String)],
    rows: impl Iterator<Item = &'a Key>,
) -> Vec<Vec<Option<String>>> {
    let mut arrays: Vec<Vec<Option<String>>> = vec![Vec::new(); keys.len()];
    for key in rows {
        for (a, v) in arrays.iter_mut().zip(key) {
            a.push(Some(String::from_utf8_lossy(v).into_owned()));
        }
    }
    arrays
}

/// The query that names the keys of `key_arrays` the target does not have.
fn probe(target: &str, keys: &[(String, String)], key_arrays: Vec<Vec<Option<String>>>) -> Sql {
    let mut q = Sql::default();
    let first = q.arrays(key_arrays);
    let names: Vec<String> = keys
        .iter()
        .map(|(k, _)| crate::ident::display_ident(k))
        .collect();
    let values: Vec<String> = (0..keys.len()).map(|i| format!("u.c{i}")).collect();
    q.text = format!(
        "SELECT '({})=(' || concat_ws(', ', {}) || ')' FROM {} \
         WHERE NOT EXISTS (SELECT 1 FROM {target} AS t WHERE {}) LIMIT 5",
        names.join(", ").replace('\'', "''"),
        values.join(", "),
        fold::rows_from(keys.len(), first),
        fold::key_join(keys)
    );
    q
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
