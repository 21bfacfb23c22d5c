//! The `hikkoshi` command: argument parsing and printing; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use hikkoshi::error::Error;

#[derive(Parser)]
#[command(
    name = "hikkoshi",
    version,
    about = "Move a live PostgreSQL database to another server, with proof that nothing was lost"
)]
struct Cli {
    /// Log lines as text (default) or JSON objects.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// What `cutover` and `rollback` share.
#[derive(clap::Args)]
struct SwitchArgs {
    #[arg(long, env = "HIKKOSHI_SOURCE", hide_env_values = true)]
    source: String,
    #[arg(long, env = "HIKKOSHI_TARGET", hide_env_values = true)]
    target: String,
    /// Shell command that switches the application (load balancer, secret, DNS, pooler); gets the new
    /// primary in HIKKOSHI_NEW_PRIMARY_* and PG* variables. Repeatable; run in order.
    /// (HIKKOSHI_HOOKS: one hook a line, used when no --hook is given; a hook may also run a mounted
    /// file: `sh /run/secrets/switch.sh`.) On an undo, each hook that ran runs again with the old primary
    /// as HIKKOSHI_NEW_PRIMARY_* and HIKKOSHI_STEP=undo.
    #[arg(long)]
    hook: Vec<String>,
    /// PgBouncer admin console (postgres://user@host:port/pgbouncer); repeatable. Its databases that lead to
    /// the old primary are PAUSEd just before the fence and RELOADed and RESUMEd after the hooks (which
    /// repoint it: see deploy/pgbouncer/repoint.sh). HIKKOSHI_PGBOUNCER: one URL a line.
    #[arg(
        long,
        env = "HIKKOSHI_PGBOUNCER",
        hide_env_values = true,
        value_delimiter = '\n'
    )]
    pgbouncer: Vec<String>,
    /// Fence only once the new primary trails the old one by less than this (e.g. 1MB).
    #[arg(long, default_value = "1MB", value_parser = parse_size)]
    max_lag: i64,
    /// Seconds to wait for the lag to drop, for the catch-up after the fence, and for each hook.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// What to compare once fenced: the tables changed since the copy (quick), all, or nothing.
    #[arg(long, value_enum, default_value = "quick")]
    verify: VerifyArg,
    #[arg(long, short = 'j', default_value_t = 4)]
    jobs: usize,
    #[arg(long)]
    json: bool,
    /// Cut over although a LOGIN role of the source cannot log in on the target (its password could not
    /// be carried: see `clone --role-password`).
    #[arg(long)]
    allow_nologin_roles: bool,
}

impl SwitchArgs {
    /// The library's options, with a signal handler that cancels them.
    fn options(self, reverse: bool) -> hikkoshi::cutover::CutoverOptions {
        let stop = tokio_util::sync::CancellationToken::new();
        spawn_signal_handler(stop.clone());
        hikkoshi::cutover::CutoverOptions {
            source: self.source,
            target: self.target,
            hooks: hooks_or_env(self.hook),
            reverse,
            max_lag: self.max_lag,
            timeout: std::time::Duration::from_secs(self.timeout),
            verify: self.verify.into(),
            jobs: self.jobs.max(1),
            allow_nologin_roles: self.allow_nologin_roles,
            pgbouncer: pooler_urls(self.pgbouncer),
            stop,
        }
    }
}

/// `--pgbouncer` URLs without the blank lines HIKKOSHI_PGBOUNCER may hold.
fn pooler_urls(given: Vec<String>) -> Vec<String> {
    given.into_iter().filter(|u| !u.trim().is_empty()).collect()
}

/// The `--hook`s given, or else the lines of HIKKOSHI_HOOKS (a task's environment, or a secret).
fn hooks_or_env(given: Vec<String>) -> Vec<String> {
    if !given.is_empty() {
        return given;
    }
    std::env::var("HIKKOSHI_HOOKS")
        .map(|v| {
            v.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Clone, Copy, ValueEnum)]
enum VerifyArg {
    Quick,
    Full,
    None,
}

impl From<VerifyArg> for hikkoshi::cutover::VerifyMode {
    fn from(v: VerifyArg) -> Self {
        match v {
            VerifyArg::Quick => Self::Quick,
            VerifyArg::Full => Self::Full,
            VerifyArg::None => Self::None,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Copy the source into an empty target database: schema, rows (one consistent snapshot, in parallel),
    /// indexes, constraints and sequences. Running it again resumes an interrupted clone.
    Clone(CloneArgs),
    /// The whole story on two throwaway local servers: an application database (vector embeddings, large
    /// JSON, sequences) under a live write load, check → clone --follow → verify → cutover, ending with the
    /// measured write pause. Cleans up after itself.
    Demo {
        /// Leave both servers running at the end and print how to connect.
        #[arg(long)]
        keep: bool,
        /// Data size: 1 is about 60 MB.
        #[arg(long, default_value_t = 1)]
        scale: u32,
        /// Serve the status page while the demo runs: PORT (loopback) or HOST:PORT.
        #[arg(long, value_parser = parse_listen)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Preflight: checks both servers for everything a migration needs and prints each problem with its
    /// fix. Exit 0 when nothing blocks, 1 when something does. Creates nothing.
    Check {
        #[arg(long, env = "HIKKOSHI_SOURCE", hide_env_values = true)]
        source: String,
        #[arg(long, env = "HIKKOSHI_TARGET", hide_env_values = true)]
        target: String,
        #[arg(long)]
        include: Vec<String>,
        #[arg(long)]
        exclude: Vec<String>,
        #[arg(long, env = "HIKKOSHI_PG_BIN")]
        pg_bin: Option<PathBuf>,
        /// Check for a plain `clone` (no change stream): what only `--follow` and the cutover need (replica
        /// identity, logged tables, the fence) is reported without blocking.
        #[arg(long)]
        no_follow: bool,
        /// PgBouncer admin console the cutover will pause (repeatable): checks it answers, has an entry for
        /// the source's database, and pools by transaction.
        #[arg(
            long,
            env = "HIKKOSHI_PGBOUNCER",
            hide_env_values = true,
            value_delimiter = '\n'
        )]
        pgbouncer: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Compare source and target: row counts and content hashes per key range, computed on each server;
    /// differences narrowed to the rows; sequences at or past the source. Exit 1 on any difference.
    Verify {
        #[arg(long, env = "HIKKOSHI_SOURCE", hide_env_values = true)]
        source: String,
        #[arg(long, env = "HIKKOSHI_TARGET", hide_env_values = true)]
        target: String,
        #[arg(long)]
        include: Vec<String>,
        #[arg(long)]
        exclude: Vec<String>,
        /// Tables compared at once.
        #[arg(long, short = 'j', default_value_t = 4)]
        jobs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show the migration recorded in the target: phase, tables and chunks, stream, cutover, recent events.
    Status {
        #[arg(long, env = "HIKKOSHI_TARGET", hide_env_values = true)]
        target: String,
        #[arg(long)]
        json: bool,
        /// Instead of printing once, serve the status page, /metrics and /health until interrupted: PORT
        /// (loopback) or HOST:PORT. Works from any machine that reaches the target.
        #[arg(long, value_parser = parse_listen)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Switch the application from the source to the target while `clone --follow` streams: fence writes
    /// on the source, wait until the target has applied everything, move sequences, verify, run the hooks.
    /// Any failure before the hooks are done undoes the fence. Exit 1 when it was undone.
    Cutover {
        #[command(flatten)]
        switch: SwitchArgs,
        /// Stream the target's changes back to the source afterwards, so that `hikkoshi rollback` loses
        /// nothing.
        #[arg(long)]
        reverse: bool,
    },
    /// Switch back to the source after `cutover --reverse`: fence the target, wait until the source has
    /// every change written on the target since, move sequences back, verify, run the hooks.
    Rollback {
        #[command(flatten)]
        switch: SwitchArgs,
    },
    /// Remove hikkoshi's slots, publications and state schemas on both servers (the copied tables stay).
    Clean {
        #[arg(long, env = "HIKKOSHI_SOURCE", hide_env_values = true)]
        source: String,
        #[arg(long, env = "HIKKOSHI_TARGET", hide_env_values = true)]
        target: String,
        /// Also when a hikkoshi process still works on the migration: end its sessions first.
        #[arg(long)]
        force: bool,
    },
    /// Print a completion script for a shell: `hikkoshi completions bash > /etc/bash_completion.d/hikkoshi`
    /// (zsh: into a directory of $fpath as `_hikkoshi`; fish: ~/.config/fish/completions/hikkoshi.fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `hikkoshi man > /usr/local/share/man/man1/hikkoshi.1`; with --dir,
    /// write one page per command there (hikkoshi.1, hikkoshi-clone.1, ...).
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// The arguments of `hikkoshi clone`.
#[derive(clap::Args)]
struct CloneArgs {
    /// Source connection string (URI or key=value); also HIKKOSHI_SOURCE.
    #[arg(long, env = "HIKKOSHI_SOURCE", hide_env_values = true)]
    source: String,
    /// Target connection string (URI or key=value); also HIKKOSHI_TARGET.
    #[arg(long, env = "HIKKOSHI_TARGET", hide_env_values = true)]
    target: String,
    /// Parallel copy workers and index builds.
    #[arg(long, short = 'j', default_value_t = 4)]
    jobs: usize,
    /// Copy only tables matching schema.table (wildcards * and ?); repeatable.
    #[arg(long)]
    include: Vec<String>,
    /// Leave out tables matching schema.table (wildcards * and ?); repeatable; wins over --include.
    #[arg(long)]
    exclude: Vec<String>,
    /// Split tables larger than this into chunks of about this size (e.g. 256MB, 1GB).
    #[arg(long, default_value = "256MB", value_parser = parse_size)]
    chunk_size: i64,
    /// Directories holding pg_dump and pg_restore, separated by ':' like PATH; hikkoshi picks the
    /// version that suits source and target (default: PATH and the usual install places).
    #[arg(long, env = "HIKKOSHI_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// Memory each index build on the target may use to sort (PostgreSQL's maintenance_work_mem);
    /// `--jobs` builds run at once.
    #[arg(long, default_value = "512MB", value_parser = parse_memory_setting)]
    maintenance_work_mem: String,
    /// After the copy, stream every change from the source and apply it on the target until
    /// SIGINT/SIGTERM (which drain, record and exit 0). Running it again resumes.
    #[arg(long)]
    follow: bool,
    /// Serve a status page (/), Prometheus metrics (/metrics) and /health on this address while
    /// running: PORT (loopback) or HOST:PORT.
    #[arg(long, value_parser = parse_listen)]
    listen: Option<std::net::SocketAddr>,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Predict instead of cloning: time the schema, a sample of every table copied into the target
    /// and its indexes built there (in a transaction that is rolled back), and print the predicted
    /// copy, index and total time with --jobs workers. Creates nothing on either server. Exit 1 when
    /// the preflight finds a blocker.
    #[arg(long, conflicts_with_all = ["follow", "listen"])]
    rehearse: bool,
    /// With --rehearse: bytes sampled from each table (all of a smaller table).
    #[arg(long, default_value = "32MB", value_parser = parse_size, requires = "rehearse")]
    sample_size: i64,
    /// Leave roles alone: every object belongs to the target's role and no grant is copied (without it,
    /// the roles that own or are granted the objects are created on the target first, with their
    /// memberships, settings and, where the source lets them be read, their passwords).
    #[arg(long)]
    no_roles: bool,
    /// ROLE=env:VARIABLE or ROLE=file:PATH: the password of a role whose verifier cannot be read on the
    /// source (managed servers); sent to the target as a SCRAM verifier. Repeatable.
    #[arg(long, value_name = "ROLE=env:VAR|file:PATH")]
    role_password: Vec<String>,
    /// OLD=NEW: create the source's role OLD as NEW on the target (owners, grants, memberships and a SCRAM
    /// password follow it). Repeatable.
    #[arg(long, value_name = "OLD=NEW", conflicts_with = "no_roles")]
    role_map: Vec<String>,
}

/// `PORT` (on loopback) or `HOST:PORT`.
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("\"{s}\" is not PORT or HOST:PORT (e.g. 9187 or 127.0.0.1:9187)"))
}

fn parse_size(s: &str) -> Result<i64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("\"{s}\" is not a size (e.g. 64MB, 1GB)"))?;
    let mult: f64 = match unit.trim() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024f64.powi(4),
        _ => return Err(format!("\"{s}\": unknown unit (use B, kB, MB, GB or TB)")),
    };
    Ok((n * mult) as i64)
}

/// A memory setting as PostgreSQL writes it (`512MB`, `1GB`, `65536kB`): digits and a unit, nothing else.
fn parse_memory_setting(s: &str) -> Result<String, String> {
    let digits = s.chars().take_while(char::is_ascii_digit).count();
    let unit = &s[digits..];
    if digits > 0 && matches!(unit, "" | "kB" | "MB" | "GB" | "TB") {
        Ok(s.to_string())
    } else {
        Err(format!("\"{s}\" is not a memory setting like 512MB or 1GB"))
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HIKKOSHI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "hikkoshi", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            let command = <Cli as clap::CommandFactory>::command();
            let written = match dir {
                Some(dir) => clap_mangen::generate_to(command, dir),
                None => clap_mangen::Man::new(command).render(&mut std::io::stdout()),
            };
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hikkoshi: error: writing the manual pages: {e}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    if std::env::var_os("HIKKOSHI_PARSE_ONLY").is_some_and(|v| v == "1") {
        return parse_only(&cli.command);
    }
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hikkoshi: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", render(&e));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// A report as JSON on stdout, or as the text people read.
fn print_report<R: serde::Serialize + std::fmt::Display>(report: &R, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    } else {
        print!("{report}");
    }
}

/// SIGINT or SIGTERM: stop gracefully (the copy stops where it is, resumable; the follower drains).
fn spawn_signal_handler(stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: finishing the transaction in flight");
        stop.cancel();
    });
}

/// The error, its causes, and what to do.
fn render(e: &Error) -> String {
    let mut out = format!("hikkoshi: error: {e}");
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let line = c.to_string();
        // tokio-postgres says only "db error" and puts the server's message in its source
        if line != "db error" {
            out.push_str(&format!("\n  caused by: {line}"));
        }
        if let Some(db) = c.downcast_ref::<tokio_postgres::error::DbError>() {
            if let Some(d) = db.detail() {
                out.push_str(&format!("\n  detail: {d}"));
            }
            if let Some(w) = db.where_() {
                out.push_str(&format!("\n  where: {w}"));
            }
        }
        cause = c.source();
    }
    if let Some(h) = e.hint() {
        out.push_str(&format!("\n  what to do: {h}"));
    }
    out
}

/// `hikkoshi clone` (or `clone --rehearse`), with its report.
async fn clone(args: CloneArgs) -> Result<ExitCode, Error> {
    let CloneArgs {
        source,
        target,
        jobs,
        include,
        exclude,
        chunk_size,
        pg_bin,
        maintenance_work_mem,
        follow,
        listen,
        json,
        rehearse,
        sample_size,
        no_roles,
        role_password,
        role_map,
    } = args;
    if rehearse {
        let report = hikkoshi::rehearse::run(&hikkoshi::rehearse::RehearseOptions {
            source,
            target,
            jobs: jobs.max(1),
            include,
            exclude,
            chunk_bytes: chunk_size,
            pg_bin,
            maintenance_work_mem,
            sample_bytes: sample_size.max(1 << 16),
        })
        .await?;
        print_report(&report, json);
        return Ok(if report.blockers.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let stop = tokio_util::sync::CancellationToken::new();
    spawn_signal_handler(stop.clone());
    let monitor = match listen {
        Some(addr) => Some(hikkoshi::monitor::serve(addr, target.clone()).await?),
        None => None,
    };
    let opts = hikkoshi::clone::CloneOptions {
        maintenance_work_mem,
        follow,
        roles: !no_roles,
        role_passwords: role_password,
        role_map,
        stop,
        source,
        target,
        jobs: jobs.max(1),
        include,
        exclude,
        chunk_bytes: chunk_size,
        pg_bin,
    };
    let report = hikkoshi::clone::run(&opts).await;
    if let Some(m) = monitor {
        m.shutdown().await;
    }
    let report = report?;
    print_clone(&report, json);
    Ok(ExitCode::SUCCESS)
}

/// The clone's report: JSON, or a summary line, how the stream ended, and the warnings.
fn print_clone(report: &hikkoshi::clone::CloneReport, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    } else {
        if !report.already_done {
            println!(
                "clone {} {}: {} table(s), {} chunk(s), {} rows, {} copied; {} sequence(s) set; \
                 snapshot at source LSN {}; {:.1}s",
                report.migration_id,
                if report.resumed {
                    "resumed and complete"
                } else {
                    "complete"
                },
                report.tables.len(),
                report.chunks_copied,
                report.rows,
                hikkoshi::progress::human_bytes(report.bytes),
                report.sequences,
                report.snapshot_lsn,
                report.seconds
            );
        }
        match &report.applied_lsn {
            Some(_) if report.ended_by.is_some() => println!(
                "the stream ended because the migration's {} is done: {} transaction(s) applied",
                report.ended_by.map(|s| s.as_str()).unwrap_or_default(),
                report.transactions_applied
            ),
            Some(lsn) => println!(
                "follower stopped: {} transaction(s) applied, target in sync with source LSN {lsn}; \
                 run the same command again to resume streaming",
                report.transactions_applied
            ),
            None if report.already_done => println!(
                "clone {} is already complete on this target; nothing to do (`hikkoshi clean` \
                 removes its state)",
                report.migration_id
            ),
            None => {}
        }
        for w in &report.warnings {
            println!("warning: {w}");
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, Error> {
    match command {
        // printed before any runtime exists (see `main`)
        Command::Completions { .. } | Command::Man { .. } => Ok(ExitCode::SUCCESS),
        Command::Clone(args) => clone(args).await,
        Command::Check {
            source,
            target,
            include,
            exclude,
            pg_bin,
            no_follow,
            pgbouncer,
            json,
        } => {
            let report = hikkoshi::check::run(&hikkoshi::check::CheckOptions {
                source,
                target,
                include,
                exclude,
                pg_bin,
                follow: !no_follow,
                pgbouncer: pooler_urls(pgbouncer),
            })
            .await?;
            print_report(&report, json);
            Ok(if report.blocked() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Verify {
            source,
            target,
            include,
            exclude,
            jobs,
            json,
        } => {
            let report = hikkoshi::verify::run(&hikkoshi::verify::VerifyOptions {
                source,
                target,
                include,
                exclude,
                jobs,
            })
            .await?;
            print_report(&report, json);
            Ok(if report.equal() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Status {
            target,
            json: _,
            listen: Some(addr),
        } => {
            let stop = tokio_util::sync::CancellationToken::new();
            spawn_signal_handler(stop.clone());
            hikkoshi::monitor::serve_until(addr, target, stop).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            keep,
            scale,
            listen,
        } => {
            let stop = tokio_util::sync::CancellationToken::new();
            spawn_signal_handler(stop.clone());
            hikkoshi::demo::run(
                &hikkoshi::demo::DemoOptions {
                    keep,
                    scale,
                    listen,
                },
                stop,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            target,
            json,
            listen: None,
        } => {
            let status = hikkoshi::status::read(&target).await?;
            print_report(&status, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Cutover { switch, reverse } => {
            let json = switch.json;
            let report = hikkoshi::cutover::cutover(&switch.options(reverse)).await?;
            print_report(&report, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollback { switch } => {
            let json = switch.json;
            let report = hikkoshi::cutover::rollback(&switch.options(false)).await?;
            print_report(&report, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Clean {
            source,
            target,
            force,
        } => {
            let c = hikkoshi::clean::run(&source, &target, force).await?;
            println!(
                "removed {} slot(s), {} publication(s){}{}",
                c.slots.len(),
                c.publications.len(),
                if c.state_schema {
                    " and hikkoshi's state schemas"
                } else {
                    "; no hikkoshi state on the target"
                },
                if c.sessions_ended > 0 {
                    format!(
                        "; ended {} session(s) of a running hikkoshi",
                        c.sessions_ended
                    )
                } else {
                    String::new()
                }
            );
            for side in &c.fences_lifted {
                println!(
                    "lifted the cutover's write fence on the {side}: it accepts writes again (after a \
                     cutover, the application belongs on the other server)"
                );
            }
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `HIKKOSHI_PARSE_ONLY=1`: the command line and the environment it reads have parsed; check what can be
/// checked without a server (connection strings, --role-password, --role-map), run nothing, exit 0 or 2.
fn parse_only(command: &Command) -> ExitCode {
    let mut urls: Vec<&str> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    match command {
        Command::Clone(a) => {
            urls.extend([a.source.as_str(), a.target.as_str()]);
            for spec in &a.role_password {
                if let Err(e) = hikkoshi::roles::given_password(spec) {
                    errors.push(e.to_string());
                }
            }
            if let Err(e) = hikkoshi::roles::role_map(&a.role_map) {
                errors.push(e.to_string());
            }
        }
        Command::Check { source, target, .. }
        | Command::Verify { source, target, .. }
        | Command::Clean { source, target, .. } => urls.extend([source.as_str(), target.as_str()]),
        Command::Status { target, .. } => urls.push(target),
        Command::Cutover { switch, .. } | Command::Rollback { switch } => {
            urls.extend([switch.source.as_str(), switch.target.as_str()])
        }
        Command::Demo { .. } | Command::Completions { .. } | Command::Man { .. } => {}
    }
    for url in urls {
        if let Err(e) = hikkoshi::conninfo::ConnInfo::parse(url) {
            errors.push(format!("a connection string does not parse: {e}"));
        }
    }
    if errors.is_empty() {
        eprintln!("hikkoshi: HIKKOSHI_PARSE_ONLY=1: the command line parses; nothing was run");
        ExitCode::SUCCESS
    } else {
        for e in errors {
            eprintln!("hikkoshi: error: {e}");
        }
        ExitCode::from(2)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("1gb"), Ok(1 << 30));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("12 parsecs").is_err());
    }
}
