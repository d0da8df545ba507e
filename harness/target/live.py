"""A live update on the target: a :mod:`harness.core.tlb` step list applied in order, the
descriptor writes by the host into guest RAM (the vCPU is stopped between requests), each run of
invalidations as the instructions of one ``LIVE`` request (:data:`harness.target.mailbox.LIVE_STEP`
records)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from harness.arch import tlbi
from harness.arch.geometry import Geometry, Granule
from harness.arch.tlbi import Insn
from harness.core.tlb import Flush, Step, Tlbi, Write
from harness.target.mailbox import LIVE_STEP


def insns(flushes: Sequence[Tlbi], granule: Granule) -> npt.NDArray[np.void]:
    """The ``LIVE`` steps that perform invalidations as upstream's helpers do: a stage-2 one by IPA
    as ``__kvm_tlb_flush_vmid_ipa`` (``dsb ishst``, ``tlbi ipas2e1is`` with the level hint,
    ``dsb ish``, ``tlbi vmalle1is`` for the combined entries, ``dsb ish``, ``isb``; ``_nsh`` the
    same without IS), a range one IPA page at a time then ``vmalle1is``, a VMID as
    ``vmalls12e1is``; stage 1 ``tlbi vae2is``/``vale2is``/``alle2is``, ``dsb ish``, ``isb``."""
    rows: list[tuple[int, int]] = []
    for s in flushes:
        rows += _tlbi_insns(s, granule)
    out = np.zeros(len(rows), dtype=LIVE_STEP.dtype)
    for i, (insn, a0) in enumerate(rows):
        out[i] = (int(insn), a0 & (2**64 - 1))
    return out


class LiveTarget(Protocol):
    def write_pa(self, pa: int, data: bytes) -> None: ...
    def live(self, steps: npt.ArrayLike) -> int: ...


def apply(target: LiveTarget, steps: Sequence[Step], geom: Geometry) -> int:
    """Perform an update's steps in order: writes by the host, each run of invalidations in one
    ``LIVE`` request (frees need nothing). Returns the requests made."""
    requests = 0
    run: list[Tlbi] = []

    def flush() -> None:
        nonlocal requests, run
        if run:
            target.live(insns(run, geom.granule))
            requests += 1
            run = []

    for s in steps:
        if isinstance(s, Write):
            flush()
            target.write_pa(s.ptep, (s.new & (2**64 - 1)).to_bytes(8, "little"))
        elif isinstance(s, Tlbi):
            run.append(s)
    flush()
    return requests


def _tlbi_insns(s: Tlbi, g: Granule) -> list[tuple[int, int]]:
    level = s.level if s.level is not None and 0 <= s.level <= 3 else None
    match s.kind:
        case Flush.S2_IPA:
            return [(Insn.DSB_ISHST, 0), (Insn.TLBI_IPAS2E1IS, tlbi.operand(s.addr, g, level)),
                    (Insn.DSB_ISH, 0), (Insn.TLBI_VMALLE1IS, 0), (Insn.DSB_ISH, 0), (Insn.ISB, 0)]
        case Flush.S2_IPA_NSH:
            return [(Insn.DSB_NSHST, 0), (Insn.TLBI_IPAS2E1, tlbi.operand(s.addr, g, level)),
                    (Insn.DSB_NSH, 0), (Insn.TLBI_VMALLE1, 0), (Insn.DSB_NSH, 0), (Insn.ISB, 0)]
        case Flush.S2_RANGE:
            rows: list[tuple[int, int]] = [(Insn.DSB_ISHST, 0)]
            rows += [(Insn.TLBI_IPAS2E1IS, tlbi.operand(s.addr + i * g.size, g)) for i in range(s.pages)]
            return [*rows, (Insn.DSB_ISH, 0), (Insn.TLBI_VMALLE1IS, 0), (Insn.DSB_ISH, 0), (Insn.ISB, 0)]
        case Flush.S2_VMID:
            return [(Insn.DSB_ISHST, 0), (Insn.TLBI_VMALLS12E1IS, 0), (Insn.DSB_ISH, 0), (Insn.ISB, 0)]
        case Flush.EL2_VA:
            return [(Insn.DSB_ISHST, 0), (Insn.TLBI_VAE2IS, tlbi.operand(s.addr, g, level)),
                    (Insn.DSB_ISH, 0), (Insn.ISB, 0)]
        case Flush.EL2_VA_LAST:
            return [(Insn.DSB_ISHST, 0), (Insn.TLBI_VALE2IS, tlbi.operand(s.addr, g, level)),
                    (Insn.DSB_ISH, 0), (Insn.ISB, 0)]
        case Flush.EL2_ALL:
            return [(Insn.DSB_ISHST, 0), (Insn.TLBI_ALLE2IS, 0), (Insn.DSB_ISH, 0), (Insn.ISB, 0)]
    raise ValueError(f"kind: unknown flush {s.kind!r}")
