"""The kernel walker's check: a tree's ``pgtable.c`` operations, one by one, against the model's
oracle of upstream (:mod:`harness.core.kvmops`) and against the MMU.

For one configuration (:class:`harness.kernel.config.KernelConfig`) on a booted, patched payload,
every sequence starts from a fresh table (init, then the identity maps of the payload's own
regions), runs its operations on the C code and on the oracle, and after each operation checks:

1. **the oracle**: the return values agree, and the two tables give the same translation (output
   address, permissions, attributes, leaf level, fault kind and level) for every address the
   operation touched and its neighbours, by the model's architectural walk of both; at the end of
   the sequence the whole mapped ranges of both are compared too;
2. **the MMU**: the C code's tables are installed live and probed with ``AT`` (real loads, stores
   and fetches on a sample) by the engine (:func:`harness.check.engine.check_subject`), against the
   model's walk of those bytes;
3. **resources**: table pages held against the oracle's, every reachable table page's reference
   count is one plus its valid entries, the host saw no reference taken on a free page or dropped
   below zero, nothing is left after destroy; cache maintenance the oracle asks for was asked for.

A WARN or BUG the C code hits, a fault (a touch of a freed page faults: free pool pages are unmapped
from the host's own map) and every disagreement is a :class:`Finding` with a ``kind``; findings a
known upstream bug explains (:mod:`harness.check.kernel_bugs`) carry its key.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Stage
from harness.arch.registers import RegimeRegs, Stage1Regs, Stage2Regs, describe_esr, regime_regs
from harness.check import engine, kernel_bugs
from harness.check.kernel_seqs import KOp, KSequence
from harness.check.kernel_tlb import LIVE_OPS, KernelTlb, Warmed
from harness.check.live import TlbTally
from harness.core import kvmops, tlb
from harness.core.batch import BatchResult, translate_batch
from harness.core.dump import mapped_ranges
from harness.core.memory import PagePool, PoolImage
from harness.core.translate import DEFAULT_MAIR, READ, translate
from harness.kernel.config import KernelConfig
from harness.kernel.driver import Event, KernelWalker, OpResult, PoolView, signed64
from harness.kernel.protocol import Build, EventKind, FaultKind, Op, Status
from harness.kernel.tree import TreeApi
from harness.target.layout import Region
from harness.target.mailbox import fetch_stub

U64 = npt.NDArray[np.uint64]
MAX_COMPARE = 4096  # addresses compared per operation (touched ranges are sampled beyond this)
MMU_ACCESS_SAMPLE = 64  # real loads/stores (and fetches) per MMU check
ORACLE_POOL_SIZE = 32 << 20  # the oracle's own pool (its addresses need not be the C pool's: walks are compared)
CMO_KINDS = (EventKind.DCACHE_CLEAN_INVAL_POC, EventKind.ICACHE_INVAL_POU)


@dataclass
class Finding:
    kind: str  # mismatch, return-code, leak, refcount, use-after-free, warn, bug, fault, cmo-missing, tlbi-missing,
    #            tlbi-extra, mmu, vtcr
    config: str
    sequence: str
    op_index: int  # -1: the prologue
    op: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    known: str | None = None  # the key of the known upstream bug that explains it

    def text(self) -> str:
        tag = f" [known bug: {self.known}]" if self.known else ""
        where = f"op {self.op_index}" if self.op_index >= 0 else "prologue"
        return f"{self.kind}{tag}: {self.config} {self.sequence} {where} ({self.op}): {self.message}"

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config, "sequence": self.sequence, "op_index": self.op_index,
                "op": self.op, "message": self.message, "known": self.known, "evidence": _jsonable(self.evidence)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    return v


@dataclass
class SequenceResult:
    config: str
    sequence: KSequence
    ops: int = 0
    checked: int = 0  # translations compared (oracle) + MMU probes
    mmu_checked: int = 0
    expected_warns: int = 0  # WARNs the C code hit exactly where upstream's code does (the API's guards)
    unrecorded_ops: int = 0  # operations whose callbacks overflowed the host's log (no CMO comparison)
    pool_left: int = 0  # pool pages still allocated after destroy (the next sequence needs a fresh payload)
    tlbi_compared: int = 0  # stage-2 TLB invalidations upstream asks for, compared with the C code's
    fetches_skipped: int = 0  # MMU checks without fetch probes (BTI at stage 1: the payload's code is guarded)
    tlb: TlbTally = field(default_factory=TlbTally)  # the operations' TLB maintenance (harness.check.kernel_tlb)
    findings: list[Finding] = field(default_factory=list)
    aborted: str | None = None  # why the sequence stopped early (a fault)
    seconds: float = 0.0

    @property
    def unexplained(self) -> list[Finding]:
        return [f for f in self.findings if f.known is None]

    @property
    def ok(self) -> bool:
        return not self.unexplained

    def as_json(self) -> dict[str, Any]:
        return {"sequence": self.sequence.name, "seed": self.sequence.seed, "index": self.sequence.index,
                "ops": self.ops, "checked": self.checked, "mmu_checked": self.mmu_checked,
                "expected_warns": self.expected_warns, "unrecorded_ops": self.unrecorded_ops,
                "tlbi_compared": self.tlbi_compared, "fetches_skipped": self.fetches_skipped,
                "tlb": self.tlb.counts(),
                "findings": [f.as_json() for f in self.findings], "aborted": self.aborted,
                "script": [op.as_json() for op in self.sequence.ops]}


# -- the two sides ------------------------------------------------------------------------------------
@dataclass
class Tables:
    """One side's table: memory, root, geometry."""

    geom: Geometry
    root: int
    mem: Any  # a TableMemory (PagePool or PoolView)

    def words(self) -> U64:
        return np.asarray(self.mem.words())

    def predict(self, addrs: U64) -> BatchResult:
        return translate_batch(self.words(), self.mem.base, self.geom, self.root, addrs, READ)


def prologue_regions(config: KernelConfig, layout: Any) -> list[Region]:
    """What a table must map for the payload to run on it (identity), as the host maps it first."""
    return list(layout.stage1_regions() if config.stage is Stage.S1 else layout.stage2_regions())


class Session:
    """One configuration on one booted payload: the C side, the oracle, the checks."""

    def __init__(self, walker: KernelWalker, config: KernelConfig, api: TreeApi, series: str,
                 mmu: bool = True, rng_seed: int = 0, pa_bits_52: bool = True) -> None:
        self.kw = walker
        self.target = walker.target
        self.config = config
        self.api = api
        self.series = series
        self.mmu = mmu
        self.rng = np.random.default_rng(rng_seed)
        self.layout = self.target.layout
        self.geom: Geometry | None = None
        self.vtcr = 0
        self.c: Tables | None = None
        self.oracle: kvmops.KernelModel | None = None
        self.features = kvmops.KernelFeatures(hvhe=config.hvhe, lpa2=config.lpa2, fwb=config.fwb, bti=config.bti,
                                              tlb_range=config.tlb_range, series=series,
                                              hyp_build=not self._shared_walks(api), pa_bits_52=pa_bits_52)
        self._shared = self._shared_walks(api)
        self._fetch_proven = False  # one MMU fetch proof of the hVHE execute-never finding per session
        self.tlb: KernelTlb | None = None  # after start(): the TLB maintenance checks

    @staticmethod
    def _shared_walks(api: TreeApi) -> bool:
        """Whether the tree has shared walks, which its nVHE build refuses: the session then runs
        relax_perms and mkyoung on the kernel-proper object, and the oracle models that build."""
        return "SHARED" in api.walk_flags

    # -- set-up ---------------------------------------------------------------------------------------
    def _build_for(self, kop: KOp) -> Build:
        """6.12's nVHE build refuses shared walks: relax_perms and mkyoung run on the kernel-proper
        object there, as a VHE host's fault path runs them."""
        return Build.KERNEL if self._shared and kop.name in ("relax_perms", "mkyoung") else Build.NVHE

    def _stage2_geometry(self, vtcr: int) -> Geometry:
        from harness.arch.regimes import regimes_from_registers

        mmfr0 = self.target.sysreg("ID_AA64MMFR0_EL1")
        regs = {"SCTLR_EL2": 0, "HCR_EL2": 1, "VTCR_EL2": vtcr, "VTTBR_EL2": 0, "ID_AA64MMFR0_EL1": mmfr0}
        return regimes_from_registers(regs)[-1].geom

    def start(self, res: SequenceResult) -> bool:
        """Init both sides and map the payload's regions; False (with a finding) if that failed."""
        cfg = self.config
        if cfg.stage is Stage.S1:
            r = self.kw.op(Op.INIT_HYP, cfg.ia_bits)
            geom = Geometry.create(Stage.S1, cfg.granule, cfg.ia_bits, lpa2=cfg.lpa2, e2h=cfg.hvhe)
        else:
            r = self.kw.op(Op.INIT_S2, cfg.ia_bits, 0, 0)
            if r.status is Status.OK and r.ret == 0:
                self.vtcr = self.kw.state("vtcr")
                geom = self._stage2_geometry(self.vtcr)
            else:
                geom = Geometry.create(Stage.S2, cfg.granule, cfg.ia_bits, lpa2=cfg.lpa2)
        if r.status is not Status.OK or r.ret != 0:
            self._finding(res, "return-code", -1, "init", f"init returned {r.ret} (status {r.status.name})")
            return False
        self.geom = geom
        self.c = Tables(geom, r.ret1, None)
        pool = PagePool(self.layout.pool_base, ORACLE_POOL_SIZE, cfg.granule.size)
        self.oracle = kvmops.KernelModel(geom, pool, self.features)
        if cfg.stage is Stage.S2:
            self._check_vtcr(res)
        no_access = tuple((r.base, r.size) for r in prologue_regions(cfg, self.layout))
        self.tlb = KernelTlb(self.target, geom, self._regs(), no_access, self.oracle.level_hint, self.rng, self.mmu,
                             lambda: self.kw.op(Op.ENTER))
        for reg in prologue_regions(cfg, self.layout):
            kop = KOp("map", reg.base, reg.size, reg.base, reg.prot)
            if not self.step(res, -1, kop, check=False):
                return False
        return True

    def _check_vtcr(self, res: SequenceResult) -> None:
        """kvm_get_vtcr's VTCR_EL2 against the geometry's own encoding (T0SZ, SL0, TG0, DS, SL2)."""
        assert self.geom is not None
        from harness.arch.registers import vtcr_el2

        mask = 0x3F | (0x3 << 6) | (0x3 << 14) | (1 << 32) | (1 << 33)
        want = vtcr_el2(self.geom)
        if (want ^ self.vtcr) & mask:
            self._finding(res, "vtcr", -1, "init",
                          f"kvm_get_vtcr gave VTCR_EL2 {self.vtcr:#x}; the {self.geom.describe()} geometry "
                          f"encodes {want:#x} (T0SZ/SL0/TG0/DS/SL2 differ)")

    # -- one operation ---------------------------------------------------------------------------------
    def _run_c(self, kop: KOp) -> OpResult:
        kw, st2 = self.kw, self.config.stage is Stage.S2
        kp = kvmops.prot_from_model(kop.prot)
        b = self._build_for(kop)
        match kop.name:
            case "map":
                return kw.op(Op.S2_MAP, kop.addr, kop.size, kop.phys, kp, 0, build=b) if st2 else \
                    kw.op(Op.HYP_MAP, kop.addr, kop.size, kop.phys, kp)
            case "unmap":
                return kw.op(Op.S2_UNMAP, kop.addr, kop.size, build=b) if st2 else \
                    kw.op(Op.HYP_UNMAP, kop.addr, kop.size)
            case "wrprotect":
                return kw.op(Op.S2_WRPROTECT, kop.addr, kop.size, build=b)
            case "mkold":
                if self.api.test_clear_young:
                    return kw.op(Op.S2_TEST_CLEAR_YOUNG, kop.addr, self.config.granule.size, 1, build=b)
                return kw.op(Op.S2_MKOLD, kop.addr, build=b)
            case "mkyoung":
                return kw.op(Op.S2_MKYOUNG, kop.addr, build=b)
            case "relax_perms":
                return kw.op(Op.S2_RELAX_PERMS, kop.addr, kp, build=b)
            case "split":
                return kw.op(Op.S2_SPLIT, kop.addr, kop.size, build=b)
            case "get_leaf":
                return kw.op(Op.GET_LEAF, kop.addr)
            case "destroy":
                return kw.op(Op.DESTROY)
        raise ValueError(f"op: unknown operation {kop.name!r}")

    def _run_oracle(self, kop: KOp) -> tuple[int, int, int | None]:
        """The oracle's (return value, second result, leaf level for get_leaf)."""
        o = self.oracle
        assert o is not None
        kp = kvmops.prot_from_model(kop.prot)
        st2 = self.config.stage is Stage.S2
        match kop.name:
            case "map":
                return (o.stage2_map(kop.addr, kop.size, kop.phys, kp) if st2 else
                        o.hyp_map(kop.addr, kop.size, kop.phys, kp)), 0, None
            case "unmap":
                return (o.stage2_unmap(kop.addr, kop.size) if st2 else o.hyp_unmap(kop.addr, kop.size)), 0, None
            case "wrprotect":
                return o.stage2_wrprotect(kop.addr, kop.size), 0, None
            case "mkold":
                if self.api.test_clear_young:
                    return int(o.stage2_test_clear_young(kop.addr, self.config.granule.size, True)), 0, None
                return 0, o.stage2_mkold(kop.addr), None
            case "mkyoung":
                return 0, o.stage2_mkyoung(kop.addr), None
            case "relax_perms":
                return o.stage2_relax_perms(kop.addr, kp), 0, None
            case "split":
                return o.stage2_split(kop.addr, kop.size), 0, None
            case "get_leaf":
                ret, pte, level = o.get_leaf(kop.addr)
                return ret, pte, level
            case "destroy":
                if st2:
                    o.stage2_destroy()
                else:
                    o.hyp_destroy()
                return 0, 0, None
        raise ValueError(f"op: unknown operation {kop.name!r}")

    def step(self, res: SequenceResult, index: int, kop: KOp, check: bool = True) -> bool:
        """Run one operation on both sides and check it; False when the sequence cannot go on."""
        assert self.c is not None and self.oracle is not None and self.geom is not None
        counters0 = self.kw.counters()
        ev0 = len(self.oracle.events)
        warmed = None
        if check and self.tlb is not None and kop.name in LIVE_OPS:
            warmed = self.tlb.before(kop.name, self.c.mem if self.c.mem is not None else self.kw.pool(),
                                     self.c.root, self._touched(kop))
        r = self._run_c(kop)
        res.ops += 1
        if warmed is not None and warmed.warm is not None and r.status is not Status.OK and self.target.alive:
            self.target.uninstall()
        if r.status is Status.FAULTED:
            assert r.fault is not None
            kind = self._fault_kind(r)
            self._finding(res, kind, index, kop.text(), r.fault.text(),
                          {"esr": r.fault.esr, "far": r.fault.far, "elr": r.fault.elr})
            res.aborted = f"{kind} in {kop.text()}"
            return False
        if r.status is not Status.OK:
            self._finding(res, "return-code", index, kop.text(), f"the payload refused the operation: {r.status.name}")
            return False
        o_pool = self.oracle.pool
        o_root = self.oracle.pgd
        o_before = o_pool.words()[: max(o_pool.used_extent(), o_pool.page_size) // 8].copy() \
            if warmed is not None else None
        self.oracle.maint = tlb.MaintLog() if warmed is not None else None
        try:
            o_ret, o_ret1, o_level = self._run_oracle(kop)
        except kvmops.KernelModelError as exc:
            self._finding(res, "oracle", index, kop.text(), f"the oracle cannot run this operation: {exc}")
            return False
        finally:
            o_steps = self.oracle.maint.take() if self.oracle.maint is not None else None
            self.oracle.maint = None
        self._compare_returns(res, index, kop, r, o_ret, o_ret1, o_level)
        self._check_warns(res, index, kop, r, self.oracle.events[ev0:])
        if kop.name == "destroy":
            self._check_destroyed(res, index, kop)
            self._check_counters(res, index, kop, counters0)
            return True
        mem = self.kw.pool()
        self.c = dataclasses.replace(self.c, mem=mem)
        self._check_resources(res, index, kop, mem, counters0)
        if r.events_lost:
            res.unrecorded_ops += 1  # the cache-maintenance and TLBI comparisons need every callback
            if warmed is not None and warmed.warm is not None and self.target.alive:
                self.target.uninstall()
        else:
            self._check_cmo(res, index, kop, r.events, self.oracle.events[ev0:])
            self._check_tlbi(res, index, kop, r.events, self.oracle.events[ev0:])
            if warmed is not None:
                self._check_tlb(res, index, kop, r, warmed, mem, o_steps, o_root, o_before)
        if check:
            addrs = self._touched(kop)
            self._compare_translations(res, index, kop, addrs)
            if self.mmu:
                self._check_mmu(res, index, kop, addrs)
        return True

    def _check_warns(self, res: SequenceResult, index: int, kop: KOp, r: OpResult, o_events: Sequence[Any]) -> None:
        """WARNs the C code hit beyond those upstream hits for this operation (the oracle logs each
        WARN_ON upstream's code reaches: a WARN both hit is the API's own guard, counted, not a finding)."""
        expected = sum(1 for e in o_events if str(e.kind) == "warn")
        res.expected_warns += min(expected, len(r.warns))
        for w in r.warns[expected:]:
            self._finding(res, "warn" if w.is_warning else "bug", index, kop.text(),
                          f"{'WARN' if w.is_warning else 'BUG'} at {w.location} (upstream's code, as the oracle "
                          f"runs it, hits {expected} WARN(s) here)", {"elr": w.elr})
        if expected > len(r.warns):
            self._finding(res, "warn-missing", index, kop.text(),
                          f"upstream's code hits {expected} WARN(s) here, the C code {len(r.warns)}")

    def _fault_kind(self, r: OpResult) -> str:
        f = r.fault
        assert f is not None
        if f.kind is FaultKind.DATA_ABORT and self.layout.pool.contains(f.far):
            return "use-after-free"
        return {FaultKind.BUG: "bug", FaultKind.STACK_CHK: "stack-protector"}.get(f.kind, "fault")

    # -- checks -----------------------------------------------------------------------------------------
    def _compare_returns(self, res: SequenceResult, index: int, kop: KOp, r: OpResult, o_ret: int, o_ret1: int,
                         o_level: int | None) -> None:
        problems = []
        if r.ret != o_ret:
            problems.append(f"returned {r.ret}, upstream's behaviour (the oracle) is {o_ret}")
        if kop.name in ("mkyoung", "mkold", "get_leaf") and r.ret1 != o_ret1:
            problems.append(f"gave the entry {r.ret1:#x}, the oracle {o_ret1:#x}")
        if kop.name == "get_leaf" and o_level is not None and r.leaf_level != o_level and r.ret == 0:
            problems.append(f"at level {r.leaf_level}, the oracle at level {o_level}")
        if problems:
            self._finding(res, "return-code", index, kop.text(), "; ".join(problems),
                          {"stage": int(self.config.stage), "hvhe": self.config.hvhe, "op_name": kop.name,
                           "c": {"ret": r.ret, "ret1": r.ret1}, "oracle": {"ret": o_ret, "ret1": o_ret1}})

    def _touched(self, kop: KOp) -> U64:
        """The operation's range (every page when small, else a sample with both ends and every
        block boundary) and the pages just outside it."""
        assert self.geom is not None
        g = self.geom.granule.size
        size = kop.size if kop.size else g
        lo = kop.addr - kop.addr % g
        hi = min(kop.addr + size, self.geom.limit)
        n = max(1, (hi - lo) // g)
        if n <= MAX_COMPARE - 8:
            inside = lo + np.arange(n, dtype=np.uint64) * np.uint64(g)
        else:
            pick = self.rng.choice(n, MAX_COMPARE - 64, replace=False)
            blk = self.geom.size(min(self.geom.block_levels)) if self.geom.block_levels else g
            edges = [lo, hi - g, *list(range(lo - lo % blk + blk, hi, blk))[:56]]
            inside = np.concatenate([lo + pick.astype(np.uint64) * np.uint64(g),
                                     np.array(edges, dtype=np.uint64)])
        out = [lo - g, lo - 2 * g, hi, hi + g]
        around = np.array([a for a in out if 0 <= a < self.geom.limit], dtype=np.uint64)
        return np.unique(np.concatenate([inside, around]))

    def _oracle_root(self) -> int:
        assert self.oracle is not None and self.oracle.pgd is not None
        return self.oracle.pgd

    def _oracle_tables(self) -> Tables:
        assert self.oracle is not None and self.geom is not None
        return Tables(self.geom, self._oracle_root(), self.oracle.pool)

    def _compare_translations(self, res: SequenceResult, index: int, kop: KOp, addrs: U64) -> None:
        assert self.c is not None
        mine, theirs = self.c.predict(addrs), self._oracle_tables().predict(addrs)
        res.checked += int(addrs.size)
        differ = _differences(mine, theirs)
        if differ.size:
            self._mismatch(res, index, kop.text(), addrs[differ], "after this operation")

    def _mismatch(self, res: SequenceResult, index: int, op: str, bad: U64, when: str) -> None:
        """One finding for the first differing range of addresses, with both walks."""
        assert self.c is not None
        first = int(bad[0])
        run = 1
        g = self.config.granule.size
        while run < bad.size and int(bad[run]) == first + run * g:
            run += 1
        o = self._oracle_tables()
        cw = translate(self.c.mem, self.c.geom, self.c.root, first, READ)
        ow = translate(o.mem, o.geom, o.root, first, READ)
        ev = {"kind": "mismatch", "stage": int(self.config.stage), "hvhe": self.config.hvhe,
              "address": first, "range": [first, first + run * g], "c": _walk_json(cw), "oracle": _walk_json(ow),
              "c_walk": cw.explain() if hasattr(cw, "explain") else str(cw),
              "oracle_walk": ow.explain() if hasattr(ow, "explain") else str(ow)}
        msg = (f"[{first:#x}, {first + run * g:#x}) {when}: C tables {_walk_text(cw)}; "
               f"oracle {_walk_text(ow)} ({bad.size} addresses differ)")
        if kernel_bugs.classify(ev) == "hvhe-hyp-xn-el0-only" and not self._fetch_proven and cw.pa is not None:
            proof = self._prove_fetch(first, cw.pa)
            if proof:
                ev["fetch_at_el2"] = proof
                msg += f"; fetched at EL2 on the MMU: {proof}"
        self._finding(res, "mismatch", index, op, msg, ev)

    def _prove_fetch(self, va: int, pa: int) -> str | None:
        """Run code at ``va`` at EL2 on the C tables (the planted stub at ``pa``, scratch RAM only):
        what the MMU did, in words."""
        if not self.layout.scratch.contains(pa, 16):
            return None
        self._fetch_proven = True
        tag = 0x5EED
        subj = self._subject()
        self.target.install(subj.regs, subj.image)
        try:
            self.target.write_pa(pa & ~0xF, fetch_stub(tag))
            rec = self.target.fetch([va & ~0xF], stage=1)[0]
        finally:
            self.target.uninstall()
        if rec["completed"] and int(rec["value"]) == tag:
            return f"the code at {va & ~0xF:#x} ran (returned the tag planted at PA {pa & ~0xF:#x})"
        return f"faulted: {describe_esr(int(rec['esr']))}"

    def _check_mmu(self, res: SequenceResult, index: int, kop: KOp, addrs: U64) -> None:
        """The C tables on the MMU (AT; real accesses and fetches on a sample), against the
        model's walk of the same bytes."""
        assert self.c is not None and self.geom is not None
        subj = self._subject()
        # With BTI the kernel maps executable hyp memory guarded (GP), the payload's own code
        # included, which is not built for BTI: a fetch probe's return into it took a Branch Target
        # exception (EC 0x0D) on QEMU 10.0.2. No EL2 fetch probes there (counted).
        fetches = 0 if self.config.bti and self.config.stage is Stage.S1 else 16
        if not fetches:
            res.fetches_skipped += 1
        # EL2's view only: hyp tables give EL0 nothing (AP[1] = 0), and EL0's view of the EL2&0
        # regime is checked by the fuzzer and the scenarios; it would double every hVHE operation.
        report = engine.check_subject(subj, self.target, addrs, self.rng, access=True,
                                      access_sample=MMU_ACCESS_SAMPLE, fetch_sample=fetches, el0=False)
        res.mmu_checked += report.checked
        res.checked += report.checked
        if not report.ok:
            first = next((m for m in report.mismatches if not m.divergence), None)
            self._finding(res, "mmu", index, kop.text(),
                          f"the MMU disagrees with the model's walk of the C tables: {report.summary()}"
                          + (f"; first: {first.text().splitlines()[0]}" if first else ""),
                          {"report": report.to_json()})

    def _regs(self) -> RegimeRegs:
        """The registers that install the C tables (stage 2: VMID 1, the host's own)."""
        assert self.c is not None and self.geom is not None
        regs: RegimeRegs = regime_regs(self.geom, self.c.root)
        if isinstance(regs, Stage2Regs):
            # the tree's own VTCR_EL2, but HA (hardware access flag) off: the model's walks fault on
            # AF = 0 as the architecture does without FEAT_HAFDBS updates
            regs = dataclasses.replace(regs, vtcr_el2=self.vtcr & ~(1 << 21))
        return regs

    def _subject(self) -> engine.Subject:
        assert self.c is not None and self.geom is not None
        mem = self.c.mem
        extent = max(mem.used_extent(), self.geom.granule.size)
        image = PoolImage(mem.base, mem.words()[: extent // 8].tobytes())
        regs = self._regs()
        mair = regs.mair_el2 if isinstance(regs, Stage1Regs) else DEFAULT_MAIR
        no_access = tuple((r.base, r.size) for r in prologue_regions(self.config, self.layout))
        return engine.Subject(f"{self.config.name}", self.geom, mem, self.c.root, regs, image, mair, no_access)

    def _reachable_tables(self, mem: PoolView) -> dict[int, int]:
        """Every table page reachable from the C root (root pages included): page -> valid entries."""
        assert self.geom is not None and self.c is not None
        geom = self.geom
        g = geom.granule.size
        per = g // 8
        out: dict[int, int] = {}
        todo = [(self.c.root + i * g, geom.start_level) for i in range(geom.pgd_pages)]
        while todo:
            page, level = todo.pop()
            if not mem.contains(page, g) or page in out:
                continue
            words = mem.data[(page - mem.base) // 8:(page - mem.base) // 8 + per]
            valid = words & np.uint64(1)
            out[page] = int(np.count_nonzero(valid))
            if level < 3:
                for w in words[np.flatnonzero(valid)]:
                    if d.is_table(int(w), level):
                        todo.append((d.pte_to_phys(int(w), geom.granule, geom.lpa2), level + 1))
        return out

    def _check_resources(self, res: SequenceResult, index: int, kop: KOp, mem: PoolView,
                         counters0: dict[str, int]) -> None:
        assert self.oracle is not None
        refs = self.kw.refcounts()
        g = self.config.granule.size
        base = self.layout.pool_base
        reach = self._reachable_tables(mem)
        problems: list[tuple[str, str]] = []
        for page, valid in sorted(reach.items()):
            rc = int(refs[(page - base) // g])
            if rc == 0:
                problems.append(("use-after-free", f"table page {page:#x} is reachable but free"))
            elif rc != 1 + valid:
                problems.append(("refcount", f"table page {page:#x} has {valid} valid entries and "
                                             f"reference count {rc} (expected {1 + valid})"))
        held = {base + int(i) * g for i in np.flatnonzero(refs)}
        stray = sorted(held - set(reach))
        if stray:
            problems.append(("leak", f"{len(stray)} pool page(s) allocated but unreachable: "
                                     + ", ".join(f"{p:#x}" for p in stray[:4])))
        o_held = self.oracle.pool.used_pages
        if len(held) != o_held:
            problems.append(("leak" if len(held) > o_held else "refcount",
                             f"the C tables hold {len(held)} pages, upstream's (the oracle's) {o_held}"))
        problems += self._counter_problems(counters0)
        upstream = self._oracle_anomalies()
        for kind, msg in problems[:3]:
            self._finding(res, kind, index, kop.text(), msg,
                          {"stage": int(self.config.stage), "op_name": kop.name, "upstream_same": kind in upstream})

    def _counter_problems(self, counters0: dict[str, int]) -> list[tuple[str, str]]:
        """What the host's pool saw during the operation: references taken or dropped on free pages."""
        now = self.kw.counters()
        out = []
        for k, kind, what in (("bad_get", "use-after-free", "a reference taken on a free (or foreign) page"),
                              ("bad_put", "refcount", "a reference dropped on a free (or foreign) page"),
                              ("bad_free", "refcount", "free_pages_exact of a foreign or unaligned address")):
            if now[k] > counters0[k]:
                out.append((kind, f"{now[k] - counters0[k]} x {what}"))
        return out

    def _check_counters(self, res: SequenceResult, index: int, kop: KOp, counters0: dict[str, int]) -> None:
        for kind, msg in self._counter_problems(counters0):
            self._finding(res, kind, index, kop.text(), msg, {"stage": int(self.config.stage), "op_name": kop.name})

    def _oracle_anomalies(self) -> set[str]:
        """The resource rules upstream's own behaviour (the oracle) breaks now: a finding of the same
        kind is then the C code doing exactly what upstream does."""
        assert self.oracle is not None
        out: set[str] = set()
        pool = self.oracle.pool
        per = self.config.granule.size // 8
        for page, rc in self.oracle.refcounts().items():
            if not pool.contains(page, self.config.granule.size):
                continue
            off = (page - pool.base) // 8
            valid = int(np.count_nonzero(pool.words()[off:off + per] & np.uint64(1)))
            if rc == 0:
                out.add("use-after-free")
            elif rc != 1 + valid:
                out.add("refcount")
        if pool.used_pages > self.oracle.table_pages():
            out.add("leak")
        return out

    def _check_destroyed(self, res: SequenceResult, index: int, kop: KOp) -> None:
        refs = self.kw.refcounts()
        left = np.flatnonzero(refs)
        res.pool_left = int(left.size)
        if left.size:
            g = self.config.granule.size
            pages = ", ".join(f"{self.layout.pool_base + int(i) * g:#x}" for i in left[:4])
            assert self.oracle is not None
            left_upstream = self.oracle.pool.used_pages
            self._finding(res, "leak", index, kop.text(),
                          f"after destroy {left.size} pool page(s) are still allocated: {pages} "
                          f"(upstream's code, as the oracle runs it, leaves {left_upstream})",
                          {"stage": int(self.config.stage), "op_name": "destroy",
                           "upstream_same": left_upstream == left.size})
        self.c = None

    def _check_cmo(self, res: SequenceResult, index: int, kop: KOp, c_events: Sequence[Event],
                   o_events: Sequence[Any]) -> None:
        want = Counter((str(e.kind), e.addr, e.size_or_pages) for e in o_events
                       if e.kind in ("dcache_clean_inval_poc", "icache_inval_pou"))
        got = Counter((e.kind.name.lower(), e.a0, e.a1) for e in c_events if e.kind in CMO_KINDS)
        missing = want - got
        if missing:
            (kind, addr, size), _ = next(iter(missing.items()))
            self._finding(res, "cmo-missing", index, kop.text(),
                          f"{len(missing)} cache maintenance call(s) upstream makes are missing, e.g. "
                          f"{kind}({addr:#x}, {size:#x})")

    def _check_tlbi(self, res: SequenceResult, index: int, kop: KOp, c_events: Sequence[Event],
                    o_events: Sequence[Any]) -> None:
        """The stage-2 TLB invalidations the C code asked its host for (kind, address or start,
        level hint or pages) against those upstream's code asks for (the oracle's): one missing
        leaves a stale translation possible; one extra, or another level hint, is a change of
        behaviour worth a look. Judging them by the architecture's rules is issue "TLB maintenance"."""
        got = Counter(_tlbi_key_c(e) for e in c_events if e.kind in TLBI_KINDS)
        want = Counter(_tlbi_key_oracle(e) for e in o_events if str(e.kind) in TLBI_ORACLE_KINDS)
        res.tlbi_compared += sum(want.values())
        for kind, diff in (("tlbi-missing", want - got), ("tlbi-extra", got - want)):
            if diff:
                (name, addr, arg), _ = next(iter(diff.items()))
                what = "upstream asks for" if kind == "tlbi-missing" else "upstream does not ask for"
                self._finding(res, kind, index, kop.text(),
                              f"{sum(diff.values())} stage-2 TLB invalidation(s) {what}, "
                              f"e.g. {name}({addr:#x}, {arg}); "
                              f"the C code asked for {sum(got.values())}, upstream {sum(want.values())}")

    def _check_tlb(self, res: SequenceResult, index: int, kop: KOp, r: OpResult, warmed: Warmed, mem: PoolView,
                   o_steps: list[tlb.Step] | None, o_root: int | None, o_before: U64 | None) -> None:
        """The operation's TLB maintenance by the architecture's rules, and on the MMU (stage 2,
        live): :mod:`harness.check.kernel_tlb`."""
        assert self.tlb is not None and self.oracle is not None
        young = bool(r.ret) if self.api.test_clear_young else bool(d.AF.get(r.ret1))
        base = self.oracle.pool.base
        o_read = None if o_before is None else (
            lambda pa: int(o_before[(pa - base) // 8]) if 0 <= pa - base < 8 * o_before.size else 0)
        tally, found = self.tlb.after(kop.name, kop.text(), warmed, mem, r.events,
                               young, o_steps, o_root, o_read)
        res.tlb.merge(tally)
        for f, upstream_same in found:
            inval = ", ".join(f.invalidations) or "none"
            self._finding(res, f.kind, index, kop.text(), f"{f.message}; invalidations: {inval}",
                          {"stage": int(self.config.stage), "op_name": kop.name, "address": f.address,
                           "old": f.old, "new": f.new, "rule": f.rule, "invalidations": list(f.invalidations),
                           "upstream_same": upstream_same})

    def finish(self, res: SequenceResult) -> None:
        """The whole tables against the oracle's (merged mapped ranges), then destroy both."""
        if self.c is None or self.oracle is None or self.geom is None:
            return
        mine = mapped_ranges(self.c.mem, self.geom, self.c.root)
        o = self._oracle_tables()
        theirs = mapped_ranges(o.mem, o.geom, o.root)
        a = {(r.va, r.size, r.pa, r.attrs) for r in mine}
        b = {(r.va, r.size, r.pa, r.attrs) for r in theirs}
        if a != b:
            firsts = sorted(x[0] for x in a ^ b)
            addr = firsts[0] - firsts[0] % self.config.granule.size
            self._mismatch(res, len(res.sequence.ops), "end of sequence", np.array([addr], dtype=np.uint64),
                           "in the final tables (merged ranges differ)")
        self.step(res, len(res.sequence.ops), KOp("destroy"), check=False)

    # -- findings ----------------------------------------------------------------------------------------
    def _finding(self, res: SequenceResult, kind: str, index: int, op: str, message: str,
                 evidence: dict[str, Any] | None = None) -> None:
        ev = dict(evidence or {})
        ev.setdefault("kind", kind)
        known = kernel_bugs.classify(ev)
        res.findings.append(Finding(kind, self.config.name, res.sequence.name, index, op, message, ev, known))


TLBI_KINDS = {EventKind.TLBI_VMID_IPA: "tlb_flush_vmid_ipa", EventKind.TLBI_VMID_IPA_NSH: "tlb_flush_vmid_ipa_nsh",
              EventKind.TLBI_VMID_RANGE: "tlb_flush_vmid_range", EventKind.TLBI_VMID: "tlb_flush_vmid"}
TLBI_ORACLE_KINDS = frozenset(TLBI_KINDS.values())


def _tlbi_key_c(e: Event) -> tuple[str, int, int]:
    """A recorded TLB helper call as (helper, address, level hint or pages): the VMID is the host's own."""
    name = TLBI_KINDS[e.kind]
    if e.kind is EventKind.TLBI_VMID:
        return name, 0, 0
    return name, e.a0, e.a1 if e.kind is EventKind.TLBI_VMID_RANGE else signed64(e.a1)


def _tlbi_key_oracle(e: Any) -> tuple[str, int, int]:
    name = str(e.kind)
    if name == "tlb_flush_vmid":
        return name, 0, 0
    return name, e.addr, e.size_or_pages if name == "tlb_flush_vmid_range" else int(e.level)


def _differences(a: BatchResult, b: BatchResult) -> npt.NDArray[np.intp]:
    ok = a.ok
    same = (a.fault == b.fault) & np.where(ok, True, a.fault_level == b.fault_level)
    leaf = (a.pa == b.pa) & (a.perms == b.perms) & (a.attr == b.attr) & (a.sh == b.sh) & (a.level == b.level)
    same &= np.where(ok & b.ok, leaf, True)
    return np.flatnonzero(~same)


def _walk_json(t: Any) -> dict[str, Any]:
    return {"fault": None if t.fault is None else t.fault.name, "fault_level": t.fault_level,
            "pa": t.pa, "perms": int(t.perms), "level": t.level, "descriptor": t.descriptor or 0,
            "attr": t.attr}


def _walk_text(t: Any) -> str:
    if t.fault is not None:
        return f"{t.fault.name.lower()} fault at level {t.fault_level}"
    perms = "".join(c if t.perms & m else "-" for c, m in (("r", 1), ("w", 2), ("x", 4)))
    return f"PA {t.pa:#x} {perms} level {t.level} (descriptor {t.descriptor or 0:#018x})"


def run_sequence(session: Session, seq: KSequence) -> SequenceResult:
    """One sequence from a fresh table; the session's payload must be usable afterwards unless
    ``aborted`` (a fault leaves the host's state unknown: boot a new payload)."""
    t0 = time.perf_counter()
    res = SequenceResult(session.config.name, seq)
    if session.start(res):
        for i, kop in enumerate(seq.ops):
            if not session.step(res, i, kop):
                break
            if kop.name == "destroy":
                break
        else:
            session.finish(res)
        if res.aborted is None and session.c is not None:
            session.finish(res)
    res.seconds = time.perf_counter() - t0
    return res


def iter_findings(results: Sequence[SequenceResult]) -> Iterator[Finding]:
    for r in results:
        yield from r.findings

