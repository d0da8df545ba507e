"""The hardware suite for FEAT_LPA2 (TCR/VTCR.DS = 1) and the hVHE regime (HCR_EL2.E2H = 1).

Every test is the full differential check (the plugin's ``check_scenario``: both AT forms on every
probe address, real loads and stores with planted tokens where ``access`` is set) of tables the
model built. Covered, on QEMU's MMU:

* stage 2 with DS = 1 at every start level and concatenation count the architecture allows for
  4K (-1 through VTCR_EL2.SL2, 0, 1, 2) and 16K (0, 1, 2, 3), with 52-bit output addresses;
* stage 1 with DS = 1 at every start level the identity-mapped firmware allows (it needs 31 input
  bits: 4K -1, 0, 1; 16K 0, 1, 2), in the EL2 regime and in the EL2&0 (hVHE) regime;
* hVHE without DS for every granule (64K up to a 52-bit VA: FEAT_LVA);
* blocks at every level DS = 1 allows (4K levels 0, 1, 2; 16K levels 1, 2) at both stages;
* the table operations under DS = 1 (stage 2: unmap, wrprotect, mkold, mkyoung, relax_perms,
  block splits keeping OA[51:48], tables freed; stage 1: unmap), at every stage-2 start level;
* raw block descriptors where the level forbids them (4K level -1, 16K level 0; without DS 16K
  level 1 and 4K level 0): translation faults at that level;
* input addresses outside the regime's range (the TTBR1_EL2 half under hVHE; IPAs beyond the
  stage-2 input size; addresses beyond PAMax with EL1's MMU off);
* the built-in scenarios of ``harness run`` for LPA2/hVHE, and that they are the regimes Linux
  6.12's protected mode programs (its TCR_EL2/VTCR_EL2 decoded).

Not covered: 4K stage 1 at start level 2 (at most 30 input bits, below the firmware's identity
map at 0x4020_0000; refused by name, see ``test_stage1_lpa2_configs``).

Output addresses at or above 2**48 have no RAM behind them: the engine checks those with AT only
and sends real accesses only to the scratch RAM at 0x5000_0000 (and to faulting addresses).
Which levels the probes reached is taken from the model's prediction for the very addresses the
fixture probes (same seed), every one of which the MMU agreed with.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from checks import Check, ids, stage2_page_ops

from harness.arch import descriptors as d
from harness.arch.geometry import (
    MIN_IA_BITS,
    Geometry,
    Granule,
    Stage,
    block_levels,
    level_size,
    max_ia_bits,
    min_level,
    stage1_start_level,
    stage2_start_levels,
)
from harness.arch.registers import FaultKind
from harness.check.addresses import probe_addresses
from harness.check.engine import CheckReport, check_subject, subject_of_built
from harness.check.scenario import SCRATCH, MapSpec, OpSpec, Scenario, ScenarioError, build
from harness.core.prot import Prot
from harness.core.translate import READ
from harness.target.layout import LAYOUT
from harness.target.target import Target

pytestmark = pytest.mark.hw


LPA2_GRANULES = (Granule.K4, Granule.K16)
PA52 = 1 << 48  # output addresses from here on need DS = 1 (or 64K): AT only, no RAM there
HIGH_PA = 0xF_FFFF_8000_0000  # OA[51:48] all ones (descriptor bits [9:8] and [49:48] with DS = 1)
_RAM_REGIONS = [r for r in (*LAYOUT.stage1_regions(), *LAYOUT.stage2_regions()) if r.name != "uart"]
# the span of the firmware's identity-mapped RAM (stage 1, and the EL1 stub at stage 2): maps avoid it
FIRMWARE = (min(r.base for r in _RAM_REGIONS), max(r.base + r.size for r in _RAM_REGIONS))
STAGE1_SAMPLE = 512  # of the firmware's ~100 MiB of identity-mapped pages (every leaf's edges always)
CHECK_SEED = 1  # the fixture's default seed: probe_addresses below sees the same addresses


def test_firmware_window_is_below_scratch() -> None:
    """The maps below avoid FIRMWARE and send real accesses to scratch RAM, above it."""
    assert FIRMWARE[0] >= 1 << 30 and FIRMWARE[1] <= SCRATCH == LAYOUT.scratch_base


class Reached:
    """What the probes of a scenario reach in the model (every probe is compared with the MMU)."""

    def __init__(self, sc: Scenario) -> None:
        built = build(sc, LAYOUT)
        self.table = built.table
        addrs = probe_addresses(built.table, np.random.default_rng(CHECK_SEED), sc.sample)
        pred = subject_of_built(built).predict(addrs, READ)
        ok = pred.ok
        self.levels = Counter(int(lv) for lv in pred.level[ok])
        self.high_pa = int(np.count_nonzero(pred.pa[ok] >= np.uint64(PA52)))


def clear_of_firmware(addr: int, size: int) -> bool:
    return addr + size <= FIRMWARE[0] or addr >= FIRMWARE[1]


def with_stub(geom: Geometry) -> bool:
    """Real accesses at stage 2 need the EL1 probe stub identity-mapped, i.e. inside the IPA range."""
    return all(r.base + r.size <= geom.limit for r in LAYOUT.stage2_regions())


# -- stage 2: every start level and concatenation count with DS = 1 ----------------------------

def stage2_lpa2_configs() -> list[tuple[Granule, int, int]]:
    """(granule, ia_bits, start_level): the smallest and the largest IPA size of every
    (start level, PGD pages) pair DS = 1 allows."""
    pairs: dict[tuple[Granule, int, int], list[int]] = {}
    for g in LPA2_GRANULES:
        for ia in range(MIN_IA_BITS, max_ia_bits(g, lpa2=True) + 1):
            for lvl in stage2_start_levels(g, ia, lpa2=True):
                pages = Geometry.create(Stage.S2, g, ia, 52, lvl, lpa2=True).pgd_pages
                pairs.setdefault((g, lvl, pages), []).append(ia)
    out = {(g, ias[i], lvl) for (g, lvl, _), ias in pairs.items() for i in (0, -1)}
    return sorted(out)


def test_stage2_lpa2_configs_cover_every_level_and_concatenation() -> None:
    cfgs = stage2_lpa2_configs()
    levels = {(g, lvl) for g, _, lvl in cfgs}
    assert levels == {(Granule.K4, -1), (Granule.K4, 0), (Granule.K4, 1), (Granule.K4, 2),
                      (Granule.K16, 0), (Granule.K16, 1), (Granule.K16, 2), (Granule.K16, 3)}
    assert min_level(Granule.K4, lpa2=True) == -1 and min_level(Granule.K16, lpa2=True) == 0
    pages = {(g, lvl, Geometry.create(2, g, ia, 52, lvl, lpa2=True).pgd_pages) for g, ia, lvl in cfgs}
    for g in LPA2_GRANULES:
        for lvl in {lv for gg, lv in levels if gg is g}:
            got = {p for gg, lv, p in pages if gg is g and lv == lvl}
            # the lowest level covers the top of the 52-bit range with one (partial) table
            assert got == ({1} if lvl == min_level(g, lpa2=True) else {1, 2, 4, 8, 16}), (g, lvl, got)
    # the level -1 root takes 2 .. 16 entries (ia 49 .. 52): both ends are in
    assert {ia for g, ia, lvl in cfgs if lvl == -1} == {49, 52}


def edge_maps(geom: Geometry) -> tuple[MapSpec, ...]:
    """The first and last two pages of every PGD page's span (into scratch RAM), avoiding the
    firmware, and two pages mapped to 52-bit output addresses three quarters up the range."""
    g = geom.granule.size
    span = geom.pgd_page_span
    maps: dict[int, MapSpec] = {}
    for i in range(geom.pgd_pages):
        lo, hi = i * span, min(geom.limit, (i + 1) * span)
        for va in (lo, hi - 2 * g):
            if clear_of_firmware(va, 2 * g):
                maps[va] = MapSpec(va, 2 * g, SCRATCH + len(maps) * 2 * g, Prot.RW)
    high = geom.limit // 4 * 3 + 4 * g
    assert clear_of_firmware(high, 2 * g) and high not in maps
    maps[high] = MapSpec(high, 2 * g, HIGH_PA, Prot.RW)
    return tuple(sorted(maps.values(), key=lambda m: m.addr))


@pytest.mark.parametrize(("granule", "ia", "level"), stage2_lpa2_configs(), ids=ids)
def test_stage2_lpa2_start_level_and_concatenation(check: Check, granule: Granule, ia: int, level: int) -> None:
    geom = Geometry.create(Stage.S2, granule, ia, 52, level, lpa2=True)
    sc = Scenario(f"s2-{granule.label}-lpa2-ia{ia}-L{level}", Stage.S2, granule, ia, 52, level,
                  maps=edge_maps(geom), access=with_stub(geom), lpa2=True)
    reached = Reached(sc)
    assert reached.table.geom.start_level == level and reached.table.geom.pgd_pages == geom.pgd_pages
    assert reached.levels[3] > 0 and reached.high_pa >= 2  # pages, two of them at 52-bit PAs
    rep = check(sc)
    assert rep.probes["S12E1R"] >= 2 * geom.pgd_pages  # every PGD page was probed
    if sc.access:
        assert rep.probes.get("load", 0) > 0 and rep.probes.get("store", 0) > 0


# -- stage 1 with DS = 1, in the EL2 and EL2&0 (hVHE) regimes ---------------------------------

def stage1_configs(granules: tuple[Granule, ...], lpa2: bool) -> list[tuple[Granule, int]]:
    """The smallest and largest input size of every stage-1 start level the firmware allows (it
    is identity-mapped at 0x4020_0000: 31 input bits at least)."""
    by_level: dict[tuple[Granule, int], list[int]] = {}
    for g in granules:
        for ia in range(31, max_ia_bits(g, lpa2) + 1):
            by_level.setdefault((g, stage1_start_level(g, ia, lpa2)), []).append(ia)
    return sorted({(g, ias[i]) for (g, _), ias in by_level.items() for i in (0, -1)})


def test_stage1_lpa2_configs() -> None:
    levels = {(g, stage1_start_level(g, ia, True)) for g, ia in stage1_configs(LPA2_GRANULES, True)}
    assert levels == {(Granule.K4, -1), (Granule.K4, 0), (Granule.K4, 1),
                      (Granule.K16, 0), (Granule.K16, 1), (Granule.K16, 2)}
    # 4K level 2 needs at most 30 input bits, below the firmware's identity map: refused by name
    assert stage1_start_level(Granule.K4, 30, True) == 2
    with pytest.raises(ScenarioError, match="ia_bits"):
        build(Scenario("s1-4K-L2", Stage.S1, Granule.K4, 30, 52, lpa2=True), LAYOUT)


def stage1_maps(geom: Geometry) -> tuple[MapSpec, ...]:
    g = geom.granule.size
    top = geom.limit
    maps = [
        MapSpec(0x1000_0000, 8 * g, SCRATCH, Prot.RW),
        MapSpec(0x1000_0000 + 16 * g, 4 * g, SCRATCH + 16 * g, Prot.R),
        MapSpec(0x1000_0000 + 24 * g, 2 * g, SCRATCH + 24 * g, Prot.RX),
        MapSpec(0x1000_0000 + 32 * g, 2 * g, SCRATCH + 32 * g, Prot.RW | Prot.DEVICE),
        MapSpec(top - 4 * g, 4 * g, SCRATCH + 64 * g, Prot.R),  # the top of the input range
    ]
    if geom.pa_bits == 52:
        maps.append(MapSpec(0x2000_0000, 2 * g, HIGH_PA, Prot.RW))
    return tuple(maps)


def _stage1_check(check: Check, granule: Granule, ia: int, lpa2: bool, e2h: bool) -> None:
    pa = 52 if lpa2 or granule is Granule.K64 else 48
    geom = Geometry.create(Stage.S1, granule, ia, pa, lpa2=lpa2, e2h=e2h)
    sc = Scenario(f"s1-{granule.label}{'-lpa2' if lpa2 else ''}{'-hvhe' if e2h else ''}-ia{ia}", Stage.S1,
                  granule, ia, pa, maps=stage1_maps(geom), access=True, sample=STAGE1_SAMPLE, lpa2=lpa2, e2h=e2h)
    reached = Reached(sc)
    assert reached.levels[3] > 0
    assert reached.high_pa == (2 if pa == 52 else 0)
    assert reached.table.geom.e2h is e2h and reached.table.geom.lpa2 is lpa2
    rep = check(sc)
    assert rep.probes.get("load", 0) > 0 and rep.probes.get("store", 0) > 0
    assert rep.probes["S1E2R"] > 0 and rep.probes["S1E2W"] > 0


@pytest.mark.parametrize("e2h", [False, True], ids=["el2", "hvhe"])
@pytest.mark.parametrize(("granule", "ia"), stage1_configs(LPA2_GRANULES, True), ids=ids)
def test_stage1_lpa2_start_levels(check: Check, granule: Granule, ia: int, e2h: bool) -> None:
    _stage1_check(check, granule, ia, True, e2h)


def test_hvhe_configs_cover_every_granule() -> None:
    cfgs = stage1_configs(tuple(Granule), False)
    assert {g for g, _ in cfgs} == set(Granule)
    assert (Granule.K64, 52) in cfgs  # FEAT_LVA: 52-bit VA with 64K, no DS


@pytest.mark.parametrize(("granule", "ia"), stage1_configs(tuple(Granule), False), ids=ids)
def test_hvhe_without_lpa2(check: Check, granule: Granule, ia: int) -> None:
    _stage1_check(check, granule, ia, False, True)


# -- blocks at every level DS = 1 allows ---------------------------------------------------------

def test_block_levels_with_ds() -> None:
    """``AArch64.BlockDescSupported``: DS = 1 adds the 4K level-0 (512 GiB) and the 16K level-1
    (64 GiB) blocks; without it, 4K blocks at levels 1, 2 and 16K at level 2 only."""
    assert block_levels(Granule.K4, lpa2=True) == (0, 1, 2)
    assert block_levels(Granule.K16, lpa2=True) == (1, 2)
    assert block_levels(Granule.K4) == (1, 2) and block_levels(Granule.K16) == (2,)


def block_maps(geom: Geometry) -> tuple[MapSpec, ...]:
    """Two blocks at every allowed level: the lower one read/write, the upper one read-only. The
    blocks that fit go to scratch RAM (real accesses), the others to 52-bit output addresses."""
    maps = []
    for level in geom.block_levels:
        size = level_size(geom.granule, level)
        va = 1 << (geom.ia_bits - 2) if level == min(geom.block_levels) else 64 * size
        if 2 * size <= LAYOUT.scratch_size // 2:
            pa = -(-SCRATCH // size) * size
        else:
            pa = (HIGH_PA >> (size.bit_length() - 1)) << (size.bit_length() - 1)
            pa = max(pa - 2 * size, PA52)
        maps.append(MapSpec(va, size, pa, Prot.RW))
        maps.append(MapSpec(va + 2 * size, size, pa + size, Prot.R))
    return tuple(maps)


BLOCK_CONFIGS = [  # (stage, granule, ia_bits, start level, e2h): both stage-2 start levels DS = 1 allows
    (Stage.S1, Granule.K4, 52, None, False), (Stage.S1, Granule.K4, 52, None, True),
    (Stage.S2, Granule.K4, 52, -1, False), (Stage.S2, Granule.K4, 52, 0, False),
    (Stage.S1, Granule.K16, 52, None, False), (Stage.S1, Granule.K16, 52, None, True),
    (Stage.S2, Granule.K16, 52, 0, False), (Stage.S2, Granule.K16, 51, 1, False),
]


@pytest.mark.parametrize(("stage", "granule", "ia", "start", "e2h"), BLOCK_CONFIGS, ids=ids)
def test_lpa2_blocks_at_every_level(check: Check, stage: Stage, granule: Granule, ia: int,
                                    start: int | None, e2h: bool) -> None:
    geom = Geometry.create(stage, granule, ia, 52, start, lpa2=True, e2h=e2h)
    maps = block_maps(geom)
    sc = Scenario(f"lpa2-blocks-{granule.label}-s{int(stage)}-L{geom.start_level}{'-hvhe' if e2h else ''}", stage,
                  granule, ia, 52, start, maps=maps, access=True, sample=2048, lpa2=True, e2h=e2h)
    reached = Reached(sc)
    leaf_levels = {reached.table.get_leaf(m.addr).level for m in maps}
    assert leaf_levels == set(geom.block_levels) == set(block_levels(granule, lpa2=True))
    assert set(geom.block_levels) <= set(reached.levels)  # the probes translated through every block
    assert reached.high_pa > 0
    rep = check(sc)
    assert rep.probes.get("load", 0) > 0 and rep.probes.get("store", 0) > 0


FORBIDDEN_BLOCKS = [  # (stage, granule, lpa2, ia_bits, start level, level of the raw block descriptor)
    (Stage.S1, Granule.K4, True, 52, None, -1), (Stage.S2, Granule.K4, True, 52, -1, -1),
    (Stage.S1, Granule.K16, True, 52, None, 0), (Stage.S2, Granule.K16, True, 52, 0, 0),
    (Stage.S1, Granule.K16, False, 48, None, 1), (Stage.S2, Granule.K16, False, 48, 1, 1),
    (Stage.S2, Granule.K4, False, 48, 0, 0),
]


@pytest.mark.parametrize(("stage", "granule", "lpa2", "ia", "start", "level"), FORBIDDEN_BLOCKS, ids=ids)
def test_block_descriptor_where_the_level_forbids_it(target: Target, stage: Stage, granule: Granule, lpa2: bool,
                                                      ia: int, start: int | None, level: int) -> None:
    """A raw block descriptor (bits[1:0] = 0b01) written over a table entry at a level where
    ``AArch64.BlockDescSupported`` says no (4K level -1, 16K level 0; 16K level 1 without DS;
    4K level 0 without DS) is a translation fault at that level, on the MMU as in the model."""
    assert level not in block_levels(granule, lpa2=lpa2)
    g = granule.size
    va = 1 << (ia - 1)
    pa = 52 if lpa2 else 48
    sc = Scenario("forbidden-block", stage, granule, ia, pa, start, lpa2=lpa2,
                  maps=(MapSpec(va, 4 * g, SCRATCH, Prot.RW),))
    built = build(sc, LAYOUT)
    tb = built.table
    step = next(s for s in subject_of_built(built).walk(va, READ).steps if s.level == level)
    assert step.raw is not None and d.is_table(step.raw, level)
    leaf = tb.get_leaf(va)
    tb.mem.write64(step.desc_pa, d.leaf_pte(0, d.leaf_attrs(leaf.pte, lpa2), level, granule, lpa2))
    subject = subject_of_built(built)  # the image holds the raw descriptor: both sides walk it
    addrs = np.array([va, va + g + 8, va + 3 * g, va + level_size(granule, level) - g], dtype=np.uint64)
    pred = subject.predict(addrs, READ)
    assert list(pred.fault) == [FaultKind.TRANSLATION.value] * 4 and list(pred.fault_level) == [level] * 4
    rep = check_subject(subject, target, addrs, np.random.default_rng(CHECK_SEED), access=True)
    assert rep.ok, rep.text()
    assert rep.probes.get("load", 0) == 4 and rep.checked >= 16


# -- the table operations under DS = 1 -----------------------------------------------------------

OPS_CONFIGS = [(Granule.K4, 52, -1), (Granule.K4, 52, 0), (Granule.K16, 52, 0), (Granule.K16, 51, 1)]


@pytest.mark.parametrize(("granule", "ia", "start"), OPS_CONFIGS, ids=ids)
def test_stage2_operations_lpa2(check: Check, granule: Granule, ia: int, start: int) -> None:
    g = granule.size
    l1, l2 = level_size(granule, 1), level_size(granule, 2)
    top_level = min(block_levels(granule, lpa2=True))  # 4K level 0, 16K level 1
    top = level_size(granule, top_level)
    base = 16 * l2
    high = 1 << (ia - 1)  # an IPA with the top input bit set
    gone = high + 8 * l1  # pages unmapped entirely: their tables are freed
    big = 1 << (ia - 2)
    maps = (
        MapSpec(0x1000_0000, 64 * g, SCRATCH, Prot.RW),
        MapSpec(base, l2, SCRATCH + 0x400_0000, Prot.RW),  # a level-2 block in scratch
        MapSpec(high, l1, 0xC_0000_0000_0000, Prot.RW),  # a level-1 block at a 52-bit PA
        MapSpec(high + 4 * l1, 16 * g, HIGH_PA, Prot.RW),  # pages at 52-bit PAs
        MapSpec(gone, 16 * g, HIGH_PA + 16 * g, Prot.RW),
        MapSpec(big, top, 0x8_0000_0000_0000, Prot.RW),  # the largest blocks DS = 1 allows
        MapSpec(big + top, top, 0x8_0000_0000_0000 + top, Prot.RW),
        MapSpec(big + 2 * top, top, 0x8_0000_0000_0000 + 2 * top, Prot.RW),
    )
    ops = (
        *stage2_page_ops(g),
        OpSpec("relax_perms", 0x1000_0000 + 31 * g, prot=Prot.X),
        OpSpec("unmap", base + 5 * g, g),  # splits the scratch block down to pages
        OpSpec("unmap", high + l2 + 3 * g, g),  # splits the 52-bit block: OA[51:48] kept in every child
        OpSpec("wrprotect", high + 4 * l1, 4 * g),
        OpSpec("mkold", high + 4 * l1 + 8 * g),
        OpSpec("unmap", high + 4 * l1 + 12 * g, g),
        OpSpec("unmap", gone, 16 * g),
        OpSpec("mkold", big),  # access-flag fault at the top block level
        OpSpec("wrprotect", big + top + 5 * g, g),  # the whole block loses W
        OpSpec("unmap", big + 3 * top - l2 + 5 * g, g),  # splits the top block's last child (to pages)
    )
    sc = Scenario(f"ops-{granule.label}-lpa2-L{start}", Stage.S2, granule, ia, 52, start, maps=maps, ops=ops,
                  access=True, sample=8192, lpa2=True)
    reached = Reached(sc)
    tb = reached.table
    assert not tb.leaves(gone, l1)
    assert not d.AF.get(tb.get_leaf(big).pte) and tb.get_leaf(big).level == top_level
    assert tb.get_leaf(big + top).level == top_level
    assert tb.get_leaf(big + 2 * top).level == top_level + 1 and tb.get_leaf(big + 3 * top - l2).level == 3
    assert reached.table.get_leaf(high).level == 2  # the level-1 block was split ...
    assert reached.table.get_leaf(high + 2 * l2).level == 2
    assert reached.table.get_leaf(high + l2).level == 3  # ... and its second child down to pages
    assert reached.high_pa > 0 and {top_level, top_level + 1, 2, 3} <= set(reached.levels)
    rep = check(sc)
    assert rep.probes.get("load", 0) > 0 and rep.probes.get("store", 0) > 0
    assert sum(rep.withheld.values()) >= 8  # write-protected pages in scratch went to real stores


@pytest.mark.parametrize("e2h", [False, True], ids=["el2", "hvhe"])
@pytest.mark.parametrize("granule", LPA2_GRANULES, ids=ids)
def test_stage1_unmap_lpa2(check: Check, granule: Granule, e2h: bool) -> None:
    g = granule.size
    l1, l2 = level_size(granule, 1), level_size(granule, 2)
    high = 1 << 50
    maps = (
        MapSpec(0x1000_0000, 32 * g, SCRATCH, Prot.RW),
        MapSpec(16 * l2, l2, SCRATCH + 0x400_0000, Prot.RW),
        MapSpec(high, l1, 0x8_0000_0000_0000, Prot.R),
    )
    ops = (
        OpSpec("unmap", 0x1000_0000 + 4 * g, 2 * g),
        OpSpec("unmap", 16 * l2 + 7 * g, g),  # splits the scratch block
        OpSpec("unmap", high + l2, l2),  # unmaps one child of the 52-bit block (a level-2 entry)
    )
    sc = Scenario(f"s1-unmap-{granule.label}-lpa2{'-hvhe' if e2h else ''}", Stage.S1, granule, 52, 52, maps=maps,
                  ops=ops, access=True, sample=4096, lpa2=True, e2h=e2h)
    reached = Reached(sc)
    assert not reached.table.leaves(high + l2, l2)
    assert reached.table.get_leaf(high).level == 2 and reached.table.get_leaf(16 * l2).level == 3
    assert reached.high_pa > 0
    rep = check(sc)
    assert rep.probes.get("load", 0) > 0 and rep.probes.get("store", 0) > 0



def test_level_minus_1_data_abort_status() -> None:
    """Real accesses that fault at level -1 raise DFSC 0b101011 (translation) / 0b101001
    (address size), not ``(kind << 2) | level``: what the engine expects of them."""
    from harness.arch.registers import FaultKind, fault_status
    from harness.core.batch import fault_status_batch

    sc = Scenario("l-1", Stage.S1, Granule.K4, 52, 52, lpa2=True)
    built = build(sc, LAYOUT)
    pred = subject_of_built(built).predict(np.array([1 << 51, 0x4020_0000], dtype=np.uint64), READ)
    assert list(pred.fault_level) == [-1, -1] and not pred.ok[0] and pred.ok[1]
    assert list(fault_status_batch(pred)) == [fault_status(FaultKind.TRANSLATION, -1), 0] == [0b101011, 0]


# -- input addresses outside the regime's range ---------------------------------------------------

OUTSIDE_S1 = [  # (granule, ia_bits, lpa2, e2h)
    (Granule.K4, 52, True, True), (Granule.K4, 52, True, False), (Granule.K4, 48, False, True),
    (Granule.K16, 52, True, True), (Granule.K64, 52, False, True), (Granule.K64, 42, False, True),
]


@pytest.mark.parametrize(("granule", "ia", "lpa2", "e2h"), OUTSIDE_S1, ids=ids)
def test_stage1_addresses_outside_the_range(target: Target, granule: Granule, ia: int, lpa2: bool,
                                            e2h: bool) -> None:
    """Above 2**ia, including the TTBR1_EL2 half (EPD1 = 1 in hVHE), every address is a
    translation fault at level 0, even where the walk would start at level -1."""
    pa = 52 if lpa2 or granule is Granule.K64 else 48
    sc = Scenario("outside-s1", Stage.S1, granule, ia, pa, lpa2=lpa2, e2h=e2h,
                  maps=(MapSpec(0x1000_0000, granule.size, SCRATCH),))
    subject = subject_of_built(build(sc, LAYOUT))
    addrs = np.array([1 << ia, 1 << 55, 1 << 63, (1 << 64) - (1 << ia), (1 << 64) - granule.size,
                      0x00F0_0000_1000_0000, 0x1000_0000], dtype=np.uint64)
    pred = subject.predict(addrs, READ)
    assert list(zip(pred.fault.tolist(), pred.fault_level.tolist(), strict=True)) == \
        [(FaultKind.TRANSLATION.value, 0)] * 6 + [(-1, -1)]
    rep = check_subject(subject, target, addrs, np.random.default_rng(CHECK_SEED), access=True)
    assert rep.ok, rep.text()
    assert rep.probes["S1E2R"] == 7 and rep.probes.get("load", 0) >= 6


OUTSIDE_S2 = [(Granule.K4, 52, -1), (Granule.K4, 52, 0), (Granule.K4, 49, -1), (Granule.K16, 51, 1),
              (Granule.K16, 48, 0)]


@pytest.mark.parametrize(("granule", "ia", "start"), OUTSIDE_S2, ids=ids)
def test_stage2_addresses_outside_the_range(target: Target, granule: Granule, ia: int, start: int) -> None:
    """An IPA in [2**ia, 2**52) is a stage-2 translation fault at level 0 (not at the start
    level); an address from 2**52 on is a stage-1 address size fault (EL1's MMU is off and it is
    beyond PAMax), taken at EL1: checked with AT alone (the probe stub records only what EL2 takes)."""
    g = granule.size
    sc = Scenario("outside-s2", Stage.S2, granule, ia, 52, start, lpa2=True, access=True,
                  maps=(MapSpec(0x1000_0000, g, SCRATCH),))
    subject = subject_of_built(build(sc, LAYOUT))
    beyond = [(1 << 52) + 0x1000_0000, 1 << 55, 1 << 63, (1 << 64) - g]
    inside = [1 << ia] if ia < 52 else []
    addrs = np.array(sorted(inside + beyond), dtype=np.uint64)
    pred = subject.predict(addrs, READ)
    got = list(zip(pred.fault.tolist(), pred.fault_level.tolist(), pred.fault_stage2.tolist(), strict=True))
    assert got == [(FaultKind.TRANSLATION.value, 0, True)] * len(inside) + \
        [(FaultKind.ADDRESS_SIZE.value, 0, False)] * len(beyond)
    rep = check_subject(subject, target, addrs, np.random.default_rng(CHECK_SEED), access=True)
    assert rep.ok, rep.text()
    assert rep.probes["S12E1R"] == len(addrs) and rep.probes.get("load", 0) == len(inside)


# -- the built-in LPA2/hVHE scenarios of `harness run` -------------------------------------------

BUILTIN_SHAPES = {  # name: (start level, PGD pages, levels the probes must translate at)
    "s1-4K-lpa2-hvhe": (-1, 1, {1, 2, 3}),
    "s2-4K-lpa2": (0, 16, {0, 2, 3}),
    "s2-16K-lpa2": (0, 1, {1, 2, 3}),  # level 2: the 32 MiB block and the split 64 GiB one
}


@pytest.mark.parametrize("name", sorted(BUILTIN_SHAPES))
def test_builtin_lpa2_scenarios(check: Check, name: str) -> None:
    from harness.check.scenario import builtin_named

    sc = builtin_named(name)
    start, pages, levels = BUILTIN_SHAPES[name]
    reached = Reached(sc)
    geom = reached.table.geom
    assert (geom.lpa2, geom.start_level, geom.pgd_pages, geom.ia_bits, geom.pa_bits) == (True, start, pages, 52, 52)
    assert geom.e2h is (sc.stage is Stage.S1)
    assert levels <= set(reached.levels) and reached.high_pa > 0
    rep = check(sc)
    assert rep.probes.get("load", 0) > 0 and rep.probes.get("store", 0) > 0


def test_builtin_lpa2_scenarios_are_the_regimes_linux_612_programs() -> None:
    """The values Linux 6.12 programs in protected mode on ``-cpu max`` (facts.md), decoded by the
    model's registers-to-geometry function, are the built-ins' geometries; so are the built-ins'
    own register values, decoded back."""
    from harness.arch.regimes import regimes_from_registers
    from harness.arch.registers import Stage1Regs, Stage2Regs
    from harness.check.scenario import builtin_named

    hvhe_tcr, host_vtcr, e2h, vm = 0x095001F7B5CE350C, 0x1802E358C, 1 << 34, 1
    cpu_max = 0x32310201126  # ID_AA64MMFR0_EL1: PARange 52 bits, all granules, LPA2
    s1, s2 = regimes_from_registers({
        "SCTLR_EL2": 1, "HCR_EL2": e2h | vm, "ID_AA64MMFR0_EL1": cpu_max, "TCR_EL2": hvhe_tcr,
        "TTBR0_EL2": 0x4_1234_5000, "MAIR_EL2": 0xFF, "VTCR_EL2": host_vtcr, "VTTBR_EL2": 0x8_0000_0000})
    hyp, host = build(builtin_named("s1-4K-lpa2-hvhe"), LAYOUT), build(builtin_named("s2-4K-lpa2"), LAYOUT)
    assert (s1.name, s1.geom) == ("el2&0", hyp.table.geom)
    assert (s2.name, s2.geom) == ("stage2", host.table.geom)
    r1, r2 = hyp.table.regs(), host.table.regs()
    assert isinstance(r1, Stage1Regs) and isinstance(r2, Stage2Regs)
    back = regimes_from_registers({
        "SCTLR_EL2": r1.sctlr_el2_set, "HCR_EL2": r1.hcr_el2_set | r2.hcr_el2_set, "ID_AA64MMFR0_EL1": cpu_max,
        "TCR_EL2": r1.tcr_el2, "TTBR0_EL2": r1.ttbr0_el2, "MAIR_EL2": r1.mair_el2, "VTCR_EL2": r2.vtcr_el2,
        "VTTBR_EL2": r2.vttbr_el2})
    assert [(r.name, r.geom) for r in back] == [("el2&0", hyp.table.geom), ("stage2", host.table.geom)]
    assert [r.root for r in back] == [hyp.table.pgd, host.table.pgd]


# -- the check can fail: a model that reads DS = 1 descriptors wrongly ---------------------------

@pytest.mark.parametrize(("stage", "granule", "e2h"), [(Stage.S1, Granule.K4, True), (Stage.S2, Granule.K16, False)],
                         ids=ids)
def test_a_model_dropping_oa_51_50_fails_the_check(target: Target, stage: Stage, granule: Granule,
                                                    e2h: bool) -> None:
    """A test double of the model whose copy of one page descriptor lost bits [9:8] (OA[51:50]
    with DS = 1; SH without it): the MMU translates to 0xF_xxxx..., the model to 0x3_xxxx...,
    and exactly that page mismatches, for both AT forms."""
    from harness.check.engine import check_at, used_image

    g = granule.size
    va = 0x2000_0000
    sc = Scenario("wrong-oa", stage, granule, 52, 52, lpa2=True, e2h=e2h,
                  maps=(MapSpec(va, 4 * g, HIGH_PA, Prot.RW),))
    built = build(sc, target.layout)
    tb = built.table
    target.install(tb.regs(), used_image(tb))  # the MMU gets the true tables
    step = subject_of_built(built).walk(va + g, READ).steps[-1]
    assert step.raw is not None and d.SH.get(step.raw) == HIGH_PA >> 50
    tb.mem.write64(step.desc_pa, step.raw & ~d.SH.mask)  # the model's copy lies
    addrs = np.array([va + 0x10, va + g + 0x18, va + 2 * g, va + 4 * g], dtype=np.uint64)
    rep = CheckReport(sc.name, tb.geom.describe(), "x")
    check_at(rep, target, tb, addrs)
    target.uninstall()
    assert not rep.ok and rep.mismatched == 2
    assert {m.address for m in rep.mismatches} == {va + g + 0x18}
    text = rep.text()
    assert f"PA {HIGH_PA + g:#x}" in text  # the MMU's answer: OA[51:48] = 0xf
    assert f"-> {(HIGH_PA & ~(3 << 50)) + g + 0x18:#x}" in text  # the lying model's: OA[51:50] lost
