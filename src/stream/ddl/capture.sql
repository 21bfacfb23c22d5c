-- The DDL capture of one stream (see capture.rs): its table, its function and its three event triggers.
-- capture.rs fills in the placeholders in double braces; everything else is plain SQL.
CREATE SCHEMA IF NOT EXISTS hikkoshi;
CREATE TABLE IF NOT EXISTS {{TABLE}} (
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
-- what the applier needs to replay a command as the source ran it (added later: an older capture gets them)
ALTER TABLE {{TABLE}} ADD COLUMN IF NOT EXISTS renamed text[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS renamed_out text[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS settings text[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS missing text[] NOT NULL DEFAULT '{}';
-- the names the stream's tables (and their partitions) had when last seen: a rename is told by the old name,
-- which the target still has, and which the catalog no longer holds at ddl_command_end
CREATE TABLE IF NOT EXISTS {{NAMES}} (
    relid oid PRIMARY KEY,
    name  text NOT NULL
);
-- The work, with a search_path of its own; the event trigger's function below passes it the event, the tag and
-- the session's search_path (which a function with its own search_path could no longer read).
CREATE OR REPLACE FUNCTION {{BODY}}(tg_event text, tg_tag text, outer_path text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $hikkoshi$
DECLARE
    r record;
    touched text[] := '{}';
    created text[] := '{}';
    unpublished text[] := '{}';
    refused text;
    col text;
    srr text;
    selected boolean;
    has_rows boolean;
    touched_oids oid[] := '{}';
    rewrites text[];
    renamed text[] := '{}';
    renamed_out text[] := '{}';
    settings text[];
    missing text[] := '{}';
    saved text[];
    internal constant text[] := ARRAY['hikkoshi', 'hikkoshi_fence'];
BEGIN
    IF coalesce(current_setting('{{OFF}}', true), '') = 'off' THEN
        RETURN;
    END IF;
    IF tg_event = 'sql_drop' THEN
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
    IF tg_event = 'table_rewrite' THEN
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
    -- the commands of an extension's script: the CREATE or ALTER EXTENSION that ran it is captured on its own
    -- (a script's DROP reports no objects; it is told by the statement that ran it)
    IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() d WHERE d.in_extension)
       OR (tg_tag NOT LIKE '% EXTENSION' AND current_query() ~* '^\s*(create|alter)\s+extension\M') THEN
        RETURN;
    END IF;
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
                                WHERE p.pubname = {{PUBLICATION}} AND pr.prrelid = pg_partition_root(r.oid));
        ELSE
            selected := EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE c.oid = r.oid AND {{SELECTED}});
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
          AND n.nspname NOT LIKE 'pg\_%' AND {{SELECTED}}
          AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                          WHERE p.pubname = {{PUBLICATION}} AND pr.prrelid = c.oid)
    LOOP
        -- rows this command brought (CREATE TABLE AS, a key added to a filled table) were never streamed; a
        -- partition detached from a published table brought its rows through its root's stream
        IF r.oid = ANY (touched_oids)
           AND NOT (tg_tag = 'ALTER TABLE' AND current_query() ~* '\mdetach\s+partition\M') THEN
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
        PERFORM set_config('{{OFF}}', 'off', true);
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', {{PUBLICATION}}, r.oid::regclass);
        PERFORM set_config('{{OFF}}', '', true);
    END LOOP;
    -- the stream's tables under a new name (ALTER TABLE … RENAME TO or SET SCHEMA, ALTER SCHEMA … RENAME): the
    -- target has them under the old one. A name the selection leaves out is the operator's choice to make.
    FOR r IN
        SELECT k.relid, k.name AS old_name, format('%I.%I', n.nspname, c.relname) AS new_name,
               (c.relispartition OR {{SELECTED}}) AS kept
        FROM {{NAMES}} k JOIN pg_class c ON c.oid = k.relid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE k.name <> format('%I.%I', n.nspname, c.relname)
    LOOP
        renamed := renamed || r.old_name || r.new_name;
        IF NOT r.kept THEN
            renamed_out := renamed_out || r.old_name || r.new_name;
        END IF;
        UPDATE {{NAMES}} SET name = r.new_name WHERE relid = r.relid;
    END LOOP;
    DELETE FROM {{NAMES}} k WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = k.relid);
    INSERT INTO {{NAMES}} (relid, name)
    SELECT t.relid, format('%I.%I', n.nspname, c.relname)
    FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
    -- a plain table has no partition tree: itself
CROSS JOIN LATERAL (SELECT pr.prrelid AS relid UNION SELECT relid FROM pg_partition_tree(pr.prrelid)) t
    JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE p.pubname = {{PUBLICATION}} AND NOT n.nspname = ANY (internal)
    ON CONFLICT (relid) DO NOTHING;
    -- the session's settings that values computed by the command depend on (timestamptz → timestamp, text →
    -- date): the applier runs the command under the same ones
    settings := ARRAY['TimeZone', current_setting('TimeZone'), 'DateStyle', current_setting('DateStyle'),
                      'IntervalStyle', current_setting('IntervalStyle')];
    -- values computed once and kept as a column's missing value (ADD COLUMN … DEFAULT now(), no rewrite):
    -- in a form any session reads back the same; the applier sets them where the target computed others
    IF tg_tag = 'ALTER TABLE' AND cardinality(touched_oids) > 0 THEN
        saved := ARRAY[current_setting('DateStyle'), current_setting('IntervalStyle'),
                       current_setting('extra_float_digits'), current_setting('bytea_output')];
        PERFORM set_config('DateStyle', 'ISO, YMD', true), set_config('IntervalStyle', 'postgres', true),
                set_config('extra_float_digits', '3', true), set_config('bytea_output', 'hex', true);
        FOR r IN
            SELECT format('%I.%I', n.nspname, c.relname) AS t, a.attname::text AS col, a.attmissingval::text AS v
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE a.attrelid = ANY (touched_oids) AND a.atthasmissing AND NOT a.attisdropped
        LOOP
            missing := missing || r.t || r.col || r.v;
        END LOOP;
        PERFORM set_config('DateStyle', saved[1], true), set_config('IntervalStyle', saved[2], true),
                set_config('extra_float_digits', saved[3], true), set_config('bytea_output', saved[4], true);
    END IF;
    IF cardinality(touched) = 0 AND cardinality(renamed) = 0 AND EXISTS (
        SELECT 1 FROM pg_event_trigger_ddl_commands() d
        WHERE d.schema_name = ANY (internal) OR d.schema_name LIKE 'pg\_temp%') THEN
        RETURN;
    END IF;
    INSERT INTO {{TABLE}} (tag, statement, statement_at, pid, search_path, role_name, touched, created,
                      unpublished, refused, renamed, renamed_out, settings, missing)
    VALUES (tg_tag, current_query(), statement_timestamp(), pg_backend_pid(),
            outer_path,
            CASE WHEN current_setting('role') = 'none' THEN session_user::text ELSE current_setting('role') END,
            touched, created, unpublished, refused, renamed, renamed_out, settings, missing);
    -- values computed on the source by a rewrite: every row travels, so the target gets the same ones
    rewrites := array_remove(string_to_array(coalesce(current_setting('hikkoshi.rewrites', true), ''), ','), '');
    PERFORM set_config('hikkoshi.rewrites', '', true);
    FOR r IN
        SELECT DISTINCT c.oid FROM unnest(rewrites) w
        JOIN pg_class c ON c.oid = split_part(w, ':', 1)::oid
        WHERE (split_part(w, ':', 2)::int & 2 = 2
               OR (split_part(w, ':', 2)::int & 4 = 4 AND current_query() ~* '\musing\M'))
          AND EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                      WHERE p.pubname = {{PUBLICATION}}
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
REVOKE ALL ON FUNCTION {{BODY}}(text, text, text) FROM PUBLIC;
-- When the work fails (a right the owner lacks, say), the application's DDL must still succeed: what the work
-- did is undone, and a row says that the command could not be captured, so the stream stops there with the
-- command named instead of going on without it.
CREATE OR REPLACE FUNCTION {{FAILED}}(tg_tag text, outer_path text, why text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $hikkoshi$
BEGIN
    INSERT INTO {{TABLE}} (tag, statement, statement_at, pid, search_path, role_name, touched, created,
                      unpublished, refused)
    VALUES (tg_tag, current_query(), statement_timestamp(), pg_backend_pid(), outer_path,
            CASE WHEN current_setting('role') = 'none' THEN session_user::text ELSE current_setting('role') END,
            '{}', '{}', '{}', 'the capture failed on the source (' || why || ')');
END
$hikkoshi$;
REVOKE ALL ON FUNCTION {{FAILED}}(text, text, text) FROM PUBLIC;
-- runs as its owner (who may insert into the table and add tables to the publication); every name in it is
-- qualified, since the session's search_path is still in force here
CREATE OR REPLACE FUNCTION {{FUNCTION}}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $hikkoshi$
BEGIN
    PERFORM {{BODY}}(TG_EVENT, TG_TAG, pg_catalog.current_setting('search_path'));
EXCEPTION WHEN OTHERS THEN
    BEGIN
        PERFORM {{FAILED}}(TG_TAG, pg_catalog.current_setting('search_path'), SQLERRM);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'hikkoshi could not capture this DDL (%): the stream will stop at the table it changed', SQLERRM;
    END;
END
$hikkoshi$;
{{EVENT_TRIGGERS}}
DO $join$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                   WHERE p.pubname = {{PUBLICATION}} AND pr.prrelid = {{TABLE_LITERAL}}::regclass) THEN
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', {{PUBLICATION}}, {{TABLE_LITERAL}});
    END IF;
END $join$;
INSERT INTO {{NAMES}} (relid, name)
SELECT t.relid, format('%I.%I', n.nspname, c.relname)
FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
-- a plain table has no partition tree: itself
CROSS JOIN LATERAL (SELECT pr.prrelid AS relid UNION SELECT relid FROM pg_partition_tree(pr.prrelid)) t
JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE p.pubname = {{PUBLICATION}} AND n.nspname NOT IN ('hikkoshi', 'hikkoshi_fence')
ON CONFLICT (relid) DO NOTHING;
