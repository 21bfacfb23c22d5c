//! Connection strings as libpq reads them: URIs (`postgresql://user@host:5432/db?sslmode=require`) and
//! `key=value` strings, completed from the `PG*` environment variables and `~/.pgpass` the way psql does
//! (libpq docs, "Connection Strings", "Environment Variables", "The Password File").
//!
//! tokio-postgres parses connection strings too, but it rejects libpq keywords it does not know and never
//! reads the environment or the password file, so hikkoshi keeps its own small parser and hands the driver
//! (and pg_dump) a complete, explicit configuration.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A password: never printed, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The clear text, for the authentication exchange only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// What was wrong with a connection string; never contains the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnInfoError {
    #[error("malformed connection string: {0}")]
    Malformed(String),
    #[error("unknown connection option \"{0}\"")]
    UnknownOption(String),
    #[error("invalid value for connection option \"{key}\": {reason}")]
    InvalidValue { key: String, reason: String },
}

/// The libpq keywords hikkoshi understands.
const KNOWN: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "connect_timeout",
    "application_name",
    "fallback_application_name",
    "options",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "target_session_attrs",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "channel_binding",
];

/// Environment variables that supply a keyword the string left out (libpq "Environment Variables").
const ENV: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGPASSFILE", "passfile"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGAPPNAME", "application_name"),
    ("PGOPTIONS", "options"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGCHANNELBINDING", "channel_binding"),
];

/// One endpoint (source or target), fully resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    params: BTreeMap<String, String>,
    password: Option<Secret>,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({self})")
    }
}

/// `user@host:port/dbname`: what logs and errors show of an endpoint.
impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.user(),
            self.host(),
            self.port(),
            self.dbname()
        )
    }
}

impl ConnInfo {
    /// Parses a URI or a `key=value` string; nothing is taken from the environment yet.
    pub fn parse(s: &str) -> Result<Self, ConnInfoError> {
        let s = s.trim();
        let pairs = if s.starts_with("postgresql://") || s.starts_with("postgres://") {
            parse_uri(s)?
        } else {
            parse_keyword_value(s)?
        };
        let mut params = BTreeMap::new();
        let mut password = None;
        for (k, v) in pairs {
            if !KNOWN.contains(&k.as_str()) {
                return Err(ConnInfoError::UnknownOption(k));
            }
            if k == "password" {
                password = Some(Secret::new(v));
            } else {
                params.insert(k, v);
            }
        }
        let info = ConnInfo { params, password };
        info.validate()?;
        Ok(info)
    }

    /// Parses `s`, then fills what it leaves out from `PG*` variables, defaults and `~/.pgpass`.
    pub fn resolve(s: &str) -> Result<Self, ConnInfoError> {
        let mut info = Self::parse(s)?;
        info.fill_from(|k| std::env::var(k).ok());
        info.validate()?;
        Ok(info)
    }

    /// Fills missing keywords from `env` (a lookup of environment variables), then libpq's defaults, then the
    /// password file.
    pub fn fill_from(&mut self, env: impl Fn(&str) -> Option<String>) {
        for (var, key) in ENV {
            if let Some(v) = env(var).filter(|v| !v.is_empty()) {
                if *key == "password" {
                    if self.password.is_none() {
                        self.password = Some(Secret::new(v));
                    }
                } else {
                    self.params.entry(key.to_string()).or_insert(v);
                }
            }
        }
        if !self.params.contains_key("user") {
            let user = env("USER").unwrap_or_else(|| "postgres".into());
            self.params.insert("user".into(), user);
        }
        if !self.params.contains_key("dbname") {
            let user = self.params["user"].clone();
            self.params.insert("dbname".into(), user);
        }
        if !self.params.contains_key("host") && !self.params.contains_key("hostaddr") {
            let sock = ["/var/run/postgresql", "/tmp"]
                .into_iter()
                .find(|d| std::path::Path::new(d).is_dir())
                .unwrap_or("/tmp");
            self.params.insert("host".into(), sock.into());
        }
        self.params
            .entry("port".into())
            .or_insert_with(|| "5432".into());
        if self.password.is_none() {
            let file = self
                .params
                .get("passfile")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".pgpass")));
            if let Some(file) = file
                && let Ok(text) = std::fs::read_to_string(&file)
            {
                self.password =
                    pgpass_lookup(&text, self.host(), self.port(), self.dbname(), self.user())
                        .map(Secret::new);
            }
        }
    }

    fn validate(&self) -> Result<(), ConnInfoError> {
        if let Some(p) = self.params.get("port") {
            for part in p.split(',') {
                part.parse::<u16>()
                    .map_err(|_| ConnInfoError::InvalidValue {
                        key: "port".into(),
                        reason: format!("\"{part}\" is not a port number"),
                    })?;
            }
        }
        if let Some(m) = self.params.get("sslmode")
            && !matches!(
                m.as_str(),
                "disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full"
            )
        {
            return Err(ConnInfoError::InvalidValue {
                key: "sslmode".into(),
                reason: format!(
                    "\"{m}\" is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            });
        }
        if let Some(t) = self.params.get("connect_timeout") {
            t.parse::<u64>().map_err(|_| ConnInfoError::InvalidValue {
                key: "connect_timeout".into(),
                reason: format!("\"{t}\" is not a number of seconds"),
            })?;
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
    pub fn host(&self) -> &str {
        self.get("host").or(self.get("hostaddr")).unwrap_or("")
    }
    pub fn port(&self) -> &str {
        self.get("port").unwrap_or("5432")
    }
    pub fn user(&self) -> &str {
        self.get("user").unwrap_or("")
    }
    pub fn dbname(&self) -> &str {
        self.get("dbname").unwrap_or("")
    }
    pub fn password(&self) -> Option<&Secret> {
        self.password.as_ref()
    }
    pub fn sslmode(&self) -> &str {
        self.get("sslmode").unwrap_or("prefer")
    }

    /// The same endpoint with another database name (for creating or dropping databases).
    pub fn with_dbname(&self, dbname: &str) -> Self {
        let mut c = self.clone();
        c.params.insert("dbname".into(), dbname.into());
        c
    }

    /// The connect timeout, 10 s when none is given: a server that does not answer must not hang us.
    pub fn connect_timeout(&self) -> Duration {
        let secs = self
            .get("connect_timeout")
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| *t > 0)
            .unwrap_or(10);
        Duration::from_secs(secs.max(2))
    }

    /// The configuration for tokio-postgres.
    pub fn to_driver_config(&self, application_name: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        for h in self.host().split(',') {
            if h.starts_with('/') {
                c.host_path(h);
            } else {
                c.host(h);
            }
        }
        for p in self.port().split(',') {
            c.port(p.parse().unwrap_or(5432));
        }
        c.user(self.user());
        c.dbname(self.dbname());
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        if let Some(o) = self.get("options") {
            c.options(o);
        }
        c.application_name(self.get("application_name").unwrap_or(application_name));
        c.connect_timeout(self.connect_timeout());
        c.keepalives(true);
        c.keepalives_idle(Duration::from_secs(30));
        c.ssl_mode(match self.sslmode() {
            "disable" => tokio_postgres::config::SslMode::Disable,
            "require" | "verify-ca" | "verify-full" => tokio_postgres::config::SslMode::Require,
            _ => tokio_postgres::config::SslMode::Prefer,
        });
        c
    }

    /// A libpq `key=value` string without the password, for pg_dump and pg_restore; the password goes
    /// through [`ConnInfo::child_env`] so that it never shows in a process listing.
    pub fn to_libpq_string(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| format!("{k}={}", quote_value(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Environment for a child libpq program: the password, and nothing inherited that could override the
    /// explicit connection string.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(p) = &self.password {
            env.push(("PGPASSWORD".to_string(), p.expose().to_string()));
        }
        env
    }
}

fn quote_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\']) {
        return v.to_string();
    }
    let mut out = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn parse_keyword_value(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError::Malformed(format!(
                "missing \"=\" after \"{key}\" (expected key=value pairs or a postgresql:// URI)"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(ConnInfoError::Malformed(format!(
                            "unterminated quoted value for \"{key}\""
                        )));
                    }
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(ConnInfoError::Malformed(format!(
                                "unterminated quoted value for \"{key}\""
                            )));
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ConnInfoError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| {
                ConnInfoError::Malformed("truncated percent-escape in URI".into())
            })?;
            let b = u8::from_str_radix(hex, 16).map_err(|_| {
                ConnInfoError::Malformed(format!("invalid percent-escape \"%{hex}\" in URI"))
            })?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ConnInfoError::Malformed("URI is not valid UTF-8 once decoded".into()))
}

fn parse_uri(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let rest = s
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| ConnInfoError::Malformed("missing \"://\"".into()))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let mut out = Vec::new();
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(u) = userinfo {
        let (user, pass) = match u.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (u, None),
        };
        if !user.is_empty() {
            out.push(("user".into(), percent_decode(user)?));
        }
        if let Some(p) = pass {
            out.push(("password".into(), percent_decode(p)?));
        }
    }
    if !hostlist.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for hp in hostlist.split(',') {
            let (h, p) = if let Some(inner) = hp.strip_prefix('[') {
                let (h, after) = inner.split_once(']').ok_or_else(|| {
                    ConnInfoError::Malformed("unterminated \"[\" in IPv6 host".into())
                })?;
                (h.to_string(), after.strip_prefix(':').map(str::to_string))
            } else {
                match hp.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p.to_string())),
                    None => (hp.to_string(), None),
                }
            };
            hosts.push(percent_decode(&h)?);
            ports.push(p.unwrap_or_default());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            out.push(("host".into(), hosts.join(",")));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            let ports: Vec<String> = ports
                .into_iter()
                .map(|p| if p.is_empty() { "5432".into() } else { p })
                .collect();
            out.push(("port".into(), ports.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".into(), percent_decode(db)?));
    }
    if let Some(q) = query {
        for kv in q.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                ConnInfoError::Malformed(format!("URI parameter \"{kv}\" has no \"=\""))
            })?;
            let k = percent_decode(k)?;
            let k = if k == "ssl" && v == "true" {
                out.push(("sslmode".into(), "require".into()));
                continue;
            } else {
                k
            };
            out.push((k, percent_decode(v)?));
        }
    }
    Ok(out)
}

/// The password for an endpoint from the text of a password file (`host:port:db:user:password`, `*`
/// matches anything, `\` escapes `:` and `\`).
pub fn pgpass_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    // libpq matches a socket directory as "localhost".
    let host = if host.starts_with('/') {
        "localhost"
    } else {
        host
    };
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        if m(&fields[0], host) && m(&fields[1], port) && m(&fields[2], db) && m(&fields[3], user) {
            return Some(fields[4].clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn uri_with_everything_parses_and_hides_the_password() {
        let c = ConnInfo::parse(
            "postgresql://app%40corp:s3cr%3At@db.example.com:6432/my%20db?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(c.user(), "app@corp");
        assert_eq!(c.password().unwrap().expose(), "s3cr:t");
        assert_eq!(c.host(), "db.example.com");
        assert_eq!(c.port(), "6432");
        assert_eq!(c.dbname(), "my db");
        assert_eq!(c.sslmode(), "require");
        let shown = format!("{c} {c:?} {}", c.to_libpq_string());
        assert!(!shown.contains("s3cr"), "{shown}");
    }

    #[test]
    fn keyword_value_string_with_quotes_parses() {
        let c =
            ConnInfo::parse("host=/tmp port = 5433 dbname='a b\\'c' user=bob password=x").unwrap();
        assert_eq!(c.host(), "/tmp");
        assert_eq!(c.port(), "5433");
        assert_eq!(c.dbname(), "a b'c");
        assert_eq!(
            ConnInfo::parse(&c.to_libpq_string()).unwrap().dbname(),
            "a b'c"
        );
    }

    #[test]
    fn multi_host_and_ipv6_uri() {
        let c = ConnInfo::parse("postgres://[::1]:5433,h2/db").unwrap();
        assert_eq!(c.host(), "::1,h2");
        assert_eq!(c.port(), "5433,5432");
    }

    #[test]
    fn bad_strings_are_refused_with_the_reason() {
        assert!(matches!(
            ConnInfo::parse("host=x bogus=1"),
            Err(ConnInfoError::UnknownOption(k)) if k == "bogus"
        ));
        assert!(matches!(
            ConnInfo::parse("host"),
            Err(ConnInfoError::Malformed(_))
        ));
        assert!(matches!(
            ConnInfo::parse("postgresql://h:notaport/db"),
            Err(ConnInfoError::InvalidValue { .. })
        ));
        assert!(matches!(
            ConnInfo::parse("sslmode=sometimes"),
            Err(ConnInfoError::InvalidValue { .. })
        ));
    }

    #[test]
    fn environment_fills_only_what_is_missing() {
        let mut c = ConnInfo::parse("host=h1 dbname=d").unwrap();
        c.fill_from(|k| match k {
            "PGHOST" => Some("h2".into()),
            "PGUSER" => Some("u".into()),
            "PGPASSWORD" => Some("pw".into()),
            _ => None,
        });
        assert_eq!(c.host(), "h1");
        assert_eq!(c.user(), "u");
        assert_eq!(c.password().unwrap().expose(), "pw");
        let mut d = ConnInfo::parse("").unwrap();
        d.fill_from(no_env);
        assert_eq!(d.port(), "5432");
        assert_eq!(d.dbname(), d.user());
    }

    #[test]
    fn pgpass_matches_wildcards_and_escapes() {
        let text = "# comment\nother:5432:*:*:no\ndb\\:x:*:app:bob:pa\\:ss\n*:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "db:x", "5432", "app", "bob").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(
            pgpass_lookup(text, "z", "1", "d", "u").as_deref(),
            Some("fallback")
        );
    }
}
