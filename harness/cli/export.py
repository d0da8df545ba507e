"""`harness export DIR`: a built scenario written for installation elsewhere (harness.check.export)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from harness.check import scenario as scenarios
from harness.check.export import export_built
from harness.cli.args import add_json_arg, add_scenario_args, add_seed_arg, check_new_directory, scenario_from_args
from harness.cli.output import print_json
from harness.target.layout import LAYOUT

NAME = "export"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="write a built scenario for installation elsewhere")
    add_json_arg(p)
    p.add_argument("directory", help="output directory (created; must be empty if it exists)")
    add_seed_arg(p)
    add_scenario_args(p)


def run(args: argparse.Namespace) -> int:
    directory = check_new_directory(args.directory, "DIRECTORY")
    sc = scenario_from_args(args)
    info = export_built(scenarios.build(sc, LAYOUT), directory, np.random.default_rng(args.seed))
    if args.json:
        print_json(info)
    else:
        print(f"exported {sc.describe()} to {directory}: tables.bin ({info['image_size']} bytes at "
              f"{info['image_base']:#x}), config.json, expected.json ({info['addresses']} addresses)")
        for k, v in info["registers"].items():
            print(f"  {k:<14} {v:#018x}")
    return 0
