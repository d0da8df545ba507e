"""`harness explain ADDRESS`: the model's walk, level by level, beside the MMU's answer."""

from __future__ import annotations

import argparse
from typing import Any

from harness.check import scenario as scenarios
from harness.check.engine import AT_OPS, check_address
from harness.cli.args import (
    add_scenario_args,
    add_target_args,
    open_target,
    parse_address,
    scenario_from_args,
)
from harness.cli.output import print_json
from harness.target.layout import LAYOUT

NAME = "explain"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="model walk beside the MMU's answer for one address")
    add_target_args(p)
    p.add_argument("address", help="input address (VA for stage 1, IPA for stage 2), 0 .. 2^64 - 1")
    add_scenario_args(p)


def run(args: argparse.Namespace) -> int:
    sc = scenario_from_args(args)
    addr = parse_address(args.address, "ADDRESS")
    built = scenarios.build(sc, LAYOUT)
    with open_target(args) as t:
        verdicts = check_address(built, t, addr)
    ops = [op for op, _ in AT_OPS[built.table.stage]]  # one verdict per AT form, in this order
    if args.json:
        print_json({"address": addr, "scenario": sc.describe(), "results": [
            {"op": op, "model": v.model_walk, "mmu": v.mmu, "agree": v.agree,
             "divergence": v.divergence} for op, v in zip(ops, verdicts, strict=True)]})
    else:
        print(sc.describe())
        for op, v in zip(ops, verdicts, strict=True):
            known = f" (known QEMU divergence: {v.divergence})" if v.divergence else ""
            print(f"\n== {op} {addr:#x}: {'agree' if v.agree else 'DISAGREE'}{known}")
            print("model: " + v.model_walk.replace("\n", "\n       "))
            print(f"MMU:   {v.mmu}")
    return 0 if all(v.agree or v.divergence for v in verdicts) else 1  # a known divergence is no mismatch
