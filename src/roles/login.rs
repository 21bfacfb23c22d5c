//! Whether a role of the source can log in on the target: the one decision `check` and the cutover share
//! (pure, so each case is a unit test; reading the servers is `recheck`'s).
//!
//! What decides (PostgreSQL, "Client Authentication", sections 20.1 and 20.5): the role must be LOGIN, its
//! VALID UNTIL not past, and the first `pg_hba.conf` line that matches the connection must accept the
//! password verifier it has. `scram-sha-256` accepts a SCRAM verifier only; `md5` accepts md5 and SCRAM
//! (it runs SCRAM for a SCRAM verifier); `password` accepts both; `trust` and the methods that do not
//! look at the stored password (peer, ident, ldap, cert, gss, radius, pam...) accept anything; `reject`
//! refuses everyone, by the operator's choice, so it says nothing of the password. Which verifier kind new
//! passwords get is `password_encryption`; it does not decide what is accepted.
//!
//! The application connects over TCP from an address we do not know: of the `host*` lines that may match
//! the role and the database, every one up to the first that surely matches (address `all`, plain `host`)
//! may be the one. A refusal is proven only when all of them refuse. `pg_hba_file_rules` is readable by
//! superusers only; without it, an md5 verifier on a target whose `password_encryption` is
//! `scram-sha-256` is a doubt to report, not a refusal.

use super::Password;
use crate::ident::quote_ident;

/// The kind of password verifier a role has (never the verifier itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verifier {
    None,
    Scram,
    Md5,
    /// Another kind, or one we could not read.
    Unknown,
}

impl Verifier {
    pub fn of(password: &Password) -> Verifier {
        match password {
            Password::None => Verifier::None,
            Password::Scram(_) => Verifier::Scram,
            Password::Md5(_) => Verifier::Md5,
            Password::Other | Password::Unreadable => Verifier::Unknown,
        }
    }
}

/// One valid line of the target's `pg_hba.conf`, as `pg_hba_file_rules` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HbaRule {
    pub line: i32,
    /// `local`, `host`, `hostssl`, `hostnossl`, `hostgssenc`, `hostnogssenc`.
    pub kind: String,
    pub databases: Vec<String>,
    pub users: Vec<String>,
    pub address: Option<String>,
    pub method: String,
}

/// How the target authenticates: what the decision needs of it besides the role.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    pub database: String,
    pub password_encryption: String,
    /// None: `pg_hba_file_rules` could not be read.
    pub hba: Option<Vec<HbaRule>>,
}

/// A role as the target has it (or will have it, for `check`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnTarget {
    /// Its name there (`--role-map` may rename it).
    pub name: String,
    pub login: bool,
    /// VALID UNTIL is past (while it is not on the source).
    pub expired: bool,
    pub verifier: Verifier,
    /// The roles it is a member of (for `+group` lines).
    pub member_of: Vec<String>,
}

/// Whether the role can log in, and if not, why and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    LogsIn,
    /// It may not: what to check and how to fix it.
    Doubt(String),
    /// It cannot: why, and the fix.
    Refused(String),
}

/// Whether a LOGIN role of the source can log in on the target. `source` is the source's verifier kind
/// (whether the application sends a password); `target` None: the role does not exist there.
pub fn can_log_in(source: Verifier, target: Option<&OnTarget>, auth: &Auth) -> Verdict {
    let Some(t) = target else {
        return Verdict::Refused(
            "it does not exist on the target: run `hikkoshi clone --follow` again to create it, or create \
             it there"
                .into(),
        );
    };
    let q = quote_ident(&t.name);
    let given = format!(
        "`--role-password '{}=env:VARIABLE'` on `hikkoshi clone --follow` (restart it with it: it sets \
         LOGIN and a SCRAM password)",
        t.name
    );
    if !t.login {
        return Verdict::Refused(format!(
            "it is NOLOGIN on the target: run `ALTER ROLE {q} LOGIN` there, or give it a password with {given}"
        ));
    }
    if t.expired {
        return Verdict::Refused(format!(
            "its VALID UNTIL is past on the target: run `ALTER ROLE {q} VALID UNTIL 'infinity'` there (or \
             the source's date)"
        ));
    }
    let sends_password = matches!(source, Verifier::Scram | Verifier::Md5);
    match t.verifier {
        Verifier::Md5 => md5(t, auth, &q, &given),
        Verifier::None if sends_password => no_password(t, auth, &q, &given),
        _ => match auth.hba.as_deref().map(|h| lines(h, t, &auth.database)) {
            Some(Lines { open, .. }) if open.is_empty() => Verdict::Doubt(no_line(t, auth)),
            _ => Verdict::LogsIn,
        },
    }
}

/// An md5 verifier: refused by `scram-sha-256` lines.
fn md5(t: &OnTarget, auth: &Auth, q: &str, given: &str) -> Verdict {
    let rehash = format!(
        "give it a SCRAM password with {given}, or on the target run `SET password_encryption = \
         'scram-sha-256'; ALTER ROLE {q} PASSWORD '...'` with its password"
    );
    let Some(hba) = auth.hba.as_deref() else {
        if auth.password_encryption == "scram-sha-256" {
            return Verdict::Doubt(format!(
                "it has an md5 password verifier, and the target hashes passwords with scram-sha-256 \
                 (password_encryption), so its pg_hba.conf likely asks for scram-sha-256, which refuses md5 \
                 (hikkoshi may not read pg_hba_file_rules there: that needs a superuser). Check the \
                 target's pg_hba.conf lines for this role, or {rehash}"
            ));
        }
        return Verdict::LogsIn;
    };
    judge(
        lines(hba, t, &auth.database),
        |m| m != "scram-sha-256",
        "it has an md5 password verifier, and the target's pg_hba.conf asks for scram-sha-256",
        &rehash,
        t,
        auth,
    )
}

/// No password on the target, while the application sends one: refused by the password methods.
fn no_password(t: &OnTarget, auth: &Auth, q: &str, given: &str) -> Verdict {
    let fix = format!(
        "give it a password with {given}, or run `ALTER ROLE {q} PASSWORD '...'` on the target"
    );
    let Some(hba) = auth.hba.as_deref() else {
        return Verdict::Doubt(format!(
            "it has a password on the source but none on the target: unless the target's pg_hba.conf \
             trusts it, {fix}"
        ));
    };
    judge(
        lines(hba, t, &auth.database),
        |m| !matches!(m, "scram-sha-256" | "md5" | "password"),
        "it has a password on the source but none on the target, whose pg_hba.conf asks for one",
        &fix,
        t,
        auth,
    )
}

/// Refused when every line that may apply refuses; a doubt when some do.
fn judge(
    l: Lines,
    accepts: impl Fn(&str) -> bool,
    why: &str,
    fix: &str,
    t: &OnTarget,
    auth: &Auth,
) -> Verdict {
    if l.open.is_empty() {
        return Verdict::Doubt(no_line(t, auth));
    }
    let refusing: Vec<String> = l
        .open
        .iter()
        .filter(|r| !accepts(&r.method))
        .map(|r| format!("{} ({})", r.line, r.method))
        .collect();
    if refusing.is_empty() {
        Verdict::LogsIn
    } else if refusing.len() == l.open.len() {
        Verdict::Refused(format!(
            "{why} (line(s) {}): {fix}, or change those lines to md5",
            refusing.join(", ")
        ))
    } else {
        Verdict::Doubt(format!(
            "{why} for connections that line(s) {} match: if the application connects from there, {fix}",
            refusing.join(", ")
        ))
    }
}

fn no_line(t: &OnTarget, auth: &Auth) -> String {
    format!(
        "no host line of the target's pg_hba.conf lets role {} into database {} over TCP: add one",
        t.name, auth.database
    )
}

/// The `host*` lines that may be the first to match a TCP connection of `t` to `database`, from an
/// address we do not know (`reject` lines left out: they refuse everyone, whatever the password).
struct Lines<'a> {
    open: Vec<&'a HbaRule>,
}

fn lines<'a>(hba: &'a [HbaRule], t: &OnTarget, database: &str) -> Lines<'a> {
    let mut open = Vec::new();
    for r in hba.iter().filter(|r| r.kind.starts_with("host")) {
        let db = matches_database(&r.databases, &t.name, database);
        let user = matches_user(&r.users, t);
        if db == Match::No || user == Match::No {
            continue;
        }
        if r.method != "reject" {
            open.push(r);
        }
        let sure = db == Match::Yes
            && user == Match::Yes
            && r.kind == "host"
            && r.address.as_deref() == Some("all");
        if sure {
            break;
        }
    }
    Lines { open }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Match {
    Yes,
    Maybe,
    No,
}

fn matches_database(names: &[String], role: &str, database: &str) -> Match {
    let mut best = Match::No;
    for n in names {
        let m = match n.as_str() {
            "all" => Match::Yes,
            "sameuser" if role == database => Match::Yes,
            "sameuser" | "replication" => Match::No,
            // membership in the role named like the database; regular expressions (16+)
            "samerole" | "samegroup" => Match::Maybe,
            n if n.starts_with('/') => Match::Maybe,
            n if n == database => Match::Yes,
            _ => Match::No,
        };
        best = better(best, m);
    }
    best
}

fn matches_user(names: &[String], t: &OnTarget) -> Match {
    let mut best = Match::No;
    for n in names {
        let m = match n.as_str() {
            "all" => Match::Yes,
            n if n == t.name => Match::Yes,
            n if n
                .strip_prefix('+')
                .is_some_and(|g| g == t.name || t.member_of.iter().any(|m| m == g)) =>
            {
                Match::Yes
            }
            n if n.starts_with('/') => Match::Maybe,
            _ => Match::No,
        };
        best = better(best, m);
    }
    best
}

fn better(a: Match, b: Match) -> Match {
    match (a, b) {
        (Match::Yes, _) | (_, Match::Yes) => Match::Yes,
        (Match::Maybe, _) | (_, Match::Maybe) => Match::Maybe,
        _ => Match::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(line: i32, kind: &str, db: &str, user: &str, address: &str, method: &str) -> HbaRule {
        HbaRule {
            line,
            kind: kind.into(),
            databases: db.split(',').map(String::from).collect(),
            users: user.split(',').map(String::from).collect(),
            address: (kind != "local").then(|| address.to_string()),
            method: method.into(),
        }
    }

    /// PostgreSQL 18's own pg_hba.conf (initdb --auth=scram-sha-256).
    fn pg18_default() -> Vec<HbaRule> {
        vec![
            rule(1, "local", "all", "all", "", "scram-sha-256"),
            rule(2, "host", "all", "all", "127.0.0.1", "scram-sha-256"),
            rule(3, "host", "all", "all", "::1", "scram-sha-256"),
            rule(
                4,
                "host",
                "replication",
                "all",
                "127.0.0.1",
                "scram-sha-256",
            ),
        ]
    }

    fn app(verifier: Verifier) -> OnTarget {
        OnTarget {
            name: "app".into(),
            login: true,
            expired: false,
            verifier,
            member_of: vec!["writers".into()],
        }
    }

    fn auth(hba: Option<Vec<HbaRule>>, encryption: &str) -> Auth {
        Auth {
            database: "shop".into(),
            password_encryption: encryption.into(),
            hba,
        }
    }

    fn refused(v: Verdict) -> String {
        match v {
            Verdict::Refused(why) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    fn doubt(v: Verdict) -> String {
        match v {
            Verdict::Doubt(why) => why,
            other => panic!("no doubt: {other:?}"),
        }
    }

    #[test]
    fn an_md5_verifier_is_refused_where_every_host_line_asks_for_scram() {
        let a = auth(Some(pg18_default()), "scram-sha-256");
        let why = refused(can_log_in(Verifier::Md5, Some(&app(Verifier::Md5)), &a));
        assert!(
            why.contains("md5") && why.contains("line(s) 2 (scram-sha-256), 3"),
            "{why}"
        );
        assert!(why.contains("--role-password 'app=env:VARIABLE'"), "{why}");
        // a SCRAM verifier passes the same lines
        assert_eq!(
            can_log_in(Verifier::Md5, Some(&app(Verifier::Scram)), &a),
            Verdict::LogsIn
        );
    }

    #[test]
    fn md5_trust_and_password_lines_accept_an_md5_verifier() {
        for method in ["md5", "password", "trust", "ldap"] {
            let hba = vec![rule(1, "host", "all", "all", "all", method)];
            let a = auth(Some(hba), "scram-sha-256");
            assert_eq!(
                can_log_in(Verifier::Md5, Some(&app(Verifier::Md5)), &a),
                Verdict::LogsIn,
                "{method}"
            );
        }
    }

    #[test]
    fn only_the_lines_that_may_match_the_role_and_database_count() {
        // the first sure match hides what follows; other databases, users and local lines do not count
        let hba = vec![
            rule(1, "local", "all", "all", "", "scram-sha-256"),
            rule(2, "host", "other", "all", "all", "scram-sha-256"),
            rule(3, "host", "all", "admin", "all", "scram-sha-256"),
            rule(4, "host", "all", "reader", "all", "scram-sha-256"),
            rule(5, "hostssl", "shop", "+writers", "all", "md5"),
            rule(6, "host", "all", "all", "all", "md5"),
            rule(7, "host", "all", "all", "all", "scram-sha-256"),
        ];
        let a = auth(Some(hba.clone()), "scram-sha-256");
        assert_eq!(
            can_log_in(Verifier::Md5, Some(&app(Verifier::Md5)), &a),
            Verdict::LogsIn
        );
        // an address the application may come from asks for scram: a doubt, not a refusal
        let mut mixed = hba;
        mixed.insert(
            1,
            rule(2, "host", "all", "all", "10.0.0.0", "scram-sha-256"),
        );
        let why = doubt(can_log_in(
            Verifier::Md5,
            Some(&app(Verifier::Md5)),
            &auth(Some(mixed), "md5"),
        ));
        assert!(why.contains("line(s) 2 (scram-sha-256)"), "{why}");
        // a reject line refuses whatever the password: it proves nothing about md5
        let hba = vec![
            rule(1, "host", "all", "all", "10.0.0.0", "reject"),
            rule(2, "host", "all", "all", "all", "md5"),
        ];
        assert_eq!(
            can_log_in(
                Verifier::Md5,
                Some(&app(Verifier::Md5)),
                &auth(Some(hba), "scram-sha-256")
            ),
            Verdict::LogsIn
        );
    }

    #[test]
    fn without_pg_hba_an_md5_verifier_is_a_doubt_where_passwords_are_hashed_with_scram() {
        let why = doubt(can_log_in(
            Verifier::Md5,
            Some(&app(Verifier::Md5)),
            &auth(None, "scram-sha-256"),
        ));
        assert!(
            why.contains("pg_hba") && why.contains("--role-password") && why.contains("ALTER ROLE"),
            "{why}"
        );
        assert_eq!(
            can_log_in(Verifier::Md5, Some(&app(Verifier::Md5)), &auth(None, "md5")),
            Verdict::LogsIn
        );
    }

    #[test]
    fn a_nologin_expired_or_missing_role_is_refused_with_the_fix() {
        let a = auth(None, "scram-sha-256");
        let mut t = app(Verifier::Scram);
        t.login = false;
        let why = refused(can_log_in(Verifier::Scram, Some(&t), &a));
        assert!(
            why.contains("NOLOGIN") && why.contains("ALTER ROLE \"app\" LOGIN"),
            "{why}"
        );
        assert!(why.contains("--role-password"), "{why}");
        let mut t = app(Verifier::Scram);
        t.expired = true;
        assert!(refused(can_log_in(Verifier::Scram, Some(&t), &a)).contains("VALID UNTIL"));
        assert!(refused(can_log_in(Verifier::Scram, None, &a)).contains("does not exist"));
    }

    #[test]
    fn a_role_without_a_password_on_the_target_is_refused_where_one_is_asked() {
        let a = auth(Some(pg18_default()), "scram-sha-256");
        let why = refused(can_log_in(Verifier::Scram, Some(&app(Verifier::None)), &a));
        assert!(why.contains("none on the target"), "{why}");
        // no password on the source either: it logs in some other way
        assert_eq!(
            can_log_in(Verifier::None, Some(&app(Verifier::None)), &a),
            Verdict::LogsIn
        );
        let trust = auth(
            Some(vec![rule(1, "host", "all", "all", "all", "trust")]),
            "md5",
        );
        assert_eq!(
            can_log_in(Verifier::Scram, Some(&app(Verifier::None)), &trust),
            Verdict::LogsIn
        );
    }

    #[test]
    fn no_host_line_for_the_role_is_a_doubt() {
        let hba = vec![
            rule(1, "local", "all", "all", "", "trust"),
            rule(2, "host", "all", "admin", "all", "scram-sha-256"),
        ];
        let why = doubt(can_log_in(
            Verifier::Scram,
            Some(&app(Verifier::Scram)),
            &auth(Some(hba), "scram-sha-256"),
        ));
        assert!(why.contains("no host line"), "{why}");
    }
}
