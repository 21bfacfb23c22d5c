//! Truncate: one or more tables emptied in one statement (CASCADE and RESTART IDENTITY as options).

use super::reader::{DecodeError, Reader};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relations: Vec<u32>,
}

impl Truncate {
    pub(crate) fn decode(r: &mut Reader) -> Result<Truncate, DecodeError> {
        let n = r.i32("Truncate relation count")?;
        let options = r.u8("Truncate options")?;
        let mut relations = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            relations.push(r.u32("Truncate relation")?);
        }
        Ok(Truncate {
            cascade: options & 1 != 0,
            restart_identity: options & 2 != 0,
            relations,
        })
    }
}
