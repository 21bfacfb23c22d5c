#!/usr/bin/env bash
# bench/stream.sh: hikkoshi's change stream (`hikkoshi clone --follow`) against PostgreSQL's native logical
# replication (CREATE PUBLICATION / CREATE SUBSCRIPTION), PostgreSQL 15 -> 18, on the same machine and data.
#
# Two measurements per tool and run, each on a freshly initialized pgbench database:
#   1. backlog drain: a fixed pgbench workload is written on the source while the tool is stopped; then the
#      tool is started and timed until the target has applied all of it (transactions/s);
#   2. live: with the tool running and in sync, a rate-limited pgbench runs on the source; the lag (bytes of
#      WAL) is sampled every second, and after pgbench ends, whether it returns to ~0 within 10 s.
# The target's data is compared with the source's after each. Writes the same as JSON under bench/results/.
# See bench/README.md. Server set-up and cleanup are shared with bench/clone.sh (bench/lib.sh).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/stream.sh [OPTIONS]

Compares `hikkoshi clone --follow` with native logical replication (publication + subscription),
PostgreSQL 15 -> 18: time to drain a backlog of pgbench transactions, and lag under a steady load.

Options:
  --scale N        pgbench scale factor of the source database (default: 10, about 150 MB)
  --txns N         TPC-B transactions in the backlog, run by 4 clients (default: 160000; rounded down
                   to a multiple of 4)
  --rate TPS       pgbench -R during the live measurement (default: 2000)
  --duration S     pgbench -T during the live measurement, seconds (default: 60)
  --runs N         Runs per tool (default: 1); the order of the tools alternates from one run to the next
  --jobs N         hikkoshi clone --jobs for the initial copy (default: 2)
  --timeout S      Longest wait for any tool to get in sync, seconds (default: 1800)
  --keep           Leave both servers running at the end
  -h, --help       This help

Environment:
  BENCH_DIR           Scratch directory, created fresh and removed at exit (default: /tmp/hikkoshi-bench-stream)
  HIKKOSHI_BIN        hikkoshi binary (default: target/release/hikkoshi in the repository)
  HIKKOSHI_PG15_BIN   PostgreSQL 15 binaries, source server and pgbench (default: /usr/lib/postgresql/15/bin)
  HIKKOSHI_PG18_BIN   PostgreSQL 18 binaries, target server, pg_dump
                      (default: /opt/hikkoshi/pg18/pgserver/pginstall/bin)

Quick check that everything works (a few minutes):
  bench/stream.sh --scale 1 --txns 8000 --duration 10 --rate 500
EOF
}

BENCH_NAME=stream
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
. "$SCRIPT_DIR/lib.sh"

# ---------------------------------------------------------------------------------------------------------
# options
SCALE=10
TXNS=160000
RATE=2000
DURATION=60
RUNS=1
JOBS=2
TIMEOUT=1800
KEEP=0

need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --scale) need_arg "$@"; SCALE=$2; shift 2 ;;
        --scale=*) SCALE=${1#*=}; shift ;;
        --txns) need_arg "$@"; TXNS=$2; shift 2 ;;
        --txns=*) TXNS=${1#*=}; shift ;;
        --rate) need_arg "$@"; RATE=$2; shift 2 ;;
        --rate=*) RATE=${1#*=}; shift ;;
        --duration) need_arg "$@"; DURATION=$2; shift 2 ;;
        --duration=*) DURATION=${1#*=}; shift ;;
        --runs) need_arg "$@"; RUNS=$2; shift 2 ;;
        --runs=*) RUNS=${1#*=}; shift ;;
        --jobs) need_arg "$@"; JOBS=$2; shift 2 ;;
        --jobs=*) JOBS=${1#*=}; shift ;;
        --timeout) need_arg "$@"; TIMEOUT=$2; shift 2 ;;
        --timeout=*) TIMEOUT=${1#*=}; shift ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

for opt in SCALE TXNS RATE DURATION RUNS JOBS TIMEOUT; do
    [[ ${!opt} =~ ^[1-9][0-9]*$ ]] || die "--$(tr '[:upper:]' '[:lower:]' <<<"$opt") must be a positive integer (got '${!opt}')"
done
CLIENTS=4
THREADS=2
PER_CLIENT=$((TXNS / CLIENTS))
((PER_CLIENT > 0)) || die "--txns must be at least $CLIENTS"
TXNS=$((PER_CLIENT * CLIENTS))

PG15_BIN=${HIKKOSHI_PG15_BIN:-/usr/lib/postgresql/15/bin}
PG18_BIN=${HIKKOSHI_PG18_BIN:-/opt/hikkoshi/pg18/pgserver/pginstall/bin}
BENCH_DIR=${BENCH_DIR:-/tmp/hikkoshi-bench-stream}
if [[ -n ${HIKKOSHI_BIN:-} ]]; then
    [[ $HIKKOSHI_BIN == /* ]] || HIKKOSHI_BIN=$PWD/$HIKKOSHI_BIN
else
    HIKKOSHI_BIN=$REPO_DIR/target/release/hikkoshi
fi
RESULTS_DIR=$REPO_DIR/bench/results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

for b in initdb pg_ctl postgres psql pgbench; do
    [[ -x $PG15_BIN/$b ]] || die "$PG15_BIN/$b not found (set HIKKOSHI_PG15_BIN)"
done
for b in initdb pg_ctl postgres psql pg_dump pg_restore; do
    [[ -x $PG18_BIN/$b ]] || die "$PG18_BIN/$b not found (set HIKKOSHI_PG18_BIN)"
done
[[ -x $HIKKOSHI_BIN ]] || die "$HIKKOSHI_BIN not found: run 'cargo build --release' first (or set HIKKOSHI_BIN)"

SRC_DB=bench_stream      # the source database, re-created before each tool's run
PUB=bench_pub            # native: publication (source) ...
SUB=bench_sub            # ... and subscription (target; its slot on the source has the same name)
POLL=0.2                 # seconds between two looks at the sync state while draining
CATCHUP_WINDOW=10        # live: seconds after pgbench ends in which the lag must return to ~0
ZERO_LAG=8192            # live: "~0" lag, bytes (one WAL page)

# scratch directory, both servers, cleanup at exit: bench/lib.sh
bench_start
HIKKOSHI_VERSION=$("$HIKKOSHI_BIN" --version 2>&1 | head -1)
PGBENCH_VERSION=$("$PG15_BIN/pgbench" --version)
log "source $SRC_VERSION, target $DST_VERSION; $HIKKOSHI_VERSION; $PGBENCH_VERSION"
mkdir -p "$RESULTS_DIR"

# ---------------------------------------------------------------------------------------------------------
# helpers

# Quick queries for the polling loops: psql run directly (no runuser), one value per line, errors silenced
# (the caller treats no answer as "not yet").
src_q() { "$PG15_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -d "$(src_conn "$1")" -c "$2" 2>/dev/null; }
dst_q() { "$PG18_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -d "$(dst_conn "$1")" -c "$2" 2>/dev/null; }

# NOW: microseconds since the epoch
stamp() { NOW=${EPOCHREALTIME/[.,]/}; }
# secs US: microseconds as seconds with two decimals
secs() { printf '%d.%02d' $(($1 / 1000000)) $((($1 % 1000000) / 10000)); }
src_lsn() { src_psql postgres -At -c 'SELECT pg_current_wal_lsn()'; }

alive() {
    local st=
    read -r _ _ st _ 2>/dev/null <"/proc/$1/stat" || return 1
    [[ $st != Z ]]
}

# bg_forget PID: no longer ours to stop at exit
bg_forget() {
    local p keep=()
    for p in "${BG_PIDS[@]}"; do
        [[ $p == "$1" ]] || keep+=("$p")
    done
    BG_PIDS=("${keep[@]}")
}

checkpoint_both() {
    src_psql postgres -c CHECKPOINT
    dst_psql postgres -c CHECKPOINT
}

# Drops every replication slot of the source database (ending the walsenders that use them).
drop_source_slots() {
    local tries=0 left
    while :; do
        src_psql postgres -At -c "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
            WHERE database = '$SRC_DB' AND active_pid IS NOT NULL" >/dev/null
        src_psql postgres -At -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
            WHERE database = '$SRC_DB' AND NOT active" >/dev/null || true
        left=$(src_psql postgres -At -c "SELECT count(*) FROM pg_replication_slots WHERE database = '$SRC_DB'")
        [[ $left == 0 ]] && return 0
        ((++tries < 50)) || die "cannot drop the replication slots of $SRC_DB on the source"
        sleep 0.2
    done
}

# A fresh pgbench database on the source (the same data for every tool and run).
prepare_source() {
    drop_source_slots
    src_psql postgres -c "DROP DATABASE IF EXISTS $SRC_DB WITH (FORCE)" -c "CREATE DATABASE $SRC_DB"
    as_pg "$PG15_BIN/pgbench" -i -s "$SCALE" -q -h 127.0.0.1 -p "$SRC_PORT" -U postgres "$SRC_DB" \
        >"$1" 2>&1 || { tail -20 "$1" >&2; die "pgbench -i failed"; }
    # pgbench_history has no key: hikkoshi refuses such a table without a replica identity; native replication
    # needs one only for UPDATE/DELETE. The same for both.
    src_psql "$SRC_DB" -c 'ALTER TABLE pgbench_history REPLICA IDENTITY FULL'
}

fresh_target_db() {
    dst_psql postgres -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1"
}

# Row counts and balance sums: "name=value ..." on one line.
VERIFY_SQL="SELECT format('accounts=%s branches=%s tellers=%s history=%s abalance=%s bbalance=%s tbalance=%s delta=%s',
  (SELECT count(*) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_branches),
  (SELECT count(*) FROM pgbench_tellers), (SELECT count(*) FROM pgbench_history),
  (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),
  (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history))"
# verify DSTDB WHAT: compares the target with the source; sets V_OK (true|false), prints both on a mismatch.
verify() {
    local s d
    s=$(src_psql "$SRC_DB" -At -c "$VERIFY_SQL")
    d=$(dst_psql "$1" -At -c "$VERIFY_SQL" 2>&1) || true
    if [[ $s == "$d" ]]; then
        V_OK=true
        log "  $2: target equals source ($s)"
    else
        V_OK=false
        echo "!!! $2: the target differs from the source" >&2
        echo "    source: $s" >&2
        echo "    target: $d" >&2
    fi
}

# pgbench_tps LOG: the tps pgbench reported
pgbench_tps() { sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$1" | tail -1 | awk '{ printf "%.1f", $1 }'; }

# workload LOG: the fixed backlog workload on the source (the tool is stopped). Sets W_TPS, W_WAL (bytes),
# W_ROWS (rows of pgbench_history on the source after it).
workload() {
    local before after
    before=$(src_lsn)
    log "  pgbench -n -c $CLIENTS -j $THREADS -t $PER_CLIENT ($TXNS TPC-B transactions) on the source"
    as_pg "$PG15_BIN/pgbench" -n -c "$CLIENTS" -j "$THREADS" -t "$PER_CLIENT" \
        -h 127.0.0.1 -p "$SRC_PORT" -U postgres "$SRC_DB" >"$1" 2>&1 || { tail -20 "$1" >&2; die "pgbench failed"; }
    grep -q "^number of transactions actually processed: $TXNS/$TXNS" "$1" \
        || { tail -20 "$1" >&2; die "pgbench did not process $TXNS transactions"; }
    W_TPS=$(pgbench_tps "$1")
    W_ROWS=$(src_psql "$SRC_DB" -At -c 'SELECT count(*) FROM pgbench_history')
    after=$(src_lsn)
    W_WAL=$(src_psql postgres -At -c "SELECT pg_wal_lsn_diff('$after', '$before')::bigint")
}

# ---------------------------------------------------------------------------------------------------------
# hikkoshi: the follower process

FOLLOW_PID=
FOLLOW_HWM=0 # kB, largest VmHWM seen of the current follower process
FOLLOW_CPU=0 # clock ticks of CPU (user + system) the current follower process used, as last seen
FOLLOW_RC=
CLK_TCK=$(getconf CLK_TCK)

# follower_start DSTDB LOG
follower_start() {
    "$HIKKOSHI_BIN" clone --follow --source "$(src_conn "$SRC_DB")" --target "$(dst_conn "$1")" \
        --jobs "$JOBS" --pg-bin "$PG18_BIN" >"$2" 2>&1 &
    FOLLOW_PID=$!
    BG_PIDS+=("$FOLLOW_PID")
    FOLLOW_HWM=0
    FOLLOW_CPU=0
    FOLLOW_RC=
}

follower_rss() {
    local k v _ st=()
    [[ -n $FOLLOW_PID ]] || return 0
    # /proc/PID/stat: utime and stime are fields 14 and 15 (the command name, field 2, has no space here)
    read -r -a st 2>/dev/null <"/proc/$FOLLOW_PID/stat" || true
    if ((${#st[@]} > 15)); then FOLLOW_CPU=$((st[13] + st[14])); fi
    while read -r k v _; do
        if [[ $k == VmHWM: ]]; then
            if ((v > FOLLOW_HWM)); then FOLLOW_HWM=$v; fi
            break
        fi
    done 2>/dev/null <"/proc/$FOLLOW_PID/status" || true
    return 0
}

# follower_stop: SIGTERM (the follower commits what it has and exits 0), waits up to 60 s (then SIGKILL).
# Sets FOLLOW_RC.
follower_stop() {
    local n=0
    follower_rss
    kill -TERM "$FOLLOW_PID" 2>/dev/null || true
    while alive "$FOLLOW_PID" && ((n++ < 600)); do sleep 0.1; done
    if alive "$FOLLOW_PID"; then
        echo "!!! hikkoshi did not exit within 60 s of SIGTERM: killed" >&2
        kill -KILL "$FOLLOW_PID" 2>/dev/null || true
    fi
    FOLLOW_RC=0
    wait "$FOLLOW_PID" 2>/dev/null || FOLLOW_RC=$?
    bg_forget "$FOLLOW_PID"
    FOLLOW_PID=
}

# follower_dead LOG WHAT: the follower exited on its own; records why.
follower_dead() {
    FOLLOW_RC=0
    wait "$FOLLOW_PID" 2>/dev/null || FOLLOW_RC=$?
    bg_forget "$FOLLOW_PID"
    FOLLOW_PID=
    echo "!!! hikkoshi exited (status $FOLLOW_RC) $2; last lines of $1:" >&2
    tail -25 "$1" >&2
}

# hk_wait_synced DSTDB LSN LOG WHAT: waits until hikkoshi's state says the target is in sync with LSN.
# Returns 1 (and says why) if the follower died or the timeout passed.
hk_wait_synced() {
    local db=$1 lsn=$2 logf=$3 what=$4 t0 ok
    stamp; t0=$NOW
    while :; do
        if ! alive "$FOLLOW_PID"; then follower_dead "$logf" "$what"; return 1; fi
        follower_rss
        ok=$(dst_q "$db" "SELECT synced_lsn >= '$lsn' AND seen_at IS NOT NULL FROM hikkoshi.stream") || ok=
        [[ $ok == t ]] && return 0
        stamp
        if (((NOW - t0) / 1000000 >= TIMEOUT)); then
            echo "!!! hikkoshi: not in sync with $lsn after ${TIMEOUT}s $what; last lines of $logf:" >&2
            tail -25 "$logf" >&2
            dst_q "$db" "SELECT * FROM hikkoshi.stream" >&2 || true
            return 1
        fi
        sleep "$POLL"
    done
}

# hk_wait_streaming DSTDB TS LOG: waits until the follower started after TS records its stream state.
hk_wait_streaming() {
    local n=0 ok
    while :; do
        if ! alive "$FOLLOW_PID"; then follower_dead "$3" "before the live load"; return 1; fi
        follower_rss
        ok=$(dst_q "$1" "SELECT seen_at > '$2' FROM hikkoshi.stream") || ok=
        [[ $ok == t ]] && return 0
        if ((++n * 2 >= TIMEOUT * 10)); then
            echo "!!! hikkoshi: no stream state recorded ${TIMEOUT}s after its start; last lines of $3:" >&2
            tail -25 "$3" >&2
            return 1
        fi
        sleep "$POLL"
    done
}

# ---------------------------------------------------------------------------------------------------------
# native: subscription state

sub_origin_sql="SELECT remote_lsn FROM pg_replication_origin_status WHERE external_id =
  (SELECT 'pg_' || oid FROM pg_subscription WHERE subname = '$SUB'
   AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()))"

# nt_wait_synced LSN WHAT: waits until the subscription's slot has confirmed LSN.
nt_wait_synced() {
    local lsn=$1 what=$2 t0 ok
    stamp; t0=$NOW
    while :; do
        ok=$(src_q postgres "SELECT confirmed_flush_lsn >= '$lsn' FROM pg_replication_slots WHERE slot_name = '$SUB'") || ok=
        [[ $ok == t ]] && return 0
        stamp
        if (((NOW - t0) / 1000000 >= TIMEOUT)); then
            echo "!!! native: not in sync with $lsn after ${TIMEOUT}s $what" >&2
            tail -25 "$LOGS/pg18.log" >&2
            return 1
        fi
        sleep "$POLL"
    done
}

native_cleanup() {
    local db=$1
    if ! dst_psql "$db" -c "DROP SUBSCRIPTION IF EXISTS $SUB" >/dev/null 2>&1; then
        dst_psql "$db" -c "ALTER SUBSCRIPTION $SUB DISABLE" -c "ALTER SUBSCRIPTION $SUB SET (slot_name = NONE)" \
            -c "DROP SUBSCRIPTION $SUB" >/dev/null 2>&1 || true
    fi
    src_psql "$SRC_DB" -c "DROP PUBLICATION IF EXISTS $PUB" >/dev/null 2>&1 || true
    drop_source_slots
}

# ---------------------------------------------------------------------------------------------------------
# the measurements, shared by both tools

# wait_caught_up TOOL DSTDB ROWS LSN T0 LOG WHAT: waits until the target has applied every source transaction
# and the tool's sync position has reached LSN (the source's position after the load). Looks every $POLL s:
# - applied all: the target's pgbench_history has ROWS rows (the source's count after the load; every TPC-B
#   transaction inserts one row, and both tools apply whole transactions in commit order, so the count reaches
#   ROWS exactly when the last transaction is committed on the target);
# - in sync: hikkoshi's synced_lsn (target) / the subscription slot's confirmed_flush_lsn (source) >= LSN.
# One query to each server per look, for both tools. Sets C_APPLIED_S and C_SYNCED_S (seconds since T0, in
# microseconds; null if not reached) and C_OK (applied all). Gives the sync position SYNC_GRACE s after
# everything is applied, then records it as not reached.
SYNC_GRACE=30
PROBLEMS=()
wait_caught_up() {
    local tool=$1 db=$2 rows=$3 lsn=$4 t0=$5 logf=$6 what=$7 st count synced applied_t=
    C_OK=false C_APPLIED_S=null C_SYNCED_S=null
    while :; do
        if [[ $tool == hikkoshi ]]; then
            if ! alive "$FOLLOW_PID"; then follower_dead "$logf" "$what"; return 0; fi
            follower_rss
            st=$(dst_q "$db" "SELECT (SELECT count(*) FROM pgbench_history), synced_lsn >= '$lsn' FROM hikkoshi.stream") || st=
            src_q postgres "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE database = '$SRC_DB'" >/dev/null || true
            count=${st%%|*}
            synced=${st#*|}
        else
            count=$(dst_q "$db" "SELECT count(*) FROM pgbench_history") || count=
            synced=$(src_q postgres "SELECT confirmed_flush_lsn >= '$lsn' FROM pg_replication_slots WHERE slot_name = '$SUB'") || synced=
        fi
        stamp
        if [[ -z $applied_t && $count == "$rows" ]]; then
            applied_t=$NOW
            C_OK=true
            C_APPLIED_S=$(secs $((NOW - t0)))
        fi
        if [[ $synced == t && -n $applied_t ]]; then
            C_SYNCED_S=$(secs $((NOW - t0)))
            return 0
        fi
        if [[ -n $applied_t ]] && (((NOW - applied_t) / 1000000 >= SYNC_GRACE)); then
            local info
            if [[ $tool == hikkoshi ]]; then
                info=$(dst_q "$db" "SELECT format('applied_lsn %s, synced_lsn %s, source_lsn %s, seen_at %s', applied_lsn, synced_lsn, source_lsn, seen_at) FROM hikkoshi.stream") || info=
            else
                info=$(src_q postgres "SELECT format('slot confirmed_flush_lsn %s', confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = '$SUB'") || info=
            fi
            info="$info; source at $(src_lsn)"
            echo "!!! $tool: every transaction applied $what, but its sync position did not reach $lsn within ${SYNC_GRACE}s ($info)" >&2
            PROBLEMS+=("$tool $what: all applied after ${C_APPLIED_S}s but the sync position stayed below $lsn for ${SYNC_GRACE}s ($info)")
            return 0
        fi
        if (((NOW - t0) / 1000000 >= TIMEOUT)); then
            echo "!!! $tool: not caught up $what after ${TIMEOUT}s (pgbench_history: ${count:-?} of $rows rows on the target)" >&2
            [[ $tool == hikkoshi ]] && tail -25 "$logf" >&2
            return 0
        fi
        sleep "$POLL"
    done
}

# drain TOOL DSTDB ROWS LSN LOG: starts the tool (hikkoshi: the follower process; native: ENABLE, which starts
# the apply worker) and waits until it has caught up. Sets D_OK, D_APPLIED_S, D_SYNCED_S.
drain() {
    local tool=$1 db=$2 rows=$3 lsn=$4 logf=$5 t0
    stamp; t0=$NOW
    if [[ $tool == hikkoshi ]]; then
        follower_start "$db" "$logf"
    else
        dst_psql "$db" -c "ALTER SUBSCRIPTION $SUB ENABLE"
    fi
    wait_caught_up "$tool" "$db" "$rows" "$lsn" "$t0" "$logf" "draining the backlog"
    D_OK=$C_OK D_APPLIED_S=$C_APPLIED_S D_SYNCED_S=$C_SYNCED_S
}

# lag_now TOOL DSTDB: bytes of WAL between the source's position and the tool's sync position (hikkoshi:
# target synced_lsn; native: the slot's confirmed_flush_lsn), or empty when unknown. Sets LAG.
lag_now() {
    local cur
    LAG=
    if [[ $1 == hikkoshi ]]; then
        cur=$(src_q postgres 'SELECT pg_current_wal_lsn()') || return 0
        LAG=$(dst_q "$2" "SELECT greatest(pg_wal_lsn_diff('$cur', synced_lsn), 0)::bigint FROM hikkoshi.stream") || LAG=
    else
        LAG=$(src_q postgres "SELECT greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint
            FROM pg_replication_slots WHERE slot_name = '$SUB'") || LAG=
    fi
    return 0
}

# live TOOL DSTDB LOGPREFIX: the tool runs and is in sync; pgbench -R RATE -T DURATION on the source, the lag
# sampled every second during it and CATCHUP_WINDOW s after. Sets L_OK, L_MAX, L_FINAL, L_ZERO_S (seconds
# after pgbench's end until the lag was <= ZERO_LAG, null if not within the window), L_CATCHUP_S (until the
# tool was in sync with the source's position at pgbench's end), L_TPS, L_SAMPLES (JSON array).
live() {
    local tool=$1 db=$2 lp=$3 t0 tend pgb i=0 next rel end_lsn end_rows
    L_OK=false L_START=null L_MAX=0 L_FINAL=null L_ZERO_S=null L_CATCHUP_S=null L_TPS=null
    local -a samples=()
    log "  live: pgbench -n -c $CLIENTS -j $THREADS -R $RATE -T $DURATION on the source"
    as_pg "$PG15_BIN/pgbench" -n -c "$CLIENTS" -j "$THREADS" -R "$RATE" -T "$DURATION" \
        -h 127.0.0.1 -p "$SRC_PORT" -U postgres "$SRC_DB" >"$lp.pgbench-live.log" 2>&1 &
    pgb=$!
    BG_PIDS+=("$pgb")
    stamp; t0=$NOW
    tend=
    while :; do
        if [[ -z $tend ]] && ! alive "$pgb"; then
            local rc=0
            wait "$pgb" || rc=$?
            bg_forget "$pgb"
            ((rc == 0)) || { tail -20 "$lp.pgbench-live.log" >&2; die "pgbench (live) failed"; }
            stamp; tend=$NOW
            end_lsn=$(src_lsn)
            end_rows=$(src_psql "$SRC_DB" -At -c 'SELECT count(*) FROM pgbench_history')
        fi
        if [[ $tool == hikkoshi ]]; then
            if ! alive "$FOLLOW_PID"; then
                [[ -n $tend ]] || stop_tree "$pgb"
                follower_dead "$lp.live.log" "during the live load"
                return 0
            fi
            follower_rss
        fi
        lag_now "$tool" "$db"
        if [[ -n $tend && $L_CATCHUP_S == null ]]; then
            local count
            count=$(dst_q "$db" "SELECT count(*) FROM pgbench_history") || count=
            if [[ $count == "$end_rows" ]]; then stamp; L_CATCHUP_S=$(secs $((NOW - tend))); fi
        fi
        stamp
        rel=$(secs $((NOW - t0)))
        if [[ -n $LAG ]]; then
            samples+=("[$rel, $LAG]")
            # the first sample is taken as pgbench starts: the lag before the load, shown apart
            if ((i == 0)); then
                L_START=$LAG
            elif ((LAG > L_MAX)); then
                L_MAX=$LAG
            fi
            L_FINAL=$LAG
            if [[ -n $tend && $L_ZERO_S == null ]] && ((LAG <= ZERO_LAG)); then
                L_ZERO_S=$(secs $((NOW - tend)))
            fi
        fi
        if [[ -n $tend ]] && (((NOW - tend) / 1000000 >= CATCHUP_WINDOW)); then
            break
        fi
        i=$((i + 1))
        next=$((t0 + i * 1000000))
        stamp
        if ((next > NOW)); then sleep "$(secs $((next - NOW)))"; fi
    done
    L_TPS=$(pgbench_tps "$lp.pgbench-live.log")
    L_SAMPLES="[$(IFS=,; echo "${samples[*]}")]"
    log "  live: pgbench ${L_TPS} tps; lag at start $L_START B, max $L_MAX B, final ${L_FINAL} B, ~0 (<= $ZERO_LAG B) after ${L_ZERO_S}s"
    if [[ $L_START != null ]] && ((L_START > ZERO_LAG)); then
        PROBLEMS+=("$tool: the sync position was $L_START bytes behind the idle source when the live load started")
    fi
    # everything pgbench wrote applied (if not seen yet), and in sync with the source's position at its end?
    wait_caught_up "$tool" "$db" "$end_rows" "$end_lsn" "$tend" "$lp.live.log" "after the live load"
    L_OK=$C_OK
    [[ $L_CATCHUP_S != null ]] || L_CATCHUP_S=$C_APPLIED_S
    return 0
}

# ---------------------------------------------------------------------------------------------------------
# one tool, one run. Each sets R[...] fields; the status is ok, or what failed.

declare -A R
setr() { R["$1,$2,$3"]=$4; }

# common fields, set after each phase
record_drain() {
    local key=$1,$2
    R[$key,drain_applied_s]=$D_APPLIED_S
    R[$key,drain_synced_s]=$D_SYNCED_S
    R[$key,drain_tps]=$(awk -v n="$TXNS" -v s="$D_APPLIED_S" 'BEGIN { if (s == "null" || s + 0 == 0) print "null"; else printf "%.0f", n / s }')
}

run_hikkoshi() {
    local r=$1 db=stream_hikkoshi_$r lp=$LOGS/run$r-hikkoshi l0 lsn
    setr "$r" hikkoshi status ok
    fresh_target_db "$db"
    checkpoint_both

    # 1. initial copy, then streaming until in sync
    log "  hikkoshi clone --follow: initial copy"
    local t0
    stamp; t0=$NOW
    follower_start "$db" "$lp.initial.log"
    l0=$(src_lsn)
    if ! hk_wait_synced "$db" "$l0" "$lp.initial.log" "during the initial copy"; then
        setr "$r" hikkoshi status initial_failed
        return 0
    fi
    stamp
    setr "$r" hikkoshi init_s "$(secs $((NOW - t0)))"
    # the DDL capture (an event trigger and its table in the publication) is part of what is measured
    DDL_CAPTURE=$(src_q "$SRC_DB" "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'hikkoshi%'")
    setr "$r" hikkoshi init_rss_mb "$(awk -v k="$FOLLOW_HWM" 'BEGIN { printf "%.1f", k / 1024 }')"
    follower_stop
    if [[ $FOLLOW_RC != 0 ]]; then
        echo "!!! hikkoshi exited with status $FOLLOW_RC after SIGTERM (initial run); last lines of $lp.initial.log:" >&2
        tail -25 "$lp.initial.log" >&2
        setr "$r" hikkoshi status "stop_failed"
        return 0
    fi
    log "  in sync after ${R[$r,hikkoshi,init_s]}s; stopped"

    # 2. backlog, drain
    checkpoint_both
    workload "$lp.pgbench-drain.log"
    setr "$r" hikkoshi workload_tps "$W_TPS"
    setr "$r" hikkoshi workload_wal "$W_WAL"
    lsn=$(src_lsn)
    setr "$r" hikkoshi backlog_bytes "$(src_psql postgres -At -c "SELECT pg_wal_lsn_diff('$lsn', confirmed_flush_lsn)::bigint
        FROM pg_replication_slots WHERE database = '$SRC_DB'")"
    checkpoint_both
    log "  draining the backlog (source at $lsn)"
    drain hikkoshi "$db" "$W_ROWS" "$lsn" "$lp.drain.log"
    record_drain "$r" hikkoshi
    if [[ $D_OK != true ]]; then
        setr "$r" hikkoshi drain_rss_mb "$(awk -v k="$FOLLOW_HWM" 'BEGIN { printf "%.1f", k / 1024 }')"
        [[ -n $FOLLOW_PID ]] && follower_stop
        setr "$r" hikkoshi status drain_failed
        return 0
    fi
    follower_stop
    setr "$r" hikkoshi drain_rss_mb "$(awk -v k="$FOLLOW_HWM" 'BEGIN { printf "%.1f", k / 1024 }')"
    setr "$r" hikkoshi drain_cpu_s "$(awk -v t="$FOLLOW_CPU" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')"
    log "  hikkoshi: drained in ${D_APPLIED_S}s (in sync after ${D_SYNCED_S}s), ${R[$r,hikkoshi,drain_tps]} txn/s, peak RSS ${R[$r,hikkoshi,drain_rss_mb]} MB"
    if [[ $FOLLOW_RC != 0 ]]; then
        echo "!!! hikkoshi exited with status $FOLLOW_RC after SIGTERM (drain); last lines of $lp.drain.log:" >&2
        tail -25 "$lp.drain.log" >&2
        setr "$r" hikkoshi status stop_failed
        return 0
    fi
    verify "$db" "hikkoshi after the drain"
    setr "$r" hikkoshi drain_verified "$V_OK"
    if [[ $V_OK != true ]]; then
        setr "$r" hikkoshi status wrong_data_drain
        return 0
    fi

    # 3. live
    # The target equals the source (verified) and the source is idle: in sync as soon as the follower streams.
    local ts
    ts=$(dst_psql "$db" -At -c 'SELECT now()')
    follower_start "$db" "$lp.live.log"
    if ! hk_wait_streaming "$db" "$ts" "$lp.live.log"; then
        setr "$r" hikkoshi status live_failed
        return 0
    fi
    live hikkoshi "$db" "$lp"
    setr "$r" hikkoshi live_max_lag "$L_MAX"
    setr "$r" hikkoshi live_final_lag "$L_FINAL"
    setr "$r" hikkoshi live_zero_s "$L_ZERO_S"
    setr "$r" hikkoshi live_catchup_s "$L_CATCHUP_S"
    setr "$r" hikkoshi live_start_lag "$L_START"
    setr "$r" hikkoshi live_tps "$L_TPS"
    setr "$r" hikkoshi live_samples "$L_SAMPLES"
    if [[ -n $FOLLOW_PID ]]; then follower_stop; fi
    setr "$r" hikkoshi live_rss_mb "$(awk -v k="$FOLLOW_HWM" 'BEGIN { printf "%.1f", k / 1024 }')"
    if [[ $L_OK != true ]]; then
        setr "$r" hikkoshi status live_failed
        return 0
    fi
    if [[ $FOLLOW_RC != 0 ]]; then
        echo "!!! hikkoshi exited with status $FOLLOW_RC after SIGTERM (live); last lines of $lp.live.log:" >&2
        tail -25 "$lp.live.log" >&2
        setr "$r" hikkoshi status stop_failed
        return 0
    fi
    verify "$db" "hikkoshi after the live load"
    setr "$r" hikkoshi live_verified "$V_OK"
    [[ $V_OK == true ]] || setr "$r" hikkoshi status wrong_data_live
    return 0
}

run_native() {
    local r=$1 db=stream_native_$r lp=$LOGS/run$r-native l0 lsn n
    setr "$r" native status ok
    fresh_target_db "$db"
    checkpoint_both

    # 1. schema, publication, subscription, initial copy, in sync
    log "  native: schema, publication, subscription: initial copy"
    local t0
    stamp; t0=$NOW
    "$PG18_BIN/pg_dump" --schema-only -d "$(src_conn "$SRC_DB")" >"$WORK/schema.sql"
    dst_psql "$db" -f "$WORK/schema.sql" >"$lp.schema.log" 2>&1 || { tail -20 "$lp.schema.log" >&2; die "loading the schema on the target failed"; }
    src_psql "$SRC_DB" -c "CREATE PUBLICATION $PUB FOR ALL TABLES"
    dst_psql "$db" -c "CREATE SUBSCRIPTION $SUB CONNECTION '$(src_conn "$SRC_DB")' PUBLICATION $PUB" 2>&1 | tee "$lp.subscription.log" >&2
    l0=$(src_lsn)
    n=0
    while :; do
        local st
        st=$(dst_q "$db" "SELECT count(*) FILTER (WHERE srsubstate <> 'r'), count(*) FROM pg_subscription_rel") || st=
        [[ $st == "0|4" ]] && break
        stamp
        if (((NOW - t0) / 1000000 >= TIMEOUT)); then
            echo "!!! native: initial copy not done after ${TIMEOUT}s ($st)" >&2
            tail -25 "$LOGS/pg18.log" >&2
            setr "$r" native status initial_failed
            native_cleanup "$db"
            return 0
        fi
        sleep "$POLL"
    done
    if ! nt_wait_synced "$l0" "after the initial copy"; then
        setr "$r" native status initial_failed
        native_cleanup "$db"
        return 0
    fi
    stamp
    setr "$r" native init_s "$(secs $((NOW - t0)))"
    dst_psql "$db" -c "ALTER SUBSCRIPTION $SUB DISABLE"
    n=0
    until [[ $(src_q postgres "SELECT active FROM pg_replication_slots WHERE slot_name = '$SUB'" || true) == f ]]; do
        ((++n < 300)) || die "native: the subscription's slot is still active 60 s after DISABLE"
        sleep 0.2
    done
    log "  in sync after ${R[$r,native,init_s]}s; subscription disabled"

    # 2. backlog, drain
    checkpoint_both
    workload "$lp.pgbench-drain.log"
    setr "$r" native workload_tps "$W_TPS"
    setr "$r" native workload_wal "$W_WAL"
    lsn=$(src_lsn)
    setr "$r" native backlog_bytes "$(src_psql postgres -At -c "SELECT pg_wal_lsn_diff('$lsn', confirmed_flush_lsn)::bigint
        FROM pg_replication_slots WHERE slot_name = '$SUB'")"
    checkpoint_both
    log "  draining the backlog (source at $lsn)"
    drain native "$db" "$W_ROWS" "$lsn" ""
    record_drain "$r" native
    if [[ $D_OK != true ]]; then
        setr "$r" native status drain_failed
        native_cleanup "$db"
        return 0
    fi
    log "  native: drained in ${D_APPLIED_S}s (in sync after ${D_SYNCED_S}s), ${R[$r,native,drain_tps]} txn/s"
    verify "$db" "native after the drain"
    setr "$r" native drain_verified "$V_OK"
    if [[ $V_OK != true ]]; then
        setr "$r" native status wrong_data_drain
        native_cleanup "$db"
        return 0
    fi

    # 3. live (the subscription is running and in sync)
    live native "$db" "$lp"
    setr "$r" native live_max_lag "$L_MAX"
    setr "$r" native live_final_lag "$L_FINAL"
    setr "$r" native live_zero_s "$L_ZERO_S"
    setr "$r" native live_catchup_s "$L_CATCHUP_S"
    setr "$r" native live_start_lag "$L_START"
    setr "$r" native live_tps "$L_TPS"
    setr "$r" native live_samples "$L_SAMPLES"
    if [[ $L_OK != true ]]; then
        setr "$r" native status live_failed
        native_cleanup "$db"
        return 0
    fi
    verify "$db" "native after the live load"
    setr "$r" native live_verified "$V_OK"
    [[ $V_OK == true ]] || setr "$r" native status wrong_data_live
    native_cleanup "$db"
    return 0
}

# ---------------------------------------------------------------------------------------------------------
# runs

TOOLS=(hikkoshi native)
declare -A LABEL=([hikkoshi]="hikkoshi" [native]="native")
FIELDS=(status init_s init_rss_mb workload_tps workload_wal backlog_bytes drain_applied_s drain_synced_s drain_tps
    drain_rss_mb drain_cpu_s drain_verified live_tps live_max_lag live_final_lag live_zero_s live_catchup_s live_start_lag
    live_rss_mb live_verified live_samples)
HIKKOSHI_FAILED=0
ORDER=()
SRC_PRETTY=
for ((r = 1; r <= RUNS; r++)); do
    order=()
    for ((i = 0; i < ${#TOOLS[@]}; i++)); do
        order+=("${TOOLS[$(((i + r - 1) % ${#TOOLS[@]}))]}")
    done
    log "run $r/$RUNS: ${order[*]}"
    pos=0
    for tool in "${order[@]}"; do
        pos=$((pos + 1))
        for f in "${FIELDS[@]}"; do R[$r,$tool,$f]=null; done
        R[$r,$tool,pos]=$pos
        ORDER+=("$r,$tool")
        log "run $r, $tool: pgbench -i -s $SCALE on the source"
        prepare_source "$LOGS/run$r-$tool.pgbench-init.log"
        [[ -n $SRC_PRETTY ]] || SRC_PRETTY=$(src_psql "$SRC_DB" -At -c 'SELECT pg_size_pretty(pg_database_size(current_database()))')
        "run_$tool" "$r"
        if [[ ${R[$r,$tool,status]} != ok ]]; then
            echo "!!! run $r: $tool: ${R[$r,$tool,status]}" >&2
            [[ $tool == hikkoshi ]] && HIKKOSHI_FAILED=1
        fi
        if [[ $tool == hikkoshi ]]; then
            [[ -z $FOLLOW_PID ]] || follower_stop
            "$HIKKOSHI_BIN" clean --source "$(src_conn "$SRC_DB")" --target "$(dst_conn "stream_hikkoshi_$r")" \
                >"$LOGS/run$r-hikkoshi.clean.log" 2>&1 \
                || log "  hikkoshi clean failed (see $LOGS/run$r-hikkoshi.clean.log): dropping its slot by hand"
        fi
        drop_source_slots
        [[ $KEEP == 1 ]] || dst_psql postgres -c "DROP DATABASE IF EXISTS stream_${tool}_$r WITH (FORCE)"
    done
done

# ---------------------------------------------------------------------------------------------------------
# report

# col TOOL FIELD: the values of the successful runs, one a line
col() { local k; for k in "${ORDER[@]}"; do [[ ${k#*,} == "$1" && ${R[$k,status]} == ok && ${R[$k,$2]} != null ]] && echo "${R[$k,$2]}"; done; return 0; }
colany() { local k; for k in "${ORDER[@]}"; do [[ ${k#*,} == "$1" && ${R[$k,$2]} != null ]] && echo "${R[$k,$2]}"; done; return 0; }
kb() { awk -v b="$1" 'BEGIN { if (b == "null" || b == "") print "-"; else printf "%.1f", b / 1024 }'; }
mb() { awk -v b="$1" 'BEGIN { if (b == "null" || b == "") print "-"; else printf "%.1f", b / 1048576 }'; }
dash() { [[ $1 == null || -z $1 ]] && echo - || echo "$1"; }

declare -A MED
for tool in "${TOOLS[@]}"; do
    for f in drain_applied_s drain_synced_s drain_tps drain_rss_mb live_max_lag live_final_lag live_zero_s live_rss_mb init_s; do
        MED[$tool,$f]=$(col "$tool" "$f" | median)
    done
done
RATE_RATIO=$(ratio "${MED[hikkoshi,drain_tps]}" "${MED[native,drain_tps]}")
RATE_MET=$(awk -v r="$RATE_RATIO" 'BEGIN { print (r == "null" ? "null" : (r + 0 >= 1.0 ? "true" : "false")) }')
WL_WAL=$(colany hikkoshi workload_wal | median)
[[ $WL_WAL != null ]] || WL_WAL=$(colany native workload_wal | median)
WL_TPS=$(for t in "${TOOLS[@]}"; do colany "$t" workload_tps; done | median)
JSON=$RESULTS_DIR/stream-$STAMP.json

echo
echo "== change stream: pgbench scale $SCALE ($SRC_PRETTY) on PostgreSQL $SRC_VERSION -> $DST_VERSION, $RUNS run(s)"
echo
echo "backlog drain: $TXNS TPC-B transactions written while the tool was stopped (pgbench -c $CLIENTS -j $THREADS:" \
    "$(dash "$WL_TPS") tps on the source, $(mb "$WL_WAL") MB of WAL)"
printf '%-4s %-3s %-10s %10s %10s %10s %12s %10s %12s  %s\n' run pos tool "drain s" "txn/s" "synced s" "peak RSS MB" "CPU s" "initial s" status
for k in "${ORDER[@]}"; do
    r=${k%%,*} tool=${k#*,}
    printf '%-4s %-3s %-10s %10s %10s %10s %12s %10s %12s  %s\n' "$r" "${R[$k,pos]}" "$tool" "$(dash "${R[$k,drain_applied_s]}")" \
        "$(dash "${R[$k,drain_tps]}")" "$(dash "${R[$k,drain_synced_s]}")" "$(dash "${R[$k,drain_rss_mb]}")" \
        "$(dash "${R[$k,drain_cpu_s]}")" "$(dash "${R[$k,init_s]}")" "${R[$k,status]}"
done
echo
echo "live: pgbench -n -c $CLIENTS -j $THREADS -R $RATE -T $DURATION, lag sampled every second (bytes of WAL)"
printf '%-4s %-3s %-10s %11s %12s %11s %12s %11s %12s %12s\n' run pos tool "pgbench tps" "start lag kB" "max lag kB" "final lag B" "~0 after s" "caught up s" "peak RSS MB"
for k in "${ORDER[@]}"; do
    r=${k%%,*} tool=${k#*,}
    z=${R[$k,live_zero_s]}
    [[ $z == null && ${R[$k,live_final_lag]} != null ]] && z="no (>${CATCHUP_WINDOW})"
    printf '%-4s %-3s %-10s %11s %12s %11s %12s %11s %12s %12s\n' "$r" "${R[$k,pos]}" "$tool" "$(dash "${R[$k,live_tps]}")" \
        "$(kb "${R[$k,live_start_lag]}")" "$(kb "${R[$k,live_max_lag]}")" "$(dash "${R[$k,live_final_lag]}")" "$(dash "$z")" \
        "$(dash "${R[$k,live_catchup_s]}")" "$(dash "${R[$k,live_rss_mb]}")"
done
echo
printf '%-10s %10s %10s %12s %12s %14s %12s\n' median "drain s" "txn/s" "drain RSS MB" "max lag kB" "~0 after s" "live RSS MB"
for tool in "${TOOLS[@]}"; do
    printf '%-10s %10s %10s %12s %12s %14s %12s\n' "$tool" "$(dash "${MED[$tool,drain_applied_s]}")" "$(dash "${MED[$tool,drain_tps]}")" \
        "$(dash "${MED[$tool,drain_rss_mb]}")" "$(kb "${MED[$tool,live_max_lag]}")" "$(dash "${MED[$tool,live_zero_s]}")" \
        "$(dash "${MED[$tool,live_rss_mb]}")"
done
echo
echo "drain rate hikkoshi / native: $(dash "$RATE_RATIO")   (target: >= 1.0)"
echo "hikkoshi peak RSS: $(dash "${MED[hikkoshi,drain_rss_mb]}") MB draining, $(dash "${MED[hikkoshi,live_rss_mb]}") MB live (median VmHWM)"
if ((${#PROBLEMS[@]})); then
    echo
    echo "problems:"
    printf '  %s\n' "${PROBLEMS[@]}"
fi
echo "results: $JSON"

# ---- JSON
{
    printf '{\n  "benchmark": "stream",\n  "timestamp": %s,\n' "$(jstr "$STAMP")"
    printf '  "machine": {"host": %s, "cpus": %s, "memory_mb": %s},\n' "$(jstr "$(hostname)")" "$(nproc)" \
        "$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)"
    printf '  "params": {"scale": %s, "txns": %s, "clients": %s, "threads": %s, "rate": %s, "duration_s": %s, "runs": %s, "jobs": %s, "catchup_window_s": %s, "zero_lag_bytes": %s, "poll_s": %s},\n' \
        "$SCALE" "$TXNS" "$CLIENTS" "$THREADS" "$RATE" "$DURATION" "$RUNS" "$JOBS" "$CATCHUP_WINDOW" "$ZERO_LAG" "$POLL"
    printf '  "versions": {"source": %s, "target": %s, "hikkoshi": %s, "pgbench": %s},\n' \
        "$(jstr "$SRC_VERSION")" "$(jstr "$DST_VERSION")" "$(jstr "$HIKKOSHI_VERSION")" "$(jstr "$PGBENCH_VERSION")"
    printf '  "notes": %s,\n' "$(jstr "drain_applied_s: from starting the tool (hikkoshi: its process; native: ALTER SUBSCRIPTION ENABLE) until every workload transaction was committed on the target (pgbench_history on the target has the source's row count), polled every $POLL s; drain_tps = txns / drain_applied_s. drain_synced_s: until the tool's sync position also reached the source's pg_current_wal_lsn() read after the workload (hikkoshi.stream.synced_lsn, written about every second; the subscription slot's confirmed_flush_lsn); null: not within ${SYNC_GRACE} s after everything was applied (see problems). live lag: source pg_current_wal_lsn() minus hikkoshi.stream.synced_lsn, or minus the subscription slot's confirmed_flush_lsn, sampled every second; live_zero_s: seconds after pgbench ended until the lag was <= zero_lag_bytes (null: not within catchup_window_s); live_start_lag: the first sample, taken as pgbench starts (the lag of the idle, in-sync tool; not part of live_max_lag); live_catchup_s: seconds after pgbench ended until every transaction was applied on the target (pgbench_history count, checked with each sample). RSS: VmHWM of the hikkoshi process (the follower is restarted for each phase); drain_cpu_s: user + system CPU seconds of the hikkoshi process during the drain; the native apply worker is a server process and is not measured.")"
    echo '  "runs": ['
    n=0
    for k in "${ORDER[@]}"; do
        n=$((n + 1))
        r=${k%%,*} tool=${k#*,}
        printf '    {"run": %s, "position": %s, "tool": %s, "status": %s' "$r" "${R[$k,pos]}" "$(jstr "$tool")" "$(jstr "${R[$k,status]}")"
        for f in "${FIELDS[@]}"; do
            [[ $f == status ]] && continue
            printf ', "%s": %s' "$f" "${R[$k,$f]}"
        done
        printf '}%s\n' "$([[ $n -lt ${#ORDER[@]} ]] && echo ,)"
    done
    echo '  ],'
    echo '  "median": {'
    for tool in "${TOOLS[@]}"; do
        printf '    %s: {"drain_applied_s": %s, "drain_synced_s": %s, "drain_tps": %s, "drain_rss_mb": %s, "live_max_lag": %s, "live_final_lag": %s, "live_zero_s": %s, "live_rss_mb": %s, "init_s": %s}%s\n' \
            "$(jstr "$tool")" "${MED[$tool,drain_applied_s]}" "${MED[$tool,drain_synced_s]}" "${MED[$tool,drain_tps]}" \
            "${MED[$tool,drain_rss_mb]}" "${MED[$tool,live_max_lag]}" "${MED[$tool,live_final_lag]}" "${MED[$tool,live_zero_s]}" \
            "${MED[$tool,live_rss_mb]}" "${MED[$tool,init_s]}" "$([[ $tool != "${TOOLS[-1]}" ]] && echo ,)"
    done
    echo '  },'
    printf '  "ratios": {"drain_rate_hikkoshi/native": %s},\n' "$RATE_RATIO"
    printf '  "hikkoshi_ddl_capture_event_triggers": %s,\n' "${DDL_CAPTURE:-0}"
    printf '  "problems": ['
    n=0
    for p in "${PROBLEMS[@]}"; do
        n=$((n + 1))
        printf '%s%s' "$(jstr "$p")" "$([[ $n -lt ${#PROBLEMS[@]} ]] && echo ', ')"
    done
    echo '],'
    printf '  "targets": {"drain_rate_ratio_min": 1.0, "drain_rate_met": %s}\n' "$RATE_MET"
    echo '}'
} >"$JSON"

if ((HIKKOSHI_FAILED)); then
    die "hikkoshi did not complete every measurement correctly (see the messages above and $RESULTS_DIR/$BENCH_NAME-$STAMP-logs/)"
fi
