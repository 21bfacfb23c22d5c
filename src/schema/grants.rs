//! Schemas' grants, which the restore cannot carry for one schema: `public`. The target has its own public
//! schema already (owned by `pg_database_owner` on 15+, by the bootstrap superuser before), so the restore
//! leaves its entries out (see `without_public`), and with them the source's `GRANT ALL ON SCHEMA public
//! TO PUBLIC` (PostgreSQL 15 no longer gives CREATE there by default): the application, which created tables
//! in public on the source, could not on the target, and nothing said so (issue 22).
//!
//! After the pre-data restore, the grants the source's public schema has and the target's lacks are given
//! on the target; one the target's role may not give (it does not own the schema) is returned as a warning
//! with the statement to run as the owner. `verify` compares every schema's grants.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use crate::error::{Error, Side};
use crate::ident::quote_ident;

/// Each user schema's grants to roles other than its owner, as `grantee=PRIVILEGE` (`PUBLIC` for public).
pub async fn schema_grants(
    client: &Client,
    side: Side,
) -> Result<BTreeMap<String, BTreeSet<String>>, Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text,
                    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END
                    || '=' || a.privilege_type
             FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a
             WHERE a.grantee <> n.nspowner
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi', 'hikkoshi_fence')
               AND n.nspname NOT LIKE 'pg\\_%'",
            &[],
        )
        .await
        .map_err(Error::sql(side, "reading the schemas' grants"))?;
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in rows {
        out.entry(r.get(0)).or_default().insert(r.get(1));
    }
    Ok(out)
}

/// The grants on schema public that the source has and the target lacks (pure).
pub fn missing_on_public(
    source: &BTreeMap<String, BTreeSet<String>>,
    target: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let empty = BTreeSet::new();
    let have = target.get("public").unwrap_or(&empty);
    source
        .get("public")
        .unwrap_or(&empty)
        .iter()
        .filter(|g| !have.contains(*g))
        .cloned()
        .collect()
}

/// `GRANT … ON SCHEMA public TO …` for a `grantee=PRIVILEGE` pair.
fn grant_sql(grant: &str) -> Option<String> {
    let (who, what) = grant.split_once('=')?;
    let who = if who == "PUBLIC" {
        "PUBLIC".to_string()
    } else {
        quote_ident(who)
    };
    Some(format!("GRANT {what} ON SCHEMA public TO {who}"))
}

/// Gives on the target the grants on schema public that the source has; returns what could not be given,
/// with the statement to run.
pub async fn carry_public(source: &Client, target: &Client) -> Result<Vec<String>, Error> {
    let (a, b) = futures_util::future::join(
        schema_grants(source, Side::Source),
        schema_grants(target, Side::Target),
    )
    .await;
    let mut warnings = Vec::new();
    for grant in missing_on_public(&a?, &b?) {
        let Some(sql) = grant_sql(&grant) else {
            continue;
        };
        if let Err(e) = target.batch_execute(&sql).await {
            warnings.push(format!(
                "the source's `{sql}` is not carried to the target ({}): the target's role does not own its \
                 schema public. Run it there as the schema's owner (pg_database_owner's member, the database \
                 owner) if the application needs it",
                crate::error::chain(&e)
            ));
        }
    }
    Ok(warnings)
}

/// Every schema's grants compared, through `renamed` (source name → target name), in words (for `verify`).
pub fn differences(
    source: &BTreeMap<String, BTreeSet<String>>,
    target: &BTreeMap<String, BTreeSet<String>>,
    renamed: &[(String, String)],
) -> Vec<String> {
    let map = |g: &String| -> String {
        match g.split_once('=') {
            Some((who, what)) => {
                let who = renamed
                    .iter()
                    .find(|(o, _)| o == who)
                    .map(|(_, n)| n.as_str())
                    .unwrap_or(who);
                format!("{who}={what}")
            }
            None => g.clone(),
        }
    };
    let empty = BTreeSet::new();
    let mut out = Vec::new();
    for schema in source.keys().chain(target.keys()).collect::<BTreeSet<_>>() {
        let a: BTreeSet<String> = source
            .get(schema)
            .unwrap_or(&empty)
            .iter()
            .map(map)
            .collect();
        let b = target.get(schema).unwrap_or(&empty);
        for g in a.difference(b) {
            out.push(format!(
                "schema {schema}: the grant {g} is on the source only"
            ));
        }
        for g in b.difference(&a) {
            out.push(format!(
                "schema {schema}: the grant {g} is on the target only"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(v: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        v.iter()
            .map(|(s, g)| (s.to_string(), g.iter().map(|x| x.to_string()).collect()))
            .collect()
    }

    #[test]
    fn public_create_granted_on_the_source_is_missing_on_a_15_target() {
        let source = grants(&[
            ("public", &["PUBLIC=USAGE", "PUBLIC=CREATE"]),
            ("app", &["reader=USAGE"]),
        ]);
        let target = grants(&[("public", &["PUBLIC=USAGE"]), ("app", &["reader=USAGE"])]);
        assert_eq!(
            missing_on_public(&source, &target),
            vec!["PUBLIC=CREATE".to_string()]
        );
        assert_eq!(
            grant_sql("PUBLIC=CREATE").unwrap(),
            "GRANT CREATE ON SCHEMA public TO PUBLIC"
        );
        let said = differences(&source, &target, &[]);
        assert_eq!(
            said,
            vec!["schema public: the grant PUBLIC=CREATE is on the source only"]
        );
    }

    #[test]
    fn renamed_grantees_are_the_same_grant() {
        let source = grants(&[("app", &["reader=USAGE"])]);
        let target = grants(&[("app", &["reader2=USAGE"])]);
        let renamed = [("reader".to_string(), "reader2".to_string())];
        assert!(differences(&source, &target, &renamed).is_empty());
        assert_eq!(differences(&source, &target, &[]).len(), 2);
    }
}
