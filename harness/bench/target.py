"""Target benchmarks (not tests): what a check against QEMU costs.

    python -m harness.bench.target [--json] [--count N]

Prints launch to ready, table install, AT probes/s (one million addresses by default), access
probes/s (stage 1 at EL2 and stage 2 from EL1) and one gdb/MI round trip.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Granule, Stage, level_size
from harness.arch.registers import MairIndex, stage1_regs, stage2_regs
from harness.core.memory import PagePool
from harness.target.layout import LAYOUT, Layout
from harness.target.target import Target


def _identity_blocks(geom: Geometry, layout: Layout) -> tuple[PagePool, int]:
    """All of RAM (normal, RW) and the UART (device) with level-2 blocks: a minimal bench table."""
    pool = PagePool(layout.pool_base, 1 << 20, geom.granule.size)
    pgd = pool.alloc_pages(geom.pgd_pages, geom.pgd_pages)
    g = geom.granule
    size = level_size(g, 2)
    if geom.stage is Stage.S1:
        ram = d.encode_fields(Stage.S1, AttrIndx=int(MairIndex.NORMAL), AP=int(d.S1AP.RW), SH=3, AF=1)
        dev = d.encode_fields(Stage.S1, AttrIndx=int(MairIndex.DEVICE_nGnRE), AP=int(d.S1AP.RW), AF=1, XN=1)
        spans = [(layout.ram_base, layout.ram_size, ram), (layout.uart & ~(size - 1), size, dev)]
    else:
        ram = d.encode_fields(Stage.S2, MemAttr=int(d.S2MemAttr.NORMAL_WB), S2AP=int(d.S2AP.RW), SH=3, AF=1)
        spans = [(layout.ram_base, layout.ram_size, ram)]
    tables: dict[tuple[int, int], int] = {}
    for base, length, attrs in spans:
        for addr in range(base, base + length, size):
            table = pgd
            for lvl in range(geom.start_level, 2):
                idx = geom.pgd_index(addr) if lvl == geom.start_level else geom.index(lvl, addr)
                key = (lvl, addr >> geom.shift(lvl))
                if key not in tables:
                    tables[key] = pool.alloc_page()
                    pool.write64(table + 8 * idx, d.table_pte(tables[key], g))
                table = tables[key]
            pool.write64(table + 8 * geom.index(2, addr), d.leaf_pte(addr, attrs, 2, g))
    return pool, pgd


def run(count: int = 1_000_000, access_count: int = 200_000) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    with Target.start() as t:
        out["launch_to_ready_s"] = time.perf_counter() - t0
        g1 = Geometry.create(Stage.S1, Granule.K4, 39, 48)
        pool, pgd = _identity_blocks(g1, LAYOUT)
        image = pool.export()
        t0 = time.perf_counter()
        t.install(stage1_regs(g1, pgd), image)
        out["install_s1_s"] = time.perf_counter() - t0
        out["install_image_mib"] = len(image.data) / (1 << 20)
        addrs = (LAYOUT.scratch_base + (np.arange(count, dtype=np.uint64) * 0x1000) % LAYOUT.scratch_size)
        t0 = time.perf_counter()
        t.at(addrs, "S1E2R")
        out["at_s1e2r_per_s"] = count / (time.perf_counter() - t0)
        acc = addrs[:access_count]
        t0 = time.perf_counter()
        t.access(acc, write=False)
        out["access_s1_first_touch_per_s"] = access_count / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        t.access(acc, write=False)
        out["access_s1_per_s"] = access_count / (time.perf_counter() - t0)
        g2 = Geometry.create(Stage.S2, Granule.K4, 40, 48)
        pool2, pgd2 = _identity_blocks(g2, LAYOUT)
        t.install(stage2_regs(g2, pgd2), pool2.export())
        t0 = time.perf_counter()
        t.at(addrs, "S12E1R")
        out["at_s12e1r_per_s"] = count / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        t.access(acc, write=True)
        out["access_s2_per_s"] = access_count / (time.perf_counter() - t0)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            t.gdb.command("-data-evaluate-expression 1")
        out["gdb_mi_round_trip_ms"] = (time.perf_counter() - t0) / n * 1e3
        t0 = time.perf_counter()
        for _ in range(n):
            t.request_nop()
        out["mailbox_request_ms"] = (time.perf_counter() - t0) / n * 1e3
        out["qemu_version"] = float(".".join(map(str, t.qemu_version[:2])))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--count", type=int, default=1_000_000, help="AT probes (default 1000000)")
    parser.add_argument("--access-count", type=int, default=200_000, help="access probes (default 200000)")
    args = parser.parse_args(argv)
    res = run(args.count, args.access_count)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"launch to ready      {res['launch_to_ready_s'] * 1e3:8.1f} ms")
    print(f"table install (S1)   {res['install_s1_s'] * 1e3:8.1f} ms  ({res['install_image_mib']:.1f} MiB image)")
    print(f"AT S1E2R             {res['at_s1e2r_per_s'] / 1e6:8.2f} M/s  ({args.count} addresses)")
    print(f"AT S12E1R            {res['at_s12e1r_per_s'] / 1e6:8.2f} M/s")
    print(f"access (S1, load)    {res['access_s1_per_s'] / 1e6:8.2f} M/s  "
          f"({res['access_s1_first_touch_per_s'] / 1e6:.2f} M/s when each page is touched the first time)")
    print(f"access (S2, store)   {res['access_s2_per_s'] / 1e6:8.2f} M/s")
    print(f"gdb/MI round trip    {res['gdb_mi_round_trip_ms']:8.3f} ms")
    print(f"mailbox request      {res['mailbox_request_ms']:8.3f} ms  (NOP: continue + breakpoint)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
