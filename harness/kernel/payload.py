"""Link a tree's ``pgtable.c`` objects into the harness firmware: the kernel-walker payload.

The payload is the firmware (``firmware/start.S``, ``main.c``: the request loop, the regimes,
the probes), the host of ours around the kernel code (``firmware/kpgt/host.c``, compiled with
the tree's own command line for the nVHE object, so the tree's structs apply; ``trap.S``), the
tree's nVHE object and its kernel-proper object, whose defined functions are renamed ``kp_*``
(both define the same API). The linked image is then patched for one CPU-capability set
(:mod:`harness.kernel.elf`): one image per configuration, booted as the firmware is.

Everything is cached beside the tree's build (``BuiltObjects.build_dir``), keyed by the hash of
the inputs: the objects, the host sources, the generated headers and the API defines.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness.kernel import protocol
from harness.kernel.build import BuiltObjects, TreeBuildError, compile_c
from harness.target import firmware, process
from harness.target.layout import LAYOUT, Layout

HOST_DIR = firmware.FIRMWARE_DIR / "kpgt"
HOST_SOURCES = ("host.c", "trap.S")
KP_PREFIX = "kp_"
STDINT_SHIM = "/* GENERATED: the kernel's own types stand in for <stdint.h> (-nostdinc) */\n#include <linux/types.h>\n"


@dataclass(frozen=True)
class LinkedPayload:
    """A linked, unpatched payload and what it was made of."""

    elf: Path
    objects: BuiltObjects
    defines: tuple[str, ...]


def _binutil(name: str) -> str:
    prefix = os.environ.get("CROSS_COMPILE", "aarch64-linux-gnu-")
    tool = shutil.which(prefix + name) or shutil.which(f"llvm-{name}")
    if tool is None:
        from harness.target.errors import ToolMissing

        raise ToolMissing(f"{prefix}{name} is not on PATH (apt-get install binutils-aarch64-linux-gnu)")
    return tool


def _run(cmd: list[str], cwd: Path, log: Path) -> str:
    proc = process.run(cmd, name="payload link", cwd=cwd)
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode:
        first = next((ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()),
                     (proc.stderr + proc.stdout).strip().splitlines()[:1] or [f"exit {proc.returncode}"])
        line = first if isinstance(first, str) else first[0]
        raise TreeBuildError(f"linking the kernel-walker payload failed: {line} (log: {log})")
    return proc.stdout


def defined_globals(obj: Path) -> list[str]:
    """The global symbols an object defines (``nm --defined-only -g``)."""
    out = process.run([_binutil("nm"), "--defined-only", "-g", str(obj)], name="nm", check=True).stdout
    return sorted({ln.split()[-1] for ln in out.splitlines() if ln.strip()})


def undefined_symbols(obj: Path) -> set[str]:
    """The symbols an object needs from elsewhere (``nm -u``)."""
    out = process.run([_binutil("nm"), "-u", str(obj)], name="nm", check=True).stdout
    return {ln.split()[-1] for ln in out.splitlines() if ln.strip()}


def _generated(layout: Layout) -> dict[str, str]:
    return {**firmware.generated_files(layout), "gen/kpgt.h": protocol.c_header(), "gen/shim/stdint.h": STDINT_SHIM}


def _digest(objs: BuiltObjects, defines: Iterable[str], layout: Layout, toolchain: firmware.Toolchain) -> str:
    h = hashlib.sha256()
    for path in (objs.nvhe_obj, objs.kernel_obj):
        h.update(path.read_bytes())
    h.update(shlex.join(objs.nvhe_cmd).encode())
    h.update(toolchain.describe().encode())
    h.update(" ".join(defines).encode())
    for name in firmware.SOURCES:
        h.update((firmware.FIRMWARE_DIR / name).read_bytes())
    for name in HOST_SOURCES:
        h.update((HOST_DIR / name).read_bytes())
    for name, text in sorted(_generated(layout).items()):
        h.update(name.encode() + text.encode())
    return h.hexdigest()[:24]


def link(objs: BuiltObjects, defines: Iterable[str], layout: Layout = LAYOUT) -> LinkedPayload:
    """The linked payload for these objects (cached; relinked when any input changed)."""
    defs = tuple(defines)
    toolchain = firmware.choose_toolchain(None)
    digest = _digest(objs, defs, layout, toolchain)
    final = objs.build_dir / "harness-payload" / digest
    elf = final / "payload.elf"
    if elf.exists():
        return LinkedPayload(elf, objs, defs)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".link-", dir=final.parent))
    log = work / "link.log"
    try:
        for name, text in _generated(layout).items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        fw_objs = []
        for name in firmware.SOURCES:
            obj = work / (name.rsplit(".", 1)[0] + ".o")
            _run([*toolchain.cc, *firmware.CFLAGS, "-I", str(work), "-c", str(firmware.FIRMWARE_DIR / name),
                  "-o", str(obj)], work, log)
            fw_objs.append(obj)
        trap = work / "trap.o"
        _run([*toolchain.cc, *firmware.CFLAGS, "-I", str(work), "-c", str(HOST_DIR / "trap.S"), "-o", str(trap)],
             work, log)
        host = work / "host.o"
        needs_hwcaps = "cpu_hwcaps" in undefined_symbols(objs.kernel_obj)
        compile_c(objs, "nvhe", HOST_DIR / "host.c", host,
                  ["-I", str(work), "-I", str(work / "gen" / "shim"), *defs,
                   f"-DKPGT_NEEDS_CPU_HWCAPS={int(needs_hwcaps)}"])
        kp = work / "pgtable.kp.o"
        syms = work / "kp.syms"
        syms.write_text("".join(f"{s} {KP_PREFIX}{s}\n" for s in defined_globals(objs.kernel_obj)))
        _run([_binutil("objcopy"), f"--redefine-syms={syms}", str(objs.kernel_obj), str(kp)], work, log)
        out = work / "payload.elf"
        _run([*toolchain.cc, *firmware.CFLAGS, *firmware.LDFLAGS, *toolchain.link_flags, "-T",
              str(work / "gen" / "link.ld"), "-Wl,--build-id=none", "-o", str(out),
              *map(str, fw_objs), str(trap), str(host), str(objs.nvhe_obj), str(kp)], work, log)
        try:
            os.rename(work, final)
        except OSError:
            if not elf.exists():
                raise
        return LinkedPayload(elf, objs, defs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
