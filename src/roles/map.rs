//! `--role-map OLD=NEW`: a carried role takes another name on the target. It is created and restored under
//! its source name, then renamed once everything it owns is there.

use tokio_postgres::Client;

use super::{SourceRoles, TargetSide};
use crate::error::{Error, Side};
use crate::ident::quote_ident;

/// Parses `--role-map OLD=NEW` (the first `=` separates them).
pub fn role_map(specs: &[String]) -> Result<Vec<(String, String)>, Error> {
    let mut map: Vec<(String, String)> = Vec::new();
    for spec in specs {
        let Some((old, new)) = spec
            .split_once('=')
            .filter(|(o, n)| !o.is_empty() && !n.is_empty())
        else {
            return Err(Error::Usage(format!(
                "--role-map takes OLD=NEW (a source role and its name on the target), not {spec:?}"
            )));
        };
        if map.iter().any(|(o, n)| o == old || n == new) {
            return Err(Error::Usage(format!(
                "--role-map {spec}: a role is renamed twice, or two roles get one name"
            )));
        }
        map.push((old.to_string(), new.to_string()));
    }
    Ok(map)
}

/// Checks a role map against the roles to carry and the target: each renamed role is carried and missing
/// on the target under both names (it is created under its own name, restored, then renamed).
pub fn check_map(
    map: &[(String, String)],
    source: &SourceRoles,
    target: &TargetSide,
    created_earlier: &[String],
) -> Result<(), Error> {
    for (old, new) in map {
        if !source.roles.iter().any(|r| &r.name == old) {
            return Err(Error::Usage(format!(
                "--role-map {old}={new}: {old} owns or is granted nothing the clone restores (roles it \
                 carries: {})",
                source
                    .roles
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for name in [old, new] {
            if target.existing.contains_key(name) && !created_earlier.contains(name) {
                return Err(Error::Usage(format!(
                    "--role-map {old}={new}: role {name} exists on the target already; rename it there, \
                     or map to a name the target does not have"
                )));
            }
        }
    }
    Ok(())
}

/// Renames the mapped roles on the target, once everything they own is restored (a rename keeps
/// ownership, grants, memberships and a SCRAM verifier; PostgreSQL clears an md5 one).
pub async fn rename(target: &Client, map: &[(String, String)]) -> Result<(), Error> {
    for (old, new) in map {
        let exists: bool = target
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)",
                &[old],
            )
            .await
            .map_err(Error::sql(Side::Target, "looking for a role"))?
            .get(0);
        if !exists {
            continue; // renamed by an earlier run
        }
        target
            .batch_execute(&format!(
                "ALTER ROLE {} RENAME TO {}",
                quote_ident(old),
                quote_ident(new)
            ))
            .await
            .map_err(Error::sql(
                Side::Target,
                format!("renaming role {old} to {new}"),
            ))?;
        tracing::info!("role {old} is {new} on the target (--role-map)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::Password;
    use crate::roles::plan::tests::{rds_master, role};

    #[test]
    fn a_role_map_renames_carried_roles_only_to_free_names() {
        let map = role_map(&["readers=shop readers".into(), "a=b=c".into()]).unwrap();
        assert_eq!(
            map,
            vec![
                ("readers".to_string(), "shop readers".to_string()),
                ("a".to_string(), "b=c".to_string())
            ]
        );
        for bad in ["readers", "=x", "x=", "readers=a"] {
            let specs = vec!["readers=shop".to_string(), bad.to_string()];
            assert!(matches!(role_map(&specs), Err(Error::Usage(_))), "{bad}");
        }
        let src = SourceRoles {
            roles: vec![role("readers", false, Password::None)],
            ..Default::default()
        };
        let mut t = rds_master(16);
        let ok = vec![("readers".to_string(), "shop".to_string())];
        check_map(&ok, &src, &t, &[]).unwrap();
        let unknown = vec![("writers".to_string(), "shop".to_string())];
        assert!(matches!(
            check_map(&unknown, &src, &t, &[]),
            Err(Error::Usage(_))
        ));
        t.existing.insert("shop".into(), [false; 7]);
        assert!(matches!(
            check_map(&ok, &src, &t, &[]),
            Err(Error::Usage(_))
        ));
        // a role this migration created earlier (a resumed clone) is no obstacle
        t.existing.remove("shop");
        t.existing.insert("readers".into(), [false; 7]);
        check_map(&ok, &src, &t, &["readers".to_string()]).unwrap();
    }
}
