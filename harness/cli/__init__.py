"""The harness command line.

    harness run                  the main job: built-in scenarios, both stages, all granules, on QEMU
    harness check ...            one scenario from the command line or a JSON/TOML file
    harness explain ADDRESS ...  the model's walk step by step beside the MMU's answer
    harness export DIR ...       table image, register values, regions, expected translations
    harness dump ...             decode the live tables through gdb and diff them with the model
    harness review               the v3 review questions, settled on the MMU
    harness bench                end-to-end verified translations/s vs the raw AT rate
    harness geometry             the geometry table for every granule and input size
    harness fuzz                 random raw tables against the MMU; every disagreement classified
    harness attach TARGET        decode (and --verify on the MMU) a live target's tables via its gdbstub
    harness boot [KERNEL]        boot a kernel with a KVM guest of the harness's own VMM, gdbstub for attach
    harness gdb-script           the file to source in gdb for the pgt commands (attach inside your gdb)
    harness kernel-pgtable ...   a kernel tree's own pgtable.c at EL2, checked op by op (oracle and MMU)

Every command takes --json and --debug. Exit status:
  0    every check matched
  1    a check found a mismatch between the model and the MMU
  2    bad arguments or a bad scenario (the message names the argument or key); nothing booted
  3    the target or the machinery failed (QEMU or gdb died or hung, a tool is missing, I/O):
       one line naming what failed and where the logs are (--debug: the whole story)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM; 129 SIGHUP): QEMU and gdb killed first
Log directories are removed after a successful run unless --log-dir is given, kept otherwise.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # loaded with the interpreter; `signal` builds enums (ms)
import os
import sys
from collections.abc import Sequence  # nothing heavier here: see main

# One module per command, in `harness --help` order: each exposes add_parser(sub) and run(args).
COMMANDS: tuple[str, ...] = (
    "run", "check", "explain", "export", "dump", "review", "bench", "geometry", "fuzz", "attach", "boot",
    "gdb-script", "kernel-pgtable",
)
DEFAULT_COMMAND = "run"  # `harness` alone


def prog_of(argv: Sequence[str]) -> str:
    """``harness CMD`` for the command ``argv`` names (``harness`` when it names none)."""
    if not argv:
        return f"harness {DEFAULT_COMMAND}"
    return f"harness {argv[0]}" if argv[0] in COMMANDS else "harness"


def exit_interrupted(*_: object) -> None:
    """The SIGINT handler while the program starts (nothing to clean up yet): one line, exit
    status 130 at once."""
    os.write(2, f"{prog_of(sys.argv[1:])}: interrupted\n".encode())
    os._exit(130)  # harness.errors.EXIT_INTERRUPTED, not imported yet


_TERMINATING = {_signal.SIGTERM: "SIGTERM", _signal.SIGHUP: "SIGHUP"}


def exit_terminated(signum: int, *_: object) -> None:
    """The SIGTERM/SIGHUP handler while the program starts (no QEMU or gdb yet): one line, exit
    status 128 + signal at once (harness.target.process takes over before anything starts)."""
    os.write(2, f"{prog_of(sys.argv[1:])}: terminated by {_TERMINATING.get(signum, signum)}\n".encode())
    os._exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. ``argv`` None: the program's own arguments, and its signal handling,
    installed here before the heavy imports (Ctrl-C: :mod:`harness.cli.interrupt`; SIGTERM/SIGHUP
    kill QEMU and gdb first, then unwind with status 128 + signal). The work is in
    :mod:`harness.cli.app`."""
    if argv is None:
        _signal.signal(_signal.SIGINT, exit_interrupted)  # before any other import of ours
        for signum in _TERMINATING:
            _signal.signal(signum, exit_terminated)
        from harness.cli import interrupt

        interrupt.install()
    from harness.cli.app import run_command

    return run_command(argv)
