"""The kernel walker's figures: operations checked per second, and the edit-check loop.

    python -m harness.bench.kernel [--debian 6.12 | --tree DIR] [--config s2-4K-40bit] [--rounds 3] [--json]

1. Operations checked per second on one configuration (scripted and random sequences; the oracle,
   the resources and the MMU checked after each), with and without the MMU probes, median of
   ``--rounds`` runs.
2. The edit-check loop a kernel engineer runs: a shadow copy of the tree (``harness.kernel.tree.
   shadow_tree``), built once; then ``pgtable.c`` edited (a comment appended), and the time from the
   edit to the verdict on that configuration: rebuild of the changed object, link, patch, boot, the
   check. Median of ``--rounds`` edits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from harness.arch.geometry import Granule, Stage
from harness.check.kernel_run import RunOptions, run_tree
from harness.kernel.tree import PGTABLE_C, KernelTree, debian_tree, locate_tree, shadow_tree


def _opts(config: str, mmu: bool) -> RunOptions:
    stage = Stage.S1 if config.startswith("s1") else Stage.S2
    granule = Granule.parse(config.split("-")[1])
    return RunOptions(granules=(granule,), stage=stage, only_config=config, mmu=mmu, shrink=False,
                      random_sequences=4, random_length=16, builtins=False)


def ops_per_second(tree: KernelTree, config: str, rounds: int, mmu: bool) -> dict[str, object]:
    rates, ops = [], 0
    run_tree(tree, _opts(config, mmu))  # warm: build and link cached
    for _ in range(rounds):
        t0 = time.perf_counter()
        rep = run_tree(tree, _opts(config, mmu))
        dt = time.perf_counter() - t0
        if rep.unexplained:
            raise SystemExit(f"{config}: {rep.unexplained} unexplained finding(s): fix those before measuring")
        ops = rep.ops
        rates.append(rep.ops / dt)
    return {"ops": ops, "ops_per_s": round(statistics.median(rates), 1),
            "ops_per_s_range": [round(min(rates), 1), round(max(rates), 1)]}


def edit_check(tree: KernelTree, config: str, rounds: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="harness-bench-kernel-") as tmp:
        shadow = shadow_tree(tree.path, Path(tmp) / "tree")
        cache = Path(tmp) / "kbuild"
        opts = _opts(config, True)
        opts = RunOptions(**{**opts.__dict__, "random_sequences": 0})
        t0 = time.perf_counter()
        run_tree(locate_tree(shadow), opts, build_cache=cache)
        first = time.perf_counter() - t0
        loops, builds = [], []
        for i in range(rounds):
            path = shadow / PGTABLE_C
            path.write_text(path.read_text() + f"\n/* edit {i} */\n")
            t0 = time.perf_counter()
            rep = run_tree(locate_tree(shadow), opts, build_cache=cache)
            loops.append(time.perf_counter() - t0)
            builds.append(sum(float(b["timings"].get("total", 0.0)) for b in rep.builds))
        return {"first_run_s": round(first, 1), "edit_to_verdict_s": round(statistics.median(loops), 1),
                "rebuild_s": round(statistics.median(builds), 1), "ops": rep.ops}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.kernel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--debian", default="6.12")
    src.add_argument("--tree")
    ap.add_argument("--config", default="s2-4K-40bit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds: expected a positive number, got {args.rounds}")
    tree = locate_tree(args.tree) if args.tree else locate_tree(debian_tree(args.debian), what="--debian")
    with_mmu = ops_per_second(tree, args.config, args.rounds, True)
    oracle_only = ops_per_second(tree, args.config, args.rounds, False)
    loop = edit_check(tree, args.config, args.rounds)
    out = {"tree": tree.label, "config": args.config, "with_mmu": with_mmu, "oracle_only": oracle_only,
           "edit_check": loop}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{tree.label} {args.config}: {with_mmu['ops_per_s']} ops checked/s with the MMU "
              f"({oracle_only['ops_per_s']} oracle only), {with_mmu['ops']} ops per run; "
              f"edit pgtable.c -> verdict {loop['edit_to_verdict_s']} s "
              f"(rebuild {loop['rebuild_s']} s; first run {loop['first_run_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
