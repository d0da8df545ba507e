"""Drive a tree's ``pgtable.c`` running in the kernel-walker payload: one mailbox request per
operation, and what the host recorded around it (return values, callbacks, WARNs, faults,
reference counts, the tables' bytes).

    kw = KernelWalker(target, payload_elf)
    r = kw.op(Op.INIT_S2, 40)            # OpResult: ret, ret1, status, events, warns, fault
    r = kw.op(Op.S2_MAP, ipa, size, pa, kprot, 0)
    mem = kw.pool()                      # the pool's bytes now (a TableMemory for the model's walks)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from harness.arch.registers import describe_esr
from harness.kernel import protocol
from harness.kernel.elf import BugEntry, PayloadElf
from harness.kernel.protocol import Build, EventKind, FaultKind, Op, Status
from harness.target.target import Target

U64 = npt.NDArray[np.uint64]


def signed64(value: int) -> int:
    """A u64 register value read as the C ``long`` it carries."""
    return value - (1 << 64) if value >> 63 else value


@dataclass(frozen=True)
class Event:
    """One callback the C code made to its host (:class:`EventKind` and its arguments)."""

    kind: EventKind
    a0: int
    a1: int
    a2: int

    def text(self) -> str:
        k = self.kind
        if k in (EventKind.DCACHE_CLEAN_INVAL_POC, EventKind.ICACHE_INVAL_POU, EventKind.ZALLOC_PAGES_EXACT,
                 EventKind.FREE_PAGES_EXACT):
            return f"{k.name.lower()}({self.a0:#x}, {self.a1:#x})"
        if k in (EventKind.TLBI_VMID_IPA, EventKind.TLBI_VMID_IPA_NSH):
            return f"{k.name.lower()}(ipa={self.a0:#x}, level={signed64(self.a1)}, vmid={self.a2})"
        if k is EventKind.TLBI_VMID_RANGE:
            return f"tlbi_vmid_range(start={self.a0:#x}, pages={self.a1}, vmid={self.a2})"
        if k is EventKind.TLBI_VMID:
            return f"tlbi_vmid(vmid={self.a2})"
        return f"{k.name.lower()}({self.a0:#x}, {self.a1:#x})"


@dataclass(frozen=True)
class Warn:
    """A WARN (or BUG) the C code hit: where, and the source line the bug table names."""

    elr: int
    line: int
    flags: int
    entry: BugEntry | None

    @property
    def location(self) -> str:
        return self.entry.location if self.entry is not None else f"brk at {self.elr:#x} (no bug table entry)"

    @property
    def is_warning(self) -> bool:
        return bool(self.flags & protocol.WARN_FLAG)


@dataclass(frozen=True)
class Fault:
    """The exception that ended an operation."""

    kind: FaultKind
    esr: int
    far: int
    elr: int
    where: str  # the function the ELR is in

    def text(self) -> str:
        return (f"{self.kind.name.lower().replace('_', ' ')} at {self.where} (ELR {self.elr:#x}): "
                f"{describe_esr(self.esr)}, FAR {self.far:#x}")


@dataclass
class OpResult:
    op: Op
    args: tuple[int, ...]
    build: Build
    status: Status
    ret: int  # the C return value (signed)
    ret1: int
    events: list[Event] = field(default_factory=list)
    warns: list[Warn] = field(default_factory=list)
    fault: Fault | None = None
    leaf_level: int = 0
    events_lost: int = 0  # callbacks beyond the host's log (protocol.MAX_EVENTS): not recorded


class KernelWalker:
    """The table operations of the tree's code, on a booted kernel-walker payload."""

    def __init__(self, target: Target, elf: PayloadElf) -> None:
        self.target = target
        self.elf = elf
        self.base = target.layout.kpgt
        self._warns_seen = 0

    # -- the state block ----------------------------------------------------------------------
    def state(self, name: str) -> int:
        return int(struct.unpack_from("<Q", self.target.read_pa(self.base + protocol.STATE.offset(name), 8))[0])

    def state_all(self) -> dict[str, int]:
        raw = self.target.read_pa(self.base, protocol.STATE.size)
        return {name: int(struct.unpack_from("<Q", raw, protocol.STATE.offset(name))[0])
                for name, _ in protocol.STATE.fields}

    @property
    def page_size(self) -> int:
        return self.state("page_size")

    def refcounts(self) -> npt.NDArray[np.uint32]:
        """One reference count per pool page (0: free)."""
        n = self.state("pool_pages")
        raw = self.target.read_pa(self.base + protocol.REFCOUNT_OFFSET, 4 * n)
        return np.frombuffer(raw, dtype="<u4").copy()

    def pool(self, margin_pages: int = 16) -> PoolView:
        """A copy of the pool's bytes now, for the model's walks: up to the highest allocated page
        (the host allocates lowest first), plus ``margin_pages`` (a dangling pointer just past it
        still reads what is there; beyond the copy the walks see no memory)."""
        lay = self.target.layout
        refs = self.refcounts()
        used = np.flatnonzero(refs)
        pages = min(int(used[-1]) + 1 + margin_pages if used.size else margin_pages, refs.size)
        words = pages * self.page_size // 8
        return PoolView(lay.pool_base, np.array(self.target.ram_u64(lay.pool_base, words), copy=True))

    def _events(self, n: int) -> list[Event]:
        """The operation's callbacks (the host starts the log afresh for each operation)."""
        if not n:
            return []
        raw = self.target.read_pa(self.base + protocol.EVENTS_OFFSET, protocol.EVENT.size * n)
        rec = np.frombuffer(raw, dtype=protocol.EVENT.dtype)
        return [Event(EventKind(int(r["kind"])), int(r["a0"]), int(r["a1"]), int(r["a2"])) for r in rec]

    def _new_warns(self) -> list[Warn]:
        n = self.state("warns")
        out: list[Warn] = []
        if n > self._warns_seen:
            raw = self.target.read_pa(self.base + protocol.WARNS_OFFSET + protocol.WARN.size * self._warns_seen,
                                      protocol.WARN.size * (n - self._warns_seen))
            for r in np.frombuffer(raw, dtype=protocol.WARN.dtype):
                elr = int(r["elr"])
                out.append(Warn(elr, int(r["line"]), int(r["flags"]), self.elf.bug_at(elr)))
        self._warns_seen = n
        return out

    def _where(self, addr: int) -> str:
        names = self.elf.symbols_at(addr)
        return names[0] if names else f"{addr:#x}"

    # -- operations -----------------------------------------------------------------------------
    def op(self, op: Op, *args: int, build: Build = Build.NVHE) -> OpResult:
        if len(args) > 6:
            raise ValueError(f"{op.name}: at most 6 arguments, got {len(args)}")
        words = [a & ((1 << 64) - 1) for a in args] + [0] * (6 - len(args))
        ret0 = self.target.request(protocol.CMD_KPGT, int(op), *words, int(build))
        st = self.state_all()
        res = OpResult(op, tuple(args), build, Status(st["status"]), signed64(ret0), self.target._mb("ret1"),
                       self._events(min(st["events"], protocol.MAX_EVENTS)), self._new_warns(),
                       leaf_level=signed64(st["leaf_level"]), events_lost=st["events_lost"])
        if res.status is Status.FAULTED:
            res.fault = Fault(FaultKind(st["fault_kind"]), st["fault_esr"], st["fault_far"], st["fault_elr"],
                              self._where(st["fault_elr"]))
        return res

    def counters(self) -> dict[str, int]:
        st = self.state_all()
        return {k: st[k] for k in ("bad_get", "bad_put", "bad_free", "alloc_fail", "events_lost")}


@dataclass(frozen=True)
class PoolView:
    """Guest RAM's table pool as the model's walks read memory (``TableMemory``)."""

    base: int
    data: U64

    def words(self) -> U64:
        return self.data

    def read64(self, pa: int) -> int:
        return int(self.data[(pa - self.base) >> 3])

    def contains(self, pa: int, length: int = 8) -> bool:
        return self.base <= pa and pa + length <= self.base + 8 * int(self.data.size)

    def used_extent(self) -> int:
        nz = np.flatnonzero(self.data)
        return 0 if nz.size == 0 else int(nz[-1] + 1) * 8

    def describe(self) -> dict[str, Any]:
        return {"base": self.base, "size": 8 * int(self.data.size)}
