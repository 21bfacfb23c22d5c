#!/usr/bin/env bash
# bench/raw-copy.sh SOURCE TARGET JOBS PG_BIN: the raw limit of a clone, the fourth row of bench/clone.sh.
#
# What a clone cannot do faster than: the schema before the data (pg_dump --section=pre-data | pg_restore),
# then every table's rows as binary COPY pipes (COPY … TO STDOUT (FORMAT binary) | COPY … FROM STDIN (FORMAT
# binary)), each table split by ctid into JOBS page ranges, JOBS pipes at a time; then the indexes and
# constraints (pg_restore --section=post-data -j JOBS). No resume, no state, no progress, no snapshot shared
# between the pipes: the source must not change while it runs (bench/clone.sh does not write to it).
set -euo pipefail
[[ $# -eq 4 ]] || { echo "usage: $0 SOURCE TARGET JOBS PG_BIN" >&2; exit 2; }
SOURCE=$1 TARGET=$2 JOBS=$3 PG_BIN=$4
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PSQL=("$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -At)

"$PG_BIN/pg_dump" -Fc --schema-only -f "$WORK/schema.dump" "$SOURCE"
"$PG_BIN/pg_restore" --section=pre-data -d "$TARGET" "$WORK/schema.dump"

# one line per pipe: table, first page, page after the last (ctid range scans: PostgreSQL 14+ on the source)
"${PSQL[@]}" -d "$SOURCE" -F $'\t' -v jobs="$JOBS" >"$WORK/pipes" <<'SQL'
SELECT format('%I.%I', n.nspname, c.relname), lo, hi
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
     LATERAL (SELECT greatest(pg_relation_size(c.oid) / current_setting('block_size')::int, 1) AS pages) p,
     LATERAL (SELECT i * p.pages / :jobs AS lo, (i + 1) * p.pages / :jobs AS hi
              FROM generate_series(0, :jobs - 1) i) r
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_%' AND (r.hi > r.lo OR r.lo = 0)
ORDER BY pg_relation_size(c.oid) DESC, 1, 2
SQL

pipe() { # table lo hi
    local last=
    # the last range of a table is open at the top: pages added after pg_relation_size was read
    [[ $3 == "$(awk -F'\t' -v t="$1" '$1 == t { h = $3 } END { print h }' "$WORK/pipes")" ]] && last=1
    local where="ctid >= '($2,0)'"
    [[ -z $last ]] && where="$where AND ctid < '($3,0)'"
    "${PSQL[@]}" -d "$SOURCE" -c "COPY (SELECT * FROM ONLY $1 WHERE $where) TO STDOUT (FORMAT binary)" |
        "${PSQL[@]}" -d "$TARGET" -c "COPY $1 FROM STDIN (FORMAT binary)"
}
export -f pipe
export WORK SOURCE TARGET
export PSQL_BIN=$PG_BIN/psql
# xargs runs JOBS pipes at a time, each as its own shell
xargs -P "$JOBS" -d '\n' -n 1 bash -c \
    'PSQL=("$PSQL_BIN" -X -q -v ON_ERROR_STOP=1 -At); IFS=$'"'"'\t'"'"' read -r t lo hi <<<"$1"; pipe "$t" "$lo" "$hi"' _ \
    <"$WORK/pipes"

"$PG_BIN/pg_restore" --section=post-data -j "$JOBS" -d "$TARGET" "$WORK/schema.dump"
