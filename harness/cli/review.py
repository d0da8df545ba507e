"""`harness review`: the v3 review questions settled on the MMU (verdicts: harness.check.review)."""

from __future__ import annotations

import argparse
from typing import Any

from harness.check.review import run_review
from harness.cli.args import add_json_arg, open_target, positive_seconds
from harness.cli.output import print_json, print_table

NAME = "review"
EVIDENCE_WIDTH = 110


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="the v3 review questions settled on the MMU")
    add_json_arg(p)
    p.add_argument("--timeout", type=positive_seconds, default=30.0,
                   help="seconds for boot and each request (default 30)")
    p.add_argument("--log-dir", help="keep QEMU/gdb/console logs here (default: a temporary directory, "
                                     "removed after a successful run)")
    p.add_argument("--verbose", "-v", action="store_true", help="every evidence line (default: the first 3)")


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def run(args: argparse.Namespace) -> int:
    with open_target(args) as t:
        verdicts = run_review(t)
        version = ".".join(map(str, t.qemu_version))
    if args.json:
        print_json({"qemu": version, "ok": all(v.holds for v in verdicts),
                    "verdicts": [v.to_json() for v in verdicts]})
    else:
        rows: list[list[str]] = []
        for n, v in enumerate(verdicts, 1):
            ev = v.evidence if args.verbose else v.evidence[:3]
            verdict = "HOLDS" if v.holds else "FAILS"
            rows.append([f"{n}. {v.title or v.question}", verdict, _shorten(ev[0], EVIDENCE_WIDTH) if ev else ""])
            rows += [["", "", _shorten(e, EVIDENCE_WIDTH)] for e in ev[1:]]
            if len(v.evidence) > len(ev):
                rows.append(["", "", f"... {len(v.evidence) - len(ev)} more (-v)"])
            rows.append(["", "", "=> " + v.answer])
        print_table(["question", "verdict", "evidence"], rows)
        print(f"QEMU {version}: {sum(v.holds for v in verdicts)}/{len(verdicts)} verdicts hold")
    return 0 if all(v.holds for v in verdicts) else 1
