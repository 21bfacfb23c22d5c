//! `hikkoshi clean`: removes what hikkoshi made for a migration — its slots and publications (the forward
//! stream's on the source, a reverse stream's on the target), the `hikkoshi` state schema on both, and a
//! cutover's write fence wherever one stands (the old primary accepts writes again: the report says so).
//! The copied tables stay. Running it twice is harmless. It refuses while a hikkoshi process works on the migration, unless
//! `force`, which ends that process's sessions first.

use tokio_postgres::Client;

use crate::error::{Error, Side};
use crate::session;
use crate::state;

/// What was removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct Cleaned {
    pub slots: Vec<String>,
    pub publications: Vec<String>,
    pub state_schema: bool,
    /// Sessions of a running hikkoshi process ended by --force.
    pub sessions_ended: usize,
    /// The servers (`source`, `target`) whose write fence was lifted: they accept writes again.
    pub fences_lifted: Vec<String>,
    /// What could not be removed, with what to do.
    pub warnings: Vec<String>,
}

pub async fn run(source_url: &str, target_url: &str, force: bool) -> Result<Cleaned, Error> {
    let src_info = session::resolve(Side::Source, source_url)?;
    let tgt_info = session::resolve(Side::Target, target_url)?;
    let source = session::connect(&src_info, Side::Source).await?;
    let target = session::connect(&tgt_info, Side::Target).await?;
    for c in [&source, &target] {
        // the old primary of a cutover is read-only for everyone but hikkoshi
        let _ = c
            .batch_execute("SET default_transaction_read_only = off")
            .await;
    }
    let mut cleaned = Cleaned::default();
    let Some(m) = state::load(&target)
        .await
        .map_err(Error::sql(Side::Target, "reading hikkoshi state"))?
    else {
        lift_fences(&source, &target, &mut cleaned).await?;
        return Ok(cleaned);
    };
    if !state::try_lock(&target)
        .await
        .map_err(Error::sql(Side::Target, "taking the migration lock"))?
    {
        if !force {
            return Err(Error::Blocked(
                "a hikkoshi process is working on this migration (it holds the migration lock): stop it \
                 before cleaning, or run `hikkoshi clean --force` to end its sessions"
                    .into(),
            ));
        }
        cleaned.sessions_ended += end_lock_holder(&target).await?;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !state::try_lock(&target)
            .await
            .map_err(Error::sql(Side::Target, "taking the migration lock"))?
        {
            if std::time::Instant::now() > until {
                return Err(Error::Blocked(
                    "the hikkoshi process working on this migration did not let go of it".into(),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let pattern = crate::stream::names::pattern(&m.id);
    for (client, side) in [(&source, Side::Source), (&target, Side::Target)] {
        if force {
            cleaned.sessions_ended += end_walsenders(client, side, &pattern).await?;
        }
        drop_streams(client, side, &pattern, &mut cleaned).await?;
    }
    lift_fences(&source, &target, &mut cleaned).await?;
    // roles are the cluster's, and they own the copied objects: they stay, and clean says which
    if let Ok(created) = state::roles::created(&target).await
        && !created.is_empty()
    {
        cleaned.warnings.push(format!(
            "the clone created role(s) {} on the target; they own or are granted the copied objects, so \
             they stay. To give up the migration entirely, drop the copied objects, then DROP ROLE each",
            created.join(", ")
        ));
    }
    let _ = source
        .batch_execute("DROP SCHEMA IF EXISTS hikkoshi CASCADE")
        .await;
    target
        .batch_execute("DROP SCHEMA IF EXISTS hikkoshi CASCADE")
        .await
        .map_err(Error::sql(Side::Target, "dropping the hikkoshi schema"))?;
    cleaned.state_schema = true;
    Ok(cleaned)
}

/// Lifts a cutover's write fence on either server (see `cutover::fence`).
async fn lift_fences(source: &Client, target: &Client, cleaned: &mut Cleaned) -> Result<(), Error> {
    for (client, side) in [(source, Side::Source), (target, Side::Target)] {
        let raised = crate::cutover::fence::is_raised(client).await;
        let _ = client
            .batch_execute("SET client_min_messages = warning")
            .await;
        cleaned.warnings.extend(
            crate::cutover::fence::lift(
                client,
                side,
                crate::cutover::fence::subscriptions::AtLift::Leave,
            )
            .await?,
        );
        if raised {
            cleaned.fences_lifted.push(side.to_string());
        }
    }
    Ok(())
}

async fn drop_streams(
    client: &Client,
    side: Side,
    pattern: &str,
    cleaned: &mut Cleaned,
) -> Result<(), Error> {
    let slots = client
        .query(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_name ~ $1",
            &[&pattern],
        )
        .await
        .map_err(Error::sql(side, "listing replication slots"))?;
    for s in &slots {
        let (name, active): (String, bool) = (s.get(0), s.get(1));
        if active {
            return Err(Error::Blocked(format!(
                "the slot {name} on the {side} is in use by a stream: stop the hikkoshi process that \
                 streams, or run `hikkoshi clean --force`"
            )));
        }
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&name])
            .await
            .map_err(Error::sql(side, "dropping a replication slot"))?;
        cleaned.slots.push(name);
    }
    let pubs = client
        .query(
            "SELECT pubname::text FROM pg_publication WHERE pubname ~ $1",
            &[&pattern],
        )
        .await
        .map_err(Error::sql(side, "listing publications"))?;
    for p in &pubs {
        let name: String = p.get(0);
        client
            .batch_execute(&crate::stream::ddl::capture::remove_with_publication(&name))
            .await
            .map_err(Error::sql(
                side,
                "dropping a publication and its DDL capture",
            ))?;
        cleaned.publications.push(name);
    }
    Ok(())
}

/// Ends the sessions holding the migration lock.
async fn end_lock_holder(target: &Client) -> Result<usize, Error> {
    let rows = target
        .query(
            &format!(
                "SELECT pg_terminate_backend(pid) FROM ({}) h WHERE pid <> pg_backend_pid()",
                state::lock_holders_sql()
            ),
            &[],
        )
        .await
        .map_err(Error::sql(
            Side::Target,
            "ending the process that holds the lock",
        ))?;
    Ok(rows.len())
}

/// Ends the walsenders streaming hikkoshi's slots.
async fn end_walsenders(client: &Client, side: Side, pattern: &str) -> Result<usize, Error> {
    let rows = client
        .query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
             WHERE slot_name ~ $1 AND active_pid IS NOT NULL",
            &[&pattern],
        )
        .await
        .map_err(Error::sql(side, "ending the streams of hikkoshi's slots"))?;
    // a terminated walsender releases its slot a moment later
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !rows.is_empty() && std::time::Instant::now() < until {
        let busy: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name ~ $1 AND active",
                &[&pattern],
            )
            .await
            .map_err(Error::sql(side, "listing replication slots"))?
            .get(0);
        if busy == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(rows.len())
}
