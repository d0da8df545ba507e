"""System registers the harness programs or reads, each field named once (Arm ARM D19).

TCR_EL2 is described for the non-VHE EL2 regime (HCR_EL2.E2H = 0): a single VA range through
TTBR0_EL2.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from harness.arch.bits import Field, bit
from harness.arch.geometry import Geometry, Granule, Stage, pa_size_encoding

# ---------------------------------------------------------------------------------------------
# Translation control: fields shared by TCR_EL2 (E2H = 0) and VTCR_EL2.
T0SZ = Field("T0SZ", 5, 0)
IRGN0 = Field("IRGN0", 9, 8)
ORGN0 = Field("ORGN0", 11, 10)
SH0 = Field("SH0", 13, 12)
TG0 = Field("TG0", 15, 14)
PS = Field("PS", 18, 16)
TCR_EL2_TBI = bit("TBI", 20)
TCR_EL2_RES1 = (1 << 31) | (1 << 23)
VTCR_SL0 = Field("SL0", 7, 6)
VTCR_VS = bit("VS", 19)
VTCR_HA = bit("HA", 21)
VTCR_DS = bit("DS", 32)
VTCR_RES1 = 1 << 31

TG0_ENCODING = {Granule.K4: 0b00, Granule.K64: 0b01, Granule.K16: 0b10}
RGN_WBWA = 0b01  # normal memory, write-back read-allocate write-allocate cacheable
SH_INNER = 0b11

# Translation table base registers.
TTBR_BADDR = Field("BADDR", 47, 1)
TTBR_BADDR_51_48 = Field("BADDR[51:48]", 5, 2)  # 64K granule with a 52-bit PA size
VTTBR_VMID = Field("VMID", 63, 48)  # 16-bit VMID with VTCR.VS = 1; [55:48] otherwise

# HCR_EL2.
HCR_VM = bit("VM", 0)
HCR_RW = bit("RW", 31)  # EL1 is AArch64
HCR_DC = bit("DC", 12)  # EL1&0 stage 1 off behaves as Normal write-back (exposes stage-2 MemAttr)
HCR_TGE = bit("TGE", 27)
HCR_E2H = bit("E2H", 34)

# SCTLR_EL2 / SCTLR_EL1.
SCTLR_M = bit("M", 0)
SCTLR_A = bit("A", 1)
SCTLR_C = bit("C", 2)
SCTLR_I = bit("I", 12)
SCTLR_WXN = bit("WXN", 19)

# ---------------------------------------------------------------------------------------------
# MAIR: the harness's memory attribute convention for the hyp stage-1 regime.


class MairIndex(enum.IntEnum):
    NORMAL = 0  # normal, inner/outer write-back read/write-allocate non-transient
    DEVICE_nGnRE = 1
    NORMAL_NC = 2
    DEVICE_nGnRnE = 3


MAIR_ATTRS = {
    MairIndex.NORMAL: 0xFF,
    MairIndex.DEVICE_nGnRE: 0x04,
    MairIndex.NORMAL_NC: 0x44,
    MairIndex.DEVICE_nGnRnE: 0x00,
}


def mair_value() -> int:
    return sum(attr << (8 * int(idx)) for idx, attr in MAIR_ATTRS.items())


def mair_attr(mair: int, index: int) -> int:
    return (mair >> (8 * index)) & 0xFF


# ---------------------------------------------------------------------------------------------
# PAR_EL1 after an AT instruction.
PAR_F = bit("F", 0)
PAR_FST = Field("FST", 6, 1)
PAR_PTW = bit("PTW", 8)
PAR_S = bit("S", 9)
PAR_SH = Field("SH", 8, 7)
PAR_NS = bit("NS", 9)
PAR_PA = Field("PA", 51, 12)
PAR_ATTR = Field("ATTR", 63, 56)
PAR_RES1 = bit("RES1", 11)


class FaultKind(enum.Enum):
    """Fault status code classes (the DFSC / FST encodings, bits [5:2]; level in [1:0])."""

    ADDRESS_SIZE = 0b0000
    TRANSLATION = 0b0001
    ACCESS_FLAG = 0b0010
    PERMISSION = 0b0011


def fault_status(kind: FaultKind, level: int) -> int:
    """The 6-bit FST/DFSC value for a fault kind at a level (0..3)."""
    return (kind.value << 2) | (level & 3)


def decode_fault_status(fst: int) -> tuple[FaultKind, int] | None:
    try:
        return FaultKind(fst >> 2), fst & 3
    except ValueError:
        return None


@dataclass(frozen=True)
class Par:
    """PAR_EL1 taken apart."""

    raw: int

    @property
    def fault(self) -> bool:
        return bool(PAR_F.get(self.raw))

    @property
    def fst(self) -> int:
        return PAR_FST.get(self.raw)

    @property
    def stage2(self) -> bool:
        return bool(PAR_S.get(self.raw))

    @property
    def ptw(self) -> bool:
        return bool(PAR_PTW.get(self.raw))

    @property
    def pa(self) -> int:
        return PAR_PA.get(self.raw) << 12

    @property
    def attr(self) -> int:
        return PAR_ATTR.get(self.raw)

    @property
    def sh(self) -> int:
        return PAR_SH.get(self.raw)

    def __str__(self) -> str:
        if self.fault:
            dec = decode_fault_status(self.fst)
            what = f"{dec[0].name.lower()} fault level {dec[1]}" if dec else f"FST {self.fst:#x}"
            return (
                f"PAR_EL1={self.raw:#018x}: {what}"
                f"{' (stage 2)' if self.stage2 else ''}{' (on table walk)' if self.ptw else ''}"
            )
        return (
            f"PAR_EL1={self.raw:#018x}: PA {self.pa:#x} ATTR {self.attr:#04x} SH {self.sh:#x} "
            f"NS {PAR_NS.get(self.raw)}"
        )


# ---------------------------------------------------------------------------------------------
# ESR_EL2 / HPFAR_EL2.
ESR_EC = Field("EC", 31, 26)
ESR_IL = bit("IL", 25)
ESR_ISS = Field("ISS", 24, 0)
ISS_DFSC = Field("DFSC", 5, 0)
ISS_WNR = bit("WnR", 6)
ISS_S1PTW = bit("S1PTW", 7)
HPFAR_FIPA = Field("FIPA", 43, 4)  # IPA[51:12]


class ExceptionClass(enum.IntEnum):
    UNKNOWN = 0x00
    WFX = 0x01
    ILLEGAL_STATE = 0x0E
    SVC64 = 0x15
    HVC64 = 0x16
    SMC64 = 0x17
    SYSREG = 0x18
    IABT_LOWER = 0x20
    IABT_SAME = 0x21
    PC_ALIGN = 0x22
    DABT_LOWER = 0x24
    DABT_SAME = 0x25
    SP_ALIGN = 0x26
    SERROR = 0x2F
    BRK64 = 0x3C


def exception_class_name(esr: int) -> str:
    ec = ESR_EC.get(esr)
    try:
        return ExceptionClass(ec).name
    except ValueError:
        return f"EC_{ec:#04x}"


def describe_esr(esr: int) -> str:
    ec = ESR_EC.get(esr)
    text = f"ESR_EL2={esr:#x} ({exception_class_name(esr)}"
    if ec in (ExceptionClass.DABT_LOWER, ExceptionClass.DABT_SAME, ExceptionClass.IABT_LOWER,
              ExceptionClass.IABT_SAME):
        dfsc = ISS_DFSC.get(esr)
        dec = decode_fault_status(dfsc)
        text += f", {dec[0].name.lower()} fault level {dec[1]}" if dec else f", DFSC {dfsc:#x}"
        if ec in (ExceptionClass.DABT_LOWER, ExceptionClass.DABT_SAME):
            text += ", write" if ISS_WNR.get(esr) else ", read"
        if ISS_S1PTW.get(esr):
            text += ", on stage-1 walk"
    return text + ")"


# ---------------------------------------------------------------------------------------------
# Register values for a regime.


@dataclass(frozen=True)
class Stage1Regs:
    """What the firmware programs for the EL2 stage-1 regime: HCR_EL2 |= hcr_el2_set (E2H for the
    EL2&0 "hVHE" regime; 0 for the non-VHE EL2 regime), MAIR/TCR/TTBR0, then SCTLR_EL2 |= sctlr_set."""

    mair_el2: int
    tcr_el2: int
    ttbr0_el2: int
    sctlr_el2_set: int
    hcr_el2_set: int = 0

    stage = Stage.S1


@dataclass(frozen=True)
class Stage2Regs:
    """What the firmware programs for a guest stage 2, then HCR_EL2 |= hcr_el2_set.

    HCR_EL2.DC makes the disabled EL1&0 stage 1 behave as Normal write-back memory, so the
    combined attributes an ``AT S12E1*`` reports are stage 2's MemAttr, not stage 1's Device.
    """

    vtcr_el2: int
    vttbr_el2: int
    hcr_el2_set: int

    stage = Stage.S2


RegimeRegs = Stage1Regs | Stage2Regs


def ttbr_baddr(pgd_pa: int, geom: Geometry) -> int:
    """The base-address bits of TTBR0_EL2 / VTTBR_EL2 for a PGD at ``pgd_pa``."""
    align = geom.pgd_pages * geom.granule.size if geom.stage is Stage.S2 else 64
    if pgd_pa % align:
        raise ValueError(f"pgd_pa: {pgd_pa:#x} must be aligned to {align:#x} for {geom.describe()}")
    value = pgd_pa & TTBR_BADDR.mask
    if pgd_pa >> 48:
        if not (geom.granule is Granule.K64 and geom.pa_bits == 52):
            raise ValueError(f"pgd_pa: {pgd_pa:#x} is beyond 48 bits; only 64K with a 52-bit PA size")
        value |= TTBR_BADDR_51_48.prep(pgd_pa >> 48)
    return value


def sl0_encoding(granule: Granule, start_level: int) -> int:
    """VTCR_EL2.SL0 for a start level: 4K: 2 - level (mod 4); 16K/64K: 3 - level."""
    if granule is Granule.K4:
        return (2 - start_level) & 3
    return 3 - start_level


def tcr_el2(geom: Geometry) -> int:
    return (
        T0SZ.prep(64 - geom.ia_bits)
        | IRGN0.prep(RGN_WBWA)
        | ORGN0.prep(RGN_WBWA)
        | SH0.prep(SH_INNER)
        | TG0.prep(TG0_ENCODING[geom.granule])
        | PS.prep(pa_size_encoding(geom.pa_bits))
        | TCR_EL2_RES1
    )


def vtcr_el2(geom: Geometry) -> int:
    return (
        T0SZ.prep(64 - geom.ia_bits)
        | VTCR_SL0.prep(sl0_encoding(geom.granule, geom.start_level))
        | IRGN0.prep(RGN_WBWA)
        | ORGN0.prep(RGN_WBWA)
        | SH0.prep(SH_INNER)
        | TG0.prep(TG0_ENCODING[geom.granule])
        | PS.prep(pa_size_encoding(geom.pa_bits))
        | VTCR_RES1
    )


def stage1_regs(geom: Geometry, pgd_pa: int) -> Stage1Regs:
    return Stage1Regs(
        mair_el2=mair_value(),
        tcr_el2=tcr_el2(geom),
        ttbr0_el2=ttbr_baddr(pgd_pa, geom),
        sctlr_el2_set=SCTLR_M.prep(1) | SCTLR_C.prep(1) | SCTLR_I.prep(1),
    )


def stage2_regs(geom: Geometry, pgd_pa: int, vmid: int = 1) -> Stage2Regs:
    return Stage2Regs(
        vtcr_el2=vtcr_el2(geom),
        vttbr_el2=ttbr_baddr(pgd_pa, geom) | VTTBR_VMID.prep(vmid & 0xFF),
        hcr_el2_set=HCR_VM.prep(1) | HCR_RW.prep(1) | HCR_DC.prep(1),
    )


def regime_regs(geom: Geometry, pgd_pa: int, vmid: int = 1) -> RegimeRegs:
    return stage1_regs(geom, pgd_pa) if geom.stage is Stage.S1 else stage2_regs(geom, pgd_pa, vmid)
