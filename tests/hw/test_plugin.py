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
    skipped.stdout.fnmatch_lines(["*HARNESS_QEMU=/nonexistent/qemu-system-aarch64 is not an executable file*"])
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


KINDS = """
import pytest
from harness.check.engine import CheckReport
from harness.check.scenario import ScenarioError
from harness.pytestplugin.reporter import record_check
from harness.target.errors import QemuExited

def test_machinery():
    raise QemuExited("boot", 1, "", "")

def test_bad_input():
    raise ScenarioError("maps[0].size: expected a size > 0")

def test_mismatch(request):
    record_check(request.node, CheckReport("demo", "stage 2", "10.0.2", mismatched=1))
    assert False, "the check failed"

def test_own_assertion(request):
    record_check(request.node, CheckReport("demo", "stage 2", "10.0.2", matched=4))
    assert 1 == 2
"""


def test_failure_kinds_are_reported_distinctly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(KINDS)
    junit = pytester.path / "junit.xml"
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--junitxml={junit}")
    res.assert_outcomes(failed=4)
    xml = junit.read_text()
    for test, kind in (("test_machinery", "machinery"), ("test_bad_input", "bad input"),
                       ("test_mismatch", "mismatch"), ("test_own_assertion", "test")):
        case = xml[xml.index(f'name="{test}"'):]
        case = case[: case.index("</testcase>")]
        assert f'<property name="pgtable-harness failure" value="{kind}"' in case, case
    res.stdout.fnmatch_lines(["*pgtable-harness failure kind*", "machinery"])
