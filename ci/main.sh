#!/usr/bin/env bash
# The main job: set up, then model every granule and both stages, install the tables on
# QEMU's MMU and check every prediction (`harness run`). Extra arguments go to `harness run`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash ci/setup.sh
venv="${HARNESS_VENV:-$root/.venv}"
exec "$venv/bin/harness" run "$@"
