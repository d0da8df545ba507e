"""Start QEMU (virt, EL2, -cpu max) stopped, with shared-file RAM and unix-socket gdbstub/console."""

from __future__ import annotations

import functools
import os
import re
import shlex
import signal
import socket
import time
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from harness.errors import shown
from harness.target import process
from harness.target.errors import QemuExited, TargetTimeout, ToolMissing
from harness.target.layout import LAYOUT, Layout

MIN_VERSION = (7, 2, 1)


def qemu_binary() -> str:
    return os.environ.get("HARNESS_QEMU", "qemu-system-aarch64")


@functools.cache
def qemu_version(binary: str | None = None) -> tuple[int, int, int]:
    """QEMU's version as a tuple; ToolMissing if absent or unparsable."""
    binary = binary if binary is not None else qemu_binary()
    process.require_tool(binary, "HARNESS_QEMU", "bash ci/setup.sh installs QEMU 10.0")
    out = process.run([binary, "--version"], name=f"{binary} --version", timeout=60).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not m:
        first = out.strip().splitlines()[0] if out.strip() else ""
        raise ToolMissing(f"cannot read a version in `{binary} --version`: its first line is {shown(first)}")
    return (int(m[1]), int(m[2]), int(m[3]))


def check_qemu(binary: str | None = None) -> tuple[int, int, int]:
    version = qemu_version(binary)
    if version < MIN_VERSION:
        raise ToolMissing(
            f"QEMU {'.'.join(map(str, version))} is too old: 7.2.0 resolves stage-2 physical addresses "
            f"wrongly (gitlab #1417); need {'.'.join(map(str, MIN_VERSION))} or later (10.0 recommended, "
            "bash ci/setup.sh installs it from bookworm-backports)"
        )
    return version


def ram_backing_hint(ram_path: Path) -> str:
    """Why QEMU may have died of SIGBUS: the file backing guest RAM could not get a page."""
    where = str(ram_path.parent.parent)
    try:
        st = os.statvfs(where)
        free = f"{st.f_bavail * st.f_frsize >> 20} MiB free now"
    except OSError:
        free = "free space unknown"
    return (f"guest RAM is a file in {where} (tmpfs) that could not be backed by memory; "
            f"{where} is probably full ({free}): free space there or set TMPDIR")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


class Qemu:
    """One QEMU process: ``workdir`` (private, removed on close) holds ``ram`` (guest RAM), ``gdb.sock``
    and ``console.sock``; ``logdir`` (kept) holds ``console.log``, ``qemu.stderr``, ``qemu.cmdline``."""

    def __init__(self, elf: Path, workdir: Path, logdir: Path, layout: Layout = LAYOUT,
                 binary: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary if binary is not None else qemu_binary()
        self.version = check_qemu(self.binary)
        self.layout = layout
        self.workdir = workdir
        self.ram_path = workdir / "ram"
        self.gdb_socket = workdir / "gdb.sock"
        self.console_socket = workdir / "console.sock"
        self.console_log = logdir / "console.log"
        self.stderr_log = logdir / "qemu.stderr"
        self.args = [
            self.binary,
            "-M", "virt,virtualization=on,gic-version=3,memory-backend=ram",
            "-cpu", "max",
            "-smp", "1",
            "-m", f"{layout.ram_size >> 20}M",
            "-object", f"memory-backend-file,id=ram,size={layout.ram_size >> 20}M,mem-path={self.ram_path},share=on",
            "-nodefaults", "-nographic", "-monitor", "none",
            "-kernel", str(elf),
            "-chardev", f"socket,id=gdb0,path={self.gdb_socket},server=on,wait=off",
            "-gdb", "chardev:gdb0",
            "-chardev", f"socket,id=con0,path={self.console_socket},server=on,wait=off",
            "-serial", "chardev:con0",
            "-S",
            *extra_args,
        ]
        self.cmdline = shlex.join(self.args)
        (logdir / "qemu.cmdline").write_text(self.cmdline + "\n")
        with open(self.ram_path, "wb") as f:
            f.truncate(layout.ram_size)
        self._stderr = open(self.stderr_log, "wb")  # noqa: SIM115 (closed in close())
        self.proc = process.spawn(self.args, name="QEMU", stdout=self._stderr, stderr=self._stderr, cwd=workdir)
        self._sock: socket.socket | None = None
        self._logfile = open(self.console_log, "ab")  # noqa: SIM115
        self.console: pexpect.fdpexpect.fdspawn | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def check_alive(self, what: str = "QEMU") -> None:
        code = self.proc.poll()
        if code is not None:
            self.drain_console()
            if code == -signal.SIGBUS:
                what = f"{what}: QEMU died of SIGBUS: {ram_backing_hint(self.ram_path)}"
            raise QemuExited(what, code, self.console_tail(), self.stderr_tail())

    def wait_sockets(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self.gdb_socket.exists() and self.console_socket.exists()):
            self.check_alive("QEMU failed to start")
            if time.monotonic() > deadline:
                raise TargetTimeout("QEMU's gdb and console sockets", timeout, {"command": self.cmdline})
            time.sleep(0.005)
        # QEMU binds the socket file before it listens: a connect in between is refused. Retry.
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.console_socket))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                sock.close()
                self.check_alive("QEMU failed to start")
                if time.monotonic() > deadline:
                    raise TargetTimeout("QEMU's console socket to accept", timeout,
                                        {"command": self.cmdline}) from None
                time.sleep(0.005)
        self._sock = sock
        self.console = pexpect.fdpexpect.fdspawn(self._sock.fileno(), logfile=self._logfile, timeout=timeout)

    def expect_console(self, pattern: str, timeout: float) -> str:
        """Wait for ``pattern`` (a regex) on the serial console; returns the matched text."""
        assert self.console is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.console.expect(pattern, timeout=min(0.1, max(0.0, deadline - time.monotonic())))
                return str(self.console.after.decode("utf-8", "replace"))
            except pexpect.TIMEOUT:
                self.check_alive(f"waiting for {pattern!r} on the console")
                if time.monotonic() >= deadline:
                    raise TargetTimeout(f"{pattern!r} on the serial console", timeout,
                                        {"console tail": self.console_tail(800)}) from None
            except pexpect.EOF:
                time.sleep(0.05)
                self.check_alive(f"console closed while waiting for {pattern!r}")
                raise

    def drain_console(self) -> None:
        """Pull whatever the console has into the log file (no waiting)."""
        if self.console is None or self._logfile.closed:
            return
        try:
            while True:
                self.console.read_nonblocking(65536, timeout=0)
        except (pexpect.TIMEOUT, pexpect.EOF, OSError, ValueError):
            pass
        self._logfile.flush()

    def console_tail(self, limit: int = 4000) -> str:
        if not self._logfile.closed:
            self._logfile.flush()
        return _tail(self.console_log, limit)

    def stderr_tail(self, limit: int = 4000) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return _tail(self.stderr_log, limit)

    def close(self) -> None:
        """SIGKILL QEMU's group first, then close the console and logs."""
        try:
            process.kill(self.proc)
        finally:
            try:
                self.drain_console()
            finally:
                if self._sock:
                    self._sock.close()
                    self._sock = None
                self._logfile.close()
                self._stderr.close()
