//! The user's switch: shell commands run at the end of a cutover (or rollback), before its point of no
//! return — a load balancer's target group, a secret, DNS, a pooler's config. Each gets the new primary's
//! connection in its environment, both as `HIKKOSHI_NEW_PRIMARY_*` and as the `PG*` variables psql reads.
//! A hook that fails, hangs past the timeout or is cancelled aborts the cutover.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::conninfo::ConnInfo;

/// One hook's run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HookRun {
    pub command: String,
    pub seconds: f64,
}

/// What a hook needs to know.
pub struct HookContext<'a> {
    /// `cutover` or `rollback`.
    pub step: &'a str,
    pub migration_id: &'a str,
    pub fence_lsn: &'a str,
    pub new_primary: &'a ConnInfo,
    pub old_primary: &'a ConnInfo,
}

/// Runs `command` with `sh -c`; its output goes to hikkoshi's stderr (stdout stays the report's).
pub async fn run(
    command: &str,
    ctx: &HookContext<'_>,
    timeout: Duration,
    stop: &CancellationToken,
) -> Result<HookRun, String> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .env("HIKKOSHI_STEP", ctx.step)
        .env("HIKKOSHI_MIGRATION_ID", ctx.migration_id)
        .env("HIKKOSHI_FENCE_LSN", ctx.fence_lsn);
    for (prefix, info) in [
        ("HIKKOSHI_NEW_PRIMARY", ctx.new_primary),
        ("HIKKOSHI_OLD_PRIMARY", ctx.old_primary),
    ] {
        cmd.env(format!("{prefix}_URL"), info.to_libpq_string())
            .env(format!("{prefix}_HOST"), info.host())
            .env(format!("{prefix}_PORT"), info.port())
            .env(format!("{prefix}_DBNAME"), info.dbname())
            .env(format!("{prefix}_USER"), info.user());
    }
    cmd.env("PGHOST", ctx.new_primary.host())
        .env("PGPORT", ctx.new_primary.port())
        .env("PGDATABASE", ctx.new_primary.dbname())
        .env("PGUSER", ctx.new_primary.user())
        .env_remove("PGPASSWORD");
    for (k, v) in ctx.new_primary.child_env() {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("hook `{command}` could not start: {e}"))?;
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| format!("hook `{command}`: {e}"))?,
        _ = tokio::time::sleep(timeout) => {
            let _ = child.kill().await;
            return Err(format!("hook `{command}` did not finish within {}s and was killed", timeout.as_secs()));
        }
        _ = stop.cancelled() => {
            let _ = child.kill().await;
            return Err(format!("hook `{command}` was interrupted"));
        }
    };
    if !status.success() {
        return Err(format!(
            "hook `{command}` failed ({})",
            match status.code() {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".into(),
            }
        ));
    }
    Ok(HookRun {
        command: command.to_string(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
