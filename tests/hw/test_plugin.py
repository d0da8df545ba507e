"""The pytest plugin: hw tests skip without tools, and are errors with --require-hw."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

HW_TEST = """
import pytest

@pytest.mark.hw
def test_needs_hw():
    pass
"""


def test_missing_tool_skips_or_errors(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_QEMU", "/nonexistent/qemu-system-aarch64")
    monkeypatch.delenv("HARNESS_REQUIRE_HW", raising=False)
    pytester.makepyfile(HW_TEST)
    skipped = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*nonexistent/qemu-system-aarch64 is not on PATH*"])
    required = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--require-hw")
    required.assert_outcomes(errors=1)
    monkeypatch.setenv("HARNESS_REQUIRE_HW", "1")
    by_env = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    by_env.assert_outcomes(errors=1)
