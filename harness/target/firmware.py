"""Build the firmware on demand into a cache keyed by the hash of everything that goes in.

    python -m harness.target.firmware [--force] [--cc CC]

The compiler is ``$CC`` if set, else ``${CROSS_COMPILE}gcc`` (``CROSS_COMPILE`` defaults to
``aarch64-linux-gnu-``), else clang with ld.lld. The C headers and the linker script are generated
from :mod:`harness.arch` (``gen/arch.h``), :mod:`harness.target.mailbox` and
:mod:`harness.target.layout`; they, the sources, the compiler
command and the flags are hashed. The result lands in
``$XDG_CACHE_HOME/pgtable-harness/firmware/<hash>/payload.elf`` (``~/.cache`` by default), built
in a private temp dir and renamed into place, so parallel builders never see a half-written file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.arch import el2, registers
from harness.arch.bits import Field
from harness.target import mailbox, process
from harness.target.errors import ToolMissing
from harness.target.layout import LAYOUT, Layout

FIRMWARE_DIR = Path(os.environ.get("HARNESS_FIRMWARE_DIR", Path(__file__).resolve().parents[2] / "firmware"))
SOURCES = ("start.S", "main.c")
LDFLAGS = ("-nostdlib", "-static")  # link step only (clang warns on them otherwise)
CFLAGS = (
    "-ffreestanding", "-fno-pic", "-fno-pie",
    "-mgeneral-regs-only", "-mstrict-align", "-fno-stack-protector", "-fno-builtin",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-O2", "-g", "-Wall", "-Wextra", "-Werror",
    "-march=armv8-a",
)


class FirmwareBuildError(RuntimeError):
    """The compiler or linker failed; the message carries the command and its output."""


@dataclass(frozen=True)
class Toolchain:
    name: str  # "gcc" or "clang"
    cc: list[str]
    link_flags: list[str]

    def describe(self) -> str:
        return " ".join(self.cc)


def _gcc_toolchain(cc: str) -> Toolchain:
    return Toolchain("gcc", shlex.split(cc), ["-nostartfiles", "-no-pie"])


def _clang_toolchain(cc: str = "clang") -> Toolchain:
    return Toolchain("clang", [*shlex.split(cc), "--target=aarch64-none-elf"], ["-fuse-ld=lld"])


def available_toolchains() -> list[Toolchain]:
    """Every toolchain found on PATH (gcc cross compiler first)."""
    found: list[Toolchain] = []
    prefix = os.environ.get("CROSS_COMPILE", "aarch64-linux-gnu-")
    if shutil.which(prefix + "gcc"):
        found.append(_gcc_toolchain(prefix + "gcc"))
    if shutil.which("clang") and shutil.which("ld.lld"):
        found.append(_clang_toolchain())
    return found


def choose_toolchain(cc: str | None = None) -> Toolchain:
    cc = cc or os.environ.get("CC")
    if cc:
        if not shutil.which(shlex.split(cc)[0]):
            raise ToolMissing(f"compiler {cc!r} (from CC or --cc) is not on PATH")
        return _clang_toolchain(cc) if "clang" in Path(shlex.split(cc)[0]).name else _gcc_toolchain(cc)
    found = available_toolchains()
    if not found:
        raise ToolMissing(
            "no AArch64 compiler: install gcc-aarch64-linux-gnu (bash ci/setup.sh), or clang and lld, "
            "or set CC / CROSS_COMPILE"
        )
    return found[0]


def _field_defines(name: str, field: Field) -> list[str]:
    return [f"#define {name} {field.mask:#x}", f"#define {name}_SHIFT {field.lo}",
            f"#define {name}_WIDTH {field.width}"]


def arch_header() -> str:
    """The firmware's ``arch.h`` for C and assembly, generated from :mod:`harness.arch` (plain
    integer literals: valid in both)."""
    fields = {
        "SCTLR_M": registers.SCTLR_M, "SCTLR_C": registers.SCTLR_C, "SCTLR_I": registers.SCTLR_I,
        "SCTLR_WXN": registers.SCTLR_WXN,
        "HCR_VM": registers.HCR_VM, "HCR_DC": registers.HCR_DC, "HCR_RW": registers.HCR_RW,
        "HCR_E2H": registers.HCR_E2H, "HCR_TGE": registers.HCR_TGE,
        "PAR_F": registers.PAR_F, "ESR_EC": registers.ESR_EC, "ESR_ISS": registers.ESR_ISS, "ISS_IMM16": el2.ISS_IMM16,
        "CURRENTEL_EL": el2.CURRENTEL_EL,
    }
    out = ["/* GENERATED from harness/arch: do not edit. */", "#ifndef HARNESS_ARCH_H", "#define HARNESS_ARCH_H"]
    for name, field in fields.items():
        out += _field_defines(name, field)
    out += [f"#define EC_{ec.name} {ec.value:#x}" for ec in registers.ExceptionClass]
    out += [f"#define VEC_{v.name} {v.value}" for v in el2.Vector]
    out += [f"#define VECTOR_ENTRY_SIZE {el2.VECTOR_ENTRY_SIZE:#x}",
            f"#define VECTOR_TABLE_ALIGN {el2.VECTOR_TABLE_ALIGN:#x}",
            f"#define SPSR_EL1H_MASKED {el2.spsr_el1h_masked():#x}",
            f"#define SPSR_EL0T_MASKED {el2.spsr_el0t_masked():#x}",
            f"#define SCTLR_EL1_RES1 {el2.SCTLR_EL1_RES1:#x}", "#endif", ""]
    return "\n".join(out)


def generated_files(layout: Layout = LAYOUT) -> dict[str, str]:
    consts = "\n".join(f"#define {k} {v:#x}" for k, v in layout.constants().items())
    header = (
        "/* GENERATED from harness/target/layout.py: do not edit. */\n"
        f"#ifndef HARNESS_LAYOUT_H\n#define HARNESS_LAYOUT_H\n{consts}\n#endif\n"
    )
    return {"gen/layout.h": header, "gen/arch.h": arch_header(), "gen/mailbox.h": mailbox.c_header(),
            "gen/link.ld": layout.linker_script()}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pgtable-harness" / "firmware"


def source_hash(toolchain: Toolchain, layout: Layout = LAYOUT) -> str:
    h = hashlib.sha256()
    h.update(toolchain.describe().encode())
    h.update(" ".join((*CFLAGS, *LDFLAGS, *toolchain.link_flags)).encode())
    for name in SOURCES:
        h.update(name.encode())
        h.update((FIRMWARE_DIR / name).read_bytes())
    for name, text in sorted(generated_files(layout).items()):
        h.update(name.encode())
        h.update(text.encode())
    return h.hexdigest()[:32]


def _run(cmd: list[str], cwd: Path) -> None:
    proc = process.run(cmd, name="firmware build", cwd=cwd)
    if proc.returncode:
        raise FirmwareBuildError(
            f"firmware build failed (exit {proc.returncode}):\n$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}"
        )


def build(force: bool = False, cc: str | None = None, layout: Layout = LAYOUT) -> Path:
    """Path of ``payload.elf`` for the current sources, building it if needed."""
    toolchain = choose_toolchain(cc)
    digest = source_hash(toolchain, layout)
    final = cache_root() / f"{toolchain.name}-{digest}"
    elf = final / "payload.elf"
    if elf.exists() and not force:
        return elf
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        for name in SOURCES:
            shutil.copy(FIRMWARE_DIR / name, work / name)
        (work / "gen").mkdir()
        for name, text in generated_files(layout).items():
            (work / name).write_text(text)
        objs = []
        for name in SOURCES:
            obj = name.rsplit(".", 1)[0] + ".o"
            _run([*toolchain.cc, *CFLAGS, "-I", ".", "-c", name, "-o", obj], work)
            objs.append(obj)
        _run([*toolchain.cc, *CFLAGS, *LDFLAGS, *toolchain.link_flags, "-T", "gen/link.ld", "-Wl,--build-id=none",
              "-o", "payload.elf", *objs], work)
        (work / "BUILD").write_text(f"{toolchain.describe()}\n{' '.join(CFLAGS)}\n")
        return publish(work, final, elf, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish(work: Path, final: Path, product: Path, force: bool = False) -> Path:
    """Move a finished build directory into its cache place (atomically: a rename, which fails if
    another builder got there first, whose ``product`` is then used); ``force`` replaces it."""
    if force and final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(work, final)
    except OSError:
        if not product.exists():
            raise
    return product


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the pgtable-harness firmware (cached).")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--cc", help="compiler command (default: $CC, ${CROSS_COMPILE}gcc, clang)")
    args = parser.parse_args(argv)
    try:
        print(build(force=args.force, cc=args.cc))
    except (FirmwareBuildError, ToolMissing) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
