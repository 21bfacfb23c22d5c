//! The write fence: how the old primary stops taking writes from every application role, not only the one
//! hikkoshi connects as.
//!
//! `ALTER DATABASE … SET default_transaction_read_only = on` makes every new session of every role
//! read-only (PostgreSQL applies database settings at session start; docs: ALTER DATABASE, and "Client
//! Connection Defaults"). Sessions already connected keep their old default, so every other client session
//! of the database is ended with `pg_terminate_backend` (and waited for until it has exited): its open
//! transaction rolls back, and the pool reconnects read-only. hikkoshi's own sessions say
//! `default_transaction_read_only = off` for themselves.
//!
//! A role-level setting of `default_transaction_read_only` overrides the database's, and a session the
//! fence cannot end could go on writing: either makes the fence unsound, so the cutover refuses (before
//! fencing) or undoes the fence, and says what to change.

use tokio_postgres::Client;

use crate::error::{Error, Side};
use crate::ident::quote_ident;

/// What the fence did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Fence {
    /// The means, in words, for the report.
    pub means: String,
    /// Sessions ended, as `role (n)`.
    pub sessions_ended: Vec<String>,
}

/// The database-level value of `default_transaction_read_only` before the fence (`None`: not set), to put
/// back when unfencing.
pub async fn prior_setting(client: &Client, side: Side) -> Result<Option<String>, Error> {
    Ok(client
        .query_one(
            "SELECT (SELECT c FROM pg_db_role_setting s, unnest(s.setconfig) c
                     WHERE s.setdatabase = d.oid AND s.setrole = 0
                       AND c LIKE 'default\\_transaction\\_read\\_only=%')
             FROM pg_database d WHERE d.datname = current_database()",
            &[],
        )
        .await
        .map_err(Error::sql(side, "reading the database's settings"))?
        .get(0))
}

/// Refuses, before anything changes, when the fence could not hold: no right to alter the database, a
/// role-level setting that would override it, prepared transactions that could commit later.
pub async fn preflight(client: &Client, side: Side) -> Result<(), Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text,
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                    OR pg_has_role(current_user, d.datdba, 'MEMBER')
             FROM pg_database d WHERE d.datname = current_database()",
            &[],
        )
        .await
        .map_err(Error::sql(side, "checking the right to fence writes"))?;
    let (user, db, may_alter): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    if !may_alter {
        return Err(Error::Blocked(format!(
            "cannot fence writes on the {side}: role {user} neither owns database {db} nor is a superuser, \
             so it cannot make the database read-only for the application's roles. Run the cutover as the \
             database owner or a superuser (or `ALTER DATABASE {} OWNER TO {}`). Nothing was changed",
            quote_ident(&db),
            quote_ident(&user)
        )));
    }
    let overriding: Vec<String> = client
        .query(
            "SELECT r.rolname::text FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
             WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
               AND EXISTS (SELECT 1 FROM unnest(s.setconfig) c
                           WHERE c LIKE 'default\\_transaction\\_read\\_only=%')
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::sql(side, "reading role settings"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !overriding.is_empty() {
        return Err(Error::Blocked(format!(
            "cannot fence writes on the {side}: role(s) {} set default_transaction_read_only themselves, \
             which overrides the database's setting, so their sessions would stay writable. Remove it \
             (`ALTER ROLE <role> RESET default_transaction_read_only`, and `… IN DATABASE {} RESET …` \
             where set per database) and run the cutover again. Nothing was changed",
            overriding.join(", "),
            quote_ident(&db)
        )));
    }
    let prepared: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await
        .map_err(Error::sql(side, "looking for prepared transactions"))?
        .get(0);
    if prepared > 0 {
        return Err(Error::Blocked(format!(
            "the {side} has {prepared} prepared transaction(s) in database {db} (pg_prepared_xacts): they \
             could commit after the fence and their writes would be lost. COMMIT PREPARED or ROLLBACK \
             PREPARED them and run the cutover again. Nothing was changed"
        )));
    }
    Ok(())
}

/// Fences writes: the database read-only for new sessions, every other client session ended. Undoes itself
/// if a session cannot be ended.
pub async fn fence(client: &Client, side: Side, prior: Option<&str>) -> Result<Fence, Error> {
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(Error::sql(side, "reading the database name"))?
        .get(0);
    client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            quote_ident(&db)
        ))
        .await
        .map_err(Error::sql(side, "making the database read-only"))?;
    // Listed after the ALTER committed: every session not in the list started read-only.
    let sessions = client
        .query(
            "SELECT pid, coalesce(usename::text, '?') FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND backend_type = 'client backend'
               AND coalesce(application_name, '') NOT LIKE 'hikkoshi%'",
            &[],
        )
        .await
        .map_err(Error::sql(side, "listing the database's sessions"))?;
    // Signal them all first, then wait for them together (pg_terminate_backend's own wait polls slowly).
    let mut ended: std::collections::BTreeMap<String, usize> = Default::default();
    let mut refused: Vec<String> = Vec::new();
    for s in &sessions {
        let (pid, role): (i32, String) = (s.get(0), s.get(1));
        match client
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
        {
            Ok(_) => *ended.entry(role).or_default() += 1,
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("42")) => {
                refused.push(format!("{role} (pid {pid})"))
            }
            Err(e) => return Err(Error::sql(side, "ending a session")(e)),
        }
    }
    let pids: Vec<i32> = sessions.iter().map(|s| s.get::<_, i32>(0)).collect();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let survivors = loop {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .map_err(Error::sql(side, "checking that the sessions ended"))?
            .get(0);
        if n as usize <= refused.len() || std::time::Instant::now() > until {
            break n - refused.len() as i64;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    };
    if !refused.is_empty() || survivors > 0 {
        unfence(client, side, prior).await?;
        return Err(Error::Blocked(format!(
            "cannot fence writes on the {side}: {} session(s) could not be ended{}{}, so they could go on \
             writing. The fence was undone; the {side} is the primary as before. Grant the cutover's role \
             pg_signal_backend (`GRANT pg_signal_backend TO <role>`), or run it as a superuser to end \
             superusers' sessions",
            refused.len() as i64 + survivors,
            if refused.is_empty() { "" } else { ": " },
            refused.join(", ")
        )));
    }
    let total: usize = ended.values().sum();
    Ok(Fence {
        means: format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on; {total} other session(s) ended \
             with pg_terminate_backend",
            quote_ident(&db)
        ),
        sessions_ended: ended.iter().map(|(r, n)| format!("{r} ({n})")).collect(),
    })
}

/// Puts the database's `default_transaction_read_only` back as it was before the fence.
pub async fn unfence(client: &Client, side: Side, prior: Option<&str>) -> Result<(), Error> {
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(Error::sql(side, "reading the database name"))?
        .get(0);
    let sql = match prior.and_then(|p| p.split_once('=')) {
        Some((_, value)) => format!(
            "ALTER DATABASE {} SET default_transaction_read_only = {}",
            quote_ident(&db),
            crate::ident::quote_literal(value)
        ),
        None => format!(
            "ALTER DATABASE {} RESET default_transaction_read_only",
            quote_ident(&db)
        ),
    };
    client.batch_execute(&sql).await.map_err(Error::sql(
        side,
        "lifting the write fence (run `ALTER DATABASE … RESET default_transaction_read_only` by hand)",
    ))
}
