"""FEAT_LPA2 (DS = 1) and the EL2&0 regime (E2H = 1) on hand-encoded tables.

Descriptor layout with DS = 1 (Arm ARM D8.3, 4K and 16K): bits [49:g] are OA[49:g], bits [9:8]
are OA[51:50] (no SH field: TCR/VTCR SH0 gives the shareability), for next-table addresses too.
Levels: 4K level -1 (a 52-bit input: 16 entries indexed by IA[51:48]); blocks at 4K level 0
(512 GiB) and 16K level 1 (64 GiB) only with DS = 1 (AArch64.BlockDescSupported). FST for
level -1: address size 0b101001, translation 0b101011.
EL2&0 stage-1 permissions for EL2 (PAN = 0): AP[2] read-only, AP[1] EL0 access; PXN (bit 53) and
PXNTable (bit 59) forbid EL2 fetches, and so does AP = 0b01 (EL0-writable); UXN (bit 54) and
UXNTable (bit 60) concern EL0 only. KVM's hVHE hyp mappings: AP[1] = 0, execute-never = PXN | UXN.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Granule
from harness.arch.registers import FaultKind, Par
from harness.core.batch import expected_par_batch, translate_batch
from harness.core.dump import mapped_ranges
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable, KvmPgtable, Stage2Pgtable
from harness.core.prot import Prot
from harness.core.translate import EXEC, PERM_R, PERM_W, PERM_X, READ, WRITE, expected_par, translate

BASE = 0x4000_0000
VALID_TABLE = 0b11
PAGE = 0b11
BLOCK = 0b01
AF = 1 << 10
S2_RW_WB = AF | (0b11 << 6) | (0xF << 2)
PXN = 1 << 53
UXN = 1 << 54
PXN_TABLE = 1 << 59
UXN_TABLE = 1 << 60


def lpa2_oa(pa: int) -> int:
    """Descriptor address bits for a 4K/16K output address with DS = 1, written from the layout."""
    return (pa & ((1 << 50) - 1) & ~0xFFF) | (((pa >> 50) & 3) << 8)


def test_lpa2_descriptor_encoding() -> None:
    pa = 0xF_1234_5678_9000
    assert d.phys_to_pte(pa, Granule.K4, lpa2=True) == 0x3_1234_5678_9000 | (0b11 << 8) == lpa2_oa(pa)
    assert d.pte_to_phys(lpa2_oa(pa) | PAGE, Granule.K4, lpa2=True) == pa
    assert d.pte_to_phys(lpa2_oa(pa) | PAGE, Granule.K4) == 0x1234_5678_9000  # DS = 0 reading
    with pytest.raises(ValueError, match="48 bits"):
        d.phys_to_pte(pa, Granule.K4)
    assert d.leaf_pte(0x4000, d.SH.prep(3), 3, Granule.K16, lpa2=True) == 0x4000 | PAGE  # no SH
    assert "SH" not in {f.name for f in d.fields_of(d.Stage.S1, lpa2=True)}


def chain(pool: PagePool, geom: Geometry, addr: int, leaf_level: int, leaf: int,
          table_extra: int = 0) -> list[int]:
    """Tables from the start level down to ``leaf_level`` in pages after BASE, LPA2 form."""
    table = BASE
    tables = [table]
    for i, level in enumerate(range(geom.start_level, leaf_level)):
        idx = geom.pgd_index(addr) if level == geom.start_level else geom.index(level, addr)
        nxt = BASE + (geom.pgd_pages + i) * geom.granule.size
        pool.write64(table + 8 * idx, lpa2_oa(nxt) | VALID_TABLE | table_extra)
        table = nxt
        tables.append(table)
    idx = geom.pgd_index(addr) if leaf_level == geom.start_level else geom.index(leaf_level, addr)
    pool.write64(table + 8 * idx, leaf)
    return tables


def test_4k_52bit_stage1_walks_five_levels() -> None:
    geom = Geometry.create(1, "4K", 52, 52, lpa2=True)
    assert (geom.start_level, geom.pgd_entries, geom.root_align) == (-1, 16, 128)
    pool = PagePool(BASE, 16 * 4096, 4096)
    va = 0xA_BCDE_F012_3456
    pa = 0xE_0000_1234_5000
    chain(pool, geom, va, 3, lpa2_oa(pa) | PAGE | AF)
    t = translate(pool, geom, BASE, va, sh0=0b10)
    assert t.ok, t.explain()
    assert [s.level for s in t.steps] == [-1, 0, 1, 2, 3]
    assert t.steps[0].index == 0xA
    assert t.pa == pa | 0x456 and t.sh == 0b10
    assert Par(expected_par(t)).pa == pa
    res = translate_batch(pool.words(), pool.base, geom, BASE, np.array([va], dtype=np.uint64), sh0=0b10)
    assert int(res.pa[0]) == pa | 0x456 and int(res.sh[0]) == 0b10


def test_level_minus_1_faults_use_their_own_codes() -> None:
    geom = Geometry.create(1, "4K", 52, 48, lpa2=True)
    pool = PagePool(BASE, 8 * 4096, 4096)
    va = 3 << 48
    t = translate(pool, geom, BASE, va)  # zeroed level -1 entry
    assert (t.fault, t.fault_level) == (FaultKind.TRANSLATION, -1)
    assert Par(expected_par(t)).fst == 0b101011
    # A next-table address with OA[51:50] (bits [9:8]) beyond the 48-bit PA size.
    pool.write64(BASE + 8 * 3, lpa2_oa(1 << 50) | VALID_TABLE)
    t2 = translate(pool, geom, BASE, va)
    assert (t2.fault, t2.fault_level) == (FaultKind.ADDRESS_SIZE, -1)
    assert Par(expected_par(t2)).fst == 0b101001
    res = translate_batch(pool.words(), pool.base, geom, BASE, np.array([va, 0], dtype=np.uint64))
    assert expected_par_batch(res).tolist() == [expected_par(t2), expected_par(translate(pool, geom, BASE, 0))]


def test_block_levels_with_ds() -> None:
    # 4K level 0: a 512 GiB block only with DS = 1.
    geom = Geometry.create(2, "4K", 48, 52, 0, lpa2=True)
    assert geom.block_levels == (0, 1, 2)
    pool = PagePool(BASE, 8 * 4096, 4096)
    ipa = (5 << 39) | 0x12_3456_789A
    pool.write64(BASE + 8 * 5, lpa2_oa(0xF_0000_0000_0000) | BLOCK | S2_RW_WB)
    t = translate(pool, geom, BASE, ipa, WRITE)
    assert t.ok and t.level == 0 and t.size == 1 << 39
    assert t.pa == 0xF_0000_0000_0000 | (ipa & ((1 << 39) - 1))
    assert translate(pool, Geometry.create(2, "4K", 48, 48, 0), BASE, ipa).fault is FaultKind.TRANSLATION
    # 16K level 1: a 64 GiB block only with DS = 1.
    g16 = Geometry.create(2, "16K", 50, 52, 0, lpa2=True)
    assert g16.block_levels == (1, 2)
    pool16 = PagePool(BASE, 8 * 16384, 16384)
    ipa16 = (1 << 47) | (3 << 36) | 0x1234
    tables = chain(pool16, g16, ipa16, 1, lpa2_oa(0x8_0000_0000_0000) | BLOCK | S2_RW_WB)
    assert len(tables) == 2
    t16 = translate(pool16, g16, BASE, ipa16)
    assert t16.ok and t16.level == 1 and t16.pa == 0x8_0000_0000_1234


def test_stage2_level_minus_1_with_16_entries() -> None:
    geom = Geometry.create(2, "4K", 52, 52, -1, lpa2=True)
    assert (geom.pgd_pages, geom.pgd_entries) == (1, 16)
    t = Stage2Pgtable(PagePool(BASE, 64 * 4096, 4096), "4K", 52, 52, -1, lpa2=True)
    ipa = 0xF_8000_0000_0000
    t.map(ipa, 1 << 39, 0xA_0000_0000_0000, Prot.RW)  # one level-0 block (DS = 1)
    t.map(0x20_0000, 0x1000, 0xF_FFFF_FFFF_F000, Prot.R)
    assert [(lf.addr, lf.level) for lf in t.leaves()] == [(0x20_0000, 3), (ipa, 0)]
    pgd = t.pgd
    assert pgd is not None
    for addr, pa, perms in ((ipa + 0x1234, 0xA_0000_0000_1234, PERM_R | PERM_W),
                            (0x20_0ABC, 0xF_FFFF_FFFF_FABC, PERM_R)):
        tr = translate(t.mem, geom, pgd, addr)
        assert tr.ok and tr.pa == pa and tr.perms == perms and tr.sh == 0b11, tr.explain()
        assert tr.descriptor is not None and d.SH.get(tr.descriptor) == (pa >> 50) & 3
    ranges = mapped_ranges(t.mem, geom, pgd)
    assert [(r.va, r.size, r.pa) for r in ranges] == [(0x20_0000, 0x1000, 0xF_FFFF_FFFF_F000),
                                                     (ipa, 1 << 39, 0xA_0000_0000_0000)]
    t.unmap(ipa + (1 << 30), 1 << 30)  # splits the level-0 block: LPA2 addresses survive
    tr = translate(t.mem, geom, pgd, ipa + (2 << 30) + 5)
    assert tr.ok and tr.pa == 0xA_0000_8000_0005 and tr.level == 1
    assert translate(t.mem, geom, pgd, ipa + (1 << 30)).fault is FaultKind.TRANSLATION
    t.destroy()
    assert t.mem.used_pages == 0


def test_without_lpa2_52bit_outputs_are_refused() -> None:
    t = Stage2Pgtable(PagePool(BASE, 16 * 4096, 4096), "4K", 48, 48)
    with pytest.raises(ValueError, match="48"):
        t.map(0, 0x1000, 1 << 48, Prot.R)
    with pytest.raises(ValueError, match="pa_bits"):
        Geometry.create(2, "16K", 48, 52)
    with pytest.raises(ValueError, match="lpa2"):
        Geometry.create(2, "64K", 48, 52, lpa2=True)


# ---------------------------------------------------------------------------------------------
# EL2&0 (hVHE).


def s1_leaf(pa: int, extra: int) -> int:
    return pa | PAGE | AF | (0b11 << 8) | extra


@pytest.mark.parametrize(
    ("bits", "table_bits", "perms"),
    [
        (0, 0, PERM_R | PERM_W | PERM_X),  # AP 0b00: EL2 RW, no EL0
        (0b01 << 6, 0, PERM_R | PERM_W),  # AP 0b01: EL0-writable, so never EL2-executable
        (0b10 << 6, 0, PERM_R | PERM_X),  # AP 0b10: read-only
        (0b11 << 6, 0, PERM_R | PERM_X),  # AP 0b11: read-only, EL0 read
        (PXN, 0, PERM_R | PERM_W),
        (UXN, 0, PERM_R | PERM_W | PERM_X),  # UXN: EL0 only
        (0, PXN_TABLE, PERM_R | PERM_W),
        (0, UXN_TABLE, PERM_R | PERM_W | PERM_X),
        (0, 1 << 62, PERM_R | PERM_X),  # APTable[1]: read-only below
        (0, 1 << 61, PERM_R | PERM_W | PERM_X),  # APTable[0]: no EL0 access below
        # AP 0b01 below APTable[0] (no EL0 access) or APTable[1] (read-only): no longer
        # EL0-writable after the table attributes, so EL2 may execute it.
        (0b01 << 6, 1 << 61, PERM_R | PERM_W | PERM_X),
        (0b01 << 6, 1 << 62, PERM_R | PERM_X),
    ],
)
def test_e2h_permissions(bits: int, table_bits: int, perms: int) -> None:
    geom = Geometry.create(1, "4K", 39, 40, e2h=True)
    pool = PagePool(BASE, 8 * 4096, 4096)
    va = 0x12_3456_7000
    table = BASE
    for i, level in enumerate(range(geom.start_level, 3)):
        nxt = BASE + (i + 1) * 4096
        pool.write64(table + 8 * geom.index(level, va), nxt | VALID_TABLE | table_bits)
        table = nxt
    pool.write64(table + 8 * geom.index(3, va), s1_leaf(0x8000_0000, bits))
    t = translate(pool, geom, BASE, va)
    assert t.perms == perms, t.explain()
    for access, perm in ((READ, PERM_R), (WRITE, PERM_W), (EXEC, PERM_X)):
        r = translate(pool, geom, BASE, va, access)
        assert (r.fault is None) == bool(perms & perm)
        res = translate_batch(pool.words(), pool.base, geom, BASE, np.array([va], dtype=np.uint64), access)
        assert int(res.perms[0]) == (perms if r.ok else 0)
    # Without E2H, bit 54 is XN and AP[1] is RES1: the same descriptor reads differently.
    plain = translate(pool, Geometry.create(1, "4K", 39, 40), BASE, va)
    assert bool(plain.perms & PERM_X) == (not bits & UXN and not table_bits & UXN_TABLE)


@pytest.mark.parametrize("granule", ["4K", "16K", "64K"])
def test_hvhe_hyp_mappings_as_kvm_encodes_them(granule: str) -> None:
    g = Granule.parse(granule)
    lpa2 = g is not Granule.K64
    t = HypPgtable(PagePool(BASE, 64 * g.size, g.size), g, 52, 52, lpa2=lpa2, e2h=True)
    t.map(0, g.size, 0xF_0000_0000_0000, Prot.RW)
    t.map(g.size, g.size, 0x4000_0000, Prot.RX)
    t.map(2 * g.size, g.size, 0x900_0000, Prot.R | Prot.DEVICE)
    rw, rx, dev = (t.get_leaf(i * g.size).pte for i in range(3))
    assert (d.S1_AP.get(rw), d.S1_AP.get(rx), d.S1_AP.get(dev)) == (0b00, 0b10, 0b10)  # AP[1] = 0
    assert rw & (PXN | UXN) == PXN | UXN and rx & (PXN | UXN) == 0
    assert t.pgd is not None
    got = [translate(t.mem, t.geom, t.pgd, i * g.size + 8).perms for i in range(3)]
    assert got == [PERM_R | PERM_W, PERM_R | PERM_X, PERM_R]
    assert translate(t.mem, t.geom, t.pgd, 8).pa == 0xF_0000_0000_0008


def test_for_geometry_builds_the_regime() -> None:
    geom = Geometry.create(1, "16K", 52, 52, lpa2=True, e2h=True)
    t = KvmPgtable.for_geometry(geom, PagePool(BASE, 16 * 16384, 16384))
    assert isinstance(t, HypPgtable) and t.geom == geom
    regs = t.regs()
    assert regs.hcr_el2_set == 1 << 34  # type: ignore[union-attr]
    s2 = KvmPgtable.for_geometry(Geometry.create(2, "4K", 52, 52, -1, lpa2=True), PagePool(BASE, 16 * 4096, 4096))
    assert isinstance(s2, Stage2Pgtable) and s2.geom.start_level == -1


def test_e2h_dump_names_bit_54_uxn() -> None:
    t = HypPgtable(PagePool(BASE, 16 * 4096, 4096), "4K", 48, 48, e2h=True)
    t.map(0x1000, 0x1000, 0x8000_0000, Prot.RW)
    assert t.pgd is not None
    (r,) = mapped_ranges(t.mem, t.geom, t.pgd)
    assert dict(r.fields)["UXN"] == 1 and dict(r.fields)["PXN"] == 1 and "XN" not in dict(r.fields)
