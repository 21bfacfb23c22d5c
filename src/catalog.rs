//! What the source holds: tables (with their columns, keys and sizes), partitions and sequences, read from
//! the system catalogs.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::ident::QualifiedName;

/// PostgreSQL assigns built-in objects OIDs below this (`FirstNormalObjectId`): the same on every server.
const FIRST_NORMAL_OID: u32 = 16384;

/// A table with rows of its own (plain table or leaf partition).
#[derive(Clone, Debug)]
pub struct Table {
    pub name: QualifiedName,
    /// The partitioned table at the top of its tree, for a partition; selection follows the root.
    pub root: Option<QualifiedName>,
    /// Columns that COPY moves: every column except generated ones, in attribute order.
    pub columns: Vec<Column>,
    /// Primary-key columns, in key order; empty when there is none.
    pub key: Vec<String>,
    /// `d` default, `n` nothing, `f` full, `i` index (pg_class.relreplident).
    pub replica_identity: char,
    /// Heap and TOAST size in bytes.
    pub bytes: i64,
    /// Pages of the main fork.
    pub pages: i64,
    /// The planner's estimate of the row count (-1 when never analyzed).
    pub rows_estimate: f64,
    pub unlogged: bool,
}

/// One column of a table.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    /// `format_type()`: the type as SQL text, schema-qualified where needed.
    pub type_sql: String,
    /// Whether binary COPY of this column reads back on another server (no type OIDs inside the value).
    pub binary_portable: bool,
}

impl Table {
    /// The primary key's columns' SQL types, in key order.
    pub fn key_types(&self) -> Vec<&str> {
        self.key
            .iter()
            .map(|k| {
                self.columns
                    .iter()
                    .find(|c| &c.name == k)
                    .map(|c| c.type_sql.as_str())
                    .unwrap_or("text")
            })
            .collect()
    }

    /// Whether every column can travel in binary COPY format.
    pub fn binary_portable(&self) -> bool {
        self.columns.iter().all(|c| c.binary_portable)
    }
    /// The name that selection patterns are matched against (the partition root for a partition).
    pub fn selection_name(&self) -> &QualifiedName {
        self.root.as_ref().unwrap_or(&self.name)
    }
}

/// A sequence, and the column that owns it if any (serial, identity).
#[derive(Clone, Debug)]
pub struct Sequence {
    pub name: QualifiedName,
    pub owner: Option<QualifiedName>,
}

/// Relations that hold no rows of their own but are part of the selection (partitioned parents) or need
/// work after the copy (materialized views).
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub server_version_num: i32,
    pub tables: Vec<Table>,
    /// Partitioned tables (no rows of their own).
    pub partitioned: Vec<QualifiedName>,
    pub sequences: Vec<Sequence>,
    pub matviews: Vec<QualifiedName>,
}

/// Schemas that are never user data.
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

/// Excludes relations that belong to an extension (CREATE EXTENSION makes them on the target).
const NOT_EXTENSION_MEMBER: &str = "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
     AND d.objid = c.oid AND d.deptype = 'e')";

impl Catalog {
    /// Reads the catalog of the database `client` is connected to.
    pub async fn load(client: &Client) -> Result<Catalog, tokio_postgres::Error> {
        let server_version_num: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?
            .get(0);
        let types = TypeInfo::load(client).await?;

        let rows = client
            .query(
                &format!(
                    "SELECT c.oid, n.nspname, c.relname, c.relkind::text, c.relreplident::text,
                            c.relpersistence = 'u',
                            pg_table_size(c.oid), pg_relation_size(c.oid) / current_setting('block_size')::int,
                            c.reltuples::float8,
                            CASE WHEN c.relispartition THEN rn.nspname END,
                            CASE WHEN c.relispartition THEN rc.relname END
                     FROM pg_class c
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     LEFT JOIN pg_class rc ON rc.oid = CASE WHEN c.relispartition
                                                      THEN pg_partition_root(c.oid) END
                     LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
                     WHERE c.relkind IN ('r', 'p', 'm', 'S') AND {SYSTEM_SCHEMAS} AND {NOT_EXTENSION_MEMBER}
                     ORDER BY n.nspname, c.relname"
                ),
                &[],
            )
            .await?;

        let columns = client
            .query(
                &format!(
                    "SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid
                     FROM pg_attribute a
                     JOIN pg_class c ON c.oid = a.attrelid
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
                       AND a.attgenerated = '' AND {SYSTEM_SCHEMAS}
                     ORDER BY a.attrelid, a.attnum"
                ),
                &[],
            )
            .await?;
        let mut cols_by_rel: HashMap<u32, Vec<Column>> = HashMap::new();
        for r in columns {
            let oid: u32 = r.get(3);
            cols_by_rel.entry(r.get(0)).or_default().push(Column {
                name: r.get(1),
                type_sql: r.get(2),
                binary_portable: types.binary_portable(oid),
            });
        }

        let keys = client
            .query(
                "SELECT i.indrelid, array_agg(a.attname ORDER BY k.ord)
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indisprimary
                 GROUP BY i.indrelid",
                &[],
            )
            .await?;
        let keys: HashMap<u32, Vec<String>> =
            keys.into_iter().map(|r| (r.get(0), r.get(1))).collect();

        let owners = client
            .query(
                "SELECT d.objid, tn.nspname, t.relname
                 FROM pg_depend d
                 JOIN pg_class t ON t.oid = d.refobjid
                 JOIN pg_namespace tn ON tn.oid = t.relnamespace
                 WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                   AND d.deptype IN ('a', 'i')
                   AND (SELECT relkind FROM pg_class s WHERE s.oid = d.objid) = 'S'",
                &[],
            )
            .await?;
        let owners: HashMap<u32, QualifiedName> = owners
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                )
            })
            .collect();

        let mut cat = Catalog {
            server_version_num,
            ..Default::default()
        };
        for r in rows {
            let oid: u32 = r.get(0);
            let name = QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2));
            let kind: String = r.get(3);
            match kind.as_str() {
                "r" => {
                    let root = match (
                        r.get::<_, Option<String>>(9),
                        r.get::<_, Option<String>>(10),
                    ) {
                        (Some(s), Some(n)) => Some(QualifiedName::new(s, n)),
                        _ => None,
                    };
                    cat.tables.push(Table {
                        name,
                        root,
                        columns: cols_by_rel.remove(&oid).unwrap_or_default(),
                        key: keys.get(&oid).cloned().unwrap_or_default(),
                        replica_identity: r.get::<_, String>(4).chars().next().unwrap_or('d'),
                        unlogged: r.get(5),
                        bytes: r.get(6),
                        pages: r.get(7),
                        rows_estimate: r.get(8),
                    })
                }
                "p" => cat.partitioned.push(name),
                "m" => cat.matviews.push(name),
                "S" => cat.sequences.push(Sequence {
                    name,
                    owner: owners.get(&oid).cloned(),
                }),
                _ => {}
            }
        }
        Ok(cat)
    }

    /// The major version of the server (15 for 150004).
    pub fn major_version(&self) -> i32 {
        self.server_version_num / 10000
    }
}

/// Just enough of pg_type to decide which values binary COPY can carry between two servers.
struct TypeInfo {
    /// oid → (typtype, element type, base type of a domain)
    types: HashMap<u32, (char, u32, u32)>,
}

impl TypeInfo {
    async fn load(client: &Client) -> Result<TypeInfo, tokio_postgres::Error> {
        let rows = client
            .query(
                // user types, and the built-in ones without binary I/O (aclitem) with their arrays
                "SELECT t.oid, t.typtype::text, t.typelem, t.typbasetype,
                        t.typcategory = 'A' AS is_array, t.typsend <> 0 AND t.typreceive <> 0 AS has_binary
                 FROM pg_type t
                 WHERE t.oid >= 16384 OR t.typsend = 0 OR t.typreceive = 0
                    OR (t.typcategory = 'A' AND EXISTS (SELECT 1 FROM pg_type e WHERE e.oid = t.typelem
                                                        AND (e.typsend = 0 OR e.typreceive = 0)))",
                &[],
            )
            .await?;
        let mut types = HashMap::new();
        for r in rows {
            let oid: u32 = r.get(0);
            let mut typtype = r.get::<_, String>(1).chars().next().unwrap_or('b');
            let is_array: bool = r.get(4);
            let has_binary: bool = r.get(5);
            if !has_binary {
                typtype = '?';
            } else if is_array && typtype == 'b' {
                // (a domain over an array has category A too, but no element type of its own)
                typtype = 'A';
            }
            types.insert(oid, (typtype, r.get(2), r.get(3)));
        }
        Ok(TypeInfo { types })
    }

    /// Binary COPY writes the element type's OID into every array and the field types' OIDs into every
    /// composite; user-defined types get different OIDs on the target, so such values must travel as text.
    /// A type without binary input or output (`aclitem`, some extensions' types) travels as text too.
    fn binary_portable(&self, oid: u32) -> bool {
        match self.types.get(&oid) {
            // a built-in type with binary I/O (those without it are loaded, marked '?')
            None => oid < FIRST_NORMAL_OID,
            // enum labels and extension base types (vector, ...) carry no OIDs in their binary form
            Some(('e', _, _)) | Some(('b', _, _)) => true,
            Some(('d', _, base)) => self.binary_portable(*base),
            Some(('A', elem, _)) => *elem < FIRST_NORMAL_OID && self.binary_portable(*elem),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_without_binary_io_and_their_arrays_and_domains_travel_as_text() {
        // as `TypeInfo::load` reads them: aclitem (no binary I/O) and its array, a user enum, an array of
        // it, a domain over aclitem, a user base type with binary I/O (vector), a composite
        let info = TypeInfo {
            types: HashMap::from([
                (1033, ('?', 0, 0)),
                (1034, ('A', 1033, 0)),
                (16400, ('e', 0, 0)),
                (16401, ('A', 16400, 0)),
                (16402, ('d', 0, 1033)),
                (16403, ('b', 0, 0)),
                (16404, ('c', 0, 0)),
            ]),
        };
        // int4, text, int4[]: built in, with binary I/O
        for oid in [23, 25, 1007, 16400, 16403] {
            assert!(info.binary_portable(oid), "{oid}");
        }
        for oid in [1033, 1034, 16401, 16402, 16404] {
            assert!(!info.binary_portable(oid), "{oid}");
        }
    }
}
