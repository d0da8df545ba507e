"""Which addresses to probe for a table: every mapped page (or a sample), and all the edges.

The edges are where walkers and MMUs disagree: the first and last page of every leaf (so both
sides of every block boundary), the unmapped page just before and after every mapped run, the
first and last page of the input range, and the first and last entry of every concatenated PGD
page. Each address gets a random 8-byte-aligned offset inside its page, so the page-offset bits
of the output address are checked too (they matter with 16K and 64K pages).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from harness.core.pgtable import KvmPgtable

DEFAULT_MAX_PAGES = 1 << 20
# The most addresses one check walks and probes in one batch (a scenario's sample, a fuzz table's
# addresses, a bench pass): each costs ~100 bytes per AT form in the model's batch walk and about
# as much again in the comparison, so a bound well above any useful value keeps a typo from
# asking for hundreds of GiB.
MAX_BATCH_ADDRESSES = 1 << 25
BATCH_REASON = "each is walked and probed in one batch, ~100 bytes per AT form"

U64 = npt.NDArray[np.uint64]


def probe_addresses(table: KvmPgtable, rng: np.random.Generator, sample: int | None = None) -> U64:
    """Sorted, unique addresses to probe in ``table``'s input range."""
    geom = table.geom
    gran = geom.granule.size
    limit = geom.limit
    leaves = table.leaves()
    starts = [lf.addr for lf in leaves]
    sizes = [lf.size for lf in leaves]
    pages_per = np.array([s // gran for s in sizes], dtype=np.int64)
    total = int(pages_per.sum()) if pages_per.size else 0
    budget = DEFAULT_MAX_PAGES if sample is None else sample

    chunks: list[U64] = []
    if total and total <= budget:
        # every mapped page: one arange per leaf, vectorised by leaf-relative page numbers
        leaf_of = np.repeat(np.arange(len(leaves)), pages_per)
        first = np.cumsum(pages_per) - pages_per
        within = np.arange(total, dtype=np.int64) - np.repeat(first, pages_per)
        base = np.array(starts, dtype=np.uint64)[leaf_of]
        chunks.append(base + within.astype(np.uint64) * np.uint64(gran))
    elif total:
        picks = np.sort(rng.choice(total, size=budget, replace=False)) if budget < total else np.arange(total)
        cum = np.cumsum(pages_per)
        leaf_of = np.searchsorted(cum, picks, side="right")
        within = picks - (cum - pages_per)[leaf_of]
        base = np.array(starts, dtype=np.uint64)[leaf_of]
        chunks.append(base + within.astype(np.uint64) * np.uint64(gran))

    edges: list[int] = [0, limit - gran]
    for a, s in zip(starts, sizes, strict=True):
        edges += [a, a + s - gran]
    # unmapped neighbours of every mapped run
    run_start: int | None = None
    prev_end = -1
    for a, s in zip(starts, sizes, strict=True):
        if a != prev_end:
            if run_start is not None and prev_end < limit:
                edges.append(prev_end)
            if a - gran >= 0:
                edges.append(a - gran)
            run_start = a
        prev_end = a + s
    if run_start is not None and prev_end < limit:
        edges.append(prev_end)
    # first and last entry of every concatenated PGD page
    span = geom.pgd_page_span
    for i in range(geom.pgd_pages):
        lo = i * span
        hi = min(limit, lo + span)
        edges += [lo, hi - gran]
    chunks.append(np.array(edges, dtype=np.uint64))

    addrs = np.unique(np.concatenate(chunks))
    offsets = rng.integers(0, gran // 8, size=addrs.size, dtype=np.uint64) * np.uint64(8)
    return addrs + offsets
