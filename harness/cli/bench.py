"""`harness bench`: verified translations/s end to end vs the raw AT loop rate (harness.bench.e2e)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from harness.bench.e2e import run_bench
from harness.check.addresses import BATCH_REASON, MAX_BATCH_ADDRESSES
from harness.cli.args import add_target_args, count, open_target
from harness.cli.output import print_json

NAME = "bench"
MIN_PROBES = 1000
MAX_ROUNDS = 100


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="verified translations/s end to end, vs the raw AT rate")
    add_target_args(p)
    p.add_argument("--probes", type=count(MIN_PROBES, MAX_BATCH_ADDRESSES, BATCH_REASON, "addresses"),
                   default=1_000_000, help=f"addresses per pass, at least {MIN_PROBES} (default 1e6)")
    p.add_argument("--rounds", type=count(1, MAX_ROUNDS, "each round probes every address twice per form", "rounds"),
                   default=5, help="rounds of raw and verified passes over the same addresses; medians (default 5)")


def run(args: argparse.Namespace) -> int:
    with open_target(args) as t:
        result = run_bench(t, args.probes, np.random.default_rng(args.seed), args.rounds)
    if args.json:
        print_json(result)
    else:
        m = result["machine"]
        print(f"scenario: {result['scenario']}; {result['rounds']} rounds of {result['probes']} addresses")
        print(f"raw AT loop:           {result['raw_at_per_s'] / 1e6:6.2f} M translations/s (median)")
        print(f"verified end to end:   {result['verified_per_s'] / 1e6:6.2f} M translations/s (median; "
              f"{result['verified']} checked, {result['mismatched']} mismatched)")
        rounds = ", ".join(f"{r:.2f}" for r in result["ratios"])
        print(f"ratio verified/raw:    {result['ratio']:.2f} (median of {rounds})")
        print(f"compare the ratio between machines; the rates are this one's: {m['cpus']} CPUs, {m['cpu_model']}"
              + (f", load {m['load_1min']:.1f}" if m["load_1min"] is not None else ""))
        print("stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in result["timings"].items()))
    return 0 if result["mismatched"] == 0 else 1
