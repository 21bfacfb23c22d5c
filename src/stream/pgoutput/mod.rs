//! The pgoutput logical decoding format, protocol version 1 (PostgreSQL docs, "Logical Replication Message
//! Formats"): what the source's walsender puts inside each XLogData message. Values arrive in text format.

mod begin;
mod commit;
mod delete;
mod insert;
mod message;
mod origin;
mod reader;
mod relation;
mod truncate;
mod tuple;
mod typ;
mod update;

pub use begin::Begin;
pub use commit::Commit;
pub use delete::Delete;
pub use insert::Insert;
pub use message::LogicalMessage;
pub use origin::Origin;
pub use reader::DecodeError;
pub use relation::{Relation, RelationColumn};
pub use truncate::Truncate;
pub use tuple::{Tuple, Value};
pub use typ::Type;
pub use update::{OldRow, Update};

use bytes::Bytes;
use reader::Reader;

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
}

impl Message {
    /// Decodes the body of one XLogData message.
    pub fn decode(data: Bytes) -> Result<Message, DecodeError> {
        let mut r = Reader::new(data);
        let tag = r.u8("message type")?;
        Ok(match tag {
            b'B' => Message::Begin(Begin::decode(&mut r)?),
            b'C' => Message::Commit(Commit::decode(&mut r)?),
            b'O' => Message::Origin(Origin::decode(&mut r)?),
            b'R' => Message::Relation(Relation::decode(&mut r)?),
            b'Y' => Message::Type(Type::decode(&mut r)?),
            b'I' => Message::Insert(Insert::decode(&mut r)?),
            b'U' => Message::Update(Update::decode(&mut r)?),
            b'D' => Message::Delete(Delete::decode(&mut r)?),
            b'T' => Message::Truncate(Truncate::decode(&mut r)?),
            b'M' => Message::Message(LogicalMessage::decode(&mut r)?),
            other => return Err(DecodeError::UnknownMessage(other as char)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use bytes::{BufMut, BytesMut};

    /// Builds message bodies the way the walsender writes them.
    struct W(BytesMut);
    impl W {
        fn new(tag: u8) -> W {
            let mut b = BytesMut::new();
            b.put_u8(tag);
            W(b)
        }
        fn u8(mut self, v: u8) -> W {
            self.0.put_u8(v);
            self
        }
        fn i16(mut self, v: i16) -> W {
            self.0.put_i16(v);
            self
        }
        fn i32(mut self, v: i32) -> W {
            self.0.put_i32(v);
            self
        }
        fn i64(mut self, v: i64) -> W {
            self.0.put_i64(v);
            self
        }
        fn s(mut self, v: &str) -> W {
            self.0.put_slice(v.as_bytes());
            self.0.put_u8(0);
            self
        }
        fn text(self, v: &str) -> W {
            let w = self.u8(b't').i32(v.len() as i32);
            let mut w = w;
            w.0.put_slice(v.as_bytes());
            w
        }
        fn done(self) -> Bytes {
            self.0.freeze()
        }
    }

    #[test]
    fn begin_and_commit_carry_their_lsns() {
        let m = Message::decode(W::new(b'B').i64(0x1_0000_0010).i64(77).i32(42).done()).unwrap();
        assert_eq!(
            m,
            Message::Begin(Begin {
                final_lsn: Lsn(0x1_0000_0010),
                commit_time: 77,
                xid: 42
            })
        );
        let m = Message::decode(W::new(b'C').u8(0).i64(10).i64(20).i64(30).done()).unwrap();
        assert_eq!(
            m,
            Message::Commit(Commit {
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                commit_time: 30
            })
        );
    }

    #[test]
    fn relation_lists_columns_with_key_flags() {
        let m = Message::decode(
            W::new(b'R')
                .i32(16400)
                .s("app")
                .s("orders")
                .u8(b'd')
                .i16(2)
                .u8(1)
                .s("id")
                .i32(20)
                .i32(-1)
                .u8(0)
                .s("note")
                .i32(25)
                .i32(-1)
                .done(),
        )
        .unwrap();
        let Message::Relation(r) = m else { panic!() };
        assert_eq!(
            (r.oid, r.namespace.as_str(), r.name.as_str()),
            (16400, "app", "orders")
        );
        assert_eq!(r.replica_identity, 'd');
        assert!(r.columns[0].key && !r.columns[1].key);
        assert_eq!(r.columns[1].name, "note");
        let m = Message::decode(W::new(b'R').i32(1).s("").s("t").u8(b'f').i16(0).done()).unwrap();
        let Message::Relation(r) = m else { panic!() };
        assert_eq!(r.namespace, "pg_catalog");
    }

    #[test]
    fn insert_update_delete_decode_every_column_kind() {
        let m = Message::decode(
            W::new(b'I')
                .i32(5)
                .u8(b'N')
                .i16(3)
                .text("1")
                .u8(b'n')
                .u8(b'u')
                .done(),
        )
        .unwrap();
        assert_eq!(
            m,
            Message::Insert(Insert {
                relation: 5,
                new: Tuple(vec![
                    Value::Text(Bytes::from("1")),
                    Value::Null,
                    Value::Unchanged
                ])
            })
        );
        // key change: old key first, then the new row
        let m = Message::decode(
            W::new(b'U')
                .i32(5)
                .u8(b'K')
                .i16(1)
                .text("1")
                .u8(b'N')
                .i16(1)
                .text("2")
                .done(),
        )
        .unwrap();
        let Message::Update(u) = m else { panic!() };
        assert_eq!(
            u.old,
            Some(OldRow::Key(Tuple(vec![Value::Text(Bytes::from("1"))])))
        );
        let m = Message::decode(W::new(b'U').i32(5).u8(b'N').i16(1).text("x").done()).unwrap();
        let Message::Update(u) = m else { panic!() };
        assert_eq!(u.old, None);
        let m = Message::decode(W::new(b'D').i32(5).u8(b'O').i16(1).text("x").done()).unwrap();
        assert!(matches!(
            m,
            Message::Delete(Delete {
                old: OldRow::Full(_),
                ..
            })
        ));
    }

    #[test]
    fn truncate_origin_type_and_message() {
        let m = Message::decode(W::new(b'T').i32(2).u8(3).i32(7).i32(8).done()).unwrap();
        assert_eq!(
            m,
            Message::Truncate(Truncate {
                cascade: true,
                restart_identity: true,
                relations: vec![7, 8]
            })
        );
        let m = Message::decode(W::new(b'O').i64(9).s("node_a").done()).unwrap();
        assert_eq!(
            m,
            Message::Origin(Origin {
                lsn: Lsn(9),
                name: "node_a".into()
            })
        );
        let m = Message::decode(W::new(b'Y').i32(3).s("app").s("mood").done()).unwrap();
        assert!(matches!(m, Message::Type(Type { oid: 3, .. })));
        let m = Message::decode(
            W::new(b'M')
                .u8(1)
                .i64(5)
                .s("p")
                .i32(2)
                .u8(b'h')
                .u8(b'i')
                .done(),
        )
        .unwrap();
        assert!(matches!(
            m,
            Message::Message(LogicalMessage {
                transactional: true,
                ..
            })
        ));
    }

    #[test]
    fn broken_messages_are_errors_not_panics() {
        assert_eq!(
            Message::decode(W::new(b'B').i32(1).done()),
            Err(DecodeError::Truncated("Begin final LSN"))
        );
        assert_eq!(
            Message::decode(W::new(b'Z').done()),
            Err(DecodeError::UnknownMessage('Z'))
        );
        assert_eq!(
            Message::decode(W::new(b'I').i32(5).u8(b'N').i16(1).u8(b'q').done()),
            Err(DecodeError::UnknownColumnKind('q'))
        );
        assert_eq!(
            Message::decode(W::new(b'I').i32(5).u8(b'N').i16(1).u8(b't').i32(10).done()),
            Err(DecodeError::Truncated("tuple value"))
        );
        assert!(Message::decode(Bytes::new()).is_err());
    }
}
