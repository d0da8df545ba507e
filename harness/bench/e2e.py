"""End-to-end benchmark: verified translations per second vs the raw AT loop, in one run.

    harness bench [--probes N] [--json]

A stage-1 4K table with 256 MiB of pages, 4 GiB of 2 MiB blocks and holes; N random addresses
over 8 GiB. The raw rate times the firmware's AT loop alone (both AT forms); the verified rate
times the whole check pipeline on the same addresses: probe, predict (overlapped with the probe),
compare, classify.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from harness.arch.geometry import Granule, Stage
from harness.check.engine import AT_OPS, CheckReport, TargetLike, check_at, used_image
from harness.check.scenario import SCRATCH, MapSpec, Scenario, build
from harness.core.prot import Prot

GIB = 1 << 30
MIB = 1 << 20

BENCH_SCENARIO = Scenario(
    "bench-s1-4K", Stage.S1, Granule.K4, 40,
    maps=(
        MapSpec(0x1_0000_0000 + 0x1000, 256 * MIB, SCRATCH + 0x2000, Prot.RW),  # pages only
        MapSpec(0x2_0000_0000, 2 * GIB, 0x1_0000_0000, Prot.RW),  # 2M blocks and 1G blocks
        MapSpec(0x2_8000_0000 + 2 * MIB, 2 * GIB - 4 * MIB, 0x2_0000_0000 + 2 * MIB, Prot.R),  # 2M blocks
    ),
)


def run_bench(t: TargetLike, probes: int, rng: np.random.Generator) -> dict[str, Any]:
    t0 = time.perf_counter()
    built = build(BENCH_SCENARIO, t.layout)
    build_s = time.perf_counter() - t0
    table = built.table
    addrs = (np.uint64(0x1_0000_0000) + rng.integers(0, 8 * GIB, size=probes, dtype=np.uint64)) & ~np.uint64(7)
    t.install(table.regs(), used_image(table))
    try:
        ops = [op for op, _ in AT_OPS[table.stage]]
        t.at(addrs[:1000], ops[0])  # warm up
        t0 = time.perf_counter()
        for op in ops:
            t.at(addrs, op)
        raw_s = time.perf_counter() - t0
        report = CheckReport(BENCH_SCENARIO.name, table.geom.describe(), ".".join(map(str, t.qemu_version)))
        t0 = time.perf_counter()
        check_at(report, t, table, addrs)
        verified_s = time.perf_counter() - t0
    finally:
        t.uninstall()
    n = probes * len(ops)
    raw = n / raw_s
    verified = report.checked / verified_s
    return {
        "scenario": table.geom.describe(), "probes": probes, "verified": report.checked,
        "mismatched": report.mismatched, "raw_at_per_s": raw, "verified_per_s": verified, "ratio": verified / raw,
        "timings": {"build": build_s, "raw_at": raw_s, "verified": verified_s, **report.timings},
    }
