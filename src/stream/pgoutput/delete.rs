//! Delete: the old row's key (`K`) or, with REPLICA IDENTITY FULL, the whole old row (`O`).

use super::reader::{DecodeError, Reader};
use super::tuple::Tuple;
use super::update::OldRow;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    pub relation: u32,
    pub old: OldRow,
}

impl Delete {
    pub(crate) fn decode(r: &mut Reader) -> Result<Delete, DecodeError> {
        let relation = r.u32("Delete relation")?;
        let old = match r.u8("Delete marker")? {
            b'K' => OldRow::Key(Tuple::decode(r)?),
            b'O' => OldRow::Full(Tuple::decode(r)?),
            m => return Err(DecodeError::UnexpectedMarker(m as char, "Delete")),
        };
        Ok(Delete { relation, old })
    }
}
