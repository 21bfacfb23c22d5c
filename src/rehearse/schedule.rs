//! The rehearsal's schedules: the real chunk plan over `--jobs` copy workers (whose streams share the
//! measured aggregate speed), and the post-data entries over `--jobs` builders, as `pg_restore --jobs` runs
//! them.

/// The aggregate speed of `k` copy streams, in single streams: 1 for one, the measured speedup for `n`,
/// linear in between.
pub(super) fn stream_speed(k: usize, n: usize, speedup_n: f64) -> f64 {
    if k <= 1 || n <= 1 {
        return k.min(1) as f64;
    }
    1.0 + (speedup_n - 1.0) * (k - 1) as f64 / (n - 1) as f64
}

/// A piece of work for `schedule`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Job {
    /// Seconds it takes alone.
    pub(super) work: f64,
    /// Jobs of one group (a table) conflict when either is exclusive.
    pub(super) group: Option<usize>,
    pub(super) exclusive: bool,
}

/// When the last job finishes: `workers` workers each take the first job of the list that does not
/// conflict with a running one; with `k` jobs running, together they advance at `speed(k)` single speeds.
pub(super) fn schedule(jobs: &[Job], workers: usize, speed: impl Fn(usize) -> f64) -> f64 {
    let workers = workers.max(1);
    let mut pending: Vec<usize> = (0..jobs.len()).collect();
    let mut running: Vec<(usize, f64)> = Vec::new();
    let mut now = 0.0;
    loop {
        while running.len() < workers {
            let next = pending.iter().position(|&j| {
                running.iter().all(|&(r, _)| {
                    jobs[r].group.is_none()
                        || jobs[r].group != jobs[j].group
                        || !(jobs[r].exclusive || jobs[j].exclusive)
                })
            });
            match next {
                Some(p) => {
                    let j = pending.remove(p);
                    running.push((j, jobs[j].work.max(0.0)));
                }
                None => break,
            }
        }
        if running.is_empty() {
            return now;
        }
        let k = running.len();
        let each = (speed(k) / k as f64).max(1e-9);
        let shortest = running
            .iter()
            .map(|&(_, left)| left)
            .fold(f64::INFINITY, f64::min);
        let dt = shortest / each;
        now += dt;
        for r in running.iter_mut() {
            r.1 -= each * dt;
        }
        running.retain(|&(_, left)| left > 1e-9);
    }
}

/// One entry of a `pg_restore --file=-` script: its header's type and name, the table it is on, its SQL.
#[derive(Debug, PartialEq)]
pub(super) struct Block {
    pub(super) kind: String,
    pub(super) name: String,
    pub(super) table: Option<String>,
    pub(super) sql: String,
}

/// Splits a post-data script at pg_restore's `-- Name: ...; Type: ...;` headers.
pub(super) fn post_data_entries(script: &str) -> Vec<Block> {
    let mut blocks: Vec<Block> = Vec::new();
    for line in script.lines() {
        if let Some(rest) = line.strip_prefix("-- Name: ") {
            let mut name = String::new();
            let mut kind = String::new();
            for part in rest.split("; ") {
                if let Some(t) = part.strip_prefix("Type: ") {
                    kind = t.to_string();
                } else if name.is_empty() {
                    name = part.to_string();
                }
            }
            blocks.push(Block {
                kind,
                name,
                table: None,
                sql: String::new(),
            });
        } else if let Some(b) = blocks.last_mut()
            && !line.starts_with("--")
        {
            b.sql.push_str(line);
            b.sql.push('\n');
        }
    }
    // settings before the first entry (search_path, ...) go with every entry: each runs on its own
    let preamble: String = script
        .lines()
        .take_while(|l| !l.starts_with("-- Name: "))
        .filter(|l| !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    blocks.retain(|b| !b.sql.trim().is_empty());
    for b in &mut blocks {
        b.table = table_of(&b.sql);
        b.sql = format!("{preamble}\n{}", b.sql);
    }
    blocks
}

/// The table an index or ALTER TABLE statement is on, as pg_dump writes it (`schema.name`, quoted where
/// needed).
pub(super) fn table_of(sql: &str) -> Option<String> {
    let s = sql.trim_start();
    let rest = if let Some(r) = s.strip_prefix("ALTER TABLE ") {
        r
    } else if (s.starts_with("CREATE ") && s.contains(" INDEX "))
        || s.starts_with("CREATE TRIGGER")
        || s.starts_with("CREATE CONSTRAINT TRIGGER")
    {
        let at = s.find(" ON ")?;
        &s[at + 4..]
    } else {
        return None;
    };
    let rest = rest.trim_start();
    let rest = rest.strip_prefix("ONLY ").unwrap_or(rest).trim_start();
    // a name is quoted parts and plain characters up to the first space outside quotes
    let mut out = String::new();
    let mut quoted = false;
    for c in rest.chars() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted && (c.is_whitespace() || c == '(') {
            break;
        }
        out.push(c);
    }
    (!out.is_empty()).then_some(out)
}

/// A build measured on `sample_rows` rows, scaled to `row_scale` times as many by n log n.
pub(super) fn scale_build(secs: f64, row_scale: f64, sample_rows: u64) -> f64 {
    if row_scale <= 1.0 {
        return secs;
    }
    let n = (sample_rows as f64).max(2.0);
    let full = n * row_scale;
    secs * row_scale * (full.ln() / n.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(work: f64) -> Job {
        Job {
            work,
            group: None,
            exclusive: false,
        }
    }

    #[test]
    fn schedule_takes_jobs_in_order_on_free_workers() {
        // 4, 3, 2, 1 on two workers: 4 | 3 then 2 at 3, then 1 at 4 on the first: ends at 5
        let jobs = [job(4.0), job(3.0), job(2.0), job(1.0)];
        assert!((schedule(&jobs, 2, |k| k as f64) - 5.0).abs() < 1e-9);
        assert!((schedule(&jobs, 1, |k| k as f64) - 10.0).abs() < 1e-9);
        assert_eq!(schedule(&[], 4, |k| k as f64), 0.0);
    }

    #[test]
    fn schedule_shares_a_slower_aggregate_between_running_jobs() {
        // two equal jobs, two streams together only 1.5x one: each takes 2/0.75
        let jobs = [job(2.0), job(2.0)];
        let t = schedule(&jobs, 2, |k| stream_speed(k, 2, 1.5));
        assert!((t - 2.0 / 0.75).abs() < 1e-9, "{t}");
    }

    #[test]
    fn exclusive_jobs_of_one_table_run_one_at_a_time() {
        let jobs = [
            Job {
                work: 2.0,
                group: Some(0),
                exclusive: true,
            },
            Job {
                work: 2.0,
                group: Some(0),
                exclusive: false,
            },
            Job {
                work: 1.0,
                group: Some(1),
                exclusive: true,
            },
        ];
        assert!((schedule(&jobs, 2, |k| k as f64) - 4.0).abs() < 1e-9);
    }

    #[test]
    fn post_data_scripts_split_into_entries_with_their_tables() {
        let script = "SET search_path = '';\n\n--\n-- Name: accounts accounts_pkey; Type: CONSTRAINT; Schema: public; Owner: -\n--\n\nALTER TABLE ONLY public.accounts\n    ADD CONSTRAINT accounts_pkey PRIMARY KEY (aid);\n\n--\n-- Name: ev_idx; Type: INDEX; Schema: app; Owner: -\n--\n\nCREATE INDEX ev_idx ON app.\"Events\" USING btree (created_at);\n";
        let b = post_data_entries(script);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].kind, "CONSTRAINT");
        assert_eq!(b[0].table.as_deref(), Some("public.accounts"));
        assert!(b[0].sql.starts_with("SET search_path = '';"));
        assert_eq!(b[1].kind, "INDEX");
        assert_eq!(b[1].name, "ev_idx");
        assert_eq!(b[1].table.as_deref(), Some("app.\"Events\""));
    }

    #[test]
    fn builds_scale_by_n_log_n() {
        assert_eq!(scale_build(1.0, 1.0, 1000), 1.0);
        let s = scale_build(1.0, 100.0, 1000);
        assert!((s - 100.0 * (100_000f64.ln() / 1000f64.ln())).abs() < 1e-9);
    }
}
