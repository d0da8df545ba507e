"""The ``harness`` command line.

    harness run                  the main job: built-in scenarios, both stages, all granules, on QEMU
    harness check ...            one scenario from the command line or a JSON/TOML file
    harness explain ADDRESS ...  the model's walk step by step beside the MMU's answer
    harness export DIR ...       table image, register values, regions, expected translations
    harness dump ...             decode the live tables through gdb and diff them with the model
    harness review               the v3 review questions, settled on the MMU
    harness bench                end-to-end verified translations/s vs the raw AT rate
    harness geometry             the geometry table for every granule and input size

Every command takes --json. Exit status: 0 success, 1 a check failed, 2 bad arguments or set-up.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from harness.cli import attach, commands
from harness.cli import fuzz as fuzz_cmd


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_scenario_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scenario (a file, a built-in name, or the options below)")
    g.add_argument("--scenario", metavar="FILE", help="JSON or TOML scenario file (see README)")
    g.add_argument("--builtin", metavar="NAME", help="a built-in scenario of `harness run` (e.g. s2-4K)")
    g.add_argument("--stage", help="1 (hyp stage 1 at EL2) or 2 (guest stage 2)")
    g.add_argument("--granule", help="4K, 16K or 64K")
    g.add_argument("--ia-bits", type=int, help="input address size in bits")
    g.add_argument("--pa-bits", type=int, help="physical address size (TCR/VTCR.PS): 32..48, 52 with 64K")
    g.add_argument("--start-level", type=int, help="stage-2 start level (default: fewest levels)")
    g.add_argument("--map", action="append", default=[], metavar="ADDR:SIZE:PA[:PROT]",
                   help="a mapping, e.g. 0x10000000:2M:0x50000000:rw (repeatable; PROT letters rwxd)")
    g.add_argument("--op", action="append", default=[], metavar="OP:ADDR[:SIZE][:PROT]",
                   help="an operation after the maps: unmap, wrprotect, mkold, mkyoung, relax_perms")
    g.add_argument("--access", action="store_true", help="also probe with real loads and stores")
    g.add_argument("--sample", type=int, help="probe at most this many mapped pages (plus the edges)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="harness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(p: argparse.ArgumentParser, target: bool = True) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if target:
            p.add_argument("--timeout", type=float, default=60.0, help="seconds for boot and each request")
            p.add_argument("--seed", type=int, default=0, help="seed for address sampling")
            p.add_argument("--log-dir", help="keep QEMU/gdb/console logs here (default: a temporary directory)")

    p = sub.add_parser("run", help="the main job: built-in scenarios on QEMU (default)")
    common(p)
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these built-in scenarios")
    p.add_argument("--report", metavar="FILE", help="write the full text report (every mismatch) here")

    p = sub.add_parser("check", help="check one scenario on QEMU")
    common(p)
    add_scenario_args(p)
    p.add_argument("--report", metavar="FILE", help="write the full text report here")

    p = sub.add_parser("explain", help="model walk beside the MMU's answer for one address")
    common(p)
    p.add_argument("address", help="input address (VA for stage 1, IPA for stage 2)")
    add_scenario_args(p)

    p = sub.add_parser("export", help="write a built scenario for installation elsewhere")
    common(p, target=False)
    p.add_argument("directory", help="output directory (created; must be empty if it exists)")
    p.add_argument("--seed", type=int, default=0, help="seed for address sampling")
    add_scenario_args(p)

    p = sub.add_parser("dump", help="decode the live tables through gdb; diff with the model")
    common(p)
    add_scenario_args(p)

    p = sub.add_parser("review", help="the v3 review questions settled on the MMU")
    common(p, target=False)

    p = sub.add_parser("bench", help="verified translations/s end to end, vs the raw AT rate")
    common(p)
    p.add_argument("--probes", type=int, default=1_000_000, help="addresses per pass (default 1e6)")

    p = sub.add_parser("geometry", help="geometry table for every granule and input size")
    common(p, target=False)
    p.add_argument("--stage", default="both", help="1, 2 or both")
    p.add_argument("--pa-bits", type=int, default=48, help="PA size for stage-2 start levels (default 48)")
    fuzz_cmd.add_parser(sub)
    attach.add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["run", *(argv or [])])
    if args.command == "attach":
        return attach.run(args)
    try:
        if args.command == "fuzz":
            return fuzz_cmd.run(args)
        return commands.dispatch(args)
    except commands.UsageError as e:
        print(f"harness {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"harness {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
