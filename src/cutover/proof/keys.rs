//! The proof's key streams: a temporary slot on each server streams the keys of every row its server
//! changes, until the logical message that ends it. What each has seen is kept in `Keys`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::{MAX_KEYS, PREFIX};
use crate::catalog::Table;
use crate::error::{Error, Side};
use crate::ident::QualifiedName;
use crate::replication::conn::StreamMessage;
use crate::stream::pgoutput::{Message, OldRow, Relation, Tuple, Value};

/// The tables a relation of the stream feeds (itself, or the partitions of a root), each with the
/// positions of its key columns in the relation (None when one is missing).
pub(super) type Feeds = Vec<(QualifiedName, Option<Vec<usize>>)>;

/// Keys of rows to compare in the pause, per table, and the tables to hash whole (with the reason).
#[derive(Debug, Default)]
pub(super) struct Keys {
    pub(super) rows: HashMap<QualifiedName, HashSet<Vec<String>>>,
    pub(super) whole: HashMap<QualifiedName, String>,
}

impl Keys {
    pub(super) fn add(&mut self, table: &QualifiedName, key: Vec<String>) {
        if self.whole.contains_key(table) {
            return;
        }
        let set = self.rows.entry(table.clone()).or_default();
        set.insert(key);
        if set.len() > MAX_KEYS {
            self.whole(table, &format!("more than {MAX_KEYS} rows changed"));
        }
    }

    pub(super) fn whole(&mut self, table: &QualifiedName, why: &str) {
        self.rows.remove(table);
        self.whole
            .entry(table.clone())
            .or_insert_with(|| why.to_string());
    }

    pub(super) fn merge(&mut self, other: Keys) {
        for (t, why) in other.whole {
            self.whole(&t, &why);
        }
        for (t, set) in other.rows {
            for k in set {
                self.add(&t, k);
            }
        }
    }
}

/// What a stream has seen so far: the keys, and the end of the last transaction it received.
#[derive(Default)]
pub(super) struct Collected {
    keys: std::sync::Mutex<Keys>,
    pub(super) progress: AtomicU64,
}

impl Collected {
    pub(super) fn keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A task reading a proof stream.
pub(super) type Stream = JoinHandle<Result<(), Error>>;

/// Reads one server's changes from its temporary slot, from the slot's snapshot until the message
/// carrying `nonce`, into `collected`.
pub(super) async fn collect(
    snap: crate::replication::ExportedSnapshot,
    (publication, side): (String, Side),
    tables: Arc<Vec<Table>>,
    nonce: String,
    collected: Arc<Collected>,
) -> Result<(), Error> {
    let (mut conn, start) = (snap.conn, snap.lsn);
    conn.start_logical(&snap.slot, start, &publication)
        .await
        .map_err(Error::replication(format!(
            "starting the proof's stream on the {side}"
        )))?;
    let mut relations: HashMap<u32, Feeds> = HashMap::new();
    let mut seen = start;
    let mut last_status = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(1), conn.next_stream_message()).await;
        match next {
            Err(_) => {}
            Ok(Err(e)) => {
                return Err(Error::replication(format!(
                    "reading the proof's stream on the {side}"
                ))(e));
            }
            Ok(Ok(None)) => {
                return Err(Error::Blocked(format!(
                    "the {side} ended the proof's stream"
                )));
            }
            Ok(Ok(Some(StreamMessage::Keepalive { reply, .. }))) => {
                if reply {
                    conn.send_status(seen, seen, false)
                        .await
                        .map_err(Error::replication("answering a keepalive"))?;
                    last_status = Instant::now();
                }
            }
            Ok(Ok(Some(StreamMessage::XLogData {
                start: at, data, ..
            }))) => {
                seen = seen.max(at);
                let msg = Message::decode(data).map_err(|e| {
                    Error::Blocked(format!(
                        "undecodable message in the proof's stream on the {side} at {at}: {e}"
                    ))
                })?;
                if let Message::Message(m) = &msg
                    && m.prefix == PREFIX
                    && m.content[..] == *nonce.as_bytes()
                {
                    conn.close().await;
                    return Ok(());
                }
                {
                    let mut keys = collected.keys();
                    match msg {
                        Message::Relation(r) => {
                            relations.insert(r.oid, feeds(&tables, &r));
                        }
                        Message::Insert(i) => {
                            record(&mut keys, relations.get(&i.relation), &i.new, false)
                        }
                        Message::Update(u) => {
                            let old = u.old.as_ref().map(|o| match o {
                                OldRow::Key(t) | OldRow::Full(t) => t,
                            });
                            if let Some(old) = old {
                                record(&mut keys, relations.get(&u.relation), old, false);
                            }
                            // without an old row the key did not change; with one, the old key is recorded
                            record(&mut keys, relations.get(&u.relation), &u.new, old.is_some());
                        }
                        Message::Delete(d) => {
                            let (OldRow::Key(t) | OldRow::Full(t)) = &d.old;
                            record(&mut keys, relations.get(&d.relation), t, false);
                        }
                        Message::Truncate(t) => {
                            for rel in &t.relations {
                                for (name, _) in relations.get(rel).into_iter().flatten() {
                                    keys.whole(name, "truncated while the proof was under way");
                                }
                            }
                        }
                        Message::Commit(c) => {
                            collected.progress.fetch_max(c.end_lsn.0, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            }
        }
        if last_status.elapsed() > Duration::from_secs(5) {
            conn.send_status(seen, seen, false)
                .await
                .map_err(Error::replication("sending the proof stream's position"))?;
            last_status = Instant::now();
        }
    }
}

/// The tables with a key that a relation of the stream feeds: itself, or, for the root of a partitioned
/// table (a publication that publishes through the root), each of its partitions.
pub(super) fn feeds(tables: &[Table], r: &Relation) -> Feeds {
    let name = QualifiedName::new(r.namespace.clone(), r.name.clone());
    tables
        .iter()
        .filter(|t| !t.key.is_empty() && (t.name == name || t.root.as_ref() == Some(&name)))
        .map(|t| {
            let positions: Option<Vec<usize>> = t
                .key
                .iter()
                .map(|k| r.columns.iter().position(|c| &c.name == k))
                .collect();
            (t.name.clone(), positions)
        })
        .collect()
}

/// Notes the key of `tuple` for every table its relation feeds. `lenient`: a key column that was not sent
/// is fine (the old row of the same change carried it).
pub(super) fn record(keys: &mut Keys, targets: Option<&Feeds>, tuple: &Tuple, lenient: bool) {
    for (name, positions) in targets.into_iter().flatten() {
        let Some(positions) = positions else {
            keys.whole(name, "its key columns are not all in the stream");
            continue;
        };
        let key: Option<Vec<String>> = positions
            .iter()
            .map(|&p| match tuple.0.get(p) {
                Some(Value::Text(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect();
        match key {
            Some(k) => keys.add(name, k),
            None if lenient => {}
            None => keys.whole(
                name,
                "a change did not carry its key (an unchanged TOASTed key)",
            ),
        }
    }
}
