"""Shared by the hardware suites: the check callable's type and parametrize ids."""

from __future__ import annotations

from collections.abc import Callable

from harness.arch.geometry import Granule
from harness.check.engine import CheckReport
from harness.check.scenario import OpSpec, Scenario
from harness.core.prot import Prot

Check = Callable[[Scenario], CheckReport]


def ids(v: object) -> str:
    """pytest ids: granules by their label, everything else as text."""
    return v.label if isinstance(v, Granule) else str(v)


def stage2_page_ops(g: int) -> tuple[OpSpec, ...]:
    """The stage-2 operations both suites apply to pages mapped at 0x1000_0000 (granule ``g``):
    write-protect, age and rejuvenate, unmap a run, write-protect then relax again."""
    base = 0x1000_0000
    return (
        OpSpec("wrprotect", base, 8 * g),
        OpSpec("mkold", base + 16 * g),
        OpSpec("mkold", base + 17 * g),
        OpSpec("mkyoung", base + 17 * g),
        OpSpec("unmap", base + 20 * g, 3 * g),
        OpSpec("wrprotect", base + 30 * g, g),
        OpSpec("relax_perms", base + 30 * g, prot=Prot.W),
    )
