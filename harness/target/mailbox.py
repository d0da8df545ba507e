"""The host <-> firmware mailbox, defined once: the C header is generated from this module.

The mailbox is an array of little-endian u64 fields at ``Layout.mailbox`` in guest RAM. Protocol
(breakpoint-driven, no polling): the firmware calls ``idle`` (a hardware breakpoint on the host);
while it is stopped there the host writes ``cmd``, ``arg0..arg7``, sets ``status = PENDING`` and
``seq``, and continues; the firmware serves the request, writes ``status`` (OK or an error) and
``ret0/ret1``, and calls ``idle`` again. An unexpected exception fills the ``panic_*`` fields
(``panic_count`` non-zero) and stops at ``idle`` from ``panic``, then parks.

Request arguments:

* INSTALL_S1 and INSTALL_S2 first uninstall whatever is installed, exactly as UNINSTALL does (so
  swapping tables is one request); a refused argument leaves the installed regime as it was.
* INSTALL_S1: arg0 MAIR_EL2, arg1 TCR_EL2, arg2 TTBR0_EL2, arg3 SCTLR_EL2 bits to set, arg4 HCR_EL2
  bits to set first (0: the EL2 regime; HCR_EL2.E2H: the EL2&0 "hVHE" regime, TCR_EL2 in its
  E2H = 1 layout; any other bit is refused), arg5 TTBR1_EL2 (the EL2&0 regime's upper range, used
  when TCR_EL2.EPD1 = 0; must be 0 without E2H, where TTBR1_EL2 has no role: refused otherwise).
* INSTALL_S2: arg0 VTCR_EL2, arg1 VTTBR_EL2, arg2 HCR_EL2 bits to set.
* UNINSTALL: none (stage 1 off, HCR_EL2.VM/DC/E2H off, all EL2 and EL1 TLB entries invalidated).
* AT: arg0 op (:class:`AtOp`), arg1 count, arg2 address buffer PA, arg3 result buffer PA. A probe
  whose AT takes a synchronous exception (e.g. an external abort on a table walk outside RAM)
  gets the :data:`AT_EXCEPTION_TAG` form in its result slot (see :func:`is_at_exception`), counted
  in ``at_exceptions``; the loop goes on. The paired ops S1E2RW and S12E1RW run both forms of a
  stage in one request: the read form over the first ``count`` addresses, then the write form over
  the next arg4 addresses (results in the same order); arg5 = 1 then uninstalls (as UNINSTALL).
  S1E0R, S1E0W and S1E0RW are EL0's forms in the EL2&0 regime: refused unless HCR_EL2.E2H is set
  (an EL2&0 stage 1 installed), run with HCR_EL2.TGE = 1 (else they would be EL1&0's), which is
  cleared again before the reply.
* ACCESS: arg0 write (0/1; 2: loads over the first ``count`` addresses, then stores over the next
  arg6, records and values in the same order), arg1 stage (1: EL2 with its stage 1; 2: EL1 through stage 2),
  arg2 count, arg3 address buffer PA, arg4 record buffer PA (:data:`ACCESS_RECORD` each), arg5
  value buffer PA (one u64 per address: what a store writes). Each probe is a 64-bit ``ldr``/``str``
  at the (8-byte aligned) address; the record's ``value`` is the loaded value (0 if the load
  faulted) or the stored value. arg1 = :data:`ACCESS_AT_EL0`: EL0's accesses in the EL2&0 regime
  (``ldtr``/``sttr`` at EL2 with HCR_EL2.{E2H, TGE} = {1, 1}, which makes them unprivileged;
  refused without E2H; TGE is cleared again before the reply); a fault is a data abort taken
  from EL2 (EC 0x25). FETCH takes the same arg0 (:data:`ACCESS_AT_EL0`): the branches are made at
  EL0 of the EL2&0 regime (an eret to the firmware's EL0 stub with TGE = 1, SVC #0 when done), an
  instruction abort is EC 0x20.
* FETCH: arg0 stage (1: EL2 with its stage 1; 2: EL1 through stage 2, EL1's MMU off), arg1 count,
  arg2 address buffer PA, arg3 record buffer PA (:data:`ACCESS_RECORD` each). Instruction-fetch
  probes: ``ic iallu`` first (the host plants code behind QEMU's back), then for each (4-byte
  aligned) address a ``blr`` to it with x0 = the address; the code there is expected to return
  (plant :func:`fetch_stub`: ``bti c; movz x0, #tag; ret``). The record's ``value`` is x0 after the
  return (the stub's tag). An instruction abort (EC 0x21 at EL2, EC 0x20 from EL1 for stage 2)
  is recorded (ESR_EL2, FAR_EL2, HPFAR_EL2) and the loop resumes after the ``blr``; any other
  exception raised by the code at the address is recorded too (status FAULT with ESR_EL2 at
  stage 1; :attr:`AccessStatus.EL1_EXCEPTION` with ESR_EL1/FAR_EL1 at stage 2), so code that
  ran somewhere unexpected shows as a wrong outcome rather than a panic.
* LIVE: arg0 count, arg1 step buffer PA (:data:`LIVE_STEP` each, in the address buffer). The
  invalidations of a live table update: each step is one instruction (:class:`harness.arch.tlbi.Insn`,
  a barrier or a TLBI with a0 as its operand) run in order on the installed regime; the host writes
  the descriptors into guest RAM between such requests (the vCPU is stopped then, and the tables
  need not be mapped in the regime under test). ret0 = steps run. Nothing is uninstalled or
  invalidated beyond what the steps ask.
* SPIN: loop forever (tests of the host's timeout handling).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from harness.arch.bits import genmask
from harness.arch.el2 import PAR_RES0_55_52, Vector
from harness.arch.registers import PAR_F
from harness.arch.tlbi import Insn

MAGIC = 0x5047_5441_424C_4521  # "PGTABLE!"
VERSION = 7  # 4: INSTALL_* uninstall first; AT_S1E2RW, AT_S12E1RW; ACCESS write = 2. 5: LIVE. 6: TTBR1_EL2.
# 7: AT_S1E0*, ACCESS_AT_EL0

U64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Record:
    """A binary record of little-endian u64 fields, declared once: the numpy dtype, the C struct
    and the assembler offsets (``<PREFIX>_OFF_<FIELD>``, ``<PREFIX>_SIZE``) all come from here."""

    name: str  # C struct name
    fields: tuple[tuple[str, int], ...]  # (field, number of u64s)
    macro_prefix: str | None = None  # default: the name in upper case

    @property
    def prefix(self) -> str:
        return self.macro_prefix or self.name.upper()

    @property
    def size(self) -> int:
        return 8 * sum(n for _, n in self.fields)

    def offset(self, field: str) -> int:
        off = 0
        for name, n in self.fields:
            if name == field:
                return off
            off += 8 * n
        raise KeyError(field)

    def flat_offsets(self) -> dict[str, int]:
        """Every u64 by name (arrays as ``name0``, ``name1`` ...)."""
        out: dict[str, int] = {}
        for name, n in self.fields:
            base = self.offset(name)
            if n == 1:
                out[name] = base
            else:
                out.update({f"{name}{i}": base + 8 * i for i in range(n)})
        return out

    @property
    def dtype(self) -> np.dtype[np.void]:
        return np.dtype([(name, "<u8") if n == 1 else (name, "<u8", (n,)) for name, n in self.fields])

    def c_defines(self) -> list[str]:
        out = [f"#define {self.prefix}_SIZE {self.size}"]
        out += [f"#define {self.prefix}_OFF_{name.upper()} {self.offset(name)}" for name, _ in self.fields]
        return out

    def c_struct(self) -> list[str]:
        out = [f"struct {self.name} {{"]
        out += [f"    volatile uint64_t {name}{f'[{n}]' if n > 1 else ''};" for name, n in self.fields]
        out += ["};", f"_Static_assert(sizeof(struct {self.name}) == {self.prefix}_SIZE, \"{self.name} size\");"]
        return out


MAILBOX = Record("mailbox", (
    ("magic", 1), ("version", 1), ("seq", 1), ("cmd", 1), ("status", 1), ("arg", 8), ("ret0", 1), ("ret1", 1),
    ("boot_el", 1), ("requests", 1), ("at_exceptions", 1),
    ("panic_count", 1), ("panic_vector", 1), ("panic_esr", 1), ("panic_far", 1), ("panic_elr", 1),
    ("panic_spsr", 1), ("panic_hpfar", 1), ("panic_sp", 1), ("panic_sctlr", 1), ("panic_hcr", 1),
    ("panic_esr_el1", 1), ("panic_far_el1", 1), ("panic_elr_el1", 1), ("panic_x", 31),
), macro_prefix="MB")
"""The mailbox at ``Layout.mailbox``."""

ACCESS_RECORD = Record("access_record", (("status", 1), ("esr", 1), ("far", 1), ("hpfar", 1), ("value", 1)))
"""One access probe's outcome: :class:`AccessStatus`, ESR_EL2, FAR_EL2, HPFAR_EL2 and the value
loaded or stored."""

LIVE_STEP = Record("live_step", (("insn", 1), ("a0", 1)))
"""One instruction of a LIVE request: :class:`harness.arch.tlbi.Insn` and its operand (a0)."""

PANIC_FRAME = Record("panic_frame", (("x", 31), ("sp", 1)))
"""The registers the EL2 vector saves before reporting an unexpected exception (x0..x30, SP)."""

OFFSET: dict[str, int] = MAILBOX.flat_offsets()
SIZE = MAILBOX.size
ACCESS_RECORD_SIZE = ACCESS_RECORD.size
FIELDS: list[str] = list(OFFSET)


class Cmd(enum.IntEnum):
    NOP = 0
    INSTALL_S1 = 1
    INSTALL_S2 = 2
    UNINSTALL = 3
    AT = 4
    ACCESS = 5
    SPIN = 6
    FETCH = 7
    LIVE = 8
    KPGT = 0x40  # served by a linked-in host of kernel code (harness.kernel.protocol), BAD_CMD without one


class Status(enum.IntEnum):
    IDLE = 0
    PENDING = 1
    OK = 2
    BAD_CMD = 3
    BAD_ARG = 4


class AtOp(enum.IntEnum):
    S1E2R = 0
    S1E2W = 1
    S12E1R = 2
    S12E1W = 3
    S1E2RW = 4  # S1E2R over arg1 addresses, then S1E2W over the next arg4
    S12E1RW = 5  # S12E1R, then S12E1W, likewise
    S1E0R = 6  # EL0's forms, in the EL2&0 regime only (HCR_EL2.E2H installed; run with TGE = 1)
    S1E0W = 7
    S1E0RW = 8  # S1E0R, then S1E0W, as S1E2RW


ACCESS_AT_EL0 = 3  # ACCESS arg1 (beside stages 1 and 2): EL0's loads and stores in the EL2&0 regime


class AccessStatus(enum.IntEnum):
    NOT_RUN = 0
    COMPLETED = 1
    FAULT = 2
    EL1_EXCEPTION = 3  # a stage-2 fetch probe's code raised an exception at EL1 (ESR_EL1, FAR_EL1)


# panic_vector: the EL2 vector taken (harness.arch.el2.Vector), or one of these firmware events.
VECTOR_EL1_FORWARDED = 16  # an exception at EL1, forwarded by the EL1 vectors with HVC #EL1_FORWARD_HVC
VECTOR_NOT_EL2 = 17  # the firmware was not entered at EL2
VECTOR_NAMES = {
    **{int(v): v.describe() for v in Vector},
    VECTOR_EL1_FORWARDED: "exception at EL1 (forwarded by the EL1 vectors with HVC #0xE1)",
    VECTOR_NOT_EL2: "not entered at EL2",
}

EL1_FORWARD_HVC = 0xE1

# -- AT that takes an exception -------------------------------------------------------------------
# An AT whose walk takes a synchronous exception at EL2 (e.g. an external abort reading a table
# outside RAM, ESR_EL2 EC 0x25) leaves PAR_EL1 unwritten. The firmware stores, in that probe's
# result slot, PAR bits [55:52] all set (RES0 in every real PAR_EL1), PAR.F set, and ESR_EL2[31:0]
# in bits [32:1], so a reader that only looks at F/FST sees a fault whose FST is the ESR's DFSC.
AT_EXCEPTION_TAG = PAR_RES0_55_52.mask
AT_EXCEPTION_ESR_SHIFT = 1
AT_EXCEPTION_ESR_MASK = genmask(31, 0)


def at_exception_value(esr: int) -> int:
    """The result-slot value the firmware writes for an AT that took exception ``esr``."""
    return AT_EXCEPTION_TAG | ((esr & AT_EXCEPTION_ESR_MASK) << AT_EXCEPTION_ESR_SHIFT) | PAR_F.mask


def is_at_exception(par: npt.ArrayLike) -> BoolArray:
    """Which result slots hold an AT exception instead of a PAR_EL1 value."""
    p = np.asarray(par, dtype=np.uint64)
    return np.asarray((p & np.uint64(AT_EXCEPTION_TAG)) == np.uint64(AT_EXCEPTION_TAG))


def at_exception_esr(par: npt.ArrayLike) -> U64Array:
    """ESR_EL2[31:0] of each AT exception slot (meaningful where :func:`is_at_exception`)."""
    p = np.asarray(par, dtype=np.uint64)
    return np.asarray((p >> np.uint64(AT_EXCEPTION_ESR_SHIFT)) & np.uint64(AT_EXCEPTION_ESR_MASK))


# -- fetch probes -----------------------------------------------------------------------------
# A64 encodings of the code the host plants for FETCH probes. The stub starts with ``bti c``: on
# a guarded page (stage-1 GP, descriptor bit 50, FEAT_BTI) the ``blr`` of the probe must land on a
# compatible BTI or take a Branch Target exception (EC 0x0D), which is about the code, not the
# translation; elsewhere ``bti c`` is a NOP (hint space).
A64_RET = 0xD65F03C0  # ret (x30)
A64_BTI_C = 0xD503245F  # bti c: a landing pad for blr
A64_MOVZ_X0 = 0xD2800000  # movz x0, #imm16 (imm16 in bits [20:5])
A64_BRK_0 = 0xD4200000  # brk #0 (padding, never reached)
FETCH_STUB_SIZE = 16  # bytes, 16-byte aligned
FETCH_STUB_WORDS = FETCH_STUB_SIZE // 8
FETCH_TAG_MASK = 0xFFFF


def fetch_stubs(tags: npt.ArrayLike) -> U64Array:
    """``bti c; movz x0, #tag; ret; brk #0`` per tag (taken modulo 2^16), as little-endian u64
    pairs (shape ``(n, 2)``): planted 16-byte aligned, a FETCH probe branching there records the
    tag as its value."""
    t = np.asarray(tags, dtype=np.uint64).reshape(-1) & np.uint64(FETCH_TAG_MASK)
    out = np.empty((t.size, FETCH_STUB_WORDS), dtype=np.uint64)
    out[:, 0] = np.uint64(A64_BTI_C) | ((np.uint64(A64_MOVZ_X0) | (t << np.uint64(5))) << np.uint64(32))
    out[:, 1] = np.uint64(A64_RET | A64_BRK_0 << 32)
    return out


def fetch_stub(tag: int) -> bytes:
    """The :func:`fetch_stubs` code for one tag (0..0xFFFF), as bytes to write at a 16-byte
    aligned PA."""
    if not 0 <= tag <= FETCH_TAG_MASK:
        raise ValueError(f"tag: expected 0..{FETCH_TAG_MASK:#x}, got {tag!r}")
    return fetch_stubs([tag]).astype("<u8").tobytes()


# -- access tokens ----------------------------------------------------------------------------
STORE_TOKEN_BASE = 0x7E57_0000_0000_0000


def store_tokens(request: int, count: int) -> U64Array:
    """Default values for ``count`` stores of request number ``request``: unique within 2^16
    requests of up to 2^32 probes, ``STORE_TOKEN_BASE | (request mod 2^16) << 32 | index``."""
    idx = np.arange(count, dtype=np.uint64)
    return np.uint64(STORE_TOKEN_BASE | (request & 0xFFFF) << 32) | idx


def c_header() -> str:
    """The firmware's ``mailbox.h`` (generated; part of the firmware hash)."""
    out = [
        "/* GENERATED from harness/target/mailbox.py: do not edit. */",
        "#ifndef HARNESS_MAILBOX_H",
        "#define HARNESS_MAILBOX_H",
        f"#define MB_MAGIC {MAGIC:#x}",
        f"#define MB_VERSION {VERSION}",
        f"#define MB_EL1_FORWARD_HVC {EL1_FORWARD_HVC:#x}",
        f"#define MB_VECTOR_EL1_FORWARDED {VECTOR_EL1_FORWARDED}",
        f"#define MB_VECTOR_NOT_EL2 {VECTOR_NOT_EL2}",
        f"#define AT_EXCEPTION_TAG {AT_EXCEPTION_TAG:#x}",
        f"#define AT_EXCEPTION_ESR_SHIFT {AT_EXCEPTION_ESR_SHIFT}",
        f"#define AT_EXCEPTION_ESR_WIDTH {AT_EXCEPTION_ESR_MASK.bit_length()}",
    ]
    for rec in (MAILBOX, ACCESS_RECORD, LIVE_STEP, PANIC_FRAME):
        out += rec.c_defines()
    out += [f"#define LIVE_{i.name} {i.value}" for i in Insn]
    out += [f"#define CMD_{c.name} {c.value}" for c in Cmd]
    out += [f"#define STATUS_{s.name} {s.value}" for s in Status]
    out += [f"#define AT_{a.name} {a.value}" for a in AtOp]
    out += [f"#define ACCESS_{a.name} {a.value}" for a in AccessStatus]
    out += [f"#define ACCESS_AT_EL0 {ACCESS_AT_EL0}"]
    out += ["#ifndef __ASSEMBLER__", "#include <stdint.h>"]
    for rec in (MAILBOX, ACCESS_RECORD, LIVE_STEP, PANIC_FRAME):
        out += rec.c_struct()
    out += ["#endif", "#endif", ""]
    return "\n".join(out)
