//! What the clone makes and fixes around the copy: the stream's publication, the undo of a slot made by a
//! run that failed before it began, materialized views, statistics.

use std::collections::HashSet;
use std::sync::Arc;

use tokio_postgres::Client;

use crate::catalog::Table;
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::ident::QualifiedName;
use crate::replication;
use crate::session;

pub(super) async fn create_publication(
    source: &Client,
    name: &str,
    tables: &[Table],
) -> Result<(), Error> {
    let mut names: Vec<String> = tables
        .iter()
        .map(|t| t.root.as_ref().unwrap_or(&t.name).quoted())
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(Error::Usage(
            "--follow needs at least one selected table".into(),
        ));
    }
    let via_root = source
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 130000",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "reading the server version"))?
        .get::<_, bool>(0);
    source
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {}{}",
            crate::ident::quote_ident(name),
            names.join(", "),
            if via_root {
                " WITH (publish_via_partition_root = true)"
            } else {
                ""
            }
        ))
        .await
        .map_err(Error::sql(Side::Source, "creating the publication"))
}

/// Drops the slot (on the session that made it) and the publication of a following clone that failed
/// before it began.
pub(super) async fn undo_slot(
    snap: replication::ExportedSnapshot,
    source: &Client,
    publication: &str,
) {
    let mut conn = snap.conn;
    if let Err(e) = conn
        .simple_query(&format!(
            "DROP_REPLICATION_SLOT {}",
            crate::ident::quote_ident(&snap.slot)
        ))
        .await
    {
        tracing::warn!(
            "could not drop slot {} ({}): `hikkoshi clean` or pg_drop_replication_slot removes it",
            snap.slot,
            crate::error::chain(&e)
        );
    }
    conn.close().await;
    drop_publication(source, publication).await;
}

/// Drops the publication of a following clone that failed before it began, and its DDL capture.
pub(super) async fn drop_publication(source: &Client, name: &str) {
    let _ = source
        .batch_execute(&crate::stream::ddl::capture::remove_with_publication(name))
        .await;
}

pub(super) async fn all_tables_exist(target: &Client, tables: &[Table]) -> Result<bool, Error> {
    let names: Vec<String> = tables.iter().map(|t| t.name.quoted()).collect();
    Ok(target
        .query_one(
            "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest($1::text[]) n",
            &[&names],
        )
        .await
        .map_err(Error::sql(Side::Target, "checking for tables"))?
        .get::<_, Option<bool>>(0)
        .unwrap_or(true))
}

/// Roles that own objects in the archive on the source and do not exist on the target. The owner column of
/// `pg_restore --list` is empty for some entries (extensions), so a word there is a role only if the source
/// has that role.
pub(super) async fn missing_roles(
    source: &Client,
    target: &Client,
    owners: &HashSet<String>,
) -> Result<Vec<String>, Error> {
    let owners: Vec<&String> = owners.iter().collect();
    let owners: Vec<String> = source
        .query(
            "SELECT o FROM unnest($1::text[]) o WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = o)",
            &[&owners],
        )
        .await
        .map_err(Error::sql(Side::Source, "checking roles"))?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let rows = target
        .query(
            "SELECT o FROM unnest($1::text[]) o WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = o)
             ORDER BY o",
            &[&owners],
        )
        .await
        .map_err(Error::sql(Side::Target, "checking roles"))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Refreshes the copied materialized views on the target in the source's dependency order: the views of
/// one level read only views of earlier levels, so each level's are refreshed `jobs` at a time.
pub(super) async fn refresh_matviews(
    source: &Client,
    (target, tgt_info): (&Client, &ConnInfo),
    matviews: &[QualifiedName],
    jobs: usize,
) -> Result<(), Error> {
    let wanted: Vec<String> = source
        .query(
            "SELECT to_regclass(m)::text FROM unnest($1::text[]) m WHERE to_regclass(m) IS NOT NULL",
            &[&matviews.iter().map(QualifiedName::quoted).collect::<Vec<_>>()],
        )
        .await
        .map_err(Error::sql(Side::Source, "reading materialized views"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // the source's populated ones, in its dependency order (the target has the same definitions)
    let levels = crate::matviews::levels(source, Side::Source).await?;
    for level in levels {
        let mut statements = Vec::new();
        for name in level.into_iter().filter(|n| wanted.contains(n)) {
            let exists: bool = target
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await
                .map_err(Error::sql(Side::Target, "reading materialized views"))?
                .get(0);
            if exists {
                statements.push((
                    format!("REFRESH MATERIALIZED VIEW {name}"),
                    format!("refreshing materialized view {name}"),
                ));
            }
        }
        on_target_in_parallel(tgt_info, jobs, statements).await?;
    }
    Ok(())
}

/// Gathers planner statistics on the copied tables, `jobs` at a time, so the new server plans well at once.
pub(super) async fn analyze(
    tgt_info: &ConnInfo,
    tables: &[Table],
    jobs: usize,
) -> Result<(), Error> {
    let statements = tables
        .iter()
        .map(|t| {
            (
                format!("ANALYZE {}", t.name.quoted()),
                format!("analyzing {}", t.name),
            )
        })
        .collect();
    on_target_in_parallel(tgt_info, jobs, statements).await
}

/// Runs independent statements on the target, `jobs` sessions at a time: (SQL, what it does, for errors).
async fn on_target_in_parallel(
    tgt_info: &ConnInfo,
    jobs: usize,
    statements: Vec<(String, String)>,
) -> Result<(), Error> {
    if statements.is_empty() {
        return Ok(());
    }
    let sessions = jobs.max(1).min(statements.len());
    let queue = Arc::new(std::sync::Mutex::new(statements));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..sessions {
        let queue = queue.clone();
        let info = tgt_info.clone();
        set.spawn(async move {
            let client = session::connect(&info, Side::Target).await?;
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((sql, what)) = next else { break };
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(Error::sql(Side::Target, what))?;
            }
            Ok::<(), Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| Error::Blocked(format!("a task on the target failed: {e}")))??;
    }
    Ok(())
}

/// Owners need CREATE on the schema of what they own (`ALTER … OWNER TO` checks it). A schema that exists on
/// the target before the restore (`public`, owned there by the database's owner, which on the source may
/// have been the owner of everything) may not give it: each owner that lacks it gets it for the restore,
/// and `take_back_create` revokes it after. Returns (schema, role) pairs lent; a schema the target's role
/// may not grant on is left alone (the restore then names what failed).
pub(super) async fn lend_create(
    source: &Client,
    target: &Client,
) -> Result<Vec<(String, String)>, Error> {
    let owners: Vec<(String, String)> = source
        .query(
            "SELECT DISTINCT n.nspname::text, pg_get_userbyid(o.owner)::text FROM (
                 SELECT relnamespace AS nsp, relowner AS owner FROM pg_class
                 WHERE relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
                 UNION SELECT pronamespace, proowner FROM pg_proc
                 UNION SELECT typnamespace, typowner FROM pg_type WHERE typtype IN ('d', 'e', 'r', 'm', 'c')
             ) o JOIN pg_namespace n ON n.oid = o.nsp
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "reading object owners"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut lent = Vec::new();
    for (schema, role) in owners {
        let lacks: bool = target
            .query_one(
                "SELECT to_regnamespace(quote_ident($1)) IS NOT NULL
                        AND EXISTS (SELECT FROM pg_roles WHERE rolname = $2)
                        AND NOT has_schema_privilege($2, quote_ident($1), 'CREATE')",
                &[&schema, &role],
            )
            .await
            .map_err(Error::sql(Side::Target, "checking schema privileges"))?
            .get(0);
        if !lacks {
            continue;
        }
        let grant = format!(
            "GRANT CREATE ON SCHEMA {} TO {}",
            crate::ident::quote_ident(&schema),
            crate::ident::quote_ident(&role)
        );
        match target.batch_execute(&grant).await {
            Ok(()) => lent.push((schema, role)),
            Err(e) => tracing::warn!(
                "cannot let {role} create in schema {schema} for the restore ({})",
                crate::error::chain(&e)
            ),
        }
    }
    Ok(lent)
}

/// Revokes what `lend_create` lent (best effort: each failure is logged with the statement to run).
pub(super) async fn take_back_create(target: &Client, lent: &[(String, String)]) {
    for (schema, role) in lent {
        let revoke = format!(
            "REVOKE CREATE ON SCHEMA {} FROM {}",
            crate::ident::quote_ident(schema),
            crate::ident::quote_ident(role)
        );
        if let Err(e) = target.batch_execute(&revoke).await {
            tracing::warn!(
                "could not take back the CREATE right lent for the restore ({}): run `{revoke}` on the target",
                crate::error::chain(&e)
            );
        }
    }
}
