"""Capture a live target's translation state through its gdbstub, leaving the target as found.

:func:`capture` connects gdb-multiarch (GDB/MI) to a QEMU gdbstub (``HOST:PORT`` or a unix
socket), which stops the VM; reads the control registers through QEMU's
``org.qemu.gdb.arm.sys.regs`` feature; derives the regimes in use; reads every table page
reachable from each root with physical reads (``maint packet Qqemu.PhyMemMode:1``, back to 0
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from harness.core.dump import mapped_ranges
from harness.errors import InputError, MachineryError
from harness.live.regimes import OPTIONAL_REGISTERS, REGISTERS, Regime, regimes_from_registers
from harness.live.snapshot import Snapshot
from harness.target.errors import TargetError
from harness.target.gdbmi import GdbError, GdbMI, Record
from harness.target.physmem import GdbPhysMemory

CAPTURE_PAGE = 4096  # snapshot unit: table pages of any granule are captured as 4K pieces
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


class TargetSpecError(InputError):
    """A TARGET argument that is neither HOST:PORT, a unix socket nor a snapshot file."""


class UndecodableRegisters(InputError):
    """The live registers describe a regime the decoder refuses (the message has the values)."""


class AttachFailed(MachineryError):
    """gdb or the gdbstub failed while attaching (the message says which step)."""


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


@dataclass
class Capture:
    """A snapshot and how it was taken."""

    snapshot: Snapshot
    regimes: list[Regime]
    was_running: bool
    vm_status: str
    timings: dict[str, float] = field(default_factory=dict)


def gdb_binary() -> str:
    return os.environ.get("HARNESS_GDB", "gdb-multiarch")


@contextlib.contextmanager
def session(spec: TargetSpec, timeout: float = 20.0, log_path: Path | None = None) -> Iterator[Session]:
    """gdb connected to the gdbstub (the VM stopped); on exit the target is left as it was found."""
    if spec.kind != "gdb":
        raise TargetSpecError(f"TARGET: {spec.where} is a snapshot file, not a gdbstub")
    try:
        gdb = _LiveGdb(gdb_binary(), log_path)
    except OSError as exc:
        raise AttachFailed(f"cannot start {gdb_binary()}: {exc} (apt-get install gdb-multiarch)") from None
    sess = Session(gdb, spec, timeout)
    try:
        for setting in ("pagination off", "confirm off", "architecture aarch64", "remotetimeout 10"):
            gdb.command(f"-gdb-set {setting}")
        try:
            gdb.command(f"-target-select remote {spec.where}", timeout)
        except GdbError as exc:
            raise AttachFailed(f"connecting gdb to {spec}: {exc}") from None
        sess.connected = True
        gdb.discard_async()
        try:
            sess.vm_status = gdb.monitor("info status").strip()
            sess.was_running = sess.vm_status == "VM status: paused"
        except GdbError:  # a stub without QEMU's monitor: it stopped on attach, resume on detach
            sess.vm_status, sess.was_running = "unknown (no QEMU monitor)", True
        yield sess
    except GdbError as exc:
        raise AttachFailed(f"gdb on {spec}: {exc}") from None
    finally:
        _release(gdb, sess.connected, sess.was_running)


@dataclass
class Session:
    gdb: _LiveGdb
    spec: TargetSpec
    timeout: float
    connected: bool = False
    was_running: bool = False
    vm_status: str = ""

    @contextlib.contextmanager
    def physical(self) -> Iterator[None]:
        """gdb memory reads are physical inside (``Qqemu.PhyMemMode:1``), back to 0 after."""
        self.gdb.physical_mode(True)
        try:
            yield
        finally:
            self.gdb.physical_mode(False)

    def read_physical(self, pa: int, length: int) -> bytes:
        with self.physical():
            try:
                return self.gdb.read_memory(pa, length)
            except GdbError as exc:
                raise AttachFailed(f"reading {length} bytes at physical {pa:#x}: {exc}") from None


def capture(spec: TargetSpec, timeout: float = 20.0, log_path: Path | None = None) -> Capture:
    """Snapshot the registers and every reachable table page of a live target (see module doc)."""
    t0 = time.perf_counter()
    with session(spec, timeout, log_path) as sess:
        t1 = time.perf_counter()
        regs = _read_registers(sess.gdb)
        try:
            regimes = regimes_from_registers(regs)
        except InputError as exc:
            values = " ".join(f"{k}={v:#x}" for k, v in regs.items())
            raise UndecodableRegisters(f"{exc} (registers read: {values})") from exc
        reader = GdbPhysMemory(sess.gdb, CAPTURE_PAGE)
        with sess.physical():
            for regime in regimes:
                mapped_ranges(reader, regime.geom, regime.root)  # reads every reachable table page
        pages = dict(reader.cache)
        t2 = time.perf_counter()
        snap = Snapshot(regs, pages, CAPTURE_PAGE, source=str(spec),
                        captured=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        notes={"vm_status": sess.vm_status})
        return Capture(snap, regimes, sess.was_running, sess.vm_status, {"connect": t1 - t0, "read": t2 - t1})


def _read_registers(gdb: GdbMI) -> dict[str, int]:
    names = gdb.register_numbers()
    missing = [r for r in REGISTERS if r not in names]
    if missing:
        raise AttachFailed(
            f"the gdbstub does not expose {', '.join(missing)} (QEMU's org.qemu.gdb.arm.sys.regs "
            "feature: qemu-system-aarch64 with an AArch64 CPU)")
    want = [*REGISTERS, *(r for r in OPTIONAL_REGISTERS if r in names)]
    return gdb.read_registers(want)


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
