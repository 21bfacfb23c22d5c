//! Failpoints for crash tests: `HIKKOSHI_FAILPOINT=name` (or `name:N`, the N-th time it is reached) makes
//! the process die on the spot at that point, as `kill -9` would: no destructor, no cleanup, no goodbye to
//! the servers. Unset, a failpoint costs one atomic load.
//!
//! Pauses, for fault tests that must act at a precise point (restart a server, send a signal):
//! `HIKKOSHI_PAUSE=name` (or `name:N`) makes the process say `hikkoshi: paused at name` on stderr and wait
//! there for `HIKKOSHI_PAUSE_SECS` seconds (default 5), or until the run is cancelled.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The failpoints and pauses, by name: the code hits them, the tests arm them (`name` or `name:N`).
/// The applier committed a batch on the target, before it noted the commit's WAL position.
pub const APPLY_AFTER_COMMIT: &str = "apply.after-commit";
/// The applier wrote a batch and its applied LSN, before its COMMIT.
pub const APPLY_BEFORE_COMMIT: &str = "apply.before-commit";
/// The applier ran a DDL command from the source on the target, before the batch's commit.
pub const APPLY_AFTER_DDL: &str = "apply.after-ddl";
/// The post-data schema restored (indexes, constraints, rules, statistics), before the materialized
/// views, large objects, sequences and the phase `done`.
pub const CLONE_AFTER_POST_DATA: &str = "clone.after-post-data";
/// A chunk's rows and its state committed on the target.
pub const COPY_AFTER_CHUNK_COMMIT: &str = "copy.after-chunk-commit";
/// A chunk's rows written, before their commit.
pub const COPY_BEFORE_CHUNK_COMMIT: &str = "copy.before-chunk-commit";
/// The fence is raised and its marker written, before the catch-up.
pub const CUTOVER_FENCED: &str = "cutover.fenced";
/// The hooks ran, before the step is recorded as done.
pub const CUTOVER_POINT_OF_NO_RETURN: &str = "cutover.point-of-no-return";
/// The first part of the proof is made, before the fence.
pub const CUTOVER_PROVED_BEFORE_FENCE: &str = "cutover.proved-before-fence";
/// In the pause, before the verification.
pub const CUTOVER_VERIFY: &str = "cutover.verify";

/// `name:N`: the N-th time the point is reached.
pub fn nth(name: &str, n: u32) -> String {
    format!("{name}:{n}")
}

struct Armed {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| parse("HIKKOSHI_FAILPOINT")).as_ref()
}

fn pause_armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| parse("HIKKOSHI_PAUSE")).as_ref()
}

fn parse(var: &str) -> Option<Armed> {
    let spec = std::env::var(var).ok()?;
    let (name, nth) = match spec.rsplit_once(':') {
        Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
        None => (spec, 1),
    };
    Some(Armed {
        name,
        nth,
        seen: AtomicU64::new(0),
    })
}

/// Dies here if this failpoint is armed and its turn has come.
pub fn hit(name: &str) {
    if let Some(a) = armed()
        && a.name == name
        && a.seen.fetch_add(1, Ordering::SeqCst) + 1 == a.nth
    {
        eprintln!("hikkoshi: failpoint {name} reached, dying now");
        std::process::abort();
    }
}

/// Waits here if this pause is armed and its turn has come (see the module doc).
pub async fn pause(name: &str, cancel: &tokio_util::sync::CancellationToken) {
    if let Some(a) = pause_armed()
        && a.name == name
        && a.seen.fetch_add(1, Ordering::SeqCst) + 1 == a.nth
    {
        let secs = std::env::var("HIKKOSHI_PAUSE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5);
        eprintln!("hikkoshi: paused at {name}");
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(secs)) => {}
        }
        eprintln!("hikkoshi: resumed after {name}");
    }
}
