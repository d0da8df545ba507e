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


FAILING_CHECK = """
import pytest
from harness.arch.geometry import Granule, Stage
from harness.check.scenario import SCRATCH, MapSpec, Scenario
from harness.core.prot import Prot

@pytest.mark.hw
def test_fails_after_a_check(check_scenario):
    rep = check_scenario(Scenario("demo", Stage.S2, Granule.K4, 40, 48,
                                  maps=(MapSpec(0x10000000, 0x2000, SCRATCH, Prot.R),)))
    assert rep.ok
    assert rep.checked == -1, "deliberate failure"
"""


@pytest.mark.hw
def test_failure_report_carries_the_mismatch_report_and_serial_log(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(FAILING_CHECK)
    junit = pytester.path / "junit.xml"
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--junitxml={junit}")
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines([
        "*QEMU command: qemu-system-aarch64*",
        "*pgtable-harness serial console (tail)*",
        "*pgtable-harness firmware: EL2*",
        "*pgtable-harness mismatch report*",
        "OK demo: * matched*",
    ])
    xml = junit.read_text()
    assert 'name="mismatch report"' in xml and 'name="console log"' in xml
