//! The SQL the applier sends, built from a relation's description and row images. Pure: nothing here talks
//! to a server, so every statement shape is unit-tested below.
//!
//! Every value is a text parameter cast to its column's type (`$1::integer`); set-based statements take one
//! text array per column and read them back with `unnest` (`fold::rows_from`). A statement that must find a
//! row carries an `Expect`: the pipeline checks its row count and names the missing keys with the probe.

use std::collections::HashMap;
use std::fmt::Write as _;

use tokio_postgres::types::Type;

use super::relation::Rel;
use crate::ident::quote_ident;
use crate::stream::fold::{self, Key, Split};
use crate::stream::pgoutput::{OldRow, Tuple, Value};

/// A statement being built: SQL text and its parameters.
#[derive(Default)]
pub(super) struct Sql {
    pub(super) text: String,
    pub(super) params: Vec<Param>,
}

/// A parameter: one value as text (or NULL), or an array of them (for a set-based statement).
pub(super) enum Param {
    Text(Option<String>),
    Array(Vec<Option<String>>),
}

impl Param {
    pub(super) fn sql_type(&self) -> Type {
        match self {
            Param::Text(_) => Type::TEXT,
            Param::Array(_) => Type::TEXT_ARRAY,
        }
    }

    pub(super) fn size(&self) -> usize {
        match self {
            Param::Text(v) => v.as_ref().map_or(0, |v| v.len()),
            Param::Array(a) => a.iter().flatten().map(|v| v.len() + 4).sum(),
        }
    }

    pub(super) fn as_sql(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Param::Text(v) => v,
            Param::Array(v) => v,
        }
    }
}

impl Sql {
    pub(super) fn new(text: impl Into<String>, params: Vec<Option<String>>) -> Sql {
        Sql {
            text: text.into(),
            params: params.into_iter().map(Param::Text).collect(),
        }
    }

    /// A parameter cast to `sql_type`, as SQL.
    fn param(&mut self, v: &Value, sql_type: &str) -> String {
        self.params.push(Param::Text(fold::element(v)));
        format!("${}::{sql_type}", self.params.len())
    }

    /// Array parameters, one per column; returns the number of the first.
    fn arrays(&mut self, columns: Vec<Vec<Option<String>>>) -> usize {
        let first = self.params.len() + 1;
        self.params.extend(columns.into_iter().map(Param::Array));
        first
    }
}

/// What a statement must affect: `rows` rows, else the target has drifted. `probe` finds the keys that
/// are missing on the target, to name them.
pub(super) struct Expect {
    pub(super) rows: u64,
    pub(super) what: String,
    pub(super) probe: Option<Sql>,
}

/// A statement and what it must affect.
pub(super) type Statement = (Sql, Option<Expect>);

/// One INSERT of a row image (TOASTed values left out); in convergence mode an upsert on the primary key.
pub(super) fn insert(rel: &Rel, new: &Tuple, converge: bool) -> Sql {
    let mut q = Sql::default();
    let mut cols = Vec::new();
    let mut vals = Vec::new();
    for (c, v) in rel.columns.iter().zip(&new.0) {
        if matches!(v, Value::Unchanged) {
            continue;
        }
        cols.push(quote_ident(c));
        vals.push(q.param(v, &rel.table.columns[c]));
    }
    q.text = format!(
        "INSERT INTO {} ({}){} VALUES ({})",
        rel.table.name.quoted(),
        cols.join(", "),
        overriding(rel),
        vals.join(", ")
    );
    if converge && !rel.table.key.is_empty() {
        let sets: Vec<String> = settable(rel, new)
            .map(|(c, _)| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        let _ = write!(
            q.text,
            " ON CONFLICT ({}) DO UPDATE SET {}",
            rel.table
                .key
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", "),
            sets.join(", ")
        );
    }
    q
}

/// The statements of one UPDATE: none when it sets nothing the target keeps (only TOASTed or identity
/// columns), one in the common case, three for a key change replayed in convergence mode.
pub(super) fn update(
    rel: &Rel,
    old: Option<&OldRow>,
    new: &Tuple,
    converge: bool,
) -> Vec<Statement> {
    let target = rel.table.name.quoted();
    if settable(rel, new).next().is_none() {
        return Vec::new();
    }
    if converge && let Some(OldRow::Key(old)) = old {
        // A key change replayed onto rows copied later: the row may already carry the new key (then it
        // takes the new values and the old key goes), still carry the old one (then it moves), or be
        // gone (deleted later: a later change in the stream says so). Each statement may find nothing.
        let mut first = Sql::default();
        let sets = set_list(&mut first, rel, new);
        let (new_key, _) = key_match(&mut first, rel, new, false);
        first.text = format!("UPDATE {target} SET {sets} WHERE {new_key}");
        let mut second = Sql::default();
        let (old_key, _) = key_match(&mut second, rel, old, true);
        let (new_key, _) = key_match(&mut second, rel, new, false);
        second.text = format!(
            "DELETE FROM {target} WHERE {old_key} AND EXISTS (SELECT 1 FROM {target} WHERE {new_key})"
        );
        let mut third = Sql::default();
        let sets = set_list(&mut third, rel, new);
        let (old_key, _) = key_match(&mut third, rel, old, true);
        third.text = format!("UPDATE {target} SET {sets} WHERE {old_key}");
        return vec![(first, None), (second, None), (third, None)];
    }
    let mut q = Sql::default();
    let sets = set_list(&mut q, rel, new);
    let (condition, what) = match old {
        Some(OldRow::Full(old)) => full_match(&mut q, rel, old),
        Some(OldRow::Key(old)) => key_match(&mut q, rel, old, true),
        None => key_match(&mut q, rel, new, false),
    };
    q.text = format!(
        "UPDATE {target} SET {sets} WHERE {}",
        one_row(rel, &target, &condition)
    );
    let expect = (!converge).then(|| Expect {
        rows: 1,
        what: format!("an UPDATE of {} {what}", rel.table.name),
        probe: None,
    });
    vec![(q, expect)]
}

/// One DELETE of the row `old` names; outside convergence mode it must find that row.
pub(super) fn delete(rel: &Rel, old: &OldRow, converge: bool) -> Statement {
    let mut q = Sql::default();
    let (condition, what) = match old {
        OldRow::Full(old) => full_match(&mut q, rel, old),
        OldRow::Key(old) => key_match(&mut q, rel, old, true),
    };
    let target = rel.table.name.quoted();
    q.text = format!(
        "DELETE FROM {target} WHERE {}",
        one_row(rel, &target, &condition)
    );
    let expect = (!converge).then(|| Expect {
        rows: 1,
        what: format!("a DELETE of {} {what}", rel.table.name),
        probe: None,
    });
    (q, expect)
}

/// One TRUNCATE of the (quoted) tables named.
pub(super) fn truncate(names: &[String], restart_identity: bool, cascade: bool) -> Sql {
    let text = format!(
        "TRUNCATE {}{}{}",
        names.join(", "),
        if restart_identity {
            " RESTART IDENTITY"
        } else {
            ""
        },
        if cascade { " CASCADE" } else { "" }
    );
    Sql::new(text, vec![])
}

/// The set-based statements that write one table's held changes: deletes, then updates (one statement per
/// set of changed columns: a TOASTed value left unchanged is not set), then inserts (one per set of columns
/// given, the held run of a table that cannot be folded after the folded inserts).
pub(super) fn held(rel: &Rel, split: Split, run: Vec<Vec<Value>>) -> Vec<Statement> {
    let target = rel.table.name.quoted();
    let keys = rel.key_columns();
    let mut statements: Vec<Statement> = Vec::new();
    if !split.delete.is_empty() {
        let n = split.delete.len();
        let key_arrays = key_arrays(&keys, split.delete.iter());
        let mut q = Sql::default();
        let first = q.arrays(key_arrays.clone());
        q.text = format!(
            "DELETE FROM {target} AS t USING {} WHERE {}",
            fold::rows_from(keys.len(), first),
            fold::key_join(&keys)
        );
        let probe = probe(&target, &keys, key_arrays);
        statements.push((
            q,
            Some(Expect {
                rows: n as u64,
                what: format!("{n} DELETE(s) of {}", rel.table.name),
                probe: Some(probe),
            }),
        ));
    }
    let mut shapes: HashMap<Vec<usize>, Vec<(Key, Vec<Value>)>> = HashMap::new();
    for (key, image) in split.update {
        let shape: Vec<usize> = image
            .iter()
            .enumerate()
            .filter(|(p, v)| {
                !matches!(v, Value::Unchanged)
                    && !rel.key_positions.contains(p)
                    && !rel.table.always_identity.contains(&rel.columns[*p])
            })
            .map(|(p, _)| p)
            .collect();
        if !shape.is_empty() {
            shapes.entry(shape).or_default().push((key, image));
        }
    }
    for (shape, rows) in shapes {
        let n = rows.len();
        let key_arrays = key_arrays(&keys, rows.iter().map(|(k, _)| k));
        let mut arrays = key_arrays.clone();
        for &p in &shape {
            arrays.push(rows.iter().map(|(_, img)| fold::element(&img[p])).collect());
        }
        let mut q = Sql::default();
        let first = q.arrays(arrays);
        let sets: Vec<String> = shape
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let c = &rel.columns[p];
                format!(
                    "{} = {}",
                    quote_ident(c),
                    fold::cell(keys.len() + i, &rel.table.columns[c])
                )
            })
            .collect();
        q.text = format!(
            "UPDATE {target} AS t SET {} FROM {} WHERE {}",
            sets.join(", "),
            fold::rows_from(keys.len() + shape.len(), first),
            fold::key_join(&keys)
        );
        let probe = probe(&target, &keys, key_arrays);
        statements.push((
            q,
            Some(Expect {
                rows: n as u64,
                what: format!("{n} UPDATE(s) of {}", rel.table.name),
                probe: Some(probe),
            }),
        ));
    }
    let mut shapes: Vec<(Vec<usize>, Vec<Vec<Value>>)> = Vec::new();
    for image in split.insert.into_iter().chain(run) {
        let shape: Vec<usize> = image
            .iter()
            .enumerate()
            .filter(|(_, v)| !matches!(v, Value::Unchanged))
            .map(|(p, _)| p)
            .collect();
        match shapes.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, rows)) => rows.push(image),
            None => shapes.push((shape, vec![image])),
        }
    }
    for (shape, rows) in shapes {
        let arrays: Vec<Vec<Option<String>>> = shape
            .iter()
            .map(|&p| rows.iter().map(|img| fold::element(&img[p])).collect())
            .collect();
        let mut q = Sql::default();
        let first = q.arrays(arrays);
        let cells: Vec<String> = shape
            .iter()
            .enumerate()
            .map(|(i, &p)| fold::cell(i, &rel.table.columns[&rel.columns[p]]))
            .collect();
        q.text = format!(
            "INSERT INTO {target} ({}){} SELECT {} FROM {}",
            shape
                .iter()
                .map(|&p| quote_ident(&rel.columns[p]))
                .collect::<Vec<_>>()
                .join(", "),
            overriding(rel),
            cells.join(", "),
            fold::rows_from(shape.len(), first)
        );
        statements.push((q, None));
    }
    statements
}

/// `GENERATED ALWAYS AS IDENTITY` columns take the source's values.
fn overriding(rel: &Rel) -> &'static str {
    if rel.table.always_identity.is_empty() {
        ""
    } else {
        " OVERRIDING SYSTEM VALUE"
    }
}

/// The columns of a row image an UPDATE sets: not TOASTed-and-unchanged, not identity.
fn settable<'a>(rel: &'a Rel, new: &'a Tuple) -> impl Iterator<Item = (&'a String, &'a Value)> {
    rel.columns
        .iter()
        .zip(&new.0)
        .filter(|(c, v)| !matches!(v, Value::Unchanged) && !rel.table.always_identity.contains(c))
}

/// `a = $1::integer, b = $2::text` for the settable columns of `new`.
fn set_list(q: &mut Sql, rel: &Rel, new: &Tuple) -> String {
    settable(rel, new)
        .map(|(c, v)| format!("{} = {}", quote_ident(c), q.param(v, &rel.table.columns[c])))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One text array per key column, over `keys_of` rows.
fn key_arrays<'a>(
    keys: &[(String, String)],
    rows: impl Iterator<Item = &'a Key>,
) -> Vec<Vec<Option<String>>> {
    let mut arrays: Vec<Vec<Option<String>>> = vec![Vec::new(); keys.len()];
    for key in rows {
        for (a, v) in arrays.iter_mut().zip(key) {
            a.push(Some(String::from_utf8_lossy(v).into_owned()));
        }
    }
    arrays
}

/// The query that names the keys of `key_arrays` the target does not have.
fn probe(target: &str, keys: &[(String, String)], key_arrays: Vec<Vec<Option<String>>>) -> Sql {
    let mut q = Sql::default();
    let first = q.arrays(key_arrays);
    let names: Vec<String> = keys
        .iter()
        .map(|(k, _)| crate::ident::display_ident(k))
        .collect();
    let values: Vec<String> = (0..keys.len()).map(|i| format!("u.c{i}")).collect();
    q.text = format!(
        "SELECT '({})=(' || concat_ws(', ', {}) || ')' FROM {} \
         WHERE NOT EXISTS (SELECT 1 FROM {target} AS t WHERE {}) LIMIT 5",
        names.join(", ").replace('\'', "''"),
        values.join(", "),
        fold::rows_from(keys.len(), first),
        fold::key_join(keys)
    );
    q
}

/// The WHERE clause that picks the row a change is about: the key condition itself, or, when rows are
/// matched on all their values (REPLICA IDENTITY FULL), exactly one of the equal rows, so duplicates stay
/// as many as on the source.
fn one_row(rel: &Rel, target: &str, condition: &str) -> String {
    if rel.identity == 'f' || rel.key_positions.is_empty() {
        format!(
            "(tableoid, ctid) = (SELECT tableoid, ctid FROM {target} WHERE {condition} LIMIT 1)"
        )
    } else {
        condition.to_string()
    }
}

/// Types without an equality operator: compared through their text form.
fn compare_as_text(sql_type: &str) -> bool {
    let base = sql_type.trim_end_matches("[]");
    matches!(
        base,
        "json" | "xml" | "point" | "line" | "lseg" | "box" | "path" | "polygon" | "circle"
    )
}

/// WHERE condition on the replica-identity key, and a description for errors (key values are shown:
/// they identify the row, the operator needs them; other values never are).
fn key_match(q: &mut Sql, rel: &Rel, tuple: &Tuple, key_only: bool) -> (String, String) {
    let mut conds = Vec::new();
    let mut shown = Vec::new();
    for (n, &pos) in rel.key_positions.iter().enumerate() {
        let name = &rel.columns[pos];
        let v = if key_only {
            // the K tuple carries every column, with NULLs outside the key
            tuple.0.get(pos).or(tuple.0.get(n))
        } else {
            tuple.0.get(pos)
        };
        let v = v.cloned().unwrap_or(Value::Null);
        let ty = &rel.table.columns[name];
        conds.push(format!("{} = {}", quote_ident(name), q.param(&v, ty)));
        if let Value::Text(b) = &v {
            shown.push(format!("{name}={}", String::from_utf8_lossy(b)));
        }
    }
    (
        conds.join(" AND "),
        format!("with key ({})", shown.join(", ")),
    )
}

fn full_match(q: &mut Sql, rel: &Rel, old: &Tuple) -> (String, String) {
    let mut conds = Vec::new();
    for (c, v) in rel.columns.iter().zip(&old.0) {
        let ty = &rel.table.columns[c];
        let col = quote_ident(c);
        match v {
            Value::Unchanged => {}
            _ if rel.recomputed.contains(c) => {}
            Value::Null => conds.push(format!("{col} IS NULL")),
            _ if compare_as_text(ty) => {
                let p = q.param(v, ty);
                conds.push(format!("{col}::text = {p}::text"))
            }
            _ => {
                let p = q.param(v, ty);
                conds.push(format!("{col} = {p}"))
            }
        }
    }
    (
        if conds.is_empty() {
            "true".into()
        } else {
            conds.join(" AND ")
        },
        "(matched on all columns)".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::QualifiedName;
    use crate::stream::apply::{TargetTable, Window};
    use crate::stream::fold::Folded;

    /// `"public"."Orders"` (id integer key, "note" text, doc json, seq bigint GENERATED ALWAYS AS IDENTITY
    /// when `identity`), described with replica identity `identity_kind`.
    fn orders(identity: bool, identity_kind: char) -> Rel {
        let mut columns: HashMap<String, String> = [
            ("id", "integer"),
            ("note", "text"),
            ("doc", "json"),
            ("seq", "bigint"),
        ]
        .into_iter()
        .map(|(c, t)| (c.to_string(), t.to_string()))
        .collect();
        columns.insert("id".into(), "integer".into());
        Rel {
            table: TargetTable {
                name: QualifiedName::new("public", "Orders"),
                columns,
                key: vec!["id".into()],
                always_identity: if identity { vec!["seq".into()] } else { vec![] },
                window: Window::default(),
                foldable: true,
            },
            columns: vec!["id".into(), "note".into(), "doc".into(), "seq".into()],
            key_positions: if identity_kind == 'f' {
                vec![]
            } else {
                vec![0]
            },
            identity: identity_kind,
            foldable: true,
            recomputed: Default::default(),
        }
    }

    fn text(v: &str) -> Value {
        Value::Text(bytes::Bytes::copy_from_slice(v.as_bytes()))
    }

    fn row(values: &[Option<&str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| match v {
                    Some("<toast>") => Value::Unchanged,
                    Some(v) => text(v),
                    None => Value::Null,
                })
                .collect(),
        )
    }

    fn texts(q: &Sql) -> Vec<Option<String>> {
        q.params
            .iter()
            .map(|p| match p {
                Param::Text(v) => v.clone(),
                Param::Array(a) => Some(format!("{a:?}")),
            })
            .collect()
    }

    #[test]
    fn an_insert_leaves_toasted_values_out_and_casts_every_value() {
        let rel = orders(false, 'd');
        let q = insert(
            &rel,
            &row(&[Some("7"), None, Some("<toast>"), Some("3")]),
            false,
        );
        assert_eq!(
            q.text,
            r#"INSERT INTO "public"."Orders" ("id", "note", "seq") VALUES ($1::integer, $2::text, $3::bigint)"#
        );
        assert_eq!(texts(&q), vec![Some("7".into()), None, Some("3".into())]);
    }

    #[test]
    fn a_converging_insert_is_an_upsert_that_never_sets_an_identity_column() {
        let rel = orders(true, 'd');
        let q = insert(
            &rel,
            &row(&[Some("7"), Some("x"), Some("{}"), Some("3")]),
            true,
        );
        assert_eq!(
            q.text,
            "INSERT INTO \"public\".\"Orders\" (\"id\", \"note\", \"doc\", \"seq\") OVERRIDING SYSTEM VALUE VALUES \
             ($1::integer, $2::text, $3::json, $4::bigint) ON CONFLICT (\"id\") DO UPDATE SET \
             \"id\" = EXCLUDED.\"id\", \"note\" = EXCLUDED.\"note\", \"doc\" = EXCLUDED.\"doc\""
        );
    }

    #[test]
    fn an_update_by_key_must_find_its_row_and_names_the_key() {
        let rel = orders(true, 'd');
        let old = OldRow::Key(row(&[Some("6"), None, None, None]));
        let new = row(&[Some("7"), Some("x"), Some("<toast>"), Some("3")]);
        let statements = update(&rel, Some(&old), &new, false);
        assert_eq!(statements.len(), 1);
        let (q, expect) = &statements[0];
        assert_eq!(
            q.text,
            r#"UPDATE "public"."Orders" SET "id" = $1::integer, "note" = $2::text WHERE "id" = $3::integer"#
        );
        assert_eq!(
            texts(q),
            vec![Some("7".into()), Some("x".into()), Some("6".into())]
        );
        let expect = expect
            .as_ref()
            .expect("an UPDATE outside convergence must find its row");
        assert_eq!(expect.rows, 1);
        assert_eq!(
            expect.what,
            r#"an UPDATE of public."Orders" with key (id=6)"#
        );
    }

    #[test]
    fn an_update_that_sets_only_toasted_or_identity_columns_sends_nothing() {
        let rel = orders(true, 'd');
        let new = Tuple(vec![
            Value::Unchanged,
            Value::Unchanged,
            Value::Unchanged,
            text("3"),
        ]);
        assert!(update(&rel, None, &new, false).is_empty());
    }

    #[test]
    fn a_key_change_in_convergence_is_three_statements_that_may_find_nothing() {
        let rel = orders(false, 'd');
        let old = OldRow::Key(row(&[Some("6"), None, None, None]));
        let new = row(&[Some("7"), Some("x"), None, None]);
        let statements = update(&rel, Some(&old), &new, true);
        let texts: Vec<&str> = statements.iter().map(|(q, _)| q.text.as_str()).collect();
        assert_eq!(
            texts,
            vec![
                "UPDATE \"public\".\"Orders\" SET \"id\" = $1::integer, \"note\" = $2::text, \"doc\" = $3::json, \
                 \"seq\" = $4::bigint WHERE \"id\" = $5::integer",
                "DELETE FROM \"public\".\"Orders\" WHERE \"id\" = $1::integer AND EXISTS (SELECT 1 FROM \
                 \"public\".\"Orders\" WHERE \"id\" = $2::integer)",
                "UPDATE \"public\".\"Orders\" SET \"id\" = $1::integer, \"note\" = $2::text, \"doc\" = $3::json, \
                 \"seq\" = $4::bigint WHERE \"id\" = $5::integer",
            ]
        );
        assert!(statements.iter().all(|(_, e)| e.is_none()));
        // the first finds the new key (7), the third the old one (6)
        assert_eq!(statements[0].0.params.len(), 5);
        let Param::Text(first_key) = &statements[0].0.params[4] else {
            panic!("a key is one value")
        };
        let Param::Text(third_key) = &statements[2].0.params[4] else {
            panic!("a key is one value")
        };
        assert_eq!(
            (first_key.as_deref(), third_key.as_deref()),
            (Some("7"), Some("6"))
        );
    }

    #[test]
    fn a_full_identity_delete_removes_one_of_equal_rows_and_compares_json_as_text() {
        let rel = orders(false, 'f');
        let old = OldRow::Full(row(&[Some("7"), None, Some("{}"), Some("<toast>")]));
        let (q, expect) = delete(&rel, &old, false);
        assert_eq!(
            q.text,
            "DELETE FROM \"public\".\"Orders\" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM \
             \"public\".\"Orders\" WHERE \"id\" = $1::integer AND \"note\" IS NULL AND \"doc\"::text = $2::json::text \
             LIMIT 1)"
        );
        let expect = expect.expect("a DELETE outside convergence must find its row");
        assert_eq!(
            expect.what,
            r#"a DELETE of public."Orders" (matched on all columns)"#
        );
        let (_, converging) = delete(&rel, &old, true);
        assert!(converging.is_none());
    }

    #[test]
    fn a_full_identity_update_does_not_match_on_a_column_the_target_computed_itself() {
        let mut rel = orders(false, 'f');
        rel.recomputed.insert("doc".into());
        let old = OldRow::Full(row(&[
            Some("7"),
            Some("a"),
            Some("{\"r\": 0.5}"),
            Some("1"),
        ]));
        let new = row(&[Some("7"), Some("a"), Some("{\"r\": 0.5}"), Some("1")]);
        let statements = update(&rel, Some(&old), &new, false);
        let condition = statements[0].0.text.split(" WHERE ").last().unwrap();
        assert!(
            condition.contains("\"note\" = ") && !condition.contains("\"doc\""),
            "{condition}"
        );
        // the new values are all set, the source's included
        assert!(statements[0].0.text.contains("\"doc\" = "));
    }

    #[test]
    fn truncate_keeps_its_options() {
        let names = vec!["public.a".to_string(), r#"public."B""#.to_string()];
        assert_eq!(
            truncate(&names, true, true).text,
            r#"TRUNCATE public.a, public."B" RESTART IDENTITY CASCADE"#
        );
        assert_eq!(
            truncate(&names, false, false).text,
            r#"TRUNCATE public.a, public."B""#
        );
    }

    #[test]
    fn held_changes_become_deletes_then_updates_then_inserts_with_probes() {
        let rel = orders(false, 'd');
        let key = |k: &str| vec![bytes::Bytes::copy_from_slice(k.as_bytes())];
        let mut folded = Folded::default();
        folded
            .insert(key("1"), row(&[Some("1"), Some("a"), None, None]).0)
            .unwrap();
        folded
            .update(
                key("2"),
                row(&[Some("2"), Some("b"), Some("<toast>"), None]).0,
            )
            .unwrap();
        folded.delete(key("3")).unwrap();
        let run = vec![row(&[Some("4"), Some("d"), None, None]).0];
        let statements = held(&rel, folded.split(), run);
        let texts: Vec<&str> = statements.iter().map(|(q, _)| q.text.as_str()).collect();
        assert_eq!(texts.len(), 3, "{texts:#?}");
        assert!(
            texts[0].starts_with(r#"DELETE FROM "public"."Orders" AS t USING "#),
            "{}",
            texts[0]
        );
        assert!(
            texts[1].starts_with(r#"UPDATE "public"."Orders" AS t SET "note" = "#),
            "{}",
            texts[1]
        );
        assert!(
            texts[2].starts_with(
                r#"INSERT INTO "public"."Orders" ("id", "note", "doc", "seq") SELECT "#
            ),
            "{}",
            texts[2]
        );
        let (deletes, updates) = (statements[0].1.as_ref(), statements[1].1.as_ref());
        assert_eq!(
            deletes.map(|e| (e.rows, e.what.as_str())),
            Some((1, r#"1 DELETE(s) of public."Orders""#))
        );
        assert_eq!(
            updates.map(|e| (e.rows, e.what.as_str())),
            Some((1, r#"1 UPDATE(s) of public."Orders""#))
        );
        assert!(
            deletes
                .and_then(|e| e.probe.as_ref())
                .is_some_and(|p| p.text.contains("NOT EXISTS"))
        );
        assert!(
            statements[2].1.is_none(),
            "inserts cannot find too few rows"
        );
        // the folded insert and the held run share one statement: two rows in each column array
        assert_eq!(
            texts_of_arrays(&statements[2].0),
            vec![
                vec![Some("1".to_string()), Some("4".to_string())],
                vec![Some("a".to_string()), Some("d".to_string())],
                vec![None, None],
                vec![None, None],
            ]
        );
    }

    fn texts_of_arrays(q: &Sql) -> Vec<Vec<Option<String>>> {
        q.params
            .iter()
            .map(|p| match p {
                Param::Array(a) => a.clone(),
                Param::Text(v) => vec![v.clone()],
            })
            .collect()
    }
}
