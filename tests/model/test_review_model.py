"""The review's arithmetic (``harness.check.review_model``), checked against the architecture's numbers.

``posted_pgd_pages`` is ``kvm_pgd_pages()`` as posted in v3; ``proposed_pgd_pages`` is Gavin Shan's
``KVM_PGTABLE_MAX_LEVELS - start_level + 1``. The Arm ARM's count comes from the geometry.
"""

from __future__ import annotations

import pytest

from harness.arch.geometry import MAX_PGD_PAGES, MIN_IA_BITS, Geometry, Granule, max_ia_bits, stage2_start_levels
from harness.check.review_model import (
    pgd_pages_rows,
    posted_pgd_page_idx,
    posted_pgd_pages,
    posted_range_rejects,
    proposed_pgd_pages,
    proposed_range_rejects,
)

K4, K16, K64 = Granule.K4, Granule.K16, Granule.K64


@pytest.mark.parametrize(
    ("granule", "ia", "level", "seed", "proposed"),
    [
        (K64, 40, 2, 1, 2048),  # Gavin's example: one page; his count is more than 16 can concatenate
        (K64, 33, 3, 16, 1),  # the proposal allocates too few
        (K4, 40, 1, 2, 1 << 28),
        (K4, 43, 1, 16, 1 << 31),
        (K4, 39, 1, 1, 1 << 27),
        (K16, 29, 3, 16, 1),
        (K16, 25, 3, 1, 1),  # they agree only where both are 1
    ],
)
def test_pgd_pages_posted_and_proposed(granule: Granule, ia: int, level: int, seed: int, proposed: int) -> None:
    assert posted_pgd_pages(granule, ia, level) == seed
    assert proposed_pgd_pages(granule, ia, level) == proposed
    assert Geometry.create(2, granule, ia, None, level).pgd_pages == seed


def test_posted_count_is_the_architectures_everywhere() -> None:
    n = 0
    for g in Granule:
        pa = 52 if g is K64 else 48
        for ia in range(MIN_IA_BITS, max_ia_bits(g) + 1):
            for lvl in stage2_start_levels(g, ia, pa):
                assert posted_pgd_pages(g, ia, lvl) == Geometry.create(2, g, ia, pa, lvl).pgd_pages, (g, ia, lvl)
                n += 1
    assert n > 60


def test_proposed_count_is_wrong_both_ways() -> None:
    too_many = too_few = 0
    for g in Granule:
        pa = 52 if g is K64 else 48
        for ia in range(MIN_IA_BITS, max_ia_bits(g) + 1):
            for lvl in stage2_start_levels(g, ia, pa):
                right = Geometry.create(2, g, ia, pa, lvl).pgd_pages
                prop = proposed_pgd_pages(g, ia, lvl)
                too_many += prop > MAX_PGD_PAGES
                too_few += prop < right
    assert too_many > 0 and too_few > 0


def test_pgd_page_index_of_the_last_page() -> None:
    assert posted_pgd_page_idx(K4, 40, 1, (1 << 40) - 0x1000) == 1
    assert posted_pgd_page_idx(K64, 33, 3, (1 << 33) - 0x10000) == 15
    assert posted_pgd_page_idx(K64, 40, 2, (1 << 40) - 0x10000) == 0


def test_pgd_pages_rows() -> None:
    rows = pgd_pages_rows([(K64, 40), (K4, 40), (K4, 43), (K64, 33)])
    assert [(r.start_level, r.architecture, r.posted, r.proposed) for r in rows] == [
        (2, 1, 1, 2048), (1, 2, 2, 1 << 28), (1, 16, 16, 1 << 31), (3, 16, 16, 1)]


@pytest.mark.parametrize("ia", [25, 33, 40, 48])
def test_range_checks(ia: int) -> None:
    limit = 1 << ia
    # the last page: end == limit, accepted as posted, rejected by '>='
    assert not posted_range_rejects(limit - 0x1000, limit, ia)
    assert proposed_range_rejects(limit - 0x1000, limit, ia)
    # an empty walk at the limit is accepted (the loop does not run); past it, both reject
    assert not posted_range_rejects(limit, limit, ia)
    assert posted_range_rejects(limit, limit + 0x1000, ia) and proposed_range_rejects(limit, limit + 0x1000, ia)
    assert not posted_range_rejects(0, 0x1000, ia) and not proposed_range_rejects(0, 0x1000, ia)
