#!/usr/bin/env bash
# Fetch Debian's Linux source trees (linux-source-6.12 and linux-source-6.1) and unpack them, so
# that the kernel's own arch/arm64/kvm/hyp/pgtable.c can be built out of tree (harness.kernel),
# idempotently: quick when they are already there.
#
#   .cache/linux-source/6.12/linux-source-6.12/   the unpacked tree (read-only use: builds go to O=)
#   .cache/linux-source/6.12/PACKAGE              name=version of the package it came from
#   .cache/linux-source/6.1/...                   likewise
#
# The packages (architecture `all`, in Debian 12's apt sources: bookworm-security and bookworm)
# are downloaded and unpacked, never installed; each one's /usr/src/linux-source-X.tar.xz is
# streamed out of the .deb straight into tar. Each tree is unpacked into a stage directory that is
# moved into place whole, PACKAGE included, so a killed run leaves nothing that looks complete.
# HARNESS_KSOURCE_DIR overrides .cache/linux-source; HARNESS_SKIP_KSOURCE=1 skips the fetch.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest="${HARNESS_KSOURCE_DIR:-$root/.cache/linux-source}"
series_all=(6.12 6.1)

log_prefix=ksource
# shellcheck source=ci/lib.sh
source "$root/ci/lib.sh"

[ "${HARNESS_SKIP_KSOURCE:-0}" = 1 ] && { log "skipped (HARNESS_SKIP_KSOURCE=1)"; exit 0; }

have_tree() {
    [ -s "$dest/$1/PACKAGE" ] && [ -f "$dest/$1/linux-source-$1/Makefile" ] \
        && [ -f "$dest/$1/linux-source-$1/arch/arm64/kvm/hyp/pgtable.c" ]
}

todo=()
for s in "${series_all[@]}"; do
    if have_tree "$s"; then log "cached: $(cat "$dest/$s/PACKAGE")"; else todo+=("$s"); fi
done
[ "${#todo[@]}" -gt 0 ] || exit 0

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
known() { local c; c=$(candidate "$1"); [ -n "$c" ] && [ "$c" != "(none)" ]; }

export DEBIAN_FRONTEND=noninteractive
for s in "${todo[@]}"; do
    known "linux-source-$s" || { as_root apt-get update -q; break; }
done

tmp=$(mktemp -d)
stages=()
cleanup() { rm -rf "$tmp" "${stages[@]}"; }
trap cleanup EXIT
chmod 777 "$tmp"   # apt's download sandbox user must be able to write there

specs=()
for s in "${todo[@]}"; do
    pkg="linux-source-$s"
    known "$pkg" || { log "no $pkg package in the apt sources (Debian 12: bookworm-security, bookworm)"; exit 1; }
    specs+=("$pkg=$(candidate "$pkg")")
done
log "downloading ${specs[*]}"
(cd "$tmp" && apt-get download -q "${specs[@]}" >/dev/null)

mkdir -p "$dest"
for old in "$dest"/*.new.*; do  # stage directories of killed runs (their process is gone)
    [ -d "$old" ] || continue
    kill -0 "${old##*.new.}" 2>/dev/null || { log "removing $old (left by a killed run)"; rm -rf "$old"; }
done
unpack() {  # series, package=version: the tree into a stage directory, then moved into place
    local s=$1 spec=$2 deb stage
    deb=$(compgen -G "$tmp/linux-source-${s}_*.deb" | head -n1)
    [ -n "$deb" ] || { log "apt-get download left no linux-source-${s}_*.deb"; return 1; }
    stage="$dest/$s.new.$$"
    rm -rf "$stage"
    mkdir -p "$stage"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -O "./usr/src/linux-source-$s.tar.xz" | tar -xJ -C "$stage"
    [ -f "$stage/linux-source-$s/Makefile" ] || { log "$deb: no linux-source-$s/Makefile in its tarball"; return 1; }
    echo "$spec" > "$stage/PACKAGE"
    rm -rf "$dest/$s"
    mv "$stage" "$dest/$s"
    log "ready: $spec in $dest/$s/linux-source-$s"
}

pids=()
for i in "${!todo[@]}"; do
    s=${todo[$i]}
    stages+=("$dest/$s.new.$$")
    log "unpacking ${specs[$i]} into $dest/$s"
    unpack "$s" "${specs[$i]}" &
    pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
[ "$failed" = 0 ] || { log "unpacking failed (see above)"; exit 1; }
