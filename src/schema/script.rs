//! Restoring through a SQL script, when the only pg_restore at hand is newer than the target server.
//!
//! pg_restore opens every session it restores in with the settings of its own version: 17 added `SET
//! transaction_timeout = 0`, which a 16 or older server rejects ("unrecognized configuration parameter"),
//! so a direct restore of a 17+ pg_restore into such a target fails at its first statement. Instead,
//! pg_restore writes the section as SQL (`--file=-`), the settings the target does not know and psql
//! meta-commands (`\restrict`, pg_dump 17.6+) are left out, and hikkoshi runs the statements itself:
//! - pre-data in one transaction, as `--single-transaction` would;
//! - post-data entry by entry (each starts with pg_restore's `-- Name: …; Type: …` header): indexes and
//!   plain constraints `--jobs` at a time, then everything else (foreign keys, triggers, attached partition
//!   indexes, policies…) in the archive's order, as pg_restore's own dependency order has it.
//!
//! Each entry runs with the session settings that were in force at its place in the script.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio_postgres::Client;

use super::SchemaError;
use crate::conninfo::ConnInfo;
use crate::error::Side;

/// One post-data entry of the script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// pg_restore's object type (`INDEX`, `CONSTRAINT`, `FK CONSTRAINT`, …).
    pub kind: String,
    /// The object as the header names it: `schema.name` (`name` alone where it has no schema).
    pub name: String,
    /// The session settings in force before it, as statements.
    pub settings: Vec<String>,
    pub sql: String,
}

impl Entry {
    /// Whether it may be built at the same time as others: it depends on tables only.
    fn parallel(&self) -> bool {
        self.kind == "INDEX" || self.kind == "CONSTRAINT"
    }
}

/// The setting a line of the script sets (`SET name = …;`, `SET name TO …;` or `SELECT
/// pg_catalog.set_config('name', …);`), if it is such a line.
pub fn setting_of(line: &str) -> Option<&str> {
    if let Some(rest) = line.strip_prefix("SELECT pg_catalog.set_config('") {
        return rest.split('\'').next();
    }
    let rest = line.strip_prefix("SET ")?;
    if !line.trim_end().ends_with(';') {
        return None;
    }
    let name = rest.split([' ', '=']).next()?;
    (!name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'))
    .then_some(name)
}

/// The script without psql meta-commands and without settings that `known` (the target's `pg_settings`
/// names) does not have.
pub fn filter(script: &str, known: &HashSet<String>) -> String {
    script
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .filter(|l| setting_of(l).is_none_or(|name| known.contains(&name.to_lowercase())))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Splits a (filtered) post-data script into its entries.
pub fn entries(script: &str) -> Vec<Entry> {
    let mut settings: Vec<(String, String)> = Vec::new();
    let mut out: Vec<Entry> = Vec::new();
    let mut current: Option<Entry> = None;
    for line in script.lines() {
        if let Some(name) = setting_of(line) {
            settings.retain(|(n, _)| n != name);
            settings.push((name.to_string(), line.to_string()));
            continue;
        }
        if let Some(header) = line.strip_prefix("-- Name: ")
            && let Some(kind) = header
                .split("; ")
                .find_map(|part| part.strip_prefix("Type: "))
        {
            out.extend(current.take());
            let name = header.split("; ").next().unwrap_or_default();
            let schema = header
                .split("; ")
                .find_map(|part| part.strip_prefix("Schema: "))
                .filter(|s| *s != "-");
            current = Some(Entry {
                kind: kind.to_string(),
                name: match schema {
                    Some(s) => format!("{s}.{name}"),
                    None => name.to_string(),
                },
                settings: settings.iter().map(|(_, l)| l.clone()).collect(),
                sql: String::new(),
            });
            continue;
        }
        if let Some(e) = current.as_mut()
            && !line.starts_with("--")
        {
            e.sql.push_str(line);
            e.sql.push('\n');
        }
    }
    out.extend(current);
    out.retain(|e| !e.sql.trim().is_empty());
    out
}

/// The names of the target's settings.
pub async fn known_settings(client: &Client) -> Result<HashSet<String>, SchemaError> {
    Ok(client
        .query("SELECT name FROM pg_settings", &[])
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0).to_lowercase())
        .collect())
}

async fn session(target: &ConnInfo, step: &str, hint: &'static str) -> Result<Client, SchemaError> {
    crate::session::connect(target, Side::Target)
        .await
        .map_err(|e| SchemaError::Failed {
            step: step.to_string(),
            stderr: crate::error::chain(&e),
            hint,
        })
}

fn failed(step: &str, hint: &'static str, e: tokio_postgres::Error) -> SchemaError {
    let stderr = match e.as_db_error() {
        Some(db) => format!(
            "ERROR:  {}{}",
            db.message(),
            db.detail()
                .map(|d| format!("\nDETAIL:  {d}"))
                .unwrap_or_default()
        ),
        None => crate::error::chain(&e),
    };
    SchemaError::Failed {
        step: step.to_string(),
        stderr,
        hint,
    }
}

/// Runs a pre-data script in one transaction on a session of its own.
pub async fn run_in_one_transaction(
    target: &ConnInfo,
    script: &str,
    step: &str,
    hint: &'static str,
) -> Result<(), SchemaError> {
    let client = session(target, step, hint).await?;
    let known = known_settings(&client).await?;
    client
        .batch_execute(&format!("BEGIN;\n{}\nCOMMIT;", filter(script, &known)))
        .await
        .map_err(|e| failed(step, hint, e))
}

/// Runs a post-data script: indexes and plain constraints over `jobs` sessions, then the rest in order.
pub async fn run_entries(
    target: &ConnInfo,
    script: &str,
    jobs: usize,
    session_settings: &str,
    step: &str,
    hint: &'static str,
) -> Result<(), SchemaError> {
    let first = session(target, step, hint).await?;
    let known = known_settings(&first).await?;
    let all = entries(&filter(script, &known));
    let (parallel, ordered): (Vec<Entry>, Vec<Entry>) = all.into_iter().partition(Entry::parallel);
    let queue = Arc::new(Mutex::new(VecDeque::from(parallel)));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..jobs.max(1) {
        let queue = queue.clone();
        let (target, step, settings) = (
            target.clone(),
            step.to_string(),
            session_settings.to_string(),
        );
        set.spawn(async move {
            let client = session(&target, &step, hint).await?;
            client
                .batch_execute(&settings)
                .await
                .map_err(|e| failed(&step, hint, e))?;
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some(e) = next else { break };
                run_entry(&client, &e, &step, hint).await?;
            }
            Ok::<_, SchemaError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| SchemaError::Failed {
            step: step.to_string(),
            stderr: format!("a build task failed: {e}"),
            hint,
        })??;
    }
    first
        .batch_execute(session_settings)
        .await
        .map_err(|e| failed(step, hint, e))?;
    for e in &ordered {
        run_entry(&first, e, step, hint).await?;
    }
    Ok(())
}

async fn run_entry(
    client: &Client,
    e: &Entry,
    step: &str,
    hint: &'static str,
) -> Result<(), SchemaError> {
    let sql = format!("{}\n{}", e.settings.join("\n"), e.sql);
    client
        .batch_execute(&sql)
        .await
        .map_err(|err| failed(step, hint, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POST: &str = "--
-- PostgreSQL database dump
--

\\restrict abc123

SET statement_timeout = 0;
SET transaction_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;

SET default_tablespace = '';

--
-- Name: users users_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.users
    ADD CONSTRAINT users_pkey PRIMARY KEY (id);


--
-- Name: users_email; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX users_email ON public.users USING btree (email);


SET default_tablespace = fast;

--
-- Name: orders orders_user_fk; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_user_fk FOREIGN KEY (user_id) REFERENCES public.users(id);

\\unrestrict abc123
";

    fn known(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn settings_the_target_does_not_know_and_meta_commands_are_left_out() {
        let out = filter(
            POST,
            &known(&[
                "statement_timeout",
                "search_path",
                "check_function_bodies",
                "default_tablespace",
            ]),
        );
        assert!(!out.contains("transaction_timeout"), "{out}");
        assert!(
            !out.contains("\\restrict") && !out.contains("\\unrestrict"),
            "{out}"
        );
        assert!(out.contains("SET statement_timeout = 0;"), "{out}");
        assert!(out.contains("set_config('search_path'"), "{out}");
    }

    #[test]
    fn setting_lines_are_recognised_and_statements_are_not() {
        assert_eq!(
            setting_of("SET transaction_timeout = 0;"),
            Some("transaction_timeout")
        );
        assert_eq!(
            setting_of("SET default_tablespace TO '';"),
            Some("default_tablespace")
        );
        assert_eq!(
            setting_of("SELECT pg_catalog.set_config('search_path', '', false);"),
            Some("search_path")
        );
        assert_eq!(setting_of("ALTER TABLE x SET (fillfactor = 50);"), None);
        assert_eq!(setting_of("    SET search_path = public;"), None);
        assert_eq!(setting_of("SET x = (SELECT"), None);
    }

    #[test]
    fn entries_carry_their_kind_and_the_settings_in_force() {
        let e = entries(POST);
        assert_eq!(
            e.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["CONSTRAINT", "INDEX", "FK CONSTRAINT"]
        );
        assert!(e[0].sql.contains("users_pkey PRIMARY KEY"), "{:?}", e[0]);
        assert_eq!(e[2].name, "public.orders orders_user_fk");
        assert!(
            e[0].settings
                .contains(&"SET default_tablespace = '';".to_string())
        );
        assert!(
            e[2].settings
                .contains(&"SET default_tablespace = fast;".to_string())
        );
        assert!(
            !e[2]
                .settings
                .contains(&"SET default_tablespace = '';".to_string())
        );
        assert!(e[0].parallel() && e[1].parallel() && !e[2].parallel());
    }
}
