#!/usr/bin/env bash
# bench/clone.sh: `hikkoshi clone` against its peers (pgcopydb clone, pg_dump -Fd + pg_restore) and the raw limit
# (bench/raw-copy.sh: binary COPY pipes split by ctid, then post-data) on the same data.
#
# Starts its own PostgreSQL 15 source and PostgreSQL 18 target on free loopback ports, loads one or two
# datasets on the source, then clones each dataset --runs times with every tool into a fresh, empty target
# database, alternating the order of the tools from one run to the next. Reports wall time and peak memory
# per run, the median per tool and hikkoshi's ratios to its peers; writes the same as JSON under
# bench/results/. See bench/README.md. Server set-up and cleanup are shared with bench/stream.sh (bench/lib.sh).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/clone.sh [OPTIONS]

Compares `hikkoshi clone` with `pgcopydb clone` and `pg_dump -Fd -j | pg_restore -j`, PostgreSQL 15 -> 18.

Options:
  --dataset pgbench|json|both  Which dataset(s) to clone (default: both)
  --scale N                    pgbench scale factor (default: 100, about 1.5 GB)
  --json-scale F               Multiplies the row counts of the JSON dataset (default: 1, about 1.3 GB;
                               0.02 for a quick run)
  --runs N                     Clones per tool and dataset (default: 3)
  --jobs N                     Parallelism given to every tool (default: 2)
  --chunk-size SIZE            hikkoshi --chunk-size, also pgcopydb --split-tables-larger-than (default: 256MB)
  --keep                       Leave both servers running (and the datasets loaded) at the end
  -h, --help                   This help

Environment:
  BENCH_DIR           Scratch directory, created fresh and removed at exit (default: /tmp/hikkoshi-bench)
  HIKKOSHI_BIN        hikkoshi binary (default: target/release/hikkoshi in the repository)
  HIKKOSHI_PG15_BIN   PostgreSQL 15 binaries, source server (default: /usr/lib/postgresql/15/bin)
  HIKKOSHI_PG18_BIN   PostgreSQL 18 binaries, target server, pg_dump/pg_restore
                      (default: /opt/hikkoshi/pg18/pgserver/pginstall/bin)
  PGCOPYDB_BIN        pgcopydb binary (default: pgcopydb on PATH)

Quick check that everything works (a few minutes):
  bench/clone.sh --scale 2 --json-scale 0.02 --runs 2
EOF
}

BENCH_NAME=clone
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
. "$SCRIPT_DIR/lib.sh"

# ---------------------------------------------------------------------------------------------------------
# options

DATASET=both
SCALE=100
JSON_SCALE=1
RUNS=3
JOBS=2
CHUNK_SIZE=256MB
KEEP=0

need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --dataset) need_arg "$@"; DATASET=$2; shift 2 ;;
        --dataset=*) DATASET=${1#*=}; shift ;;
        --scale) need_arg "$@"; SCALE=$2; shift 2 ;;
        --scale=*) SCALE=${1#*=}; shift ;;
        --json-scale) need_arg "$@"; JSON_SCALE=$2; shift 2 ;;
        --json-scale=*) JSON_SCALE=${1#*=}; shift ;;
        --runs) need_arg "$@"; RUNS=$2; shift 2 ;;
        --runs=*) RUNS=${1#*=}; shift ;;
        --jobs) need_arg "$@"; JOBS=$2; shift 2 ;;
        --jobs=*) JOBS=${1#*=}; shift ;;
        --chunk-size) need_arg "$@"; CHUNK_SIZE=$2; shift 2 ;;
        --chunk-size=*) CHUNK_SIZE=${1#*=}; shift ;;
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
# hikkoshi accepts 256MB, 1GB, ...; pgcopydb wants the same kind of size, with a space-free unit.
[[ $CHUNK_SIZE =~ ^[1-9][0-9]*(kB|KB|MB|GB|TB)$ ]] || die "--chunk-size must look like 256MB or 1GB (got '$CHUNK_SIZE')"

PG15_BIN=${HIKKOSHI_PG15_BIN:-/usr/lib/postgresql/15/bin}
PG18_BIN=${HIKKOSHI_PG18_BIN:-/opt/hikkoshi/pg18/pgserver/pginstall/bin}
BENCH_DIR=${BENCH_DIR:-/tmp/hikkoshi-bench}
if [[ -n ${HIKKOSHI_BIN:-} ]]; then
    [[ $HIKKOSHI_BIN == /* ]] || HIKKOSHI_BIN=$PWD/$HIKKOSHI_BIN
else
    HIKKOSHI_BIN=$REPO_DIR/target/release/hikkoshi
fi
PGCOPYDB_BIN=${PGCOPYDB_BIN:-$(command -v pgcopydb || true)}
RESULTS_DIR=$REPO_DIR/bench/results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

for b in initdb pg_ctl postgres psql pgbench; do
    [[ -x $PG15_BIN/$b ]] || die "$PG15_BIN/$b not found (set HIKKOSHI_PG15_BIN)"
done
for b in initdb pg_ctl postgres psql pg_dump pg_restore; do
    [[ -x $PG18_BIN/$b ]] || die "$PG18_BIN/$b not found (set HIKKOSHI_PG18_BIN)"
done
[[ -x $HIKKOSHI_BIN ]] || die "$HIKKOSHI_BIN not found: run 'cargo build --release' first (or set HIKKOSHI_BIN)"
[[ -n $PGCOPYDB_BIN && -x $PGCOPYDB_BIN ]] || die "pgcopydb not found (apt-get install pgcopydb, or set PGCOPYDB_BIN)"
[[ $BENCH_DIR == /* ]] || BENCH_DIR=$PWD/$BENCH_DIR

# GNU time gives the exact peak RSS of the largest single process of the tree; without it the poller's
# samples of VmHWM are used instead.
TIME_BIN=
if [[ -x /usr/bin/time ]] && /usr/bin/time -f '%M' -o /dev/null true 2>/dev/null; then
    TIME_BIN=/usr/bin/time
fi
RSS_METHOD="sampled VmHWM"
[[ -n $TIME_BIN ]] && RSS_METHOD="GNU time %M"
PAGE_KB=$(($(getconf PAGESIZE) / 1024))

# scratch directory, both servers, cleanup at exit: bench/lib.sh
bench_start

HIKKOSHI_VERSION=$("$HIKKOSHI_BIN" --version 2>&1 | head -1)
PGCOPYDB_VERSION=$("$PGCOPYDB_BIN" --version 2>&1 | grep -o 'pgcopydb version [^ ]*' | head -1 || true)
PG_DUMP_VERSION=$("$PG18_BIN/pg_dump" --version)
log "source $SRC_VERSION, target $DST_VERSION; $HIKKOSHI_VERSION; $PGCOPYDB_VERSION; $PG_DUMP_VERSION"

# ---------------------------------------------------------------------------------------------------------
# datasets: load_pgbench and load_json (bench/lib.sh)

# "schema.table|rows" for every table of a database, sorted; leaves out hikkoshi's own state schema.
COUNT_SQL="SELECT format('SELECT %L, count(*) FROM %I.%I', n.nspname || '.' || c.relname, n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'hikkoshi')
  AND n.nspname NOT LIKE 'pg\_%'
ORDER BY 1"
row_counts() { # side db
    local side=$1 db=$2
    printf '%s\n\\gexec\n' "$COUNT_SQL" | "${side}_psql" "$db" -At -F '|' | sort
}

# ---------------------------------------------------------------------------------------------------------
# measuring

# measure LOGFILE CMD...: runs CMD, polling its process tree every 100 ms.
# Sets M_RC, M_WALL (s), M_TREE_MB (peak of the summed RSS of the tree: shared pages count once per
# process; at least M_PROC_MB) and M_PROC_MB (peak RSS of the largest single process, from GNU time, else
# sampled VmHWM).
measure() {
    local logf=$1
    shift
    local endf=$WORK/.measure-end timef=$WORK/.measure-time
    rm -f "$endf" "$timef"
    local t0 t1 pid p sum res hwm peak_sum=0 peak_hwm=0 v skip_depth1=0
    t0=$(date +%s.%N)
    if [[ -n $TIME_BIN ]]; then
        skip_depth1=1
        ( set +e; "$TIME_BIN" -f '%M' -o "$timef" "$@" >"$logf" 2>&1; rc=$?; date +%s.%N >"$endf"; exit $rc ) &
    else
        ( set +e; "$@" >"$logf" 2>&1; rc=$?; date +%s.%N >"$endf"; exit $rc ) &
    fi
    pid=$!
    CURRENT_PID=$pid
    local -a tops
    while [[ ! -e $endf ]]; do
        sum=0
        # the first level is GNU time itself (about 2 MB): not the tool, not counted
        tops=()
        read -r -a tops 2>/dev/null <"/proc/$pid/task/$pid/children" || true
        for p in "${tops[@]}"; do
            if ((skip_depth1)); then
                :
            elif read -r _ res _ 2>/dev/null <"/proc/$p/statm"; then
                sum=$((sum + res * PAGE_KB))
                if [[ -z $TIME_BIN ]]; then
                    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
                    [[ -n $hwm ]] && ((hwm > peak_hwm)) && peak_hwm=$hwm
                fi
            fi
            for v in $(descendants "$p"); do
                if read -r _ res _ 2>/dev/null <"/proc/$v/statm"; then
                    sum=$((sum + res * PAGE_KB))
                fi
                if [[ -z $TIME_BIN ]]; then
                    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$v/status" 2>/dev/null || true)
                    [[ -n $hwm ]] && ((hwm > peak_hwm)) && peak_hwm=$hwm
                fi
            done
        done
        ((sum > peak_sum)) && peak_sum=$sum
        # the wrapper itself killed before it could write the end time: stop polling
        local st=Z
        read -r _ _ st _ 2>/dev/null </proc/"$pid"/stat || true
        [[ $st == Z ]] && break
        sleep 0.1
    done
    M_RC=0
    wait "$pid" || M_RC=$?
    CURRENT_PID=
    if [[ -s $endf ]]; then t1=$(<"$endf"); else t1=$(date +%s.%N); fi
    if [[ -n $TIME_BIN && -s $timef ]]; then
        # GNU time writes "Command exited with non-zero status N" before the figure when the command fails
        peak_hwm=$(tail -1 "$timef")
        [[ $peak_hwm =~ ^[0-9]+$ ]] || peak_hwm=0
    fi
    # a sample can miss a short spike that the largest process's high-water mark saw: never report less
    ((peak_hwm > peak_sum)) && peak_sum=$peak_hwm
    M_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    M_TREE_MB=$(awk -v k="$peak_sum" 'BEGIN { printf "%.1f", k / 1024 }')
    M_PROC_MB=$(awk -v k="$peak_hwm" 'BEGIN { printf "%.1f", k / 1024 }')
}

# run_tool TOOL DATASET_DB TARGET_DB LOGPREFIX: sets R_STATUS (ok|failed), R_WALL, R_TREE_MB, R_PROC_MB,
# R_DUMP, R_RESTORE (pg_dump+pg_restore only).
run_tool() {
    local tool=$1 srcdb=$2 dstdb=$3 lp=$4
    R_DUMP=null R_RESTORE=null R_STATUS=ok
    case $tool in
        hikkoshi)
            measure "$lp.log" "$HIKKOSHI_BIN" clone \
                --source "$(src_conn "$srcdb")" --target "$(dst_conn "$dstdb")" \
                --jobs "$JOBS" --chunk-size "$CHUNK_SIZE" --pg-bin "$PG18_BIN"
            [[ $M_RC == 0 ]] || R_STATUS=failed
            R_WALL=$M_WALL R_TREE_MB=$M_TREE_MB R_PROC_MB=$M_PROC_MB
            ;;
        pgcopydb)
            local dir=$WORK/pgcopydb
            rm -rf "$dir"
            # --dir: its work directory (schema dump, per-table done markers), removed after each run.
            # --split-tables-larger-than: pgcopydb's counterpart of hikkoshi's --chunk-size (same-table
            #   concurrency), so that both tools may share a large table between jobs.
            # pgcopydb takes pg_dump/pg_restore from PATH: Debian's pg_wrapper, i.e. PostgreSQL 15 here. It is
            # built against PostgreSQL 15 and only claims support up to 15; the 15 client tools can dump the
            # 15 source and restore into 18, which is what this run exercises.
            measure "$lp.log" "$PGCOPYDB_BIN" clone \
                --source "$(src_uri "$srcdb")" --target "$(dst_uri "$dstdb")" \
                --dir "$dir" --table-jobs "$JOBS" --index-jobs "$JOBS" \
                --split-tables-larger-than "$CHUNK_SIZE"
            [[ $M_RC == 0 ]] || R_STATUS=failed
            R_WALL=$M_WALL R_TREE_MB=$M_TREE_MB R_PROC_MB=$M_PROC_MB
            rm -rf "$dir"
            ;;
        raw_limit)
            measure "$lp.log" "$SCRIPT_DIR/raw-copy.sh" "$(src_conn "$srcdb")" "$(dst_conn "$dstdb")" "$JOBS" "$PG18_BIN"
            [[ $M_RC == 0 ]] || R_STATUS=failed
            R_WALL=$M_WALL R_TREE_MB=$M_TREE_MB R_PROC_MB=$M_PROC_MB
            ;;
        pg_dump_restore)
            local dir=$WORK/dump
            rm -rf "$dir"
            measure "$lp.pg_dump.log" "$PG18_BIN/pg_dump" -Fd -j "$JOBS" -f "$dir" "$(src_conn "$srcdb")"
            if [[ $M_RC != 0 ]]; then
                R_STATUS=failed R_WALL=$M_WALL R_TREE_MB=$M_TREE_MB R_PROC_MB=$M_PROC_MB R_DUMP=$M_WALL
            else
                local dw=$M_WALL dt=$M_TREE_MB dp=$M_PROC_MB
                measure "$lp.pg_restore.log" "$PG18_BIN/pg_restore" -j "$JOBS" -d "$(dst_conn "$dstdb")" "$dir"
                [[ $M_RC == 0 ]] || R_STATUS=failed
                R_DUMP=$dw R_RESTORE=$M_WALL
                R_WALL=$(awk -v a="$dw" -v b="$M_WALL" 'BEGIN { printf "%.2f", a + b }')
                R_TREE_MB=$(awk -v a="$dt" -v b="$M_TREE_MB" 'BEGIN { print (a > b ? a : b) }')
                R_PROC_MB=$(awk -v a="$dp" -v b="$M_PROC_MB" 'BEGIN { print (a > b ? a : b) }')
            fi
            rm -rf "$dir"
            ;;
    esac
}

show_log_tail() {
    local f
    for f in "$1"*.log; do
        [[ -f $f ]] || continue
        echo "---- last lines of $f" >&2
        tail -25 "$f" >&2
    done
}

TOOLS=(hikkoshi pgcopydb pg_dump_restore raw_limit)
declare -A LABEL=([hikkoshi]=hikkoshi [pgcopydb]=pgcopydb [pg_dump_restore]="pg_dump+pg_restore"
    [raw_limit]="raw limit")
mkdir -p "$RESULTS_DIR"
HIKKOSHI_FAILED=0
SUMMARY=()

bench_dataset() {
    local ds=$1 srcdb=bench_$1
    case $ds in
        pgbench) load_pgbench ;;
        json) load_json ;;
    esac
    # Frozen and analyzed once, after loading: otherwise the first tool to read the fresh rows sets their hint
    # bits (and writes every page again), and pays for the others.
    log "VACUUM (FREEZE, ANALYZE) on the source"
    src_psql "$srcdb" -c 'VACUUM (FREEZE, ANALYZE)'
    local src_bytes src_pretty
    src_bytes=$(src_psql "$srcdb" -At -c 'SELECT pg_database_size(current_database())')
    src_pretty=$(src_psql "$srcdb" -At -c 'SELECT pg_size_pretty(pg_database_size(current_database()))')
    local expected
    expected=$(row_counts src "$srcdb")
    log "dataset $ds: $src_pretty on the source, tables: $(echo "$expected" | tr '\n' ' ')"

    local json=$RESULTS_DIR/clone-$ds-$STAMP.json
    local results=$WORK/results-$ds.tsv
    : >"$results"
    local r i k tool dstdb lp rows_ok got
    for ((r = 1; r <= RUNS; r++)); do
        local order=()
        for ((i = 0; i < ${#TOOLS[@]}; i++)); do
            k=$(((i + r - 1) % ${#TOOLS[@]}))
            order+=("${TOOLS[$k]}")
        done
        log "dataset $ds, run $r/$RUNS: ${order[*]}"
        local pos=0
        for tool in "${order[@]}"; do
            pos=$((pos + 1))
            dstdb=clone_${tool}_$r
            lp=$LOGS/$ds-run$r-$tool
            fresh_target_db "$dstdb"
            checkpoint_both
            run_tool "$tool" "$srcdb" "$dstdb" "$lp"
            rows_ok=false
            if [[ $R_STATUS == ok ]]; then
                got=$(row_counts dst "$dstdb")
                if [[ $got == "$expected" ]]; then
                    rows_ok=true
                else
                    echo "!!! $ds run $r: ${LABEL[$tool]}: row counts differ between source and target" >&2
                    diff <(echo "$expected") <(echo "$got") >&2 || true
                    R_STATUS=wrong_rows
                fi
            else
                echo "!!! $ds run $r: ${LABEL[$tool]} failed (exit $M_RC)" >&2
                show_log_tail "$lp"
            fi
            if [[ $tool == hikkoshi && $R_STATUS != ok ]]; then
                HIKKOSHI_FAILED=1
                die "hikkoshi clone did not produce a correct copy ($R_STATUS): see $lp.log"
            fi
            log "  ${LABEL[$tool]}: ${R_WALL}s, peak tree RSS ${R_TREE_MB} MB, largest process ${R_PROC_MB} MB, $R_STATUS"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$pos" "$tool" "$R_WALL" "$R_TREE_MB" "$R_PROC_MB" \
                "$R_DUMP" "$R_RESTORE" "$R_STATUS" >>"$results"
            drop_target_db "$dstdb"
        done
    done

    # ---- medians (successful runs only) and ratios
    local -A MW MT MP
    for tool in "${TOOLS[@]}"; do
        MW[$tool]=$(awk -F'\t' -v t="$tool" '$3 == t && $9 == "ok" { print $4 }' "$results" | median)
        MT[$tool]=$(awk -F'\t' -v t="$tool" '$3 == t && $9 == "ok" { print $5 }' "$results" | median)
        MP[$tool]=$(awk -F'\t' -v t="$tool" '$3 == t && $9 == "ok" { print $6 }' "$results" | median)
    done
    local md mr
    md=$(awk -F'\t' '$3 == "pg_dump_restore" && $9 == "ok" { print $7 }' "$results" | median)
    mr=$(awk -F'\t' '$3 == "pg_dump_restore" && $9 == "ok" { print $8 }' "$results" | median)
    local rw_c rm_c rw_d rm_d rw_r wall_met mem_met
    rw_r=$(ratio "${MW[hikkoshi]}" "${MW[raw_limit]}")
    rw_c=$(ratio "${MW[hikkoshi]}" "${MW[pgcopydb]}")
    rm_c=$(ratio "${MT[hikkoshi]}" "${MT[pgcopydb]}")
    rw_d=$(ratio "${MW[hikkoshi]}" "${MW[pg_dump_restore]}")
    rm_d=$(ratio "${MT[hikkoshi]}" "${MT[pg_dump_restore]}")
    wall_met=$(awk -v r="$rw_c" 'BEGIN { print (r == "null" ? "null" : (r + 0 <= 0.9 ? "true" : "false")) }')
    mem_met=$(awk -v m="${MT[hikkoshi]}" 'BEGIN { print (m == "null" ? "null" : (m + 0 < 150 ? "true" : "false")) }')

    # ---- table
    local out
    out=$(
        echo
        echo "== dataset $ds ($src_pretty on PostgreSQL $SRC_VERSION -> $DST_VERSION, --jobs $JOBS, $RUNS runs)"
        printf '%-4s %-3s %-20s %10s %14s %14s  %s\n' run pos tool "wall s" "peak tree MB" "max proc MB" "note"
        while IFS=$'\t' read -r r pos tool wall tree proc dump restore status; do
            local note=
            [[ $tool == pg_dump_restore && $dump != null ]] && note="dump ${dump}s + restore ${restore}s"
            [[ $status != ok ]] && note="$note ${status^^}"
            printf '%-4s %-3s %-20s %10s %14s %14s  %s\n' "$r" "$pos" "${LABEL[$tool]}" "$wall" "$tree" "$proc" "$note"
        done <"$results"
        echo
        printf '%-24s %10s %14s %14s\n' median "wall s" "peak tree MB" "max proc MB"
        for tool in "${TOOLS[@]}"; do
            local extra=
            [[ $tool == pg_dump_restore ]] && extra="  dump ${md}s + restore ${mr}s"
            printf '%-24s %10s %14s %14s%s\n' "${LABEL[$tool]}" "${MW[$tool]}" "${MT[$tool]}" "${MP[$tool]}" "$extra"
        done
        echo
        printf '%-34s %8s %16s\n' ratio wall "peak tree RSS"
        printf '%-34s %8s %16s   %s\n' "hikkoshi / pgcopydb" "$rw_c" "$rm_c" "(target: wall <= 0.9)"
        printf '%-34s %8s %16s\n' "hikkoshi / (pg_dump+pg_restore)" "$rw_d" "$rm_d"
        printf '%-34s %8s\n' "hikkoshi / raw limit" "$rw_r"
        echo "hikkoshi peak memory: ${MT[hikkoshi]} MB for the process tree, ${MP[hikkoshi]} MB for its largest process (target: < 150 MB)"
        echo "results: $json"
    )
    echo "$out"
    SUMMARY+=("$out")

    # ---- JSON
    {
        printf '{\n  "benchmark": "clone",\n  "dataset": %s,\n  "timestamp": %s,\n' "$(jstr "$ds")" "$(jstr "$STAMP")"
        printf '  "machine": {"host": %s, "cpus": %s, "memory_mb": %s},\n' "$(jstr "$(hostname)")" "$(nproc)" \
            "$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)"
        printf '  "params": {"scale": %s, "json_scale": %s, "runs": %s, "jobs": %s, "chunk_size": %s},\n' \
            "$SCALE" "$(awk -v f="$JSON_SCALE" 'BEGIN { print f + 0 }')" "$RUNS" "$JOBS" "$(jstr "$CHUNK_SIZE")"
        printf '  "versions": {"source": %s, "target": %s, "hikkoshi": %s, "pgcopydb": %s, "pg_dump": %s},\n' \
            "$(jstr "$SRC_VERSION")" "$(jstr "$DST_VERSION")" "$(jstr "$HIKKOSHI_VERSION")" "$(jstr "$PGCOPYDB_VERSION")" \
            "$(jstr "$PG_DUMP_VERSION")"
        printf '  "source_database_bytes": %s,\n' "$src_bytes"
        printf '  "memory_note": %s,\n' "$(jstr "peak_tree_rss_mb: peak of the summed RSS of the tool and its child processes, sampled every 100 ms (shared pages count once per process); max_process_rss_mb: peak RSS of its largest single process ($RSS_METHOD). pg_dump_restore: wall is the sum of both steps, memory the larger of the two.")"
        echo '  "runs": ['
        local n=0 total
        total=$(wc -l <"$results")
        while IFS=$'\t' read -r r pos tool wall tree proc dump restore status; do
            n=$((n + 1))
            printf '    {"run": %s, "position": %s, "tool": %s, "wall_s": %s, "peak_tree_rss_mb": %s, "max_process_rss_mb": %s, "pg_dump_s": %s, "pg_restore_s": %s, "status": %s}%s\n' \
                "$r" "$pos" "$(jstr "$tool")" "$wall" "$tree" "$proc" "$dump" "$restore" "$(jstr "$status")" \
                "$([[ $n -lt $total ]] && echo ,)"
        done <"$results"
        echo '  ],'
        echo '  "median": {'
        printf '    "hikkoshi": {"wall_s": %s, "peak_tree_rss_mb": %s, "max_process_rss_mb": %s},\n' "${MW[hikkoshi]}" "${MT[hikkoshi]}" "${MP[hikkoshi]}"
        printf '    "pgcopydb": {"wall_s": %s, "peak_tree_rss_mb": %s, "max_process_rss_mb": %s},\n' "${MW[pgcopydb]}" "${MT[pgcopydb]}" "${MP[pgcopydb]}"
        printf '    "pg_dump_restore": {"wall_s": %s, "peak_tree_rss_mb": %s, "max_process_rss_mb": %s, "pg_dump_s": %s, "pg_restore_s": %s},\n' \
            "${MW[pg_dump_restore]}" "${MT[pg_dump_restore]}" "${MP[pg_dump_restore]}" "$md" "$mr"
        printf '    "raw_limit": {"wall_s": %s, "peak_tree_rss_mb": %s, "max_process_rss_mb": %s}\n' "${MW[raw_limit]}" "${MT[raw_limit]}" "${MP[raw_limit]}"
        echo '  },'
        echo '  "ratios": {'
        printf '    "hikkoshi/pgcopydb": {"wall": %s, "peak_tree_rss": %s},\n' "$rw_c" "$rm_c"
        printf '    "hikkoshi/pg_dump_restore": {"wall": %s, "peak_tree_rss": %s},\n' "$rw_d" "$rm_d"
        printf '    "hikkoshi/raw_limit": {"wall": %s}\n' "$rw_r"
        echo '  },'
        printf '  "targets": {"wall_vs_pgcopydb_max": 0.9, "peak_rss_mb_max": 150, "wall_met": %s, "memory_met": %s}\n' "$wall_met" "$mem_met"
        echo '}'
    } >"$json"

    # the source dataset is not needed any more (unless the servers are kept)
    [[ $KEEP == 1 ]] || src_psql postgres -c "DROP DATABASE $srcdb WITH (FORCE)"
}

for ds in "${DATASETS[@]}"; do
    bench_dataset "$ds"
done

if ((${#DATASETS[@]} > 1)); then
    echo
    echo "================ summary"
    printf '%s\n' "${SUMMARY[@]}"
fi
