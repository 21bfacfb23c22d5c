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

//!
//! The parts, one file each:
//! - `relation`: what the stream says of a table, checked against the target (schema drift);
//! - `statements`: the SQL of each change, pure and unit-tested;
//! - `hold`: changes folded or held per table, written as set-based statements;
//! - `pipeline`: statements in flight and their row-count expectations;
//! - `durability`: the batch commit with its LSN, and what the source may forget;
//! - `ddl`: a DDL command captured on the source, applied at its place in the stream.

mod ddl;
mod durability;
mod hold;
mod pipeline;
mod relation;
mod statements;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio_postgres::{Client, Statement};

use self::pipeline::InFlight;
use self::relation::Rel;
use self::statements::{Expect, Sql};
use super::fold::Folded;
use super::pgoutput::{Begin, Commit, Delete, Insert, Message, OldRow, Truncate, Update, Value};
use crate::ident::QualifiedName;
use crate::lsn::Lsn;

/// A failure while applying.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The stream contradicts itself (a change of a relation it never described).
    #[error("{0}")]
    Definite(String),
    /// A table changed shape on the source during streaming, or appeared in the publication: the message
    /// names the difference and the fix.
    #[error("{0}")]
    SchemaChanged(String),
    /// The target does not hold what the source's change expects (a row changed there directly): the
    /// message names the table and the key.
    #[error("{0}")]
    Drift(String),
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

/// An UPDATE or DELETE of a relation the stream describes with no key and no full identity names no row
/// (the old image holds only the key, which is empty): a partitioned table published through its root,
/// whose root has no replica identity of its own (a partition's does not count there).
fn no_row_named(rel: &relation::Rel, what: &str) -> Result<(), ApplyError> {
    if rel.identity == 'f' || !rel.key_positions.is_empty() {
        return Ok(());
    }
    let t = &rel.table.name;
    Err(ApplyError::SchemaChanged(format!(
        "{what} of {t} arrived without a key or full row to find it by: {t} has no primary key and no replica \
         identity of its own (a partitioned table is published through its root, and a partition's replica \
         identity does not count there). Run `ALTER TABLE {t} REPLICA IDENTITY FULL` on the source (and \
         on each partition without a key), then `hikkoshi clean` and clone again"
    )))
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

/// What the applier needs to apply DDL captured upstream (see `stream::ddl`).
#[derive(Clone, Debug, Default)]
pub struct DdlContext {
    /// The stream's publication; its capture table is `stream::ddl::capture::table(publication)`.
    pub publication: String,
    /// The clone kept the source's owners: DDL runs as the source's role where the apply session may.
    pub keep_owners: bool,
    /// Source role → target role (`clone --role-map`, reversed for a reverse stream).
    pub role_map: HashMap<String, String>,
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
    /// The capture table's name, and its relation once described: (oid, column names).
    capture: QualifiedName,
    capture_rel: Option<(u32, Vec<String>)>,
    /// The log's key for this stream's commands (the publication).
    capture_stream: String,
    keep_owners: bool,
    role_map: HashMap<String, String>,
    /// The apply session's own search_path, restored after each command.
    search_path: String,
    /// The last statement a command was matched to: (its client statement, index in the string).
    ddl_cursor: Option<((String, i32), usize)>,
    /// A command was applied in this source transaction: the target commits right after it.
    commit_after: bool,
    /// Columns whose values a command in this source transaction computed (added, retyped): the target
    /// computed its own, which the source's replace as the stream carries them, so an old row image does
    /// not match on them (REPLICA IDENTITY FULL).
    recomputed: HashMap<QualifiedName, std::collections::HashSet<String>>,
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
        ddl: DdlContext,
        search_path: String,
    ) -> Self {
        Applier {
            capture: super::ddl::capture::table(&ddl.publication),
            capture_rel: None,
            capture_stream: ddl.publication,
            keep_owners: ddl.keep_owners,
            role_map: ddl.role_map,
            search_path,
            ddl_cursor: None,
            commit_after: false,
            recomputed: HashMap::new(),
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

    /// Whether a source transaction is half applied (its Commit not seen yet).
    pub fn inside_source_transaction(&self) -> bool {
        self.current.is_some()
    }

    /// Whether the batch should commit now: a DDL command was applied in the last source transaction.
    pub fn wants_commit(&self) -> bool {
        self.commit_after && self.current.is_none()
    }

    /// Whether a target transaction with applied source transactions waits for its commit.
    pub fn has_uncommitted(&self) -> bool {
        self.pending.is_some()
    }

    pub async fn handle(&mut self, msg: Message) -> Result<(), ApplyError> {
        // a row of the capture table is a DDL command, not a change to write
        let changed = match &msg {
            Message::Insert(i) => Some(i.relation),
            Message::Update(u) => Some(u.relation),
            Message::Delete(d) => Some(d.relation),
            _ => None,
        };
        if let Some(oid) = changed
            && self.capture_rel.as_ref().is_some_and(|c| c.0 == oid)
        {
            if let Message::Insert(i) = msg
                && !self.skipping
            {
                let columns = self.capture_rel.as_ref().map(|c| c.1.clone());
                self.ddl(&columns.unwrap_or_default(), &i.new).await?;
            }
            return Ok(());
        }
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
        let q = statements::insert(self.rel(i.relation)?, &i.new, converge);
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
        no_row_named(rel, "an UPDATE")?;
        for (q, expect) in statements::update(rel, u.old.as_ref(), &u.new, converge) {
            self.send(q, expect).await?;
        }
        Ok(())
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
        no_row_named(self.rel(d.relation)?, "a DELETE")?;
        let (q, expect) = statements::delete(self.rel(d.relation)?, &d.old, converge);
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
        let q = statements::truncate(&names, t.restart_identity, t.cascade);
        self.send(q, None).await
    }

    async fn commit_source(&mut self, c: Commit) -> Result<(), ApplyError> {
        self.current = None;
        self.ddl_cursor = None;
        if !self.recomputed.is_empty() {
            // every row of those tables carries the source's values by now
            self.recomputed.clear();
            self.share_recomputed();
        }
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

    /// Drops a half-applied source transaction (on shutdown): the target rolls back to the last commit.
    pub async fn abandon(&mut self) {
        self.reset().await;
        self.streamed.clear();
        self.current = None;
        self.txns_in_batch = 0;
    }
}
