"""An oracle of upstream ``kvm_pgtable``: what Linux's ``arch/arm64/kvm/hyp/pgtable.c`` does, return
codes, reference counts and host requests included, for the 6.12 and the 6.1 series.

:class:`KernelModel` wraps a :class:`~harness.core.pgtable.KvmPgtable` (its root allocated as
upstream does: one zeroed page for hyp, ``kvm_pgtable_stage2_pgd_size`` bytes of naturally aligned
zeroed pages for stage 2, each page with a reference count of 1) and runs every operation as a
visitor of the one walker (:func:`harness.core.walker.walk`) on the same
:class:`~harness.core.memory.PagePool`. Where the strict model (:mod:`harness.core.pgtable`)
refuses, this one does what the kernel does, bugs included, except the hVHE execute-never
encoding (see :class:`KernelFeatures`). Nothing here does I/O.

Conventions. Arguments are u64 (Python ints are masked to 64 bits). Return values are what the C
functions return: 0 or a negative errno (``-EINVAL`` ...), the unmapped byte count for
``hyp_unmap``, a descriptor for ``mkyoung``/``mkold``, a bool for the young tests. A WARN the C code
would print is logged as an ``Event(WARN, addr, 0, level)``. Prot values are the kernel's
``enum kvm_pgtable_prot`` (:data:`KPROT_X` = bit 0, W = 1, R = 2, DEVICE = 3, NORMAL_NC = 4 in 6.12,
SW0..3 = bits 55..58), not :class:`~harness.core.prot.Prot` (see :func:`prot_from_model`).

The walk (``kvm_pgtable_walk``), both series: ``start = ALIGN_DOWN(addr, PAGE_SIZE)``,
``end = PAGE_ALIGN(start + size)`` in u64 (a wrapped or empty range walks nothing and returns 0);
``start`` or ``end`` beyond ``2^ia_bits`` is ``-ERANGE`` (``end == 2^ia_bits`` is fine); no PGD is
``-EINVAL``; an error from a visitor stops the walk (no further TABLE_POST visits) and is returned.
6.12 only: ``-EAGAIN`` from a visitor is swallowed and the walk goes on unless the walk has
``KVM_PGTABLE_WALK_HANDLE_FAULT``; the entry is re-read after a TABLE_PRE visit; a
``KVM_PGTABLE_WALK_SHARED`` walk is refused with ``-EPERM`` when the code is built for the
hypervisor (``__KVM_NVHE_HYPERVISOR__``, ``KernelFeatures.hyp_build``, the default: that is what
runs at EL2). 6.1: any non-zero return stops the walk, ``-EAGAIN`` included, and the entry is not
re-read after TABLE_PRE (the walk descends into the table the visitor detached).

Blocks: upstream maps blocks only at ``level >= KVM_PGTABLE_MIN_BLOCK_LEVEL`` (1 with 4K, 2 with
16K/64K) whatever the architecture allows (no LPA2 level-0 or 64K level-1 blocks), where ``addr``
and the output address are aligned and the block fits before ``end``; an output address beyond
the kernel's PA range (``kvm_phys_is_valid``: 52 bits with LPA2 or 64K + CONFIG_ARM64_PA_BITS_52,
else 48) skips the alignment check and, at stage 2, maps an invalid "owner" entry (0) instead.

Operations (6.12 unless said):

* ``hyp_map(addr, size, phys, prot)``: ``hyp_set_prot_attr``: ``-EINVAL`` without R, for W+X and
  for DEVICE+X; AttrIndx ``MT_NORMAL`` (0) or ``MT_DEVICE_nGnRE`` (4, Linux's MAIR index); AP
  RO/RW (hVHE: AP[1] = 0, i.e. 2/0); SH inner unless LPA2; AF; SW bits from prot; not X: XN (bit
  54; hVHE: UXN | PXN, bits 54 and 53, the fixed upstream), X with BTI: GP (bit 50, 6.12 only). A
  LEAF visitor: where a block/page fits it is written (a reference taken if the slot was
  invalid); an identical entry is left alone; an existing valid entry that differs beyond the SW
  bits is a WARN and is *not* kept: at level 3 the op returns ``-EINVAL``, above it the entry is
  overwritten by a new empty table (a reference is taken again, so the parent page keeps one
  reference too many; the rest of the old block is gone) and the walk maps inside it. Where no
  leaf fits (a smaller mapping inside an existing block, or an invalid slot) a table is installed
  the same way. ``-ENOMEM`` when no page. 6.12 computes each leaf's output address as ``phys +
  (addr - start)``; 6.1 advances ``phys`` by each leaf's size *before* the conflict check, so after
  a conflict at a block level 6.1 maps the new table's contents one block further on.
* ``hyp_unmap(addr, size)`` -> bytes unmapped (the walk's error is dropped). LEAF | TABLE_POST: an
  invalid entry stops the walk (``-EINVAL`` inside, so an unmap stops at the first hole); a leaf
  is cleared if ``end - addr >= its size`` (a block that starts before ``addr`` is removed whole
  when enough range follows; otherwise the walk stops), with ``tlbi vale2is(addr, level)``; a
  table whose page count is 1 (no entries) is cleared with ``tlbi vae2is(addr, TLBI_TTL_UNKNOWN)``
  (6.1: level 0) and freed. ``hyp_destroy()``: drops every entry's and table's reference, then the
  root's.
* ``stage2_map(addr, size, phys, prot, flags=0, mc)``: ``stage2_set_prot_attr``: MemAttr Normal
  WB / Device-nGnRE / (6.12) Normal-NC from the FWB or non-FWB encodings (FWB only when the
  table has no ``KVM_PGTABLE_S2_NOFWB``), DEVICE or NORMAL_NC with X is ``-EINVAL``, DEVICE |
  NORMAL_NC is ``-EINVAL`` (6.1 has no NORMAL_NC: bit 4 is ignored); XN (bit 54) unless X; S2AP
  R/W; SH inner unless LPA2 (6.1: always); AF; SW bits. A leaf is skipped with ``-EAGAIN`` when the
  old entry is valid and differs from the new one only in R/W/XN or not at all (so a remap with
  other permissions keeps the old ones); 6.12 swallows that ``-EAGAIN`` unless ``flags`` has
  HANDLE_FAULT, so the op returns 0 and the rest is mapped; 6.1 stops there and returns
  ``-EAGAIN``. A change of SW bits only is written in place (6.12, non-shared walks). Otherwise
  break-before-make: the old entry is locked/cleared (a valid leaf: ``tlb_flush_vmid_ipa(addr,
  level)``; its reference dropped), then ``dcache_clean_inval_poc(pa, size)`` if the new leaf is
  Normal cacheable (the *encoded* Normal: the call is made with FWB too; the host's callback
  ignores it then) and ``icache_inval_pou(pa, size)`` if executable (``SKIP_CMO`` skips both), then
  the new entry and its reference. A block over an existing table (6.12 TABLE_PRE): the table
  entry is broken (``kvm_tlb_flush_vmid_range(aligned addr, block size)``: ``tlb_flush_vmid_range``
  in chunks of ``MAX_TLBI_RANGE_PAGES``, or ``tlb_flush_vmid()`` without FEAT_TLBIRANGE), the block
  written, and the old subtree freed at once with ``free_unlinked_table`` (each non-zero entry's
  reference and each table's page dropped, as ``kvm_pgtable_stage2_free_unlinked``; the hyp's
  mm_ops do it immediately, the host kernel after an RCU grace period). 6.1 does this with an
  anchor: TABLE_PRE clears the table entry, ``tlb_flush_vmid()``, walks the detached subtree
  dropping leaf references, frees its tables in TABLE_POST and writes the block when it is back at
  the anchor. A mapping smaller than an existing block (or into an invalid slot) replaces it with
  a new empty table (``tlb_flush_vmid_ipa(addr, level)`` for the block, ``addr`` as reached, maybe
  inside the block): the rest of the old block is unmapped. Needing a page with no memcache
  (``mc=None``) or an empty one is ``-ENOMEM``. ``stage2_set_owner`` is the same walker with an
  invalid PA and page-sized entries.
* ``stage2_unmap(addr, size)``: LEAF | TABLE_POST; a valid leaf overlapping the range is cleared
  whole (``tlb_flush_vmid_ipa(addr, level)``, then without FWB ``dcache_clean_inval_poc`` of the
  whole leaf if it was Normal cacheable); a non-zero invalid entry is cleared; a table left with
  page count 1 is cleared (``tlb_flush_vmid_ipa(addr, TLBI_TTL_UNKNOWN)``, 6.1: level 0) and
  freed. 6.12 with FEAT_TLBIRANGE and FWB defers the leaves' TLBIs to one
  ``kvm_tlb_flush_vmid_range(addr, size)`` of the arguments as given, after the walk.
* ``stage2_wrprotect``, ``stage2_mkyoung``, ``stage2_relax_perms`` (``stage2_update_leaf_attrs``):
  set/clear bits in every valid leaf of the range; ``icache_inval_pou`` before a leaf becomes
  executable. 6.12: an invalid leaf is ``-EAGAIN`` (skipped by wrprotect, stops mkyoung and
  relax_perms, which walk with HANDLE_FAULT | SHARED: at EL2 both are refused with ``-EPERM``, so
  mkyoung returns 0 and relax_perms ``-EPERM``); relax_perms then asks
  ``tlb_flush_vmid_ipa_nsh(addr, level)`` (``TLBI_TTL_UNKNOWN`` after ``-EAGAIN``). 6.1: invalid
  leaves are skipped (relax_perms of a hole returns 0 and flushes ``(addr, level 0)``), the flush is
  ``tlb_flush_vmid_ipa``. mkyoung (and 6.1 mkold) return the *old* descriptor (before AF changed),
  0 when there is none. ``prot`` with SW bits is ``-EINVAL`` for relax_perms.
* Access flag: 6.12 ``stage2_test_clear_young(addr, size, mkold) -> bool`` (any valid leaf with AF
  set; clears AF if ``mkold``); 6.1 ``stage2_mkold(addr) -> old pte`` and ``stage2_is_young(addr)``.
* ``stage2_split(addr, size, mc)`` (6.12 only): each valid block is replaced (break-before-make,
  ``tlb_flush_vmid_ipa(addr, level)``) by a table built unlinked (``create_unlinked``: no TLBI, no
  CMO) with the block's R/W/X and SW bits only: MemAttr becomes Normal and AF is set whatever the
  block had. A level-1 block needs ``PTRS_PER_PTE + 1`` memcache pages for a page-level tree;
  with fewer it gets level-2 blocks (split in turn by the walk); fewer than one page is
  ``-ENOMEM``.
* ``stage2_destroy()``: drops every non-zero entry's and table's reference, then each root page's
  (``free_pages_exact``). ``stage2_flush``: ``dcache_clean_inval_poc`` of every Normal cacheable
  leaf, nothing with FWB. ``get_leaf(addr) -> (ret, pte, level)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from harness.arch import descriptors as d
from harness.arch.bits import MASK64, Field, genmask
from harness.arch.geometry import LAST_LEVEL, Geometry, Granule, Stage, level_shift, oa_format_bits, ptrs_per_table
from harness.core.memory import PagePool, PoolError
from harness.core.pgtable import KvmPgtable
from harness.core.prot import Prot
from harness.core.tlb import Flush, MaintLog
from harness.core.walker import UPSTREAM_RULES, Walker, WalkFlags, WalkRules, align_down, walk

# -- Linux errno values ---------------------------------------------------------------------------
EPERM = 1
ENOENT = 2
E2BIG = 7  # internal to the map walker ("no leaf fits here")
EAGAIN = 11
ENOMEM = 12
EEXIST = 17
EINVAL = 22
ERANGE = 34

# -- enum kvm_pgtable_prot (both series; NORMAL_NC only in 6.12) ------------------------------------
KPROT_X = 1 << 0
KPROT_W = 1 << 1
KPROT_R = 1 << 2
KPROT_DEVICE = 1 << 3
KPROT_NORMAL_NC = 1 << 4
KPROT_SW0 = 1 << 55
KPROT_SW1 = 1 << 56
KPROT_SW2 = 1 << 57
KPROT_SW3 = 1 << 58
KPROT_RW = KPROT_R | KPROT_W
KPROT_RWX = KPROT_RW | KPROT_X
KPROT_SW = d.SW.mask  # KVM_PTE_LEAF_ATTR_HI_SW, bits [58:55]

# -- enum kvm_pgtable_walk_flags (SHARED and later: 6.12 only) --------------------------------------
KWALK_LEAF = 1 << 0
KWALK_TABLE_PRE = 1 << 1
KWALK_TABLE_POST = 1 << 2
KWALK_SHARED = 1 << 3
KWALK_HANDLE_FAULT = 1 << 4
KWALK_SKIP_BBM_TLBI = 1 << 5
KWALK_SKIP_CMO = 1 << 6

# -- enum kvm_pgtable_stage2_flags ----------------------------------------------------------------
KVM_PGTABLE_S2_NOFWB = 1 << 0
KVM_PGTABLE_S2_IDMAP = 1 << 1

# -- kernel software constants --------------------------------------------------------------------
TLBI_TTL_UNKNOWN = (1 << 31) - 1  # INT_MAX: a TLBI without a level hint (6.12)
MAX_TLBI_RANGE_PAGES = (31 + 1) << (5 * 3 + 1)  # __TLBI_RANGE_PAGES(31, 3)
KVM_PHYS_INVALID = MASK64
KVM_INVALID_PTE_LOCKED = 1 << 10  # an invalid entry under break-before-make (6.12)
KVM_INVALID_PTE_OWNER = Field("owner", 9, 2)
KVM_MAX_OWNER_ID = 1
MT_NORMAL = 0  # Linux's MAIR_EL2 indices (arch/arm64/include/asm/memory.h)
MT_DEVICE_nGnRE = 4

SERIES = ("6.12", "6.1")
_MAX_RANGE_CHUNKS = 1 << 20  # refuse to log more range TLBIs than this in one call


class KernelModelError(ValueError):
    """A use of the oracle that has no C counterpart (wrong stage, an op the series lacks)."""


@dataclass(frozen=True)
class KernelFeatures:
    """What changes the upstream operations' results.

    ``hvhe``: ARM64_KVM_HVHE (hyp AP and XN in the EL2&0 encoding; 6.12 only). ``lpa2``:
    kvm_lpa2_is_enabled (DS = 1 descriptors, no SH in leaves; 6.12 only). ``fwb``:
    ARM64_HAS_STAGE2_FWB. ``bti``: system_supports_bti_kernel (GP on executable hyp leaves; 6.1
    has no GP and ignores it). ``tlb_range``: system_supports_tlb_range (6.12 only uses it).
    ``series``: "6.12" or "6.1". ``hvhe_xn_fixed``: hyp execute-never in hVHE is UXN | PXN (bits
    54 and 53) as upstream since 8d8e882c2b4b; False gives 6.12.117's bit 54 alone (the known
    bug). ``hyp_build``: pgtable.c built for EL2 (``__KVM_NVHE_HYPERVISOR__``): shared walks are
    ``-EPERM``. ``pa_bits_52``: CONFIG_ARM64_PA_BITS_52 (the kernel's PA range with 64K pages).
    """

    hvhe: bool = False
    lpa2: bool = False
    fwb: bool = False
    bti: bool = False
    tlb_range: bool = False
    series: str = "6.12"
    hvhe_xn_fixed: bool = True
    hyp_build: bool = True
    pa_bits_52: bool = True

    def __post_init__(self) -> None:
        if self.series not in SERIES:
            raise KernelModelError(f"series: expected one of {', '.join(SERIES)}, got {self.series!r}")
        if self.series == "6.1" and (self.hvhe or self.lpa2):
            raise KernelModelError("series: 6.1 has neither hVHE nor LPA2 (both came in later releases)")

    @property
    def v612(self) -> bool:
        return self.series == "6.12"


class EventKind(enum.StrEnum):
    DCACHE_CLEAN_INVAL_POC = "dcache_clean_inval_poc"  # (pa, size)
    ICACHE_INVAL_POU = "icache_inval_pou"  # (pa, size)
    TLB_FLUSH_VMID_IPA = "tlb_flush_vmid_ipa"  # (ipa, level)
    TLB_FLUSH_VMID_IPA_NSH = "tlb_flush_vmid_ipa_nsh"  # (ipa, level)
    TLB_FLUSH_VMID_RANGE = "tlb_flush_vmid_range"  # (start, pages)
    TLB_FLUSH_VMID = "tlb_flush_vmid"  # ()
    TLBI_VAE2IS = "tlbi_vae2is"  # (va, level hint)
    TLBI_VALE2IS = "tlbi_vale2is"  # (va, level hint)
    FREE_UNLINKED_TABLE = "free_unlinked_table"  # (table pa, level of the entry that held it)
    WARN = "warn"  # (addr, 0, level): a WARN_ON the C code hits


_FLUSHES = {EventKind.TLB_FLUSH_VMID_IPA: Flush.S2_IPA, EventKind.TLB_FLUSH_VMID_IPA_NSH: Flush.S2_IPA_NSH,
            EventKind.TLB_FLUSH_VMID_RANGE: Flush.S2_RANGE, EventKind.TLB_FLUSH_VMID: Flush.S2_VMID,
            EventKind.TLBI_VAE2IS: Flush.EL2_VA, EventKind.TLBI_VALE2IS: Flush.EL2_VA_LAST}


@dataclass(frozen=True)
class Event:
    """One request upstream makes of the host (mm_ops callback, hypercall, TLBI) or a WARN."""

    kind: EventKind
    addr: int = 0
    size_or_pages: int = 0
    level: int | None = None


@dataclass
class MemCache:
    """``struct kvm_mmu_memory_cache``: ``nobjs`` pages ready for the walk (None: whatever the pool
    has). Each page a walk takes decrements it; an empty cache gives no page (``-ENOMEM``)."""

    nobjs: int | None = None


UNLIMITED_MEMCACHE = MemCache()  # never decremented (nobjs None)


def prot_from_model(prot: Prot) -> int:
    """The kernel's ``enum kvm_pgtable_prot`` for a model :class:`Prot`."""
    prot = Prot(prot)
    return ((KPROT_R if prot & Prot.R else 0) | (KPROT_W if prot & Prot.W else 0)
            | (KPROT_X if prot & Prot.X else 0) | (KPROT_DEVICE if prot & Prot.DEVICE else 0))


def prot_to_model(kprot: int) -> Prot:
    """The model :class:`Prot` for a kernel prot; NORMAL_NC and SW bits have no model form."""
    extra = kprot & ~(KPROT_R | KPROT_W | KPROT_X | KPROT_DEVICE)
    if extra:
        raise ValueError(f"prot: {kprot:#x} has bits the model's Prot cannot express ({extra:#x}: NORMAL_NC or SW)")
    out = Prot.NONE
    for k, m in ((KPROT_R, Prot.R), (KPROT_W, Prot.W), (KPROT_X, Prot.X), (KPROT_DEVICE, Prot.DEVICE)):
        if kprot & k:
            out |= m
    return out


def kvm_stage2_start_level(granule: Granule | int | str, ia_bits: int) -> int:
    """The start level ``kvm_get_vtcr`` programs for a ``ia_bits`` IPA: the levels a stage-1 walk of
    ``ia_bits - 4`` bits needs (concatenating up to 16 pages), at least 2; never level -1."""
    g = Granule.parse(granule)
    levels = max(2, (ia_bits - 4 - 4) // (g.shift - 3))
    return 4 - levels


def kvm_min_block_level(granule: Granule) -> int:
    """``KVM_PGTABLE_MIN_BLOCK_LEVEL``: 1 with 4K pages, else 2 (both series)."""
    return 1 if granule is Granule.K4 else 2


# -- the walk --------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """``struct kvm_pgtable_visit_ctx``."""

    ptep: int
    old: int
    start: int
    addr: int
    end: int
    level: int
    flags: int


_Visitor = Callable[[_Ctx, int], int]


class _Abort(Exception):
    def __init__(self, ret: int) -> None:
        super().__init__(ret)
        self.ret = ret


@dataclass(frozen=True)
class _Unlinked:
    """A detached table seen as a walkable table (``__kvm_pgtable_walk`` of an unlinked table at
    ``level + 1`` over ``[0, kvm_granule_size(level))``)."""

    pgd: int
    start_level: int
    ia_bits: int
    granule: Granule
    lpa2: bool
    mem: PagePool


@dataclass
class _S2MapData:
    """``struct stage2_map_data``."""

    phys: int
    attr: int
    owner_id: int
    mc: MemCache | None
    force_pte: bool
    anchor: int | None = None  # 6.1
    childp: int | None = None  # 6.1


@dataclass
class _AttrData:
    attr_set: int
    attr_clr: int
    pte: int = 0
    level: int = 0


class KernelModel:
    """Upstream's operations on one table (hyp stage 1 or guest stage 2, from ``geom``).

    ``s2_flags``: ``KVM_PGTABLE_S2_NOFWB`` / ``KVM_PGTABLE_S2_IDMAP``; ``force_pte_cb(addr, end,
    prot)``: the table's ``force_pte_cb``; ``cache_ops``: whether the mm_ops have the
    ``dcache_clean_inval_poc`` / ``icache_inval_pou`` callbacks (the host stage-2 of pKVM has none).
    """

    def __init__(self, geom: Geometry, pool: PagePool, features: KernelFeatures, *, s2_flags: int = 0,
                 force_pte_cb: Callable[[int, int, int], bool] | None = None, cache_ops: bool = True) -> None:
        if geom.lpa2 != features.lpa2:
            raise KernelModelError(f"features.lpa2: {features.lpa2} but the geometry has lpa2={geom.lpa2}")
        if geom.stage is Stage.S1 and geom.e2h != features.hvhe:
            raise KernelModelError(f"features.hvhe: {features.hvhe} but the hyp geometry has e2h={geom.e2h}")
        self.features = features
        self.pgt = KvmPgtable.for_geometry(geom, pool)
        self.geom = geom
        self.pool = pool
        self.s2_flags = s2_flags
        self.force_pte_cb = force_pte_cb
        self.cache_ops = cache_ops
        self.events: list[Event] = []
        self.maint: MaintLog | None = None  # set: every write, invalidation and freed page, in order
        self._page = geom.granule.size
        self._rules = UPSTREAM_RULES if features.v612 else WalkRules(align_after_leaf=True,
                                                                       reload_after_table_pre=False)
        hi = genmask(63, 50) if features.v612 else genmask(63, 51)  # KVM_PTE_LEAF_ATTR_HI
        self._attr_mask = d.LEAF_ATTR_LO | hi
        self._phys_bits = 52 if features.lpa2 or (geom.granule is Granule.K64 and features.pa_bits_52) else 48
        self._min_block = kvm_min_block_level(geom.granule)

    # -- small facts --------------------------------------------------------------------------
    @property
    def stage(self) -> Stage:
        return self.geom.stage

    @property
    def pgd(self) -> int | None:
        return self.pgt.pgd

    def _size(self, level: int) -> int:
        return self.geom.size(level)

    def _need(self, stage: Stage, op: str) -> None:
        if self.geom.stage is not stage:
            raise KernelModelError(f"{op}: a stage-{int(stage)} operation on a stage-{int(self.geom.stage)} table")

    def _need_612(self, op: str) -> None:
        if not self.features.v612:
            raise KernelModelError(f"{op}: not in the 6.1 series")

    def _log(self, kind: EventKind, addr: int = 0, size: int = 0, level: int | None = None) -> None:
        self.events.append(Event(kind, addr & MASK64, size & MASK64, level))
        flush = _FLUSHES.get(kind)
        if flush is not None and self.maint is not None:
            self.maint.tlbi(flush, addr & MASK64, self.level_hint(level), size & MASK64)

    def level_hint(self, level: int | None) -> int | None:
        """The level hint a TLB helper's level argument asks for, as the series' ``__tlbi_level``
        reads it: 6.12 ``TLBI_TTL_UNKNOWN`` (or anything outside 0..3) none; 6.1 level 0 none."""
        if level is None or not 0 <= level <= 3 or (level == 0 and not self.features.v612):
            return None
        return level

    def _warn(self, ctx: _Ctx) -> None:
        self._log(EventKind.WARN, ctx.addr, 0, ctx.level)

    def take_events(self) -> list[Event]:
        """The events logged since the last call (and forget them)."""
        out, self.events = self.events, []
        return out

    def phys_is_valid(self, phys: int) -> bool:
        """``kvm_phys_is_valid``: below the kernel's PA range (52 or 48 bits)."""
        return phys < 1 << self._phys_bits

    def _phys_to_pte(self, pa: int) -> int:
        """``kvm_phys_to_pte``: the address bits the format has, the rest dropped."""
        g = self.geom.granule
        return d.phys_to_pte(pa & genmask(oa_format_bits(g, self.geom.lpa2) - 1, g.shift), g, self.geom.lpa2)

    def _to_phys(self, pte: int) -> int:
        return d.pte_to_phys(pte, self.geom.granule, self.geom.lpa2)

    def _leaf(self, pa: int, attr: int, level: int) -> int:
        """``kvm_init_valid_leaf_pte``."""
        typ = d.TYPE_PAGE if level == LAST_LEVEL else d.TYPE_BLOCK
        return self._phys_to_pte(pa) | (attr & self._attr_mask) | d.TYPE.prep(typ) | d.VALID.prep(1)

    def _table(self, child: int) -> int:
        return d.table_pte(child, self.geom.granule, self.geom.lpa2)

    def _is_table(self, pte: int, level: int) -> bool:
        return d.is_table(pte, level)

    # -- mm_ops -------------------------------------------------------------------------------
    def _zalloc(self, mc: MemCache | None = None) -> int | None:
        if mc is not None and mc.nobjs is not None:
            if mc.nobjs <= 0:
                return None
            mc.nobjs -= 1
        try:
            return self.pool.alloc_page()
        except PoolError:
            return None

    def _get(self, ptep: int) -> None:
        self.pool.get_page(align_down(ptep, self._page))

    def _put(self, ptep: int) -> None:
        self._put_page(align_down(ptep, self._page))

    def _put_page(self, page: int) -> None:
        self.pool.put_page(page)
        if self.maint is not None and self.pool.refcount(page) == 0:
            self.maint.free(page)

    def _count(self, page: int) -> int:
        return self.pool.refcount(page)

    def _write(self, ptep: int, pte: int) -> None:
        if self.maint is not None:
            self.maint.write(ptep, self.pool.read64(ptep), pte)
        self.pool.write64(ptep, pte)

    def _dcache(self, pa: int, size: int) -> None:
        if self.cache_ops:
            self._log(EventKind.DCACHE_CLEAN_INVAL_POC, pa, size)

    def _icache(self, pa: int, size: int) -> None:
        if self.cache_ops:
            self._log(EventKind.ICACHE_INVAL_POU, pa, size)

    def _flush_vmid_range(self, addr: int, size: int) -> None:
        """``kvm_tlb_flush_vmid_range``."""
        if not self.features.tlb_range:
            self._log(EventKind.TLB_FLUSH_VMID)
            return
        pages = (size & MASK64) >> self.geom.granule.shift
        if pages > MAX_TLBI_RANGE_PAGES * _MAX_RANGE_CHUNKS:
            raise KernelModelError(f"size: {size:#x} would ask for more than {_MAX_RANGE_CHUNKS} range TLBIs")
        while pages > 0:
            n = min(pages, MAX_TLBI_RANGE_PAGES)
            self._log(EventKind.TLB_FLUSH_VMID_RANGE, addr, n)
            addr = (addr + (n << self.geom.granule.shift)) & MASK64
            pages -= n

    # -- the walk -----------------------------------------------------------------------------
    def _continue(self, ret: int, flags: int) -> bool:
        if self.features.v612 and ret == -EAGAIN:
            return not flags & KWALK_HANDLE_FAULT
        return ret == 0

    def _run(self, table: KvmPgtable | _Unlinked, start: int, end: int, cb: _Visitor, flags: int) -> int:
        mem = self.pool

        def visit(addr: int, e: int, level: int, ptep: int, flag: WalkFlags) -> None:
            ret = cb(_Ctx(ptep, mem.read64(ptep), start, addr, e, level, flags), int(flag))
            if ret and not self._continue(ret, flags):
                raise _Abort(ret)

        try:
            walk(table, start, end - start, Walker(visit, WalkFlags(flags & 7)), self._rules)
        except _Abort as stop:
            return stop.ret
        return 0

    def _walk(self, addr: int, size: int, cb: _Visitor, flags: int) -> int:
        """``kvm_pgtable_walk``."""
        if self.features.v612 and flags & KWALK_SHARED and self.features.hyp_build:
            return -EPERM
        page = self._page
        start = align_down(addr & MASK64, page)
        end = (((start + (size & MASK64)) & MASK64) + page - 1) & ~(page - 1) & MASK64
        limit = 1 << self.geom.ia_bits
        if start > limit or end > limit:
            return -ERANGE
        if self.pgt.pgd is None:
            return -EINVAL
        if end <= start:
            return 0
        return self._run(self.pgt, start, end, cb, flags)

    def _walk_unlinked(self, table: int, level: int, cb: _Visitor, flags: int) -> int:
        g = self.geom.granule
        view = _Unlinked(table, level + 1, level_shift(g, level), g, self.geom.lpa2, self.pool)
        return self._run(view, 0, self._size(level), cb, flags)

    def _block_ok(self, ctx: _Ctx, phys: int) -> bool:
        """``kvm_block_mapping_supported``."""
        size = self._size(ctx.level)
        if ctx.level < self._min_block:
            return False
        if size > ctx.end - ctx.addr:
            return False
        if self.phys_is_valid(phys) and phys % size:
            return False
        return ctx.addr % size == 0

    # -- queries ------------------------------------------------------------------------------
    def get_leaf(self, addr: int) -> tuple[int, int, int]:
        """``kvm_pgtable_get_leaf``: (ret, pte, level); (ret, 0, 0) on failure."""
        found: list[tuple[int, int]] = []

        def cb(ctx: _Ctx, visit: int) -> int:
            found[:] = [(ctx.old, ctx.level)]
            return 0

        ret = self._walk(align_down(addr & MASK64, self._page), self._page, cb, KWALK_LEAF)
        if ret or not found:
            return ret, 0, 0
        return 0, found[0][0], found[0][1]

    def _tables(self) -> list[int]:
        """Every table page reachable from the root (root pages first), read level by level from
        the pool's words (a bookkeeping scan, not an upstream walk)."""
        pgd = self.pgt.pgd
        if pgd is None:
            return []
        granule, lpa2, page = self.geom.granule, self.geom.lpa2, self._page
        words = self.pool.words()
        ptrs = ptrs_per_table(granule)
        kind_mask = np.uint64(d.VALID.mask | d.TYPE.mask)
        level_pages = [pgd + i * page for i in range(self.geom.pgd_pages)]
        pages = list(level_pages)
        for _level in range(self.geom.start_level, LAST_LEVEL):
            found: list[int] = []
            for pa in level_pages:
                first = (pa - self.pool.base) // 8
                table = words[first : first + ptrs]
                children = table[(table & kind_mask) == kind_mask]
                found.extend(int(x) for x in d.descriptor_oa(children, granule, lpa2))
            pages.extend(found)
            level_pages = found
        return pages

    def table_pages(self) -> int:
        """Pages the table holds now (reachable from the root, root pages included)."""
        return len(self._tables())

    def refcounts(self) -> dict[int, int]:
        """Each reachable table page's reference count."""
        return {p: self.pool.refcount(p) for p in self._tables()}

    def hyp_pte_prot(self, pte: int) -> int:
        """``kvm_pgtable_hyp_pte_prot``."""
        prot = pte & KPROT_SW
        if not d.is_valid(pte):
            return prot
        if not pte & self._hyp_xn():
            prot |= KPROT_X
        ap = d.S1_AP.get(pte)
        ro, rw = self._hyp_ap()
        if ap == ro:
            prot |= KPROT_R
        elif ap == rw:
            prot |= KPROT_RW
        return prot

    def stage2_pte_prot(self, pte: int) -> int:
        """``kvm_pgtable_stage2_pte_prot``: SW bits, R, W, X (not the memory type)."""
        prot = pte & KPROT_SW
        if not d.is_valid(pte):
            return prot
        s2ap = d.S2_AP.get(pte)
        if s2ap & d.S2AP.RO:
            prot |= KPROT_R
        if s2ap & d.S2AP.WO:
            prot |= KPROT_W
        if not pte & _S2_XN:
            prot |= KPROT_X
        return prot

    # -- hyp stage 1 ----------------------------------------------------------------------------
    def _hyp_ap(self) -> tuple[int, int]:
        if self.features.hvhe:
            return d.S1AP_E2H.RO_EL0_NONE, d.S1AP_E2H.RW_EL0_NONE
        return d.S1AP.RO, d.S1AP.RW

    def _hyp_xn(self) -> int:
        if self.features.hvhe and self.features.hvhe_xn_fixed:
            return d.S1_UXN.mask | d.S1_PXN.mask
        return d.S1_XN.mask

    def hyp_prot_attr(self, prot: int) -> tuple[int, int]:
        """``hyp_set_prot_attr``: (ret, attr)."""
        device = bool(prot & KPROT_DEVICE)
        attr = d.S1_ATTRINDX.prep(MT_DEVICE_nGnRE if device else MT_NORMAL)
        ro, rw = self._hyp_ap()
        if not prot & KPROT_R:
            return -EINVAL, 0
        if prot & KPROT_X:
            if prot & KPROT_W or device:
                return -EINVAL, 0
            if self.features.v612 and self.features.bti:
                attr |= d.S1_GP.mask
        else:
            attr |= self._hyp_xn()
        attr |= d.S1_AP.prep(rw if prot & KPROT_W else ro)
        if not self.features.lpa2:
            attr |= d.SH.prep(d.Shareability.INNER)
        attr |= d.AF.mask | (prot & KPROT_SW)
        return 0, attr

    def hyp_map(self, addr: int, size: int, phys: int, prot: int) -> int:
        """``kvm_pgtable_hyp_map``."""
        self._need(Stage.S1, "hyp_map")
        ret, attr = self.hyp_prot_attr(prot)
        if ret:
            return ret
        state = [align_down(phys & MASK64, self._page)]  # 6.1 advances it
        v612 = self.features.v612

        def try_leaf(ctx: _Ctx) -> bool:
            pa = (state[0] + ctx.addr - ctx.start) & MASK64 if v612 else state[0]
            if not self._block_ok(ctx, pa):
                return False
            if not v612:
                state[0] = (pa + self._size(ctx.level)) & MASK64
            new = self._leaf(pa, attr, ctx.level)
            if ctx.old == new:
                return True
            if not d.is_valid(ctx.old):
                self._get(ctx.ptep)
            elif (ctx.old ^ new) & ~KPROT_SW:
                self._warn(ctx)
                return False
            self._write(ctx.ptep, new)
            return True

        def cb(ctx: _Ctx, visit: int) -> int:
            if try_leaf(ctx):
                return 0
            if ctx.level == LAST_LEVEL:
                self._warn(ctx)
                return -EINVAL
            child = self._zalloc()
            if child is None:
                return -ENOMEM
            if not v612 and d.is_valid(self.pool.read64(ctx.ptep)):
                self._warn(ctx)  # kvm_set_table_pte
            self._get(ctx.ptep)
            self._write(ctx.ptep, self._table(child))
            return 0

        return self._walk(addr, size, cb, KWALK_LEAF)

    def hyp_unmap(self, addr: int, size: int) -> int:
        """``kvm_pgtable_hyp_unmap``: the bytes unmapped."""
        self._need(Stage.S1, "hyp_unmap")
        unmapped = [0]
        table_hint = TLBI_TTL_UNKNOWN if self.features.v612 else 0

        def cb(ctx: _Ctx, visit: int) -> int:
            size_here = self._size(ctx.level)
            if not d.is_valid(ctx.old):
                return -EINVAL
            child = None
            if self._is_table(ctx.old, ctx.level):
                child = self._to_phys(ctx.old)
                if self._count(child) != 1:
                    return 0
                self._write(ctx.ptep, 0)
                self._log(EventKind.TLBI_VAE2IS, ctx.addr, 0, table_hint)
            else:
                if ctx.end - ctx.addr < size_here:
                    return -EINVAL
                self._write(ctx.ptep, 0)
                self._log(EventKind.TLBI_VALE2IS, ctx.addr, 0, ctx.level)
                unmapped[0] += size_here
            self._put(ctx.ptep)
            if child is not None:
                self._put_page(child)
            return 0

        self._walk(addr, size, cb, KWALK_LEAF | KWALK_TABLE_POST)
        return unmapped[0] & MASK64

    def hyp_destroy(self) -> None:
        """``kvm_pgtable_hyp_destroy``: every valid entry's reference dropped, tables freed, then
        the one root page."""
        self._need(Stage.S1, "hyp_destroy")
        self._destroy(d.is_valid, 1)

    def _destroy(self, counted: Callable[[int], bool], root_pages: int) -> None:
        """The free walker both destroys run (``hyp_free_walker`` / ``stage2_free_walker``): each
        ``counted`` entry's reference dropped, each table page put after its children; then the
        root's pages (``free_pages_exact``: one reference each)."""

        def cb(ctx: _Ctx, visit: int) -> int:
            if not counted(ctx.old):
                return 0
            self._put(ctx.ptep)
            if self._is_table(ctx.old, ctx.level):
                self._put_page(self._to_phys(ctx.old))
            return 0

        pgd = self.pgt.pgd
        if self._walk(0, self.geom.limit, cb, KWALK_LEAF | KWALK_TABLE_POST):
            self._log(EventKind.WARN)
        if pgd is not None:
            for i in range(root_pages):
                self._put_page(pgd + i * self._page)
        self.pgt.pgd = None

    # -- stage 2: attributes ---------------------------------------------------------------------
    @property
    def has_fwb(self) -> bool:
        """``stage2_has_fwb``."""
        return self.features.fwb and not self.s2_flags & KVM_PGTABLE_S2_NOFWB

    def _memattr(self, kind: str) -> int:
        """``KVM_S2_MEMATTR(pgt, kind)``: the MemAttr field, FWB or not."""
        enc: type[d.S2MemAttr] | type[d.S2MemAttrFWB] = d.S2MemAttrFWB if self.has_fwb else d.S2MemAttr
        return d.S2_MEMATTR.prep(int(enc[kind]))

    def stage2_prot_attr(self, prot: int) -> tuple[int, int]:
        """``stage2_set_prot_attr``: (ret, attr)."""
        if self.features.v612:
            kind = prot & (KPROT_DEVICE | KPROT_NORMAL_NC)
            if kind == KPROT_DEVICE | KPROT_NORMAL_NC:
                return -EINVAL, 0
            if kind and prot & KPROT_X:
                return -EINVAL, 0
            attr = self._memattr({KPROT_DEVICE: "DEVICE_nGnRE", KPROT_NORMAL_NC: "NORMAL_NC"}.get(kind, "NORMAL_WB"))
            if not prot & KPROT_X:
                attr |= _S2_XN
        else:
            device = bool(prot & KPROT_DEVICE)
            attr = self._memattr("DEVICE_nGnRE" if device else "NORMAL_WB")
            if not prot & KPROT_X:
                attr |= _S2_XN
            elif device:
                return -EINVAL, 0
        if prot & KPROT_R:
            attr |= _S2AP_R
        if prot & KPROT_W:
            attr |= _S2AP_W
        if not self.features.lpa2:
            attr |= d.SH.prep(d.Shareability.INNER)
        attr |= d.AF.mask | (prot & KPROT_SW)
        return 0, attr

    def _cacheable(self, pte: int) -> bool:
        """``stage2_pte_cacheable`` (6.1 does not look at the valid bit)."""
        ok = pte & d.S2_MEMATTR.mask == self._memattr("NORMAL_WB")
        return ok and (d.is_valid(pte) or not self.features.v612)

    def _executable(self, pte: int) -> bool:
        """``stage2_pte_executable`` (6.1 does not look at the valid bit)."""
        return not pte & _S2_XN and (d.is_valid(pte) or not self.features.v612)

    # -- stage 2: break-before-make (6.12) ---------------------------------------------------------
    def _try_break(self, ctx: _Ctx) -> bool:
        """``stage2_try_break_pte`` (single-threaded: the exchange always succeeds)."""
        if not d.is_valid(ctx.old) and ctx.old & KVM_INVALID_PTE_LOCKED:
            if not ctx.flags & KWALK_SHARED:
                self._warn(ctx)
            return False
        self._write(ctx.ptep, KVM_INVALID_PTE_LOCKED)
        if not ctx.flags & KWALK_SKIP_BBM_TLBI:
            if self._is_table(ctx.old, ctx.level):
                size = self._size(ctx.level)
                self._flush_vmid_range(align_down(ctx.addr, size), size)
            elif d.is_valid(ctx.old):
                self._log(EventKind.TLB_FLUSH_VMID_IPA, ctx.addr, 0, ctx.level)
        if ctx.old:
            self._put(ctx.ptep)
        return True

    def _make(self, ctx: _Ctx, new: int) -> None:
        """``stage2_make_pte``."""
        cur = self.pool.read64(ctx.ptep)
        if d.is_valid(cur) or not cur & KVM_INVALID_PTE_LOCKED:
            self._warn(ctx)
        if new:
            self._get(ctx.ptep)
        self._write(ctx.ptep, new)

    def _free_unlinked(self, table: int, level: int) -> None:
        """``kvm_pgtable_stage2_free_unlinked``."""

        def cb(ctx: _Ctx, visit: int) -> int:
            if not ctx.old:
                return 0
            self._put(ctx.ptep)
            if self._is_table(ctx.old, ctx.level):
                self._put_page(self._to_phys(ctx.old))
            return 0

        if self._walk_unlinked(table, level, cb, KWALK_LEAF | KWALK_TABLE_POST):
            self._log(EventKind.WARN, 0, 0, level)
        if self._count(table) != 1:
            self._log(EventKind.WARN, 0, 0, level)
        self._put_page(table)

    # -- stage 2: the map walker -------------------------------------------------------------------
    def _map_phys(self, ctx: _Ctx, data: _S2MapData) -> int:
        if not self.features.v612 or not self.phys_is_valid(data.phys):
            return data.phys
        return (data.phys + ctx.addr - ctx.start) & MASK64

    def _leaf_allowed(self, ctx: _Ctx, data: _S2MapData) -> bool:
        if data.force_pte and ctx.level < LAST_LEVEL:
            return False
        return self._block_ok(ctx, self._map_phys(ctx, data))

    def _new_leaf(self, phys: int, data: _S2MapData, level: int) -> int:
        if self.phys_is_valid(phys):
            return self._leaf(phys, data.attr, level)
        return KVM_INVALID_PTE_OWNER.prep(data.owner_id)

    @staticmethod
    def _needs_update(old: int, new: int) -> bool:
        """``stage2_pte_needs_update``."""
        if not d.is_valid(old) or not d.is_valid(new):
            return True
        return bool((old ^ new) & ~_S2_PERMS)

    def _try_leaf_612(self, ctx: _Ctx, data: _S2MapData) -> int:
        phys = self._map_phys(ctx, data)
        size = self._size(ctx.level)
        if not self._leaf_allowed(ctx, data):
            return -E2BIG
        new = self._new_leaf(phys, data, ctx.level)
        if not self._needs_update(ctx.old, new):
            return -EAGAIN
        if not ctx.flags & KWALK_SHARED and not (ctx.old ^ new) & ~KPROT_SW:
            if bool(ctx.old) != bool(new):
                (self._put if ctx.old else self._get)(ctx.ptep)
            self._write(ctx.ptep, new)
            return 0
        if not self._try_break(ctx):
            return -EAGAIN
        if not ctx.flags & KWALK_SKIP_CMO:
            self._maintain_new_leaf(new, size)
        self._make(ctx, new)
        return 0

    def _maintain_new_leaf(self, new: int, size: int) -> None:
        """The cache maintenance a new stage-2 leaf asks of the host (both series): clean to PoC
        for cacheable memory, invalidate the I-cache for executable memory."""
        if self._cacheable(new):
            self._dcache(self._to_phys(new), size)
        if self._executable(new):
            self._icache(self._to_phys(new), size)

    def _new_child(self, ctx: _Ctx, data: _S2MapData) -> int:
        """A map that must descend below a leaf level: -EINVAL at the last level (upstream WARNs),
        -ENOMEM without a memcache page, else the new zeroed table page (a positive address)."""
        if ctx.level == LAST_LEVEL:
            self._warn(ctx)
            return -EINVAL
        child = self._zalloc(data.mc) if data.mc is not None else None
        return -ENOMEM if child is None else child

    def _map_leaf_612(self, ctx: _Ctx, data: _S2MapData) -> int:
        ret = self._try_leaf_612(ctx, data)
        if ret != -E2BIG:
            return ret
        child = self._new_child(ctx, data)
        if child < 0:
            return child
        if not self._try_break(ctx):
            self._put_page(child)
            return -EAGAIN
        self._make(ctx, self._table(child))
        return 0

    def _map_cb_612(self, data: _S2MapData) -> _Visitor:
        def cb(ctx: _Ctx, visit: int) -> int:
            if visit == KWALK_TABLE_PRE:
                child = self._to_phys(ctx.old)
                if not self._leaf_allowed(ctx, data):
                    return 0
                ret = self._try_leaf_612(ctx, data)
                if ret:
                    return ret
                self._log(EventKind.FREE_UNLINKED_TABLE, child, 0, ctx.level)
                self._free_unlinked(child, ctx.level)
                return 0
            if visit == KWALK_LEAF:
                return self._map_leaf_612(ctx, data)
            return -EINVAL

        return cb

    def _put_pte_61(self, ctx: _Ctx, pte: int) -> None:
        """6.1 ``stage2_put_pte``."""
        if d.is_valid(pte):
            self._write(ctx.ptep, 0)
            level = 0 if self._is_table(pte, ctx.level) else ctx.level
            self._log(EventKind.TLB_FLUSH_VMID_IPA, ctx.addr, 0, level)
        self._put(ctx.ptep)

    def _try_leaf_61(self, ctx: _Ctx, data: _S2MapData) -> int:
        old = self.pool.read64(ctx.ptep)
        phys = data.phys
        size = self._size(ctx.level)
        if not self._leaf_allowed(ctx, data):
            return -E2BIG
        new = self._new_leaf(phys, data, ctx.level)
        if old:
            if not self._needs_update(old, new):
                return -EAGAIN
            self._put_pte_61(ctx, old)
        self._maintain_new_leaf(new, size)
        self._write(ctx.ptep, new)
        if new:
            self._get(ctx.ptep)
        if self.phys_is_valid(phys):
            data.phys = (phys + size) & MASK64
        return 0

    def _map_leaf_61(self, ctx: _Ctx, data: _S2MapData) -> int:
        pte = self.pool.read64(ctx.ptep)
        if data.anchor is not None:
            if pte:
                self._put(ctx.ptep)
            return 0
        ret = self._try_leaf_61(ctx, data)
        if ret != -E2BIG:
            return ret
        child = self._new_child(ctx, data)
        if child < 0:
            return child
        if pte:
            self._put_pte_61(ctx, pte)
        if d.is_valid(self.pool.read64(ctx.ptep)):
            self._warn(ctx)  # kvm_set_table_pte
        self._write(ctx.ptep, self._table(child))
        self._get(ctx.ptep)
        return 0

    def _map_cb_61(self, data: _S2MapData) -> _Visitor:
        def cb(ctx: _Ctx, visit: int) -> int:
            if visit == KWALK_TABLE_PRE:
                if data.anchor is not None or not self._leaf_allowed(ctx, data):
                    return 0
                data.childp = self._to_phys(self.pool.read64(ctx.ptep))
                self._write(ctx.ptep, 0)
                self._log(EventKind.TLB_FLUSH_VMID)
                data.anchor = ctx.ptep
                return 0
            if visit == KWALK_LEAF:
                return self._map_leaf_61(ctx, data)
            if data.anchor is None:
                return 0
            ret = 0
            if data.anchor == ctx.ptep:
                assert data.childp is not None
                child = data.childp
                data.anchor = data.childp = None
                ret = self._map_leaf_61(ctx, data)
            else:
                child = self._to_phys(self.pool.read64(ctx.ptep))
            self._put_page(child)
            self._put(ctx.ptep)
            return ret

        return cb

    def _s2_map_walk(self, addr: int, size: int, data: _S2MapData, flags: int) -> int:
        if self.features.v612:
            return self._walk(addr, size, self._map_cb_612(data), flags | KWALK_TABLE_PRE | KWALK_LEAF)
        return self._walk(addr, size, self._map_cb_61(data), KWALK_TABLE_PRE | KWALK_LEAF | KWALK_TABLE_POST)

    def stage2_map(self, addr: int, size: int, phys: int, prot: int, flags: int = 0,
                   mc: MemCache | None = UNLIMITED_MEMCACHE) -> int:
        """``kvm_pgtable_stage2_map`` (``flags``: 6.12's walk flags, e.g. SHARED | HANDLE_FAULT)."""
        self._need(Stage.S2, "stage2_map")
        if flags and not self.features.v612:
            raise KernelModelError("flags: 6.1's kvm_pgtable_stage2_map takes no walk flags")
        addr, size, phys = addr & MASK64, size & MASK64, phys & MASK64
        if self.s2_flags & KVM_PGTABLE_S2_IDMAP and addr != phys:
            self._log(EventKind.WARN, addr)
            return -EINVAL
        ret, attr = self.stage2_prot_attr(prot)
        if ret:
            return ret
        force = bool(self.force_pte_cb and self.force_pte_cb(addr, (addr + size) & MASK64, prot))
        data = _S2MapData(align_down(phys, self._page), attr, 0, mc, force)
        return self._s2_map_walk(addr, size, data, flags)

    def stage2_set_owner(self, addr: int, size: int, owner_id: int,
                         mc: MemCache | None = UNLIMITED_MEMCACHE) -> int:
        """``kvm_pgtable_stage2_set_owner``: invalid page entries carrying ``owner_id``."""
        self._need(Stage.S2, "stage2_set_owner")
        if owner_id > KVM_MAX_OWNER_ID:
            return -EINVAL
        data = _S2MapData(KVM_PHYS_INVALID, 0, owner_id, mc, True)
        return self._s2_map_walk(addr, size, data, 0)

    # -- stage 2: unmap, attributes, young ---------------------------------------------------------
    def _defer_tlbi(self) -> bool:
        return self.features.v612 and self.features.tlb_range and self.has_fwb

    def stage2_unmap(self, addr: int, size: int) -> int:
        """``kvm_pgtable_stage2_unmap``."""
        self._need(Stage.S2, "stage2_unmap")
        v612 = self.features.v612
        defer = self._defer_tlbi()

        def cb(ctx: _Ctx, visit: int) -> int:
            old = ctx.old
            if not d.is_valid(old):
                if old:
                    self._write(ctx.ptep, 0)
                    self._put(ctx.ptep)
                return 0
            child = None
            need_flush = False
            if self._is_table(old, ctx.level):
                child = self._to_phys(old)
                if self._count(child) != 1:
                    return 0
            elif self._cacheable(old):
                need_flush = not self.has_fwb
            if v612:
                self._write(ctx.ptep, 0)
                if child is not None:
                    self._log(EventKind.TLB_FLUSH_VMID_IPA, ctx.addr, 0, TLBI_TTL_UNKNOWN)
                elif not defer:
                    self._log(EventKind.TLB_FLUSH_VMID_IPA, ctx.addr, 0, ctx.level)
                self._put(ctx.ptep)
            else:
                self._put_pte_61(ctx, old)
            if need_flush:
                self._dcache(self._to_phys(old), self._size(ctx.level))
            if child is not None:
                self._put_page(child)
            return 0

        ret = self._walk(addr, size, cb, KWALK_LEAF | KWALK_TABLE_POST)
        if defer:
            self._flush_vmid_range(addr & MASK64, size & MASK64)
        return ret

    def _update_leaf_attrs(self, addr: int, size: int, attr_set: int, attr_clr: int,
                           flags: int) -> tuple[int, _AttrData]:
        """``stage2_update_leaf_attrs``: (ret, data with the last leaf's old pte and level)."""
        mask = self._attr_mask
        data = _AttrData(attr_set & mask, attr_clr & mask)
        v612 = self.features.v612

        def cb(ctx: _Ctx, visit: int) -> int:
            old = ctx.old
            if not d.is_valid(old):
                return -EAGAIN if v612 else 0
            data.level = ctx.level
            data.pte = old
            pte = (old & ~data.attr_clr) | data.attr_set
            if pte != old:
                if self._executable(pte) and not self._executable(old):
                    self._icache(self._to_phys(pte), self._size(ctx.level))
                self._write(ctx.ptep, pte)
            return 0

        return self._walk(addr, size, cb, flags | KWALK_LEAF), data

    def stage2_wrprotect(self, addr: int, size: int) -> int:
        """``kvm_pgtable_stage2_wrprotect``."""
        self._need(Stage.S2, "stage2_wrprotect")
        return self._update_leaf_attrs(addr, size, 0, _S2AP_W, 0)[0]

    def stage2_mkyoung(self, addr: int) -> int:
        """``kvm_pgtable_stage2_mkyoung``: the leaf's descriptor *before* AF was set; 0 if none (6.12:
        a shared walk, so 0 and no change at EL2)."""
        self._need(Stage.S2, "stage2_mkyoung")
        flags = KWALK_HANDLE_FAULT | KWALK_SHARED if self.features.v612 else 0
        ret, data = self._update_leaf_attrs(addr, 1, d.AF.mask, 0, flags)
        return 0 if ret else data.pte

    def stage2_mkold(self, addr: int) -> int:
        """6.1 ``kvm_pgtable_stage2_mkold``: the leaf's descriptor before AF was cleared (0 if none)."""
        self._need(Stage.S2, "stage2_mkold")
        if self.features.v612:
            raise KernelModelError("stage2_mkold: 6.12 has stage2_test_clear_young instead")
        ret, data = self._update_leaf_attrs(addr, 1, 0, d.AF.mask, 0)
        return 0 if ret else data.pte

    def stage2_is_young(self, addr: int) -> bool:
        """6.1 ``kvm_pgtable_stage2_is_young``."""
        self._need(Stage.S2, "stage2_is_young")
        if self.features.v612:
            raise KernelModelError("stage2_is_young: 6.12 has stage2_test_clear_young instead")
        ret, data = self._update_leaf_attrs(addr, 1, 0, 0, 0)
        return bool((0 if ret else data.pte) & d.AF.mask)

    def stage2_test_clear_young(self, addr: int, size: int, mkold: bool) -> bool:
        """6.12 ``kvm_pgtable_stage2_test_clear_young``."""
        self._need(Stage.S2, "stage2_test_clear_young")
        self._need_612("stage2_test_clear_young")
        young = [False]

        def cb(ctx: _Ctx, visit: int) -> int:
            new = ctx.old & ~d.AF.mask
            if not d.is_valid(ctx.old) or new == ctx.old:
                return 0
            young[0] = True
            if mkold:
                self._write(ctx.ptep, new)
            return 0

        if self._walk(addr, size, cb, KWALK_LEAF):
            self._log(EventKind.WARN, addr)
        return young[0]

    def stage2_relax_perms(self, addr: int, prot: int) -> int:
        """``kvm_pgtable_stage2_relax_perms``: add R/W (S2AP) and X (clear XN) to the leaf at ``addr``."""
        self._need(Stage.S2, "stage2_relax_perms")
        if prot & KPROT_SW:
            return -EINVAL
        set_bits = (_S2AP_R if prot & KPROT_R else 0) | (_S2AP_W if prot & KPROT_W else 0)
        clr_bits = _S2_XN if prot & KPROT_X else 0
        if self.features.v612:
            ret, data = self._update_leaf_attrs(addr, 1, set_bits, clr_bits, KWALK_HANDLE_FAULT | KWALK_SHARED)
            if ret in (0, -EAGAIN):
                level = TLBI_TTL_UNKNOWN if ret == -EAGAIN else data.level
                self._log(EventKind.TLB_FLUSH_VMID_IPA_NSH, addr, 0, level)
            return ret
        ret, data = self._update_leaf_attrs(addr, 1, set_bits, clr_bits, 0)
        if not ret:
            self._log(EventKind.TLB_FLUSH_VMID_IPA, addr, 0, data.level)
        return ret

    def stage2_flush(self, addr: int, size: int) -> int:
        """``kvm_pgtable_stage2_flush``: clean+invalidate every Normal cacheable leaf (not with FWB)."""
        self._need(Stage.S2, "stage2_flush")
        if self.has_fwb:
            return 0

        def cb(ctx: _Ctx, visit: int) -> int:
            if d.is_valid(ctx.old) and self._cacheable(ctx.old):
                self._dcache(self._to_phys(ctx.old), self._size(ctx.level))
            return 0

        return self._walk(addr, size, cb, KWALK_LEAF)

    # -- stage 2: split (6.12) ---------------------------------------------------------------------
    def _create_unlinked(self, phys: int, level: int, prot: int, mc: MemCache | None,
                         force_pte: bool) -> tuple[int, int]:
        """``kvm_pgtable_stage2_create_unlinked``: (ret, table)."""
        if phys % self._size(level):
            return -EINVAL, 0
        ret, attr = self.stage2_prot_attr(prot)
        if ret:
            return ret, 0
        table = self._zalloc(mc)
        if table is None:
            return -ENOMEM, 0
        data = _S2MapData(phys, attr, 0, mc, force_pte)
        ret = self._walk_unlinked(table, level, self._map_cb_612(data),
                                  KWALK_LEAF | KWALK_SKIP_BBM_TLBI | KWALK_SKIP_CMO)
        if ret:
            self._free_unlinked(table, level)
            return ret, 0
        return 0, table

    def stage2_split(self, addr: int, size: int, mc: MemCache | None = UNLIMITED_MEMCACHE) -> int:
        """6.12 ``kvm_pgtable_stage2_split``."""
        self._need(Stage.S2, "stage2_split")
        self._need_612("stage2_split")
        cache = mc if mc is not None else MemCache(0)
        ptrs = ptrs_per_table(self.geom.granule)

        def cb(ctx: _Ctx, visit: int) -> int:
            level, pte = ctx.level, ctx.old
            if level == LAST_LEVEL or not d.is_valid(pte):
                return 0
            nr = {1: ptrs + 1, 2: 1}.get(level)
            if nr is None:
                self._warn(ctx)
                return -EINVAL
            have = cache.nobjs
            if have is None or have >= nr:
                force = True
            else:
                force, nr = False, 1
            if have is not None and have < nr:
                return -ENOMEM
            ret, child = self._create_unlinked(self._to_phys(pte), level, self.stage2_pte_prot(pte), cache, force)
            if ret:
                return ret
            if not self._try_break(ctx):
                self._free_unlinked(child, level)
                return -EAGAIN
            self._make(ctx, self._table(child))
            return 0

        return self._walk(addr, size, cb, KWALK_LEAF)

    def stage2_pgd_size(self) -> int:
        """``kvm_pgtable_stage2_pgd_size``: the root's bytes."""
        return self.geom.pgd_pages * self._page

    def stage2_destroy(self) -> None:
        """``kvm_pgtable_stage2_destroy``: as hyp's, but every non-zero entry is counted (owner
        annotations too), and the root is the concatenated PGD."""
        self._need(Stage.S2, "stage2_destroy")
        self._destroy(bool, self.geom.pgd_pages)


_S2AP_R = d.S2_AP.prep(d.S2AP.RO)  # KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R, bit 6
_S2AP_W = d.S2_AP.prep(d.S2AP.WO)  # ... S2AP_W, bit 7
_S2_XN = d.S2_XN.prep(d.S2_XN_NEVER)  # KVM_PTE_LEAF_ATTR_HI_S2_XN: bit 54 only
_S2_PERMS = _S2AP_R | _S2AP_W | _S2_XN
