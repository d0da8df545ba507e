"""Shared by the hardware tests: the strict ``check`` fixture and ``any_qemu``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from checks import Check

from harness.check.engine import CheckReport
from harness.check.scenario import Scenario
from harness.target.target import Target


@pytest.fixture
def check(check_scenario: Check) -> Check:
    """The plugin's check_scenario, asserting that something was checked and all of it matched."""

    def run(sc: Scenario) -> CheckReport:
        rep = check_scenario(sc)
        assert rep.checked > 0
        assert rep.ok, rep.text()
        return rep

    return run


@pytest.fixture(params=["reference", "qemu-7.2"])
def any_qemu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    """The session's reference QEMU (10.0), then Debian 12's QEMU 7.2 booted for the test alone."""
    if request.param == "qemu-7.2":
        monkeypatch.setenv("HARNESS_QEMU", request.getfixturevalue("legacy_qemu"))
        with Target.start() as t:
            yield t
    else:
        yield request.getfixturevalue("target")
