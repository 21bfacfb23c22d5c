//! The cutover's verification in two parts, so that the write pause grows with the rows changed in the last
//! seconds, not with the size of the tables.
//!
//! **Before the fence**, while the application still writes:
//! 1. a temporary slot is made on the old primary, with an exported snapshot at its consistent point C;
//! 2. once the new primary has applied past C, a temporary slot is made there too (snapshot at B), over a
//!    publication of its own (`hikkoshi_<id>_proof`);
//! 3. from then on each slot streams the keys of every row its server changes: inserts, updates (with the
//!    old key when it changed), deletes; a TRUNCATE marks its table;
//! 4. the new primary's snapshot holds the old one's changes up to its `applied_lsn` A, a little past C:
//!    the keys the old primary's stream saw up to A are left out of the hashes (they are compared later);
//! 5. the tables are hashed by key range in the two snapshots, as `hikkoshi verify` does, and the keys of
//!    the rows of a range that still differs are kept.
//!
//! **In the pause**, once the new primary has applied everything up to the fence, a logical message on each
//! server ends its stream, and the rows of all kept keys are compared by key on both servers, also in
//! tables that `--verify quick` leaves out (the stream had not changed them) when a server changed them.
//!
//! Why this proves the tables equal: a row whose key neither stream saw, and that did not differ in the
//! snapshots, is on the old primary as it was at C and on the new one as it was at B, and those were equal.
//! Every other row is compared directly, after the fence. A row written on the new primary by anyone (the
//! applier, or someone by hand) is in the new primary's stream, so nothing on the target escapes.
//!
//! Tables without a key, tables the new primary cannot publish, tables truncated in between, and keys the
//! stream did not carry (a TOASTed key left out of an update) are hashed whole in the pause; so is
//! everything when the preparation cannot be made (a server before 14, no free slot or WAL sender, a long
//! transaction that holds off the slot's consistent point) or a stream fails.
//!
//! Files: `snapshots` (slots, snapshots, hashes by range), `keys` (the key streams and what they saw),
//! `pause` (the comparison by key in the pause); `prepare` and `Prepared::conclude` here tie them together.

mod keys;
mod pause;
mod snapshots;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use self::keys::{Collected, Keys, Stream, collect};
use self::pause::{Work, compare_in_pause, merge_parts};
use self::snapshots::{hash_in_snapshots, import, slot};
use crate::catalog::Table;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::{QualifiedName, quote_ident};
use crate::lsn::Lsn;
use crate::verify::{self, VerifyReport};

/// The prefix of the logical message that ends a proof stream.
const PREFIX: &str = "hikkoshi-proof";
/// Keys kept per table; past this many, the table is hashed whole in the pause.
const MAX_KEYS: usize = 1_000_000;
/// Keys looked up per statement in the pause.
const LOOKUP: usize = 10_000;
/// Fewer keys of one table than this are looked up by one session pair.
const SHARE: usize = 2_000;

/// What the preparation needs to know.
pub struct Plan {
    pub old: ConnInfo,
    pub new: ConnInfo,
    pub old_side: Side,
    pub new_side: Side,
    /// The publication that the stream to the new primary reads on the old one.
    pub old_publication: String,
    /// Made on the new primary for its own stream of keys.
    pub new_publication: String,
    /// Prefix of the two temporary slots' names.
    pub slot: String,
    /// Every table of the selection.
    pub tables: Vec<Table>,
    /// The tables to hash in the snapshots (the others are as the copy left them on both servers).
    pub hash: HashSet<QualifiedName>,
    /// Key-range predicates recorded by the copy.
    pub ranges: HashMap<QualifiedName, Vec<String>>,
    pub jobs: usize,
    /// How long a slot may wait for its consistent point, and the new primary for C.
    pub wait: Duration,
}

/// The first part done: the snapshots compared and both streams running.
pub struct Prepared {
    old: ConnInfo,
    new: ConnInfo,
    new_publication: String,
    /// Every table of the selection.
    tables: Vec<Table>,
    differing: Keys,
    streams: Vec<(Stream, Arc<Collected>)>,
    /// Pairs of sessions (old, new), ready to compare by key in the pause.
    sessions: Vec<(Client, Client)>,
    nonce: String,
    pub tables_hashed: usize,
    pub rows_hashed: i64,
    pub seconds: f64,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // the streams' connections close with their tasks, and the temporary slots with them
        for (s, _) in &self.streams {
            s.abort();
        }
    }
}

/// What the pause's part did.
#[derive(Debug, Default)]
pub struct InPause {
    /// Rows compared by key.
    pub rows_compared: usize,
    /// Tables hashed whole, with the reason.
    pub hashed_whole: Vec<String>,
    /// Why the streams' keys could not be used (then every table was hashed whole).
    pub streams_failed: Option<String>,
}

/// Drops the new primary's proof publication (idempotent; `hikkoshi clean` also removes it).
pub async fn drop_publication(new: &Client, name: &str) {
    let _ = new
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await;
}

/// The first part: slots, snapshots, hashes. An error means the proof must be made in the pause instead
/// (the caller drops the publication).
pub async fn prepare(plan: Plan, old: &Client, new: &Client) -> Result<Prepared, Error> {
    let started = Instant::now();
    require_messages(&plan, old, new).await?;
    let (old_slot, new_slot) = (format!("{}_o", plan.slot), format!("{}_n", plan.slot));
    let old_snap = slot(&plan.old, plan.old_side, &old_slot, plan.wait).await?;
    let old_sessions = import(&plan.old, plan.old_side, &old_snap.snapshot, plan.jobs).await?;
    let consistent = old_snap.lsn;
    // so that the new primary's snapshot holds every change the old one's does (a slower applier only
    // makes more rows differ in the snapshots)
    verify::wait_synced(
        new,
        &old_snap.lsn.to_string(),
        plan.wait.min(Duration::from_secs(5)),
    )
    .await;
    let unstreamable = publish_on_new(&plan, new).await?;
    let new_snap = slot(&plan.new, plan.new_side, &new_slot, plan.wait).await?;
    let new_sessions = import(&plan.new, plan.new_side, &new_snap.snapshot, plan.jobs).await?;

    // Both snapshots are imported: the slots may stream now.
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let tables = Arc::new(plan.tables.clone());
    let (on_old, on_new) = (
        Arc::new(Collected::default()),
        Arc::new(Collected::default()),
    );
    let streams = vec![
        (
            tokio::spawn(collect(
                old_snap,
                (plan.old_publication.clone(), plan.old_side),
                tables.clone(),
                nonce.clone(),
                on_old.clone(),
            )),
            on_old.clone(),
        ),
        (
            tokio::spawn(collect(
                new_snap,
                (plan.new_publication.clone(), plan.new_side),
                tables.clone(),
                nonce.clone(),
                on_new.clone(),
            )),
            on_new,
        ),
    ];
    let mut prepared = Prepared {
        old: plan.old.clone(),
        new: plan.new.clone(),
        new_publication: plan.new_publication.clone(),
        tables: plan.tables.clone(),
        differing: Keys::default(),
        streams,
        sessions: Vec::new(),
        nonce,
        tables_hashed: 0,
        rows_hashed: 0,
        seconds: 0.0,
    };
    let mut excluded = changed_past_consistent(&plan, &new_sessions, consistent, &on_old).await;
    excluded.merge(unstreamable);
    let to_hash: Vec<Table> = plan
        .tables
        .iter()
        .filter(|t| {
            !t.key.is_empty()
                && plan.hash.contains(&t.name)
                && !excluded.whole.contains_key(&t.name)
        })
        .cloned()
        .collect();
    prepared.tables_hashed = to_hash.len();
    tracing::info!(
        "proof: hashing {} table(s) in snapshots of both servers before the fence ({} row(s) changed \
         meanwhile left for the pause); the application keeps writing",
        to_hash.len(),
        excluded.rows.values().map(HashSet::len).sum::<usize>()
    );
    let excluded_whole = excluded.whole.clone();
    let excluded: HashMap<QualifiedName, Vec<Vec<String>>> = excluded
        .rows
        .into_iter()
        .map(|(t, k)| (t, k.into_iter().collect()))
        .collect();
    let (differing, rows, sessions) = hash_in_snapshots(
        old_sessions,
        new_sessions,
        to_hash,
        &plan.ranges,
        Arc::new(excluded),
    )
    .await?;
    prepared.differing = differing;
    for (t, why) in &excluded_whole {
        prepared.differing.whole(t, why);
    }
    prepared.sessions = sessions;
    prepared.rows_hashed = rows;
    prepared.seconds = started.elapsed().as_secs_f64();
    Ok(prepared)
}

/// Ending a key stream at the fence needs logical messages: both servers must run 14+.
async fn require_messages(plan: &Plan, old: &Client, new: &Client) -> Result<(), Error> {
    for (c, side) in [(old, plan.old_side), (new, plan.new_side)] {
        let v: i32 = c
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(Error::sql(side, "reading the server version"))?
            .get(0);
        if v < 140000 {
            return Err(Error::Blocked(format!(
                "the {side} runs PostgreSQL {}, and ending a key stream at the fence needs logical \
                 messages (14+)",
                v / 10000
            )));
        }
    }
    Ok(())
}

/// The new primary's publication for its key stream. It lists the plain, logged tables with a key (a
/// table without a replica identity in a publication would refuse deletes); the others with a key are
/// returned, to be hashed whole in the pause.
async fn publish_on_new(plan: &Plan, new: &Client) -> Result<Keys, Error> {
    let keyed: Vec<(String, String)> = plan
        .tables
        .iter()
        .filter(|t| !t.key.is_empty())
        .map(|t| (t.name.schema.clone(), t.name.name.clone()))
        .collect();
    let (schemas, names): (Vec<String>, Vec<String>) = keyed.into_iter().unzip();
    let publishable: Vec<QualifiedName> = new
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN unnest($1::text[], $2::text[]) AS s(nsp, rel) ON s.nsp = n.nspname AND s.rel = c.relname
             WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND c.relreplident <> 'n'
               AND (c.relreplident <> 'd'
                    OR EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))",
            &[&schemas, &names],
        )
        .await
        .map_err(Error::sql(plan.new_side, "listing tables for the proof's publication"))?
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    if publishable.is_empty() {
        return Err(Error::Blocked("no table with a key to stream".into()));
    }
    let mut unstreamable = Keys::default();
    for t in plan.tables.iter().filter(|t| !t.key.is_empty()) {
        if !publishable.contains(&t.name) {
            unstreamable.whole(
                &t.name,
                &format!("the {} cannot stream its changes", plan.new_side),
            );
        }
    }
    new.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {p}; CREATE PUBLICATION {p} FOR TABLE {}",
        publishable
            .iter()
            .map(QualifiedName::quoted)
            .collect::<Vec<_>>()
            .join(", "),
        p = quote_ident(&plan.new_publication)
    ))
    .await
    .map_err(Error::sql(
        plan.new_side,
        "creating the proof's publication",
    ))?;
    Ok(unstreamable)
}

/// The new primary's snapshot holds what it had applied by then, up to some A past C: the rows the old
/// primary changed between C and A differ in the snapshots. The old primary's stream names them once it
/// has passed A; they are left out of the hashes (the pause compares them).
async fn changed_past_consistent(
    plan: &Plan,
    new_sessions: &[Client],
    consistent: Lsn,
    on_old: &Collected,
) -> Keys {
    let applied: Option<Lsn> = match new_sessions.first() {
        Some(c) => crate::state::stream::applied_lsn(c).await.ok(),
        None => None,
    };
    let mut excluded = Keys::default();
    if let Some(a) = applied.filter(|a| *a > consistent) {
        let until = Instant::now() + plan.wait;
        while on_old.progress.load(Ordering::Relaxed) < a.0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if on_old.progress.load(Ordering::Relaxed) >= a.0 {
            let seen = on_old.keys();
            excluded.rows = seen.rows.clone();
            excluded.whole = seen.whole.clone();
        }
    }
    excluded
}

impl Prepared {
    /// Gives up the proof before the fence (or after a failure): the streams end, the publication goes.
    pub async fn abandon(self, new: &Client) {
        drop_publication(new, &self.new_publication).await;
        drop(self);
    }

    /// The second part, once the new primary has applied everything up to the fence: ends both streams,
    /// compares the rows of every kept key, hashes the tables that need it whole, and compares `sequences`.
    /// `check` are the tables to verify (quick: those the stream changed; full: all). The caller drops the
    /// publication afterwards, outside the pause.
    pub async fn conclude(
        mut self,
        (old, old_side): (&Client, Side),
        (new, new_side): (&Client, Side),
        check: Vec<Table>,
        sequences: verify::SourceSequences<'_>,
        jobs: usize,
        wait: Duration,
    ) -> Result<(VerifyReport, InPause), Error> {
        let started = Instant::now();
        let mut keys = std::mem::take(&mut self.differing);
        let failed = self
            .end_streams((old, old_side), (new, new_side), wait, &mut keys)
            .await;
        tracing::info!(
            "proof: both key streams ended {:.3}s into the pause's part",
            started.elapsed().as_secs_f64()
        );
        let (pause, work) = self.share_out(check, keys, failed);
        let sessions = std::mem::take(&mut self.sessions);
        let (sequences, (compared, different)) = tokio::try_join!(
            verify::verify_sequences(old, new, sequences),
            compare_in_pause(sessions, work)
        )?;
        let mut compared = merge_parts(compared);
        if !different.is_empty() {
            // hashed whole and different: locate the rows, as `hikkoshi verify` does
            let names: HashSet<String> = different.iter().map(|t| t.name.to_string()).collect();
            compared.retain(|r| !names.contains(&r.table));
            compared.extend(
                verify::compare(
                    &self.old,
                    &self.new,
                    different,
                    verify::SourceSequences::ReadNow(&[]),
                    jobs,
                )
                .await?
                .tables,
            );
        }
        tracing::info!(
            "proof: {} row(s) compared by key, {} table(s) hashed whole, {:.3}s into the pause's part",
            pause.rows_compared,
            pause.hashed_whole.len(),
            started.elapsed().as_secs_f64()
        );
        compared.sort_by(|a, b| a.table.cmp(&b.table));
        let report = VerifyReport {
            schema: Vec::new(),
            objects: Vec::new(),
            tables: compared,
            sequences,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((report, pause))
    }

    /// Ends both key streams with a logical message on each server and adds what they saw to `keys`;
    /// returns why the streams' keys cannot be used, if they cannot.
    async fn end_streams(
        &mut self,
        (old, old_side): (&Client, Side),
        (new, new_side): (&Client, Side),
        wait: Duration,
        keys: &mut Keys,
    ) -> Option<String> {
        let streams = std::mem::take(&mut self.streams);
        let mut failed = None;
        // Transactional, so that its commit flushes the WAL and the walsender sends it at once; every
        // transaction that committed before it is sent before it.
        for (c, side) in [(old, old_side), (new, new_side)] {
            if let Err(e) = c
                .execute(
                    "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
                    &[&PREFIX, &self.nonce],
                )
                .await
            {
                failed = Some(format!(
                    "ending the proof's stream on the {side}: {}",
                    crate::error::chain(&Error::sql(side, "emitting a message")(e))
                ));
            }
        }
        for (s, collected) in streams {
            if failed.is_some() {
                s.abort();
                continue;
            }
            match tokio::time::timeout(wait, s).await {
                Ok(Ok(Ok(()))) => keys.merge(std::mem::take(&mut *collected.keys())),
                Ok(Ok(Err(e))) => failed = Some(crate::error::chain(&e)),
                Ok(Err(e)) => failed = Some(format!("a proof stream failed: {e}")),
                Err(_) => {
                    failed = Some(format!(
                        "a proof stream did not reach the fence within {}s",
                        wait.as_secs()
                    ))
                }
            }
        }
        failed
    }

    /// The pause's work: each table of `check` (and each other table either server changed meanwhile)
    /// compared by its kept keys, shared out among the session pairs, or hashed whole (no key, too many
    /// keys, or the streams failed).
    fn share_out(
        &self,
        mut check: Vec<Table>,
        mut keys: Keys,
        failed: Option<String>,
    ) -> (InPause, Vec<Work>) {
        let mut pause = InPause::default();
        let mut whole = Vec::new();
        let mut by_key = Vec::new();
        // A table outside `check` (quick: not changed by the stream) whose rows changed on either server
        // in the meantime is compared too: those are the rows that may differ.
        let touched: Vec<Table> = self
            .tables
            .iter()
            .filter(|t| {
                (keys.rows.contains_key(&t.name) || keys.whole.contains_key(&t.name))
                    && !check.iter().any(|c| c.name == t.name)
            })
            .cloned()
            .collect();
        check.extend(touched);
        for t in check {
            let why = if let Some(f) = &failed {
                Some(f.clone())
            } else if t.key.is_empty() {
                Some("no key".to_string())
            } else {
                keys.whole.get(&t.name).cloned()
            };
            match why {
                Some(why) => {
                    pause.hashed_whole.push(format!("{} ({why})", t.name));
                    whole.push(t);
                }
                None => {
                    let k: Vec<Vec<String>> = keys
                        .rows
                        .remove(&t.name)
                        .map(|s| s.into_iter().collect())
                        .unwrap_or_default();
                    pause.rows_compared += k.len();
                    by_key.push((t, k));
                }
            }
        }
        if let Some(f) = &failed {
            tracing::warn!("the proof's key streams failed ({f}): hashing the tables whole");
        }
        pause.streams_failed = failed;
        // many keys of one table are shared out among the session pairs
        let share = pause
            .rows_compared
            .div_ceil(self.sessions.len().max(1))
            .max(SHARE);
        let mut work: Vec<Work> = Vec::new();
        for (t, k) in by_key {
            if k.len() <= share {
                work.push((t, Some(k)));
            } else {
                for part in k.chunks(share) {
                    work.push((t.clone(), Some(part.to_vec())));
                }
            }
        }
        work.extend(whole.into_iter().map(|t| (t, None)));
        (pause, work)
    }
}

#[cfg(test)]
mod tests;
