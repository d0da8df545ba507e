"""Model benchmark (not a test): batch translation speed of the architectural walk.

    python -m harness.bench.model_translate [--count N] [--json]

Builds a 4K stage-2 table (40-bit IPA, two concatenated PGD pages) with the scenario builder:
256 MiB of 4K pages and 256 MiB of 2M blocks, then translates ``N`` (default one million)
random IPAs, most of them mapped, and prints the time and translations per second for the walk
alone and with the expected PAR_EL1 values (best of ``--repeats`` runs; the first run, which
also pays for fresh memory, is shown too).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from harness.arch.geometry import Geometry, Granule, Stage
from harness.check.scenario import MapSpec, PoolOnlyLayout, Scenario, build
from harness.core.batch import expected_par_batch, translate_batch
from harness.core.memory import PagePool
from harness.core.prot import Prot

MIB = 1 << 20
PAGE = 0x1000
POOL_BASE = 0x4800_0000
BLOCK = 2 * MIB
PAGES_IPA = 0x80_0000_0000  # in the second PGD page
BLOCKS_IPA = 0x1_0000_0000
OUT_PA = 0x1_0000_0000
MAPPED = 256 * MIB


def build_table() -> tuple[PagePool, Geometry, int]:
    """The table, through the scenario builder (no firmware: the model alone): the pages' PA is 4K
    off a 2M boundary so that every leaf there is a page; the blocks' are 2M-aligned."""
    sc = Scenario("bench-model-translate", Stage.S2, Granule.K4, 40, 48, maps=(
        MapSpec(PAGES_IPA, MAPPED, OUT_PA + PAGE, Prot.RW),
        MapSpec(BLOCKS_IPA, MAPPED, OUT_PA + MAPPED + BLOCK, Prot.RW),
    ))
    built = build(sc, PoolOnlyLayout(POOL_BASE, 2 * MIB))
    assert built.table.pgd is not None
    return built.pool, built.table.geom, built.table.pgd


def run(count: int = 1_000_000, seed: int = 1, repeats: int = 5) -> dict[str, float]:
    pool, geom, pgd = build_table()
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, MAPPED + MAPPED // 16, count, dtype=np.uint64)  # ~6% unmapped
    which = rng.integers(0, 2, count).astype(np.bool_)
    addrs = np.where(which, np.uint64(PAGES_IPA), np.uint64(BLOCKS_IPA)) + offsets
    words = pool.words()
    walks: list[float] = []
    pars: list[float] = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = translate_batch(words, pool.base, geom, pgd, addrs)
        walks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        expected_par_batch(result)
        pars.append(time.perf_counter() - t0)
    assert result is not None
    t_walk = min(walks)
    t_par = min(pars)
    ok = int(result.ok.sum())
    return {
        "addresses": float(count),
        "translated": float(ok),
        "table_pages": float(pool.used_pages),
        "first_walk_s": walks[0],
        "walk_s": t_walk,
        "walk_per_s": count / t_walk,
        "walk_and_par_s": t_walk + t_par,
        "walk_and_par_per_s": count / (t_walk + t_par),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1_000_000, help="addresses to translate")
    ap.add_argument("--repeats", type=int, default=5, help="runs; the best is reported")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    figures = run(args.count, repeats=max(1, args.repeats))
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"4K stage 2, {2 * MAPPED // MIB} MiB mapped ({figures['table_pages']:.0f} table pages)")
    print(f"translate_batch: {figures['addresses']:.0f} addresses in {figures['walk_s']:.3f} s "
          f"({figures['walk_per_s'] / 1e6:.1f} M/s, best of runs; first run "
          f"{figures['first_walk_s']:.3f} s), {figures['translated']:.0f} mapped")
    print(f"with expected PAR_EL1: {figures['walk_and_par_s']:.3f} s "
          f"({figures['walk_and_par_per_s'] / 1e6:.1f} M/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
