"""Scenario data: a regime (stage, granule, sizes), the mappings to make, the operations to apply.

Plain frozen values; :mod:`.parse` makes them from JSON/TOML/dicts (strictly), :mod:`.catalogue`
holds the built-in ones, :mod:`.builder` turns one into a model table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from harness.arch.geometry import Geometry, Granule, Stage
from harness.core.prot import Prot
from harness.errors import InputError


class ScenarioError(InputError):
    """A scenario that cannot be built; the message names the key."""


@dataclass(frozen=True)
class MapSpec:
    addr: int
    size: int
    pa: int
    prot: Prot = Prot.RW

    @property
    def end(self) -> int:
        return self.addr + self.size

    def describe(self) -> str:
        return f"map [{self.addr:#x}, {self.end:#x}) -> {self.pa:#x} {self.prot.label()}"


OPS = ("unmap", "wrprotect", "mkold", "mkyoung", "relax_perms", "get_leaf", "split")
KERNEL_ONLY_OPS = ("split",)  # run by a kernel tree's code (harness kernel-pgtable), not the strict model


@dataclass(frozen=True)
class OpSpec:
    """An operation applied after the mappings: unmap/wrprotect/split take addr+size; mkold, mkyoung,
    get_leaf and relax_perms (with prot) act on the leaf mapping addr. All but unmap and get_leaf
    are stage 2 only; split only runs on a kernel tree's code (``harness kernel-pgtable``)."""

    op: str
    addr: int
    size: int = 0
    prot: Prot = Prot.NONE

    def describe(self) -> str:
        extra = f" size {self.size:#x}" if self.size else ""
        extra += f" {self.prot.label()}" if self.prot else ""
        return f"{self.op} {self.addr:#x}{extra}"


@dataclass(frozen=True)
class Scenario:
    name: str
    stage: Stage
    granule: Granule
    ia_bits: int
    pa_bits: int | None = None
    start_level: int | None = None
    maps: tuple[MapSpec, ...] = ()
    ops: tuple[OpSpec, ...] = ()
    access: bool = False  # also probe with real loads and stores
    sample: int | None = None  # probe at most this many mapped pages (plus the edges)
    lpa2: bool = False  # FEAT_LPA2: TCR/VTCR.DS = 1
    e2h: bool = False  # stage 1 in the EL2&0 regime (HCR_EL2.E2H = 1)

    def geometry(self) -> Geometry:
        return Geometry.create(self.stage, self.granule, self.ia_bits, self.pa_bits, self.start_level,
                               lpa2=self.lpa2, e2h=self.e2h)

    def describe(self) -> str:
        return f"{self.name}: {self.geometry().describe()}"


def with_options(sc: Scenario, access: bool | None = None, sample: int | None = None, lpa2: bool | None = None,
                 e2h: bool | None = None) -> Scenario:
    """The scenario with the given options replaced (None: keep the scenario's own)."""
    if access is None and sample is None and lpa2 is None and e2h is None:
        return sc
    out = dataclasses.replace(
        sc, access=sc.access if access is None else access, sample=sc.sample if sample is None else sample,
        lpa2=sc.lpa2 if lpa2 is None else lpa2, e2h=sc.e2h if e2h is None else e2h)
    out.geometry()  # refuse a combination the architecture (or the model) does not allow, by name
    return out
