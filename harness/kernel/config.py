"""Configurations of a tree's walker: what one booted, patched payload runs.

A configuration is the stage, the granule (the build's page size), the input size handed to the
init (hyp ``va_bits`` or stage-2 ``phys_shift``), and the CPU capabilities applied to the image's
alternatives as the kernel's boot would (LPA2, hVHE, stage-2 FWB, TLB range, TTL, BTI). The
default matrix is every combination the tree and the granule support, with input sizes that reach
each start level the firmware can run under (stage 1 needs at least 31 bits: the payload is
identity-mapped at 0x4020_0000).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.arch.geometry import Granule, Stage, stage1_start_level
from harness.errors import InputError
from harness.kernel.tree import TreeApi

# The capabilities every image gets: the boot finalised them (ALWAYS_*), and the kernel-proper
# object's kvm_call_hyp() calls the TLB helpers directly only with VHE (HAS_VIRT_HOST_EXTN;
# the nVHE object has no such site).
BASE_CAPS = ("ALWAYS_BOOT", "ALWAYS_SYSTEM", "HAS_VIRT_HOST_EXTN")
LPA2_GRANULES = (Granule.K4, Granule.K16)


@dataclass(frozen=True)
class KernelConfig:
    stage: Stage
    granule: Granule
    ia_bits: int  # hyp va_bits, or stage-2 phys_shift (IPA bits)
    lpa2: bool = False  # HAS_LPA2: 52-bit descriptors (DS = 1) with 4K/16K
    hvhe: bool = False  # KVM_HVHE: hyp tables for the EL2&0 regime (stage 1)
    fwb: bool = False  # HAS_STAGE2_FWB (stage 2)
    tlb_range: bool = False  # HAS_TLB_RANGE
    ttl: bool = True  # HAS_ARMv8_4_TTL (QEMU -cpu max has FEAT_TTL)
    bti: bool = False  # BTI (takes effect with CONFIG_ARM64_BTI_KERNEL: clang builds)
    label: str = ""  # what runs in it, when not the matrix's own sequences (e.g. "builtin")

    @property
    def name(self) -> str:
        parts = [f"s{int(self.stage)}", self.granule.label, f"{self.ia_bits}bit"]
        parts += [n for n, on in (("lpa2", self.lpa2), ("hvhe", self.hvhe), ("fwb", self.fwb),
                                  ("tlbrange", self.tlb_range), ("bti", self.bti)) if on]
        if not self.ttl:
            parts.append("nottl")
        if self.label:
            parts.append(self.label)
        return "-".join(parts)

    def caps(self) -> tuple[str, ...]:
        out = list(BASE_CAPS)
        out += [c for c, on in (("HAS_LPA2", self.lpa2), ("KVM_HVHE", self.hvhe), ("HAS_STAGE2_FWB", self.fwb),
                                ("HAS_TLB_RANGE", self.tlb_range), ("HAS_ARMv8_4_TTL", self.ttl),
                                ("BTI", self.bti)) if on]
        return tuple(out)

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "stage": int(self.stage), "granule": self.granule.label,
                "ia_bits": self.ia_bits, "lpa2": self.lpa2, "hvhe": self.hvhe, "fwb": self.fwb,
                "tlb_range": self.tlb_range, "ttl": self.ttl, "bti": self.bti}


def stage1_sizes(granule: Granule, lpa2: bool) -> list[int]:
    """Hyp VA sizes (>= 31 bits) that reach each start level the granule has, plus KVM's own (48,
    52 with LPA2 or 64K)."""
    top = 52 if (lpa2 or granule is Granule.K64) else 48
    by_level: dict[int, int] = {}
    for bits in range(31, top + 1):
        by_level.setdefault(stage1_start_level(granule, bits, lpa2), bits)
    return sorted({*by_level.values(), 48, top})


def stage2_sizes(granule: Granule, lpa2: bool) -> list[int]:
    """IPA sizes for kvm_get_vtcr: the smallest KVM allows (32), 40 (KVM's default), 44, 48, and
    52 where the descriptors carry it."""
    top = 52 if (lpa2 or granule is Granule.K64) else 48
    return sorted({32, 36, 40, 44, 48, top})


def matrix(api: TreeApi, granule: Granule, compiler: str, *, stage: Stage | None = None,
           lpa2: bool | None = None, hvhe: bool | None = None) -> list[KernelConfig]:
    """Every configuration the tree supports for this granule (narrowed by the arguments)."""
    out: list[KernelConfig] = []
    lpa2s = [False] + ([True] if api.lpa2 and "HAS_LPA2" in api.caps and granule in LPA2_GRANULES else [])
    if lpa2 is not None:
        if lpa2 and True not in lpa2s:
            raise InputError(f"--lpa2: this tree or the {granule.label} granule has no LPA2 support "
                             "(HAS_LPA2 and 52-bit descriptors need 4K or 16K and CONFIG_ARM64_LPA2)")
        lpa2s = [lpa2]
    hvhes = [False] + ([True] if "KVM_HVHE" in api.caps else [])
    if hvhe is not None:
        if hvhe and True not in hvhes:
            raise InputError("--e2h: this tree has no hVHE (no KVM_HVHE capability in arch/arm64/tools/cpucaps)")
        hvhes = [hvhe]
    bti = compiler == "clang" and "BTI" in api.caps
    fwbs = [False] + ([True] if "HAS_STAGE2_FWB" in api.caps else [])
    for st in (Stage.S1, Stage.S2) if stage is None else (stage,):
        for l2 in lpa2s:
            if st is Stage.S1:
                for h in hvhes:
                    for bits in stage1_sizes(granule, l2):
                        out.append(KernelConfig(st, granule, bits, lpa2=l2, hvhe=h, bti=bti))
                if bti:  # the same build without the BTI capability: no GP on executable hyp leaves
                    out.append(KernelConfig(st, granule, 48, lpa2=l2, bti=False))
            else:
                for bits in stage2_sizes(granule, l2):
                    for f in fwbs:
                        rng = "HAS_TLB_RANGE" in api.caps and f  # range TLBI where upstream uses it (with FWB)
                        out.append(KernelConfig(st, granule, bits, lpa2=l2, fwb=f, tlb_range=rng, bti=bti))
                # the invalidation capabilities each way round: TTL hints off; range TLBI without FWB
                out.append(KernelConfig(st, granule, 40, lpa2=l2, ttl=False, bti=bti))
                if "HAS_TLB_RANGE" in api.caps:
                    out.append(KernelConfig(st, granule, 40, lpa2=l2, tlb_range=True, bti=bti))
    return out


def config_for(stage: Stage, granule: Granule, ia_bits: int, lpa2: bool, hvhe: bool, api: TreeApi,
               compiler: str, what: str = "scenario") -> KernelConfig:
    """The configuration a scenario asks for, if the tree has it (an InputError naming what not)."""
    if lpa2 and not (api.lpa2 and "HAS_LPA2" in api.caps and granule in LPA2_GRANULES):
        raise InputError(f"{what}: lpa2 = true, but this tree or the {granule.label} granule has no LPA2")
    if hvhe and "KVM_HVHE" not in api.caps:
        raise InputError(f"{what}: e2h = true, but this tree has no hVHE (KVM_HVHE)")
    if granule.size not in api.page_sizes:
        raise InputError(f"{what}: granule {granule.label}: this tree has no {granule.label} pages")
    return KernelConfig(stage, granule, ia_bits, lpa2=lpa2, hvhe=hvhe and stage is Stage.S1,
                        bti=compiler == "clang" and "BTI" in api.caps)
