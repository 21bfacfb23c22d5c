//! Whether the target can hold the source's schema: the pre-data section (extensions, types, collations,
//! functions, tables) restored on the target inside a transaction that is rolled back, each entry in its
//! own savepoint, so that every object the target refuses is named, not only the first (issue 22: `check`
//! said ready, and the clone stopped at the first ICU collation, lz4 column or C function built for
//! another server). Nothing stays on the target.

use tokio_postgres::Client;

use super::{Level, Report};
use crate::conninfo::ConnInfo;
use crate::error::{Error, Side};
use crate::plan::Resolved;
use crate::schema::{self, DumpFilter, DumpTools, script};

/// One object the target refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// `TYPE schema.name`.
    pub object: String,
    pub sqlstate: String,
    pub message: String,
}

/// What to do about a refused object, from its SQLSTATE and message (pure).
pub fn fix_for(r: &Refused) -> String {
    let m = r.message.to_lowercase();
    if m.contains("icu") {
        "the target's PostgreSQL was built without ICU: use a build with ICU (the packages of your \
         distribution and managed services have it), or use a libc collation for it on the source"
            .into()
    } else if m.contains("lz4") || m.contains("zstd") {
        "the target's PostgreSQL was built without that compression method: use a build with it, or run \
         `ALTER TABLE … ALTER COLUMN … SET COMPRESSION pglz` on the source (new values only; `VACUUM FULL` \
         rewrites the old ones)"
            .into()
    } else if r.sqlstate == "58P01"
        || m.contains("could not access file")
        || m.contains("could not load library")
        || m.contains("incompatible library")
        || m.contains("$libdir")
    {
        "a C library the target does not have: install the extension or library on the target (built for \
         its major version), or drop what uses it on the source, or leave out the tables that use it with \
         --exclude"
            .into()
    } else if m.contains("xml") && (m.contains("support") || m.contains("feature")) {
        "the target's PostgreSQL was built without libxml: use a build with it, or store those values as \
         text on the source"
            .into()
    } else if m.contains("extension") && (m.contains("version") || m.contains("control file")) {
        "install the extension (in that version) on the target, or `ALTER EXTENSION … UPDATE` on the source \
         to a version the target has"
            .into()
    } else if matches!(r.sqlstate.as_str(), "42704" | "42P01" | "42883" | "3F000") {
        "it depends on an object refused above: it goes once that one is fixed".into()
    } else {
        "change the object on the source so that the target's major accepts it, or leave out the tables \
         that use it with --exclude"
            .into()
    }
}

/// Restores `pre` (a filtered pre-data script) entry by entry in a transaction that is rolled back, and
/// returns every entry the target refused.
pub async fn rehearse(target: &Client, pre: &str) -> Result<Vec<Refused>, Error> {
    let entries = script::entries(pre);
    target
        .batch_execute("BEGIN")
        .await
        .map_err(Error::sql(Side::Target, "starting the schema rehearsal"))?;
    let mut refused = Vec::new();
    let mut failure = None;
    for e in &entries {
        let sql = format!("{}\n{}", e.settings.join("\n"), e.sql);
        let tried = async {
            target.batch_execute("SAVEPOINT hikkoshi_check").await?;
            match target.batch_execute(&sql).await {
                Ok(()) => target
                    .batch_execute("RELEASE SAVEPOINT hikkoshi_check")
                    .await
                    .map(|_| None),
                Err(err) => {
                    target
                        .batch_execute("ROLLBACK TO SAVEPOINT hikkoshi_check")
                        .await?;
                    Ok(Some(err))
                }
            }
        }
        .await;
        match tried {
            Ok(None) => {}
            Ok(Some(err)) => refused.push(Refused {
                object: format!("{} {}", e.kind, e.name),
                sqlstate: err.code().map(|c| c.code().to_string()).unwrap_or_default(),
                message: err
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| crate::error::chain(&err)),
            }),
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    let _ = target.batch_execute("ROLLBACK").await;
    match failure {
        Some(e) => Err(Error::sql(Side::Target, "rehearsing the schema restore")(e)),
        None => Ok(refused),
    }
}

/// The schema step, rehearsed: a finding per refused object (a blocker: the clone's pre-data restore is
/// all or nothing), or one that says the target holds it all.
pub(super) async fn pre_data(
    r: &mut Report,
    (src_info, tgt_info): (&ConnInfo, &ConnInfo),
    target: &Client,
    resolved: &Resolved,
    tools: &DumpTools,
) -> Result<(), Error> {
    let archive = schema::dump(
        tools,
        src_info,
        None,
        &DumpFilter {
            excluded: &resolved.excluded,
        },
    )
    .await?;
    let pre = schema::script(tools, &archive, "pre-data", tgt_info).await?;
    let refused = rehearse(target, &pre).await?;
    if refused.is_empty() {
        r.add(
            Level::Ok,
            "schema",
            Some(Side::Target),
            "the target holds the source's whole schema (pre-data restored in a transaction that was \
             rolled back)",
            None,
        );
        return Ok(());
    }
    // every one: each is something to decide about (the regression database has about 60)
    const SHOWN: usize = 500;
    for x in refused.iter().take(SHOWN) {
        r.add(
            Level::Blocker,
            "schema",
            Some(Side::Target),
            format!("the target refuses {}: {}", x.object, x.message),
            Some(fix_for(x)),
        );
    }
    if refused.len() > SHOWN {
        r.add(
            Level::Blocker,
            "schema",
            Some(Side::Target),
            format!(
                "and {} more object(s) the target refuses",
                refused.len() - SHOWN
            ),
            None,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sqlstate: &str, message: &str) -> Refused {
        Refused {
            object: "COLLATION public.x".into(),
            sqlstate: sqlstate.into(),
            message: message.into(),
        }
    }

    #[test]
    fn each_kind_of_refusal_gets_its_own_fix() {
        assert!(fix_for(&refused("0A000", "ICU is not supported in this build")).contains("ICU"));
        assert!(
            fix_for(&refused("0A000", "compression method lz4 not supported"))
                .contains("SET COMPRESSION")
        );
        assert!(
            fix_for(&refused(
                "58P01",
                "could not access file \"/x/regress.so\": No such file"
            ))
            .contains("C library")
        );
        assert!(
            fix_for(&refused(
                "XX000",
                "could not load library \"/x/regress.so\": undefined symbol: pg_char_to_encoding"
            ))
            .contains("C library")
        );
        assert!(
            fix_for(&refused("0A000", "unsupported XML feature")).contains("libxml"),
            "xml"
        );
        assert!(fix_for(&refused("42704", "type \"x\" does not exist")).contains("refused above"));
        assert!(fix_for(&refused("42601", "syntax error")).contains("--exclude"));
    }
}
