//! What the stream says of a table (a Relation message), checked against the target: the same columns with
//! the same types, else the stream stops with the difference named (schema drift). Also the per-table
//! `streamed` mark and the copy window a change falls in.

use super::{Applier, ApplyError, TargetTable};
use crate::ident::QualifiedName;
use crate::lsn::Lsn;
use crate::stream::fold::Key;
use crate::stream::pgoutput::{Relation, Tuple, Value};

use super::statements::Sql;

pub(super) struct Rel {
    pub(super) table: TargetTable,
    /// Column names in the order the source sends values.
    pub(super) columns: Vec<String>,
    pub(super) key_positions: Vec<usize>,
    pub(super) identity: char,
    /// Changes are folded into net changes per key (see `fold`).
    pub(super) foldable: bool,
    /// Columns whose values DDL in this source transaction computed, which the target computed
    /// differently until the stream brings the source's: not matched on (see `Applier::recomputed`).
    pub(super) recomputed: std::collections::HashSet<String>,
}

impl Rel {
    /// The key of a row image (`positions` of the full tuple), when every key value is there.
    pub(super) fn key_of(&self, tuple: &Tuple) -> Option<Key> {
        self.key_positions
            .iter()
            .map(|&p| match tuple.0.get(p) {
                Some(Value::Text(b) | Value::Binary(b)) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    /// Key columns with their SQL types.
    pub(super) fn key_columns(&self) -> Vec<(String, String)> {
        self.key_positions
            .iter()
            .map(|&p| {
                let c = &self.columns[p];
                (c.clone(), self.table.columns[c].clone())
            })
            .collect()
    }
}

impl Applier {
    pub(super) async fn relation(&mut self, r: Relation) -> Result<(), ApplyError> {
        let name = QualifiedName::new(r.namespace.clone(), r.name.clone());
        if name == self.capture {
            self.capture_rel = Some((r.oid, r.columns.iter().map(|c| c.name.clone()).collect()));
            return Ok(());
        }
        let table = self.tables.get(&name).cloned().ok_or_else(|| {
            ApplyError::SchemaChanged(format!(
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
            return Err(ApplyError::SchemaChanged(format!(
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
                return Err(ApplyError::SchemaChanged(format!(
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
                recomputed: self.recomputed.get(&name).cloned().unwrap_or_default(),
            },
        );
        Ok(())
    }

    /// Records, once per table and session, that the stream changed the table since the copy: a quick
    /// verification at cutover compares exactly those tables. Written in the target transaction of the
    /// change itself, so the mark is there whenever the change is.
    pub(super) async fn mark_streamed(&mut self, oid: u32) -> Result<(), ApplyError> {
        let name = self.rel(oid)?.table.name.clone();
        if self.streamed.contains(&name) {
            return Ok(());
        }
        self.send(
            Sql::new(
                crate::state::copy::MARK_STREAMED,
                vec![Some(name.schema.clone()), Some(name.name.clone())],
            ),
            None,
        )
        .await?;
        self.streamed.insert(name);
        Ok(())
    }

    pub(super) fn rel(&self, oid: u32) -> Result<&Rel, ApplyError> {
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
    pub(super) fn mode(&self, rel: &Rel) -> (bool, bool) {
        let lsn = self.commit_lsn();
        (
            lsn < rel.table.window.skip_before,
            lsn < rel.table.window.converge_before,
        )
    }
}
