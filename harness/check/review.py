"""The v3 review questions, settled on the MMU.

Gavin Shan's review of v3 02/21 of the walker series (``../shared/seed``) asked two questions, and
a later upstream fix (357ad203d45c) answered a third one nobody asked in that thread:

1. **Concatenated PGD pages.** ``kvm_pgd_pages(ia_bits, start_level)`` as posted passes the start
   level to ``__kvm_pgd_page_idx``; the review proposed ``KVM_PGTABLE_MAX_LEVELS - start_level + 1``.
   The MMU is asked: with the model's PGD (as many pages as the architecture concatenates), the
   last page of the input range translates through the last PGD page; zeroing the PGD pages the
   proposal would not have allocated makes the MMU fault there.
2. **Range check.** The posted walker rejects ``addr > limit || end > limit``; the review proposed
   ``>=``. The end is exclusive: a walk that visits the last page has ``end == 2**ia_bits``.
3. **Unaligned start** (357ad203d45c). After a leaf the posted v3 walker advanced with ``addr += size``
   without aligning down: a walk that starts inside a block skips the first entry after it.

Each question becomes a :class:`Verdict` measured on a running target (any
:class:`~harness.check.engine.TargetLike`; :class:`~harness.target.Target` is one).
Addresses are chosen so that no ``AT S12E1*`` meets a stage-2 permission fault (QEMU 10.0.2
aborts, :data:`harness.check.divergences.AT_HAZARDS`): write protection is observed with real
stores from the EL1 stub.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.arch import descriptors as d
from harness.arch.geometry import (
    MAX_PGD_PAGES,
    MIN_IA_BITS,
    Geometry,
    Granule,
    Stage,
    level_size,
    max_ia_bits,
    stage2_start_levels,
)
from harness.arch.registers import (
    ESR_EC,
    ISS_DFSC,
    ExceptionClass,
    FaultKind,
    Par,
    fault_status,
)
from harness.check.engine import TargetLike, used_image
from harness.check.review_model import (
    posted_pgd_pages,
    posted_range_rejects,
    proposed_pgd_pages,
    proposed_range_rejects,
)
from harness.check.scenario import MapSpec, Scenario, build
from harness.core.memory import PagePool, PoolImage
from harness.core.pgtable import Stage2Pgtable
from harness.core.prot import Prot
from harness.core.translate import READ, expected_par, par_compare_mask, translate
from harness.core.walker import UPSTREAM_RULES, V3_RULES, Walker, WalkFlags, WalkRules, walk, walk_range

S2_PA_BITS = {Granule.K4: 48, Granule.K16: 48, Granule.K64: 52}

Q_PGD = "kvm_pgd_pages(): how many concatenated PGD pages (posted vs Gavin's MAX_LEVELS - start_level + 1)?"
Q_RANGE = "_kvm_pgtable_walk(): reject end > limit (posted) or end >= limit (Gavin)?"
Q_ALIGN = "357ad203d45c: does a walk that starts inside a block skip the next entry (the posted v3 walker)?"


@dataclass
class Verdict:
    """One review question, its answer as measured, the evidence, and whether the answer held."""

    question: str
    answer: str
    evidence: list[str]
    holds: bool
    data: dict[str, Any] = field(default_factory=dict)  # the measured values, per configuration
    title: str = ""  # a short name for tables

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "question": self.question, "answer": self.answer, "holds": self.holds,
                "evidence": list(self.evidence), "data": self.data}


# -- shared helpers -------------------------------------------------------------------------------

def _stage2_table(layout: Any, name: str, granule: Granule, ia_bits: int, pa_bits: int, start_level: int | None,
                  maps: Sequence[MapSpec], access: bool = False, rules: WalkRules = UPSTREAM_RULES) -> Stage2Pgtable:
    """A stage-2 table through the one scenario builder (firmware regions included)."""
    sc = Scenario(name, Stage.S2, granule, ia_bits, pa_bits, start_level, maps=tuple(maps), access=access)
    table = build(sc, layout, rules).table
    assert isinstance(table, Stage2Pgtable)
    return table


class _Overlay:
    """Table memory as the MMU would see it with some pool ranges zeroed (for the model's PAR)."""

    def __init__(self, pool: PagePool, zeroed: Sequence[tuple[int, int]]) -> None:
        self.pool = pool
        self.zeroed = list(zeroed)

    def read64(self, pa: int) -> int:
        if any(lo <= pa < hi for lo, hi in self.zeroed):
            return 0
        return self.pool.read64(pa)

    def contains(self, pa: int) -> bool:
        return self.pool.contains(pa)


def _zeroed_image(image: PoolImage, zeroed: Sequence[tuple[int, int]]) -> PoolImage:
    data = bytearray(image.data)
    for lo, hi in zeroed:
        data[lo - image.base : hi - image.base] = bytes(hi - lo)
    return PoolImage(image.base, bytes(data))


def _expected(table: Stage2Pgtable, addr: int, zeroed: Sequence[tuple[int, int]] = ()) -> tuple[int, int]:
    """(expected PAR_EL1, compare mask) for ``AT S12E1R`` at ``addr`` per the architectural walk."""
    assert table.pgd is not None
    mem = _Overlay(table.mem, zeroed) if zeroed else table.mem
    t = translate(mem, table.geom, table.pgd, addr, READ)
    return expected_par(t), par_compare_mask(t)


@contextmanager
def _installed(target: TargetLike, table: Stage2Pgtable, image: PoolImage | None = None) -> Iterator[None]:
    target.install(table.regs(), image if image is not None else used_image(table))
    try:
        yield
    finally:
        target.uninstall()


def _par_text(par: int) -> str:
    return str(Par(par))


# -- 1. concatenated PGD pages ----------------------------------------------------------------------

def pgd_configs() -> list[tuple[Granule, int, int]]:
    """(granule, ia_bits, start_level): one per (start level, PGD pages) the architecture allows
    (the smallest IPA that gives it), plus the configurations the review names."""
    seen: dict[tuple[Granule, int, int], tuple[Granule, int, int]] = {}
    for g in Granule:
        pa = S2_PA_BITS[g]
        for ia in range(MIN_IA_BITS, max_ia_bits(g) + 1):
            for lvl in stage2_start_levels(g, ia, pa):
                pages = Geometry.create(Stage.S2, g, ia, pa, lvl).pgd_pages
                seen.setdefault((g, lvl, pages), (g, ia, lvl))
    named = [(Granule.K64, 40, 2), (Granule.K64, 33, 3), (Granule.K4, 40, 1), (Granule.K4, 43, 1)]
    return sorted(set(seen.values()) | set(named), key=lambda c: (c[0].shift, c[2], c[1]))


@dataclass
class PgdProbe:
    """One stage-2 configuration's PGD pages, as the model and the MMU see them."""

    granule: Granule
    ia_bits: int
    start_level: int
    pages: int  # the model's geometry (the Arm ARM)
    posted: int  # kvm_pgd_pages() as posted in v3
    proposed: int  # with Gavin's change
    pgd: int
    first_ipa: int
    last_ipa: int
    first_pa: int
    last_pa: int
    last_entry_pa: int  # the initial-level descriptor for the last page
    last_entry_page: int  # which PGD page holds it
    par_first: int
    par_last: int
    expected_last: int
    matches: bool  # both PARs equal the model's under the compare mask
    # the last PGD page zeroed in guest RAM: the MMU must fault on the last page
    par_last_page_zeroed: int
    expected_last_page_zeroed: int
    last_page_needed: bool
    # the pages beyond the proposal zeroed (only when the proposal allocates fewer)
    par_proposed_only: int | None = None
    par_first_proposed_only: int | None = None
    proposal_refuted: bool | None = None

    def describe(self) -> str:
        return f"{self.granule.label}/{self.ia_bits}-bit L{self.start_level}"

    @property
    def holds(self) -> bool:
        ok = (self.matches and self.last_page_needed and self.posted == self.pages
              and self.last_entry_page == self.pages - 1)
        return ok and self.proposal_refuted is not False


def probe_pgd(target: TargetLike, granule: Granule, ia_bits: int, start_level: int) -> PgdProbe:
    """Map the first and last pages of the IPA range; AT S12E1R both; then zero PGD pages."""
    layout = target.layout
    pa_bits = S2_PA_BITS[granule]
    g = granule.size
    first, last = 0, (1 << ia_bits) - g
    first_pa, last_pa = int(layout.scratch_base), int(layout.scratch_base) + g
    table = _stage2_table(layout, "review-pgd", granule, ia_bits, pa_bits, start_level,
                          (MapSpec(first, g, first_pa, Prot.RW), MapSpec(last, g, last_pa, Prot.RW)))
    geom = table.geom
    pgd = table.pgd
    assert pgd is not None
    image = used_image(table)
    with _installed(target, table, image):
        par_first, par_last = (int(p) for p in target.at([first, last], "S12E1R"))
    exp_first, mask_first = _expected(table, first)
    exp_last, mask_last = _expected(table, last)
    matches = (par_first ^ exp_first) & mask_first == 0 and (par_last ^ exp_last) & mask_last == 0

    last_page = (pgd + (geom.pgd_pages - 1) * g, pgd + geom.pgd_pages * g)
    with _installed(target, table, _zeroed_image(image, [last_page])):
        (par_zeroed,) = (int(p) for p in target.at([last], "S12E1R"))
    exp_zeroed, mask_zeroed = _expected(table, last, [last_page])
    needed = (par_zeroed ^ exp_zeroed) & mask_zeroed == 0 and Par(par_zeroed).fault

    probe = PgdProbe(
        granule, ia_bits, geom.start_level, geom.pgd_pages, posted_pgd_pages(granule, ia_bits, geom.start_level),
        proposed_pgd_pages(granule, ia_bits, geom.start_level), pgd, first, last, first_pa, last_pa,
        pgd + 8 * geom.pgd_index(last), geom.pgd_page_index(last), par_first, par_last, exp_last, bool(matches),
        par_zeroed, exp_zeroed, bool(needed),
    )
    if probe.proposed < probe.pages:
        beyond = (pgd + probe.proposed * g, pgd + probe.pages * g)
        with _installed(target, table, _zeroed_image(image, [beyond])):
            pf, pl = (int(p) for p in target.at([first, last], "S12E1R"))
        exp_l, mask_l = _expected(table, last, [beyond])
        probe.par_first_proposed_only, probe.par_proposed_only = pf, pl
        probe.proposal_refuted = bool(
            Par(pl).fault and (pl ^ exp_l) & mask_l == 0 and (pf ^ exp_first) & mask_first == 0)
    return probe


def verdict_pgd_pages(target: TargetLike, configs: Sequence[tuple[Granule, int, int]] | None = None) -> Verdict:
    probes = [probe_pgd(target, *c) for c in (configs if configs is not None else pgd_configs())]
    evidence = []
    for p in probes:
        line = (f"{p.describe()}: pages model {p.pages}, posted {p.posted}, proposed {p.proposed}; last IPA "
                f"{p.last_ipa:#x} -> entry {p.last_entry_pa:#x} in PGD page {p.last_entry_page}; MMU "
                f"{'PA ' + hex(Par(p.par_last).pa) if not Par(p.par_last).fault else _par_text(p.par_last)}"
                f"{'' if p.matches else ' (MISMATCH: model ' + _par_text(p.expected_last) + ')'}; "
                f"last PGD page zeroed -> {_par_text(p.par_last_page_zeroed)}")
        if p.par_proposed_only is not None:
            line += (f"; pages {p.proposed}..{p.pages - 1} zeroed (Gavin's count) -> last "
                     f"{_par_text(p.par_proposed_only)}, first "
                     f"{'PA ' + hex(Par(p.par_first_proposed_only or 0).pa)}")
        if p.proposed > MAX_PGD_PAGES:
            line += f"; proposed {p.proposed} > {MAX_PGD_PAGES}: more than the architecture can concatenate"
        evidence.append(line)
    differ = [p for p in probes if p.proposed != p.pages]
    refuted = [p for p in probes if p.proposal_refuted]
    holds = all(p.holds for p in probes) and bool(differ) and bool(refuted)
    answer = (
        f"posted kvm_pgd_pages() is right for all {len(probes)} configurations "
        f"({sum(p.matches for p in probes)} translate the last IPA page through the last PGD page); "
        f"Gavin's count differs in {len(differ)} ({sum(p.proposed > MAX_PGD_PAGES for p in probes)} above "
        f"{MAX_PGD_PAGES} pages, {sum(p.proposed < p.pages for p in probes)} too few: the MMU faults on "
        f"the last page in {len(refuted)} of them)"
    )
    data = {"configs": [
        {"granule": p.granule.label, "ia_bits": p.ia_bits, "start_level": p.start_level, "pages": p.pages,
         "posted": p.posted, "proposed": p.proposed, "last_ipa": p.last_ipa, "last_pa": Par(p.par_last).pa,
         "last_pgd_page": p.last_entry_page, "matches": p.matches, "last_page_needed": p.last_page_needed,
         "proposal_refuted": p.proposal_refuted} for p in probes]}
    return Verdict(Q_PGD, answer, evidence, holds, data, "concatenated PGD pages")


# -- 2. range check --------------------------------------------------------------------------------

RANGE_CONFIGS: tuple[tuple[Granule, int, int], ...] = (
    (Granule.K4, 40, 1), (Granule.K16, 36, 2), (Granule.K64, 40, 2), (Granule.K64, 33, 3),
)


@dataclass
class RangeProbe:
    granule: Granule
    ia_bits: int
    start_level: int
    start: int
    end: int  # == 2**ia_bits
    visited: list[tuple[int, int, int]]  # (addr, level, ptep) of every LEAF visit
    last_visit: tuple[int, int, int]
    last_entry_page: int
    posted_rejects: bool
    proposed_rejects: bool
    empty_walk_at_limit: int  # visits of a walk starting at addr == limit (Will: none)
    pa: int
    par: int
    matches: bool

    @property
    def holds(self) -> bool:
        return (self.end == 1 << self.ia_bits and self.last_visit[0] == self.end - self.granule.size
                and self.last_visit[1] == 3 and not self.posted_rejects and self.proposed_rejects
                and self.empty_walk_at_limit == 0 and self.matches and not Par(self.par).fault
                and Par(self.par).pa == self.pa)


def probe_range(target: TargetLike, granule: Granule, ia_bits: int, start_level: int) -> RangeProbe:
    """Map the last page (the map's own walk has end == 2**ia_bits), record a walk to the limit,
    and AT S12E1R the last page."""
    layout = target.layout
    g = granule.size
    limit = 1 << ia_bits
    last = limit - g
    pa = int(layout.scratch_base) + 2 * g
    # the map's walk(last, g) has end == limit, accepted by the posted check
    table = _stage2_table(layout, "review-range", granule, ia_bits, S2_PA_BITS[granule], start_level,
                          (MapSpec(last, g, pa, Prot.RW),))
    visited: list[tuple[int, int, int]] = []
    rec = Walker(lambda a, e, lvl, ptep, f: visited.append((a, lvl, ptep)), WalkFlags.LEAF)
    start, end = walk_range(table, last - 4 * g, 4 * g + g)  # the last five pages, up to the limit
    walk(table, start, end - start, rec)
    at_limit: list[tuple[int, int, int]] = []
    walk(table, limit, 0, Walker(lambda a, e, lvl, ptep, f: at_limit.append((a, lvl, ptep)), WalkFlags.LEAF))
    with _installed(target, table):
        (par,) = (int(p) for p in target.at([last], "S12E1R"))
    exp, mask = _expected(table, last)
    pgd = table.pgd
    assert pgd is not None
    return RangeProbe(granule, ia_bits, table.geom.start_level, start, end, visited, visited[-1],
                      table.geom.pgd_page_index(last), posted_range_rejects(start, end, ia_bits),
                      proposed_range_rejects(start, end, ia_bits), len(at_limit), pa, par,
                      (par ^ exp) & mask == 0)


def verdict_range(target: TargetLike, configs: Sequence[tuple[Granule, int, int]] = RANGE_CONFIGS) -> Verdict:
    probes = [probe_range(target, *c) for c in configs]
    evidence = []
    for p in probes:
        a, lvl, ptep = p.last_visit
        evidence.append(
            f"{p.granule.label}/{p.ia_bits}-bit L{p.start_level}: walk [{p.start:#x}, {p.end:#x}) (end == 2^"
            f"{p.ia_bits}) visits {len(p.visited)} leaves, the last {a:#x} at level {lvl} (level-{lvl} entry "
            f"{ptep:#x}; its PGD entry is in PGD page {p.last_entry_page}); posted '>' rejects: "
            f"{p.posted_rejects}, Gavin's '>=' rejects: {p.proposed_rejects}; "
            f"walk from addr == limit visits {p.empty_walk_at_limit}; MMU AT S12E1R "
            f"{a:#x} -> {_par_text(p.par)} (mapped to {p.pa:#x})")
    holds = all(p.holds for p in probes)
    answer = ("keep '>': the end is exclusive, every walk that reaches the last page has end == 2^ia_bits; the "
              "MMU translates that page, and '>=' would make it unmappable (the map of it is such a walk)")
    data = {"configs": [
        {"granule": p.granule.label, "ia_bits": p.ia_bits, "start_level": p.start_level, "end": p.end,
         "last_visit": p.last_visit[0], "last_visit_level": p.last_visit[1], "posted_rejects": p.posted_rejects,
         "proposed_rejects": p.proposed_rejects, "pa": Par(p.par).pa, "fault": Par(p.par).fault}
        for p in probes]}
    return Verdict(Q_RANGE, answer if holds else "the range check did not behave as Will described", evidence,
                   holds, data, "range check (end == 2^ia_bits)")


# -- 3. unaligned start (357ad203d45c) -----------------------------------------------------------------

@dataclass
class AlignProbe:
    granule: Granule
    block: int  # IPA of the level-2 block
    block_size: int
    next_region: int  # IPA of the level-3 table's first page (block + block_size)
    walk_start: int
    walk_end: int
    posted_visits: list[tuple[int, int]]  # (addr passed to the visitor, level)
    fixed_visits: list[tuple[int, int]]
    skipped: list[int]  # leaf addresses (aligned) the fixed walk visits and the posted one does not
    posted_writable: bool  # model: the posted walker's wrprotect left next_region writable
    fixed_writable: bool
    # real stores from the EL1 stub: [block + g, next_region, next_region + g]
    probes: list[int]
    posted_stores: list[bool]
    fixed_stores: list[bool]
    posted_esr: list[int]
    fixed_esr: list[int]

    @property
    def holds(self) -> bool:
        perm3 = fault_status(FaultKind.PERMISSION, 3)
        fixed_fault_ok = all(
            ESR_EC.get(e) == ExceptionClass.DABT_LOWER and ISS_DFSC.get(e) == perm3
            for e, done in zip(self.fixed_esr[1:2], self.fixed_stores[1:2], strict=True) if not done)
        return (self.skipped == [self.next_region] and self.posted_writable and not self.fixed_writable
                and self.posted_stores == [False, True, True] and self.fixed_stores == [False, False, True]
                and fixed_fault_ok)


def _align_table(layout: Any, granule: Granule, rules: WalkRules) -> tuple[Stage2Pgtable, int, int]:
    bsize = level_size(granule, 2)
    block = 1 << 32
    block_pa = -(-int(layout.scratch_base) // bsize) * bsize  # the first block-aligned scratch PA
    if block_pa + bsize > int(layout.scratch_base) + int(layout.scratch_size):
        raise ValueError(f"layout: no {bsize:#x}-aligned block fits in scratch RAM")
    pages_pa = int(layout.scratch_base) if block_pa != int(layout.scratch_base) else block_pa + bsize
    maps = (MapSpec(block, bsize, block_pa, Prot.RW),
            MapSpec(block + bsize, 16 * granule.size, pages_pa, Prot.RW))  # a level-3 table after the block
    # real stores from the EL1 stub: access=True maps it
    table = _stage2_table(layout, "review-align", granule, 40, 48, None, maps, access=True, rules=rules)
    return table, block, bsize


def probe_unaligned(target: TargetLike, granule: Granule = Granule.K4) -> AlignProbe:
    layout = target.layout
    g = granule.size
    posted, block, bsize = _align_table(layout, granule, V3_RULES)
    fixed, _, _ = _align_table(layout, granule, UPSTREAM_RULES)
    nxt = block + bsize
    lo, hi = block + g, nxt + g

    def record(table: Stage2Pgtable, rules: WalkRules) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        table.walk(lo, hi - lo, Walker(lambda a, e, lvl, p, f: out.append((a, lvl)), WalkFlags.LEAF), rules)
        return out

    posted_visits, fixed_visits = record(posted, V3_RULES), record(fixed, UPSTREAM_RULES)

    def aligned(v: list[tuple[int, int]], table: Stage2Pgtable) -> set[int]:
        return {a & ~(table.geom.size(lvl) - 1) for a, lvl in v}

    skipped = sorted(aligned(fixed_visits, fixed) - aligned(posted_visits, posted))
    posted.wrprotect(lo, hi - lo)
    fixed.wrprotect(lo, hi - lo)

    def writable(table: Stage2Pgtable) -> bool:
        pte = table.get_leaf(nxt).pte
        return d.is_valid(pte) and bool(d.S2_AP.get(pte) & d.S2AP.WO)

    probes = [block + g, nxt, nxt + g]
    results = []
    for table in (posted, fixed):
        with _installed(target, table):
            rec = target.access(np.array(probes, dtype=np.uint64), write=True, stage=Stage.S2)
        results.append(([bool(c) for c in rec["completed"]], [int(e) for e in rec["esr"]]))
    return AlignProbe(granule, block, bsize, nxt, lo, hi, posted_visits, fixed_visits, skipped, writable(posted),
                      writable(fixed), probes, results[0][0], results[1][0], results[0][1], results[1][1])


def verdict_unaligned(target: TargetLike, granules: Sequence[Granule] = tuple(Granule)) -> Verdict:
    probes = [probe_unaligned(target, g) for g in granules]
    evidence = []
    for p in probes:
        def store(done: bool, esr: int) -> str:
            return "store completes" if done else f"store faults (DFSC {ISS_DFSC.get(esr):#x})"

        evidence.append(
            f"{p.granule.label}: block {p.block:#x}+{p.block_size:#x}, level-3 table at {p.next_region:#x}; "
            f"wrprotect [{p.walk_start:#x}, {p.walk_end:#x}): posted visits {[hex(a) for a, _ in p.posted_visits]}, "
            f"fixed visits {[hex(a) for a, _ in p.fixed_visits]}; skipped by the posted walker: "
            f"{[hex(a) for a in p.skipped]}; MMU store to {p.next_region:#x}: posted "
            f"{store(p.posted_stores[1], p.posted_esr[1])}, fixed {store(p.fixed_stores[1], p.fixed_esr[1])}; "
            f"to {p.probes[0]:#x} (in the block): posted {store(p.posted_stores[0], p.posted_esr[0])}, fixed "
            f"{store(p.fixed_stores[0], p.fixed_esr[0])}")
    holds = all(p.holds for p in probes)
    answer = ("yes: the posted v3 walk skips the first page after the block, which stays writable on the MMU; "
              "with 357ad203d45c (align down, then advance) it is write-protected" if holds
              else "the posted/fixed walks did not differ as 357ad203d45c describes")
    data = {"configs": [
        {"granule": p.granule.label, "block": p.block, "block_size": p.block_size, "next_region": p.next_region,
         "skipped": p.skipped, "posted_stores": p.posted_stores, "fixed_stores": p.fixed_stores} for p in probes]}
    return Verdict(Q_ALIGN, answer, evidence, holds, data, "unaligned start (357ad203d45c)")


# -- all of it ---------------------------------------------------------------------------------------

def run_review(target: TargetLike) -> list[Verdict]:
    return [verdict_pgd_pages(target), verdict_range(target), verdict_unaligned(target)]
