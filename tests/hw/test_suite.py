"""The hardware suite: tables built by the model, checked translation by translation on QEMU's MMU.

Covers every granule, both stages, every stage-2 start level and concatenation count the
architecture allows (and every stage-1 start level the identity-mapped firmware allows: it lives
at 0x4020_0000, so stage 1 needs at least 31 input bits), blocks at every allowed level, 52-bit
output addresses with 64K pages, the table operations, and random maps under a fixed seed.
"""

from __future__ import annotations

import numpy as np
import pytest
from checks import Check, ids, stage2_page_ops
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.arch import descriptors as d
from harness.arch.geometry import (
    MIN_IA_BITS,
    Geometry,
    Granule,
    Stage,
    bits_per_level,
    level_size,
    max_ia_bits,
    stage1_start_level,
    stage2_start_levels,
)
from harness.check.engine import CheckReport, check_at, check_built, used_image
from harness.check.scenario import SCRATCH, BuiltScenario, MapSpec, OpSpec, Scenario, build
from harness.core.prot import Prot
from harness.target.target import Target

pytestmark = pytest.mark.hw



# -- stage 2: every start level and concatenation count ----------------------------------------

def stage2_configs() -> list[tuple[Granule, int, int, int]]:
    """One (granule, ia_bits, pa_bits, start_level) per (start level, PGD pages) pair allowed."""
    seen: dict[tuple[Granule, int, int], tuple[Granule, int, int, int]] = {}
    for g in Granule:
        pa = 52 if g is Granule.K64 else 48
        for ia in range(MIN_IA_BITS, max_ia_bits(g) + 1):
            for lvl in stage2_start_levels(g, ia, pa):
                geom = Geometry.create(Stage.S2, g, ia, pa, lvl)
                seen.setdefault((g, lvl, geom.pgd_pages), (g, ia, pa, lvl))
    return sorted(seen.values())


def test_stage2_configs_cover_every_concatenation() -> None:
    pairs = {(g, Geometry.create(2, g, ia, pa, lvl).pgd_pages) for g, ia, pa, lvl in stage2_configs()}
    for g in Granule:
        assert {p for gg, p in pairs if gg is g} == {1, 2, 4, 8, 16}
    levels = {(g, lvl) for g, _, _, lvl in stage2_configs()}
    assert levels == {(Granule.K4, 0), (Granule.K4, 1), (Granule.K4, 2), (Granule.K16, 1), (Granule.K16, 2),
                      (Granule.K16, 3), (Granule.K64, 1), (Granule.K64, 2), (Granule.K64, 3)}


def edge_maps(geom: Geometry, firmware_top: int = 0x4100_0000) -> tuple[MapSpec, ...]:
    """The first and last pages of every PGD page's span, the last pages of the input range,
    and the first page, avoiding the firmware's identity-mapped regions."""
    g = geom.granule.size
    span = 1 << (geom.shift(geom.start_level) + bits_per_level(geom.granule))
    maps: dict[int, MapSpec] = {}
    for i in range(geom.pgd_pages):
        lo, hi = i * span, min(geom.limit, (i + 1) * span)
        for va in (lo, hi - 2 * g):
            if 0x4000_0000 <= va < firmware_top + 0x1000_0000:
                continue
            maps[va] = MapSpec(va, 2 * g, SCRATCH + (len(maps) * 2 * g), Prot.RW)
    return tuple(sorted(maps.values(), key=lambda m: m.addr))


@pytest.mark.parametrize(("granule", "ia", "pa", "level"), stage2_configs(), ids=ids)
def test_stage2_start_level_and_concatenation(check: Check, granule: Granule, ia: int, pa: int, level: int) -> None:
    geom = Geometry.create(Stage.S2, granule, ia, pa, level)
    sc = Scenario(f"s2-{granule.label}-ia{ia}-L{level}", Stage.S2, granule, ia, pa, level, maps=edge_maps(geom))
    rep = check(sc)
    # every PGD page was reached by a probe that translated
    assert rep.probes["S12E1R"] >= 2 * geom.pgd_pages


# -- stage 1: every start level the firmware's identity map allows --------------------------------

def stage1_configs() -> list[tuple[Granule, int]]:
    out: dict[tuple[Granule, int], tuple[Granule, int]] = {}
    for g in Granule:
        for ia in range(31, max_ia_bits(g) + 1):
            out.setdefault((g, stage1_start_level(g, ia)), (g, ia))
        out[(g, -1)] = (g, max_ia_bits(g))
    return sorted(out.values())


@pytest.mark.parametrize(("granule", "ia"), stage1_configs(), ids=ids)
def test_stage1_start_levels(check: Check, granule: Granule, ia: int) -> None:
    geom = Geometry.create(Stage.S1, granule, ia)
    g = granule.size
    top = geom.limit
    maps = (MapSpec(0x1000_0000, 8 * g, SCRATCH, Prot.RW), MapSpec(top - 4 * g, 4 * g, SCRATCH + 8 * g, Prot.R))
    check(Scenario(f"s1-{granule.label}-ia{ia}", Stage.S1, granule, ia, maps=maps, access=True))


# -- blocks at every allowed level, 52-bit output addresses ------------------------------------

@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
@pytest.mark.parametrize("granule", list(Granule), ids=lambda g: g.label)
def test_blocks_at_every_level(check: Check, stage: Stage, granule: Granule) -> None:
    ia = 48
    pa = 52 if granule is Granule.K64 else 48
    geom = Geometry.create(stage, granule, ia, pa)
    maps = []
    for level in geom.block_levels:
        if level < geom.start_level:
            continue
        size = level_size(granule, level)
        va = 64 * size if size < (1 << 40) else 4 * size
        maps.append(MapSpec(va, size, 2 * size if size < (1 << 40) else size, Prot.RW))
        maps.append(MapSpec(va + 2 * size, size, 5 * size, Prot.R))
    sc = Scenario(f"blocks-{granule.label}-s{int(stage)}", stage, granule, ia, pa, maps=tuple(maps), sample=4096)
    built = build(sc, _layout())
    levels = {built.table.get_leaf(m.addr).level for m in maps}
    assert levels == {lvl for lvl in geom.block_levels if lvl >= geom.start_level}
    check(sc)


def _layout() -> object:
    from harness.target.layout import LAYOUT

    return LAYOUT


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_52bit_output_addresses_with_64k(check: Check, stage: Stage) -> None:
    maps = (
        MapSpec(0x20_0000_0000, 1 << 29, 0xF_FFFF_E000_0000, Prot.RW),  # level-2 block
        MapSpec(0x30_0000_0000, 16 * 0x1_0000, 0xF_0000_0001_0000, Prot.R),  # pages
        MapSpec(0x30_1000_0000, 0x1_0000, 0x8_0000_0000_0000, Prot.RW),  # PA[51] alone
    )
    check(Scenario(f"52bit-s{int(stage)}", stage, Granule.K64, 48, 52, maps=maps))


# -- table operations, with real accesses (AF faults seen by loads and stores) -----------------

@pytest.mark.parametrize("granule", list(Granule), ids=lambda g: g.label)
def test_stage2_operations(check: Check, granule: Granule) -> None:
    g = granule.size
    l2 = level_size(granule, 2)
    base = 16 * l2
    maps = (
        MapSpec(0x1000_0000, 64 * g, SCRATCH, Prot.RW),
        MapSpec(base, l2, SCRATCH + 0x100_0000 if granule is not Granule.K64 else SCRATCH, Prot.RW),
    )
    ops = (
        *stage2_page_ops(g),
        OpSpec("unmap", base + 5 * g, g),  # splits the block down to pages
    )
    sc = Scenario(f"ops-{granule.label}", Stage.S2, granule, 40, 48, maps=maps, ops=ops, access=True)
    rep = check(sc)
    assert rep.probes.get("load", 0) > 0 and rep.probes.get("store", 0) > 0
    # the write-protected pages can't be probed by AT S12E1W on QEMU 10.0 (it aborts): they went to stores
    assert sum(rep.withheld.values()) >= 8


def test_af_faults_seen_by_real_accesses(target: Target) -> None:
    sc = Scenario("af", Stage.S2, Granule.K4, 40, 48, maps=(MapSpec(0x1000_0000, 0x4000, SCRATCH, Prot.RW),),
                  ops=(OpSpec("mkold", 0x1000_1000),))
    built = build(sc, target.layout)
    target.install(built.table.regs(), used_image(built.table))
    rec = target.access(np.array([0x1000_0000, 0x1000_1000], dtype=np.uint64), write=False, stage=2)
    assert list(rec["completed"]) == [True, False]
    from harness.arch.registers import ESR_EC, ISS_DFSC, ExceptionClass, FaultKind, fault_status

    esr = int(rec["esr"][1])
    assert ESR_EC.get(esr) == ExceptionClass.DABT_LOWER
    assert ISS_DFSC.get(esr) == fault_status(FaultKind.ACCESS_FLAG, 3)
    assert int(rec["hpfar"][1]) >> 4 == 0x1000_1000 >> 12


# -- random maps (hypothesis, fixed seed) --------------------------------------------------------

@st.composite
def random_scenarios(draw: st.DrawFn) -> Scenario:
    stage = draw(st.sampled_from([Stage.S1, Stage.S2]))
    granule = draw(st.sampled_from(list(Granule)))
    g = granule.size
    l2 = level_size(granule, 2)
    maps: list[MapSpec] = []
    cursor = 0x1_0000_0000
    for _ in range(draw(st.integers(1, 5))):
        cursor += draw(st.integers(0, 4)) * g
        kind = draw(st.sampled_from(["pages", "block", "mixed"]))
        if kind == "block":
            cursor = -(-cursor // l2) * l2
            size = l2
        else:
            size = draw(st.integers(1, 40)) * g if kind == "pages" else l2 + draw(st.integers(1, 8)) * g
        pa_off = draw(st.integers(0, 64)) * g if kind != "block" else 0
        prot = draw(st.sampled_from([Prot.R, Prot.RW, Prot.RW | Prot.DEVICE]))
        pa = (0x1_0000_0000 + (cursor - 0x1_0000_0000) + pa_off) if kind == "block" else SCRATCH + pa_off
        maps.append(MapSpec(cursor, size, -(-pa // l2) * l2 if kind == "block" else pa, prot))
        cursor += size
    ops = []
    if draw(st.booleans()):
        m = draw(st.sampled_from(maps))
        ops.append(OpSpec("unmap", m.addr + (m.size // g // 2) * g, g))
    return Scenario("random", stage, granule, 40, 48, maps=tuple(maps), ops=tuple(ops), access=True)


@settings(max_examples=12, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(random_scenarios())
def test_random_maps(target: Target, sc: Scenario) -> None:
    rep = check_built(build(sc, target.layout), target, np.random.default_rng(7))
    assert rep.ok, rep.text()


# -- the check can fail: a deliberately wrong model ----------------------------------------------

def test_wrong_model_fails_with_a_readable_report(target: Target) -> None:
    """A test double of the model with one leaf's AP[2] flipped (read-only -> read/write)."""
    sc = Scenario("wrong-ap", Stage.S1, Granule.K4, 40,
                  maps=(MapSpec(0x1_0000_0000, 0x4000, SCRATCH, Prot.R),))
    built: BuiltScenario = build(sc, target.layout)
    tb = built.table
    target.install(tb.regs(), used_image(tb))  # the MMU gets the true tables
    leaf = tb.get_leaf(0x1_0000_2000)
    ptep = _ptep(built, 0x1_0000_2000)
    tb.mem.write64(ptep, d.S1_AP.set(leaf.pte, d.S1AP.RW))  # the model's copy lies
    rep = CheckReport(sc.name, tb.geom.describe(), "x")
    addrs = np.array([0x1_0000_0000, 0x1_0000_1000, 0x1_0000_2000, 0x1_0000_3000], dtype=np.uint64)
    check_at(rep, target, tb, addrs)
    target.uninstall()
    assert not rep.ok
    assert [(m.probe, m.address) for m in rep.mismatches] == [("S1E2W", 0x1_0000_2000)]
    text = rep.text()
    assert "MISMATCH" in text and "0x100002000" in text
    assert "permission fault level 3" in text  # the MMU's answer, decoded
    assert "AP=0x1" in text  # the model's walk shows the flipped field


def _ptep(built: BuiltScenario, va: int) -> int:
    from harness.core.walker import Walker, WalkFlags

    found: list[int] = []

    def cb(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        found.append(ptep)

    built.table.walk(va, 0x1000, Walker(cb, WalkFlags.LEAF))
    return found[0]
