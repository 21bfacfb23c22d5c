//! Materialized views: the order they are refreshed in, and their contents compared.
//!
//! A materialized view may read another one, directly or through views (PostgreSQL's regression database
//! has `mvtest_bb` reading `mvtest_tvvm` through a view): refreshed before it, it fails with "has not been
//! populated" or fills with stale rows. `levels` orders them: each level reads only views of earlier
//! levels, so the views of one level can be refreshed at once.
//!
//! No stream carries their contents: a `REFRESH` the DDL capture replays on the target runs at its commit
//! position there, where it may see other rows than it saw on the source (issue 23: 1 242 rows against
//! 1 238). So the switch compares them (`hashes`) and refreshes on both servers, once their tables are
//! equal in the pause, the ones that differ.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use crate::error::{Error, Side};

/// The populated materialized views of the database (as `regclass` text) in refresh order, by level.
pub async fn levels(client: &Client, side: Side) -> Result<Vec<Vec<String>>, Error> {
    let matviews: Vec<String> = client
        .query(
            "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'm' AND c.relispopulated
               AND n.nspname NOT IN ('hikkoshi', 'hikkoshi_fence') ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::sql(side, "listing materialized views"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if matviews.is_empty() {
        return Ok(Vec::new());
    }
    let edges: Vec<(String, String)> = client
        .query(
            "SELECT DISTINCT v.oid::regclass::text, d.refobjid::regclass::text
             FROM pg_class v
             JOIN pg_rewrite rw ON rw.ev_class = v.oid
             JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid
                             AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> v.oid
             JOIN pg_class r ON r.oid = d.refobjid AND r.relkind IN ('v', 'm')
             WHERE v.relkind IN ('v', 'm')",
            &[],
        )
        .await
        .map_err(Error::sql(
            side,
            "reading the materialized views' dependencies",
        ))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(order(&matviews, &edges))
}

/// Levels of `matviews` such that each reads (through `edges`, view → what its query reads, views in
/// between followed) only matviews of earlier levels. A cycle (which PostgreSQL does not allow) ends in
/// one last level. Pure.
pub fn order(matviews: &[String], edges: &[(String, String)]) -> Vec<Vec<String>> {
    let mut reads: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges {
        reads.entry(from.as_str()).or_default().push(to.as_str());
    }
    let is_matview: BTreeSet<&str> = matviews.iter().map(String::as_str).collect();
    // the matviews each one reads, through any number of plain views
    let needs: BTreeMap<&str, BTreeSet<&str>> = matviews
        .iter()
        .map(|m| {
            let mut found = BTreeSet::new();
            let mut seen = BTreeSet::new();
            let mut todo: Vec<&str> = reads.get(m.as_str()).cloned().unwrap_or_default();
            while let Some(r) = todo.pop() {
                if !seen.insert(r) {
                    continue;
                }
                if is_matview.contains(r) {
                    found.insert(r);
                } else {
                    todo.extend(reads.get(r).cloned().unwrap_or_default());
                }
            }
            found.remove(m.as_str());
            (m.as_str(), found)
        })
        .collect();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut levels = Vec::new();
    while done.len() < matviews.len() {
        let left: Vec<&str> = matviews
            .iter()
            .map(String::as_str)
            .filter(|m| !done.contains(m))
            .collect();
        let level: Vec<&str> = left
            .iter()
            .copied()
            .filter(|m| needs[m].iter().all(|n| done.contains(n)))
            .collect();
        let level = if level.is_empty() { left } else { level };
        done.extend(level.iter().copied());
        levels.push(level.iter().map(|m| m.to_string()).collect());
    }
    levels
}

/// Each materialized view's row count and a hash of its rows (in any order: the MD5s of the rows' text,
/// sorted), on one server.
pub async fn hashes(
    client: &Client,
    side: Side,
    names: &[String],
) -> Result<BTreeMap<String, (i64, String)>, Error> {
    let mut out = BTreeMap::new();
    for name in names {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), md5(coalesce(string_agg(h, '' ORDER BY h), ''))
                     FROM (SELECT md5(t::text) AS h FROM {name} t) s"
                ),
                &[],
            )
            .await
            .map_err(Error::sql(
                side,
                format!("hashing materialized view {name}"),
            ))?;
        out.insert(name.clone(), (row.get(0), row.get(1)));
    }
    Ok(out)
}

/// The materialized views (of `levels`, in their order) whose contents differ between two servers, with
/// their row counts on each.
pub async fn differing(
    (old, old_side): (&Client, Side),
    (new, new_side): (&Client, Side),
    levels: &[Vec<String>],
) -> Result<Vec<(String, i64, i64)>, Error> {
    let names: Vec<String> = levels.iter().flatten().cloned().collect();
    let (a, b) =
        futures_util::future::join(hashes(old, old_side, &names), hashes(new, new_side, &names))
            .await;
    let (a, b) = (a?, b?);
    Ok(names
        .iter()
        .filter(|n| a.get(*n) != b.get(*n))
        .map(|n| {
            (
                n.clone(),
                a.get(n).map(|x| x.0).unwrap_or(-1),
                b.get(n).map(|x| x.0).unwrap_or(-1),
            )
        })
        .collect())
}

/// Refreshes `names` on one server, in the order given (the caller keeps `levels`' order).
pub async fn refresh(client: &Client, side: Side, names: &[String]) -> Result<(), Error> {
    for name in names {
        client
            .batch_execute(&format!("REFRESH MATERIALIZED VIEW {name}"))
            .await
            .map_err(Error::sql(
                side,
                format!("refreshing materialized view {name}"),
            ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn e(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_matview_read_through_a_view_is_refreshed_first() {
        // the regression database's shape: bb reads tvvm through the view tvvmv; aa reads a table only
        let levels = order(
            &s(&["mvtest_aa", "mvtest_bb", "mvtest_tvvm"]),
            &e(&[
                ("mvtest_bb", "mvtest_tvvmv"),
                ("mvtest_tvvmv", "mvtest_tvvm"),
                ("mvtest_tvvm", "mvtest_tvv"),
            ]),
        );
        assert_eq!(
            levels,
            vec![s(&["mvtest_aa", "mvtest_tvvm"]), s(&["mvtest_bb"])]
        );
    }

    #[test]
    fn chains_make_one_level_each_and_a_cycle_ends_in_the_last() {
        let levels = order(&s(&["c", "b", "a"]), &e(&[("c", "b"), ("b", "a")]));
        assert_eq!(levels, vec![s(&["a"]), s(&["b"]), s(&["c"])]);
        let levels = order(&s(&["x", "y", "z"]), &e(&[("x", "y"), ("y", "x")]));
        assert_eq!(levels, vec![s(&["z"]), s(&["x", "y"])]);
    }
}
