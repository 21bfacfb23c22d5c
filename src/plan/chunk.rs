//! Splitting a table into chunks that workers copy independently.
//!
//! A table larger than the split threshold is cut into ranges of its primary key when it has one (a row
//! keeps its key when it is updated, so chunks copied in different snapshots after a resume still partition
//! the rows), else into ranges of physical pages (`ctid`, which a TID range scan reads directly on
//! PostgreSQL 14 and later). The first chunk has no lower bound and the last none above, so rows inserted
//! beyond the sampled range are still covered.

use crate::catalog::Table;
use crate::ident::{quote_ident, quote_literal};

/// How a table's rows are divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkMethod {
    Whole,
    Key,
    Ctid,
}

impl ChunkMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkMethod::Whole => "whole",
            ChunkMethod::Key => "key",
            ChunkMethod::Ctid => "ctid",
        }
    }
}

/// One range of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkSpec {
    pub no: i32,
    /// A WHERE condition, or None for the whole table.
    pub predicate: Option<String>,
    /// The share of the table's bytes this chunk is expected to hold.
    pub est_bytes: i64,
}

/// How many chunks a table of `bytes` gets.
pub fn chunk_count(bytes: i64, chunk_bytes: i64) -> usize {
    if chunk_bytes <= 0 || bytes <= chunk_bytes {
        1
    } else {
        ((bytes + chunk_bytes - 1) / chunk_bytes).min(10_000) as usize
    }
}

/// Chunks over page ranges `[0, pages)`.
pub fn ctid_chunks(table: &Table, n: usize) -> Vec<ChunkSpec> {
    let pages = table.pages.max(1);
    let n = n.clamp(1, pages as usize);
    if n == 1 {
        return vec![whole(table)];
    }
    let bounds: Vec<i64> = (1..n as i64).map(|i| i * pages / n as i64).collect();
    ranges(table, bounds.len() + 1, |i| {
        let lower = (i > 0).then(|| format!("ctid >= '({},0)'::tid", bounds[i - 1]));
        let upper = (i < bounds.len()).then(|| format!("ctid < '({},0)'::tid", bounds[i]));
        (lower, upper)
    })
}

/// Chunks over key ranges, from a sorted sample of key values (each a row of text values, one per key
/// column). Duplicate boundaries collapse, so a skewed sample gives fewer, never empty-by-construction,
/// ranges.
pub fn key_chunks(table: &Table, n: usize, sample: &[Vec<String>]) -> Vec<ChunkSpec> {
    // A table whose bulk is in TOAST can hold few rows: fewer chunks, but still more than one.
    let n = n.min(sample.len());
    if n <= 1 {
        return vec![whole(table)];
    }
    let mut bounds: Vec<&Vec<String>> = (1..n).map(|i| &sample[i * sample.len() / n]).collect();
    bounds.dedup();
    if bounds.is_empty() {
        return vec![whole(table)];
    }
    let types = table.key_types();
    let cols = format!(
        "({})",
        table
            .key
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let tuple = |vals: &Vec<String>| {
        format!(
            "({})",
            vals.iter()
                .zip(&types)
                .map(|(v, t)| format!("{}::{}", quote_literal(v), t))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    ranges(table, bounds.len() + 1, |i| {
        let lower = (i > 0).then(|| format!("{cols} >= {}", tuple(bounds[i - 1])));
        let upper = (i < bounds.len()).then(|| format!("{cols} < {}", tuple(bounds[i])));
        (lower, upper)
    })
}

fn whole(table: &Table) -> ChunkSpec {
    ChunkSpec {
        no: 0,
        predicate: None,
        est_bytes: table.bytes,
    }
}

fn ranges(
    table: &Table,
    n: usize,
    bound: impl Fn(usize) -> (Option<String>, Option<String>),
) -> Vec<ChunkSpec> {
    (0..n)
        .map(|i| {
            let (lo, hi) = bound(i);
            let predicate = match (lo, hi) {
                (Some(l), Some(h)) => Some(format!("{l} AND {h}")),
                (Some(x), None) | (None, Some(x)) => Some(x),
                (None, None) => None,
            };
            ChunkSpec {
                no: i as i32,
                predicate,
                est_bytes: table.bytes / n as i64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Column;
    use crate::ident::QualifiedName;

    fn table(key: &[&str], pages: i64) -> Table {
        Table {
            name: QualifiedName::new("app", "t"),
            root: None,
            columns: vec![
                Column {
                    name: "id".into(),
                    type_sql: "integer".into(),
                    binary_portable: true,
                },
                Column {
                    name: "k".into(),
                    type_sql: "text".into(),
                    binary_portable: true,
                },
            ],
            key: key.iter().map(|s| s.to_string()).collect(),
            replica_identity: 'd',
            bytes: pages * 8192,
            pages,
            rows_estimate: 0.0,
            unlogged: false,
        }
    }

    #[test]
    fn small_tables_are_one_chunk() {
        assert_eq!(chunk_count(100, 1000), 1);
        assert_eq!(chunk_count(1001, 1000), 2);
        assert_eq!(chunk_count(5000, 0), 1);
    }

    #[test]
    fn ctid_chunks_cover_every_page_open_ended() {
        let c = ctid_chunks(&table(&[], 100), 4);
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].predicate.as_deref(), Some("ctid < '(25,0)'::tid"));
        assert_eq!(
            c[1].predicate.as_deref(),
            Some("ctid >= '(25,0)'::tid AND ctid < '(50,0)'::tid")
        );
        assert_eq!(c[3].predicate.as_deref(), Some("ctid >= '(75,0)'::tid"));
        assert_eq!(ctid_chunks(&table(&[], 1), 4).len(), 1);
    }

    #[test]
    fn key_chunks_use_typed_row_comparisons_and_dedupe_bounds() {
        let sample: Vec<Vec<String>> = (0..100)
            .map(|i| vec![(i / 10).to_string(), format!("o'{i}")])
            .collect();
        let c = key_chunks(&table(&["id", "k"], 10), 2, &sample);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0].predicate.as_deref(),
            Some("(\"id\", \"k\") < ('5'::integer, 'o''50'::text)")
        );
        assert_eq!(
            c[1].predicate.as_deref(),
            Some("(\"id\", \"k\") >= ('5'::integer, 'o''50'::text)")
        );
        let same: Vec<Vec<String>> = (0..100).map(|_| vec!["1".into(), "a".into()]).collect();
        assert_eq!(key_chunks(&table(&["id", "k"], 10), 4, &same).len(), 2);
        assert_eq!(key_chunks(&table(&["id"], 10), 4, &sample[..2]).len(), 2);
        assert_eq!(key_chunks(&table(&["id"], 10), 4, &sample[..1]).len(), 1);
    }
}
