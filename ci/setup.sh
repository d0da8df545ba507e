#!/usr/bin/env bash
# Set up everything pgtable-harness needs on a Debian 12 machine, idempotently:
#   - Debian packages: QEMU 10.0 from bookworm-backports (the reference MMU), the AArch64
#     cross toolchain, gdb-multiarch, Python's venv module;
#   - a virtual environment in .venv with the package and its test extras.
# Quick when everything is already there. Run as root (or with sudo available).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${HARNESS_VENV:-$root/.venv}"

log_prefix=setup
# shellcheck source=ci/lib.sh
source "$root/ci/lib.sh"

deb_packages=(gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu clang lld gdb-multiarch python3 python3-venv flex bison bc make gcc)
backports_list=/etc/apt/sources.list.d/pgtable-harness-backports.list

qemu_major() {
    command -v qemu-system-aarch64 >/dev/null 2>&1 || { echo 0; return; }
    qemu-system-aarch64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

missing=()
for p in "${deb_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
want_qemu=0
[ "$(qemu_major)" -ge 10 ] || want_qemu=1

if [ "${#missing[@]}" -gt 0 ] || [ "$want_qemu" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    if [ "$want_qemu" = 1 ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports (QEMU 10.0)"
        echo 'deb http://deb.debian.org/debian bookworm-backports main' | as_root tee "$backports_list" >/dev/null
    fi
    log "installing Debian packages: ${missing[*]:-} ${want_qemu:+qemu-system-arm}"
    as_root apt-get update -q
    if [ "${#missing[@]}" -gt 0 ]; then
        as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    if [ "$want_qemu" = 1 ]; then
        as_root apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-arm
    fi
fi

# Debian 12's own QEMU 7.2, unpacked beside the tree (not installed): the tests check that the
# harness still runs on it and that its known translation bugs are reported as such.
legacy="$root/.cache/qemu-7.2"
if [ "${HARNESS_SKIP_QEMU72:-0}" != 1 ] && [ ! -x "$legacy/usr/bin/qemu-system-aarch64" ]; then
    log "unpacking Debian 12's QEMU 7.2 into $legacy (reference for the declared QEMU 7.2 divergences)"
    tmp=$(mktemp -d)
    ver=$(apt-cache madison qemu-system-arm | awk '$3 ~ /^1:7\.2/ {print $3; exit}')
    if [ -z "$ver" ]; then as_root apt-get update -q; ver=$(apt-cache madison qemu-system-arm | awk '$3 ~ /^1:7\.2/ {print $3; exit}'); fi
    (cd "$tmp" && apt-get download -q "qemu-system-arm=$ver" >/dev/null 2>&1 || \
        { chmod 777 "$tmp"; apt-get download -q "qemu-system-arm=$ver"; })
    mkdir -p "$legacy" && dpkg -x "$tmp"/qemu-system-arm_*.deb "$legacy"
    rm -rf "$tmp"
fi

# Python environment: reinstall only when pyproject.toml changed.
stamp="$venv/.pgtable-harness-stamp"
want_stamp=$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
    log "creating virtual environment $venv"
    python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
    log "installing pgtable-harness[test] into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test]"
    echo "$want_stamp" > "$stamp"
fi
bash "$root/ci/kernel.sh"  # Debian's arm64 6.12 kernel for the attach tests (.cache/kernel)
bash "$root/ci/ksource.sh"  # Debian's 6.12 and 6.1 source trees for harness.kernel (.cache/linux-source)
log "ready: $(qemu-system-aarch64 --version | head -n1)"
