//! The OCI image that `deploy/image/build.sh` builds, run with podman as a task runs it: `check`, then
//! `clone --follow --listen` against servers on the host network, stopped by SIGTERM as ECS stops a task
//! and started again, `status --listen`, and `cutover` from a second container while the follower streams.
//! The source takes only TLS (`sslmode=verify-full`, its CA mounted into the container), so the image's
//! pg_dump and its CA handling are used for real. The connection strings reach the containers through the
//! environment only; the password must not show in a container's arguments, its logs, `/metrics` or
//! `/api/status`.
//!
//! On a machine where podman cannot start a container this test fails with podman's own error: it never
//! passes without having run the migration.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use hikkoshi::localserver::{PASSWORD, ServerOptions};

use crate::common::live::{Follower, wait_in_sync, workload};
use crate::common::scenario::*;
use crate::common::*;

/// Where the source's CA certificate is mounted in the containers, as the README says to mount RDS's bundle.
const CA_IN_CONTAINER: &str = "/etc/hikkoshi/ca.pem";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `deploy/image/build.sh` and returns the image name it prints last.
fn build_image() -> String {
    let out = Command::new("bash")
        .arg(repo().join("deploy/image/build.sh"))
        .stdin(Stdio::null())
        .output()
        .expect("running deploy/image/build.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deploy/image/build.sh failed ({:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    let name = stdout.lines().last().unwrap_or_default().trim().to_string();
    assert!(
        name.starts_with("localhost/hikkoshi:"),
        "build.sh's last line is not an image name: {name:?}\n{stderr}"
    );
    eprintln!(
        "{}",
        stderr
            .lines()
            .filter(|l| l.starts_with("== built"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    name
}

/// podman, with `deploy/image/containers.conf` when this machine needs it to start a container.
struct Podman {
    conf: Option<PathBuf>,
}

impl Podman {
    /// The first configuration in which `podman run IMAGE --version` works: podman's own, then
    /// `deploy/image/containers.conf` (runc instead of crun, ulimits within the machine's hard limits).
    fn able_to_run(image: &str) -> Podman {
        let mut errors = Vec::new();
        for conf in [None, Some(repo().join("deploy/image/containers.conf"))] {
            let podman = Podman { conf };
            let out = podman
                .command()
                .args(["run", "--rm", "--network", "host", image, "--version"])
                .output()
                .expect("running podman");
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hikkoshi") {
                eprintln!("podman runs the image with configuration {:?}", podman.conf);
                return podman;
            }
            errors.push(format!("with {:?}:\n{}", podman.conf, text(&out)));
        }
        panic!(
            "podman cannot run a container on this machine, so the image cannot be tested here:\n{}",
            errors.join("\n")
        );
    }

    fn command(&self) -> Command {
        let mut c = Command::new("podman");
        if let Some(conf) = &self.conf {
            c.env("CONTAINERS_CONF", conf);
        }
        c.stdin(Stdio::null());
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("running podman")
    }
}

/// A migration run from containers of `image`: the connection strings, given as environment.
struct Task<'a> {
    podman: &'a Podman,
    image: &'a str,
    ca_file: String,
    source: String,
    target: String,
}

impl Task<'_> {
    /// `podman run --name NAME --network host -e HIKKOSHI_SOURCE -e HIKKOSHI_TARGET -v CA IMAGE ARGS`: the
    /// values come from podman's environment, so they are on no command line.
    fn run(&self, name: &str, args: &[&str]) -> Command {
        let mut c = self.podman.command();
        c.args(["run", "--name", name, "--network", "host"])
            .args(["-e", "HIKKOSHI_SOURCE", "-e", "HIKKOSHI_TARGET"])
            .args([
                "-v",
                &format!("{}:{CA_IN_CONTAINER}:ro", self.ca_file),
                self.image,
            ])
            .args(args)
            .env("HIKKOSHI_SOURCE", &self.source)
            .env("HIKKOSHI_TARGET", &self.target);
        c
    }

    /// Runs a container to its end; the container is kept for inspection until the guard drops.
    fn once(&self, what: &str, args: &[&str]) -> (Container<'_>, Output) {
        let container = Container::named(self.podman, what);
        let out = self
            .run(&container.name, args)
            .output()
            .expect("running podman");
        (container, out)
    }

    /// A container in the background, attached: the `podman run` process lives as long as the container
    /// and exits with its status. Its stderr (hikkoshi's log) is the follower's log, its stdout the report.
    fn start(&self, what: &str, args: &[&str]) -> Running<'_> {
        let container = Container::named(self.podman, what);
        let dir = std::env::temp_dir();
        let log = dir.join(format!("{}.stderr", container.name));
        let report = dir.join(format!("{}.stdout", container.name));
        let child = self
            .run(&container.name, args)
            .stdout(std::fs::File::create(&report).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting podman run");
        Running {
            container,
            follower: Follower { child, log },
            report,
        }
    }
}

/// A named container, removed (killed first if it still runs) when dropped.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl<'a> Container<'a> {
    fn named(podman: &'a Podman, what: &str) -> Container<'a> {
        let name = format!("hikkoshi-it-{}-{what}", std::process::id());
        let _ = podman.output(&["rm", "--force", "--time", "0", &name]);
        Container { podman, name }
    }

    fn inspect(&self) -> serde_json::Value {
        let out = self.podman.output(&["inspect", &self.name]);
        assert!(out.status.success(), "podman inspect: {}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone()
    }

    /// `podman logs`: the container's stdout and stderr.
    fn logs(&self) -> String {
        let out = self.podman.output(&["logs", &self.name]);
        assert!(out.status.success(), "podman logs: {}", text(&out));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The password is in no argument of the container and in none of its log lines; the connection
    /// strings are in its environment, which is how they came in.
    fn assert_keeps_the_password_out_of_sight(&self) {
        let inspect = self.inspect();
        for field in [
            &inspect["Args"],
            &inspect["Path"],
            &inspect["Config"]["Cmd"],
            &inspect["Config"]["Entrypoint"],
        ] {
            assert!(
                !field.to_string().contains(PASSWORD),
                "the password is in {}'s arguments: {field}",
                self.name
            );
        }
        let env = inspect["Config"]["Env"].to_string();
        assert!(env.contains("HIKKOSHI_SOURCE=") && env.contains("HIKKOSHI_TARGET="));
        let logs = self.logs();
        assert!(
            !logs.contains(PASSWORD),
            "the password is in {}'s logs:\n{logs}",
            self.name
        );
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .output(&["rm", "--force", "--time", "0", &self.name]);
    }
}

/// A container started with `Task::start`. `container` is dropped first: a test that fails leaves no
/// container running.
struct Running<'a> {
    container: Container<'a>,
    follower: Follower,
    report: PathBuf,
}

impl Running<'_> {
    /// `podman stop`: SIGTERM, as ECS stops a task (SIGKILL only after 120 s); then the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let out = self
            .container
            .podman
            .output(&["stop", "--time", "120", &self.container.name]);
        assert!(out.status.success(), "podman stop: {}", text(&out));
        self.follower.child.wait().unwrap()
    }

    fn report(&self) -> String {
        std::fs::read_to_string(&self.report).unwrap_or_default()
    }
}

/// The status page's JSON, /metrics and /health on `port`: none has the password.
fn assert_pages_keep_the_password_out(port: u16) {
    for path in ["/api/status", "/metrics", "/health", "/"] {
        let (code, body) = get(port, path).unwrap_or_else(|| panic!("{path} did not answer"));
        assert!(code == 200 || code == 503, "{path}: {code} {body}");
        assert!(
            !body.contains(PASSWORD),
            "the password is in {path}:\n{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_migrates_over_tls_stops_on_sigterm_resumes_and_cuts_over() {
    let image = build_image();
    let podman = Podman::able_to_run(&image);
    let config = podman.output(&["image", "inspect", &image]);
    assert!(config.status.success(), "{}", text(&config));
    let config: serde_json::Value = serde_json::from_slice(&config.stdout).unwrap();
    assert_eq!(config[0]["Config"]["User"], "10001:10001", "{config:#}");
    let size = config[0]["Size"].as_u64().unwrap();
    eprintln!("image {image}: {} MB", size / 1_000_000);
    assert!(size < 100_000_000, "the image is {size} bytes, over 100 MB");

    // the source accepts only TLS, with a certificate for 127.0.0.1 from a test CA
    let ca = TestCa::new("hikkoshi image test CA");
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(ca_dir.path());
    let s = server_with(
        15,
        ServerOptions {
            tls: Some(ca.server_cert(&["127.0.0.1"])),
            tls_only: true,
            ..Default::default()
        },
    );
    let Sides { pair, src, tgt } = Pair::of(s, server(18)).app().await;
    let source_socket = pair.s.socket_url("app");
    let task = Task {
        podman: &podman,
        image: &image,
        ca_file,
        source: format!(
            "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=app sslmode=verify-full \
             sslrootcert={CA_IN_CONTAINER}",
            pair.s.port
        ),
        target: pair.target_url(),
    };

    // the preflight, pg_dump included, over verified TLS from inside the container
    let (check, out) = task.once("check", &["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ready: no blocker"),
        "{}",
        text(&out)
    );
    check.assert_keeps_the_password_out_of_sight();
    drop(check);

    // the follower, as the ECS service runs it: JSON logs, the status page on the host network
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let follow_args = [
        "--log-format",
        "json",
        "clone",
        "--follow",
        "--jobs",
        "2",
        "--listen",
        &listen,
    ];
    let mut first = task.start("follow-1", &follow_args);
    wait_for(port, "/health", 120, |c, b| {
        c == 200 && b.contains("streaming")
    })
    .await;
    workload(source_socket.clone(), 0, 30).await;
    wait_in_sync(&src, &tgt, &mut first.follower).await;
    assert_same_rows_and_schema(&src, &tgt).await;
    assert_pages_keep_the_password_out(port);

    // SIGTERM: the follower drains and exits 0, saying where it stopped
    let status = first.stop();
    let log = first.follower.log();
    assert!(
        status.success(),
        "SIGTERM ends the follower cleanly:\n{log}"
    );
    assert_eq!(first.container.inspect()["State"]["ExitCode"], 0);
    assert!(
        first.report().contains("follower stopped:"),
        "{}\n{log}",
        first.report()
    );
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not one JSON object ({e}): {line}"));
        assert!(event["fields"].is_object(), "{line}");
    }
    assert!(
        log.contains("stopping: finishing the transaction in flight"),
        "{log}"
    );
    first.container.assert_keeps_the_password_out_of_sight();
    drop(first);

    // `status --listen`, from another container: the stream has stopped
    let status_port = free_port();
    let status_listen = format!("127.0.0.1:{status_port}");
    let watcher = task.start("status", &["status", "--listen", &status_listen]);
    let (_, health) = wait_for(status_port, "/health", 60, |c, _| c == 503).await;
    assert!(health.contains("streaming has stopped"), "{health}");
    assert_pages_keep_the_password_out(status_port);
    watcher.container.assert_keeps_the_password_out_of_sight();
    drop(watcher);

    // started again, the follower resumes; writes made while it was stopped arrive
    workload(source_socket.clone(), 30, 20).await;
    let mut second = task.start("follow-2", &follow_args);
    wait_in_sync(&src, &tgt, &mut second.follower).await;
    workload(source_socket.clone(), 50, 20).await;
    wait_in_sync(&src, &tgt, &mut second.follower).await;

    // the cutover from a second container, while the follower streams; the follower ends by itself
    let (cutover, out) = task.once("cutover", &["cutover"]);
    assert_success(&out);
    cutover.assert_keeps_the_password_out_of_sight();
    let status = second.follower.exits_by_itself().await;
    assert!(status.success(), "{}", second.follower.log());
    assert!(
        second.report().contains("the stream ended because"),
        "{}",
        second.report()
    );
    second.container.assert_keeps_the_password_out_of_sight();

    // the fence ended the source's sessions: compare on new ones
    let src = connect(&source_socket).await;
    let tgt = connect(&pair.t.socket_url("app")).await;
    assert_same_rows_and_schema(&src, &tgt).await;
    assert_sequences_at_least(&src, &tgt).await;
}
