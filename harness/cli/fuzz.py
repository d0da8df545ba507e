"""``harness fuzz``: random raw tables against QEMU's MMU; every disagreement classified.

    harness fuzz --seed S --probes N [--stage 1|2] [--granule G] [--[no-]lpa2] [--[no-]e2h] [--jobs N]
                 [--json] [--report FILE]

Configurations are drawn over both stages, every granule, input and PA size, start level and
concatenation, with DS = 1 (FEAT_LPA2) on some 4K/16K ones and the EL2&0 regime (hVHE) on some
stage-1 ones; --lpa2/--no-lpa2 and --e2h/--no-e2h keep only (or never) those.

A run is the fewest tables whose AT probes reach --probes (per-table addresses, each probed with
both AT forms, and with both again as EL0's in the EL2&0 regime; at least --min-tables), decided
from the seed before it starts.
--jobs N splits them over N processes, each with its own QEMU (job j runs the blocks of 4
consecutive tables that are j mod N); the one merged report is the same for any N.

Exit status 0 when every disagreement is explained by a declared QEMU divergence, 1 when any is
unexplained (or QEMU died on a table), 2 for bad arguments, 3 when the machinery failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.arch.geometry import GeometryError, Granule, Stage, parse_stage
from harness.check.fuzz import DEFAULT_PER_TABLE, Boots, FuzzOptions, JobProgress, fuzz_jobs
from harness.cli.args import batch_count, count, jobs_count, log_base, non_negative_int, positive_seconds
from harness.errors import EXIT_MISMATCH, EXIT_OK, InputError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("fuzz", help="random raw tables against the MMU; disagreements classified",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=non_negative_int, default=0, help="RNG seed (table i of a run is seed/i; default 0)")
    p.add_argument("--probes", type=count(), default=1_000_000,
                   help="probes: AT forms and real accesses (default 1e6)")
    p.add_argument("--stage", help="only stage 1 or 2 (default both)")
    p.add_argument("--granule", help="only 4K, 16K or 64K (default all)")
    p.add_argument("--lpa2", action=argparse.BooleanOptionalAction, default=None,
                   help="only DS = 1 configurations (4K/16K), or with --no-lpa2 none (default: drawn)")
    p.add_argument("--e2h", action=argparse.BooleanOptionalAction, default=None,
                   help="only the EL2&0 regime at stage 1 (hVHE), or with --no-e2h never (default: drawn)")
    p.add_argument("--fetch", action="store_true",
                   help="instruction-fetch probes too, on the tables with sampled real accesses (off by default: "
                        "once one has run, every later firmware request takes ~2.5x as long on QEMU 10.0.2)")
    p.add_argument("--per-table", type=batch_count("addresses per table"), default=DEFAULT_PER_TABLE,
                   help="addresses per table, each probed with both AT forms (as EL0's too in EL2&0; "
                        f"default {DEFAULT_PER_TABLE})")
    p.add_argument("--min-tables", type=count(0), default=1, help="run at least this many tables")
    p.add_argument("--max-deaths", type=count(), default=10,
                   help="stop after QEMU died this many times (default 10; with --jobs, in each job)")
    p.add_argument("--jobs", type=jobs_count, default=1,
                   help="split the tables over this many processes, each with its own QEMU (default 1); "
                        "the merged report is the same for any number")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--report", metavar="FILE",
                   help="write the walks here: unexplained ones (up to 200), one per known divergence")
    p.add_argument("--timeout", type=positive_seconds, default=60.0, help="seconds for boot and each request")
    p.add_argument("--log-dir", help="keep QEMU/gdb/console logs here (a directory per boot: boot1, ... or "
                                     "job0-boot1, ... with --jobs)")


def _options(args: argparse.Namespace) -> FuzzOptions:
    try:
        stage = parse_stage(args.stage) if args.stage is not None else None
        granule = Granule.parse(args.granule) if args.granule is not None else None
    except GeometryError as exc:
        raise InputError(f"--{exc}") from exc
    if args.lpa2 and granule is Granule.K64:
        raise InputError("--lpa2: expected the 4K or 16K granule (DS = 1 does not apply to 64K), got 64K")
    if args.e2h and stage is Stage.S2:
        raise InputError("--e2h: expected stage 1 (the EL2&0 regime is a stage-1 regime), got stage 2")
    return FuzzOptions(args.seed, args.probes, stage, granule, args.per_table, args.min_tables, args.max_deaths,
                       lpa2=args.lpa2, e2h=args.e2h, fetches=args.fetch)


def run(args: argparse.Namespace) -> int:
    opts = _options(args)  # the paths were checked by harness.cli.app before this
    live = sys.stderr.isatty() and not args.json

    def progress(p: JobProgress) -> None:
        if live:
            print(f"\r{p.tables} tables, {p.probes} probes, {p.unexplained} unexplained", end="",
                  file=sys.stderr, flush=True)

    logs = log_base(args)  # only once the input is known to be good
    rep = fuzz_jobs(opts, args.jobs, Boots(args.timeout, logs), progress)
    if live:
        print(file=sys.stderr)
    if args.report is not None:
        Path(args.report).write_text(rep.text(full=True) + "\n")
    if args.json:
        print(json.dumps({**rep.to_json(), "log_dir": None if rep.ok and args.log_dir is None else str(logs)},
                         indent=2))
    else:
        print(rep.text())
        if not rep.ok:
            print(f"logs: {logs}")
    return EXIT_OK if rep.ok else EXIT_MISMATCH
