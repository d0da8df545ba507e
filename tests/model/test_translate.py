"""The architectural walk on hand-encoded tables: every granule, both stages, every fault."""

from __future__ import annotations

from dataclasses import replace

import pytest

from harness.arch.geometry import Geometry, Granule, Stage
from harness.arch.registers import FaultKind, Par
from harness.core.memory import PagePool
from harness.core.translate import (
    EXEC,
    PAR_COMPARE_MASK_FAULT,
    PAR_COMPARE_MASK_OK,
    READ,
    WRITE,
    Access,
    Translation,
    WalkSemantics,
    expected_par,
    par_compare_mask,
    translate,
)

BASE = 0x4000_0000

# Descriptor bits, written out literally (independent of harness.arch.descriptors).
VALID = 1 << 0
TABLE = 0b11
PAGE = 0b11
BLOCK = 0b01
AF = 1 << 10
SH_IS = 0b11 << 8
SH_OS = 0b10 << 8
AP_RO = 1 << 7  # stage-1 AP[2]
XN = 1 << 54
XN_TABLE = 1 << 60
AP_TABLE_RO = 1 << 62
S2AP_R = 1 << 6
S2AP_W = 1 << 7
PATTERN = 0xA5A5_A5A5_A5A5_A5A5


def memattr(m: int) -> int:
    return m << 2


S1_NORMAL = AF | SH_IS  # AttrIndx 0: MAIR 0xff
S2_NORMAL = AF | SH_IS | S2AP_R | S2AP_W | memattr(0xF)


def setup(stage: int, granule: str, ia: int, pa: int | None = None) -> tuple[PagePool, Geometry]:
    geom = Geometry.create(stage, granule, ia, pa)
    return PagePool(BASE, 40 * geom.granule.size, geom.granule.size), geom


def table_page(geom: Geometry, n: int) -> int:
    """Physical address of the n-th table page after the (possibly concatenated) PGD."""
    return BASE + (geom.pgd_pages + n) * geom.granule.size


def chain(pool: PagePool, geom: Geometry, addr: int, leaf_level: int, leaf: int,
          table_bits: tuple[int, ...] = ()) -> int:
    """Hand-write table descriptors from the start level down to ``leaf_level`` for ``addr``,
    then ``leaf`` at ``leaf_level``. ``table_bits[i]`` is ORed into the i-th table descriptor.
    Returns the root (BASE)."""
    table = BASE
    for i, level in enumerate(range(geom.start_level, leaf_level)):
        idx = geom.pgd_index(addr) if level == geom.start_level else geom.index(level, addr)
        nxt = table_page(geom, i)
        extra = table_bits[i] if i < len(table_bits) else 0
        pool.write64(table + 8 * idx, nxt | TABLE | extra)
        table = nxt
    idx = geom.pgd_index(addr) if leaf_level == geom.start_level else geom.index(leaf_level, addr)
    pool.write64(table + 8 * idx, leaf)
    return BASE


GEOMS = [
    (1, "4K", 48, None),
    (1, "16K", 48, None),
    (1, "64K", 48, None),
    (2, "4K", 40, 48),
    (2, "16K", 40, 48),
    (2, "64K", 42, 48),
]
GEOM_IDS = [f"s{s}-{g}-ia{ia}" for s, g, ia, _ in GEOMS]


def leaf_bits(geom: Geometry, level: int) -> int:
    typ = PAGE if level == 3 else BLOCK
    return typ | (S1_NORMAL if geom.stage is Stage.S1 else S2_NORMAL)


def fault_of(t: Translation) -> tuple[FaultKind | None, int | None, bool]:
    return t.fault, t.fault_level, t.fault_stage2


# ---------------------------------------------------------------------------------------------
# Known values.


def test_facts_example_par() -> None:
    """facts.md: Normal WB inner-shareable at PA 0x40001000 reads PAR_EL1 0xff00000040001b80."""
    pool, geom = setup(1, "4K", 48)
    root = chain(pool, geom, 0x1000, 3, 0x4000_1000 | PAGE | AF | SH_IS)
    t = translate(pool, geom, root, 0x1000)
    assert t.ok and t.pa == 0x4000_1000 and t.level == 3 and t.size == 0x1000
    assert t.attr == 0xFF and t.sh == 3 and t.attr_index == 0
    assert expected_par(t) == 0xFF00_0000_4000_1B80
    assert par_compare_mask(t) == PAR_COMPARE_MASK_OK
    assert len(t.steps) == 4
    assert [s.level for s in t.steps] == [0, 1, 2, 3]
    assert t.steps[3].desc_pa == table_page(geom, 2) + 8


@pytest.mark.parametrize(("stage", "granule", "ia", "pa"), GEOMS, ids=GEOM_IDS)
def test_leaf_at_every_allowed_level(stage: int, granule: str, ia: int, pa: int | None) -> None:
    for level in (*Geometry.create(stage, granule, ia, pa).block_levels, 3):
        pool, geom = setup(stage, granule, ia, pa)
        if level < geom.start_level:
            continue
        addr = PATTERN & (geom.limit - 1)
        size = geom.size(level)
        out_base = 3 * size
        root = chain(pool, geom, addr, level, out_base | leaf_bits(geom, level))
        t = translate(pool, geom, root, addr)
        assert t.ok, t.explain()
        assert t.level == level and t.size == size
        assert t.pa == out_base | (addr & (size - 1))
        assert len(t.steps) == level - geom.start_level + 1
        assert t.attr == 0xFF and t.sh == 3
        assert t.readable and t.writable


@pytest.mark.parametrize(("stage", "granule", "ia", "pa"), GEOMS, ids=GEOM_IDS)
def test_invalid_at_every_level(stage: int, granule: str, ia: int, pa: int | None) -> None:
    for level in range(Geometry.create(stage, granule, ia, pa).start_level, 4):
        pool, geom = setup(stage, granule, ia, pa)
        addr = PATTERN & (geom.limit - 1)
        # An invalid entry with every other bit set still faults.
        root = chain(pool, geom, addr, level, 0xFFFF_FFFF_FFFF_FFFE)
        t = translate(pool, geom, root, addr)
        assert fault_of(t) == (FaultKind.TRANSLATION, level, stage == 2)
        assert "invalid" in t.explain()


@pytest.mark.parametrize(
    ("granule", "levels"),
    [("4K", (0, 3)), ("16K", (0, 1, 3)), ("64K", (3,))],
)
def test_reserved_block_encodings(granule: str, levels: tuple[int, ...]) -> None:
    """bit 1 clear where blocks are not allowed (and at level 3): translation fault there."""
    for level in levels:
        pool, geom = setup(1, granule, 48)
        if level < geom.start_level:
            continue
        addr = PATTERN & (geom.limit - 1)
        root = chain(pool, geom, addr, level, BLOCK | S1_NORMAL)
        t = translate(pool, geom, root, addr)
        assert fault_of(t) == (FaultKind.TRANSLATION, level, False), t.explain()


def test_64k_level1_block_needs_feat_lpa() -> None:
    pool, geom = setup(2, "64K", 48, 48)
    assert geom.start_level == 1
    addr = 0x5_1234_5678
    root = chain(pool, geom, addr, 1, BLOCK | S2_NORMAL)
    t = translate(pool, geom, root, addr)
    assert t.ok and t.level == 1 and t.size == 1 << 42 and t.pa == addr
    t = translate(pool, replace(geom, pamax=48), root, addr)
    assert fault_of(t) == (FaultKind.TRANSLATION, 1, True)


def test_block_low_address_bits_ignored() -> None:
    pool, geom = setup(1, "4K", 48)
    addr = 0x1234_5678
    root = chain(pool, geom, addr, 2, 0x8000_0000 | 0x1F_F000 | BLOCK | S1_NORMAL)
    t = translate(pool, geom, root, addr)
    assert t.ok and t.pa == 0x8000_0000 | (addr & 0x1F_FFFF)


# ---------------------------------------------------------------------------------------------
# Address size faults and the OA field.


@pytest.mark.parametrize("level", [0, 1, 2])
def test_address_size_fault_next_table(level: int) -> None:
    pool, geom = setup(1, "4K", 48, 40)
    addr = PATTERN & (geom.limit - 1)
    root = chain(pool, geom, addr, level, (1 << 40) | TABLE)
    t = translate(pool, geom, root, addr)
    assert fault_of(t) == (FaultKind.ADDRESS_SIZE, level, False)
    assert expected_par(t) == 0x801 | (level << 1)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_address_size_fault_output(level: int) -> None:
    pool, geom = setup(2, "4K", 40, 40)
    addr = PATTERN & (geom.limit - 1)
    root = chain(pool, geom, addr, level, (1 << 44) | leaf_bits(geom, level))
    t = translate(pool, geom, root, addr)
    assert fault_of(t) == (FaultKind.ADDRESS_SIZE, level, True)
    assert Par(expected_par(t)).stage2


def test_address_size_fault_root() -> None:
    pool, geom = setup(1, "4K", 48, 40)
    t = translate(pool, geom, 1 << 40, 0x1000)
    assert fault_of(t) == (FaultKind.ADDRESS_SIZE, 0, False)
    assert t.steps == ()


@pytest.mark.parametrize("granule", ["4K", "16K"])
def test_res0_bits_50_48_ignored(granule: str) -> None:
    pool, geom = setup(1, granule, 48)
    addr = PATTERN & (geom.limit - 1)
    root = chain(pool, geom, addr, 3, (0b111 << 48) | 0x4000_0000 | PAGE | S1_NORMAL,
                 table_bits=(0b111 << 48,))
    t = translate(pool, geom, root, addr)
    assert t.ok and t.pa == 0x4000_0000 | (addr & (geom.granule.size - 1))


def test_64k_52bit_output_level2_block() -> None:
    """facts.md: PAR_EL1 PA 0xF_FFFF_F234_5000 through a level-2 block with PA[51:48] in [15:12]."""
    pool, geom = setup(2, "64K", 52, 52)
    assert geom.start_level == 1
    ipa = 0x3234_5000  # level-2 index 1, offset 0x1234_5000 in the 512M block
    block = 0x0000_FFFF_E000_0000 | (0xF << 12) | BLOCK | S2_NORMAL
    root = chain(pool, geom, ipa, 2, block)
    t = translate(pool, geom, root, ipa, WRITE)
    assert t.ok and t.level == 2 and t.size == 1 << 29
    assert t.pa == 0xF_FFFF_F234_5000
    assert expected_par(t) == 0xFF00_0000_0000_0B80 | 0xF_FFFF_F234_5000
    assert Par(expected_par(t)).pa == 0xF_FFFF_F234_5000


def test_64k_oa_51_48_with_48bit_pa() -> None:
    """Arm ARM: with FEAT_LPA bits [15:12] are OA[51:48] whatever PS: address size fault.
    QEMU 10 ignores them unless PS is 52 bits (WalkSemantics.lpa_oa)."""
    pool, geom = setup(2, "64K", 42, 48)
    ipa = 0x2_3456_7890
    root = chain(pool, geom, ipa, 3, 0x7_0000_0000 | (0x1 << 12) | PAGE | S2_NORMAL)
    t = translate(pool, geom, root, ipa)
    assert fault_of(t) == (FaultKind.ADDRESS_SIZE, 3, True)
    t = translate(pool, geom, root, ipa, qemu=WalkSemantics(lpa_oa=True))
    assert t.ok and t.pa == 0x7_0000_0000 | (ipa & 0xFFFF)


@pytest.mark.parametrize(("stage", "granule", "pa"), [(1, "4K", 48), (2, "16K", 40), (1, "16K", 52)])
def test_lpa2_oa_51_50_below_52bit_ps(stage: int, granule: str, pa: int) -> None:
    """Arm ARM: with DS = 1 bits [9:8] are OA[51:50] whatever PS: address size fault, at the
    table or the leaf that holds them. QEMU 10 reads them only with PS = 52 bits
    (WalkSemantics.lpa2_oa): below, it ignores them in tables and leaves; OA[49:48] ([49:48])
    beyond PS faults on both readings."""
    geom = Geometry.create(stage, granule, 48 if stage == 1 else 40, pa, lpa2=True)
    pool = PagePool(BASE, 40 * geom.granule.size, geom.granule.size)
    addr = PATTERN & (geom.limit - 1)
    leaf = 0x7_0000_0000 | PAGE | (S1_NORMAL if stage == 1 else S2_NORMAL) & ~SH_IS
    s2 = stage == 2
    qemu_walk = WalkSemantics(lpa2_oa=True)
    for table_bits, leaf_bits, level in (((), 0b01 << 8, 3), ((0b10 << 8,), 0, geom.start_level)):
        pool.words()[:] = 0
        root = chain(pool, geom, addr, 3, leaf | leaf_bits, table_bits)
        arm, qemu = translate(pool, geom, root, addr), translate(pool, geom, root, addr, qemu=qemu_walk)
        if pa == 52:  # both read them: the leaf's PA has them, the table is beyond the pool
            assert arm == qemu and (arm.pa is not None and arm.pa >> 50 == 1 if leaf_bits else arm.unmodelled)
            continue
        assert fault_of(arm) == (FaultKind.ADDRESS_SIZE, level, s2)
        assert qemu.ok and qemu.pa == 0x7_0000_0000 | (addr & (geom.granule.size - 1))
    if pa < 50:
        pool.words()[:] = 0
        root = chain(pool, geom, addr, 3, leaf | 1 << 49)
        for t in (translate(pool, geom, root, addr), translate(pool, geom, root, addr, qemu=qemu_walk)):
            assert fault_of(t) == (FaultKind.ADDRESS_SIZE, 3, s2)


# ---------------------------------------------------------------------------------------------
# Access flag and permissions.


@pytest.mark.parametrize(("stage", "granule", "ia", "pa"), GEOMS, ids=GEOM_IDS)
def test_access_flag_fault_at_leaf_levels(stage: int, granule: str, ia: int, pa: int | None) -> None:
    for level in (*Geometry.create(stage, granule, ia, pa).block_levels, 3):
        pool, geom = setup(stage, granule, ia, pa)
        if level < geom.start_level:
            continue
        addr = PATTERN & (geom.limit - 1)
        root = chain(pool, geom, addr, level, (3 * geom.size(level)) | leaf_bits(geom, level) & ~AF)
        t = translate(pool, geom, root, addr)
        assert fault_of(t) == (FaultKind.ACCESS_FLAG, level, stage == 2)
        assert expected_par(t) == 0x801 | ((0b1000 | level) << 1) | (0x200 if stage == 2 else 0)


def test_access_flag_before_permission() -> None:
    pool, geom = setup(1, "4K", 48)
    root = chain(pool, geom, 0x20_0000, 2, 0x4000_0000 | BLOCK | SH_IS | AP_RO)
    t = translate(pool, geom, root, 0x20_0000, WRITE)
    assert fault_of(t) == (FaultKind.ACCESS_FLAG, 2, False)


def test_stage1_permissions() -> None:
    pool, geom = setup(1, "4K", 48)
    root = chain(pool, geom, 0x1000, 3, 0x4000_1000 | PAGE | S1_NORMAL | AP_RO)
    chain(pool, geom, 0x2000, 3, 0x4000_2000 | PAGE | S1_NORMAL | XN)
    r = translate(pool, geom, root, 0x1000, READ)
    assert r.ok and r.read_only and r.executable
    w = translate(pool, geom, root, 0x1000, WRITE)
    assert fault_of(w) == (FaultKind.PERMISSION, 3, False)
    assert expected_par(w) == 0x801 | (0b001111 << 1)
    x = translate(pool, geom, root, 0x2000, EXEC)
    assert fault_of(x) == (FaultKind.PERMISSION, 3, False)
    assert translate(pool, geom, root, 0x2000, WRITE).ok
    assert translate(pool, geom, root, 0x1000, EXEC).ok


def test_stage1_hierarchical_table_attributes() -> None:
    pool, geom = setup(1, "4K", 48)
    addr = 0x40_0000_3000
    root = chain(pool, geom, addr, 3, 0x4000_3000 | PAGE | S1_NORMAL,
                 table_bits=(AP_TABLE_RO, 0, XN_TABLE))
    r = translate(pool, geom, root, addr, READ)
    assert r.ok and not r.writable and not r.executable
    w = translate(pool, geom, root, addr, WRITE)
    assert fault_of(w) == (FaultKind.PERMISSION, 3, False)  # reported at the leaf level
    assert "APTable" in w.explain()
    assert fault_of(translate(pool, geom, root, addr, EXEC)) == (FaultKind.PERMISSION, 3, False)


def test_stage2_ignores_table_attributes() -> None:
    pool, geom = setup(2, "4K", 40, 48)
    addr = 0x1000
    root = chain(pool, geom, addr, 3, 0x4000_1000 | PAGE | S2_NORMAL,
                 table_bits=(AP_TABLE_RO | XN_TABLE, AP_TABLE_RO | XN_TABLE))
    assert translate(pool, geom, root, addr, WRITE).ok
    assert translate(pool, geom, root, addr, EXEC).ok


@pytest.mark.parametrize("s2ap", [0, 1, 2, 3])
def test_stage2_s2ap(s2ap: int) -> None:
    pool, geom = setup(2, "4K", 40, 48)
    root = chain(pool, geom, 0x5000, 3, 0x4000_5000 | PAGE | AF | SH_IS | memattr(0xF) | s2ap << 6)
    for access, bit in ((READ, 1), (WRITE, 2)):
        t = translate(pool, geom, root, 0x5000, access)
        if s2ap & bit:
            assert t.ok
            assert expected_par(t) == 0xFF00_0000_4000_5B80
        else:
            assert fault_of(t) == (FaultKind.PERMISSION, 3, True)
            assert expected_par(t) == 0xA1F


@pytest.mark.parametrize(("xn", "exec_ok"), [(0b00, True), (0b01, False), (0b10, False),
                                             (0b11, True)])
def test_stage2_xn_for_el1_fetch(xn: int, exec_ok: bool) -> None:
    pool, geom = setup(2, "4K", 40, 48)
    root = chain(pool, geom, 0x5000, 3, 0x4000_5000 | PAGE | S2_NORMAL | xn << 53)
    assert translate(pool, geom, root, 0x5000, EXEC).ok is exec_ok


# ---------------------------------------------------------------------------------------------
# Input ranges, concatenation, unmodelled reads.


def test_stage1_input_out_of_range() -> None:
    pool, geom = setup(1, "4K", 39)
    t = translate(pool, geom, BASE, 1 << 39)
    assert fault_of(t) == (FaultKind.TRANSLATION, 0, False)
    assert expected_par(t) == 0x809
    assert par_compare_mask(t) == PAR_COMPARE_MASK_FAULT
    assert fault_of(translate(pool, geom, BASE, 0xFFFF_0000_0000_0000))[0] is FaultKind.TRANSLATION


def test_stage2_input_out_of_range() -> None:
    pool, geom = setup(2, "4K", 40, 48)
    t = translate(pool, geom, BASE, 1 << 40)
    assert fault_of(t) == (FaultKind.TRANSLATION, 0, True)
    assert expected_par(t) == 0xA09
    # Above PAMax the disabled EL1 stage 1 faults first: stage-1 address size fault, level 0.
    t = translate(pool, geom, BASE, 1 << 52)
    assert fault_of(t) == (FaultKind.ADDRESS_SIZE, 0, False)
    assert expected_par(t) == 0x801


def test_concatenated_pgd_second_page() -> None:
    pool, geom = setup(2, "4K", 40, 48)
    assert geom.start_level == 1 and geom.pgd_pages == 2
    ipa = 0x80_4020_3000
    root = chain(pool, geom, ipa, 3, 0x4123_4000 | PAGE | S2_NORMAL)
    t = translate(pool, geom, root, ipa)
    assert t.ok and t.pa == 0x4123_4000
    assert t.steps[0].desc_pa == BASE + 0x1008  # entry 1 of the second PGD page
    assert t.steps[0].index == 0x201
    # The same low bits in the first page are not mapped.
    assert fault_of(translate(pool, geom, root, ipa - (1 << 39))) == (FaultKind.TRANSLATION, 1, True)


def test_concatenated_pgd_16k_sixteen_pages() -> None:
    pool, geom = setup(2, "16K", 40, 48)
    assert geom.start_level == 2 and geom.pgd_pages == 16
    ipa = 0xFF_FE00_4000
    root = chain(pool, geom, ipa, 2, 0x8000_0000 | BLOCK | S2_NORMAL)
    t = translate(pool, geom, root, ipa)
    assert t.ok and t.pa == 0x8000_0000 | (ipa & ((1 << 25) - 1))
    assert t.steps[0].desc_pa == BASE + 8 * (ipa >> 25)


def test_table_outside_memory_is_unmodelled() -> None:
    pool, geom = setup(1, "4K", 48)
    root = chain(pool, geom, 0x1000, 1, 0x9000_0000 | TABLE)
    t = translate(pool, geom, root, 0x1000)
    assert t.unmodelled and not t.ok and t.fault is None and t.fault_level == 2
    assert t.steps[-1].raw is None and "outside" in t.explain()
    assert par_compare_mask(t) == 0
    with pytest.raises(ValueError, match="no expected PAR_EL1"):
        expected_par(t)


# ---------------------------------------------------------------------------------------------
# Attributes.


@pytest.mark.parametrize(
    ("mem", "sh", "attr", "par_sh", "unpredictable"),
    [
        (0xF, 0b11, 0xFF, 0b11, False),
        (0xF, 0b10, 0xFF, 0b10, False),
        (0xF, 0b00, 0xFF, 0b00, False),
        (0x1, 0b11, 0x04, 0b10, False),  # Device nGnRE: Outer Shareable
        (0x0, 0b00, 0x00, 0b10, False),
        (0x5, 0b11, 0x44, 0b10, False),  # Normal NC: Outer Shareable
        (0xA, 0b11, 0xBB, 0b11, False),  # write-through with stage 1's allocation hints
        (0x7, 0b11, 0x4F, 0b11, False),
        (0x4, 0b11, None, None, True),  # reserved encoding
    ],
)
def test_stage2_attributes(mem: int, sh: int, attr: int | None, par_sh: int | None,
                           unpredictable: bool) -> None:
    pool, geom = setup(2, "4K", 40, 48)
    root = chain(pool, geom, 0x9000, 3,
                 0x900_0000 | PAGE | AF | S2AP_R | S2AP_W | memattr(mem) | sh << 8)
    t = translate(pool, geom, root, 0x9000)
    assert t.ok and t.memattr == mem
    mask = par_compare_mask(t)
    par = expected_par(t)
    if unpredictable:
        assert mask == PAR_COMPARE_MASK_OK & ~(0xFF << 56) & ~(0b11 << 7)
        return
    assert mask == PAR_COMPARE_MASK_OK
    assert t.attr == attr and t.par_sh == par_sh
    assert par == (attr or 0) << 56 | 0x900_0000 | (par_sh or 0) << 7 | 0xA00


def test_stage1_mair_attributes() -> None:
    pool, geom = setup(1, "4K", 48)
    root = chain(pool, geom, 0x3000, 3, 0x900_0000 | PAGE | AF | SH_IS | 1 << 2)  # AttrIndx 1
    t = translate(pool, geom, root, 0x3000)
    assert t.attr == 0x04 and t.sh == 3 and t.par_sh == 2
    assert expected_par(t) == 0x0400_0000_0900_0B00
    t = translate(pool, geom, root, 0x3000, mair=0x44 << 8)
    assert t.attr == 0x44 and t.par_sh == 2
    # SH = 0b01 is reserved: not compared for cacheable memory.
    chain(pool, geom, 0x4000, 3, 0x900_0000 | PAGE | AF | 0b01 << 8)
    t = translate(pool, geom, root, 0x4000)
    assert t.ok and par_compare_mask(t) == PAR_COMPARE_MASK_OK & ~(0b11 << 7)


def test_exec_has_no_par_and_stage_must_match() -> None:
    pool, geom = setup(1, "4K", 48)
    root = chain(pool, geom, 0x1000, 3, 0x4000_1000 | PAGE | S1_NORMAL)
    with pytest.raises(ValueError, match="AT"):
        expected_par(translate(pool, geom, root, 0x1000, Access.EXEC))
    with pytest.raises(ValueError, match="stage"):
        expected_par(translate(pool, geom, root, 0x1000), Stage.S2)
    assert expected_par(translate(pool, geom, root, 0x1000), Stage.S1) == 0xFF00_0000_4000_1B80


def test_granule_shapes() -> None:
    """Sanity of the geometries the tests rely on."""
    assert Geometry.create(1, "16K", 48).start_level == 0
    assert Geometry.create(1, "64K", 48).start_level == 1
    assert Granule.K64.size == 0x10000
