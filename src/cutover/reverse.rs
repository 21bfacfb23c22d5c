//! The reverse stream of `cutover --reverse`: a publication and slot on the new primary, and stream state on
//! the old one, set up in the write pause (before the application can write on the new primary), so that
//! every write there can flow back and `hikkoshi rollback` loses nothing.

use tokio_postgres::Client;

use super::servers::drop_stream;
use crate::error::{Error, Side};
use crate::ident::quote_ident;
use crate::state;
use crate::stream::ddl::capture;
use crate::stream::follow::FollowPlan;

/// The new primary must be able to hold a slot for the reverse stream.
pub(super) async fn preflight(new: &Client) -> Result<(), Error> {
    let row = new
        .query_one(
            "SELECT current_setting('wal_level'),
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_setting('max_replication_slots')::int
                      - (SELECT count(*) FROM pg_replication_slots)::int",
            &[],
        )
        .await
        .map_err(Error::sql(
            Side::Target,
            "checking the target for a reverse stream",
        ))?;
    let (wal_level, may_replicate, free): (String, bool, i32) =
        (row.get(0), row.get(1), row.get(2));
    let mut problems = Vec::new();
    if wal_level != "logical" {
        problems.push(format!(
            "wal_level is {wal_level}: set `wal_level = logical` on the target and restart it"
        ));
    }
    if !may_replicate {
        problems.push(
            "the target's role lacks REPLICATION: `ALTER ROLE <role> REPLICATION` (rds_replication on RDS)"
                .into(),
        );
    }
    if free < 1 {
        problems.push("no free replication slot on the target: raise max_replication_slots".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Blocked(format!(
            "--reverse needs a logical slot on the target, which it cannot have: {}. Nothing was fenced",
            problems.join("; ")
        )))
    }
}

/// Publication, DDL capture and slot on the new primary, stream state on the old one. Returns a warning when
/// DDL on the new primary cannot travel back.
pub(super) async fn set_up(
    ctl: &Client,
    old: &Client,
    new: &Client,
    forward: &FollowPlan,
    plan: &FollowPlan,
) -> Result<Option<String>, Error> {
    let tables: Vec<String> = old
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables
             WHERE pubname = $1 AND schemaname <> 'hikkoshi'",
            &[&forward.publication],
        )
        .await
        .map_err(Error::sql(Side::Source, "reading the publication's tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if tables.is_empty() {
        return Err(Error::Blocked(format!(
            "the publication {} on the source lists no table: nothing to stream back",
            forward.publication
        )));
    }
    new.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {pubname}; CREATE PUBLICATION {pubname} FOR TABLE {} \
         WITH (publish_via_partition_root = true)",
        tables.join(", "),
        pubname = quote_ident(&plan.publication)
    ))
    .await
    .map_err(Error::sql(Side::Target, "creating the reverse publication"))?;
    // every table on the new primary is the migration's: a new one there travels back too
    let everything = crate::plan::Selection {
        include: vec![],
        exclude: vec![],
    };
    let mode = capture::install_on(new, &plan.publication, &everything)
        .await
        .map_err(Error::sql(
            Side::Target,
            "installing the reverse stream's DDL capture",
        ))?;
    let warning = match mode {
        capture::Mode::Capture => None,
        capture::Mode::Stop(why) => Some(format!(
            "the reverse stream does not carry DDL run on the new primary ({}): a table changed \
             there stops it with the difference named, and a rollback refuses while the old primary's \
             schema differs",
            why.replace("source", "new primary")
        )),
    };
    let lsn: String = new
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&plan.slot],
        )
        .await
        .map_err(Error::sql(Side::Target, "creating the reverse slot"))?
        .get(0);
    state::create(old).await.map_err(Error::sql(
        Side::Source,
        "creating the reverse stream's state",
    ))?;
    state::stream::record_reverse(old, ctl, (&plan.slot, &plan.publication), &lsn)
        .await
        .map_err(Error::sql(Side::Source, "recording the reverse stream"))?;
    Ok(warning)
}

/// Removes a reverse stream set up by a cutover that was then undone (best effort: `clean` removes leftovers).
pub(super) async fn drop(ctl: &Client, old: &Client, plan: &FollowPlan) {
    let _ = drop_stream(ctl, Side::Target, &plan.slot, &plan.publication).await;
    let _ = old
        .batch_execute("DROP SCHEMA IF EXISTS hikkoshi CASCADE")
        .await;
}
