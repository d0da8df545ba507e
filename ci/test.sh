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
junit="${HARNESS_JUNIT:-logs/junit.xml}"
status=0
"$venv/bin/python" -m pytest -n "$jobs" --junitxml="$junit" "$@" || status=$?
if [ "$status" = 5 ]; then
    echo "ci/test.sh: pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
if [ "$status" != 0 ]; then exit "$status"; fi
# A run that passed must have run something (exit 0 with every test skipped or deselected is not a pass).
"$venv/bin/python" - "$junit" <<'PY'
import sys
import xml.etree.ElementTree as ET

totals = [sum(int(s.get(k, 0)) for s in ET.parse(sys.argv[1]).getroot().iter("testsuite"))
          for k in ("tests", "skipped")]
ran = totals[0] - totals[1]
print(f"ci/test.sh: {totals[0]} tests, {ran} ran, {totals[1]} skipped")
sys.exit(0 if ran > 0 else 1)
PY
