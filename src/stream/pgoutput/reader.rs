//! A cursor over one pgoutput message body, with the errors a truncated or odd message gives.

use bytes::{Buf, Bytes};

use crate::lsn::Lsn;

/// A message that does not follow the pgoutput format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message ends early while reading {0}")]
    Truncated(&'static str),
    #[error("unknown pgoutput message type {0:?}")]
    UnknownMessage(char),
    #[error("unknown tuple column kind {0:?}")]
    UnknownColumnKind(char),
    #[error("unexpected tuple marker {0:?} in {1}")]
    UnexpectedMarker(char, &'static str),
    #[error("a name in a pgoutput message is not valid UTF-8")]
    BadString,
}

pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    pub fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_i16())
    }
    pub fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }
    pub fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.need(8, what)?;
        Ok(Lsn(self.buf.get_u64()))
    }
    /// A NUL-terminated string.
    pub fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = self.buf.split_to(end);
        self.buf.advance(1);
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError::BadString)
    }
    /// `n` bytes, shared with the message buffer (no copy).
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
}
