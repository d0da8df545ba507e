"""Target benchmarks (not tests): what a check against QEMU costs.

    python -m harness.bench.target [--json] [--count N]

Prints launch to ready, table install, AT probes/s (one million addresses by default; both forms
per request too), access probes/s (stage 1 at EL2 and stage 2 from EL1), a table swap (stage 2 over
stage 2) and one gdb/MI round trip.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from harness.arch.geometry import Granule, Stage
from harness.check.engine import used_image
from harness.check.scenario import BuiltScenario, MapSpec, Scenario, build
from harness.core.prot import Prot
from harness.target.layout import LAYOUT
from harness.target.target import Target


def _scratch_identity(stage: Stage, ia_bits: int) -> BuiltScenario:
    """Scratch RAM identity-mapped (RW, blocks where aligned) beside the firmware's own regions:
    a minimal bench table, through the scenario builder."""
    sc = Scenario(f"bench-target-s{int(stage)}", stage, Granule.K4, ia_bits, 48,
                  maps=(MapSpec(LAYOUT.scratch_base, LAYOUT.scratch_size, LAYOUT.scratch_base, Prot.RW),),
                  access=stage is Stage.S2)
    return build(sc, LAYOUT)


def run(count: int = 1_000_000, access_count: int = 200_000) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    with Target.start() as t:
        out["launch_to_ready_s"] = time.perf_counter() - t0
        s1 = _scratch_identity(Stage.S1, 39).table
        image = used_image(s1)
        t0 = time.perf_counter()
        t.install(s1.regs(), image)
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
        s2 = _scratch_identity(Stage.S2, 40).table
        t.install(s2.regs(), used_image(s2))
        t0 = time.perf_counter()
        t.at(addrs, "S12E1R")
        out["at_s12e1r_per_s"] = count / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        t.access(acc, write=True)
        out["access_s2_per_s"] = access_count / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        t.at_both(addrs, Stage.S2)
        out["at_both_s12e1_per_s"] = 2 * count / (time.perf_counter() - t0)
        n = 200
        image2 = used_image(s2)
        t0 = time.perf_counter()
        for _ in range(n // 4):  # stage 2 over stage 2: one request each
            t.install(s2.regs(), image2)
        out["install_swap_s2_ms"] = (time.perf_counter() - t0) / (n // 4) * 1e3
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
    print(f"AT S12E1R + S12E1W   {res['at_both_s12e1_per_s'] / 1e6:8.2f} M/s  (both forms in each request)")
    print(f"table swap (S2->S2)  {res['install_swap_s2_ms']:8.3f} ms  (image written, one request)")
    print(f"access (S1, load)    {res['access_s1_per_s'] / 1e6:8.2f} M/s  "
          f"({res['access_s1_first_touch_per_s'] / 1e6:.2f} M/s when each page is touched the first time)")
    print(f"access (S2, store)   {res['access_s2_per_s'] / 1e6:8.2f} M/s")
    print(f"gdb/MI round trip    {res['gdb_mi_round_trip_ms']:8.3f} ms")
    print(f"mailbox request      {res['mailbox_request_ms']:8.3f} ms  (NOP: continue + breakpoint)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
