"""The developer's gdb session as a :class:`harness.live.capture.TargetAccess`: gdb's Python API
for threads, registers and memory, in place of ``harness attach``'s own GDB/MI connection.

Everything here runs inside gdb (``gdb`` is its Python module, passed in, so that tests can hand
in a stand-in). Nothing is written to the target. :func:`kept_selection` puts back what a capture
moves: the selected thread and frame, and gdb's memory reads to virtual addresses (QEMU's
``Qqemu.PhyMemMode`` off), however the capture ends: an error, gdb's ``Quit``, Ctrl-C.

Physical reads:

* ``qemu`` (default): QEMU's gdbstub packet ``Qqemu.PhyMemMode:1`` turns its memory reads into
  physical ones for every vCPU; a server that does not answer ``OK`` to it is refused with what is
  missing (:class:`NoPhysicalReads`);
* ``direct``: the server's memory reads already are physical addresses: a JTAG probe's memory
  access port on the system bus (OpenOCD's ``mem_ap`` target), or a core stopped with its MMU
  off. Nothing is switched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.errors import InputError
from harness.live.capture import AttachFailed, VCpu, vcpu_of_thread

PHYS_MODES = ("qemu", "direct")
_OK = 'received: "OK"'

GdbModule = Any  # gdb's own Python module (only inside gdb) or a stand-in


class NotConnected(InputError):
    """gdb has no live remote target to read (the message says what to do)."""


class NoPhysicalReads(InputError):
    """The gdb server cannot read physical memory the way asked (the message says what is missing)."""


def source_of(gdb: GdbModule) -> str:
    """What the session is connected to, written as ``harness attach`` takes it: ``unix:PATH`` for a
    unix socket (resolved), ``HOST:PORT`` otherwise."""
    conn = gdb.selected_inferior().connection
    if conn is None:
        raise NotConnected("gdb is not connected to a target (connect first: target remote HOST:PORT)")
    details = str(conn.details or "")
    if details.startswith("/"):
        return f"unix:{Path(details).resolve()}"
    return details or str(conn.type)


def vcpu_of(thread: Any) -> VCpu:
    """A gdb thread (gdb's Python object) as a vCPU."""
    return vcpu_of_thread(str(thread.num), str(thread.details or ""))


class GdbApiAccess:
    """A :class:`~harness.live.capture.TargetAccess` over gdb's Python API (module doc)."""

    def __init__(self, gdb: GdbModule, phys: str = "qemu") -> None:
        if phys not in PHYS_MODES:
            raise InputError(f"--phys: expected one of {', '.join(PHYS_MODES)}, got {phys!r}")
        self.gdb = gdb
        self.phys = phys
        self._source = source_of(gdb)
        threads = list(gdb.selected_inferior().threads())
        if not threads:
            raise NotConnected(f"gdb lists no thread (vCPU) on {self._source}")
        if any(not t.is_stopped() for t in threads):
            raise NotConnected(f"the target {self._source} is running: interrupt it first (Ctrl-C or 'interrupt')")
        self._threads = {str(t.num): t for t in threads}
        self._vm_status = self._monitor_status()
        self.physical_on = False  # the server's reads are physical now (qemu mode switched on)

    @property
    def source(self) -> str:
        return self._source

    @property
    def vm_status(self) -> str:
        return self._vm_status

    def _monitor_status(self) -> str:
        try:
            return str(self.gdb.execute("monitor info status", to_string=True)).strip()
        except self.gdb.error:
            return "unknown (no QEMU monitor)"

    def vcpus(self) -> list[VCpu]:
        return sorted((vcpu_of(t) for t in self._threads.values()), key=lambda v: v.cpu)

    def register_names(self) -> list[str]:
        return [r.name for r in self.gdb.newest_frame().architecture().registers()]

    def read_thread_registers(self, names: list[str], vcpu: VCpu) -> dict[str, int]:
        """Switches to the vCPU's thread (:func:`kept_selection` switches back) and reads its
        innermost frame's registers, as unsigned values of the register's width."""
        self._threads[vcpu.thread].switch()
        frame = self.gdb.newest_frame()
        out = {}
        for name in names:
            value = frame.read_register(name)
            out[name] = int(value) & ((1 << (8 * int(value.type.sizeof))) - 1)
        return out

    def physical_mode(self, on: bool) -> None:
        if self.phys == "direct":
            return
        if not on:
            if self.physical_on:
                self._packet(0)
                self.physical_on = False
            return
        self.physical_on = True  # from the moment it is sent: a Ctrl-C may land after QEMU applied it
        reply = self._packet(1)
        if _OK not in reply:
            self.physical_on = False
            raise NoPhysicalReads(
                f"{self._source} does not switch to physical reads (Qqemu.PhyMemMode:1 answered "
                f"{reply.strip().splitlines()[-1] if reply.strip() else 'nothing'}): table pages are read by "
                "physical address, which QEMU's gdbstub does on that packet; if this server's reads already "
                "are physical (a JTAG memory access port, a core with its MMU off), use --phys direct")

    def _packet(self, on: int) -> str:
        return str(self.gdb.execute(f"maint packet Qqemu.PhyMemMode:{on}", to_string=True))

    def read_memory(self, addr: int, length: int) -> bytes:
        try:
            return bytes(self.gdb.selected_inferior().read_memory(addr, length))
        except self.gdb.MemoryError as exc:
            kind = "physical " if self.physical_on or self.phys == "direct" else ""
            raise AttachFailed(f"reading {length} bytes at {kind}{addr:#x}: {exc}") from None


@contextmanager
def kept_selection(gdb: GdbModule, access: GdbApiAccess | None = None) -> Iterator[None]:
    """On leaving, however: physical reads off again (``access``), the thread and frame that were
    selected on entry selected again, and gdb's memory cache flushed (it may hold what was read
    while reads were physical). Each step is retried once if a pending Ctrl-C interrupts it."""
    thread = gdb.selected_thread()
    try:
        level = gdb.selected_frame().level()
    except gdb.error:  # no frame (no registers yet)
        level = None
    try:
        yield
    finally:
        undone = []
        if access is not None and not _twice(gdb, lambda: access.physical_mode(False)):
            undone.append("memory reads are still physical: run 'maint packet Qqemu.PhyMemMode:0'")
        if thread is not None and thread.is_valid() and not _twice(gdb, lambda: _select(gdb, thread, level)):
            undone.append(f"thread {thread.num} frame {level} was selected: select them again")
        _twice(gdb, lambda: gdb.execute("maint flush dcache", to_string=True))
        for text in undone:
            gdb.write(f"pgt: warning: {text}\n", gdb.STDERR)


def _select(gdb: GdbModule, thread: Any, level: int | None) -> None:
    thread.switch()
    if level is None:
        return
    frame = gdb.newest_frame()
    for _ in range(level):
        older = frame.older()
        if older is None:
            break
        frame = older
    frame.select()


def _twice(gdb: GdbModule, step: Callable[[], object]) -> bool:
    """Run a clean-up step; again if a Ctrl-C or a gdb error (a pending Quit) interrupts it.
    False if the second try failed too."""
    for _ in range(2):
        try:
            step()
            return True
        except (KeyboardInterrupt, gdb.error):
            continue
    return False
