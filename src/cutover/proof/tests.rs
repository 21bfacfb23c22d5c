//! Unit tests: keys read from a stream's tuples, feeds of partitioned tables, merging results.

use super::keys::{Feeds, Keys, feeds, record};
use super::pause::{matched, merge_parts};
use super::*;
use crate::stream::pgoutput::{Relation, Tuple, Value};
use crate::verify::TableResult;
use bytes::Bytes;

fn name(t: &str) -> QualifiedName {
    QualifiedName::new("app", t)
}

fn tuple(values: &[Option<&str>]) -> Tuple {
    Tuple(
        values
            .iter()
            .map(|v| match v {
                Some("<unchanged>") => Value::Unchanged,
                Some(s) => Value::Text(Bytes::copy_from_slice(s.as_bytes())),
                None => Value::Null,
            })
            .collect(),
    )
}

#[test]
fn keys_are_read_from_their_columns_and_a_missing_one_makes_the_table_whole() {
    // a root feeding two partitions keyed (tenant, id), in the relation's columns 2 and 0
    let feeds: Feeds = vec![
        (name("p1"), Some(vec![2, 0])),
        (name("p2"), Some(vec![2, 0])),
        (name("odd"), None),
    ];
    let mut keys = Keys::default();
    record(
        &mut keys,
        Some(&feeds),
        &tuple(&[Some("7"), Some("x"), Some("t1")]),
        false,
    );
    let want: HashSet<Vec<String>> = [vec!["t1".to_string(), "7".to_string()]].into();
    assert_eq!(keys.rows[&name("p1")], want);
    assert_eq!(keys.rows[&name("p2")], want);
    assert!(keys.whole.contains_key(&name("odd")));
    // an unchanged TOASTed key: fine when the old row carried it, else the table is hashed whole
    let unsent = tuple(&[Some("<unchanged>"), Some("y"), Some("t1")]);
    record(&mut keys, Some(&feeds[..1].to_vec()), &unsent, true);
    assert_eq!(keys.rows[&name("p1")].len(), 1);
    record(&mut keys, Some(&feeds[..1].to_vec()), &unsent, false);
    assert!(keys.whole.contains_key(&name("p1")) && !keys.rows.contains_key(&name("p1")));
    // once whole, a table takes no more keys; a relation we do not verify is ignored
    record(
        &mut keys,
        Some(&feeds[..1].to_vec()),
        &tuple(&[Some("8"), None, Some("t2")]),
        false,
    );
    assert!(!keys.rows.contains_key(&name("p1")));
    record(&mut keys, None, &tuple(&[Some("1")]), false);
}

fn table(name: &str, root: Option<&str>, key: &[&str]) -> Table {
    Table {
        name: QualifiedName::new("app", name),
        root: root.map(|r| QualifiedName::new("app", r)),
        columns: vec![],
        key: key.iter().map(|k| k.to_string()).collect(),
        replica_identity: 'd',
        bytes: 0,
        pages: 0,
        rows_estimate: 0.0,
        unlogged: false,
    }
}

fn relation(name: &str, columns: &[&str]) -> Relation {
    Relation {
        oid: 1,
        namespace: "app".into(),
        name: name.into(),
        replica_identity: 'd',
        columns: columns
            .iter()
            .map(|c| crate::stream::pgoutput::RelationColumn {
                key: false,
                name: c.to_string(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    }
}

#[test]
fn a_root_feeds_its_partitions_and_a_table_itself() {
    let tables = vec![
        table("m_2024_01", Some("m"), &["sensor", "taken_on"]),
        table("m_2024_02", Some("m"), &["sensor", "taken_on"]),
        table("t", None, &["id"]),
        table("log", None, &[]),
    ];
    // the root, as a publication through the root sends it: both partitions, keys by name
    let root = feeds(&tables, &relation("m", &["value", "taken_on", "sensor"]));
    assert_eq!(
        root,
        vec![
            (name("m_2024_01"), Some(vec![2, 1])),
            (name("m_2024_02"), Some(vec![2, 1])),
        ]
    );
    // a partition, as the new primary's own publication sends it
    assert_eq!(
        feeds(
            &tables,
            &relation("m_2024_02", &["sensor", "taken_on", "value"])
        ),
        vec![(name("m_2024_02"), Some(vec![0, 1]))]
    );
    // a key column missing from the relation: the table is marked, not silently skipped
    assert_eq!(
        feeds(&tables, &relation("t", &["note"])),
        vec![(name("t"), None)]
    );
    // tables without a key (hashed whole anyway) and unknown relations feed nothing
    assert!(feeds(&tables, &relation("log", &["a"])).is_empty());
    assert!(feeds(&tables, &relation("other", &["id"])).is_empty());
}

#[test]
fn the_parts_of_a_table_make_one_result() {
    let part = |rows: i64, changed: &[&str]| TableResult {
        changed: changed.iter().map(|c| c.to_string()).collect(),
        matched: changed.is_empty(),
        source_rows: rows,
        target_rows: rows,
        ..matched(&table("t", None, &["id"]))
    };
    let merged = merge_parts(vec![
        part(3, &[]),
        matched(&table("u", None, &["id"])),
        part(2, &["(9)"]),
    ]);
    assert_eq!(merged.len(), 2);
    let t = merged.iter().find(|r| r.table == "app.t").unwrap();
    assert_eq!((t.source_rows, t.matched), (5, false));
    assert_eq!(t.changed, vec!["(9)".to_string()]);
}

#[test]
fn merging_keeps_every_key_and_whole_wins() {
    let mut a = Keys::default();
    a.add(&name("t"), vec!["1".into()]);
    a.add(&name("u"), vec!["1".into()]);
    let mut b = Keys::default();
    b.add(&name("t"), vec!["2".into()]);
    b.whole(&name("u"), "truncated");
    a.merge(b);
    assert_eq!(a.rows[&name("t")].len(), 2);
    assert!(!a.rows.contains_key(&name("u")));
    assert_eq!(a.whole[&name("u")], "truncated");
}
