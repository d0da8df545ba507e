"""`harness dump`: install a scenario, read the live tables back through gdb (physical memory),
decode them into mapped ranges and diff them with the model."""

from __future__ import annotations

import argparse
import time
from typing import Any

from harness.arch.geometry import Stage
from harness.arch.registers import ttbr_table_base
from harness.check import scenario as scenarios
from harness.check.engine import used_image
from harness.cli.args import add_scenario_args, add_target_args, open_target, scenario_from_args
from harness.cli.output import print_json
from harness.core.dump import diff_ranges, mapped_ranges
from harness.target.layout import LAYOUT
from harness.target.physmem import GdbPhysMemory

NAME = "dump"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="decode the live tables through gdb; diff with the model")
    add_target_args(p)
    add_scenario_args(p)


def run(args: argparse.Namespace) -> int:
    sc = scenario_from_args(args)
    built = scenarios.build(sc, LAYOUT)
    table = built.table
    assert table.pgd is not None
    model = mapped_ranges(table.mem, table.geom, table.pgd)
    with open_target(args) as t:
        t.install(table.regs(), used_image(table))
        try:
            regname = "TTBR0_EL2" if table.stage is Stage.S1 else "VTTBR_EL2"
            root = ttbr_table_base(t.sysreg(regname), table.geom)
            with GdbPhysMemory(t.gdb, table.granule.size) as mem:
                t0 = time.perf_counter()
                live = mapped_ranges(mem, table.geom, root)
                dt = time.perf_counter() - t0
        finally:
            t.uninstall()
    only_model, only_live = diff_ranges(model, live)
    if args.json:
        print_json({"scenario": sc.describe(), "root": root, "live": [r.to_json() for r in live],
                    "only_in_model": [r.to_json() for r in only_model],
                    "only_live": [r.to_json() for r in only_live], "gdb_page_reads": mem.reads, "seconds": dt})
    else:
        print(f"{sc.describe()}\nlive tables at {regname}={root:#x} ({mem.reads} table pages read through gdb "
              f"in {dt:.2f} s):")
        for r in live:
            print("  " + r.describe())
        if only_model or only_live:
            print("DIFFERENCES:")
            for r in only_model:
                print("  model only: " + r.describe())
            for r in only_live:
                print("  live only:  " + r.describe())
        else:
            print(f"identical to the model ({len(model)} ranges)")
    return 0 if not (only_model or only_live) else 1
