//! Relation: the layout of a table as the source sees it, sent before the first change to it in a session
//! and again whenever it changes. Changes refer to tables by this OID.

use super::reader::{DecodeError, Reader};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    pub columns: Vec<RelationColumn>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (key) sent with Update and Delete.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl Relation {
    pub(crate) fn decode(r: &mut Reader) -> Result<Relation, DecodeError> {
        let oid = r.u32("Relation OID")?;
        let namespace = r.string("Relation namespace")?;
        let name = r.string("Relation name")?;
        let replica_identity = r.u8("Relation replica identity")? as char;
        let n = r.i16("Relation column count")?;
        let mut columns = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            let flags = r.u8("column flags")?;
            columns.push(RelationColumn {
                key: flags & 1 == 1,
                name: r.string("column name")?,
                type_oid: r.u32("column type")?,
                type_modifier: r.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            oid,
            // pgoutput sends an empty namespace for pg_catalog
            namespace: if namespace.is_empty() {
                "pg_catalog".into()
            } else {
                namespace
            },
            name,
            replica_identity,
            columns,
        })
    }
}
