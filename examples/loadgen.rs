//! A load generator for bench/cutover.sh: pgbench's TPC-B transaction at a fixed total rate from several
//! clients that, unlike pgbench, survive a cutover — after any error a client reconnects to the server
//! whose port the switch file names (a cutover hook rewrites it). At the end it prints one JSON line: commits,
//! errors, and the longest time between two successful commits across all clients (the write pause the
//! application saw).
//!
//! usage: loadgen CONNINFO_WITHOUT_PORT SWITCH_FILE RATE CLIENTS STOP_FILE

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, conninfo, switch, rate, clients, stop_file] = &args[..] else {
        eprintln!("usage: loadgen CONNINFO SWITCH_FILE RATE CLIENTS STOP_FILE");
        std::process::exit(2);
    };
    let rate: f64 = rate.parse().expect("RATE");
    let clients: usize = clients.parse().expect("CLIENTS");
    let start = Instant::now();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // the last successful commit of any client, in µs since start
    let last_ok = Arc::new(AtomicU64::new(0));
    let longest_gap = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (conninfo, switch, stop_file) = (conninfo.clone(), switch.clone(), stop_file.clone());
        let (ok, failed, last_ok, longest_gap) = (
            ok.clone(),
            failed.clone(),
            last_ok.clone(),
            longest_gap.clone(),
        );
        let period = Duration::from_secs_f64(clients as f64 / rate);
        tasks.push(tokio::spawn(async move {
            let mut k: u64 = c as u64;
            let mut next = Instant::now();
            'outer: while !std::path::Path::new(&stop_file).exists() {
                let port = std::fs::read_to_string(&switch).unwrap_or_default();
                let url = format!("{conninfo} port={} connect_timeout=2", port.trim());
                let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                tokio::spawn(conn);
                loop {
                    if std::path::Path::new(&stop_file).exists() {
                        break 'outer;
                    }
                    k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let (aid, bid, tid, delta) =
                        (1 + (k >> 33) % 1_000_000, 1 + (k >> 20) % 10, 1 + (k >> 12) % 100, (k % 10001) as i64 - 5000);
                    let sql = format!(
                        "BEGIN;
                         UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};
                         UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};
                         UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};
                         INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, {bid}, {aid}, {delta}, now());
                         COMMIT;"
                    );
                    match client.batch_execute(&sql).await {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            let now = start.elapsed().as_micros() as u64;
                            let prev = last_ok.fetch_max(now, Ordering::Relaxed);
                            if prev > 0 && now > prev {
                                longest_gap.fetch_max(now - prev, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            break;
                        }
                    }
                    next += period;
                    tokio::time::sleep_until(next.into()).await;
                    if Instant::now() > next + Duration::from_secs(1) {
                        next = Instant::now();
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    println!(
        "{{\"commits\": {}, \"errors\": {}, \"longest_gap_seconds\": {:.3}, \"seconds\": {:.1}}}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        longest_gap.load(Ordering::Relaxed) as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
}
