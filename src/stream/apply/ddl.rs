//! A captured DDL command (a row of the capture table, see `stream::ddl::capture`), applied on the target
//! at its place in the stream: after every change before it, before every change after it, in the same
//! target transaction as the LSN that covers it, so that a crash leaves both or neither.

use super::statements::Sql;
use super::{Applier, ApplyError};
use crate::ident::quote_literal;
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
            // the target's tables changed: what the applier knows of them follows
            self.refresh_tables().await?;
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
        // a command on tables the selection leaves out (they are not on the target) is not replayed
        if !c.touched.is_empty() && c.created.is_empty() {
            let here: bool = self
                .client
                .query_one(
                    "SELECT coalesce(bool_or(to_regclass(t) IS NOT NULL), false) FROM unnest($1::text[]) t",
                    &[&c.touched],
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
        let restore = format!(
            "{}SELECT set_config('search_path', {}, true)",
            if role.is_some() { "RESET ROLE;" } else { "" },
            quote_literal(&self.search_path)
        );
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
        let tables: Vec<&String> = c.touched.iter().chain(&c.created).collect();
        self.client
            .execute(crate::state::ddl::TRACK_TABLES, &[&tables])
            .await
            .map_err(target("recording the tables DDL changed"))?;
        Ok((Outcome::Applied, Some(sql)))
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
    async fn refresh_tables(&mut self) -> Result<(), ApplyError> {
        let tables = crate::stream::follow::read_target_tables(&self.client)
            .await
            .map_err(|source| ApplyError::Target {
                what: "rereading the target's tables after DDL".into(),
                source,
            })?;
        for (_, rel) in self.relations.iter_mut() {
            if let Some(t) = tables.get(&rel.table.name) {
                rel.table = t.clone();
            }
        }
        self.tables = tables;
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 300 {
        format!("{}…", flat.chars().take(300).collect::<String>())
    } else {
        flat
    }
}
