//! Begin: a source transaction starts; `final_lsn` is the LSN of its commit record.

use super::reader::{DecodeError, Reader};
use crate::lsn::Lsn;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 (PostgreSQL epoch).
    pub commit_time: i64,
    pub xid: u32,
}

impl Begin {
    pub(crate) fn decode(r: &mut Reader) -> Result<Begin, DecodeError> {
        Ok(Begin {
            final_lsn: r.lsn("Begin final LSN")?,
            commit_time: r.i64("Begin timestamp")?,
            xid: r.u32("Begin xid")?,
        })
    }
}
