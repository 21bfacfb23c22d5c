//! `hikkoshi verify`: proves that source and target hold the same rows, without pulling the rows through the
//! tool. Each server computes, per key range, a row count and an order-independent hash of its rows (the sum
//! of each row's 64-bit `hashtextextended`, the hash that hash partitioning stores and that therefore stays
//! the same across versions and platforms: duplicates count, order does not). Both servers hash at the same
//! time. A range that differs is narrowed to the rows themselves by comparing (key, row md5) lists of that
//! range only.
//!
//! While `clone --follow` streams, the source moves ahead of the target: a differing range is checked again
//! once the target has applied everything up to the source position of the first look, until it settles;
//! only differences that persist are reported. Once writes are fenced the comparison is exact.
//!
//! Both sessions use `TimeZone = UTC`, `DateStyle = ISO` and the same column list, so a row reads as the same
//! text on both servers.

pub mod shape;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::{Catalog, Table};
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::{QualifiedName, quote_ident};
use crate::plan::{Selection, resolve};
use crate::session;

/// The outcome for one table.
#[derive(Debug, Serialize)]
pub struct TableResult {
    pub table: String,
    pub source_rows: i64,
    pub target_rows: i64,
    pub ranges: usize,
    pub matched: bool,
    /// Keys (or row descriptions for tables without a key) that differ, at most a few dozen.
    pub missing_on_target: Vec<String>,
    pub extra_on_target: Vec<String>,
    pub changed: Vec<String>,
    /// Rows that differed while the stream ran and kept changing on the source at every look: not proven
    /// either way (a cutover compares them exactly, once writes are fenced).
    pub unsettled: Vec<String>,
}

/// A sequence behind on the target.
#[derive(Debug, Serialize)]
pub struct SequenceResult {
    pub sequence: String,
    pub source: i64,
    pub target: Option<i64>,
    pub ok: bool,
}

/// The whole verification.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// Differences in the tables' shape (columns, indexes, constraints), one line each (see `shape`).
    pub schema: Vec<String>,
    /// Differences in what no stream carries: large objects and materialized views' contents.
    pub objects: Vec<String>,
    pub tables: Vec<TableResult>,
    pub sequences: Vec<SequenceResult>,
    pub seconds: f64,
}

impl VerifyReport {
    pub fn equal(&self) -> bool {
        self.schema.is_empty()
            && self.objects.is_empty()
            && self.tables.iter().all(|t| t.matched)
            && self.sequences.iter().all(|s| s.ok)
    }
}

/// What to verify.
pub struct VerifyOptions {
    pub source: String,
    pub target: String,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub jobs: usize,
}

pub(crate) const SHOW: usize = 20;

/// Compares every selected table and sequence.
pub async fn run(opts: &VerifyOptions) -> Result<VerifyReport, Error> {
    let selection =
        Selection::parse(&opts.include, &opts.exclude).map_err(|e| Error::Usage(format!("{e}")))?;
    let src_info = session::resolve(Side::Source, &opts.source)?;
    let tgt_info = session::resolve(Side::Target, &opts.target)?;
    let source = open(&src_info, Side::Source).await?;
    let cat = Catalog::load(&source)
        .await
        .map_err(Error::sql(Side::Source, "reading the source catalog"))?;
    let resolved = resolve(&cat, &selection)?;
    let mut report = compare(
        &src_info,
        &tgt_info,
        resolved.tables,
        SourceSequences::ReadNow(&resolved.sequences),
        opts.jobs,
    )
    .await?;
    let target = open(&tgt_info, Side::Target).await?;
    report.objects = objects(&source, &target).await?;
    Ok(report)
}

/// What no stream carries, compared: large objects (owner, grants, contents) and the contents of the
/// materialized views.
async fn objects(source: &Client, target: &Client) -> Result<Vec<String>, Error> {
    let renamed = crate::state::roles::renamed(target).await;
    let (a, b) = futures_util::future::join(
        crate::large_objects::inventory(source, Side::Source),
        crate::large_objects::inventory(target, Side::Target),
    )
    .await;
    let mut out = crate::large_objects::differences(&a?, &b?, &renamed);
    // grants are restored, and so compared, only where the clone kept the source's owners
    if crate::state::roles::owners_kept(target).await {
        let (a, b) = futures_util::future::join(
            crate::schema::grants::schema_grants(source, Side::Source),
            crate::schema::grants::schema_grants(target, Side::Target),
        )
        .await;
        out.extend(crate::schema::grants::differences(&a?, &b?, &renamed));
    }
    let levels = crate::matviews::levels(source, Side::Source).await?;
    for (name, s, t) in
        crate::matviews::differing((source, Side::Source), (target, Side::Target), &levels).await?
    {
        out.push(format!(
            "materialized view {name} has other contents ({s} row(s) on the source, {t} on the target; \
             a cutover refreshes it on both)"
        ));
    }
    Ok(out)
}

/// The source positions that the target's sequences must be at or past.
#[derive(Clone, Copy, Debug)]
pub enum SourceSequences<'a> {
    /// Read from the source now (`hikkoshi verify`).
    ReadNow(&'a [QualifiedName]),
    /// Read once a cutover's fence held. A `nextval` on the fenced old primary after that hands out a
    /// value that no row there can hold (the fence refuses the row), so it does not count.
    Fenced(&'a [crate::sequence::Position]),
}

/// Compares `tables` and `sequences` between two servers, `jobs` tables at a time.
pub async fn compare(
    src_info: &ConnInfo,
    tgt_info: &ConnInfo,
    tables: Vec<Table>,
    sequences: SourceSequences<'_>,
    jobs: usize,
) -> Result<VerifyReport, Error> {
    let started = Instant::now();
    let source = open(src_info, Side::Source).await?;
    let target = open(tgt_info, Side::Target).await?;
    let names: Vec<QualifiedName> = tables.iter().map(|t| t.name.clone()).collect();
    let renamed = crate::state::roles::renamed(&target).await;
    let access = shape::Access {
        compare: crate::state::roles::owners_kept(&target).await,
        renamed: &renamed,
    };
    let shapes = shape::compare(
        (&source, Side::Source),
        (&target, Side::Target),
        &names,
        access,
    )
    .await?;
    // rows are compared on the columns both sides have; the schema differences say the rest
    let tables: Vec<Table> = tables.iter().filter_map(|t| shapes.comparable(t)).collect();
    let schema = shapes.differences;
    let ranges = key_ranges(&target).await?;
    let record_hash = hash_record_extended(&source, Side::Source).await?
        && hash_record_extended(&target, Side::Target).await?;
    let workers = jobs.clamp(1, tables.len().max(1));
    let queue = Arc::new(std::sync::Mutex::new(tables));
    let ranges = Arc::new(ranges);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (queue, ranges) = (queue.clone(), ranges.clone());
        let (s, t) = (src_info.clone(), tgt_info.clone());
        set.spawn(async move {
            let source = open(&s, Side::Source).await?;
            let target = open(&t, Side::Target).await?;
            let mut out = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some(table) = next else { break };
                let preds = ranges.get(&table.name).cloned().unwrap_or_default();
                out.push(verify_table(&source, &target, &table, &preds, record_hash).await?);
            }
            Ok::<_, Error>(out)
        });
    }
    let mut tables = Vec::new();
    while let Some(r) = set.join_next().await {
        tables.extend(r.map_err(|e| Error::Blocked(format!("a verify task failed: {e}")))??);
    }
    tables.sort_by(|a, b| a.table.cmp(&b.table));
    let sequences = verify_sequences(&source, &target, sequences).await?;
    Ok(VerifyReport {
        schema,
        objects: Vec::new(),
        tables,
        sequences,
        seconds: started.elapsed().as_secs_f64(),
    })
}

pub(crate) async fn open(info: &ConnInfo, side: Side) -> Result<Client, Error> {
    let c = session::connect(info, side).await?;
    c.batch_execute(
        "SET TimeZone = 'UTC'; SET DateStyle = ISO; SET IntervalStyle = postgres;
         SET extra_float_digits = 1; SET application_name = 'hikkoshi verify';",
    )
    .await
    .map_err(Error::sql(side, "preparing a verify session"))?;
    Ok(c)
}

/// Key-range predicates recorded by the copy (they read the same on both servers; ctid ranges do not).
pub(crate) async fn key_ranges(
    target: &Client,
) -> Result<HashMap<QualifiedName, Vec<String>>, Error> {
    let mut out: HashMap<QualifiedName, Vec<String>> = HashMap::new();
    if !crate::state::exists(target)
        .await
        .map_err(Error::sql(Side::Target, "looking for hikkoshi state"))?
    {
        return Ok(out);
    }
    for (table, predicate) in crate::state::copy::key_ranges(target)
        .await
        .map_err(Error::sql(Side::Target, "reading the copy's key ranges"))?
    {
        out.entry(table).or_default().push(predicate);
    }
    Ok(out)
}

/// `s.a, s.b, …`: columns of the table aliased `s`, as every verify statement reads it.
pub(crate) fn s_columns<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|n| format!("s.{}", quote_ident(n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The row as text, from the source's column list (generated columns included: both sides compute them).
pub(crate) fn row_expr(table: &Table) -> String {
    if table.columns.is_empty() {
        return "'()'".into();
    }
    format!(
        "ROW({})::text",
        s_columns(table.columns.iter().map(|c| c.name.as_str()))
    )
}

/// `ROW(key)::text`: how a row is named in reports (tables with a key).
pub(crate) fn key_text(table: &Table) -> String {
    format!(
        "ROW({})::text",
        s_columns(table.key.iter().map(String::as_str))
    )
}

/// Whether the server has `hash_record_extended` (14+).
async fn hash_record_extended(c: &Client, side: Side) -> Result<bool, Error> {
    Ok(c.query_one(
        "SELECT current_setting('server_version_num')::int >= 140000",
        &[],
    )
    .await
    .map_err(Error::sql(side, "reading the server version"))?
    .get(0))
}

/// Column types whose hash function hashes the value itself, the same way on every version and platform
/// (hash partitioning stores these hashes): a row of only such columns is hashed without turning it into
/// text, three times faster. Enums (their hash is the label's OID, which differs between databases),
/// domains, extension types and types without a hash function are hashed through the row's text.
fn hashed_by_value(sql_type: &str) -> bool {
    let mut base = String::new();
    let mut depth = 0;
    for ch in sql_type.trim_end_matches("[]").chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 => base.push(ch),
            _ => {}
        }
    }
    let base = base.split_whitespace().collect::<Vec<_>>().join(" ");
    matches!(
        base.as_str(),
        "smallint"
            | "integer"
            | "bigint"
            | "numeric"
            | "real"
            | "double precision"
            | "boolean"
            | "text"
            | "character varying"
            | "character"
            | "\"char\""
            | "name"
            | "bytea"
            | "date"
            | "time without time zone"
            | "time with time zone"
            | "timestamp without time zone"
            | "timestamp with time zone"
            | "interval"
            | "uuid"
            | "jsonb"
            | "inet"
            | "cidr"
            | "macaddr"
            | "macaddr8"
            | "oid"
    )
}

/// A row's 64-bit hash (see `hashed_by_value`), to be summed over a range.
pub(crate) fn row_hash(table: &Table, record_hash: bool) -> String {
    if record_hash
        && !table.columns.is_empty()
        && table.columns.iter().all(|c| hashed_by_value(&c.type_sql))
    {
        format!(
            "hash_record_extended(ROW({}), 0)",
            s_columns(table.columns.iter().map(|c| c.name.as_str()))
        )
    } else {
        format!("hashtextextended({}, 0)", row_expr(table))
    }
}

/// Row count and summed row hash of the table's rows that meet every one of `conditions`.
pub(crate) fn summary_sql(table: &Table, record_hash: bool, conditions: Vec<String>) -> String {
    format!(
        "SELECT count(*), coalesce(sum({}), 0)::text FROM ONLY {} AS s {}",
        row_hash(table, record_hash),
        table.name.quoted(),
        if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE ({})", conditions.join(") AND ("))
        }
    )
}

async fn range_summary(
    c: &Client,
    side: Side,
    table: &Table,
    predicate: Option<&str>,
    record_hash: bool,
) -> Result<(i64, String), Error> {
    let sql = summary_sql(
        table,
        record_hash,
        predicate.map(String::from).into_iter().collect(),
    );
    let r = c
        .query_one(&sql, &[])
        .await
        .map_err(Error::sql(side, format!("hashing {}", table.name)))?;
    Ok((r.get(0), r.get(1)))
}

/// A range's summary on both servers at once.
async fn summaries(
    source: &Client,
    target: &Client,
    table: &Table,
    predicate: Option<&str>,
    record_hash: bool,
) -> Result<((i64, String), (i64, String)), Error> {
    tokio::try_join!(
        range_summary(source, Side::Source, table, predicate, record_hash),
        range_summary(target, Side::Target, table, predicate, record_hash)
    )
}

/// (identity, row hash) of every row in a range: the key's text when there is a key, else the row's hash.
async fn range_rows(
    c: &Client,
    side: Side,
    table: &Table,
    predicate: Option<&str>,
) -> Result<Vec<(String, String)>, Error> {
    let key = if table.key.is_empty() {
        format!("md5({})", row_expr(table))
    } else {
        key_text(table)
    };
    let sql = format!(
        "SELECT {key}, md5({row}) FROM ONLY {} AS s {}",
        table.name.quoted(),
        predicate.map(|p| format!("WHERE {p}")).unwrap_or_default(),
        row = row_expr(table)
    );
    Ok(c.query(&sql, &[])
        .await
        .map_err(Error::sql(side, format!("listing rows of {}", table.name)))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

async fn verify_table(
    source: &Client,
    target: &Client,
    table: &Table,
    predicates: &[String],
    record_hash: bool,
) -> Result<TableResult, Error> {
    let preds: Vec<Option<&str>> = if predicates.is_empty() {
        vec![None]
    } else {
        predicates.iter().map(|p| Some(p.as_str())).collect()
    };
    let mut result = TableResult {
        table: table.name.to_string(),
        source_rows: 0,
        target_rows: 0,
        ranges: preds.len(),
        matched: true,
        missing_on_target: vec![],
        extra_on_target: vec![],
        changed: vec![],
        unsettled: vec![],
    };
    for p in preds {
        let (mut s, mut t) = summaries(source, target, table, p, record_hash).await?;
        // While a follower streams, the target trails the source: look again once it has caught up with
        // where the source was, until the range settles.
        let mut tries = 0;
        while s != t && tries < 5 && follower_running(target).await {
            let lsn: String = source
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .map_err(Error::sql(Side::Source, "reading the WAL position"))?
                .get(0);
            wait_synced(target, &lsn, Duration::from_secs(30)).await;
            (s, t) = summaries(source, target, table, p, record_hash).await?;
            tries += 1;
        }
        result.source_rows += s.0;
        result.target_rows += t.0;
        if s == t {
            continue;
        }
        let a = range_rows(source, Side::Source, table, p).await?;
        let b = range_rows(target, Side::Target, table, p).await?;
        let (mut missing, mut extra, mut changed) = diff(&a, &b);
        if follower_running(target).await {
            // A range that never settles as a whole (a table written all the time) is settled row by row.
            let keys: Vec<String> = missing
                .iter()
                .chain(&extra)
                .chain(&changed)
                .map(|k| raw_key(k).to_string())
                .collect();
            let (proven, unsettled) = settle(source, target, table, keys).await?;
            for list in [&mut missing, &mut extra, &mut changed] {
                list.retain(|k| proven.contains(raw_key(k)));
            }
            for k in unsettled {
                if result.unsettled.len() < SHOW {
                    result.unsettled.push(k);
                }
            }
        }
        if missing.is_empty() && extra.is_empty() && changed.is_empty() {
            continue;
        }
        result.matched = false;
        for (dst, src) in [
            (&mut result.missing_on_target, missing),
            (&mut result.extra_on_target, extra),
            (&mut result.changed, changed),
        ] {
            for k in src {
                if dst.len() < SHOW {
                    dst.push(k);
                }
            }
        }
    }
    Ok(result)
}

/// Rows that differ while the stream runs, looked at one by one: a row read on the source, then on the
/// target once it has applied everything up to that point, then on the source again. When the source's row
/// did not change in between, the target, which trails the source, must have the same row: it is proven
/// equal or proven different (twice, in case it changed and changed back). A row the source changes at
/// every look stays unsettled. Returns the rows proven different, and the unsettled ones.
async fn settle(
    source: &Client,
    target: &Client,
    table: &Table,
    mut keys: Vec<String>,
) -> Result<(std::collections::HashSet<String>, Vec<String>), Error> {
    let mut seen_different = std::collections::HashSet::new();
    let mut proven = std::collections::HashSet::new();
    for _ in 0..6 {
        if keys.is_empty() {
            break;
        }
        let before = rows_by_key(source, Side::Source, table, &keys).await?;
        let lsn: String = source
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(Error::sql(Side::Source, "reading the WAL position"))?
            .get(0);
        wait_synced(target, &lsn, Duration::from_secs(30)).await;
        let on_target = rows_by_key(target, Side::Target, table, &keys).await?;
        let after = rows_by_key(source, Side::Source, table, &keys).await?;
        let mut next = Vec::new();
        for k in keys {
            let (b, t, a) = (before.get(&k), on_target.get(&k), after.get(&k));
            if b != a {
                next.push(k);
            } else if t != b {
                if !seen_different.insert(k.clone()) {
                    proven.insert(k);
                } else {
                    next.push(k);
                }
            }
        }
        keys = next;
    }
    let (different_once, unsettled): (Vec<String>, Vec<String>) =
        keys.into_iter().partition(|k| seen_different.contains(k));
    proven.extend(different_once);
    Ok((proven, unsettled))
}

/// A key as `diff` lists it, without the count of duplicates.
fn raw_key(listed: &str) -> &str {
    listed.split(" ×").next().unwrap_or(listed)
}

/// Rows by key, as `range_rows` identifies them: the row's hash for each key, or, for a table without a key
/// (where the identity is the row's hash), how many rows have that hash. A missing row is absent.
async fn rows_by_key(
    c: &Client,
    side: Side,
    table: &Table,
    keys: &[String],
) -> Result<HashMap<String, String>, Error> {
    let sql = if table.key.is_empty() {
        let key = format!("md5({})", row_expr(table));
        format!(
            "SELECT {key}, count(*)::text FROM ONLY {} AS s WHERE {key} = ANY($1::text[]) GROUP BY 1",
            table.name.quoted()
        )
    } else {
        let key = key_text(table);
        format!(
            "SELECT {key}, md5({row}) FROM ONLY {} AS s WHERE {key} = ANY($1::text[])",
            table.name.quoted(),
            row = row_expr(table)
        )
    };
    Ok(c.query(&sql, &[&keys])
        .await
        .map_err(Error::sql(side, format!("reading rows of {}", table.name)))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Rows missing on the target, extra on the target, and changed (same key, other content).
pub(crate) fn diff(
    a: &[(String, String)],
    b: &[(String, String)],
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut count: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for (k, h) in a {
        *count.entry((k, h)).or_default() += 1;
    }
    for (k, h) in b {
        *count.entry((k, h)).or_default() -= 1;
    }
    let mut only_src: BTreeMap<&str, i64> = BTreeMap::new();
    let mut only_tgt: BTreeMap<&str, i64> = BTreeMap::new();
    for ((k, _), n) in count {
        if n > 0 {
            *only_src.entry(k).or_default() += n;
        } else if n < 0 {
            *only_tgt.entry(k).or_default() -= n;
        }
    }
    let mut missing = Vec::new();
    let mut extra = Vec::new();
    let mut changed = Vec::new();
    for (k, n) in &only_src {
        if only_tgt.contains_key(k) {
            changed.push(k.to_string());
        } else {
            missing.push(if *n > 1 {
                format!("{k} ×{n}")
            } else {
                k.to_string()
            });
        }
    }
    for (k, n) in &only_tgt {
        if !only_src.contains_key(k) {
            extra.push(if *n > 1 {
                format!("{k} ×{n}")
            } else {
                k.to_string()
            });
        }
    }
    (missing, extra, changed)
}

async fn follower_running(target: &Client) -> bool {
    crate::state::stream::follower_reporting(target).await
}

/// Waits (at most `timeout`) until the stream's applied or in-sync position has passed `lsn`.
pub(crate) async fn wait_synced(target: &Client, lsn: &str, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let ok = crate::state::stream::synced_past(target, lsn).await;
        if ok {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn verify_sequences(
    source: &Client,
    target: &Client,
    sequences: SourceSequences<'_>,
) -> Result<Vec<SequenceResult>, Error> {
    let src = match sequences {
        SourceSequences::ReadNow(names) => {
            crate::sequence::read(source, Side::Source, names).await?
        }
        SourceSequences::Fenced(positions) => positions.to_vec(),
    };
    let names: Vec<QualifiedName> = src.iter().map(|p| p.name.clone()).collect();
    let names = &names[..];
    let on_target = crate::sequence::existing(target, Side::Target, names).await?;
    let tgt: HashMap<QualifiedName, crate::sequence::Position> =
        crate::sequence::read(target, Side::Target, &on_target)
            .await?
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
    let mut out = Vec::new();
    for p in src {
        let tgt = tgt.get(&p.name);
        // the next value handed out: last_value, or last_value + increment once called; comparing
        // (last_value, is_called) lexicographically is the same order for ascending sequences
        let ok = tgt
            .as_ref()
            .is_some_and(|t| (t.last_value, t.is_called) >= (p.last_value, p.is_called));
        out.push(SequenceResult {
            sequence: p.name.to_string(),
            source: p.last_value,
            target: tgt.map(|t| t.last_value),
            ok,
        });
    }
    Ok(out)
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<40} {:>12} {:>12} {:>7}  result",
            "table", "source rows", "target rows", "ranges"
        )?;
        for t in &self.tables {
            writeln!(
                f,
                "{:<40} {:>12} {:>12} {:>7}  {}",
                t.table,
                t.source_rows,
                t.target_rows,
                t.ranges,
                if t.matched { "equal" } else { "DIFFERENT" }
            )?;
            for (what, keys) in [
                ("missing on the target", &t.missing_on_target),
                ("only on the target", &t.extra_on_target),
                ("different on the target", &t.changed),
                (
                    "changing on the source at every look, not compared (a cutover compares them \
                     exactly)",
                    &t.unsettled,
                ),
            ] {
                if !keys.is_empty() {
                    writeln!(f, "    {what}: {}", keys.join(", "))?;
                }
            }
        }
        for s in self.sequences.iter().filter(|s| !s.ok) {
            writeln!(
                f,
                "sequence {} is behind on the target: source {}, target {} (cutover moves sequences)",
                s.sequence,
                s.source,
                s.target
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "missing".into())
            )?;
        }
        for d in &self.schema {
            writeln!(f, "schema: {d}")?;
        }
        for d in &self.objects {
            writeln!(f, "object: {d}")?;
        }
        let bad = self.tables.iter().filter(|t| !t.matched).count();
        let seq_bad = self.sequences.iter().filter(|s| !s.ok).count();
        writeln!(
            f,
            "{} table(s) equal, {bad} different; {} sequence(s) at or past the source, {seq_bad} behind{}; {:.1}s",
            self.tables.len() - bad,
            self.sequences.len() - seq_bad,
            if self.schema.is_empty() && self.objects.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} schema and {} object difference(s)",
                    self.schema.len(),
                    self.objects.len()
                )
            },
            self.seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{diff, hashed_by_value};

    fn rows(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn only_value_hashed_types_are_hashed_without_text() {
        for t in [
            "integer",
            "numeric(12,2)",
            "character varying(20)[]",
            "timestamp(3) with time zone",
            "time(6) without time zone",
            "jsonb",
            "\"char\"",
        ] {
            assert!(hashed_by_value(t), "{t}");
        }
        for t in [
            "json",
            "vector(3)",
            "mood",
            "public.mood[]",
            "point",
            "tsvector",
            "regclass",
            // no extended hash function (hash_record_extended fails on it): through the row's text
            "money",
            "aclitem[]",
        ] {
            assert!(!hashed_by_value(t), "{t}");
        }
    }

    #[test]
    fn diff_names_missing_extra_changed_and_duplicates() {
        let a = rows(&[("1", "x"), ("2", "y"), ("3", "z"), ("d", "h"), ("d", "h")]);
        let b = rows(&[("1", "x"), ("2", "Y"), ("4", "w"), ("d", "h")]);
        let (missing, extra, changed) = diff(&a, &b);
        assert_eq!(missing, vec!["3".to_string(), "d".to_string()]);
        assert_eq!(extra, vec!["4".to_string()]);
        assert_eq!(changed, vec!["2".to_string()]);
    }
}
