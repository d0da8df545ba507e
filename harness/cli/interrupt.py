"""Ctrl-C in the console entry point: one line on stderr and exit status 130, whenever it comes.

:func:`harness.cli.main` sets SIGINT to :func:`harness.cli.exit_interrupted` first, then
:func:`install` takes over, before the heavy imports: until the command starts (:func:`running`),
SIGINT prints the line and exits at once (nothing has started that needs cleaning up). While the
command runs, the first SIGINT raises KeyboardInterrupt (its ``finally`` blocks stop QEMU and gdb;
``main`` prints the line), raised again if Python swallowed it (an at-fork callback, a
``__del__``); from then on, and once the command has ended (:func:`cleaning_up`), SIGINT is
ignored to the exit (SIGTERM and SIGHUP too once the command has ended), so that no clean-up step
is cut short by a traceback. A SIGTERM/SIGHUP that Python swallowed is delivered again too. Light
on purpose.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

from harness.cli import exit_interrupted

STARTING, RUNNING, INTERRUPTED, DONE = "starting", "running", "interrupted", "done"

_installed = False  # main called with argv (from the tests): no signal handling of ours
_phase = STARTING
_next_unraisable_hook = sys.unraisablehook


def install() -> None:
    global _installed, _phase
    _installed, _phase = True, STARTING
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _on_unraisable


def running() -> None:
    """The command starts: the next Ctrl-C raises KeyboardInterrupt."""
    global _phase
    if _installed:
        _phase = RUNNING


def cleaning_up() -> None:
    """The command has ended (or been interrupted; its QEMU and gdb are closed): Ctrl-C, SIGTERM and
    SIGHUP are ignored from now on, to the exit (SIG_IGN, which the interpreter's finalization
    leaves in place), so that no log clean-up or ``atexit`` step is cut short by a traceback. Main
    thread only."""
    global _phase
    if _installed:
        _phase = DONE
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _phase
    if _phase == STARTING:
        exit_interrupted()
    if _phase == RUNNING:
        _phase = INTERRUPTED  # the clean-up this starts (QEMU, gdb, logs) is not cut short by a second Ctrl-C
        raise KeyboardInterrupt


def _on_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """The KeyboardInterrupt, or the SIGTERM/SIGHUP handler's SystemExit (harness.target.process.
    Terminated, which has ``signum``), was raised where Python swallows exceptions (an at-fork
    callback such as logging's, a ``__del__``): no "Exception ignored" traceback, and the signal
    delivered again, soon, from another thread (here it would be swallowed again: a hook may not
    raise; for Ctrl-C the phase stays INTERRUPTED meanwhile, so that no Ctrl-C raises in this hook)."""
    exc = unraisable.exc_value
    if isinstance(exc, KeyboardInterrupt) and _phase == INTERRUPTED:
        threading.Thread(target=_interrupt_again, daemon=True).start()
        return
    signum = getattr(exc, "signum", None)
    if isinstance(exc, SystemExit) and isinstance(signum, int) and _phase != DONE:
        threading.Thread(target=_signal_again, args=(signum,), daemon=True).start()
        return
    _next_unraisable_hook(unraisable)


def _signal_again(signum: int, delay: float = 0.01) -> None:
    time.sleep(delay)  # the main thread has left the hook by then
    os.kill(os.getpid(), signum)


def _interrupt_again(delay: float = 0.01) -> None:
    global _phase
    time.sleep(delay)  # the main thread has left the hook by then
    if _phase == INTERRUPTED:
        _phase = RUNNING
        os.kill(os.getpid(), signal.SIGINT)
