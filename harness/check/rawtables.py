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
random entry covers them. The builder runs once per family (stage, granule, DS, E2H) on its
deepest configuration; each configuration's identity map is grafted from it (the tables below
its start level along input address 0), which walks exactly as the builder's own map for that
configuration. Configurations include DS = 1 (FEAT_LPA2: 52-bit addresses, 4K level -1, OA[51:50]
in bits [9:8]) and the EL2&0 regime (hVHE); a stage-1 table gets a random MAIR_EL2. The random
entries are written one level at a time, all tables of a level in one vectorised pass.
Everything is drawn from one ``numpy`` generator: a table is reproduced from the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    min_level,
    oa_format_bits,
    ptrs_per_table,
    stage2_start_levels,
)
from harness.arch.registers import RegimeRegs, Stage1Regs, mair_value, regime_regs
from harness.check.engine import Subject
from harness.check.scenario import LayoutLike, RegionLike
from harness.core.memory import PagePool, PoolImage
from harness.core.pgtable import KvmPgtable
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


LPA2_SHARE = 0.3  # of the 4K and 16K configurations: DS = 1 (FEAT_LPA2)
E2H_SHARE = 0.3  # of the stage-1 configurations: the EL2&0 regime (hVHE)
_DENSITIES = np.array([0.02, 0.1, 0.3, 1.0])
DENSE_ENTRIES = 2048  # tables with more entries than this get proportionally fewer random ones
MAIR_DEVICE = (0x00, 0x04, 0x08, 0x0C)  # Device-nGnRnE, -nGnRE, -nGRE, -GRE
MAIR_FIRMWARE_BYTES = 2  # AttrIndx 0 and 1 (the firmware's Normal and Device mappings) keep their values


def random_mair(rng: np.random.Generator) -> int:
    """A MAIR_EL2 value: the firmware's attributes at indices 0 and 1, and at 2..7 any Device type
    or Normal memory with any inner and outer cacheability (no UNPREDICTABLE encodings)."""
    mair = mair_value() & genmask(8 * MAIR_FIRMWARE_BYTES - 1, 0)
    for i in range(MAIR_FIRMWARE_BYTES, 8):
        if rng.random() < 0.3:
            attr = MAIR_DEVICE[int(rng.integers(0, len(MAIR_DEVICE)))]
        else:
            attr = int(rng.integers(1, 16)) << 4 | int(rng.integers(1, 16))
        mair |= attr << (8 * i)
    return mair


def random_geometry(rng: np.random.Generator, stage: Stage | None = None, granule: Granule | None = None,
                    lpa2: bool | None = None, e2h: bool | None = None) -> Geometry:
    """A legal configuration, uniform over stage, granule, input size, PA size, start level; DS = 1
    (``lpa2``) on some 4K and 16K ones, the EL2&0 regime (``e2h``) on some stage-1 ones. ``None``:
    drawn; True/False: only those."""
    for _ in range(1000):
        st = stage if stage is not None else Stage(int(rng.integers(1, 3)))
        if e2h and st is Stage.S2:
            if stage is not None:
                break
            continue
        gr = granule if granule is not None else list(Granule)[int(rng.integers(0, 3))]
        ds = bool(rng.random() < LPA2_SHARE) if lpa2 is None else lpa2
        if ds and gr is Granule.K64:
            if lpa2 is None:
                ds = False
            elif granule is None:
                continue
            else:
                break
        h = st is Stage.S1 and (bool(rng.random() < E2H_SHARE) if e2h is None else e2h)
        lo = 31 if st is Stage.S1 else MIN_IA_BITS  # stage 1: the firmware runs on the table
        ia = int(rng.integers(lo, max_ia_bits(gr, ds) + 1))
        pas = [p for p in PA_SIZES if p <= oa_format_bits(gr, ds) and (st is Stage.S1 or p >= ia)]
        if not pas:
            continue
        pa = int(pas[int(rng.integers(0, len(pas)))])
        levels = []
        for sl in range(min_level(gr, ds), LAST_LEVEL + 1):
            try:
                levels.append(Geometry.create(st, gr, ia, pa, sl if st is Stage.S2 else None, lpa2=ds, e2h=h))
            except GeometryError:
                continue
        if levels:
            return levels[int(rng.integers(0, len(levels)))]
    raise GeometryError(f"stage/granule/lpa2/e2h: no legal configuration for stage {stage} granule {granule} "
                        f"lpa2 {lpa2} e2h {e2h}")


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
    mair: int = DEFAULT_MAIR

    def subject(self, name: str, extent: int | None = None) -> Subject:
        """The subject; its image is the whole window (no stale bytes), or its first ``extent``
        bytes when the caller knows the rest of the window is already as the model sees it."""
        words = self.pool.words()
        image = PoolImage(self.pool.base, (words if extent is None else words[: extent // 8]).tobytes())
        return Subject(name, self.geom, self.pool, self.root, self.regs, image, self.mair,
                       tuple((r.base, r.size) for r in self.protected), self.can_access)

    @property
    def extent(self) -> int:
        """Bytes of the window up to its highest page in use (the rest is zero)."""
        return self.pool.used_extent()

    def describe(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.stats.items() if v)
        mair = f", MAIR {self.mair:#x}" if self.geom.stage is Stage.S1 and self.mair != DEFAULT_MAIR else ""
        return f"{self.geom.describe()}, root {self.root:#x}{mair}: {kinds}"


class _Filler:
    """Writes random entries into the free slots of the tables, one level at a time (every table
    of a level in one vectorised pass)."""

    def __init__(self, rng: np.random.Generator, geom: Geometry, pool: PagePool, layout: LayoutLike,
                 outside_ram: bool, max_depth: int) -> None:
        self.rng = rng
        self.geom = geom
        self.pool = pool
        self.layout = layout
        self.max_depth = max_depth
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
        self.oa_mask = _U(d.oa_mask(geom.granule, geom.lpa2))
        self.leaf_attr_bits = _U(d.leaf_attr_mask(geom.lpa2))
        self.table_attr_bits = _U(_TABLE_ATTR_BITS & ~(d.OA_51_50_LPA2.mask if geom.lpa2 else 0))
        self.oa_top = 1 << oa_format_bits(geom.granule, geom.lpa2)
        # 64K tables (8192 entries) get a quarter of the density: a table set is probed with a few
        # thousand addresses, so more entries would be written than walks could ever read
        self.density_scale = min(1.0, DENSE_ENTRIES / ptrs_per_table(geom.granule))

    def count(self, key: str, n: int) -> None:
        self.stats[key] = self.stats.get(key, 0) + int(n)

    # -- addresses -------------------------------------------------------------------------
    def _pages(self, n: int, lo: int, hi: int) -> U64:
        g = self.geom.granule.size
        return (self.rng.integers(lo // g, max(hi // g, lo // g + 1), size=n, dtype=np.uint64) * _U(g))

    def _encode(self, pa: U64) -> U64:
        """Addresses in the descriptor's format: bits [47:g] ([49:g] with DS = 1), OA[51:48] in
        [15:12] with 64K, OA[51:50] in [9:8] with DS = 1."""
        out = pa & self.oa_mask
        if self.geom.granule is Granule.K64:
            out |= ((pa >> _U(48)) & _U(d.OA_51_48.max)) << _U(d.OA_51_48.lo)
        if self.geom.lpa2:
            out |= ((pa >> _U(50)) & _U(d.OA_51_50_LPA2.max)) << _U(d.OA_51_50_LPA2.lo)
        return out

    def _output_addresses(self, n: int, level: int) -> U64:
        """Leaf output addresses (encoded): scratch RAM, anywhere below the PA size, beyond it."""
        g = self.geom
        pa_top = 1 << g.pa_bits
        choice = self.rng.integers(0, 10, size=n)
        scratch = self._pages(n, self.layout.scratch.base, self.layout.scratch.base + self.layout.scratch.size) \
            if hasattr(self.layout, "scratch") else self._pages(n, 0x5000_0000, 0x8000_0000)
        anywhere = self._pages(n, 0, pa_top)
        top = self.oa_top if g.granule is not Granule.K64 else 1 << 48  # 64K: [15:12] come from _high_bits
        beyond = self._pages(n, pa_top, top) if pa_top < top else anywhere
        oa = np.where(choice < 5, scratch, np.where(choice < 8, anywhere, beyond))
        size = g.size(level)
        aligned = self.rng.random(n) < 0.7
        return self._encode(np.where(aligned, oa & ~_U(size - 1), oa) & _U(self.oa_top - 1))

    def _high_bits(self, n: int) -> U64:
        """Bits a DS = 0 descriptor keeps outside OA[47:g]: 64K OA[51:48] in [15:12]; RES0 bits
        [50:48] (and [13:12] with 16K) otherwise. None with DS = 1 (its OA reaches 52 bits)."""
        g = self.geom.granule
        if self.geom.lpa2:
            return np.zeros(n, dtype=np.uint64)
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
        attrs &= self.leaf_attr_bits
        af = self.rng.random(n) < 0.85
        attrs = np.where(af, attrs | _U(d.AF.mask), attrs & ~_U(d.AF.mask))
        desc = self._output_addresses(n, level) | attrs | self._high_bits(n) | _U(d.VALID.mask)
        page_or_table = level == LAST_LEVEL and not reserved
        return desc | _U(d.TYPE.mask) if page_or_table else desc & ~_U(d.TYPE.mask)

    def _table_attrs(self, n: int) -> U64:
        bits = self.rng.integers(0, 1 << 63, size=n, dtype=np.uint64) << _U(1)
        return np.where(self.rng.random(n) < 0.5, bits & self.table_attr_bits, _U(0))

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
        elif kind == TABLE_BIG and 1 << g.pa_bits < self.oa_top:
            pa = self._pages(n, 1 << g.pa_bits, self.oa_top)
        else:  # a zeroed page of the window (the top pages are never allocated)
            pa = _U(pool.base) + (_U(pool.pages - 1) - self.rng.integers(0, self.reserve, size=n, dtype=np.uint64)) \
                * _U(size)
        return self._encode(pa)

    def fill_level(self, level: int, tables: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Random entries in the invalid slots of ``tables`` ((pa, input base, entries) at
        ``level``); returns the fresh tables of the next level, to be filled in turn."""
        g = self.geom
        words = self.pool.words()
        rng = self.rng
        firsts = np.array([(t - self.pool.base) // ENTRY_BYTES for t, _, _ in tables], dtype=np.int64)
        counts = np.array([n for _, _, n in tables], dtype=np.int64)
        # how many slots of each table get content, then which (only those are drawn)
        density = _DENSITIES[rng.integers(0, _DENSITIES.size, size=len(tables))] * self.density_scale
        picks = rng.binomial(counts, np.minimum(density, 1.0))
        local = np.concatenate([rng.choice(n, size=k, replace=False) for n, k in zip(counts, picks, strict=True)]
                               + [np.zeros(0, dtype=np.int64)]).astype(np.int64)
        owner = np.repeat(np.arange(len(tables)), picks)
        idx = firsts[owner] + local
        free = (words[idx] & _U(d.VALID.mask)) == 0  # the builder's entries stay
        idx, owner, local = idx[free], owner[free], local[free]
        if not idx.size:
            return []
        kinds = rng.choice(self.kinds, size=idx.size, p=self.weights)
        if level == LAST_LEVEL:
            kinds[kinds >= TABLE_NEW] = LEAF
        desc = np.zeros(idx.size, dtype=np.uint64)
        leaf = kinds == LEAF
        desc[leaf] = self._leaves(int(leaf.sum()), level, reserved=False)
        res = kinds == RESERVED
        desc[res] = self._leaves(int(res.sum()), level, reserved=True)
        tab = kinds >= TABLE_NEW
        desc[tab] = self._table_attrs(int(tab.sum()))
        new = rng.permutation(np.flatnonzero(kinds == TABLE_NEW))
        room = min(self.new_tables, self.pool.pages - self.pool.used_pages - self.reserve)
        if level + 1 - g.start_level > self.max_depth:
            room = 0
        elif level + 1 < LAST_LEVEL:
            room = min(room, max(2, room // 2))  # keep fresh tables for the deeper levels too
        room = max(room, 0)
        kinds[new[room:]] = TABLE_OLD
        made = new[:room]
        pages = np.array([self.pool.alloc_page() for _ in made], dtype=np.uint64)
        self.new_tables -= made.size
        self.tables += [int(p) for p in pages]
        desc[made] |= self._encode(pages) | _U(d.TYPE.mask | d.VALID.mask)
        for kind in (TABLE_OLD, TABLE_ZERO, TABLE_RAM, TABLE_OUTSIDE, TABLE_BIG):
            sel = kinds == kind
            if sel.any():
                desc[sel] |= self._pointers(kind, int(sel.sum())) | _U(d.TYPE.mask | d.VALID.mask)
        counted = np.bincount(kinds, minlength=len(KIND_NAMES))
        for k, name in enumerate(KIND_NAMES):
            self.count(name, int(counted[k]))
        words[idx] = desc
        shift = _U(g.shift(level))
        va = np.array([v for _, v, _ in tables], dtype=np.uint64)[owner] + (local.astype(np.uint64) << shift)
        used = kinds != INVALID
        self.spans.append(np.stack([va[used], np.full(int(used.sum()), 1 << int(shift), dtype=np.uint64)], 1))
        entries = ptrs_per_table(g.granule)
        return [(int(p), int(v), entries) for p, v in zip(pages, va[made], strict=True)]


def _builder_tables(pool: PagePool, geom: Geometry, root: int) -> list[tuple[int, int, int, int]]:
    """(table pa, level, input base, entries) of every table in the window reachable from ``root``."""
    out = [(root, geom.start_level, 0, geom.pgd_entries)]
    i = 0
    tab = _U(d.VALID.mask | d.TYPE.mask)
    words = pool.words()
    while i < len(out):
        table, level, va, n = out[i]
        i += 1
        if level == LAST_LEVEL:
            continue
        first = (table - pool.base) // ENTRY_BYTES
        entries = words[first : first + n]
        for k in np.flatnonzero((entries & tab) == tab):
            pa = d.pte_to_phys(int(entries[k]), geom.granule, geom.lpa2)
            if pool.contains(pa, geom.granule.size):
                out.append((pa, level + 1, va + (int(k) << geom.shift(level)), ptrs_per_table(geom.granule)))
    return out


@dataclass(frozen=True)
class _Base:
    """The builder's identity map of every firmware region for the deepest configuration of a
    (stage, granule, DS, E2H) family: the window's words up to its used pages, and the root."""

    level: int
    words: U64
    root: int
    used_pages: int


# (stage, granule, lpa2, e2h, pamax, pool base) -> base; (…, ia, start level) for shapes not grafted
_BASES: dict[tuple[object, ...], _Base] = {}


def _deepest(geom: Geometry) -> Geometry:
    ia = max_ia_bits(geom.granule, geom.lpa2)
    if geom.stage is Stage.S1:
        return Geometry.create(Stage.S1, geom.granule, ia, pamax=geom.pamax, lpa2=geom.lpa2, e2h=geom.e2h)
    level = min(stage2_start_levels(geom.granule, ia, geom.pamax, geom.lpa2))
    return Geometry.create(Stage.S2, geom.granule, ia, None, level, pamax=geom.pamax, lpa2=geom.lpa2)


def _build_base(geom: Geometry, layout: LayoutLike, regions: list[RegionLike]) -> _Base:
    pool = PagePool(layout.pool_base, WINDOW_BYTES[geom.granule], geom.granule.size)
    table = KvmPgtable.for_geometry(geom, pool)
    assert table.pgd is not None
    for r in regions:
        table.map(r.base, r.size, r.base, r.prot)
    used = pool.used_extent() // ENTRY_BYTES
    return _Base(geom.start_level, pool.words()[:used].copy(), table.pgd, pool.used_pages)


def _graft(pool: PagePool, geom: Geometry, base: _Base) -> int | None:
    """The root for ``geom`` in a window holding ``base``: the builder's tables below the level
    above ``geom``'s start, reached along input address 0 (the same descriptors the builder
    writes for ``geom``: its choices depend on the granule and the regions, not on the input
    size); concatenated roots copied into aligned pages. None if the path holds a block."""
    words = pool.words()
    table = base.root
    tab = _U(d.VALID.mask | d.TYPE.mask)
    if geom.start_level == base.level:
        return base.root if geom.pgd_pages == 1 else None
    for _ in range(base.level, geom.start_level - 1):  # down to the table above the start level
        entry = words[(table - pool.base) // ENTRY_BYTES]
        if entry & tab != tab:
            return None if entry & _U(d.VALID.mask) else pool.alloc_pages(geom.pgd_pages, geom.pgd_pages)
        table = d.pte_to_phys(int(entry), geom.granule, geom.lpa2)
    above = words[(table - pool.base) // ENTRY_BYTES:][: geom.pgd_pages]
    if ((above & _U(d.VALID.mask)) != 0).any() and ((above & tab) != tab)[(above & _U(d.VALID.mask)) != 0].any():
        return None
    if geom.pgd_pages == 1 and above[0] & tab == tab:
        return d.pte_to_phys(int(above[0]), geom.granule, geom.lpa2)
    root = pool.alloc_pages(geom.pgd_pages, geom.pgd_pages)
    per = ptrs_per_table(geom.granule)
    for i, entry in enumerate(above):
        if entry & tab == tab:
            src = (d.pte_to_phys(int(entry), geom.granule, geom.lpa2) - pool.base) // ENTRY_BYTES
            dst = (root - pool.base) // ENTRY_BYTES + i * per
            words[dst : dst + per] = words[src : src + per]
    return root


def _protected_base(geom: Geometry, layout: LayoutLike, regions: list[RegionLike]) -> tuple[PagePool, int]:
    """A pool window with the builder's identity map of the firmware's ``regions`` for ``geom``:
    grafted from one build per family (:func:`_graft`), the builder's walk being the slow part
    of a random table."""
    family = (geom.stage, geom.granule, geom.lpa2, geom.e2h, geom.pamax, layout.pool_base)
    pool = PagePool(layout.pool_base, WINDOW_BYTES[geom.granule], geom.granule.size)
    if family not in _BASES:
        _BASES[family] = _build_base(_deepest(geom), layout, regions)
    base = _BASES[family]
    pool.alloc_pages(base.used_pages)  # the same pages in use again (first fit from the bottom), then their bytes
    pool.words()[: base.words.size] = base.words
    root = _graft(pool, geom, base)
    if root is not None:
        return pool, root
    shape = (*family, geom.ia_bits, geom.start_level)
    if shape not in _BASES:
        _BASES[shape] = _build_base(geom, layout, [r for r in regions if r.base + r.size <= geom.limit])
    own = _BASES[shape]
    pool = PagePool(layout.pool_base, WINDOW_BYTES[geom.granule], geom.granule.size)
    pool.alloc_pages(own.used_pages)
    pool.words()[: own.words.size] = own.words
    return pool, own.root


def _regions(geom: Geometry, layout: LayoutLike) -> tuple[list[RegionLike], list[RegionLike], bool]:
    """Every region the firmware needs on a table of this stage, those inside the input range,
    and whether real accesses can run (stage 2 must map the whole EL1 stub)."""
    regions = list(layout.stage1_regions() if geom.stage is Stage.S1 else layout.stage2_regions())
    protected = [r for r in regions if r.base + r.size <= geom.limit]
    return regions, protected, geom.stage is Stage.S1 or len(protected) == len(regions)


def firmware_only(geom: Geometry, layout: LayoutLike) -> RawTables:
    """The builder's identity map of the firmware's regions and nothing else (no random content)."""
    regions, protected, can_access = _regions(geom, layout)
    pool, root = _protected_base(geom, layout, regions)
    spans = np.array([(r.base, r.size) for r in protected], dtype=np.uint64).reshape(-1, 2)
    return RawTables(geom, pool, root, regime_regs(geom, root), spans, tuple(protected), {}, can_access)


def random_tables(rng: np.random.Generator, geom: Geometry, layout: LayoutLike, outside_ram: bool = False,
                  max_depth: int = 4, mair: bool = True) -> RawTables:
    """Random raw tables for ``geom`` in a window at the layout's pool address (see the module notes).

    ``outside_ram``: also plant table pointers to physical addresses with nothing behind them
    (only when the firmware reports an AT's external abort as a result). ``mair``: a random
    MAIR_EL2 (:func:`random_mair`) for a stage-1 table."""
    steps = random_tables_steps(rng, geom, layout, outside_ram, max_depth, mair)
    for raw in steps:
        if raw is not None:
            return raw
    raise AssertionError("random_tables_steps ended without tables")


def random_tables_steps(rng: np.random.Generator, geom: Geometry, layout: LayoutLike, outside_ram: bool = False,
                        max_depth: int = 4, mair: bool = True) -> Iterator[RawTables | None]:
    """:func:`random_tables` in steps (the identity map, then one level of random entries at a
    time): yields None between them and the tables last, so that a caller can interleave the
    work with other waits. The same tables as :func:`random_tables` for the same generator."""
    regions, protected, can_access = _regions(geom, layout)
    pool, root = _protected_base(geom, layout, regions)
    root_bytes = geom.pgd_entries * ENTRY_BYTES
    if root_bytes < geom.granule.size and rng.random() < 0.7:
        # the root at another legal alignment: its own size (64 bytes for a 52-bit base)
        align = geom.root_align
        page = pool.alloc_page()
        moved = page + int(rng.integers(0, geom.granule.size // align)) * align
        words = pool.words()
        src = (root - pool.base) // ENTRY_BYTES
        dst = (moved - pool.base) // ENTRY_BYTES
        words[dst : dst + geom.pgd_entries] = words[src : src + geom.pgd_entries]
        root = moved
    regs = regime_regs(geom, root)
    table_mair = DEFAULT_MAIR
    if isinstance(regs, Stage1Regs) and mair:
        table_mair = random_mair(rng)
        regs = replace(regs, mair_el2=table_mair)
    filler = _Filler(rng, geom, pool, layout, outside_ram, max_depth)
    built = _builder_tables(pool, geom, root)
    filler.tables = [t for t, *_ in built]
    by_level: dict[int, list[tuple[int, int, int]]] = {}
    for tpa, level, va, n in built:
        by_level.setdefault(level, []).append((tpa, va, n))
    for level in range(geom.start_level, LAST_LEVEL + 1):
        yield None
        fresh = filler.fill_level(level, by_level.get(level, [])) if by_level.get(level) else []
        by_level.setdefault(level + 1, []).extend(fresh)
    spans = np.concatenate([*filler.spans, np.array([[0, geom.granule.size]], dtype=np.uint64)])
    yield RawTables(geom, pool, root, regs, spans, tuple(protected), filler.stats, can_access, table_mair)


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
