//! The cutover's verification in two parts, so that the write pause grows with the rows changed in the last
//! seconds, not with the size of the tables.
//!
//! **Before the fence**, while the application still writes:
//! 1. a temporary slot is made on the old primary, with an exported snapshot at its consistent point C;
//! 2. once the new primary has applied past C, a temporary slot is made there too (snapshot at B), over a
//!    publication of its own (`hikkoshi_<id>_proof`);
//! 3. from then on each slot streams the keys of every row its server changes: inserts, updates (with the
//!    old key when it changed), deletes; a TRUNCATE marks its table;
//! 4. the new primary's snapshot holds the old one's changes up to its `applied_lsn` A, a little past C:
//!    the keys the old primary's stream saw up to A are left out of the hashes (they are compared later);
//! 5. the tables are hashed by key range in the two snapshots, as `hikkoshi verify` does, and the keys of
//!    the rows of a range that still differs are kept.
//!
//! **In the pause**, once the new primary has applied everything up to the fence, a logical message on each
//! server ends its stream, and the rows of all kept keys are compared by key on both servers, also in
//! tables that `--verify quick` leaves out (the stream had not changed them) when a server changed them.
//!
//! Why this proves the tables equal: a row whose key neither stream saw, and that did not differ in the
//! snapshots, is on the old primary as it was at C and on the new one as it was at B, and those were equal.
//! Every other row is compared directly, after the fence. A row written on the new primary by anyone (the
//! applier, or someone by hand) is in the new primary's stream, so nothing on the target escapes.
//!
//! Tables without a key, tables the new primary cannot publish, tables truncated in between, and keys the
//! stream did not carry (a TOASTed key left out of an update) are hashed whole in the pause; so is
//! everything when the preparation cannot be made (a server before 14, no free slot or WAL sender, a long
//! transaction that holds off the slot's consistent point) or a stream fails.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::catalog::Table;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::{QualifiedName, quote_ident};
use crate::lsn::Lsn;
use crate::replication::conn::StreamMessage;
use crate::replication::{ReplicationConn, create_with_snapshot};
use crate::stream::pgoutput::{Message, OldRow, Relation, Tuple, Value};
use crate::verify::{self, TableResult, VerifyReport};

/// The prefix of the logical message that ends a proof stream.
const PREFIX: &str = "hikkoshi-proof";
/// Keys kept per table; past this many, the table is hashed whole in the pause.
const MAX_KEYS: usize = 1_000_000;
/// Keys looked up per statement in the pause.
const LOOKUP: usize = 10_000;
/// Fewer keys of one table than this are looked up by one session pair.
const SHARE: usize = 2_000;

/// The tables a relation of the stream feeds (itself, or the partitions of a root), each with the
/// positions of its key columns in the relation (None when one is missing).
type Feeds = Vec<(QualifiedName, Option<Vec<usize>>)>;

/// What the preparation needs to know.
pub struct Plan {
    pub old: ConnInfo,
    pub new: ConnInfo,
    pub old_side: Side,
    pub new_side: Side,
    /// The publication that the stream to the new primary reads on the old one.
    pub old_publication: String,
    /// Made on the new primary for its own stream of keys.
    pub new_publication: String,
    /// Prefix of the two temporary slots' names.
    pub slot: String,
    /// Every table of the selection.
    pub tables: Vec<Table>,
    /// The tables to hash in the snapshots (the others are as the copy left them on both servers).
    pub hash: HashSet<QualifiedName>,
    /// Key-range predicates recorded by the copy.
    pub ranges: HashMap<QualifiedName, Vec<String>>,
    pub jobs: usize,
    /// How long a slot may wait for its consistent point, and the new primary for C.
    pub wait: Duration,
}

/// Keys of rows to compare in the pause, per table, and the tables to hash whole (with the reason).
#[derive(Debug, Default)]
struct Keys {
    rows: HashMap<QualifiedName, HashSet<Vec<String>>>,
    whole: HashMap<QualifiedName, String>,
}

impl Keys {
    fn add(&mut self, table: &QualifiedName, key: Vec<String>) {
        if self.whole.contains_key(table) {
            return;
        }
        let set = self.rows.entry(table.clone()).or_default();
        set.insert(key);
        if set.len() > MAX_KEYS {
            self.whole(table, &format!("more than {MAX_KEYS} rows changed"));
        }
    }

    fn whole(&mut self, table: &QualifiedName, why: &str) {
        self.rows.remove(table);
        self.whole
            .entry(table.clone())
            .or_insert_with(|| why.to_string());
    }

    fn merge(&mut self, other: Keys) {
        for (t, why) in other.whole {
            self.whole(&t, &why);
        }
        for (t, set) in other.rows {
            for k in set {
                self.add(&t, k);
            }
        }
    }
}

/// What a stream has seen so far: the keys, and the end of the last transaction it received.
#[derive(Default)]
struct Collected {
    keys: std::sync::Mutex<Keys>,
    progress: AtomicU64,
}

impl Collected {
    fn keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A task reading a proof stream.
type Stream = JoinHandle<Result<(), Error>>;

/// The first part done: the snapshots compared and both streams running.
pub struct Prepared {
    old: ConnInfo,
    new: ConnInfo,
    new_publication: String,
    /// Every table of the selection.
    tables: Vec<Table>,
    differing: Keys,
    streams: Vec<(Stream, Arc<Collected>)>,
    /// Pairs of sessions (old, new), ready to compare by key in the pause.
    sessions: Vec<(Client, Client)>,
    nonce: String,
    pub tables_hashed: usize,
    pub rows_hashed: i64,
    pub seconds: f64,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // the streams' connections close with their tasks, and the temporary slots with them
        for (s, _) in &self.streams {
            s.abort();
        }
    }
}

/// What the pause's part did.
#[derive(Debug, Default)]
pub struct InPause {
    /// Rows compared by key.
    pub rows_compared: usize,
    /// Tables hashed whole, with the reason.
    pub hashed_whole: Vec<String>,
    /// Why the streams' keys could not be used (then every table was hashed whole).
    pub streams_failed: Option<String>,
}

/// Drops the new primary's proof publication (idempotent; `hikkoshi clean` also removes it).
pub async fn drop_publication(new: &Client, name: &str) {
    let _ = new
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await;
}

/// The first part: slots, snapshots, hashes. An error means the proof must be made in the pause instead
/// (the caller drops the publication).
pub async fn prepare(plan: Plan, old: &Client, new: &Client) -> Result<Prepared, Error> {
    let started = Instant::now();
    for (c, side) in [(old, plan.old_side), (new, plan.new_side)] {
        let v: i32 = c
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(Error::sql(side, "reading the server version"))?
            .get(0);
        if v < 140000 {
            return Err(Error::Blocked(format!(
                "the {side} runs PostgreSQL {}, and ending a key stream at the fence needs logical \
                 messages (14+)",
                v / 10000
            )));
        }
    }
    let (old_slot, new_slot) = (format!("{}_o", plan.slot), format!("{}_n", plan.slot));
    let old_snap = slot(&plan.old, plan.old_side, &old_slot, plan.wait).await?;
    let old_sessions = import(&plan.old, plan.old_side, &old_snap.snapshot, plan.jobs).await?;
    let consistent = old_snap.lsn;
    // so that the new primary's snapshot holds every change the old one's does (a slower applier only
    // makes more rows differ in the snapshots)
    verify::wait_synced(
        new,
        &old_snap.lsn.to_string(),
        plan.wait.min(Duration::from_secs(5)),
    )
    .await;

    // The new primary's publication lists its plain, logged tables with a key (a table without a replica
    // identity in a publication would refuse deletes).
    let keyed: Vec<(String, String)> = plan
        .tables
        .iter()
        .filter(|t| !t.key.is_empty())
        .map(|t| (t.name.schema.clone(), t.name.name.clone()))
        .collect();
    let (schemas, names): (Vec<String>, Vec<String>) = keyed.into_iter().unzip();
    let publishable: Vec<QualifiedName> = new
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN unnest($1::text[], $2::text[]) AS s(nsp, rel) ON s.nsp = n.nspname AND s.rel = c.relname
             WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND c.relreplident <> 'n'
               AND (c.relreplident <> 'd'
                    OR EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))",
            &[&schemas, &names],
        )
        .await
        .map_err(Error::sql(plan.new_side, "listing tables for the proof's publication"))?
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    if publishable.is_empty() {
        return Err(Error::Blocked("no table with a key to stream".into()));
    }
    // a table whose changes on the new primary cannot be streamed is hashed whole in the pause
    let mut unstreamable = Keys::default();
    for t in plan.tables.iter().filter(|t| !t.key.is_empty()) {
        if !publishable.contains(&t.name) {
            unstreamable.whole(
                &t.name,
                &format!("the {} cannot stream its changes", plan.new_side),
            );
        }
    }
    new.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {p}; CREATE PUBLICATION {p} FOR TABLE {}",
        publishable
            .iter()
            .map(QualifiedName::quoted)
            .collect::<Vec<_>>()
            .join(", "),
        p = quote_ident(&plan.new_publication)
    ))
    .await
    .map_err(Error::sql(
        plan.new_side,
        "creating the proof's publication",
    ))?;
    let new_snap = slot(&plan.new, plan.new_side, &new_slot, plan.wait).await?;
    let new_sessions = import(&plan.new, plan.new_side, &new_snap.snapshot, plan.jobs).await?;

    // Both snapshots are imported: the slots may stream now.
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let tables = Arc::new(plan.tables.clone());
    let (on_old, on_new) = (
        Arc::new(Collected::default()),
        Arc::new(Collected::default()),
    );
    let streams = vec![
        (
            tokio::spawn(collect(
                old_snap,
                (plan.old_publication.clone(), plan.old_side),
                tables.clone(),
                nonce.clone(),
                on_old.clone(),
            )),
            on_old.clone(),
        ),
        (
            tokio::spawn(collect(
                new_snap,
                (plan.new_publication.clone(), plan.new_side),
                tables.clone(),
                nonce.clone(),
                on_new.clone(),
            )),
            on_new,
        ),
    ];
    let mut prepared = Prepared {
        old: plan.old.clone(),
        new: plan.new.clone(),
        new_publication: plan.new_publication.clone(),
        tables: plan.tables.clone(),
        differing: Keys::default(),
        streams,
        sessions: Vec::new(),
        nonce,
        tables_hashed: 0,
        rows_hashed: 0,
        seconds: 0.0,
    };
    let to_hash: Vec<Table> = plan
        .tables
        .iter()
        .filter(|t| !t.key.is_empty() && plan.hash.contains(&t.name))
        .cloned()
        .collect();
    // The new primary's snapshot holds what it had applied by then, up to some A past C: the rows the old
    // primary changed between C and A differ in the snapshots. The old primary's stream names them once it
    // has passed A; they are left out of the hashes (the pause compares them).
    let applied: Option<Lsn> = match new_sessions.first() {
        Some(c) => c
            .query_one("SELECT applied_lsn::text FROM hikkoshi.stream", &[])
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|s| s.parse().ok()),
        None => None,
    };
    let mut excluded = Keys::default();
    if let Some(a) = applied.filter(|a| *a > consistent) {
        let until = Instant::now() + plan.wait;
        while on_old.progress.load(Ordering::Relaxed) < a.0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if on_old.progress.load(Ordering::Relaxed) >= a.0 {
            let seen = on_old.keys();
            excluded.rows = seen.rows.clone();
            excluded.whole = seen.whole.clone();
        }
    }
    excluded.merge(unstreamable);
    let to_hash: Vec<Table> = to_hash
        .into_iter()
        .filter(|t| !excluded.whole.contains_key(&t.name))
        .collect();
    prepared.tables_hashed = to_hash.len();
    tracing::info!(
        "proof: hashing {} table(s) in snapshots of both servers before the fence ({} row(s) changed \
         meanwhile left for the pause); the application keeps writing",
        to_hash.len(),
        excluded.rows.values().map(HashSet::len).sum::<usize>()
    );
    let excluded_whole = excluded.whole.clone();
    let excluded: HashMap<QualifiedName, Vec<Vec<String>>> = excluded
        .rows
        .into_iter()
        .map(|(t, k)| (t, k.into_iter().collect()))
        .collect();
    let (differing, rows, sessions) = hash_in_snapshots(
        old_sessions,
        new_sessions,
        to_hash,
        &plan.ranges,
        Arc::new(excluded),
    )
    .await?;
    prepared.differing = differing;
    for (t, why) in &excluded_whole {
        prepared.differing.whole(t, why);
    }
    prepared.sessions = sessions;
    prepared.rows_hashed = rows;
    prepared.seconds = started.elapsed().as_secs_f64();
    Ok(prepared)
}

/// A temporary slot with its exported snapshot, within `wait`.
async fn slot(
    info: &ConnInfo,
    side: Side,
    name: &str,
    wait: Duration,
) -> Result<crate::replication::ExportedSnapshot, Error> {
    let conn = ReplicationConn::connect(info)
        .await
        .map_err(Error::replication(format!(
            "opening a replication connection to the {side}"
        )))?;
    tokio::time::timeout(wait, create_with_snapshot(conn, name, true))
        .await
        .map_err(|_| {
            Error::Blocked(format!(
                "the {side}'s temporary slot found no consistent point within {}s: a long transaction is \
                 open there",
                wait.as_secs()
            ))
        })?
        .map_err(Error::replication(format!(
            "creating a temporary slot on the {side}"
        )))
}

/// `jobs` verify sessions, each in a read-only transaction on `snapshot`.
async fn import(
    info: &ConnInfo,
    side: Side,
    snapshot: &str,
    jobs: usize,
) -> Result<Vec<Client>, Error> {
    let mut out = Vec::new();
    for _ in 0..jobs.max(1) {
        let c = verify::open(info, side).await?;
        c.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await
        .map_err(Error::sql(side, "importing the proof's snapshot"))?;
        out.push(c);
    }
    Ok(out)
}

/// Hashes every range of `tables` in the two snapshots, `sessions` pairs at a time; returns the keys of the
/// rows that differ, how many rows were hashed (on the old primary), and the sessions, out of their
/// snapshots and ready for the lookups by key in the pause.
async fn hash_in_snapshots(
    old: Vec<Client>,
    new: Vec<Client>,
    tables: Vec<Table>,
    ranges: &HashMap<QualifiedName, Vec<String>>,
    excluded: Arc<HashMap<QualifiedName, Vec<Vec<String>>>>,
) -> Result<(Keys, i64, Vec<(Client, Client)>), Error> {
    let mut work: Vec<(Table, Option<String>)> = Vec::new();
    for t in tables {
        match ranges.get(&t.name) {
            Some(preds) if !preds.is_empty() => {
                for p in preds {
                    work.push((t.clone(), Some(p.clone())));
                }
            }
            _ => work.push((t, None)),
        }
    }
    let queue = Arc::new(std::sync::Mutex::new(work));
    let mut set = tokio::task::JoinSet::new();
    for (o, n) in old.into_iter().zip(new) {
        let (queue, excluded) = (queue.clone(), excluded.clone());
        set.spawn(async move {
            let mut keys = Keys::default();
            let mut rows = 0;
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((table, pred)) = next else { break };
                let skip = excluded.get(&table.name).map(Vec::as_slice).unwrap_or(&[]);
                let (s, t) = tokio::try_join!(
                    summary(&o, Side::Source, &table, pred.as_deref(), skip),
                    summary(&n, Side::Target, &table, pred.as_deref(), skip)
                )?;
                rows += s.0;
                if s != t {
                    for k in differing_keys(&o, &n, &table, pred.as_deref()).await? {
                        keys.add(&table.name, k);
                    }
                }
            }
            // the key lists join the tables through their primary keys, whatever the planner guesses
            let ready = "COMMIT; SET enable_hashjoin = off; SET enable_mergejoin = off";
            tokio::try_join!(
                async {
                    o.batch_execute(ready)
                        .await
                        .map_err(Error::sql(Side::Source, "ending the snapshot"))
                },
                async {
                    n.batch_execute(ready)
                        .await
                        .map_err(Error::sql(Side::Target, "ending the snapshot"))
                }
            )?;
            Ok::<_, Error>((keys, rows, (o, n)))
        });
    }
    let mut keys = Keys::default();
    let mut rows = 0;
    let mut sessions = Vec::new();
    while let Some(r) = set.join_next().await {
        let (k, n, pair) = r.map_err(|e| Error::Blocked(format!("a proof task failed: {e}")))??;
        keys.merge(k);
        rows += n;
        sessions.push(pair);
    }
    Ok((keys, rows, sessions))
}

/// Count and hash of one range in a snapshot, without the rows of the `skip` keys.
async fn summary(
    c: &Client,
    side: Side,
    table: &Table,
    predicate: Option<&str>,
    skip: &[Vec<String>],
) -> Result<(i64, String), Error> {
    let mut conditions: Vec<String> = predicate.map(String::from).into_iter().collect();
    if !skip.is_empty() {
        conditions.push(format!(
            "NOT EXISTS (SELECT FROM {} WHERE {})",
            crate::stream::fold::rows_from(table.key.len(), 1),
            key_match(table)
        ));
    }
    let sql = verify::summary_sql(table, true, conditions);
    let columns = key_columns(table, skip);
    let params: Vec<&(dyn ToSql + Sync)> = if skip.is_empty() {
        vec![]
    } else {
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect()
    };
    let r = c
        .query_one(&sql, &params)
        .await
        .map_err(Error::sql(side, format!("hashing {}", table.name)))?;
    Ok((r.get(0), r.get(1)))
}

/// `s.k1 = u.c0::type AND …`: a row of the table against a row of key arrays.
fn key_match(table: &Table) -> String {
    table
        .key
        .iter()
        .zip(table.key_types())
        .enumerate()
        .map(|(i, (k, ty))| {
            format!(
                "s.{} = {}",
                quote_ident(k),
                crate::stream::fold::cell(i, ty)
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Keys as one array per key column.
fn key_columns<'a>(table: &Table, keys: &'a [Vec<String>]) -> Vec<Vec<&'a str>> {
    (0..table.key.len())
        .map(|i| keys.iter().map(|k| k[i].as_str()).collect())
        .collect()
}

/// The key, as a list of its columns' text.
fn key_list(table: &Table) -> String {
    format!(
        "ARRAY[{}]",
        table
            .key
            .iter()
            .map(|k| format!("s.{}::text", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The keys of the rows of one range that differ between the two sessions.
async fn differing_keys(
    old: &Client,
    new: &Client,
    table: &Table,
    predicate: Option<&str>,
) -> Result<Vec<Vec<String>>, Error> {
    let sql = format!(
        "SELECT {}, {}, md5({}) FROM ONLY {} AS s {}",
        verify::key_text(table),
        key_list(table),
        verify::row_expr(table),
        table.name.quoted(),
        predicate.map(|p| format!("WHERE {p}")).unwrap_or_default()
    );
    let (a, b) = tokio::try_join!(
        async {
            old.query(&sql, &[]).await.map_err(Error::sql(
                Side::Source,
                format!("listing rows of {}", table.name),
            ))
        },
        async {
            new.query(&sql, &[]).await.map_err(Error::sql(
                Side::Target,
                format!("listing rows of {}", table.name),
            ))
        }
    )?;
    let index = |rows: &[tokio_postgres::Row]| -> HashMap<String, (Vec<String>, String)> {
        rows.iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    };
    let (a, b) = (index(&a), index(&b));
    let mut out = Vec::new();
    for (k, (list, hash)) in &a {
        if b.get(k).map(|(_, h)| h) != Some(hash) {
            out.push(list.clone());
        }
    }
    for (k, (list, _)) in &b {
        if !a.contains_key(k) {
            out.push(list.clone());
        }
    }
    Ok(out)
}

/// Reads one server's changes from its temporary slot, from the slot's snapshot until the message
/// carrying `nonce`, into `collected`.
async fn collect(
    snap: crate::replication::ExportedSnapshot,
    (publication, side): (String, Side),
    tables: Arc<Vec<Table>>,
    nonce: String,
    collected: Arc<Collected>,
) -> Result<(), Error> {
    let (mut conn, start) = (snap.conn, snap.lsn);
    conn.start_logical(&snap.slot, start, &publication)
        .await
        .map_err(Error::replication(format!(
            "starting the proof's stream on the {side}"
        )))?;
    let mut relations: HashMap<u32, Feeds> = HashMap::new();
    let mut seen = start;
    let mut last_status = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(1), conn.next_stream_message()).await;
        match next {
            Err(_) => {}
            Ok(Err(e)) => {
                return Err(Error::replication(format!(
                    "reading the proof's stream on the {side}"
                ))(e));
            }
            Ok(Ok(None)) => {
                return Err(Error::Blocked(format!(
                    "the {side} ended the proof's stream"
                )));
            }
            Ok(Ok(Some(StreamMessage::Keepalive { reply, .. }))) => {
                if reply {
                    conn.send_status(seen, seen, false)
                        .await
                        .map_err(Error::replication("answering a keepalive"))?;
                    last_status = Instant::now();
                }
            }
            Ok(Ok(Some(StreamMessage::XLogData {
                start: at, data, ..
            }))) => {
                seen = seen.max(at);
                let msg = Message::decode(data).map_err(|e| {
                    Error::Blocked(format!(
                        "undecodable message in the proof's stream on the {side} at {at}: {e}"
                    ))
                })?;
                if let Message::Message(m) = &msg
                    && m.prefix == PREFIX
                    && m.content[..] == *nonce.as_bytes()
                {
                    conn.close().await;
                    return Ok(());
                }
                {
                    let mut keys = collected.keys();
                    match msg {
                        Message::Relation(r) => {
                            relations.insert(r.oid, feeds(&tables, &r));
                        }
                        Message::Insert(i) => {
                            record(&mut keys, relations.get(&i.relation), &i.new, false)
                        }
                        Message::Update(u) => {
                            let old = u.old.as_ref().map(|o| match o {
                                OldRow::Key(t) | OldRow::Full(t) => t,
                            });
                            if let Some(old) = old {
                                record(&mut keys, relations.get(&u.relation), old, false);
                            }
                            // without an old row the key did not change; with one, the old key is recorded
                            record(&mut keys, relations.get(&u.relation), &u.new, old.is_some());
                        }
                        Message::Delete(d) => {
                            let (OldRow::Key(t) | OldRow::Full(t)) = &d.old;
                            record(&mut keys, relations.get(&d.relation), t, false);
                        }
                        Message::Truncate(t) => {
                            for rel in &t.relations {
                                for (name, _) in relations.get(rel).into_iter().flatten() {
                                    keys.whole(name, "truncated while the proof was under way");
                                }
                            }
                        }
                        Message::Commit(c) => {
                            collected.progress.fetch_max(c.end_lsn.0, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            }
        }
        if last_status.elapsed() > Duration::from_secs(5) {
            conn.send_status(seen, seen, false)
                .await
                .map_err(Error::replication("sending the proof stream's position"))?;
            last_status = Instant::now();
        }
    }
}

/// The tables with a key that a relation of the stream feeds: itself, or, for the root of a partitioned
/// table (a publication that publishes through the root), each of its partitions.
fn feeds(tables: &[Table], r: &Relation) -> Feeds {
    let name = QualifiedName::new(r.namespace.clone(), r.name.clone());
    tables
        .iter()
        .filter(|t| !t.key.is_empty() && (t.name == name || t.root.as_ref() == Some(&name)))
        .map(|t| {
            let positions: Option<Vec<usize>> = t
                .key
                .iter()
                .map(|k| r.columns.iter().position(|c| &c.name == k))
                .collect();
            (t.name.clone(), positions)
        })
        .collect()
}

/// Notes the key of `tuple` for every table its relation feeds. `lenient`: a key column that was not sent
/// is fine (the old row of the same change carried it).
fn record(keys: &mut Keys, targets: Option<&Feeds>, tuple: &Tuple, lenient: bool) {
    for (name, positions) in targets.into_iter().flatten() {
        let Some(positions) = positions else {
            keys.whole(name, "its key columns are not all in the stream");
            continue;
        };
        let key: Option<Vec<String>> = positions
            .iter()
            .map(|&p| match tuple.0.get(p) {
                Some(Value::Text(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect();
        match key {
            Some(k) => keys.add(name, k),
            None if lenient => {}
            None => keys.whole(
                name,
                "a change did not carry its key (an unchanged TOASTed key)",
            ),
        }
    }
}

impl Prepared {
    /// Gives up the proof before the fence (or after a failure): the streams end, the publication goes.
    pub async fn abandon(self, new: &Client) {
        drop_publication(new, &self.new_publication).await;
        drop(self);
    }

    /// The second part, once the new primary has applied everything up to the fence: ends both streams,
    /// compares the rows of every kept key, hashes the tables that need it whole, and compares `sequences`.
    /// `check` are the tables to verify (quick: those the stream changed; full: all). The caller drops the
    /// publication afterwards, outside the pause.
    pub async fn conclude(
        mut self,
        (old, old_side): (&Client, Side),
        (new, new_side): (&Client, Side),
        check: Vec<Table>,
        sequences: verify::SourceSequences<'_>,
        jobs: usize,
        wait: Duration,
    ) -> Result<(VerifyReport, InPause), Error> {
        let started = Instant::now();
        let mut keys = std::mem::take(&mut self.differing);
        let streams = std::mem::take(&mut self.streams);
        let mut failed = None;
        // Transactional, so that its commit flushes the WAL and the walsender sends it at once; every
        // transaction that committed before it is sent before it.
        for (c, side) in [(old, old_side), (new, new_side)] {
            if let Err(e) = c
                .execute(
                    "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
                    &[&PREFIX, &self.nonce],
                )
                .await
            {
                failed = Some(format!(
                    "ending the proof's stream on the {side}: {}",
                    crate::error::chain(&Error::sql(side, "emitting a message")(e))
                ));
            }
        }
        for (s, collected) in streams {
            if failed.is_some() {
                s.abort();
                continue;
            }
            match tokio::time::timeout(wait, s).await {
                Ok(Ok(Ok(()))) => keys.merge(std::mem::take(&mut *collected.keys())),
                Ok(Ok(Err(e))) => failed = Some(crate::error::chain(&e)),
                Ok(Err(e)) => failed = Some(format!("a proof stream failed: {e}")),
                Err(_) => {
                    failed = Some(format!(
                        "a proof stream did not reach the fence within {}s",
                        wait.as_secs()
                    ))
                }
            }
        }
        tracing::info!(
            "proof: both key streams ended {:.3}s into the pause's part",
            started.elapsed().as_secs_f64()
        );
        let mut pause = InPause::default();
        let mut whole = Vec::new();
        let mut by_key = Vec::new();
        // A table outside `check` (quick: not changed by the stream) whose rows changed on either server
        // in the meantime is compared too: those are the rows that may differ.
        let mut check = check;
        let touched: Vec<Table> = self
            .tables
            .iter()
            .filter(|t| {
                (keys.rows.contains_key(&t.name) || keys.whole.contains_key(&t.name))
                    && !check.iter().any(|c| c.name == t.name)
            })
            .cloned()
            .collect();
        check.extend(touched);
        for t in check {
            let why = if let Some(f) = &failed {
                Some(f.clone())
            } else if t.key.is_empty() {
                Some("no key".to_string())
            } else {
                keys.whole.get(&t.name).cloned()
            };
            match why {
                Some(why) => {
                    pause.hashed_whole.push(format!("{} ({why})", t.name));
                    whole.push(t);
                }
                None => {
                    let k: Vec<Vec<String>> = keys
                        .rows
                        .remove(&t.name)
                        .map(|s| s.into_iter().collect())
                        .unwrap_or_default();
                    pause.rows_compared += k.len();
                    by_key.push((t, k));
                }
            }
        }
        if let Some(f) = &failed {
            tracing::warn!("the proof's key streams failed ({f}): hashing the tables whole");
        }
        pause.streams_failed = failed;
        let sessions = std::mem::take(&mut self.sessions);
        // many keys of one table are shared out among the session pairs
        let share = pause
            .rows_compared
            .div_ceil(sessions.len().max(1))
            .max(SHARE);
        let mut work: Vec<(Table, Option<Vec<Vec<String>>>)> = Vec::new();
        for (t, k) in by_key {
            if k.len() <= share {
                work.push((t, Some(k)));
            } else {
                for part in k.chunks(share) {
                    work.push((t.clone(), Some(part.to_vec())));
                }
            }
        }
        work.extend(whole.into_iter().map(|t| (t, None)));
        let (sequences, (compared, different)) = tokio::try_join!(
            verify::verify_sequences(old, new, sequences),
            compare_in_pause(sessions, work)
        )?;
        let mut compared = merge_parts(compared);
        if !different.is_empty() {
            // hashed whole and different: locate the rows, as `hikkoshi verify` does
            let names: HashSet<String> = different.iter().map(|t| t.name.to_string()).collect();
            compared.retain(|r| !names.contains(&r.table));
            compared.extend(
                verify::compare(
                    &self.old,
                    &self.new,
                    different,
                    verify::SourceSequences::ReadNow(&[]),
                    jobs,
                )
                .await?
                .tables,
            );
        }
        tracing::info!(
            "proof: {} row(s) compared by key, {} table(s) hashed whole, {:.3}s into the pause's part",
            pause.rows_compared,
            pause.hashed_whole.len(),
            started.elapsed().as_secs_f64()
        );
        compared.sort_by(|a, b| a.table.cmp(&b.table));
        let report = VerifyReport {
            tables: compared,
            sequences,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((report, pause))
    }
}

/// The pause's comparisons, one table at a time on each pair of sessions: the rows of the given keys, by
/// key, or (None) the whole table's count and hash. Returns the results, and the tables hashed whole that
/// differ (their rows are yet to be located).
async fn compare_in_pause(
    sessions: Vec<(Client, Client)>,
    work: Vec<(Table, Option<Vec<Vec<String>>>)>,
) -> Result<(Vec<TableResult>, Vec<Table>), Error> {
    let queue = Arc::new(std::sync::Mutex::new(work));
    let mut set = tokio::task::JoinSet::new();
    for (o, n) in sessions {
        let queue = queue.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            let mut different = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((table, keys)) = next else { break };
                match keys {
                    Some(keys) => out.push(compare_table_keys(&o, &n, &table, &keys).await?),
                    None => {
                        let (s, t) = tokio::try_join!(
                            summary(&o, Side::Source, &table, None, &[]),
                            summary(&n, Side::Target, &table, None, &[])
                        )?;
                        let mut r = matched(&table);
                        (r.source_rows, r.target_rows, r.ranges) = (s.0, t.0, 1);
                        out.push(r);
                        if s != t {
                            different.push(table);
                        }
                    }
                }
            }
            Ok::<_, Error>((out, different))
        });
    }
    let mut out = Vec::new();
    let mut different = Vec::new();
    while let Some(r) = set.join_next().await {
        let (o, d) = r.map_err(|e| Error::Blocked(format!("a verify task failed: {e}")))??;
        out.extend(o);
        different.extend(d);
    }
    if !queue.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
        return Err(Error::Blocked(
            "no session was left to compare the changed rows".into(),
        ));
    }
    Ok((out, different))
}

/// One result per table, from the results of its parts (keys shared out among session pairs).
fn merge_parts(parts: Vec<TableResult>) -> Vec<TableResult> {
    let mut out: Vec<TableResult> = Vec::new();
    for p in parts {
        let Some(r) = out.iter_mut().find(|r| r.table == p.table) else {
            out.push(p);
            continue;
        };
        r.source_rows += p.source_rows;
        r.target_rows += p.target_rows;
        r.matched &= p.matched;
        for (dst, src) in [
            (&mut r.missing_on_target, p.missing_on_target),
            (&mut r.extra_on_target, p.extra_on_target),
            (&mut r.changed, p.changed),
        ] {
            dst.extend(src);
            dst.sort();
            dst.truncate(verify::SHOW);
        }
    }
    out
}

/// A table found equal, with no rows counted yet.
fn matched(table: &Table) -> TableResult {
    TableResult {
        table: table.name.to_string(),
        source_rows: 0,
        target_rows: 0,
        ranges: 0,
        matched: true,
        missing_on_target: vec![],
        extra_on_target: vec![],
        changed: vec![],
        unsettled: vec![],
    }
}

async fn compare_table_keys(
    old: &Client,
    new: &Client,
    table: &Table,
    keys: &[Vec<String>],
) -> Result<TableResult, Error> {
    if keys.is_empty() {
        // none of its rows changed since the snapshots
        return Ok(matched(table));
    }
    let types = table.key_types();
    let sql = format!(
        "SELECT {}, md5({}) FROM ONLY {} AS s WHERE ({}) IN (SELECT {} FROM {})",
        verify::key_text(table),
        verify::row_expr(table),
        table.name.quoted(),
        verify::s_columns(table.key.iter().map(String::as_str)),
        types
            .iter()
            .enumerate()
            .map(|(i, ty)| crate::stream::fold::cell(i, ty))
            .collect::<Vec<_>>()
            .join(", "),
        crate::stream::fold::rows_from(types.len(), 1)
    );
    let mut a = Vec::new();
    let mut b = Vec::new();
    for part in keys.chunks(LOOKUP) {
        let columns = key_columns(table, part);
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let (x, y) = tokio::try_join!(
            async {
                old.query(&sql, &params).await.map_err(Error::sql(
                    Side::Source,
                    format!("reading rows of {}", table.name),
                ))
            },
            async {
                new.query(&sql, &params).await.map_err(Error::sql(
                    Side::Target,
                    format!("reading rows of {}", table.name),
                ))
            }
        )?;
        a.extend(
            x.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))),
        );
        b.extend(
            y.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))),
        );
    }
    let (missing, extra, changed) = verify::diff(&a, &b);
    let show = |v: Vec<String>| v.into_iter().take(verify::SHOW).collect::<Vec<_>>();
    Ok(TableResult {
        table: table.name.to_string(),
        source_rows: a.len() as i64,
        target_rows: b.len() as i64,
        ranges: 0,
        matched: missing.is_empty() && extra.is_empty() && changed.is_empty(),
        missing_on_target: show(missing),
        extra_on_target: show(extra),
        changed: show(changed),
        unsettled: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn name(t: &str) -> QualifiedName {
        QualifiedName::new("app", t)
    }

    fn tuple(values: &[Option<&str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| match v {
                    Some("<unchanged>") => Value::Unchanged,
                    Some(s) => Value::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => Value::Null,
                })
                .collect(),
        )
    }

    #[test]
    fn keys_are_read_from_their_columns_and_a_missing_one_makes_the_table_whole() {
        // a root feeding two partitions keyed (tenant, id), in the relation's columns 2 and 0
        let feeds: Feeds = vec![
            (name("p1"), Some(vec![2, 0])),
            (name("p2"), Some(vec![2, 0])),
            (name("odd"), None),
        ];
        let mut keys = Keys::default();
        record(
            &mut keys,
            Some(&feeds),
            &tuple(&[Some("7"), Some("x"), Some("t1")]),
            false,
        );
        let want: HashSet<Vec<String>> = [vec!["t1".to_string(), "7".to_string()]].into();
        assert_eq!(keys.rows[&name("p1")], want);
        assert_eq!(keys.rows[&name("p2")], want);
        assert!(keys.whole.contains_key(&name("odd")));
        // an unchanged TOASTed key: fine when the old row carried it, else the table is hashed whole
        let unsent = tuple(&[Some("<unchanged>"), Some("y"), Some("t1")]);
        record(&mut keys, Some(&feeds[..1].to_vec()), &unsent, true);
        assert_eq!(keys.rows[&name("p1")].len(), 1);
        record(&mut keys, Some(&feeds[..1].to_vec()), &unsent, false);
        assert!(keys.whole.contains_key(&name("p1")) && !keys.rows.contains_key(&name("p1")));
        // once whole, a table takes no more keys; a relation we do not verify is ignored
        record(
            &mut keys,
            Some(&feeds[..1].to_vec()),
            &tuple(&[Some("8"), None, Some("t2")]),
            false,
        );
        assert!(!keys.rows.contains_key(&name("p1")));
        record(&mut keys, None, &tuple(&[Some("1")]), false);
    }

    fn table(name: &str, root: Option<&str>, key: &[&str]) -> Table {
        Table {
            name: QualifiedName::new("app", name),
            root: root.map(|r| QualifiedName::new("app", r)),
            columns: vec![],
            key: key.iter().map(|k| k.to_string()).collect(),
            replica_identity: 'd',
            bytes: 0,
            pages: 0,
            rows_estimate: 0.0,
            unlogged: false,
        }
    }

    fn relation(name: &str, columns: &[&str]) -> Relation {
        Relation {
            oid: 1,
            namespace: "app".into(),
            name: name.into(),
            replica_identity: 'd',
            columns: columns
                .iter()
                .map(|c| crate::stream::pgoutput::RelationColumn {
                    key: false,
                    name: c.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn a_root_feeds_its_partitions_and_a_table_itself() {
        let tables = vec![
            table("m_2024_01", Some("m"), &["sensor", "taken_on"]),
            table("m_2024_02", Some("m"), &["sensor", "taken_on"]),
            table("t", None, &["id"]),
            table("log", None, &[]),
        ];
        // the root, as a publication through the root sends it: both partitions, keys by name
        let root = feeds(&tables, &relation("m", &["value", "taken_on", "sensor"]));
        assert_eq!(
            root,
            vec![
                (name("m_2024_01"), Some(vec![2, 1])),
                (name("m_2024_02"), Some(vec![2, 1])),
            ]
        );
        // a partition, as the new primary's own publication sends it
        assert_eq!(
            feeds(
                &tables,
                &relation("m_2024_02", &["sensor", "taken_on", "value"])
            ),
            vec![(name("m_2024_02"), Some(vec![0, 1]))]
        );
        // a key column missing from the relation: the table is marked, not silently skipped
        assert_eq!(
            feeds(&tables, &relation("t", &["note"])),
            vec![(name("t"), None)]
        );
        // tables without a key (hashed whole anyway) and unknown relations feed nothing
        assert!(feeds(&tables, &relation("log", &["a"])).is_empty());
        assert!(feeds(&tables, &relation("other", &["id"])).is_empty());
    }

    #[test]
    fn the_parts_of_a_table_make_one_result() {
        let part = |rows: i64, changed: &[&str]| TableResult {
            changed: changed.iter().map(|c| c.to_string()).collect(),
            matched: changed.is_empty(),
            source_rows: rows,
            target_rows: rows,
            ..matched(&table("t", None, &["id"]))
        };
        let merged = merge_parts(vec![
            part(3, &[]),
            matched(&table("u", None, &["id"])),
            part(2, &["(9)"]),
        ]);
        assert_eq!(merged.len(), 2);
        let t = merged.iter().find(|r| r.table == "app.t").unwrap();
        assert_eq!((t.source_rows, t.matched), (5, false));
        assert_eq!(t.changed, vec!["(9)".to_string()]);
    }

    #[test]
    fn merging_keeps_every_key_and_whole_wins() {
        let mut a = Keys::default();
        a.add(&name("t"), vec!["1".into()]);
        a.add(&name("u"), vec!["1".into()]);
        let mut b = Keys::default();
        b.add(&name("t"), vec!["2".into()]);
        b.whole(&name("u"), "truncated");
        a.merge(b);
        assert_eq!(a.rows[&name("t")].len(), 2);
        assert!(!a.rows.contains_key(&name("u")));
        assert_eq!(a.whole[&name("u")], "truncated");
    }
}
