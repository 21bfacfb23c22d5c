//! Copy progress: counters the workers bump, and a reporter that draws bars on a terminal or writes a
//! plain log line every few seconds otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::ident::QualifiedName;

/// Counters of one table.
#[derive(Debug)]
pub struct TableProgress {
    pub name: QualifiedName,
    /// On-disk size at planning time: the yardstick for ETA.
    pub est_bytes: u64,
    pub chunks_total: u64,
    pub chunks_done: AtomicU64,
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    pub active: AtomicU64,
}

/// Counters of the whole copy.
#[derive(Debug)]
pub struct Progress {
    pub tables: Vec<Arc<TableProgress>>,
    by_name: HashMap<QualifiedName, usize>,
    pub started: Instant,
}

impl Progress {
    /// `tables`: name, estimated bytes still to copy, chunks in all, chunks already copied.
    pub fn new(tables: Vec<(QualifiedName, u64, u64, u64)>) -> Arc<Progress> {
        let mut by_name = HashMap::new();
        let tables = tables
            .into_iter()
            .enumerate()
            .map(|(i, (name, est, total, done))| {
                by_name.insert(name.clone(), i);
                Arc::new(TableProgress {
                    name,
                    est_bytes: est,
                    chunks_total: total,
                    chunks_done: AtomicU64::new(done),
                    rows: AtomicU64::new(0),
                    bytes: AtomicU64::new(0),
                    active: AtomicU64::new(0),
                })
            })
            .collect();
        Arc::new(Progress {
            tables,
            by_name,
            started: Instant::now(),
        })
    }

    pub fn table(&self, name: &QualifiedName) -> Option<Arc<TableProgress>> {
        self.by_name.get(name).map(|&i| self.tables[i].clone())
    }

    fn totals(&self) -> (u64, u64, u64, u64, u64) {
        let mut t = (0, 0, 0, 0, 0);
        for p in &self.tables {
            t.0 += p.rows.load(Ordering::Relaxed);
            t.1 += p.bytes.load(Ordering::Relaxed);
            t.2 += p.est_bytes;
            t.3 += p.chunks_done.load(Ordering::Relaxed);
            t.4 += p.chunks_total;
        }
        t
    }

    /// One line: rows, bytes, rate, chunks and ETA.
    pub fn summary(&self) -> String {
        let (rows, bytes, est, done, total) = self.totals();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = bytes as f64 / secs;
        let eta = if rate > 0.0 && est > bytes {
            format!(", ETA {}", human_duration((est - bytes) as f64 / rate))
        } else {
            String::new()
        };
        let active: Vec<String> = self
            .tables
            .iter()
            .filter(|t| t.active.load(Ordering::Relaxed) > 0)
            .map(|t| {
                format!(
                    "{} ({}/{})",
                    t.name,
                    t.chunks_done.load(Ordering::Relaxed),
                    t.chunks_total
                )
            })
            .collect();
        format!(
            "copy: {done}/{total} chunks, {} rows, {} at {}/s{eta}{}",
            human_count(rows),
            human_bytes(bytes),
            human_bytes(rate as u64),
            if active.is_empty() {
                String::new()
            } else {
                format!("; copying {}", active.join(", "))
            }
        )
    }
}

/// Draws progress until dropped.
pub struct Reporter {
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Reporter {
    /// Bars on a terminal (stderr), a log line every `interval` otherwise.
    pub fn start(progress: Arc<Progress>, interval: Duration) -> Reporter {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = if std::io::stderr().is_terminal() {
            tokio::spawn(draw_bars(progress, token))
        } else {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(interval) => tracing::info!("{}", progress.summary()),
                    }
                }
            })
        };
        Reporter {
            stop,
            task: Some(task),
        }
    }

    /// Stops drawing and waits for the last frame.
    pub async fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn draw_bars(progress: Arc<Progress>, stop: tokio_util::sync::CancellationToken) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>28.bold} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let (_, _, est, _, _) = progress.totals();
    let overall = multi.add(ProgressBar::new(est.max(1)));
    overall.set_style(style.clone());
    overall.set_prefix("all tables");
    let mut bars: HashMap<usize, ProgressBar> = HashMap::new();
    loop {
        let done = stop.is_cancelled();
        let (rows, bytes, est, cdone, ctotal) = progress.totals();
        overall.set_length(est.max(bytes).max(1));
        overall.set_position(bytes);
        overall.set_message(format!(
            "{} rows, {cdone}/{ctotal} chunks",
            human_count(rows)
        ));
        for (i, t) in progress.tables.iter().enumerate() {
            let active = t.active.load(Ordering::Relaxed) > 0;
            let b = t.bytes.load(Ordering::Relaxed);
            if active && !bars.contains_key(&i) {
                let bar = multi.add(ProgressBar::new(t.est_bytes.max(b).max(1)).with_position(b));
                bar.set_style(style.clone());
                bar.set_prefix(truncate(&t.name.to_string(), 28));
                bars.insert(i, bar);
            }
            if let Some(bar) = bars.get(&i) {
                bar.set_length(t.est_bytes.max(b).max(1));
                bar.set_position(b);
                bar.set_message(format!(
                    "{} rows {}/{}",
                    human_count(t.rows.load(Ordering::Relaxed)),
                    t.chunks_done.load(Ordering::Relaxed),
                    t.chunks_total
                ));
                if !active {
                    bar.finish_and_clear();
                    multi.remove(bar);
                }
            }
            if !active {
                bars.remove(&i);
            }
        }
        if done {
            overall.finish_and_clear();
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(n - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=9_999_999 => format!("{:.1} k", n as f64 / 1e3),
        _ => format!("{:.1} M", n as f64 / 1e6),
    }
}

pub fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units_read_well() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_count(12_345), "12.3 k");
        assert_eq!(human_duration(75.0), "1m15s");
        assert_eq!(human_duration(7300.0), "2h01m");
    }

    #[test]
    fn summary_counts_chunks_and_rows() {
        let p = Progress::new(vec![(QualifiedName::new("a", "b"), 1000, 4, 1)]);
        let t = p.table(&QualifiedName::new("a", "b")).unwrap();
        t.rows.fetch_add(10, Ordering::Relaxed);
        t.bytes.fetch_add(500, Ordering::Relaxed);
        let s = p.summary();
        assert!(s.starts_with("copy: 1/4 chunks, 10 rows, 500 B"), "{s}");
    }
}
