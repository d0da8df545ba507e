"""`harness run`: the main job, every built-in scenario checked on QEMU."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from harness.check import live
from harness.check import scenario as scenarios
from harness.check.engine import CheckReport
from harness.cli.args import add_live_arg, add_report_arg, add_target_args, open_target
from harness.cli.output import Progress
from harness.cli.reports import print_reports, write_report

NAME = "run"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="the main job: built-in scenarios on QEMU (default)")
    add_target_args(p)
    add_live_arg(p)
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these built-in scenarios")
    add_report_arg(p, "write the full text report (every mismatch) here")


def run(args: argparse.Namespace) -> int:
    selected = scenarios.builtin_subset(args.only, "--only")  # --report and --log-dir: checked by harness.cli.app
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    reports: list[CheckReport] = []
    with open_target(args) as t:
        progress = Progress(len(selected), enabled=None if not args.json else False)
        try:
            for s in selected:
                progress.print_step(s.describe())
                reports.append(live.check_scenario(s, t, rng, live=not args.no_live))
                progress.advance()
        finally:
            progress.close()
        write_report(args.report, reports)  # before the output says "ok"
        print_reports(reports, args, time.perf_counter() - t0, t)
    return 0 if all(r.ok for r in reports) else 1
