"""Model benchmarks (not tests): walk and map speed of the pure-Python tables.

    python -m harness.bench.model [--json]

Prints the time to map 1 GiB in 4K pages (no blocks possible), to walk every leaf of that fully
populated region, and to unmap and destroy it, with leaves per second.
"""

from __future__ import annotations

import argparse
import json
import time

from harness.core.memory import PagePool
from harness.core.pgtable import Stage2Pgtable
from harness.core.prot import Prot
from harness.core.walker import Walker, WalkFlags

GIB = 1 << 30
PAGE = 0x1000


def run() -> dict[str, float]:
    pool = PagePool(0x4800_0000, 8 << 20, PAGE)
    table = Stage2Pgtable(pool, "4K", 40)
    # IPA and PA differ by 4K modulo 2M: every leaf has to be a page.
    t0 = time.perf_counter()
    table.map(PAGE, GIB, 0x4000_2000, Prot.RW)
    t_map = time.perf_counter() - t0

    count = 0

    def visit(addr: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        nonlocal count
        count += 1

    t0 = time.perf_counter()
    table.walk(PAGE, GIB, Walker(visit, WalkFlags.LEAF))
    t_walk = time.perf_counter() - t0
    assert count == GIB // PAGE, count

    t0 = time.perf_counter()
    table.unmap(PAGE, GIB)
    table.destroy()
    t_unmap = time.perf_counter() - t0
    assert pool.used_pages == 0
    return {
        "leaves": float(count),
        "map_s": t_map,
        "map_pages_per_s": count / t_map,
        "walk_s": t_walk,
        "walk_leaves_per_s": count / t_walk,
        "unmap_destroy_s": t_unmap,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    r = run()
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"map 1 GiB in 4K pages:   {r['map_s']:.3f} s ({r['map_pages_per_s'] / 1e3:.0f} k pages/s)")
    print(f"walk every leaf:         {r['walk_s']:.3f} s ({r['walk_leaves_per_s'] / 1e3:.0f} k leaves/s, "
          f"{int(r['leaves'])} leaves)")
    print(f"unmap + destroy:         {r['unmap_destroy_s']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
