"""System registers the harness programs or reads, each field named once (Arm ARM D19).

TCR_EL2 has two layouts. With HCR_EL2.E2H = 0 (the EL2 regime, KVM's nVHE) it describes one VA
range through TTBR0_EL2: T0SZ [5:0], IRGN0 [9:8], ORGN0 [11:10], SH0 [13:12], TG0 [15:14],
PS [18:16], TBI 20, HA 21, HD 22, bits 23 and 31 RES1, DS 32. With E2H = 1 (the EL2&0 regime,
KVM's hVHE) it has TCR_EL1's layout: T0SZ [5:0], EPD0 7, IRGN0/ORGN0/SH0/TG0 as above,
T1SZ [21:16], A1 22, EPD1 23, IRGN1 [25:24], ORGN1 [27:26], SH1 [29:28], TG1 [31:30]
(16K 0b01, 4K 0b10, 64K 0b11), IPS [34:32], AS 36, TBI0 37, TBI1 38, HA 39, HD 40, HPD0 41,
HPD1 42, DS 59. TCR_EL1 (the EL1&0 regime) has the same layout.
VTCR_EL2 adds SL0 [7:6], VS 19, HA 21, DS 32 and SL2 33 (4K start level -1 with DS = 1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from harness.arch.bits import Field, bit
from harness.arch.geometry import (
    PA_SIZES,
    Geometry,
    Granule,
    Stage,
    oa_format_bits,
    pa_size_encoding,
)

# ---------------------------------------------------------------------------------------------
# Translation control: fields shared by TCR_EL2 (E2H = 0) and VTCR_EL2.
T0SZ = Field("T0SZ", 5, 0)
IRGN0 = Field("IRGN0", 9, 8)
ORGN0 = Field("ORGN0", 11, 10)
SH0 = Field("SH0", 13, 12)
TG0 = Field("TG0", 15, 14)
PS = Field("PS", 18, 16)
TCR_EL2_TBI = bit("TBI", 20)
TCR_EL2_HA = bit("HA", 21)
TCR_EL2_HD = bit("HD", 22)
TCR_EL2_DS = bit("DS", 32)
TCR_EL2_RES1 = (1 << 31) | (1 << 23)
# TCR_EL2 with HCR_EL2.E2H = 1 (TCR_EL1's layout; T0SZ/IRGN0/ORGN0/SH0/TG0 as above).
TCR_E2H_EPD0 = bit("EPD0", 7)
TCR_E2H_T1SZ = Field("T1SZ", 21, 16)
TCR_E2H_A1 = bit("A1", 22)
TCR_E2H_EPD1 = bit("EPD1", 23)
TCR_E2H_IRGN1 = Field("IRGN1", 25, 24)
TCR_E2H_ORGN1 = Field("ORGN1", 27, 26)
TCR_E2H_SH1 = Field("SH1", 29, 28)
TCR_E2H_TG1 = Field("TG1", 31, 30)
TCR_E2H_IPS = Field("IPS", 34, 32)
TCR_E2H_AS = bit("AS", 36)
TCR_E2H_TBI0 = bit("TBI0", 37)
TCR_E2H_TBI1 = bit("TBI1", 38)
TCR_E2H_HA = bit("HA", 39)
TCR_E2H_HD = bit("HD", 40)
TCR_E2H_HPD0 = bit("HPD0", 41)  # FEAT_HPDS: hierarchical permissions disabled (not modelled)
TCR_E2H_HPD1 = bit("HPD1", 42)
TCR_E2H_DS = bit("DS", 59)
VTCR_SL0 = Field("SL0", 7, 6)
VTCR_VS = bit("VS", 19)
VTCR_HA = bit("HA", 21)
VTCR_DS = bit("DS", 32)
VTCR_SL2 = bit("SL2", 33)
VTCR_RES1 = 1 << 31

TG0_ENCODING = {Granule.K4: 0b00, Granule.K64: 0b01, Granule.K16: 0b10}
TG1_ENCODING = {Granule.K16: 0b01, Granule.K4: 0b10, Granule.K64: 0b11}
RGN_WBWA = 0b01  # normal memory, write-back read-allocate write-allocate cacheable
SH_INNER = 0b11
PS_ENCODING_56 = 0b111  # 56 bits (FEAT_D128); otherwise reserved: read as the largest size

# Translation table base registers.
TTBR_BADDR = Field("BADDR", 47, 1)
TTBR_BADDR_52 = Field("BADDR[47:6]", 47, 6)  # 52-bit base form (64K with PS = 52, or DS = 1)
TTBR_BADDR_51_48 = Field("BADDR[51:48]", 5, 2)  # 52-bit base form: PA[51:48] of the base
TTBR_CNP = bit("CnP", 0)
VTTBR_VMID = Field("VMID", 63, 48)  # 16 bits with VTCR_EL2.VS = 1; the harness uses 8 ([55:48])
VMID_BITS = 8  # VTCR_EL2.VS = 0: VMID[15:8] RES0

# HCR_EL2.
HCR_VM = bit("VM", 0)
HCR_RW = bit("RW", 31)  # EL1 is AArch64
HCR_DC = bit("DC", 12)  # EL1&0 stage 1 off behaves as Normal write-back (exposes stage-2 MemAttr)
HCR_TGE = bit("TGE", 27)
HCR_E2H = bit("E2H", 34)

# ID_AA64MMFR0_EL1: the PE's physical address size and granule support.
MMFR0_PARANGE = Field("PARange", 3, 0)  # PA_SIZES encoding (0b0110: 52 bits)
MMFR0_TGRAN16 = Field("TGran16", 23, 20)  # 0: no, 1: yes, 2: yes with 52-bit (FEAT_LPA2)
MMFR0_TGRAN64 = Field("TGran64", 27, 24)  # 0: yes, 0xF: no
MMFR0_TGRAN4 = Field("TGran4", 31, 28)  # 0: yes, 1: yes with 52-bit (FEAT_LPA2), 0xF: no
MMFR0_TGRAN16_2 = Field("TGran16_2", 35, 32)  # stage 2: 0 as TGran16, 1 no, 2 yes, 3 yes 52-bit
MMFR0_TGRAN64_2 = Field("TGran64_2", 39, 36)  # stage 2: 0 as TGran64, 1 no, 2 yes
MMFR0_TGRAN4_2 = Field("TGran4_2", 43, 40)  # stage 2: 0 as TGran4, 1 no, 2 yes, 3 yes 52-bit

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


# FEAT_LPA2 level -1 codes: the level-0..3 scheme has no room for them.
_LEVEL_MINUS_1_STATUS = {FaultKind.ADDRESS_SIZE: 0b101001, FaultKind.TRANSLATION: 0b101011}


def fault_status(kind: FaultKind, level: int) -> int:
    """The 6-bit FST/DFSC value for a fault kind at a level (0..3; -1 for address size and
    translation faults with FEAT_LPA2)."""
    if level == -1:
        if kind not in _LEVEL_MINUS_1_STATUS:
            raise ValueError(f"level: a {kind.name.lower()} fault cannot be at level -1")
        return _LEVEL_MINUS_1_STATUS[kind]
    if not 0 <= level <= 3:
        raise ValueError(f"level: expected -1..3, got {level!r}")
    return (kind.value << 2) | level


def decode_fault_status(fst: int) -> tuple[FaultKind, int] | None:
    for kind, code in _LEVEL_MINUS_1_STATUS.items():
        if fst == code:
            return kind, -1
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


def hpfar_ipa_page(hpfar: int) -> int:
    """The faulting IPA's page address (IPA[51:12]) that HPFAR_EL2.FIPA reports."""
    return HPFAR_FIPA.get(hpfar) << 12


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
    EL2&0 "hVHE" regime; 0 for the non-VHE EL2 regime), MAIR/TCR/TTBR0 (and TTBR1 with E2H: the
    upper range, walked when TCR_EL2.EPD1 = 0), then SCTLR_EL2 |= sctlr_set.

    ``sctlr_el2_set`` is M, C and I for the harness's own tables (SCTLR_EL2.WXN = 0, the walks'
    default); ``harness attach --verify`` adds WXN when the snapshot has it (the payload's code is
    r-x and its data rw-, so it runs under WXN). The firmware's uninstall clears M, C, I and WXN."""

    mair_el2: int
    tcr_el2: int
    ttbr0_el2: int
    sctlr_el2_set: int
    hcr_el2_set: int = 0
    ttbr1_el2: int = 0

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
    """The base-address bits of TTBR0_EL2 / VTTBR_EL2 for a PGD at ``pgd_pa``: the initial table is
    aligned to its own size (the concatenated size at stage 2), at least 64 bytes when the base has
    the 52-bit form, which keeps PA[51:48] in bits [5:2]."""
    align = geom.root_align
    if pgd_pa < 0 or pgd_pa % align:
        raise ValueError(f"pgd_pa: {pgd_pa:#x} must be aligned to {align:#x} for {geom.describe()}")
    if not geom.base_52bit:
        if pgd_pa >> 48:
            raise ValueError(f"pgd_pa: {pgd_pa:#x} is beyond 48 bits; only 64K with a 52-bit PA "
                             "size or lpa2 (DS = 1) has 52-bit table bases")
        return pgd_pa & TTBR_BADDR.mask
    if pgd_pa >> 52:
        raise ValueError(f"pgd_pa: {pgd_pa:#x} is beyond 52 bits")
    return (pgd_pa & TTBR_BADDR_52.mask) | TTBR_BADDR_51_48.prep(pgd_pa >> 48)


def ttbr_table_base(ttbr: int, geom: Geometry) -> int:
    """The initial table's base address a TTBR0_EL2 / VTTBR_EL2 value gives for ``geom``
    (``AArch64.S1TTBaseAddress`` / ``S2TTBaseAddress``): BADDR, with PA[51:48] from bits [5:2]
    in the 52-bit form, aligned down to the table's alignment (the low bits are RES0)."""
    base = ttbr & TTBR_BADDR.mask
    if geom.base_52bit:
        base = (ttbr & TTBR_BADDR_52.mask) | (TTBR_BADDR_51_48.get(ttbr) << 48)
    return base & ~(geom.root_align - 1)


def ps_bits(encoding: int) -> int:
    """The address size a PS/IPS/PARange encoding names (0b111: 56 bits, FEAT_D128)."""
    return 56 if encoding == PS_ENCODING_56 else PA_SIZES[encoding]


def effective_pa_bits(encoding: int, granule: Granule, lpa2: bool, pamax: int) -> int:
    """``AArch64.PhysicalAddressSize``: the configured PS, no larger than the descriptor format
    (52 bits only with 64K or DS = 1) nor than PAMax."""
    return min(ps_bits(encoding), oa_format_bits(granule, lpa2), pamax)


def sl0_encoding(granule: Granule, start_level: int) -> int:
    """VTCR_EL2.SL0 for a start level: 4K: 2 - level (mod 4); 16K/64K: 3 - level."""
    if granule is Granule.K4:
        return (2 - start_level) & 3
    return 3 - start_level


def tcr_el2(geom: Geometry) -> int:
    """TCR_EL2 in the layout HCR_EL2.E2H selects (``geom.e2h``)."""
    common = (
        T0SZ.prep(64 - geom.ia_bits)
        | IRGN0.prep(RGN_WBWA)
        | ORGN0.prep(RGN_WBWA)
        | SH0.prep(SH_INNER)
        | TG0.prep(TG0_ENCODING[geom.granule])
    )
    if not geom.e2h:
        return (common | PS.prep(pa_size_encoding(geom.pa_bits)) | TCR_EL2_RES1
                | TCR_EL2_DS.prep(int(geom.lpa2)))
    # EL2&0: only TTBR0_EL2 walks (EPD1); TTBR1's fields still hold valid values.
    return (
        common
        | TCR_E2H_T1SZ.prep(64 - geom.ia_bits)
        | TCR_E2H_EPD1.prep(1)
        | TCR_E2H_IRGN1.prep(RGN_WBWA)
        | TCR_E2H_ORGN1.prep(RGN_WBWA)
        | TCR_E2H_SH1.prep(SH_INNER)
        | TCR_E2H_TG1.prep(TG1_ENCODING[geom.granule])
        | TCR_E2H_IPS.prep(pa_size_encoding(geom.pa_bits))
        | TCR_E2H_DS.prep(int(geom.lpa2))
    )


def vtcr_el2(geom: Geometry) -> int:
    level_minus_1 = geom.start_level == -1
    return (
        T0SZ.prep(64 - geom.ia_bits)
        | VTCR_SL0.prep(0 if level_minus_1 else sl0_encoding(geom.granule, geom.start_level))
        | IRGN0.prep(RGN_WBWA)
        | ORGN0.prep(RGN_WBWA)
        | SH0.prep(SH_INNER)
        | TG0.prep(TG0_ENCODING[geom.granule])
        | PS.prep(pa_size_encoding(geom.pa_bits))
        | VTCR_RES1
        | VTCR_DS.prep(int(geom.lpa2))
        | VTCR_SL2.prep(int(level_minus_1))
    )


def stage1_regs(geom: Geometry, pgd_pa: int) -> Stage1Regs:
    return Stage1Regs(
        mair_el2=mair_value(),
        tcr_el2=tcr_el2(geom),
        ttbr0_el2=ttbr_baddr(pgd_pa, geom),
        sctlr_el2_set=SCTLR_M.prep(1) | SCTLR_C.prep(1) | SCTLR_I.prep(1),
        hcr_el2_set=HCR_E2H.prep(int(geom.e2h)),
    )


def stage2_regs(geom: Geometry, pgd_pa: int, vmid: int = 1) -> Stage2Regs:
    return Stage2Regs(
        vtcr_el2=vtcr_el2(geom),
        vttbr_el2=ttbr_baddr(pgd_pa, geom) | VTTBR_VMID.prep(vmid & ((1 << VMID_BITS) - 1)),
        hcr_el2_set=HCR_VM.prep(1) | HCR_RW.prep(1) | HCR_DC.prep(1),
    )


def regime_regs(geom: Geometry, pgd_pa: int, vmid: int = 1) -> RegimeRegs:
    return stage1_regs(geom, pgd_pa) if geom.stage is Stage.S1 else stage2_regs(geom, pgd_pa, vmid)
