"""Read and patch a linked AArch64 ELF holding the kernel's ``arch/arm64/kvm/hyp/pgtable.c``.

Two tables the kernel's build leaves in the image matter to a host that runs that code without a
kernel:

* ``.altinstructions`` (:data:`ALT_INSTR`, one :class:`AltInstr` each): the sites the kernel's
  boot-time patcher (``__apply_alternatives`` in ``arch/arm64/kernel/alternative.c``) rewrites for
  the CPU capabilities the system has. Hyp code tests capabilities only through them:
  ``cpus_have_final_cap()`` first tests the ALWAYS_SYSTEM callback alternative, whose unpatched form
  branches to ``BUG()``, so :meth:`PayloadElf.patched` always enables :data:`ALWAYS_ON_CAPS`
  (ALWAYS_BOOT and ALWAYS_SYSTEM, which every booted kernel has by the time hyp code runs);
* ``__bug_table`` (:data:`BUG_ENTRY`, one :class:`BugEntry` each): ``WARN_ON``/``BUG_ON`` are a
  ``brk #0x800`` with an entry naming the source line, so a host can report ``file:line`` and
  continue after a WARN.

Both tables hold 32-bit displacements relative to the field's own address: the ELF must be linked
(``ET_EXEC``/``ET_DYN``), as a relocatable object's fields are still zero plus relocations.

Patching does what the kernel's patcher does, entry by entry in table order (the kernel's two passes,
boot capabilities then the rest, give the same bytes since sites never overlap, which is checked):

* a plain entry copies the replacement over the original, re-targeting (``get_alt_insn``) each
  B/BL/B.cond/CBZ/CBNZ/TBZ/TBNZ whose target lies outside the replacement so that it reaches the
  same absolute address, and each ADRP so that it names the same 4 KiB page; ADR and the literal
  loads (LDR/LDRSW/PRFM literal), on which the kernel BUG()s, are refused (:class:`AltPatchError`),
  and so is the SIMD&FP LDR literal, which the kernel's check misses and would copy unfixed, and a
  displacement that no longer fits (the kernel would silently truncate it);
* a callback entry (bit 15 of the cap, ``ARM64_CB_BIT``) names a function that generates the
  instructions; the ones these objects use are implemented in :data:`CALLBACKS`
  (``alt_cb_patch_nops``: NOPs over the original); any other is refused, naming the symbol.

The patched file is the input with only the patched instruction bytes changed (headers and layout
untouched: it stays loadable by QEMU ``-kernel``).

Cap numbers are generated per tree: :func:`cap_numbers` reads ``cpucap-defs.h`` (6.12,
``BUILD/arch/arm64/include/generated/asm/``) or ``cpucaps.h`` (6.1, same directory).
"""

from __future__ import annotations

import io
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from harness.arch import tlbi
from harness.errors import InputError

INSN_SIZE = 4
NOP = 0xD503201F
BUG_BRK = 0xD4200000 | (0x800 << 5)  # brk #BUG_BRK_IMM (asm/brk-imm.h), for BUG and WARN alike
ARM64_CB_BIT = 1 << 15  # asm/alternative-macros.h: the entry's alt_offset names a callback
ALWAYS_ON_CAPS = ("ALWAYS_BOOT", "ALWAYS_SYSTEM")

# struct alt_instr (asm/alternative.h; 6.1 names the cap field ``cpufeature``), packed: 12 bytes.
# orig_offset and alt_offset are displacements from the field's own address.
ALT_INSTR = np.dtype([("orig_offset", "<i4"), ("alt_offset", "<i4"), ("cpucap", "<u2"),
                      ("orig_len", "u1"), ("alt_len", "u1")])

# struct bug_entry (asm-generic/bug.h) with CONFIG_GENERIC_BUG_RELATIVE_POINTERS (arm64) and
# CONFIG_DEBUG_BUGVERBOSE, as asm/asm-bug.h emits it (`.align 2` after flags): 12 bytes. The
# displacements are from the field's own address. Without DEBUG_BUGVERBOSE the entry is
# BUG_ENTRY_TERSE (8 bytes: the trailing `.align 2` pads flags).
BUG_ENTRY = np.dtype([("bug_addr_disp", "<i4"), ("file_disp", "<i4"), ("line", "<u2"), ("flags", "<u2")])
BUG_ENTRY_TERSE = np.dtype([("bug_addr_disp", "<i4"), ("flags", "<u2"), ("pad", "<u2")])
assert ALT_INSTR.itemsize == 12 and BUG_ENTRY.itemsize == 12 and BUG_ENTRY_TERSE.itemsize == 8

# asm-generic/bug.h
BUGFLAG_WARNING = 1 << 0
BUGFLAG_ONCE = 1 << 1
BUGFLAG_DONE = 1 << 2
BUGFLAG_NO_CUT_HERE = 1 << 3
BUGFLAG_TAINT_SHIFT = 8

_CAP_DEFINE = re.compile(r"^#define\s+ARM64_(\w+)\s+(\d+)\s*$", re.MULTILINE)


A64_HVC = 0xD4000002  # hvc #imm16 (imm16 in bits 20:5)


class PayloadElfError(InputError):
    """The ELF is not a linked AArch64 image, or one of its tables is malformed (message names what)."""


class AltPatchError(PayloadElfError):
    """An alternative the kernel's patcher would refuse (or mis-patch): the message names the site."""


@dataclass(frozen=True)
class InsnForm:
    """A PC-relative A64 instruction form: ``insn & mask == value``; the immediate is the
    concatenation of ``imm`` bit fields ``(lsb, width)``, least significant part first, in units
    of ``scale`` bytes (from the PC, or from its 4 KiB page when ``page``). ``fixable``: the
    kernel's patcher re-targets it (``get_alt_insn``); otherwise a replacement holding it is refused."""

    name: str
    mask: int
    value: int
    imm: tuple[tuple[int, int], ...]
    scale: int
    fixable: bool
    page: bool = False

    def matches(self, insn: int) -> bool:
        return insn & self.mask == self.value

    @property
    def imm_bits(self) -> int:
        return sum(width for _, width in self.imm)

    def offset(self, insn: int) -> int:
        """The signed displacement (bytes) the instruction encodes."""
        raw, pos = 0, 0
        for lsb, width in self.imm:
            raw |= ((insn >> lsb) & ((1 << width) - 1)) << pos
            pos += width
        if raw >> (pos - 1):
            raw -= 1 << pos
        return raw * self.scale

    def with_offset(self, insn: int, offset: int) -> int | None:
        """``insn`` encoding ``offset`` instead; None if it does not fit (or is not a multiple of the scale)."""
        units, rem = divmod(offset, self.scale)
        bits = self.imm_bits
        if rem or not -(1 << (bits - 1)) <= units < 1 << (bits - 1):
            return None
        for lsb, width in self.imm:
            field = (1 << width) - 1
            insn = (insn & ~(field << lsb)) | ((units & field) << lsb)
            units >>= width
        return insn

    def base(self, pc: int) -> int:
        return pc & ~0xFFF if self.page else pc


_IMM26, _IMM19, _IMM14 = ((0, 26),), ((5, 19),), ((5, 14),)
_ADR_IMM = ((29, 2), (5, 19))  # immlo, immhi
# The masks are asm/insn.h's (__AARCH64_INSN_FUNCS), plus the SIMD&FP LDR literal it has no test for.
PC_RELATIVE_FORMS = (
    InsnForm("b", 0xFC000000, 0x14000000, _IMM26, 4, True),
    InsnForm("bl", 0xFC000000, 0x94000000, _IMM26, 4, True),
    InsnForm("b.cond", 0xFF000000, 0x54000000, _IMM19, 4, True),
    InsnForm("cbz", 0x7F000000, 0x34000000, _IMM19, 4, True),
    InsnForm("cbnz", 0x7F000000, 0x35000000, _IMM19, 4, True),
    InsnForm("tbz", 0x7F000000, 0x36000000, _IMM14, 4, True),
    InsnForm("tbnz", 0x7F000000, 0x37000000, _IMM14, 4, True),
    InsnForm("adrp", 0x9F000000, 0x90000000, _ADR_IMM, 4096, True, page=True),
    InsnForm("adr", 0x9F000000, 0x10000000, _ADR_IMM, 1, False),
    InsnForm("ldr (literal)", 0xBF000000, 0x18000000, _IMM19, 4, False),
    InsnForm("ldrsw (literal)", 0xFF000000, 0x98000000, _IMM19, 4, False),
    InsnForm("prfm (literal)", 0xFF000000, 0xD8000000, _IMM19, 4, False),
    InsnForm("ldr (literal, SIMD&FP)", 0x3F000000, 0x1C000000, _IMM19, 4, False),
)


def pc_relative_form(insn: int) -> InsnForm | None:
    """The PC-relative form ``insn`` has, or None."""
    return next((f for f in PC_RELATIVE_FORMS if f.matches(insn)), None)


@dataclass(frozen=True)
class Section:
    """One section header: ``addr`` its load address, ``offset`` its place in the file."""

    name: str
    addr: int
    offset: int
    size: int
    alloc: bool
    nobits: bool
    exec: bool = False

    def holds(self, addr: int, size: int) -> bool:
        """True if [addr, addr + size) lies in the section's bytes in the file."""
        return self.alloc and not self.nobits and self.addr <= addr and addr + size <= self.addr + self.size


@dataclass(frozen=True)
class AltInstr:
    """One ``.altinstructions`` entry, its displacements resolved to absolute addresses.

    ``alt``: the replacement instructions, or the callback function when ``is_callback``;
    ``cap``: the capability number without ARM64_CB_BIT; ``entry``: the entry's own address."""

    entry: int
    orig: int
    alt: int
    cap: int
    is_callback: bool
    orig_len: int
    alt_len: int


@dataclass(frozen=True)
class BugEntry:
    """One ``__bug_table`` entry: ``addr`` of the ``brk``; ``file``/``line`` are "" and 0 when the tree
    was built without CONFIG_DEBUG_BUGVERBOSE."""

    addr: int
    file: str
    line: int
    flags: int

    @property
    def warning(self) -> bool:
        """A WARN (execution continues after the ``brk``), not a BUG."""
        return bool(self.flags & BUGFLAG_WARNING)

    @property
    def once(self) -> bool:
        return bool(self.flags & BUGFLAG_ONCE)

    @property
    def no_cut_here(self) -> bool:
        return bool(self.flags & BUGFLAG_NO_CUT_HERE)

    @property
    def taint(self) -> int:
        return self.flags >> BUGFLAG_TAINT_SHIFT

    @property
    def source(self) -> str:
        """``file`` normalised (the nVHE build names ``arch/arm64/kvm/hyp/nvhe/../pgtable.c``)."""
        return posixpath.normpath(self.file) if self.file else ""

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Patch:
    """What patching one enabled site does: ``new`` replaces ``old`` (the unpatched bytes) at ``alt.orig``.
    ``callback``: the callback's symbol for a callback entry."""

    alt: AltInstr
    old: bytes
    new: bytes
    callback: str | None = None

    @property
    def addr(self) -> int:
        return self.alt.orig


AltCallback = Callable[[AltInstr, tuple[int, ...]], tuple[int, ...]]


def _patch_nops(alt: AltInstr, orig: tuple[int, ...]) -> tuple[int, ...]:
    """``alt_cb_patch_nops`` (arch/arm64/kernel/alternative.c): a NOP over each original instruction."""
    return (NOP,) * len(orig)


# The callbacks the host implements, by the kernel's name; each gets the entry and the original
# instruction words and returns the words to write.
CALLBACKS: Mapping[str, AltCallback] = {"alt_cb_patch_nops": _patch_nops}
_NVHE_PREFIX = "__kvm_nvhe_"  # the nVHE build's symbols in vmlinux (kvm_nvhe.o)


def _entries(data: bytes, dtype: np.dtype[Any], what: str) -> np.ndarray[Any, np.dtype[Any]]:
    if len(data) % dtype.itemsize:
        raise PayloadElfError(f"{what}: {len(data)} bytes is not a whole number of {dtype.itemsize}-byte entries")
    return np.frombuffer(data, dtype=dtype)


def _field_offset(dtype: np.dtype[Any], name: str) -> int:
    fields = cast(Mapping[str, tuple[Any, int]], dtype.fields)
    return fields[name][1]


class PayloadElf:
    """A linked little-endian AArch64 ELF, read once into memory; patching returns a new image."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.data = self.path.read_bytes()
        except OSError as e:
            raise PayloadElfError(f"{self.path}: cannot read ({e.strerror})") from e
        try:
            self._elf = ELFFile(io.BytesIO(self.data))
        except ELFError as e:
            raise PayloadElfError(f"{self.path}: not an ELF file ({e})") from e
        header = self._elf.header
        if header["e_machine"] != "EM_AARCH64" or self._elf.elfclass != 64 or not self._elf.little_endian:
            raise PayloadElfError(f"{self.path}: not a little-endian AArch64 ELF64 ({header['e_machine']})")
        if header["e_type"] == "ET_REL":
            raise PayloadElfError(f"{self.path}: a relocatable object; link it first (its tables' "
                                  "displacements are still relocations)")
        self.sections: dict[str, Section] = {}
        for s in self._elf.iter_sections():
            sec = Section(s.name, s["sh_addr"], s["sh_offset"], s["sh_size"],
                          bool(s["sh_flags"] & SH_FLAGS.SHF_ALLOC), s["sh_type"] == "SHT_NOBITS",
                          bool(s["sh_flags"] & SH_FLAGS.SHF_EXECINSTR))
            self.sections.setdefault(sec.name, sec)

    def __repr__(self) -> str:
        return f"PayloadElf({str(self.path)!r})"

    # -- bytes and symbols -------------------------------------------------------------------

    def _section_at(self, addr: int, size: int) -> Section:
        for s in self.sections.values():
            if s.holds(addr, size):
                return s
        raise PayloadElfError(f"{self.path}: no section holds {size} bytes at {addr:#x}")

    def file_offset(self, addr: int, size: int = 1) -> int:
        """Where [addr, addr + size) is in the file."""
        s = self._section_at(addr, size)
        return s.offset + addr - s.addr

    def read(self, addr: int, size: int) -> bytes:
        off = self.file_offset(addr, size)
        return self.data[off:off + size]

    def words(self, addr: int, count: int) -> tuple[int, ...]:
        """``count`` little-endian instruction words at ``addr``."""
        return tuple(int(w) for w in np.frombuffer(self.read(addr, count * INSN_SIZE), dtype="<u4"))

    def cstring(self, addr: int) -> str:
        s = self._section_at(addr, 1)
        start = s.offset + addr - s.addr
        end = self.data.find(b"\0", start, s.offset + s.size)
        if end < 0:
            raise PayloadElfError(f"{self.path}: no NUL-terminated string at {addr:#x}")
        return self.data[start:end].decode("utf-8", "replace")

    @cached_property
    def _symbols(self) -> tuple[tuple[str, int, bool, str], ...]:
        """Defined symbols: (name, value, global, type), without section, file and mapping symbols."""
        out = []
        for tab in self._elf.iter_sections():
            if not isinstance(tab, SymbolTableSection):
                continue
            for sym in tab.iter_symbols():
                kind = sym["st_info"]["type"]
                if (not sym.name or sym["st_shndx"] == "SHN_UNDEF" or kind in ("STT_SECTION", "STT_FILE")
                        or re.fullmatch(r"\$[xd](\..*)?", sym.name)):
                    continue
                out.append((sym.name, int(sym["st_value"]), sym["st_info"]["bind"] != "STB_LOCAL", kind))
        return tuple(out)

    def symbol(self, name: str) -> int:
        """The address of the defined symbol ``name`` (a global wins over same-named locals)."""
        found = [(value, is_global) for n, value, is_global, _ in self._symbols if n == name]
        values = {v for v, g in found if g} or {v for v, _ in found}
        if not values:
            raise PayloadElfError(f"{self.path}: no symbol {name!r}")
        if len(values) > 1:
            raise PayloadElfError(f"{self.path}: symbol {name!r} is ambiguous (at "
                                  + ", ".join(f"{v:#x}" for v in sorted(values)) + ")")
        return values.pop()

    def symbols_at(self, addr: int) -> tuple[str, ...]:
        """The names of the defined symbols at ``addr``, globals first."""
        hits = sorted((not g, n) for n, v, g, _ in self._symbols if v == addr)
        return tuple(dict.fromkeys(n for _, n in hits))

    # -- the tables ---------------------------------------------------------------------------

    def alternatives(self) -> tuple[AltInstr, ...]:
        """The ``.altinstructions`` entries, in table order (empty if the section is absent)."""
        sec = self.sections.get(".altinstructions")
        if sec is None:
            return ()
        table = _entries(self.read(sec.addr, sec.size), ALT_INSTR, f"{self.path}: .altinstructions")
        orig_at, alt_at = _field_offset(ALT_INSTR, "orig_offset"), _field_offset(ALT_INSTR, "alt_offset")
        out = []
        for i, e in enumerate(table):
            entry = sec.addr + i * ALT_INSTR.itemsize
            cap = int(e["cpucap"])
            out.append(AltInstr(entry=entry, orig=entry + orig_at + int(e["orig_offset"]),
                                alt=entry + alt_at + int(e["alt_offset"]), cap=cap & ~ARM64_CB_BIT,
                                is_callback=bool(cap & ARM64_CB_BIT), orig_len=int(e["orig_len"]),
                                alt_len=int(e["alt_len"])))
        return tuple(out)

    @cached_property
    def _bug_table(self) -> tuple[BugEntry, ...]:
        sec = self.sections.get("__bug_table")
        if sec is None or sec.size == 0:
            return ()
        data = self.read(sec.addr, sec.size)
        for dtype in (BUG_ENTRY, BUG_ENTRY_TERSE):
            entries = self._decode_bug_table(sec, data, dtype)
            if entries is not None:
                return entries
        raise PayloadElfError(f"{self.path}: __bug_table ({sec.size} bytes) matches neither entry layout "
                              f"({BUG_ENTRY.itemsize} or {BUG_ENTRY_TERSE.itemsize} bytes, each naming a brk #0x800)")

    def _decode_bug_table(self, sec: Section, data: bytes, dtype: np.dtype[Any]) -> tuple[BugEntry, ...] | None:
        """The entries read with ``dtype``, or None unless each names a ``brk #0x800`` (and a file)."""
        if len(data) % dtype.itemsize:
            return None
        verbose = dtype.names is not None and "file_disp" in dtype.names
        addr_at = _field_offset(dtype, "bug_addr_disp")
        out = []
        try:
            for i, e in enumerate(np.frombuffer(data, dtype=dtype)):
                entry = sec.addr + i * dtype.itemsize
                addr = entry + addr_at + int(e["bug_addr_disp"])
                if self.words(addr, 1)[0] != BUG_BRK:
                    return None
                file, line = "", 0
                if verbose:
                    file = self.cstring(entry + _field_offset(dtype, "file_disp") + int(e["file_disp"]))
                    line = int(e["line"])
                out.append(BugEntry(addr=addr, file=file, line=line, flags=int(e["flags"])))
        except PayloadElfError:
            return None
        return tuple(out)

    def bug_table(self) -> tuple[BugEntry, ...]:
        """The ``__bug_table`` entries, in table order (empty if the section is absent)."""
        return self._bug_table

    @cached_property
    def _bugs_by_addr(self) -> dict[int, BugEntry]:
        return {b.addr: b for b in self._bug_table}

    def bug_at(self, addr: int) -> BugEntry | None:
        """The entry for the ``brk`` at ``addr``, if it is a BUG/WARN site."""
        return self._bugs_by_addr.get(addr)

    # -- patching -----------------------------------------------------------------------------

    def callback_name(self, alt: AltInstr) -> str:
        """The symbol a callback entry names (the first of the names at its address that the host
        implements, else the first name); :class:`AltPatchError` if no symbol is there."""
        names = self.symbols_at(alt.alt)
        if not names:
            raise AltPatchError(f"alternative at {alt.orig:#x} (cap {alt.cap}): its callback {alt.alt:#x} is no "
                                "symbol (was the callback left undefined at link time?)")
        return next((n for n in names if n.removeprefix(_NVHE_PREFIX) in CALLBACKS), names[0])

    def _replacement(self, alt: AltInstr) -> tuple[int, ...]:
        """The instruction words the kernel's patcher writes at a plain entry's site (``patch_alternative``)."""
        if alt.alt_len != alt.orig_len or alt.orig_len % INSN_SIZE:
            raise AltPatchError(f"alternative at {alt.orig:#x} (cap {alt.cap}): replacement length {alt.alt_len} "
                                f"!= original length {alt.orig_len} (or not whole instructions)")
        out = []
        for i, insn in enumerate(self.words(alt.alt, alt.alt_len // INSN_SIZE)):
            src, dst = alt.alt + i * INSN_SIZE, alt.orig + i * INSN_SIZE
            form = pc_relative_form(insn)
            if form is None:
                out.append(insn)
                continue
            target = form.base(src) + form.offset(insn)
            where = (f"alternative at {alt.orig:#x} (cap {alt.cap}): {form.name} at {src:#x} "
                     f"(to be copied to {dst:#x}) targets {target:#x}")
            if not form.fixable:
                raise AltPatchError(f"{where}; the kernel's patcher cannot re-target it (it BUG()s)")
            if not form.page and alt.alt <= target <= alt.alt + alt.alt_len:
                out.append(insn)  # a branch within the replacement moves with it (branch_insn_requires_update)
                continue
            moved = form.with_offset(insn, target - form.base(dst))
            if moved is None:
                raise AltPatchError(f"{where}, out of its range from {dst:#x}")
            out.append(moved)
        return tuple(out)

    def patches(self, caps: Iterable[int] | Mapping[int, bool], cap_names: Mapping[str, int]) -> tuple[Patch, ...]:
        """What patching for the capability set ``caps`` (numbers; a mapping: those mapped to True)
        writes, site by site in table order; :data:`ALWAYS_ON_CAPS` (those ``cap_names`` has) are
        always enabled. Raises :class:`AltPatchError` naming the site for anything the kernel refuses."""
        enabled = enabled_caps(caps, cap_names)
        out: list[Patch] = []
        claimed: list[tuple[int, int]] = []
        for alt in self.alternatives():
            if alt.cap not in enabled:
                continue
            end = alt.orig + alt.orig_len
            clash = next(((a, b) for a, b in claimed if a < end and alt.orig < b), None)
            if clash is not None:
                raise AltPatchError(f"alternative at {alt.orig:#x} (cap {alt.cap}) overlaps the enabled site "
                                    f"{clash[0]:#x}..{clash[1]:#x}")
            claimed.append((alt.orig, end))
            orig = self.words(alt.orig, alt.orig_len // INSN_SIZE)
            callback = None
            if alt.is_callback:
                callback = self.callback_name(alt)
                generate = CALLBACKS.get(callback.removeprefix(_NVHE_PREFIX))
                if generate is None:
                    raise AltPatchError(f"alternative at {alt.orig:#x} (cap {alt.cap}): callback {callback!r} is "
                                        f"not implemented (known: {', '.join(CALLBACKS)})")
                if alt.alt_len != 0 or alt.orig_len % INSN_SIZE:
                    raise AltPatchError(f"alternative at {alt.orig:#x} (cap {alt.cap}): a callback entry with "
                                        f"alt_len {alt.alt_len} (must be 0), orig_len {alt.orig_len}")
                words = generate(alt, orig)
            else:
                words = self._replacement(alt)
            assert len(words) == len(orig)
            out.append(Patch(alt=alt, old=self.read(alt.orig, alt.orig_len),
                             new=np.asarray(words, dtype="<u4").tobytes(), callback=callback))
        return tuple(out)

    def tlbi_traps(self, data: bytes | None = None) -> tuple[tuple[int, int, int], ...]:
        """Every inline ``tlbi vae2is, Xt``/``tlbi vale2is, Xt`` in the image's code, as (address, the
        instruction, the ``hvc`` that replaces it): the host records each one's operand, runs it and
        resumes (:data:`harness.kernel.protocol.TLBI_TRAP_HVC`). The host's own code uses other
        forms, so every site found is the tree's. ``data``: the image to scan (default the file's)."""
        from harness.kernel.protocol import TLBI_TRAP_HVC

        image = self.data if data is None else data
        out = []
        for sec in self.sections.values():
            if not (sec.exec and sec.alloc and not sec.nobits):
                continue
            words = np.frombuffer(image, dtype="<u4", count=sec.size // INSN_SIZE, offset=sec.offset)
            for form, base in enumerate(tlbi.TLBI_EL2IS_ENCODINGS):
                for i in np.flatnonzero((words & np.uint32(~tlbi.TLBI_RT_MASK & 0xFFFFFFFF)) == np.uint32(base)):
                    rt = int(words[i]) & tlbi.TLBI_RT_MASK
                    out.append((sec.addr + INSN_SIZE * int(i), int(words[i]),
                                A64_HVC | ((TLBI_TRAP_HVC | form << 5 | rt) << 5)))
        return tuple(sorted(out))

    def patched(self, caps: Iterable[int] | Mapping[int, bool], cap_names: Mapping[str, int]) -> bytes:
        """The whole file with the alternatives of ``caps`` applied (see :meth:`patches`), then
        the hyp TLBIs turned into traps (:meth:`tlbi_traps`)."""
        image = bytearray(self.data)
        for p in self.patches(caps, cap_names):
            off = self.file_offset(p.addr, len(p.new))
            image[off:off + len(p.new)] = p.new
        for addr, _old, new in self.tlbi_traps(bytes(image)):
            off = self.file_offset(addr, INSN_SIZE)
            image[off:off + INSN_SIZE] = new.to_bytes(INSN_SIZE, "little")
        return bytes(image)

    def write_patched(self, out_path: Path | str, caps: Iterable[int] | Mapping[int, bool],
                      cap_names: Mapping[str, int]) -> Path:
        """Write :meth:`patched` to ``out_path`` (file mode as the input's); returns the path."""
        out = Path(out_path)
        out.write_bytes(self.patched(caps, cap_names))
        out.chmod(self.path.stat().st_mode & 0o777)
        return out


def enabled_caps(caps: Iterable[int] | Mapping[int, bool], cap_names: Mapping[str, int]) -> frozenset[int]:
    """``caps`` (a mapping: the numbers mapped to True) plus :data:`ALWAYS_ON_CAPS` found in ``cap_names``."""
    chosen = {c for c, on in caps.items() if on} if isinstance(caps, Mapping) else set(caps)
    return frozenset(chosen | {cap_names[n] for n in ALWAYS_ON_CAPS if n in cap_names})


def cap_numbers(header_text: str) -> dict[str, int]:
    """``{name: number}`` from a tree's generated ``cpucap-defs.h``/``cpucaps.h`` (``#define ARM64_X N``),
    names without ``ARM64_``, ``NCAPS`` left out."""
    caps = {m[1]: int(m[2]) for m in _CAP_DEFINE.finditer(header_text) if m[1] != "NCAPS"}
    if not caps:
        raise PayloadElfError("no '#define ARM64_<cap> <number>' lines: not a cpucaps header")
    return caps


def caps_named(names: Iterable[str], cap_names: Mapping[str, int]) -> frozenset[int]:
    """The numbers of capabilities given by name (with or without ``ARM64_``)."""
    out = set()
    for name in names:
        key = name.removeprefix("ARM64_")
        if key not in cap_names:
            raise InputError(f"unknown CPU capability {name!r} for this tree")
        out.add(cap_names[key])
    return frozenset(out)


def caps_used(elf: PayloadElf) -> dict[int, int]:
    """``{cap: number of sites}`` over the ELF's alternatives, by cap number."""
    return dict(sorted(Counter(a.cap for a in elf.alternatives()).items()))
