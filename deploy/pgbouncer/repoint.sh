#!/bin/sh
# hikkoshi-pgbouncer-repoint: a cutover hook that points a PgBouncer database entry at the new primary.
#
#   --hook 'hikkoshi-pgbouncer-repoint /etc/pgbouncer/hikkoshi.ini app'
#   --hook 'hikkoshi-pgbouncer-repoint FILE NAME [EXTRA]'
#
# FILE is an include file of pgbouncer.ini that holds only this entry (pgbouncer.ini has, under
# [databases], the line `%include FILE`). The script rewrites it as
#
#   [databases]
#   NAME = host=$HIKKOSHI_NEW_PRIMARY_HOST port=$HIKKOSHI_NEW_PRIMARY_PORT dbname=$HIKKOSHI_NEW_PRIMARY_DBNAME EXTRA
#
# atomically (a new file renamed over the old one), keeping the old one as FILE.before-hikkoshi. EXTRA is
# appended as given (for example `auth_user=pgbouncer pool_mode=transaction`); no password is written. Then,
# when PGBOUNCER_ADMIN_URL is set and psql is there, it sends RELOAD; `hikkoshi cutover --pgbouncer` sends
# RELOAD itself before RESUME, so neither is needed with it.
#
# On an undo, hikkoshi runs the hook again with the old primary in HIKKOSHI_NEW_PRIMARY_*: the entry
# points back.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 FILE NAME [EXTRA]" >&2; exit 2; }
file=$1 name=$2 extra=${3:-}
: "${HIKKOSHI_NEW_PRIMARY_HOST:?run by hikkoshi as a --hook: HIKKOSHI_NEW_PRIMARY_HOST is not set}"
dir=$(dirname "$file")
tmp=$(mktemp "$dir/.hikkoshi-repoint.XXXXXX")
trap 'rm -f "$tmp"' EXIT
{
    echo "; written by hikkoshi-pgbouncer-repoint, $HIKKOSHI_STEP of migration ${HIKKOSHI_MIGRATION_ID:-?}"
    echo "[databases]"
    echo "$name = host=$HIKKOSHI_NEW_PRIMARY_HOST port=$HIKKOSHI_NEW_PRIMARY_PORT dbname=$HIKKOSHI_NEW_PRIMARY_DBNAME${extra:+ $extra}"
} >"$tmp"
if [ -f "$file" ]; then
    cp -p "$file" "$file.before-hikkoshi"
    # (stat -c works with GNU coreutils and BusyBox alike; --reference does not exist in BusyBox)
    chmod "$(stat -c %a "$file")" "$tmp"
    chown "$(stat -c %u:%g "$file")" "$tmp" 2>/dev/null || true
else
    chmod 644 "$tmp"
fi
mv -f "$tmp" "$file"
trap - EXIT
echo "hikkoshi-pgbouncer-repoint: $name -> $HIKKOSHI_NEW_PRIMARY_HOST:$HIKKOSHI_NEW_PRIMARY_PORT/$HIKKOSHI_NEW_PRIMARY_DBNAME in $file"
if [ -n "${PGBOUNCER_ADMIN_URL:-}" ] && command -v psql >/dev/null 2>&1; then
    psql -X -q -d "$PGBOUNCER_ADMIN_URL" -c RELOAD
fi
