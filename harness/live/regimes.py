"""Live register values to the regimes in use: the model's registers-to-geometry function
(:func:`harness.arch.regimes.regimes_from_registers`), fed the registers it reads, per vCPU.

On a system with several CPUs each one has its own EL2 registers: the hypervisor's stage 1 is
usually shared (same TTBR0_EL2, TCR_EL2, MAIR_EL2 everywhere), while HCR_EL2/VTTBR_EL2/VTCR_EL2
follow what the CPU runs (a guest's stage 2 with its VMID, pKVM's host stage 2, nothing).
:func:`regimes_by_cpu` decodes every CPU's registers and merges the regimes that are the same one
(:func:`regime_key`: everything the walk reads), each with the CPUs that use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from harness.arch.geometry import Geometry
from harness.arch.regimes import RANGE_KEYS, REGISTER_KEYS, LiveRegime, RegisterDecodeError
from harness.arch.regimes import regimes_from_registers as _decode

# What attach reads from a live target: the decoder's registers (ID_AA64MMFR0_EL1 gives PAMax and
# the granules), the other ranges' when the target has them (TTBR1_EL2, EL1&0), and a few more
# kept in the snapshot for the record.
REGISTERS = REGISTER_KEYS
OPTIONAL_REGISTERS = ("TTBR1_EL2", "ID_AA64MMFR1_EL1", "ID_AA64MMFR2_EL1", "cpsr", "pc")
# Read only when asked (attach --all-ranges): they add EL1&0's ranges (an nVHE host kernel's own
# tables, a guest's stage 1), hundreds of table pages. TTBR1_EL2 is always read: EL2&0's upper
# range is in use only with EPD1 = 0 (a VHE host kernel; KVM's hVHE sets EPD1).
ALL_RANGES_REGISTERS = tuple(k for k in RANGE_KEYS if k != "TTBR1_EL2")
# Where QEMU's gdbstub (org.qemu.gdb.arm.sys.regs) names a register otherwise than the Arm ARM.
GDB_NAMES = {"SCTLR_EL1": "SCTLR"}

Regime = LiveRegime

__all__ = ["ALL_RANGES_REGISTERS", "GDB_NAMES", "OPTIONAL_REGISTERS", "REGISTERS", "Regime", "RegimeKey",
           "RegimeUse", "RegisterDecodeError", "regime_key", "regimes_by_cpu", "regimes_from_registers"]


def regimes_from_registers(regs: Mapping[str, int]) -> list[LiveRegime]:
    """Every regime the registers put in use (stage 1 first); RegisterDecodeError names the field."""
    return _decode({k: v for k, v in regs.items() if k in REGISTER_KEYS or k in RANGE_KEYS})


@dataclass(frozen=True)
class RegimeKey:
    """What makes two CPUs' regimes one: the geometry (granule, sizes, levels, DS, E2H, PAMax),
    the table base, and every other register value the walk reads: TCR_EL2 / VTCR_EL2 whole,
    TTBR0_EL2 / VTTBR_EL2 whole (ASID, VMID, CnP), MAIR_EL2 and SCTLR_EL2.WXN for stage 1.
    HCR_EL2 and SCTLR_EL2's other bits may differ between CPUs sharing a regime."""

    name: str
    geom: Geometry
    root: int
    control: int  # TCR_EL2 or VTCR_EL2
    base: int  # TTBR0_EL2 or VTTBR_EL2
    mair: int | None
    wxn: bool


def regime_key(r: LiveRegime) -> RegimeKey:
    return RegimeKey(r.name, r.geom, r.root, r.registers[r.control], r.registers[r.base], r.mair, r.wxn)


@dataclass(frozen=True)
class RegimeUse:
    """One regime and the CPUs (QEMU's CPU indexes, ascending) whose registers put it in use;
    ``regime.registers`` are the first of them's."""

    regime: LiveRegime
    cpus: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.regime.name


class CpuRegisterDecodeError(RegisterDecodeError):
    """One CPU's registers describe no regime the decoder accepts (the message names the CPU)."""


def regimes_by_cpu(cpus: Mapping[int, Mapping[str, int]]) -> list[RegimeUse]:
    """The distinct regimes the CPUs' registers put in use, in order of first use (CPUs ascending,
    stage 1 before stage 2 on each), each with every CPU using it. A CPU with no regime enabled
    (SCTLR_EL2.M = 0, HCR_EL2.VM = 0) adds none; one whose registers cannot be decoded raises
    :class:`CpuRegisterDecodeError` naming it."""
    found: dict[RegimeKey, tuple[LiveRegime, list[int]]] = {}
    for cpu in sorted(cpus):
        try:
            regimes = regimes_from_registers(cpus[cpu])
        except RegisterDecodeError as exc:
            raise CpuRegisterDecodeError(f"CPU {cpu}: {exc}") from exc
        for r in regimes:
            found.setdefault(regime_key(r), (r, []))[1].append(cpu)
    return [RegimeUse(r, tuple(users)) for r, users in found.values()]
