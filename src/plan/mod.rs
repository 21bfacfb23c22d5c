//! The plan: which tables move (selection rules resolved against the catalog) and in which chunks.

pub mod chunk;
pub mod select;

pub use chunk::{ChunkMethod, ChunkSpec};
pub use select::{Pattern, PatternError, Selection};

use std::collections::HashSet;

use crate::catalog::{Catalog, Table};
use crate::error::Error;
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
