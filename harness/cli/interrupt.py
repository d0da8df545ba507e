"""Ctrl-C in the console entry point: one line on stderr and exit status 130, whenever it comes.

:func:`harness.cli.main` sets SIGINT to :func:`harness.cli.exit_interrupted` first, then
:func:`install` takes over, before the heavy imports: until the command starts (:func:`running`),
SIGINT prints the line and exits at once (nothing has started that needs cleaning up). While the
command runs, the first SIGINT raises KeyboardInterrupt (its ``finally`` blocks stop QEMU and gdb;
``main`` prints the line), raised again if Python swallowed it (an at-fork callback, a
``__del__``); from then on, and once the command has ended (:func:`cleaning_up`), SIGINT is
ignored to the exit, so that no clean-up step is cut short by a traceback. Light on purpose.
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
    """The command has ended (or been interrupted): Ctrl-C is ignored from now on, to the exit
    (SIG_IGN, which the interpreter's finalization leaves in place). Main thread only."""
    global _phase
    if _installed:
        _phase = DONE
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _phase
    if _phase == STARTING:
        exit_interrupted()
    if _phase == RUNNING:
        _phase = INTERRUPTED  # the clean-up this starts (QEMU, gdb, logs) is not cut short by a second Ctrl-C
        raise KeyboardInterrupt


def _on_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """The KeyboardInterrupt was raised where Python swallows exceptions (an at-fork callback, a
    ``__del__``): no "Exception ignored" traceback, and the Ctrl-C delivered again, soon, from
    another thread (here it would be swallowed again: a hook may not raise; the phase stays
    INTERRUPTED meanwhile, so that no Ctrl-C raises in this hook)."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _phase == INTERRUPTED:
        threading.Thread(target=_interrupt_again, daemon=True).start()
        return
    _next_unraisable_hook(unraisable)


def _interrupt_again(delay: float = 0.01) -> None:
    global _phase
    time.sleep(delay)  # the main thread has left the hook by then
    if _phase == INTERRUPTED:
        _phase = RUNNING
        os.kill(os.getpid(), signal.SIGINT)
