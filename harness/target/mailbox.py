"""The host <-> firmware mailbox, defined once: the C header is generated from this module.

The mailbox is an array of little-endian u64 fields at ``Layout.mailbox`` in guest RAM. Protocol
(breakpoint-driven, no polling): the firmware calls ``idle`` (a hardware breakpoint on the host);
while it is stopped there the host writes ``cmd``, ``arg0..arg7``, sets ``status = PENDING`` and
``seq``, and continues; the firmware serves the request, writes ``status`` (OK or an error) and
``ret0/ret1``, and calls ``idle`` again. An unexpected exception fills the ``panic_*`` fields and
stops at ``panic`` instead.

Request arguments:

* INSTALL_S1: arg0 MAIR_EL2, arg1 TCR_EL2, arg2 TTBR0_EL2, arg3 SCTLR_EL2 bits to set.
* INSTALL_S2: arg0 VTCR_EL2, arg1 VTTBR_EL2, arg2 HCR_EL2 bits to set.
* UNINSTALL: none (stage 1 off, HCR_EL2.VM/DC off, all EL2 and EL1 TLB entries invalidated).
* AT: arg0 op (:class:`AtOp`), arg1 count, arg2 address buffer PA, arg3 result buffer PA.
* ACCESS: arg0 write (0/1), arg1 stage (1: EL2 with its stage 1; 2: EL1 through stage 2),
  arg2 count, arg3 address buffer PA, arg4 record buffer PA (:data:`ACCESS_RECORD` each).
* SPIN: loop forever (tests of the host's timeout handling).
"""

from __future__ import annotations

import enum
import struct

MAGIC = 0x5047_5441_424C_4521  # "PGTABLE!"
VERSION = 1

_ARGS = [f"arg{i}" for i in range(8)]
_X = [f"panic_x{i}" for i in range(31)]

FIELDS: list[str] = [
    "magic",
    "version",
    "seq",
    "cmd",
    "status",
    *_ARGS,
    "ret0",
    "ret1",
    "boot_el",
    "requests",
    "panic_count",
    "panic_vector",
    "panic_esr",
    "panic_far",
    "panic_elr",
    "panic_spsr",
    "panic_hpfar",
    "panic_sp",
    "panic_sctlr",
    "panic_hcr",
    "panic_esr_el1",
    "panic_far_el1",
    "panic_elr_el1",
    *_X,
]

OFFSET: dict[str, int] = {name: 8 * i for i, name in enumerate(FIELDS)}
SIZE = 8 * len(FIELDS)


class Cmd(enum.IntEnum):
    NOP = 0
    INSTALL_S1 = 1
    INSTALL_S2 = 2
    UNINSTALL = 3
    AT = 4
    ACCESS = 5
    SPIN = 6


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


class AccessStatus(enum.IntEnum):
    NOT_RUN = 0
    COMPLETED = 1
    FAULT = 2


# One access-probe record: status, ESR_EL2, FAR_EL2, HPFAR_EL2 (u64 each).
ACCESS_RECORD = ("status", "esr", "far", "hpfar")
ACCESS_RECORD_SIZE = 8 * len(ACCESS_RECORD)

# Vector indices reported in panic_vector (VBAR_EL2 offset / 0x80), plus firmware-detected events.
VECTOR_NAMES = {
    0: "sync, EL2 with SP_EL0",
    1: "IRQ, EL2 with SP_EL0",
    2: "FIQ, EL2 with SP_EL0",
    3: "SError, EL2 with SP_EL0",
    4: "sync, EL2 with SP_EL2",
    5: "IRQ, EL2 with SP_EL2",
    6: "FIQ, EL2 with SP_EL2",
    7: "SError, EL2 with SP_EL2",
    8: "sync, from EL1 (AArch64)",
    9: "IRQ, from EL1 (AArch64)",
    10: "FIQ, from EL1 (AArch64)",
    11: "SError, from EL1 (AArch64)",
    12: "sync, from EL1 (AArch32)",
    13: "IRQ, from EL1 (AArch32)",
    14: "FIQ, from EL1 (AArch32)",
    15: "SError, from EL1 (AArch32)",
    16: "exception at EL1 (forwarded by the EL1 vectors with HVC #0xE1)",
    17: "not entered at EL2",
}

EL1_FORWARD_HVC = 0xE1


def pack(values: dict[str, int]) -> dict[int, bytes]:
    """Byte patches (offset -> 8 bytes) for named fields."""
    return {OFFSET[k]: struct.pack("<Q", v & (1 << 64) - 1) for k, v in values.items()}


def c_header() -> str:
    """The firmware's ``mailbox.h`` (generated; part of the firmware hash)."""
    out = [
        "/* GENERATED from harness/target/mailbox.py: do not edit. */",
        "#ifndef HARNESS_MAILBOX_H",
        "#define HARNESS_MAILBOX_H",
        f"#define MB_MAGIC {MAGIC:#x}ULL",
        f"#define MB_VERSION {VERSION}",
        f"#define MB_SIZE {SIZE}",
        f"#define MB_EL1_FORWARD_HVC {EL1_FORWARD_HVC:#x}",
        f"#define ACCESS_RECORD_SIZE {ACCESS_RECORD_SIZE}",
    ]
    out += [f"#define MB_OFF_{n.upper()} {o}" for n, o in OFFSET.items()]
    out += [f"#define CMD_{c.name} {c.value}" for c in Cmd]
    out += [f"#define STATUS_{s.name} {s.value}" for s in Status]
    out += [f"#define AT_{a.name} {a.value}" for a in AtOp]
    out += [f"#define ACCESS_{a.name} {a.value}" for a in AccessStatus]
    out += [f"#define ACCESS_OFF_{n.upper()} {8 * i}" for i, n in enumerate(ACCESS_RECORD)]
    out += ["#ifndef __ASSEMBLER__", "#include <stdint.h>", "struct mailbox {"]
    out += [f"    volatile uint64_t {n};" for n in FIELDS if not n.startswith("panic_x")]
    out += ["    volatile uint64_t panic_x[31];", "};"]
    out += ["#endif", "#endif", ""]
    return "\n".join(out)
