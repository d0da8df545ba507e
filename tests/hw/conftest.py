"""Shared by the hardware suites: the strict ``check`` fixture."""

from __future__ import annotations

import pytest
from checks import Check

from harness.check.engine import CheckReport
from harness.check.scenario import Scenario


@pytest.fixture
def check(check_scenario: Check) -> Check:
    """The plugin's check_scenario, asserting that something was checked and all of it matched."""

    def run(sc: Scenario) -> CheckReport:
        rep = check_scenario(sc)
        assert rep.checked > 0
        assert rep.ok, rep.text()
        return rep

    return run
