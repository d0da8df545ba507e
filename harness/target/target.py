"""The public API: a QEMU target running the harness firmware, driven through gdb/MI and shared RAM.

    with Target.start(timeout=30) as t:
        t.install(stage1_regs(geom, pgd), pool.export())
        par = t.at(addresses, "S1E2R")
        read_par, write_par = t.at_both(addresses, Stage.S1)   # both AT forms, one request per chunk
        rec = t.access(addresses, write=False)
        loads, stores = t.access_both(load_addrs, store_addrs)  # one request
        rec = t.fetch(addresses)            # instruction fetches (plant code first)
        t.install(other_regs, other_image)  # a swap: uninstalls first (in the same request
                                            # unless stage 1 was installed)
        t.uninstall()
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import shutil
import struct
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from harness.arch.geometry import Stage
from harness.arch.registers import Stage1Regs, Stage2Regs, describe_esr
from harness.core.memory import PoolImage
from harness.target import mailbox as mbx
from harness.target import process
from harness.target.errors import (
    FirmwareException,
    GdbLost,
    RequestFailed,
    TargetError,
    TargetTimeout,
    exit_text,
)
from harness.target.firmware import build
from harness.target.gdbmi import GdbError, GdbMI
from harness.target.layout import LAYOUT, Layout
from harness.target.qemu import Qemu

BANNER = r"pgtable-harness firmware: EL2, mailbox 0x[0-9a-f]+, ready"
ACCESS_DTYPE = mbx.ACCESS_RECORD.dtype
ACCESS_RESULT_DTYPE = np.dtype([("status", "<u8"), ("completed", "?"), ("esr", "<u8"), ("far", "<u8"),
                                ("hpfar", "<u8"), ("value", "<u8")])
AccessRecords = npt.NDArray[np.void]
U64Array = npt.NDArray[np.uint64]

MIN_RAM_BACKING = 256 << 20  # the pages a run touches: firmware, probe buffers, table pool
# both forms of a stage (and EL0's, EL2&0 only) in one request
_AT_PAIRS = {(Stage.S1, False): mbx.AtOp.S1E2RW, (Stage.S2, False): mbx.AtOp.S12E1RW,
             (Stage.S1, True): mbx.AtOp.S1E0RW}
_AT_OPS = {op.name: op for op in mbx.AtOp if op not in _AT_PAIRS.values()}


def gdb_binary() -> str:
    return os.environ.get("HARNESS_GDB", "gdb-multiarch")


class _Resources:
    """What must be released even if the Target is never closed (weakref/atexit backstop)."""

    def __init__(self) -> None:
        self.qemu: Qemu | None = None
        self.gdb: GdbMI | None = None
        self.mm: mmap.mmap | None = None
        self.workdir: Path | None = None

    def release(self) -> None:
        """QEMU first (nothing may skip its kill: not gdb's close raising, not a second Ctrl-C,
        which is held until the release is over), then gdb, the mapping, the run-time dir."""
        qemu, gdb, mm, workdir = self.qemu, self.gdb, self.mm, self.workdir
        self.gdb = self.qemu = self.mm = None
        self.workdir = None
        with process.signals_deferred():
            try:
                if qemu is not None:
                    qemu.close()
            finally:
                try:
                    if gdb is not None:
                        gdb.close()
                finally:
                    if mm is not None:
                        with contextlib.suppress(BufferError):  # numpy views alive: the mapping goes with them
                            mm.close()
                    if workdir is not None:
                        process.remove_runtime_dir(workdir)


def _release(res: _Resources) -> None:
    res.release()


class Target:
    """A booted target, idle at the firmware's ``idle`` breakpoint. Use :meth:`start`."""

    def __init__(self, layout: Layout, timeout: float, request_timeout: float, log_dir: Path) -> None:
        if not (timeout > 0 and math.isfinite(timeout) and request_timeout > 0 and math.isfinite(request_timeout)):
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r} / {request_timeout!r}")
        self.layout = layout
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.log_dir = log_dir
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, _release, self._res)
        self._dead: str | None = None
        self._pending: tuple[str, int, int, float] | None = None  # (what, count, result pa, timeout)
        self._installed: Stage | None = None
        self._bp: dict[int, str] = {}
        self._access_requests = 0
        self.keep_logs = True  # start() clears it for a log dir it made itself
        self.elf: Path | None = None
        self.timings: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def start(cls, timeout: float = 30.0, request_timeout: float | None = None, layout: Layout = LAYOUT,
              log_dir: Path | str | None = None, cc: str | None = None,
              qemu_args: tuple[str, ...] = (), elf: Path | None = None) -> Target:
        """Build the firmware if needed, boot QEMU, wait for the banner; returns an idle target.

        ``timeout`` bounds the boot (and each of its gdb commands); ``request_timeout`` (default:
        ``timeout``) bounds every request and every gdb command afterwards. A target that does not
        answer in time raises :class:`TargetTimeout` (a MachineryError). ``elf``: boot this image
        instead of the firmware (one built on the firmware, e.g. :mod:`harness.kernel.payload`'s)."""
        request_timeout = timeout if request_timeout is None else request_timeout
        t0 = time.perf_counter()
        elf = build(cc=cc, layout=layout) if elf is None else elf
        process.require_tool(gdb_binary(), "HARNESS_GDB", "apt-get install gdb-multiarch")
        logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="pgtable-harness-log-"))
        logs.mkdir(parents=True, exist_ok=True)
        t = cls(layout, timeout, request_timeout, logs)
        t.keep_logs = log_dir is not None
        t.elf = elf
        try:
            t._boot(elf, qemu_args)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                t._dead = t._dead or f"start failed: {exc!r}"
            t.close()
            raise
        t.timings["launch"] = time.perf_counter() - t0
        return t

    def _boot(self, elf: Path, qemu_args: tuple[str, ...]) -> None:
        res = self._res
        res.workdir = process.make_runtime_dir()
        free = process.free_bytes(res.workdir)
        if free < MIN_RAM_BACKING:
            raise TargetError(f"only {free >> 20} MiB free in {res.workdir.parent}, which backs guest RAM; "
                              f"need at least {MIN_RAM_BACKING >> 20} MiB (QEMU would die of SIGBUS)")
        res.qemu = Qemu(elf, res.workdir, self.log_dir, self.layout, extra_args=qemu_args)
        res.qemu.wait_sockets(self.timeout)
        with open(res.qemu.ram_path, "r+b") as f:
            res.mm = mmap.mmap(f.fileno(), self.layout.ram_size, mmap.MAP_SHARED)
        res.gdb = GdbMI(gdb_binary(), self.log_dir / "gdb-mi.log", default_timeout=self.timeout)
        g = res.gdb
        remote = max(1, math.ceil(min(self.timeout, self.request_timeout)))
        # print frame-info short-location: no source line (and no look for start.S) at each stop
        for setting in ("pagination off", "confirm off", "mi-async on", "breakpoint pending off",
                        "print frame-info short-location",
                        f"remotetimeout {remote}",
                        *(("debug remote 1",) if os.environ.get("HARNESS_GDB_DEBUG") else ())):
            g.command(f"-gdb-set {setting}")
        g.command(f"-file-exec-and-symbols {elf}")
        g.command(f"-target-select remote {res.qemu.gdb_socket}")
        g.discard_async()
        # One hardware breakpoint: the firmware's panic path stops at idle too (with panic_count
        # set), and each breakpoint costs a Z1 and a z1 packet on every request.
        rec = g.command("-break-insert -h idle")
        self._bp[int(rec["payload"]["bkpt"]["number"])] = "idle"
        # Everything in the run-time dir is open now (RAM mapped by QEMU and here, both sockets
        # connected): remove it, so that not even a SIGKILL of the harness leaves it behind.
        process.remove_runtime_dir(res.workdir)
        self._resume(self.timeout, "the firmware to reach idle after boot")
        res.qemu.expect_console(BANNER, self.timeout)
        g.default_timeout = self.request_timeout
        if self._mb("magic") != mbx.MAGIC or self._mb("boot_el") != 2:
            raise TargetError(f"firmware did not come up: magic {self._mb('magic'):#x}, "
                              f"boot EL {self._mb('boot_el')}\n{res.qemu.console_tail()}")

    def close(self) -> None:
        """Stop QEMU and gdb (SIGKILL to their process groups), remove the run-time dir; remove the
        log dir too if :meth:`start` made it (no ``log_dir``), ``keep_logs`` is false and the
        target did not fail (a dead, hung or panicked target keeps its logs for the error message)."""
        self._finalizer()
        failed = self._dead not in (None, "closed")
        if self._dead is None:
            self._dead = "closed"
        if not self.keep_logs and not failed:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Target:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- introspection ---------------------------------------------------------------------
    @property
    def qemu(self) -> Qemu:
        if self._res.qemu is None:
            raise TargetError(f"target is not running ({self._dead})")
        return self._res.qemu

    @property
    def gdb(self) -> GdbMI:
        if self._res.gdb is None:
            raise TargetError(f"target is not running ({self._dead})")
        return self._res.gdb

    @property
    def alive(self) -> bool:
        return self._dead is None

    @property
    def pids(self) -> dict[str, int]:
        out = {}
        if self._res.qemu:
            out["qemu"] = self._res.qemu.pid
        if self._res.gdb:
            out["gdb"] = self._res.gdb.pid
        return out

    @property
    def qemu_version(self) -> tuple[int, int, int]:
        return self.qemu.version

    @property
    def cmdline(self) -> str:
        return self.qemu.cmdline

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def workdir(self) -> Path | None:
        return self._res.workdir

    # -- memory ----------------------------------------------------------------------------
    @property
    def _mm(self) -> mmap.mmap:
        if self._res.mm is None:
            raise TargetError(f"target is not running ({self._dead})")
        return self._res.mm

    def _ram_offset(self, pa: int, n: int) -> int:
        off = pa - self.layout.ram_base
        if off < 0 or off + n > self.layout.ram_size:
            raise ValueError(f"pa: [{pa:#x}, {pa + n:#x}) is not inside guest RAM")
        return off

    def read_pa(self, pa: int, n: int) -> bytes:
        """Guest RAM through the shared file (memory speed); other PAs through gdb's physical mode."""
        if self.layout.ram_base <= pa and pa + n <= self.layout.ram_end:
            off = self._ram_offset(pa, n)
            return bytes(self._mm[off : off + n])
        self._ensure_idle()
        self.gdb.physical_mode(True)
        try:
            return self.gdb.read_memory(pa, n)
        finally:
            self.gdb.physical_mode(False)

    def write_pa(self, pa: int, data: bytes) -> None:
        off = self._ram_offset(pa, len(data))
        self._mm[off : off + len(data)] = data

    def read_va(self, addr: int, n: int) -> bytes:
        """Memory through the CPU's current regime (gdb; note gdb ignores the access flag)."""
        self._ensure_idle()
        return self.gdb.read_memory(addr, n)

    def ram_u64(self, pa: int, count: int) -> U64Array:
        """A live numpy view of ``count`` u64 words of guest RAM at ``pa``."""
        off = self._ram_offset(pa, count * 8)
        return np.frombuffer(self._mm, dtype="<u8", count=count, offset=off)

    def _mb(self, name: str) -> int:
        return int(struct.unpack_from("<Q", self._mm, self.layout.mailbox - self.layout.ram_base
                                      + mbx.OFFSET[name])[0])

    def _mb_set(self, **values: int) -> None:
        base = self.layout.mailbox - self.layout.ram_base
        for name, value in values.items():
            struct.pack_into("<Q", self._mm, base + mbx.OFFSET[name], value & ((1 << 64) - 1))

    def sysreg(self, name: str) -> int:
        """A register (system registers included, e.g. "TCR_EL2", "SCTLR" for SCTLR_EL1) via gdb."""
        self._ensure_idle()
        return self.gdb.read_registers([name])[name]

    def registers(self, names: list[str]) -> dict[str, int]:
        self._ensure_idle()
        return self.gdb.read_registers(names)

    # -- running ---------------------------------------------------------------------------
    def _check_alive(self) -> None:
        q = self._res.qemu
        if q is not None and q.poll() is not None:
            self._dead = "QEMU exited"
            q.check_alive("QEMU exited while the firmware was running")

    def _resume(self, timeout: float, awaited: str) -> None:
        """Continue and wait for a breakpoint; raise the right error for anything else."""
        self._start_resume()
        self._finish_resume(timeout, awaited)

    def _start_resume(self) -> None:
        self._check_alive()
        try:
            self.gdb.command("-exec-continue")
        except (GdbError, GdbLost) as exc:
            self._check_alive()
            self._dead = f"gdb: {exc}"
            raise GdbLost(f"continuing failed: {exc}") from exc

    def _finish_resume(self, timeout: float, awaited: str) -> None:
        try:
            stop = self.gdb.wait_stopped(timeout, self._check_alive)
        except TargetTimeout:
            evidence = self._interrupt_evidence()
            self._dead = f"timed out waiting for {awaited}"
            raise TargetTimeout(awaited, timeout, evidence, evidence.get("QEMU")) from None
        except GdbLost:
            self._check_alive()
            self._dead = "gdb lost"
            raise
        payload = stop.get("payload") or {}
        bkpt = self._bp.get(int(payload.get("bkptno", -1))) if payload.get("reason") == "breakpoint-hit" else None
        if bkpt == "idle" and self._mb("panic_count") == 0:
            return
        if bkpt == "idle":
            # The firmware parks after its report. (Recovering in place was tried: QEMU 10.0.2 then
            # misses the next hit of the panic breakpoint; a reboot costs ~0.12 s.)
            exc = self._firmware_exception()
            self._dead = "the firmware took an unexpected exception; start a new target"
            raise exc
        self._check_alive()
        self._dead = f"unexpected stop {payload}"
        raise TargetError(f"unexpected stop while waiting for {awaited}: {payload}\n{self.qemu.console_tail()}")

    def _interrupt_evidence(self) -> dict[str, str]:
        """What the CPU was doing when a wait timed out; bounded by ~2 s (less for short timeouts)."""
        evidence: dict[str, str] = {"QEMU command": self.qemu.cmdline, "console log": str(self.console_log)}
        budget = min(2.0, max(0.2, self.request_timeout / 2))
        try:
            if self.qemu.poll() is not None:
                evidence["QEMU"] = f"QEMU {exit_text(self.qemu.poll())}"
                return evidence
            if process.process_state(self.qemu.pid) == "T":
                evidence["QEMU"] = f"QEMU (pid {self.qemu.pid}) is stopped (SIGSTOP or a tracer) and cannot answer"
                return evidence
            self.gdb.command("-exec-interrupt", timeout=budget)
            self.gdb.wait_stopped(budget)
            regs = self.gdb.read_registers(["pc", "cpsr", "ESR_EL2", "FAR_EL2", "ELR_EL2", "SCTLR_EL2"],
                                           timeout=budget)
            evidence.update({k: f"{v:#x}" for k, v in regs.items()})
            evidence["exception level"] = f"EL{(regs['cpsr'] >> 2) & 3}"
            evidence["ESR_EL2 decoded"] = describe_esr(regs["ESR_EL2"])
            evidence["around pc"] = self._disassemble(regs["pc"])
        except Exception as exc:  # evidence is best effort; the timeout is the error
            evidence["evidence collection"] = f"failed: {exc!r}"
        finally:
            self.qemu.drain_console()
        evidence["console tail"] = self.qemu.console_tail(600)
        return evidence

    def _disassemble(self, addr: int, before: int = 4, after: int = 4) -> str:
        start = max(self.layout.ram_base, (addr & ~3) - 4 * before)
        n = 4 * (before + after + 1)
        if not (self.layout.ram_base <= start and start + n <= self.layout.ram_end):
            return f"({addr:#x} is outside guest RAM)"
        import capstone

        md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
        lines = []
        for insn in md.disasm(self.read_pa(start, n), start):
            mark = "=>" if insn.address == addr else "  "
            lines.append(f"{mark} {insn.address:#x}: {insn.mnemonic} {insn.op_str}")
        return "\n".join(lines)

    def _firmware_exception(self) -> FirmwareException:
        self.qemu.drain_console()
        get = self._mb
        vector = get("panic_vector")
        esr = get("panic_esr")
        elr = get("panic_elr")
        extra = {k: get(f"panic_{k}") for k in ("sp", "sctlr", "hcr", "esr_el1", "far_el1", "elr_el1")}
        extra.update({f"x{i}": get(f"panic_x{i}") for i in (0, 1, 19)})
        text = describe_esr(esr)
        if vector == mbx.VECTOR_EL1_FORWARDED:
            text += f"; at EL1: ESR_EL1={extra['esr_el1']:#x} FAR_EL1={extra['far_el1']:#x} " \
                    f"ELR_EL1={extra['elr_el1']:#x}"
        return FirmwareException(
            vector, mbx.VECTOR_NAMES.get(vector, f"vector {vector}"), esr, text, get("panic_far"), elr,
            get("panic_spsr"), get("panic_hpfar"), extra, self._disassemble(elr), self.qemu.console_tail(1500),
        )

    def _ensure_idle(self) -> None:
        if self._dead is not None:
            raise TargetError(f"target is unusable: {self._dead}")
        if self._pending is not None:
            raise TargetError(f"a request is in flight: call {self._pending[0].lower()}_wait() first")

    def _submit(self, cmd: mbx.Cmd, *args: int) -> None:
        self._ensure_idle()
        values = {f"arg{i}": a for i, a in enumerate(args)}
        seq = self._mb("seq") + 1
        self._mb_set(cmd=int(cmd), status=int(mbx.Status.PENDING), seq=seq, **values)
        self._start_resume()

    def _complete(self, cmd: mbx.Cmd, timeout: float) -> int:
        self._finish_resume(timeout, f"the firmware to finish {cmd.name}")
        status = self._mb("status")
        if status != mbx.Status.OK:
            name = mbx.Status(status).name if status in mbx.Status._value2member_map_ else str(status)
            raise RequestFailed(f"{cmd.name}: firmware answered {name}")
        return self._mb("ret0")

    def request(self, cmd: mbx.Cmd, *args: int, timeout: float | None = None) -> int:
        """One mailbox request; returns ``ret0``."""
        self._submit(cmd, *args)
        return self._complete(cmd, self.request_timeout if timeout is None else timeout)

    # -- regimes ---------------------------------------------------------------------------
    def install(self, regs: Stage1Regs | Stage2Regs, image: PoolImage | None = None) -> None:
        """Write the table image into guest RAM, then program the regime. The firmware's install
        first uninstalls whatever was installed (as :meth:`uninstall` does), so a swap is one
        request, except after a stage-1 install with a new image: the firmware's own code, stack
        and mailbox are translated by the live stage 1 until the request turns it off, and QEMU
        walks its tables again after the stop at ``idle`` (measured: an S2 image written over a
        live S1 table made the return from ``idle`` take an instruction abort), so the old
        regime is uninstalled (a separate request) before the new image is written."""
        t0 = time.perf_counter()
        self.install_start(regs, image)
        self.install_wait()
        self.timings["install"] = time.perf_counter() - t0

    def install_start(self, regs: Stage1Regs | Stage2Regs, image: PoolImage | None = None) -> None:
        """:meth:`install` up to the request in flight (the host may work meanwhile);
        :meth:`install_wait` finishes it."""
        if self._installed is Stage.S1 and image is not None:
            self.uninstall()
        if image is not None:
            end = image.base + len(image.data)
            for r in self.layout.firmware_regions():
                if r.name != "pool" and image.base < r.end and r.base < end:
                    raise ValueError(f"image: [{image.base:#x}, {end:#x}) overlaps the firmware's {r}")
            self.write_pa(image.base, image.data)
        if isinstance(regs, Stage1Regs):
            self._submit(mbx.Cmd.INSTALL_S1, regs.mair_el2, regs.tcr_el2, regs.ttbr0_el2, regs.sctlr_el2_set,
                         regs.hcr_el2_set, regs.ttbr1_el2)
            self._pending = ("INSTALL", int(Stage.S1), 0, time.monotonic())
        else:
            self._submit(mbx.Cmd.INSTALL_S2, regs.vtcr_el2, regs.vttbr_el2, regs.hcr_el2_set)
            self._pending = ("INSTALL", int(Stage.S2), 0, time.monotonic())

    def install_wait(self) -> None:
        if self._pending is None or self._pending[0] != "INSTALL":
            raise TargetError("install_wait: no install in flight")
        stage = Stage(self._pending[1])
        self._pending = None
        self._installed = None  # until the firmware says it is done (it uninstalled first)
        self._complete(mbx.Cmd.INSTALL_S1 if stage is Stage.S1 else mbx.Cmd.INSTALL_S2, self.request_timeout)
        self._installed = stage

    def uninstall(self) -> None:
        """Stage 1 off, HCR_EL2.E2H off, stage 2 off, TLBs invalidated (safe to call at any time)."""
        self.request(mbx.Cmd.UNINSTALL)
        self._installed = None

    @property
    def installed(self) -> Stage | None:
        return self._installed

    # -- probes ----------------------------------------------------------------------------
    @staticmethod
    def _check_count(n: int, limit: int) -> None:
        if n > limit:
            raise ValueError(f"addresses: at most {limit} per request, got {n}")

    def _put_addresses(self, addresses: npt.ArrayLike, limit: int) -> U64Array:
        addrs = np.ascontiguousarray(addresses, dtype=np.uint64).reshape(-1)
        self._check_count(int(addrs.size), limit)
        view = self.ram_u64(self.layout.probe_addrs, addrs.size)
        view[:] = addrs
        del view
        return addrs

    def at_start(self, addresses: npt.ArrayLike, op: str | mbx.AtOp) -> None:
        """Start an AT probe of up to ``layout.max_at`` addresses; :meth:`at_wait` gets PAR_EL1s."""
        at_op = op if isinstance(op, mbx.AtOp) else _AT_OPS.get(str(op).upper())
        if at_op is None:
            raise ValueError(f"op: expected one of {', '.join(_AT_OPS)}, got {op!r}")
        addrs = self._put_addresses(addresses, self.layout.max_at)
        n = int(addrs.size)
        self._submit(mbx.Cmd.AT, int(at_op), n, self.layout.probe_addrs, self.layout.probe_results)
        self._pending = ("AT", n, self.layout.probe_results, time.monotonic())

    def at_start_both(self, reads: npt.ArrayLike, writes: npt.ArrayLike, stage: Stage | int,
                      uninstall: bool = False, el0: bool = False) -> None:
        """Start one request running both AT forms of ``stage``: the read form (S1E2R, S12E1R;
        with ``el0`` EL0's S1E0R, in the EL2&0 regime only) over ``reads``, then the write form
        (S1E2W, S12E1W, S1E0W) over ``writes`` (at most ``layout.max_at`` addresses in all);
        :meth:`at_wait` returns the read forms' PAR_EL1s followed by the write forms'.
        ``uninstall``: the same request then uninstalls (as :meth:`uninstall`), for a table's last
        probes."""
        st = Stage(int(stage))
        if (st, el0) not in _AT_PAIRS:
            raise ValueError("el0: EL0's AT forms (S1E0R/W) are stage-1 forms (the EL2&0 regime)")
        r = np.ascontiguousarray(reads, dtype=np.uint64).reshape(-1)
        w = np.ascontiguousarray(writes, dtype=np.uint64).reshape(-1)
        n = int(r.size + w.size)
        self._check_count(n, self.layout.max_at)
        view = self.ram_u64(self.layout.probe_addrs, n)  # both parts straight into guest RAM
        view[: r.size] = r
        view[r.size :] = w
        del view
        self._submit(mbx.Cmd.AT, int(_AT_PAIRS[st, el0]), int(r.size), self.layout.probe_addrs,
                     self.layout.probe_results, int(w.size), int(uninstall))
        self._pending = ("AT", n, self.layout.probe_results, time.monotonic())
        if uninstall:
            self._installed = None

    def at_both(self, addresses: npt.ArrayLike, stage: Stage | int, el0: bool = False) -> tuple[U64Array, U64Array]:
        """PAR_EL1 after the read and the write AT form of ``stage`` (``el0``: EL0's, S1E0R/W)
        for each address (any count), both forms in each request: ``(read PARs, write PARs)``."""
        addrs = np.ascontiguousarray(addresses, dtype=np.uint64).reshape(-1)
        out = np.empty((2, addrs.size), dtype=np.uint64)
        step = self.layout.max_at // 2
        for i in range(0, addrs.size, step):
            chunk = addrs[i : i + step]
            self.at_start_both(chunk, chunk, stage, el0=el0)
            pars = self.at_wait()
            out[0, i : i + chunk.size] = pars[: chunk.size]
            out[1, i : i + chunk.size] = pars[chunk.size :]
        return out[0], out[1]

    def at_wait(self) -> U64Array:
        if self._pending is None or self._pending[0] != "AT":
            raise TargetError("at_wait: no AT request in flight")
        _, n, res, _ = self._pending
        self._pending = None
        self._complete(mbx.Cmd.AT, self.request_timeout)
        return np.array(self.ram_u64(res, n), copy=True)

    def at(self, addresses: npt.ArrayLike, op: str | mbx.AtOp) -> U64Array:
        """PAR_EL1 after ``AT <op>`` for each address (any count: split into requests)."""
        addrs = np.ascontiguousarray(addresses, dtype=np.uint64).reshape(-1)
        out = np.empty(addrs.size, dtype=np.uint64)
        step = self.layout.max_at
        for i in range(0, max(addrs.size, 1), step):
            chunk = addrs[i : i + step]
            if chunk.size == 0:
                break
            self.at_start(chunk, op)
            out[i : i + chunk.size] = self.at_wait()
        return out

    def access(self, addresses: npt.ArrayLike, write: bool, stage: Stage | int | None = None,
               values: npt.ArrayLike | None = None, el0: bool = False) -> AccessRecords:
        """Real 64-bit loads (``ldr``) or stores (``str``), one per address, that prove where they land.

        Each probe accesses the naturally aligned 64-bit word holding its address (``addr & ~7``;
        FAR reports that address). A store writes ``values[i]`` (default: :func:`mailbox.store_tokens`,
        unique per request and probe), so the host can look for it at the expected PA
        (:meth:`read_pa`, :meth:`ram_u64`); a load returns what it read, so a value planted at the
        expected PA (:meth:`write_pa`) shows whether it read there. Stage 1 runs at EL2 on its stage 1
        (the EL2 or EL2&0 regime installed); stage 2 runs from the EL1 stub through stage 2. The
        default is the installed regime (stage 1 when none). Returns records with fields ``status``
        (:class:`AccessStatus`), ``completed``, ``esr``, ``far``, ``hpfar`` and ``value`` (the value
        loaded, 0 when the load faulted; or the value the store carried). ``el0``: EL0's loads
        and stores (``ldtr``/``sttr``, unprivileged) in the installed EL2&0 regime, stage 1 only.
        """
        st = self._access_at(stage, el0)
        addrs = np.ascontiguousarray(addresses, dtype=np.uint64).reshape(-1) & ~np.uint64(7)
        if values is None:
            self._access_requests += 1
            vals = mbx.store_tokens(self._access_requests, addrs.size) if write else np.zeros_like(addrs)
        else:
            vals = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
            if vals.shape != addrs.shape:
                raise ValueError(f"values: expected {addrs.size} values (one per address), got {vals.size}")
        out = np.zeros(addrs.size, dtype=ACCESS_RESULT_DTYPE)
        step = self.layout.max_access
        values_pa = self.layout.probe_values
        for i in range(0, addrs.size, step):
            chunk = self._put_addresses(addrs[i : i + step], step)
            n = int(chunk.size)
            vview = self.ram_u64(values_pa, n)
            vview[:] = vals[i : i + n]
            del vview
            self.request(mbx.Cmd.ACCESS, int(write), st, n, self.layout.probe_addrs, self.layout.probe_results,
                         values_pa)
            self._read_records(out[i : i + n])
        out["completed"] = out["status"] == mbx.AccessStatus.COMPLETED
        return out

    def access_both(self, loads: npt.ArrayLike, stores: npt.ArrayLike,
                    stage: Stage | int | None = None, el0: bool = False) -> tuple[AccessRecords, AccessRecords]:
        """Loads at ``loads``, then stores at ``stores``, as :meth:`access` would make them (the
        stores carry the default :func:`mailbox.store_tokens`, the same as a load request then a
        store request), in one request where both fit (``layout.max_access`` in all; else two).
        Returns ``(load records, store records)``."""
        st = self._access_at(stage, el0)
        la = np.ascontiguousarray(loads, dtype=np.uint64).reshape(-1) & ~np.uint64(7)
        sa = np.ascontiguousarray(stores, dtype=np.uint64).reshape(-1) & ~np.uint64(7)
        n1, n2 = int(la.size), int(sa.size)
        if n1 + n2 > self.layout.max_access or not n1 or not n2:
            return self.access(la, False, stage, el0=el0), self.access(sa, True, stage, el0=el0)
        self._access_requests += 2  # as a load request, then a store request
        vals = np.concatenate([np.zeros(n1, dtype=np.uint64), mbx.store_tokens(self._access_requests, n2)])
        self._put_addresses(np.concatenate([la, sa]), self.layout.max_access)
        vview = self.ram_u64(self.layout.probe_values, n1 + n2)
        vview[:] = vals
        del vview
        self.request(mbx.Cmd.ACCESS, 2, st, n1, self.layout.probe_addrs, self.layout.probe_results,
                     self.layout.probe_values, n2)
        out = np.zeros(n1 + n2, dtype=ACCESS_RESULT_DTYPE)
        self._read_records(out)
        out["completed"] = out["status"] == mbx.AccessStatus.COMPLETED
        return out[:n1], out[n1:]

    def _access_at(self, stage: Stage | int | None, el0: bool) -> int:
        """The ACCESS request's arg1: the stage (default: the installed one, else 1), or
        :data:`mailbox.ACCESS_AT_EL0` for EL0's accesses (stage 1 only)."""
        st = int(stage) if stage is not None else int(self._installed or Stage.S1)
        if el0 and st != Stage.S1:
            raise ValueError("el0: EL0's accesses go through a stage 1 (the EL2&0 regime)")
        return mbx.ACCESS_AT_EL0 if el0 else st

    def _read_records(self, out: AccessRecords) -> None:
        """Copy the firmware's access records (the first ``len(out)`` in the result buffer) into
        ``out``'s fields of the same names (``completed`` is derived by the callers)."""
        n = len(out)
        off = self._ram_offset(self.layout.probe_results, n * mbx.ACCESS_RECORD_SIZE)
        view = np.frombuffer(self._mm, dtype=ACCESS_DTYPE, count=n, offset=off)
        for name in ACCESS_DTYPE.names or ():
            if name in (out.dtype.names or ()):
                out[name] = view[name]
        del view

    def fetch(self, addresses: npt.ArrayLike, stage: Stage | int | None = None, el0: bool = False) -> AccessRecords:
        """Instruction-fetch probes: the firmware branches (``blr``) to each address and expects
        the code there to return.

        Plant the code first at each expected PA (:meth:`write_pa`, :meth:`ram_u64`):
        :func:`mailbox.fetch_stub` (``bti c; movz x0, #tag; ret``, 16 bytes) makes the record's
        ``value`` the tag, so the host can tell which PA ran; a bare ``ret``
        (:data:`mailbox.A64_RET`) returns the address itself (on a guarded page, GP = 1, code
        without a ``bti`` landing pad takes a Branch Target exception, EC 0x0D: recorded).
        Addresses are taken 4-byte aligned (``addr & ~3``). Stage 1
        runs at EL2 on the installed stage 1 (EL2 or EL2&0 regime: an instruction abort is EC 0x21);
        stage 2 branches from the EL1 stub with EL1's MMU off (a stage-2 instruction abort is EC
        0x20 with HPFAR_EL2). The firmware runs ``ic iallu`` first. Returns records like
        :meth:`access`: ``status`` (:class:`AccessStatus`: COMPLETED, FAULT, or EL1_EXCEPTION when
        the code at a stage-2 target raised an exception at EL1, ESR_EL1/FAR_EL1 in ``esr``/``far``),
        ``completed``, ``esr``, ``far``, ``hpfar`` and ``value`` (x0 after the return, 0 on a fault).
        ``el0``: the branch is made at EL0 of the installed EL2&0 regime (HCR_EL2.TGE = 1 while it
        runs): an instruction abort is EC 0x20 (from a lower EL), any other exception the code
        raises at EL0 is taken to EL2 and recorded as a FAULT with its ESR_EL2.
        """
        st = int(stage) if stage is not None else int(self._installed or Stage.S1)
        if st not in (1, 2):
            raise ValueError(f"stage: expected 1 or 2, got {stage!r}")
        st = self._access_at(st, el0)
        addrs = np.ascontiguousarray(addresses, dtype=np.uint64).reshape(-1) & ~np.uint64(3)
        out = np.zeros(addrs.size, dtype=ACCESS_RESULT_DTYPE)
        step = min(self.layout.max_at, self.layout.probe_results_size // mbx.ACCESS_RECORD_SIZE)
        for i in range(0, addrs.size, step):
            chunk = self._put_addresses(addrs[i : i + step], step)
            n = int(chunk.size)
            self.request(mbx.Cmd.FETCH, st, n, self.layout.probe_addrs, self.layout.probe_results)
            self._read_records(out[i : i + n])
        out["completed"] = out["status"] == mbx.AccessStatus.COMPLETED
        return out

    def live(self, steps: npt.ArrayLike) -> int:
        """Run a live table update: ``steps`` is an array of :data:`mailbox.LIVE_STEP` records
        (``insn``, ``a0``, ``a1``; :class:`harness.arch.tlbi.Insn`), executed in order on the
        installed regime in one request (a longer list in several, in order). Returns the steps run."""
        recs = np.ascontiguousarray(steps, dtype=mbx.LIVE_STEP.dtype).reshape(-1)
        per = self.layout.probe_addrs_size // mbx.LIVE_STEP.size
        done = 0
        for i in range(0, recs.size, per):
            chunk = recs[i : i + per]
            words = chunk.view(np.uint64)
            view = self.ram_u64(self.layout.probe_addrs, words.size)
            view[:] = words
            del view
            done += self.request(mbx.Cmd.LIVE, int(chunk.size), self.layout.probe_addrs)
        return done

    @property
    def at_exceptions(self) -> int:
        """How many AT probes took an exception since boot (the mailbox counter)."""
        return self._mb("at_exceptions")

    def request_nop(self) -> None:
        """A NOP request: one full continue / breakpoint round trip."""
        self.request(mbx.Cmd.NOP)

    def spin(self, timeout: float) -> None:
        """Ask the firmware to loop forever (tests the timeout path); raises TargetTimeout."""
        self.request(mbx.Cmd.SPIN, timeout=timeout)

    def describe(self) -> dict[str, Any]:
        return {"qemu": self.cmdline, "console_log": str(self.console_log), "log_dir": str(self.log_dir)}
