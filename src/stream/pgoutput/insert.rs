//! Insert: a new row.

use super::reader::{DecodeError, Reader};
use super::tuple::Tuple;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    pub relation: u32,
    pub new: Tuple,
}

impl Insert {
    pub(crate) fn decode(r: &mut Reader) -> Result<Insert, DecodeError> {
        let relation = r.u32("Insert relation")?;
        match r.u8("Insert marker")? {
            b'N' => Ok(Insert {
                relation,
                new: Tuple::decode(r)?,
            }),
            m => Err(DecodeError::UnexpectedMarker(m as char, "Insert")),
        }
    }
}
