"""Fault injection: however the harness ends, no QEMU or gdb outlives it (marker ``hw``).

Each test runs the harness (or a pytest session) in a subprocess whose environment carries a
unique marker; QEMU and gdb inherit it (and ``PGTABLE_HARNESS_OWNER``), so leftovers are found
by scanning /proc, whoever their parent is by then.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.target.process import OWNER_ENV, RUNTIME_PREFIX, process_state

pytestmark = pytest.mark.hw

MARK = "PGTABLE_FAULT_TEST"
SHM = Path("/dev/shm")


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def marked(tag: str) -> dict[int, str]:
    """Live (non-zombie) processes carrying ``MARK=tag``, with their command names."""
    want = f"{MARK}={tag}".encode()
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and want in _environ(int(entry.name)) and process_state(int(entry.name)) not in (
                None, "Z"):
            out[int(entry.name)] = _comm(int(entry.name))
    return out


def children_of_harness(tag: str) -> dict[int, str]:
    """Marked processes started by a harness (QEMU and gdb carry the owner tag)."""
    return {pid: comm for pid, comm in marked(tag).items()
            if any(v.startswith(f"{OWNER_ENV}=".encode()) for v in _environ(pid))}


def shm_dirs(owner: int | None = None) -> set[Path]:
    if not SHM.is_dir():
        return set()
    pattern = f"{RUNTIME_PREFIX}{owner}-*" if owner is not None else f"{RUNTIME_PREFIX}*"
    return set(SHM.glob(pattern))


def wait_for(cond: object, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(step)
    return bool(cond())  # type: ignore[operator]


class Run:
    """``harness ARGS`` in a subprocess, marked."""

    def __init__(self, *args: str) -> None:
        self.tag = uuid.uuid4().hex
        env = dict(os.environ, **{MARK: self.tag})
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stopped: list[int] = []

    def wait_children(self, names: tuple[str, ...] = ("qemu", "gdb"), timeout: float = 30.0) -> dict[str, int]:
        """PIDs of the harness's QEMU and gdb, once both run."""
        found: dict[str, int] = {}

        def both() -> bool:
            for pid, comm in children_of_harness(self.tag).items():
                for n in names:
                    if comm.startswith(n):
                        found[n] = pid
            return set(found) == set(names)

        assert wait_for(both, timeout), f"the harness did not start {names}: {found}"
        return found

    def finish(self, timeout: float = 30.0) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"the harness did not end within {timeout} s") from None
        return self.proc.returncode, err.decode("utf-8", "replace")

    def assert_clean(self) -> None:
        assert wait_for(lambda: not marked(self.tag), 5.0), f"left running after the harness ended: {marked(self.tag)}"
        assert not shm_dirs(self.proc.pid), f"left in /dev/shm: {shm_dirs(self.proc.pid)}"

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in [*self.stopped, *marked(self.tag)]:  # never leave our own leftovers to others
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break


@pytest.fixture
def run() -> Iterator[type[Run]]:
    runs: list[Run] = []

    class Tracked(Run):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            runs.append(self)

    yield Tracked
    for r in runs:
        r.cleanup()


def _dir_owner(path: Path) -> str:
    return path.name[len(RUNTIME_PREFIX):].split("-", 1)[0]


def _last_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_signal_to_harness_leaves_nothing(run: type[Run], sig: signal.Signals) -> None:
    r = run("run")
    r.wait_children()
    time.sleep(0.3)  # mid-run
    r.proc.send_signal(sig)
    code, _ = r.finish()
    # SIGKILL cannot be handled: the kernel's parent-death signal ends QEMU and gdb. SIGTERM and
    # SIGHUP end the run with 128 + signal once the CLI installs process.install_signal_handlers()
    # (until then Python's default action: death by the signal, children ended the same way).
    assert code in (-sig, 128 + sig), code
    r.assert_clean()


def test_double_ctrl_c_leaves_nothing(run: type[Run]) -> None:
    r = run("run")
    r.wait_children()
    time.sleep(0.3)
    r.proc.send_signal(signal.SIGINT)
    time.sleep(0.02)  # the second one lands during cleanup
    r.proc.send_signal(signal.SIGINT)
    code, _ = r.finish()
    assert code != 0
    r.assert_clean()


@pytest.mark.parametrize("victim", ["qemu", "gdb"])
def test_tool_killed_mid_run_is_a_machinery_failure(run: type[Run], victim: str) -> None:
    r = run("run")
    pids = r.wait_children()
    time.sleep(0.3)
    os.kill(pids[victim], signal.SIGKILL)
    code, err = r.finish()
    # 3: the machinery failed (harness/errors.py), one line naming what failed, no traceback
    assert code == 3, (code, err)
    assert "Traceback" not in err, err
    assert ("QEMU" if victim == "qemu" else "gdb") in _last_line(err), err
    r.assert_clean()


def test_stopped_qemu_times_out_quickly(run: type[Run]) -> None:
    r = run("run", "--timeout", "3")
    pids = r.wait_children()
    time.sleep(0.3)
    os.kill(pids["qemu"], signal.SIGSTOP)
    r.stopped.append(pids["qemu"])
    t0 = time.monotonic()
    code, err = r.finish(timeout=30)
    took = time.monotonic() - t0
    assert code == 3, (code, err)
    assert "Traceback" not in err, err
    assert "timed out" in _last_line(err) and "stopped" in _last_line(err), err
    assert took < 6.0, f"a stopped QEMU was noticed after {took:.1f} s with --timeout 3"
    r.assert_clean()


def test_killed_xdist_worker_leaves_no_qemu(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    (tmp_path / "test_dies.py").write_text(textwrap.dedent("""
        import os, signal

        def test_dies(target):
            assert target.alive
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{MARK: tag})
    before = shm_dirs()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider", "-q",
                           "--max-worker-restart=0", str(tmp_path / "test_dies.py")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and ("crashed" in out or "worker" in out), out
    try:
        assert wait_for(lambda: not marked(tag), 5.0), f"left running after the worker died: {marked(tag)}"
        stray = {p for p in shm_dirs() - before if not Path(f"/proc/{_dir_owner(p)}").exists()}
        assert not stray, f"left in /dev/shm: {stray}"
    finally:
        for pid in marked(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
