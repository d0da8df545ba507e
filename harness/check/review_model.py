"""The review questions on the walker's v3, as computations on the model.

Gavin Shan's review of ``kvm_pgd_pages()`` proposed passing
``start_level = KVM_PGTABLE_MAX_LEVELS - start_level + 1`` to ``__kvm_pgd_page_idx()``; the
posted code passes the start level itself. And he proposed rejecting ``addr >= limit`` or
``end >= limit`` where the posted code rejects ``>``. These helpers compute both sides; the
MMU settles them (:mod:`harness.check.review`).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.arch.geometry import MAX_LEVELS, Geometry, Granule, oa_format_bits, pgd_page_index


def posted_pgd_page_idx(granule: Granule, ia_bits: int, start_level: int, addr: int) -> int:
    """``__kvm_pgd_page_idx`` as posted in v3: the shared :func:`pgd_page_index`, with whatever
    ``start_level`` the caller passes (the review proposed a different one)."""
    return pgd_page_index(granule, ia_bits, start_level, addr)


def posted_pgd_pages(granule: Granule, ia_bits: int, start_level: int) -> int:
    """``kvm_pgd_pages`` as posted."""
    return posted_pgd_page_idx(granule, ia_bits, start_level, (1 << 64) - 1) + 1


def proposed_pgd_pages(granule: Granule, ia_bits: int, start_level: int) -> int:
    """``kvm_pgd_pages`` with the review's proposed ``MAX_LEVELS - start_level + 1``."""
    return posted_pgd_page_idx(granule, ia_bits, MAX_LEVELS - start_level + 1, (1 << 64) - 1) + 1


@dataclass(frozen=True)
class PgdPagesRow:
    granule: Granule
    ia_bits: int
    start_level: int
    architecture: int  # tables the Arm ARM concatenates for this VTCR
    posted: int  # kvm_pgd_pages() as posted in v3
    proposed: int


def pgd_pages_rows(configs: list[tuple[Granule, int]]) -> list[PgdPagesRow]:
    rows = []
    for gran, ia in configs:
        geom = Geometry.create(2, gran, ia, oa_format_bits(gran))
        rows.append(PgdPagesRow(gran, ia, geom.start_level, geom.pgd_pages,
                                posted_pgd_pages(gran, ia, geom.start_level),
                                proposed_pgd_pages(gran, ia, geom.start_level)))
    return rows


def posted_range_rejects(addr: int, end: int, ia_bits: int) -> bool:
    limit = 1 << ia_bits
    return addr > limit or end > limit


def proposed_range_rejects(addr: int, end: int, ia_bits: int) -> bool:
    limit = 1 << ia_bits
    return addr >= limit or end >= limit
