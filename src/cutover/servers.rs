//! The two servers of a switch, and what the switch reads and records on them: the slot's health, the lag,
//! the fence marker, the selection, the step.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::catalog::Catalog;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::lsn::Lsn;
use crate::plan::{Resolved, Selection, resolve};
use crate::state;
use crate::stream::follow::FollowReport;

/// One server of a switch: its session, which side of the migration it is, and how to reach it.
pub(super) struct Server {
    pub(super) client: Client,
    pub(super) side: Side,
    pub(super) info: ConnInfo,
}

impl Server {
    pub(super) async fn open(info: &ConnInfo, side: Side) -> Result<Server, Error> {
        Ok(Server {
            client: super::open(info, side).await?,
            side,
            info: info.clone(),
        })
    }

    pub(super) fn at(&self) -> (&Client, Side) {
        (&self.client, self.side)
    }
}

/// The stream's slot must exist and be able to stream.
pub(super) async fn slot_healthy(old: &Client, side: Side, slot: &str) -> Result<(), Error> {
    let row = old
        .query_opt(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(Error::sql(side, "reading the replication slot"))?;
    match row.map(|r| r.get::<_, String>(0)) {
        None => Err(Error::Blocked(format!(
            "the replication slot {slot} does not exist on the {side}: the change stream is broken and a \
             cutover would lose writes. Nothing was fenced. Run `hikkoshi clean` and clone again"
        ))),
        Some(s) if s == "lost" => Err(Error::Blocked(format!(
            "the replication slot {slot} on the {side} was invalidated (the server removed WAL it needed, \
             see max_slot_wal_keep_size): the target misses changes and a cutover would lose them. Nothing \
             was fenced. Run `hikkoshi clean` and clone again"
        ))),
        Some(_) => Ok(()),
    }
}

/// The stream's lag: the old primary's WAL position minus what the new one has applied or is in sync with.
pub(super) async fn lag_bytes(
    (old, old_side): (&Client, Side),
    (new, new_side): (&Client, Side),
) -> Result<i64, Error> {
    let pos: String = old
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(Error::sql(old_side, "reading the WAL position"))?
        .get(0);
    crate::state::stream::lag_bytes(new, &pos)
        .await
        .map_err(Error::sql(new_side, "reading the stream state"))
}

/// A transactional logical message, after the fence: once the new primary has applied it, it has applied
/// every transaction that committed before the fence. (A source before 14 cannot send messages through
/// pgoutput; there the follower's in-sync position passes the marker as soon as it has caught up.)
pub(super) async fn fence_marker(old: &Client, side: Side, migration: &str) -> Result<Lsn, Error> {
    let lsn: String = old
        .query_one(
            "SELECT pg_logical_emit_message(true, 'hikkoshi', $1)::text",
            &[&format!("fence {migration}")],
        )
        .await
        .map_err(Error::sql(side, "writing the fence marker"))?
        .get(0);
    lsn.parse()
        .map_err(|e| Error::Blocked(format!("the fence marker's LSN: {e}")))
}

/// Whether our own follower stopped with an error (it only stops by itself on one).
pub(super) async fn follower_failed(
    follower: &mut Option<tokio::task::JoinHandle<Result<FollowReport, Error>>>,
) -> Option<Error> {
    if !follower.as_ref().is_some_and(|h| h.is_finished()) {
        return None;
    }
    let handle = follower.take()?;
    match handle.await {
        Ok(Ok(_)) => Some(Error::Blocked(
            "the follower stopped before the cutover was done".into(),
        )),
        Ok(Err(e)) => Some(e),
        Err(e) => Some(Error::Blocked(format!("the follower failed: {e}"))),
    }
}

/// The migration's tables and sequences, resolved on the old primary's catalog.
pub(super) async fn selected(
    m: &state::Migration,
    old: &Client,
    side: Side,
) -> Result<Resolved, Error> {
    let selection = selection_of(m)?;
    let cat = Catalog::load(old)
        .await
        .map_err(Error::sql(side, "reading the catalog"))?;
    resolve(&cat, &selection)
}

/// The selected tables of the old primary that are not among `fenced` (relations as `regclass` text):
/// created since the selection was resolved. One catalog query, for the pause.
pub(super) async fn created_since(
    m: &state::Migration,
    old: &Client,
    side: Side,
    fenced: &[String],
) -> Result<Vec<String>, Error> {
    let selection = selection_of(m)?;
    let sql = format!(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p'
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence')
           AND n.nspname NOT LIKE 'pg\\_%'
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                           AND d.objid = c.oid AND d.deptype = 'e')
           AND c.oid NOT IN (SELECT to_regclass(r) FROM unnest($1::text[]) r WHERE to_regclass(r) IS NOT NULL)
           AND ({})
         ORDER BY 1",
        selection.sql("n.nspname", "c.relname")
    );
    Ok(old
        .query(&sql, &[&fenced])
        .await
        .map_err(Error::sql(
            side,
            "looking for tables created during the switch",
        ))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The migration's table selection, as recorded by the clone.
fn selection_of(m: &state::Migration) -> Result<Selection, Error> {
    let list = |key: &str| -> Vec<String> {
        m.options
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Selection::parse(&list("include"), &list("exclude")).map_err(|e| Error::Usage(format!("{e}")))
}

/// Drops a finished stream's slot, publication and DDL capture on its upstream, once its follower has let go of it.
pub(super) async fn drop_stream(
    upstream: &Client,
    side: Side,
    slot: &str,
    publication: &str,
) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let r = upstream
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        let dropped = match r {
            Ok(None) => true,
            Ok(Some(row)) if !row.get::<_, bool>(0) => upstream
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .is_ok(),
            _ => false,
        };
        if dropped {
            break;
        }
        if Instant::now() > until {
            return Err(format!(
                "the slot {slot} on the {side} is still in use, so it was left; `hikkoshi clean` removes it \
                 (it holds WAL on the {side} until then)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    upstream
        .batch_execute(&crate::stream::ddl::capture::remove_with_publication(
            publication,
        ))
        .await
        .map_err(|e| {
            format!(
                "the publication {publication} on the {side} could not be dropped ({}); `hikkoshi clean` \
                 removes it",
                crate::error::chain(&e)
            )
        })
}
