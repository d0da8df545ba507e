"""Exception entry and return at EL2: the facts a bare-metal EL2 payload needs (Arm ARM D1, D19).

Beside :mod:`harness.arch.registers` (translation registers, ESR/PAR fields), this module holds
the exception-vector layout, the SPSR fields of an exception return, CurrentEL, the HVC immediate
in the ESR ISS and SCTLR_EL1's RES1 bits. The firmware's ``gen/arch.h`` is generated from both.
"""

from __future__ import annotations

import enum

from harness.arch.bits import Field, bit

# CurrentEL: the exception level in bits [3:2].
CURRENTEL_EL = Field("EL", 3, 2)

# The vector table (VBAR_ELx): 16 entries of 0x80 bytes, 2 KiB aligned.
VECTOR_ENTRY_SIZE = 0x80
VECTOR_TABLE_ALIGN = 0x800


class Vector(enum.IntEnum):
    """Entry index in the vector table (offset / 0x80)."""

    CUR_SP0_SYNC = 0
    CUR_SP0_IRQ = 1
    CUR_SP0_FIQ = 2
    CUR_SP0_SERROR = 3
    CUR_SPX_SYNC = 4
    CUR_SPX_IRQ = 5
    CUR_SPX_FIQ = 6
    CUR_SPX_SERROR = 7
    LOWER_A64_SYNC = 8
    LOWER_A64_IRQ = 9
    LOWER_A64_FIQ = 10
    LOWER_A64_SERROR = 11
    LOWER_A32_SYNC = 12
    LOWER_A32_IRQ = 13
    LOWER_A32_FIQ = 14
    LOWER_A32_SERROR = 15

    def describe(self, el: int = 2) -> str:
        kind = self.name.rsplit("_", 1)[1].lower().replace("serror", "SError").replace("irq", "IRQ") \
            .replace("fiq", "FIQ")
        where = {"CUR_SP0": f"EL{el} with SP_EL0", "CUR_SPX": f"EL{el} with SP_EL{el}",
                 "LOWER_A64": f"from EL{el - 1} (AArch64)", "LOWER_A32": f"from EL{el - 1} (AArch32)"}
        return f"{kind}, {where[self.name.rsplit('_', 1)[0]]}"


# SPSR_ELx on an exception return: M[3:0] the target mode, DAIF masks in [9:6].
SPSR_M = Field("M", 3, 0)
SPSR_MODE_EL0T = 0b0000  # EL0 (SP_EL0)
SPSR_MODE_EL1H = 0b0101  # EL1 using SP_EL1
SPSR_DAIF = Field("DAIF", 9, 6)
SPSR_DAIF_ALL = 0b1111


def spsr_el0t_masked() -> int:
    """SPSR for an ERET to EL0 (AArch64, SP_EL0) with Debug, SError, IRQ and FIQ masked."""
    return SPSR_M.prep(SPSR_MODE_EL0T) | SPSR_DAIF.prep(SPSR_DAIF_ALL)


def spsr_el1h_masked() -> int:
    """SPSR for an ERET to EL1h (AArch64) with Debug, SError, IRQ and FIQ masked."""
    return SPSR_M.prep(SPSR_MODE_EL1H) | SPSR_DAIF.prep(SPSR_DAIF_ALL)


# ESR_ELx ISS of an HVC/SVC/SMC taken from AArch64: the instruction's 16-bit immediate.
ISS_IMM16 = Field("imm16", 15, 0)

# SCTLR_EL1 bits that are RES1 in Armv8.0 (later features give them meanings for which 1 is the
# safe, legacy value): EOS 11, TSCXT 20, EIS 22, SPAN 23, nTLSMD 28, LSMAOE 29.
SCTLR_EL1_RES1 = (bit("EOS", 11).mask | bit("TSCXT", 20).mask | bit("EIS", 22).mask | bit("SPAN", 23).mask
                  | bit("nTLSMD", 28).mask | bit("LSMAOE", 29).mask)

# PAR_EL1 bits [55:52] are RES0 in the 64-bit PAR (the PA ends at bit 51): no AT result sets them.
PAR_RES0_55_52 = Field("RES0", 55, 52)
