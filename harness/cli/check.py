"""`harness check`: one scenario (a file, a built-in, or inline options) checked on QEMU."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from harness.check import live
from harness.check import scenario as scenarios
from harness.cli.args import (
    add_live_arg,
    add_report_arg,
    add_scenario_args,
    add_target_args,
    open_target,
    scenario_from_args,
)
from harness.cli.reports import print_reports, write_report
from harness.target.layout import LAYOUT

NAME = "check"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="check one scenario on QEMU")
    add_target_args(p)
    add_live_arg(p)
    add_scenario_args(p)
    add_report_arg(p, "write the full text report here")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="after the summary, the per-probe counts (AT forms, accesses, withheld, skipped) and the "
                        "live updates, and any known QEMU divergence's walk")


def run(args: argparse.Namespace) -> int:
    built = scenarios.build(scenario_from_args(args), LAYOUT)  # every input error before QEMU starts
    t0 = time.perf_counter()
    with open_target(args) as t:
        report = live.check_scenario(built.scenario, t, np.random.default_rng(args.seed), live=not args.no_live)
        write_report(args.report, [report])  # before the output says "ok"
        print_reports([report], args, time.perf_counter() - t0, t)
        if args.verbose and report.ok and not args.json:  # a mismatch's report is printed anyway
            print(report.text())
    return 0 if report.ok else 1
