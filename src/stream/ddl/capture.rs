//! The capture on the upstream server: an event trigger that writes each DDL command into a table of the
//! stream's publication, so that the command reaches the applier in commit order, between the changes
//! before and after it.
//!
//! What the trigger does, per event:
//! - `sql_drop`: notes the tables and indexes dropped (they are gone from the catalog by `ddl_command_end`);
//! - `table_rewrite`: notes the table and the reason (a volatile default, a column rewrite);
//! - `ddl_command_end`: writes one row (statement, tag, `search_path`, role, the tables it touched, the
//!   tables it created), then:
//!   - a new table that the selection takes and that has a replica identity joins the publication in the
//!     same transaction, so every row written to it afterwards is streamed. One that already has rows (CREATE
//!     TABLE AS, a key added to a filled table) is marked: those rows were never streamed, and the applier
//!     refuses it;
//!   - a published table rewritten with values computed there (`ADD COLUMN … DEFAULT gen_random_uuid()`, or
//!     `ALTER COLUMN … TYPE … USING`) has every row touched (`UPDATE t SET c = c`, user triggers off): the
//!     stream then carries the source's values, which overwrite the ones the target computed;
//!   - the stream's tables whose name changed since the capture last saw them (kept in `<stream>_names`:
//!     at `ddl_command_end` the catalog has only the new name, the target only the old), and whether the
//!     selection still takes the new name;
//!   - the session's TimeZone, DateStyle and IntervalStyle (a type change converts under them), and the
//!     missing values of the touched tables' columns (`ADD COLUMN … DEFAULT now()` computes one value and
//!     rewrites nothing), for the applier to replay the same values.
//!
//! Sessions with `hikkoshi.capture = off` (every hikkoshi session) are not captured, nor are objects in
//! temporary schemas or in hikkoshi's own.

use crate::ident::{QualifiedName, quote_ident, quote_literal};
use crate::plan::Selection;

/// The setting that keeps a session's DDL out of the capture (every hikkoshi session sets it).
pub const OFF_SETTING: &str = "hikkoshi.capture";

/// The capture table of a stream (its publication's name + `_ddl`), in schema `hikkoshi`.
pub fn table(publication: &str) -> QualifiedName {
    QualifiedName::new("hikkoshi", format!("{publication}_ddl"))
}

/// The names the stream's tables had when the capture last saw them (see capture.sql), next to its table.
fn names(publication: &str) -> QualifiedName {
    QualifiedName::new("hikkoshi", format!("{publication}_names"))
}

/// The event triggers' names (global names: they carry the stream's).
fn trigger(publication: &str, event: &str) -> String {
    format!("{publication}_{event}")
}

/// The statements that install the capture for `publication` (which must exist), selecting new tables with
/// `selection`. Idempotent. Needs the right to create event triggers (a superuser, or RDS's
/// rds_superuser); the function runs as its owner, which may add tables to the publication.
pub fn install(publication: &str, selection: &Selection) -> String {
    let t = table(publication);
    let tq = t.quoted();
    let f = QualifiedName::new("hikkoshi", format!("{publication}_capture")).quoted();
    let body = QualifiedName::new("hikkoshi", format!("{publication}_capture_body")).quoted();
    let failed = QualifiedName::new("hikkoshi", format!("{publication}_capture_failed")).quoted();
    let pubname = quote_literal(publication);
    let selects = selection.sql("n.nspname", "c.relname");
    let events = [
        ("ddl_command_end", "end"),
        ("sql_drop", "drop"),
        ("table_rewrite", "rewrite"),
    ]
    .iter()
    .map(|(event, suffix)| {
        let name = quote_ident(&trigger(publication, suffix));
        format!(
            "DROP EVENT TRIGGER IF EXISTS {name};
             CREATE EVENT TRIGGER {name} ON {event} EXECUTE FUNCTION {f}();"
        )
    })
    .collect::<Vec<_>>()
    .join("\n");
    include_str!("capture.sql")
        .replace("{{EVENT_TRIGGERS}}", &events)
        .replace("{{TABLE_LITERAL}}", &quote_literal(&tq))
        .replace("{{TABLE}}", &tq)
        .replace("{{NAMES}}", &names(publication).quoted())
        .replace("{{FUNCTION}}", &f)
        .replace("{{BODY}}", &body)
        .replace("{{FAILED}}", &failed)
        .replace("{{PUBLICATION}}", &pubname)
        .replace("{{OFF}}", OFF_SETTING)
        // last: it holds the user's patterns
        .replace("{{SELECTED}}", &selects)
}

/// Removes the capture of `publication` (its event triggers, function and table). Idempotent.
pub fn remove(publication: &str) -> String {
    let t = table(publication).quoted();
    let n = names(publication).quoted();
    let f = QualifiedName::new("hikkoshi", format!("{publication}_capture")).quoted();
    let body = QualifiedName::new("hikkoshi", format!("{publication}_capture_body")).quoted();
    let failed = QualifiedName::new("hikkoshi", format!("{publication}_capture_failed")).quoted();
    let mut sql = String::new();
    for suffix in ["end", "drop", "rewrite"] {
        sql.push_str(&format!(
            "DROP EVENT TRIGGER IF EXISTS {};\n",
            quote_ident(&trigger(publication, suffix))
        ));
    }
    sql.push_str(&format!(
        "DROP FUNCTION IF EXISTS {f}();\nDROP FUNCTION IF EXISTS {body}(text, text, text);\n\
         DROP FUNCTION IF EXISTS {failed}(text, text, text);\nDROP TABLE IF EXISTS {t};\n\
         DROP TABLE IF EXISTS {n};\n"
    ));
    sql
}

/// Drops a stream's publication and its DDL capture, which go together. Idempotent.
pub fn remove_with_publication(publication: &str) -> String {
    format!(
        "DROP PUBLICATION IF EXISTS {};\n{}",
        quote_ident(publication),
        remove(publication)
    )
}

/// How a following stream treats DDL on its upstream server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Captured by an event trigger and applied in order.
    Capture,
    /// Not captured (the reason): a changed table stops the stream with the difference named, and no
    /// schema difference passes a cutover.
    Stop(String),
}

impl Mode {
    pub fn describe(&self) -> String {
        match self {
            Mode::Capture => {
                "DDL on the source is captured by an event trigger and applied on the target \
                              in order with the rows"
                    .into()
            }
            Mode::Stop(why) => format!(
                "DDL on the source is not captured ({why}): a table whose shape changes stops the stream \
                 with the difference named, and no schema difference passes a cutover"
            ),
        }
    }
}

/// Whether the session's role may create event triggers, tried in a transaction that is rolled back
/// (PostgreSQL 13 to 18 allow it to superusers only; RDS's rds_superuser and Neon's neon_superuser are
/// let through by their own hooks, which a catalog lookup cannot see).
pub async fn probe(client: &tokio_postgres::Client) -> Mode {
    let tried = client
        .batch_execute(
            "BEGIN;
             CREATE FUNCTION pg_temp.hikkoshi_probe() RETURNS event_trigger LANGUAGE plpgsql
                 AS 'BEGIN END';
             CREATE EVENT TRIGGER hikkoshi_probe ON ddl_command_end
                 EXECUTE FUNCTION pg_temp.hikkoshi_probe();",
        )
        .await;
    let _ = client.batch_execute("ROLLBACK").await;
    match tried {
        Ok(()) => Mode::Capture,
        Err(e) => Mode::Stop(refusal(&e)),
    }
}

fn refusal(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) if d.code().code() == "42501" => {
            "the source's role may not create event triggers: PostgreSQL allows that to superusers; on \
             RDS, rds_superuser can"
                .into()
        }
        Some(d) => format!("creating an event trigger failed: {}", d.message()),
        None => format!("creating an event trigger failed: {e}"),
    }
}

/// Installs the capture of `publication` in one transaction, or says why it cannot (then nothing of it
/// stays).
pub async fn install_on(
    client: &tokio_postgres::Client,
    publication: &str,
    selection: &Selection,
) -> Result<Mode, tokio_postgres::Error> {
    let sql = format!("BEGIN;\n{}\nCOMMIT;", install(publication, selection));
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(Mode::Capture),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            if e.as_db_error().is_some() {
                Ok(Mode::Stop(refusal(&e)))
            } else {
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled_and_the_selection_is_quoted() {
        let selection = Selection::parse(&["app.*".into()], &["app.tmp_{{OFF}}".into()]).unwrap();
        let sql = install("hikkoshi_ab12", &selection);
        assert!(
            !sql.contains("{{TABLE") && !sql.contains("{{FUNCTION"),
            "{sql}"
        );
        assert!(
            !sql.contains("{{PUBLICATION") && !sql.contains("{{EVENT") && !sql.contains("{{NAMES"),
            "{sql}"
        );
        assert!(sql.contains(r#""hikkoshi"."hikkoshi_ab12_ddl""#));
        assert!(sql.contains(r#"CREATE EVENT TRIGGER "hikkoshi_ab12_rewrite" ON table_rewrite"#));
        // a pattern is a literal: what it holds is not taken for a placeholder
        assert!(sql.contains("LIKE 'tmp\\_{{OFF}}'"), "{sql}");
        assert!(
            remove("hikkoshi_ab12")
                .contains(r#"DROP TABLE IF EXISTS "hikkoshi"."hikkoshi_ab12_ddl""#)
        );
    }
}
