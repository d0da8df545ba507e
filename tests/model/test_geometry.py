"""Geometry against a table written from the Arm ARM rules (not computed by the code under test).

Stage 1: levels = ceil((ia - g) / (g - 3)), start level = 4 - levels.
Stage 2: the initial level resolves 1 .. (g - 3) + 4 bits (up to 16 concatenated tables); KVM
picks the fewest levels. Which levels exist depends on PAMax (ID_AA64MMFR0_EL1.PARange, the ASL's
AArch64.S2InvalidSL), not on VTCR_EL2.PS: 4K level 0 needs PAMax > 42, 16K/64K level 0 never
without DS = 1, 16K level 1 needs PAMax > 40, 64K level 1 needs PAMax > 42.
"""

from __future__ import annotations

import pytest

from harness.arch.geometry import (
    Geometry,
    GeometryError,
    Granule,
    Stage,
    block_levels,
    level_shift,
    stage2_start_levels,
)

# (granule, ia range inclusive, stage-1 start level)
STAGE1 = [
    ("4K", 25, 30, 2), ("4K", 31, 39, 1), ("4K", 40, 48, 0),
    ("16K", 25, 25, 3), ("16K", 26, 36, 2), ("16K", 37, 47, 1), ("16K", 48, 48, 0),
    ("64K", 25, 29, 3), ("64K", 30, 42, 2), ("64K", 43, 52, 1),
]

# Stage 2 with the largest PA size (48 bits; 52 for 64K): ia -> (start level, PGD pages)
STAGE2: dict[str, dict[int, tuple[int, int]]] = {
    "4K": {
        **{ia: (2, 1) for ia in range(25, 31)}, 31: (2, 2), 32: (2, 4), 33: (2, 8), 34: (2, 16),
        **{ia: (1, 1) for ia in range(35, 40)}, 40: (1, 2), 41: (1, 4), 42: (1, 8), 43: (1, 16),
        **{ia: (0, 1) for ia in range(44, 49)},
    },
    "16K": {
        25: (3, 1), 26: (3, 2), 27: (3, 4), 28: (3, 8), 29: (3, 16),
        **{ia: (2, 1) for ia in range(30, 37)}, 37: (2, 2), 38: (2, 4), 39: (2, 8), 40: (2, 16),
        **{ia: (1, 1) for ia in range(41, 48)}, 48: (1, 2),
    },
    "64K": {
        **{ia: (3, 1) for ia in range(25, 30)}, 30: (3, 2), 31: (3, 4), 32: (3, 8), 33: (3, 16),
        **{ia: (2, 1) for ia in range(34, 43)}, 43: (2, 2), 44: (2, 4), 45: (2, 8), 46: (2, 16),
        **{ia: (1, 1) for ia in range(47, 53)},
    },
}


@pytest.mark.parametrize(("granule", "lo", "hi", "start"), STAGE1)
def test_stage1_start_level(granule: str, lo: int, hi: int, start: int) -> None:
    for ia in range(lo, hi + 1):
        geom = Geometry.create(Stage.S1, granule, ia)
        assert geom.start_level == start, (granule, ia)
        assert geom.pgd_pages == 1


@pytest.mark.parametrize("granule", ["4K", "16K", "64K"])
def test_stage2_start_level_and_pgd_pages(granule: str) -> None:
    table = STAGE2[granule]
    g = Granule.parse(granule)
    top = 52 if g is Granule.K64 else 48
    assert sorted(table) == list(range(25, top + 1))  # the table covers every size
    for ia, (start, pages) in table.items():
        geom = Geometry.create(Stage.S2, granule, ia, pa_bits=top)
        assert (geom.start_level, geom.pgd_pages) == (start, pages), (granule, ia)


def test_review_configurations() -> None:
    assert (Geometry.create(2, "64K", 40, 48).start_level, Geometry.create(2, "64K", 40, 48).pgd_pages) == (2, 1)
    assert Geometry.create(2, "4K", 40, 48).pgd_pages == 2
    assert Geometry.create(2, "4K", 43, 48).pgd_pages == 16


@pytest.mark.parametrize(
    ("granule", "ia", "pa", "levels"),  # pa: the PE's PAMax
    [
        ("4K", 40, 40, (1,)),  # level 0 would resolve 1 bit but needs PAMax > 42
        ("4K", 40, 48, (0, 1)),
        ("4K", 44, 44, (0,)),
        ("16K", 40, 40, (2,)),  # level 1 needs PA > 40
        ("16K", 40, 42, (1, 2)),
        ("64K", 42, 42, (2,)),
        ("64K", 43, 44, (1, 2)),
        ("64K", 33, 48, (2, 3)),
        ("4K", 25, 48, (2,)),  # 4K level 3 needs FEAT_TTST: not modelled
    ],
)
def test_stage2_allowed_start_levels(granule: str, ia: int, pa: int, levels: tuple[int, ...]) -> None:
    assert stage2_start_levels(Granule.parse(granule), ia, pa) == levels


def test_explicit_start_level_gives_concatenation() -> None:
    geom = Geometry.create(2, "4K", 40, 48, start_level=0)
    assert geom.pgd_pages == 1 and geom.levels == 4
    with pytest.raises(GeometryError, match="start_level"):
        Geometry.create(2, "4K", 40, 48, start_level=2)
    with pytest.raises(GeometryError, match="start_level"):
        Geometry.create(1, "4K", 40, start_level=1)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((1, "4K", 49), "ia_bits"),
        ((1, "64K", 53), "ia_bits"),
        ((1, "16K", 24), "ia_bits"),
        ((2, "4K", 40, 47), "pa_bits"),
        ((2, "4K", 40, 52), "pa_bits"),  # 52-bit PA needs the 64K granule here
        ((1, "8K", 40), "granule"),
        ((3, "4K", 40), "stage"),
    ],
)
def test_invalid_configurations_name_the_argument(args: tuple[object, ...], needle: str) -> None:
    with pytest.raises(GeometryError, match=needle):
        Geometry.create(*args)  # type: ignore[arg-type]


def test_start_level_legality_uses_pamax_not_ps() -> None:
    """AArch64.S2InvalidSL reads PAMax (52 bits on -cpu max): 4K with PS = 40 may start at level
    0 for a 40-bit IPA, 16K with PS = 40 at level 1 for 37..40 bits; an IPA larger than PS is not
    a fault in the ASL (only output addresses are checked against PS)."""
    geom = Geometry.create(2, "4K", 40, 40, 0)
    assert (geom.start_level, geom.pgd_pages, geom.pgd_entries) == (0, 1, 2)
    assert Geometry.create(2, "16K", 38, 40, 1).pgd_entries == 4
    assert Geometry.create(2, "4K", 44, 42).start_level == 0  # IPA 44 bits, PS 42 bits
    with pytest.raises(GeometryError, match="start_level"):
        Geometry.create(2, "4K", 40, 40, 0, pamax=42)
    with pytest.raises(GeometryError, match="start_level"):
        Geometry.create(2, "16K", 38, 40, 1, pamax=40)
    with pytest.raises(GeometryError, match="pa_bits"):
        Geometry.create(2, "4K", 40, 48, pamax=44)  # PS beyond PAMax


@pytest.mark.parametrize(
    ("stage", "granule", "ia", "start", "align"),
    [
        (2, "4K", 31, 1, 16),  # 2 entries: aligned to 16 bytes, not 64
        (2, "4K", 32, 1, 32),
        (2, "4K", 33, 1, 64),
        (1, "4K", 31, 1, 16),
        (1, "16K", 37, 1, 16),
        (2, "4K", 43, 1, 16 * 4096),  # 16 concatenated pages
        (1, "64K", 45, 1, 64),  # 8 entries, 64 bytes
    ],
)
def test_root_alignment_is_the_table_size(stage: int, granule: str, ia: int, start: int, align: int) -> None:
    geom = Geometry.create(stage, granule, ia, 48, start if stage == 2 else None)
    assert geom.start_level == start
    assert geom.root_align == align


def test_52bit_bases_align_to_64_bytes() -> None:
    # 64K, PS = 52, 36-bit IPA at stage 2 level 2: 2 entries (16 bytes), but a 52-bit base.
    assert Geometry.create(2, "64K", 30, 52, 2).root_align == 64
    assert Geometry.create(2, "64K", 30, 48, 2).root_align == 16
    assert Geometry.create(1, "4K", 31, 48, lpa2=True).root_align == 64  # DS = 1


def test_level_shifts() -> None:
    assert [level_shift(Granule.K4, lvl) for lvl in range(4)] == [39, 30, 21, 12]
    assert [level_shift(Granule.K16, lvl) for lvl in range(4)] == [47, 36, 25, 14]
    assert [level_shift(Granule.K64, lvl) for lvl in range(4)] == [55, 42, 29, 16]


def test_block_levels() -> None:
    assert block_levels(Granule.K4) == (1, 2)
    assert block_levels(Granule.K16) == (2,)
    assert block_levels(Granule.K64, pamax=52) == (1, 2)
    assert block_levels(Granule.K64, pamax=48) == (2,)


def test_pgd_page_index_of_last_address() -> None:
    geom = Geometry.create(2, "4K", 43, 48)
    assert geom.pgd_page_index((1 << 43) - 1) == 15
    assert geom.pgd_page_index(1 << 39) == 1


def test_granule_parsing() -> None:
    assert Granule.parse("64k") is Granule.K64
    assert Granule.parse(4096) is Granule.K4
    assert Granule.parse("16K") is Granule.K16
