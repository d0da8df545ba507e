"""Printing check reports (shared by `run` and `check`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.check.engine import CheckReport
from harness.cli.output import print_json, print_table
from harness.target.target import Target


def _summary_rows(reports: list[CheckReport]) -> list[list[object]]:
    return [[("ok" if r.ok else "MISMATCH"), r.scenario, r.geometry, r.checked, r.matched, r.mismatched, r.known,
             sum(r.withheld.values())] for r in reports]


def print_reports(reports: list[CheckReport], args: argparse.Namespace, elapsed: float, t: Target) -> None:
    ok = all(r.ok for r in reports)
    if args.json:
        kept = args.log_dir is not None or not ok  # a temporary log directory goes after a clean run
        print_json({"ok": ok, "elapsed_s": elapsed, "qemu": t.cmdline,
                    "console_log": str(t.console_log) if kept else None, "reports": [r.to_json() for r in reports]})
        return
    for r in reports:
        if not r.ok:
            print(r.text())
    print_table(["verdict", "scenario", "geometry", "checked", "matched", "mismatched", "known QEMU div.",
                 "withheld AT"], _summary_rows(reports))
    total = sum(r.checked for r in reports)
    bad = sum(r.mismatched for r in reports)
    print(f"\n{total} translations checked in {elapsed:.1f} s on QEMU {'.'.join(map(str, t.qemu_version))}: "
          f"{'all matched' if not bad else f'{bad} mismatched'}")
    if bad:
        print(f"logs: {t.log_dir}\nreproduce QEMU: {t.cmdline}")


def write_report(path: str | None, reports: list[CheckReport]) -> None:
    if path is not None:
        Path(path).write_text("\n\n".join(r.text() for r in reports) + "\n")
