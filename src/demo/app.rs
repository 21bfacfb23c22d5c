//! An application that writes through a switch: it connects to the server whose port a switch file names
//! (a cutover hook rewrites it, as a load balancer switch would), runs one transaction after another, and
//! after any error reconnects, reading the file again. It counts what it saw, including the longest time
//! between two committed transactions: the write pause as the application itself sees it.
//!
//! The demo runs one; the tests run one to prove that a cutover loses and doubles nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the application saw.
#[derive(Clone, Debug, Default)]
pub struct AppStats {
    pub committed: u64,
    /// Transactions refused or cut off (each followed by a reconnect).
    pub failed: u64,
    pub longest_gap: Duration,
    /// The first column of each transaction's first returned row (e.g. `INSERT … RETURNING id`), in order.
    pub ids: Vec<i64>,
    /// The distinct server errors it got, as `SQLSTATE: message` (at most 20).
    pub errors: Vec<String>,
}

/// A running application.
pub struct App {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    longest_gap_us: Arc<AtomicU64>,
    ids: Arc<Mutex<Vec<i64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    /// Starts writing. `conninfo` is a libpq key=value string without the port; `transaction(k)` gives the
    /// SQL of the k-th transaction (simple query: several statements may share it); `pause` is the wait
    /// after each commit.
    pub fn start(
        conninfo: String,
        switch_file: PathBuf,
        transaction: impl Fn(u64) -> String + Send + 'static,
        pause: Duration,
    ) -> App {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let longest_gap_us = Arc::new(AtomicU64::new(0));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, c, f, g, i, e) = (
            stop.clone(),
            committed.clone(),
            failed.clone(),
            longest_gap_us.clone(),
            ids.clone(),
            errors.clone(),
        );
        let task = tokio::spawn(async move {
            let mut last_ok = Instant::now();
            let mut k: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                let port = std::fs::read_to_string(&switch_file).unwrap_or_default();
                let url = format!("{conninfo} port={} connect_timeout=2", port.trim());
                let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    f.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                tokio::spawn(conn);
                while !s.load(Ordering::Relaxed) {
                    k += 1;
                    match client.simple_query(&transaction(k)).await {
                        Ok(messages) => {
                            c.fetch_add(1, Ordering::Relaxed);
                            g.fetch_max(last_ok.elapsed().as_micros() as u64, Ordering::Relaxed);
                            last_ok = Instant::now();
                            let id = messages.iter().find_map(|m| match m {
                                tokio_postgres::SimpleQueryMessage::Row(r) => {
                                    r.get(0).and_then(|v| v.parse::<i64>().ok())
                                }
                                _ => None,
                            });
                            if let Some(id) = id {
                                i.lock().unwrap_or_else(|e| e.into_inner()).push(id);
                            }
                            tokio::time::sleep(pause).await;
                        }
                        Err(err) => {
                            f.fetch_add(1, Ordering::Relaxed);
                            if let Some(db) = err.as_db_error() {
                                let text = format!("{}: {}", db.code().code(), db.message());
                                let mut seen = e.lock().unwrap_or_else(|e| e.into_inner());
                                if seen.len() < 20 && !seen.contains(&text) {
                                    seen.push(text);
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            break;
                        }
                    }
                }
            }
        });
        App {
            stop,
            committed,
            failed,
            longest_gap_us,
            ids,
            errors,
            task,
        }
    }

    /// Transactions committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Stops writing and says what the application saw.
    pub async fn stop(self) -> AppStats {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        AppStats {
            committed: self.committed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            longest_gap: Duration::from_micros(self.longest_gap_us.load(Ordering::Relaxed)),
            ids: std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner())),
            errors: std::mem::take(&mut *self.errors.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }
}
