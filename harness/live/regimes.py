"""Live register values to the regimes in use: the model's registers-to-geometry function
(:func:`harness.arch.regimes.regimes_from_registers`), fed the registers it reads."""

from __future__ import annotations

from collections.abc import Mapping

from harness.arch.regimes import REGISTER_KEYS, LiveRegime, RegisterDecodeError
from harness.arch.regimes import regimes_from_registers as _decode

# What attach reads from a live target: the decoder's registers (ID_AA64MMFR0_EL1 gives PAMax and
# the granules), and a few more kept in the snapshot for the record.
REGISTERS = REGISTER_KEYS
OPTIONAL_REGISTERS = ("TTBR1_EL2", "ID_AA64MMFR1_EL1", "ID_AA64MMFR2_EL1", "cpsr", "pc")

Regime = LiveRegime

__all__ = ["OPTIONAL_REGISTERS", "REGISTERS", "Regime", "RegisterDecodeError", "regimes_from_registers"]


def regimes_from_registers(regs: Mapping[str, int]) -> list[LiveRegime]:
    """Every regime the registers put in use (stage 1 first); RegisterDecodeError names the field."""
    return _decode({k: v for k, v in regs.items() if k in REGISTER_KEYS})
