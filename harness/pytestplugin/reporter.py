"""What a failing test's report says: the target (console log, QEMU command line), the serial
console's tail, every check report, and which kind of failure it was:

* ``mismatch``: a check found the model and the MMU disagreeing (the CLI's exit 1);
* ``machinery``: the target or a tool failed (a :class:`~harness.errors.MachineryError`, exit 3);
* ``bad input``: a scenario or argument the harness refused (an :class:`~harness.errors.InputError`);
* ``test``: the test's own assertion, with every check it ran matching.

The kind is a report section and a JUnit user property (:data:`FAILURE_KIND_KEY`).
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from harness.check.engine import CheckReport
from harness.errors import InputError, MachineryError

TARGET_INFO_KEY = pytest.StashKey[dict[str, str]]()
CHECK_REPORTS_KEY = pytest.StashKey[list[CheckReport]]()
MISMATCH_REPORT_KEY = "mismatch report"
FAILURE_KIND_KEY = "pgtable-harness failure"


def record_target(item: pytest.Item, info: dict[str, str]) -> None:
    item.stash[TARGET_INFO_KEY] = info
    for k, v in info.items():
        item.user_properties.append((k, v))


def record_check(item: pytest.Item, report: CheckReport) -> None:
    item.stash.setdefault(CHECK_REPORTS_KEY, []).append(report)
    item.user_properties.append((MISMATCH_REPORT_KEY, report.text()))


def failure_kind(item: pytest.Item, call: pytest.CallInfo[None]) -> str:
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, MachineryError):
        return "machinery"
    if isinstance(exc, InputError):
        return "bad input"
    if any(not r.ok for r in item.stash.get(CHECK_REPORTS_KEY, [])):
        return "mismatch"
    return "test"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed:
        return
    kind = failure_kind(item, call)
    report.sections.append(("pgtable-harness failure kind", kind))
    item.user_properties.append((FAILURE_KIND_KEY, kind))  # JUnit XML takes them from the teardown report
    info = item.stash.get(TARGET_INFO_KEY, None)
    if info:
        report.sections.append(("pgtable-harness target", "\n".join(f"{k}: {v}" for k, v in info.items())))
        report.sections.append(("pgtable-harness serial console (tail)", console_tail(Path(info["console log"]))))
    for key, value in item.user_properties:
        if key == MISMATCH_REPORT_KEY:
            report.sections.append(("pgtable-harness mismatch report", str(value)))


def console_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(console log unreadable: {exc})"
