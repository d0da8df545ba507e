"""Guest physical memory through gdb: a ``read64`` memory for walkers over tables gdb can reach.

QEMU's gdbstub reads physical addresses after ``maint packet Qqemu.PhyMemMode:1`` (all vCPUs;
addresses with nothing behind them read as zeros, not as an error). Table walks read the same
pages again and again, so whole pages are read once and cached.

    with GdbPhysMemory(target.gdb, granule.size) as mem:
        ranges = mapped_ranges(mem, geom, root)
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol


class PhysicalReads(Protocol):
    """A debugger that reads memory and can switch its reads to physical addresses (:class:`harness.target.gdbmi.GdbMI`,
    or a gdb session's Python API: :class:`harness.gdb.access.GdbApiAccess`)."""

    def read_memory(self, addr: int, length: int) -> bytes: ...

    def physical_mode(self, on: bool) -> None: ...


class GdbPhysMemory:
    """``read64(pa)`` over gdb physical reads, one ``page``-sized read per page (cached).

    As a context manager it switches gdb to physical addresses on entry and back on exit; used
    without one, the caller switches (:meth:`PhysicalReads.physical_mode`). ``reads`` counts gdb reads."""

    def __init__(self, gdb: PhysicalReads, page: int = 4096) -> None:
        if page <= 0 or page & (page - 1):
            raise ValueError(f"page: expected a power of two, got {page}")
        self.gdb = gdb
        self.page = page
        self.cache: dict[int, bytes] = {}
        self.reads = 0

    def _page(self, base: int) -> bytes:
        data = self.cache.get(base)
        if data is None:
            data = self.cache[base] = self.gdb.read_memory(base, self.page)
            self.reads += 1
        return data

    def read(self, pa: int, n: int) -> bytes:
        """``n`` bytes at ``pa`` (may span pages)."""
        out = bytearray()
        while n > 0:
            base = pa & ~(self.page - 1)
            off = pa - base
            take = min(n, self.page - off)
            out += self._page(base)[off : off + take]
            pa += take
            n -= take
        return bytes(out)

    def read64(self, pa: int) -> int:
        return int.from_bytes(self.read(pa, 8), "little")

    def invalidate(self) -> None:
        """Forget cached pages (the target ran and may have changed them)."""
        self.cache.clear()

    def __enter__(self) -> GdbPhysMemory:
        self.gdb.physical_mode(True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.gdb.physical_mode(False)
