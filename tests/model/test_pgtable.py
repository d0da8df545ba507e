"""Hyp stage-1 and guest stage-2 table operations: map/unmap/destroy, blocks, errors, refcounts."""

from __future__ import annotations

import pytest

from harness.arch import descriptors as d
from harness.arch.geometry import Granule, Stage, level_size
from harness.arch.registers import MairIndex
from harness.core.memory import PagePool
from harness.core.pgtable import (
    HypPgtable,
    KvmPgtable,
    MapConflictError,
    PgtableError,
    Stage2Pgtable,
)
from harness.core.prot import Prot

POOL_BASE = 0x4800_0000
CONFIGS = [  # (granule, ia_bits) giving room for every block level the granule has
    ("4K", 40), ("16K", 47), ("64K", 48),
]


def make(stage: Stage, granule: str, ia: int, pool_pages: int = 256) -> KvmPgtable:
    g = Granule.parse(granule)
    pool = PagePool(POOL_BASE, pool_pages * g.size, g.size)
    if stage is Stage.S1:
        return HypPgtable(pool, g, ia)
    return Stage2Pgtable(pool, g, ia, pa_bits=52 if g is Granule.K64 else 48)


def leaf_summary(t: KvmPgtable) -> list[tuple[int, int, int]]:
    return [(lf.addr, lf.level, d.pte_to_phys(lf.pte, t.granule)) for lf in t.leaves()]


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
@pytest.mark.parametrize(("granule", "ia"), CONFIGS)
def test_blocks_at_every_allowed_level(stage: Stage, granule: str, ia: int) -> None:
    t = make(stage, granule, ia)
    before = t.mem.used_pages
    for level in t.geom.block_levels:
        if level < t.start_level:
            continue
        size = level_size(t.granule, level)
        va = 4 * size  # aligned to its own size, away from 0
        pa = 8 * size
        t.map(va, size, pa, Prot.RW)
        leaf = t.get_leaf(va)
        assert (leaf.level, d.pte_to_phys(leaf.pte, t.granule)) == (level, pa)
        assert d.kind(leaf.pte, level, t.geom.block_levels) is d.Kind.BLOCK
        t.unmap(va, size)
        assert t.leaves() == []
    assert t.mem.used_pages == before
    t.destroy()
    assert t.mem.used_pages == 0


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
@pytest.mark.parametrize("granule", ["4K", "16K", "64K"])
def test_pages_where_unaligned_and_round_trip(stage: Stage, granule: str) -> None:
    t = make(stage, granule, 40)
    g = t.granule.size
    l2 = level_size(t.granule, 2)
    va, pa = l2 - 2 * g, 0x4000_0000 + l2 - 2 * g  # straddles a level-2 boundary, pages only
    t.map(va, 4 * g, pa, Prot.R)
    got = leaf_summary(t)
    assert got == [(va + i * g, 3, pa + i * g) for i in range(4)]
    t.map(va, 4 * g, pa, Prot.R)  # identical mapping again: accepted
    t.unmap(va, 4 * g)
    assert t.leaves() == []
    assert t.mem.used_pages == t.geom.pgd_pages  # tables left empty were freed
    t.destroy()
    assert t.mem.used_pages == 0


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_conflicting_map_is_rejected_and_leaves_the_tables_unchanged(stage: Stage) -> None:
    t = make(stage, "4K", 40)
    t.map(0x20_0000, 0x20_0000, 0x4020_0000, Prot.RW)  # a 2M block
    t.map(0x40_5000, 0x1000, 0x4100_0000, Prot.RW)
    image = t.mem.export().data
    used = t.mem.used_pages
    with pytest.raises(MapConflictError, match="0x405000"):
        # a range that first installs five fresh pages, then hits the page at 0x405000
        t.map(0x40_0000, 0x8000, 0x5000_0000, Prot.RW)
    assert t.mem.export().data == image and t.mem.used_pages == used
    with pytest.raises(MapConflictError, match="block"):
        t.map(0x20_1000, 0x1000, 0x4020_1000, Prot.R)  # inside the block
    with pytest.raises(MapConflictError):
        t.map(0x20_0000, 0x20_0000, 0x4020_0000, Prot.R)  # same block, other permissions
    assert t.mem.export().data == image


def test_partial_unmap_splits_a_block() -> None:
    t = make(Stage.S2, "4K", 40)
    gb = 1 << 30
    t.map(gb, gb, 0x4000_0000, Prot.RW)
    t.unmap(gb + 0x20_0000 + 0x3000, 0x1000)
    leaves = leaf_summary(t)
    assert (gb, 2, 0x4000_0000) in leaves
    assert (gb + 0x20_0000 + 0x2000, 3, 0x4020_2000) in leaves
    assert (gb + 0x20_0000 + 0x4000, 3, 0x4020_4000) in leaves
    assert all(a != gb + 0x20_3000 for a, _, _ in leaves)
    assert len(leaves) == 511 + 511
    t.unmap(gb, gb)
    assert t.mem.used_pages == t.geom.pgd_pages


def test_hyp_attributes() -> None:
    t = make(Stage.S1, "4K", 40)
    t.map(0x4000_0000, 0x1000, 0x4000_0000, Prot.RX)
    t.map(0x4000_1000, 0x1000, 0x4000_1000, Prot.RW)
    t.map(0x0900_0000, 0x1000, 0x0900_0000, Prot.RW | Prot.DEVICE)
    rx, rw, dev = (t.get_leaf(a).pte for a in (0x4000_0000, 0x4000_1000, 0x0900_0000))
    assert d.S1_AP.get(rx) == d.S1AP.RO and d.S1_XN.get(rx) == 0
    assert d.S1_AP.get(rw) == d.S1AP.RW and d.S1_XN.get(rw) == 1
    assert d.S1_ATTRINDX.get(rw) == MairIndex.NORMAL and d.S1_ATTRINDX.get(dev) == MairIndex.DEVICE_nGnRE
    assert all(d.AF.get(p) == 1 and d.SH.get(p) == d.Shareability.INNER for p in (rx, rw, dev))


@pytest.mark.parametrize(
    ("prot", "needle"),
    [(Prot.W, "readable"), (Prot.RWX, "writable and executable"), (Prot.RX | Prot.DEVICE, "device")],
)
def test_hyp_prot_errors(prot: Prot, needle: str) -> None:
    t = make(Stage.S1, "4K", 40)
    with pytest.raises(PgtableError, match=needle):
        t.map(0, 0x1000, 0, prot)


def test_stage2_attributes_and_updates() -> None:
    t = make(Stage.S2, "4K", 40)
    assert isinstance(t, Stage2Pgtable)
    t.map(0x1000, 0x1000, 0x4000_1000, Prot.RW)
    t.map(0x2000, 0x1000, 0x0900_0000, Prot.R | Prot.DEVICE)
    rw, dev = t.get_leaf(0x1000).pte, t.get_leaf(0x2000).pte
    assert d.S2_MEMATTR.get(rw) == 0xF and d.S2_MEMATTR.get(dev) == 0x1
    assert d.S2_AP.get(rw) == 0b11 and d.S2_AP.get(dev) == 0b01
    assert d.S2_XN.get(rw) == 0b10
    t.wrprotect(0x1000, 0x1000)
    assert d.S2_AP.get(t.get_leaf(0x1000).pte) == 0b01
    assert t.is_young(0x1000)
    assert t.mkold(0x1000) is True
    assert not t.is_young(0x1000)
    assert t.mkold(0x1000) is False
    t.mkyoung(0x1000)
    assert t.is_young(0x1000)
    t.relax_perms(0x1000, Prot.W | Prot.X)
    pte = t.get_leaf(0x1000).pte
    assert d.S2_AP.get(pte) == 0b11 and d.S2_XN.get(pte) == 0
    with pytest.raises(PgtableError, match="device"):
        t.relax_perms(0x2000, Prot.X)
    with pytest.raises(PgtableError, match="not mapped"):
        t.relax_perms(0x9000, Prot.R)
    leaf = t.get_leaf(0x9000)
    assert leaf.pte == 0 and leaf.level == 3


def test_concatenated_pgd_is_aligned_and_used() -> None:
    t = make(Stage.S2, "4K", 43)
    assert t.geom.pgd_pages == 16
    assert t.pgd is not None and t.pgd % (16 * 0x1000) == 0
    last = (1 << 43) - 0x1000
    t.map(last, 0x1000, 0x4000_0000, Prot.R)
    # the level-1 entry for the last page sits in the last PGD page
    assert t.mem.read64(t.pgd + 15 * 0x1000 + 511 * 8) != 0
    t.destroy()
    assert t.mem.used_pages == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((0x800, 0x1000, 0), "addr"),
        ((0, 0x1800, 0), "size"),
        ((0, 0, 0), "size"),
        ((0, 0x1000, 0x10), "pa"),
        ((1 << 40, 0x1000, 0), "limit"),
        ((0, 0x1000, 1 << 48), "physical address size"),
    ],
)
def test_map_argument_errors(args: tuple[int, int, int], needle: str) -> None:
    t = make(Stage.S2, "4K", 40)
    with pytest.raises(PgtableError, match=needle):
        t.map(*args, Prot.R)


def test_52bit_output_needs_64k() -> None:
    t = make(Stage.S2, "64K", 48)
    t.map(0x1_0000, 0x1_0000, 0xF_FFFF_F234_0000, Prot.R)
    assert d.pte_to_phys(t.get_leaf(0x1_0000).pte, t.granule) == 0xF_FFFF_F234_0000


def test_destroy_then_use_is_an_error() -> None:
    t = make(Stage.S1, "16K", 40)
    t.destroy()
    with pytest.raises(PgtableError, match="destroyed"):
        t.map(0, 0x4000, 0, Prot.R)


def test_pool_exhaustion_rolls_back() -> None:
    t = make(Stage.S2, "4K", 40, pool_pages=4)
    with pytest.raises(Exception, match="exhausted"):
        t.map(0x1000, 0x1000 * 600, 0x4000_1000, Prot.R)
    assert t.mem.used_pages == t.geom.pgd_pages
    assert t.leaves() == []
