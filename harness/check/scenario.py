"""Scenarios: a regime (stage, granule, sizes), the mappings to make and operations to apply.

A scenario is plain data (from Python, JSON or TOML). Building one gives a model table in a
page pool at the target's pool address, with the regions the firmware itself relies on mapped
into it first (identity), exactly as KVM maps the hypervisor's own text into its tables.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.arch.geometry import Geometry, GeometryError, Granule, Stage, parse_stage
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable, KvmPgtable, PgtableError, Stage2Pgtable
from harness.core.prot import Prot
from harness.errors import InputError


class ScenarioError(InputError):
    """A scenario that cannot be built; the message names the field."""


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
class MapSpec:
    addr: int
    size: int
    pa: int
    prot: Prot = Prot.RW

    def describe(self) -> str:
        return f"map [{self.addr:#x}, {self.addr + self.size:#x}) -> {self.pa:#x} {self.prot.label()}"


OPS = ("unmap", "wrprotect", "mkold", "mkyoung", "relax_perms")


@dataclass(frozen=True)
class OpSpec:
    """An operation applied after the mappings: unmap/wrprotect take addr+size; mkold, mkyoung
    and relax_perms (with prot) act on the leaf mapping addr. All but unmap are stage 2 only."""

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

    def geometry(self) -> Geometry:
        return Geometry.create(self.stage, self.granule, self.ia_bits, self.pa_bits, self.start_level)

    def label(self) -> str:
        return f"{self.name}: {self.geometry().describe()}"


@dataclass
class Built:
    scenario: Scenario
    table: KvmPgtable
    pool: PagePool
    regions: list[RegionLike] = field(default_factory=list)


MIN_STAGE1_IA_FOR_FIRMWARE = 31


def build(scenario: Scenario, layout: LayoutLike) -> Built:
    """Model the scenario: pool at the layout's pool address, firmware regions, maps, ops."""
    try:
        geom = scenario.geometry()
    except GeometryError as e:
        raise ScenarioError(f"{scenario.name}: {e}") from e
    pool = PagePool(layout.pool_base, layout.pool_size, geom.granule.size)
    table: KvmPgtable
    if geom.stage is Stage.S1:
        table = HypPgtable(pool, geom.granule, geom.ia_bits, geom.pa_bits)
        regions = list(layout.stage1_regions())
    else:
        table = Stage2Pgtable(pool, geom.granule, geom.ia_bits, geom.pa_bits, geom.start_level)
        regions = list(layout.stage2_regions())
    for r in list(regions):
        if r.base + r.size > geom.limit:
            if geom.stage is Stage.S2 and not scenario.access:
                regions.remove(r)  # only real accesses need the EL1 stub; AT probes run at EL2
                continue
            raise ScenarioError(
                f"{scenario.name}: ia_bits: the firmware's {r.name} region at {r.base:#x} must be "
                f"identity-mapped; a stage-{int(geom.stage)} input size of at least "
                f"{(r.base + r.size - 1).bit_length()} bits is needed"
                f"{' for real-access probes' if geom.stage is Stage.S2 else ''}, got {geom.ia_bits}"
            )
        try:
            table.map(r.base, r.size, r.base, r.prot)
        except PgtableError as e:
            raise ScenarioError(f"{scenario.name}: firmware region {r.name}: {e}") from e
    for m in scenario.maps:
        try:
            table.map(m.addr, m.size, m.pa, m.prot)
        except PgtableError as e:
            raise ScenarioError(f"{scenario.name}: {m.describe()}: {e}") from e
    for o in scenario.ops:
        apply_op(table, o, scenario.name)
    return Built(scenario, table, pool, regions)


def apply_op(table: KvmPgtable, o: OpSpec, name: str = "scenario") -> None:
    try:
        if o.op == "unmap":
            table.unmap(o.addr, o.size)
            return
        if not isinstance(table, Stage2Pgtable):
            raise ScenarioError(f"{name}: ops: {o.op} is a stage-2 operation")
        if o.op == "wrprotect":
            table.wrprotect(o.addr, o.size)
        elif o.op == "mkold":
            table.mkold(o.addr)
        elif o.op == "mkyoung":
            table.mkyoung(o.addr)
        elif o.op == "relax_perms":
            table.relax_perms(o.addr, o.prot)
        else:
            raise ScenarioError(f"{name}: ops: unknown operation {o.op!r}; expected one of {OPS}")
    except PgtableError as e:
        raise ScenarioError(f"{name}: {o.describe()}: {e}") from e


# -- parsing ---------------------------------------------------------------------------------

def _int(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise ScenarioError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        mult = 1
        for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
            if text.upper().endswith(suffix) and not text.lower().startswith("0x"):
                text, mult = text[:-1], m
                break
        try:
            return int(text, 0) * mult
        except ValueError:
            pass
    raise ScenarioError(f"{where}: expected an integer (e.g. 4096, 0x1000, 2M), got {value!r}")


def _prot(value: object, where: str) -> Prot:
    if isinstance(value, str):
        try:
            return Prot.parse(value)
        except ValueError as e:
            raise ScenarioError(f"{where}: {e}") from e
    raise ScenarioError(f"{where}: expected a string such as 'rw', 'rx', 'r', 'rw+device', got {value!r}")


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise ScenarioError(f"{where}: unknown key(s) {sorted(extra)}; expected some of {sorted(allowed)}")


def from_dict(d: Mapping[str, Any], name: str = "scenario") -> Scenario:
    if not isinstance(d, Mapping):
        raise ScenarioError(f"{name}: expected a table/object, got {type(d).__name__}")
    keys = {"name", "stage", "granule", "ia_bits", "pa_bits", "start_level", "maps", "ops", "access", "sample"}
    _check_keys(d, keys, name)
    name = str(d.get("name", name))
    for req in ("stage", "granule", "ia_bits"):
        if req not in d:
            raise ScenarioError(f"{name}: {req}: required")
    try:
        stage = parse_stage(d["stage"])
        granule = Granule.parse(d["granule"])
    except GeometryError as e:
        raise ScenarioError(f"{name}: {e}") from e
    maps = []
    for i, m in enumerate(d.get("maps", [])):
        where = f"{name}: maps[{i}]"
        if not isinstance(m, Mapping):
            raise ScenarioError(f"{where}: expected an object with addr, size, pa, prot")
        _check_keys(m, {"addr", "size", "pa", "prot"}, where)
        for req in ("addr", "size", "pa"):
            if req not in m:
                raise ScenarioError(f"{where}.{req}: required")
        maps.append(MapSpec(_int(m["addr"], f"{where}.addr"), _int(m["size"], f"{where}.size"),
                            _int(m["pa"], f"{where}.pa"), _prot(m.get("prot", "rw"), f"{where}.prot")))
    ops = []
    for i, o in enumerate(d.get("ops", [])):
        where = f"{name}: ops[{i}]"
        if not isinstance(o, Mapping):
            raise ScenarioError(f"{where}: expected an object with op and addr")
        _check_keys(o, {"op", "addr", "size", "prot"}, where)
        if o.get("op") not in OPS:
            raise ScenarioError(f"{where}.op: expected one of {', '.join(OPS)}, got {o.get('op')!r}")
        if "addr" not in o:
            raise ScenarioError(f"{where}.addr: required")
        ops.append(OpSpec(str(o["op"]), _int(o["addr"], f"{where}.addr"),
                          _int(o.get("size", 0), f"{where}.size"),
                          _prot(o.get("prot", "-"), f"{where}.prot")))
    sample = d.get("sample")
    sc = Scenario(
        name=name,
        stage=stage,
        granule=granule,
        ia_bits=_int(d["ia_bits"], f"{name}: ia_bits"),
        pa_bits=None if d.get("pa_bits") is None else _int(d["pa_bits"], f"{name}: pa_bits"),
        start_level=None if d.get("start_level") is None else _int(d["start_level"], f"{name}: start_level"),
        maps=tuple(maps),
        ops=tuple(ops),
        access=bool(d.get("access", False)),
        sample=None if sample is None else _int(sample, f"{name}: sample"),
    )
    try:
        sc.geometry()
    except GeometryError as e:
        raise ScenarioError(f"{name}: {e}") from e
    return sc


def load(path: str | Path) -> list[Scenario]:
    """Scenarios from a JSON or TOML file: one scenario, or ``{"scenario": [...]}``."""
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(f"scenario file: {p} does not exist or is not a file")
    text = p.read_text()
    try:
        data: Any = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"scenario file: {p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from e
    items = data.get("scenario", data) if isinstance(data, Mapping) else data
    if isinstance(items, Mapping):
        items = [items]
    if not isinstance(items, list) or not items:
        raise ScenarioError(f"scenario file: {p}: expected a scenario object or a non-empty list")
    return [from_dict(item, f"{p.name}[{i}]") for i, item in enumerate(items)]


# -- the built-in scenario of `harness run` --------------------------------------------------

SCRATCH = 0x5000_0000  # RAM the probes may really touch (the layout's scratch area)


def builtin() -> list[Scenario]:
    """Both stages, all granules: blocks at every allowed level, pages, unmapped holes,
    device memory, read-only, concatenated PGDs, 52-bit outputs with 64K, stage-2 updates."""
    out: list[Scenario] = []
    G = 1 << 30
    for gran in Granule:
        g = gran.size
        l2 = 1 << (gran.shift - 3 + gran.shift)  # level-2 block size
        s1_maps = (
            MapSpec(0x1_0000_0000, 64 * g, SCRATCH, Prot.RW),
            MapSpec(0x1_0000_0000 + 128 * g, 16 * g, SCRATCH + 128 * g, Prot.R),
            MapSpec(0x2_0000_0000, l2, 0x1_0000_0000 if gran is not Granule.K4 else 0x8000_0000, Prot.RW),
            MapSpec(0x3_0000_0000, 8 * g, 0x0A00_0000, Prot.RW | Prot.DEVICE),
        )
        out.append(Scenario(f"s1-{gran.label}", Stage.S1, gran, 40, maps=s1_maps, access=True))
    for gran, ia, extra in (
        (Granule.K4, 40, (MapSpec(2 * G, G, 0x1_0000_0000, Prot.RW),)),  # level-1 block, 2 PGD pages
        (Granule.K16, 40, ()),  # 16 concatenated PGD pages
        (Granule.K64, 40, ()),  # start level 2, one PGD page
    ):
        g = gran.size
        l2 = 1 << (2 * gran.shift - 3)
        top = 1 << ia
        maps = (
            MapSpec(0x1000_0000, 32 * g, SCRATCH, Prot.RW),
            MapSpec(0x1000_0000 + 64 * g, 8 * g, SCRATCH + 64 * g, Prot.R),
            MapSpec(0x1000_0000 + 96 * g, 8 * g, SCRATCH + 96 * g, Prot.RW | Prot.X),
            MapSpec(l2 * 16, l2, 0x2_0000_0000, Prot.RW),
            MapSpec(top - 4 * g, 4 * g, SCRATCH + 256 * g, Prot.RW),  # the last pages of the IPA range
            *extra,
        )
        ops = (
            OpSpec("wrprotect", 0x1000_0000 + 8 * g, 4 * g),
            OpSpec("mkold", 0x1000_0000 + 16 * g),
            OpSpec("unmap", 0x1000_0000 + 20 * g, 2 * g),
        )
        out.append(Scenario(f"s2-{gran.label}", Stage.S2, gran, ia, pa_bits=48, maps=maps, ops=ops,
                            access=True))
    out.append(Scenario(
        "s2-64K-52bit-pa", Stage.S2, Granule.K64, 48, pa_bits=52,
        maps=(MapSpec(0x20_0000_0000, 1 << 29, 0xF_FFFF_E000_0000, Prot.RW),
              MapSpec(0x30_0000_0000, 16 * 0x1_0000, 0xF_0000_0001_0000, Prot.R)),
    ))
    return out
