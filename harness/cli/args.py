"""Arguments shared by the commands: their options, argv -> scenario, paths checked before any
work, and the target a command runs on (its log directory kept only when something failed)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.arch.geometry import PA_SIZES
from harness.check import scenario as scenarios
from harness.check.addresses import BATCH_REASON, MAX_BATCH_ADDRESSES
from harness.check.scenario import Scenario
from harness.check.scenario.parse import count_text, int_text
from harness.errors import InputError, shown
from harness.strict_json import MAX_NUMBER_TEXT
from harness.target.layout import LAYOUT, Layout
from harness.target.target import Target

ADDRESS_LIMIT = 1 << 64  # addresses are 64-bit VAs/IPAs


class UsageError(InputError):
    """A bad argument: exit status 2 with a message that names it."""


# -- argument types (argparse reports their errors as "argument --x: ...", exit 2) ------------------
# Every number is read as a scenario file's are (harness.check.scenario.parse.int_text): ASCII
# digits, 0x/0o/0b, _ separators, K/M/G/T suffixes; counts also in scientific notation (1e6).

def positive_seconds(text: str) -> float:
    try:
        if not text.isascii() or len(text) > MAX_NUMBER_TEXT:
            raise ValueError
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {shown(text)}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {shown(text)}")
    return value


def integer(text: str) -> int:
    """Any integer (``--ia-bits 0x28``, ``--start-level -1``)."""
    try:
        return int_text(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _at_least(value: int, low: int, text: str) -> int:
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {shown(text)}")
    return value


def non_negative_int(text: str) -> int:
    return _at_least(integer(text), 0, text)


def pa_size(text: str) -> int:
    value = integer(text)
    if value not in PA_SIZES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, PA_SIZES))}, got {shown(text)}")
    return value


def count(low: int = 1, high: int | None = None, why: str = "", unit: str = "") -> Callable[[str], int]:
    """The type of a count from ``low`` to ``high`` ``unit`` (``why``: the reason for the bound);
    whole numbers in scientific notation too (``--probes 1e6``)."""
    def parse(text: str) -> int:
        try:
            value = count_text(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if high is not None and value > high:
            bound = f"at most {high}{f' {unit}' if unit else ''}{f' ({why})' if why else ''}"
            raise argparse.ArgumentTypeError(f"expected {bound}, got {shown(text)}")
        return _at_least(value, low, text)

    parse.__name__ = "count"
    return parse


def batch_count(unit: str, low: int = 1) -> Callable[[str], int]:
    """A count of addresses walked and probed in one batch: at most :data:`MAX_BATCH_ADDRESSES`."""
    return count(low, MAX_BATCH_ADDRESSES, BATCH_REASON, unit)


def parse_address(text: str, what: str) -> int:
    """A 64-bit input address (decimal, 0x hex, _ separators)."""
    try:
        value = int_text(text, "an address")
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None
    if not 0 <= value < ADDRESS_LIMIT:
        raise UsageError(f"{what}: expected an address from 0 to 2^64 - 1, got {shown(text)}")
    return value


# -- option groups ------------------------------------------------------------------------------

def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_target_args(p: argparse.ArgumentParser) -> None:
    """--json and what running on QEMU takes: --timeout, --seed, --log-dir."""
    add_json_arg(p)
    p.add_argument("--timeout", type=positive_seconds, default=60.0,
                   help="seconds for boot and each request (default 60)")
    add_seed_arg(p)
    p.add_argument("--log-dir", help="keep QEMU/gdb/console logs here (default: a temporary directory, "
                                     "removed after a successful run)")


def add_live_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-live", action="store_true",
                   help="apply a scenario's operations to the model before installing (no live updates, "
                        "no TLB checks); by default each runs live on warm tables and its TLB maintenance "
                        "is checked")


def add_seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for address sampling (default 0)")


def add_report_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--report", metavar="FILE", help=what)


def add_scenario_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scenario (a file, a built-in name, or the options below)")
    g.add_argument("--scenario", metavar="FILE", help="JSON or TOML scenario file (see README)")
    g.add_argument("--builtin", metavar="NAME", help="a built-in scenario of `harness run` (e.g. s2-4K)")
    g.add_argument("--stage", help="1 (hyp stage 1 at EL2) or 2 (guest stage 2)")
    g.add_argument("--granule", help="4K, 16K or 64K")
    g.add_argument("--ia-bits", type=integer, help="input address size in bits")
    g.add_argument("--pa-bits", type=integer, help="physical address size (TCR/VTCR.PS): 32..48, 52 with 64K")
    g.add_argument("--start-level", type=integer, help="stage-2 start level (default: fewest levels)")
    g.add_argument("--map", action="append", default=[], metavar="ADDR:SIZE:PA[:PROT]",
                   help="a mapping, e.g. 0x10000000:2M:0x50000000:rw (repeatable; PROT letters rwxd)")
    g.add_argument("--op", action="append", default=[], metavar="OP:ADDR[:SIZE][:PROT]",
                   help="an operation after the maps: unmap, wrprotect, mkold, mkyoung, relax_perms")
    g.add_argument("--lpa2", action="store_true", help="FEAT_LPA2 (TCR/VTCR.DS = 1): 52-bit addresses with 4K/16K")
    g.add_argument("--e2h", action="store_true", help="stage 1 in the EL2&0 regime (HCR_EL2.E2H = 1, hVHE)")
    g.add_argument("--access", action="store_true", help="also probe with real loads and stores")
    g.add_argument("--sample", type=batch_count("pages"), help="probe at most this many mapped pages (plus the edges)")


# -- argv -> scenario ---------------------------------------------------------------------------

def _split(spec: str, n_min: int, n_max: int, what: str, form: str) -> list[str]:
    parts = spec.split(":")
    if not n_min <= len(parts) <= n_max:
        raise UsageError(f"{what}: expected {form}, got {shown(spec)}")
    return parts


def _prot_part(parts: list[str], i: int, what: str, spec: str) -> str | None:
    """The PROT part of a spec (None when left out); an empty one is refused, not read as none."""
    if len(parts) <= i:
        return None
    if not parts[i].strip():
        raise UsageError(f"{what}: PROT is empty in {shown(spec)}; expected letters from rwxd (e.g. rw), "
                         "or leave out the last ':'")
    return parts[i]


def _map_from_arg(spec: str) -> dict[str, Any]:
    p = _split(spec, 3, 4, "--map", "ADDR:SIZE:PA[:PROT]")
    return {"addr": p[0], "size": p[1], "pa": p[2], "prot": _prot_part(p, 3, "--map", spec) or "rw"}


def _op_from_arg(spec: str) -> dict[str, Any]:
    p = _split(spec, 2, 4, "--op", "OP:ADDR[:SIZE][:PROT]")
    op: dict[str, Any] = {"op": p[0], "addr": p[1]}
    if len(p) > 2 and p[2]:
        op["size"] = p[2]
    prot = _prot_part(p, 3, "--op", spec)
    if prot is not None:
        op["prot"] = prot
    return op


def _inline_scenario(args: argparse.Namespace) -> dict[str, Any]:
    missing = [o for o, v in (("--stage", args.stage), ("--granule", args.granule), ("--ia-bits", args.ia_bits))
               if v is None]
    if missing:
        raise UsageError(f"scenario: {', '.join(missing)} required (or --scenario FILE / --builtin NAME)")
    fields: dict[str, Any] = {"name": "cli", "stage": args.stage, "granule": args.granule, "ia_bits": args.ia_bits,
                              "maps": [_map_from_arg(m) for m in args.map], "ops": [_op_from_arg(o) for o in args.op]}
    for key in ("pa_bits", "start_level", "sample"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    for key in ("lpa2", "e2h", "access"):
        if getattr(args, key):
            fields[key] = True
    return fields


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The one scenario the arguments name: a file, a built-in, or the inline options."""
    given = [x for x in ("scenario", "builtin") if getattr(args, x)]
    inline = args.stage is not None or args.granule is not None or args.ia_bits is not None or args.map
    if len(given) + bool(inline) > 1:
        raise UsageError("scenario: give one of --scenario FILE, --builtin NAME, or --stage/--granule/--ia-bits")
    if args.scenario:
        found = scenarios.load(args.scenario)
        if len(found) != 1:
            raise UsageError(f"--scenario: {args.scenario} holds {len(found)} scenarios; this command takes one")
        sc = found[0]
    elif args.builtin:
        sc = scenarios.builtin_named(args.builtin, "--builtin")
    else:
        sc = scenarios.from_dict(_inline_scenario(args), "command line")
    return scenarios.with_options(sc, access=args.access or None, sample=args.sample, lpa2=args.lpa2 or None,
                                  e2h=args.e2h or None)


# -- paths, checked before any work -------------------------------------------------------------

def check_output_paths(args: argparse.Namespace) -> None:
    """Every path a command writes that the shared options name (``--report FILE``, ``--log-dir
    DIR``), checked before any work: harness.cli.app runs this before each command."""
    if getattr(args, "report", None) is not None:
        check_output_file(args.report, "--report")
    if getattr(args, "log_dir", None) is not None:
        check_log_dir(args.log_dir)


def check_output_file(path: str | None, what: str) -> None:
    """A file the command will write at the end: a file name in a directory it can write to."""
    if path is None:
        return
    p = _named(path, what, "a file name")
    if p.is_dir():
        raise UsageError(f"{what}: {p} is a directory; expected a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what}: directory {parent} does not exist")
    if p.exists():
        _require(_writable_file(p), what, p)
    else:
        _require(_writable_dir(parent), what, p)


def check_new_directory(path: str, what: str) -> Path:
    """A directory the command will create (or fill, when it exists and is empty) next to its
    siblings (the files go into a temporary sibling first)."""
    d = _named(path, what, "a directory name")
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise UsageError(f"{what}: {d} exists and is not an empty directory")
    _require(_writable_dir(_existing_ancestor(d.absolute().parent)), what, d)
    return d


def check_log_dir(path: str | None, what: str = "--log-dir") -> None:
    """A directory the command will fill (made, with its parents, when it does not exist)."""
    if path is None:
        return
    d = _named(path, what, "a directory name")
    if d.exists() and not d.is_dir():
        raise UsageError(f"{what}: {d} exists and is not a directory")
    _require(_writable_dir(d if d.exists() else _existing_ancestor(d)), what, d)


def _named(path: str, what: str, expected: str) -> Path:
    if not path.strip():
        raise UsageError(f"{what}: expected {expected}, got {shown(path)}")
    return Path(path)


def _require(problem: str | None, what: str, p: Path) -> None:
    if problem is not None:
        raise UsageError(f"{what}: cannot write {p}: {problem}")


def _writable_dir(d: Path) -> str | None:
    """None if a file can be made in ``d`` (tried: os.access says yes to root even on /proc), else why not."""
    if not d.is_dir():
        return f"{d} is not a directory"
    try:
        probe = tempfile.mkdtemp(prefix=".harness-probe-", dir=d)
    except OSError as e:
        return f"cannot create files in {d} ({e.strerror or e})"
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


def _writable_file(p: Path) -> str | None:
    """None if ``p`` (which exists) can be opened for writing; it is not changed."""
    if not p.is_file():
        return None if os.access(p, os.W_OK) else "not writable"  # a device or a pipe: not opened here
    try:
        with open(p, "ab"):
            return None
    except OSError as e:
        return f"cannot open it for writing ({e.strerror or e})"


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


# -- the target ---------------------------------------------------------------------------------

def start_target(args: argparse.Namespace, layout: Layout = LAYOUT) -> Target:
    """Boot QEMU for a command that may start more than one (``args``: --timeout, --log-dir): each
    boot logs into the user's --log-dir (``bootN`` below it after the first) or a temporary
    directory that ``harness.cli.main`` removes after success and names after a failure."""
    if args.log_dir is not None:
        log_dir = Path(args.log_dir)
        if args.log_dirs:
            log_dir = log_dir / f"boot{len(args.log_dirs) + 1}"
        log_dir.mkdir(parents=True, exist_ok=True)
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="pgtable-harness-log-"))
        args.temporary_log_dirs.append(log_dir)
    args.log_dirs.append(log_dir)
    return Target.start(timeout=args.timeout, request_timeout=args.timeout, layout=layout, log_dir=log_dir)


@contextmanager
def open_target(args: argparse.Namespace, layout: Layout = LAYOUT) -> Iterator[Target]:
    """QEMU for one command (see :func:`start_target`), closed when the block ends."""
    with start_target(args, layout) as t:
        yield t


# -- jobs -------------------------------------------------------------------------------------

def jobs_count(text: str) -> int:
    """``--jobs N``: the processes a run is split over, each with its own QEMU (1 to MAX_JOBS)."""
    from harness.check.jobs import JOBS_REASON, MAX_JOBS

    return count(1, MAX_JOBS, JOBS_REASON, "jobs")(text)


def log_base(args: argparse.Namespace) -> Path:
    """Where every boot of a command that may start more than one logs (a directory each below
    it): --log-dir, or a temporary directory that harness.cli.app removes after success and names
    (with error.txt when the machinery failed) otherwise."""
    if args.log_dir is not None:
        base = Path(args.log_dir)
        base.mkdir(parents=True, exist_ok=True)
    else:
        base = Path(tempfile.mkdtemp(prefix="pgtable-harness-log-"))
        args.temporary_log_dirs.append(base)
    args.log_dirs.append(base)
    return base
