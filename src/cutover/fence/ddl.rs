//! The DDL fence: while a switch is under way, the old primary refuses schema changes from every role but
//! hikkoshi's own sessions.
//!
//! Without it (issue 23), a deploy during the switch created tables the write fence did not cover (their
//! rows stayed on the old primary), added columns after the schema was compared, and `ALTER TABLE … DISABLE
//! TRIGGER` by a table's owner took the write fence off its table.
//!
//! Two event triggers, `ENABLE ALWAYS` so that replica-mode sessions fire them too:
//! - `ddl_command_end`: refuses every command that `pg_event_trigger_ddl_commands()` reports on an object
//!   outside `pg_temp` (an application's temporary tables stay allowed: they hold nothing to migrate);
//! - `sql_drop`: refuses every drop of an object that is not temporary (a DROP is not reported at
//!   `ddl_command_end`).
//!
//! Raising an error there aborts the command's transaction, so nothing of it commits. The flag is the
//! sequence `hikkoshi_fence.ddl`, read outside MVCC, and the same advisory-lock handshake as the write fence
//! (key 2): a command that passed its trigger before the flag went up holds the lock shared until its
//! transaction ends, and the raise waits for it, so once `raise` returns every schema change the old primary
//! will ever commit (until the fence is lifted) is committed.
//!
//! It is raised before the switch compares the schema and makes the first part of its proof: from then on
//! the shape of the selected tables cannot change on the old primary, the relations to fence are final,
//! and the pause need not compare the schema again (it once did, and a 1 000-table pause grew sixfold).
//!
//! Creating an event trigger needs a superuser (RDS's rds_superuser, Neon's neon_superuser). Without that
//! right DDL stays open: the switch says so, and compares the schema again in the pause.
//! Commands on shared objects (roles, databases, tablespaces) and on event triggers fire no event trigger.

use std::time::Duration;

use tokio_postgres::Client;

use super::{LOCK, Notice, SCHEMA, drain, pass};
use crate::error::{Error, Side};
use crate::ident::quote_literal;

/// The event triggers' names (global in the database).
const END: &str = "hikkoshi_fence_ddl";
const DROP: &str = "hikkoshi_fence_drop";
/// The second advisory key, for schema changes.
const KEY: i32 = 2;

/// Whether the DDL fence stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DdlFence {
    /// Raised: no schema change can commit on the old primary until the fence is lifted.
    Up,
    /// Not possible here (the reason): DDL stays open.
    Open(String),
}

/// The two event trigger functions (created with the write fence's function, in `prepare`).
pub(super) fn functions_sql(notice: &Notice) -> String {
    let message = format!(
        "hikkoshi: the {} of migration {} to {} is under way; this database refuses schema changes",
        notice.step, notice.migration_id, notice.new_primary
    );
    let hint = format!(
        "Make the change on {} once the switch is done. `hikkoshi rollback` or `hikkoshi clean` lifts this \
         fence.",
        notice.new_primary
    );
    let refuse = format!(
        "PERFORM pg_advisory_xact_lock_shared({k1}, {KEY});
             IF pg_sequence_last_value({flag}) IS NOT NULL THEN
                 IF NOT {passes} THEN
                     RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction', MESSAGE = {message},
                         HINT = {hint};
                 END IF;
             END IF;",
        k1 = LOCK.0,
        flag = quote_literal(&format!("{SCHEMA}.ddl")),
        passes = pass::passes_sql(),
        message = quote_literal(&message),
        hint = quote_literal(&hint),
    );
    format!(
        "CREATE OR REPLACE FUNCTION {SCHEMA}.refuse_ddl() RETURNS event_trigger
         LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $hikkoshi$
         BEGIN
             IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() c
                        WHERE c.schema_name IS DISTINCT FROM 'pg_temp') THEN
                 {refuse}
             END IF;
         END
         $hikkoshi$;
         CREATE OR REPLACE FUNCTION {SCHEMA}.refuse_drop() RETURNS event_trigger
         LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $hikkoshi$
         BEGIN
             IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d WHERE NOT d.is_temporary) THEN
                 {refuse}
             END IF;
         END
         $hikkoshi$;"
    )
}

/// Puts up the DDL fence on a prepared fence (see `prepare`) and waits for the schema changes already under
/// way (at most `wait`); or says why it cannot stand here. On an error the caller lifts the fence.
pub async fn raise(client: &Client, side: Side, wait: Duration) -> Result<DdlFence, Error> {
    if let crate::stream::ddl::capture::Mode::Stop(why) =
        crate::stream::ddl::capture::probe(client).await
    {
        return Ok(DdlFence::Open(format!(
            "{why}: schema changes on the {side} are not refused during the switch"
        )));
    }
    let sql = format!(
        "DO $hikkoshi$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = {end}) THEN
                 CREATE EVENT TRIGGER {END} ON ddl_command_end EXECUTE FUNCTION {SCHEMA}.refuse_ddl();
             END IF;
             IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = {drop}) THEN
                 CREATE EVENT TRIGGER {DROP} ON sql_drop EXECUTE FUNCTION {SCHEMA}.refuse_drop();
             END IF;
         END $hikkoshi$;
         ALTER EVENT TRIGGER {END} ENABLE ALWAYS;
         ALTER EVENT TRIGGER {DROP} ENABLE ALWAYS;
         SELECT setval('{SCHEMA}.ddl', 1, true);",
        end = quote_literal(END),
        drop = quote_literal(DROP),
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(Error::sql(side, "raising the DDL fence"))?;
    drain(client, side, KEY, wait, "changed the schema before it").await?;
    Ok(DdlFence::Up)
}

impl DdlFence {
    /// For the report.
    pub fn describe(&self) -> String {
        match self {
            DdlFence::Up => format!(
                "event triggers {END} and {DROP} refuse CREATE, ALTER and DROP (temporary objects aside) for \
                 every role"
            ),
            DdlFence::Open(why) => why.clone(),
        }
    }
}
