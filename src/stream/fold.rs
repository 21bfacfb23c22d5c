//! Net changes of one target transaction, per table, written as a few set-based statements.
//!
//! A target transaction covers many source transactions (see `apply`), and only its end state is ever seen:
//! for a table whose rows are matched by a primary key, and where that key is the only unique constraint,
//! what the transaction must do to each key is fully described by whether the row was there before, whether
//! it was deleted on the way, and what it looks like at the end. The applier folds every change into that
//! net form and writes it with at most three statements per table and row shape: the rows to delete, the
//! rows to update, the rows to insert, each as arrays (`ROWS FROM (unnest($1::text[]), …)`). A counter row
//! that pgbench updates 60 times in a batch is written once, and a thousand inserts are one statement.
//!
//! Why this is exact: rows of different keys do not interact except through unique constraints (the key
//! itself: deletes go first, then updates, then inserts; other unique or exclusion constraints: such tables
//! are not folded) and foreign keys and triggers, which do not run for the applier
//! (`session_replication_role = replica`; without it, nothing is folded). Each statement's row count is
//! checked as the one-row statements' are: an update or delete of a row that existed on the source must find
//! it on the target.
//!
//! Tables that cannot be folded (no key, REPLICA IDENTITY FULL, other unique constraints) keep their order,
//! but a run of inserts into one of them is still written as one statement.

use std::collections::HashMap;

use bytes::Bytes;

use super::pgoutput::Value;
use crate::ident::quote_ident;

/// A row's key: the text of its key columns.
pub type Key = Vec<Bytes>;

/// What one target transaction does to one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Net {
    /// The row was on the target before (the first change to it was an update or a delete).
    pub existed: bool,
    /// That row was deleted along the way (a re-insert of the key is then a delete and an insert).
    pub deleted: bool,
    /// The row at the end, all columns in the relation's order (`Unchanged`: keep the target's value);
    /// `None`: no row.
    pub image: Option<Vec<Value>>,
}

/// Why a change cannot be folded: it is written on its own, in order, after the table's folded changes.
#[derive(Debug, PartialEq, Eq)]
pub struct Unfoldable;

/// The folded changes of one table.
#[derive(Debug, Default)]
pub struct Folded {
    pub rows: HashMap<Key, Net>,
    /// Bytes of values held, for the memory bound.
    pub bytes: usize,
}

fn size(values: &[Value]) -> usize {
    values
        .iter()
        .map(|v| match v {
            Value::Text(b) | Value::Binary(b) => b.len() + 16,
            _ => 16,
        })
        .sum()
}

/// `new` over `old`: every column `new` leaves unchanged keeps `old`'s value.
fn merge(old: &[Value], new: Vec<Value>) -> Vec<Value> {
    new.into_iter()
        .zip(old)
        .map(|(n, o)| match n {
            Value::Unchanged => o.clone(),
            n => n,
        })
        .collect()
}

impl Folded {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn insert(&mut self, key: Key, image: Vec<Value>) -> Result<(), Unfoldable> {
        let bytes = size(&image);
        match self.rows.get_mut(&key) {
            None => {
                self.rows.insert(
                    key,
                    Net {
                        existed: false,
                        deleted: false,
                        image: Some(image),
                    },
                );
            }
            Some(net) if net.image.is_none() => net.image = Some(image),
            // the key is there already: let the target say so
            Some(_) => return Err(Unfoldable),
        }
        self.bytes += bytes;
        Ok(())
    }

    /// An update that keeps the key.
    pub fn update(&mut self, key: Key, image: Vec<Value>) -> Result<(), Unfoldable> {
        let bytes = size(&image);
        match self.rows.get_mut(&key) {
            None => {
                self.rows.insert(
                    key,
                    Net {
                        existed: true,
                        deleted: false,
                        image: Some(image),
                    },
                );
            }
            Some(Net {
                image: Some(old), ..
            }) => *old = merge(old, image),
            // an update of a row deleted before: the target has drifted, or we have; say so in order
            Some(_) => return Err(Unfoldable),
        }
        self.bytes += bytes;
        Ok(())
    }

    pub fn delete(&mut self, key: Key) -> Result<(), Unfoldable> {
        match self.rows.get_mut(&key) {
            None => {
                self.rows.insert(
                    key,
                    Net {
                        existed: true,
                        deleted: true,
                        image: None,
                    },
                );
            }
            Some(net) if net.image.is_some() => {
                net.image = None;
                net.deleted |= net.existed;
            }
            Some(_) => return Err(Unfoldable),
        }
        Ok(())
    }

    /// An update that moves a row from key `old` to key `new`. The new row must be complete: a value left
    /// unchanged (TOASTed) is taken from the old key's row when this transaction has it, else the change is
    /// written on its own.
    pub fn rekey(&mut self, old: Key, new: Key, image: Vec<Value>) -> Result<(), Unfoldable> {
        let image = match self.rows.get(&old) {
            Some(Net {
                image: Some(prev), ..
            }) => merge(prev, image),
            Some(Net { image: None, .. }) => return Err(Unfoldable),
            None => image,
        };
        if image.iter().any(|v| matches!(v, Value::Unchanged)) {
            return Err(Unfoldable);
        }
        if let Some(Net { image: Some(_), .. }) = self.rows.get(&new) {
            return Err(Unfoldable);
        }
        self.delete(old)?;
        self.insert(new, image)
    }

    /// The statements' rows: (keys to delete, rows to update, rows to insert).
    pub fn split(self) -> Split {
        let mut split = Split::default();
        for (key, net) in self.rows {
            if net.existed && (net.deleted || net.image.is_none()) {
                split.delete.push(key);
                if let Some(image) = net.image {
                    split.insert.push(image);
                }
            } else if let Some(image) = net.image {
                if net.existed {
                    split.update.push((key, image));
                } else {
                    split.insert.push(image);
                }
            }
        }
        split
    }
}

/// Folded changes as the three kinds of statement need them.
#[derive(Debug, Default)]
pub struct Split {
    pub delete: Vec<Key>,
    pub update: Vec<(Key, Vec<Value>)>,
    pub insert: Vec<Vec<Value>>,
}

/// A value as a text-array element.
pub fn element(v: &Value) -> Option<String> {
    match v {
        Value::Text(b) | Value::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Null | Value::Unchanged => None,
    }
}

/// `ROWS FROM (unnest($first::text[]), …) AS u(c0, …)` over `n` arrays. (`ROWS FROM` rather than
/// `unnest(a, b, …)`: no limit on the number of arrays.)
pub fn rows_from(n: usize, first: usize) -> String {
    let calls: Vec<String> = (0..n)
        .map(|i| format!("unnest(${}::text[])", first + i))
        .collect();
    let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    format!(
        "ROWS FROM ({}) AS u({})",
        calls.join(", "),
        aliases.join(", ")
    )
}

/// `u.cI::type` for the I-th array.
pub fn cell(i: usize, sql_type: &str) -> String {
    format!("u.c{i}::{sql_type}")
}

/// `t.k1 = u.c0::type AND …`.
pub fn key_join(keys: &[(String, String)]) -> String {
    keys.iter()
        .enumerate()
        .map(|(i, (name, ty))| format!("t.{} = {}", quote_ident(name), cell(i, ty)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }
    fn k(s: &str) -> Key {
        vec![Bytes::copy_from_slice(s.as_bytes())]
    }

    #[test]
    fn many_updates_of_one_row_become_one_with_unchanged_values_filled_in() {
        let mut f = Folded::default();
        f.update(k("1"), vec![t("1"), t("a"), Value::Unchanged])
            .unwrap();
        f.update(k("1"), vec![t("1"), Value::Unchanged, t("big")])
            .unwrap();
        f.update(k("1"), vec![t("1"), t("b"), Value::Unchanged])
            .unwrap();
        let s = f.split();
        assert!(s.delete.is_empty() && s.insert.is_empty());
        assert_eq!(s.update, vec![(k("1"), vec![t("1"), t("b"), t("big")])]);
    }

    #[test]
    fn insert_then_delete_is_nothing_and_delete_then_insert_is_both() {
        let mut f = Folded::default();
        f.insert(k("1"), vec![t("1"), t("x")]).unwrap();
        f.update(k("1"), vec![t("1"), t("y")]).unwrap();
        f.delete(k("1")).unwrap();
        f.delete(k("2")).unwrap();
        f.insert(k("2"), vec![t("2"), t("z")]).unwrap();
        f.update(k("2"), vec![t("2"), Value::Unchanged]).unwrap();
        let s = f.split();
        assert_eq!(s.delete, vec![k("2")]);
        assert_eq!(s.insert, vec![vec![t("2"), t("z")]]);
        assert!(s.update.is_empty());
    }

    #[test]
    fn a_key_change_is_a_delete_and_an_insert_and_swapped_keys_stay_exact() {
        let mut f = Folded::default();
        // 2 -> 3, then 1 -> 2 (the source needs that order; the folded form does not)
        f.rekey(k("2"), k("3"), vec![t("3"), t("b")]).unwrap();
        f.rekey(k("1"), k("2"), vec![t("2"), t("a")]).unwrap();
        let mut s = f.split();
        s.delete.sort();
        s.insert.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(s.delete, vec![k("1"), k("2")]);
        assert_eq!(s.insert, vec![vec![t("2"), t("a")], vec![t("3"), t("b")]]);
    }

    #[test]
    fn what_cannot_be_folded_is_refused_and_leaves_the_rows_as_they_were() {
        let mut f = Folded::default();
        // a new key with a TOASTed value left unchanged, the old row unknown here
        assert_eq!(
            f.rekey(k("1"), k("2"), vec![t("2"), Value::Unchanged]),
            Err(Unfoldable)
        );
        assert!(f.is_empty());
        f.insert(k("5"), vec![t("5")]).unwrap();
        assert_eq!(f.insert(k("5"), vec![t("5")]), Err(Unfoldable));
        f.delete(k("6")).unwrap();
        assert_eq!(f.delete(k("6")), Err(Unfoldable));
        assert_eq!(f.update(k("6"), vec![t("6")]), Err(Unfoldable));
        // a rekey whose old row this transaction has fills the unchanged value in
        f.insert(k("7"), vec![t("7"), t("doc")]).unwrap();
        f.rekey(k("7"), k("8"), vec![t("8"), Value::Unchanged])
            .unwrap();
        let s = f.split();
        assert!(s.insert.contains(&vec![t("8"), t("doc")]));
    }
}
