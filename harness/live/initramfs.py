"""An initramfs whose /init is the harness's own VMM (``firmware/vmm``): a Linux kernel booted with
it runs a real KVM guest (see :mod:`harness.live.vmm` for what the VMM reports).

    path = vmm_initramfs()                          # builds the VMM (cached), writes the archive
    KernelBoot(image, mode="vhe", initrd=path, guest="touch").start()

The archive is the kernel's uncompressed cpio "newc" format (``Documentation/driver-api/
early-userspace/buffer-format.rst``), written here: per entry a 110-byte ASCII header (``070701``
and thirteen 8-digit hex fields), the NUL-terminated name, padding to a multiple of 4, the data,
padding to a multiple of 4; the last entry is ``TRAILER!!!``. It holds ``/init`` (the VMM, mode
0755), the directories ``/dev`` and ``/proc``, and the device nodes ``/dev/console`` (char 5,1) and
``/dev/kvm`` (char 10,232). Everything is deterministic (inode numbers in order, mtime 0), so the
same binary gives the same bytes.

The VMM is a static AArch64 binary with no libc, built with the firmware's cross-compiler
discovery (:func:`harness.target.firmware.choose_toolchain`: ``$CC``, ``${CROSS_COMPILE}gcc``,
clang) into ``$XDG_CACHE_HOME/pgtable-harness/vmm/<toolchain>-<hash>/init``, keyed by the hash of
its sources, the compiler and the flags.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.target import process
from harness.target.firmware import (
    FIRMWARE_DIR,
    FirmwareBuildError,
    Toolchain,
    cache_root,
    choose_toolchain,
    publish,
)

VMM_DIR = FIRMWARE_DIR / "vmm"
VMM_SOURCES = ("start.S", "vmm.c")
VMM_HEADERS = ("sys.h", "guest.h")
VMM_CFLAGS = (
    "-O2", "-ffreestanding", "-fno-builtin", "-fno-stack-protector", "-fno-pic", "-fno-pie",
    "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-march=armv8-a",
    "-Wall", "-Wextra", "-Werror",
)
VMM_LDFLAGS = ("-nostdlib", "-static", "-Wl,--build-id=none")

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFCHR = 0o020000
CONSOLE = (5, 1)
KVM = (10, 232)


@dataclass(frozen=True)
class Entry:
    """One archive member: ``name`` relative to the root (``dev/kvm``), ``mode`` with its file-type
    bits, ``data`` (regular files), ``rdev`` (major, minor) for device nodes."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @property
    def nlink(self) -> int:
        return 2 if self.mode & 0o170000 == S_IFDIR else 1


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, S_IFREG | perm, data)


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> int:
    return -n % 4


def header(entry: Entry, ino: int) -> bytes:
    """The 110-byte newc header of ``entry`` (inode ``ino``; uid, gid, mtime, device 0; no checksum)."""
    name = entry.name.encode() + b"\0"
    fields = (ino, entry.mode, 0, 0, entry.nlink, 0, len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1],
              len(name), 0)
    for value in fields:
        if not 0 <= value <= 0xFFFF_FFFF:
            raise ValueError(f"cpio entry {entry.name!r}: field value {value:#x} does not fit 8 hex digits")
    out = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
    assert len(out) == HEADER_SIZE
    return out


def member(entry: Entry, ino: int) -> bytes:
    """Header, name, padding, data, padding: one entry at a 4-aligned offset stays 4-aligned."""
    if not entry.name or entry.name.startswith("/") or "\0" in entry.name:
        raise ValueError(f"cpio entry name {entry.name!r}: expected a relative path without NUL")
    name = entry.name.encode() + b"\0"
    head = header(entry, ino) + name
    return head + b"\0" * _pad4(len(head)) + entry.data + b"\0" * _pad4(len(entry.data))


def archive(entries: Iterable[Entry]) -> bytes:
    """A complete newc archive of ``entries`` (in order, inodes from 1) and the trailer."""
    out = bytearray()
    for ino, e in enumerate(entries, start=1):
        out += member(e, ino)
    out += member(Entry(TRAILER, 0), 0)
    return bytes(out)


def vmm_entries(init: bytes) -> list[Entry]:
    """What the VMM needs: /init, /dev with the console and KVM nodes, /proc to mount on."""
    return [
        directory("dev"),
        char_device("dev/console", *CONSOLE),
        char_device("dev/kvm", *KVM),
        directory("proc"),
        regular("init", init, 0o755),
    ]


def write_initramfs(path: Path | str, init: bytes) -> Path:
    """Write the VMM's archive (:func:`vmm_entries` of the ``init`` binary) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(archive(vmm_entries(init)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def vmm_cache_root() -> Path:
    return cache_root().parent / "vmm"


def vmm_hash(toolchain: Toolchain) -> str:
    h = hashlib.sha256()
    h.update(toolchain.describe().encode())
    h.update(" ".join((*VMM_CFLAGS, *VMM_LDFLAGS, *toolchain.link_flags)).encode())
    for name in (*VMM_SOURCES, *VMM_HEADERS):
        h.update(name.encode() + b"\0")
        h.update((VMM_DIR / name).read_bytes())
    return h.hexdigest()[:32]


def vmm_command(toolchain: Toolchain, output: str = "init") -> list[str]:
    return [*toolchain.cc, *VMM_CFLAGS, *VMM_LDFLAGS, *toolchain.link_flags, "-o", output, *VMM_SOURCES]


def _run(cmd: Sequence[str], cwd: Path) -> None:
    proc = process.run(list(cmd), name="VMM build", cwd=cwd)
    if proc.returncode:
        raise FirmwareBuildError(f"VMM build failed (exit {proc.returncode}):\n$ {shlex.join(cmd)}\n"
                                 f"{proc.stdout}{proc.stderr}")


def build_vmm(force: bool = False, cc: str | None = None) -> Path:
    """Path of the VMM binary for the current sources, building it if needed (ToolMissing without a
    compiler, FirmwareBuildError with the command and its output when it fails)."""
    toolchain = choose_toolchain(cc)
    final = vmm_cache_root() / f"{toolchain.name}-{vmm_hash(toolchain)}"
    binary = final / "init"
    if binary.exists() and not force:
        return binary
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        for name in (*VMM_SOURCES, *VMM_HEADERS):
            shutil.copy(VMM_DIR / name, work / name)
        _run(vmm_command(toolchain), work)
        (work / "BUILD").write_text(shlex.join(vmm_command(toolchain)) + "\n")
        return publish(work, final, binary, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def vmm_initramfs(path: Path | str | None = None, force: bool = False, cc: str | None = None) -> Path:
    """Build the VMM (cached) and write its initramfs: to ``path``, or beside the binary
    (``initramfs.cpio``, written once per binary)."""
    binary = build_vmm(force=force, cc=cc)
    if path is None:
        path = binary.parent / "initramfs.cpio"
        if path.exists() and not force:
            return path
    return write_initramfs(path, binary.read_bytes())
