"""The upstream oracle (:mod:`harness.core.kvmops`): hand cases for what pgtable.c does (6.12 and
6.1), and properties: reference counts stay "1 + counted entries" per table page, nothing leaks,
destroy returns the pool whole, and where the strict model accepts a sequence both build the same
bytes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Granule, Stage, level_size, ptrs_per_table
from harness.core.kvmops import (
    EAGAIN,
    EINVAL,
    ENOMEM,
    EPERM,
    ERANGE,
    KPROT_DEVICE,
    KPROT_NORMAL_NC,
    KPROT_R,
    KPROT_RW,
    KPROT_RWX,
    KPROT_SW0,
    KPROT_W,
    KPROT_X,
    KVM_PGTABLE_S2_NOFWB,
    KWALK_HANDLE_FAULT,
    MAX_TLBI_RANGE_PAGES,
    TLBI_TTL_UNKNOWN,
    Event,
    EventKind,
    KernelFeatures,
    KernelModel,
    KernelModelError,
    MemCache,
    MT_DEVICE_nGnRE,
    kvm_stage2_start_level,
    prot_from_model,
    prot_to_model,
)
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable, MapConflictError, Stage2Pgtable
from harness.core.prot import Prot

POOL_BASE = 0x4000_0000
IPA = 0x4000_0000  # 1 GiB aligned: a 4K level-1 block fits
PA = 0x8000_0000
K4 = 0x1000
M2 = 0x20_0000
G1 = 0x4000_0000
SERIES = ["6.12", "6.1"]


def s2(series: str = "6.12", granule: str = "4K", pages: int = 1024, ia_bits: int = 40,
       **feat: bool) -> tuple[KernelModel, PagePool]:
    g = Granule.parse(granule)
    pool = PagePool(POOL_BASE, pages * g.size, g.size)
    geom = Geometry.create(Stage.S2, g, ia_bits, lpa2=bool(feat.get("lpa2", False)))
    return KernelModel(geom, pool, KernelFeatures(series=series, **feat)), pool


def hyp(series: str = "6.12", granule: str = "4K", pages: int = 256, hvhe: bool = False,
        **feat: bool) -> tuple[KernelModel, PagePool]:
    g = Granule.parse(granule)
    pool = PagePool(POOL_BASE, pages * g.size, g.size)
    geom = Geometry.create(Stage.S1, g, 48, e2h=hvhe)
    return KernelModel(geom, pool, KernelFeatures(series=series, hvhe=hvhe, **feat)), pool


def leaf(m: KernelModel, addr: int) -> tuple[int, int]:
    ret, pte, level = m.get_leaf(addr)
    assert ret == 0
    return pte, level


def out_pa(m: KernelModel, addr: int) -> int | None:
    """Where ``addr`` goes through the oracle's tables (None: not mapped)."""
    pte, level = leaf(m, addr)
    if not d.is_valid(pte):
        return None
    size = level_size(m.geom.granule, level)
    return d.pte_to_phys(pte, m.geom.granule, m.geom.lpa2) + (addr & (size - 1))


def check_refcounts(m: KernelModel) -> None:
    """Each reachable table page: 1 + its counted entries (stage 2: non-zero; hyp: valid)."""
    ptrs = ptrs_per_table(m.geom.granule)
    words = m.pool.words()
    for page, count in m.refcounts().items():
        first = (page - m.pool.base) // 8
        table = words[first : first + ptrs]
        counted = int(np.count_nonzero(table if m.stage is Stage.S2 else table & np.uint64(1)))
        assert count == 1 + counted, f"page {page:#x}: refcount {count}, {counted} counted entries"


def kinds(events: list[Event]) -> list[str]:
    return [str(e.kind) for e in events]


# -- prot helpers, constants -----------------------------------------------------------------------


def test_kernel_prot_numbering_and_round_trip() -> None:
    assert (KPROT_X, KPROT_W, KPROT_R, KPROT_DEVICE, KPROT_NORMAL_NC) == (1, 2, 4, 8, 16)
    for p in (Prot.R, Prot.RW, Prot.RX, Prot.RWX, Prot.RW | Prot.DEVICE, Prot.NONE):
        assert prot_to_model(prot_from_model(p)) == p
    assert prot_from_model(Prot.RX) == KPROT_R | KPROT_X
    with pytest.raises(ValueError, match="NORMAL_NC"):
        prot_to_model(KPROT_R | KPROT_NORMAL_NC)


def test_features_refuse_what_61_lacks() -> None:
    with pytest.raises(KernelModelError, match=r"6\.1"):
        KernelFeatures(series="6.1", hvhe=True)
    with pytest.raises(KernelModelError, match=r"6\.1"):
        KernelFeatures(series="6.1", lpa2=True)
    with pytest.raises(KernelModelError, match="series"):
        KernelFeatures(series="6.6")


def test_kvm_start_level_is_vtcr_choice() -> None:
    assert kvm_stage2_start_level("4K", 40) == 1  # 2 concatenated level-1 pages
    assert kvm_stage2_start_level("4K", 32) == 2
    assert kvm_stage2_start_level("64K", 32) == 2  # at least 2 levels (not the architecture's level 3)
    assert kvm_stage2_start_level("4K", 52) == 0  # never level -1: concatenation instead


# -- stage 2 map -------------------------------------------------------------------------------------


@pytest.mark.parametrize("series", SERIES)
def test_root_is_concatenated_pages_each_counted_once(series: str) -> None:
    m, pool = s2(series)
    assert m.stage2_pgd_size() == 2 * K4
    assert m.table_pages() == 2 and pool.used_pages == 2
    assert set(m.refcounts().values()) == {1}
    assert m.stage2_map(IPA, K4, PA, KPROT_RW) == 0
    m.stage2_destroy()
    assert pool.used_pages == 0 and m.table_pages() == 0


@pytest.mark.parametrize("series", SERIES)
def test_stage2_leaf_attributes(series: str) -> None:
    m, _ = s2(series)
    assert m.stage2_map(IPA, K4, PA, KPROT_RW | KPROT_SW0) == 0
    pte, level = leaf(m, IPA)
    assert level == 3
    assert d.S2_MEMATTR.get(pte) == d.S2MemAttr.NORMAL_WB
    assert d.S2_AP.get(pte) == d.S2AP.RW and d.S2_XN.get(pte) == d.S2_XN_NEVER
    assert d.SH.get(pte) == d.Shareability.INNER and d.AF.get(pte) == 1 and d.SW.get(pte) == 1
    assert m.stage2_map(IPA + K4, K4, PA, KPROT_R | KPROT_DEVICE) == 0
    assert d.S2_MEMATTR.get(leaf(m, IPA + K4)[0]) == d.S2MemAttr.DEVICE_nGnRE
    assert m.stage2_map(IPA, K4, PA, KPROT_R | KPROT_X | KPROT_DEVICE) == -EINVAL


def test_stage2_fwb_lpa2_and_nc_encodings() -> None:
    m, _ = s2(fwb=True)
    m.stage2_map(IPA, K4, PA, KPROT_RW)
    assert d.S2_MEMATTR.get(leaf(m, IPA)[0]) == d.S2MemAttrFWB.NORMAL_WB
    m.stage2_map(IPA + K4, K4, PA, KPROT_RW | KPROT_NORMAL_NC)
    assert d.S2_MEMATTR.get(leaf(m, IPA + K4)[0]) == d.S2MemAttrFWB.NORMAL_NC
    assert m.stage2_map(IPA, K4, PA, KPROT_DEVICE | KPROT_NORMAL_NC | KPROT_R) == -EINVAL
    assert m.stage2_map(IPA, K4, PA, KPROT_NORMAL_NC | KPROT_RWX) == -EINVAL
    nofwb = KernelModel(m.geom, PagePool(POOL_BASE, 64 * K4, K4), KernelFeatures(fwb=True),
                        s2_flags=KVM_PGTABLE_S2_NOFWB)
    nofwb.stage2_map(IPA, K4, PA, KPROT_RW)
    assert d.S2_MEMATTR.get(leaf(nofwb, IPA)[0]) == d.S2MemAttr.NORMAL_WB
    lp, _ = s2(lpa2=True, ia_bits=48)
    lp.stage2_map(IPA, K4, 1 << 51, KPROT_RW)
    pte, _ = leaf(lp, IPA)
    assert d.pte_to_phys(pte, Granule.K4, lpa2=True) == 1 << 51  # OA[51:50] in bits [9:8], no SH
    assert pte & d.SH.mask == d.OA_51_50_LPA2.prep(2)
    old, _ = s2("6.1")
    old.stage2_map(IPA, K4, PA, KPROT_RW | KPROT_NORMAL_NC)  # 6.1: bit 4 means nothing
    assert d.S2_MEMATTR.get(leaf(old, IPA)[0]) == d.S2MemAttr.NORMAL_WB


@pytest.mark.parametrize("series", SERIES)
def test_remap_with_other_permissions_keeps_the_old_ones(series: str) -> None:
    m, _ = s2(series)
    assert m.stage2_map(IPA, 2 * K4, PA, KPROT_R) == 0
    first = leaf(m, IPA)[0]
    m.take_events()
    ret = m.stage2_map(IPA, 3 * K4, PA, KPROT_RWX)
    if series == "6.12":
        assert ret == 0  # -EAGAIN swallowed: the walk goes on and maps the third page
        assert out_pa(m, IPA + 2 * K4) == PA + 2 * K4
    else:
        assert ret == -EAGAIN  # 6.1 stops at the first identical leaf
        assert out_pa(m, IPA + 2 * K4) is None
    assert leaf(m, IPA)[0] == first  # S2AP and XN unchanged
    if series == "6.12":
        assert m.stage2_map(IPA, K4, PA, KPROT_RWX, flags=KWALK_HANDLE_FAULT) == -EAGAIN
    # A different memory type is an update: break-before-make, then the new leaf.
    m.take_events()
    assert m.stage2_map(IPA, K4, PA, KPROT_R | KPROT_DEVICE) == 0
    assert d.S2_MEMATTR.get(leaf(m, IPA)[0]) == d.S2MemAttr.DEVICE_nGnRE
    assert m.take_events() == [Event(EventKind.TLB_FLUSH_VMID_IPA, IPA, 0, 3)]
    check_refcounts(m)


@pytest.mark.parametrize("series", SERIES)
def test_map_into_a_block_leaves_only_the_new_page(series: str) -> None:
    m, pool = s2(series)
    assert m.stage2_map(IPA, M2, PA, KPROT_RW) == 0
    assert leaf(m, IPA)[1] == 2 and m.table_pages() == 3
    m.take_events()
    assert m.stage2_map(IPA + 5 * K4, K4, 0x9000_0000, KPROT_RW) == 0
    assert m.take_events() == [Event(EventKind.TLB_FLUSH_VMID_IPA, IPA + 5 * K4, 0, 2),
                               Event(EventKind.DCACHE_CLEAN_INVAL_POC, 0x9000_0000, K4)]
    assert out_pa(m, IPA + 5 * K4) == 0x9000_0000
    assert out_pa(m, IPA) is None and out_pa(m, IPA + 6 * K4) is None  # the rest: lazily faulted back
    assert m.table_pages() == 4 and pool.used_pages == 4
    check_refcounts(m)


@pytest.mark.parametrize("series", SERIES)
@pytest.mark.parametrize("tlb_range", [False, True])
def test_block_over_tables_frees_the_subtree(series: str, tlb_range: bool) -> None:
    m, pool = s2(series, tlb_range=tlb_range)
    # Pages in two 2 MiB regions of one 1 GiB region: a level-2 table and two level-3 tables.
    assert m.stage2_map(IPA, K4, PA, KPROT_RW) == 0
    assert m.stage2_map(IPA + M2 + K4, K4, PA, KPROT_RW) == 0
    assert m.table_pages() == 5 and pool.used_pages == 5
    m.take_events()
    assert m.stage2_map(IPA, G1, 0xC000_0000, KPROT_RWX) == 0
    level = leaf(m, IPA + M2 + K4)[1]
    assert level == 1 and out_pa(m, IPA + M2 + K4) == 0xC000_0000 + M2 + K4
    assert m.table_pages() == 2 and pool.used_pages == 2  # the subtree's three pages went back
    check_refcounts(m)
    ev = m.take_events()
    cmo = [Event(EventKind.DCACHE_CLEAN_INVAL_POC, 0xC000_0000, G1), Event(EventKind.ICACHE_INVAL_POU, 0xC000_0000, G1)]
    if series == "6.1":
        assert ev == [Event(EventKind.TLB_FLUSH_VMID), *cmo]
    else:
        flush = (Event(EventKind.TLB_FLUSH_VMID_RANGE, IPA, G1 // K4) if tlb_range
                 else Event(EventKind.TLB_FLUSH_VMID))
        assert ev[:3] == [flush, *cmo]
        assert [e.kind for e in ev[3:]] == [EventKind.FREE_UNLINKED_TABLE]
        assert ev[3].level == 1


def test_range_tlbi_is_chunked() -> None:
    m, _ = s2(tlb_range=True, fwb=True, ia_bits=44, granule="4K")
    big = 2 * MAX_TLBI_RANGE_PAGES * K4 + 3 * K4  # 16 GiB and 3 pages
    m.take_events()
    assert m.stage2_unmap(0, big) == 0
    assert m.take_events() == [Event(EventKind.TLB_FLUSH_VMID_RANGE, 0, MAX_TLBI_RANGE_PAGES),
                               Event(EventKind.TLB_FLUSH_VMID_RANGE, MAX_TLBI_RANGE_PAGES * K4, MAX_TLBI_RANGE_PAGES),
                               Event(EventKind.TLB_FLUSH_VMID_RANGE, 2 * MAX_TLBI_RANGE_PAGES * K4, 3)]


def test_no_memcache_is_enomem_and_an_empty_one_too() -> None:
    m, _ = s2()
    assert m.stage2_map(IPA, K4, PA, KPROT_RW, mc=None) == -ENOMEM
    assert m.stage2_map(IPA, K4, PA, KPROT_RW, mc=MemCache(1)) == -ENOMEM  # needs level-2 and level-3 tables
    check_refcounts(m)
    mc = MemCache(2)
    assert m.stage2_map(IPA + G1, K4, PA, KPROT_RW, mc=mc) == 0 and mc.nobjs == 0  # level-2 + level-3


def test_exhausted_pool_is_enomem() -> None:
    m, _ = s2(pages=3)
    assert m.stage2_map(IPA, K4, PA, KPROT_RW) == -ENOMEM
    check_refcounts(m)


# -- stage 2 unmap, attributes, young, split ---------------------------------------------------------------


@pytest.mark.parametrize("series", SERIES)
def test_unmap_of_part_of_a_block_removes_the_whole_block(series: str) -> None:
    m, pool = s2(series)
    m.stage2_map(IPA, M2, PA, KPROT_RW)
    m.take_events()
    assert m.stage2_unmap(IPA + 7 * K4, K4) == 0
    assert out_pa(m, IPA) is None and out_pa(m, IPA + M2 - K4) is None
    ttl = TLBI_TTL_UNKNOWN if series == "6.12" else 0
    assert m.take_events() == [
        Event(EventKind.TLB_FLUSH_VMID_IPA, IPA + 7 * K4, 0, 2),
        Event(EventKind.DCACHE_CLEAN_INVAL_POC, PA, M2),
        Event(EventKind.TLB_FLUSH_VMID_IPA, IPA + 7 * K4, 0, ttl),  # the empty level-2 table, freed
    ]
    assert m.table_pages() == 2 and pool.used_pages == 2


def test_unmap_with_fwb_and_range_defers_the_tlbi() -> None:
    m, _ = s2(fwb=True, tlb_range=True)
    m.stage2_map(IPA, 2 * K4, PA, KPROT_RW)
    m.stage2_map(IPA + M2, K4, PA, KPROT_RW)
    m.take_events()
    assert m.stage2_unmap(IPA + K4, M2) == 0
    # The emptied level-3 table is still flushed at once; the leaves only by the final range.
    assert m.take_events() == [Event(EventKind.TLB_FLUSH_VMID_IPA, IPA + M2, 0, TLBI_TTL_UNKNOWN),
                               Event(EventKind.TLB_FLUSH_VMID_RANGE, IPA + K4, M2 // K4)]
    assert out_pa(m, IPA) == PA and out_pa(m, IPA + K4) is None


@pytest.mark.parametrize("series", SERIES)
def test_range_checks(series: str) -> None:
    m, _ = s2(series)
    limit = 1 << 40
    assert m.stage2_map(IPA, 0, PA, KPROT_RW) == 0 and m.table_pages() == 2
    assert m.stage2_map(limit - K4, 2 * K4, PA, KPROT_RW) == -ERANGE
    assert m.stage2_map(limit, 0, PA, KPROT_RW) == 0
    assert m.stage2_map(limit - K4, K4, PA, KPROT_RW) == 0  # end == 2^ia_bits is allowed
    assert m.stage2_map(IPA + 0x123, 1, PA + 0x456, KPROT_RW) == 0  # aligned down/up, not refused
    assert out_pa(m, IPA) == PA
    assert m.stage2_unmap(limit + K4, K4) == -ERANGE and m.stage2_wrprotect(0, limit + 1) == -ERANGE
    assert m.get_leaf(limit) == (-ERANGE, 0, 0)
    assert m.stage2_map(IPA + M2, K4, PA, KPROT_RW | 1 << 60) == 0  # unknown prot bits are ignored
    assert leaf(m, IPA + M2)[0] & ~(1 << 60) == leaf(m, IPA + M2)[0]


def test_update_leaf_attrs_612_at_el2_and_in_the_kernel() -> None:
    el2, _ = s2()
    el2.stage2_map(IPA, K4, PA, KPROT_R)
    before = leaf(el2, IPA)[0]
    el2.take_events()
    assert el2.stage2_mkyoung(IPA) == 0  # shared walk: -EPERM at EL2
    assert el2.stage2_relax_perms(IPA, KPROT_W) == -EPERM and leaf(el2, IPA)[0] == before
    assert el2.take_events() == []
    assert el2.stage2_wrprotect(IPA - K4, 3 * K4) == 0  # holes are -EAGAIN, skipped
    assert el2.stage2_relax_perms(IPA, KPROT_SW0) == -EINVAL

    k, _ = s2(hyp_build=False)
    k.stage2_map(IPA, K4, PA, KPROT_R)
    assert k.stage2_test_clear_young(IPA, K4, mkold=True) is True
    old = leaf(k, IPA)[0]
    assert not d.AF.get(old)
    assert k.stage2_mkyoung(IPA) == old  # the descriptor before AF was set
    assert d.AF.get(leaf(k, IPA)[0])
    assert k.stage2_test_clear_young(IPA, K4, mkold=False) is True and d.AF.get(leaf(k, IPA)[0])
    k.take_events()
    assert k.stage2_relax_perms(IPA, KPROT_W | KPROT_X) == 0
    pte = leaf(k, IPA)[0]
    assert d.S2_AP.get(pte) == d.S2AP.RW and d.S2_XN.get(pte) == d.S2_XN_EXEC
    assert k.take_events() == [Event(EventKind.ICACHE_INVAL_POU, PA, K4),
                               Event(EventKind.TLB_FLUSH_VMID_IPA_NSH, IPA, 0, 3)]
    assert k.stage2_relax_perms(IPA + K4, KPROT_W) == -EAGAIN  # a hole
    assert k.take_events() == [Event(EventKind.TLB_FLUSH_VMID_IPA_NSH, IPA + K4, 0, TLBI_TTL_UNKNOWN)]
    assert k.stage2_mkyoung(IPA + K4) == 0


def test_update_leaf_attrs_61() -> None:
    m, _ = s2("6.1")
    m.stage2_map(IPA, K4, PA, KPROT_R)
    first = leaf(m, IPA)[0]
    assert m.stage2_is_young(IPA) is True
    assert m.stage2_mkold(IPA) == first  # the old descriptor
    assert m.stage2_is_young(IPA) is False
    assert m.stage2_mkyoung(IPA) == first & ~d.AF.mask
    m.take_events()
    assert m.stage2_relax_perms(IPA + K4, KPROT_W) == 0  # a hole: nothing to do, flush (addr, 0)
    assert m.take_events() == [Event(EventKind.TLB_FLUSH_VMID_IPA, IPA + K4, 0, 0)]
    with pytest.raises(KernelModelError):
        m.stage2_split(IPA, K4)
    with pytest.raises(KernelModelError):
        m.stage2_test_clear_young(IPA, K4, True)


def test_split_a_1g_block() -> None:
    m, pool = s2(pages=1024)
    assert m.stage2_map(IPA, G1, PA, KPROT_R | KPROT_DEVICE) == 0
    m.stage2_test_clear_young(IPA, G1, mkold=True)
    assert m.stage2_split(IPA, G1, MemCache(0)) == -ENOMEM
    mc = MemCache(1)  # < 513 pages: a level-2 table of 2 MiB blocks, then none left for the block at addr
    assert m.stage2_split(IPA, K4, mc) == -ENOMEM and mc.nobjs == 0
    check_refcounts(m)
    # The first split made the level-2 table of 2 MiB blocks before running out.
    pte, level = leaf(m, IPA + M2)
    assert level == 2 and out_pa(m, IPA + M2 + K4) == PA + M2 + K4
    assert d.S2_MEMATTR.get(pte) == d.S2MemAttr.NORMAL_WB and d.AF.get(pte)  # only R/W/X survive a split
    m.take_events()
    assert m.stage2_split(IPA, 2 * M2) == 0
    assert leaf(m, IPA + M2 + K4)[1] == 3 and out_pa(m, IPA + M2 + K4) == PA + M2 + K4
    assert leaf(m, IPA + 2 * M2)[1] == 2
    assert m.take_events() == [Event(EventKind.TLB_FLUSH_VMID_IPA, IPA, 0, 2),
                               Event(EventKind.TLB_FLUSH_VMID_IPA, IPA + M2, 0, 2)]
    check_refcounts(m)
    m.stage2_destroy()
    assert pool.used_pages == 0


def test_split_with_a_full_cache_builds_pages_at_once() -> None:
    m, pool = s2(pages=1024)
    m.stage2_map(IPA, G1, PA, KPROT_RW)
    mc = MemCache(ptrs_per_table(Granule.K4) + 1)
    assert m.stage2_split(IPA, K4, mc) == 0 and mc.nobjs == 0
    assert m.table_pages() == 2 + 1 + 512 == pool.used_pages
    assert leaf(m, IPA + G1 - K4)[1] == 3
    assert out_pa(m, IPA + G1 - K4) == PA + G1 - K4
    check_refcounts(m)


@pytest.mark.parametrize("series", SERIES)
def test_set_owner_marks_pages_and_counts_them(series: str) -> None:
    m, pool = s2(series)
    m.stage2_map(IPA, M2, PA, KPROT_RW)
    assert m.stage2_set_owner(IPA, 2 * K4, 1) == 0
    assert m.get_leaf(IPA) == (0, 1 << 2, 3)
    assert m.stage2_set_owner(IPA, K4, 2) == -EINVAL
    check_refcounts(m)
    assert m.stage2_unmap(IPA, M2) == 0
    assert m.table_pages() == 2 and pool.used_pages == 2


# -- hyp ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hvhe", [False, True])
def test_hyp_leaf_attributes(hvhe: bool) -> None:
    m, _ = hyp(hvhe=hvhe, bti=True)
    assert m.hyp_map(0x1000, K4, PA, KPROT_RW) == 0
    assert m.hyp_map(0x2000, K4, PA, KPROT_R | KPROT_X) == 0
    assert m.hyp_map(0x3000, K4, PA, KPROT_RW | KPROT_DEVICE) == 0
    rw, rx, dev = leaf(m, 0x1000)[0], leaf(m, 0x2000)[0], leaf(m, 0x3000)[0]
    assert d.S1_UXN.get(rw) == 1 and d.S1_PXN.get(rw) == int(hvhe)
    assert d.S1_UXN.get(rx) == 0 and d.S1_PXN.get(rx) == 0 and d.S1_GP.get(rx) == 1
    assert d.S1_AP.get(rw) == (d.S1AP_E2H.RW_EL0_NONE if hvhe else d.S1AP.RW)
    assert d.S1_AP.get(rx) == (d.S1AP_E2H.RO_EL0_NONE if hvhe else d.S1AP.RO)
    assert d.S1_ATTRINDX.get(dev) == MT_DEVICE_nGnRE and d.S1_ATTRINDX.get(rw) == 0
    assert d.SH.get(rw) == d.Shareability.INNER and d.AF.get(rw) == 1
    assert m.hyp_pte_prot(rw) == KPROT_RW and m.hyp_pte_prot(rx) == KPROT_R | KPROT_X
    for bad in (KPROT_W, KPROT_RWX, KPROT_R | KPROT_X | KPROT_DEVICE, 0):
        assert m.hyp_map(0x4000, K4, PA, bad) == -EINVAL


def test_hvhe_xn_as_612117_had_it() -> None:
    m, _ = hyp(hvhe=True, hvhe_xn_fixed=False)
    m.hyp_map(0x1000, K4, PA, KPROT_R)
    pte = leaf(m, 0x1000)[0]
    assert d.S1_UXN.get(pte) == 1 and d.S1_PXN.get(pte) == 0  # executable at EL2: the known bug


def test_hyp_gp_only_in_612() -> None:
    m, _ = hyp("6.1", bti=True)
    m.hyp_map(0x1000, K4, PA, KPROT_R | KPROT_X)
    assert d.S1_GP.get(leaf(m, 0x1000)[0]) == 0


@pytest.mark.parametrize("series", SERIES)
def test_hyp_unmap_stops_at_holes_and_frees_empty_tables(series: str) -> None:
    m, pool = hyp(series)
    assert m.hyp_map(0x1000, 4 * K4, PA, KPROT_RW) == 0
    assert m.table_pages() == 4
    m.take_events()
    assert m.hyp_unmap(0x1000, 4 * K4) == 4 * K4
    ttl = TLBI_TTL_UNKNOWN if series == "6.12" else 0
    ev = m.take_events()
    assert ev[:4] == [Event(EventKind.TLBI_VALE2IS, 0x1000 * (i + 1), 0, 3) for i in range(4)]
    assert ev[4:] == [Event(EventKind.TLBI_VAE2IS, 0x1000, 0, ttl)] * 3
    assert m.table_pages() == 1 and pool.used_pages == 1
    m.hyp_map(0x1000, 2 * K4, PA, KPROT_RW)
    m.hyp_map(0x4000, K4, PA, KPROT_RW)
    assert m.hyp_unmap(0x1000, 4 * K4) == 2 * K4  # the hole at 0x3000 stops the walk
    assert out_pa(m, 0x4000) == PA and m.table_pages() == 4
    check_refcounts(m)
    m.hyp_destroy()
    assert pool.used_pages == 0


@pytest.mark.parametrize("series", SERIES)
def test_hyp_unmap_of_part_of_a_block(series: str) -> None:
    m, _ = hyp(series)
    m.hyp_map(M2, M2, PA, KPROT_RW)
    assert m.hyp_unmap(M2 + K4, K4) == 0 and out_pa(m, M2) == PA  # -EINVAL: block kept
    assert m.hyp_unmap(M2 + K4, M2) == M2  # enough range after addr: the whole block goes
    assert out_pa(m, M2) is None


@pytest.mark.parametrize("series", SERIES)
def test_hyp_map_over_a_different_mapping(series: str) -> None:
    m, _ = hyp(series)
    m.hyp_map(0x1000, K4, PA, KPROT_RW)
    m.take_events()
    assert m.hyp_map(0x1000, K4, 0x9000_0000, KPROT_RW) == -EINVAL  # level 3: WARN, -EINVAL
    assert [e.kind for e in m.take_events()] == [EventKind.WARN, EventKind.WARN]
    assert out_pa(m, 0x1000) == PA
    assert m.hyp_map(0x1000, K4, PA, KPROT_RW | KPROT_SW0) == 0  # SW bits only: rewritten
    assert d.SW.get(leaf(m, 0x1000)[0]) == 1
    # A block: the conflict replaces it by a table, one reference too many on the parent.
    m.hyp_map(M2, M2, PA, KPROT_RW)
    assert m.hyp_map(M2, M2, 0x9000_0000, KPROT_RW) == 0
    assert leaf(m, M2)[1] == 3
    shift = 0 if series == "6.12" else M2  # 6.1 advanced phys before the check
    assert out_pa(m, M2 + K4) == 0x9000_0000 + shift + K4
    counts = m.refcounts()
    ptrs = ptrs_per_table(Granule.K4)
    over = [p for p, c in counts.items()
            if c != 1 + sum(1 for i in range(ptrs) if d.is_valid(m.pool.read64(p + 8 * i)))]
    assert len(over) == 1
    # A smaller mapping inside a block also replaces it (no WARN in 6.12): the rest is gone.
    m.hyp_map(2 * M2, M2, PA, KPROT_RW)
    m.take_events()
    assert m.hyp_map(2 * M2 + K4, K4, PA, KPROT_RW) == 0
    assert out_pa(m, 2 * M2) is None and out_pa(m, 2 * M2 + K4) == PA
    assert kinds(m.take_events()) == ([] if series == "6.12" else ["warn"])


# -- properties ----------------------------------------------------------------------------------------------

S2_OPS = ["map", "map", "map_block", "map_big", "unmap", "wrprotect", "owner", "split", "young", "relax"]


@st.composite
def s2_programs(draw: st.DrawFn) -> tuple[str, Granule, bool, list[tuple[str, int, int, int, int]]]:
    series = draw(st.sampled_from(SERIES))
    granule = draw(st.sampled_from(list(Granule)))
    fwb = draw(st.booleans())
    per_block = level_size(granule, 2) // granule.size
    window = 2 * per_block
    prots = [KPROT_R, KPROT_RW, KPROT_RWX, KPROT_RW | KPROT_DEVICE, KPROT_R | KPROT_SW0]
    ops = []
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(S2_OPS))
        if kind == "map_block":
            first, count = draw(st.integers(0, 1)) * per_block, per_block
        elif kind == "map_big" and granule is Granule.K4:
            first, count = 0, level_size(granule, 1) // granule.size
        else:
            first = draw(st.integers(0, window - 1))
            count = draw(st.integers(1, min(40, window - first)))
        pa_page = draw(st.integers(0, 3)) * per_block + draw(st.sampled_from([0, 0, 1, 7]))
        if kind == "map_big":
            pa_page = 0  # 1 GiB aligned: one block (an unaligned one would be 262,144 pages)
        ops.append((kind, first, count, pa_page, draw(st.sampled_from(prots))))
    return series, granule, fwb, ops


def run_s2(m: KernelModel, ops: list[tuple[str, int, int, int, int]]) -> None:
    g = m.geom.granule.size
    for kind, first, count, pa_page, prot in ops:
        addr, size, pa = IPA + first * g, count * g, PA + pa_page * g
        v612 = m.features.v612
        if kind.startswith("map"):
            ret = m.stage2_map(addr, size, pa, prot)
            assert ret in (0, -EAGAIN, -ENOMEM) or (ret == -EINVAL and prot & KPROT_DEVICE and prot & KPROT_X)
        elif kind == "unmap":
            assert m.stage2_unmap(addr, size) == 0
        elif kind == "wrprotect":
            assert m.stage2_wrprotect(addr, size) == 0
        elif kind == "owner":
            assert m.stage2_set_owner(addr, size, 1) in (0, -ENOMEM)
        elif kind == "split" and v612:
            assert m.stage2_split(addr, size, MemCache(8)) in (0, -ENOMEM)
        elif kind == "young":
            if v612:
                m.stage2_test_clear_young(addr, size, mkold=True)
            else:
                m.stage2_mkold(addr)
            m.stage2_mkyoung(addr)
        elif kind == "relax":
            assert m.stage2_relax_perms(addr, prot & KPROT_RWX) in (0, -EAGAIN, -EPERM)
        check_refcounts(m)
        assert m.pool.used_pages == m.table_pages(), "a table page leaked"


@settings(max_examples=80, deadline=None)
@given(s2_programs())
def test_stage2_refcounts_and_destroy(prog: tuple[str, Granule, bool, list[tuple[str, int, int, int, int]]]) -> None:
    series, granule, fwb, ops = prog
    pool = PagePool(POOL_BASE, (1200 if granule is Granule.K4 else 64) * granule.size, granule.size)
    geom = Geometry.create(Stage.S2, granule, 40)
    m = KernelModel(geom, pool, KernelFeatures(series=series, fwb=fwb, tlb_range=fwb, hyp_build=False))
    run_s2(m, ops)
    m.stage2_destroy()
    assert pool.used_pages == 0


@st.composite
def hyp_programs(draw: st.DrawFn) -> tuple[str, Granule, list[tuple[bool, int, int, int]]]:
    series = draw(st.sampled_from(SERIES))
    granule = draw(st.sampled_from(list(Granule)))
    ops = []
    for _ in range(draw(st.integers(1, 12))):
        first = draw(st.integers(0, 255))
        ops.append((draw(st.booleans()), first, draw(st.integers(1, 32)), draw(st.integers(0, 64))))
    return series, granule, ops


@settings(max_examples=80, deadline=None)
@given(hyp_programs())
def test_hyp_refcounts_and_destroy(prog: tuple[str, Granule, list[tuple[bool, int, int, int]]]) -> None:
    """Page-sized hyp mappings (no blocks, so no block replaced by a table): the count is exact."""
    series, granule, ops = prog
    g = granule.size
    pool = PagePool(POOL_BASE, 64 * g, g)
    m = KernelModel(Geometry.create(Stage.S1, granule, 48), pool, KernelFeatures(series=series))
    for is_map, first, count, pa_page in ops:
        if is_map:
            assert m.hyp_map(IPA + first * g, count * g, PA + pa_page * g, KPROT_RW) in (0, -EINVAL)
        else:
            assert m.hyp_unmap(IPA + first * g, count * g) <= count * g
        check_refcounts(m)
        assert pool.used_pages == m.table_pages()
    m.hyp_destroy()
    assert pool.used_pages == 0


@st.composite
def disjoint_maps(draw: st.DrawFn) -> tuple[Stage, Granule, list[tuple[int, int, int, Prot]]]:
    stage = draw(st.sampled_from([Stage.S1, Stage.S2]))
    granule = draw(st.sampled_from(list(Granule)))
    per_block = level_size(granule, 2) // granule.size
    cuts = sorted(set(draw(st.lists(st.integers(0, 3 * per_block), min_size=2, max_size=8))))
    maps = []
    for lo, hi in itertools.pairwise(cuts):
        if draw(st.booleans()):
            pa = draw(st.sampled_from([lo, lo + 1, per_block]))
            maps.append((lo, hi - lo, pa, draw(st.sampled_from([Prot.R, Prot.RW, Prot.RX]))))
    return stage, granule, maps


@settings(max_examples=60, deadline=None)
@given(disjoint_maps())
def test_same_bytes_as_the_strict_model_on_disjoint_maps(
        prog: tuple[Stage, Granule, list[tuple[int, int, int, Prot]]]) -> None:
    """Where the strict model accepts (maps into holes), upstream builds the very same table image."""
    stage, granule, maps = prog
    g = granule.size
    strict_pool, oracle_pool = PagePool(POOL_BASE, 64 * g, g), PagePool(POOL_BASE, 64 * g, g)
    geom = Geometry.create(stage, granule, 40)
    strict = HypPgtable(strict_pool, granule, 40) if stage is Stage.S1 else Stage2Pgtable(strict_pool, granule, 40)
    m = KernelModel(geom, oracle_pool, KernelFeatures())
    for first, count, pa_page, prot in maps:
        if stage is Stage.S1 and prot & Prot.X and prot & Prot.W:
            continue
        try:
            strict.map(IPA + first * g, count * g, PA + pa_page * g, prot)
        except MapConflictError:  # pragma: no cover - disjoint ranges never conflict
            raise
        kprot = prot_from_model(prot)
        ret = m.hyp_map(IPA + first * g, count * g, PA + pa_page * g, kprot) if stage is Stage.S1 else \
            m.stage2_map(IPA + first * g, count * g, PA + pa_page * g, kprot)
        assert ret == 0
    assert strict_pool.export() == oracle_pool.export()
    assert strict_pool.used_pages == oracle_pool.used_pages == m.table_pages()
