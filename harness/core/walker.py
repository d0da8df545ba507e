"""The stand-alone page-table walker (the seed's ``kvm_pgtable_walk``), modelled in Python.

A walk visits the entries that translate ``[addr, addr + size)`` depth first. A visitor asks for
LEAF visits (valid leaves and invalid entries alike), TABLE_PRE (a table entry before its
children) and TABLE_POST (after them). Every table operation in :mod:`harness.core.pgtable` is a
visitor of this one walker.

Semantics (the seed, with the upstream fixes that came after it, each switchable so the review
verdicts can show the difference):

* the start is aligned down and the end aligned up to the granule;
* a start or end beyond ``2**ia_bits`` is a range error; the end is exclusive, so
  ``end == 2**ia_bits`` is accepted, and a start equal to it walks nothing;
* the entry is re-read after a LEAF callback (the walk descends into a table the callback
  installed) and, since a9f0e3d5a089, after a TABLE_PRE callback (it does not follow a table the
  callback removed);
* after a leaf the walk advances to the next entry's start: 357ad203d45c aligns down before
  adding the entry's size, so a walk that starts inside a block does not skip the next entry;
* an exception raised by the visitor stops the walk and propagates unchanged;
* the initial level is walked one (possibly concatenated) PGD page at a time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from harness.arch.descriptors import is_table, pte_to_phys
from harness.arch.geometry import (
    ENTRY_BYTES,
    MAX_LEVELS,
    MIN_LEVEL,
    Geometry,
    Granule,
    level_shift,
    ptrs_per_table,
)
from harness.arch.geometry import pgd_page_index as _pgd_page_index


class WalkFlags(enum.IntFlag):
    LEAF = 1 << 0
    TABLE_PRE = 1 << 1
    TABLE_POST = 1 << 2


class WalkError(Exception):
    """The walk cannot start or continue (no PGD, a level past the last)."""


class WalkRangeError(WalkError):
    """``addr`` or ``end`` lies beyond the input address space (the seed's -ERANGE)."""


class Memory(Protocol):
    def read64(self, pa: int) -> int: ...


class WalkablePgtable(Protocol):
    """What the walker needs of a page table (``struct kvm_pgtable``)."""

    @property
    def ia_bits(self) -> int: ...
    @property
    def start_level(self) -> int: ...
    @property
    def granule(self) -> Granule: ...
    @property
    def lpa2(self) -> bool: ...  # descriptors in the FEAT_LPA2 (DS = 1) form
    @property
    def pgd(self) -> int | None: ...
    @property
    def mem(self) -> Memory: ...


class GeometryShape:
    """The walker's view of a table's shape, read from its ``geom`` (a mixin for page tables)."""

    geom: Geometry

    @property
    def ia_bits(self) -> int:
        return self.geom.ia_bits

    @property
    def start_level(self) -> int:
        return self.geom.start_level

    @property
    def granule(self) -> Granule:
        return self.geom.granule

    @property
    def lpa2(self) -> bool:
        return self.geom.lpa2


# Visitor: (addr, end, level, ptep, flag) -> None. ``ptep`` is the entry's physical address.
VisitorFn = Callable[[int, int, int, int, WalkFlags], None]


@dataclass(frozen=True)
class Walker:
    """A visitor and the kinds of entries it wants to see (``struct kvm_pgtable_walker``)."""

    cb: VisitorFn
    flags: WalkFlags


@dataclass(frozen=True)
class WalkRules:
    """Which upstream fixes the walk applies."""

    align_after_leaf: bool = True  # 357ad203d45c
    reload_after_table_pre: bool = True  # a9f0e3d5a089


UPSTREAM_RULES = WalkRules()
V3_RULES = WalkRules(align_after_leaf=False, reload_after_table_pre=False)  # the posted v3 (the seed)


def align_down(x: int, a: int) -> int:
    return x & ~(a - 1)


def align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class _WalkData:
    __slots__ = ("addr", "end", "granule", "idx_mask", "lpa2", "mem", "ptrs", "rules", "shifts", "walker")

    def __init__(self, pgt: WalkablePgtable, addr: int, end: int, walker: Walker,
                 rules: WalkRules) -> None:
        self.addr = addr
        self.end = end
        self.walker = walker
        self.rules = rules
        self.granule = pgt.granule
        self.lpa2 = pgt.lpa2
        self.mem = pgt.mem
        self.ptrs = ptrs_per_table(pgt.granule)
        self.idx_mask = self.ptrs - 1
        # Indexed by level - MIN_LEVEL: levels run from -1 (4K with DS = 1) to 3.
        self.shifts = tuple(level_shift(pgt.granule, lvl) for lvl in range(MIN_LEVEL, MAX_LEVELS))


def _visit(data: _WalkData, ptep: int, level: int) -> None:
    addr = data.addr
    flags = data.walker.flags
    pte = data.mem.read64(ptep)
    table = is_table(pte, level)

    reload = False
    if table and flags & WalkFlags.TABLE_PRE:
        data.walker.cb(addr, data.end, level, ptep, WalkFlags.TABLE_PRE)
        reload = data.rules.reload_after_table_pre
    elif not table and flags & WalkFlags.LEAF:
        data.walker.cb(addr, data.end, level, ptep, WalkFlags.LEAF)
        reload = True
    if reload:
        pte = data.mem.read64(ptep)
        table = is_table(pte, level)

    if not table:
        size = 1 << data.shifts[level - MIN_LEVEL]
        if data.rules.align_after_leaf:
            data.addr = align_down(data.addr, size) + size
        else:
            data.addr += size
        return

    _walk_table(data, pte_to_phys(pte, data.granule, data.lpa2), level + 1)

    if flags & WalkFlags.TABLE_POST:
        data.walker.cb(addr, data.end, level, ptep, WalkFlags.TABLE_POST)


def _walk_table(data: _WalkData, table_pa: int, level: int) -> None:
    if level >= MAX_LEVELS:
        raise WalkError(f"level {level}: the walk went past the last level ({MAX_LEVELS - 1})")
    idx = (data.addr >> data.shifts[level - MIN_LEVEL]) & data.idx_mask
    while idx < data.ptrs and data.addr < data.end:
        _visit(data, table_pa + idx * ENTRY_BYTES, level)
        idx += 1


def pgd_page_index(pgt: WalkablePgtable, addr: int) -> int:
    """Which concatenated PGD page holds the initial-level entry for ``addr`` (the seed's
    ``__kvm_pgd_page_idx``; :func:`harness.arch.geometry.pgd_page_index`)."""
    return _pgd_page_index(pgt.granule, pgt.ia_bits, pgt.start_level, addr)


def walk_range(pgt: WalkablePgtable, addr: int, size: int) -> tuple[int, int]:
    """The aligned ``[start, end)`` a walk of ``(addr, size)`` covers, or a range error."""
    if addr < 0 or size < 0:
        raise WalkRangeError(f"addr/size: expected non-negative values, got {addr:#x}/{size:#x}")
    gran = pgt.granule.size
    start = align_down(addr, gran)
    end = align_up(addr + size, gran)
    limit = 1 << pgt.ia_bits
    if start > limit or end > limit:
        raise WalkRangeError(
            f"addr/size: [{addr:#x}, {addr + size:#x}) reaches beyond the {pgt.ia_bits}-bit input "
            f"range (limit {limit:#x}, exclusive end allowed)"
        )
    return start, end


def walk(pgt: WalkablePgtable, addr: int, size: int, walker: Walker,
         rules: WalkRules = UPSTREAM_RULES) -> None:
    """Walk ``[addr, addr + size)`` of ``pgt`` with ``walker`` (``kvm_pgtable_walk``)."""
    start, end = walk_range(pgt, addr, size)
    if pgt.pgd is None:
        raise WalkError("pgd: the page table has no PGD (not initialised, or destroyed)")
    data = _WalkData(pgt, start, end, walker, rules)
    page_bytes = pgt.granule.size
    idx = pgd_page_index(pgt, data.addr)
    while data.addr < data.end:
        _walk_table(data, pgt.pgd + idx * page_bytes, pgt.start_level)
        idx += 1
