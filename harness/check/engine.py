"""The differential check: the model's predicted translations against what the MMU did.

One pass per AT form: the target probes every address in one firmware loop (results land in
shared guest RAM) while the host predicts the same addresses with the batch translate; the
comparison is one vectorised XOR under the mask of architecturally meaningful PAR bits. Only
mismatches are re-walked one by one, to explain them and to classify known QEMU divergences.
Real loads and stores are checked on the addresses that translate into scratch RAM or fault.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from harness.arch.geometry import Stage
from harness.arch.registers import (
    ESR_EC,
    ISS_DFSC,
    ISS_WNR,
    ExceptionClass,
    Par,
    RegimeRegs,
    describe_esr,
    fault_status,
    hpfar_ipa_page,
)
from harness.check import divergences
from harness.check.addresses import probe_addresses
from harness.check.scenario import Built
from harness.core.batch import BatchResult, expected_par_batch, par_compare_mask_batch, translate_batch
from harness.core.memory import PoolImage
from harness.core.pgtable import KvmPgtable
from harness.core.translate import READ, WRITE, Access, Translation, expected_par, translate

U64 = npt.NDArray[np.uint64]

AT_OPS: dict[Stage, tuple[tuple[str, Access], ...]] = {
    Stage.S1: (("S1E2R", READ), ("S1E2W", WRITE)),
    Stage.S2: (("S12E1R", READ), ("S12E1W", WRITE)),
}
MAX_EXPLAINED = 200  # mismatches re-walked and reported in full (the rest are counted)
MAX_ACCESS_PROBES = 20_000


class TargetLike(Protocol):
    """What the check needs of a target (harness.target.Target satisfies it)."""

    @property
    def qemu_version(self) -> tuple[int, int, int]: ...
    def install(self, regs: RegimeRegs, image: PoolImage | None = None) -> None: ...
    def uninstall(self) -> None: ...
    def at_start(self, addresses: npt.ArrayLike, op: str) -> None: ...
    def at_wait(self) -> U64: ...
    def access(self, addresses: npt.ArrayLike, write: bool, stage: Stage | int | None = None) -> Any: ...
    @property
    def layout(self) -> Any: ...


@dataclass
class Mismatch:
    address: int
    probe: str  # AT op or "load"/"store"
    expected: str
    actual: str
    model_walk: str
    divergence: str | None = None  # key of the known QEMU divergence that explains it

    def text(self) -> str:
        head = f"{self.probe} {self.address:#x}: model {self.expected}; MMU {self.actual}"
        if self.divergence:
            head += f"  [known QEMU divergence: {self.divergence}]"
        return head + "\n" + "\n".join("    " + ln for ln in self.model_walk.splitlines())


@dataclass
class CheckReport:
    scenario: str
    geometry: str
    qemu: str
    probes: dict[str, int] = field(default_factory=dict)
    matched: int = 0
    mismatched: int = 0  # unexplained
    known: int = 0  # explained by a known divergence
    mismatches: list[Mismatch] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    withheld: dict[str, int] = field(default_factory=dict)  # AT hazard key -> addresses checked by access

    @property
    def checked(self) -> int:
        return sum(self.probes.values())

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        extra = f", {self.known} known QEMU divergence(s)" if self.known else ""
        return f"{verdict} {self.scenario}: {self.matched}/{self.checked} matched{extra} ({self.geometry})"

    def text(self) -> str:
        lines = [self.summary()]
        lines += [f"  {k}: {v} probes" for k, v in self.probes.items()]
        lines += [f"  withheld from AT ({k}): {v}, checked with real accesses" for k, v in self.withheld.items()]
        shown = [m for m in self.mismatches if not m.divergence] + [m for m in self.mismatches if m.divergence]
        for m in shown:
            lines.append("  " + m.text().replace("\n", "\n  "))
        hidden = self.mismatched + self.known - len(self.mismatches)
        if hidden > 0:
            lines.append(f"  ... and {hidden} more not re-walked")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "geometry": self.geometry, "qemu": self.qemu, "ok": self.ok,
            "checked": self.checked, "matched": self.matched, "mismatched": self.mismatched,
            "known_divergences": self.known, "probes": self.probes, "timings": self.timings,
            "withheld_from_at": self.withheld, "mismatches": [m.__dict__ for m in self.mismatches],
        }


def used_image(table: KvmPgtable) -> PoolImage:
    """The pool's bytes up to its highest page in use: what the MMU needs in guest RAM."""
    full = table.mem.export()
    return PoolImage(full.base, full.data[: max(table.mem.used_extent(), table.granule.size)])


def _rewalk(table: KvmPgtable, addr: int, access: Access, **kw: Any) -> Translation:
    assert table.pgd is not None
    return translate(table.mem, table.geom, table.pgd, addr, access, **kw)


def _classify(report: CheckReport, table: KvmPgtable, probe: str, access: Access, addrs: U64, actual: U64,
              bad: npt.NDArray[np.intp], version: tuple[int, int, int]) -> None:
    for n, i in enumerate(bad):
        addr = int(addrs[i])
        if n >= MAX_EXPLAINED:
            report.mismatched += len(bad) - n
            return
        model = _rewalk(table, addr, access)
        dv = divergences.explain(model, int(actual[i]), table.geom, partial(_rewalk, table, addr, access), version)
        exp = expected_par(model) if not model.unmodelled else 0
        report.mismatches.append(Mismatch(addr, probe, f"{model.summary()} (PAR {exp:#x})", str(Par(int(actual[i]))),
                                          model.explain(), dv.key if dv else None))
        if dv:
            report.known += 1
        else:
            report.mismatched += 1


def predict(table: KvmPgtable, addrs: U64, access: Access) -> BatchResult:
    assert table.pgd is not None
    return translate_batch(table.mem.words(), table.mem.base, table.geom, table.pgd, addrs, access)


def check_at(report: CheckReport, target: TargetLike, table: KvmPgtable, addrs: U64) -> dict[Access, U64]:
    """Probe ``addrs`` with each AT form of the table's stage and compare with the model.

    Returns, per access type, the addresses withheld from AT because of a known QEMU hazard
    (they are checked with real accesses instead)."""
    max_at = int(target.layout.max_at)
    version = target.qemu_version
    withheld: dict[Access, U64] = {}
    for op, access in AT_OPS[table.stage]:
        for lo in range(0, addrs.size, max_at):
            chunk = addrs[lo : lo + max_at]
            t0 = time.perf_counter()
            pred: BatchResult | None = None
            if table.stage is Stage.S2:  # hazards exist at stage 2: predict before probing
                pred = predict(table, chunk, access)
                unsafe, keys = divergences.at_unsafe(pred, version)
                if unsafe.any():
                    withheld[access] = np.concatenate([withheld.get(access, chunk[:0]), chunk[unsafe]])
                    for k in keys:
                        report.withheld[k] = report.withheld.get(k, 0) + int(unsafe.sum())
                    chunk = chunk[~unsafe]
                    pred = predict(table, chunk, access)
            t1 = time.perf_counter()
            if not chunk.size:
                continue
            target.at_start(chunk, op)
            t2 = time.perf_counter()
            if pred is None:
                pred = predict(table, chunk, access)  # overlaps with the firmware's AT loop
            expected = expected_par_batch(pred, table.stage)
            mask = par_compare_mask_batch(pred)
            t3 = time.perf_counter()
            actual = target.at_wait()
            t4 = time.perf_counter()
            bad = np.flatnonzero((expected ^ actual) & mask)
            report.probes[op] = report.probes.get(op, 0) + int(chunk.size)
            report.matched += int(chunk.size - bad.size)
            t5 = time.perf_counter()
            _classify(report, table, op, access, chunk, actual, bad, version)
            for k, v in (("predict", t1 - t0 + t3 - t2), ("submit", t2 - t1), ("wait", t4 - t3),
                         ("compare", t5 - t4), ("classify", time.perf_counter() - t5)):
                report.timings[k] = report.timings.get(k, 0.0) + v
    return withheld


def _expected_esr_fields(t: Translation, stage: Stage, write: bool) -> tuple[int, int, int]:
    """(EC, DFSC, WnR) of the data abort the model predicts for a faulting access."""
    assert t.fault is not None and t.fault_level is not None
    ec = ExceptionClass.DABT_SAME if stage is Stage.S1 else ExceptionClass.DABT_LOWER
    return int(ec), fault_status(t.fault, t.fault_level), int(write)


def check_access(report: CheckReport, target: TargetLike, table: KvmPgtable, addrs: U64,
                 rng: np.random.Generator, must: dict[Access, U64] | None = None) -> None:
    """Real loads and stores on the addresses that fault or translate into scratch RAM; the
    addresses in ``must`` (withheld from AT) are always included."""
    scratch = target.layout.scratch
    for write, access in ((False, READ), (True, WRITE)):
        pred = predict(table, addrs, access)
        in_scratch = (pred.pa >= np.uint64(scratch.base)) & (pred.pa < np.uint64(scratch.base + scratch.size))
        eligible = np.flatnonzero((pred.ok & in_scratch) | (~pred.ok & ~pred.unmodelled))
        if eligible.size > MAX_ACCESS_PROBES:
            eligible = rng.choice(eligible, MAX_ACCESS_PROBES, replace=False)
        chosen = np.unique(np.concatenate([addrs[eligible], (must or {}).get(access, addrs[:0])]))
        if not chosen.size:
            continue
        pred = predict(table, chosen, access)
        eligible = np.arange(chosen.size)
        t0 = time.perf_counter()
        rec = target.access(chosen, write=write, stage=table.stage)
        report.timings["access"] = report.timings.get("access", 0.0) + time.perf_counter() - t0
        name = "store" if write else "load"
        report.probes[name] = report.probes.get(name, 0) + int(chosen.size)
        ok = pred.ok[eligible]
        esr = rec["esr"].astype(np.uint64)
        got_ec = (esr >> np.uint64(ESR_EC.lo)) & np.uint64(ESR_EC.max)
        got_dfsc = esr & np.uint64(ISS_DFSC.max)
        got_wnr = (esr >> np.uint64(ISS_WNR.lo)) & np.uint64(1)
        completed = rec["completed"]
        good = completed == ok
        faulting = np.flatnonzero(~ok)
        for i in faulting:
            if not completed[i]:
                t = _rewalk(table, int(chosen[i]), access)
                ec, dfsc, wnr = _expected_esr_fields(t, table.stage, write)
                same = (int(got_ec[i]), int(got_dfsc[i]), int(got_wnr[i])) == (ec, dfsc, wnr)
                if table.stage is Stage.S2:
                    same = same and hpfar_ipa_page(int(rec["hpfar"][i])) == int(chosen[i]) & ~0xFFF
                else:
                    same = same and int(rec["far"][i]) == int(chosen[i])
                good[i] = same
        bad = np.flatnonzero(~good)
        report.matched += int(chosen.size - bad.size)
        for n, i in enumerate(bad):
            if n >= MAX_EXPLAINED:
                report.mismatched += bad.size - n
                break
            addr = int(chosen[i])
            t = _rewalk(table, addr, access)
            got = "completed" if completed[i] else (
                f"{describe_esr(int(esr[i]))} FAR {int(rec['far'][i]):#x} HPFAR {int(rec['hpfar'][i]):#x}")
            want = "completes" if t.ok else "data abort {}/DFSC {:#x}".format(
                *_expected_esr_fields(t, table.stage, write)[:2])
            report.mismatches.append(Mismatch(addr, name, f"{t.summary()} -> {want}", got, t.explain()))
            report.mismatched += 1


def check_built(built: Built, target: TargetLike, rng: np.random.Generator | None = None,
                access: bool | None = None, addresses: U64 | None = None) -> CheckReport:
    """Install a built scenario's table, probe it, compare, uninstall."""
    rng = rng or np.random.default_rng(0)
    table = built.table
    sc = built.scenario
    report = CheckReport(sc.name, table.geom.describe(), ".".join(map(str, target.qemu_version)))
    t0 = time.perf_counter()
    addrs = probe_addresses(table, rng, sc.sample) if addresses is None else addresses
    report.timings["addresses"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    target.install(table.regs(), used_image(table))
    report.timings["install"] = time.perf_counter() - t0
    try:
        withheld = check_at(report, target, table, addrs)
        if withheld or (sc.access if access is None else access):
            check_access(report, target, table, addrs if (sc.access if access is None else access) else addrs[:0],
                         rng, withheld)
    finally:
        target.uninstall()
    return report
