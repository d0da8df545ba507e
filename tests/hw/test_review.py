"""The v3 review of the page-table walker, settled on QEMU's MMU.

In September 2020 Gavin Shan reviewed v3 02/21 of Will Deacon's stand-alone page-table walker
(``../shared/seed``) and asked two questions; a third came from a later upstream fix.

1. ``kvm_pgd_pages()``: is the number of concatenated PGD pages right? Gavin proposed passing
   ``KVM_PGTABLE_MAX_LEVELS - start_level + 1`` instead of the start level. Will: the posted code
   is right; 64K pages with a 40-bit IPA start at level 2 with one PGD page. Here the MMU translates
   the last IPA page of every stage-2 configuration through the last PGD page of the model's table,
   faults when that page is zeroed, and faults when only the pages Gavin's count would allocate are
   kept (where his count is smaller: the 16K and 64K level-3 starts).
2. ``_kvm_pgtable_walk()``: reject ``end > limit`` (posted) or ``end >= limit`` (Gavin)? The end is
   exclusive: the walk that reaches the last page has ``end == 2**ia_bits``, the MMU translates that
   page, and ``>=`` would have made it unmappable.
3. 357ad203d45c: after a leaf the seed advanced with ``addr += size`` without aligning down, so a
   walk starting inside a block skips the next entry. ``wrprotect`` over ``[block + 1 page,
   next + 1 page)`` leaves the next region's first page writable: a real store from the EL1 stub
   completes there with the seed walker and takes a stage-2 permission fault with the fix.

(No ``AT S12E1W`` is pointed at a write-protected page: QEMU 10.0.2 aborts on stage-2 permission
faults under AT, so write protection is observed with real stores.)
"""

from __future__ import annotations

import json

import pytest

from harness.arch.geometry import MAX_PGD_PAGES, Geometry, Granule
from harness.arch.registers import ESR_EC, ISS_DFSC, ExceptionClass, FaultKind, Par, fault_status
from harness.check import review
from harness.check.review import RANGE_CONFIGS, pgd_configs, probe_pgd, probe_range, probe_unaligned
from harness.check.review_model import proposed_pgd_pages
from harness.cli import main
from harness.target.target import Target

pytestmark = pytest.mark.hw

K4, K16, K64 = Granule.K4, Granule.K16, Granule.K64
SCRATCH = 0x5000_0000  # layout.scratch_base: the first page maps there, the last one page above


def _ids(v: object) -> str:
    return v.label if isinstance(v, Granule) else str(v)


def _translation_fault(par: int, level: int) -> bool:
    p = Par(par)
    return p.fault and p.stage2 and p.fst == fault_status(FaultKind.TRANSLATION, level)


# -- 1. concatenated PGD pages ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("granule", "ia", "level", "pages", "proposed", "last_ipa", "entry_offset"),
    [
        # Gavin's example: one page, of which 2048 entries are used; 2048 pages cannot be concatenated
        (K64, 40, 2, 1, 2048, 0xFF_FFFF_0000, 0x3FF8),
        (K64, 33, 3, 16, 1, 0x1_FFFF_0000, 0xF_FFF8),  # Gavin's count is too small
        (K4, 40, 1, 2, 1 << 28, 0xFF_FFFF_F000, 0x1FF8),
        (K4, 43, 1, 16, 1 << 31, 0x7FF_FFFF_F000, 0xFFF8),
        (K16, 29, 3, 16, 1, 0x1FFF_C000, 0x3_FFF8),
    ],
    ids=_ids,
)
def test_review_pgd_pages(target: Target, granule: Granule, ia: int, level: int, pages: int, proposed: int,
                          last_ipa: int, entry_offset: int) -> None:
    p = probe_pgd(target, granule, ia, level)
    assert (p.start_level, p.pages, p.posted, p.proposed) == (level, pages, pages, proposed)
    assert p.last_ipa == last_ipa
    assert p.last_entry_page == pages - 1  # the model's entry for the last page is in the last PGD page
    assert p.last_entry_pa == p.pgd + entry_offset  # the last initial-level entry of the last PGD page
    assert Par(p.par_first).pa == SCRATCH and not Par(p.par_first).fault
    assert Par(p.par_last).pa == SCRATCH + granule.size and not Par(p.par_last).fault  # the MMU agrees
    assert _translation_fault(p.par_last_page_zeroed, level)  # ... and really reads that page


def test_review_64k_40bit_one_pgd_page(target: Target) -> None:
    """Will's answer: 64K pages, 40-bit IPA -> start level 2 (VTCR.SL0 = 1), one PGD page."""
    p = probe_pgd(target, K64, 40, 2)
    assert (p.start_level, p.pages, p.proposed) == (2, 1, 2048)
    assert p.proposed > MAX_PGD_PAGES
    assert Par(p.par_last).pa == 0x5001_0000
    assert p.par_last == 0xFF00_0000_5001_0B80  # normal WB, inner-shareable, NS, RES1 bit 11


@pytest.mark.parametrize(("granule", "ia", "level"), pgd_configs(), ids=_ids)
def test_review_every_concatenation(target: Target, granule: Granule, ia: int, level: int) -> None:
    p = probe_pgd(target, granule, ia, level)
    assert 1 <= p.pages <= MAX_PGD_PAGES and p.posted == p.pages
    assert p.matches, f"MMU {Par(p.par_last)}; model {Par(p.expected_last)}"
    assert Par(p.par_last).pa == SCRATCH + granule.size
    assert p.last_entry_page == p.pages - 1
    assert _translation_fault(p.par_last_page_zeroed, level)


REFUTED = [(g, ia, lvl) for g, ia, lvl in pgd_configs()
           if proposed_pgd_pages(g, ia, lvl) < Geometry.create(2, g, ia, None, lvl).pgd_pages]


def test_refutable_configurations() -> None:
    assert [(g, ia) for g, ia, _ in REFUTED] == [(K16, 26), (K16, 27), (K16, 28), (K16, 29), (K64, 30), (K64, 31),
                                                 (K64, 32), (K64, 33)]


@pytest.mark.parametrize(("granule", "ia", "level"), REFUTED, ids=_ids)
def test_review_proposed_count_refuted(target: Target, granule: Granule, ia: int, level: int) -> None:
    """Keep only the PGD pages Gavin's count allocates (zero the rest): the last page faults."""
    p = probe_pgd(target, granule, ia, level)
    assert p.proposed == 1 and p.pages > 1
    assert p.par_proposed_only is not None and p.par_first_proposed_only is not None
    assert _translation_fault(p.par_proposed_only, 3)
    assert Par(p.par_first_proposed_only).pa == SCRATCH  # the first page, in PGD page 0, still translates
    assert p.proposal_refuted


# -- 2. range check ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("granule", "ia", "level"), RANGE_CONFIGS, ids=_ids)
def test_review_range_end_is_exclusive(target: Target, granule: Granule, ia: int, level: int) -> None:
    p = probe_range(target, granule, ia, level)
    g = granule.size
    assert p.end == 1 << ia
    assert p.last_visit[:2] == ((1 << ia) - g, 3)  # the walk visits the last entry
    assert [a for a, _, _ in p.visited] == [(1 << ia) - k * g for k in range(5, 0, -1)]
    assert not p.posted_rejects and p.proposed_rejects  # '>=' would have refused this walk
    assert p.empty_walk_at_limit == 0  # addr == limit: the loop does not run
    assert not Par(p.par).fault and Par(p.par).pa == SCRATCH + 2 * g


# -- 3. unaligned start (357ad203d45c) -----------------------------------------------------------------

@pytest.mark.parametrize(("granule", "block_size"), [(K4, 2 << 20), (K16, 32 << 20), (K64, 512 << 20)], ids=_ids)
def test_review_unaligned_start_skips_an_entry(target: Target, granule: Granule, block_size: int) -> None:
    p = probe_unaligned(target, granule)
    g = granule.size
    block = 1 << 32
    nxt = block + block_size
    assert (p.block, p.block_size, p.next_region) == (block, block_size, nxt)
    assert (p.walk_start, p.walk_end) == (block + g, nxt + g)
    assert p.posted_visits == [(block + g, 2)]  # the seed: the block, then addr = nxt + g >= end
    assert p.fixed_visits == [(block + g, 2), (nxt, 3)]
    assert p.skipped == [nxt]
    assert p.posted_writable and not p.fixed_writable
    # real stores to [block + g, nxt, nxt + g]
    assert p.posted_stores == [False, True, True]  # the skipped page stays writable on the MMU
    assert p.fixed_stores == [False, False, True]
    for esr in (p.posted_esr[0], p.fixed_esr[0]):
        assert ESR_EC.get(esr) == ExceptionClass.DABT_LOWER
        assert ISS_DFSC.get(esr) == fault_status(FaultKind.PERMISSION, 2)  # the block was protected by both
    assert ISS_DFSC.get(p.fixed_esr[1]) == fault_status(FaultKind.PERMISSION, 3)


# -- all together, and the CLI --------------------------------------------------------------------------

def test_run_review_verdicts_hold(target: Target) -> None:
    verdicts = review.run_review(target)
    assert [v.title for v in verdicts] == ["concatenated PGD pages", "range check (end == 2^ia_bits)",
                                           "unaligned start (357ad203d45c)"]
    assert all(v.holds for v in verdicts), [v.answer for v in verdicts if not v.holds]
    for v in verdicts:
        js = json.loads(json.dumps(v.to_json()))
        assert js["holds"] is True and js["evidence"] and js["question"]


def test_review_main_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["review", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and len(out["verdicts"]) == 3
