//! Type: the name of a user-defined type a following Relation uses (informational for us: values come as
//! text, and the target resolves types by column).

use super::reader::{DecodeError, Reader};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Type {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

impl Type {
    pub(crate) fn decode(r: &mut Reader) -> Result<Type, DecodeError> {
        Ok(Type {
            oid: r.u32("Type OID")?,
            namespace: r.string("Type namespace")?,
            name: r.string("Type name")?,
        })
    }
}
