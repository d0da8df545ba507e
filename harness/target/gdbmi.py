"""A small, fast gdb/MI driver: token-matched commands over pipes, parsed by pygdbmi.

``pygdbmi.GdbController.write`` waits for more output after each command (~200 ms); here each
command is sent as ``TOKEN-command`` and lines are read until the result record carrying that
token (~0.1-1 ms per round trip). Asynchronous records (``*stopped`` ...) are queued for
:meth:`GdbMI.wait_stopped`.
"""

from __future__ import annotations

import collections
import os
import re
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pygdbmi.gdbescapes import unescape
from pygdbmi.gdbmiparser import parse_response

from harness.target import process
from harness.target.errors import GdbLost, TargetTimeout, exit_text

Record = dict[str, Any]


class GdbError(RuntimeError):
    """gdb answered ``^error`` to a command."""


def mi_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_BARE_RESULT = re.compile(r"(\d+)\^(done|running)")
_BREAKPOINT_STOP = re.compile(r'\*stopped,reason="breakpoint-hit",disp="\w+",bkptno="(\d+)",')


def _fast_record(line: str) -> Record | None:
    """The records of a request's round trip, without pygdbmi's parser (about half the host's
    time per request): a bare ``^done``/``^running`` result, ``*running``, a breakpoint-hit
    ``*stopped`` (reason and breakpoint number only), a console line, and ``=`` notifications
    (nothing reads them: they are dropped, like ``*running``). None: parse it in full."""
    head = line[0]
    if head == "=" or line.startswith("*running"):
        return {"type": "notify", "message": line[1 : line.find(",")] if "," in line else line[1:],
                "payload": None, "token": None, "stream": "stdout"}
    if head == "~" and line.endswith('"'):
        try:
            text = unescape(line[2:-1])
        except ValueError:
            return None
        return {"type": "console", "message": None, "payload": text, "token": None, "stream": "stdout"}
    m = _BARE_RESULT.fullmatch(line)
    if m is not None:
        return {"type": "result", "message": m[2], "payload": None, "token": int(m[1]), "stream": "stdout"}
    m = _BREAKPOINT_STOP.match(line)
    if m is not None:
        return {"type": "notify", "message": "stopped", "payload": {"reason": "breakpoint-hit", "bkptno": m[1]},
                "token": None, "stream": "stdout"}
    return None


class GdbMI:
    """One gdb process in MI3 mode. Every command waits at most ``timeout`` seconds (per call, or
    :attr:`default_timeout`); a command that gets no answer in time raises TargetTimeout."""

    def __init__(self, binary: str = "gdb-multiarch", log_path: Path | None = None,
                 default_timeout: float = 10.0) -> None:
        self.binary = binary
        self.default_timeout = default_timeout
        self.proc = process.spawn(
            [binary, "--interpreter=mi3", "-nx", "-q"], name="gdb",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._buf = b""
        self._token = 100
        self._async: collections.deque[Record] = collections.deque()
        self._log = open(log_path, "ab") if log_path else None  # noqa: SIM115 (closed in close())
        self.console: list[str] = []  # recent console-stream output
        self._regnums: dict[str, int] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _reaped(self) -> int | None:
        """gdb's exit status, waiting briefly: it closed its output as it exited."""
        try:
            return self.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return None

    # -- transport ------------------------------------------------------------------------
    def _readline(self, deadline: float) -> str | None:
        """One line of output, or None at the deadline. Raises GdbLost if gdb is gone."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                if self._log:
                    self._log.write(b"< " + line + b"\n")
                return line.decode("utf-8", "replace").rstrip("\r")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 0.05))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise GdbLost(f"gdb (pid {self.proc.pid}) closed its output: it {exit_text(self._reaped())}")
            self._buf += chunk

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        if self._log:
            self._log.write(b"> " + line.encode() + b"\n")
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise GdbLost(f"gdb (pid {self.proc.pid}) is gone ({exc}): it {exit_text(self._reaped())}") from exc

    def _record(self, line: str) -> Record | None:
        if not line or line.startswith("(gdb)"):
            return None
        rec: Record | None = _fast_record(line)
        if rec is not None:
            if rec["type"] == "console":
                self.console.append(str(rec["payload"]))
                del self.console[:-200]
            elif rec["type"] == "notify" and rec["message"] == "stopped":
                self._async.append(rec)
            return rec
        rec = parse_response(line)
        if rec["type"] == "console":
            self.console.append(str(rec["payload"]))
            del self.console[:-200]
        elif rec["type"] == "notify" or (rec["type"] == "output" and rec.get("message")):
            self._async.append(rec)
        return rec

    def command(self, cmd: str, timeout: float | None = None) -> Record:
        """Run one MI command and return its result record; ``^error`` raises GdbError."""
        timeout = self.default_timeout if timeout is None else timeout
        self._token += 1
        token = self._token
        self._send(f"{token}{cmd}")
        deadline = time.monotonic() + timeout
        while True:
            line = self._readline(deadline)
            if line is None:
                raise TargetTimeout(f"gdb's answer to {cmd!r}", timeout, {"gdb pid": str(self.proc.pid)})
            rec = self._record(line)
            if rec is None or rec["type"] != "result" or rec.get("token") != token:
                continue
            if rec["message"] == "error":
                msg = rec["payload"].get("msg", "") if isinstance(rec["payload"], dict) else rec["payload"]
                raise GdbError(f"{cmd}: {msg}")
            return rec

    def console_command(self, text: str, timeout: float | None = None) -> str:
        """A CLI command through ``-interpreter-exec console``; returns its console output."""
        mark = len(self.console)
        self.command(f"-interpreter-exec console {mi_quote(text)}", timeout)
        return "".join(self.console[mark:])

    def wait_stopped(self, timeout: float, check: Callable[[], None] | None = None) -> Record:
        """The next ``*stopped`` record. ``check`` runs every ~50 ms (e.g. to see QEMU die)."""
        deadline = time.monotonic() + timeout
        while True:
            while self._async:
                rec = self._async.popleft()
                if rec["type"] == "notify" and rec["message"] == "stopped":
                    return rec
            if check:
                check()
            now = time.monotonic()
            if now >= deadline:
                raise TargetTimeout("the target to stop", timeout, {})
            line = self._readline(min(deadline, now + 0.05))
            if line is not None:
                self._record(line)

    def discard_async(self) -> None:
        """Forget queued asynchronous records (e.g. the stop reported on connecting)."""
        self._async.clear()

    # -- conveniences ---------------------------------------------------------------------
    def register_numbers(self, timeout: float | None = None) -> dict[str, int]:
        if self._regnums is None:
            names = self.command("-data-list-register-names", timeout)["payload"]["register-names"]
            self._regnums = {n: i for i, n in enumerate(names) if n}
        return self._regnums

    def read_registers(self, names: list[str], timeout: float | None = None) -> dict[str, int]:
        nums = self.register_numbers(timeout)
        missing = [n for n in names if n not in nums]
        if missing:
            raise GdbError(f"unknown register(s) {', '.join(missing)}")
        by_num = {nums[n]: n for n in names}
        rec = self.command(f"-data-list-register-values x {' '.join(str(nums[n]) for n in names)}", timeout)
        out: dict[str, int] = {}
        for item in rec["payload"]["register-values"]:
            out[by_num[int(item["number"])]] = int(item["value"], 16)
        return out

    def read_memory(self, addr: int, length: int) -> bytes:
        rec = self.command(f"-data-read-memory-bytes {addr:#x} {length}")
        data = bytearray()
        for chunk in rec["payload"]["memory"]:
            data += bytes.fromhex(chunk["contents"])
        if len(data) != length:
            raise GdbError(f"read {len(data)} of {length} bytes at {addr:#x}")
        return bytes(data)

    def physical_mode(self, on: bool) -> None:
        """QEMU's ``Qqemu.PhyMemMode``: gdb memory accesses use physical addresses."""
        self.console_command(f"maint packet Qqemu.PhyMemMode:{int(on)}")

    def close(self) -> None:
        """Ask gdb to exit (briefly), then SIGKILL its group whatever happened."""
        try:
            if self.proc.poll() is None:
                try:
                    self._send("-gdb-exit")
                    self.proc.wait(timeout=min(0.5, self.default_timeout))
                except (GdbLost, subprocess.TimeoutExpired):
                    pass
        finally:
            process.kill(self.proc)
            if self._log:
                self._log.close()
                self._log = None
