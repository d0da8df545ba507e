"""Table updates on a running MMU: each operation applied live to installed, warm tables, its TLB
maintenance judged by the architecture's rules and observed on the MMU.

For one update (a model operation, or a kernel tree's operation run by its own code):

1. **warm**: real loads (EL2 on stage 1; EL1 through stage 2) of the pages the update affects,
   where they translate to scratch RAM before it, with a token planted at each old PA, so the TLB
   holds them;
2. **update**: the model's writes and invalidations run by the firmware in order (``LIVE``; see
   :mod:`harness.target.live`), or the kernel's operation with its own TLB helpers;
3. **observe**: the same loads again, and stores where write permission went or came: each must
   give the new translation (a fault where the page went or became unreadable, the new PA's word
   where the output address changed, a completed store only where writable). An old translation
   seen is a ``tlb-stale`` finding (address, old and new entries, the invalidations issued).
4. **judge**: the recorded steps against the rules of :mod:`harness.core.tlb` (``tlb-missing``,
   ``tlb-hint``, ``tlb-bbm``, ``tlb-order``), whatever QEMU did: QEMU may invalidate more than a
   TLBI asks (every stage-2 helper ends in ``tlbi vmalle1is``, which drops all of EL1's combined
   entries), so a too-narrow invalidation shows only there.

Nothing is reinstalled: an update costs its mailbox requests (warm, LIVE, observe).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Stage
from harness.check.engine import CheckReport, check_built, subject_of_built
from harness.check.scenario import BuiltScenario, Scenario, apply_op, build
from harness.core import tlb
from harness.core.batch import BatchResult, translate_batch
from harness.core.memory import WordsMemory
from harness.core.translate import DEFAULT_MAIR, READ, WRITE, Access, translate
from harness.target import live as target_live

U64 = npt.NDArray[np.uint64]
MAX_LIVE_PROBES = 128  # addresses warmed and observed per update
TOKEN_BASE = 0x71B0_0000_0000_0000
MAX_FINDINGS = 32


@dataclass
class TlbFinding:
    """One disagreement of an update with the TLB rules or the MMU."""

    kind: str  # tlb-stale, tlb-missing, tlb-hint, tlb-bbm, tlb-order
    op: str
    address: int
    message: str
    rule: str = ""
    old: int = 0
    new: int = 0
    invalidations: tuple[str, ...] = ()

    def text(self) -> str:
        tl = f"; invalidations: {', '.join(self.invalidations) or 'none'}"
        heading = self.rule.split(":")[0]
        return f"{self.kind} in {self.op}: {self.message}{tl}" + (f" [{heading}]" if heading else "")

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "op": self.op, "address": self.address, "message": self.message,
                "rule": self.rule, "old": self.old, "new": self.new, "invalidations": list(self.invalidations)}


@dataclass
class TlbTally:
    """What the live updates of one scenario (or kernel configuration) showed."""

    updates: int = 0
    checked: int = 0  # warm translations an update changed, observed afterwards
    stale: int = 0  # of those, an old translation still used
    judged: int = 0  # entries changed whose invalidation the rules judged
    unobservable: int = 0  # changed, but not observable by a load or store (e.g. outside scratch RAM)
    findings: list[TlbFinding] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.by_kind

    def add(self, f: TlbFinding) -> None:
        self.by_kind[f.kind] = self.by_kind.get(f.kind, 0) + 1
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(f)

    def merge(self, other: TlbTally) -> None:
        self.updates += other.updates
        self.checked += other.checked
        self.stale += other.stale
        self.judged += other.judged
        self.unobservable += other.unobservable
        self.seconds += other.seconds
        for f in other.findings:
            if len(self.findings) < MAX_FINDINGS:
                self.findings.append(f)
        for k, v in other.by_kind.items():
            self.by_kind[k] = self.by_kind.get(k, 0) + v

    def summary(self) -> str:
        extra = "".join(f", {v} {k}" for k, v in sorted(self.by_kind.items()) if k != "tlb-stale")
        return (f"tlb: {self.updates} live update(s), {self.checked} changed translations observed, "
                f"{self.stale} stale, {self.judged} invalidations judged{extra}")

    def counts(self) -> dict[str, Any]:
        """The figures without the findings (those are reported where the caller keeps findings)."""
        return {k: v for k, v in self.as_json().items() if k not in ("findings", "seconds")}

    def as_json(self) -> dict[str, Any]:
        return {"updates": self.updates, "checked": self.checked, "stale": self.stale, "judged": self.judged,
                "unobservable": self.unobservable, "by_kind": dict(self.by_kind),
                "findings": [f.as_json() for f in self.findings], "seconds": round(self.seconds, 4)}


Predict = Callable[[U64, Access], BatchResult]


@dataclass
class Warm:
    """The loads that warmed the TLB before an update: where, to which old PA, which token."""

    addrs: U64
    pa: U64
    writable: npt.NDArray[np.bool_]
    tokens: U64


def _scratch_lanes(pred: BatchResult, scratch: Any) -> npt.NDArray[np.bool_]:
    base = np.uint64(scratch.base)
    return np.asarray(pred.ok & (pred.pa >= base) & (pred.pa < base + np.uint64(scratch.size)), dtype=np.bool_)


def candidates(addrs: U64, before: Predict, scratch: Any, no_access: Sequence[tuple[int, int]],
               rng: np.random.Generator, limit: int = MAX_LIVE_PROBES) -> U64:
    """The addresses to warm: readable before the update, into scratch RAM, away from the
    payload's own regions; at most ``limit`` (a sample keeps the first and last)."""
    a = np.unique(np.asarray(addrs, dtype=np.uint64) & ~np.uint64(7))
    for lo, size in no_access:
        a = a[(a < np.uint64(lo)) | (a >= np.uint64(lo + size))]
    if not a.size:
        return a
    pred = before(a, READ)
    a = a[_scratch_lanes(pred, scratch)]
    if a.size > limit:
        keep = np.concatenate([[0, a.size - 1], rng.choice(np.arange(1, a.size - 1), limit - 2, replace=False)])
        a = a[np.sort(keep)]
    return a


def warm(target: Any, stage: Stage, addrs: U64, before: Predict, salt: int) -> Warm:
    """Plant a token at each address's old PA (one per word) and load it, so the TLB holds it."""
    pred = before(addrs, READ)
    pa = pred.pa.astype(np.uint64) & ~np.uint64(7)
    tokens = np.uint64(TOKEN_BASE | (salt & 0xFFFF) << 32) | (pa & np.uint64(0xFFFF_FFFF))
    if pa.size:  # every old PA is in scratch RAM (candidates): one view, one assignment
        scratch = target.layout.scratch
        words = target.ram_u64(int(scratch.base), int(scratch.size) // 8)
        words[((pa - np.uint64(scratch.base)) >> np.uint64(3)).astype(np.intp)] = tokens
        del words
    rec = target.access(addrs, write=False, stage=stage)
    good = rec["completed"] & (rec["value"].astype(np.uint64) == tokens)
    writable = before(addrs, WRITE).ok
    return Warm(addrs[good], pa[good], np.asarray(writable[good], dtype=np.bool_), tokens[good])


def _word(target: Any, pa: int) -> int | None:
    try:
        return int.from_bytes(target.read_pa(pa, 8), "little")
    except Exception:  # not RAM: no word to compare with
        return None


def observe(target: Any, stage: Stage, w: Warm, after: Predict, op: str, scratch: Any,
            flushes: Sequence[str], tally: TlbTally, leaf_of: Callable[[int], tuple[int, int]]) -> None:
    """Loads (and stores where write permission changed) after the update; every old translation
    still used is a ``tlb-stale`` finding."""
    if not w.addrs.size:
        return
    pr, pw = after(w.addrs, READ), after(w.addrs, WRITE)
    # a load or store must not reach a PA with no RAM behind it (an external abort): only lanes the
    # new tables fault or send to scratch RAM are probed; the rest cannot show a stale entry
    safe = _scratch_lanes(pr, scratch) | ~pr.ok
    tally.unobservable += int(np.count_nonzero(~safe))
    load_lanes = np.flatnonzero(safe)
    store_lanes = np.flatnonzero((w.writable != pw.ok) & safe & (_scratch_lanes(pw, scratch) | ~pw.ok))
    new_pa = pr.pa.astype(np.uint64) & ~np.uint64(7)
    loads, stores = target.access_both(w.addrs[load_lanes], w.addrs[store_lanes], stage=stage)
    for k, i in enumerate(load_lanes.tolist()):
        addr = int(w.addrs[i])
        done, value = bool(loads["completed"][k]), int(loads["value"][k])
        if not pr.ok[i]:
            tally.checked += 1
            if done:
                _stale(tally, op, addr, f"a load at {addr:#x} completed (read {value:#x}, the old PA's token) "
                                        f"where the new tables fault ({_fault(pr, i)})", flushes, leaf_of)
            continue
        if int(new_pa[i]) == int(w.pa[i]):
            continue  # the same word: a load cannot tell (a store may, below)
        new_word = _word(target, int(new_pa[i]))
        if new_word is None or new_word == int(w.tokens[i]):
            tally.unobservable += 1
            continue
        tally.checked += 1
        if value == int(w.tokens[i]) or not done:
            got = "faulted" if not done else f"read the old PA {int(w.pa[i]):#x}'s token"
            _stale(tally, op, addr, f"a load at {addr:#x} {got}; the new tables map it to {int(new_pa[i]):#x}",
                   flushes, leaf_of)
    for j, i in enumerate(store_lanes.tolist()):
        addr = int(w.addrs[i])
        done = bool(stores["completed"][j])
        tally.checked += 1
        if done != bool(pw.ok[i]):
            what = ("completed where the new tables do not allow it" if done else
                    "faulted where the new tables allow it")
            _stale(tally, op, addr, f"a store at {addr:#x} {what}", flushes, leaf_of)


def _fault(pred: BatchResult, i: int) -> str:
    return f"fault kind {int(pred.fault[i])} at level {int(pred.fault_level[i])}"


def _stale(tally: TlbTally, op: str, addr: int, msg: str, flushes: Sequence[str],
           leaf_of: Callable[[int], tuple[int, int]]) -> None:
    old, new = leaf_of(addr)
    tally.stale += 1
    tally.add(TlbFinding("tlb-stale", op, addr, f"{msg} (entry {old:#018x} -> {new:#018x})",
                         "QEMU's TLB still gave the old translation after the update's invalidations",
                         old, new, tuple(flushes)))


def judged(tally: TlbTally, op: str, j: tlb.Judgement, flushes: Sequence[str] = ()) -> None:
    tally.judged += j.duties
    for f in j.findings:
        tally.add(TlbFinding(f.kind, op, f.addr, f.message, f.rule, f.old, f.new, tuple(flushes)))
    for kind, n in j.by_kind.items():  # those beyond the judgement's kept findings
        kept = sum(1 for f in j.findings if f.kind == kind)
        tally.by_kind[kind] = tally.by_kind.get(kind, 0) + n - kept


def flush_texts(steps: Sequence[tlb.Step]) -> list[str]:
    return [s.text() for s in steps if isinstance(s, tlb.Tlbi)]


def touched(geom: Geometry, addr: int, size: int, j: tlb.Judgement | None = None) -> U64:
    """Addresses an update affects: every page of its range (and of the entries it changed),
    bounded per range by :data:`MAX_LIVE_PROBES` evenly spread pages."""
    g = geom.granule.size
    ranges = [(addr, max(size, g))] + ([(va, sz) for va, sz, _ in j.changed] if j else [])
    out: list[U64] = []
    for lo, sz in ranges:
        n = max(1, sz // g)
        idx = np.unique(np.linspace(0, n - 1, min(n, MAX_LIVE_PROBES)).astype(np.uint64))
        out.append(np.uint64(lo - lo % g) + idx * np.uint64(g))
    return np.unique(np.concatenate(out)) if out else np.zeros(0, dtype=np.uint64)


def descriptor_pair(before: Callable[[int], Any], after: Callable[[int], Any]) -> Callable[[int], tuple[int, int]]:
    """(old, new) leaf descriptors of an address, for findings (0 where none)."""

    def pair(addr: int) -> tuple[int, int]:
        b, a = before(addr), after(addr)
        old, new = getattr(b, "descriptor", None) or 0, getattr(a, "descriptor", None) or 0
        return (old if d.is_valid(old) else 0, new if d.is_valid(new) else 0)

    return pair


class Clock:
    def __init__(self, tally: TlbTally) -> None:
        self.tally = tally

    def __enter__(self) -> Clock:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tally.seconds += time.perf_counter() - self.t0


# -- a scenario's operations, live ----------------------------------------------------------------
def check_scenario(scenario: Scenario, target: Any, rng: np.random.Generator | None = None, live: bool = True,
                   access: bool | None = None) -> CheckReport:
    """Check a scenario on the MMU. With ``live`` (the default) and operations, the tables are
    installed as the maps leave them and each operation is applied live (:func:`live_ops`); the
    final tables are then checked as usual (:func:`harness.check.engine.check_built`). The
    report's ``tlb`` holds the live updates' tally (empty without operations)."""
    rng = rng or np.random.default_rng(0)
    if not (live and scenario.ops):
        report = check_built(build(scenario, target.layout), target, rng, access=access)
        report.tlb = TlbTally()
        return report
    built = build(scenario, target.layout, apply_ops=False)
    tally = live_ops(built, target, rng)
    report = check_built(built, target, rng, access=access)
    report.tlb = tally
    return report


def live_ops(built: BuiltScenario, target: Any, rng: np.random.Generator) -> TlbTally:
    """Install ``built``'s tables (before its scenario's operations), then apply each operation to
    the model and live on the target (:func:`live_update`); uninstall. ``built.table`` ends in
    the state the operations leave."""
    sc = built.scenario
    table = built.table
    subj = subject_of_built(built)
    tally = TlbTally()
    with Clock(tally):
        target.install(subj.regs, subj.image)
        try:
            for i, o in enumerate(sc.ops):
                root = table.pgd
                assert root is not None  # the scenario's table exists until destroy, which is no scenario op
                extent = max(table.mem.used_extent(), table.granule.size)  # the pages in use: the tables
                before = WordsMemory(table.mem.base, table.mem.words()[: extent // 8].copy())
                table.maint = tlb.MaintLog()
                try:
                    apply_op(table, o, f"{sc.name}: ops[{i}]")
                    steps = table.maint.take()
                finally:
                    table.maint = None
                live_update(target, table.geom, root, before, table.mem, steps, f"ops[{i}] {o.describe()}",
                            (o.addr, o.size), rng, tally, subj.no_access, subj.mair)
        finally:
            if target.alive:
                target.uninstall()
    return tally


def live_update(target: Any, geom: Geometry, root: int, before: Any, after: Any, steps: Sequence[tlb.Step],
                op: str, span: tuple[int, int], rng: np.random.Generator, tally: TlbTally,
                no_access: Sequence[tuple[int, int]] = (), mair: int = DEFAULT_MAIR) -> tlb.Judgement:
    """One update of installed tables whose memory is ``before`` (a snapshot) and, once the steps
    are done, ``after`` (the model's): judge the steps, warm the pages of ``span`` (addr, size) and
    of every entry they change, run them live (:func:`harness.target.live.apply`), check guest
    RAM holds ``after``'s tables, observe. Adds to ``tally``; returns the judgement."""

    def bpred(a: U64, acc: Access) -> BatchResult:
        return translate_batch(before.words(), before.base, geom, root, a, acc, mair)

    def apred(a: U64, acc: Access) -> BatchResult:
        return translate_batch(after.words(), after.base, geom, root, a, acc, mair)

    scratch = target.layout.scratch
    j = tlb.judge(steps, geom, root, before.read64)
    judged(tally, op, j, flush_texts(steps))
    addrs = candidates(touched(geom, span[0], span[1], j), bpred, scratch, no_access, rng)
    w = warm(target, geom.stage, addrs, bpred, tally.updates + 1)
    target_live.apply(target, steps, geom)
    _same_tables(target, after, geom.granule.size)
    pair = descriptor_pair(partial(translate, before, geom, root, access=READ, mair=mair),
                           partial(translate, after, geom, root, access=READ, mair=mair))
    observe(target, geom.stage, w, apred, op, scratch, flush_texts(steps), tally, pair)
    tally.updates += 1
    return j


class LiveDivergence(RuntimeError):
    """The live update left guest RAM other than the model's tables (a harness fault)."""


def _same_tables(target: Any, mem: Any, page: int) -> None:
    words = np.asarray(mem.words())
    if hasattr(mem, "used_extent"):  # a page pool: its highest page in use
        extent = max(int(mem.used_extent()), page)
    else:
        nz = np.flatnonzero(words)
        extent = max(int(nz[-1] + 1) * 8 if nz.size else 0, page)
    want = words[: extent // 8]
    got = target.ram_u64(mem.base, extent // 8)
    bad = np.flatnonzero(got != want)
    if bad.size:
        pa = mem.base + 8 * int(bad[0])
        raise LiveDivergence(f"live update: guest RAM at {pa:#x} holds {int(got[bad[0]]):#018x}, the model's "
                             f"table {int(want[bad[0]]):#018x} ({bad.size} words differ)")
