//! Roles carried to the target before the schema, so that owners and grants survive the move and the
//! application logs in on the new primary with its own role and password.
//!
//! Which roles: every role that owns an object the schema step restores, that is granted a privilege on one
//! (tables, sequences, views, schemas, functions, types, default privileges, the database's CONNECT, CREATE
//! and TEMP), and every member of those, recursively (an application role that gets its rights through a
//! group role must exist too). Predefined roles (`pg_*`) exist everywhere and are left alone.
//!
//! How: a role missing on the target is created with the attributes the target's admin may give (LOGIN,
//! INHERIT, CONNECTION LIMIT, VALID UNTIL always; CREATEDB, CREATEROLE, REPLICATION, BYPASSRLS and SUPERUSER
//! only where the admin may grant them — each one dropped is reported), then the memberships among those
//! roles (with ADMIN, and INHERIT and SET on 16+), then their settings. A role that exists keeps its
//! attributes and password; each difference is reported.
//!
//! Passwords: the source's SCRAM verifier is copied as it is (the same password works; no plain text
//! travels) where the source role may read `pg_authid`; an md5 verifier is copied with a warning. Where it
//! cannot be read, `--role-password ROLE=env:VAR` (or `=file:PATH`) gives one, hashed here into a SCRAM
//! verifier before it is sent; otherwise the role is created NOLOGIN and reported, and the cutover refuses
//! until it can log in. No verifier or password is ever printed, logged or stored in the state.
//!
//! To own restored objects the admin must be a member of their owners: it grants itself each role it
//! created (PostgreSQL 16+ gives a CREATEROLE role ADMIN on the roles it creates).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio_postgres::Client;

use crate::error::{Error, Side};
use crate::ident::{quote_ident, quote_literal};

/// A role as the source has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRole {
    pub name: String,
    pub login: bool,
    pub inherit: bool,
    pub connection_limit: i32,
    pub valid_until: Option<String>,
    pub superuser: bool,
    pub createdb: bool,
    pub createrole: bool,
    pub replication: bool,
    pub bypassrls: bool,
    /// Owns something the schema step restores (or has default privileges): the target's role must be a
    /// member of it to give it those objects.
    pub owns: bool,
    pub password: Password,
    /// `ALTER ROLE … SET` settings: (in this database only, `name=value`).
    pub settings: Vec<(bool, String)>,
}

/// What the source's `pg_authid` says of a role's password.
#[derive(Clone, PartialEq, Eq)]
pub enum Password {
    /// No password (it logs in some other way, or not at all).
    None,
    Scram(String),
    Md5(String),
    /// A verifier of another kind.
    Other,
    /// The source role may not read `pg_authid`.
    Unreadable,
}

impl std::fmt::Debug for Password {
    // never the verifier itself
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Password::None => "None",
            Password::Scram(_) => "Scram(..)",
            Password::Md5(_) => "Md5(..)",
            Password::Other => "Other",
            Password::Unreadable => "Unreadable",
        })
    }
}

impl Password {
    fn of(verifier: Option<String>) -> Password {
        match verifier {
            None => Password::None,
            Some(v) if v.starts_with("SCRAM-SHA-256$") => Password::Scram(v),
            Some(v) if v.len() == 35 && v.starts_with("md5") => Password::Md5(v),
            Some(_) => Password::Other,
        }
    }
}

/// A membership among the carried roles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub role: String,
    pub member: String,
    pub admin: bool,
    /// PostgreSQL 16+ (None before: the member's own INHERIT decides, and SET is always allowed).
    pub inherit: Option<bool>,
    pub set: Option<bool>,
}

/// A database-level privilege of a carried role (CONNECT, CREATE, TEMPORARY).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseGrant {
    pub grantee: String,
    pub privilege: String,
}

/// Everything the source says about the roles to carry.
#[derive(Clone, Debug, Default)]
pub struct SourceRoles {
    pub roles: Vec<SourceRole>,
    pub memberships: Vec<Membership>,
    pub database_grants: Vec<DatabaseGrant>,
}

/// Objects the schema step restores: their owners and grantees, and the members of those, recursively.
const NEEDED: &str = "
WITH RECURSIVE objs(owner, acl) AS (
    SELECT c.relowner, c.relacl FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'
      AND n.nspname NOT LIKE 'pg\\_temp%'
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                               AND d.deptype = 'e')
    UNION ALL
    SELECT n.nspowner, n.nspacl FROM pg_namespace n
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'
      AND n.nspname NOT LIKE 'pg\\_temp%'
    UNION ALL
    SELECT p.proowner, p.proacl FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                               AND d.deptype = 'e')
    UNION ALL
    SELECT t.typowner, t.typacl FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND t.typtype IN ('d', 'e', 'r', 'm')
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid
                                               AND d.deptype = 'e')
    UNION ALL
    SELECT a.defaclrole, a.defaclacl FROM pg_default_acl a
    UNION ALL
    SELECT NULL::oid, datacl FROM pg_database WHERE datname = current_database()
),
refs(r) AS (
    SELECT owner FROM objs WHERE owner IS NOT NULL
    UNION SELECT (aclexplode(acl)).grantee FROM objs WHERE acl IS NOT NULL
),
needed(r) AS (
    SELECT r FROM refs WHERE r <> 0
    UNION SELECT m.member FROM pg_auth_members m JOIN needed ON m.roleid = needed.r
)
SELECT r.rolname::text, r.rolcanlogin, r.rolinherit, r.rolconnlimit, r.rolvaliduntil::text, r.rolsuper,
       r.rolcreatedb, r.rolcreaterole, r.rolreplication, r.rolbypassrls,
       r.oid IN (SELECT owner FROM objs WHERE owner IS NOT NULL)
FROM pg_roles r WHERE r.oid IN (SELECT r FROM needed) AND r.rolname NOT LIKE 'pg\\_%'
ORDER BY 1";

/// Reads the roles to carry from the source.
pub async fn read(source: &Client, version: u32) -> Result<SourceRoles, Error> {
    let sql = |what: &'static str| Error::sql(Side::Source, what);
    let mut roles: Vec<SourceRole> = source
        .query(NEEDED, &[])
        .await
        .map_err(sql("reading the roles that own or are granted objects"))?
        .iter()
        .map(|r| SourceRole {
            name: r.get(0),
            login: r.get(1),
            inherit: r.get(2),
            connection_limit: r.get(3),
            valid_until: r.get(4),
            superuser: r.get(5),
            createdb: r.get(6),
            createrole: r.get(7),
            replication: r.get(8),
            bypassrls: r.get(9),
            owns: r.get(10),
            password: Password::Unreadable,
            settings: Vec::new(),
        })
        .collect();
    let names: Vec<String> = roles.iter().map(|r| r.name.clone()).collect();
    // pg_authid is readable by superusers only (and, on some managed servers, by nobody)
    let verifiers: Option<HashMap<String, Option<String>>> = source
        .query(
            "SELECT rolname::text, rolpassword FROM pg_authid WHERE rolname = ANY($1)",
            &[&names],
        )
        .await
        .ok()
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect());
    let settings: Vec<(String, bool, Vec<String>)> = source
        .query(
            "SELECT r.rolname::text, s.setdatabase <> 0, s.setconfig FROM pg_db_role_setting s
             JOIN pg_roles r ON r.oid = s.setrole
             WHERE r.rolname = ANY($1)
               AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
             ORDER BY 1, 2",
            &[&names],
        )
        .await
        .map_err(sql("reading role settings"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for role in &mut roles {
        if let Some(v) = &verifiers {
            role.password = Password::of(v.get(&role.name).cloned().flatten());
        }
        for (name, in_db, config) in &settings {
            if *name == role.name {
                role.settings
                    .extend(config.iter().map(|c| (*in_db, c.clone())));
            }
        }
    }
    let options = if version >= 16 {
        "m.inherit_option, m.set_option"
    } else {
        "NULL::bool, NULL::bool"
    };
    let memberships = source
        .query(
            &format!(
                "SELECT g.rolname::text, u.rolname::text, m.admin_option, {options}
                 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                 JOIN pg_roles u ON u.oid = m.member
                 WHERE g.rolname = ANY($1) AND u.rolname = ANY($1) ORDER BY 1, 2"
            ),
            &[&names],
        )
        .await
        .map_err(sql("reading role memberships"))?
        .iter()
        .map(|r| Membership {
            role: r.get(0),
            member: r.get(1),
            admin: r.get(2),
            inherit: r.get(3),
            set: r.get(4),
        })
        .collect();
    let database_grants = source
        .query(
            "SELECT r.rolname::text, a.privilege_type FROM pg_database d, aclexplode(d.datacl) a
             JOIN pg_roles r ON r.oid = a.grantee
             WHERE d.datname = current_database() AND r.rolname = ANY($1) AND r.oid <> d.datdba
             ORDER BY 1, 2",
            &[&names],
        )
        .await
        .map_err(sql("reading database privileges"))?
        .iter()
        .map(|r| DatabaseGrant {
            grantee: r.get(0),
            privilege: r.get(1),
        })
        .collect();
    Ok(SourceRoles {
        roles,
        memberships,
        database_grants,
    })
}

/// What the target's admin (the role hikkoshi connects as) may do, and which roles exist there.
#[derive(Clone, Debug, Default)]
pub struct TargetSide {
    pub version: u32,
    pub admin: String,
    pub superuser: bool,
    pub createrole: bool,
    pub createdb: bool,
    pub replication: bool,
    pub bypassrls: bool,
    pub database: String,
    /// Existing roles by name: (LOGIN, SUPERUSER, CREATEDB, CREATEROLE, REPLICATION, BYPASSRLS, INHERIT).
    pub existing: BTreeMap<String, [bool; 7]>,
    /// Roles the admin is a member of (it may own objects as them).
    pub admin_member_of: BTreeSet<String>,
}

pub async fn target_side(target: &Client) -> Result<TargetSide, Error> {
    let sql = |what: &'static str| Error::sql(Side::Target, what);
    let me = target
        .query_one(
            "SELECT current_user::text, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls,
                    current_database()::text, current_setting('server_version_num')::int / 10000
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(sql("reading the target role's attributes"))?;
    let existing = target
        .query(
            "SELECT rolname::text, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication,
                    rolbypassrls, rolinherit, pg_has_role(current_user, oid, 'USAGE')
             FROM pg_roles",
            &[],
        )
        .await
        .map_err(sql("listing the target's roles"))?;
    let mut side = TargetSide {
        admin: me.get(0),
        superuser: me.get(1),
        createrole: me.get(2),
        createdb: me.get(3),
        replication: me.get(4),
        bypassrls: me.get(5),
        database: me.get(6),
        version: me.get::<_, i32>(7) as u32,
        ..Default::default()
    };
    for r in &existing {
        let name: String = r.get(0);
        if r.get::<_, bool>(8) {
            side.admin_member_of.insert(name.clone());
        }
        side.existing.insert(
            name,
            [
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            ],
        );
    }
    Ok(side)
}

/// A password given for a role whose verifier cannot be read (`--role-password ROLE=env:VAR|file:PATH`).
#[derive(Clone)]
pub struct GivenPassword {
    pub role: String,
    pub password: String,
}

impl std::fmt::Debug for GivenPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GivenPassword({}, ..)", self.role)
    }
}

/// Parses `ROLE=env:VAR` or `ROLE=file:PATH` and reads the password (a file's trailing newline is not part
/// of it). The role name is everything before the last `=env:` or `=file:`.
pub fn given_password(spec: &str) -> Result<GivenPassword, Error> {
    let usage = || {
        Error::Usage(format!(
            "--role-password takes ROLE=env:VARIABLE or ROLE=file:PATH, not {:?}",
            spec.split('=').next().unwrap_or_default()
        ))
    };
    let (role, source) = if let Some(i) = spec.rfind("=env:") {
        (&spec[..i], &spec[i + 1..])
    } else if let Some(i) = spec.rfind("=file:") {
        (&spec[..i], &spec[i + 1..])
    } else {
        return Err(usage());
    };
    if role.is_empty() {
        return Err(usage());
    }
    let password = if let Some(var) = source.strip_prefix("env:") {
        std::env::var(var).map_err(|_| {
            Error::Usage(format!(
                "--role-password {role}=env:{var}: the environment variable {var} is not set"
            ))
        })?
    } else {
        let path = source.strip_prefix("file:").unwrap_or_default();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Usage(format!(
                "--role-password {role}=file:{path}: cannot read it ({e})"
            ))
        })?;
        text.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        return Err(Error::Usage(format!(
            "--role-password for {role}: the password is empty"
        )));
    }
    Ok(GivenPassword {
        role: role.to_string(),
        password,
    })
}

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
    /// Attributes dropped, differences of existing roles, md5 verifiers: one line each.
    pub notices: Vec<String>,
    /// LOGIN roles that cannot log in on the target (created NOLOGIN: no verifier and no password given).
    pub cannot_log_in: Vec<String>,
    /// Roles created by the plan.
    pub created: Vec<String>,
}

/// The statements that carry `source` to `target` (pure: unit-tested below).
pub fn plan(source: &SourceRoles, target: &TargetSide, given: &[GivenPassword]) -> Plan {
    let mut p = Plan::default();
    let q = |s: &str| quote_ident(s);
    for r in &source.roles {
        if let Some(have) = target.existing.get(&r.name) {
            existing_differences(&mut p, r, have);
            if let Some(g) = given.iter().find(|g| g.role == r.name) {
                p.steps.push(Step {
                    sql: format!(
                        "ALTER ROLE {} PASSWORD {}",
                        q(&r.name),
                        quote_literal(&scram(&g.password))
                    ),
                    says: format!("set the password of role {} (--role-password)", r.name),
                });
            }
            continue;
        }
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
        let given = given.iter().find(|g| g.role == r.name);
        let (verifier, how) = match (&r.password, given) {
            (_, Some(g)) => (Some(scram(&g.password)), "password from --role-password"),
            (Password::Scram(v), None) => (Some(v.clone()), "SCRAM verifier copied"),
            (Password::Md5(v), None) => {
                p.notices.push(format!(
                    "role {}: its md5 password verifier was copied; servers that only accept SCRAM (Amazon \
                     RDS 14+ by default) refuse it: set a new password there",
                    r.name
                ));
                (Some(v.clone()), "md5 verifier copied")
            }
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
        };
        let login = r.login
            && !(verifier.is_none()
                && matches!(r.password, Password::Other | Password::Unreadable));
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
        let mut sql = format!("CREATE ROLE {} WITH {}", q(&r.name), attrs.join(" "));
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
                sql: format!("GRANT {} TO {}", q(&r.name), q(&target.admin)),
                says: format!(
                    "grant role {} to {} (to give it the objects it owns)",
                    r.name, target.admin
                ),
            });
        }
    }
    for m in &source.memberships {
        let mut with = Vec::new();
        if m.admin {
            with.push("ADMIN OPTION".to_string());
        }
        if target.version >= 16 {
            if let Some(i) = m.inherit {
                with.push(format!("INHERIT {}", if i { "TRUE" } else { "FALSE" }));
            }
            if let Some(s) = m.set {
                with.push(format!("SET {}", if s { "TRUE" } else { "FALSE" }));
            }
        }
        let with = if with.is_empty() {
            String::new()
        } else if target.version >= 16 {
            format!(" WITH {}", with.join(", "))
        } else {
            " WITH ADMIN OPTION".into()
        };
        p.steps.push(Step {
            sql: format!("GRANT {} TO {}{with}", q(&m.role), q(&m.member)),
            says: format!("grant role {} to {}{with}", m.role, m.member),
        });
    }
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
                format!(" IN DATABASE {}", q(&target.database))
            } else {
                String::new()
            };
            p.steps.push(Step {
                sql: format!(
                    "ALTER ROLE {}{scope} SET {} TO {value}",
                    q(&r.name),
                    q(name)
                ),
                says: format!("role {}{scope}: SET {name}", r.name),
            });
        }
    }
    for g in &source.database_grants {
        p.steps.push(Step {
            sql: format!(
                "GRANT {} ON DATABASE {} TO {}",
                g.privilege,
                q(&target.database),
                q(&g.grantee)
            ),
            says: format!("grant {} on the database to {}", g.privilege, g.grantee),
        });
    }
    p
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

/// A SCRAM-SHA-256 verifier of `password`, made here: the target never sees the password itself.
pub fn scram(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// Runs the plan on the target (each statement on its own: a role is cluster-wide and outlives a failed
/// clone; `clean` says how to drop what was created).
pub async fn carry(target: &Client, plan: &Plan) -> Result<(), Error> {
    for s in &plan.steps {
        tracing::info!("roles: {}", s.says);
        target
            .batch_execute(&s.sql)
            .await
            .map_err(|e| Error::sql(Side::Target, format!("roles: {}", s.says))(e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(name: &str, login: bool, password: Password) -> SourceRole {
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
            settings: vec![],
        }
    }

    fn rds_master(version: u32) -> TargetSide {
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

    #[test]
    fn role_passwords_are_read_from_the_environment_or_a_file() {
        // SAFETY: a variable only this test reads
        unsafe { std::env::set_var("HIKKOSHI_TEST_ROLE_PW", "from-env") };
        let g = given_password("a=b=env:HIKKOSHI_TEST_ROLE_PW").unwrap();
        assert_eq!((g.role.as_str(), g.password.as_str()), ("a=b", "from-env"));
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "from-file\n").unwrap();
        let g = given_password(&format!("app=file:{}", f.path().display())).unwrap();
        assert_eq!(g.password, "from-file");
        assert!(matches!(given_password("app=s3cret"), Err(Error::Usage(_))));
        let Err(Error::Usage(why)) = given_password("app=env:HIKKOSHI_TEST_NOT_SET") else {
            panic!("an unset variable was accepted");
        };
        assert!(why.contains("not set"), "{why}");
    }

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
