"""Registers back to geometry: the translation regimes live EL2 register values describe.

:func:`regimes_from_registers` takes the raw values of SCTLR_EL2, HCR_EL2, TCR_EL2 (either
layout), TTBR0_EL2, MAIR_EL2, VTCR_EL2, VTTBR_EL2 and ID_AA64MMFR0_EL1 and returns each enabled
regime with its :class:`~harness.arch.geometry.Geometry` and table base:

* ``"el2"``: SCTLR_EL2.M = 1 with HCR_EL2.E2H = 0 (KVM's nVHE hyp stage 1), TCR_EL2 in its
  E2H = 0 layout;
* ``"el2&0"``: SCTLR_EL2.M = 1 with HCR_EL2.E2H = 1 (KVM's hVHE, or a VHE host), TCR_EL2 in
  TCR_EL1's layout, walks through TTBR0_EL2 (the lower VA range);
* ``"el2&0:ttbr1"``: the same regime's upper VA range through TTBR1_EL2 (a VHE host kernel's own
  tables), when TCR_EL2.EPD1 = 0 and TTBR1_EL2 was read;
* ``"el1&0"`` and ``"el1&0:ttbr1"``: SCTLR_EL1.M = 1 (the stopped vCPU's EL1 has its MMU on: an
  nVHE host kernel, a guest's own stage 1), TCR_EL1 and TTBR0_EL1 / TTBR1_EL1, when those were read;
  its output addresses are IPAs when stage 2 is on;
* ``"stage2"``: HCR_EL2.VM = 1, VTCR_EL2 and VTTBR_EL2.

An upper range's walk is its lower range's walk of ``VA - va_base`` (the index bits are the same;
the top bits only select the TTBR): :attr:`LiveRegime.va_base` is ``2**64 - 2**ia_bits`` there, 0
elsewhere, and :meth:`LiveRegime.as_lower_range` gives the TCR value that walks the same tables
through TTBR0 (how a replay installs them).

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
from typing import Any

from harness.arch.bits import Field
from harness.arch.geometry import (
    MIN_IA_BITS,
    PA_SIZES,
    Geometry,
    GeometryError,
    Granule,
    Stage,
    max_ia_bits,
    upper_range_base,
)
from harness.arch.registers import (
    HCR_E2H,
    HCR_TGE,
    HCR_VM,
    IRGN0,
    MMFR0_PARANGE,
    MMFR0_TGRAN4,
    MMFR0_TGRAN4_2,
    MMFR0_TGRAN16,
    MMFR0_TGRAN16_2,
    MMFR0_TGRAN64,
    MMFR0_TGRAN64_2,
    ORGN0,
    PS,
    SCTLR_M,
    SCTLR_WXN,
    SH0,
    T0SZ,
    TCR_E2H_DS,
    TCR_E2H_EPD0,
    TCR_E2H_EPD1,
    TCR_E2H_HA,
    TCR_E2H_HD,
    TCR_E2H_HPD0,
    TCR_E2H_HPD1,
    TCR_E2H_IPS,
    TCR_E2H_IRGN1,
    TCR_E2H_ORGN1,
    TCR_E2H_SH1,
    TCR_E2H_T1SZ,
    TCR_E2H_TBI0,
    TCR_E2H_TBI1,
    TCR_E2H_TG1,
    TCR_EL2_DS,
    TCR_EL2_HA,
    TCR_EL2_HD,
    TG0,
    TG0_ENCODING,
    TG1_ENCODING,
    VTCR_DS,
    VTCR_HA,
    VTCR_SL0,
    VTCR_SL2,
    VTTBR_VMID,
    effective_pa_bits,
    ttbr_table_base,
)
from harness.errors import InputError

REGISTER_KEYS = ("SCTLR_EL2", "HCR_EL2", "TCR_EL2", "TTBR0_EL2", "VTCR_EL2", "VTTBR_EL2", "MAIR_EL2",
                 "ID_AA64MMFR0_EL1")
# Read when present: the upper range of EL2&0, and the EL1&0 regime.
RANGE_KEYS = ("TTBR1_EL2", "SCTLR_EL1", "TCR_EL1", "TTBR0_EL1", "TTBR1_EL1", "MAIR_EL1")
_TG0_GRANULE = {code: g for g, code in TG0_ENCODING.items()}
_TG1_GRANULE = {code: g for g, code in TG1_ENCODING.items()}


class RegisterDecodeError(InputError):
    """Register values that describe no regime the Arm ARM allows (or the model covers); the
    message names the register and field."""


@dataclass(frozen=True)
class LiveRegime:
    name: str  # "el2", "el2&0", "el2&0:ttbr1", "el1&0", "el1&0:ttbr1", "stage2"
    geom: Geometry
    root: int  # table base PA from the TTBR's BADDR (incl. [51:48] forms)
    mair: int | None  # MAIR_EL2 / MAIR_EL1 for stage 1, None for stage 2
    registers: dict[str, int]  # the raw values used
    va_base: int = 0  # the range's lowest input address: 2**64 - 2**ia_bits for a TTBR1 range
    control: str = "TCR_EL2"  # the register of the walk's controls (VTCR_EL2, TCR_EL1)
    base: str = "TTBR0_EL2"  # the table base register (VTTBR_EL2, TTBR1_EL2, TTBR0/1_EL1)
    sctlr: str = "SCTLR_EL2"  # the SCTLR whose WXN applies (SCTLR_EL1 for EL1&0)

    @property
    def upper(self) -> bool:
        """A TTBR1 range (VA[63:ia_bits] all ones)."""
        return self.va_base != 0

    @property
    def wxn(self) -> bool:
        """SCTLR.WXN for the stage-1 regimes (memory writable at the privileged level is execute-never
        there); False for stage 2, which it does not govern. What the walks take as ``wxn``."""
        return self.geom.stage is Stage.S1 and bool(SCTLR_WXN.get(self.registers.get(self.sctlr, 0)))

    @property
    def sh0(self) -> int:
        """The range's SH field (SH0, or SH1 for a TTBR1 range): the shareability of translated
        memory with DS = 1."""
        control = self.registers[self.control]
        return TCR_E2H_SH1.get(control) if self.upper else SH0.get(control)

    @property
    def ha(self) -> bool:
        """TCR/VTCR.HA: the MMU sets a leaf's Access flag instead of faulting (FEAT_HAFDBS)."""
        control = self.registers[self.control]
        if self.geom.stage is Stage.S2:
            return bool(VTCR_HA.get(control))
        return bool((TCR_E2H_HA if self.geom.e2h else TCR_EL2_HA).get(control))

    @property
    def hd(self) -> bool:
        """TCR.HD with HA: a stage-1 write to a DBM = 1 leaf clears its AP[2] instead of faulting
        (stage 2's dirty state, VTCR_EL2.HD with S2 DBM, is not modelled: False there)."""
        if self.geom.stage is Stage.S2:
            return False
        control = self.registers[self.control]
        return self.ha and bool((TCR_E2H_HD if self.geom.e2h else TCR_EL2_HD).get(control))

    def walk_options(self) -> dict[str, Any]:
        """The keywords of the model's walks (:func:`harness.core.translate.translate`) that this
        regime's registers set: SH0 (SH1), SCTLR.WXN, TCR.HA and HD."""
        return {"sh0": self.sh0, "wxn": self.wxn, "ha": self.ha, "hd": self.hd}

    def local(self, address: int) -> int:
        """The input address as the range's walk indexes it (``address - va_base``; an address below
        an upper range maps to 2**ia_bits or above: outside it)."""
        return (address - self.va_base) & ((1 << 64) - 1)

    def as_lower_range(self) -> int:
        """The TCR value (this regime's layout) that walks the same tables through TTBR0 as this
        range's walk does: itself for a lower range; for a TTBR1 range its T1SZ, TG1, SH1, IRGN1,
        ORGN1, TBI1 moved into the TTBR0 fields, EPD0 = 0, EPD1 = 1."""
        tcr = self.registers[self.control]
        if not self.upper:
            return tcr
        moved = [(T0SZ, TCR_E2H_T1SZ.get(tcr)), (TG0, TG0_ENCODING[self.geom.granule]),
                 (SH0, TCR_E2H_SH1.get(tcr)), (IRGN0, TCR_E2H_IRGN1.get(tcr)), (ORGN0, TCR_E2H_ORGN1.get(tcr)),
                 (TCR_E2H_TBI0, TCR_E2H_TBI1.get(tcr)), (TCR_E2H_EPD0, 0), (TCR_E2H_EPD1, 1)]
        for f, v in moved:
            tcr = (tcr & ~f.mask) | f.prep(v)
        return tcr

    def as_both_ranges(self) -> int:
        """The TCR value (two-range layout) whose TTBR1 range walks this range's tables and whose
        TTBR0 range walks a table of the same geometry: :meth:`as_lower_range` with its T0SZ, TG, SH,
        IRGN, ORGN, TBI and HPD copied into the TTBR1 fields, EPD0 = EPD1 = 0. A lower range's walk
        of ``VA`` is then the TTBR1 walk of ``VA + 2**64 - 2**ia_bits`` (the index bits are the same),
        an upper range's is its own; the TTBR0 range is free for another table."""
        if not self.geom.e2h:
            raise ValueError(f"{self.name}: {self.control} has one range (no TTBR1)")
        low = self.as_lower_range()
        copied = [(TCR_E2H_T1SZ, T0SZ.get(low)), (TCR_E2H_TG1, TG1_ENCODING[self.geom.granule]),
                  (TCR_E2H_SH1, SH0.get(low)), (TCR_E2H_IRGN1, IRGN0.get(low)), (TCR_E2H_ORGN1, ORGN0.get(low)),
                  (TCR_E2H_TBI1, TCR_E2H_TBI0.get(low)), (TCR_E2H_HPD1, TCR_E2H_HPD0.get(low)),
                  (TCR_E2H_EPD0, 0), (TCR_E2H_EPD1, 0)]
        tcr = low
        for f, v in copied:
            tcr = (tcr & ~f.mask) | f.prep(v)
        return tcr

    @property
    def upper_base(self) -> int:
        """The lowest input address of a TTBR1 range of this regime's size: ``2**64 - 2**ia_bits``."""
        return upper_range_base(self.geom.ia_bits)


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


def _granule(reg: str, value: int, pe: _Pe, stage: Stage, upper: bool = False) -> Granule:
    field, codes = (TCR_E2H_TG1, _TG1_GRANULE) if upper else (TG0, _TG0_GRANULE)
    code = field.get(value)
    if code not in codes:
        raise RegisterDecodeError(f"{reg}.{field.name}: {code:#04b} is a reserved granule encoding")
    granule = codes[code]
    if not pe.granule_support(granule, stage)[0]:
        raise RegisterDecodeError(
            f"{reg}.{field.name}: the {granule.label} granule is not implemented at stage {int(stage)} "
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


def _ia_bits(reg: str, value: int, granule: Granule, lpa2: bool, upper: bool = False) -> int:
    field = TCR_E2H_T1SZ if upper else T0SZ
    tsz = field.get(value)
    ia = 64 - tsz
    hi = max_ia_bits(granule, lpa2)
    if not MIN_IA_BITS <= ia <= hi:
        raise RegisterDecodeError(
            f"{reg}.{field.name}: {tsz} gives a {ia}-bit input; expected {64 - hi}..{64 - MIN_IA_BITS} "
            f"({MIN_IA_BITS}..{hi} bits) for the {granule.label} granule"
            f"{' with DS = 1' if lpa2 else ''} (smaller values are CONSTRAINED UNPREDICTABLE "
            "or need FEAT_TTST)")
    return ia


def _create(reg: str, *args: object, **kw: object) -> Geometry:
    try:
        return Geometry.create(*args, **kw)  # type: ignore[arg-type]
    except GeometryError as exc:
        raise RegisterDecodeError(f"{reg}: {exc}") from exc


@dataclass(frozen=True)
class _Range:
    """One stage-1 VA range and the registers that describe it."""

    name: str
    control: str  # TCR_EL2 / TCR_EL1
    base: str  # TTBR0_EL2 / TTBR1_EL2 / TTBR0_EL1 / TTBR1_EL1
    mair: str
    sctlr: str
    e2h_layout: bool  # the control register has TCR_EL1's layout (two ranges)
    upper: bool


EL2 = _Range("el2", "TCR_EL2", "TTBR0_EL2", "MAIR_EL2", "SCTLR_EL2", False, False)
EL2_0 = _Range("el2&0", "TCR_EL2", "TTBR0_EL2", "MAIR_EL2", "SCTLR_EL2", True, False)
EL2_0_UPPER = _Range("el2&0:ttbr1", "TCR_EL2", "TTBR1_EL2", "MAIR_EL2", "SCTLR_EL2", True, True)
EL1_0 = _Range("el1&0", "TCR_EL1", "TTBR0_EL1", "MAIR_EL1", "SCTLR_EL1", True, False)
EL1_0_UPPER = _Range("el1&0:ttbr1", "TCR_EL1", "TTBR1_EL1", "MAIR_EL1", "SCTLR_EL1", True, True)


def _disabled(r: _Range, tcr: int) -> bool:
    """EPD0/EPD1: walks through this range's TTBR are disabled."""
    return bool((TCR_E2H_EPD1 if r.upper else TCR_E2H_EPD0).get(tcr)) if r.e2h_layout else False


def _stage1(regs: Mapping[str, int], r: _Range, pe: _Pe) -> LiveRegime:
    tcr = _require(regs, r.control)
    ttbr = _require(regs, r.base)
    mair = _require(regs, r.mair)
    granule = _granule(r.control, tcr, pe, Stage.S1, r.upper)
    if r.e2h_layout:
        if (TCR_E2H_HPD1 if r.upper else TCR_E2H_HPD0).get(tcr):
            raise RegisterDecodeError(f"{r.control}.HPD{int(r.upper)}: 1: hierarchical permissions disabled "
                                      "(FEAT_HPDS) is not modelled")
        ds, ps = TCR_E2H_DS.get(tcr), TCR_E2H_IPS.get(tcr)
    else:
        ds, ps = TCR_EL2_DS.get(tcr), PS.get(tcr)
    lpa2 = _lpa2(r.control, ds, granule, pe, Stage.S1)
    ia = _ia_bits(r.control, tcr, granule, lpa2, r.upper)
    pa = effective_pa_bits(ps, granule, lpa2, pe.pamax)
    geom = _create(r.control, Stage.S1, granule, ia, pa, pamax=pe.pamax, lpa2=lpa2, e2h=r.e2h_layout)
    used = {k: regs[k] for k in (r.sctlr, "HCR_EL2", r.control, r.base, r.mair, "ID_AA64MMFR0_EL1")}
    return LiveRegime(r.name, geom, ttbr_table_base(ttbr, geom), mair, used,
                      va_base=upper_range_base(ia) if r.upper else 0, control=r.control, base=r.base,
                      sctlr=r.sctlr)


def _stage1_ranges(regs: Mapping[str, int], hcr: int, pe: _Pe) -> list[LiveRegime]:
    """EL2's (one range, or EL2&0's two) when SCTLR_EL2.M = 1, then EL1&0's when SCTLR_EL1.M = 1;
    a range is left out when its walks are disabled (EPDn) or its TTBR was not read."""
    out: list[LiveRegime] = []
    groups = []
    if SCTLR_M.get(_require(regs, "SCTLR_EL2")):
        groups.append((EL2_0, EL2_0_UPPER) if HCR_E2H.get(hcr) else (EL2,))
    if "SCTLR_EL1" in regs and "TCR_EL1" in regs and SCTLR_M.get(_require(regs, "SCTLR_EL1")):
        groups.append((EL1_0, EL1_0_UPPER))
    for group in groups:
        tcr = _require(regs, group[0].control)
        live = [r for r in group if not _disabled(r, tcr) and (r.base in regs or r.base in REGISTER_KEYS)]
        if group[0] is EL2_0 and _disabled(EL2_0, tcr) and not live:
            raise RegisterDecodeError("TCR_EL2.EPD0: 1 (E2H = 1 layout): walks through TTBR0_EL2 are "
                                      "disabled, so the lower VA range has no tables to decode")
        out += [_stage1(regs, r, pe) for r in live]
    return out


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
    return LiveRegime("stage2", geom, ttbr_table_base(vttbr, geom), None, used, control="VTCR_EL2",
                      base="VTTBR_EL2")


def regimes_from_registers(regs: Mapping[str, int]) -> list[LiveRegime]:
    """The enabled translation regimes (stage-1 ranges first, then stage 2) that ``regs`` describe.
    :data:`RANGE_KEYS` add the ranges they describe when present; other keys (pc, ...) are
    ignored; a key a regime needs and ``regs`` lacks is an error naming it."""
    _require(regs, "SCTLR_EL2")
    hcr = _require(regs, "HCR_EL2")
    pe = _Pe(_require(regs, "ID_AA64MMFR0_EL1"))
    pe.pamax  # noqa: B018 -- a reserved PARange is refused even with no regime enabled
    out = _stage1_ranges(regs, hcr, pe)
    if HCR_VM.get(hcr):
        out.append(_stage2(regs, pe))
    return out


def guest_vmid(regs: Mapping[str, int]) -> int | None:
    """The VMID of the guest a vCPU was stopped in: HCR_EL2.VM = 1 (stage 2 on), TGE = 0, and a
    VMID other than 0 (which pKVM's host stage 2 uses); None when it was stopped in the host (or
    the hypervisor with no guest's stage 2 loaded)."""
    hcr = regs.get("HCR_EL2", 0)
    if not HCR_VM.get(hcr) or HCR_TGE.get(hcr):
        return None
    vmid = VTTBR_VMID.get(regs.get("VTTBR_EL2", 0))
    return vmid or None
