#!/usr/bin/env bash
# Fetch Debian's arm64 Linux 6.12 kernel (a real hypervisor for `harness attach` and the kernel
# tests) and unpack it into .cache/kernel/, idempotently: quick when it is already there.
#
#   .cache/kernel/boot/vmlinuz-VERSION      the kernel QEMU boots (-kernel)
#   .cache/kernel/boot/System.map-VERSION   its symbols (hyp text checked against the decode): the
#                                           image package ships a placeholder; the real one is the
#                                           first file of the matching -dbg package (~1 GB download,
#                                           ~10 s here; only System.map is kept)
#   .cache/kernel/boot/config-VERSION       its configuration (CONFIG_KVM, VA/PA bits)
#   .cache/kernel/PACKAGE                   name=version of the unpacked package
#
# The package comes through apt as a foreign architecture (dpkg --add-architecture arm64); it is
# downloaded and unpacked, never installed. HARNESS_KERNEL_PACKAGE=NAME picks another package
# (e.g. linux-image-6.12.117+deb12-arm64-16k-unsigned); HARNESS_SKIP_KERNEL=1 skips the fetch.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest="${HARNESS_KERNEL_DIR:-$root/.cache/kernel}"

log_prefix=kernel
# shellcheck source=ci/lib.sh
source "$root/ci/lib.sh"

[ "${HARNESS_SKIP_KERNEL:-0}" = 1 ] && { log "skipped (HARNESS_SKIP_KERNEL=1)"; exit 0; }

have_kernel() {
    compgen -G "$dest/boot/vmlinuz-*" >/dev/null && compgen -G "$dest/boot/System.map-*" >/dev/null \
        && compgen -G "$dest/boot/config-*" >/dev/null && [ -s "$dest/PACKAGE" ]
}

want="${HARNESS_KERNEL_PACKAGE:-}"
if have_kernel && { [ -z "$want" ] || grep -q "^$want=" "$dest/PACKAGE"; }; then
    log "cached: $(cat "$dest/PACKAGE")"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    log "adding the arm64 foreign architecture"
    as_root dpkg --add-architecture arm64
    as_root apt-get update -q
fi

candidate() { apt-cache policy "$1:arm64" 2>/dev/null | awk '/Candidate:/ {print $2}'; }

newest_package() {
    # The newest generic 6.12 arm64 image (4K pages) that apt can fetch.
    apt-cache search --names-only '^linux-image-6\.12' | awk '{print $1}' \
        | grep -E '^linux-image-6\.12\.[0-9]+\+[^-]+-arm64-unsigned$' | sort -V -r \
        | while read -r p; do
            c=$(candidate "$p")
            if [ -n "$c" ] && [ "$c" != "(none)" ]; then echo "$p"; break; fi
        done
}

pkg="$want"
[ -n "$pkg" ] || pkg=$(newest_package)
if [ -z "$pkg" ]; then
    as_root apt-get update -q
    pkg=$(newest_package)
fi
[ -n "$pkg" ] || { log "no linux-image-6.12.*-arm64-unsigned package for arm64 in the apt sources"; exit 1; }
ver=$(candidate "$pkg")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 777 "$tmp"   # apt's download sandbox user must be able to write there
log "downloading $pkg=$ver (arm64)"
(cd "$tmp" && apt-get download -q "$pkg:arm64=$ver" >/dev/null)
deb=$(compgen -G "$tmp/*.deb" | head -n1)
[ -n "$deb" ] || { log "apt-get download left no .deb"; exit 1; }

log "unpacking into $dest"
stage="$dest.new.$$"
rm -rf "$stage"
mkdir -p "$stage"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$stage" ./boot
for f in vmlinuz System.map config; do
    compgen -G "$stage/boot/$f-*" >/dev/null || { log "$pkg has no boot/$f-*"; rm -rf "$stage"; exit 1; }
done
rm -f "$tmp"/*.deb

# Debian's image package carries a one-line placeholder System.map; the real one opens the -dbg
# package's data archive, so only the start of the stream is decompressed.
map=$(compgen -G "$stage/boot/System.map-*" | head -n1)
if [ "$(wc -l < "$map")" -lt 1000 ]; then
    dbg="${pkg%-unsigned}-dbg"
    log "downloading $dbg=$ver (arm64) for the real System.map"
    (cd "$tmp" && apt-get download -q "$dbg:arm64=$ver" >/dev/null)
    dbgdeb=$(compgen -G "$tmp/*.deb" | head -n1)
    [ -n "$dbgdeb" ] || { log "apt-get download $dbg left no .deb"; rm -rf "$stage"; exit 1; }
    { dpkg-deb --fsys-tarfile "$dbgdeb" 2>/dev/null || true; } | python3 -c '
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|*") as tar:
    for member in tar:
        if member.isfile() and "/boot/System.map-" in member.name:
            data = tar.extractfile(member).read()
            open(sys.argv[1], "wb").write(data)
            sys.exit(0)
sys.exit("no boot/System.map-* in the -dbg package")
' "$map.real"
    mv "$map.real" "$map"
    rm -f "$dbgdeb"
fi
echo "$pkg=$ver" > "$stage/PACKAGE"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$stage" "$dest"
log "ready: $(cat "$dest/PACKAGE"): $(cd "$dest/boot" && ls vmlinuz-*)"
