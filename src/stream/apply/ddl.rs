//! A captured DDL command (a row of the capture table, see `stream::ddl::capture`), applied on the target
//! at its place in the stream: after every change before it, before every change after it, in the same
//! target transaction as the LSN that covers it, so that a crash leaves both or neither.

use std::collections::{HashMap, HashSet};

use super::statements::Sql;
use super::{Applier, ApplyError, TargetTable};
use crate::ident::{QualifiedName, quote_literal};
use crate::stream::ddl::{Captured, split};
use crate::stream::pgoutput::{Tuple, Value};

/// What the stream does with one command.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Applied,
    /// Every table it touched is outside the selection (not on the target).
    Outside,
    /// Recorded on the target already (applied by hand, or in a transaction that committed).
    Recorded,
}

impl Applier {
    /// Applies one row of the capture table.
    pub(super) async fn ddl(
        &mut self,
        columns: &[String],
        tuple: &Tuple,
    ) -> Result<(), ApplyError> {
        let values: Vec<Option<String>> = tuple
            .0
            .iter()
            .map(|v| match v {
                Value::Text(b) | Value::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect();
        let c = Captured::from_row(columns, &values).map_err(ApplyError::Definite)?;
        // changes before it are written with the shapes they were made in
        self.flush_all().await?;
        self.drain().await?;
        let (outcome, ran) = self.apply_ddl(&c).await?;
        tracing::info!(id = c.id, tag = %c.tag, ?outcome, "DDL from the source");
        if outcome != Outcome::Recorded {
            let text = match outcome {
                Outcome::Applied => "applied",
                _ => "skipped: every table it touches is outside the selection",
            };
            self.send(
                Sql::new(
                    crate::state::ddl::RECORD,
                    vec![
                        Some(self.capture_stream.clone()),
                        Some(c.id.to_string()),
                        Some(c.at.clone()),
                        Some(c.tag.clone()),
                        Some(ran.unwrap_or_else(|| c.statement.clone())),
                        Some(text.into()),
                    ],
                ),
                None,
            )
            .await?;
        }
        if outcome == Outcome::Applied {
            crate::failpoint::hit(crate::failpoint::APPLY_AFTER_DDL);
            // a new enum value, a new table: usable by later transactions only once committed
            self.commit_after = true;
        }
        for t in &c.unpublished {
            tracing::warn!(
                "the source created {t} without a primary key: its rows travel only once it has one (the \
                 capture adds it to the stream then, if it is still empty). Verification compares it, so \
                 the cutover refuses while its rows differ"
            );
        }
        Ok(())
    }

    /// What became of the command, and the statement run on the target.
    async fn apply_ddl(&mut self, c: &Captured) -> Result<(Outcome, Option<String>), ApplyError> {
        let target = |what: &str| {
            let what = what.to_string();
            move |source| ApplyError::Target { what, source }
        };
        // every command takes its statement of the string, applied or not, so the next one takes the next
        let piece = self.piece_of(c);
        let done = self
            .client
            .query_opt(crate::state::ddl::OUTCOME, &[&self.capture_stream, &c.id])
            .await
            .map_err(target("reading the DDL log"))?;
        if done.is_some() {
            return Ok((Outcome::Recorded, None));
        }
        if let Some(why) = &c.refused {
            return Err(ApplyError::SchemaChanged(format!(
                "the source ran `{}` (DDL {} at {}), which the stream cannot carry: {why}. Nothing after \
                 it was applied. Run `hikkoshi clean` and clone again (with --exclude for the table, if \
                 it need not move)",
                one_line(&c.statement),
                c.id,
                c.at
            )));
        }
        if let Some((old, new)) = c.renamed_out.first() {
            return Err(ApplyError::SchemaChanged(format!(
                "the source ran `{}` (DDL {} at {}), which moves {old} to {new}: the selection this clone \
                 was made with (--include/--exclude) leaves {new} out, so the stream cannot tell whether \
                 the table is still to move. Nothing after it was applied. To keep moving it under its new \
                 name: run the same command on the target, record it as done there — INSERT INTO \
                 hikkoshi.ddl (stream, id, outcome) VALUES ({}, {}, 'by hand') — and run the same command \
                 again. To leave it behind: `hikkoshi clean`, and clone again with the selection you want",
                one_line(&c.statement),
                c.id,
                c.at,
                quote_literal(&self.capture_stream),
                c.id
            )));
        }
        // a command on tables the selection leaves out (they are not on the target) is not replayed; a
        // renamed table is on the target under its old name
        let mut names = c.touched.clone();
        names.extend(c.renamed.iter().map(|(old, _)| old.clone()));
        if !names.is_empty() && c.created.is_empty() {
            let here: bool = self
                .client
                .query_one(
                    "SELECT coalesce(bool_or(to_regclass(t) IS NOT NULL), false) FROM unnest($1::text[]) t",
                    &[&names],
                )
                .await
                .map_err(target("looking up the tables a DDL command touched"))?
                .get(0);
            if !here {
                return Ok((Outcome::Outside, None));
            }
        }
        let sql = split::for_target(&piece?);
        let role = self.role_for(&c.role).await?;
        let mut run = format!(
            "SELECT set_config('search_path', {}, true);",
            quote_literal(&c.search_path)
        );
        if let Some(role) = &role {
            run.push_str(&format!("SET ROLE {};", crate::ident::quote_ident(role)));
        }
        // the session settings the source computed values under (a timestamptz → timestamp rewrite reads
        // TimeZone), and the apply session's own, restored after it
        let settings = replayed_settings(&c.settings);
        let mut restore = format!(
            "{}SELECT set_config('search_path', {}, true);",
            if role.is_some() { "RESET ROLE;" } else { "" },
            quote_literal(&self.search_path)
        );
        for (name, value) in &settings {
            let own: String = self
                .client
                .query_one("SELECT current_setting($1)", &[name])
                .await
                .map_err(target("reading the apply session's settings"))?
                .get(0);
            run.push_str(&format!(
                "SELECT set_config({}, {}, true);",
                quote_literal(name),
                quote_literal(value)
            ));
            restore.push_str(&format!(
                "SELECT set_config({}, {}, true);",
                quote_literal(name),
                quote_literal(&own)
            ));
        }
        // the columns of the tables it touches as the target has them before (a renamed one: under its old
        // name), to tell the columns whose values it computes
        let before: Vec<(QualifiedName, Option<TargetTable>)> = c
            .touched
            .iter()
            .filter_map(|t| QualifiedName::parse(t))
            .map(|name| {
                let was = c
                    .renamed
                    .iter()
                    .find(|(_, new)| QualifiedName::parse(new).as_ref() == Some(&name))
                    .and_then(|(old, _)| QualifiedName::parse(old))
                    .unwrap_or_else(|| name.clone());
                let t = self.tables.get(&was).cloned();
                (name, t)
            })
            .collect();
        self.client
            .batch_execute(&run)
            .await
            .map_err(target("preparing to apply DDL"))?;
        if let Err(e) = self.client.batch_execute(&sql).await {
            let cause = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string());
            let err = if e.as_db_error().is_none() {
                ApplyError::Target {
                    what: "applying DDL from the source".into(),
                    source: e,
                }
            } else {
                ApplyError::SchemaChanged(format!(
                    "the source ran `{}` (DDL {} at {}); on the target it fails: {cause}. Nothing of this \
                     batch was applied. Make the target able to take it (or apply it there by hand), then \
                     record it as done on the target — INSERT INTO hikkoshi.ddl (stream, id, outcome) \
                     VALUES ({}, {}, 'by hand') — and run the same command again",
                    one_line(&sql),
                    c.id,
                    c.at,
                    quote_literal(&self.capture_stream),
                    c.id
                ))
            };
            self.reset().await;
            return Err(err);
        }
        self.client
            .batch_execute(&restore)
            .await
            .map_err(target("applying DDL"))?;
        let (from, to): (Vec<&String>, Vec<&String>) =
            c.renamed.iter().map(|(old, new)| (old, new)).unzip();
        if !from.is_empty() {
            self.client
                .execute(crate::state::ddl::RENAME_TABLES, &[&from, &to])
                .await
                .map_err(target("recording the tables DDL renamed"))?;
        }
        let tables: Vec<&String> = c.touched.iter().chain(&c.created).collect();
        self.client
            .execute(crate::state::ddl::TRACK_TABLES, &[&tables])
            .await
            .map_err(target("recording the tables DDL changed"))?;
        // the target's tables changed: what the applier knows of them follows
        self.refresh_tables(&c.renamed).await?;
        for (name, was) in before {
            let Some(now) = self.tables.get(&name) else {
                continue;
            };
            let computed = computed_columns(was.as_ref().map(|t| &t.columns), &now.columns);
            if computed.is_empty() {
                continue;
            }
            if let Err(e) = self.carry_missing(c, &name, &computed).await {
                self.reset().await;
                return Err(e);
            }
            self.recomputed.entry(name).or_default().extend(computed);
        }
        self.share_recomputed();
        Ok((Outcome::Applied, Some(sql)))
    }

    /// Columns the command added whose rows read a value the source computed once (a missing value:
    /// `ADD COLUMN … DEFAULT now()` rewrites nothing, and the target computed its own when it ran the same
    /// command): every row of the table on the target takes the source's value.
    async fn carry_missing(
        &mut self,
        c: &Captured,
        table: &QualifiedName,
        computed: &HashSet<String>,
    ) -> Result<(), ApplyError> {
        for m in &c.missing {
            if QualifiedName::parse(&m.table).as_ref() != Some(table)
                || !computed.contains(&m.column)
            {
                continue;
            }
            let Some(ty) = self
                .tables
                .get(table)
                .and_then(|t| t.columns.get(&m.column))
            else {
                continue;
            };
            let (t, col) = (table.quoted(), crate::ident::quote_ident(&m.column));
            let value = format!("(($1::text)::{ty}[])[1]");
            let differs =
                format!("SELECT {col}::text IS DISTINCT FROM {value}::text FROM {t} LIMIT 1");
            let carried = async {
                let differs: Option<bool> = self
                    .client
                    .query_opt(&differs, &[&m.value])
                    .await?
                    .map(|r| r.get(0));
                if differs == Some(true) {
                    self.client
                        .execute(&format!("UPDATE {t} SET {col} = {value}"), &[&m.value])
                        .await?;
                }
                Ok::<_, tokio_postgres::Error>(())
            }
            .await;
            if let Err(e) = carried {
                if e.as_db_error().is_none() {
                    return Err(ApplyError::Target {
                        what: "carrying a value the source computed for a new column".into(),
                        source: e,
                    });
                }
                return Err(ApplyError::SchemaChanged(format!(
                    "the source ran `{}` (DDL {} at {}), which gave the rows of {table} a value it computed \
                     once for column {}; the target computed its own, and setting the source's there \
                     fails: {}. Nothing of this batch was applied. Set the column on the target to the \
                     source's value by hand after applying the command there, record it as done — INSERT \
                     INTO hikkoshi.ddl (stream, id, outcome) VALUES ({}, {}, 'by hand') — and run the same \
                     command again",
                    one_line(&c.statement),
                    c.id,
                    c.at,
                    crate::ident::display_ident(&m.column),
                    e.as_db_error().map(|d| d.message()).unwrap_or_default(),
                    quote_literal(&self.capture_stream),
                    c.id
                )));
            }
        }
        Ok(())
    }

    /// Every described relation learns which of its columns hold values the source computed in this
    /// source transaction.
    pub(super) fn share_recomputed(&mut self) {
        for rel in self.relations.values_mut() {
            rel.recomputed = self
                .recomputed
                .get(&rel.table.name)
                .cloned()
                .unwrap_or_default();
        }
    }

    /// The statement of the query string that this command came from. Commands of one string arrive in
    /// order; each takes the next statement whose words fit its tag.
    fn piece_of(&mut self, c: &Captured) -> Result<split::Piece, ApplyError> {
        let pieces = split::split(&c.statement);
        let from = match &self.ddl_cursor {
            Some((origin, at)) if *origin == c.origin => at + 1,
            _ => 0,
        };
        let found = pieces
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, p)| split::fits(p, &c.tag));
        match found {
            Some((i, p)) => {
                self.ddl_cursor = Some((c.origin.clone(), i));
                Ok(p.clone())
            }
            None => Err(ApplyError::SchemaChanged(format!(
                "the source ran {} (DDL {} at {}) from inside `{}`: a function, a DO block or a procedure \
                 ran it, and replaying the whole of that on the target would run its other statements \
                 twice. Apply the same change on the target by hand, record it as done there — INSERT \
                 INTO hikkoshi.ddl (stream, id, outcome) VALUES ({}, {}, 'by hand') — and run the same \
                 command again",
                c.tag,
                c.id,
                c.at,
                one_line(&c.statement),
                quote_literal(&self.capture_stream),
                c.id
            ))),
        }
    }

    /// The role to run a command as on the target: the source's (through the role map) when the clone
    /// kept owners, the role exists and the apply session may become it; else the apply session's own.
    async fn role_for(&self, source_role: &str) -> Result<Option<String>, ApplyError> {
        if !self.keep_owners {
            return Ok(None);
        }
        let role = self
            .role_map
            .get(source_role)
            .cloned()
            .unwrap_or_else(|| source_role.to_string());
        let ok: bool = self
            .client
            .query_one(
                // 16 and later tell the right to SET ROLE from membership
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AND $1 <> current_user
                        AND CASE WHEN current_setting('server_version_num')::int >= 160000
                                 THEN pg_has_role(current_user, $1, 'SET')
                                 ELSE pg_has_role(current_user, $1, 'MEMBER') END",
                &[&role],
            )
            .await
            .map_err(|source| ApplyError::Target {
                what: "looking up the role of a DDL command".into(),
                source,
            })?
            .get(0);
        Ok(ok.then_some(role))
    }

    /// Rereads the target's tables after DDL (in the open transaction, which sees it), and what each
    /// described relation maps to.
    /// A renamed table is found under its new name.
    async fn refresh_tables(&mut self, renamed: &[(String, String)]) -> Result<(), ApplyError> {
        let tables = crate::stream::follow::read_target_tables(&self.client)
            .await
            .map_err(|source| ApplyError::Target {
                what: "rereading the target's tables after DDL".into(),
                source,
            })?;
        for (_, rel) in self.relations.iter_mut() {
            let name = renamed
                .iter()
                .find(|(old, _)| QualifiedName::parse(old).as_ref() == Some(&rel.table.name))
                .and_then(|(_, new)| QualifiedName::parse(new))
                .unwrap_or_else(|| rel.table.name.clone());
            if let Some(t) = tables.get(&name) {
                rel.table = t.clone();
            }
        }
        self.tables = tables;
        Ok(())
    }
}

/// The source session's settings that a command is replayed under: those that values computed by DDL
/// depend on, and no other (the capture row is data; it does not choose what the apply session runs).
fn replayed_settings(settings: &[(String, String)]) -> Vec<(String, String)> {
    settings
        .iter()
        .filter(|(name, _)| matches!(name.as_str(), "TimeZone" | "DateStyle" | "IntervalStyle"))
        .cloned()
        .collect()
}

/// The columns whose values a command computed: added, or given another type (the rewrite converted
/// them). A table that is new has none: its rows all came through the stream.
fn computed_columns(
    before: Option<&HashMap<String, String>>,
    after: &HashMap<String, String>,
) -> HashSet<String> {
    let Some(before) = before else {
        return HashSet::new();
    };
    after
        .iter()
        .filter(|(c, ty)| before.get(*c) != Some(*ty))
        .map(|(c, _)| c.clone())
        .collect()
}

fn one_line(s: &str) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 300 {
        format!("{}…", flat.chars().take(300).collect::<String>())
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(cs: &[(&str, &str)]) -> HashMap<String, String> {
        cs.iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn the_columns_a_command_computed_are_the_added_and_retyped_ones() {
        let before = columns(&[("id", "bigint"), ("at", "timestamp with time zone")]);
        let after = columns(&[
            ("id", "bigint"),
            ("at", "timestamp without time zone"),
            ("score", "double precision"),
        ]);
        let mut got: Vec<String> = computed_columns(Some(&before), &after)
            .into_iter()
            .collect();
        got.sort();
        assert_eq!(got, vec!["at", "score"]);
        assert!(computed_columns(Some(&before), &before).is_empty());
        // a new table's rows all travel in the stream
        assert!(computed_columns(None, &after).is_empty());
    }

    #[test]
    fn only_the_settings_values_depend_on_are_replayed() {
        let got = replayed_settings(&[
            ("TimeZone".into(), "Asia/Tokyo".into()),
            ("session_replication_role".into(), "origin".into()),
            ("DateStyle".into(), "SQL, DMY".into()),
        ]);
        assert_eq!(
            got,
            vec![
                ("TimeZone".into(), "Asia/Tokyo".into()),
                ("DateStyle".into(), "SQL, DMY".into())
            ]
        );
    }
}
