//! Watching a migration over HTTP (`--listen ADDR`): `/health` for load balancers and alerting, `/metrics`
//! in the Prometheus text format, `/` a status page for people, `/api/status` the JSON behind it.
//!
//! Everything comes from the state in the target (the same as `hikkoshi status`), read by one sampler every
//! two seconds; requests never touch the database. The sampler keeps the last ten minutes of samples, for
//! the lag chart, the copy's ETA and the "lag grows without bound" rule of `/health`.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Kind};
use crate::status::Status;

const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const KEEP: usize = 300;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

static ERRORS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Counts an error of this process by kind, for `/metrics`.
pub fn count_error(kind: Kind) {
    let k = match kind {
        Kind::Usage => "usage",
        Kind::Connection => "connection",
        Kind::Transient => "transient",
        Kind::Definite => "definite",
    };
    *ERRORS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(k)
        .or_default() += 1;
}

/// One sample of the migration.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Unix time, seconds.
    pub at: f64,
    pub lag_bytes: i64,
    pub bytes_copied: i64,
    pub transactions_applied: i64,
}

#[derive(Default)]
struct Shared {
    status: Option<Status>,
    read_error: Option<String>,
    history: VecDeque<Sample>,
}

impl Shared {
    fn health(&self) -> (bool, String) {
        judge(
            self.status.as_ref(),
            self.read_error.as_deref(),
            &self.history,
        )
    }
}

/// The HTTP server; stops when dropped or shut down.
pub struct Monitor {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _stop_on_drop: tokio_util::sync::DropGuard,
}

impl Monitor {
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Serves the monitor on `addr` for the migration whose target is `target_url`.
pub async fn serve(addr: SocketAddr, target_url: String) -> Result<Monitor, Error> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::Usage(format!(
            "cannot listen on {addr} ({e}): choose another --listen address (e.g. 127.0.0.1:0 for any free port)"
        ))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Usage(format!("--listen: {e}")))?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let stop = CancellationToken::new();
    let sampler = {
        let (shared, stop) = (shared.clone(), stop.clone());
        async move {
            loop {
                // a stalled connection must not freeze the last answer
                let read =
                    tokio::time::timeout(READ_TIMEOUT, crate::status::read(&target_url)).await;
                {
                    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                    match read {
                        Err(_) => {
                            s.read_error = Some(format!(
                                "no answer from the target within {} s",
                                READ_TIMEOUT.as_secs()
                            ))
                        }
                        Ok(Ok(st)) => {
                            s.history.push_back(sample_of(&st));
                            while s.history.len() > KEEP {
                                s.history.pop_front();
                            }
                            s.status = Some(st);
                            s.read_error = None;
                        }
                        Ok(Err(e)) => s.read_error = Some(crate::error::chain(&e)),
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                }
            }
        }
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/status", get(api_status))
        .with_state(shared);
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::spawn(sampler);
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        })
    };
    tracing::info!("status page on http://{addr}/ (metrics: /metrics, health: /health)");
    Ok(Monitor {
        addr,
        _stop_on_drop: stop.clone().drop_guard(),
        stop,
        task,
    })
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn sample_of(st: &Status) -> Sample {
    Sample {
        at: now(),
        lag_bytes: st.stream.as_ref().map(|s| s.lag_bytes).unwrap_or(0),
        bytes_copied: st.tables.iter().map(|t| t.bytes_copied).sum(),
        transactions_applied: st
            .stream
            .as_ref()
            .map(|s| s.transactions_applied)
            .unwrap_or(0),
    }
}

/// Healthy or not, and why.
pub fn judge(
    status: Option<&Status>,
    read_error: Option<&str>,
    history: &VecDeque<Sample>,
) -> (bool, String) {
    if let Some(e) = read_error {
        return (
            false,
            format!("cannot read the migration state on the target: {e}"),
        );
    }
    let Some(st) = status else {
        return (true, "starting".into());
    };
    if st.migration_id.is_none() {
        return (true, "no migration recorded on the target yet".into());
    }
    if let Some(e) = &st.last_error {
        return (false, format!("hikkoshi stopped with an error: {e}"));
    }
    if let Some(c) = &st.cutover
        && (c.step == crate::state::Step::Switched.as_str()
            || c.step == crate::state::Step::RolledBack.as_str())
    {
        return (true, c.step.clone());
    }
    let Some(stream) = st
        .stream
        .as_ref()
        .filter(|_| st.phase.as_deref() == Some("done"))
    else {
        return (
            true,
            format!("copying (phase {})", st.phase.as_deref().unwrap_or("?")),
        );
    };
    if !stream.follower_running {
        // the newest event says why, when the follower itself noted an interruption it retries
        if let Some((at, _, why)) = st.recent_events.first().filter(|e| e.1 == "interrupted") {
            return (
                false,
                format!(
                    "streaming interrupted since {at} ({why}); the follower reconnects by itself: check the \
                     network and both servers, and `hikkoshi status`"
                ),
            );
        }
        return (
            false,
            "streaming has stopped: no follower has reported for 10 s. Run `hikkoshi clone --follow` again \
             (it resumes), and see `hikkoshi status` for its last error"
                .into(),
        );
    }
    if let Some(growth) = lag_grows(history) {
        return (false, growth);
    }
    (
        true,
        format!(
            "streaming, lag {} ({:.1}s)",
            crate::progress::human_bytes(stream.lag_bytes.max(0) as u64),
            stream.lag_seconds
        ),
    )
}

/// The lag grows without bound: over the last minute it never went down and rose by more than 64 MB.
fn lag_grows(history: &VecDeque<Sample>) -> Option<String> {
    let minute: Vec<&Sample> = history.iter().filter(|s| s.at >= now() - 60.0).collect();
    let (first, last) = (minute.first()?, minute.last()?);
    if last.at - first.at < 50.0 {
        return None;
    }
    let rising = minute.windows(2).all(|w| w[1].lag_bytes >= w[0].lag_bytes);
    (rising && last.lag_bytes - first.lag_bytes > 64 << 20).then(|| {
        format!(
            "the lag grows without bound: {} and rising for a minute; the target cannot keep up",
            crate::progress::human_bytes(last.lag_bytes as u64)
        )
    })
}

async fn health(State(shared): State<Arc<Mutex<Shared>>>) -> Response {
    let s = shared.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, reason) = s.health();
    let body = serde_json::json!({ "healthy": ok, "reason": reason });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn api_status(State(shared): State<Arc<Mutex<Shared>>>) -> Response {
    let s = shared.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, reason) = s.health();
    let body = serde_json::json!({
        "healthy": ok,
        "reason": reason,
        "status": s.status,
        "history": s.history,
    });
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// Prometheus label value escaping: backslash, double quote, newline.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of a status.
pub fn render_metrics(
    st: Option<&Status>,
    healthy: bool,
    errors: &BTreeMap<&'static str, u64>,
) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    family(
        "hikkoshi_healthy",
        "gauge",
        "1 while /health answers 200.",
        vec![(String::new(), if healthy { 1.0 } else { 0.0 })],
    );
    let tables = st.map(|s| s.tables.as_slice()).unwrap_or_default();
    let per_table = |f: &dyn Fn(&crate::status::TableStatus) -> i64| {
        tables
            .iter()
            .map(|t| (format!("{{table=\"{}\"}}", label(&t.table)), f(t) as f64))
            .collect::<Vec<_>>()
    };
    family(
        "hikkoshi_table_rows_copied",
        "gauge",
        "Rows copied per table.",
        per_table(&|t| t.rows_copied),
    );
    family(
        "hikkoshi_table_bytes_copied",
        "gauge",
        "Bytes copied per table.",
        per_table(&|t| t.bytes_copied),
    );
    family(
        "hikkoshi_table_bytes_estimated",
        "gauge",
        "Estimated size per table.",
        per_table(&|t| t.est_bytes),
    );
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for t in tables {
        *by_state.entry(t.state.as_str()).or_default() += 1;
    }
    family(
        "hikkoshi_tables",
        "gauge",
        "Tables by state.",
        by_state
            .iter()
            .map(|(s, n)| (format!("{{state=\"{}\"}}", label(s)), *n as f64))
            .collect(),
    );
    if let Some(stream) = st.and_then(|s| s.stream.as_ref()) {
        let lsn = |s: &str| {
            s.parse::<crate::lsn::Lsn>()
                .map(|l| l.0 as f64)
                .unwrap_or(0.0)
        };
        family(
            "hikkoshi_applied_lsn",
            "gauge",
            "Source WAL position applied on the target, in bytes.",
            vec![(String::new(), lsn(&stream.applied_lsn))],
        );
        family(
            "hikkoshi_source_lsn",
            "gauge",
            "Source WAL position last reported, in bytes.",
            vec![(String::new(), lsn(&stream.source_lsn))],
        );
        family(
            "hikkoshi_lag_bytes",
            "gauge",
            "How far the target trails the source, in bytes of WAL.",
            vec![(String::new(), stream.lag_bytes as f64)],
        );
        family(
            "hikkoshi_lag_seconds",
            "gauge",
            "Age of the last applied source commit while behind.",
            vec![(String::new(), stream.lag_seconds)],
        );
        family(
            "hikkoshi_apply_rate",
            "gauge",
            "Source transactions applied per second.",
            vec![(String::new(), stream.apply_rate_tps)],
        );
        family(
            "hikkoshi_transactions_applied_total",
            "counter",
            "Source transactions applied on the target.",
            vec![(String::new(), stream.transactions_applied as f64)],
        );
        family(
            "hikkoshi_follower_running",
            "gauge",
            "1 while a follower streams.",
            vec![(
                String::new(),
                if stream.follower_running { 1.0 } else { 0.0 },
            )],
        );
    }
    family(
        "hikkoshi_errors_total",
        "counter",
        "Errors this process met, by kind (transient ones were retried).",
        ["transient", "connection", "definite", "usage"]
            .iter()
            .map(|k| {
                (
                    format!("{{kind=\"{k}\"}}"),
                    errors.get(k).copied().unwrap_or(0) as f64,
                )
            })
            .collect(),
    );
    if let Some(p) = st
        .and_then(|s| s.cutover.as_ref())
        .and_then(|c| c.pause_seconds)
    {
        family(
            "hikkoshi_cutover_pause_seconds",
            "gauge",
            "Write pause of the cutover (fence to hooks done).",
            vec![(String::new(), p)],
        );
    }
    out
}

async fn metrics(State(shared): State<Arc<Mutex<Shared>>>) -> Response {
    let s = shared.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, _) = s.health();
    let errors = ERRORS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(s.status.as_ref(), ok, &errors),
    )
        .into_response()
}

async fn page() -> Html<&'static str> {
    Html(include_str!("monitor/page.html"))
}

/// Keeps a monitor running until `stop` (for `hikkoshi status --listen`).
pub async fn serve_until(
    addr: SocketAddr,
    target_url: String,
    stop: CancellationToken,
) -> Result<(), Error> {
    let m = serve(addr, target_url).await?;
    println!("status page on http://{}/ (Ctrl-C to stop)", m.addr);
    let started = Instant::now();
    stop.cancelled().await;
    tracing::info!(
        "status page stopped after {:.0}s",
        started.elapsed().as_secs_f64()
    );
    m.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, lag: i64) -> Sample {
        Sample {
            at,
            lag_bytes: lag,
            bytes_copied: 0,
            transactions_applied: 0,
        }
    }

    #[test]
    fn lag_that_rises_for_a_minute_is_unhealthy_and_a_dip_is_not() {
        let t = now();
        let rising: VecDeque<Sample> = (0..30)
            .map(|i| sample(t - 58.0 + 2.0 * i as f64, i * (8 << 20)))
            .collect();
        assert!(lag_grows(&rising).is_some());
        let mut dipping = rising.clone();
        dipping[10].lag_bytes = 0;
        dipping[9].lag_bytes = 1 << 30;
        assert!(lag_grows(&dipping).is_none());
        let short: VecDeque<Sample> = rising.iter().skip(20).cloned().collect();
        assert!(lag_grows(&short).is_none());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
