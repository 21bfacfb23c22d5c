//! The plan: which tables move (selection rules resolved against the catalog) and in which chunks.

pub mod chunk;
pub mod select;

pub use chunk::{ChunkMethod, ChunkSpec};
pub use select::{Pattern, PatternError, Selection};

use std::collections::HashSet;

use tokio_postgres::Client;

use crate::catalog::{Catalog, Table};
use crate::error::{Error, Side};
use crate::ident::QualifiedName;

/// The tables and relations a run works on.
pub struct Resolved {
    pub tables: Vec<Table>,
    /// Relations the source has that the selection leaves out (for pg_dump's --exclude-table).
    pub excluded: Vec<QualifiedName>,
    pub sequences: Vec<QualifiedName>,
    pub matviews: Vec<QualifiedName>,
}

/// Resolves the selection against the catalog; a pattern that matches nothing is a usage error.
pub fn resolve(cat: &Catalog, selection: &Selection) -> Result<Resolved, Error> {
    let mut names: Vec<&QualifiedName> = cat.tables.iter().map(|t| t.selection_name()).collect();
    names.extend(cat.partitioned.iter());
    let unmatched = selection.unmatched(&names);
    if !unmatched.is_empty() {
        let mut known: Vec<String> = cat
            .tables
            .iter()
            .filter(|t| t.root.is_none())
            .map(|t| t.name.to_string())
            .chain(cat.partitioned.iter().map(|n| n.to_string()))
            .collect();
        known.sort();
        known.truncate(20);
        return Err(Error::Usage(format!(
            "the selection pattern{} {} match{} no table on the source. Patterns are schema.table with * \
             and ? wildcards (public.*, *.audit_*); tables on the source include: {}",
            if unmatched.len() > 1 { "s" } else { "" },
            unmatched
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join(", "),
            if unmatched.len() > 1 { "" } else { "es" },
            if known.is_empty() {
                "(none)".into()
            } else {
                known.join(", ")
            }
        )));
    }
    let mut tables = Vec::new();
    let mut excluded = Vec::new();
    let mut selected_names = HashSet::new();
    for t in &cat.tables {
        if selection.selects(t.selection_name()) {
            selected_names.insert(t.name.clone());
            tables.push(t.clone());
        } else {
            excluded.push(t.name.clone());
        }
    }
    for p in &cat.partitioned {
        // an intermediate partitioned table follows its root, which is a plain partitioned name here
        if selection.selects(p) {
            selected_names.insert(p.clone());
        } else {
            excluded.push(p.clone());
        }
    }
    let mut sequences = Vec::new();
    for s in &cat.sequences {
        let selected = match &s.owner {
            Some(owner) => selected_names.contains(owner),
            None => selection.selects(&s.name),
        };
        if selected {
            sequences.push(s.name.clone());
        } else if s.owner.is_none() {
            excluded.push(s.name.clone());
        }
    }
    Ok(Resolved {
        tables,
        excluded,
        sequences,
        matviews: cat.matviews.clone(),
    })
}

/// One table's chunks, as `clone` records them and `clone --rehearse` schedules them.
pub struct Planned<'a> {
    pub table: &'a Table,
    pub method: ChunkMethod,
    pub chunks: Vec<ChunkSpec>,
}

/// Splits every table larger than `chunk_bytes` into chunks: by primary-key range (keys sampled on the
/// source) when it has a key, else by page range. Reads the source, writes nothing.
pub async fn plan_chunks<'a>(
    source: &Client,
    tables: &'a [Table],
    chunk_bytes: i64,
) -> Result<Vec<Planned<'a>>, Error> {
    let mut planned = Vec::new();
    for t in tables {
        let n = chunk::chunk_count(t.bytes, chunk_bytes);
        let (method, chunks) = if n <= 1 {
            (ChunkMethod::Whole, vec![whole(t)])
        } else if !t.key.is_empty() {
            let sample = sample_keys(source, t, n).await?;
            let specs = chunk::key_chunks(t, n, &sample);
            if specs.len() > 1 {
                (ChunkMethod::Key, specs)
            } else {
                ctid_or_whole(t, n)
            }
        } else {
            ctid_or_whole(t, n)
        };
        planned.push(Planned {
            table: t,
            method,
            chunks,
        });
    }
    Ok(planned)
}

/// One log line: tables, chunks, and which tables are split how.
pub fn describe(planned: &[Planned<'_>]) -> String {
    let chunks: usize = planned.iter().map(|p| p.chunks.len()).sum();
    let split: Vec<String> = planned
        .iter()
        .filter(|p| p.chunks.len() > 1)
        .map(|p| {
            format!(
                "{} by {} in {}",
                p.table.name,
                p.method.as_str(),
                p.chunks.len()
            )
        })
        .collect();
    format!(
        "planned {} table(s) in {chunks} chunk(s){}{}",
        planned.len(),
        if split.is_empty() { "" } else { "; split: " },
        split.join(", ")
    )
}

fn ctid_or_whole(t: &Table, n: usize) -> (ChunkMethod, Vec<ChunkSpec>) {
    let specs = chunk::ctid_chunks(t, n);
    if specs.len() > 1 {
        (ChunkMethod::Ctid, specs)
    } else {
        (ChunkMethod::Whole, specs)
    }
}

fn whole(t: &Table) -> ChunkSpec {
    ChunkSpec {
        no: 0,
        predicate: None,
        est_bytes: t.bytes,
    }
}

/// A sorted sample of about 200 keys per chunk, read from a random sample of the table's pages.
async fn sample_keys(source: &Client, t: &Table, n: usize) -> Result<Vec<Vec<String>>, Error> {
    let want = (n * 200) as f64;
    let rows_est = if t.rows_estimate > 0.0 {
        t.rows_estimate
    } else {
        (t.pages.max(1) * 50) as f64
    };
    let pct = (100.0 * want / rows_est).clamp(0.001, 100.0);
    let keys: Vec<String> = t.key.iter().map(|k| crate::ident::quote_ident(k)).collect();
    // ORDER BY the typed columns (qualified, so it does not pick the text output columns of the same name)
    let sql = format!(
        "SELECT {} FROM ONLY {} AS s TABLESAMPLE SYSTEM ({pct}) ORDER BY {}",
        keys.iter()
            .map(|k| format!("s.{k}::text"))
            .collect::<Vec<_>>()
            .join(", "),
        t.name.quoted(),
        keys.iter()
            .map(|k| format!("s.{k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rows = source.query(&sql, &[]).await.map_err(Error::sql(
        Side::Source,
        format!("sampling keys of {}", t.name),
    ))?;
    Ok(rows
        .iter()
        .map(|r| (0..keys.len()).map(|i| r.get::<_, String>(i)).collect())
        .collect())
}
