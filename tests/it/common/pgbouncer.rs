//! PgBouncer from Debian, started by the test as the servers' user: transaction pooling, its `[databases]`
//! entry for `app` in an include file (what `deploy/pgbouncer/repoint.sh` rewrites), and an admin console.
//! The application connects only through it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hikkoshi::localserver::LocalServer;

use hikkoshi::localserver::PASSWORD;

pub struct Bouncer {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

impl Bouncer {
    /// A PgBouncer whose database `app` leads to `server`'s database `app`.
    pub fn start(server: &LocalServer) -> Bouncer {
        let port = super::free_port();
        let dir = std::env::temp_dir().join(format!("hikkoshi-pgbouncer-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("databases.ini"),
            format!(
                "[databases]\napp = host=127.0.0.1 port={} dbname=app\n",
                server.port
            ),
        )
        .unwrap();
        // trust for the clients; the servers get the password from the auth file (SCRAM)
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"app_writer\" \"{PASSWORD}\"\n\"postgres\" \"{PASSWORD}\"\n"),
        )
        .unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n%include {dir}/databases.ini\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\n\
                 auth_file = {dir}/userlist.txt\nadmin_users = postgres\npool_mode = transaction\n\
                 max_client_conn = 200\ndefault_pool_size = 20\nlogfile = {dir}/pgbouncer.log\n\
                 pidfile = {dir}/pgbouncer.pid\nignore_startup_parameters = extra_float_digits,options\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let user = std::env::var("HIKKOSHI_SERVER_USER").unwrap_or_else(|_| "postgres".into());
        let root = std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
        if root {
            let ok = Command::new("chown")
                .args(["-R", &user])
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the PgBouncer directory");
        }
        let mut cmd = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", &user, "--", "pgbouncer"]);
            c
        } else {
            Command::new("pgbouncer")
        };
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer (apt-get install pgbouncer)");
        let b = Bouncer { port, dir, child };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return b;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("PgBouncer did not start: {}", b.log());
    }

    /// The application's connection string: through the pooler.
    pub fn app_url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=app_writer password={PASSWORD} dbname=app sslmode=disable",
            self.port
        )
    }

    /// The admin console, for `--pgbouncer`.
    pub fn admin_url(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/pgbouncer?sslmode=disable",
            self.port
        )
    }

    /// The include file that holds the `[databases]` entry.
    pub fn include_file(&self) -> PathBuf {
        self.dir.join("databases.ini")
    }

    /// Rewrites the include file with `entries` (lines of `[databases]`) and RELOADs the pooler.
    pub async fn set_entries(&self, entries: &str) {
        std::fs::write(self.include_file(), format!("[databases]\n{entries}\n")).unwrap();
        super::connect(&self.admin_url())
            .await
            .simple_query("RELOAD")
            .await
            .unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
