"""Ctrl-C and SIGTERM at every moment of a harness run: one line, the right exit status, nothing left.

    python ci/interrupts.py [--command run|check|fuzz ...] [--quick]

For each command (``harness run``, ``harness check --builtin s2-4K``, ``harness fuzz --probes
20000``) one run without a signal measures how long it takes; then runs get SIGINT at 0, 0.05 ...
0.8 s (while the modules import and QEMU starts) and at points spread over the rest of the run,
some with a second SIGINT shortly after the first (while the first one's clean-up runs), and
SIGTERM at a few of the same points. Each run must end with 128 + the signal (130, 143), print no
traceback and at most one line on stderr, and leave nothing behind: no QEMU or gdb it started
(children seen while it ran, and any process tagged with its PID in ``PGTABLE_HARNESS_OWNER``), no
run-time directory of its PID in /dev/shm. A signal that comes once the run has printed its
result (the last points) may find it finished: exit 0 is accepted there and shown as such; one
that comes before any handler is set (the interpreter starting, at delay 0) kills it silently,
status -N (the shell's 128 + N), accepted and shown as such. A SIGINT inside the interpreter's
own start-up (site and .pth files, before the console script's first line runs) is Python's to
report (its "init_import_site" fatal error): no code of the harness can catch it; such runs are
counted and shown apart, not failed.

A table on stdout, one row per run; exit status 1 if any run failed, 0 otherwise. The hardware
test tests/hw/test_interrupts.py runs a few of the same windows through :func:`run_window`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python ci/interrupts.py` from a checkout
    sys.path.insert(0, str(ROOT))

from harness.target.process import RUNTIME_PREFIX, owned_processes, shm_dir  # noqa: E402

COMMANDS: dict[str, tuple[str, ...]] = {
    "run": ("run",),
    "check": ("check", "--builtin", "s2-4K"),
    "fuzz": ("fuzz", "--probes", "20000"),
}
STARTUP_DELAYS = tuple(round(0.05 * i, 2) for i in range(17))  # 0 .. 0.8 s: imports, QEMU's start
SPREAD_POINTS = 8  # delays spread over the rest of the run
SECOND_AFTER = 0.05  # the second SIGINT, this long after the first
WATCHED = ("qemu-system-aarch64", "gdb", "gdb-multiarch")  # what a run starts and must not leave
LATE = 0.8  # a signal after this fraction of the unsignalled run may find it finished (exit 0 accepted)
RUN_TIMEOUT = 300.0


@dataclass(frozen=True)
class Window:
    """One run: ``signum`` sent ``delay`` seconds after the start (after the watched child
    ``after`` first shows up, if given: a point inside the span it runs, whatever the machine's
    speed), a second SIGINT ``second`` seconds after that (None: none)."""

    command: str
    delay: float
    signum: int = signal.SIGINT
    second: float | None = None
    after: str | None = None

    @property
    def expected(self) -> int:
        return 128 + self.signum

    def label(self) -> str:
        sig = signal.Signals(self.signum).name
        again = f" + SIGINT {self.second:g} s later" if self.second is not None else ""
        after = f" after {self.after.split('-')[0]}" if self.after is not None else ""
        return f"{self.command:<5} {sig} at {self.delay:5.2f} s{after}{again}"


@dataclass
class Outcome:
    """What one run did: its exit status, stderr, the watched children seen while it ran, and what
    was still there after it ended."""

    window: Window
    returncode: int
    stderr: str
    elapsed: float
    seen: dict[int, str] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)
    late: bool = False  # the signal came in the last part of the run: it may have finished first
    signalled: bool = True  # False: the run had ended, unsignalled, when the signal was due

    @property
    def finished_first(self) -> bool:
        return (self.late or not self.signalled) and self.returncode == 0 and not self.stderr.strip()

    @property
    def killed_silently(self) -> bool:
        """Killed by the signal itself, saying nothing: it came before the interpreter or the
        harness had set a handler (the shell reports 128 + N all the same)."""
        return self.returncode == -self.window.signum and not self.stderr.strip()

    @property
    def in_interpreter_startup(self) -> bool:
        """The SIGINT came while the interpreter itself started (site and its .pth files: the
        editable install's finder takes ~20 ms here) or imported the console script's modules,
        before the harness's ``main`` could set a handler: Python's own "init_import_site" fatal
        error, or a KeyboardInterrupt traceback through module-level code and the import system
        alone (no function of the harness ran)."""
        if "init_import_site" in self.stderr:
            return True
        frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', self.stderr)
        return bool(frames) and self.stderr.rstrip().endswith("KeyboardInterrupt") and all(
            func == "<module>" or file.startswith("<frozen") for file, func in frames)

    def problems(self) -> list[str]:
        if self.in_interpreter_startup:
            return []
        found = []
        if self.returncode != self.window.expected and not (self.finished_first or self.killed_silently):
            found.append(f"exit {self.returncode}, expected {self.window.expected}")
        if "Traceback" in self.stderr:
            found.append("a traceback on stderr")
        if len(self.stderr.splitlines()) > 1:
            found.append(f"{len(self.stderr.splitlines())} lines on stderr")
        found.extend(f"left behind: {what}" for what in self.left)
        return found

    def row(self) -> str:
        if self.problems():
            verdict = "FAIL: " + "; ".join(self.problems())
        elif self.finished_first:
            verdict = "ok (finished first)" if self.signalled else "missed (it had ended when the signal was due)"
        elif self.killed_silently:
            verdict = "ok (killed by it)"
        elif self.in_interpreter_startup:
            verdict = "Python's own start-up (no harness code ran yet)"
        else:
            verdict = "ok"
        kids = ",".join(sorted(set(self.seen.values()))) or "-"
        line = self.stderr.strip().splitlines()[0] if self.stderr.strip() else ""
        return f"{self.window.label():<42} exit {self.returncode:>3} {self.elapsed:6.2f} s  children {kids:<28} " \
               f"{verdict}  | {line[:100]}"


def harness_argv() -> list[str]:
    """The console script next to this interpreter (what a user runs), else ``python -m harness.cli``."""
    script = Path(sys.executable).with_name("harness")
    return [str(script)] if script.exists() else [sys.executable, "-m", "harness.cli"]


def _children(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` by /proc (QEMU and gdb are direct children, in their own sessions),
    with their executables' names."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            found[int(entry.name)] = Path(os.readlink(entry / "exe")).name
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int, name: str) -> bool:
    """``pid`` still runs ``name`` (not a zombie, not a new process that took the number)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and Path(os.readlink(f"/proc/{pid}/exe")).name == name
    except (OSError, IndexError):
        return False


def _leftovers(pid: int, seen: dict[int, str]) -> list[str]:
    """What run ``pid`` left: watched children seen alive, processes tagged with its PID, its
    run-time directories."""
    left = {f"{name} (pid {k})" for k, name in seen.items() if _alive(k, name)}
    left.update(f"tagged process {k} ({_name(k)})" for k in owned_processes(pid))
    shm = Path(shm_dir() or tempfile.gettempdir())
    left.update(f"run-time directory {d}" for d in shm.glob(f"{RUNTIME_PREFIX}{pid}-*"))
    return sorted(left)


def _name(pid: int) -> str:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        return "gone"


def _watch(proc: subprocess.Popen[str], seen: dict[int, str], until: float, child: str | None = None) -> float:
    """Note the watched children of ``proc`` until ``until`` (monotonic) or its exit; with
    ``child``, until it first shows up. When the watch ended."""
    while time.monotonic() < until and proc.poll() is None:
        seen.update({k: n for k, n in _children(proc.pid).items() if n in WATCHED})
        if child is not None and child in seen.values():
            break
        time.sleep(0.005)
    return time.monotonic()


def run_window(window: Window, duration: float | None = None, extra: Sequence[str] = ()) -> Outcome:
    """Run ``window``'s command, signal it as the window says and judge what it did. ``duration``:
    how long the command takes unsignalled (a signal after :data:`LATE` of it may find it finished).
    Temporary log directories go to a private TMPDIR, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="interrupts-") as tmp:
        env = {**os.environ, "TMPDIR": tmp}
        argv = [*harness_argv(), *COMMANDS[window.command], *extra]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=ROOT)
        seen: dict[int, str] = {}
        try:
            start = t0
            if window.after is not None:
                start = _watch(proc, seen, t0 + RUN_TIMEOUT, window.after)
            _watch(proc, seen, start + window.delay)
            signalled = _signal(proc, window.signum)
            if window.second is not None:
                _watch(proc, seen, time.monotonic() + window.second)
                _signal(proc, signal.SIGINT)
            _watch(proc, seen, t0 + RUN_TIMEOUT)
            _, err = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        elapsed = time.monotonic() - t0
        late = duration is not None and window.delay >= LATE * duration
        return Outcome(window, proc.returncode, err, elapsed, seen, _leftovers(proc.pid, seen), late, signalled)


def _signal(proc: subprocess.Popen[str], signum: int) -> bool:
    """Send ``signum`` unless the run has ended; whether it was sent."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signum)
    return True


def measure(command: str, extra: Sequence[str] = ()) -> float:
    """How long ``command`` takes without a signal (it must succeed)."""
    with tempfile.TemporaryDirectory(prefix="interrupts-") as tmp:
        t0 = time.monotonic()
        proc = subprocess.run([*harness_argv(), *COMMANDS[command], *extra], capture_output=True, text=True,
                              env={**os.environ, "TMPDIR": tmp}, cwd=ROOT, timeout=RUN_TIMEOUT)
        if proc.returncode != 0:
            raise SystemExit(f"interrupts: `harness {' '.join(COMMANDS[command])}` failed unsignalled "
                             f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return time.monotonic() - t0


def windows(command: str, duration: float, quick: bool = False) -> list[Window]:
    """The windows of one command: SIGINT at every start-up delay and at points spread over the run,
    a second SIGINT after every other one, SIGTERM at a few of the same points."""
    startup = STARTUP_DELAYS[::4] if quick else STARTUP_DELAYS
    spread = [round(duration * k / (SPREAD_POINTS + 1), 2) for k in range(1, SPREAD_POINTS + 1)]
    delays = sorted({*startup, *(d for d in spread if d > STARTUP_DELAYS[-1])})
    if quick:
        delays = delays[::2]
    out = [Window(command, d) for d in delays]
    out += [Window(command, d, second=SECOND_AFTER) for d in delays[1::2]]
    out += [Window(command, d, signal.SIGTERM) for d in delays[::3]]
    return out


def run_all(commands: Iterable[str], quick: bool = False) -> list[Outcome]:
    outcomes = []
    for command in commands:
        duration = measure(command)
        print(f"{command}: {duration:.2f} s unsignalled", flush=True)
        for w in windows(command, duration, quick):
            outcome = run_window(w, duration)
            print(outcome.row(), flush=True)
            outcomes.append(outcome)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ci/interrupts.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--command", action="append", choices=sorted(COMMANDS), help="only these commands (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a quarter of the windows")
    args = ap.parse_args(argv)
    if shutil.which("qemu-system-aarch64") is None and "HARNESS_QEMU" not in os.environ:
        print("interrupts: qemu-system-aarch64 is not on PATH (bash ci/setup.sh installs it)", file=sys.stderr)
        return 2
    outcomes = run_all(args.command or list(COMMANDS), args.quick)
    failed = [o for o in outcomes if o.problems()]
    print(f"{len(outcomes)} runs, {len(failed)} failed, {sum(o.finished_first for o in outcomes)} finished before "
          f"the signal, {sum(o.killed_silently for o in outcomes)} killed by it before any handler, "
          f"{sum(o.in_interpreter_startup for o in outcomes)} in Python's own start-up")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
