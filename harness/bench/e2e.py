"""End-to-end benchmark: verified translations per second vs the raw AT loop, in one run.

    harness bench [--probes N] [--rounds R] [--json]

A stage-1 4K table with 256 MiB of pages, 4 GiB of 2 MiB blocks and holes; N random addresses
over 8 GiB. Each round times, on the same addresses and the same installed table, the
firmware's AT loop alone (both AT forms: the raw rate) and the whole check pipeline (probe,
predict overlapped with the probe, compare, classify: the verified rate), in alternating order so
that drift on a loaded machine falls on both; the figures are the medians over the rounds and the
ratio is each round's ratio's median. The rates depend on the machine; the ratio is what to
compare between machines.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path
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


def _raw(t: TargetLike, addrs: Any, ops: list[Any]) -> float:
    t0 = time.perf_counter()
    for op in ops:
        t.at(addrs, op)
    return time.perf_counter() - t0


def _verified(t: TargetLike, table: Any, addrs: Any, qemu: str) -> tuple[CheckReport, float]:
    report = CheckReport(BENCH_SCENARIO.name, table.geom.describe(), qemu)
    t0 = time.perf_counter()
    check_at(report, t, table, addrs)
    return report, time.perf_counter() - t0


def machine() -> dict[str, Any]:
    """What the rates depend on: this host's CPUs and load."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model", "hardware")):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "cpu_model": model or platform.machine(), "load_1min": load}


def run_bench(t: TargetLike, probes: int, rng: np.random.Generator, rounds: int = 5) -> dict[str, Any]:
    t0 = time.perf_counter()
    built = build(BENCH_SCENARIO, t.layout)
    build_s = time.perf_counter() - t0
    table = built.table
    addrs = (np.uint64(0x1_0000_0000) + rng.integers(0, 8 * GIB, size=probes, dtype=np.uint64)) & ~np.uint64(7)
    qemu = ".".join(map(str, t.qemu_version))
    ops = [op for op, _ in AT_OPS[table.stage]]
    n = probes * len(ops)
    raw_rates: list[float] = []
    verified_rates: list[float] = []
    ratios: list[float] = []
    checked = mismatched = 0
    timings: dict[str, float] = {"build": build_s, "raw_at": 0.0, "verified": 0.0}
    t.install(table.regs(), used_image(table))
    try:
        t.at(addrs[:1000], ops[0])  # warm up
        for i in range(rounds):
            if i % 2 == 0:
                raw_s = _raw(t, addrs, ops)
                report, verified_s = _verified(t, table, addrs, qemu)
            else:
                report, verified_s = _verified(t, table, addrs, qemu)
                raw_s = _raw(t, addrs, ops)
            raw_rates.append(n / raw_s)
            verified_rates.append(report.checked / verified_s)
            ratios.append(verified_rates[-1] / raw_rates[-1])
            checked += report.checked
            mismatched += report.mismatched
            timings["raw_at"] += raw_s
            timings["verified"] += verified_s
            for k, v in report.timings.items():
                timings[k] = timings.get(k, 0.0) + v
    finally:
        t.uninstall()
    return {
        "scenario": table.geom.describe(), "probes": probes, "rounds": rounds, "verified": checked,
        "mismatched": mismatched, "raw_at_per_s": statistics.median(raw_rates),
        "verified_per_s": statistics.median(verified_rates), "ratio": statistics.median(ratios),
        "ratios": [round(r, 3) for r in ratios], "machine": machine(), "timings": timings,
    }
