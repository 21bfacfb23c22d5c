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
//!     stream then carries the source's values, which overwrite the ones the target computed.
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
    format!(
        r#"
CREATE SCHEMA IF NOT EXISTS hikkoshi;
CREATE TABLE IF NOT EXISTS {tq} (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    tag          text NOT NULL,
    statement    text NOT NULL,
    statement_at timestamptz NOT NULL,
    pid          integer NOT NULL,
    search_path  text NOT NULL,
    role_name    text NOT NULL,
    touched      text[] NOT NULL,
    created      text[] NOT NULL,
    unpublished  text[] NOT NULL,
    refused      text
);
CREATE OR REPLACE FUNCTION {f}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $hikkoshi$
DECLARE
    r record;
    touched text[] := '{{}}';
    created text[] := '{{}}';
    unpublished text[] := '{{}}';
    refused text;
    col text;
    srr text;
    selected boolean;
    has_rows boolean;
    touched_oids oid[] := '{{}}';
    rewrites text[];
    internal constant text[] := ARRAY['hikkoshi', 'hikkoshi_fence'];
BEGIN
    IF coalesce(current_setting('{off}', true), '') = 'off' THEN
        RETURN;
    END IF;
    IF TG_EVENT = 'sql_drop' THEN
        FOR r IN SELECT object_type, address_names, coalesce(is_temporary, false) AS temporary
                 FROM pg_event_trigger_dropped_objects() LOOP
            IF r.temporary OR r.address_names[1] = ANY (internal) THEN CONTINUE; END IF;
            -- a command that dropped only temporary or hikkoshi objects is not replayed
            PERFORM set_config('hikkoshi.dropped_kept', 'on', true);
            IF r.object_type IN ('table', 'table column', 'index', 'table constraint', 'trigger') THEN
                touched := touched || format('%I.%I', r.address_names[1], r.address_names[2]);
            END IF;
        END LOOP;
        PERFORM set_config('hikkoshi.dropped',
            array_to_string(string_to_array(coalesce(current_setting('hikkoshi.dropped', true), ''), E'\n')
                            || touched, E'\n'), true);
        PERFORM set_config('hikkoshi.dropped_any', 'on', true);
        RETURN;
    END IF;
    IF TG_EVENT = 'table_rewrite' THEN
        PERFORM set_config('hikkoshi.rewrites',
            coalesce(current_setting('hikkoshi.rewrites', true), '')
            || pg_event_trigger_table_rewrite_oid()::oid::text || ':'
            || pg_event_trigger_table_rewrite_reason()::text || ',', true);
        RETURN;
    END IF;
    -- ddl_command_end
    IF coalesce(current_setting('hikkoshi.dropped_any', true), '') = 'on' THEN
        PERFORM set_config('hikkoshi.dropped_any', '', true);
        IF coalesce(current_setting('hikkoshi.dropped_kept', true), '') <> 'on' THEN
            PERFORM set_config('hikkoshi.dropped', '', true);
            RETURN;
        END IF;
        PERFORM set_config('hikkoshi.dropped_kept', '', true);
    END IF;
    touched := array_remove(string_to_array(coalesce(current_setting('hikkoshi.dropped', true), ''), E'\n'), '');
    PERFORM set_config('hikkoshi.dropped', '', true);
    FOR r IN
        SELECT DISTINCT c.oid, n.nspname, c.relname, c.relispartition, d.command_tag
        FROM pg_event_trigger_ddl_commands() d
        JOIN pg_class c ON c.oid = CASE
            WHEN d.classid = 'pg_class'::regclass THEN
                coalesce((SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = d.objid), d.objid)
            WHEN d.classid = 'pg_constraint'::regclass THEN
                (SELECT k.conrelid FROM pg_constraint k WHERE k.oid = d.objid)
            WHEN d.classid = 'pg_trigger'::regclass THEN
                (SELECT g.tgrelid FROM pg_trigger g WHERE g.oid = d.objid)
            WHEN d.classid = 'pg_attrdef'::regclass THEN
                (SELECT a.adrelid FROM pg_attrdef a WHERE a.oid = d.objid)
            WHEN d.classid = 'pg_rewrite'::regclass THEN
                (SELECT w.ev_class FROM pg_rewrite w WHERE w.oid = d.objid)
            END
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT d.in_extension AND c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
          AND NOT n.nspname = ANY (internal)
    LOOP
        touched := touched || format('%I.%I', r.nspname, r.relname);
        touched_oids := touched_oids || r.oid;
        IF r.relispartition THEN
            -- a partition travels with its root, when the stream has the root
            selected := EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                                WHERE p.pubname = {pubname} AND pr.prrelid = pg_partition_root(r.oid));
        ELSE
            selected := EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE c.oid = r.oid AND {selects});
        END IF;
        IF selected AND r.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO') THEN
            created := created || format('%I.%I', r.nspname, r.relname);
        END IF;
    END LOOP;
    -- tables the selection takes that the stream does not have yet: new ones, and those that came into the
    -- selection (renamed, moved to another schema, detached from a partitioned table)
    FOR r IN
        SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p'
          AND NOT n.nspname = ANY (internal) AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\_%' AND {selects}
          AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                          WHERE p.pubname = {pubname} AND pr.prrelid = c.oid)
    LOOP
        -- rows this command brought (CREATE TABLE AS, a key added to a filled table) were never streamed; a
        -- partition detached from a published table brought its rows through its root's stream
        IF r.oid = ANY (touched_oids)
           AND NOT (TG_TAG = 'ALTER TABLE' AND current_query() ~* '\mdetach\s+partition\M') THEN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', r.oid::regclass) INTO STRICT has_rows;
            IF has_rows THEN
                refused := format('%s already has rows that were written before it joined the stream',
                                  r.oid::regclass);
            END IF;
        END IF;
        IF NOT EXISTS (
            SELECT 1 FROM pg_class c WHERE c.oid = r.oid AND (c.relreplident = 'f'
               OR (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
               OR (c.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident))))
        THEN
            unpublished := unpublished || r.oid::regclass::text;
            CONTINUE;
        END IF;
        PERFORM set_config('{off}', 'off', true);
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', {pubname}, r.oid::regclass);
        PERFORM set_config('{off}', '', true);
    END LOOP;
    IF cardinality(touched) = 0 AND EXISTS (
        SELECT 1 FROM pg_event_trigger_ddl_commands() d
        WHERE d.schema_name = ANY (internal) OR d.schema_name LIKE 'pg\_temp%') THEN
        RETURN;
    END IF;
    INSERT INTO {tq} (tag, statement, statement_at, pid, search_path, role_name, touched, created,
                      unpublished, refused)
    VALUES (TG_TAG, current_query(), statement_timestamp(), pg_backend_pid(),
            current_setting('search_path'),
            CASE WHEN current_setting('role') = 'none' THEN session_user::text ELSE current_setting('role') END,
            touched, created, unpublished, refused);
    -- values computed on the source by a rewrite: every row travels, so the target gets the same ones
    rewrites := array_remove(string_to_array(coalesce(current_setting('hikkoshi.rewrites', true), ''), ','), '');
    PERFORM set_config('hikkoshi.rewrites', '', true);
    FOR r IN
        SELECT DISTINCT c.oid FROM unnest(rewrites) w
        JOIN pg_class c ON c.oid = split_part(w, ':', 1)::oid
        WHERE (split_part(w, ':', 2)::int & 2 = 2
               OR (split_part(w, ':', 2)::int & 4 = 4 AND current_query() ~* '\musing\M'))
          AND EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                      WHERE p.pubname = {pubname}
                        AND pr.prrelid IN (c.oid, coalesce(pg_partition_root(c.oid), c.oid)))
    LOOP
        SELECT a.attname INTO col FROM pg_attribute a
        WHERE a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
          AND a.attidentity <> 'a'
        ORDER BY a.attnum LIMIT 1;
        CONTINUE WHEN col IS NULL;
        srr := current_setting('session_replication_role');
        PERFORM set_config('session_replication_role', 'replica', true);
        EXECUTE format('UPDATE %s SET %I = %I', r.oid::regclass, col, col);
        PERFORM set_config('session_replication_role', srr, true);
    END LOOP;
END
$hikkoshi$;
{events}
DO $join$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                   WHERE p.pubname = {pubname} AND pr.prrelid = {tq_lit}::regclass) THEN
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', {pubname}, {tq_lit});
    END IF;
END $join$;
"#,
        off = OFF_SETTING,
        tq_lit = quote_literal(&tq),
    )
}

/// Whether the capture of `publication` is installed (its table is in the publication).
pub const INSTALLED: &str = "SELECT EXISTS (SELECT 1 FROM pg_publication_tables
     WHERE pubname = $1 AND schemaname = 'hikkoshi' AND tablename = $2)";

/// Removes the capture of `publication` (its event triggers, function and table). Idempotent.
pub fn remove(publication: &str) -> String {
    let t = table(publication).quoted();
    let f = QualifiedName::new("hikkoshi", format!("{publication}_capture")).quoted();
    let mut sql = String::new();
    for suffix in ["end", "drop", "rewrite"] {
        sql.push_str(&format!(
            "DROP EVENT TRIGGER IF EXISTS {};\n",
            quote_ident(&trigger(publication, suffix))
        ));
    }
    sql.push_str(&format!(
        "DROP FUNCTION IF EXISTS {f}();\nDROP TABLE IF EXISTS {t};\n"
    ));
    sql
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
