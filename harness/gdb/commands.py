"""The ``pgt`` gdb commands: ``harness attach``'s decoder on the session a developer is debugging in.

QEMU's gdbstub serves one client, so while a developer's gdb is connected ``harness attach`` cannot
connect beside it; these commands bring the decoder into that gdb. They capture with the same code
as attach (:func:`harness.live.capture.capture_from`, over gdb's Python API:
:class:`harness.gdb.access.GdbApiAccess`) and print with the same renderer
(:mod:`harness.cli.attach_view`), so for the same target they print what attach prints.

    pgt regimes [--cpu N|all] [--json]
    pgt ranges  [--cpu N] [--regime R] [--range A-B] [--perm SPEC] [--json] [--output FILE]
    pgt explain ADDR [--cpu N] [--regime R] [--json]
    pgt save FILE [--cpu N]
    pgt verify [--cpu N] [--regime R] [--samples N] [--seed S] [--timeout T] [--log-dir DIR] [--json]

Every subcommand also takes ``--phys qemu|direct`` (:mod:`harness.gdb.access`). Errors are one
gdb error line (``gdb.GdbError``), never a traceback; Ctrl-C stops a command and leaves gdb as it
was (thread, frame, virtual memory reads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from harness.check import attach as att
from harness.cli import attach_view as av
from harness.cli.args import check_output_file
from harness.cli.output import print_json
from harness.errors import HarnessError, InputError, MachineryError
from harness.gdb.access import PHYS_MODES, GdbApiAccess, GdbModule, kept_selection, vcpu_of
from harness.live.capture import Capture, capture_from
from harness.target import process

PREFIX = "pgt"
SUMMARY = "Decode the stopped target's translation tables, as `harness attach` does."


class _HelpShown(Exception):
    """argparse printed --help: the command is done."""


class PgtUsage(InputError):
    """A bad ``pgt`` argument (argparse's message, with where to find the usage)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting and writes through gdb."""

    def __init__(self, write: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(add_help=True, allow_abbrev=False, **kwargs)
        self._write = write

    def error(self, message: str) -> NoReturn:
        raise PgtUsage(f"{message} (help {self.prog})")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._write(message)
        raise _HelpShown

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            self._write(message)


@dataclass(frozen=True)
class Sub:
    """One subcommand: its name, one-line summary (gdb's help shows it) and arguments."""

    name: str
    summary: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[GdbModule, argparse.Namespace], None]

    def parser(self, write: Callable[[str], None] = lambda _s: None) -> _Parser:
        p = _Parser(write, prog=f"{PREFIX} {self.name}", description=self.summary)
        self.add_args(p)
        p.add_argument("--all-ranges", action="store_true", help="also EL1&0's ranges (TTBR0/1_EL1) when "
                       "the vCPU's EL1 MMU is on: an nVHE host kernel's own tables, a guest's stage 1")
        p.add_argument("--phys", choices=PHYS_MODES, default="qemu",
                       help="how table pages are read by physical address: qemu (QEMU's Qqemu.PhyMemMode, "
                            "default) or direct (the server's reads already are physical)")
        return p

    def doc(self) -> str:
        """gdb's help text: the summary, then argparse's usage and options."""
        return f"{self.summary}\n\n{self.parser().format_help()}"


# ---------------------------------------------------------------------------------------------
# Arguments shared by several subcommands.


def _cpu_arg(p: argparse.ArgumentParser, all_default: bool = True) -> None:
    more = "; default: every vCPU" if all_default else "; 'all': every vCPU; default: the selected thread's"
    p.add_argument("--cpu", metavar="N", help=f"only vCPU N (QEMU's CPU index: gdb thread N+1){more}")


def _filter_args(p: argparse.ArgumentParser, ranges: bool = True) -> None:
    p.add_argument("--regime", action="append", choices=av.REGIME_NAMES, help="only these regimes (repeatable)")
    if ranges:
        p.add_argument("--range", dest="window", metavar="A-B", help="only ranges overlapping input addresses "
                       "[A, B) (clipped to them); A:B and A+SIZE also accepted")
        p.add_argument("--perm", metavar="SPEC", help="only ranges with these permissions, e.g. x, rw, 'x!w' "
                       "(executable and not writable)")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output (harness attach --json's)")


def _filters(args: argparse.Namespace, address: int | None = None) -> av.Filters:
    window = getattr(args, "window", None)
    perm = getattr(args, "perm", None)
    return av.Filters(av.parse_regimes(args.regime), att.parse_window(window) if window else None,
                      att.PermFilter.parse(perm) if perm else None, address)


def _capture(gdb: GdbModule, args: argparse.Namespace, cpu: int | None, pages: bool = True) -> Capture:
    access = GdbApiAccess(gdb, args.phys)
    with kept_selection(gdb, access):
        return capture_from(access, cpu, pages=pages, all_ranges=args.all_ranges)


def _selected_cpu(gdb: GdbModule) -> int | None:
    """QEMU's CPU index of gdb's selected thread."""
    thread = gdb.selected_thread()
    return None if thread is None else vcpu_of(thread).cpu


def _json_text(data: Any) -> str:
    buf = io.StringIO()
    print_json(data, buf)
    return buf.getvalue()


def _emit(gdb: GdbModule, text: str, output: str | None = None) -> None:
    """To gdb's console, or to ``output`` (a file, replaced)."""
    if not text.endswith("\n"):
        text += "\n"
    if output is None:
        gdb.write(text)
        return
    try:
        Path(output).write_text(text)
    except OSError as exc:
        raise InputError(f"--output: cannot write {output}: {exc.strerror}") from None


# ---------------------------------------------------------------------------------------------
# The subcommands.


def _regimes_args(p: argparse.ArgumentParser) -> None:
    _cpu_arg(p, all_default=False)
    _json_arg(p)


def _regimes(gdb: GdbModule, args: argparse.Namespace) -> None:
    if args.cpu == "all":
        cpu = None
    elif args.cpu is not None:
        cpu = av.parse_cpu(args.cpu)
    else:
        cpu = _selected_cpu(gdb)
    cap = _capture(gdb, args, cpu, pages=False)
    v = av.view(cap.snapshot, cap.regimes, av.Filters(), cap.timings, read_tables=False)
    if args.json:
        _emit(gdb, _json_text(v.out))
        return
    lines = av.header_lines(v, cap.snapshot.source)
    for rd in v.decoded:
        lines += av.regime_lines(rd, av.Filters(), ranges=False)
    _emit(gdb, "\n".join(lines))


def _ranges_args(p: argparse.ArgumentParser) -> None:
    _cpu_arg(p)
    _filter_args(p)
    _json_arg(p)
    p.add_argument("--output", metavar="FILE", help="write the output to FILE instead of gdb's console")


def _ranges(gdb: GdbModule, args: argparse.Namespace) -> None:
    filters = _filters(args)
    cpu = av.parse_cpu(args.cpu) if args.cpu is not None else None
    check_output_file(args.output, "--output")
    cap = _capture(gdb, args, cpu)
    v = av.view(cap.snapshot, cap.regimes, filters, cap.timings)
    _emit(gdb, _json_text(v.out) if args.json else av.text(v, filters, cap.snapshot.source), args.output)


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", metavar="ADDR", help="an input address: a number, or any gdb expression ($pc, "
                   "&symbol, $x0 + 0x10)")
    _cpu_arg(p)
    _filter_args(p, ranges=False)
    _json_arg(p)


def _address(gdb: GdbModule, text: str) -> int:
    """A number as attach's --explain takes it, else a gdb expression's value."""
    try:
        return av.parse_address(text, "ADDR")
    except InputError:
        pass
    try:
        value = gdb.parse_and_eval(text)
        return int(value.cast(gdb.lookup_type("unsigned long long"))) & ((1 << 64) - 1)
    except (gdb.error, ValueError) as exc:
        raise InputError(f"ADDR: expected an address or a gdb expression, got {text!r}: {exc}") from None


def _explain(gdb: GdbModule, args: argparse.Namespace) -> None:
    address = _address(gdb, args.address)
    filters = _filters(args, address)
    cpu = av.parse_cpu(args.cpu) if args.cpu is not None else None
    cap = _capture(gdb, args, cpu)
    v = av.view(cap.snapshot, cap.regimes, filters, cap.timings)
    if args.json:
        _emit(gdb, _json_text(v.out["explain"]))
    else:
        _emit(gdb, "\n".join(av.explain_lines(v)[1:]) or "no regime in use")


def _save_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="snapshot file to write (harness attach FILE reads it)")
    _cpu_arg(p)


def _save(gdb: GdbModule, args: argparse.Namespace) -> None:
    check_output_file(args.file, "FILE")
    cpu = av.parse_cpu(args.cpu) if args.cpu is not None else None
    cap = _capture(gdb, args, cpu)
    _write_snapshot(cap, args.file)
    gdb.write(f"saved {len(cap.snapshot.pages)} table pages and the registers of "
              f"{av.cpu_list(tuple(sorted(cap.snapshot.cpus)))} to {args.file}\n")


def _write_snapshot(cap: Capture, path: str) -> None:
    try:
        cap.snapshot.save(path)
    except OSError as exc:
        raise InputError(f"FILE: cannot write {path}: {exc.strerror}") from None


def _verify_args(p: argparse.ArgumentParser) -> None:
    _cpu_arg(p)
    _filter_args(p, ranges=False)
    _json_arg(p)
    p.add_argument("--samples", type=int, default=3, help="addresses sampled inside each range and hole")
    p.add_argument("--seed", type=int, default=0, help="seed for the samples")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the replay target")
    p.add_argument("--log-dir", help="keep the replay target's logs here")


def _verify(gdb: GdbModule, args: argparse.Namespace) -> None:
    """Capture here, then ``harness attach SNAPSHOT --verify`` in the harness's environment (its
    own QEMU: not the one gdb is connected to), its output streamed into gdb's console."""
    cpu = av.parse_cpu(args.cpu) if args.cpu is not None else None
    cap = _capture(gdb, args, cpu)
    with tempfile.TemporaryDirectory(prefix="pgt-verify-") as tmp:
        snap = Path(tmp) / "snapshot.json"
        _write_snapshot(cap, str(snap))
        argv = [harness_python(), "-m", "harness.cli", "attach", str(snap), "--verify",
                "--samples", str(args.samples), "--seed", str(args.seed), "--timeout", str(args.timeout)]
        argv += [a for r in args.regime or () for a in ("--regime", r)]
        argv += ["--log-dir", args.log_dir] if args.log_dir else []
        argv += ["--json"] if args.json else []
        code = _stream(gdb, argv)
    if code == 1:
        raise InputError("verify: the MMU disagreed with the decode (mismatches above)")
    if code:
        raise InputError(f"verify: harness attach --verify ended with exit status {code} (its message above)")


def harness_python() -> str:
    """The interpreter of the harness's environment (set by the gdb script that loaded us)."""
    return os.environ.get("HARNESS_GDB_PYTHON") or sys.executable


def _stream(gdb: GdbModule, argv: Sequence[str]) -> int:
    try:
        proc = process.spawn(argv, name="harness attach --verify", stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    except OSError as exc:
        raise MachineryError(f"cannot start the harness's interpreter {argv[0]} ({exc.strerror}; "
                             "HARNESS_GDB_PYTHON names it)") from None
    try:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            gdb.write(line.decode("utf-8", "replace"))
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        raise
    finally:
        process.kill(proc)


SUBCOMMANDS = (
    Sub("regimes", "Show every regime in use on the selected vCPU (--cpu N, --cpu all) and its decoded "
        "registers.", _regimes_args, _regimes),
    Sub("ranges", "Show the merged mapped ranges of every regime in use: harness attach's output.",
        _ranges_args, _ranges),
    Sub("explain", "Show the level-by-level walk of one input address in every regime in use.",
        _explain_args, _explain),
    Sub("save", "Save a snapshot (registers and table pages) for harness attach FILE [--verify].",
        _save_args, _save),
    Sub("verify", "Replay the tables on the harness's own QEMU and check every range with AT.",
        _verify_args, _verify),
)


def run(gdb: GdbModule, sub: Sub, argv: Sequence[str]) -> None:
    """Parse and run one subcommand; every failure becomes one ``gdb.GdbError`` line."""
    try:
        args = sub.parser(gdb.write).parse_args(list(argv))
        sub.run(gdb, args)
    except _HelpShown:
        return
    except HarnessError as exc:
        raise gdb.GdbError(f"{PREFIX} {sub.name}: {_one_line(str(exc))}") from None
    except KeyboardInterrupt:
        raise gdb.GdbError(f"{PREFIX} {sub.name}: interrupted (gdb's thread, frame and memory reads as they "
                           "were)") from None
    except gdb.GdbError:
        raise
    except gdb.error as exc:
        raise gdb.GdbError(f"{PREFIX} {sub.name}: gdb: {_one_line(str(exc))}") from None
    except Exception as exc:  # a bug of ours: still one line, with what to send
        if os.environ.get("HARNESS_DEBUG"):
            raise
        raise gdb.GdbError(f"{PREFIX} {sub.name}: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                           "(HARNESS_DEBUG=1 shows the traceback)") from None


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def register(gdb: GdbModule) -> None:
    """Define ``pgt`` and its subcommands in this gdb (again, if sourced twice)."""
    subs = {s.name: s for s in SUBCOMMANDS}

    def listing() -> str:
        width = max(len(s.name) for s in SUBCOMMANDS)
        return "\n".join(f"  {PREFIX} {s.name:<{width}}  {s.summary}" for s in SUBCOMMANDS)

    class Prefix(gdb.Command):  # type: ignore[misc,name-defined,unused-ignore]
        __doc__ = (f"{SUMMARY}\nThe same decoder as `harness attach`, on the target this gdb is connected to "
                   "(QEMU's gdbstub takes one client). Usage: pgt SUBCOMMAND [OPTIONS]; each subcommand has "
                   f"--help (or: help {PREFIX} SUBCOMMAND).")

        def __init__(self) -> None:
            super().__init__(PREFIX, gdb.COMMAND_DATA, gdb.COMPLETE_NONE, True)

        def invoke(self, arg: str, from_tty: bool) -> None:
            argv = gdb.string_to_argv(arg)
            if not argv or argv[0] in ("-h", "--help", "help"):
                gdb.write(f"{self.__doc__}\n\n{listing()}\n")
                return
            raise gdb.GdbError(f"{PREFIX}: unknown subcommand {argv[0]!r} (one of: {', '.join(subs)}; help {PREFIX})")

    Prefix()
    for sub in SUBCOMMANDS:
        _define(gdb, sub)


def _define(gdb: GdbModule, sub: Sub) -> None:
    class Command(gdb.Command):  # type: ignore[misc,name-defined,unused-ignore]
        __doc__ = sub.doc()

        def __init__(self) -> None:
            super().__init__(f"{PREFIX} {sub.name}", gdb.COMMAND_DATA,
                             gdb.COMPLETE_FILENAME if sub.name == "save" else gdb.COMPLETE_NONE)

        def invoke(self, arg: str, from_tty: bool) -> None:
            self.dont_repeat()
            run(gdb, sub, gdb.string_to_argv(arg))

    Command()
