"""Child processes (QEMU, gdb, and the short-lived tools: :func:`run`) that never outlive the
harness, however it ends.

Every child is started with :func:`spawn`, which

* asks the kernel to SIGKILL the child when its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``
  in the child before ``exec``: this covers SIGKILL of the harness and a crashed pytest-xdist
  worker). The signal fires when the parent *thread* that forked the child exits, so start
  targets from a thread that lives as long as they do (the main thread, normally);
* puts the child in its own session and process group (a terminal's Ctrl-C reaches only the
  harness, which then kills the whole group);
* records it in a process-wide registry: :func:`reap_all` (run by ``atexit`` and, through
  :func:`install_signal_handlers`, on SIGTERM and SIGHUP) SIGKILLs every registered group;
* tags its environment with ``PGTABLE_HARNESS_OWNER=<harness pid>`` (:data:`OWNER_ENV`) so that
  tests and operators can find leftovers (:func:`owned_processes`).

Private run-time directories (``/dev/shm/pgtable-harness-<pid>-*``) are registered too: removed
by :func:`reap_all`, and swept at the next start if their owner died without running it
(:func:`sweep_stale_dirs`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from harness.target.errors import ToolMissing

OWNER_ENV = "PGTABLE_HARNESS_OWNER"
RUNTIME_PREFIX = "pgtable-harness-"
_PR_SET_PDEATHSIG = 1

_lock = threading.Lock()
_children: dict[int, subprocess.Popen[bytes]] = {}
_dirs: set[Path] = set()
_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _child_setup(parent: int, libc: ctypes.CDLL | None) -> None:
    """Runs in the child between fork and exec (after setsid)."""
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def spawn(args: Sequence[str], *, name: str, stdin: int | IO[bytes] | None = subprocess.DEVNULL,
          stdout: int | IO[bytes] | None = None, stderr: int | IO[bytes] | None = None,
          cwd: Path | str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``args`` as a registered child (see the module text); ``name`` is for messages."""
    child_env = dict(os.environ if env is None else env)
    child_env[OWNER_ENV] = str(os.getpid())
    libc = _load_libc()
    parent = os.getpid()
    proc = subprocess.Popen(list(args), stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=child_env,
                            start_new_session=True, preexec_fn=lambda: _child_setup(parent, libc))
    with _lock:
        _children[proc.pid] = proc
    _install_atexit()
    return proc


def run(args: Sequence[str], *, name: str, timeout: float | None = None, cwd: Path | str | None = None,
        env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(args, capture_output=True, text=True)`` for a short-lived tool (a compiler,
    ``nm``, ``--version``), started with :func:`spawn` so that it dies with the harness too;
    killed and reaped however the wait ends (TimeoutExpired after ``timeout`` s, as
    ``subprocess.run`` raises it; CalledProcessError with ``check``; FileNotFoundError and other
    OSErrors from the start)."""
    proc = spawn(args, name=name, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill(proc)
    done = subprocess.CompletedProcess(list(args), proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))
    if check:
        done.check_returncode()
    return done


def _signal_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def kill(proc: subprocess.Popen[bytes], wait: float = 5.0) -> None:
    """SIGKILL ``proc``'s process group, reap it, close its pipes and forget it. Idempotent."""
    if proc.returncode is None:
        _signal_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            with contextlib.suppress(OSError):
                stream.close()
    with _lock:
        _children.pop(proc.pid, None)


def make_runtime_dir() -> Path:
    """A private (0700) directory for one target's RAM file and sockets: in /dev/shm when it is
    writable (RAM-backed), else the temp dir; registered for removal by :func:`reap_all`."""
    sweep_stale_dirs()
    parent = shm_dir()
    path = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{os.getpid()}-", dir=parent))
    os.chmod(path, 0o700)
    with _lock:
        _dirs.add(path)
    _install_atexit()
    return path


def remove_runtime_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with _lock:
        _dirs.discard(path)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def sweep_stale_dirs() -> list[Path]:
    """Remove run-time directories whose owning harness process is gone (e.g. killed with -9)."""
    removed: list[Path] = []
    parent = Path(shm_dir() or tempfile.gettempdir())
    for path in parent.glob(f"{RUNTIME_PREFIX}*-*"):
        owner = path.name[len(RUNTIME_PREFIX):].split("-", 1)[0]
        if not owner.isdigit() or _pid_alive(int(owner)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_all() -> None:
    """SIGKILL every registered child's group without waiting (safe inside a signal handler)."""
    with _lock:
        pids = list(_children)
    for pid in pids:
        _signal_group(pid)


def reap_all() -> None:
    """SIGKILL and reap every registered child, remove every registered run-time directory."""
    with _lock:
        procs = list(_children.values())
        dirs = list(_dirs)
    for proc in procs:
        kill(proc)
    for path in dirs:
        remove_runtime_dir(path)


_atexit_done = False


def _install_atexit() -> None:
    global _atexit_done
    if not _atexit_done:
        _atexit_done = True
        atexit.register(reap_all)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while the block runs (main thread only; elsewhere a no-op):
    a second Ctrl-C during cleanup is delivered after the cleanup, not in its middle."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Terminated(SystemExit):
    """Raised by the SIGTERM/SIGHUP handler: exit status 128 + signal number, after unwinding."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(128 + signum)


def _on_terminate(signum: int, frame: FrameType | None) -> None:
    signal_all()  # the children die now, whatever the unwinding does next
    raise Terminated(signum)


def require_tool(binary: str, variable: str, hint: str) -> str:
    """The path of the program ``binary`` (the value of the environment ``variable`` when that is
    set); ToolMissing saying which, and ``hint``, when it is empty or names no executable."""
    from_env = variable in os.environ
    if not binary.strip():
        raise ToolMissing(f"{variable} is set but empty: unset it, or set it to the program to run ({hint})")
    found = shutil.which(binary)
    if found is None:
        what = f"{variable}={binary}" if from_env else binary
        where = "is not an executable file" if os.sep in binary else "is not on PATH"
        raise ToolMissing(f"{what} {where} ({hint})")
    return found


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` (a SystemExit with status 128 + signum)
    after SIGKILLing every child: ``finally`` blocks and ``atexit`` then reap them and remove the
    run-time directories. Call once from the main thread of an entry point (the CLI's ``main``)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_terminate)


def owned_processes(owner: int | None = None) -> list[int]:
    """PIDs of live processes whose environment carries ``PGTABLE_HARNESS_OWNER=<owner>`` (any owner
    when ``owner`` is None). Reads /proc; processes of other users are skipped."""
    want = None if owner is None else f"{OWNER_ENV}={owner}".encode()
    prefix = f"{OWNER_ENV}=".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if any(v == want if want is not None else v.startswith(prefix) for v in env):
            found.append(int(entry.name))
    return found


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (``T`` stopped, ``Z`` zombie ...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
