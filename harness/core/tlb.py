"""What a table update does to the TLB, and whether that is enough by the architecture's rules.

An update is a list of :data:`Step`: descriptor writes (:class:`Write`, with the old value),
invalidations in upstream's helper vocabulary (:class:`Tlbi`: ``__kvm_tlb_flush_vmid_ipa`` and
friends for stage 2, the inline ``tlbi vae2is``/``vale2is`` of the hyp code for stage 1) and
table pages returned to the pool (:class:`Free`), in the order they happen. The table operations
record one (:class:`MaintLog`); :func:`judge` checks it; :func:`harness.target.live.insns` turns
it into the instructions the firmware runs (``LIVE``) so that the same update can happen on a warm
MMU.

The rules (:mod:`harness.arch.tlbi` states them with their Arm ARM headings):

* ``tlb-missing``: a descriptor the TLB may hold (valid; a leaf with AF = 1, since a translation
  that takes an Access flag fault is never cached) changed beyond its software bits, and no later
  invalidation covers it; a table entry that went takes every leaf the TLB may hold from its
  subtree with it (and its own walk-cache entry).
* ``tlb-hint``: an invalidation reached the entry, but with a level hint (TTL) other than the
  entry's level, or, for a table entry, with any level hint or in a last-level-only form.
* ``tlb-bbm``: a valid entry rewritten in place with another output address or block size, or a
  new valid entry made where the old one was broken but its invalidation has not yet happened.
* ``tlb-order``: a table page freed while the invalidation of the table entry that pointed at it
  (the walk-cache entry a walk could still follow into the reused page) is still to come.

Nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.arch import descriptors as d
from harness.arch.geometry import LAST_LEVEL, Geometry, Stage

MAX_SUBTREE_LEAVES = 1 << 20  # leaves enumerated under one detached table (beyond: one obligation per table)
MAX_FINDINGS = 16  # per judged update


class Flush(enum.StrEnum):
    """An invalidation as upstream asks for it (the kernel's helper names; kvmops' event kinds)."""

    S2_IPA = "tlb_flush_vmid_ipa"  # (ipa, level)
    S2_IPA_NSH = "tlb_flush_vmid_ipa_nsh"  # (ipa, level): this PE only
    S2_RANGE = "tlb_flush_vmid_range"  # (start, pages)
    S2_VMID = "tlb_flush_vmid"  # the whole VMID, both stages
    EL2_VA = "tlbi_vae2is"  # (va, level): every level of the walk
    EL2_VA_LAST = "tlbi_vale2is"  # (va, level): the last level only
    EL2_ALL = "tlbi_alle2is"  # the whole EL2 regime


STAGE_OF = {Flush.S2_IPA: Stage.S2, Flush.S2_IPA_NSH: Stage.S2, Flush.S2_RANGE: Stage.S2, Flush.S2_VMID: Stage.S2,
            Flush.EL2_VA: Stage.S1, Flush.EL2_VA_LAST: Stage.S1, Flush.EL2_ALL: Stage.S1}
LAST_LEVEL_FLUSHES = frozenset({Flush.EL2_VA_LAST})
WHOLE_REGIME = frozenset({Flush.S2_VMID, Flush.EL2_ALL})


@dataclass(frozen=True)
class Write:
    ptep: int
    old: int
    new: int


@dataclass(frozen=True)
class Tlbi:
    kind: Flush
    addr: int = 0
    level: int | None = None  # the level hint asked for (None: no hint)
    pages: int = 0  # S2_RANGE: granule-sized pages from addr

    def text(self) -> str:
        if self.kind in WHOLE_REGIME:
            return f"{self.kind}()"
        if self.kind is Flush.S2_RANGE:
            return f"{self.kind}({self.addr:#x}, {self.pages} pages)"
        return f"{self.kind}({self.addr:#x}, {'no hint' if self.level is None else f'level {self.level}'})"


@dataclass(frozen=True)
class Free:
    page: int


Step = Write | Tlbi | Free


@dataclass
class MaintLog:
    """The steps of one or more updates, as a table operation records them."""

    steps: list[Step] = field(default_factory=list)

    def write(self, ptep: int, old: int, new: int) -> None:
        self.steps.append(Write(ptep, old, new))

    def tlbi(self, kind: Flush, addr: int = 0, level: int | None = None, pages: int = 0) -> None:
        self.steps.append(Tlbi(kind, addr, level, pages))

    def free(self, page: int) -> None:
        self.steps.append(Free(page))

    def take(self) -> list[Step]:
        out, self.steps = self.steps, []
        return out


# -- judging -------------------------------------------------------------------------------------
@dataclass
class TlbFinding:
    kind: str  # tlb-missing, tlb-hint, tlb-bbm, tlb-order
    rule: str  # the Arm ARM requirement, in words
    message: str
    addr: int
    level: int
    old: int
    new: int

    def as_json(self) -> dict[str, object]:
        return {"kind": self.kind, "rule": self.rule, "message": self.message, "address": self.addr,
                "level": self.level, "old": self.old, "new": self.new}


RULES = {
    "tlb-missing": "Arm ARM D8 'TLB maintenance requirements': after a translation table entry that may be "
                   "held in a TLB changes, the old translation can be used until a TLB invalidation that "
                   "covers it completes",
    "tlb-hint": "Arm ARM, TLBI operand TTL field: with an incorrect TTL for the entry being invalidated, no "
                "entries are required to be invalidated; a last-level-only TLBI leaves walk-cache entries",
    "tlb-bbm": "Arm ARM D8 'Using break-before-make when updating translation table entries': a change of "
               "output address or block size of a valid entry goes through an invalid entry and a "
               "completed TLB invalidation first",
    "tlb-order": "Arm ARM D8 break-before-make: a table may still be walked from the TLB's walk caches until "
                 "the invalidation of the entry that pointed at it completes; freeing (reusing) it before "
                 "then is unsafe",
}


@dataclass
class _Duty:
    """An invalidation the TLB needs: the entry (its VA range and level) that changed."""

    lo: int
    hi: int
    level: int
    table: bool
    write: Write
    child: int | None = None  # a table entry: the page it pointed at
    bad_hint: str | None = None


@dataclass
class Judgement:
    duties: int = 0  # entries whose invalidation the update needed (leaves under a table that went included)
    findings: list[TlbFinding] = field(default_factory=list)  # the first MAX_FINDINGS
    changed: list[tuple[int, int, int]] = field(default_factory=list)  # (va, size, level) of entries that changed

    @property
    def ok(self) -> bool:
        return not self.by_kind

    by_kind: dict[str, int] = field(default_factory=dict)  # every finding, kept or not

    def add(self, f: TlbFinding) -> None:
        self.by_kind[f.kind] = self.by_kind.get(f.kind, 0) + 1
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(f)

    def counts(self) -> dict[str, int]:
        return dict(self.by_kind)


def cached(pte: int, level: int) -> bool:
    """Whether the TLB may hold what this entry gives: valid, and a leaf only with AF set."""
    if not d.is_valid(pte):
        return False
    return d.is_table(pte, level) or bool(d.AF.get(pte))


def _relevant_change(old: int, new: int) -> bool:
    return bool((old ^ new) & ~d.SW.mask)


class _Tables:
    """Where each table page sits (level, VA base), with the memory as the writes leave it."""

    def __init__(self, geom: Geometry, root: int, read64: Callable[[int], int]) -> None:
        self.geom = geom
        self.read = read64
        self.mem: dict[int, int] = {}
        self.where: dict[int, tuple[int, int]] = {}
        g = geom.granule.size
        for i in range(geom.pgd_pages):
            self.where[root + i * g] = (geom.start_level, i * geom.size(geom.start_level) * (g // 8))
        self._index(root, g)

    def word(self, pa: int) -> int:
        v = self.mem.get(pa)
        return self.read(pa) if v is None else v

    def _page_words(self, page: int, g: int) -> list[int]:
        """A table page's entries: from the memory's word array where it has one (fast), else read."""
        mem: Any = getattr(self.read, "__self__", None)
        words = getattr(mem, "words", None)
        if words is not None and hasattr(mem, "base"):
            arr = words()
            off = (page - int(mem.base)) // 8
            if off >= 0 and off + g // 8 <= len(arr):
                return [int(w) for w in arr[off:off + g // 8]]
        return [self.read(page + 8 * i) for i in range(g // 8)]

    def _index(self, root: int, g: int) -> None:
        todo = [root + i * g for i in range(self.geom.pgd_pages)]
        while todo:
            page = todo.pop()
            level, base = self.where[page]
            if level >= LAST_LEVEL:
                continue
            for i, pte in enumerate(self._page_words(page, g)):
                if pte & 3 == 3 and d.is_table(pte, level):
                    child = d.pte_to_phys(pte, self.geom.granule, self.geom.lpa2)
                    if child not in self.where:
                        self.where[child] = (level + 1, base + i * self.geom.size(level))
                        todo.append(child)

    def place(self, ptep: int) -> tuple[int, int] | None:
        """(level, VA) of the entry at ``ptep``, None for a page not (yet) in the tables."""
        g = self.geom.granule.size
        page = ptep - ptep % g
        w = self.where.get(page)
        if w is None:
            return None
        level, base = w
        return level, base + ((ptep - page) // 8) * self.geom.size(level)

    def link(self, ptep: int, pte: int) -> None:
        pl = self.place(ptep)
        if pl is None or pl[0] >= LAST_LEVEL or not (d.is_valid(pte) and d.is_table(pte, pl[0])):
            return
        child = d.pte_to_phys(pte, self.geom.granule, self.geom.lpa2)
        self.where[child] = (pl[0] + 1, pl[1])

    def leaves(self, page: int) -> Iterator[tuple[int, int, int, int]]:
        """(ptep, va, level, pte) of every cached leaf under a table page, as memory is now."""
        g = self.geom.granule.size
        todo = [page]
        n = 0
        while todo:
            p = todo.pop()
            w = self.where.get(p)
            if w is None:
                continue
            level, base = w
            for i in range(g // 8):
                pte = self.word(p + 8 * i)
                if not cached(pte, level):
                    continue
                va = base + i * self.geom.size(level)
                if d.is_table(pte, level):
                    todo.append(d.pte_to_phys(pte, self.geom.granule, self.geom.lpa2))
                else:
                    n += 1
                    if n > MAX_SUBTREE_LEAVES:
                        return
                    yield p + 8 * i, va, level, pte


def _needs_bbm(old: int, new: int, level: int, geom: Geometry) -> bool:
    """A valid -> valid change that break-before-make must separate: table <-> leaf, another
    table, another output address (the contiguous bit's change too: another block size)."""
    if d.is_table(old, level) != d.is_table(new, level):
        return True
    if d.pte_to_phys(old, geom.granule, geom.lpa2) != d.pte_to_phys(new, geom.granule, geom.lpa2):
        return True
    return bool((old ^ new) & d.CONTIG.mask) and not d.is_table(old, level)


def _covers(t: Tlbi, duty: _Duty, gran: int) -> bool:
    if t.kind in WHOLE_REGIME:
        return True
    if t.kind is Flush.S2_RANGE:
        return t.addr < duty.hi and duty.lo < t.addr + t.pages * gran
    return duty.lo <= t.addr < duty.hi


def _hint_problem(t: Tlbi, duty: _Duty) -> str | None:
    if duty.table:
        if t.kind in LAST_LEVEL_FLUSHES:
            return f"{t.text()} is a last-level-only invalidation, the entry a level-{duty.level} table"
        if t.level is not None:
            return f"{t.text()} hints a leaf at level {t.level}; the entry is a level-{duty.level} table"
        return None
    if t.level is not None and t.level != duty.level:
        return f"{t.text()} hints level {t.level}; the entry is a level-{duty.level} leaf"
    return None


def judge(steps: Sequence[Step], geom: Geometry, root: int, read64: Callable[[int], int],
          order_known: bool = True) -> Judgement:
    """Check an update's steps against the rules, on the tables as they were before it
    (``read64`` reads that memory; ``root`` the PGD). ``order_known`` False: the writes are
    reconstructed from the memory before and after (the kernel's C code), so only coverage, hints
    and the order of frees against invalidations are judged, not break-before-make."""
    out = Judgement()
    tables = _Tables(geom, root, read64)
    gran = geom.granule.size
    pending: list[_Duty] = []
    freed: set[int] = set()

    def finding(kind: str, msg: str, duty: _Duty) -> None:
        out.add(TlbFinding(kind, RULES[kind], msg, duty.lo, duty.level, duty.write.old, duty.write.new))

    for step in steps:
        if isinstance(step, Write):
            pl = tables.place(step.ptep)
            old = tables.word(step.ptep)
            if pl is not None:
                level, va = pl
                size = geom.size(level)
                w = Write(step.ptep, old, step.new)
                if order_known and d.is_valid(step.new):
                    if d.is_valid(old) and _needs_bbm(old, step.new, level, geom):
                        finding("tlb-bbm", f"level-{level} entry at {va:#x} rewritten valid to valid in place: "
                                           f"{old:#018x} -> {step.new:#018x}", _Duty(va, va + size, level, False, w))
                    else:
                        for p in pending:
                            if p.write.ptep == step.ptep and (d.is_table(p.write.old, level)
                                                              or _needs_bbm(p.write.old, step.new, level, geom)):
                                finding("tlb-bbm", f"level-{level} entry at {va:#x} made ({step.new:#018x}) before "
                                                   f"the invalidation of the entry it replaced "
                                                   f"({p.write.old:#018x})", p)
                                break
                if cached(old, level) and _relevant_change(old, step.new):
                    out.changed.append((va, size, level))
                    is_table = d.is_table(old, level)
                    child = d.pte_to_phys(old, geom.granule, geom.lpa2) if is_table else None
                    pending.append(_Duty(va, va + size, level, is_table, w, child))
                    out.duties += 1
                    if child is not None:
                        for ptep, lva, llevel, pte in tables.leaves(child):
                            pending.append(_Duty(lva, lva + geom.size(llevel), llevel, False,
                                                 Write(ptep, pte, pte), None))
                            out.duties += 1
            tables.mem[step.ptep] = step.new
            tables.link(step.ptep, step.new)
        elif isinstance(step, Tlbi):
            if STAGE_OF[step.kind] is not geom.stage:
                continue
            keep = []
            for p in pending:
                if not _covers(step, p, gran):
                    keep.append(p)
                    continue
                problem = _hint_problem(step, p)
                if problem is None:
                    continue
                p.bad_hint = p.bad_hint or problem
                keep.append(p)
            pending = keep
        else:  # Free
            if step.page in freed:
                continue
            freed.add(step.page)
            for p in pending:
                if p.child == step.page:
                    finding("tlb-order", f"table page {step.page:#x} freed before the invalidation of the "
                                         f"level-{p.level} table entry at {p.lo:#x} that pointed at it", p)
                    break
    for p in pending:
        if p.bad_hint:
            finding("tlb-hint", f"level-{p.level} {'table' if p.table else 'leaf'} at {p.lo:#x} "
                                f"({p.write.old:#018x} -> {p.write.new:#018x}): {p.bad_hint}", p)
        else:
            what = "table entry" if p.table else ("leaf" if p.write.old != p.write.new else
                                                  "leaf under a table entry that went")
            finding("tlb-missing", f"level-{p.level} {what} at [{p.lo:#x}, {p.hi:#x}) "
                                   f"({p.write.old:#018x} -> {p.write.new:#018x}): no invalidation covers it", p)
    return out


def writes_between(before: Callable[[int], int], after: Callable[[int], int], geom: Geometry, root: int) -> list[Write]:
    """The descriptor writes an update made, as far as memory shows them: every slot that differs
    in a table page sitting at the same place (level and input address) before and after. A page
    that left the tables, or was freed and reused elsewhere, is judged through the entry that
    pointed at it (its subtree as it was before). Writes that install a table entry come last, so
    that an old subtree is taken as it was before a reused page is linked again."""
    tb, ta = _Tables(geom, root, before), _Tables(geom, root, after)
    g = geom.granule.size
    first: list[Write] = []
    last: list[Write] = []
    for page in sorted(tb.where):
        if ta.where.get(page) != tb.where[page]:
            continue
        level = tb.where[page][0]
        for i in range(g // 8):
            ptep = page + 8 * i
            old, new = before(ptep), after(ptep)
            if old != new:
                (last if d.is_valid(new) and d.is_table(new, level) else first).append(Write(ptep, old, new))
    return first + last
