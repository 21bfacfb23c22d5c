#!/usr/bin/env bash
# bench/cutover.sh: the write pause of `hikkoshi cutover` under load (issue 4's performance target: <= 1 s).
#
# PostgreSQL 15 source, 18 target (fsync on). pgbench is initialised at --scale on the source, `hikkoshi
# clone --follow` copies and streams, and examples/loadgen (pgbench's TPC-B transaction at --rate TPS over
# several clients that reconnect after errors and follow a switch file, which pgbench cannot) writes through
# the cutover. The cutover's hook rewrites the switch file. Reported, per run: the pause hikkoshi measured
# (fence -> hooks done) with its parts, and the longest gap between two successful commits that the load
# generator saw. After each run, the source's pgbench_history rows must all be on the target (counted up to the
# source's last mtime; the target has the load's later rows too); the run fails otherwise.
#
# --tables N runs every run twice, in the same bench run: once with pgbench's 4 tables, once with N small
# keyed tables (10 rows each) added, to measure what the fence costs with many tables: it is armed before
# the pause (fence_arm_seconds) and raised in it (fence_seconds). The end reports the median pause of each
# and their ratio (issue 23's target: within 2x).
#
# --pgbouncer puts Debian's PgBouncer (transaction pooling) between the load generator and the source: the
# cutover gets --pgbouncer and the shipped repoint hook (deploy/pgbouncer/repoint.sh) instead of the switch
# file's hook; reported besides: the load generator's errors (0 is the point) and the pooler's pause.
#
# usage: bench/cutover.sh [--scale 10] [--rate 1000] [--runs 3] [--verify quick|full|none] [--tables 0]
#                         [--pgbouncer] [--keep]
# Results: bench/results/cutover-<stamp>.json. Needs `cargo build --release --bins --examples`.
set -euo pipefail
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
BENCH_NAME=cutover
# shellcheck source=bench/lib.sh
source "$REPO_DIR/bench/lib.sh"

SCALE=10 RATE=1000 RUNS=3 VERIFY=quick KEEP=0 CLIENTS=8 TABLES=0 PGBOUNCER=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --scale) SCALE=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --verify) VERIFY=$2; shift 2 ;;
        --tables) TABLES=$2; shift 2 ;;
        --pgbouncer) PGBOUNCER=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
PG15_BIN=${HIKKOSHI_PG15_BIN:-/usr/lib/postgresql/15/bin}
PG18_BIN=${HIKKOSHI_PG18_BIN:-/opt/hikkoshi/pg18/pgserver/pginstall/bin}
BENCH_DIR=${BENCH_DIR:-/tmp/hikkoshi-bench-cutover}
HIKKOSHI_BIN=${HIKKOSHI_BIN:-$REPO_DIR/target/release/hikkoshi}
LOADGEN=$REPO_DIR/target/release/examples/loadgen
RESULTS_DIR=$REPO_DIR/bench/results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
[[ -x $HIKKOSHI_BIN && -x $LOADGEN ]] || die "run 'cargo build --release --bins --examples' first"

bench_start
mkdir -p "$RESULTS_DIR"
out=$RESULTS_DIR/cutover-$STAMP.json
echo "[" >"$out"
VARIANTS=0
((TABLES > 0)) && VARIANTS="0 $TABLES"
n=0
for run in $(seq 1 "$RUNS"); do
for extra in $VARIANTS; do
    n=$((n + 1))
    db=bench_cutover_${run}_$extra
    src_psql postgres -c "CREATE DATABASE $db"
    dst_psql postgres -c "CREATE DATABASE $db"
    as_pg "$PG15_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$SRC_PORT" -U postgres "$db" >/dev/null 2>&1
    # pgbench_history has no key: the stream needs a replica identity
    src_psql "$db" -c "ALTER TABLE pgbench_history REPLICA IDENTITY FULL"
    if ((extra > 0)); then
        src_psql "$db" -q -c "DO \$\$ BEGIN FOR i IN 1..$extra LOOP
            EXECUTE format('CREATE TABLE extra_%s (id int PRIMARY KEY, v text); INSERT INTO extra_%s
                SELECT g, md5(g::text) FROM generate_series(1, 10) g', i, i); END LOOP; END \$\$"
    fi
    switch=$WORK/switch-$n stopfile=$WORK/stop-$n
    echo "$SRC_PORT" >"$switch"
    rm -f "$stopfile"
    hook="echo \$HIKKOSHI_NEW_PRIMARY_PORT > $switch"
    pooler=()
    if ((PGBOUNCER)); then
        # the load generator connects to the pooler only; the cutover repoints the pooler, not the switch file
        pb=$WORK/pgbouncer-$n pb_port=$(pick_port)
        mkdir -p "$pb"
        printf '[databases]\n%s = host=127.0.0.1 port=%s dbname=%s\n' "$db" "$SRC_PORT" "$db" >"$pb/databases.ini"
        echo '"postgres" ""' >"$pb/userlist.txt"
        cat >"$pb/pgbouncer.ini" <<EOF
[databases]
%include $pb/databases.ini

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $pb_port
unix_socket_dir =
auth_type = trust
auth_file = $pb/userlist.txt
admin_users = postgres
pool_mode = transaction
max_client_conn = 200
default_pool_size = $((CLIENTS + 2))
logfile = $pb/pgbouncer.log
pidfile = $pb/pgbouncer.pid
EOF
        [[ $(id -u) == 0 ]] && chown -R postgres: "$pb"
        as_pg pgbouncer -d "$pb/pgbouncer.ini" || die "pgbouncer did not start (apt-get install pgbouncer)"
        for _ in $(seq 50); do port_free "$pb_port" || break; sleep 0.1; done
        echo "$pb_port" >"$switch"
        hook="$REPO_DIR/deploy/pgbouncer/repoint.sh $pb/databases.ini $db"
        pooler=(--pgbouncer "host=127.0.0.1 port=$pb_port user=postgres dbname=pgbouncer")
    fi
    "$HIKKOSHI_BIN" clone --follow --source "$(src_conn "$db")" --target "$(dst_conn "$db")" --jobs 2 \
        >"$LOGS/follow-$n.out" 2>"$LOGS/follow-$n.err" &
    BG_PIDS+=($!)
    follower=$!
    "$LOADGEN" "host=127.0.0.1 user=postgres dbname=$db" "$switch" "$RATE" "$CLIENTS" "$stopfile" \
        >"$WORK/load-$n.json" 2>"$LOGS/load-$n.err" &
    BG_PIDS+=($!)
    load=$!
    # wait until streaming, then let the load settle
    until "$HIKKOSHI_BIN" status --target "$(dst_conn "$db")" --json 2>/dev/null \
        | grep -q '"follower_running": true'; do sleep 0.5; done
    sleep 10
    log "run $run ($extra extra tables): cutover under $RATE TPS"
    "$HIKKOSHI_BIN" cutover --source "$(src_conn "$db")" --target "$(dst_conn "$db")" --verify "$VERIFY" \
        --hook "$hook" "${pooler[@]}" --json >"$WORK/cutover-$n.json" \
        2>"$LOGS/cutover-$n.err" || { cat "$LOGS/cutover-$n.err" >&2; die "cutover failed"; }
    sleep 5
    touch "$stopfile"
    wait "$load" || true
    wait "$follower" || true
    if ((PGBOUNCER)); then
        kill "$(cat "$pb/pgbouncer.pid")" 2>/dev/null || true
    fi
    pause=$(grep -o '"write_pause_seconds": [0-9.]*' "$WORK/cutover-$n.json" | awk '{print $2}')
    gap=$(grep -o '"longest_gap_seconds": [0-9.]*' "$WORK/load-$n.json" | awk '{print $2}')
    before=$(grep -o '"verify_before_fence_seconds": [0-9.]*' "$WORK/cutover-$n.json" | awk '{print $2}')
    compared=$(grep -o '"rows_compared_in_pause": [0-9]*' "$WORK/cutover-$n.json" | awk '{print $2}')
    fence=$(grep -o '"fence_seconds": [0-9.]*' "$WORK/cutover-$n.json" | awk '{print $2}')
    armed=$(grep -o '"fence_arm_seconds": [0-9.]*' "$WORK/cutover-$n.json" | awk '{print $2}')
    fenced=$(grep -o '"tables_fenced": [0-9]*' "$WORK/cutover-$n.json" | awk '{print $2}')
    errors=$(grep -o '"errors": [0-9]*' "$WORK/load-$n.json" | awk '{print $2}')
    pooled=$(grep -o '"pooler_pause_seconds": [0-9.]*' "$WORK/cutover-$n.json" | awk '{print $2}')
    # the source's rows must all be on the target (the target has the load's later rows too)
    s=$(src_psql "$db" -At -c "SELECT count(*) FROM pgbench_history")
    last=$(src_psql "$db" -At -c "SELECT max(mtime) FROM pgbench_history")
    t=$(dst_psql "$db" -At -c "SELECT count(*) FROM pgbench_history WHERE mtime <= '$last'")
    [[ $s == "$t" ]] || die "run $run: the source has $s history rows up to $last, the target $t"
    log "run $run ($extra extra tables): hikkoshi pause ${pause}s, load generator's longest gap ${gap}s and $errors error(s)${pooled:+, pooler paused ${pooled}s} (verify: ${before}s before the fence, $compared changed rows compared in the pause; fence on $fenced tables: armed in ${armed}s before the pause, raised in ${fence}s); history rows source $s, target $t"
    ((n > 1)) && echo "," >>"$out"
    printf '{"run": %d, "scale": %d, "rate": %d, "verify": "%s", "extra_tables": %d, "hikkoshi_pause_seconds": %s, "load_longest_gap_seconds": %s, "cutover": %s, "load": %s}\n' \
        "$run" "$SCALE" "$RATE" "$VERIFY" "$extra" "$pause" "$gap" "$(cat "$WORK/cutover-$n.json")" "$(cat "$WORK/load-$n.json")" >>"$out"
done
done
echo "]" >>"$out"
log "results: $out"
# the median pause with each table count, and their ratio
python3 - "$out" <<'PY'
import json, statistics, sys
runs = json.load(open(sys.argv[1]))
by, gaps, errors = {}, {}, {}
for r in runs:
    by.setdefault(r["extra_tables"], []).append(r["hikkoshi_pause_seconds"])
    gaps.setdefault(r["extra_tables"], []).append(r["load_longest_gap_seconds"])
    errors[r["extra_tables"]] = errors.get(r["extra_tables"], 0) + r["load"]["errors"]
med = {k: statistics.median(v) for k, v in sorted(by.items())}
for k, v in med.items():
    print(f"pause with {k} extra tables: median {v:.3f}s over {len(by[k])} run(s): {by[k]}; "
          f"the application's longest wait: median {statistics.median(gaps[k]):.3f}s, {errors[k]} error(s)")
if len(med) == 2:
    (a, pa), (b, pb) = med.items()
    print(f"ratio ({b} extra tables / {a}): {pb / pa:.2f}")
PY
