# bench/lib.sh: what the benchmark scripts share (sourced by bench/clone.sh and bench/stream.sh, not run).
#
# Throwaway PostgreSQL 15 (source) and 18 (target) servers in a scratch directory, on free loopback ports, with
# trust authentication; cleanup at exit (even on Ctrl-C or an error); psql helpers; small JSON and statistics
# helpers.
#
# The sourcing script sets, before calling bench_start:
#   BENCH_NAME   short name of the benchmark (clone, stream): error messages, the kept-logs directory
#   PG15_BIN PG18_BIN BENCH_DIR RESULTS_DIR STAMP KEEP
# and may set CURRENT_PID (a measured command) or add to BG_PIDS (background processes): cleanup stops their
# process trees with SIGTERM and waits for them.
# shellcheck shell=bash

die() { echo "${BENCH_NAME:-bench}.sh: error: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# PostgreSQL refuses to run as root: server-side programs then run as `postgres`.
if [[ $(id -u) == 0 ]]; then
    as_pg() { (cd / && runuser -u postgres -- "$@"); }
else
    as_pg() { "$@"; }
fi

# ---------------------------------------------------------------------------------------------------------
# scratch directory, servers, cleanup
MARKER=.hikkoshi-bench
SRC_PORT=
DST_PORT=
CURRENT_PID=
BG_PIDS=()
STARTED=0

# bench_dirs: the paths under $BENCH_DIR (call once BENCH_DIR is final)
bench_dirs() {
    SRC_DATA=$BENCH_DIR/pg15
    DST_DATA=$BENCH_DIR/pg18
    SOCK_DIR=$BENCH_DIR/sock
    WORK=$BENCH_DIR/work
    LOGS=$BENCH_DIR/logs
}

stop_servers() {
    [[ -f $SRC_DATA/postmaster.pid ]] && as_pg "$PG15_BIN/pg_ctl" -D "$SRC_DATA" -m immediate stop >/dev/null 2>&1 || true
    [[ -f $DST_DATA/postmaster.pid ]] && as_pg "$PG18_BIN/pg_ctl" -D "$DST_DATA" -m immediate stop >/dev/null 2>&1 || true
}

# All descendants of a pid, one per line (every thread's children: tokio spawns from worker threads).
descendants() {
    local -a stack=("$1") kids
    local p c f
    while ((${#stack[@]})); do
        p=${stack[-1]}
        unset 'stack[-1]'
        for f in /proc/"$p"/task/*/children; do
            kids=()
            read -r -a kids 2>/dev/null <"$f" || true
            for c in "${kids[@]}"; do
                echo "$c"
                stack+=("$c")
            done
        done
    done
}

# stop_tree PID: SIGTERM to a process and all its descendants (deepest first), then wait for it.
stop_tree() {
    local p
    for p in $(descendants "$1" | tac) "$1"; do kill -TERM "$p" 2>/dev/null || true; done
    wait "$1" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    [[ -n $CURRENT_PID ]] && stop_tree "$CURRENT_PID"
    for p in "${BG_PIDS[@]}"; do
        [[ -n $p ]] && stop_tree "$p"
    done
    if [[ -d ${LOGS:-} && -n $(ls -A "$LOGS" 2>/dev/null) ]]; then
        mkdir -p "$RESULTS_DIR/$BENCH_NAME-$STAMP-logs"
        cp -r "$LOGS"/. "$RESULTS_DIR/$BENCH_NAME-$STAMP-logs/" 2>/dev/null || true
        log "tool logs kept in $RESULTS_DIR/$BENCH_NAME-$STAMP-logs/"
    fi
    if [[ $KEEP == 1 && $STARTED == 1 ]]; then
        log "--keep: servers left running: source host=127.0.0.1 port=$SRC_PORT, target host=127.0.0.1 port=$DST_PORT"
        log "the next run of this script stops them and clears $BENCH_DIR; or by hand (as postgres):"
        log "  $PG15_BIN/pg_ctl -D $SRC_DATA stop; $PG18_BIN/pg_ctl -D $DST_DATA stop; rm -rf $BENCH_DIR"
    else
        stop_servers
        [[ -f $BENCH_DIR/$MARKER ]] && rm -rf "$BENCH_DIR"
    fi
    exit "$rc"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
    local p tries=0
    while ((tries++ < 500)); do
        p=$((20000 + RANDOM % 30000))
        [[ $p != "${SRC_PORT:-}" ]] && port_free "$p" && { echo "$p"; return; }
    done
    die "no free port found on 127.0.0.1"
}

# start_server BIN DATA PORT LOG
start_server() {
    local bin=$1 data=$2 port=$3 logf=$4
    mkdir -p "$data"
    [[ $(id -u) == 0 ]] && chown postgres: "$data"
    as_pg "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C >"$logf.initdb" 2>&1 \
        || { cat "$logf.initdb" >&2; die "initdb $data failed"; }
    # initdb -A trust: trust on the local socket and on 127.0.0.1/::1 (replication connections included).
    cat >>"$data/postgresql.conf" <<EOF

# hikkoshi bench
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$SOCK_DIR'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
fsync = on
synchronous_commit = on
EOF
    touch "$logf"
    [[ $(id -u) == 0 ]] && chown postgres: "$logf"
    as_pg "$bin/pg_ctl" -D "$data" -l "$logf" -w -t 120 start >/dev/null \
        || { tail -20 "$logf" >&2; die "could not start the server in $data"; }
}

# bench_start: clears a previous run's directory, installs the cleanup traps, creates the scratch directory and
# starts both servers (sets SRC_PORT, DST_PORT, SRC_VERSION, DST_VERSION).
bench_start() {
    if [[ $(id -u) == 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user to run the servers (useradd -r postgres)"
    fi
    [[ $BENCH_DIR == /* ]] || BENCH_DIR=$PWD/$BENCH_DIR
    bench_dirs
    # A previous run's directory (--keep, or killed with -9) is ours to clear; anything else is not.
    if [[ -e $BENCH_DIR ]]; then
        if [[ -f $BENCH_DIR/$MARKER ]]; then
            log "clearing the previous benchmark directory $BENCH_DIR"
            stop_servers
            rm -rf "$BENCH_DIR"
        elif [[ -n $(ls -A "$BENCH_DIR") ]]; then
            die "$BENCH_DIR exists and was not made by this script: remove it or set BENCH_DIR"
        fi
    fi
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    mkdir -p "$BENCH_DIR" "$SOCK_DIR" "$WORK" "$LOGS"
    touch "$BENCH_DIR/$MARKER"
    if [[ $(id -u) == 0 ]]; then
        chown postgres: "$BENCH_DIR" "$SOCK_DIR"
        chmod 755 "$BENCH_DIR"
    fi

    SRC_PORT=$(pick_port)
    log "starting PostgreSQL 15 (source) on 127.0.0.1:$SRC_PORT"
    STARTED=1
    start_server "$PG15_BIN" "$SRC_DATA" "$SRC_PORT" "$LOGS/pg15.log"
    DST_PORT=$(pick_port)
    log "starting PostgreSQL 18 (target) on 127.0.0.1:$DST_PORT"
    start_server "$PG18_BIN" "$DST_DATA" "$DST_PORT" "$LOGS/pg18.log"

    SRC_VERSION=$(src_psql postgres -At -c 'SHOW server_version')
    DST_VERSION=$(dst_psql postgres -At -c 'SHOW server_version')
}

src_conn() { echo "host=127.0.0.1 port=$SRC_PORT user=postgres dbname=$1"; }
dst_conn() { echo "host=127.0.0.1 port=$DST_PORT user=postgres dbname=$1"; }
# pgcopydb documents its --source/--target as Postgres URIs.
src_uri() { echo "postgres://postgres@127.0.0.1:$SRC_PORT/$1"; }
dst_uri() { echo "postgres://postgres@127.0.0.1:$DST_PORT/$1"; }
# (client_min_messages: no NOTICE for DROP DATABASE IF EXISTS of a database that is not there)
src_psql() { local db=$1; shift; as_pg env PGOPTIONS='-c client_min_messages=warning' "$PG15_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d "$(src_conn "$db")" "$@"; }
dst_psql() { local db=$1; shift; as_pg env PGOPTIONS='-c client_min_messages=warning' "$PG18_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d "$(dst_conn "$db")" "$@"; }

fresh_target_db() {
    dst_psql postgres -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1"
}
drop_target_db() {
    dst_psql postgres -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)"
}
checkpoint_both() {
    src_psql postgres -c CHECKPOINT
    dst_psql postgres -c CHECKPOINT
}

# ---------------------------------------------------------------------------------------------------------
# figures

median() { sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) print "null"; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# ratio A B: A/B with three decimals, or null when either is missing
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "null" || b == "null" || b + 0 == 0) print "null"; else printf "%.3f\n", a / b }'; }
# a JSON string
jstr() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }

# ---------------------------------------------------------------------------------------------------------
# datasets (bench/clone.sh, bench/rehearse.sh): the sourcing script sets SCALE and JSON_SCALE; LOGS is set by
# bench_start.

load_pgbench() {
    src_psql postgres -c 'CREATE DATABASE bench_pgbench'
    log "loading pgbench -i -s $SCALE into bench_pgbench"
    as_pg "$PG15_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$SRC_PORT" -U postgres bench_pgbench \
        >"$LOGS/pgbench-init.log" 2>&1 || { tail -20 "$LOGS/pgbench-init.log" >&2; die "pgbench -i failed"; }
}

# Large JSON documents (the kind that broke DMS in the second migration), a narrow table with a bigint key and
# two secondary indexes, and a table without primary key. md5() of the row number makes every value
# deterministic and incompressible, so the documents stay 100 kB-1 MB on disk too (TOAST, no compression gain).
load_json() {
    local docs events logs
    docs=$(awk -v f="$JSON_SCALE" 'BEGIN { n = int(2000 * f + 0.5); print (n < 1 ? 1 : n) }')
    events=$(awk -v f="$JSON_SCALE" 'BEGIN { n = int(1000000 * f + 0.5); print (n < 1 ? 1 : n) }')
    logs=$(awk -v f="$JSON_SCALE" 'BEGIN { n = int(500000 * f + 0.5); print (n < 1 ? 1 : n) }')
    log "loading bench_json: $docs documents, $events events, $logs access_log rows"
    src_psql postgres -c 'CREATE DATABASE bench_json'
    if ! src_psql bench_json -v docs="$docs" -v events="$events" -v logs="$logs" >"$LOGS/json-load.log" 2>&1 <<'SQL'; then
CREATE TABLE documents (
    id         bigint PRIMARY KEY,
    created_at timestamptz NOT NULL,
    title      text NOT NULL,
    doc        jsonb NOT NULL
);
-- n strings of 32 hex characters: about 36 bytes each in jsonb, so 2900..27899 strings = 104 kB..1 MB.
INSERT INTO documents (id, created_at, title, doc)
SELECT i,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '17 minutes',
       'report ' || i,
       jsonb_build_object(
           'id', i,
           'kind', CASE i % 3 WHEN 0 THEN 'query' WHEN 1 THEN 'dashboard' ELSE 'card' END,
           'owner', jsonb_build_object('id', i % 97, 'name', 'user' || (i % 97)),
           'items', (SELECT jsonb_agg(md5(i::text || ':' || j::text)) FROM generate_series(1, n) AS j))
FROM (SELECT i, 2900 + (i::bigint * 7919) % 25000 AS n FROM generate_series(1, :docs) AS i) AS s;

CREATE TABLE events (
    id         bigserial PRIMARY KEY,
    account_id integer NOT NULL,
    created_at timestamptz NOT NULL,
    amount     numeric(12,2) NOT NULL,
    note       text
);
INSERT INTO events (id, account_id, created_at, amount, note)
SELECT i,
       (i * 37) % 10007,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second',
       ((i::bigint * 7919) % 1000000) / 100.0,
       CASE WHEN i % 5 = 0 THEN NULL ELSE left(md5(i::text), 16) END
FROM generate_series(1, :events) AS i;
SELECT setval('events_id_seq', :events);
CREATE INDEX events_account_created_idx ON events (account_id, created_at);
CREATE INDEX events_created_idx ON events (created_at);

-- no primary key, no unique index
CREATE TABLE access_log (
    at      timestamptz NOT NULL,
    path    text NOT NULL,
    status  integer NOT NULL,
    bytes   bigint,
    agent   text
);
INSERT INTO access_log (at, path, status, bytes, agent)
SELECT timestamptz '2024-01-01 00:00:00+00' + i * interval '250 milliseconds',
       '/api/v1/items/' || (i % 5003) || '/' || left(md5(i::text), 8),
       (ARRAY[200, 200, 200, 201, 204, 301, 404, 500])[1 + i % 8],
       (i::bigint * 7919) % 65536,
       'agent/' || (i % 13)
FROM generate_series(1, :logs) AS i;
VACUUM ANALYZE;
SQL
        tail -20 "$LOGS/json-load.log" >&2
        die "loading bench_json failed"
    fi
}

