//! The proof's part in the pause: the rows of the kept keys compared by key on pairs of sessions, and the
//! tables that need it hashed whole.

use std::sync::Arc;

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::LOOKUP;

/// A table to compare in the pause: by the rows of these keys, or (None) whole.
pub(super) type Work = (Table, Option<Vec<Vec<String>>>);
use super::snapshots::{key_columns, summary};
use crate::catalog::Table;
use crate::error::{Error, Side};
use crate::verify::{self, TableResult};

/// The pause's comparisons, one table at a time on each pair of sessions: the rows of the given keys, by
/// key, or (None) the whole table's count and hash. Returns the results, and the tables hashed whole that
/// differ (their rows are yet to be located).
pub(super) async fn compare_in_pause(
    sessions: Vec<(Client, Client)>,
    work: Vec<Work>,
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
pub(super) fn merge_parts(parts: Vec<TableResult>) -> Vec<TableResult> {
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
pub(super) fn matched(table: &Table) -> TableResult {
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

pub(super) async fn compare_table_keys(
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
