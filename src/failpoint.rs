//! Failpoints for crash tests: `HIKKOSHI_FAILPOINT=name` (or `name:N`, the N-th time it is reached) makes
//! the process die on the spot at that point, as `kill -9` would: no destructor, no cleanup, no goodbye to
//! the servers. Unset, a failpoint costs one atomic load.
//!
//! Pauses, for fault tests that must act at a precise point (restart a server, send a signal):
//! `HIKKOSHI_PAUSE=name` (or `name:N`) makes the process say `hikkoshi: paused at name` on stderr and wait
//! there for `HIKKOSHI_PAUSE_SECS` seconds (default 5), or until the run is cancelled.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

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
