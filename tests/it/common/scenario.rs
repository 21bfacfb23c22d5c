//! The set-up most tests share, as a builder: two servers and the database to migrate (`Pair`), that
//! database on each with the source loaded (`Sides`), and a following clone that has caught up (`Live`):
//!
//! ```ignore
//! let Live { pair, src, tgt, mut f } = Pair::new(15, 18).app().await.following().await;
//! let out = pair.hikkoshi(&["cutover", "--timeout", "10"]);
//! ```

use std::process::Output;

use hikkoshi::localserver::{LocalServer, PASSWORD};
use tokio_postgres::Client;

use super::live::{Follower, wait_in_sync, workload};
use super::{app_source, connect, create_db, server};

/// A source and a target server, and the name of the database migrated between them.
pub struct Pair {
    pub s: LocalServer,
    pub t: LocalServer,
    pub db: &'static str,
}

impl Pair {
    /// A server of each major version; the database is `app`.
    pub fn new(source: u32, target: u32) -> Pair {
        Pair::of(server(source), server(target))
    }

    /// Servers the test started itself (with options).
    pub fn of(s: LocalServer, t: LocalServer) -> Pair {
        Pair { s, t, db: "app" }
    }

    /// The database is `db`, not `app`.
    pub fn db(self, db: &'static str) -> Pair {
        Pair { db, ..self }
    }

    pub fn source_url(&self) -> String {
        self.s.url(self.db)
    }

    pub fn target_url(&self) -> String {
        self.t.url(self.db)
    }

    /// `args` with `--source` and `--target` after the command (its first word).
    pub fn args(&self, args: &[&str]) -> Vec<String> {
        let (command, rest) = args.split_first().expect("a hikkoshi command");
        let mut all = vec![command.to_string()];
        all.extend(["--source".into(), self.source_url()]);
        all.extend(["--target".into(), self.target_url()]);
        all.extend(rest.iter().map(|a| a.to_string()));
        all
    }

    /// Runs `hikkoshi <command> --source … --target … <rest of args>` between the two databases.
    pub fn hikkoshi(&self, args: &[&str]) -> Output {
        self.hikkoshi_env(args, &[])
    }

    /// Runs `hikkoshi verify`, which must find differences (exit 1) and report each of `needles`.
    pub fn verify_finds(&self, needles: &[&str]) {
        let out = self.hikkoshi(&["verify"]);
        let report = super::text(&out);
        assert_eq!(out.status.code(), Some(1), "{report}");
        for needle in needles {
            assert!(report.contains(needle), "{needle:?} not in:\n{report}");
        }
    }

    pub fn hikkoshi_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        super::hikkoshi_env(&strs(&self.args(args)), env)
    }

    /// The same in the background, its stderr in a log file.
    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Follower {
        Follower::spawn(&strs(&self.args(args)), env)
    }

    /// A following clone between the two databases (not waited for).
    pub fn follower(&self, env: &[(&str, &str)]) -> Follower {
        Follower::start(&self.s, &self.t, self.db, env)
    }

    /// The application fixture on the source (`app_source`); an empty target database.
    pub async fn app(self) -> Sides {
        let src = app_source(&self.s, self.db).await;
        self.sides(src).await
    }

    /// A source database with what `sql` creates; an empty target database.
    pub async fn source(self, sql: &str) -> Sides {
        let src = create_db(&self.s, self.db).await;
        src.batch_execute(sql).await.unwrap();
        self.sides(src).await
    }

    async fn sides(self, src: Client) -> Sides {
        let tgt = create_db(&self.t, self.db).await;
        Sides {
            pair: self,
            src,
            tgt,
        }
    }
}

/// The pair with its source loaded and its target database created, and a client on each.
pub struct Sides {
    pub pair: Pair,
    pub src: Client,
    pub tgt: Client,
}

impl Sides {
    /// `sql` run on the source.
    pub async fn then(self, sql: &str) -> Sides {
        self.src.batch_execute(sql).await.unwrap();
        self
    }

    /// The application's role `app_writer` (see `app_url`) on both servers, as a migration brings roles
    /// along beforehand, and `sql` run on the source: the tables it writes and its grants.
    pub async fn with_writer(self, sql: &str) -> Sides {
        for server in [&self.pair.s, &self.pair.t] {
            connect(&server.socket_url("postgres"))
                .await
                .batch_execute(&format!(
                    "CREATE ROLE app_writer LOGIN PASSWORD '{PASSWORD}'"
                ))
                .await
                .unwrap();
        }
        self.src.batch_execute(sql).await.unwrap();
        self
    }

    /// A following clone, caught up with the source.
    pub async fn following(self) -> Live {
        self.following_under_workload(0).await
    }

    /// A following clone, caught up after `rounds` of the mixed workload during its copy and stream.
    pub async fn following_under_workload(self, rounds: i32) -> Live {
        let mut f = self.pair.follower(&[]);
        if rounds > 0 {
            workload(self.pair.source_url(), 0, rounds).await;
        }
        wait_in_sync(&self.src, &self.tgt, &mut f).await;
        Live {
            pair: self.pair,
            src: self.src,
            tgt: self.tgt,
            f,
        }
    }
}

/// The pair with a following clone that has caught up. Bind `pair` when destructuring (`pair: _pair` if
/// unused): a pattern with `..` drops it at once, and with it both servers.
pub struct Live {
    pub pair: Pair,
    pub src: Client,
    pub tgt: Client,
    pub f: Follower,
}

/// The application's connection string on `server` (TCP, as the role `with_writer` creates).
pub fn app_url(server: &LocalServer) -> String {
    format!(
        "host=127.0.0.1 port={} user=app_writer password={PASSWORD} dbname=app sslmode=disable",
        server.port
    )
}

/// Whether the application role may write app.tickets on `server`: Ok, or the SQLSTATE it got.
pub async fn app_can_write(server: &LocalServer) -> Result<(), String> {
    let c = connect(&app_url(server)).await;
    c.batch_execute("INSERT INTO app.tickets (note) VALUES ('probe')")
        .await
        .map_err(|e| e.code().map(|c| c.code().to_string()).unwrap_or_default())
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A managed target (RDS's, Neon's shape) on `server`: the role `tadmin` may create databases and roles and
/// replicate, and may set `session_replication_role`, but is no superuser; it owns the database `app`.
/// Returns its connection string (TCP, password).
pub async fn managed_target(server: &LocalServer) -> String {
    let admin = connect(&server.socket_url("postgres")).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE tadmin LOGIN CREATEDB CREATEROLE REPLICATION PASSWORD '{PASSWORD}';
             GRANT SET ON PARAMETER session_replication_role TO tadmin;"
        ))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE app OWNER tadmin")
        .await
        .unwrap();
    format!(
        "host=127.0.0.1 port={} user=tadmin password={PASSWORD} dbname=app sslmode=disable",
        server.port
    )
}

/// A managed source (no superuser) on `server`: the role `migrator` may log in and replicate, and owns the
/// database `app`, which holds the app fixture (its tables without key set to REPLICA IDENTITY FULL);
/// `app_writer` is the application's role. Returns migrator's connection string and a session as it.
pub async fn managed_source(server: &LocalServer) -> (String, Client) {
    let admin = connect(&server.socket_url("postgres")).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE migrator LOGIN REPLICATION PASSWORD '{PASSWORD}';
             CREATE ROLE app_writer LOGIN PASSWORD '{PASSWORD}';"
        ))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE app OWNER migrator")
        .await
        .unwrap();
    let url = format!(
        "host=127.0.0.1 port={} user=migrator password={PASSWORD} dbname=app sslmode=disable",
        server.port
    );
    let src = connect(&url).await;
    src.batch_execute(super::FIXTURE_APP).await.unwrap();
    src.batch_execute(
        "ALTER TABLE app.audit_log REPLICA IDENTITY FULL; ALTER TABLE app.clicks REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    (url, src)
}
