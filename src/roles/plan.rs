//! The plan: the statements that carry the roles, computed from what both servers say (pure, so each
//! case is a unit test), with what each does as it may be shown (never a verifier).

use super::{GivenPassword, Membership, Password, SourceRole, SourceRoles, TargetSide, scram};
use crate::ident::{quote_ident, quote_literal};

/// One statement of the plan: its SQL (which may hold a verifier: never shown) and what it does, as shown.
#[derive(Clone)]
pub struct Step {
    pub sql: String,
    pub says: String,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.says)
    }
}

/// What carrying the roles will do.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Attributes dropped, differences of existing roles, verifiers not copied: one line each.
    pub notices: Vec<String>,
    /// LOGIN roles that cannot log in on the target (created NOLOGIN: no verifier and no password given).
    pub cannot_log_in: Vec<String>,
    /// Roles created by the plan.
    pub created: Vec<String>,
}

/// The statements that carry `source` to `target` (pure: unit-tested below).
pub fn plan(source: &SourceRoles, target: &TargetSide, given: &[GivenPassword]) -> Plan {
    let mut p = Plan::default();
    for r in &source.roles {
        let given = given.iter().find(|g| g.role == r.name);
        match target.existing.get(&r.name) {
            Some(have) => keep(&mut p, r, have, given),
            None => create(&mut p, r, target, given),
        }
    }
    memberships(&mut p, source, target);
    settings(&mut p, source, target);
    for g in &source.database_grants {
        p.steps.push(Step {
            sql: format!(
                "GRANT {} ON DATABASE {} TO {}",
                g.privilege,
                quote_ident(&target.database),
                quote_ident(&g.grantee)
            ),
            says: format!("grant {} on the database to {}", g.privilege, g.grantee),
        });
    }
    p
}

/// A role the target has already: kept as it is (differences named), a given password set.
fn keep(p: &mut Plan, r: &SourceRole, have: &[bool; 7], given: Option<&GivenPassword>) {
    existing_differences(p, r, have);
    if let Some(g) = given {
        p.steps.push(Step {
            sql: format!(
                "ALTER ROLE {} PASSWORD {}",
                quote_ident(&r.name),
                quote_literal(&scram(&g.password))
            ),
            says: format!("set the password of role {} (--role-password)", r.name),
        });
    }
}

/// The attributes of `r` the target's role may give, and those it may not.
fn attributes<'a>(r: &SourceRole, target: &TargetSide) -> (Vec<String>, Vec<&'a str>) {
    let mut attrs: Vec<String> = Vec::new();
    let mut dropped: Vec<&str> = Vec::new();
    // REPLICATION and BYPASSRLS: a superuser's to give, or (16+) a CREATEROLE role's that has them
    let grantable = |admin_has: bool| {
        target.superuser || (admin_has && target.createrole && target.version >= 16)
    };
    for (has, name, may) in [
        (r.superuser, "SUPERUSER", target.superuser),
        (
            r.createdb,
            "CREATEDB",
            target.superuser || (target.createrole && (target.createdb || target.version < 16)),
        ),
        (
            r.createrole,
            "CREATEROLE",
            target.superuser || target.createrole,
        ),
        (r.replication, "REPLICATION", grantable(target.replication)),
        (r.bypassrls, "BYPASSRLS", grantable(target.bypassrls)),
    ] {
        if has {
            if may {
                attrs.push(name.to_string());
            } else {
                dropped.push(name);
            }
        }
    }
    if !r.inherit {
        attrs.push("NOINHERIT".into());
    }
    if r.connection_limit >= 0 {
        attrs.push(format!("CONNECTION LIMIT {}", r.connection_limit));
    }
    if let Some(v) = &r.valid_until {
        attrs.push(format!("VALID UNTIL {}", quote_literal(v)));
    }
    (attrs, dropped)
}

/// The verifier to create `r` with, and what was done about its password.
fn password(
    p: &mut Plan,
    r: &SourceRole,
    given: Option<&GivenPassword>,
) -> (Option<String>, &'static str) {
    match (&r.password, given) {
        (_, Some(g)) => (Some(scram(&g.password)), "password from --role-password"),
        (Password::Scram(v), None) => (Some(v.clone()), "SCRAM verifier copied"),
        // whether the target accepts it is `login::can_log_in`'s to say (check, clone and cutover ask it)
        (Password::Md5(v), None) => (Some(v.clone()), "md5 verifier copied"),
        (Password::None, None) => (None, "no password on the source either"),
        (Password::Other, None) => {
            p.notices.push(format!(
                "role {}: its password verifier is neither SCRAM nor md5, so it was not copied; give \
                 one with --role-password {}=env:VARIABLE",
                r.name, r.name
            ));
            (None, "")
        }
        (Password::Unreadable, None) => (None, ""),
    }
}

/// A role the target lacks: created with what may be given, its password or NOLOGIN, and, when it owns
/// restored objects, granted to the target's role.
fn create(p: &mut Plan, r: &SourceRole, target: &TargetSide, given: Option<&GivenPassword>) {
    let (mut attrs, dropped) = attributes(r, target);
    let (verifier, how) = password(p, r, given);
    let login = r.login
        && !(verifier.is_none() && matches!(r.password, Password::Other | Password::Unreadable));
    if r.login && !login {
        p.cannot_log_in.push(r.name.clone());
    }
    attrs.insert(0, if login { "LOGIN" } else { "NOLOGIN" }.into());
    if !dropped.is_empty() {
        p.notices.push(format!(
            "role {}: {} not given on the target ({} may not grant {}); grant by hand what it needs",
            r.name,
            dropped.join(", "),
            target.admin,
            if dropped.len() == 1 { "it" } else { "them" }
        ));
    }
    let mut sql = format!(
        "CREATE ROLE {} WITH {}",
        quote_ident(&r.name),
        attrs.join(" ")
    );
    if let Some(v) = &verifier {
        sql.push_str(&format!(" PASSWORD {}", quote_literal(v)));
    }
    let mut says = format!("create role {} ({})", r.name, attrs.join(" "));
    if !how.is_empty() {
        says.push_str(&format!("; {how}"));
    }
    if r.login && !login {
        says.push_str(
            "; NOLOGIN: its password cannot be read on the source (give it with --role-password)",
        );
    }
    p.steps.push(Step { sql, says });
    p.created.push(r.name.clone());
    // to restore objects owned by it, the admin must be a member with SET (only of owners: a member
    // may also end the role's sessions, which the fence does only where allowed)
    if r.owns && !target.superuser {
        p.steps.push(Step {
            sql: format!(
                "GRANT {} TO {}",
                quote_ident(&r.name),
                quote_ident(&target.admin)
            ),
            says: format!(
                "grant role {} to {} (to give it the objects it owns)",
                r.name, target.admin
            ),
        });
    }
}

/// The memberships among the carried roles (ADMIN; INHERIT and SET on 16+).
fn memberships(p: &mut Plan, source: &SourceRoles, target: &TargetSide) {
    for m in &source.memberships {
        p.steps.push(grant(m, target.version));
    }
}

/// The statement that grants one membership on a target of `version` (ADMIN; INHERIT and SET on 16+).
pub fn grant(m: &Membership, version: u32) -> Step {
    let mut with = Vec::new();
    if m.admin {
        with.push("ADMIN OPTION".to_string());
    }
    if version >= 16 {
        if let Some(i) = m.inherit {
            with.push(format!("INHERIT {}", if i { "TRUE" } else { "FALSE" }));
        }
        if let Some(s) = m.set {
            with.push(format!("SET {}", if s { "TRUE" } else { "FALSE" }));
        }
    }
    let with = if with.is_empty() {
        String::new()
    } else if version >= 16 {
        format!(" WITH {}", with.join(", "))
    } else {
        " WITH ADMIN OPTION".into()
    };
    Step {
        sql: format!(
            "GRANT {} TO {}{with}",
            quote_ident(&m.role),
            quote_ident(&m.member)
        ),
        says: format!("grant role {} to {}{with}", m.role, m.member),
    }
}

/// The `ALTER ROLE … SET` settings of the roles the plan creates (list-valued ones as lists).
fn settings(p: &mut Plan, source: &SourceRoles, target: &TargetSide) {
    for r in source.roles.iter().filter(|r| p.created.contains(&r.name)) {
        for (in_db, setting) in &r.settings {
            let Some((name, value)) = setting.split_once('=') else {
                continue;
            };
            let value = if matches!(
                name,
                "search_path"
                    | "temp_tablespaces"
                    | "session_preload_libraries"
                    | "local_preload_libraries"
            ) {
                value.to_string()
            } else {
                quote_literal(value)
            };
            let scope = if *in_db {
                format!(" IN DATABASE {}", quote_ident(&target.database))
            } else {
                String::new()
            };
            p.steps.push(Step {
                sql: format!(
                    "ALTER ROLE {}{scope} SET {} TO {value}",
                    quote_ident(&r.name),
                    quote_ident(name)
                ),
                says: format!("role {}{scope}: SET {name}", r.name),
            });
        }
    }
}

fn existing_differences(p: &mut Plan, r: &SourceRole, have: &[bool; 7]) {
    let want = [
        r.login,
        r.superuser,
        r.createdb,
        r.createrole,
        r.replication,
        r.bypassrls,
        r.inherit,
    ];
    let names = [
        "LOGIN",
        "SUPERUSER",
        "CREATEDB",
        "CREATEROLE",
        "REPLICATION",
        "BYPASSRLS",
        "INHERIT",
    ];
    let differs: Vec<String> = names
        .iter()
        .zip(want.iter().zip(have))
        .filter(|(_, (w, h))| w != h)
        .map(|(n, (w, _))| format!("{}{n} on the source", if *w { "" } else { "NO" }))
        .collect();
    if !differs.is_empty() {
        p.notices.push(format!(
            "role {} exists on the target with other attributes ({}): kept as it is there, with its password",
            r.name,
            differs.join(", ")
        ));
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::roles::DatabaseGrant;

    pub(in crate::roles) fn role(name: &str, login: bool, password: Password) -> SourceRole {
        SourceRole {
            name: name.into(),
            login,
            inherit: true,
            connection_limit: -1,
            valid_until: None,
            superuser: false,
            createdb: false,
            createrole: false,
            replication: false,
            bypassrls: false,
            owns: true,
            password,
            row_version: None,
            settings: vec![],
        }
    }

    pub(in crate::roles) fn rds_master(version: u32) -> TargetSide {
        TargetSide {
            version,
            admin: "master".into(),
            createrole: true,
            createdb: true,
            database: "app db".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_scram_verifier_is_copied_and_never_shown() {
        let v = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy".to_string();
        let src = SourceRoles {
            roles: vec![role("redash", true, Password::Scram(v.clone()))],
            ..Default::default()
        };
        let p = plan(&src, &rds_master(16), &[]);
        assert_eq!(p.steps.len(), 2, "{:?}", p.steps);
        assert_eq!(
            p.steps[0].sql,
            format!("CREATE ROLE \"redash\" WITH LOGIN PASSWORD '{v}'")
        );
        assert_eq!(p.steps[1].sql, "GRANT \"redash\" TO \"master\"");
        for s in &p.steps {
            assert!(!s.says.contains("SCRAM-SHA-256$"), "{}", s.says);
        }
        assert!(!format!("{p:?}").contains("c3RvcmVk"));
        assert!(p.cannot_log_in.is_empty());
    }

    #[test]
    fn an_unreadable_password_makes_the_role_nologin_until_one_is_given() {
        let src = SourceRoles {
            roles: vec![role("app user", true, Password::Unreadable)],
            ..Default::default()
        };
        let p = plan(&src, &rds_master(15), &[]);
        assert!(
            p.steps[0]
                .sql
                .starts_with("CREATE ROLE \"app user\" WITH NOLOGIN"),
            "{}",
            p.steps[0].sql
        );
        assert_eq!(p.cannot_log_in, vec!["app user".to_string()]);
        let given = [GivenPassword {
            role: "app user".into(),
            password: "s3cret".into(),
        }];
        let p = plan(&src, &rds_master(15), &given);
        assert!(p.cannot_log_in.is_empty());
        assert!(
            p.steps[0]
                .sql
                .contains("WITH LOGIN PASSWORD 'SCRAM-SHA-256$"),
            "{}",
            p.steps[0].sql
        );
        assert!(!p.steps[0].sql.contains("s3cret"));
        assert!(!format!("{p:?}{:?}", given[0]).contains("s3cret"));
    }

    #[test]
    fn attributes_the_admin_may_not_grant_are_dropped_and_reported() {
        let mut r = role("ops", true, Password::None);
        (r.superuser, r.replication, r.bypassrls, r.createdb) = (true, true, true, true);
        let src = SourceRoles {
            roles: vec![r],
            ..Default::default()
        };
        let p = plan(&src, &rds_master(15), &[]);
        assert_eq!(p.steps[0].sql, "CREATE ROLE \"ops\" WITH LOGIN CREATEDB");
        assert!(
            p.notices[0].contains("SUPERUSER, REPLICATION, BYPASSRLS not given"),
            "{:?}",
            p.notices
        );
        let mut superuser = rds_master(17);
        superuser.superuser = true;
        let p = plan(&src, &superuser, &[]);
        assert_eq!(
            p.steps[0].sql,
            "CREATE ROLE \"ops\" WITH LOGIN SUPERUSER CREATEDB REPLICATION BYPASSRLS"
        );
        assert_eq!(p.steps.len(), 1, "a superuser needs no membership to own");
    }

    #[test]
    fn an_existing_role_is_kept_and_its_differences_named() {
        let src = SourceRoles {
            roles: vec![role("app", true, Password::Unreadable)],
            ..Default::default()
        };
        let mut t = rds_master(16);
        t.existing.insert(
            "app".into(),
            [false, false, false, false, false, false, true],
        );
        let p = plan(&src, &t, &[]);
        assert!(p.steps.is_empty(), "{:?}", p.steps);
        assert!(p.created.is_empty());
        assert!(
            p.notices[0].contains("LOGIN on the source"),
            "{:?}",
            p.notices
        );
    }

    #[test]
    fn memberships_settings_and_database_grants_follow_the_roles() {
        let mut app = role("app", true, Password::None);
        app.owns = false;
        app.settings = vec![
            (false, "search_path=\"$user\", app".into()),
            (true, "statement_timeout=5s".into()),
        ];
        let src = SourceRoles {
            roles: vec![role("readers", false, Password::None), app],
            memberships: vec![Membership {
                role: "readers".into(),
                member: "app".into(),
                admin: true,
                inherit: Some(false),
                set: Some(true),
            }],
            database_grants: vec![DatabaseGrant {
                grantee: "app".into(),
                privilege: "CONNECT".into(),
            }],
        };
        let sql: Vec<String> = plan(&src, &rds_master(16), &[])
            .steps
            .into_iter()
            .map(|s| s.sql)
            .collect();
        for want in [
            "GRANT \"readers\" TO \"app\" WITH ADMIN OPTION, INHERIT FALSE, SET TRUE",
            "ALTER ROLE \"app\" SET \"search_path\" TO \"$user\", app",
            "ALTER ROLE \"app\" IN DATABASE \"app db\" SET \"statement_timeout\" TO '5s'",
            "GRANT CONNECT ON DATABASE \"app db\" TO \"app\"",
        ] {
            assert!(sql.iter().any(|s| s == want), "{want} not in {sql:#?}");
        }
        // the admin becomes a member of the owner only (a member may end a role's sessions)
        assert!(
            sql.iter().any(|s| s == "GRANT \"readers\" TO \"master\""),
            "{sql:#?}"
        );
        assert!(
            !sql.iter().any(|s| s == "GRANT \"app\" TO \"master\""),
            "{sql:#?}"
        );
        let old: Vec<String> = plan(&src, &rds_master(15), &[])
            .steps
            .into_iter()
            .map(|s| s.sql)
            .collect();
        assert!(
            old.iter()
                .any(|s| s == "GRANT \"readers\" TO \"app\" WITH ADMIN OPTION"),
            "{old:#?}"
        );
    }
}
