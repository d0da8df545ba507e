#!/usr/bin/env bash
# The whole test suite: set-up, lint, type check, every test (hardware-backed ones included).
# Extra arguments go to pytest (e.g. `bash ci/test.sh -m hw -x`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash ci/setup.sh
venv="${HARNESS_VENV:-$root/.venv}"
# In CI, a missing QEMU / toolchain is an error, never a skip.
if [ "${CI:-}" = "true" ]; then export HARNESS_REQUIRE_HW=1; fi
echo "== ruff"; "$venv/bin/ruff" check harness tests
echo "== mypy --strict"; "$venv/bin/mypy" --strict harness
echo "== pytest"
jobs=$(nproc 2>/dev/null || echo 2)
"$venv/bin/python" -m pytest -n "$jobs" --junitxml="${HARNESS_JUNIT:-logs/junit.xml}" "$@"
