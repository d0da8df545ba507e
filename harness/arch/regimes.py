"""Registers back to geometry: the translation regimes live EL2 register values describe.

:func:`regimes_from_registers` takes the raw values of SCTLR_EL2, HCR_EL2, TCR_EL2 (either
layout), TTBR0_EL2, MAIR_EL2, VTCR_EL2, VTTBR_EL2 and ID_AA64MMFR0_EL1 and returns each enabled
regime with its :class:`~harness.arch.geometry.Geometry` and table base:

* ``"el2"``: SCTLR_EL2.M = 1 with HCR_EL2.E2H = 0 (KVM's nVHE hyp stage 1), TCR_EL2 in its
  E2H = 0 layout;
* ``"el2&0"``: SCTLR_EL2.M = 1 with HCR_EL2.E2H = 1 (KVM's hVHE, or a VHE host), TCR_EL2 in
  TCR_EL1's layout, walks through TTBR0_EL2 (the lower VA range);
* ``"stage2"``: HCR_EL2.VM = 1, VTCR_EL2 and VTTBR_EL2.

The rules are the Arm ARM's (``AArch64.GetS1TTWParams``/``GetS2TTWParams``, ``S2InvalidSL``,
``S2InconsistentSL``, ``PhysicalAddressSize``, ``S1TTBaseAddress``/``S2TTBaseAddress``):
PAMax comes from ID_AA64MMFR0_EL1.PARange; PS/IPS larger than the descriptor format (48 bits
without 64K or DS) or than PAMax reads as the smaller size; DS has effect only with 4K/16K
(VTCR_EL2.SL2 only with 4K and DS = 1). Values the architecture forbids or leaves reserved,
or that the model does not cover, raise :class:`RegisterDecodeError` naming the register field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from harness.arch.bits import Field
from harness.arch.geometry import (
    MIN_IA_BITS,
    PA_SIZES,
    Geometry,
    GeometryError,
    Granule,
    Stage,
    max_ia_bits,
)
from harness.arch.registers import (
    HCR_E2H,
    HCR_VM,
    MMFR0_PARANGE,
    MMFR0_TGRAN4,
    MMFR0_TGRAN4_2,
    MMFR0_TGRAN16,
    MMFR0_TGRAN16_2,
    MMFR0_TGRAN64,
    MMFR0_TGRAN64_2,
    PS,
    SCTLR_M,
    SCTLR_WXN,
    SH0,
    T0SZ,
    TCR_E2H_DS,
    TCR_E2H_EPD0,
    TCR_E2H_IPS,
    TCR_EL2_DS,
    TG0,
    TG0_ENCODING,
    VTCR_DS,
    VTCR_SL0,
    VTCR_SL2,
    effective_pa_bits,
    ttbr_table_base,
)
from harness.errors import InputError

REGISTER_KEYS = ("SCTLR_EL2", "HCR_EL2", "TCR_EL2", "TTBR0_EL2", "VTCR_EL2", "VTTBR_EL2", "MAIR_EL2",
                 "ID_AA64MMFR0_EL1")
_TG0_GRANULE = {code: g for g, code in TG0_ENCODING.items()}


class RegisterDecodeError(InputError):
    """Register values that describe no regime the Arm ARM allows (or the model covers); the
    message names the register and field."""


@dataclass(frozen=True)
class LiveRegime:
    name: str  # "el2" (E2H=0 stage 1), "el2&0" (E2H=1 stage 1), "stage2"
    geom: Geometry
    root: int  # table base PA from TTBR0_EL2 / VTTBR_EL2 BADDR (incl. [51:48] forms)
    mair: int | None  # MAIR_EL2 for stage 1, None for stage 2
    registers: dict[str, int]  # the raw values used

    @property
    def wxn(self) -> bool:
        """SCTLR_EL2.WXN for the stage-1 regimes (memory writable at EL2 is execute-never at EL2);
        False for stage 2, which it does not govern. What the walks take as ``wxn``."""
        return self.geom.stage is Stage.S1 and bool(SCTLR_WXN.get(self.registers.get("SCTLR_EL2", 0)))

    @property
    def sh0(self) -> int:
        """TCR_EL2/VTCR_EL2.SH0: the shareability of translated memory with DS = 1."""
        return SH0.get(self.registers["VTCR_EL2" if self.geom.stage is Stage.S2 else "TCR_EL2"])


@dataclass(frozen=True)
class _Pe:
    """What ID_AA64MMFR0_EL1 says about the PE."""

    mmfr0: int

    @property
    def pamax(self) -> int:
        enc = MMFR0_PARANGE.get(self.mmfr0)
        if enc >= len(PA_SIZES):
            raise RegisterDecodeError(
                f"ID_AA64MMFR0_EL1.PARange: expected 0..{len(PA_SIZES) - 1} (32..52 bits), got {enc:#x}")
        return PA_SIZES[enc]

    def granule_support(self, granule: Granule, stage: Stage) -> tuple[bool, bool]:
        """(supported, supported with 52-bit addresses) for a granule at a stage."""
        s1 = {Granule.K4: MMFR0_TGRAN4, Granule.K16: MMFR0_TGRAN16, Granule.K64: MMFR0_TGRAN64}[granule]
        v1 = s1.get(self.mmfr0)
        if granule is Granule.K16:
            ok, wide = v1 in (1, 2), v1 == 2
        elif granule is Granule.K4:
            ok, wide = v1 in (0, 1), v1 == 1
        else:
            ok, wide = v1 == 0, v1 == 0
        if stage is Stage.S2:
            s2: Field = {Granule.K4: MMFR0_TGRAN4_2, Granule.K16: MMFR0_TGRAN16_2,
                         Granule.K64: MMFR0_TGRAN64_2}[granule]
            v2 = s2.get(self.mmfr0)
            if v2 != 0:
                ok, wide = v2 in (2, 3), v2 == 3 or (granule is Granule.K64 and v2 == 2)
        return ok, wide


def _require(regs: Mapping[str, int], key: str) -> int:
    if key not in regs:
        raise RegisterDecodeError(f"{key}: missing; expected the keys {', '.join(REGISTER_KEYS)}")
    value = regs[key]
    if not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise RegisterDecodeError(f"{key}: expected a 64-bit unsigned value, got {value!r}")
    return value


def _granule(reg: str, value: int, pe: _Pe, stage: Stage) -> Granule:
    code = TG0.get(value)
    if code not in _TG0_GRANULE:
        raise RegisterDecodeError(f"{reg}.TG0: {code:#04b} is a reserved granule encoding")
    granule = _TG0_GRANULE[code]
    if not pe.granule_support(granule, stage)[0]:
        raise RegisterDecodeError(
            f"{reg}.TG0: the {granule.label} granule is not implemented at stage {int(stage)} "
            "(ID_AA64MMFR0_EL1)")
    return granule


def _lpa2(reg: str, ds: int, granule: Granule, pe: _Pe, stage: Stage) -> bool:
    """The effective DS: it applies to 4K and 16K only, and needs FEAT_LPA2 for the granule."""
    if not ds or granule is Granule.K64:
        return False
    if not pe.granule_support(granule, stage)[1]:
        raise RegisterDecodeError(
            f"{reg}.DS: 1, but ID_AA64MMFR0_EL1 gives the {granule.label} granule no 52-bit "
            "support (FEAT_LPA2)")
    return True


def _ia_bits(reg: str, value: int, granule: Granule, lpa2: bool) -> int:
    t0sz = T0SZ.get(value)
    ia = 64 - t0sz
    hi = max_ia_bits(granule, lpa2)
    if not MIN_IA_BITS <= ia <= hi:
        raise RegisterDecodeError(
            f"{reg}.T0SZ: {t0sz} gives a {ia}-bit input; expected {64 - hi}..{64 - MIN_IA_BITS} "
            f"({MIN_IA_BITS}..{hi} bits) for the {granule.label} granule"
            f"{' with DS = 1' if lpa2 else ''} (smaller values are CONSTRAINED UNPREDICTABLE "
            "or need FEAT_TTST)")
    return ia


def _create(reg: str, *args: object, **kw: object) -> Geometry:
    try:
        return Geometry.create(*args, **kw)  # type: ignore[arg-type]
    except GeometryError as exc:
        raise RegisterDecodeError(f"{reg}: {exc}") from exc


def _stage1(regs: Mapping[str, int], hcr: int, pe: _Pe) -> LiveRegime:
    tcr = _require(regs, "TCR_EL2")
    ttbr = _require(regs, "TTBR0_EL2")
    mair = _require(regs, "MAIR_EL2")
    e2h = bool(HCR_E2H.get(hcr))
    granule = _granule("TCR_EL2", tcr, pe, Stage.S1)
    if e2h:
        if TCR_E2H_EPD0.get(tcr):
            raise RegisterDecodeError("TCR_EL2.EPD0: 1 (E2H = 1 layout): walks through TTBR0_EL2 are "
                                      "disabled, so the lower VA range has no tables to decode")
        ds, ps = TCR_E2H_DS.get(tcr), TCR_E2H_IPS.get(tcr)
    else:
        ds, ps = TCR_EL2_DS.get(tcr), PS.get(tcr)
    lpa2 = _lpa2("TCR_EL2", ds, granule, pe, Stage.S1)
    ia = _ia_bits("TCR_EL2", tcr, granule, lpa2)
    pa = effective_pa_bits(ps, granule, lpa2, pe.pamax)
    geom = _create("TCR_EL2", Stage.S1, granule, ia, pa, pamax=pe.pamax, lpa2=lpa2, e2h=e2h)
    used = {k: regs[k] for k in ("SCTLR_EL2", "HCR_EL2", "TCR_EL2", "TTBR0_EL2", "MAIR_EL2",
                                  "ID_AA64MMFR0_EL1")}
    return LiveRegime("el2&0" if e2h else "el2", geom, ttbr_table_base(ttbr, geom), mair, used)


def _stage2_start_level(vtcr: int, granule: Granule, lpa2: bool) -> int:
    sl0 = VTCR_SL0.get(vtcr)
    if granule is Granule.K4:
        if lpa2 and VTCR_SL2.get(vtcr):
            if sl0 != 0:
                raise RegisterDecodeError(f"VTCR_EL2.SL2/SL0: SL2 = 1 with SL0 = {sl0:#04b} is reserved "
                                          "(level -1 is SL2 = 1, SL0 = 0)")
            return -1
        if sl0 == 3:
            raise RegisterDecodeError("VTCR_EL2.SL0: 0b11 with 4K is start level 3, which needs "
                                      "FEAT_TTST (not modelled)")
        return 2 - sl0
    if granule is Granule.K64 and sl0 == 3:
        raise RegisterDecodeError("VTCR_EL2.SL0: 0b11 is reserved with the 64K granule")
    return 3 - sl0


def _stage2(regs: Mapping[str, int], pe: _Pe) -> LiveRegime:
    vtcr = _require(regs, "VTCR_EL2")
    vttbr = _require(regs, "VTTBR_EL2")
    granule = _granule("VTCR_EL2", vtcr, pe, Stage.S2)
    lpa2 = _lpa2("VTCR_EL2", VTCR_DS.get(vtcr), granule, pe, Stage.S2)
    ia = _ia_bits("VTCR_EL2", vtcr, granule, lpa2)
    pa = effective_pa_bits(PS.get(vtcr), granule, lpa2, pe.pamax)
    level = _stage2_start_level(vtcr, granule, lpa2)
    geom = _create("VTCR_EL2.SL0", Stage.S2, granule, ia, pa, level, pamax=pe.pamax, lpa2=lpa2)
    used = {k: regs[k] for k in ("HCR_EL2", "VTCR_EL2", "VTTBR_EL2", "ID_AA64MMFR0_EL1")}
    return LiveRegime("stage2", geom, ttbr_table_base(vttbr, geom), None, used)


def regimes_from_registers(regs: Mapping[str, int]) -> list[LiveRegime]:
    """The enabled EL2 translation regimes (stage 1 first, then stage 2) that ``regs`` describe.
    Keys other than :data:`REGISTER_KEYS` (e.g. TTBR1_EL2, pc) are ignored; a key a regime needs
    and ``regs`` lacks is an error naming it."""
    sctlr = _require(regs, "SCTLR_EL2")
    hcr = _require(regs, "HCR_EL2")
    pe = _Pe(_require(regs, "ID_AA64MMFR0_EL1"))
    pe.pamax  # noqa: B018 -- a reserved PARange is refused even with no regime enabled
    out: list[LiveRegime] = []
    if SCTLR_M.get(sctlr):
        out.append(_stage1(regs, hcr, pe))
    if HCR_VM.get(hcr):
        out.append(_stage2(regs, pe))
    return out
