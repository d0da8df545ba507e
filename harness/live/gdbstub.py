"""Capture a live target's translation state through its gdbstub, leaving the target as found.

:func:`capture` connects gdb-multiarch (GDB/MI) to a QEMU gdbstub (``HOST:PORT`` or a unix
socket), which stops the VM (every vCPU); lists the vCPUs (QEMU shows each as a gdb thread:
thread N is CPU N - 1, ``-thread-info``); reads every vCPU's control registers through QEMU's
``org.qemu.gdb.arm.sys.regs`` feature (``-data-list-register-values --thread N``, which leaves
gdb's selected thread alone; the selection is put back anyway before leaving); derives each
vCPU's regimes and merges the ones that are the same
(:func:`harness.live.regimes.regimes_by_cpu`); reads every table page reachable from each
distinct root once, with physical reads (``maint packet Qqemu.PhyMemMode:1``, back to 0
afterwards); and lets the target go: detached (QEMU resumes the VM) if it was running,
disconnected without a detach (the VM stays stopped) if it was not. Nothing is written.

Whether the VM was running is read from QEMU's monitor (``monitor info status``) right after
connecting: QEMU's gdbstub stops a running VM on connection (``VM status: paused``); a VM that was
already stopped keeps its reason (``paused (prelaunch)``, ``paused (debug)`` ...).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.errors import InputError
from harness.live.capture import (
    AttachFailed,
    Capture,
    VCpu,
    arch_names,
    capture_from,
    vcpu_of_thread,
    wanted_registers,
)
from harness.target.errors import TargetError
from harness.target.gdbmi import GdbError, GdbMI, Record

_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


class TargetSpecError(InputError):
    """A TARGET argument that is neither HOST:PORT, a unix socket nor a snapshot file."""



@dataclass(frozen=True)
class TargetSpec:
    kind: str  # "gdb" or "file"
    where: str  # gdb remote argument or file path

    def __str__(self) -> str:
        return f"{'unix:' if self.kind == 'gdb' and self.where.startswith('/') else ''}{self.where}"


def parse_target(text: str) -> TargetSpec:
    """``HOST:PORT`` or an existing unix socket: a gdbstub; an existing regular file: a snapshot."""
    path = Path(text)
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None
    if mode is not None and stat.S_ISSOCK(mode):
        return TargetSpec("gdb", str(path.resolve()))
    if mode is not None and stat.S_ISREG(mode):
        return TargetSpec("file", str(path))
    m = _HOST_PORT.match(text)
    if m and 0 < int(m["port"]) < 65536:
        return TargetSpec("gdb", text)
    if mode is not None:
        raise TargetSpecError(f"TARGET: {text} is neither a unix socket nor a regular file")
    raise TargetSpecError(
        f"TARGET: expected a gdbstub as HOST:PORT or a unix socket path, or a snapshot file; "
        f"{text!r} is none of them (no such file)")


class _LiveGdb(GdbMI):
    """GdbMI that also keeps the target stream (``@`` records: monitor command output)."""

    def _record(self, line: str) -> Record | None:
        rec = super()._record(line)
        if rec is not None and rec["type"] == "target":
            self.console.append(str(rec["payload"]))
        return rec

    def monitor(self, text: str, timeout: float = 10.0) -> str:
        return self.console_command(f"monitor {text}", timeout)

    def read_thread_registers(self, names: list[str], thread: str) -> dict[str, int]:
        """Registers of one thread (vCPU) by name; gdb's selected thread is left as it is."""
        nums = self.register_numbers()
        by_num = {nums[n]: n for n in names}
        rec = self.command(f"-data-list-register-values --thread {thread} x "
                           f"{' '.join(str(nums[n]) for n in names)}")
        return {by_num[int(item["number"])]: int(item["value"], 16) for item in rec["payload"]["register-values"]}


def gdb_binary() -> str:
    return os.environ.get("HARNESS_GDB", "gdb-multiarch")


@contextlib.contextmanager
def session(spec: TargetSpec, timeout: float = 20.0, log_path: Path | None = None) -> Iterator[Session]:
    """gdb connected to the gdbstub (the VM stopped); on exit the target is left as it was found."""
    if spec.kind != "gdb":
        raise TargetSpecError(f"TARGET: {spec.where} is a snapshot file, not a gdbstub")
    try:
        gdb = _LiveGdb(gdb_binary(), log_path, default_timeout=timeout)
    except OSError as exc:
        raise AttachFailed(f"cannot start {gdb_binary()}: {exc} (apt-get install gdb-multiarch)") from None
    sess = Session(gdb, spec, timeout)
    try:
        # A refused TCP connection fails at once (gdb would retry it for 15 s by default).
        for setting in ("pagination off", "confirm off", "architecture aarch64",
                        f"remotetimeout {max(1, int(timeout))}", "tcp auto-retry off",
                        f"tcp connect-timeout {max(1, int(timeout))}"):
            gdb.command(f"-gdb-set {setting}")
        try:
            gdb.command(f"-target-select remote {spec.where}", timeout)
        except GdbError as exc:
            raise AttachFailed(f"connecting gdb to {spec}: {_connect_error(str(exc))}") from None
        sess.connected = True
        gdb.discard_async()
        try:
            sess.vm_status = gdb.monitor("info status").strip()
            sess.was_running = sess.vm_status == "VM status: paused"
        except GdbError:  # a stub without QEMU's monitor: it stopped on attach, resume on detach
            sess.vm_status, sess.was_running = "unknown (no QEMU monitor)", True
        sess.selected_thread = _current_thread(gdb)
        yield sess
    except GdbError as exc:
        raise AttachFailed(f"gdb on {spec}: {exc}") from None
    finally:
        if sess.connected:
            _restore_thread(gdb, sess.selected_thread)
        _release(gdb, sess.connected, sess.was_running)


@dataclass
class Session:
    gdb: _LiveGdb
    spec: TargetSpec
    timeout: float
    connected: bool = False
    was_running: bool = False
    vm_status: str = ""
    selected_thread: str | None = None  # gdb's selected thread on connecting (put back on leaving)

    def vcpus(self) -> list[VCpu]:
        """Every vCPU (gdb thread), by CPU index."""
        threads = self.gdb.command("-thread-info", self.timeout)["payload"].get("threads", [])
        out = []
        for t in threads:
            out.append(vcpu_of_thread(str(t["id"]), str(t.get("details", ""))))
        if not out:
            raise AttachFailed(f"gdb lists no thread (vCPU) on {self.spec}")
        return sorted(out, key=lambda v: v.cpu)

    # -- TargetAccess (harness.live.capture) ------------------------------------------------
    @property
    def source(self) -> str:
        return str(self.spec)

    def register_names(self) -> list[str]:
        return list(self.gdb.register_numbers())

    def read_thread_registers(self, names: list[str], vcpu: VCpu) -> dict[str, int]:
        return self.gdb.read_thread_registers(names, vcpu.thread)

    def read_registers(self, vcpu: VCpu) -> dict[str, int]:
        """The control registers of one vCPU (gdb's selection unchanged)."""
        return arch_names(self.read_thread_registers(wanted_registers(self.register_names()), vcpu))

    def physical_mode(self, on: bool) -> None:
        """gdb memory reads are physical (``Qqemu.PhyMemMode:1``) or virtual again."""
        self.gdb.physical_mode(on)

    def read_memory(self, addr: int, length: int) -> bytes:
        try:
            return self.gdb.read_memory(addr, length)
        except GdbError as exc:
            raise AttachFailed(f"reading {length} bytes at {addr:#x}: {exc}") from None

    @contextlib.contextmanager
    def physical(self) -> Iterator[None]:
        """gdb memory reads are physical inside (``Qqemu.PhyMemMode:1``), back to 0 after."""
        self.physical_mode(True)
        try:
            yield
        finally:
            self.physical_mode(False)

    def read_physical(self, pa: int, length: int) -> bytes:
        with self.physical():
            return self.read_memory(pa, length)


def capture(spec: TargetSpec, timeout: float = 20.0, log_path: Path | None = None,
            cpu: int | None = None, all_ranges: bool = False) -> Capture:
    """Snapshot the registers of every vCPU (only CPU ``cpu``, if given) and every table page
    reachable from their regimes, of a live target (see module doc)."""
    t0 = time.perf_counter()
    with session(spec, timeout, log_path) as sess:
        connected = time.perf_counter() - t0
        cap = capture_from(sess, cpu, sess.was_running, all_ranges=all_ranges)
        cap.timings = {"connect": connected, **cap.timings}
        return cap


def _connect_error(message: str) -> str:
    """gdb's complaint about a connection, without the MI command it quotes."""
    text = message.rsplit(": ", 1)[-1].strip().rstrip(".") if ": " in message else message
    if "Connection refused" in message:
        return "connection refused (nothing listens there: is QEMU running with -gdb / -s?)"
    return text or message


def _current_thread(gdb: GdbMI) -> str | None:
    cur = gdb.command("-thread-info")["payload"].get("current-thread-id")
    return None if cur is None else str(cur)


def _restore_thread(gdb: GdbMI, thread: str | None) -> None:
    """Select ``thread`` again if gdb's selection moved (``--thread`` does not move it). The
    gdbstub's own register thread (``Hg``) is per connection: QEMU resets it on the next one."""
    if thread is None:
        return
    try:
        if _current_thread(gdb) != thread:
            gdb.command(f"-thread-select {thread}")
    except (GdbError, TargetError):
        pass


def _release(gdb: _LiveGdb, connected: bool, resume: bool) -> None:
    """Leave the target as found: detach (QEMU resumes the VM) only if it was running."""
    try:
        if connected:
            if resume:
                gdb.command("-target-detach", 5.0)
            else:
                gdb.console_command("disconnect", 5.0)
    except (GdbError, TargetError):
        pass
    finally:
        gdb.close()
