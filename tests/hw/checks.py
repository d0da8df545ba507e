"""Shared by the hardware suites: the check callable's type and parametrize ids."""

from __future__ import annotations

from collections.abc import Callable

from harness.arch.geometry import Granule
from harness.check.engine import CheckReport
from harness.check.scenario import Scenario

Check = Callable[[Scenario], CheckReport]


def ids(v: object) -> str:
    """pytest ids: granules by their label, everything else as text."""
    return v.label if isinstance(v, Granule) else str(v)
