//! Message: a `pg_logical_emit_message()` payload (sent only with the `messages` option).

use bytes::Bytes;

use super::reader::{DecodeError, Reader};
use crate::lsn::Lsn;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

impl LogicalMessage {
    pub(crate) fn decode(r: &mut Reader) -> Result<LogicalMessage, DecodeError> {
        let flags = r.u8("Message flags")?;
        let lsn = r.lsn("Message LSN")?;
        let prefix = r.string("Message prefix")?;
        let len = r.i32("Message length")?;
        Ok(LogicalMessage {
            transactional: flags & 1 != 0,
            lsn,
            prefix,
            content: r.bytes(len.max(0) as usize, "Message content")?,
        })
    }
}
