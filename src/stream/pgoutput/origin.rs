//! Origin: the transaction was replicated into the source from elsewhere (replication origin name).

use super::reader::{DecodeError, Reader};
use crate::lsn::Lsn;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub lsn: Lsn,
    pub name: String,
}

impl Origin {
    pub(crate) fn decode(r: &mut Reader) -> Result<Origin, DecodeError> {
        Ok(Origin {
            lsn: r.lsn("Origin LSN")?,
            name: r.string("Origin name")?,
        })
    }
}
