#!/usr/bin/env bash
# bench/rehearse.sh: how close `hikkoshi clone --rehearse` predicts the real `hikkoshi clone`.
#
# Starts the same PostgreSQL 15 source and 18 target as bench/clone.sh (bench/lib.sh), loads the same datasets,
# then for each dataset, --runs times: runs `hikkoshi clone --rehearse --json` against an empty target database,
# checks that it left nothing on either server, then runs the real `hikkoshi clone` into a fresh database right
# after it, and compares the predicted copy, index (post-data), analyze and total times with the actual ones
# read from the clone's log. Writes bench/results/rehearse-<dataset>-<timestamp>.json. See bench/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/rehearse.sh [OPTIONS]

Compares `hikkoshi clone --rehearse` (the prediction) with `hikkoshi clone` (the real run), PostgreSQL 15 -> 18.

Options:
  --dataset pgbench|json|both  Which dataset(s) (default: both)
  --scale N                    pgbench scale factor (default: 100, about 1.5 GB)
  --json-scale F               Multiplies the row counts of the JSON dataset (default: 1, about 1.3 GB)
  --runs N                     Rehearsal + real clone pairs per dataset (default: 1)
  --jobs N                     --jobs of both (default: 2)
  --chunk-size SIZE            --chunk-size of both (default: 256MB)
  --keep                       Leave both servers running (and the datasets loaded) at the end
  -h, --help                   This help

Environment: BENCH_DIR (default /tmp/hikkoshi-bench-rehearse), HIKKOSHI_BIN, HIKKOSHI_PG15_BIN,
HIKKOSHI_PG18_BIN, as for bench/clone.sh.
EOF
}

BENCH_NAME=rehearse
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
. "$SCRIPT_DIR/lib.sh"

DATASET=both
SCALE=100
JSON_SCALE=1
RUNS=1
JOBS=2
CHUNK_SIZE=256MB
KEEP=0
need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --dataset) need_arg "$@"; DATASET=$2; shift 2 ;;
        --scale) need_arg "$@"; SCALE=$2; shift 2 ;;
        --json-scale) need_arg "$@"; JSON_SCALE=$2; shift 2 ;;
        --runs) need_arg "$@"; RUNS=$2; shift 2 ;;
        --jobs) need_arg "$@"; JOBS=$2; shift 2 ;;
        --chunk-size) need_arg "$@"; CHUNK_SIZE=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
case $DATASET in
    pgbench) DATASETS=(pgbench) ;;
    json) DATASETS=(json) ;;
    both) DATASETS=(pgbench json) ;;
    *) die "--dataset must be pgbench, json or both (got '$DATASET')" ;;
esac
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || die "--scale must be a positive integer (got '$SCALE')"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer (got '$RUNS')"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer (got '$JOBS')"
[[ $JSON_SCALE =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] && awk -v f="$JSON_SCALE" 'BEGIN { exit !(f > 0) }' \
    || die "--json-scale must be a positive number (got '$JSON_SCALE')"
[[ $CHUNK_SIZE =~ ^[1-9][0-9]*(kB|KB|MB|GB|TB)$ ]] || die "--chunk-size must look like 256MB or 1GB (got '$CHUNK_SIZE')"

PG15_BIN=${HIKKOSHI_PG15_BIN:-/usr/lib/postgresql/15/bin}
PG18_BIN=${HIKKOSHI_PG18_BIN:-/opt/hikkoshi/pg18/pgserver/pginstall/bin}
BENCH_DIR=${BENCH_DIR:-/tmp/hikkoshi-bench-rehearse}
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
command -v jq >/dev/null || die "jq not found (apt-get install jq)"

bench_start
HIKKOSHI_VERSION=$("$HIKKOSHI_BIN" --version 2>&1 | head -1)
log "source $SRC_VERSION, target $DST_VERSION; $HIKKOSHI_VERSION"
mkdir -p "$RESULTS_DIR"

# seconds from a clone log line "... <what> ... in 12.3s"
phase_secs() { # logfile pattern
    grep -E "$2" "$1" | tail -1 | sed -E 's/.* in ([0-9.]+)s.*/\1/' | grep -E '^[0-9.]+$' || echo null
}
# error in % of the actual: (predicted - actual) / actual
err_pct() { awk -v p="$1" -v a="$2" 'BEGIN { if (p == "null" || a == "null" || a + 0 == 0) print "null"; else printf "%.1f\n", 100 * (p - a) / a }'; }

# What the rehearsal must not leave: slots and publications on the source, any relation or schema of its own on
# the target. Prints the offenders, one per line.
leftovers() { # srcdb dstdb
    src_psql "$1" -At -c "SELECT 'slot ' || slot_name FROM pg_replication_slots
                          UNION ALL SELECT 'publication ' || pubname FROM pg_publication"
    dst_psql "$2" -At -c "SELECT 'schema ' || nspname FROM pg_namespace
                          WHERE nspname NOT IN ('public', 'information_schema') AND nspname NOT LIKE 'pg\_%'
                          UNION ALL
                          SELECT 'relation ' || n.nspname || '.' || c.relname FROM pg_class c
                          JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'"
}

SUMMARY=()
FAILED=0
for ds in "${DATASETS[@]}"; do
    srcdb=bench_$ds
    case $ds in
        pgbench) load_pgbench ;;
        json) load_json ;;
    esac
    src_pretty=$(src_psql "$srcdb" -At -c 'SELECT pg_size_pretty(pg_database_size(current_database()))')

    # ---- each run: the prediction, then the real clone right after it (the same load on the machine)
    results=$WORK/rehearse-$ds.tsv
    : >"$results"
    left_all=
    for ((r = 1; r <= RUNS; r++)); do
        fresh_target_db rehearse_target
        checkpoint_both
        log "dataset $ds ($src_pretty), run $r/$RUNS: hikkoshi clone --rehearse --jobs $JOBS (load: $(cut -d' ' -f1-3 /proc/loadavg))"
        pred=$LOGS/$ds-run$r-rehearse.json
        t0=$(date +%s.%N)
        "$HIKKOSHI_BIN" clone --rehearse --json \
            --source "$(src_conn "$srcdb")" --target "$(dst_conn rehearse_target)" \
            --jobs "$JOBS" --chunk-size "$CHUNK_SIZE" --pg-bin "$PG18_BIN" >"$pred" 2>"$LOGS/$ds-run$r-rehearse.log" \
            || { tail -20 "$LOGS/$ds-run$r-rehearse.log" >&2; die "hikkoshi clone --rehearse failed"; }
        rehearse_wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
        left=$(leftovers "$srcdb" rehearse_target)
        if [[ -n $left ]]; then
            echo "!!! the rehearsal left objects behind:" >&2
            echo "$left" >&2
            left_all="$left_all$left "
            FAILED=1
        fi
        drop_target_db rehearse_target
        p_copy=$(jq '.copy_seconds' "$pred")
        p_index=$(jq '.index_seconds' "$pred")
        p_analyze=$(jq '.analyze_seconds' "$pred")
        p_total=$(jq '.total_seconds' "$pred")
        log "  predicted: copy ${p_copy}s, indexes ${p_index}s, total ${p_total}s (rehearsal took ${rehearse_wall}s)"

        dstdb=clone_$r
        lp=$LOGS/$ds-run$r-clone.log
        fresh_target_db "$dstdb"
        checkpoint_both
        t0=$(date +%s.%N)
        "$HIKKOSHI_BIN" clone --source "$(src_conn "$srcdb")" --target "$(dst_conn "$dstdb")" \
            --jobs "$JOBS" --chunk-size "$CHUNK_SIZE" --pg-bin "$PG18_BIN" >"$lp" 2>&1 \
            || { tail -20 "$lp" >&2; die "hikkoshi clone failed: see $lp"; }
        wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
        a_copy=$(phase_secs "$lp" 'copy phase done in')
        a_index=$(phase_secs "$lp" 'indexes, constraints and triggers built in')
        a_analyze=$(phase_secs "$lp" 'analyzed [0-9]+ table\(s\) in')
        log "  actual:    copy ${a_copy}s, indexes ${a_index}s, analyze ${a_analyze}s, total ${wall}s; error $(err_pct "$p_total" "$wall") % (load: $(cut -d' ' -f1-3 /proc/loadavg))"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$a_copy" "$a_index" "$a_analyze" "$wall" \
            "$p_copy" "$p_index" "$p_analyze" "$p_total" "$rehearse_wall" "$(err_pct "$p_total" "$wall")" >>"$results"
        drop_target_db "$dstdb"
    done
    left=$left_all
    m_copy=$(cut -f2 "$results" | median)
    m_index=$(cut -f3 "$results" | median)
    m_analyze=$(cut -f4 "$results" | median)
    m_total=$(cut -f5 "$results" | median)
    p_copy=$(cut -f6 "$results" | median)
    p_index=$(cut -f7 "$results" | median)
    p_analyze=$(cut -f8 "$results" | median)
    p_total=$(cut -f9 "$results" | median)
    rehearse_wall=$(cut -f10 "$results" | median)
    # the error of each run's prediction against the clone that followed it, and the median of their sizes
    e_runs=$(cut -f11 "$results" | paste -sd' ')
    e_abs_median=$(cut -f11 "$results" | awk '{ print ($1 < 0 ? -$1 : $1) }' | median)
    e_copy=$(err_pct "$p_copy" "$m_copy")
    e_index=$(err_pct "$p_index" "$m_index")
    e_total=$(err_pct "$p_total" "$m_total")
    within=$(awk -v e="$e_abs_median" 'BEGIN { print (e == "null" ? "null" : e <= 15 ? "true" : "false") }')

    out=$(
        echo
        echo "== dataset $ds ($src_pretty, PostgreSQL $SRC_VERSION -> $DST_VERSION, --jobs $JOBS, $RUNS real run(s))"
        printf '%-10s %12s %12s %10s\n' phase "predicted s" "actual s" "error %"
        printf '%-10s %12.2f %12s %10s\n' copy "$p_copy" "$m_copy" "$e_copy"
        printf '%-10s %12.2f %12s %10s\n' indexes "$p_index" "$m_index" "$e_index"
        printf '%-10s %12.2f %12s %10s\n' analyze "$p_analyze" "$m_analyze" "$(err_pct "$p_analyze" "$m_analyze")"
        printf '%-10s %12.2f %12s %10s\n' total "$p_total" "$m_total" "$e_total"
        echo "(medians over the runs) error of each run's total against the clone right after it: $e_runs %;"
        echo "median size of those errors: $e_abs_median % (target: within 15 %: $within)"
        echo "rehearsal took ${rehearse_wall}s (median); left behind: ${left:-nothing}"
        jq -r '.tables[] | "  \(.name): \(.rows | floor) rows, sample \(.sample_rows) rows in \(.sample_copy_seconds * 1000 | floor) ms, x\(.scale * 10 | floor / 10): copy \(.copy_seconds * 100 | floor / 100)s, indexes \(.index_seconds * 100 | floor / 100)s"' "$pred"
        echo "  parallel copy speedup measured: $(jq '.parallel_speedup' "$pred")"
    )
    echo "$out"
    SUMMARY+=("$out")

    json=$RESULTS_DIR/rehearse-$ds-$STAMP.json
    runs_json=$(awk -F'\t' 'BEGIN { printf "[" } { printf "%s{\"run\": %s, \"actual\": {\"copy_s\": %s, \"index_s\": %s, \"analyze_s\": %s, \"total_s\": %s}, \"predicted\": {\"copy_s\": %s, \"index_s\": %s, \"analyze_s\": %s, \"total_s\": %s}, \"rehearsal_wall_s\": %s, \"total_error_pct\": %s}", (NR > 1 ? ", " : ""), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 } END { printf "]" }' "$results")
    jq -n --arg ds "$ds" --arg stamp "$STAMP" --arg src "$SRC_VERSION" --arg dst "$DST_VERSION" \
        --arg hk "$HIKKOSHI_VERSION" --argjson scale "$SCALE" --argjson jscale "$JSON_SCALE" \
        --argjson runs "$RUNS" --argjson jobs "$JOBS" --arg chunk "$CHUNK_SIZE" \
        --argjson rwall "$rehearse_wall" --arg left "$left" --slurpfile pred "$pred" --argjson actual "$runs_json" \
        --argjson mc "$m_copy" --argjson mi "$m_index" --argjson ma "$m_analyze" --argjson mt "$m_total" \
        --argjson pc "$p_copy" --argjson pi "$p_index" --argjson pa "$p_analyze" --argjson pt "$p_total" \
        --argjson eabs "$e_abs_median" \
        --argjson ec "$e_copy" --argjson ei "$e_index" --argjson et "$e_total" --argjson within "$within" \
        --argjson cpus "$(nproc)" \
        '{benchmark: "rehearse", dataset: $ds, timestamp: $stamp, machine: {cpus: $cpus},
          params: {scale: $scale, json_scale: $jscale, runs: $runs, jobs: $jobs, chunk_size: $chunk},
          versions: {source: $src, target: $dst, hikkoshi: $hk},
          rehearsal_wall_s: $rwall, left_behind: $left,
          predicted_median: {copy_s: $pc, index_s: $pi, analyze_s: $pa, total_s: $pt},
          actual_median: {copy_s: $mc, index_s: $mi, analyze_s: $ma, total_s: $mt},
          error_of_medians_pct: {copy: $ec, index: $ei, total: $et},
          median_abs_run_error_pct: $eabs,
          target: {total_within_pct: 15, met: $within},
          runs: $actual, last_rehearsal: $pred[0]}' >"$json"
    log "results: $json"
    [[ $KEEP == 1 ]] || src_psql postgres -c "DROP DATABASE $srcdb WITH (FORCE)"
done

if ((${#DATASETS[@]} > 1)); then
    echo
    echo "================ summary"
    printf '%s\n' "${SUMMARY[@]}"
fi
exit "$FAILED"
