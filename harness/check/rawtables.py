"""Random raw translation tables, for fuzzing the model's walk against the MMU.

A random configuration (stage, granule, input size, PA size, start level, so concatenation)
and random descriptors written straight into a small window of the page pool: valid table,
block and page descriptors with random attribute bits (AF, AP/S2AP, SH, AttrIndx/MemAttr with
reserved values, XN, APTable/XNTable, nG, contiguous, software and RES0 bits), invalid entries,
reserved encodings (bit 1 clear at level 3 or at a level without blocks), output addresses
beyond the PA size, 64K OA[51:48] bits, table pointers outside RAM, into RAM the model does not
hold, back into other tables and to zeroed pages, and roots at every legal alignment.

The firmware must keep running on a stage-1 table (its code, data, mailbox, probe buffers and
UART) and the EL1 stub on a stage-2 table: the model's own builder maps those regions first,
identity, and the random content goes only into the entries that builder left invalid, so no
random entry covers them. Everything is drawn from one ``numpy`` generator: a table is
reproduced from the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from harness.arch import descriptors as d
from harness.arch.bits import genmask
from harness.arch.geometry import (
    ENTRY_BYTES,
    LAST_LEVEL,
    MIN_IA_BITS,
    PA_SIZES,
    Geometry,
    GeometryError,
    Granule,
    Stage,
    max_ia_bits,
    oa_format_bits,
    ptrs_per_table,
)
from harness.arch.registers import TTBR_BADDR, RegimeRegs, Stage1Regs, regime_regs
from harness.check.engine import Subject
from harness.check.scenario import LayoutLike, RegionLike
from harness.core.memory import PagePool, PoolImage
from harness.core.pgtable import HypPgtable, KvmPgtable, Stage2Pgtable
from harness.core.translate import DEFAULT_MAIR

U64 = npt.NDArray[np.uint64]
_U = np.uint64

WINDOW_BYTES = {Granule.K4: 128 << 12, Granule.K16: 64 << 14, Granule.K64: 48 << 16}
MAX_NEW_TABLES = 24  # fresh random subtrees per set of tables
OUTSIDE_RAM = 0x2_0000_0000  # no memory and no device behind it on QEMU's virt board (1 GiB RAM)
MIN_STAGE2_IA_FOR_STUB = 31

# Entry kinds a random slot gets, with their weights.
INVALID, LEAF, RESERVED, TABLE_NEW, TABLE_OLD, TABLE_ZERO, TABLE_RAM, TABLE_OUTSIDE, TABLE_BIG = range(9)
KIND_NAMES = ("invalid", "leaf", "reserved", "new table", "table back into tables", "table to zero page",
              "table into unmodelled RAM", "table outside RAM", "table beyond PA size")
_KIND_WEIGHTS = {INVALID: 3.0, LEAF: 4.0, RESERVED: 0.6, TABLE_NEW: 1.5, TABLE_OLD: 0.6, TABLE_ZERO: 0.4,
                 TABLE_RAM: 0.3, TABLE_OUTSIDE: 0.3, TABLE_BIG: 0.3}
_TABLE_ATTR_BITS = genmask(63, 51) | genmask(11, 2)
_LEAF_ATTR_BITS = d.LEAF_ATTR_LO | d.LEAF_ATTR_HI


def random_geometry(rng: np.random.Generator, stage: Stage | None = None, granule: Granule | None = None) -> Geometry:
    """A legal configuration, uniform over stage, granule, input size, PA size, start level."""
    for _ in range(1000):
        st = stage if stage is not None else Stage(int(rng.integers(1, 3)))
        gr = granule if granule is not None else list(Granule)[int(rng.integers(0, 3))]
        lo = 31 if st is Stage.S1 else MIN_IA_BITS  # stage 1: the firmware runs on the table
        ia = int(rng.integers(lo, max_ia_bits(gr) + 1))
        pas = [p for p in PA_SIZES if p <= oa_format_bits(gr) and (st is Stage.S1 or p >= ia)]
        if not pas:
            continue
        pa = int(pas[int(rng.integers(0, len(pas)))])
        levels = []
        for sl in range(LAST_LEVEL + 1):
            try:
                levels.append(Geometry.create(st, gr, ia, pa, sl if st is Stage.S2 else None))
            except GeometryError:
                continue
        if levels:
            return levels[int(rng.integers(0, len(levels)))]
    raise GeometryError(f"stage/granule: no legal configuration found for stage {stage} granule {granule}")


@dataclass
class RawTables:
    """Random tables in a pool window, ready to be checked."""

    geom: Geometry
    pool: PagePool
    root: int
    regs: RegimeRegs
    spans: U64  # (n, 2): input ranges that got random content (base, size)
    protected: tuple[RegionLike, ...]
    stats: dict[str, int]
    can_access: bool

    def subject(self, name: str) -> Subject:
        image = PoolImage(self.pool.base, self.pool.words().tobytes())  # the whole window: no stale bytes
        return Subject(name, self.geom, self.pool, self.root, self.regs, image, DEFAULT_MAIR,
                       tuple((r.base, r.size) for r in self.protected), self.can_access)

    def describe(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.stats.items() if v)
        return f"{self.geom.describe()}, root {self.root:#x}: {kinds}"


class _Filler:
    """Writes random entries into the free slots of the builder's tables, recursively."""

    def __init__(self, rng: np.random.Generator, geom: Geometry, pool: PagePool, layout: LayoutLike,
                 outside_ram: bool) -> None:
        self.rng = rng
        self.geom = geom
        self.pool = pool
        self.layout = layout
        self.outside_ram = outside_ram
        self.tables: list[int] = []  # table pages written so far
        self.spans: list[U64] = []  # (n, 2) arrays of (input base, size)
        self.stats: dict[str, int] = {}
        self.reserve = 3  # pages kept zero for TABLE_ZERO pointers
        self.new_tables = MAX_NEW_TABLES  # fresh subtrees left (most of the time goes into filling them)
        kinds = dict(_KIND_WEIGHTS)
        if not outside_ram:
            kinds.pop(TABLE_OUTSIDE)
        self.kinds = np.array(list(kinds), dtype=np.int64)
        w = np.array(list(kinds.values()))
        self.weights = w / w.sum()

    def count(self, key: str, n: int) -> None:
        self.stats[key] = self.stats.get(key, 0) + int(n)

    # -- addresses -------------------------------------------------------------------------
    def _pages(self, n: int, lo: int, hi: int) -> U64:
        g = self.geom.granule.size
        return (self.rng.integers(lo // g, max(hi // g, lo // g + 1), size=n, dtype=np.uint64) * _U(g))

    def _output_addresses(self, n: int, level: int) -> U64:
        """Leaf output addresses: scratch RAM, anywhere below the PA size, beyond it."""
        g = self.geom
        pa_top = 1 << g.pa_bits
        choice = self.rng.integers(0, 10, size=n)
        scratch = self._pages(n, self.layout.scratch.base, self.layout.scratch.base + self.layout.scratch.size) \
            if hasattr(self.layout, "scratch") else self._pages(n, 0x5000_0000, 0x8000_0000)
        anywhere = self._pages(n, 0, pa_top)
        beyond = self._pages(n, pa_top, 1 << 48) if g.pa_bits < 48 else anywhere
        oa = np.where(choice < 5, scratch, np.where(choice < 8, anywhere, beyond))
        size = g.size(level)
        aligned = self.rng.random(n) < 0.7
        return np.where(aligned, oa & ~_U(size - 1), oa) & _U(d.oa_mask(g.granule))

    def _high_bits(self, n: int) -> U64:
        """Bits a DS = 0 descriptor keeps outside OA[47:g]: 64K OA[51:48] in [15:12]; RES0 bits
        [50:48] (and [13:12] with 16K) otherwise."""
        g = self.geom.granule
        pick = self.rng.random(n) < (0.25 if g is Granule.K64 else 0.1)
        if g is Granule.K64:
            bits = self.rng.integers(1, 16, size=n, dtype=np.uint64) << _U(d.OA_51_48.lo)
        else:
            field = genmask(50, 48) | (genmask(13, 12) if g is Granule.K16 else 0)
            bits = self.rng.integers(0, 1 << 63, size=n, dtype=np.uint64) & _U(field)
        return np.where(pick, bits, _U(0))

    # -- entries ---------------------------------------------------------------------------
    def _leaves(self, n: int, level: int, reserved: bool) -> U64:
        attrs = self.rng.integers(0, 1 << 63, size=n, dtype=np.uint64) << _U(1)
        attrs ^= self.rng.integers(0, 2, size=n, dtype=np.uint64)
        attrs &= _U(_LEAF_ATTR_BITS)
        af = self.rng.random(n) < 0.85
        attrs = np.where(af, attrs | _U(d.AF.mask), attrs & ~_U(d.AF.mask))
        desc = self._output_addresses(n, level) | attrs | self._high_bits(n) | _U(d.VALID.mask)
        page_or_table = level == LAST_LEVEL and not reserved
        return desc | _U(d.TYPE.mask) if page_or_table else desc & ~_U(d.TYPE.mask)

    def _table_attrs(self, n: int) -> U64:
        bits = self.rng.integers(0, 1 << 63, size=n, dtype=np.uint64) << _U(1)
        return np.where(self.rng.random(n) < 0.5, bits & _U(_TABLE_ATTR_BITS), _U(0))

    def _pointers(self, kind: int, n: int) -> U64:
        """Next-level table addresses (in the descriptor's format) for ``n`` pointers of ``kind``."""
        g = self.geom
        size = g.granule.size
        pool = self.pool
        if kind == TABLE_OLD:
            pages = np.array(self.tables, dtype=np.uint64) & ~_U(size - 1)
            pa = pages[self.rng.integers(0, pages.size, size=n)]
        elif kind == TABLE_RAM:  # RAM the model does not hold
            lo = self.layout.pool_base + self.layout.pool_size
            pa = self._pages(n, lo, lo + (64 << 20))
        elif kind == TABLE_OUTSIDE:
            pa = self._pages(n, OUTSIDE_RAM, OUTSIDE_RAM + (1 << 30))
        elif kind == TABLE_BIG and g.pa_bits < 48:
            pa = self._pages(n, 1 << g.pa_bits, 1 << 48)
        else:  # a zeroed page of the window (the top pages are never allocated)
            pa = _U(pool.base) + (_U(pool.pages - 1) - self.rng.integers(0, self.reserve, size=n, dtype=np.uint64)) \
                * _U(size)
        return pa & _U(d.oa_mask(g.granule))

    def fill(self, table: int, level: int, va: int, entries: int, depth_budget: int) -> None:
        """Random entries in the invalid slots of the ``entries``-entry table at ``table``
        (level ``level``, input address ``va`` upwards)."""
        g = self.geom
        words = self.pool.words()
        first = (table - self.pool.base) // ENTRY_BYTES
        slots = np.flatnonzero((words[first : first + entries] & _U(d.VALID.mask)) == 0)
        if not slots.size:
            return
        density = float(self.rng.choice([0.02, 0.1, 0.3, 1.0]))
        slots = slots[self.rng.random(slots.size) < density]
        if not slots.size:
            return
        kinds = self.rng.choice(self.kinds, size=slots.size, p=self.weights)
        if level == LAST_LEVEL:
            kinds[kinds >= TABLE_NEW] = LEAF
        desc = np.zeros(slots.size, dtype=np.uint64)
        leaf = kinds == LEAF
        desc[leaf] = self._leaves(int(leaf.sum()), level, reserved=False)
        res = kinds == RESERVED
        desc[res] = self._leaves(int(res.sum()), level, reserved=True)
        desc[kinds >= TABLE_NEW] = self._table_attrs(int((kinds >= TABLE_NEW).sum()))
        new_tables: list[tuple[int, int]] = []
        for i in np.flatnonzero(kinds == TABLE_NEW):  # fresh subtrees while pages and depth remain
            if self.pool.pages - self.pool.used_pages <= self.reserve or depth_budget <= 0 or not self.new_tables:
                kinds[i] = TABLE_OLD
                continue
            self.new_tables -= 1
            pa = self.pool.alloc_page()
            new_tables.append((pa, int(slots[i])))
            desc[i] |= _U(d.table_pte(pa, g.granule))
        for kind in (TABLE_OLD, TABLE_ZERO, TABLE_RAM, TABLE_OUTSIDE, TABLE_BIG):
            sel = kinds == kind
            if sel.any():
                desc[sel] |= self._pointers(kind, int(sel.sum())) | _U(d.TYPE.mask | d.VALID.mask)
        for k, name in enumerate(KIND_NAMES):
            self.count(name, int((kinds == k).sum()))
        words[first + slots] = desc
        shift = g.shift(level)
        used = slots[kinds != INVALID].astype(np.uint64)
        self.spans.append(np.stack([_U(va) + (used << _U(shift)), np.full(used.size, 1 << shift, dtype=np.uint64)], 1))
        for pa, slot in new_tables:
            self.tables.append(pa)
            self.fill(pa, level + 1, va + (slot << shift), ptrs_per_table(g.granule), depth_budget - 1)


def _builder(geom: Geometry, pool: PagePool) -> KvmPgtable:
    if geom.stage is Stage.S1:
        return HypPgtable(pool, geom.granule, geom.ia_bits, geom.pa_bits)
    return Stage2Pgtable(pool, geom.granule, geom.ia_bits, geom.pa_bits, geom.start_level)


def _builder_tables(pool: PagePool, geom: Geometry, root: int) -> list[tuple[int, int, int, int]]:
    """(table pa, level, input base, entries) of every table reachable from ``root``."""
    out = [(root, geom.start_level, 0, geom.pgd_entries)]
    i = 0
    while i < len(out):
        table, level, va, n = out[i]
        i += 1
        if level == LAST_LEVEL:
            continue
        first = (table - pool.base) // ENTRY_BYTES
        entries = pool.words()[first : first + n]
        tab = _U(d.VALID.mask | d.TYPE.mask)
        for k in np.flatnonzero((entries & tab) == tab):
            out.append((d.pte_to_phys(int(entries[k]), geom.granule), level + 1, va + (int(k) << geom.shift(level)),
                        ptrs_per_table(geom.granule)))
    return out


_BASES: dict[tuple[Stage, Granule, int, int, int], tuple[bytes, int, int]] = {}


def _protected_base(geom: Geometry, layout: LayoutLike, regions: list[RegionLike]) -> tuple[PagePool, int]:
    """A pool window with the builder's identity map of ``regions`` (cached per shape: the
    builder's walk is the slow part of a random table)."""
    key = (geom.stage, geom.granule, geom.ia_bits, geom.start_level, layout.pool_base)
    pool = PagePool(layout.pool_base, WINDOW_BYTES[geom.granule], geom.granule.size)
    if key not in _BASES:
        table = _builder(geom, pool)
        assert table.pgd is not None
        for r in regions:
            table.map(r.base, r.size, r.base, r.prot)
        _BASES[key] = (pool.words().tobytes(), table.pgd, pool.used_pages)
    data, pgd, used = _BASES[key]
    pool.alloc_pages(used)  # the same pages in use again (first fit from the bottom), then their bytes
    pool.words()[:] = np.frombuffer(data, dtype=np.uint64)
    return pool, pgd


def firmware_only(geom: Geometry, layout: LayoutLike) -> RawTables:
    """The builder's identity map of the firmware's regions and nothing else (no random content)."""
    regions = list(layout.stage1_regions() if geom.stage is Stage.S1 else layout.stage2_regions())
    protected = [r for r in regions if r.base + r.size <= geom.limit]
    pool, root = _protected_base(geom, layout, protected)
    spans = np.array([(r.base, r.size) for r in protected], dtype=np.uint64).reshape(-1, 2)
    return RawTables(geom, pool, root, regime_regs(geom, root), spans, tuple(protected), {},
                     geom.stage is Stage.S1 or len(protected) == len(regions))


def random_tables(rng: np.random.Generator, geom: Geometry, layout: LayoutLike, outside_ram: bool = False,
                  max_depth: int = 4) -> RawTables:
    """Random raw tables for ``geom`` in a window at the layout's pool address (see the module notes).

    ``outside_ram``: also plant table pointers to physical addresses with nothing behind them
    (only when the firmware reports an AT's external abort as a result)."""
    regions = list(layout.stage1_regions() if geom.stage is Stage.S1 else layout.stage2_regions())
    protected = [r for r in regions if r.base + r.size <= geom.limit]
    pool, root = _protected_base(geom, layout, protected)
    can_access = geom.stage is Stage.S1 or len(protected) == len(regions)
    root_bytes = geom.pgd_entries * ENTRY_BYTES
    if root_bytes < geom.granule.size and rng.random() < 0.7:
        # the root at another legal alignment: its own size (64 bytes for a 52-bit base)
        align = max(root_bytes, 64 if geom.pa_bits == 52 else ENTRY_BYTES)
        page = pool.alloc_page()
        moved = page + int(rng.integers(0, geom.granule.size // align)) * align
        words = pool.words()
        src = (root - pool.base) // ENTRY_BYTES
        dst = (moved - pool.base) // ENTRY_BYTES
        words[dst : dst + geom.pgd_entries] = words[src : src + geom.pgd_entries]
        root = moved
    regs = regime_regs(geom, root & ~(geom.pgd_pages * geom.granule.size - 1))
    field = TTBR_BADDR.mask
    if isinstance(regs, Stage1Regs):
        regs = replace(regs, ttbr0_el2=(regs.ttbr0_el2 & ~field) | (root & field))
    else:
        regs = replace(regs, vttbr_el2=(regs.vttbr_el2 & ~field) | (root & field))
    filler = _Filler(rng, geom, pool, layout, outside_ram)
    built = _builder_tables(pool, geom, root)
    filler.tables = [t for t, *_ in built]
    for tpa, level, va, n in built:
        filler.fill(tpa, level, va, n, max_depth)
    spans = np.concatenate([*filler.spans, np.array([[0, geom.granule.size]], dtype=np.uint64)])
    return RawTables(geom, pool, root, regs, spans, tuple(protected), filler.stats, can_access)


def probe_addresses(rng: np.random.Generator, raw: RawTables, n: int) -> U64:
    """``n`` addresses: edges and insides of the ranges that got random content and of the
    firmware's regions, uniform over the input range, and at and beyond its limit."""
    g = raw.geom
    spans = raw.spans
    prot = np.array([(r.base, r.size) for r in raw.protected] or [(0, g.granule.size)], dtype=np.uint64)
    every = np.concatenate([spans, prot])
    n_span = n * 4 // 10
    n_beyond = max(n // 20, 8)
    n_uniform = max(n - n_span - n_beyond, 0)
    pick = every[rng.integers(0, len(every), size=n_span)]
    where = rng.integers(0, 3, size=n_span)
    inside = rng.integers(0, 1 << 62, size=n_span, dtype=np.uint64) % pick[:, 1]
    off = np.where(where == 0, _U(0), np.where(where == 1, pick[:, 1] - _U(8), inside))
    edges = pick[:, 0] + off
    edges = np.where(rng.random(n_span) < 0.1, edges - _U(8), edges)  # just before a range
    uniform = rng.integers(0, g.limit, size=n_uniform, dtype=np.uint64)
    beyond = np.concatenate([
        np.array([g.limit, g.limit + 8, (1 << 64) - 8, 1 << 52, (1 << 52) - 8, (1 << 48)], dtype=np.uint64),
        g.limit + rng.integers(0, g.limit, size=n_beyond, dtype=np.uint64),
        rng.integers(0, 1 << 63, size=n_beyond, dtype=np.uint64) << _U(1),
    ])
    return np.concatenate([edges, uniform, beyond]) & ~_U(7)
