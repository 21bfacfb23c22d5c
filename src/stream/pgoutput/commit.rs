//! Commit: the source transaction committed at `commit_lsn`; `end_lsn` is where the next record starts.

use super::reader::{DecodeError, Reader};
use crate::lsn::Lsn;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

impl Commit {
    pub(crate) fn decode(r: &mut Reader) -> Result<Commit, DecodeError> {
        let _flags = r.u8("Commit flags")?;
        Ok(Commit {
            commit_lsn: r.lsn("Commit LSN")?,
            end_lsn: r.lsn("Commit end LSN")?,
            commit_time: r.i64("Commit timestamp")?,
        })
    }
}
