//! The migration lock: one process at a time works on a migration (copies, follows, or cuts over with a
//! follower of its own). It is a session-level advisory lock on the target, so it dies with its session;
//! a follower that runs for days keeps it with `keep`, which takes it again after a restart of the target.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::session;

/// The advisory lock key that makes one process at a time the owner of a migration ("hiks").
pub const LOCK_KEY: i64 = 0x6869_6b73;

/// SQL listing the backends that hold the migration lock in the current database (a bigint advisory key
/// shows in pg_locks as classid = high 32 bits, objid = low 32 bits, objsubid = 1).
pub fn lock_holders_sql() -> String {
    format!(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND classid = {} AND objid = {} AND objsubid = 1
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        LOCK_KEY >> 32,
        LOCK_KEY & 0xffff_ffff
    )
}

/// Tries to become the one process working on this migration; the lock lives as long as `client`'s session.
pub async fn try_lock(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await?
        .get(0))
}

/// How long a new process waits for the sessions of one that died (kill -9) while they finish a statement.
const DEAD_SESSIONS_WAIT: Duration = Duration::from_secs(30);

/// Connects to the target and takes the migration lock, which lives as long as the returned session.
///
/// A process killed with `kill -9` leaves its sessions on the target until the server notices: at once for
/// an idle one (the socket closes), at the end of its statement for a busy one (within a second where the
/// server has `client_connection_check_interval`, which `session::connect` sets). So while the holder is
/// running a statement, or has just gone, this waits (at most `DEAD_SESSIONS_WAIT`, saying so) instead of
/// refusing at once; an idle holder is a live process, and refuses.
pub async fn lock(tgt_info: &ConnInfo) -> Result<Client, Error> {
    let target = session::connect(tgt_info, Side::Target).await?;
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        if try_lock(&target)
            .await
            .map_err(Error::sql(Side::Target, "taking the migration lock"))?
        {
            return Ok(target);
        }
        let holder = target
            .query_opt(
                &format!(
                    "SELECT a.pid, coalesce(a.state, ''), coalesce(left(a.query, 60), '')
                     FROM pg_stat_activity a WHERE a.pid IN ({}) LIMIT 1",
                    lock_holders_sql()
                ),
                &[],
            )
            .await
            .map_err(Error::sql(
                Side::Target,
                "looking at the migration lock's holder",
            ))?;
        let busy = match &holder {
            // gone between the two looks: try again at once
            None => true,
            Some(r) => r.get::<_, String>(1) == "active",
        };
        let waited = started.elapsed();
        // an idle holder gets a moment for the server to notice a closed socket
        if (!busy && waited > Duration::from_secs(2)) || waited > DEAD_SESSIONS_WAIT {
            return Err(another_process(tgt_info));
        }
        if busy
            && !said
            && let Some(r) = &holder
        {
            said = true;
            tracing::info!(
                "the migration lock is held by session {} on the target, still running a statement \
                 (`{}`): waiting up to {}s for it to end (a previous hikkoshi process that was killed?)",
                r.get::<_, i32>(0),
                r.get::<_, String>(2),
                DEAD_SESSIONS_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes the migration lock again on a new session when its session has ended (a restart of the target,
/// a dropped connection).
pub async fn relock(target: &mut Client, tgt_info: &ConnInfo) -> Result<(), Error> {
    if !alive(target).await {
        *target = lock(tgt_info).await?;
    }
    Ok(())
}

/// Keeps the migration lock until `done`: checks its session every 2 s and, when it has ended, takes the
/// lock on a new one. When another process holds it by then, sets `lost` and cancels `follow`.
pub async fn keep(
    tgt_info: ConnInfo,
    mut session: Client,
    follow: CancellationToken,
    done: CancellationToken,
    lost: Arc<AtomicBool>,
) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if alive(&session).await {
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(10), lock(&tgt_info)).await {
            Ok(Ok(s)) => {
                tracing::info!("the migration lock's session had ended: lock taken again");
                session = s;
            }
            Ok(Err(Error::Locked(why))) => {
                tracing::error!("{why}: this process stops following");
                lost.store(true, Ordering::Relaxed);
                follow.cancel();
                return;
            }
            _ => {} // the target is not back yet
        }
    }
}

/// The error for a migration another process works on.
pub fn another_process(tgt_info: &ConnInfo) -> Error {
    Error::Locked(format!(
        "another hikkoshi process is already working on the migration into {tgt_info}: wait for it to \
         finish, or stop it (its sessions show application_name 'hikkoshi' in pg_stat_activity)"
    ))
}

async fn alive(session: &Client) -> bool {
    !session.is_closed()
        && tokio::time::timeout(Duration::from_secs(10), session.simple_query("SELECT 1"))
            .await
            .is_ok_and(|r| r.is_ok())
}
