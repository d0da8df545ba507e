"""FEAT_LPA2 and hVHE facts of the model, proved on QEMU's MMU (marker ``hw``).

Tables built by the model's builders at the layout's pool, installed with the model's register
values, probed with AT: every PAR_EL1 must equal the model's expected value under the compare
mask. What this proves: DS = 1 descriptors (OA[51:50] in [9:8], OA[49:48] in [49:48]) for tables
and leaves, 4K level -1 at both stages (stage 2 through VTCR_EL2.SL2), 16K level 0 at stage 2,
blocks at 4K level 0 and 16K level 1 with DS = 1, shareability from SH0, the level -1 fault
codes, TCR_EL2 in its E2H = 1 layout with DS at bit 59, and the final output-address check.
Stage-2 permission faults are not probed with AT (QEMU 10 aborts on them).
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.arch.geometry import Geometry
from harness.arch.registers import FaultKind, Par
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable, KvmPgtable, Stage2Pgtable
from harness.core.prot import Prot
from harness.core.translate import READ, WRITE, Access, WalkSemantics, expected_par, par_compare_mask, translate
from harness.target.layout import LAYOUT
from harness.target.target import Target

pytestmark = pytest.mark.hw

POOL_BYTES = 8 << 20


def pool_for(geom: Geometry) -> PagePool:
    return PagePool(LAYOUT.pool_base, POOL_BYTES, geom.granule.size)


def check(target: Target, table: KvmPgtable, addrs: list[int], accesses: tuple[Access, ...]) -> int:
    """Install ``table`` and compare every AT answer with the model; returns probes made."""
    assert table.pgd is not None
    target.install(table.regs(), table.mem.export())
    s1 = table.geom.stage.value == 1
    probes = 0
    for access in accesses:
        op = ("S1E2" if s1 else "S12E1") + ("R" if access is READ else "W")
        got = target.at(np.array(addrs, dtype=np.uint64), op)
        for a, par in zip(addrs, got.tolist(), strict=True):
            t = translate(table.mem, table.geom, table.pgd, a, access)
            mask = par_compare_mask(t)
            assert (expected_par(t) ^ par) & mask == 0, f"{op} {a:#x}: MMU {Par(par)}\nmodel {t.explain()}"
            probes += 1
    target.uninstall()
    return probes


@pytest.mark.parametrize("start", [-1, 0])
def test_stage2_4k_52bit_ipa(target: Target, start: int) -> None:
    t = Stage2Pgtable(pool_for(Geometry.create(2, "4K", 52, 52, start, lpa2=True)), "4K", 52, 52, start,
                      lpa2=True)
    for r in LAYOUT.stage2_regions():
        t.map(r.base, r.size, r.base, r.prot)
    block = 0xA_0000_0000_0000
    t.map(block, 1 << 39, 0xF_8000_0000_0000, Prot.RW)  # a level-0 block (DS = 1)
    t.map(0x5_0000_1000_0000, 0x4000, 0xE_1234_5678_0000, Prot.RW)  # pages with OA[51:48]
    t.map(0x40_0000_0000, 1 << 30, 0x3_0000_4000_0000, Prot.RW)  # a level-1 block
    addrs = [block + 0x1234_5678, block + (1 << 39) - 8, 0x5_0000_1000_2345, 0x5_0000_1000_4000,
             0x40_1234_5678, 0x41_0000_0000, 0xF_FFFF_FFFF_F000, (1 << 52) - 8, 0x123]
    assert check(target, t, addrs, (READ, WRITE)) == 2 * len(addrs)


def test_stage2_16k_level0_and_level1_block(target: Target) -> None:
    geom = Geometry.create(2, "16K", 52, 52, 0, lpa2=True)
    t = Stage2Pgtable(pool_for(geom), "16K", 52, 52, 0, lpa2=True)
    for r in LAYOUT.stage2_regions():
        t.map(r.base, r.size, r.base, r.prot)
    t.map(0x8_0000_0000_0000, 1 << 36, 0xC_0000_0000_0000, Prot.RW)  # 64 GiB level-1 block
    t.map(0x1_0000_0000_0000, 0x8000, 0xF_FFFF_FFFF_0000, Prot.RW)
    addrs = [0x8_0000_0000_0010, 0x8_000F_FFFF_FFF8, 0x1_0000_0000_4000, 0x1_0000_0000_8000, 0x2_0000_0000_0000]
    assert t.get_leaf(0x8_0000_0000_0000).level == 1
    assert check(target, t, addrs, (READ, WRITE)) == 2 * len(addrs)


@pytest.mark.parametrize(("granule", "lpa2"), [("4K", True), ("16K", True), ("64K", False), ("4K", False)])
def test_hvhe_stage1_52bit(target: Target, granule: str, lpa2: bool) -> None:
    """The EL2&0 regime as KVM's hVHE uses it, with 52-bit VAs (4K: start level -1)."""
    ia = 52 if lpa2 or granule == "64K" else 48
    geom = Geometry.create(1, granule, ia, ia, lpa2=lpa2, e2h=True)
    t = HypPgtable(pool_for(geom), granule, ia, ia, lpa2=lpa2, e2h=True)
    for r in LAYOUT.stage1_regions():
        t.map(r.base, r.size, r.base, r.prot)
    g = geom.granule.size
    hi_va = (1 << ia) - 4 * g
    hi_pa = 0xF_0000_0000_0000 if ia == 52 else 0xF000_0000_0000
    t.map(hi_va, 2 * g, hi_pa, Prot.RW)
    t.map(hi_va + 2 * g, g, hi_pa + 2 * g, Prot.R)
    addrs = [hi_va + 8, hi_va + g + 0x10, hi_va + 2 * g, hi_va + 3 * g, LAYOUT.scratch_base]
    assert check(target, t, addrs, (READ, WRITE)) == 2 * len(addrs)


def test_final_output_address_beyond_ps(target: Target) -> None:
    """A 64K level-1 block (4 TiB) with PS = 36: the Arm ARM faults inputs whose output reaches
    2**36; whether QEMU does is what this test records (the model's QEMU reading must match)."""
    geom = Geometry.create(1, "64K", 48, 36)
    t = HypPgtable(pool_for(geom), "64K", 48, 36)
    for r in LAYOUT.stage1_regions():
        t.map(r.base, r.size, r.base, r.prot)
    assert t.pgd is not None
    t.mem.write64(t.pgd + 8 * 1, (1 << 42) * 0 | 0x1 | (1 << 10) | (3 << 8) | (1 << 54))  # VA 4T..8T -> 0
    target.install(t.regs(), t.mem.export())
    addrs = [(1 << 42) + 0x1000, (1 << 42) + (1 << 36) + 0x1000]
    got = target.at(np.array(addrs, dtype=np.uint64), "S1E2R").tolist()
    target.uninstall()
    arm = [translate(t.mem, geom, t.pgd, a) for a in addrs]
    qemu = [translate(t.mem, geom, t.pgd, a, qemu=WalkSemantics(final_oa_unchecked=True)) for a in addrs]
    assert arm[0].ok and arm[1].fault is not None
    matches_arm = all((expected_par(m) ^ p) & par_compare_mask(m) == 0 for m, p in zip(arm, got, strict=True))
    matches_qemu = all((expected_par(m) ^ p) & par_compare_mask(m) == 0 for m, p in zip(qemu, got, strict=True))
    assert matches_qemu and not matches_arm, [str(Par(p)) for p in got]


def test_small_root_alignment_and_pamax_start_level(target: Target) -> None:
    """Issue 11: a 2-entry stage-2 root aligned to 16 bytes only (not 64) is read where it is;
    4K with PS = 40 starts at level 0 (legal: PAMax is 52 bits)."""
    from harness.arch.registers import stage2_regs

    geom = Geometry.create(2, "4K", 31, 48, 1)
    pool = pool_for(geom)
    page = pool.alloc_page()
    root = page + 0x30
    block = 0x1 | (1 << 10) | (3 << 8) | (0b11 << 6) | (0xF << 2)  # RW normal WB, AF, inner
    pool.write64(page, (0x7 << 30) | block)  # what a root rounded down to 64 bytes would read
    pool.write64(page + 8, (0x8 << 30) | block)
    pool.write64(root, (0x5 << 30) | block)
    pool.write64(root + 8, (0x6 << 30) | block)
    target.install(stage2_regs(geom, root), pool.export())
    got = [Par(p).pa for p in target.at(np.array([0x1234_5000, (1 << 30) | 0x5000], dtype=np.uint64),
                                        "S12E1R").tolist()]
    target.uninstall()
    assert got == [(0x5 << 30) | 0x1234_5000, (0x6 << 30) | 0x5000]
    assert [translate(pool, geom, root, a).pa for a in (0x1234_5000, (1 << 30) | 0x5000)] == got

    g0 = Geometry.create(2, "4K", 40, 40, 0)
    t = Stage2Pgtable(pool_for(g0), "4K", 40, 40, 0)
    t.map(0x80_0000_0000 - (1 << 30), 1 << 30, 0xC0_0000_0000 >> 4, Prot.RW)
    assert check(target, t, [0x7F_C000_1234, 0x1000], (READ, WRITE)) == 4


@pytest.mark.parametrize("pa_bits", [48, 40])
def test_lpa2_oa_51_50_below_52bit_ps(target: Target, pa_bits: int) -> None:
    """DS = 1 with PS under 52 bits: the Arm ARM reads descriptor bits [9:8] as OA[51:50] (an
    address size fault); QEMU 10 ignores them, in a leaf and in a table descriptor alike
    (``WalkSemantics.lpa2_oa``), while OA[49:48] in bits [49:48] beyond PS faults on both."""
    geom = Geometry.create(1, "4K", 48, pa_bits, lpa2=True)
    t = HypPgtable(pool_for(geom), "4K", 48, pa_bits, lpa2=True)
    for r in LAYOUT.stage1_regions():
        t.map(r.base, r.size, r.base, r.prot)
    assert t.pgd is not None
    leaf_va, table_va, hi_va = 0x7F_0000_1000, 0x7F_0020_2000, 0x7F_0040_3000
    for va in (leaf_va, table_va, hi_va):
        t.map(va, 0x1000, 0x80_0000_0000 - 0x10_0000 + (va & 0xFF_F000), Prot.RW)

    def step(va: int, level: int) -> int:
        return next(s.desc_pa for s in translate(t.mem, geom, t.pgd, va).steps if s.level == level)

    for va, level, bits in ((leaf_va, 3, 0b01 << 8), (table_va, 2, 0b10 << 8), (hi_va, 3, 0b11 << 48)):
        pa = step(va, level)
        t.mem.write64(pa, t.mem.read64(pa) | bits)
    addrs = [leaf_va + 0x10, table_va + 0x18, hi_va + 0x20]
    target.install(t.regs(), t.mem.export())
    got = target.at(np.array(addrs, dtype=np.uint64), "S1E2R").tolist()
    target.uninstall()
    arm = [translate(t.mem, geom, t.pgd, a) for a in addrs]
    qemu = [translate(t.mem, geom, t.pgd, a, qemu=WalkSemantics(lpa2_oa=True)) for a in addrs]
    assert [(m.fault, m.fault_level) for m in arm] == [(FaultKind.ADDRESS_SIZE, 3), (FaultKind.ADDRESS_SIZE, 2),
                                                       (FaultKind.ADDRESS_SIZE, 3)]
    assert qemu[0].ok and qemu[1].ok and qemu[2].fault is FaultKind.ADDRESS_SIZE
    for a, m, p in zip(addrs, qemu, got, strict=True):
        assert (expected_par(m) ^ p) & par_compare_mask(m) == 0, f"{a:#x}: MMU {Par(p)}\nQEMU model {m.explain()}"
    assert Par(got[0]).pa == 0x80_0000_0000 - 0x10_0000 + 0x1000
