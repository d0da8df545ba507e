"""The command line's machinery: the parser (only the module of the command that runs is imported),
the paths it will write checked before any work, the run, its exit status and its one line on
stderr (no traceback unless ``--debug``), and its log directories removed or named."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import harness.cli as cli
from harness.cli import interrupt
from harness.cli.args import check_output_paths
from harness.errors import EXIT_INTERRUPTED, EXIT_MACHINERY, EXIT_OK, EXIT_USAGE, HarnessError, InputError, printable
from harness.target import process
from harness.target.errors import TargetTimeout, ToolMissing

SETUP_HINT = "bash ci/setup.sh"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, with where the usage is (argparse prints the whole usage block first)."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {printable(message)} ({self.prog} --help)\n")


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"harness.cli.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; ``only``: that command's alone (the others are names, their modules
    not imported: a command starts without the imports of the others)."""
    ap = _Parser(prog="harness", description=cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in cli.COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        module = command_module(name)
        module.add_parser(sub)
        p = sub.choices[name]
        p.add_argument("--debug", action="store_true", help="on an error, print the whole message and traceback")
        p.set_defaults(command_module=module)
    return ap


def _subparser(ap: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = action.choices[name]
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments (``harness`` alone runs ``harness run``); an unknown option is named by the
    command it was given to."""
    argv = list(argv) or [cli.DEFAULT_COMMAND]
    ap = build_parser(argv[0] if argv[0] in cli.COMMANDS else None)
    args, extra = ap.parse_known_args(argv)
    if args.command is None:
        ap.error(f"unrecognized arguments: {' '.join(extra)}" if extra else "expected a command")
    if extra:
        _subparser(ap, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _what(e: BaseException, expected: bool) -> str:
    """The error in one line: an input error's whole message; of a failure, its first line (the
    rest is in error.txt) and what to do or what was seen."""
    if isinstance(e, InputError):
        return str(e)
    what = _first_line(e) if expected else f"internal error: {type(e).__name__}: {_first_line(e)}"
    if isinstance(e, ToolMissing) and "install" not in what:  # the message's own hint says how already
        what += f" ({SETUP_HINT} installs what the harness needs)"
    if isinstance(e, TargetTimeout) and "QEMU" in e.evidence:  # why it did not answer, when known
        what += f": QEMU {e.evidence['QEMU']}"
    return what


def _report_error(args: argparse.Namespace, e: BaseException, expected: bool) -> None:
    """One line on stderr, ``harness CMD: error: ...`` whatever the exit status (the whole story
    under --debug); where the logs are, if any were kept."""
    if args.debug:
        traceback.print_exception(e, file=sys.stderr)
    for d in args.log_dirs:
        _write_error_file(d, e)
    args.error_reported = True
    hint = "" if args.debug or isinstance(e, InputError) else "; --debug for details"
    print(f"harness {args.command}: error: {printable(_what(e, expected))}{_logs_note(args.log_dirs)}{hint}",
          file=sys.stderr)


def _logs_note(dirs: Sequence[Path]) -> str:
    return f" (logs: {', '.join(map(str, dirs))})" if dirs else ""


def _write_error_file(log_dir: Path, e: BaseException) -> None:
    with contextlib.suppress(OSError):
        (log_dir / "error.txt").write_text("".join(traceback.format_exception(e)))


def _finish_logs(args: argparse.Namespace, code: int) -> None:
    """Remove the temporary log directories after success; keep and name them otherwise (an error's
    line named them already; an interruption's line names them)."""
    if code == EXIT_OK:
        for d in args.temporary_log_dirs:
            shutil.rmtree(d, ignore_errors=True)
        return
    kept = args.temporary_log_dirs
    if code == EXIT_INTERRUPTED:
        print(f"harness {args.command}: interrupted{_logs_note(kept)}", file=sys.stderr)
    elif _signal_name(code) is not None:
        print(f"harness {args.command}: terminated by {_signal_name(code)}{_logs_note(kept)}", file=sys.stderr)
    elif kept and not args.error_reported:
        print(f"harness {args.command}: logs kept in {', '.join(map(str, kept))}", file=sys.stderr)


def _signal_name(code: int) -> str | None:
    """SIGTERM, SIGHUP: the signal an exit status 128 + N says ended the command (None: not one)."""
    with contextlib.suppress(ValueError):
        if code > 128 and code != EXIT_INTERRUPTED:
            return signal.Signals(code - 128).name
    return None


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


def _run(args: argparse.Namespace) -> int:
    """The command, after the paths it writes are checked; Ctrl-C interrupts it (only it)."""
    interrupt.running()
    try:
        check_output_paths(args)
        return int(args.command_module.run(args))
    except Exception as e:
        _raise_interruption(e)  # cleanup that failed because QEMU was just killed hides the signal
        raise
    finally:
        interrupt.cleaning_up()


def run_command(argv: Sequence[str] | None = None) -> int:
    """Parse, run, report: the exit status (``argv`` None: the program's own arguments, and the
    SIGTERM/SIGHUP handlers that kill QEMU and gdb first, then unwind with status 128 + signal)."""
    args = parse(sys.argv[1:] if argv is None else argv)
    args.log_dirs = []  # log directories the command used (harness.cli.args.open_target) ...
    args.temporary_log_dirs = []  # ... and those of them it created: removed after success
    args.error_reported = False  # the error's line named the log directories
    code = EXIT_MACHINERY
    try:
        if argv is None:  # parse imported the command's modules: a SIGTERM meanwhile was harness.cli's (nothing had
            process.install_signal_handlers()  # started); from here on it kills QEMU and gdb first, then unwinds
        code = _run(args)
    except HarnessError as e:
        code = e.exit_code
        _report_error(args, e, expected=True)
    except SystemExit as e:  # SIGTERM/SIGHUP become SystemExit(128 + signal) after QEMU/gdb are killed
        code = e.code if isinstance(e.code, int) else EXIT_MACHINERY
        raise
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
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
