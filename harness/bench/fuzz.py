"""Long fuzz run: probes/s against the raw AT rate of one QEMU measured in the same run, for each
--jobs count side by side, with tables per 10^6 probes and the seconds by phase.

    python -m harness.bench.fuzz [--probes 1000000] [--seed 1] [--jobs 1 2] [--json]

The same fuzzer as ``harness fuzz`` (random configurations, random raw tables swapped without a
reboot, every disagreement classified), at benchmark length. The raw AT rate is measured first, by
one QEMU alone (:func:`harness.check.fuzz.raw_at_rate`); each run's ``fuzz/raw`` is its probes/s
(probes over the longest job's seconds from its first table to its last) over that rate, and
``wall`` is the whole run's seconds with the jobs' start and boot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from harness.check.fuzz import DEFAULT_PER_TABLE, Boots, FuzzOptions, FuzzReport, fuzz_jobs, raw_at_rate
from harness.check.jobs import MAX_JOBS
from harness.target.target import Target


def figures(rep: FuzzReport, raw: float, wall: float) -> dict[str, object]:
    return {
        "jobs": rep.jobs, "probes": rep.probes, "tables": rep.tables, "seconds": round(rep.seconds, 2),
        "wall_seconds": round(wall, 2), "probes_per_s": round(rep.probes_per_s), "raw_at_per_s": round(raw),
        "raw_at_ratio": round(rep.probes_per_s / raw, 3) if raw else 0.0,
        "jobs_raw_at_per_s": round(rep.raw_at_per_s),
        "tables_per_million_probes": round(rep.tables * 1e6 / rep.probes) if rep.probes else 0,
        "seconds_by_phase": {k: round(v, 2) for k, v in sorted(rep.timings.items())},
        "unexplained": rep.unexplained, "disagreements": rep.disagreements, "skipped": rep.skipped,
        "withheld_from_at": rep.withheld, "by_config": rep.by_config, "restarts": rep.restarts,
    }


def raw_alone(seed: int) -> float:
    """The raw AT rate of one QEMU, nothing else running in the harness."""
    with Target.start() as t:
        return raw_at_rate(t, np.random.default_rng([seed, 1 << 41]))


def side_by_side(rows: Sequence[dict[str, object]]) -> str:
    keys = ("jobs", "probes", "tables", "tables_per_million_probes", "seconds", "wall_seconds", "probes_per_s",
            "raw_at_per_s", "raw_at_ratio", "jobs_raw_at_per_s", "unexplained", "restarts")
    width = max(map(len, keys))
    lines = [f"{k:<{width}}  " + "  ".join(f"{r[k]!s:>12}" for r in rows) for k in keys]
    for r in rows:
        phases = r["seconds_by_phase"]
        assert isinstance(phases, dict)
        lines.append(f"seconds by phase, --jobs {r['jobs']} (summed over jobs): "
                     + ", ".join(f"{k} {v}" for k, v in phases.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-table", type=int, default=DEFAULT_PER_TABLE)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="the --jobs counts to run (default 1 2)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.probes <= 0 or args.seed < 0 or args.per_table <= 0:
        ap.error("--probes and --per-table: expected positive integers; --seed: non-negative")
    if not all(1 <= j <= MAX_JOBS for j in args.jobs):
        ap.error(f"--jobs: expected counts from 1 to {MAX_JOBS}")
    opts = FuzzOptions(args.seed, args.probes, per_table=args.per_table)
    raw = raw_alone(args.seed)
    rows, reports = [], []
    for jobs in args.jobs:
        t0 = time.perf_counter()
        rep = fuzz_jobs(opts, jobs, Boots())
        rows.append(figures(rep, raw, time.perf_counter() - t0))
        reports.append(rep)
    same = all(r.to_json()["by_config"] == reports[0].to_json()["by_config"] for r in reports)
    if args.json:
        print(json.dumps({"runs": rows, "same_report": same}, indent=2))
    else:
        print(side_by_side(rows))
        print(f"merged reports identical across --jobs (tables, probes by configuration): {same}")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
