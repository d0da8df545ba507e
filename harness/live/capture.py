"""One capture, whatever reads the target: every vCPU's registers and every reachable table page.

``harness attach`` reads a gdbstub through its own gdb (GDB/MI: :mod:`harness.live.gdbstub`);
the ``pgt`` commands read the developer's gdb session through gdb's Python API
(:mod:`harness.gdb.access`). Both hand :func:`capture_from` a :class:`TargetAccess`, the only
part that differs, so the registers read, the regimes derived and the pages captured are the same
code and cannot drift apart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from harness.core.dump import mapped_ranges
from harness.errors import InputError, MachineryError
from harness.live.regimes import (
    ALL_RANGES_REGISTERS,
    GDB_NAMES,
    OPTIONAL_REGISTERS,
    REGISTERS,
    Regime,
    RegimeUse,
    RegisterDecodeError,
    regimes_by_cpu,
    regimes_from_registers,
)
from harness.live.snapshot import NoSuchCpu, Snapshot
from harness.target.physmem import GdbPhysMemory

CAPTURE_PAGE = 4096  # snapshot unit: table pages of any granule are captured as 4K pieces


class UndecodableRegisters(InputError):
    """The live registers describe a regime the decoder refuses (the message has the values)."""


class AttachFailed(MachineryError):
    """gdb or the gdbstub failed while attaching (the message says which step)."""


@dataclass(frozen=True)
class VCpu:
    """A vCPU as QEMU's gdbstub shows it: a gdb thread."""

    cpu: int  # QEMU's CPU index (from the thread's "CPU#N" details; else thread id - 1)
    thread: str  # gdb's thread id
    state: str  # QEMU's thread details, e.g. "CPU#1 [halted ]"


_CPU_INDEX = re.compile(r"CPU#(\d+)")


def vcpu_of_thread(thread: str, details: str) -> VCpu:
    """A gdb thread as a vCPU: QEMU's gdbstub names each ``CPU#N [state]`` (thread N+1)."""
    m = _CPU_INDEX.search(details)
    return VCpu(int(m[1]) if m else int(thread) - 1, thread, details)


class TargetAccess(Protocol):
    """What a capture needs of a connected, stopped target. ``source`` names it (``unix:PATH`` or
    ``HOST:PORT``), ``vm_status`` is QEMU's ``info status`` on connecting (free text)."""

    @property
    def source(self) -> str: ...

    @property
    def vm_status(self) -> str: ...

    def vcpus(self) -> list[VCpu]:
        """Every vCPU, by CPU index."""
        ...

    def register_names(self) -> Iterable[str]:
        """The registers the target describes (gdb's names)."""
        ...

    def read_thread_registers(self, names: list[str], vcpu: VCpu) -> dict[str, int]:
        """These registers of one vCPU, as unsigned values; the debugger's selection unchanged."""
        ...

    def physical_mode(self, on: bool) -> None:
        """Memory reads are physical addresses while on."""
        ...

    def read_memory(self, addr: int, length: int) -> bytes: ...


@dataclass
class Capture:
    """A snapshot and how it was taken: ``uses`` are the distinct regimes with the vCPUs using
    each, ``regimes`` the same regimes alone (in the same order)."""

    snapshot: Snapshot
    uses: list[RegimeUse]
    was_running: bool
    vm_status: str
    vcpus: list[VCpu] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def regimes(self) -> list[Regime]:
        return [u.regime for u in self.uses]


def wanted_registers(available: Iterable[str], all_ranges: bool = False) -> list[str]:
    """The registers a capture reads, by the target's names (:data:`GDB_NAMES`): all of
    :data:`REGISTERS` (AttachFailed names any the target lacks) and those of
    :data:`OPTIONAL_REGISTERS` it has (with ``all_ranges``, :data:`ALL_RANGES_REGISTERS` too)."""
    have = set(available)
    missing = [r for r in REGISTERS if r not in have]
    if missing:
        raise AttachFailed(
            f"the gdbstub does not expose {', '.join(missing)} (QEMU's org.qemu.gdb.arm.sys.regs "
            "feature: qemu-system-aarch64 with an AArch64 CPU)")
    optional = (*OPTIONAL_REGISTERS, *(ALL_RANGES_REGISTERS if all_ranges else ()))
    return [*REGISTERS, *(g for g in (GDB_NAMES.get(r, r) for r in optional) if g in have)]


_ARCH_NAMES = {g: r for r, g in GDB_NAMES.items()}


def arch_names(values: Mapping[str, int]) -> dict[str, int]:
    """Register values keyed by the Arm ARM's names (SCTLR_EL1, not gdb's SCTLR)."""
    return {_ARCH_NAMES.get(k, k): v for k, v in values.items()}


def select_vcpus(access: TargetAccess, cpu: int | None) -> list[VCpu]:
    """Every vCPU, or vCPU ``cpu`` alone (NoSuchCpu lists the others)."""
    vcpus = access.vcpus()
    if cpu is None:
        return vcpus
    chosen = [v for v in vcpus if v.cpu == cpu]
    if not chosen:
        raise NoSuchCpu(f"--cpu: {cpu} is not a vCPU of {access.source} (its vCPUs: "
                        f"{', '.join(str(v.cpu) for v in vcpus)})")
    return chosen


def read_cpus(access: TargetAccess, vcpus: list[VCpu], all_ranges: bool = False) -> dict[int, dict[str, int]]:
    """Each vCPU's control registers, by CPU index."""
    names = wanted_registers(access.register_names(), all_ranges)
    return {v.cpu: arch_names(access.read_thread_registers(names, v)) for v in vcpus}


def regime_uses(cpus: Mapping[int, Mapping[str, int]]) -> list[RegimeUse]:
    """The distinct regimes of these registers; UndecodableRegisters names the CPU and its values."""
    for cpu, regs in sorted(cpus.items()):
        try:
            regimes_from_registers(regs)
        except InputError as exc:
            values = " ".join(f"{k}={v:#x}" for k, v in regs.items())
            more = " (--cpu N attaches to another vCPU alone)" if len(cpus) > 1 else ""
            raise UndecodableRegisters(f"CPU {cpu}: {exc} (registers read: {values}){more}") from exc
    try:
        return regimes_by_cpu(cpus)
    except RegisterDecodeError as exc:  # already checked per CPU: not reached
        raise UndecodableRegisters(str(exc)) from exc


def read_table_pages(access: TargetAccess, uses: list[RegimeUse]) -> dict[int, bytes]:
    """Every table page reachable from the regimes' roots, read physically once each (physical
    mode switched off again however the reads end)."""
    reader = GdbPhysMemory(access, CAPTURE_PAGE)
    access.physical_mode(True)
    try:
        for use in uses:
            mapped_ranges(reader, use.regime.geom, use.regime.root)  # reads every reachable table page
    finally:
        access.physical_mode(False)
    return dict(reader.cache)


def capture_from(access: TargetAccess, cpu: int | None = None, was_running: bool = False,
                 pages: bool = True, all_ranges: bool = False) -> Capture:
    """Snapshot the registers of every vCPU (only CPU ``cpu``, if given) and every table page
    reachable from their regimes (none with ``pages`` False: registers only); ``all_ranges``: the
    kernels' own ranges too (:data:`ALL_RANGES_REGISTERS`). Nothing is written to the target."""
    t1 = time.perf_counter()
    vcpus = select_vcpus(access, cpu)
    cpus = read_cpus(access, vcpus, all_ranges)
    t2 = time.perf_counter()
    uses = regime_uses(cpus)
    tables = read_table_pages(access, uses) if pages else {}
    t3 = time.perf_counter()
    snap = Snapshot(cpus, tables, CAPTURE_PAGE, source=access.source,
                    captured=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    notes={"vm_status": access.vm_status}, cpu_states={v.cpu: v.state for v in vcpus})
    timings = {"registers": t2 - t1, "registers_per_cpu": (t2 - t1) / len(vcpus), "read": t3 - t2}
    return Capture(snap, uses, was_running, access.vm_status, vcpus, timings)
