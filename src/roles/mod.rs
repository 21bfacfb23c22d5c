//! Roles carried to the target before the schema, so that owners and grants survive the move and the
//! application logs in on the new primary with its own role and password.
//!
//! Which roles: every role that owns an object the schema step restores, that is granted a privilege on one
//! (tables, sequences, views, schemas, functions, types, default privileges, the database's CONNECT, CREATE
//! and TEMP), and every member of those, recursively (an application role that gets its rights through a
//! group role must exist too). Predefined roles (`pg_*`) exist everywhere and are left alone, and so is the
//! target's own `public` schema (its owner and grants are not restored: see `schema::restore_pre_data`).
//!
//! How: a role missing on the target is created with the attributes the target's admin may give (LOGIN,
//! INHERIT, CONNECTION LIMIT, VALID UNTIL always; CREATEDB, CREATEROLE, REPLICATION, BYPASSRLS and SUPERUSER
//! only where the admin may grant them — each one dropped is reported), then the memberships among those
//! roles (with ADMIN, and INHERIT and SET on 16+), then their settings. A role that exists keeps its
//! attributes and password; each difference is reported.
//!
//! Passwords: the source's SCRAM verifier is copied as it is (the same password works; no plain text
//! travels) where the source role may read `pg_authid`; so is an md5 verifier, and whether the target will
//! accept it is `login::can_log_in`'s to say (`check`, `clone` and the cutover ask it). Where it
//! cannot be read, `--role-password ROLE=env:VAR` (or `=file:PATH`) gives one, hashed here into a SCRAM
//! verifier before it is sent; otherwise the role is created NOLOGIN and reported, and the cutover refuses
//! until it can log in. No verifier or password is ever printed, logged or stored in the state.
//!
//! At the cutover the roles are read again (`recheck`): what changed on the source since the clone is
//! carried, and every LOGIN role is judged on the target (`login`).
//!
//! To own restored objects the admin must be a member of their owners: it grants itself each role it
//! created (PostgreSQL 16+ gives a CREATEROLE role ADMIN on the roles it creates).

mod login;
mod map;
mod passwords;
mod plan;
mod recheck;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio_postgres::Client;

use crate::error::{Error, Side};
pub use login::{Auth, HbaRule, OnTarget, Verdict, Verifier, can_log_in};
pub use map::{check_map, rename, role_map};
pub use passwords::{GivenPassword, given_password, scram};
pub use plan::{Plan, Step, grant, plan};
pub use recheck::{Change, Record, TargetRole, judge, since_clone, target_auth, target_roles};

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
    /// The version of its `pg_authid` row (`xmin`, where readable): any ALTER ROLE on the source changes
    /// it, so the cutover tells a role changed since the clone without keeping its verifier.
    pub row_version: Option<i64>,
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
    -- (the public schema stays as the target has it: its owner and grants are not restored)
    SELECT n.nspowner, n.nspacl FROM pg_namespace n
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'public')
      AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
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

/// The server's major version (`roles::read` and the target's verifiers differ by it).
pub async fn major(client: &Client, side: Side) -> Result<u32, Error> {
    Ok(client
        .query_one(
            "SELECT current_setting('server_version_num')::int / 10000",
            &[],
        )
        .await
        .map_err(Error::sql(side, "reading the server version"))?
        .get::<_, i32>(0) as u32)
}

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
            row_version: None,
            settings: Vec::new(),
        })
        .collect();
    let names: Vec<String> = roles.iter().map(|r| r.name.clone()).collect();
    // pg_authid is readable by superusers only (and, on some managed servers, by nobody)
    type Row = (Option<String>, i64);
    let verifiers: Option<HashMap<String, Row>> = source
        .query(
            "SELECT rolname::text, rolpassword, xmin::text::bigint FROM pg_authid WHERE rolname = ANY($1)",
            &[&names],
        )
        .await
        .ok()
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect()
        });
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
            let (verifier, version) = v.get(&role.name).cloned().unzip();
            role.password = Password::of(verifier.flatten());
            role.row_version = version;
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

/// Runs the plan on the target (each statement on its own: a role is cluster-wide and outlives a failed
/// clone; `clean` says how to drop what was created).
pub async fn carry(target: &Client, plan: &Plan) -> Result<(), Error> {
    let mut created: Vec<&str> = Vec::new();
    for s in &plan.steps {
        tracing::info!("roles: {}", s.says);
        if let Err(e) = target.batch_execute(&s.sql).await {
            let left = if created.is_empty() {
                String::new()
            } else {
                format!(
                    "; role(s) {} were created before it and stay (a rerun uses them; DROP ROLE removes \
                     them)",
                    created.join(", ")
                )
            };
            return Err(Error::sql(Side::Target, format!("roles: {}{left}", s.says))(e));
        }
        if let Some(name) = plan
            .created
            .iter()
            .find(|n| s.says.starts_with(&format!("create role {n} (")))
        {
            created.push(name);
        }
    }
    Ok(())
}
