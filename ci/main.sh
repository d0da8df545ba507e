#!/usr/bin/env bash
# The main job: set up, then model every granule and both stages, install the tables on
# QEMU's MMU and check every prediction (`harness run`; extra arguments go to it), then Debian's
# 6.12 and 6.1 trees' own pgtable.c at EL2, every configuration, operation by operation
# (`harness kernel-pgtable`). The exit status is the first failing step's.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash ci/setup.sh
venv="${HARNESS_VENV:-$root/.venv}"
"$venv/bin/harness" run "$@"
for series in 6.12 6.1; do
    "$venv/bin/harness" kernel-pgtable --debian "$series"
done
