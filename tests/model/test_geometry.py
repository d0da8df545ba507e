"""Geometry against a table written from the Arm ARM rules (not computed by the code under test).

Stage 1: levels = ceil((ia - g) / (g - 3)), start level = 4 - levels.
Stage 2: the initial level resolves 1 .. (g - 3) + 4 bits (up to 16 concatenated tables); KVM
picks the fewest levels; 4K level 0 needs PA > 42, 16K/64K never level 0, 16K level 1 needs
PA > 40, 64K level 1 needs PA > 42.
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
    ("granule", "ia", "pa", "levels"),
    [
        ("4K", 40, 40, (1,)),  # level 0 would resolve 1 bit but needs PA > 42
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
        ((2, "4K", 44, 42), "ia_bits"),  # IPA larger than PA
        ((2, "4K", 40, 47), "pa_bits"),
        ((2, "4K", 40, 52), "pa_bits"),  # 52-bit PA needs the 64K granule here
        ((1, "8K", 40), "granule"),
        ((3, "4K", 40), "stage"),
    ],
)
def test_invalid_configurations_name_the_argument(args: tuple[object, ...], needle: str) -> None:
    with pytest.raises(GeometryError, match=needle):
        Geometry.create(*args)  # type: ignore[arg-type]


def test_level_shifts() -> None:
    assert [level_shift(Granule.K4, lvl) for lvl in range(4)] == [39, 30, 21, 12]
    assert [level_shift(Granule.K16, lvl) for lvl in range(4)] == [47, 36, 25, 14]
    assert [level_shift(Granule.K64, lvl) for lvl in range(4)] == [55, 42, 29, 16]


def test_block_levels() -> None:
    assert block_levels(Granule.K4) == (1, 2)
    assert block_levels(Granule.K16) == (2,)
    assert block_levels(Granule.K64, feat_lpa=True) == (1, 2)
    assert block_levels(Granule.K64, feat_lpa=False) == (2,)


def test_pgd_page_index_of_last_address() -> None:
    geom = Geometry.create(2, "4K", 43, 48)
    assert geom.pgd_page_index((1 << 43) - 1) == 15
    assert geom.pgd_page_index(1 << 39) == 1


def test_granule_parsing() -> None:
    assert Granule.parse("64k") is Granule.K64
    assert Granule.parse(4096) is Granule.K4
    assert Granule.parse("16K") is Granule.K16
