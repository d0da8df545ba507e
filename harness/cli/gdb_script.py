"""`harness gdb-script`: the path of the file that gives gdb the ``pgt`` commands.

    source $(harness gdb-script)        # in gdb-multiarch, or in ~/.gdbinit

``pgt regimes``, ``pgt ranges``, ``pgt explain ADDR``, ``pgt save FILE`` and ``pgt verify`` then
decode the tables of whatever that gdb is connected to, with ``harness attach``'s decoder
(:mod:`harness.gdb`). ``--check`` loads the file in gdb-multiarch (no target needed) and says
whether gdb's Python can run it.
"""

from __future__ import annotations

import argparse
import subprocess
from typing import Any

from harness.cli.args import add_json_arg
from harness.cli.output import print_json
from harness.errors import EXIT_OK, MachineryError
from harness.gdb import script_path
from harness.live.gdbstub import gdb_binary
from harness.target import process

NAME = "gdb-script"
CHECK_TIMEOUT = 30.0


class GdbCannotLoad(MachineryError):
    """gdb-multiarch is missing, or its Python cannot load the pgt commands (the message has gdb's line)."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="print the path of the gdb script that adds the pgt commands",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_json_arg(p)
    p.add_argument("--check", action="store_true", help="load it in gdb-multiarch (HARNESS_GDB) and report "
                   "whether the pgt commands work there (exit 3 if not)")


def check_loads(gdb: str) -> str:
    """gdb's own first line of ``help pgt`` after sourcing the script; GdbCannotLoad otherwise."""
    argv = [gdb, "-batch", "-nx", "-ex", f"source {script_path()}", "-ex", "help pgt"]
    try:
        done = process.run(argv, name="gdb -batch", timeout=CHECK_TIMEOUT)
    except FileNotFoundError:
        raise GdbCannotLoad(f"{gdb} is not on PATH (apt-get install gdb-multiarch, or set HARNESS_GDB)") from None
    except subprocess.TimeoutExpired:
        raise GdbCannotLoad(f"{gdb} did not finish loading {script_path()} in {CHECK_TIMEOUT:g} s") from None
    first = next((line for line in done.stderr.splitlines() if line.strip()), "")
    if done.returncode or first or not done.stdout.strip():
        raise GdbCannotLoad(f"{gdb} cannot load the pgt commands: {first or f'exit status {done.returncode}'}")
    return done.stdout.splitlines()[0]


def run(args: argparse.Namespace) -> int:
    path = script_path()
    info: dict[str, Any] = {"script": str(path)}
    if args.check:
        info["gdb"] = gdb_binary()
        info["help"] = check_loads(info["gdb"])
    if args.json:
        print_json(info)
    elif args.check:
        print(f"{path}\n{info['gdb']} loads it: {info['help']}")
    else:
        print(path)
    return EXIT_OK
