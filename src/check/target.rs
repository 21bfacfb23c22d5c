//! The target's findings, and what both sides must agree on: extensions, encodings and collations, logical
//! decoding for the cutover's proof, an empty target with the rights the clone needs.

use tokio_postgres::Client;

use super::{Level, Report};
use crate::catalog::Table;
use crate::error::{Error, Side};

pub(super) async fn extensions(
    r: &mut Report,
    source: &Client,
    target: &Client,
) -> Result<(), Error> {
    let used: Vec<(String, String)> = source
        .query(
            "SELECT extname::text, extversion FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "listing extensions"))?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut ok = Vec::new();
    for (name, version) in &used {
        let avail = target
            .query_opt(
                "SELECT default_version, installed_version FROM pg_available_extensions WHERE name = $1",
                &[name],
            )
            .await
            .map_err(Error::sql(Side::Target, "listing available extensions"))?;
        match avail {
            None => r.add(
                Level::Blocker,
                "extensions",
                Some(Side::Target),
                format!(
                    "extension {name} ({version} on the source) is not available on the target: the \
                     schema step would fail on its first use"
                ),
                Some(if name == "vector" {
                    "install pgvector on the target (Debian/Ubuntu: apt install postgresql-<version>-pgvector; \
                     Amazon RDS and most clouds ship it: it is then available to CREATE EXTENSION)"
                        .into()
                } else {
                    format!(
                        "install the {name} extension's package on the target server (it must appear in \
                         pg_available_extensions), or exclude the tables that use it"
                    )
                }),
            ),
            Some(row) => {
                let default: String = row.get(0);
                if version_lt(&default, version) {
                    r.add(
                        Level::Warning,
                        "extensions",
                        Some(Side::Target),
                        format!(
                            "extension {name}: source has {version}, the target offers {default}: objects of \
                             the newer version may not restore"
                        ),
                        Some(format!("install {name} {version} or newer on the target")),
                    );
                } else {
                    ok.push(format!("{name} {version}"));
                }
            }
        }
    }
    if used.is_empty() {
        r.add(
            Level::Ok,
            "extensions",
            None,
            "the source uses no extension besides plpgsql",
            None,
        );
    } else if !ok.is_empty() {
        r.add(
            Level::Ok,
            "extensions",
            Some(Side::Target),
            format!("available on the target: {}", ok.join(", ")),
            None,
        );
    }
    Ok(())
}

/// Compares dotted versions numerically ("0.8.0" < "0.10.1").
fn version_lt(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> {
        v.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    parse(a) < parse(b)
}

pub(super) async fn encodings(
    r: &mut Report,
    source: &Client,
    target: &Client,
) -> Result<(), Error> {
    // the locale provider (libc or ICU) changes ordering as much as the collation name; before 15 there is
    // no column for it and it is always libc
    let q = "SELECT pg_encoding_to_char(encoding), datcollate,
                    datctype || ' (' || CASE WHEN current_setting('server_version_num')::int >= 150000
                                             THEN to_jsonb(d) ->> 'datlocprovider' ELSE 'c' END || ')'
             FROM pg_database d WHERE datname = current_database()";
    let s = source
        .query_one(q, &[])
        .await
        .map_err(Error::sql(Side::Source, "reading the encoding"))?;
    let t = target
        .query_one(q, &[])
        .await
        .map_err(Error::sql(Side::Target, "reading the encoding"))?;
    let (se, te): (String, String) = (s.get(0), t.get(0));
    if se != te {
        r.add(
            Level::Blocker,
            "encoding",
            Some(Side::Target),
            format!("the source database is {se}, the target {te}: text may not convert, or convert wrongly"),
            Some(format!(
                "create the target database with ENCODING '{se}' (CREATE DATABASE ... ENCODING '{se}' \
                 TEMPLATE template0)"
            )),
        );
    } else {
        r.add(Level::Ok, "encoding", None, format!("both {se}"), None);
    }
    let (sc, tc): (String, String) = (s.get(1), t.get(1));
    let (sk, tk): (String, String) = (s.get(2), t.get(2));
    if sc != tc || sk != tk {
        r.add(
            Level::Warning,
            "collation",
            Some(Side::Target),
            format!(
                "collation or locale provider differs (source {sc}/{sk}, target {tc}/{tk}; c = libc, i = \
                 ICU): text ordering, and so indexes, range queries and uniqueness under case-insensitive \
                 collations, may behave differently"
            ),
            Some(format!(
                "create the target database with LC_COLLATE '{sc}' LC_CTYPE '{sk}' TEMPLATE template0, \
                 unless the change is intended"
            )),
        );
    } else {
        r.add(
            Level::Ok,
            "collation",
            None,
            format!("both {sc}/{sk}"),
            None,
        );
    }
    Ok(())
}

/// Whether `cutover` can verify before its write fence (see docs/cutover.md, "The proof in two parts"):
/// both servers 14+, and the target able to stream its own changes. Without it the cutover still works, but
/// hashes the streamed tables inside its write pause.
pub(super) async fn cutover_proof(
    r: &mut Report,
    (source_major, target_major): (u32, u32),
    target: &Client,
) -> Result<(), Error> {
    let row = target
        .query_one(
            "SELECT current_setting('wal_level'),
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)
                    OR EXISTS (SELECT 1 FROM pg_auth_members m
                               JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member
                               WHERE g.rolname = 'rds_replication' AND u.rolname = current_user)",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Target, "reading replication settings"))?;
    let (wal_level, can_replicate): (String, bool) = (row.get(0), row.get(1));
    let mut missing = Vec::new();
    if source_major < 14 || target_major < 14 {
        missing.push(format!(
            "PostgreSQL 14 or later on both servers (source {source_major}, target {target_major})"
        ));
    }
    if wal_level != "logical" {
        missing.push(format!(
            "wal_level = logical on the target (it is {wal_level}; RDS: rds.logical_replication = 1)"
        ));
    }
    if !can_replicate {
        missing.push(
            "the REPLICATION attribute for this role on the target (RDS: GRANT rds_replication)"
                .into(),
        );
    }
    if missing.is_empty() {
        r.add(
            Level::Ok,
            "cutover proof",
            Some(Side::Target),
            "the cutover can hash the tables before its write fence and compare only the rows changed \
             since inside it",
            None,
        );
    } else {
        r.add(
            Level::Warning,
            "cutover proof",
            Some(Side::Target),
            "the cutover will hash the streamed tables inside its write pause (seconds per GB), not \
             before its fence",
            Some(format!("for a sub-second pause: {}", missing.join("; "))),
        );
    }
    Ok(())
}

/// The target: empty (or a migration to resume), the rights the clone needs; the source: hikkoshi's
/// leftovers of other migrations.
pub(super) async fn target_state(
    r: &mut Report,
    source: &Client,
    target: &Client,
    tables: &[Table],
) -> Result<(), Error> {
    target_tables(r, target, tables).await?;
    target_privileges(r, target).await?;
    leftovers(r, source).await
}

/// None of the selected tables exists on the target, unless it holds a migration to resume.
async fn target_tables(r: &mut Report, target: &Client, tables: &[Table]) -> Result<(), Error> {
    let names: Vec<String> = tables.iter().map(|t| t.name.quoted()).collect();
    let mut existing: Vec<String> = Vec::new();
    for (t, quoted) in tables.iter().zip(&names) {
        let found = target
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[quoted])
            .await
            .map_err(Error::sql(Side::Target, "looking for existing tables"))?
            .get::<_, bool>(0);
        if found {
            let rows: bool = target
                .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {quoted})"), &[])
                .await
                .map_err(Error::sql(Side::Target, "looking for existing rows"))?
                .get(0);
            existing.push(format!(
                "{} ({})",
                t.name,
                if rows { "has rows" } else { "empty" }
            ));
            if existing.len() > 10 {
                break;
            }
        }
    }
    let has_state = crate::state::exists(target)
        .await
        .map_err(Error::sql(Side::Target, "looking for hikkoshi state"))?;
    if has_state {
        r.add(
            Level::Ok,
            "target",
            Some(Side::Target),
            "holds a hikkoshi migration: `clone` resumes it (`hikkoshi status` shows where it is)",
            None,
        );
    } else if existing.is_empty() {
        r.add(
            Level::Ok,
            "target",
            Some(Side::Target),
            "none of the selected tables exists on the target",
            None,
        );
    } else {
        r.add(
            Level::Blocker,
            "target",
            Some(Side::Target),
            format!(
                "the target already has table(s) that the clone would create: {}{}",
                existing.iter().take(10).cloned().collect::<Vec<_>>().join(", "),
                if existing.len() > 10 { ", ..." } else { "" }
            ),
            Some("hikkoshi clones into an empty database: use a new one (CREATE DATABASE ...), drop these \
                  tables, or leave them out with --exclude"
                .into()),
        );
    }
    Ok(())
}

/// CREATE on the database, and `session_replication_role` for the applier.
async fn target_privileges(r: &mut Report, target: &Client) -> Result<(), Error> {
    let rights = target
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE'),
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                    OR (current_setting('server_version_num')::int >= 150000
                        AND has_parameter_privilege('session_replication_role', 'SET')),
                    current_user",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Target, "checking privileges"))?;
    let user: String = rights.get(2);
    if rights.get::<_, bool>(0) {
        r.add(
            Level::Ok,
            "target privileges",
            Some(Side::Target),
            format!("{user} may create schemas"),
            None,
        );
    } else {
        r.add(
            Level::Blocker,
            "target privileges",
            Some(Side::Target),
            format!("{user} may not create schemas in this database"),
            Some(format!(
                "GRANT CREATE ON DATABASE <target database> TO {user};"
            )),
        );
    }
    if !rights.get::<_, bool>(1) {
        r.add(
            Level::Warning,
            "target privileges",
            Some(Side::Target),
            format!(
                "{user} may not set session_replication_role: the target's triggers will fire for streamed \
                 changes (they ran on the source already)"
            ),
            Some(format!(
                "GRANT SET ON PARAMETER session_replication_role TO {user}; (PostgreSQL 15+; on RDS the \
                 rds_superuser can)"
            )),
        );
    }
    Ok(())
}

/// hikkoshi slots and publications on the source that belong to no running migration.
async fn leftovers(r: &mut Report, source: &Client) -> Result<(), Error> {
    let leftovers: Vec<(String, bool)> = source
        .query(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_name LIKE 'hikkoshi\\_%'
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "listing replication slots"))?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let publications: Vec<String> = source
        .query(
            "SELECT pubname::text FROM pg_publication WHERE pubname LIKE 'hikkoshi\\_%' ORDER BY 1",
            &[],
        )
        .await
        .map_err(Error::sql(Side::Source, "listing publications"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !publications.is_empty() {
        r.add(
            Level::Warning,
            "leftovers",
            Some(Side::Source),
            format!("hikkoshi publication(s) on the source: {}", publications.join(", ")),
            Some(
                "if their migration is over or abandoned: `hikkoshi clean --source ... --target <its \
                 target>`, or DROP PUBLICATION <name>;"
                    .into(),
            ),
        );
    }
    if !leftovers.is_empty() {
        let inactive: Vec<&str> = leftovers
            .iter()
            .filter(|(_, a)| !a)
            .map(|(n, _)| n.as_str())
            .collect();
        r.add(
            Level::Warning,
            "leftovers",
            Some(Side::Source),
            format!(
                "hikkoshi slot(s) on the source: {} ({} inactive: an inactive slot holds WAL back)",
                leftovers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                inactive.len()
            ),
            Some(
                "if their migration is over or abandoned: `hikkoshi clean --source ... --target <its \
                 target>`, or SELECT pg_drop_replication_slot('<name>');"
                    .into(),
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::version_lt;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_lt("0.8.0", "0.10.1"));
        assert!(!version_lt("1.2", "1.2"));
        assert!(version_lt("1.2", "1.2.1"));
    }
}
