"""Live-update benchmark (not a test): what checking one table operation on a running MMU costs.

    python -m harness.bench.live [--json] [--ops N]

For a stage-1 and a stage-2 table (4K, pages in scratch RAM) it runs N operations live (unmaps
of two pages, then a wrprotect at stage 2), each judged by the TLB rules, warmed, run and
observed (:func:`harness.check.live.live_ops`), and prints live operations checked per second,
the mailbox requests each cost, and beside them what one table install costs (the swap a
reinstall-based check would pay per operation).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from harness.arch.geometry import Granule, Stage
from harness.check import live
from harness.check.engine import subject_of_built
from harness.check.scenario import MapSpec, OpSpec, Scenario, build
from harness.core.prot import Prot
from harness.target.layout import LAYOUT
from harness.target.target import Target


def scenario(stage: Stage, ops: int) -> Scenario:
    g = Granule.K4.size
    base = 0x1_0000_0000 if stage is Stage.S1 else 0x1000_0000
    pages = 4 * ops
    maps = (MapSpec(base, pages * g, LAYOUT.scratch_base, Prot.RW),)
    todo = [OpSpec("unmap", base + 4 * i * g, 2 * g) for i in range(ops)]
    if stage is Stage.S2:
        todo = [*todo[:-1], OpSpec("wrprotect", base, pages * g)]
    return Scenario(f"bench-live-s{int(stage)}", stage, Granule.K4, 40, maps=maps, ops=tuple(todo), access=True)


def run(ops: int = 200) -> dict[str, float]:
    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    with Target.start() as t:
        for stage in (Stage.S1, Stage.S2):
            key = f"s{int(stage)}"
            built = build(scenario(stage, ops), t.layout, apply_ops=False)
            subj = subject_of_built(built)
            t0 = time.perf_counter()
            t.install(subj.regs, subj.image)
            out[f"{key}_install_s"] = time.perf_counter() - t0
            t.uninstall()
            r0 = t._mb("requests")
            t0 = time.perf_counter()
            tally = live.live_ops(built, t, rng)
            dt = time.perf_counter() - t0
            if not tally.ok:
                raise SystemExit(f"bench.live: {key}: the live updates were not clean: {tally.summary()}")
            out[f"{key}_live_ops_per_s"] = tally.updates / dt
            out[f"{key}_requests_per_op"] = (t._mb("requests") - r0) / tally.updates
            out[f"{key}_observed_per_op"] = tally.checked / tally.updates
            out[f"{key}_judged_per_op"] = tally.judged / tally.updates
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench.live", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--ops", type=int, default=200, help="live operations per stage (default 200)")
    args = p.parse_args(argv)
    if args.ops < 2:
        p.error("--ops: expected at least 2")
    res = run(args.ops)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for stage in ("s1", "s2"):
            print(f"stage {stage[1]}: {res[f'{stage}_live_ops_per_s']:8.1f} live operations checked/s "
                  f"({res[f'{stage}_requests_per_op']:.1f} mailbox requests, "
                  f"{res[f'{stage}_observed_per_op']:.1f} translations observed, "
                  f"{res[f'{stage}_judged_per_op']:.1f} invalidations judged per operation); "
                  f"one install {1000 * res[f'{stage}_install_s']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
