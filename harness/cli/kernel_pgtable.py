"""``harness kernel-pgtable``: a kernel tree's own ``arch/arm64/kvm/hyp/pgtable.c``, built as the
kernel builds it, run at EL2 in the harness's payload, and checked operation by operation against
upstream's behaviour (the model's oracle) and the MMU.

    harness kernel-pgtable --tree DIR | --debian 6.12|6.1 [--granule G] [--stage 1|2] [--[no-]lpa2]
                           [--[no-]e2h] [--cc gcc|clang] [--seed S] [--ops N] [--jobs N] [--json | --ktap]

The tree is built out of tree in the harness's cache (never written; a read-only tree works); an
edit of pgtable.c rebuilds that object only. The default runs every configuration the tree
supports: each page size, both stages, LPA2 and hVHE on and off, FWB on and off, several input
sizes (start levels). Each configuration runs the scripted sequences and --sequences random ones
of --ops operations (random sequence I of seed S replays alone with --config NAME --sequence
random-I). A failing sequence is shrunk to a short reproducer. --jobs N builds first, then deals
the configurations round-robin to N processes, each with its own QEMU; the merged report is the
same for any N.

Exit status 0 when every finding is explained by a declared known upstream bug (unless --strict),
1 when any is not, 2 for bad arguments (not a kernel tree, an API the host code does not know), 3
when the machinery failed (a build error: the compiler's first error and the log path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

from harness.arch.geometry import GeometryError, Granule, Stage, parse_stage
from harness.check import kernel_bugs
from harness.check.kernel_run import RunOptions, TreeReport, run_tree, summary_lines
from harness.check.scenario import load
from harness.cli.args import count, jobs_count, log_base, non_negative_int, positive_seconds
from harness.errors import EXIT_MISMATCH, EXIT_OK, InputError
from harness.kernel.tree import DEBIAN_SERIES, debian_tree, locate_tree

MAX_RANDOM_OPS = 1_000_000  # per configuration, --ops x --sequences
RANDOM_OPS_REASON = "a configuration's random sequences are made before it runs, each operation checked on the MMU"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("kernel-pgtable", help="a kernel tree's pgtable.c at EL2, checked operation by operation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tree", metavar="DIR", help="a Linux source tree (yours, with your patch)")
    src.add_argument("--debian", metavar="SERIES", help=f"Debian's linux-source-SERIES ({', '.join(DEBIAN_SERIES)}), "
                                                        "fetched by ci/setup.sh into .cache/linux-source")
    p.add_argument("--granule", action="append", help="only this page size (4K, 16K, 64K; repeatable)")
    p.add_argument("--stage", help="only stage 1 (hyp) or 2 (guest)")
    p.add_argument("--lpa2", action=argparse.BooleanOptionalAction, default=None,
                   help="only LPA2 (HAS_LPA2) configurations, or with --no-lpa2 none (default both)")
    p.add_argument("--e2h", action=argparse.BooleanOptionalAction, default=None,
                   help="only hVHE (KVM_HVHE) stage-1 configurations, or with --no-e2h none (default both)")
    p.add_argument("--cc", action="append", choices=("gcc", "clang"),
                   help="compiler (repeatable; default gcc; clang gives the BTI build)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random sequences' seed (default 0)")
    p.add_argument("--ops", type=count(1, MAX_RANDOM_OPS, RANDOM_OPS_REASON), default=12,
                   help="operations per random sequence (default 12)")
    p.add_argument("--sequences", type=count(0, MAX_RANDOM_OPS, RANDOM_OPS_REASON), default=2,
                   help="random sequences per configuration (default 2)")
    p.add_argument("--no-scripted", action="store_true", help="skip the scripted sequences")
    p.add_argument("--no-mmu", action="store_true", help="compare with the oracle only (no MMU probes)")
    p.add_argument("--no-shrink", action="store_true", help="do not shrink failing sequences")
    p.add_argument("--scenario", action="append", metavar="FILE",
                   help="run this scenario file's maps and ops as a script, in the configuration it names "
                        "(JSON or TOML, as harness check reads; ops may also be get_leaf and split); repeatable; "
                        "instead of the matrix")
    p.add_argument("--no-builtins", action="store_true", help="skip harness run's built-in scenarios as scripts")
    p.add_argument("--config", help="only the configuration of this name (e.g. s2-4K-40bit-fwb)")
    p.add_argument("--sequence", help="only the sequence of this name (e.g. random-3, pages)")
    p.add_argument("--jobs", type=jobs_count, default=1,
                   help="run the configurations in this many processes, each with its own QEMU (default 1; "
                        "the build is done once, first)")
    p.add_argument("--strict", action="store_true", help="exit 1 on findings known upstream bugs explain too")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--ktap", action="store_true", help="KTAP, as kunit and kselftest print it")
    p.add_argument("--timeout", type=positive_seconds, default=60.0, help="seconds for boot and each request")
    p.add_argument("--log-dir", help="keep QEMU/gdb/console logs here")


def _options(args: argparse.Namespace) -> RunOptions:
    try:
        granules = tuple(dict.fromkeys(Granule.parse(g) for g in args.granule)) if args.granule else \
            (Granule.K4, Granule.K16, Granule.K64)
        stage = parse_stage(args.stage) if args.stage is not None else None
    except GeometryError as exc:
        raise InputError(f"--{exc}") from exc
    if args.e2h and stage is Stage.S2:
        raise InputError("--e2h: expected stage 1 (hVHE is a stage-1 regime), got --stage 2")
    if args.lpa2 and granules == (Granule.K64,):
        raise InputError("--lpa2: expected the 4K or 16K granule (LPA2 does not apply to 64K), got 64K")
    if args.ops * args.sequences > MAX_RANDOM_OPS:
        raise InputError(f"--ops, --sequences: expected at most {MAX_RANDOM_OPS} random operations per "
                         f"configuration ({RANDOM_OPS_REASON}), got {args.ops} x {args.sequences}")
    scenarios = tuple(sc for path in args.scenario or () for sc in load(path))
    return RunOptions(granules=granules, compilers=tuple(dict.fromkeys(args.cc or ["gcc"])), stage=stage,
                      lpa2=args.lpa2, e2h=args.e2h, seed=args.seed, random_sequences=args.sequences,
                      random_length=args.ops, scripted=not args.no_scripted, mmu=not args.no_mmu,
                      shrink=not args.no_shrink, timeout=args.timeout,
                      log_dir=Path(args.log_dir) if args.log_dir else None, only_config=args.config,
                      only_sequence=args.sequence, scenarios=scenarios, builtins=not args.no_builtins,
                      jobs=args.jobs)


def run(args: argparse.Namespace) -> int:
    opts = _options(args)
    tree = locate_tree(args.tree) if args.tree else locate_tree(debian_tree(args.debian), what="--debian")
    tree.api.require_supported()
    opts = dataclasses.replace(opts, log_dir=log_base(args))  # only once the input is known to be good
    live = sys.stderr.isatty() and not (args.json or args.ktap)

    def progress(line: str) -> None:
        if live:
            print(f"\r\x1b[K{line}", end="", file=sys.stderr, flush=True)

    report = run_tree(tree, opts, progress)
    if live:
        print(file=sys.stderr)
    if args.config and not report.configs:
        raise InputError(f"--config: no configuration named {args.config!r} in this run "
                         "(names are printed by a run without --config)")
    if args.json:
        print(json.dumps(report.as_json(), indent=1, default=str))
    elif args.ktap:
        print(ktap(report, args.strict))
    else:
        print("\n".join(summary_lines(report)))
    bad = report.unexplained or (args.strict and report.findings)
    return EXIT_MISMATCH if bad else EXIT_OK


def _ktap_line(text: str) -> str:
    return " ".join(text.split())


def ktap(report: TreeReport, strict: bool = False) -> str:
    """The report as KTAP version 1: one test per configuration, one subtest per sequence; a
    sequence with findings a known bug explains is ``ok`` with a ``# known`` diagnostic (``not ok``
    with ``strict``)."""
    out = ["KTAP version 1", f"# kvm_pgtable of {report.tree.label} ({report.tree.path})",
           f"1..{len(report.configs)}"]
    for i, c in enumerate(report.configs, 1):
        out += ["    KTAP version 1", f"    # Subtest: {c.name}", f"    1..{len(c.results)}"]
        for j, r in enumerate(c.results, 1):
            for f in r.findings:
                out.append("    # " + _ktap_line(f.text()))
            bad = bool(r.unexplained) or (strict and bool(r.findings))
            known = Counter(f.known for f in r.findings if f.known)
            note = (" # known: " + ", ".join(f"{k} x{n}" for k, n in known.items())) if known and not bad else ""
            out.append(f"    {'not ok' if bad else 'ok'} {j} {r.sequence.name}{note}")
        cbad = bool(c.unexplained) or (strict and bool(c.findings))
        out.append(f"{'not ok' if cbad else 'ok'} {i} {c.name}")
    keys = sorted({f.known for f in report.findings if f.known})
    for key in keys:
        b = kernel_bugs.by_key(key)
        out.append(f"# known bug {key}: {b.title} (fixed by {b.fix})")
    return "\n".join(out)

