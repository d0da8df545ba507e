"""Issue 11's model bugs, each against hand-encoded tables and rules written from the Arm ARM ASL:

1. The initial table is aligned to its own size (``AArch64.S1TTBaseAddress``/``S2TTBaseAddress``),
   64 bytes only for a 52-bit base: a 16-byte aligned 2-entry root is read where it is.
2. Stage-2 start-level legality uses PAMax (``AArch64.S2InvalidSL``), not VTCR_EL2.PS.
3. The final output address is checked against the PA size (``AArch64.OAOutOfRange``): a 64K
   level-1 block (4 TiB) at stage 1 with PS = 36 gives an Address size fault at level 1 for
   inputs whose offset reaches 2**36; QEMU 10 does not check it (``WalkSemantics.final_oa_unchecked``).
"""

from __future__ import annotations

import numpy as np

from harness.arch.geometry import Geometry
from harness.arch.registers import FaultKind, Par
from harness.core.batch import expected_par_batch, translate_batch
from harness.core.memory import PagePool
from harness.core.translate import WalkSemantics, expected_par, translate

BASE = 0x4000_0000
TABLE = 0b11
PAGE = 0b11
BLOCK = 0b01
AF = 1 << 10
SH_IS = 0b11 << 8
S1_NORMAL = AF | SH_IS
S2_NORMAL = AF | SH_IS | (0b11 << 6) | (0xF << 2)
GIB = 1 << 30


def test_small_root_is_aligned_to_its_size_not_64_bytes() -> None:
    # Stage 2, 4K, 31-bit IPA, start level 1: 2 entries = 16 bytes.
    geom = Geometry.create(2, "4K", 31, 48, 1)
    assert geom.pgd_entries == 2
    pool = PagePool(BASE, 8 * 4096, 4096)
    root = BASE + 0x30  # 16-byte aligned, not 64-byte aligned
    pool.write64(BASE + 0x00, 0x7_0000_0000 | BLOCK | S2_NORMAL)  # what a 64-byte rounding would read
    pool.write64(BASE + 0x08, 0x8_0000_0000 | BLOCK | S2_NORMAL)
    pool.write64(root + 0x00, 0x5_0000_0000 | BLOCK | S2_NORMAL)
    pool.write64(root + 0x08, 0x6_0000_0000 | BLOCK | S2_NORMAL)
    t0 = translate(pool, geom, root, 0x1234)
    t1 = translate(pool, geom, root, GIB + 0x1234)
    assert (t0.pa, t1.pa) == (0x5_0000_1234, 0x6_0000_1234)
    assert t1.steps[0].desc_pa == root + 8
    res = translate_batch(pool.words(), pool.base, geom, root, np.array([0x1234, GIB + 0x1234], dtype=np.uint64))
    assert res.pa.tolist() == [0x5_0000_1234, 0x6_0000_1234]
    # A base with bits below the table size set: those bits are RES0 (cleared).
    assert translate(pool, geom, root + 8, GIB).pa == 0x6_0000_0000


def test_stage2_level0_with_40bit_ps_translates() -> None:
    geom = Geometry.create(2, "4K", 40, 40, 0)  # legal: PAMax is 52 bits
    pool = PagePool(BASE, 8 * 4096, 4096)
    pool.write64(BASE + 8, (BASE + 4096) | TABLE)  # level 0 entry 1: IPA bit 39 set
    pool.write64(BASE + 4096 + 8 * 2, 0x8000_0000 | BLOCK | S2_NORMAL)  # level 1 index 2
    t = translate(pool, geom, BASE, (1 << 39) | (2 << 30) | 0x5678)
    assert t.ok and t.pa == 0x8000_5678 and t.level == 1


def _64k_level1_block(ps: int) -> tuple[PagePool, Geometry]:
    geom = Geometry.create(1, "64K", 48, ps)
    assert geom.start_level == 1
    pool = PagePool(BASE, 4 * 65536, 65536)
    pool.write64(BASE, 0 | BLOCK | S1_NORMAL)  # 4 TiB block at OA 0
    return pool, geom


def test_final_output_address_beyond_ps_is_an_address_size_fault() -> None:
    pool, geom = _64k_level1_block(36)
    inside = 0xF_FFFF_F000  # below 2**36
    beyond = 1 << 36
    t = translate(pool, geom, BASE, inside)
    assert t.ok and t.pa == inside
    t = translate(pool, geom, BASE, beyond)
    assert (t.fault, t.fault_level, t.fault_stage2) == (FaultKind.ADDRESS_SIZE, 1, False)
    assert Par(expected_par(t)).fst == 0b000001
    q = translate(pool, geom, BASE, beyond, qemu=WalkSemantics(final_oa_unchecked=True))
    assert q.ok and q.pa == beyond
    addrs = np.array([inside, beyond, (1 << 42) - 4096], dtype=np.uint64)
    res = translate_batch(pool.words(), pool.base, geom, BASE, addrs)
    assert res.ok.tolist() == [True, False, False]
    assert res.fault.tolist()[1:] == [FaultKind.ADDRESS_SIZE.value] * 2
    assert res.fault_level.tolist()[1:] == [1, 1]
    assert expected_par_batch(res).tolist() == [expected_par(translate(pool, geom, BASE, int(a))) for a in addrs]
    qres = translate_batch(pool.words(), pool.base, geom, BASE, addrs, qemu=WalkSemantics(final_oa_unchecked=True))
    assert qres.ok.all()


def test_final_oa_check_comes_before_the_access_flag() -> None:
    pool, geom = _64k_level1_block(36)
    pool.write64(BASE, 0 | BLOCK | SH_IS)  # AF = 0
    t = translate(pool, geom, BASE, 1 << 36)
    assert t.fault is FaultKind.ADDRESS_SIZE
    assert translate(pool, geom, BASE, 0x1000).fault is FaultKind.ACCESS_FLAG
