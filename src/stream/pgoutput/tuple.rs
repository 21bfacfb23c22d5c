//! TupleData: the column values of a row in Insert, Update and Delete messages.
//!
//! Each column is NULL (`n`), "unchanged TOASTed value" (`u`: an UPDATE did not touch a large out-of-line
//! value and pgoutput does not send it; the target must keep its own), text (`t`) or binary (`b`, only when
//! the binary option is on). Docs: "Logical Replication Message Formats", TupleData.

use bytes::Bytes;

use super::reader::{DecodeError, Reader};

/// One column value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value: not sent; keep what the target has.
    Unchanged,
    /// The value in the type's text format (UTF-8 under client_encoding UTF8).
    Text(Bytes),
    Binary(Bytes),
}

/// The values of one row, in the relation's column order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuple(pub Vec<Value>);

impl Tuple {
    pub(crate) fn decode(r: &mut Reader) -> Result<Tuple, DecodeError> {
        let n = r.i16("tuple column count")?;
        let mut values = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            let kind = r.u8("tuple column kind")?;
            values.push(match kind {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' | b'b' => {
                    let len = r.i32("tuple value length")?;
                    let data = r.bytes(len.max(0) as usize, "tuple value")?;
                    if kind == b't' {
                        Value::Text(data)
                    } else {
                        Value::Binary(data)
                    }
                }
                other => return Err(DecodeError::UnknownColumnKind(other as char)),
            });
        }
        Ok(Tuple(values))
    }
}
