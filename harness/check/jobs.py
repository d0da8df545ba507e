"""Jobs: one run's work split over child processes, each with its own QEMU; the caller merges.

A job is ``python -m harness.check.jobs``, started by :func:`harness.target.process.spawn`: in its
own session (a terminal's Ctrl-C reaches the harness only, which then kills it), SIGKILLed by the
kernel when the harness dies, registered so that the SIGTERM/SIGHUP handler and ``atexit`` kill
it. The QEMU and gdb a job starts are its own children, spawned the same way from its main
thread, so they die with it; the run-time directories (``/dev/shm``) a killed job leaves are swept
as soon as the jobs are gone.

The parent writes the job's :class:`JobCall` (a module-level function and its argument, pickled)
to its stdin; the job answers on stdout in frames (an 8-byte length, then a pickle): progress
messages while it runs, then its result, or its error (the exception itself when it pickles,
else a :class:`JobFailed` with its text; either way with the job's traceback as a note, which
``error.txt`` shows). The first error ends every job.
"""

from __future__ import annotations

import importlib
import os
import pickle
import selectors
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from harness.errors import MachineryError
from harness.target import process

MAX_JOBS = 64  # each job is a process with its own QEMU
JOBS_REASON = "each job is a process with its own QEMU"
_HEADER = struct.Struct("<Q")
PROGRESS, RESULT, ERROR = "progress", "result", "error"

Send = Callable[[Any], None]  # a job's progress message to the parent


class JobFailed(MachineryError):
    """A job ended without a result, or with an error that could not be sent as itself."""


@dataclass(frozen=True)
class JobCall:
    """What one job runs: ``function(argument, send)``, ``function`` named ``module:name``;
    ``stderr``: where the job's stderr goes (its log directory), or nowhere."""

    function: str
    argument: Any
    stderr: Path | None = None


@dataclass
class _Job:
    index: int
    proc: subprocess.Popen[bytes]
    stderr: Path | None
    buffer: bytearray = field(default_factory=bytearray)
    result: Any = None
    done: bool = False


def run_jobs(calls: Sequence[JobCall], progress: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run every call in its own job at once; their results in the calls' order. ``progress(job,
    message)`` gets each job's progress messages. Every job is ended when this returns or raises
    (an error of one job, Ctrl-C, SIGTERM)."""
    jobs: list[_Job] = []
    try:
        for i, call in enumerate(calls):
            jobs.append(_start(i, call))
        _collect(jobs, progress)
        return [j.result for j in jobs]
    finally:
        with process.signals_deferred():
            for j in jobs:
                process.kill(j.proc)
            process.sweep_stale_dirs()  # what the killed jobs' QEMUs ran in


def _start(index: int, call: JobCall) -> _Job:
    err: IO[bytes] | int = subprocess.DEVNULL
    if call.stderr is not None:
        call.stderr.parent.mkdir(parents=True, exist_ok=True)
        err = open(call.stderr, "wb")  # noqa: SIM115 (the job holds it; closed here once it is started)
    try:
        proc = process.spawn([sys.executable, "-m", "harness.check.jobs"], name=f"job {index}",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    finally:
        if not isinstance(err, int):
            err.close()
    job = _Job(index, proc, call.stderr)
    assert proc.stdin is not None
    try:
        proc.stdin.write(pickle.dumps(call))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died at once: its end of stdout says so
    return job


def _collect(jobs: Sequence[_Job], progress: Callable[[int, Any], None] | None) -> None:
    sel = selectors.DefaultSelector()
    for j in jobs:
        assert j.proc.stdout is not None
        sel.register(j.proc.stdout, selectors.EVENT_READ, j)
    open_jobs = len(jobs)
    while open_jobs:
        for key, _ in sel.select():
            job: _Job = key.data
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                sel.unregister(key.fileobj)
                open_jobs -= 1
                _ended(job)
                continue
            job.buffer += chunk
            for kind, payload in _frames(job.buffer):
                _handle(job, kind, payload, progress)
    sel.close()


def _frames(buf: bytearray) -> list[tuple[str, Any]]:
    """The whole frames at the start of ``buf`` (removed from it)."""
    out: list[tuple[str, Any]] = []
    while len(buf) >= _HEADER.size:
        (n,) = _HEADER.unpack_from(buf)
        if len(buf) < _HEADER.size + n:
            break
        out.append(pickle.loads(bytes(buf[_HEADER.size:_HEADER.size + n])))
        del buf[:_HEADER.size + n]
    return out


def _handle(job: _Job, kind: str, payload: Any, progress: Callable[[int, Any], None] | None) -> None:
    if kind == PROGRESS:
        if progress is not None:
            progress(job.index, payload)
    elif kind == RESULT:
        job.result, job.done = payload, True
    else:
        raise payload  # the job's own error (the finally of run_jobs ends the others)


def _ended(job: _Job) -> None:
    if job.done:
        return
    code = job.proc.wait()
    where = f"; its stderr: {job.stderr}" if job.stderr is not None else ""
    raise JobFailed(f"job {job.index} ended without a result ({_status(code)}){where}")


def _status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


# -- the job's side -------------------------------------------------------------------------------

def _send(out: IO[bytes], kind: str, payload: Any) -> None:
    data = pickle.dumps((kind, payload))
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip, else a JobFailed with its text; with the job's
    traceback as a note."""
    note = "in the job:\n" + "".join(traceback.format_exception(exc))
    try:
        copy: BaseException = pickle.loads(pickle.dumps(exc))
    except Exception:
        copy = JobFailed(f"{type(exc).__name__}: {exc}")
    copy.add_note(note)
    return copy


def _function(name: str) -> Callable[[Any, Send], Any]:
    module, _, attr = name.partition(":")
    fn: Callable[[Any, Send], Any] = getattr(importlib.import_module(module), attr)
    return fn


def main() -> int:
    call: JobCall = pickle.load(sys.stdin.buffer)
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not land among the frames
    process.install_signal_handlers()  # SIGTERM: QEMU and gdb killed first, then unwind
    try:
        value = _function(call.function)(call.argument, lambda msg: _send(out, PROGRESS, msg))
    except BaseException as exc:  # everything goes back to the parent, which decides
        _send(out, ERROR, _portable(exc))
        return 1
    _send(out, RESULT, value)
    return 0


if __name__ == "__main__":
    from harness.check import jobs  # the module by its name (not __main__): what the job pickles names it

    sys.exit(jobs.main())
