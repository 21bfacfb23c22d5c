//! The roles again, at the cutover (before the fence): what changed on the source since the clone carried
//! them, and what the target has now, for `login::can_log_in` to judge.
//!
//! "Since the clone" without keeping any verifier: the clone records the version of each role's
//! `pg_authid` row on the source (its `xmin`; every ALTER ROLE, a new password included, writes a new row
//! version). A role the clone created whose row version moved is carried again: its LOGIN, INHERIT,
//! CONNECTION LIMIT and VALID UNTIL, and its verifier as it is (unless `--role-password` gave one). Where
//! the source role may not read `pg_authid` there is no row version: nothing is known of what changed, so
//! nothing of an existing role is carried, and the judgement alone stands. A role that existed on the
//! target before the clone is kept as it is there. Memberships among the carried roles the target lacks
//! are granted, whoever created the roles (the clone granted them all).

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::login::{Auth, HbaRule, OnTarget, Verdict, Verifier, can_log_in};
use super::plan::{Plan, grant};
use super::{Password, SourceRoles};
use crate::error::{Error, Side};
use crate::ident::{quote_ident, quote_literal};

/// What the state says of a role the clone carried (`hikkoshi.roles`), by its name on the target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub created: bool,
    /// The source's row version when the clone (or the last cutover attempt) carried it.
    pub source_version: Option<i64>,
    /// `--role-password` gave its password: the source's verifier is not carried over it.
    pub password_given: bool,
}

/// A role as the target has it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetRole {
    pub name: String,
    pub login: bool,
    pub inherit: bool,
    pub connection_limit: i32,
    pub valid_until: Option<String>,
    /// VALID UNTIL is past.
    pub expired: bool,
    /// Unknown where the target's role may not read `pg_authid`.
    pub verifier: Verifier,
    /// Every role it is a member of, directly or not (for `+group` lines of pg_hba.conf).
    pub member_of: Vec<String>,
    /// The roles granted to it directly.
    pub granted: Vec<String>,
}

/// One statement that carries a change to the target, and what it carries (a role name and what: never
/// a verifier).
#[derive(Clone)]
pub struct Change {
    /// The role's name on the target.
    pub role: String,
    /// Its name on the source, and the row version this change brings it to (recorded once carried).
    pub source_role: String,
    pub source_version: Option<i64>,
    pub what: String,
    pub sql: String,
    /// For a password: the verifier, to skip it when the target has it already.
    pub verifier: Option<String>,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.role, self.what)
    }
}

/// The changes since the clone to carry to the target (pure: unit-tested below). `renamed`: source name →
/// target name (`--role-map`).
pub fn since_clone(
    source: &SourceRoles,
    target: &BTreeMap<String, TargetRole>,
    records: &[Record],
    renamed: &[(String, String)],
    target_version: u32,
) -> Vec<Change> {
    let name = |n: &str| {
        renamed
            .iter()
            .find(|(s, _)| s == n)
            .map_or(n.to_string(), |(_, t)| t.clone())
    };
    let mut out = Vec::new();
    for r in &source.roles {
        let n = name(&r.name);
        let (Some(t), Some(rec)) = (target.get(&n), records.iter().find(|x| x.name == n)) else {
            continue;
        };
        let moved = rec.created
            && r.row_version.is_some()
            && rec.source_version.is_some()
            && r.row_version != rec.source_version;
        if !moved {
            continue;
        }
        let q = quote_ident(&n);
        let change = |what: String, sql: String, verifier: Option<String>| Change {
            role: n.clone(),
            source_role: r.name.clone(),
            source_version: r.row_version,
            what,
            sql,
            verifier,
        };
        let mut attrs: Vec<(String, String)> = Vec::new();
        if r.login != t.login {
            let a = if r.login { "LOGIN" } else { "NOLOGIN" };
            attrs.push((a.into(), a.into()));
        }
        if r.inherit != t.inherit {
            let a = if r.inherit { "INHERIT" } else { "NOINHERIT" };
            attrs.push((a.into(), a.into()));
        }
        if r.connection_limit != t.connection_limit {
            attrs.push((
                "CONNECTION LIMIT".into(),
                format!("CONNECTION LIMIT {}", r.connection_limit),
            ));
        }
        if r.valid_until != t.valid_until {
            attrs.push((
                "VALID UNTIL".into(),
                format!(
                    "VALID UNTIL {}",
                    quote_literal(r.valid_until.as_deref().unwrap_or("infinity"))
                ),
            ));
        }
        if !attrs.is_empty() {
            let (what, sql): (Vec<String>, Vec<String>) = attrs.into_iter().unzip();
            out.push(change(
                what.join(", "),
                format!("ALTER ROLE {q} WITH {}", sql.join(" ")),
                None,
            ));
        }
        if !rec.password_given {
            match &r.password {
                Password::Scram(v) | Password::Md5(v) => out.push(change(
                    "password".into(),
                    format!("ALTER ROLE {q} PASSWORD {}", quote_literal(v)),
                    Some(v.clone()),
                )),
                Password::None if t.verifier != Verifier::None => out.push(change(
                    "password removed".into(),
                    format!("ALTER ROLE {q} PASSWORD NULL"),
                    None,
                )),
                _ => {}
            }
        }
        if out.last().is_none_or(|c| c.source_role != r.name) {
            // the row moved for something not carried (a setting, an attribute the admin may not give):
            // the new version is recorded all the same
            out.push(change("row version".into(), String::new(), None));
        }
    }
    for m in &source.memberships {
        let (role, member) = (name(&m.role), name(&m.member));
        let Some(t) = target.get(&member) else {
            continue;
        };
        if !target.contains_key(&role) || t.granted.contains(&role) {
            continue;
        }
        let mut m = m.clone();
        (m.role, m.member) = (role.clone(), member.clone());
        let step = grant(&m, target_version);
        out.push(Change {
            role: member,
            source_role: String::new(),
            source_version: None,
            what: format!("member of {role}"),
            sql: step.sql,
            verifier: None,
        });
    }
    out
}

/// The roles `names` as the target has them now (those it has).
pub async fn target_roles(
    target: &Client,
    names: &[String],
) -> Result<BTreeMap<String, TargetRole>, Error> {
    let rows = target
        .query(
            "SELECT r.rolname::text, r.rolcanlogin, r.rolinherit, r.rolconnlimit, r.rolvaliduntil::text,
                    coalesce(r.rolvaliduntil < now(), false),
                    ARRAY(SELECT g.rolname::text FROM pg_roles g
                          WHERE g.oid <> r.oid AND pg_has_role(r.oid, g.oid, 'MEMBER')),
                    ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                          WHERE m.member = r.oid)
             FROM pg_roles r WHERE r.rolname = ANY($1)",
            &[&names],
        )
        .await
        .map_err(Error::sql(Side::Target, "reading the carried roles"))?;
    // only the kind leaves the server; pg_authid is readable by superusers only
    let kinds: BTreeMap<String, String> = target
        .query(
            "SELECT rolname::text,
                    CASE WHEN rolpassword IS NULL THEN 'none'
                         WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram'
                         WHEN rolpassword ~ '^md5[0-9a-f]{32}$' THEN 'md5' ELSE 'other' END
             FROM pg_authid WHERE rolname = ANY($1)",
            &[&names],
        )
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default();
    Ok(rows
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            let verifier = match kinds.get(&name).map(String::as_str) {
                Some("none") => Verifier::None,
                Some("scram") => Verifier::Scram,
                Some("md5") => Verifier::Md5,
                _ => Verifier::Unknown,
            };
            let role = TargetRole {
                name: name.clone(),
                login: r.get(1),
                inherit: r.get(2),
                connection_limit: r.get(3),
                valid_until: r.get(4),
                expired: r.get(5),
                verifier,
                member_of: r.get(6),
                granted: r.get(7),
            };
            (name, role)
        })
        .collect())
}

/// How the target authenticates: its database, `password_encryption`, and its pg_hba.conf lines where
/// `pg_hba_file_rules` is readable (superusers only). The view shows the file as it is, which is what the
/// server will use once reloaded.
pub async fn target_auth(target: &Client) -> Result<Auth, Error> {
    let row = target
        .query_one(
            "SELECT current_database()::text, current_setting('password_encryption'),
                    current_setting('server_version_num')::int / 10000",
            &[],
        )
        .await
        .map_err(Error::sql(
            Side::Target,
            "reading the target's password settings",
        ))?;
    let order = if row.get::<_, i32>(2) >= 16 {
        "rule_number"
    } else {
        "line_number"
    };
    let hba = target
        .query(
            &format!(
                "SELECT line_number, type, database, user_name, address, auth_method
                 FROM pg_hba_file_rules WHERE error IS NULL ORDER BY {order}"
            ),
            &[],
        )
        .await
        .ok()
        .map(|rows| {
            rows.iter()
                .map(|r| HbaRule {
                    line: r.get(0),
                    kind: r.get(1),
                    databases: r.get::<_, Option<Vec<String>>>(2).unwrap_or_default(),
                    users: r.get::<_, Option<Vec<String>>>(3).unwrap_or_default(),
                    address: r.get(4),
                    method: r.get(5),
                })
                .collect()
        });
    Ok(Auth {
        database: row.get(0),
        password_encryption: row.get(1),
        hba,
    })
}

/// Each LOGIN role of the source judged on the target as it is now, or as `plan` leaves it when the
/// clone has not run yet (`check`). Where the target hides verifiers, a role the plan creates has the
/// source's (or, given with `--role-password`, a SCRAM one). The roles the plan leaves NOLOGIN for want of
/// a readable password are left out: `check` and `clone` say that with its own fix.
pub async fn judge(
    target: &Client,
    source: &SourceRoles,
    plan: &Plan,
    given: &[String],
) -> Result<Vec<(String, Verdict)>, Error> {
    let names: Vec<String> = source.roles.iter().map(|r| r.name.clone()).collect();
    let now = target_roles(target, &names).await?;
    let auth = target_auth(target).await?;
    let mut out = Vec::new();
    for r in source.roles.iter().filter(|r| r.login) {
        if plan.cannot_log_in.contains(&r.name) {
            continue;
        }
        let planned = || {
            if given.contains(&r.name) {
                Verifier::Scram
            } else {
                Verifier::of(&r.password)
            }
        };
        let created = plan.created.contains(&r.name);
        let t = match now.get(&r.name) {
            Some(t) => Some(OnTarget {
                name: r.name.clone(),
                login: t.login,
                expired: t.expired,
                verifier: match t.verifier {
                    Verifier::Unknown if created => planned(),
                    v => v,
                },
                member_of: t.member_of.clone(),
            }),
            None if created => Some(OnTarget {
                name: r.name.clone(),
                login: true,
                expired: false,
                verifier: planned(),
                member_of: source
                    .memberships
                    .iter()
                    .filter(|m| m.member == r.name)
                    .map(|m| m.role.clone())
                    .collect(),
            }),
            None => None,
        };
        out.push((
            r.name.clone(),
            can_log_in(Verifier::of(&r.password), t.as_ref(), &auth),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::Membership;
    use crate::roles::plan::tests::role;

    fn on_target(name: &str) -> TargetRole {
        TargetRole {
            name: name.into(),
            login: true,
            inherit: true,
            connection_limit: -1,
            valid_until: None,
            expired: false,
            verifier: Verifier::Scram,
            member_of: vec![],
            granted: vec![],
        }
    }

    fn record(name: &str, created: bool, version: i64) -> Record {
        Record {
            name: name.into(),
            created,
            source_version: Some(version),
            password_given: false,
        }
    }

    const V: &str = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy";

    #[test]
    fn a_role_changed_on_the_source_since_the_clone_is_carried_and_never_shown() {
        let mut app = role("app", true, Password::Scram(V.into()));
        app.row_version = Some(901);
        app.valid_until = Some("2030-01-01 00:00:00+00".into());
        let source = SourceRoles {
            roles: vec![app],
            ..Default::default()
        };
        let target = BTreeMap::from([("app".to_string(), on_target("app"))]);
        let changes = since_clone(&source, &target, &[record("app", true, 900)], &[], 18);
        let what: Vec<&str> = changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(what, ["VALID UNTIL", "password"]);
        assert_eq!(
            changes[0].sql,
            "ALTER ROLE \"app\" WITH VALID UNTIL '2030-01-01 00:00:00+00'"
        );
        assert_eq!(changes[1].sql, format!("ALTER ROLE \"app\" PASSWORD '{V}'"));
        assert_eq!(changes[1].source_version, Some(901));
        assert!(!format!("{changes:?}").contains("c3RvcmVk"));
        // the same row version: nothing changed since the clone, whatever the target holds now
        let same = since_clone(&source, &target, &[record("app", true, 901)], &[], 18);
        assert!(same.is_empty(), "{same:?}");
    }

    #[test]
    fn a_role_that_existed_or_got_its_password_given_keeps_it() {
        let mut app = role(
            "app",
            false,
            Password::Md5("md5".to_string() + &"0".repeat(32)),
        );
        app.row_version = Some(7);
        let source = SourceRoles {
            roles: vec![app],
            ..Default::default()
        };
        let target = BTreeMap::from([("app".to_string(), on_target("app"))]);
        // existed on the target before the clone: kept as it is there
        assert!(since_clone(&source, &target, &[record("app", false, 6)], &[], 18).is_empty());
        // --role-password gave it a password: the source's verifier does not replace it; the rest is
        // carried
        let mut given = record("app", true, 6);
        given.password_given = true;
        let c = since_clone(&source, &target, &[given], &[], 18);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].sql, "ALTER ROLE \"app\" WITH NOLOGIN");
        // unknown row versions (a source role that may not read pg_authid): nothing is carried
        let mut unknown = source.clone();
        unknown.roles[0].row_version = None;
        assert!(since_clone(&unknown, &target, &[record("app", true, 6)], &[], 18).is_empty());
    }

    #[test]
    fn a_new_membership_is_granted_under_the_targets_names() {
        let source = SourceRoles {
            roles: vec![
                role("writers", false, Password::None),
                role("app", true, Password::Unreadable),
            ],
            memberships: vec![Membership {
                role: "writers".into(),
                member: "app".into(),
                admin: false,
                inherit: Some(true),
                set: Some(true),
            }],
            ..Default::default()
        };
        let target = BTreeMap::from([
            ("shop_writers".to_string(), on_target("shop_writers")),
            ("app".to_string(), on_target("app")),
        ]);
        let renamed = [("writers".to_string(), "shop_writers".to_string())];
        let c = since_clone(&source, &target, &[], &renamed, 16);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(
            c[0].sql,
            "GRANT \"shop_writers\" TO \"app\" WITH INHERIT TRUE, SET TRUE"
        );
        assert_eq!(c[0].what, "member of shop_writers");
        let mut has = target.clone();
        has.get_mut("app").unwrap().granted = vec!["shop_writers".into()];
        assert!(since_clone(&source, &has, &[], &renamed, 16).is_empty());
    }
}
