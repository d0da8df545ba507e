"""Boot a real Linux kernel under QEMU until its KVM hypervisor is up, with a gdbstub to attach to.

    image = KernelImage.find()                      # .cache/kernel (ci/kernel.sh) or $HARNESS_KERNEL
    with KernelBoot(image, mode="protected", cpu="max").start() as k:
        capture(parse_target(str(k.gdb_socket)))

QEMU runs ``-M virt,virtualization=on -cpu CPU [-smp N] -m 1G -nodefaults -display none -serial file:LOG
-no-reboot -kernel vmlinuz -append "console=ttyAMA0 kvm-arm.mode=MODE panic=0"`` with its gdbstub
on a unix socket (``server=on,wait=off``: the VM runs from the start). :meth:`KernelBoot.start`
waits for KVM's banner (``kvm [1]: Hyp nVHE mode initialized successfully``, ``... Protected hVHE
mode initialized successfully``), then for the root-fs panic (``Kernel panic - not syncing``):
protected mode turns the host's stage 2 on only after the banner (pKVM finalisation in a late
initcall), and with ``panic=0`` the kernel then idles forever with every table live. With
``smp=N`` every CPU has run KVM's per-CPU hyp init (and, in protected mode, pKVM's finalisation)
before the banner and the panic: the panicking CPU then loops at EL1 (interrupts on, waiting in
mdelay), the others are parked at EL1 with interrupts masked (``smp_send_stop``).

``mode="vhe"`` passes no ``kvm-arm.mode``: on a CPU with FEAT_VHE the kernel itself runs at EL2
(``kvm [1]: VHE mode initialized successfully``). ``initrd=`` (with ``guest=``) boots an initramfs
instead, e.g. the harness's VMM (:mod:`harness.live.initramfs`, :mod:`harness.live.vmm`), and
:meth:`KernelBoot.start` then waits for its ``ready`` (or ``error``) record, or a panic.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import IO

from harness.errors import InputError
from harness.target import process
from harness.target.errors import QemuExited, TargetTimeout
from harness.target.qemu import check_qemu, qemu_binary

MODES = ("nvhe", "protected", "vhe")
# The command line of each mode: "vhe" is the default on a CPU with FEAT_VHE (-cpu max): no
# kvm-arm.mode, the kernel itself runs at EL2 (HCR_EL2.E2H = 1) and prints "VHE mode ...".
MODE_ARGS = {"nvhe": "kvm-arm.mode=nvhe", "protected": "kvm-arm.mode=protected", "vhe": ""}
BANNER = re.compile(rb"kvm \[\d+\]: (?P<what>[^\n]*?) mode initialized successfully")
# The exact banners Linux 6.12 prints on QEMU -cpu max (with and without lpa2=off).
EXPECTED_BANNER = {"nvhe": "Hyp nVHE", "protected": "Protected hVHE", "vhe": "VHE"}
SETTLED = re.compile(rb"Kernel panic - not syncing")
# With an initrd holding the harness's VMM (harness.live.initramfs): its ready or error record, or a
# panic (an init that died, say).
VMM_SETTLED = re.compile(rb'@@vmm \{"event":"(?:ready|error)"[^\n]*\n|Kernel panic - not syncing[^\n]*\n')
MAX_SMP = 8  # the virt board's GICv2 limit, and plenty for TCG on a small host
REPO_ROOT = Path(__file__).resolve().parents[2]


class NoKvm(InputError):
    """The kernel came up without KVM's banner (no CONFIG_KVM, or not entered at EL2)."""


class KernelImageError(InputError):
    """No usable kernel at the given path (the message names the option or variable)."""


@dataclass(frozen=True)
class KernelImage:
    """An unpacked kernel package: ``boot/vmlinuz-*``, ``boot/System.map-*``, ``boot/config-*``."""

    vmlinuz: Path
    system_map: Path | None
    config: Path | None

    @classmethod
    def find(cls, where: Path | str | None = None, what: str = "kernel") -> KernelImage:
        """``where``: a vmlinuz file, or a directory holding ``boot/vmlinuz-*`` (or ``vmlinuz-*``);
        default ``$HARNESS_KERNEL``, then this tree's ``.cache/kernel`` (``bash ci/kernel.sh``)."""
        path = Path(where or os.environ.get("HARNESS_KERNEL") or REPO_ROOT / ".cache" / "kernel")
        if path.is_file():
            version = path.name.removeprefix("vmlinuz-") if path.name.startswith("vmlinuz-") else None
            boot = path.parent
        elif path.is_dir():
            boot = path / "boot" if (path / "boot").is_dir() else path
            found = sorted(boot.glob("vmlinuz-*"))
            if not found:
                raise KernelImageError(f"{what}: no vmlinuz-* in {boot} (bash ci/kernel.sh fetches "
                                       "Debian's arm64 kernel into .cache/kernel)")
            path = found[-1]
            version = path.name.removeprefix("vmlinuz-")
        else:
            raise KernelImageError(f"{what}: {path} does not exist (expected a vmlinuz file or a "
                                   "directory with boot/vmlinuz-*; bash ci/kernel.sh fetches one)")

        def beside(prefix: str) -> Path | None:
            p = boot / f"{prefix}-{version}" if version else None
            return p if p is not None and p.is_file() else None

        return cls(path, beside("System.map"), beside("config"))

    @cached_property
    def symbols(self) -> dict[str, int]:
        """System.map as name -> address (empty without a real System.map)."""
        out: dict[str, int] = {}
        if self.system_map is None:
            return out
        for line in self.system_map.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3:
                try:
                    out.setdefault(parts[2], int(parts[0], 16))
                except ValueError:
                    continue
        return out

    def image_header(self, n: int = 64) -> bytes:
        """The first bytes of the Image (its arm64 boot header: finds it in guest memory)."""
        with open(self.vmlinuz, "rb") as f:
            return f.read(n)

    def section(self, start: str, end: str) -> tuple[int, int]:
        """``[start, end)`` of two System.map symbols as offsets from ``_text`` (the Image's start)."""
        syms = self.symbols
        missing = [n for n in ("_text", start, end) if n not in syms]
        if missing:
            raise KernelImageError(f"System.map: no symbol {', '.join(missing)} in {self.system_map} "
                                   "(the image package ships a placeholder; ci/kernel.sh takes the real "
                                   "one from the -dbg package)")
        return syms[start] - syms["_text"], syms[end] - syms["_text"]


# Sections of the kernel image the hypervisor runs from (nVHE/hVHE hyp object), as System.map
# names them: [start, end) symbol pairs.
HYP_TEXT = ("__hyp_text_start", "__hyp_text_end")
HYP_IDMAP_TEXT = ("__hyp_idmap_text_start", "__hyp_idmap_text_end")
HYP_RODATA = ("__hyp_rodata_start", "__hyp_rodata_end")
ARM64_IMAGE_MAGIC_OFFSET = 0x38  # "ARM\x64" in the arm64 Image header


def find_image_pa(read_physical: Callable[[int, int], bytes], image: KernelImage,
                  ram_base: int = 0x4000_0000, ram_size: int = 1 << 30, step: int = 2 << 20) -> int | None:
    """The physical address the Image was loaded at: its 64-byte boot header, found in RAM at a
    ``step``-aligned address (the arm64 boot protocol places it 2 MiB-aligned, plus text_offset 0)."""
    header = image.image_header(64)
    if header[ARM64_IMAGE_MAGIC_OFFSET : ARM64_IMAGE_MAGIC_OFFSET + 4] != b"ARM\x64":
        raise KernelImageError(f"{image.vmlinuz}: not an arm64 Image (no 'ARM\\x64' magic at 0x38)")
    for pa in range(ram_base, ram_base + ram_size, step):
        if read_physical(pa, len(header)) == header:
            return pa
    return None


class KernelBoot:
    """One QEMU running a kernel; use :meth:`start` (a context manager), always :meth:`close`."""

    def __init__(self, image: KernelImage, mode: str = "nvhe", cpu: str = "max", memory: str = "1G",
                 append: str = "", log_dir: Path | str | None = None, timeout: float = 60.0,
                 smp: int = 1, initrd: Path | str | None = None, guest: str | None = None,
                 settle: re.Pattern[bytes] | None = None, gdb_socket: Path | str | None = None) -> None:
        """``initrd``: an initramfs (QEMU ``-initrd``; ``rdinit=/init`` is appended), e.g. the VMM's
        (:func:`harness.live.initramfs.vmm_initramfs`); ``guest``: its ``vmm.guest=NAME``. ``settle``:
        what :meth:`start` waits for after the banner (default: the root-fs panic, or with an initrd
        the VMM's ready/error record or a panic, :data:`VMM_SETTLED`). ``gdb_socket``: where QEMU's
        gdbstub listens (a unix socket, removed by :meth:`close`; default: in the run-time directory)."""
        if mode not in MODES:
            raise InputError(f"mode: expected one of {', '.join(MODES)} (kvm-arm.mode), got {mode!r}")
        if guest is not None and (initrd is None or not guest or any(c.isspace() for c in guest)):
            raise InputError(f"guest: expected a word for vmm.guest= and an initrd to run it, got {guest!r}"
                             + ("" if initrd is not None else " without an initrd"))
        if isinstance(smp, bool) or not isinstance(smp, int) or not 1 <= smp <= MAX_SMP:
            raise InputError(f"smp: expected a number of CPUs from 1 to {MAX_SMP} (QEMU -smp), got {smp!r}")
        self.image = image
        self.mode = mode
        self.cpu = cpu
        self.smp = smp
        self.timeout = timeout
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="pgtable-harness-kernel-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log = self.log_dir / "serial.log"
        self.stderr_log = self.log_dir / "qemu.stderr"
        self._rundir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., KernelBoot] | None = None
        self.banner = ""
        self.timings: dict[str, float] = {}
        self._gdb_path = Path(gdb_socket).absolute() if gdb_socket is not None else None
        self.initrd = Path(initrd) if initrd is not None else None
        self.guest = guest
        self.settle = settle or (VMM_SETTLED if initrd is not None else SETTLED)
        self.settled = ""  # what start() saw settle the kernel (the line matched)
        extra = [*(["rdinit=/init"] if initrd is not None else []), *([f"vmm.guest={guest}"] if guest else [])]
        self.args = [
            qemu_binary(), "-M", "virt,virtualization=on", "-cpu", cpu, *(["-smp", str(smp)] if smp > 1 else []),
            "-m", memory,
            "-nodefaults", "-display", "none", "-serial", f"file:{self.serial_log}", "-no-reboot",
            "-kernel", str(image.vmlinuz), *(["-initrd", str(self.initrd)] if self.initrd is not None else []),
            "-append", " ".join(a for a in ("console=ttyAMA0", MODE_ARGS[mode], "panic=0", *extra, append) if a),
        ]

    @property
    def gdb_socket(self) -> Path:
        if self._rundir is None:
            raise InputError("gdb_socket: the kernel is not started")
        return self._gdb_path or self._rundir / "gdb.sock"

    @property
    def cmdline(self) -> str:
        return shlex.join(self.args)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> KernelBoot:
        """Boot, wait for KVM's banner and the root-fs panic; raises TargetTimeout/QemuExited."""
        check_qemu()
        t0 = time.perf_counter()
        self._rundir = _make_rundir()
        sock = self.gdb_socket
        args = [*self.args, "-chardev", f"socket,id=gdb0,path={sock},server=on,wait=off", "-gdb", "chardev:gdb0"]
        self.args = args
        (self.log_dir / "qemu.cmdline").write_text(self.cmdline + "\n")
        self.serial_log.write_bytes(b"")
        with open(self.stderr_log, "wb") as err:
            self._proc = _spawn(args, stdout=err, stderr=err, cwd=self._rundir)
        self._finalizer = weakref.finalize(self, _release, self._proc, self._rundir, self._gdb_path)
        try:
            first = re.compile(BANNER.pattern + b"|" + self.settle.pattern)
            match = self._wait_for(first, "KVM's 'mode initialized successfully' banner")
            if BANNER.fullmatch(match.group(0)) is None:  # settled (init ran, or a panic) with no KVM
                raise NoKvm(f"{self.image.vmlinuz.name} came up without KVM: no 'kvm [1]: ... mode initialized "
                            f"successfully' before {match.group(0).decode('utf-8', 'replace').strip()!r} (a kernel "
                            f"without CONFIG_KVM, or not entered at EL2; console: {self.serial_log}; last lines: "
                            f"{self.console_lines(3)})")
            self.banner = match.group(0).decode()
            self.timings["banner"] = time.perf_counter() - t0
            settled = self._wait_for(self.settle, "the kernel to settle (the root-fs panic after KVM's init)"
                                     if self.settle is SETTLED else f"the kernel to settle ({self.settle.pattern!r})")
            self.settled = settled.group(0).decode("utf-8", "replace")
            self.timings["settled"] = time.perf_counter() - t0
            while not sock.exists():
                self._check_alive()
                time.sleep(0.01)
        except BaseException:
            self.close()
            raise
        return self

    def _check_alive(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise QemuExited(f"QEMU booting {self.image.vmlinuz.name}", code, self.console_tail(),
                             _tail(self.stderr_log))

    def _wait_for(self, pattern: re.Pattern[bytes], what: str) -> re.Match[bytes]:
        deadline = time.monotonic() + self.timeout
        while True:
            m = pattern.search(self.serial_log.read_bytes())
            if m:
                return m
            self._check_alive()
            if time.monotonic() > deadline:
                raise TargetTimeout(what, self.timeout, {"QEMU command": self.cmdline,
                                                          "serial log": str(self.serial_log),
                                                          "serial tail": self.console_tail(800)})
            time.sleep(0.02)

    def console_lines(self, n: int = 3) -> str:
        """The console's last ``n`` non-empty lines, joined with `` | `` (for one-line messages)."""
        return last_lines(self.serial_log, n)

    def poll(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def console_tail(self, limit: int = 4000) -> str:
        return _tail(self.serial_log, limit)

    def close(self) -> None:
        """Kill QEMU and remove the run-time directory (idempotent); the logs stay."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> KernelBoot:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def last_lines(log: Path, n: int = 3) -> str:
    """A console log's last ``n`` non-empty lines, joined with `` | `` (for one-line messages)."""
    lines = [ln.strip() for ln in _tail(log, 4000).splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "(empty)"


def _spawn(args: list[str], stdout: IO[bytes], stderr: IO[bytes], cwd: Path) -> subprocess.Popen[bytes]:
    return process.spawn(args, name="QEMU (kernel)", stdout=stdout, stderr=stderr, cwd=cwd)


def _make_rundir() -> Path:
    return process.make_runtime_dir()


def _release(proc: subprocess.Popen[bytes], rundir: Path, socket: Path | None = None) -> None:
    process.kill(proc)
    process.remove_runtime_dir(rundir)
    if socket is not None:
        with contextlib.suppress(OSError):
            socket.unlink()


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace")
    except OSError:
        return ""


def have_tools() -> bool:
    return shutil.which(qemu_binary()) is not None and shutil.which("gdb-multiarch") is not None
