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
    harness kernel-pgtable ...   a kernel tree's own pgtable.c at EL2, checked op by op (oracle and MMU)

Every command takes --json and --debug. Exit status:
  0    every check matched
  1    a check found a mismatch between the model and the MMU
  2    bad arguments or a bad scenario (the message names the argument or key); nothing booted
  3    the target or the machinery failed (QEMU or gdb died or hung, a tool is missing, I/O):
       one line naming what failed and where the logs are (--debug: the whole story)
  130  interrupted
Log directories are removed after a successful run unless --log-dir is given, kept otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from harness.errors import EXIT_INTERRUPTED, EXIT_MACHINERY, EXIT_OK, HarnessError, InputError
from harness.target import process
from harness.target.errors import TargetTimeout, ToolMissing

# One module per command, in `harness --help` order: each exposes add_parser(sub) and run(args).
COMMANDS: tuple[str, ...] = (
    "run", "check", "explain", "export", "dump", "review", "bench", "geometry", "fuzz", "attach", "kernel-pgtable",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def command_modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(f"harness.cli.{name.replace('-', '_')}") for name in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="harness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in command_modules().items():
        module.add_parser(sub)
        p = sub.choices[name]
        p.add_argument("--debug", action="store_true", help="on an error, print the whole message and traceback")
        p.set_defaults(command_module=module)
    return ap


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _report_error(args: argparse.Namespace, e: BaseException, expected: bool) -> None:
    """One line on stderr (the whole story under --debug); where the logs are, if any were kept."""
    prog = f"harness {args.command}"
    if args.debug:
        traceback.print_exception(e, file=sys.stderr)
    if isinstance(e, InputError):
        print(f"{prog}: error: {e}", file=sys.stderr)
        return
    what = _first_line(e) if expected else f"internal error: {type(e).__name__}: {_first_line(e)}"
    if isinstance(e, ToolMissing):
        what += " (bash ci/setup.sh installs what the harness needs)"
    if isinstance(e, TargetTimeout) and "QEMU" in e.evidence:  # why it did not answer, when known
        what += f": QEMU {e.evidence['QEMU']}"
    logs = [str(d) for d in args.log_dirs]
    for d in args.log_dirs:
        _write_error_file(d, e)
    where = f" (logs: {', '.join(logs)})" if logs else ""
    hint = "" if args.debug else "; --debug for details"
    print(f"{prog}: failed: {what}{where}{hint}", file=sys.stderr)


def _write_error_file(log_dir: Path, e: BaseException) -> None:
    with contextlib.suppress(OSError):
        (log_dir / "error.txt").write_text("".join(traceback.format_exception(e)))


def _finish_logs(args: argparse.Namespace, code: int) -> None:
    """Remove the temporary log directories after success; keep and name them otherwise."""
    for d in args.temporary_log_dirs:
        if code == EXIT_OK:
            shutil.rmtree(d, ignore_errors=True)
        elif code != EXIT_MACHINERY:  # exit 3 named them already
            print(f"harness {args.command}: logs kept in {d}", file=sys.stderr)


def _raise_interruption(e: BaseException) -> None:
    """Re-raise the SIGTERM/SIGHUP (SystemExit) or Ctrl-C (KeyboardInterrupt) that ``e`` was raised
    while handling: a cleanup step that met the QEMU the signal handler had just killed must not
    turn "terminated" into "the machinery failed"."""
    seen: set[int] = set()
    ctx = e.__context__
    while ctx is not None and id(ctx) not in seen:
        if isinstance(ctx, SystemExit | KeyboardInterrupt):
            raise ctx from None
        seen.add(id(ctx))
        ctx = ctx.__context__


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (``argv`` None: the program's own arguments, and SIGTERM/SIGHUP handlers
    that kill QEMU and gdb first, then unwind with status 128 + signal)."""
    if argv is None:
        process.install_signal_handlers()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *argv])
    args.log_dirs = []  # log directories the command used (harness.cli.args.open_target) ...
    args.temporary_log_dirs = []  # ... and those of them it created: removed after success
    code = EXIT_MACHINERY
    try:
        try:
            code = int(args.command_module.run(args))
        except Exception as e:
            _raise_interruption(e)  # cleanup that failed because QEMU was just killed hides the signal
            raise
    except HarnessError as e:
        code = e.exit_code
        _report_error(args, e, expected=True)
    except SystemExit as e:  # SIGTERM/SIGHUP become SystemExit(128 + signal) after QEMU/gdb are killed
        code = e.code if isinstance(e.code, int) else EXIT_MACHINERY
        raise
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        print(f"harness {args.command}: interrupted", file=sys.stderr)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        code = EXIT_OK
    except OSError as e:  # files, pipes, sockets: the machinery, not the input
        code = EXIT_MACHINERY
        _report_error(args, e, expected=True)
    except Exception as e:
        code = EXIT_MACHINERY
        _report_error(args, e, expected=False)
    finally:
        _finish_logs(args, code)
    return code
