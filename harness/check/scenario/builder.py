"""Scenario -> model table: the one route from a scenario to the tables the MMU walks.

The pool sits at the target's pool address; the regions the firmware itself relies on are mapped
first (identity), exactly as KVM maps the hypervisor's own text into its tables; then the
scenario's maps, then its operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from harness.arch.geometry import Geometry, GeometryError, Stage
from harness.check.scenario.data import KERNEL_ONLY_OPS, OPS, MapSpec, OpSpec, Scenario, ScenarioError
from harness.core.memory import PagePool
from harness.core.pgtable import KvmPgtable, PgtableError, Stage2Pgtable
from harness.core.prot import Prot
from harness.core.walker import UPSTREAM_RULES, WalkRules


class RegionLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def base(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def prot(self) -> Prot: ...


class LayoutLike(Protocol):
    """What a scenario needs of the target's memory map."""

    @property
    def pool_base(self) -> int: ...
    @property
    def pool_size(self) -> int: ...
    def stage1_regions(self) -> Sequence[RegionLike]: ...
    def stage2_regions(self) -> Sequence[RegionLike]: ...


@dataclass(frozen=True)
class PoolOnlyLayout:
    """A memory map with a page pool and no firmware: tables for the model alone (benchmarks,
    offline decoding), with nothing of the payload's own to keep mapped."""

    pool_base: int
    pool_size: int

    def stage1_regions(self) -> Sequence[RegionLike]:
        return ()

    def stage2_regions(self) -> Sequence[RegionLike]:
        return ()


@dataclass
class BuiltScenario:
    """A scenario modelled: its table (in its page pool) and the firmware regions mapped into it."""

    scenario: Scenario
    table: KvmPgtable
    pool: PagePool
    regions: list[RegionLike] = field(default_factory=list)


def build(scenario: Scenario, layout: LayoutLike, rules: WalkRules = UPSTREAM_RULES,
          apply_ops: bool = True) -> BuiltScenario:
    """Model the scenario: pool at the layout's pool address, firmware regions, maps, ops.

    ``rules``: which upstream walker fixes the table operations apply (the review compares the
    posted v3 walker with the fixed one). ``apply_ops`` False: the tables before the operations
    (a live check applies them one by one, :mod:`harness.check.live`)."""
    try:
        geom = scenario.geometry()
    except GeometryError as e:
        raise ScenarioError(f"{scenario.name}: {e}") from e
    pool = PagePool(layout.pool_base, layout.pool_size, geom.granule.size)
    table = empty_table(pool, geom, rules)
    regions = firmware_regions(scenario, geom, layout)
    for r in regions:
        try:
            table.map(r.base, r.size, r.base, r.prot)
        except PgtableError as e:
            raise ScenarioError(f"{scenario.name}: firmware region {r.name}: {e}") from e
    for i, m in enumerate(scenario.maps):
        refuse_firmware_overlap(scenario, i, m, regions)
        try:
            table.map(m.addr, m.size, m.pa, m.prot)
        except PgtableError as e:
            raise ScenarioError(f"{scenario.name}: maps[{i}]: {m.describe()}: {e}") from e
    for i, o in enumerate(scenario.ops if apply_ops else ()):
        apply_op(table, o, f"{scenario.name}: ops[{i}]")
    return BuiltScenario(scenario, table, pool, list(regions))


def empty_table(pool: PagePool, geom: Geometry, rules: WalkRules = UPSTREAM_RULES) -> KvmPgtable:
    """The table KVM would create for the geometry: hyp stage 1 (nVHE or hVHE) or guest stage 2."""
    return KvmPgtable.for_geometry(geom, pool, rules)


def firmware_regions(scenario: Scenario, geom: Geometry, layout: LayoutLike) -> list[RegionLike]:
    """The identity-mapped regions the firmware needs in this scenario's input range."""
    regions = list(layout.stage1_regions() if geom.stage is Stage.S1 else layout.stage2_regions())
    needed: list[RegionLike] = []
    for r in regions:
        if r.base + r.size <= geom.limit:
            needed.append(r)
        elif geom.stage is Stage.S1 or scenario.access:
            raise ScenarioError(
                f"{scenario.name}: ia_bits: the firmware's {r.name} region at {r.base:#x} must be "
                f"identity-mapped; a stage-{int(geom.stage)} input size of at least "
                f"{(r.base + r.size - 1).bit_length()} bits is needed"
                f"{' for real-access probes' if geom.stage is Stage.S2 else ''}, got {geom.ia_bits}"
            )
        # else: only real accesses need the EL1 stub; AT probes run at EL2
    return needed


def refuse_firmware_overlap(scenario: Scenario, index: int, m: MapSpec, regions: Sequence[RegionLike]) -> None:
    for r in regions:
        if m.addr < r.base + r.size and r.base < m.end:
            raise ScenarioError(
                f"{scenario.name}: maps[{index}]: {m.describe()} overlaps the firmware's {r.name} region "
                f"[{r.base:#x}, {r.base + r.size:#x}), which stays identity-mapped "
                f"{'for the EL1 probe stub' if scenario.stage is Stage.S2 else 'for the EL2 payload'}")


def apply_op(table: KvmPgtable, o: OpSpec, where: str = "scenario") -> None:
    try:
        if o.op == "unmap":
            table.unmap(o.addr, o.size)
            return
        if o.op == "get_leaf":
            table.get_leaf(o.addr)
            return
        if o.op in KERNEL_ONLY_OPS:
            raise ScenarioError(f"{where}.op: {o.op} runs only on a kernel tree's own code "
                                "(harness kernel-pgtable --scenario); the model's tables have no such operation")
        if not isinstance(table, Stage2Pgtable):
            raise ScenarioError(f"{where}.op: {o.op} is a stage-2 operation")
        if o.op == "wrprotect":
            table.wrprotect(o.addr, o.size)
        elif o.op == "mkold":
            table.mkold(o.addr)
        elif o.op == "mkyoung":
            table.mkyoung(o.addr)
        elif o.op == "relax_perms":
            table.relax_perms(o.addr, o.prot)
        else:
            raise ScenarioError(f"{where}.op: unknown operation {o.op!r}; expected one of {', '.join(OPS)}")
    except PgtableError as e:
        raise ScenarioError(f"{where}: {o.describe()}: {e}") from e
