"""Long fuzz run: probes/s and the raw AT rate in the same run, per stage and granule.

    python -m harness.bench.fuzz [--probes 10000000] [--seed 1] [--json]

The same fuzzer as ``harness fuzz`` (random configurations, random raw tables swapped without a
reboot, every disagreement classified), at benchmark length.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from harness.check.fuzz import DEFAULT_PER_TABLE, FuzzOptions, FuzzReport, fuzz
from harness.target.target import Target


def figures(rep: FuzzReport) -> dict[str, object]:
    return {
        "probes": rep.probes, "tables": rep.tables, "seconds": round(rep.seconds, 2),
        "probes_per_s": round(rep.probes_per_s), "raw_at_per_s": round(rep.raw_at_per_s),
        "raw_at_ratio": round(rep.probes_per_s / rep.raw_at_per_s, 3) if rep.raw_at_per_s else 0.0,
        "tables_per_million_probes": round(rep.tables * 1e6 / rep.probes) if rep.probes else 0,
        "seconds_by_phase": {k: round(v, 2) for k, v in sorted(rep.timings.items())},
        "unexplained": rep.unexplained, "disagreements": rep.disagreements, "skipped": rep.skipped,
        "withheld_from_at": rep.withheld, "by_config": rep.by_config, "restarts": rep.restarts,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-table", type=int, default=DEFAULT_PER_TABLE)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.probes <= 0 or args.seed < 0 or args.per_table <= 0:
        ap.error("--probes and --per-table: expected positive integers; --seed: non-negative")
    rep = fuzz(lambda: Target.start(), FuzzOptions(args.seed, args.probes, per_table=args.per_table))
    if args.json:
        print(json.dumps(figures(rep), indent=2))
    else:
        print(rep.text())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
