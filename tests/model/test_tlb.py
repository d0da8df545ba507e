"""TLB maintenance (:mod:`harness.core.tlb`, :mod:`harness.arch.tlbi`, :mod:`harness.target.live`),
pure model: what the strict model and the upstream oracle record judges clean, planted mistakes
are judged with the right finding kind, entries the TLB cannot hold need nothing, the TLBI
operand and instruction sequences, and how a live update is sent to a target."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from harness.arch import descriptors as d
from harness.arch import tlbi
from harness.arch.geometry import Geometry, Granule, Stage, level_size
from harness.arch.tlbi import Insn
from harness.core import tlb
from harness.core.kvmops import (
    KPROT_R,
    KPROT_RW,
    KPROT_SW0,
    EventKind,
    KernelFeatures,
    KernelModel,
)
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable, KvmPgtable, Stage2Pgtable
from harness.core.prot import Prot
from harness.core.tlb import Flush, Free, Judgement, MaintLog, Step, Tlbi, Write, judge, writes_between
from harness.target import live

POOL_BASE = 0x4400_0000
K4 = 0x1000
M2 = 0x20_0000
IPA = 0x4000_0000  # 1 GiB aligned
PA = 0x8000_0000
GRANULES = ["4K", "16K", "64K"]

Read64 = Callable[[int], int]


# -- helpers ---------------------------------------------------------------------------------------
def make_pool(granule: Granule | str, pages: int = 64) -> PagePool:
    g = Granule.parse(granule)
    return PagePool(POOL_BASE, pages * g.size, g.size)


def strict(stage: Stage, granule: str = "4K", pages: int = 64) -> tuple[KvmPgtable, PagePool]:
    pool = make_pool(granule, pages)
    t: KvmPgtable = Stage2Pgtable(pool, granule, 40) if stage is Stage.S2 else HypPgtable(pool, granule, 39)
    return t, pool


def oracle(stage: Stage = Stage.S2, series: str = "6.12", pages: int = 256,
           **feat: bool) -> tuple[KernelModel, PagePool]:
    pool = make_pool("4K", pages)
    geom = Geometry.create(stage, "4K", 40 if stage is Stage.S2 else 39)
    return KernelModel(geom, pool, KernelFeatures(series=series, **feat)), pool


def snapshot(pool: PagePool) -> Read64:
    before = pool.words().copy()
    return lambda pa: int(before[(pa - pool.base) // 8])


def record(t: KvmPgtable | KernelModel, pool: PagePool, op: Callable[[], object]) -> tuple[list[Step], Read64]:
    """Run ``op`` with a fresh maintenance log; its steps and a reader of memory before it."""
    read64 = snapshot(pool)
    t.maint = MaintLog()
    op()
    steps = t.maint.take()
    t.maint = None
    return steps, read64


def judged(t: KvmPgtable | KernelModel, steps: Sequence[Step], read64: Read64, order_known: bool = True) -> Judgement:
    assert t.pgd is not None
    return judge(steps, t.geom, t.pgd, read64, order_known)


def run(t: KvmPgtable | KernelModel, pool: PagePool, op: Callable[[], object]) -> tuple[list[Step], Judgement]:
    steps, read64 = record(t, pool, op)
    return steps, judged(t, steps, read64)


def tlbis(steps: Sequence[Step]) -> list[Tlbi]:
    return [s for s in steps if isinstance(s, Tlbi)]


def missing_addrs(j: Judgement) -> list[int]:
    return sorted(f.addr for f in j.findings if f.kind == "tlb-missing")


# -- 1. what the strict model records is enough ---------------------------------------------------
def strict_scenario(t: KvmPgtable, pool: PagePool, base: int, pa: int) -> dict[str, Judgement]:
    """Pages and a level-2 block at ``base``; unmap pages, a range that empties their table, a page
    inside the block (split) and, at stage 2, wrprotect/mkold/relax_perms. Each op judged alone."""
    g = t.granule.size
    l2 = level_size(t.granule, 2)
    pages, block = base + 8 * g, base + 2 * l2
    out: dict[str, Judgement] = {}

    def step(name: str, op: Callable[[], object], duties: int, kinds: set[type]) -> None:
        steps, j = run(t, pool, op)
        assert j.findings == [], (name, [f.message for f in j.findings])
        assert j.duties == duties, name
        assert {type(s) for s in steps} == kinds, name
        out[name] = j

    step("map pages", lambda: t.map(pages, 8 * g, pa, Prot.RW), 0, {Write})
    step("map block", lambda: t.map(block, l2, pa + 2 * l2, Prot.RW), 0, {Write})
    step("unmap pages", lambda: t.unmap(pages + 2 * g, 2 * g), 2, {Write, Tlbi})
    step("unmap empties table", lambda: t.unmap(pages, 8 * g), 6 + 1, {Write, Tlbi, Free})
    assert t.get_leaf(pages).level < 3  # the level-3 table went
    step("split", lambda: t.unmap(block + 3 * g, g), 2, {Write, Tlbi})
    assert t.get_leaf(block).level == 3 and not d.is_valid(t.get_leaf(block + 3 * g).pte)
    if isinstance(t, Stage2Pgtable):
        step("wrprotect", lambda: t.wrprotect(block, 4 * g), 3, {Write, Tlbi})
        step("mkold", lambda: t.mkold(block), 1, {Write, Tlbi})
        step("relax_perms", lambda: t.relax_perms(block + g, Prot.W), 1, {Write, Tlbi})
    return out


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
@pytest.mark.parametrize("granule", GRANULES)
def test_strict_model_steps_judge_clean(stage: Stage, granule: str) -> None:
    t, pool = strict(stage, granule)
    got = strict_scenario(t, pool, 4 * level_size(t.granule, 2), PA)
    assert sum(j.duties for j in got.values()) > 0
    assert len(got) == (8 if stage is Stage.S2 else 5)  # every op of the scenario ran


def test_strict_model_lpa2_stage2_52bit_judges_clean() -> None:
    pool = make_pool("4K")
    t = Stage2Pgtable(pool, "4K", 52, 52, 0, lpa2=True)
    assert (t.geom.start_level, t.geom.pgd_pages) == (0, 16)
    got = strict_scenario(t, pool, 0xA_0000_0000_0000, 0xB_0000_0000_0000)  # above 48 bits, both sides
    assert sum(j.duties for j in got.values()) == 2 + 7 + 2 + 3 + 1 + 1


def test_strict_model_lpa2_hyp_52bit_e2h_judges_clean() -> None:
    pool = make_pool("4K")
    t = HypPgtable(pool, "4K", 52, 52, lpa2=True, e2h=True)
    assert t.geom.start_level == -1
    got = strict_scenario(t, pool, 0xA_0000_0000_0000, 0xB_0000_0000_0000)
    assert sum(j.duties for j in got.values()) == 2 + 7 + 2


# -- 2. planted mistakes ---------------------------------------------------------------------------
def pages_table(stage: Stage) -> tuple[KvmPgtable, PagePool, int]:
    """8 pages at IPA (alone in their level-3 table) and a 2 MiB block at IPA + 4 MiB."""
    t, pool = strict(stage)
    t.map(IPA, 8 * K4, PA, Prot.RW)
    t.map(IPA + 2 * M2, M2, PA + 2 * M2, Prot.RW)
    return t, pool, IPA


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_unmap_without_invalidations_misses_every_cleared_leaf(stage: Stage) -> None:
    t, pool, va = pages_table(stage)
    steps, read64 = record(t, pool, lambda: t.unmap(va + K4, 4 * K4))
    assert judged(t, steps, read64).ok
    j = judged(t, [s for s in steps if not isinstance(s, Tlbi)], read64)
    assert j.counts() == {"tlb-missing": 4}
    assert missing_addrs(j) == [va + i * K4 for i in range(1, 5)]
    assert all(f.level == 3 for f in j.findings)


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_flush_of_the_other_stage_covers_nothing(stage: Stage) -> None:
    t, pool, va = pages_table(stage)
    steps, read64 = record(t, pool, lambda: t.unmap(va, K4))
    other = Flush.EL2_ALL if stage is Stage.S2 else Flush.S2_VMID
    j = judged(t, [Tlbi(other) if isinstance(s, Tlbi) else s for s in steps], read64)
    assert j.counts() == {"tlb-missing": 1}


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
@pytest.mark.parametrize(("target", "wrong"), [("page", 2), ("page", 0), ("block", 3), ("block", 1)])
def test_wrong_level_hint_on_a_leaf_is_a_hint_finding(stage: Stage, target: str, wrong: int) -> None:
    t, pool, va = pages_table(stage)
    addr, size, level = (va, K4, 3) if target == "page" else (va + 2 * M2, M2, 2)
    steps, read64 = record(t, pool, lambda: t.unmap(addr, size))
    assert [(s.addr, s.level) for s in tlbis(steps)] == [(addr, level)]
    j = judged(t, [replace(s, level=wrong) if isinstance(s, Tlbi) else s for s in steps], read64)
    assert j.counts() == {"tlb-hint": 1}
    assert (j.findings[0].addr, j.findings[0].level) == (addr, level)
    # no hint at all is always enough for a leaf
    assert judged(t, [replace(s, level=None) if isinstance(s, Tlbi) else s for s in steps], read64).ok


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
@pytest.mark.parametrize("drop", ["break write", "break invalidation"])
def test_split_without_break_before_make_is_bbm(stage: Stage, drop: str) -> None:
    t, pool, va = pages_table(stage)
    block = va + 2 * M2
    steps, read64 = record(t, pool, lambda: t.unmap(block + 3 * K4, K4))
    assert judged(t, steps, read64).ok
    breaks = [i for i, s in enumerate(steps) if isinstance(s, Write) and s.new == 0 and d.is_valid(s.old)
              and not d.is_table(s.old, 2) and d.pte_to_phys(s.old, Granule.K4) == PA + 2 * M2]
    assert len(breaks) == 1
    i = breaks[0]
    assert isinstance(steps[i + 1], Tlbi) and isinstance(steps[i + 2], Write)
    planted = steps[:i] + steps[i + 1:] if drop == "break write" else steps[:i + 1] + steps[i + 2:]
    j = judged(t, planted, read64)
    assert j.counts().get("tlb-bbm") == 1
    assert [f.addr for f in j.findings if f.kind == "tlb-bbm"] == [block]
    # the kernel's reconstructed writes carry no order: break-before-make is not judged then
    assert "tlb-bbm" not in judged(t, planted, read64, order_known=False).counts()


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_free_before_the_table_invalidation_is_order(stage: Stage) -> None:
    t, pool, va = pages_table(stage)
    steps, read64 = record(t, pool, lambda: t.unmap(va, 8 * K4))
    assert judged(t, steps, read64).ok
    assert isinstance(steps[-1], Free) and isinstance(steps[-2], Tlbi) and steps[-2].level is None
    planted = [*steps[:-2], steps[-1], steps[-2]]
    j = judged(t, planted, read64)
    assert j.counts() == {"tlb-order": 1}
    f = j.findings[0]
    assert (f.addr, f.level) == (va, 2)
    assert d.is_table(f.old, 2) and f.new == 0
    # without the table's invalidation at all: the table entry is missing, and the free is early
    j = judged(t, [*steps[:-2], steps[-1]], read64)
    assert j.counts() == {"tlb-order": 1, "tlb-missing": 1}


@pytest.mark.parametrize(("kind", "level"), [(Flush.EL2_VA_LAST, None), (Flush.EL2_VA_LAST, 2), (Flush.EL2_VA, 2),
                                             (Flush.EL2_VA, 3)])
def test_table_entry_needs_an_all_levels_unhinted_flush(kind: Flush, level: int | None) -> None:
    t, pool, va = pages_table(Stage.S1)
    steps, read64 = record(t, pool, lambda: t.unmap(va, 8 * K4))
    assert steps[-2] == Tlbi(Flush.EL2_VA, va, None)
    j = judged(t, [*steps[:-2], Tlbi(kind, va, level), steps[-1]], read64)
    assert j.counts().get("tlb-hint") == 1
    assert "tlb-missing" not in j.counts()
    assert next(f for f in j.findings if f.kind == "tlb-hint").level == 2


# -- 3. the oracle: table -> block merge, deferred unmap flush -----------------------------------
def merge(series: str, tlb_range: bool = False) -> tuple[KernelModel, list[Step], Read64]:
    m, pool = oracle(series=series, tlb_range=tlb_range)
    assert m.stage2_map(IPA, 16 * K4, PA, KPROT_RW) == 0
    steps, read64 = record(m, pool, lambda: m.stage2_map(IPA, M2, PA, KPROT_RW))
    _, pte, level = m.get_leaf(IPA + 5 * K4)
    assert (level, d.pte_to_phys(pte, Granule.K4)) == (2, PA)  # a block now
    return m, steps, read64


@pytest.mark.parametrize(("series", "tlb_range", "flush"), [("6.12", False, Flush.S2_VMID),
                                                           ("6.12", True, Flush.S2_RANGE),
                                                           ("6.1", False, Flush.S2_VMID)])
def test_oracle_table_to_block_merge_is_clean(series: str, tlb_range: bool, flush: Flush) -> None:
    m, steps, read64 = merge(series, tlb_range=tlb_range)
    assert [s.kind for s in tlbis(steps)] == [flush]
    assert any(isinstance(s, Free) for s in steps)
    j = judged(m, steps, read64)
    assert j.ok, [f.message for f in j.findings]
    assert j.duties == 17  # the table entry and its 16 leaves
    assert j.changed[0] == (IPA, M2, 2)


def test_oracle_merge_with_a_single_page_flush_misses_the_other_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 3a0b870e3448 the merge's break invalidated the table entry as one IPA at the block's
    level: the leaves at the 15 other pages stayed in the TLB."""
    m, steps, read64 = merge("6.12", tlb_range=True)
    planted = [Tlbi(Flush.S2_IPA, IPA, 2) if isinstance(s, Tlbi) else s for s in steps]
    monkeypatch.setattr(tlb, "MAX_FINDINGS", 64)  # 15 missing + 2 hints + bbm + order: above the default cap
    j = judged(m, planted, read64)
    assert j.duties == 17
    assert j.counts()["tlb-missing"] == 15
    assert missing_addrs(j) == [IPA + i * K4 for i in range(1, 16)]
    # the table entry and the page at IPA were reached, but with a level-2 leaf's hint
    assert sorted((f.addr, f.level) for f in j.findings if f.kind == "tlb-hint") == [(IPA, 2), (IPA, 3)]
    monkeypatch.undo()
    capped = judged(m, planted, read64)
    assert len(capped.findings) == tlb.MAX_FINDINGS and capped.duties == 17


@pytest.mark.parametrize("series", ["6.12", "6.1"])
def test_oracle_unmap_judges_clean(series: str) -> None:
    m, pool = oracle(series=series)
    assert m.stage2_map(IPA, 16 * K4, PA, KPROT_RW) == 0
    steps, j = run(m, pool, lambda: m.stage2_unmap(IPA, 16 * K4))
    assert j.ok, [f.message for f in j.findings]
    assert j.duties >= 17
    assert len(tlbis(steps)) == j.duties  # one flush per entry cleared, in place


def test_oracle_unmap_with_deferred_range_flush_judges_clean() -> None:
    m, pool = oracle(tlb_range=True, fwb=True)
    assert m.stage2_map(IPA, 16 * K4, PA, KPROT_RW) == 0
    steps, read64 = record(m, pool, lambda: m.stage2_unmap(IPA, 16 * K4))
    assert steps[-1] == Tlbi(Flush.S2_RANGE, IPA, None, 16)
    assert [s.kind for s in tlbis(steps)[:-1]] == [Flush.S2_IPA] * len(tlbis(steps)[:-1])  # tables only
    assert all(s.level is None for s in tlbis(steps)[:-1])
    j = judged(m, steps, read64)
    assert j.ok, [f.message for f in j.findings]
    assert j.duties >= 17
    # the deferred flush is what covers the leaves (but the one at IPA, which the tables' unhinted
    # flushes at IPA reach too)
    j = judged(m, steps[:-1], read64)
    assert j.counts() == {"tlb-missing": 15}
    assert missing_addrs(j) == [IPA + i * K4 for i in range(1, 16)]


# -- 4. the oracle's hyp map inside a block ---------------------------------------------------
@pytest.mark.parametrize("series", ["6.12", "6.1"])
def test_oracle_hyp_map_inside_a_block_is_bbm(series: str) -> None:
    m, pool = oracle(Stage.S1, series)
    assert m.hyp_map(IPA, M2, PA, KPROT_R) == 0
    _, pte, level = m.get_leaf(IPA)
    assert level == 2 and d.is_valid(pte)
    steps, j = run(m, pool, lambda: m.hyp_map(IPA + 3 * K4, K4, PA + 0x10_0000, KPROT_R))
    _, _, level = m.get_leaf(IPA)
    assert level == 3  # the block was overwritten by a table in place
    assert not tlbis(steps)
    bbm = [f for f in j.findings if f.kind == "tlb-bbm"]
    assert len(bbm) == 1
    assert (bbm[0].addr, bbm[0].level, bbm[0].old) == (IPA, 2, pte)
    assert d.is_table(bbm[0].new, 2)
    if series == "6.1":
        assert any(e.kind is EventKind.WARN for e in m.take_events())


# -- 5. what needs no invalidation --------------------------------------------------------------
@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_invalid_to_valid_writes_need_nothing(stage: Stage) -> None:
    t, pool = strict(stage)
    steps, j = run(t, pool, lambda: t.map(IPA, M2 + 4 * K4, PA, Prot.R))
    assert steps and not tlbis(steps) and all(isinstance(s, Write) and not d.is_valid(s.old) for s in steps)
    assert j.ok and j.duties == 0 and j.changed == []
    m, mpool = oracle(stage)
    op = (lambda: m.stage2_map(IPA, 4 * K4, PA, KPROT_RW)) if stage is Stage.S2 else \
        (lambda: m.hyp_map(IPA, 4 * K4, PA, KPROT_R))
    steps, j = run(m, mpool, op)
    assert steps and not tlbis(steps)
    assert j.ok and j.duties == 0


def test_leaves_with_af_clear_need_no_invalidation() -> None:
    t, pool = strict(Stage.S2)
    assert isinstance(t, Stage2Pgtable)
    t.map(IPA, 4 * K4, PA, Prot.RW)
    assert t.mkold(IPA) and not t.is_young(IPA)
    steps, j = run(t, pool, lambda: t.mkyoung(IPA))
    assert [type(s) for s in steps] == [Write] and t.is_young(IPA)
    assert j.ok and j.duties == 0 and j.changed == []
    # nor does removing one
    t.mkold(IPA)
    steps, read64 = record(t, pool, lambda: t.unmap(IPA, K4))
    j = judged(t, [s for s in steps if not isinstance(s, Tlbi)], read64)
    assert j.ok and j.duties == 0
    # a young one does (the same op, the other page)
    steps, read64 = record(t, pool, lambda: t.unmap(IPA + K4, K4))
    assert judged(t, [s for s in steps if not isinstance(s, Tlbi)], read64).counts() == {"tlb-missing": 1}


def test_software_bit_changes_need_no_invalidation() -> None:
    m, pool = oracle()
    assert m.stage2_map(IPA, K4, PA, KPROT_RW) == 0
    steps, j = run(m, pool, lambda: m.stage2_map(IPA, K4, PA, KPROT_RW | KPROT_SW0))
    assert len(steps) == 1 and isinstance(steps[0], Write)
    assert steps[0].old ^ steps[0].new == KPROT_SW0
    assert j.ok and j.duties == 0
    # every SW bit [58:55] at once, written by hand; one bit beyond them (bit 54, XN) needs a flush
    w = steps[0]
    read64 = snapshot(pool)  # memory has the SW0 entry now
    assert judged(m, [Write(w.ptep, w.new, w.new | d.SW.mask)], read64).duties == 0
    j = judged(m, [Write(w.ptep, w.new, w.new ^ (1 << 54))], read64)
    assert j.duties == 1 and j.counts() == {"tlb-missing": 1}


# -- writes_between: the kernel's update as memory shows it -----------------------------------------
def test_writes_between_and_unordered_judging() -> None:
    t, pool, va = pages_table(Stage.S2)
    steps, read64 = record(t, pool, lambda: t.unmap(va, 8 * K4))
    after = snapshot(pool)
    assert t.pgd is not None
    ws = writes_between(read64, after, t.geom, t.pgd)
    freed = {s.page for s in steps if isinstance(s, Free)}
    final = {s.ptep: s for s in steps if isinstance(s, Write) and s.ptep - s.ptep % K4 not in freed}
    assert sorted((w.ptep, w.old, w.new) for w in ws) == sorted((p, read64(p), s.new) for p, s in final.items())
    assert len(ws) == 1  # the table entry; the leaves' page left the tables
    j = judged(t, [*ws, *tlbis(steps)], read64, order_known=False)
    assert j.ok and j.duties == 1 + 8  # the leaves are found under the table entry that went
    fl = tlbis(steps)
    assert fl[3] == Tlbi(Flush.S2_IPA, va + 3 * K4, 3)
    j = judged(t, [*ws, *fl[:3], *fl[4:]], read64, order_known=False)
    assert j.counts() == {"tlb-missing": 1} and missing_addrs(j) == [va + 3 * K4]
    # the leaf at va is also reached by the table entry's unhinted flush at va
    assert judged(t, [*ws, *fl[1:]], read64, order_known=False).ok


# -- 6. TLBI operands and instruction sequences -------------------------------------------------
@pytest.mark.parametrize(("granule", "tg"), [(Granule.K4, 1), (Granule.K16, 2), (Granule.K64, 3)])
def test_tlbi_operand_ttl_and_address(granule: Granule, tg: int) -> None:
    addr = 0x12_3456_7000 if granule is Granule.K4 else 0x12_3456_0000
    for level in range(4):
        assert tlbi.ttl(granule, level) == tg << 2 | level
        op = tlbi.operand(addr, granule, level)
        assert op >> 44 == tg << 2 | level
        assert op & ((1 << 44) - 1) == addr >> 12
    assert tlbi.ttl(granule, None) == 0
    assert tlbi.operand(addr, granule) == tlbi.operand(addr, granule, None) == addr >> 12
    assert tlbi.operand(1 << 51 | 0x10000, granule, 3) == (1 << 39 | 0x10) | (tg << 2 | 3) << 44  # 52-bit
    with pytest.raises(ValueError, match="level"):
        tlbi.ttl(granule, 4)
    with pytest.raises(ValueError, match="level"):
        tlbi.ttl(granule, -1)


def rows(a: npt.NDArray[np.void]) -> list[tuple[int, int]]:
    return [(int(r["insn"]), int(r["a0"])) for r in a]


def test_insns_of_a_stage2_ipa_flush() -> None:
    got = rows(live.insns([Tlbi(Flush.S2_IPA, 0x4012_3000, 3)], Granule.K4))
    assert got == [(Insn.DSB_ISHST, 0), (Insn.TLBI_IPAS2E1IS, 0x40123 | 0b0111 << 44), (Insn.DSB_ISH, 0),
                   (Insn.TLBI_VMALLE1IS, 0), (Insn.DSB_ISH, 0), (Insn.ISB, 0)]
    nsh = rows(live.insns([Tlbi(Flush.S2_IPA_NSH, 0x4012_3000, 2)], Granule.K4))
    assert nsh == [(Insn.DSB_NSHST, 0), (Insn.TLBI_IPAS2E1, 0x40123 | 0b0110 << 44), (Insn.DSB_NSH, 0),
                   (Insn.TLBI_VMALLE1, 0), (Insn.DSB_NSH, 0), (Insn.ISB, 0)]
    # no hint, and a level outside 0..3, give TTL 0
    for level in (None, 7):
        assert rows(live.insns([Tlbi(Flush.S2_IPA, 0x4012_3000, level)], Granule.K4))[1] == \
            (Insn.TLBI_IPAS2E1IS, 0x40123)


@pytest.mark.parametrize("granule", [Granule.K4, Granule.K16, Granule.K64])
@pytest.mark.parametrize("pages", [1, 5])
def test_insns_of_a_range_flush_one_ipa_per_page(granule: Granule, pages: int) -> None:
    start = 0x4000_0000
    got = rows(live.insns([Tlbi(Flush.S2_RANGE, start, None, pages)], granule))
    ipas = [a0 for insn, a0 in got if insn == Insn.TLBI_IPAS2E1IS]
    assert ipas == [(start + i * granule.size) >> 12 for i in range(pages)]
    assert got[0] == (Insn.DSB_ISHST, 0)
    assert got[1 + pages:] == [(Insn.DSB_ISH, 0), (Insn.TLBI_VMALLE1IS, 0), (Insn.DSB_ISH, 0), (Insn.ISB, 0)]


def test_insns_of_the_other_flushes() -> None:
    g = Granule.K16
    one = {
        Tlbi(Flush.S2_VMID): [(Insn.DSB_ISHST, 0), (Insn.TLBI_VMALLS12E1IS, 0), (Insn.DSB_ISH, 0), (Insn.ISB, 0)],
        Tlbi(Flush.EL2_VA, 0x8000, 2): [(Insn.DSB_ISHST, 0), (Insn.TLBI_VAE2IS, 0x8 | 0b1010 << 44),
                                        (Insn.DSB_ISH, 0), (Insn.ISB, 0)],
        Tlbi(Flush.EL2_VA_LAST, 0x8000, 3): [(Insn.DSB_ISHST, 0), (Insn.TLBI_VALE2IS, 0x8 | 0b1011 << 44),
                                             (Insn.DSB_ISH, 0), (Insn.ISB, 0)],
        Tlbi(Flush.EL2_ALL): [(Insn.DSB_ISHST, 0), (Insn.TLBI_ALLE2IS, 0), (Insn.DSB_ISH, 0), (Insn.ISB, 0)],
    }
    for flush, want in one.items():
        assert rows(live.insns([flush], g)) == want, flush
    both = list(one)
    assert rows(live.insns(both, g)) == [r for f in both for r in one[f]]  # concatenated in order
    assert live.insns([], g).shape == (0,)


# -- 7. live.apply ------------------------------------------------------------------------------------
class FakeTarget:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def write_pa(self, pa: int, data: bytes) -> None:
        self.calls.append(("write", (pa, data)))

    def live(self, steps: npt.ArrayLike) -> int:
        a = np.asarray(steps)
        self.calls.append(("live", rows(a)))
        return len(a)


def test_apply_writes_in_order_and_one_request_per_run_of_flushes() -> None:
    geom = Geometry.create(Stage.S2, "4K", 40)
    x, y, z, w = (Tlbi(Flush.S2_IPA, 0x1000, 3), Tlbi(Flush.S2_IPA, 0x2000, None), Tlbi(Flush.S2_VMID),
                  Tlbi(Flush.S2_RANGE, 0x4000, None, 2))
    steps: list[Step] = [x, Write(0x100, 5, 0), y, z, Free(0x9000), w, Write(0x108, 0, 1 << 63 | 3),
                         Free(0xA000), Write(0x110, 3, 0), z]
    target = FakeTarget()
    assert live.apply(target, steps, geom) == 3
    assert target.calls == [
        ("live", rows(live.insns([x], geom.granule))),
        ("write", (0x100, (0).to_bytes(8, "little"))),
        ("live", rows(live.insns([y, z, w], geom.granule))),  # the free does not end the run
        ("write", (0x108, (1 << 63 | 3).to_bytes(8, "little"))),
        ("write", (0x110, (0).to_bytes(8, "little"))),
        ("live", rows(live.insns([z], geom.granule))),
    ]
    target = FakeTarget()
    assert live.apply(target, [Free(0x9000), Write(0x100, 0, 7), Free(0xA000)], geom) == 0
    assert target.calls == [("write", (0x100, (7).to_bytes(8, "little")))]


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_apply_of_a_recorded_update(stage: Stage) -> None:
    t, pool, va = pages_table(stage)
    steps, _ = record(t, pool, lambda: t.unmap(va, 8 * K4))
    target = FakeTarget()
    n = live.apply(target, steps, t.geom)
    writes = [s for s in steps if isinstance(s, Write)]
    assert [c[1] for c in target.calls if c[0] == "write"] == [(s.ptep, s.new.to_bytes(8, "little")) for s in writes]
    assert n == len(writes) == 9  # each write followed by its own invalidation
    lives = [c[1] for c in target.calls if c[0] == "live"]
    assert lives == [rows(live.insns([s], t.granule)) for s in tlbis(steps)]
