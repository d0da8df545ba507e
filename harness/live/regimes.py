"""Live register values to the regimes in use, through the model's registers-to-geometry function.

The decoding belongs to the model (``harness.arch.regimes.regimes_from_registers``, issue 12:
TCR_EL2 in both layouts, VTCR_EL2 with DS, HCR_EL2.E2H, ID_AA64MMFR0_EL1). Until it is in the
tree, :func:`_fallback_regimes` decodes only what the model already covers (E2H = 0, DS = 0) and
refuses the rest with a named reason. TEMPORARY: delete the fallback when the model's lands.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from harness.arch.geometry import Geometry, Granule, Stage
from harness.arch.registers import (
    HCR_E2H,
    HCR_VM,
    PS,
    SCTLR_M,
    T0SZ,
    TG0,
    TTBR_BADDR,
    TTBR_BADDR_51_48,
    VTCR_DS,
    VTCR_SL0,
)
from harness.errors import InputError

# What attach reads from a live target. ID_AA64MMFR0_EL1 gives PARange (PAMax) and the granules.
REGISTERS = ("SCTLR_EL2", "HCR_EL2", "TCR_EL2", "TTBR0_EL2", "VTCR_EL2", "VTTBR_EL2", "MAIR_EL2",
             "ID_AA64MMFR0_EL1")
OPTIONAL_REGISTERS = ("TTBR1_EL2", "ID_AA64MMFR1_EL1", "ID_AA64MMFR2_EL1", "cpsr", "pc")


class Regime(Protocol):
    """One translation regime in use (the model's ``LiveRegime``)."""

    @property
    def name(self) -> str: ...  # "el2", "el2&0" or "stage2"

    @property
    def geom(self) -> Geometry: ...

    @property
    def root(self) -> int: ...

    @property
    def mair(self) -> int | None: ...

    @property
    def registers(self) -> dict[str, int]: ...


def regimes_from_registers(regs: Mapping[str, int]) -> list[Regime]:
    """Every regime the registers put in use (stage 1 first), via the model when it has one."""
    try:
        mod = importlib.import_module("harness.arch.regimes")
    except ModuleNotFoundError:
        return list(_fallback_regimes(regs))
    func = cast(Callable[[Mapping[str, int]], list[Regime]], mod.regimes_from_registers)
    return list(func(regs))


# ---------------------------------------------------------------------------------------------
# TEMPORARY fallback (E2H = 0, DS = 0 only): remove when harness.arch.regimes is in main.


class RegisterDecodeError(InputError):
    """Register values the decoder cannot turn into a regime (the message names the field)."""


@dataclass(frozen=True)
class _LiveRegime:
    name: str
    geom: Geometry
    root: int
    mair: int | None
    registers: dict[str, int] = field(default_factory=dict)


_TG0 = {0b00: Granule.K4, 0b01: Granule.K64, 0b10: Granule.K16}
_PA_SIZES = (32, 36, 40, 42, 44, 48, 52)
TCR_DS = 32  # TCR_EL2.DS (E2H = 0 layout) and VTCR_EL2.DS


def _need(regs: Mapping[str, int], name: str) -> int:
    if name not in regs:
        raise RegisterDecodeError(f"{name}: not among the registers read ({', '.join(sorted(regs))})")
    return regs[name]


def _root(ttbr: int, geom: Geometry) -> int:
    root = ttbr & TTBR_BADDR.mask & ~1
    if geom.granule is Granule.K64 and geom.pa_bits == 52:
        root = (root & ~TTBR_BADDR_51_48.mask) | (TTBR_BADDR_51_48.get(ttbr) << 48)
    return root


def _pa_bits(ps: int, what: str) -> int:
    if ps >= len(_PA_SIZES):
        raise RegisterDecodeError(f"{what}.PS: reserved encoding {ps}")
    return _PA_SIZES[ps]


def _fallback_regimes(regs: Mapping[str, int]) -> list[_LiveRegime]:
    out: list[_LiveRegime] = []
    hcr = _need(regs, "HCR_EL2")
    if SCTLR_M.get(_need(regs, "SCTLR_EL2")):
        if HCR_E2H.get(hcr):
            raise RegisterDecodeError("HCR_EL2.E2H = 1 (the EL2&0 regime) needs the model's "
                                      "harness.arch.regimes (issue 12), not in this tree yet")
        tcr = _need(regs, "TCR_EL2")
        if (tcr >> TCR_DS) & 1:
            raise RegisterDecodeError("TCR_EL2.DS = 1 (FEAT_LPA2) needs the model's harness.arch.regimes")
        granule = _TG0.get(TG0.get(tcr))
        if granule is None:
            raise RegisterDecodeError(f"TCR_EL2.TG0: reserved encoding {TG0.get(tcr)}")
        geom = Geometry.create(Stage.S1, granule, 64 - T0SZ.get(tcr), _pa_bits(PS.get(tcr), "TCR_EL2"))
        ttbr = _need(regs, "TTBR0_EL2")
        out.append(_LiveRegime("el2", geom, _root(ttbr, geom), _need(regs, "MAIR_EL2"),
                               {"SCTLR_EL2": regs["SCTLR_EL2"], "HCR_EL2": hcr, "TCR_EL2": tcr,
                                "TTBR0_EL2": ttbr, "MAIR_EL2": regs["MAIR_EL2"]}))
    if HCR_VM.get(hcr):
        vtcr = _need(regs, "VTCR_EL2")
        if VTCR_DS.get(vtcr):
            raise RegisterDecodeError("VTCR_EL2.DS = 1 (FEAT_LPA2) needs the model's harness.arch.regimes")
        granule = _TG0.get(TG0.get(vtcr))
        if granule is None:
            raise RegisterDecodeError(f"VTCR_EL2.TG0: reserved encoding {TG0.get(vtcr)}")
        sl0 = VTCR_SL0.get(vtcr)
        start = 2 - sl0 if granule is Granule.K4 else 3 - sl0
        if start < 0:
            raise RegisterDecodeError(f"VTCR_EL2.SL0: {sl0} is reserved for the {granule.label} granule with DS = 0")
        geom = Geometry.create(Stage.S2, granule, 64 - T0SZ.get(vtcr), _pa_bits(PS.get(vtcr), "VTCR_EL2"), start)
        vttbr = _need(regs, "VTTBR_EL2")
        out.append(_LiveRegime("stage2", geom, _root(vttbr, geom), None,
                               {"HCR_EL2": hcr, "VTCR_EL2": vtcr, "VTTBR_EL2": vttbr}))
    return out
