//! The proof's snapshots: a temporary slot on each server exports a snapshot, sessions import it, and the
//! tables are hashed by key range in both; the keys of the rows of a range that still differs are kept.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::keys::Keys;
use crate::catalog::Table;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::{QualifiedName, quote_ident};
use crate::replication::{ReplicationConn, create_with_snapshot};
use crate::verify;

/// A temporary slot with its exported snapshot, within `wait`.
pub(super) async fn slot(
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
pub(super) async fn import(
    info: &ConnInfo,
    side: Side,
    snapshot: &str,
    jobs: usize,
) -> Result<Vec<Client>, Error> {
    let mut out = Vec::new();
    for _ in 0..jobs.max(1) {
        let c = verify::open(info, side).await?;
        crate::session::begin_in_snapshot(&c, side, snapshot, "importing the proof's snapshot")
            .await?;
        out.push(c);
    }
    Ok(out)
}

/// Hashes every range of `tables` in the two snapshots, `sessions` pairs at a time; returns the keys of the
/// rows that differ, how many rows were hashed (on the old primary), and the sessions, out of their
/// snapshots and ready for the lookups by key in the pause.
pub(super) async fn hash_in_snapshots(
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
pub(super) async fn summary(
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
pub(super) fn key_match(table: &Table) -> String {
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
pub(super) fn key_columns<'a>(table: &Table, keys: &'a [Vec<String>]) -> Vec<Vec<&'a str>> {
    (0..table.key.len())
        .map(|i| keys.iter().map(|k| k[i].as_str()).collect())
        .collect()
}

/// The key, as a list of its columns' text.
pub(super) fn key_list(table: &Table) -> String {
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
