//! Update: the new row, and the old one when the replica identity changed (`K`: old key columns only) or
//! is FULL (`O`: the whole old row). Without either, the key did not change and the new row carries it.

use super::reader::{DecodeError, Reader};
use super::tuple::Tuple;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldRow {
    Key(Tuple),
    Full(Tuple),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub relation: u32,
    pub old: Option<OldRow>,
    pub new: Tuple,
}

impl Update {
    pub(crate) fn decode(r: &mut Reader) -> Result<Update, DecodeError> {
        let relation = r.u32("Update relation")?;
        let mut marker = r.u8("Update marker")?;
        let mut old = None;
        if marker == b'K' || marker == b'O' {
            let t = Tuple::decode(r)?;
            old = Some(if marker == b'K' {
                OldRow::Key(t)
            } else {
                OldRow::Full(t)
            });
            marker = r.u8("Update new-row marker")?;
        }
        if marker != b'N' {
            return Err(DecodeError::UnexpectedMarker(marker as char, "Update"));
        }
        Ok(Update {
            relation,
            old,
            new: Tuple::decode(r)?,
        })
    }
}
