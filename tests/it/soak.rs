//! The fault soak of issue #7: for a bounded time, a random mix of writes on the source and faults against
//! a running `hikkoshi clone --follow`, then a check that nothing was lost or doubled.
//!
//! - Writes (one writer, directly on the source): inserts, updates that do and do not touch a TOASTed
//!   column, deletes, primary-key changes (with the TOASTed value unchanged), big transactions (up to
//!   5000 rows) and small ones, truncates, and a table without a primary key (REPLICA IDENTITY FULL, with
//!   duplicate rows).
//! - Faults (every 1–4 s): kill -9 of hikkoshi and a restart of it, an `immediate` restart of the source or
//!   of the target, and, through a TCP proxy between hikkoshi and each server (tests/it/common/proxy.rs),
//!   connections dropped (FIN), reset (RST) or stalled for 2–8 s (hikkoshi runs with
//!   `HIKKOSHI_STALL_SECS=5`, so longer stalls are detected and shorter ones ride through).
//! - The end: faults and writes stop, the follower catches up, `hikkoshi cutover` switches (fenced, with
//!   its own verification, and moves the sequences), and the test compares every table row by row as
//!   multisets (nothing lost, nothing doubled) and every sequence (at or past the source's).
//!
//! Pass: the follower survives every fault by itself or is restarted as an operator would ("run the same
//! command again"), except that it may not exit on its own three times in a row; the comparison holds.
//!
//! `HIKKOSHI_SOAK_SECS` sets how long faults and writes go on (default 45 s per version pair, so that CI
//! spends 2–3 minutes on the two tests); `HIKKOSHI_SOAK_SEED` replays a run: the seed is printed at the
//! start (`cargo nextest run --test it soak:: --no-capture` shows it; a failing test prints it anyway).
//! The seed fixes the sequence of writes and faults; their timing against hikkoshi's own work still varies.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::live::*;
use crate::common::proxy::Proxy;
use crate::common::scenario::*;
use crate::common::*;
use hikkoshi::localserver::LocalServer;
use tokio_postgres::{Client, NoTls};

/// SplitMix64: small, seedable, good enough to pick writes and faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seed() -> u64 {
    std::env::var("HIKKOSHI_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

fn duration() -> Duration {
    Duration::from_secs(
        std::env::var("HIKKOSHI_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(45),
    )
}

/// A value of about 10 kB that compresses poorly: stored out of line (TOASTed).
const BIG: &str =
    "(SELECT string_agg(md5(random()::text || g::text), '') FROM generate_series(1, 300) g)";

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, note text, doc text);
CREATE TABLE nokey (a int, b text);
ALTER TABLE nokey REPLICA IDENTITY FULL;
CREATE TABLE counters (id bigserial PRIMARY KEY, v int);
INSERT INTO items SELECT i, i % 100, 'n' || i,
    CASE WHEN i % 50 = 0 THEN (SELECT string_agg(md5(random()::text || i || g), '') FROM generate_series(1, 300) g) END
FROM generate_series(1, 30000) i;
INSERT INTO nokey SELECT i % 500, 'b' || (i % 7) FROM generate_series(1, 3000) i;
INSERT INTO counters (v) SELECT i FROM generate_series(1, 100) i;
";

/// One random source transaction.
fn random_txn(rng: &mut Rng, next_id: &mut i64) -> String {
    let mut body = Vec::new();
    let statements = if rng.below(100) < 10 {
        3 + rng.below(3)
    } else {
        1
    };
    for _ in 0..statements {
        body.push(random_statement(rng, next_id));
    }
    format!("BEGIN; {}; COMMIT;", body.join("; "))
}

fn random_statement(rng: &mut Rng, next_id: &mut i64) -> String {
    let hi = (*next_id).max(2) as u64;
    let x = 1 + rng.below(hi - 1);
    match rng.below(100) {
        0..=24 => {
            let rows: Vec<String> = (0..1 + rng.below(20))
                .map(|_| {
                    *next_id += 1;
                    let doc = if rng.below(10) == 0 { BIG } else { "NULL" };
                    format!(
                        "({}, {}, 'i{}', {doc})",
                        *next_id,
                        rng.below(100),
                        rng.next()
                    )
                })
                .collect();
            format!(
                "INSERT INTO items (id, n, note, doc) VALUES {}",
                rows.join(", ")
            )
        }
        // not touching the TOASTed column: the stream carries it as "unchanged"
        25..=39 => format!(
            "UPDATE items SET n = n + 1, note = 'u{}' WHERE id BETWEEN {x} AND {}",
            rng.next(),
            x + rng.below(50)
        ),
        40..=47 => format!("UPDATE items SET doc = {BIG} WHERE id = {x}"),
        48..=55 => format!(
            "DELETE FROM items WHERE id BETWEEN {x} AND {}",
            x + rng.below(10)
        ),
        // a primary-key change; rows with a TOASTed doc keep it unchanged
        56..=63 => {
            *next_id += 1;
            format!("UPDATE items SET id = {} WHERE id = {x}", *next_id)
        }
        64..=65 => {
            let a = *next_id + 1;
            *next_id += 500 + rng.below(4500) as i64;
            format!(
                "INSERT INTO items (id, n, note) SELECT g, 1, 'big' FROM generate_series({a}, {}) g",
                *next_id
            )
        }
        66..=68 => format!(
            "TRUNCATE nokey, counters; INSERT INTO nokey SELECT g % 50, 't' FROM generate_series(1, {}) g",
            1 + rng.below(300)
        ),
        69..=76 => format!(
            "INSERT INTO nokey VALUES ({a}, 'dup'), ({a}, 'dup'), ({a}, 'x{}')",
            rng.next(),
            a = rng.below(500)
        ),
        77..=81 => format!(
            "UPDATE nokey SET b = b || '+' WHERE ctid = (SELECT ctid FROM nokey WHERE a = {} LIMIT 1)",
            rng.below(500)
        ),
        82..=85 => format!(
            "DELETE FROM nokey WHERE ctid = (SELECT ctid FROM nokey WHERE a = {} LIMIT 1)",
            rng.below(500)
        ),
        _ => format!(
            "INSERT INTO counters (v) SELECT g FROM generate_series(1, {}) g",
            1 + rng.below(20)
        ),
    }
}

/// Writes random transactions until told to stop, reconnecting through restarts. Returns how many
/// committed.
async fn writer(url: String, seed: u64, stop: Arc<AtomicBool>) -> u64 {
    let mut rng = Rng(seed ^ 0x5eed_5eed);
    let mut next_id: i64 = 30_000;
    let mut client: Option<Client> = None;
    let mut committed = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_ref().filter(|c| !c.is_closed()) else {
            match tokio_postgres::connect(&url, NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    client = Some(c);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            continue;
        };
        let sql = random_txn(&mut rng, &mut next_id);
        match c.batch_execute(&sql).await {
            Ok(()) => committed += 1,
            // a restart of the source: the outcome does not matter, the source is the reference
            Err(e)
                if c.is_closed()
                    || e.code().is_none_or(|c| {
                        c.code().starts_with("57P") || c.code().starts_with("08")
                    }) =>
            {
                client = None
            }
            Err(e) => panic!("the soak's writer failed: {e:?}\n{sql}"),
        }
        tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
    }
    committed
}

fn start_follower(ps: &Proxy, pt: &Proxy) -> Follower {
    Follower::start_between(
        &ps.url("soak"),
        &pt.url("soak"),
        &[],
        &[("HIKKOSHI_STALL_SECS", "5")],
    )
}

/// The last lines of a log, for the test's output.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(6)..].join("\n")
}

async fn soak(source_major: u32) {
    let seed = seed();
    let secs = duration();
    println!(
        "soak {source_major} -> 18: seed {seed}, {}s (replay: HIKKOSHI_SOAK_SEED={seed})",
        secs.as_secs()
    );
    eprintln!("soak seed {seed}");
    let Sides { pair, .. } = Pair::new(source_major, 18).db("soak").source(SCHEMA).await;
    let ps = Proxy::start(pair.s.port);
    let pt = Proxy::start(pair.t.port);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = tokio::spawn(writer(pair.source_url(), seed, stop.clone()));
    let mut rng = Rng(seed);
    let mut follower = start_follower(&ps, &pt);
    let started = Instant::now();
    let mut faults = 0;
    let mut exits_in_a_row = 0;
    while started.elapsed() < secs {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(3000))).await;
        if let Some(status) = follower.child.try_wait().unwrap() {
            exits_in_a_row += 1;
            println!(
                "{:>6.1}s hikkoshi exited by itself ({status}):\n{}\n{}",
                started.elapsed().as_secs_f64(),
                tail(&follower.log()),
                copy_records(&pair.t).await
            );
            assert!(
                exits_in_a_row < 3,
                "seed {seed}: hikkoshi exited by itself three times in a row:\n{}",
                follower.log()
            );
            follower = start_follower(&ps, &pt);
            continue;
        }
        exits_in_a_row = 0;
        faults += 1;
        let fault = rng.below(9);
        let at = started.elapsed().as_secs_f64();
        match fault {
            0 => {
                println!("{at:>6.1}s kill -9 hikkoshi, start it again");
                follower.child.kill().unwrap();
                follower.child.wait().unwrap();
                follower = start_follower(&ps, &pt);
            }
            1 => {
                println!("{at:>6.1}s restart the source (immediate)");
                restart(&pair.s);
            }
            2 => {
                println!("{at:>6.1}s restart the target (immediate)");
                restart(&pair.t);
            }
            3 | 4 => {
                let (name, p) = if fault == 3 {
                    ("source", &ps)
                } else {
                    ("target", &pt)
                };
                if rng.below(2) == 0 {
                    println!("{at:>6.1}s drop the connections to the {name}");
                    p.drop_all();
                } else {
                    println!("{at:>6.1}s reset the connections to the {name}");
                    p.reset_all();
                }
            }
            _ => {
                let (name, p) = if fault < 7 {
                    ("source", &ps)
                } else {
                    ("target", &pt)
                };
                let stall = 2 + rng.below(7);
                println!("{at:>6.1}s stall the connections to the {name} for {stall}s");
                p.stall();
                tokio::time::sleep(Duration::from_secs(stall)).await;
                p.resume();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let committed = writes.await.unwrap();
    println!("{faults} faults, {committed} source transactions; catching up");
    assert!(faults > 0 && committed > 0);
    if follower.child.try_wait().unwrap().is_some() {
        println!("hikkoshi had exited:\n{}", tail(&follower.log()));
        follower = start_follower(&ps, &pt);
    }
    let src = connect(&pair.source_url()).await;
    let tgt = connect(&pair.target_url()).await;
    wait_in_sync_within(&src, &tgt, &mut follower, 300).await;
    // the cutover fences, catches up, verifies and moves the sequences
    let out = pair.hikkoshi(&["cutover", "--timeout", "120"]);
    assert!(
        out.status.success(),
        "seed {seed}: the cutover failed:\n{}\n{}",
        text(&out),
        follower.log()
    );
    let status = follower.exits_by_itself().await;
    assert!(status.success(), "{}", follower.log());
    let src = connect(&pair.s.socket_url("soak")).await;
    assert_same_rows_and_schema(&src, &tgt).await;
    let (a, b) = (sequences(&src).await, sequences(&tgt).await);
    for (name, (value, _)) in &a {
        let on_target = b.get(name).map(|v| v.0);
        assert!(
            on_target.is_some_and(|v| v >= *value),
            "seed {seed}: sequence {name} is at {on_target:?} on the target, {value} on the source"
        );
    }
    println!("soak {source_major} -> 18 with seed {seed}: identical");
}

/// The copy's records on the target, for a failure's report.
async fn copy_records(t: &LocalServer) -> String {
    let Ok((c, conn)) = tokio_postgres::connect(&t.url("soak"), NoTls).await else {
        return String::new();
    };
    tokio::spawn(conn);
    let q = "SELECT string_agg(format('%s.%s %s %s %s', c.table_name, c.chunk_no, c.state, c.snapshot_lsn,
                                      t.chunk_method), E'\n' ORDER BY c.table_name, c.chunk_no)
               || E'\nstream: ' || (SELECT s::text FROM hikkoshi.stream s)
             FROM hikkoshi.chunks c JOIN hikkoshi.tables t USING (schema_name, table_name)";
    match c.query_one(q, &[]).await {
        Ok(r) => r.get::<_, Option<String>>(0).unwrap_or_default(),
        Err(e) => format!("({e})"),
    }
}

/// An immediate restart that waits until the server accepts connections again.
fn restart(server: &LocalServer) {
    server
        .restart("immediate")
        .unwrap_or_else(|e| panic!("restarting a server: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_15_to_18() {
    soak(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_18_to_18() {
    soak(18).await;
}
