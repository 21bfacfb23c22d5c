//! The write fence: how the old primary refuses every write to the migrated tables, from every role and
//! every session, whatever the session did to itself.
//!
//! A default such as `ALTER DATABASE … SET default_transaction_read_only = on` is no fence: a session can
//! say `SET default_transaction_read_only = off` or `BEGIN READ WRITE` (drivers and pools do), and sessions
//! connected before it keep their old default. The fence is a statement-level trigger instead, on every
//! fenced table (each selected table, its partitions and its partitioned ancestors):
//!
//! ```text
//! BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE … FOR EACH STATEMENT EXECUTE FUNCTION hikkoshi_fence.refuse()
//! ```
//!
//! Statement triggers fire for every role, the table's owner included, for COPY FROM, INSERT … ON
//! CONFLICT and MERGE (docs: CREATE TRIGGER, "Overview of Trigger Behavior"). They are set `ENABLE ALWAYS`
//! where the role owns the table, so that replica-mode sessions (`session_replication_role = replica`) are
//! refused too. hikkoshi's own sessions pass by a secret no other session can learn (`pass`).
//!
//! Around the write fence stand three more things (issue 23: each was a way around it):
//! - the DDL fence (`ddl`), raised before the schema is compared and the proof is made: CREATE, ALTER, DROP,
//!   ALTER TABLE … DISABLE TRIGGER by any role are refused from then on, so no table can appear unfenced and
//!   the shape compared before the pause cannot change in it;
//! - subscriptions into the old primary (`subscriptions`): their apply workers fire no statement trigger, so
//!   they are disabled before the pause, and enabled again if the switch is undone;
//! - the pass (`pass`).
//!
//! It goes up in two steps, so that the write pause does not grow with the number of tables:
//! 1. **Arm**, before the pause: the triggers are created, one table per transaction (a `CREATE TRIGGER`
//!    waits for the transactions that wrote the table and holds one lock at a time, so it cannot deadlock
//!    with the application). An armed trigger lets writes pass: it takes the shared transaction-level
//!    advisory lock `(hikf, 1)` and reads the flag, the sequence `hikkoshi_fence.up` (set when `is_called`).
//! 2. **Raise**, in the pause: the flag is set, then the fence takes the same advisory lock exclusively and
//!    lets it go at once.
//!
//! Why no write can commit after the raise (and so after the marker that follows it):
//! - A sequence is read outside MVCC (`pg_sequence_last_value` reads the page): once `setval` returns,
//!   every later trigger call sees the flag, also in a REPEATABLE READ transaction whose snapshot is older.
//! - A transaction that wrote a fenced table before the raise went through the trigger after the arm (the
//!   arm's `CREATE TRIGGER` waited for every writer before it), so it holds the shared advisory lock until
//!   it ends; the exclusive lock is granted only once every such transaction has committed or aborted.
//! - A trigger call that takes its shared lock after the exclusive request queues behind it, and then reads
//!   the flag, which is up.
//!
//! Sessions are also ended (`pg_terminate_backend`) where the fence's role may: pools then reconnect at
//! once and find out. Correctness does not depend on it: where the role may not (no `pg_signal_backend`),
//! the fence warns and holds all the same. The fence stays after the cutover's point of no return; `rollback`
//! or `clean` lifts it (the flag first, so writes pass at once; then the triggers and the schema).
//!
//! What stays open, because PostgreSQL gives no way to close it: a superuser can drop or disable any of it
//! (`ALTER EVENT TRIGGER … DISABLE`, `DROP SCHEMA hikkoshi_fence CASCADE`); a role that may not create event
//! triggers leaves DDL open (`ddl` says so in the report); replica sessions pass on the tables the role does
//! not own; tables outside the selection are not fenced; `nextval` is not a write (see `sequence`); large
//! objects have no trigger (the switch compares them instead).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio_postgres::Client;

use crate::error::{Error, Side};
use crate::ident::{QualifiedName, quote_literal};

/// The schema that holds the fence's flag and function on a fenced server.
pub const SCHEMA: &str = "hikkoshi_fence";
/// The trigger's name on every fenced table.
pub const TRIGGER: &str = "hikkoshi_fence";
pub mod ddl;
pub mod pass;
pub mod subscriptions;

/// The advisory lock the triggers share and the raise takes exclusively ("hikf", 1).
const LOCK: (i32, i32) = (0x6869_6b66, 1);
/// How long one `CREATE TRIGGER` or `DROP TRIGGER` may wait for the application's writers before it is
/// tried again (it makes the application's writers of that table wait behind it meanwhile).
const TABLE_LOCK_WAIT: Duration = Duration::from_secs(2);
/// Statements in flight at once on the one session that arms or lifts the fence.
const PIPELINE: usize = 64;

/// What the fence did, for the report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Fence {
    /// The means, in words.
    pub means: String,
    /// Sessions ended, as `role (n)`.
    pub sessions_ended: Vec<String>,
    /// What the fence could not do, and its fix (it holds without it).
    pub warnings: Vec<String>,
}

/// Who the fence sends the application to.
#[derive(Clone, Debug)]
pub struct Notice {
    /// `cutover` or `rollback`.
    pub step: String,
    pub migration_id: String,
    /// `host:port/dbname` of the new primary: never a password, nor even a user.
    pub new_primary: String,
}

/// The relations to fence, as `regclass` text: the selected tables, their partitions and their partitioned
/// ancestors (a statement on a parent fires the parent's statement triggers, one on a partition the
/// partition's). `pg_partition_tree` and `pg_partition_ancestors` return nothing for a table outside any
/// partition tree, hence the table itself.
pub async fn relations(
    client: &Client,
    side: Side,
    tables: &[QualifiedName],
) -> Result<Vec<String>, Error> {
    let names: Vec<String> = tables.iter().map(QualifiedName::quoted).collect();
    Ok(client
        .query(
            "WITH sel AS (SELECT to_regclass(n) AS r FROM unnest($1::text[]) n)
             SELECT DISTINCT c.oid::regclass::text
             FROM sel CROSS JOIN LATERAL (
                 SELECT sel.r AS relid
                 UNION SELECT relid FROM pg_partition_tree(sel.r)
                 UNION SELECT relid FROM pg_partition_ancestors(sel.r)) p
             JOIN pg_class c ON c.oid = p.relid
             WHERE sel.r IS NOT NULL AND c.relkind IN ('r', 'p')
             ORDER BY 1",
            &[&names],
        )
        .await
        .map_err(Error::sql(side, "listing the tables to fence"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Something about the fence, with what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Concern {
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for Concern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}. {}", self.problem, self.fix)
    }
}

/// What the preflight found: a reason the fence could not hold, and what would only slow the switch.
#[derive(Clone, Debug, Default)]
pub struct Preflight {
    pub refusal: Option<Concern>,
    pub warnings: Vec<Concern>,
}

impl Preflight {
    /// The refusal as the cutover's error (nothing was changed yet), or the warnings as text.
    pub fn into_result(self, side: Side) -> Result<Vec<String>, Error> {
        match self.refusal {
            Some(c) => Err(Error::Blocked(format!(
                "cannot fence writes on the {side}: {c}. Nothing was changed"
            ))),
            None => Ok(self.warnings.iter().map(|w| w.to_string()).collect()),
        }
    }
}

/// Looks, before anything changes, for what would keep the fence from holding: no trigger right on a
/// table, no PL/pgSQL, no right to create its schema, prepared transactions that could commit later; and
/// for what only slows the switch (sessions the role may not end).
pub async fn preflight(
    client: &Client,
    side: Side,
    relations: &[String],
) -> Result<Preflight, Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text,
                    EXISTS (SELECT 1 FROM pg_language WHERE lanname = 'plpgsql'),
                    has_database_privilege(current_database(), 'CREATE')
                      OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1
                                 AND pg_has_role(nspowner, 'USAGE')),
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                    pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')",
            &[&SCHEMA],
        )
        .await
        .map_err(Error::sql(side, "checking the right to fence writes"))?;
    let (user, db): (String, String) = (row.get(0), row.get(1));
    let (plpgsql, may_create, superuser, may_signal): (bool, bool, bool, bool) =
        (row.get(2), row.get(3), row.get(4), row.get(5));
    let role = crate::ident::quote_ident(&user);
    let mut found = Preflight::default();
    if let Some(w) = signal_warning(&user, superuser, may_signal) {
        found.warnings.push(w);
    }
    if !plpgsql {
        found.refusal = Some(Concern {
            problem: format!(
                "database {db} has no PL/pgSQL, which the fence's trigger is written in"
            ),
            fix: "Run `CREATE EXTENSION plpgsql` there, then the cutover".into(),
        });
        return Ok(found);
    }
    if !may_create {
        found.refusal = Some(Concern {
            problem: format!("role {user} may not create the schema {SCHEMA} that holds the fence"),
            fix: format!(
                "Run `GRANT CREATE ON DATABASE {} TO {role}` as the database owner, then the cutover",
                crate::ident::quote_ident(&db)
            ),
        });
        return Ok(found);
    }
    let denied: Vec<String> = client
        .query(
            "SELECT r FROM unnest($1::text[]) r WHERE NOT has_table_privilege(r::regclass, 'TRIGGER')",
            &[&relations],
        )
        .await
        .map_err(Error::sql(side, "checking the trigger right on the tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !denied.is_empty() {
        let shown: Vec<&str> = denied.iter().take(10).map(String::as_str).collect();
        found.refusal = Some(Concern {
            problem: format!(
                "role {user} may not create triggers on {} table(s) ({}{}), so it could not stop the \
                 application's writes there",
                denied.len(),
                shown.join(", "),
                if denied.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ),
            fix: format!(
                "As each table's owner: `GRANT TRIGGER ON ALL TABLES IN SCHEMA <schema> TO {role}` (or make \
                 {role} a member of the owning role), or run the cutover as the owner"
            ),
        });
        return Ok(found);
    }
    let subs = subscriptions::list(client, side).await?;
    if let Some(c) = subscriptions::refusal(&subs, &user) {
        found.refusal = Some(c);
        return Ok(found);
    }
    let prepared: Vec<String> = client
        .query(
            "SELECT format('''%s'' (%s, prepared at %s)', gid, owner,
                           to_char(prepared, 'YYYY-MM-DD HH24:MI:SS'))
             FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared",
            &[],
        )
        .await
        .map_err(Error::sql(side, "looking for prepared transactions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !prepared.is_empty() {
        found.refusal = Some(Concern {
            problem: format!(
                "database {db} has {} prepared transaction(s), which belong to no session (no pid to end): \
                 {}. They could commit after the fence and their writes would be lost",
                prepared.len(),
                prepared.join(", ")
            ),
            fix: "`COMMIT PREPARED '<gid>'` or `ROLLBACK PREPARED '<gid>'` each (their transaction manager \
                  decides which), then run the cutover"
                .into(),
        });
    }
    Ok(found)
}

/// What the role cannot end, and the fix; `None` when it may end every application session.
pub fn signal_warning(user: &str, superuser: bool, may_signal: bool) -> Option<Concern> {
    let role = crate::ident::quote_ident(user);
    if superuser {
        None
    } else if may_signal {
        Some(Concern {
            problem: format!(
                "role {user} cannot end superusers' sessions at the fence; the fence refuses their writes \
                 all the same"
            ),
            fix: "To end them too, run the cutover as a superuser".into(),
        })
    } else {
        Some(Concern {
            problem: format!(
                "role {user} cannot end other roles' sessions at the fence (it is not a member of \
                 pg_signal_backend): the fence refuses their writes all the same, but pools find out only \
                 at their next write, so the switch is slower"
            ),
            fix: format!(
                "`GRANT pg_signal_backend TO {role}` (RDS's rds_superuser and Neon's neon_superuser have it)"
            ),
        })
    }
}

/// Creates (or brings up to date) the fence's schema with its flags down: the flags, the pass table, the
/// trigger function; and registers this process's pass. Idempotent, and safe on a fence an interrupted
/// run left raised (the pass is registered before any DDL).
pub async fn prepare(client: &Client, side: Side, notice: &Notice) -> Result<(), Error> {
    let register = |e| Error::sql(side, "registering hikkoshi's pass with the fence")(e);
    pass::admit(client).await.map_err(register)?;
    let message = format!(
        "hikkoshi: the {} of migration {} moved the primary to {}; this database refuses writes",
        notice.step, notice.migration_id, notice.new_primary
    );
    let hint = format!(
        "Connect to {} (the new primary). `hikkoshi rollback` or `hikkoshi clean` lifts this fence.",
        notice.new_primary
    );
    let sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {SCHEMA};
         CREATE SEQUENCE IF NOT EXISTS {SCHEMA}.up;
         CREATE SEQUENCE IF NOT EXISTS {SCHEMA}.ddl;
         CREATE TABLE IF NOT EXISTS {SCHEMA}.pass (hash bytea PRIMARY KEY);
         CREATE TABLE IF NOT EXISTS {SCHEMA}.subscription (name text PRIMARY KEY);
         CREATE OR REPLACE FUNCTION {SCHEMA}.refuse() RETURNS trigger
         LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $hikkoshi$
         BEGIN
             PERFORM pg_advisory_xact_lock_shared({k1}, {k2});
             IF pg_sequence_last_value({flag}) IS NOT NULL THEN
                 IF NOT {passes} THEN
                     RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction', MESSAGE = {message},
                         HINT = {hint};
                 END IF;
             END IF;
             RETURN NULL;
         END
         $hikkoshi$;
         {ddl}",
        k1 = LOCK.0,
        k2 = LOCK.1,
        flag = quote_literal(&format!("{SCHEMA}.up")),
        passes = pass::passes_sql(),
        message = quote_literal(&message),
        hint = quote_literal(&hint),
        ddl = ddl::functions_sql(notice),
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(Error::sql(side, "creating the fence's function"))?;
    pass::admit(client).await.map_err(register)
}

/// Arms the write fence before the pause: a trigger on every relation that lacks one, `ENABLE ALWAYS` where
/// the role owns the table (replica sessions are refused there too). Each table's statements commit on
/// their own; one whose table stays locked by the application's writers is tried again until `deadline`,
/// and then named. Returns a warning for the tables where replica sessions would pass.
pub async fn arm(
    client: &Client,
    side: Side,
    relations: &[String],
    deadline: Instant,
) -> Result<Option<String>, Error> {
    let not_owned: Vec<String> = client
        .query(
            "SELECT r FROM unnest($1::text[]) r
             WHERE NOT pg_has_role((SELECT relowner FROM pg_class WHERE oid = r::regclass), 'USAGE')",
            &[&relations],
        )
        .await
        .map_err(Error::sql(side, "reading the tables' owners"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut todo = unfenced(client, side, relations).await?;
    while !todo.is_empty() {
        let waited = per_table(client, &todo, |r| {
            let create = format!(
                "CREATE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {r} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.refuse()"
            );
            if not_owned.iter().any(|n| n == r) {
                create
            } else {
                format!("{create}; ALTER TABLE {r} ENABLE ALWAYS TRIGGER {TRIGGER}")
            }
        })
        .await
        .map_err(Error::sql(side, "creating the fence's triggers"))?;
        if !waited.is_empty() && Instant::now() > deadline {
            let holders = writers_holding(client, &waited).await;
            return Err(Error::Blocked(format!(
                "cannot fence writes on the {side}: the application kept {} table(s) locked ({}) \
                     longer than the cutover's --timeout, so the fence could not be armed there{holders}. \
                     Nothing was fenced: the {side} is the primary as before. End those transactions, or \
                     raise --timeout, and run the cutover again",
                waited.len(),
                waited
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        todo = waited;
    }
    Ok((!not_owned.is_empty()).then(|| {
        format!(
            "the fence on the {side} cannot refuse replica-mode sessions (`session_replication_role = \
             replica`, which only a superuser or a role granted SET on it may use) on {} table(s) the \
             cutover's role does not own ({}{}): only the owner may make a trigger fire for them. Run the \
             cutover as the tables' owner to close that too",
            not_owned.len(),
            not_owned.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if not_owned.len() > 5 { ", …" } else { "" }
        )
    }))
}

/// The relations that do not have the fence's trigger yet.
async fn unfenced(client: &Client, side: Side, relations: &[String]) -> Result<Vec<String>, Error> {
    Ok(client
        .query(
            "SELECT r FROM unnest($1::text[]) WITH ORDINALITY u(r, i)
             WHERE NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = r::regclass AND tgname = $2)
             ORDER BY i",
            &[&relations, &TRIGGER],
        )
        .await
        .map_err(Error::sql(side, "reading the fence's triggers"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Runs one statement per relation, each in its own transaction, pipelined; returns the relations whose
/// statement gave up waiting for a lock (after `TABLE_LOCK_WAIT`, to be tried again). Any other error
/// stops. The commits are asynchronous: the fence marker's synchronous commit flushes them all later.
async fn per_table(
    client: &Client,
    relations: &[String],
    sql: impl Fn(&str) -> String,
) -> Result<Vec<String>, tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "SET synchronous_commit = off; SET lock_timeout = {}",
            TABLE_LOCK_WAIT.as_millis()
        ))
        .await?;
    let waited = each_in_own_transaction(client, relations, sql).await;
    let reset = client
        .batch_execute("RESET lock_timeout; SET synchronous_commit = on")
        .await;
    let waited = waited?;
    reset?;
    Ok(waited)
}

async fn each_in_own_transaction(
    client: &Client,
    relations: &[String],
    sql: impl Fn(&str) -> String,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut waited = Vec::new();
    for batch in relations.chunks(PIPELINE) {
        let statements: Vec<String> = batch.iter().map(|r| sql(r)).collect();
        let results = join_all(statements.iter().map(|s| client.batch_execute(s))).await;
        for (r, result) in batch.iter().zip(results) {
            match result {
                // duplicate_object: made meanwhile by another run
                Ok(()) => {}
                Err(e) if e.code().is_some_and(|c| c.code() == "42710") => {}
                // lock_not_available, deadlock_detected: the application's writers were first
                Err(e)
                    if e.code()
                        .is_some_and(|c| ["55P03", "40P01"].contains(&c.code())) =>
                {
                    waited.push(r.clone())
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(waited)
}

/// The sessions whose transactions write to `relations`, for an error message.
async fn writers_holding(client: &Client, relations: &[String]) -> String {
    // a prepared transaction holds its locks without a session: pg_locks shows it as '-1/<xid>'
    let rows = client
        .query(
            "SELECT DISTINCT coalesce(a.pid, 0), coalesce(a.usename::text, p.owner::text, '?'),
                    coalesce(a.state, '?'),
                    coalesce(to_char(coalesce(a.xact_start, p.prepared), 'HH24:MI:SS'), '?'),
                    coalesce(p.gid, '')
             FROM pg_locks l
             LEFT JOIN pg_stat_activity a ON a.pid = l.pid
             LEFT JOIN pg_prepared_xacts p ON l.pid IS NULL
                                          AND l.virtualtransaction = '-1/' || p.transaction::text
             WHERE l.locktype = 'relation' AND l.granted
               AND l.mode IN ('RowExclusiveLock', 'ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                              'AccessExclusiveLock')
               AND l.relation = ANY (SELECT r::regclass FROM unnest($1::text[]) r)
               AND l.pid IS DISTINCT FROM pg_backend_pid()
             ORDER BY 1 LIMIT 10",
            &[&relations],
        )
        .await
        .unwrap_or_default();
    sessions_text(&rows)
}

fn sessions_text(rows: &[tokio_postgres::Row]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let list: Vec<String> = rows
        .iter()
        .map(|r| {
            let gid: Option<String> = r.try_get(4).ok().filter(|g: &String| !g.is_empty());
            match gid {
                Some(gid) => format!(
                    "the prepared transaction '{gid}' ({}, prepared at {}; it belongs to no session: \
                     `COMMIT PREPARED '{gid}'` or `ROLLBACK PREPARED '{gid}'` ends it)",
                    r.get::<_, String>(1),
                    r.get::<_, String>(3)
                ),
                None => format!(
                    "pid {} ({}, {}, in a transaction since {})",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3)
                ),
            }
        })
        .collect();
    format!(": {}", list.join("; "))
}

/// Raises the armed fence, in the pause: the flag up, the other sessions ended where the role may, then
/// every transaction that wrote a fenced table waited for (at most `wait`). On an error the caller lifts
/// the fence.
pub async fn raise(client: &Client, side: Side, wait: Duration) -> Result<Fence, Error> {
    client
        .batch_execute(&format!("SELECT setval('{SCHEMA}.up', 1, true)"))
        .await
        .map_err(Error::sql(side, "raising the write fence"))?;
    let (ended, warnings) = end_sessions(client, side).await?;
    // Every transaction that passed a trigger before the flag went up holds the lock shared.
    drain(client, side, LOCK.1, wait, "wrote before it").await?;
    let total: usize = ended.values().sum();
    Ok(Fence {
        means: format!(
            "trigger {TRIGGER} refuses writes on every migrated table for every role (flag \
             {SCHEMA}.up); {total} other session(s) ended with pg_terminate_backend"
        ),
        sessions_ended: ended.iter().map(|(r, n)| format!("{r} ({n})")).collect(),
        warnings,
    })
}

/// Takes the advisory lock `(hikf, key)` exclusively and lets it go: granted once every transaction that
/// took it shared (a trigger call before the flag went up) has ended. `what` says what they did.
async fn drain(
    client: &Client,
    side: Side,
    key: i32,
    wait: Duration,
    what: &str,
) -> Result<(), Error> {
    let until = Instant::now() + wait;
    loop {
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let r = client
            .batch_execute(&format!(
                "SET lock_timeout = {}; SELECT pg_advisory_lock({k1}, {key}); \
                 SELECT pg_advisory_unlock({k1}, {key}); RESET lock_timeout",
                left.as_millis(),
                k1 = LOCK.0,
            ))
            .await;
        match r {
            Ok(()) => return Ok(()),
            // a deadlock through a lock outside the fence: the other side was chosen to wait, try again
            Err(e) if e.code().is_some_and(|c| c.code() == "40P01") && Instant::now() < until => {}
            Err(e) if e.code().is_some_and(|c| c.code() == "55P03") => {
                let _ = client.batch_execute("RESET lock_timeout").await;
                let holders = client
                    .query(
                        "SELECT DISTINCT a.pid, coalesce(a.usename::text, '?'), coalesce(a.state, '?'),
                                coalesce(to_char(a.xact_start, 'HH24:MI:SS'), '?')
                         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::int::oid
                           AND l.objid = $2::int::oid AND l.objsubid = 2
                         ORDER BY 1 LIMIT 10",
                        &[&LOCK.0, &key],
                    )
                    .await
                    .unwrap_or_default();
                return Err(Error::Blocked(format!(
                    "the fence on the {side} waited {}s for transactions that {what} to end, and \
                     they did not{}. End them (`SELECT pg_terminate_backend(<pid>)`; granting the cutover's \
                     role pg_signal_backend lets it do so itself) and run the cutover again",
                    wait.as_secs(),
                    sessions_text(&holders)
                )));
            }
            Err(e) => {
                return Err(Error::sql(
                    side,
                    format!("waiting for the transactions that {what}"),
                )(e));
            }
        }
    }
}

/// Ends the other client sessions of the database where the role may; the ones it may not are warned
/// about (the fence holds without it).
async fn end_sessions(
    client: &Client,
    side: Side,
) -> Result<(BTreeMap<String, usize>, Vec<String>), Error> {
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
    let mut ended: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for s in &sessions {
        let (pid, role): (i32, String) = (s.get(0), s.get(1));
        match client
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
        {
            Ok(r) if r.get::<_, bool>(0) => *ended.entry(role).or_default() += 1,
            Ok(_) => {} // gone already
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("42")) => {
                *refused.entry(role).or_default() += 1
            }
            Err(e) => return Err(Error::sql(side, "ending a session")(e)),
        }
    }
    let mut warnings = Vec::new();
    if !refused.is_empty() {
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or_default();
        let list: Vec<String> = refused.iter().map(|(r, n)| format!("{r} ({n})")).collect();
        warnings.push(format!(
            "the fence on the {side} could not end {} session(s) of other roles: {}; their writes are \
             refused by the fence, and their pools reconnect when they find out. `GRANT pg_signal_backend \
             TO {}` lets the next switch end them at once",
            refused.values().sum::<usize>(),
            list.join(", "),
            crate::ident::quote_ident(&user)
        ));
    }
    Ok((ended, warnings))
}

/// Whether a fence is up on this server (the write flag or the DDL flag set).
pub async fn is_raised(client: &Client) -> bool {
    client
        .query_one(
            &format!(
                "SELECT (to_regclass('{SCHEMA}.up') IS NOT NULL
                         AND pg_sequence_last_value(to_regclass('{SCHEMA}.up')) IS NOT NULL)
                     OR (to_regclass('{SCHEMA}.ddl') IS NOT NULL
                         AND pg_sequence_last_value(to_regclass('{SCHEMA}.ddl')) IS NOT NULL)"
            ),
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(false)
}

/// Lifts the fence: the flags first (writes and DDL pass at once), the subscriptions it disabled enabled
/// again (unless `subscriptions` says to leave them: the switch is done and they belong on the new
/// primary), then the triggers, one table per transaction, then the schema. Returns warnings for what was
/// left behind (harmless: the flags are down; `clean` removes them). Nothing to lift is fine.
pub async fn lift(
    client: &Client,
    side: Side,
    subscriptions: subscriptions::AtLift,
) -> Result<Vec<String>, Error> {
    let exists: bool = client
        .query_one(
            &format!("SELECT to_regnamespace('{SCHEMA}') IS NOT NULL"),
            &[],
        )
        .await
        .map_err(Error::sql(side, "looking for the write fence"))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    client
        .batch_execute(&format!(
            "SELECT setval(c.oid::regclass, 1, false) FROM pg_class c
             WHERE c.oid IN (to_regclass('{SCHEMA}.up'), to_regclass('{SCHEMA}.ddl'))"
        ))
        .await
        .map_err(Error::sql(
            side,
            "lifting the write fence (run `SELECT setval('hikkoshi_fence.up', 1, false), setval('hikkoshi_fence.ddl', 1, false)` by hand)",
        ))?;
    let mut warnings = subscriptions::at_lift(client, side, subscriptions).await;
    let fenced: Vec<String> = client
        .query(
            &format!(
                "SELECT t.tgrelid::regclass::text FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                 WHERE p.pronamespace = to_regnamespace('{SCHEMA}') AND t.tgname = $1"
            ),
            &[&TRIGGER],
        )
        .await
        .map_err(Error::sql(side, "listing the fence's triggers"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut left = fenced;
    for _ in 0..3 {
        if left.is_empty() {
            break;
        }
        left = per_table(client, &left, |r| {
            format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {r}")
        })
        .await
        .map_err(Error::sql(side, "dropping the fence's triggers"))?;
    }
    if left.is_empty() {
        let dropped = per_table(client, &[SCHEMA.to_string()], |s| {
            format!("DROP SCHEMA IF EXISTS {s} CASCADE")
        })
        .await;
        let why = match dropped {
            Ok(busy) if busy.is_empty() => None,
            Ok(_) => Some("its tables stayed locked".to_string()),
            Err(e) => Some(crate::error::chain(&e)),
        };
        if let Some(why) = why {
            warnings.push(format!(
                "the fence on the {side} is lifted, but its schema {SCHEMA} stayed ({why}): `hikkoshi \
                 clean` removes it"
            ));
        }
    } else {
        warnings.push(format!(
            "the fence on the {side} is lifted (writes pass), but its trigger stayed on {} busy table(s) \
             ({}): `hikkoshi clean` removes them",
            left.len(),
            left.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_that_may_not_signal_is_told_the_grant() {
        assert_eq!(signal_warning("admin", true, false), None);
        let w = signal_warning("mig rator", false, false).unwrap();
        assert!(
            w.fix.contains("GRANT pg_signal_backend TO \"mig rator\""),
            "{w}"
        );
        let w = signal_warning("migrator", false, true).unwrap();
        assert!(w.problem.contains("superusers' sessions"), "{w}");
    }
}
