"""Ctrl-C and SIGTERM in a few windows of a real `harness check` (the fast subset of
ci/interrupts.py, through its own functions): 130 or 143, one line, no traceback, no QEMU or gdb
left, no run-time directory left."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.hw

SCRIPT = Path(__file__).resolve().parents[2] / "ci" / "interrupts.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_interrupts", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _qemu_span(ci: ModuleType) -> tuple[float, float]:
    """An unsignalled ``check``: when its QEMU first shows up, and when it ends (seconds)."""
    with tempfile.TemporaryDirectory(prefix="interrupts-") as tmp:
        t0 = time.monotonic()
        proc = subprocess.Popen([*ci.harness_argv(), *ci.COMMANDS["check"]], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": tmp}, cwd=ci.ROOT)
        first = None
        while proc.poll() is None:
            if first is None and "qemu-system-aarch64" in ci._children(proc.pid).values():
                first = time.monotonic() - t0
            time.sleep(0.005)
        assert proc.returncode == 0 and first is not None, (proc.returncode, first)
        return first, time.monotonic() - t0


def test_interrupt_windows_of_check() -> None:
    ci = _script()
    start, duration = _qemu_span(ci)
    # QEMU and gdb run from `start` to the end: three points inside that span, counted from when
    # QEMU shows up (a run on a machine faster or less loaded than the measured one may still end
    # first; such a window is a miss, and one of them must find QEMU and gdb to clean up)
    mids = [round(f * (duration - start), 2) for f in (0.1, 0.2, 0.3)]
    qemu = "qemu-system-aarch64"
    windows = [
        ci.Window("check", 0.1),  # the modules import
        ci.Window("check", 0.1, second=ci.SECOND_AFTER),
        ci.Window("check", 0.1, signal.SIGTERM),
        *(ci.Window("check", mid, after=qemu) for mid in mids),  # QEMU and gdb running
        *(ci.Window("check", mid, second=ci.SECOND_AFTER, after=qemu) for mid in mids),  # a second Ctrl-C
        ci.Window("check", mids[0], signal.SIGTERM, after=qemu),
    ]
    outcomes = [ci.run_window(w, duration) for w in windows]
    failed = [o.row() for o in outcomes if o.problems()]
    assert failed == [], "\n".join(failed)
    # the windows reached what they are for: the start-up line, and a run with QEMU and gdb to clean up
    assert any(o.returncode == 130 and o.stderr.strip() == "harness check: interrupted" for o in outcomes[:2]), \
        "\n".join(o.row() for o in outcomes)
    assert any("qemu-system-aarch64" in o.seen.values() and "(logs: " in o.stderr for o in outcomes[3:-1]), \
        "\n".join(o.row() for o in outcomes)
    outcomes = [outcomes[2], outcomes[-1]]
    assert any(o.returncode == 143 and "terminated by SIGTERM" in o.stderr for o in outcomes), \
        "\n".join(o.row() for o in outcomes)


def test_a_problem_is_reported() -> None:
    """The judge itself: a traceback, two lines, a wrong status and a leftover are each failures."""
    ci = _script()
    w = ci.Window("check", 0.5)
    assert ci.Outcome(w, 130, "harness check: interrupted\n", 0.6).problems() == []
    trace = 'Traceback (most recent call last):\n  File "{}", line 3, in {}\nKeyboardInterrupt\n'
    bad = ci.Outcome(w, 1, trace.format("harness/cli/app.py", "run_command"), 0.6, left=["qemu-system-aarch64 (pid 1)"])
    assert len(bad.problems()) == 4, bad.problems()
    assert ci.Outcome(w, 1, trace.format("bin/harness", "<module>"), 0.1).in_interpreter_startup
    assert ci.Outcome(w, -2, "", 0.0).killed_silently and ci.Outcome(w, -2, "x\n", 0.0).problems()
    assert ci.Outcome(w, 0, "", 0.4, signalled=False).problems() == []  # a miss: it ended before the signal
    assert ci.Outcome(w, 0, "", 0.6).problems() == ["exit 0, expected 130"]  # signalled, and ignored it
