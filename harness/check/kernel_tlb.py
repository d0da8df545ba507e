"""The kernel walker's TLB maintenance: each operation of a tree's ``pgtable.c`` on live, warm
stage-2 tables, its own invalidations judged and observed (:mod:`harness.check.live`).

The C tables are installed as the stage 2 of VMID 1 (the VMID the host's TLB helpers invalidate,
``firmware/kpgt/host.c``) while the operation runs: the host's own EL2 map is a separate regime,
so the C code's ``tlbi`` instructions act on exactly the TLB entries the warm loads filled.

What the C code wrote is known only as memory before and after (its stores are not traced), so
its steps are reconstructed: every changed slot of a table page that is in the tables before and
after (:func:`harness.core.tlb.writes_between`), then its host requests in order (TLB helpers,
pages freed); the rules judge coverage, level hints and frees against invalidations
(``order_known=False``), not break-before-make. The oracle's own steps (written in order) are
judged the same way; a finding the oracle has too is upstream's behaviour (``upstream_same``).

A caller's duty is done as KVM's callers do it: after ``wrprotect`` (``kvm_mmu_wp_memory_region``)
and after an ``mkold`` that found the page young (``clear_flush_young``), the VMID is flushed.

The hyp stage 1 is judged by the rules only: its inline ``tlbi vae2is``/``vale2is`` are trapped
and recorded with their operands (:meth:`harness.kernel.elf.PayloadElf.tlbi_traps`), but its
tables cannot be live (the host runs on its own EL2 map while the operation runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.arch import tlbi
from harness.arch.geometry import Geometry, Stage
from harness.check import live
from harness.core import tlb
from harness.core.batch import BatchResult, translate_batch
from harness.core.translate import READ, Access, translate
from harness.kernel.driver import Event, PoolView, signed64
from harness.kernel.protocol import EventKind
from harness.target import live as target_live

LIVE_OPS = frozenset({"map", "unmap", "wrprotect", "mkold", "mkyoung", "relax_perms", "split"})
CALLER_FLUSHES = frozenset({"wrprotect", "mkold"})

_HYP_FLUSHES = {EventKind.TLBI_VAE2IS: tlb.Flush.EL2_VA, EventKind.TLBI_VALE2IS: tlb.Flush.EL2_VA_LAST}
_C_FLUSHES = {EventKind.TLBI_VMID_IPA: tlb.Flush.S2_IPA, EventKind.TLBI_VMID_IPA_NSH: tlb.Flush.S2_IPA_NSH,
              EventKind.TLBI_VMID_RANGE: tlb.Flush.S2_RANGE, EventKind.TLBI_VMID: tlb.Flush.S2_VMID}


def c_steps(events: Sequence[Event], hint: Callable[[int | None], int | None]) -> list[tlb.Step]:
    """The host requests of one C operation as steps: TLB helper calls (level hints as the tree's
    ``__tlbi_level`` reads them) and pages returned to the pool."""
    out: list[tlb.Step] = []
    for e in events:
        hyp = _HYP_FLUSHES.get(e.kind)
        if hyp is not None:  # the trapped instruction's own operand: address and TTL as executed
            out.append(tlb.Tlbi(hyp, tlbi.TLBI_ADDR.get(e.a0) << tlbi.TLBI_PAGE_SHIFT, tlbi.ttl_level(e.a0)))
            continue
        flush = _C_FLUSHES.get(e.kind)
        if flush is tlb.Flush.S2_RANGE:
            out.append(tlb.Tlbi(flush, e.a0, None, e.a1))
        elif flush is tlb.Flush.S2_VMID:
            out.append(tlb.Tlbi(flush))
        elif flush is not None:
            out.append(tlb.Tlbi(flush, e.a0, hint(signed64(e.a1))))
        elif (e.kind is EventKind.PUT_PAGE and e.a1 == 0) or e.kind is EventKind.FREE_PAGES_EXACT:
            out.append(tlb.Free(e.a0))
    return out


@dataclass
class Warmed:
    before: PoolView
    root: int
    warm: live.Warm | None


class KernelTlb:
    """The TLB side of a :class:`harness.check.kernel.Session`: warm before each C operation,
    judge and observe after it."""

    def __init__(self, target: Any, geom: Geometry, regs: Any, no_access: Sequence[tuple[int, int]],
                 hint: Callable[[int | None], int | None], rng: np.random.Generator, mmu: bool,
                 enter: Callable[[], object]) -> None:
        self.enter = enter
        self.target = target
        self.geom = geom
        self.regs = regs
        self.no_access = no_access
        self.hint = hint
        self.rng = rng
        self.mmu = mmu and geom.stage is Stage.S2
        self.tally = live.TlbTally()

    def _predict(self, mem: PoolView, root: int) -> Callable[[Any, Access], BatchResult]:
        def p(a: Any, acc: Access) -> BatchResult:
            return translate_batch(mem.words(), mem.base, self.geom, root, a, acc)
        return p

    def before(self, name: str, pool: PoolView, root: int, touched: Any) -> Warmed:
        """Snapshot the tables; for a live operation install them and warm the touched pages."""
        w = None
        if self.mmu and name in LIVE_OPS:
            pred = self._predict(pool, root)
            addrs = live.candidates(touched, pred, self.target.layout.scratch, self.no_access, self.rng)
            self.target.install(self.regs)
            self.enter()  # the host's own EL2 map on now: the operation will not write SCTLR_EL2
            w = live.warm(self.target, Stage.S2, addrs, pred, self.tally.updates + 1)
        return Warmed(pool, root, w)

    def after(self, name: str, op: str, w: Warmed, after: PoolView,
              events: Sequence[Event], young: bool, oracle_steps: Sequence[tlb.Step] | None,
              oracle_root: int | None,
              oracle_before: Callable[[int], int] | None) -> tuple[live.TlbTally, list[tuple[live.TlbFinding, bool]]]:
        """Judge the operation's maintenance and observe its live outcome; returns the findings,
        each with whether the oracle's own steps break the same rule (upstream's behaviour)."""
        tally = live.TlbTally()
        steps: list[tlb.Step] = list(tlb.writes_between(w.before.read64, after.read64, self.geom, w.root))
        steps += c_steps(events, self.hint)
        caller: list[tlb.Tlbi] = []
        if name == "wrprotect" or (name == "mkold" and young):
            caller = [tlb.Tlbi(tlb.Flush.S2_VMID)]
            steps += caller
        j = tlb.judge(steps, self.geom, w.root, w.before.read64, order_known=False)
        live.judged(tally, op, j, live.flush_texts(steps))
        if w.warm is not None:
            try:
                if caller:
                    target_live.apply(self.target, caller, self.geom)
                pair = live.descriptor_pair(
                    lambda a: translate(w.before, self.geom, w.root, a, READ),
                    lambda a: translate(after, self.geom, w.root, a, READ))
                live.observe(self.target, Stage.S2, w.warm, self._predict(after, w.root), op,
                             self.target.layout.scratch, live.flush_texts(steps), tally, pair)
            except BaseException:
                if self.target.alive:
                    self.target.uninstall()
                raise
            # left installed: the session's MMU check that follows installs the tables again,
            # which swaps (uninstalls first), one request fewer
        tally.updates = 1
        upstream: set[str] = set()
        if oracle_steps is not None and oracle_root is not None and oracle_before is not None:
            upstream = set(tlb.judge([*oracle_steps, *caller], self.geom, oracle_root, oracle_before,
                                     order_known=False).counts())
        self.tally.merge(tally)
        return tally, [(f, f.kind in upstream) for f in tally.findings]
