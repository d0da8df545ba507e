"""The differential check: the model's predicted translations against what the MMU did.

What is checked is a :class:`Subject`: any translation tables in memory (built by the model, by
the fuzzer from raw random bytes, or read from elsewhere) with their geometry, root, register
values and the image to install. One pass per AT form and chunk: the model predicts the chunk
once (with the Arm ARM's semantics, and with the running QEMU's where it departs from them); the
target probes it in one firmware loop (results land in shared guest RAM); the comparison is one
vectorised XOR under the mask of architecturally meaningful PAR bits, and every later question
(what to withhold from AT, what a disagreement is, what ESR an access must raise) indexes that
one prediction. Only disagreements are re-walked one by one, to explain them.

Addresses an ``AT`` must not be pointed at on the running QEMU (:mod:`divergences` AT hazards,
decided on QEMU's semantics) are checked with real loads and stores instead and counted.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from harness.arch.geometry import Geometry, Stage
from harness.arch.registers import (
    ESR_EC,
    HPFAR_FIPA,
    ISS_DFSC,
    ISS_S1PTW,
    ISS_WNR,
    SCTLR_WXN,
    ExceptionClass,
    FaultKind,
    Par,
    RegimeRegs,
    Stage1Regs,
    describe_esr,
)
from harness.check import divergences
from harness.check.addresses import probe_addresses
from harness.check.scenario import BuiltScenario
from harness.core.batch import (
    BatchResult,
    expected_par_batch,
    fault_status_batch,
    par_compare_mask_batch,
    translate_batch,
    translate_batch_each,
)
from harness.core.memory import PoolImage
from harness.core.pgtable import KvmPgtable
from harness.core.translate import (
    DEFAULT_MAIR,
    EXEC,
    READ,
    WRITE,
    Access,
    Translation,
    expected_par,
    translate,
)
from harness.target import mailbox

U64 = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]

AT_OPS: dict[Stage, tuple[tuple[str, Access], ...]] = {
    Stage.S1: (("S1E2R", READ), ("S1E2W", WRITE)),
    Stage.S2: (("S12E1R", READ), ("S12E1W", WRITE)),
}
EL0_AT_OPS: tuple[tuple[str, Access], ...] = (("S1E0R", READ), ("S1E0W", WRITE))  # EL2&0 with TGE = 1
AT_PIPELINE_CHUNK = 1 << 15  # addresses up to which an AT request is not split (round trip ~1 ms)
AT_PIPELINE_FIRST = 1 << 15  # the first request's addresses (predicted while nothing is in flight)
AT_PIPELINE_GROWTH = 4  # each request at most this many times the last (predicted while the last runs)
AT_PIPELINE_TAIL = 1 << 17  # the last request's addresses (compared once the firmware is done)
HOST_PIECE = 1 << 16  # addresses the host predicts and compares at a time (its arrays stay in cache)
MAX_EXPLAINED = 200  # disagreements re-walked and reported in full (the rest are counted)
MAX_ACCESS_PROBES = 20_000
MAX_FETCH_PROBES = 2_000

SKIP_UNMODELLED = "walk leaves the modelled memory (no prediction)"
SKIP_NO_ACCESS = "withheld from AT, and real accesses cannot run on this table"
SKIP_AT_ABORT = "AT took an external abort: walk leaves the modelled memory"
SKIP_UNPROBEABLE = "neither AT nor a real access can be pointed at it on this QEMU (it would abort)"
SKIP_EL0_STUB = "EL0 fetches: the tables do not let EL0 run the firmware's EL0 stub"


class TargetLike(Protocol):
    """What the check (and the review, bench, plugin and fuzzer) need of a target;
    :class:`harness.target.Target` satisfies it."""

    @property
    def qemu_version(self) -> tuple[int, int, int]: ...
    @property
    def layout(self) -> Any: ...
    @property
    def alive(self) -> bool: ...
    def install(self, regs: RegimeRegs, image: PoolImage | None = None) -> None: ...
    def install_start(self, regs: RegimeRegs, image: PoolImage | None = None) -> None: ...
    def install_wait(self) -> None: ...
    def uninstall(self) -> None: ...
    def at_start(self, addresses: npt.ArrayLike, op: str) -> None: ...
    def at_start_both(self, reads: npt.ArrayLike, writes: npt.ArrayLike, stage: Stage | int,
                      uninstall: bool = False, *, el0: bool = False) -> None: ...
    def at_wait(self) -> U64: ...
    def at(self, addresses: npt.ArrayLike, op: str) -> U64: ...
    def access(self, addresses: npt.ArrayLike, write: bool, stage: Stage | int | None = None, *,
               el0: bool = False) -> Any: ...
    def access_both(self, loads: npt.ArrayLike, stores: npt.ArrayLike,
                    stage: Stage | int | None = None, *, el0: bool = False) -> tuple[Any, Any]: ...
    def fetch(self, addresses: npt.ArrayLike, stage: Stage | int | None = None, *, el0: bool = False) -> Any: ...
    def read_pa(self, pa: int, n: int) -> bytes: ...
    def write_pa(self, pa: int, data: bytes) -> None: ...
    def ram_u64(self, pa: int, count: int) -> U64: ...


class TableMemory(Protocol):
    """Memory holding the tables: a :class:`harness.core.memory.PagePool` fits."""

    @property
    def base(self) -> int: ...
    def words(self) -> U64: ...
    def read64(self, pa: int) -> int: ...
    def contains(self, pa: int, length: int = 8) -> bool: ...


@dataclass(frozen=True)
class Subject:
    """What is checked: tables in memory and how the MMU is to use them.

    ``image`` is what gets written into guest RAM (it must cover every byte of ``mem`` the model
    reads, so that both sides see the same tables); ``no_access`` lists input ranges real loads
    and stores must never touch (the firmware's own regions); ``accesses`` is False where real
    accesses cannot run (a stage-2 table that cannot map the EL1 stub). ``options`` are the
    model's walk keywords the installed registers set beyond ``regs``' defaults (SH0, WXN, HA,
    HD: :meth:`harness.arch.regimes.LiveRegime.walk_options`); ``el0``: the probes are EL0's (AT
    S1E0R/W, ``ldtr``/``sttr``, fetches from EL0), in the EL2&0 regime only (:func:`el0_view`)."""

    name: str
    geom: Geometry
    mem: TableMemory
    root: int
    regs: RegimeRegs
    image: PoolImage
    mair: int = DEFAULT_MAIR
    no_access: tuple[tuple[int, int], ...] = ()
    accesses: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    el0: bool = False

    @property
    def stage(self) -> Stage:
        return self.geom.stage

    @property
    def view(self) -> str:
        """Whose accesses are probed: "EL0", or the privileged level's ("EL2"; stage 2: "EL1")."""
        return "EL0" if self.el0 else "EL1" if self.stage is Stage.S2 else "EL2"

    def _kw(self, semantics: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.options, **({"el0": True} if self.el0 else {}), **semantics}

    def predict(self, addrs: npt.ArrayLike, access: Access, **semantics: Any) -> BatchResult:
        return translate_batch(self.mem.words(), self.mem.base, self.geom, self.root, addrs, access, self.mair,
                               **self._kw(semantics))

    def predict_each(self, addrs: npt.ArrayLike, accesses: Sequence[Access],
                     **semantics: Any) -> tuple[BatchResult, ...]:
        """:meth:`predict` for each of ``accesses``, from one walk of the tables."""
        return translate_batch_each(self.mem.words(), self.mem.base, self.geom, self.root, addrs, accesses,
                                    self.mair, **self._kw(semantics))

    def walk(self, addr: int, access: Access, **semantics: Any) -> Translation:
        return translate(self.mem, self.geom, self.root, addr, access, self.mair, **self._kw(semantics))


def has_el0(geom: Geometry) -> bool:
    """Whether the regime has an EL0 to probe: the EL2&0 regime's stage 1 (hVHE)."""
    return geom.stage is Stage.S1 and geom.e2h


def el0_view(subject: Subject) -> Subject:
    """The same tables probed as EL0 sees them (EL2&0 only), named so in reports."""
    assert has_el0(subject.geom), subject.geom
    return dataclasses.replace(subject, el0=True)


def at_ops(subject: Subject) -> tuple[tuple[str, Access], ...]:
    """The subject's AT forms: its stage's, or EL0's (S1E0R/W) for an EL0 view."""
    return EL0_AT_OPS if subject.el0 else AT_OPS[subject.stage]


def used_image(table: KvmPgtable) -> PoolImage:
    """The pool's bytes up to its highest page in use: what the MMU needs in guest RAM (only
    that extent is copied)."""
    extent = max(table.mem.used_extent(), table.granule.size)
    return PoolImage(table.mem.base, table.mem.words()[: extent // 8].tobytes())


def subject_of_table(table: KvmPgtable, name: str, no_access: tuple[tuple[int, int], ...] = ()) -> Subject:
    """The subject for a table the model built (its pool's used extent is the image)."""
    assert table.pgd is not None
    regs = table.regs()
    mair = regs.mair_el2 if isinstance(regs, Stage1Regs) else DEFAULT_MAIR
    return Subject(name, table.geom, table.mem, table.pgd, regs, used_image(table), mair, no_access)


def subject_of_built(built: BuiltScenario) -> Subject:
    no_access = tuple((r.base, r.size) for r in built.regions)
    return subject_of_table(built.table, built.scenario.name, no_access)


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
    known_by: dict[str, int] = field(default_factory=dict)  # divergence key -> disagreements
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> probes with no comparison
    explain_limit: int = MAX_EXPLAINED  # disagreements kept with their full walk
    tlb: Any = None  # harness.check.live.TlbTally: the live updates (None: not run live)

    @property
    def checked(self) -> int:
        return sum(self.probes.values())

    @property
    def ok(self) -> bool:
        return self.mismatched == 0 and (self.tlb is None or self.tlb.ok)

    def count(self, what: dict[str, int], key: str, n: int = 1) -> None:
        if n:
            what[key] = what.get(key, 0) + n

    def time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def add(self, m: Mismatch | None, divergence: str | None) -> None:
        """One disagreement: explained by ``divergence`` (a key) or not; ``m`` is its full text
        (None once :data:`MAX_EXPLAINED` are kept)."""
        if divergence:
            self.known += 1
            self.count(self.known_by, divergence)
        else:
            self.mismatched += 1
        if m is not None:
            self.mismatches.append(m)

    @property
    def room(self) -> bool:
        return len(self.mismatches) < self.explain_limit

    def room_for(self, divergence: str | None) -> bool:
        """Whether a disagreement's walk is kept: a known one within ``explain_limit``, an
        unexplained one up to :data:`MAX_EXPLAINED` (they must be shown)."""
        return len(self.mismatches) < (self.explain_limit if divergence else max(MAX_EXPLAINED, self.explain_limit))

    def merge(self, other: CheckReport) -> None:
        for mine, theirs in ((self.probes, other.probes), (self.withheld, other.withheld),
                             (self.known_by, other.known_by), (self.skipped, other.skipped)):
            for k, v in theirs.items():
                self.count(mine, k, v)
        for k, t in other.timings.items():
            self.time(k, t)
        self.matched += other.matched
        self.mismatched += other.mismatched
        self.known += other.known
        self.mismatches += other.mismatches[: max(0, MAX_EXPLAINED - len(self.mismatches))]
        if other.tlb is not None:
            if self.tlb is None:
                self.tlb = type(other.tlb)()
            self.tlb.merge(other.tlb)

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        extra = f", {self.known} known QEMU divergence(s)" if self.known else ""
        skipped = sum(self.skipped.values())
        extra += f", {skipped} without a prediction" if skipped else ""
        if self.tlb is not None and self.tlb.updates:
            extra += f"; {self.tlb.updates} live update(s), {self.tlb.stale} stale"
            extra += "".join(f", {v} {k}" for k, v in sorted(self.tlb.by_kind.items()) if k != "tlb-stale")
        return f"{verdict} {self.scenario}: {self.matched}/{self.checked} matched{extra} ({self.geometry})"

    def text(self) -> str:
        lines = [self.summary()]
        lines += [f"  {k}: {v} probes" for k, v in self.probes.items()]
        lines += [f"  withheld from AT ({k}): {v}, checked with real accesses" for k, v in self.withheld.items()]
        lines += [f"  skipped ({k}): {v}" for k, v in self.skipped.items()]
        if self.tlb is not None and self.tlb.updates:
            lines.append("  " + self.tlb.summary())
            lines += ["  " + f.text() for f in self.tlb.findings]
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
            "known_by_divergence": self.known_by, "skipped": self.skipped,
            **({"tlb": self.tlb.as_json()} if self.tlb is not None else {}),
        }


# ---------------------------------------------------------------------------------------------
# One prediction per chunk, indexed.


def take(result: BatchResult, idx: npt.NDArray[Any]) -> BatchResult:
    """The lanes ``idx`` (indices or a mask) of a batch result."""
    values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    return BatchResult(**{k: v[idx] if isinstance(v, np.ndarray) else v for k, v in values.items()})


@dataclass(frozen=True)
class Prediction:
    """A chunk predicted once: by the Arm ARM (``arm``) and as the running QEMU walks it
    (``qemu``: the same object where no declared departure changes the walk)."""

    arm: BatchResult
    qemu: BatchResult

    @classmethod
    def of(cls, subject: Subject, addrs: U64, access: Access, version: divergences.QemuVersion) -> Prediction:
        return cls.of_each(subject, addrs, (access,), version)[0]

    @classmethod
    def of_each(cls, subject: Subject, addrs: U64, accesses: Sequence[Access],
                version: divergences.QemuVersion) -> tuple[Prediction, ...]:
        """The chunk predicted for each of ``accesses`` (one walk of the tables per semantics)."""
        arm = subject.predict_each(addrs, accesses)
        kw = divergences.qemu_semantics(version, subject.geom)
        qemu = subject.predict_each(addrs, accesses, **kw) if kw else arm
        return tuple(cls(a, q) for a, q in zip(arm, qemu, strict=True))

    def take(self, idx: npt.NDArray[Any]) -> Prediction:
        arm = take(self.arm, idx)
        return Prediction(arm, arm if self.qemu is self.arm else take(self.qemu, idx))


def _matches(pred: BatchResult, actual: U64) -> Bools:
    return np.asarray(((expected_par_batch(pred) ^ actual) & par_compare_mask_batch(pred)) == 0, dtype=np.bool_)


def _at_aborts(actual: U64) -> Bools:
    """Result slots the firmware tagged as "this AT took a synchronous exception"."""
    return np.asarray(mailbox.is_at_exception(actual), dtype=np.bool_)


def _at_abort_text(value: int) -> str:
    return f"AT took an exception: {describe_esr(int(mailbox.at_exception_esr(value)))}"


def _explain_at(report: CheckReport, subject: Subject, op: str, access: Access, addrs: U64, actual: U64,
                pred: Prediction, bad: npt.NDArray[np.intp], version: divergences.QemuVersion) -> None:
    """Classify the AT disagreements ``bad``: first in batch, by the declared departures that
    change the model's walk; the rest one by one (text for the first :data:`MAX_EXPLAINED`)."""
    key = np.full(bad.size, "", dtype=object)
    sub_actual = actual[bad]
    for name, kw in divergences.semantic_explanations(version, subject.geom):
        todo = np.flatnonzero(key == "")
        if not todo.size:
            break
        alt = subject.predict(addrs[bad[todo]], access, **kw)
        key[todo[_matches(alt, sub_actual[todo])]] = name
    for n in np.argsort(key != "", kind="stable"):  # the unexplained first: they get the room for walks
        i = bad[n]
        addr = int(addrs[i])
        k = str(key[n]) or None
        if k is None or report.room:
            model = subject.walk(addr, access)
            if k is None:
                k = divergences.explain_key(model, int(actual[i]), subject.geom,
                                            partial(subject.walk, addr, access), version)
            m = None
            if report.room_for(k):
                exp = expected_par(model) if not model.unmodelled else 0
                m = Mismatch(addr, op, f"{model.summary()} (PAR {exp:#x})", str(Par(int(actual[i]))),
                             model.explain(), k)
            report.add(m, k)
        else:
            report.add(None, k)


def _at_hazards(report: CheckReport, pred: Prediction, version: divergences.QemuVersion) -> Bools:
    """The addresses to withhold from AT (and check with real accesses instead)."""
    unsafe, _ = divergences.at_unsafe(pred.qemu, version)
    for hz in divergences.AT_HAZARDS:
        if hz.applies_to(version):
            report.count(report.withheld, hz.key, int(hz.select(pred.qemu).sum()))
    return unsafe


@dataclass
class _AtChunk:
    """One AT request of :func:`check_at`: its addresses and their prediction."""

    op: str
    access: Access
    addrs: U64
    pred: Prediction


def _withhold(report: CheckReport, job: _AtChunk, version: divergences.QemuVersion,
              withheld: dict[Access, list[U64]]) -> _AtChunk:
    """Take out of a predicted chunk (into ``withheld``) what the running QEMU's AT must not see."""
    unsafe = _at_hazards(report, job.pred, version)
    if not unsafe.any():
        return job
    never = divergences.unprobeable(job.pred.qemu, version)
    report.count(report.skipped, SKIP_UNPROBEABLE, int(never.sum()))
    withheld.setdefault(job.access, []).append(job.addrs[unsafe & ~never])
    keep = np.flatnonzero(~unsafe)
    return _AtChunk(job.op, job.access, job.addrs[keep], job.pred.take(keep))


def _predict_chunk(report: CheckReport, subj: Subject, ops: Sequence[tuple[str, Access]], chunk: U64,
                   version: divergences.QemuVersion, withheld: dict[Access, list[U64]]) -> list[_AtChunk]:
    """Predict a chunk for each AT form in ``ops`` (one walk of the tables); take out what the
    running QEMU's AT must not see."""
    t0 = time.perf_counter()
    preds = Prediction.of_each(subj, chunk, [access for _, access in ops], version)
    jobs = [_AtChunk(op, access, chunk, pred) for (op, access), pred in zip(ops, preds, strict=True)]
    if divergences.hazards(version, subj.stage):
        jobs = [_withhold(report, job, version, withheld) for job in jobs]
    report.time("predict", time.perf_counter() - t0)
    return jobs


def _predict_request(report: CheckReport, subj: Subject, ops: Sequence[tuple[str, Access]], chunk: U64,
                     version: divergences.QemuVersion, withheld: dict[Access, list[U64]]) -> list[_AtChunk]:
    """One request's jobs, predicted in pieces of :data:`HOST_PIECE` addresses: every piece of
    the first AT form, then of the second (the order of the request's results)."""
    pieces = [_predict_chunk(report, subj, ops, chunk[i : i + HOST_PIECE], version, withheld)
              for i in range(0, chunk.size, HOST_PIECE)]
    return [jobs[k] for k in range(len(ops)) for jobs in pieces]


def _form_addresses(jobs: list[_AtChunk], access: Access, chunk: U64) -> U64:
    """The addresses one AT form of a request probes: its pieces' (the whole chunk where no
    piece withheld any)."""
    parts = [job.addrs for job in jobs if job.access is access]
    if sum(p.size for p in parts) == chunk.size:
        return chunk
    return np.concatenate(parts)


def at_request_sizes(n: int, cap: int) -> list[int]:
    """How :func:`check_at` splits ``n`` addresses into AT requests of at most ``cap`` (each
    carrying both forms). Up to :data:`AT_PIPELINE_CHUNK`: one request. Beyond, as few requests
    as keep the firmware busy: each costs a stop and a continue through gdb (a few ms on a loaded
    machine), while the host's work outside the firmware's run is the first request's prediction
    and the last one's comparison. So the requests grow from :data:`AT_PIPELINE_FIRST` by
    :data:`AT_PIPELINE_GROWTH` (each predicted while the last runs), the bulk follows in equal
    requests, and a small last one (:data:`AT_PIPELINE_TAIL`) ends it; too few addresses for
    that: two halves."""
    if n <= min(AT_PIPELINE_CHUNK, cap):
        return [n] if n else []
    tail = min(AT_PIPELINE_TAIL, cap)
    ramp: list[int] = []
    size = min(AT_PIPELINE_FIRST, cap)
    while sum(ramp) + 2 * size + tail <= n and (not ramp or ramp[-1] < cap):  # room for a bulk as big
        ramp.append(size)
        size = min(size * AT_PIPELINE_GROWTH, cap)
    if not ramp:
        return [n // 2, n - n // 2]
    rest = n - sum(ramp) - tail
    parts = -(-rest // cap)
    return ramp + [rest // parts + (1 if i < rest % parts else 0) for i in range(parts)] + [tail]


def _compare_chunk(report: CheckReport, subj: Subject, job: _AtChunk, actual: U64,
                   version: divergences.QemuVersion) -> None:
    """Compare the MMU's PARs with the prediction; classify the disagreements."""
    t0 = time.perf_counter()
    op, access, chunk, pred = job.op, job.access, job.addrs, job.pred
    report.count(report.probes, op, int(chunk.size))
    diff = expected_par_batch(pred.arm)
    diff ^= actual
    diff &= par_compare_mask_batch(pred.arm)
    differs = diff != 0
    aborted = _at_aborts(actual)
    unmodelled = pred.arm.unmodelled if pred.qemu is pred.arm else pred.arm.unmodelled | pred.qemu.unmodelled
    odd = aborted | unmodelled  # no PAR to compare: counted apart (usually none)
    if not odd.any():
        bad = np.flatnonzero(differs)
        report.matched += int(chunk.size - bad.size)
        t1 = time.perf_counter()
    else:
        bad = np.flatnonzero(differs & ~odd)
        report.count(report.skipped, SKIP_UNMODELLED, int((unmodelled & ~aborted).sum()))
        report.matched += int(chunk.size - bad.size - unmodelled.sum() - (aborted & ~unmodelled).sum())
        report.count(report.skipped, SKIP_AT_ABORT, int((aborted & unmodelled).sum()))
        t1 = time.perf_counter()
        for i in np.flatnonzero(aborted & ~unmodelled):  # an abort where the model reads tables
            addr = int(chunk[i])
            model = subj.walk(addr, access)
            report.add(Mismatch(addr, op, model.summary(), _at_abort_text(int(actual[i])), model.explain())
                       if report.room_for(None) else None, None)
    _explain_at(report, subj, op, access, chunk, actual, pred, bad, version)
    report.time("compare", t1 - t0)
    report.time("classify", time.perf_counter() - t1)


def check_at(report: CheckReport, target: TargetLike, subject: Subject | KvmPgtable, addrs: U64,
             background: Callable[[bool], None] | None = None) -> dict[Access, U64]:
    """Probe ``addrs`` with each AT form of the subject's stage and compare with the model.
    See :func:`_check_at`."""
    return _check_at(report, target, subject, addrs, background)[0]


def _check_at(report: CheckReport, target: TargetLike, subject: Subject | KvmPgtable, addrs: U64,
              background: Callable[[bool], None] | None = None,
              uninstall_after: bool = False) -> tuple[dict[Access, U64], bool]:
    """Probe ``addrs`` with each AT form of the subject's stage and compare with the model.
    With ``uninstall_after``, the last request uninstalls the tables when nothing was withheld
    (returned second: whether it did).

    Both forms of a chunk go in one request (:meth:`harness.target.Target.at_start_both`;
    sizes: :func:`at_request_sizes`). Pipelined: the next chunk is predicted, and the previous
    one compared, while the firmware probes (the host in pieces of :data:`HOST_PIECE`);
    ``background`` (if given) is called with False while each earlier request is in flight (a
    slice of work) and with True while the last one is (the rest): the fuzzer builds its next
    table there. Returns, per access type, the addresses withheld from AT because of a known
    QEMU hazard (they are to be checked with real accesses)."""
    subj = subject if isinstance(subject, Subject) else subject_of_table(subject, report.scenario)
    ops = at_ops(subj)
    assert [access for _, access in ops] == [READ, WRITE]
    sizes = at_request_sizes(int(addrs.size), int(target.layout.max_at) // 2)
    bounds = np.cumsum([0, *sizes]).tolist()
    version = target.qemu_version
    withheld: dict[Access, list[U64]] = {}
    inflight: list[_AtChunk] = []
    uninstalled = False

    def wait() -> list[tuple[_AtChunk, U64]]:
        t0 = time.perf_counter()
        actual = target.at_wait()
        report.time("wait", time.perf_counter() - t0)
        out, lo = [], 0
        for job in inflight:
            out.append((job, actual[lo : lo + job.addrs.size]))
            lo += job.addrs.size
        return out

    for lo, hi in itertools.pairwise(bounds):
        chunk = addrs[lo:hi]
        jobs = _predict_request(report, subj, ops, chunk, version, withheld)
        done = wait() if inflight else []
        inflight = []
        if any(job.addrs.size for job in jobs):
            t0 = time.perf_counter()
            uninstalled = uninstall_after and hi >= addrs.size and not withheld
            target.at_start_both(_form_addresses(jobs, READ, chunk), _form_addresses(jobs, WRITE, chunk), subj.stage,
                                 uninstall=uninstalled, el0=subj.el0)
            report.time("submit", time.perf_counter() - t0)
            inflight = jobs
        for job, actual in done:
            _compare_chunk(report, subj, job, actual, version)
        if background is not None and inflight:
            t0 = time.perf_counter()
            background(False)
            report.time("background", time.perf_counter() - t0)
    if background is not None:
        t0 = time.perf_counter()
        background(True)
        report.time("background", time.perf_counter() - t0)
    if inflight:
        for job, actual in wait():
            _compare_chunk(report, subj, job, actual, version)
    return {a: np.concatenate(v) for a, v in withheld.items()}, uninstalled


# ---------------------------------------------------------------------------------------------
# Real loads and stores.


def _expected_esr(pred: BatchResult, stage: Stage, write: bool) -> tuple[U64, U64, int]:
    """(EC, DFSC, WnR) of the data aborts the model predicts, per lane."""
    ec = ExceptionClass.DABT_SAME if stage is Stage.S1 else ExceptionClass.DABT_LOWER
    dfsc = fault_status_batch(pred)  # level -1 (DS = 1) has its own codes, not (kind << 2) | level
    return np.full(len(pred), int(ec), dtype=np.uint64), dfsc, int(write)


def _access_agrees(pred: BatchResult, rec: Any, addrs: U64, stage: Stage, write: bool) -> Bools:
    """Per lane: the access completed where the model translates, or raised exactly the data
    abort the model predicts (EC, DFSC, WnR, S1PTW = 0, FAR, and HPFAR at stage 2)."""
    esr = rec["esr"].astype(np.uint64)
    completed = np.asarray(rec["completed"], dtype=np.bool_)
    ok = pred.ok
    ec, dfsc, wnr = _expected_esr(pred, stage, write)
    same = (((esr >> np.uint64(ESR_EC.lo)) & np.uint64(ESR_EC.max)) == ec)
    same &= (esr & np.uint64(ISS_DFSC.max)) == dfsc
    same &= ((esr >> np.uint64(ISS_WNR.lo)) & np.uint64(1)) == np.uint64(wnr)
    same &= ((esr >> np.uint64(ISS_S1PTW.lo)) & np.uint64(1)) == 0
    if stage is Stage.S2:
        fipa = (rec["hpfar"].astype(np.uint64) >> np.uint64(HPFAR_FIPA.lo)) & np.uint64(HPFAR_FIPA.max)
        same &= fipa == (addrs >> np.uint64(12))  # HPFAR_EL2.FIPA: IPA[51:12] (hpfar_ipa_page)
    else:
        same &= rec["far"].astype(np.uint64) == addrs & ~np.uint64(7)
    return np.asarray(np.where(ok, completed, ~completed & same), dtype=np.bool_)


def _in_scratch(pred: BatchResult, scratch: Any) -> Bools:
    base = np.uint64(scratch.base)
    return np.asarray(pred.ok & (pred.pa >= base) & (pred.pa < base + np.uint64(scratch.size)), dtype=np.bool_)


def _scratch_words(target: TargetLike, scratch: Any) -> U64:
    return target.ram_u64(int(scratch.base), int(scratch.size) // 8)


@dataclass(frozen=True)
class Tokens:
    """Unique 64-bit values planted at the expected PAs of loads (one per distinct word)."""

    index: npt.NDArray[np.intp]  # per lane: which planted value it must read (-1: none expected)
    values: U64

    @classmethod
    def plant(cls, target: TargetLike, pred: BatchResult, scratch: Any, salt: int) -> Tokens:
        words = _scratch_words(target, scratch)
        ok = _in_scratch(pred, scratch)
        offs = (pred.pa[ok] - np.uint64(scratch.base)) >> np.uint64(3)
        uniq, inverse = np.unique(offs, return_inverse=True)
        values = np.uint64(LOAD_TOKEN_BASE | (salt & 0xFFFF) << 32) | np.arange(uniq.size, dtype=np.uint64)
        words[uniq.astype(np.intp)] = values
        index = np.full(len(pred), -1, dtype=np.intp)
        index[np.flatnonzero(ok)] = inverse.reshape(-1)
        return cls(index, values)

    def loaded(self, rec: Any) -> Bools:
        """Per lane: the load read the value planted at its expected PA (or none was expected)."""
        want = np.where(self.index >= 0, self.values[np.maximum(self.index, 0)] if self.values.size else 0, 0)
        return np.asarray((self.index < 0) | (rec["value"].astype(np.uint64) == want), dtype=np.bool_)


LOAD_TOKEN_BASE = 0x10AD_0000_0000_0000


@dataclass(frozen=True)
class StoreGuard:
    """The 4K pages of scratch RAM that hold the stores' expected PAs, as they were before the
    stores: afterwards, no other word of them may have changed (a store that went astray nearby)."""

    index: npt.NDArray[np.intp]  # word indices in scratch RAM of the guarded pages
    before: U64
    expected: npt.NDArray[np.intp]  # word indices the stores are expected to write

    MAX_PAGES = 4096
    PAGE_WORDS = 512

    @classmethod
    def take(cls, target: TargetLike, pred: BatchResult, scratch: Any) -> StoreGuard | None:
        ok = _in_scratch(pred, scratch)
        expected = ((pred.pa[ok] - np.uint64(scratch.base)) >> np.uint64(3)).astype(np.intp)
        pages = np.unique(expected // cls.PAGE_WORDS)
        if not pages.size or pages.size > cls.MAX_PAGES:
            return None
        index = (pages[:, None] * cls.PAGE_WORDS + np.arange(cls.PAGE_WORDS)).reshape(-1)
        return cls(index, _scratch_words(target, scratch)[index].copy(), expected)

    def strays(self, target: TargetLike, scratch: Any) -> list[int]:
        """PAs of words that changed but were no store's expected PA."""
        after = _scratch_words(target, scratch)[self.index]
        changed = self.index[after != self.before]
        stray = np.setdiff1d(changed, self.expected)
        return [int(scratch.base) + 8 * int(w) for w in stray]


def _stores_landed(target: TargetLike, pred: BatchResult, rec: Any, scratch: Any) -> Bools:
    """Per lane: the value the store carried is at its expected PA (where several stores share
    a word, the last one's value), or no store was expected to complete."""
    words = _scratch_words(target, scratch)
    ok = np.flatnonzero(_in_scratch(pred, scratch))
    out = np.ones(len(pred), dtype=np.bool_)
    if not ok.size:
        return out
    offs = ((pred.pa[ok] - np.uint64(scratch.base)) >> np.uint64(3)).astype(np.intp)
    carried = rec["value"].astype(np.uint64)[ok]
    last = {int(o): int(v) for o, v in zip(offs, carried, strict=True)}  # the last store to a word wins
    found = words[offs]
    want = np.array([last[int(o)] for o in offs], dtype=np.uint64)
    out[ok] = found == want
    return out


def _access_departures(subject: Subject, addrs: U64, access: Access, rec: Any, write: bool,
                       version: divergences.QemuVersion) -> list[str | None]:
    """For accesses that disagree with the Arm ARM's walk: the declared departure (if any) whose
    walk they agree with."""
    keys: list[str | None] = [None] * addrs.size
    for name, kw in divergences.semantic_explanations(version, subject.geom):
        alt = subject.predict(addrs, access, **kw)
        for i in np.flatnonzero(_access_agrees(alt, rec, addrs, subject.stage, write)):
            keys[i] = keys[i] or name
    return keys


def _outside(addrs: U64, ranges: tuple[tuple[int, int], ...]) -> Bools:
    out = np.ones(addrs.size, dtype=np.bool_)
    for base, size in ranges:
        out &= ~((addrs >= np.uint64(base)) & (addrs < np.uint64(base + size)))
    return out


def check_access(report: CheckReport, target: TargetLike, subject: Subject | KvmPgtable, addrs: U64,
                 rng: np.random.Generator, must: Mapping[Access, U64] | None = None,
                 sample: int = MAX_ACCESS_PROBES) -> None:
    """Real loads and stores on the addresses that fault (on both the Arm ARM's and QEMU's walk)
    or translate into scratch RAM; the addresses in ``must`` (withheld from AT) are always
    included. The loads and the stores go in one request (:meth:`harness.target.Target.access_both`)."""
    subj = subject if isinstance(subject, Subject) else subject_of_table(subject, report.scenario)
    scratch = target.layout.scratch
    version = target.qemu_version
    plans: dict[bool, tuple[U64, Prediction]] = {}
    for write, access in ((False, READ), (True, WRITE)):
        forced = (must or {}).get(access, addrs[:0])
        cand = np.unique(np.concatenate([addrs, forced]))
        if not cand.size:
            continue
        pred = Prediction.of(subj, cand, access, version)
        a, q = pred.arm, pred.qemu
        safe = (_in_scratch(a, scratch) & q.ok & (a.pa == q.pa)) | (~a.ok & ~q.ok & ~a.unmodelled & ~q.unmodelled)
        safe &= ~np.isin(a.fault, divergences.untrusted_faults(version))
        safe &= ~divergences.unprobeable(q, version) & ~divergences.unprobeable(a, version)
        if subj.stage is Stage.S2:  # a stage-1 fault of EL1 (above PAMax) is taken at EL1, not reported
            safe &= a.ok | (a.fault_stage2 & q.fault_stage2)
        safe &= _outside(cand, subj.no_access)
        eligible = np.flatnonzero(safe & ~np.isin(cand, forced))
        if eligible.size > sample:
            eligible = rng.choice(eligible, sample, replace=False)
        idx = np.union1d(eligible, np.flatnonzero(np.isin(cand, forced)))
        if idx.size:
            plans[write] = (cand[idx], pred.take(idx))
    if not plans:
        return
    # As a load request then a store request: the loads' tokens planted, then the stores' guard.
    tokens = Tokens.plant(target, plans[False][1].arm, scratch, report.checked) if False in plans else None
    guard = StoreGuard.take(target, plans[True][1].arm, scratch) if True in plans else None
    t0 = time.perf_counter()
    if len(plans) == 2:
        recs = dict(zip((False, True), target.access_both(plans[False][0], plans[True][0], subj.stage,
                                                          el0=subj.el0), strict=True))
    else:
        ((write, (chosen, _)),) = plans.items()
        recs = {write: target.access(chosen, write=write, stage=subj.stage, el0=subj.el0)}
    report.time("access", time.perf_counter() - t0)
    for write, access in ((False, READ), (True, WRITE)):
        if write in plans:
            chosen, pred = plans[write]
            _judge_access(report, target, subj, chosen, pred, recs[write], write, access,
                          tokens if not write else None, guard if write else None)


def _judge_access(report: CheckReport, target: TargetLike, subj: Subject, chosen: U64, pred: Prediction,
                  rec: Any, write: bool, access: Access, tokens: Tokens | None, guard: StoreGuard | None) -> None:
    """Compare one kind of real access (loads or stores) with the model."""
    scratch = target.layout.scratch
    version = target.qemu_version
    name = ("store" if write else "load") + (" EL0" if subj.el0 else "")
    report.count(report.probes, name, int(chosen.size))
    good = _access_agrees(pred.arm, rec, chosen, subj.stage, write)
    if "value" in (rec.dtype.names or ()):
        landed = tokens.loaded(rec) if tokens is not None else _stores_landed(target, pred.arm, rec, scratch)
        good &= landed
    if guard is not None:
        for pa in guard.strays(target, scratch):
            report.add(Mismatch(pa, "store", "no store lands here (not an expected PA)",
                                f"the word at PA {pa:#x} changed", "") if report.room_for(None) else None, None)
    bad = np.flatnonzero(~good)
    report.matched += int(chosen.size - bad.size)
    if not bad.size:
        return
    keys = _access_departures(subj, chosen[bad], access, rec[bad], write, version)
    for n, i in enumerate(bad):
        addr = int(chosen[i])
        key = keys[n]
        m = None
        if report.room_for(key):
            t = subj.walk(addr, access)
            got = "completed" if rec["completed"][i] else (
                f"{describe_esr(int(rec['esr'][i]))} FAR {int(rec['far'][i]):#x} HPFAR {int(rec['hpfar'][i]):#x}")
            want = "completes" if t.ok else f"data abort, {t.summary()}"
            m = Mismatch(addr, name, f"{t.summary()} -> {want}", got, t.explain(), key)
        report.add(m, key)


# ---------------------------------------------------------------------------------------------
# Instruction fetches.
#
# AT has no fetch form, so execute permission (stage-1 XN, or PXN in the EL2&0 regime, XNTable /
# PXNTable, SCTLR_EL2.WXN, EL0-writable memory with E2H = 1; stage-2 XN[54:53] for EL1) is only
# seen by branching there. A fetch probe runs whatever is at the PA the MMU picks, so only
# addresses whose walk (the Arm ARM's and QEMU's) reaches a valid leaf with its output in scratch
# RAM are probed, and the host plants ``bti c; movz x0, #tag; ret`` at each expected PA first
# (16-byte aligned, restored afterwards): a fetch that completes proves which PA it ran from by the
# tag it returns. The ``bti c`` makes guarded pages (stage-1 GP, bit 50, FEAT_BTI: a ``blr`` must
# land on a BTI, else a Branch Target exception - a property of the code, not of the
# translation) execute it like any other: the probe asks about execute permission only.
#
# Device memory is not excluded: the current Arm ARM pseudocode (AArch64.S1Translate and
# AArch64.S2Translate) treats an instruction fetch from Device memory as one from Normal
# Non-cacheable memory (older issues made it CONSTRAINED UNPREDICTABLE, INSTRDEVICE: a Permission
# fault or Normal Non-cacheable); the model's permissions ignore the memory type, so a Device leaf
# without XN is executable, and the MMU is checked against that.

def subject_wxn(subject: Subject) -> bool:
    """SCTLR_EL2.WXN as the subject's registers set it (stage 1 only)."""
    return isinstance(subject.regs, Stage1Regs) and bool(subject.regs.sctlr_el2_set & SCTLR_WXN.mask)


_LEAF_FAULTS = (FaultKind.PERMISSION.value, FaultKind.ACCESS_FLAG.value)


def _leaf_pas(subject: Subject, addrs: U64, pred: BatchResult, wxn: bool, rng: np.random.Generator,
              walks: int, **semantics: Any) -> U64:
    """Each lane's leaf output address (0 where unknown): from the EXEC batch where it translates;
    where it faults at its leaf (AF, permission: the batch keeps no leaf fields there), from a READ
    batch where that translates, else from a scalar walk (at most ``walks`` of them, sampled)."""
    pa = np.where(pred.ok, pred.pa, np.uint64(0))
    faulting = np.flatnonzero(~pred.ok)
    if faulting.size:
        read = subject.predict(addrs[faulting], READ, **semantics)
        pa[faulting] = np.where(read.ok, read.pa, np.uint64(0))
        rest = faulting[~read.ok]
        if rest.size > walks:
            rest = rng.choice(rest, walks, replace=False)
        for i in rest:
            t = subject.walk(int(addrs[i]), EXEC, wxn=wxn, **semantics)
            pa[i] = np.uint64(t.pa if t.pa is not None else 0)
    return np.asarray(pa, dtype=np.uint64)


def _fetch_agrees(pred: BatchResult, rec: Any, addrs: U64, stage: Stage, want_value: U64,
                  el0: bool = False) -> Bools:
    """Per lane: the fetch completed with the planted tag where the model translates, or raised
    exactly the instruction abort the model predicts (EC 0x21 at EL2 / 0x20 from EL1 or EL0,
    IFSC, S1PTW = 0, FAR, and HPFAR at stage 2)."""
    esr = rec["esr"].astype(np.uint64)
    ec = ExceptionClass.IABT_SAME if stage is Stage.S1 and not el0 else ExceptionClass.IABT_LOWER
    faulted = rec["status"].astype(np.uint64) == np.uint64(mailbox.AccessStatus.FAULT)
    same = faulted & (((esr >> np.uint64(ESR_EC.lo)) & np.uint64(ESR_EC.max)) == np.uint64(int(ec)))
    same &= (esr & np.uint64(ISS_DFSC.max)) == fault_status_batch(pred)  # IFSC: ISS[5:0] like DFSC
    same &= ((esr >> np.uint64(ISS_S1PTW.lo)) & np.uint64(1)) == 0
    same &= rec["far"].astype(np.uint64) == addrs
    if stage is Stage.S2:
        fipa = (rec["hpfar"].astype(np.uint64) >> np.uint64(HPFAR_FIPA.lo)) & np.uint64(HPFAR_FIPA.max)
        same &= fipa == (addrs >> np.uint64(12))
    done = np.asarray(rec["completed"], dtype=np.bool_) & (rec["value"].astype(np.uint64) == want_value)
    return np.asarray(np.where(pred.ok, done, same), dtype=np.bool_)


def _in_ranges(pa: U64, where: Sequence[Any], length: int) -> Bools:
    out = np.zeros(pa.size, dtype=np.bool_)
    for r in where:
        out |= (pa >= np.uint64(r.base)) & (pa + np.uint64(length) <= np.uint64(r.base + r.size))
    return out


def _fetch_candidates(subject: Subject, addrs: U64, rng: np.random.Generator,
                      sample: int, where: Sequence[Any], version: divergences.QemuVersion,
                      wxn: bool) -> tuple[U64, BatchResult, U64]:
    """The addresses to fetch from (16-byte aligned; sampled, up to half of them faulting at their
    leaf), their Arm ARM prediction and their expected PAs: only where both walks (the Arm ARM's
    and QEMU's) reach a valid leaf at the same PA, inside ``where`` (RAM the payload does not use)."""
    cand = np.unique(addrs & ~np.uint64(mailbox.FETCH_STUB_SIZE - 1))
    cand = cand[_outside(cand, subject.no_access)]
    arm = subject.predict(cand, EXEC, wxn=wxn)
    kw = divergences.qemu_semantics(version, subject.geom)
    qemu = subject.predict(cand, EXEC, wxn=wxn, **kw) if kw else arm
    leaf = arm.ok | np.isin(arm.fault, _LEAF_FAULTS)
    leaf &= (qemu.fault == arm.fault) & (qemu.fault_level == arm.fault_level) & (qemu.pa == arm.pa)
    leaf &= ~np.isin(arm.fault, divergences.untrusted_faults(version))
    idx = np.flatnonzero(leaf)
    walks = max(1, sample // 4)
    pa = _leaf_pas(subject, cand[idx], take(arm, idx), wxn, rng, walks)
    if kw:
        pa = np.where(pa == _leaf_pas(subject, cand[idx], take(qemu, idx), wxn, rng, walks, **kw), pa, np.uint64(0))
    safe = (pa != 0) & _in_ranges(pa, where, mailbox.FETCH_STUB_SIZE)
    idx, pa = idx[safe], pa[safe]
    faulting = np.flatnonzero(~arm.ok[idx])
    ok = np.flatnonzero(arm.ok[idx])
    if faulting.size > sample // 2:
        faulting = rng.choice(faulting, sample // 2, replace=False)
    if ok.size > sample - faulting.size:
        ok = rng.choice(ok, sample - faulting.size, replace=False)
    pick = np.sort(np.concatenate([ok, faulting]))
    return cand[idx[pick]], take(arm, idx[pick]), pa[pick]


@dataclass(frozen=True)
class PlantedCode:
    """Fetch stubs planted at the expected PAs (one tag per distinct word), and what was there."""

    words: npt.NDArray[np.intp]  # word indices in guest RAM
    before: U64
    tag: U64  # per lane: the tag its fetch must return

    @staticmethod
    def _ram(target: TargetLike) -> U64:
        layout = target.layout
        return target.ram_u64(int(layout.ram_base), int(layout.ram_size) // 8)

    @classmethod
    def plant(cls, target: TargetLike, pa: U64, salt: int) -> PlantedCode:
        ram = cls._ram(target)
        offs = ((pa - np.uint64(target.layout.ram_base)) >> np.uint64(3)).astype(np.intp)
        uniq, inverse = np.unique(offs, return_inverse=True)
        words = (uniq[:, None] + np.arange(mailbox.FETCH_STUB_WORDS)).reshape(-1)
        before = ram[words].copy()
        tags = (np.uint64(salt) + np.arange(uniq.size, dtype=np.uint64)) & np.uint64(mailbox.FETCH_TAG_MASK)
        ram[words] = mailbox.fetch_stubs(tags).reshape(-1)
        return cls(words, before, tags[inverse.reshape(-1)])

    def restore(self, target: TargetLike) -> None:
        self._ram(target)[self.words] = self.before


@dataclass(frozen=True)
class FetchProbes:
    """What :func:`check_exec` ran: the addresses, their expected PAs, the model's prediction and
    the MMU's records (``completed``, ``status``, ``esr``, ``far``, ``hpfar``, ``value``)."""

    addresses: U64
    pa: U64
    predicted: BatchResult
    records: Any
    agree: Bools

    def completed_in(self, lo: int, hi: int) -> Bools:
        """Per probe in ``[lo, hi)``: whether the MMU ran it (an empty array if none there)."""
        inside = (self.addresses >= np.uint64(lo)) & (self.addresses < np.uint64(hi))
        return np.asarray(self.records["completed"][inside], dtype=np.bool_)


def _el0_stub_runs(subject: Subject, code: tuple[tuple[int, int], ...]) -> bool:
    """Whether EL0 may run the firmware's EL0 stub: every page of its code region executable at
    EL0 on both walks (the builder maps it UXN = 0; random tables above it could forbid it)."""
    pages = np.concatenate([np.arange(base, base + size, 4096, dtype=np.uint64) for base, size in code])
    return bool(subject.predict(pages, EXEC).ok.all())


def check_exec(report: CheckReport, target: TargetLike, subject: Subject, addrs: U64,
               rng: np.random.Generator, sample: int = MAX_FETCH_PROBES,
               where: Sequence[Any] | None = None) -> FetchProbes | None:
    """Instruction-fetch probes (``report.probes["fetch"]``) on up to ``sample`` of ``addrs``
    whose walk reaches a valid leaf with its output in ``where`` (ranges with ``base`` and
    ``size`` of RAM the payload does not use; default: the layout's scratch RAM; see the notes
    above), compared with the model's EXEC walk: completes (returning the tag planted at the
    expected PA), or takes the instruction abort the model predicts (access flag before
    permission, at the leaf level). Returns what ran (None: nothing could)."""
    version = target.qemu_version
    wxn = subject_wxn(subject)
    # Not where the firmware's own code sits in the fetch's VA space (stage 2: EL1's VA is the
    # IPA): gdb's hardware breakpoints (idle, panic) match the PC at any EL, so a fetch through
    # a random stage 2 at IPA == the address of ``idle`` stops as if the request had ended
    # (found by the fuzzer: RequestFailed "FETCH: firmware answered PENDING").
    firmware_code = tuple((r.base, r.size) for r in target.layout.firmware_regions() if r.name == "code")
    if subject.el0 and not _el0_stub_runs(subject, firmware_code):
        report.count(report.skipped, SKIP_EL0_STUB, int(min(addrs.size, sample)))
        return None
    addrs = addrs[_outside(addrs, firmware_code)]
    chosen, pred, pa = _fetch_candidates(subject, addrs, rng, sample,
                                         [target.layout.scratch] if where is None else where, version, wxn)
    if not chosen.size:
        return None
    code = PlantedCode.plant(target, pa, report.checked)
    t0 = time.perf_counter()
    try:
        rec = target.fetch(chosen, stage=subject.stage, el0=subject.el0)
    finally:
        if target.alive:
            code.restore(target)
    report.time("fetch", time.perf_counter() - t0)
    name = "fetch" + (" EL0" if subject.el0 else "")
    report.count(report.probes, name, int(chosen.size))
    good = _fetch_agrees(pred, rec, chosen, subject.stage, code.tag, subject.el0)
    bad = np.flatnonzero(~good)
    report.matched += int(chosen.size - bad.size)
    for i in bad:
        addr = int(chosen[i])
        key = next((name for name, kw in divergences.semantic_explanations(version, subject.geom)
                    if _fetch_agrees(subject.predict(chosen[i : i + 1], EXEC, wxn=wxn, **kw), rec[i : i + 1],
                                     chosen[i : i + 1], subject.stage, code.tag[i : i + 1], subject.el0)[0]), None)
        m = None
        if report.room:
            t = subject.walk(addr, EXEC, wxn=wxn)
            r = rec[i]
            if r["completed"]:
                got = f"fetch completed, returned {int(r['value']):#x}"
                got += "" if int(r["value"]) == int(code.tag[i]) else f" (tag {int(code.tag[i]):#x} planted at " \
                    f"{int(pa[i]):#x}: ran from another PA)"
            else:
                got = f"{describe_esr(int(r['esr']))} FAR {int(r['far']):#x} HPFAR {int(r['hpfar']):#x}"
                if r["status"] == mailbox.AccessStatus.EL1_EXCEPTION:  # the code ran and raised this at EL1
                    got = f"exception at EL1 (ESR_EL1, FAR_EL1): {got}"
            want = "completes" if t.ok else f"instruction abort, {t.summary()}"
            m = Mismatch(addr, name, f"{t.summary()} -> {want}", got, t.explain(), key)
        report.add(m, key)
    return FetchProbes(chosen, pa, pred, rec, good)


# ---------------------------------------------------------------------------------------------
# A whole check.


def check_subject(subject: Subject, target: TargetLike, addrs: U64, rng: np.random.Generator | None = None,
                  access: bool = False, report: CheckReport | None = None,
                  access_sample: int = MAX_ACCESS_PROBES, fetch_sample: int | None = None,
                  background: Callable[[bool], None] | None = None, uninstall: bool = True,
                  el0: bool = True) -> CheckReport:
    """Install the subject's tables, probe ``addrs`` with AT (and real accesses where asked or
    where AT is withheld; with ``access``, instruction fetches too: :func:`check_exec`, at most
    ``fetch_sample``, default the smaller of :data:`MAX_FETCH_PROBES` and ``access_sample``),
    compare, uninstall (unless ``uninstall`` is false: the next install swaps the tables; a
    stage-1 table is uninstalled anyway, as the next install would have to do it first). Where no
    real access follows, the last AT request uninstalls. ``background`` is called while AT
    requests are in flight (:func:`check_at`). In the EL2&0 regime (and ``el0``) the same probes
    follow as EL0's (:func:`el0_view`: AT S1E0R/W, ``ldtr``/``sttr``, fetches from EL0)."""
    rng = rng or np.random.default_rng(0)
    report = report or CheckReport(subject.name, subject.geom.describe(), ".".join(map(str, target.qemu_version)))
    t0 = time.perf_counter()
    if background is None:
        target.install(subject.regs, subject.image)
    else:  # a slice of the background work while the install request is in flight
        target.install_start(subject.regs, subject.image)
        t1 = time.perf_counter()
        background(False)
        t2 = time.perf_counter()
        report.time("background", t2 - t1)
        target.install_wait()
        t0 += t2 - t1
    report.time("install", time.perf_counter() - t0)
    uninstalled = False
    views = [subject, el0_view(subject)] if el0 and has_el0(subject.geom) and not subject.el0 else [subject]
    try:
        fold = (uninstall or subject.stage is Stage.S1) and not (access and subject.accesses)
        for n, view in enumerate(views):
            last = n == len(views) - 1
            withheld, uninstalled = _check_at(report, target, view, addrs, background, uninstall_after=fold and last)
            _probe_real(report, target, view, addrs, rng, withheld, access, access_sample, fetch_sample)
    finally:
        if target.alive and uninstall and not uninstalled:
            t0 = time.perf_counter()
            target.uninstall()
            report.time("uninstall", time.perf_counter() - t0)
    return report


def _probe_real(report: CheckReport, target: TargetLike, subject: Subject, addrs: U64, rng: np.random.Generator,
                withheld: Mapping[Access, U64], access: bool, access_sample: int, fetch_sample: int | None) -> None:
    """check_subject's real accesses (where asked, or where AT was withheld) and fetches."""
    if not subject.accesses:
        report.count(report.skipped, SKIP_NO_ACCESS, sum(int(v.size) for v in withheld.values()))
        return
    if withheld or access:
        t0 = time.perf_counter()
        check_access(report, target, subject, addrs if access else addrs[:0], rng, withheld, access_sample)
        report.time("accesses (all)", time.perf_counter() - t0)
    if access and fetch_sample != 0:
        t0 = time.perf_counter()
        check_exec(report, target, subject, addrs, rng,
                   min(MAX_FETCH_PROBES, access_sample) if fetch_sample is None else fetch_sample)
        report.time("fetches (all)", time.perf_counter() - t0)


def check_built(built: BuiltScenario, target: TargetLike, rng: np.random.Generator | None = None,
                access: bool | None = None, addresses: U64 | None = None) -> CheckReport:
    """Install a built scenario's table, probe it, compare, uninstall."""
    rng = rng or np.random.default_rng(0)
    sc = built.scenario
    report = CheckReport(sc.name, built.table.geom.describe(), ".".join(map(str, target.qemu_version)))
    t0 = time.perf_counter()
    addrs = probe_addresses(built.table, rng, sc.sample) if addresses is None else addresses
    report.timings["addresses"] = time.perf_counter() - t0
    subject = subject_of_built(built)
    return check_subject(subject, target, addrs, rng, sc.access if access is None else access, report)


@dataclass
class AddressVerdict:
    """One AT form at one address: the model's walk beside the MMU's answer (harness explain)."""

    probe: str  # the AT op (where it was withheld, ``mmu`` tells the real access that replaced it)
    model_walk: str
    mmu: str
    agree: bool
    divergence: str | None = None


def check_address(built: BuiltScenario | Subject, target: TargetLike, addr: int) -> list[AddressVerdict]:
    """Install the tables, ask the MMU about one address with each AT form of the stage (a real
    access where the AT is withheld for a QEMU hazard), compare with the model, uninstall."""
    subject = built if isinstance(built, Subject) else subject_of_built(built)
    one = np.array([addr], dtype=np.uint64)
    version = target.qemu_version
    out: list[AddressVerdict] = []
    target.install(subject.regs, subject.image)
    try:
        for op, access in AT_OPS[subject.stage]:
            pred = Prediction.of(subject, one, access, version)
            model = subject.walk(addr, access)
            unsafe, keys = divergences.at_unsafe(pred.qemu, version)
            write = access is WRITE
            if divergences.unprobeable(pred.qemu, version).any():
                mmu = f"not probed: neither AT nor an access may meet this on QEMU ({', '.join(keys)})"
                out.append(AddressVerdict(op, model.explain(), mmu, True, None))
                continue
            if unsafe.any():
                rec = target.access(one, write=write, stage=subject.stage)
                r = rec[0]
                kind = "store" if write else "load"
                mmu = (f"{kind} completed" if r["completed"] else
                       f"{kind} faulted: {describe_esr(int(r['esr']))} FAR {int(r['far']):#x} "
                       f"HPFAR {int(r['hpfar']):#x}") + f" (AT withheld: {', '.join(keys)})"
                agree = bool(_access_agrees(pred.arm, rec, one, subject.stage, write)[0])
                key = None if agree else _access_departures(subject, one, access, rec, write, version)[0]
            else:
                target.at_start(one, op)
                actual = target.at_wait()
                aborted = bool(_at_aborts(actual)[0])
                mmu = _at_abort_text(int(actual[0])) if aborted else str(Par(int(actual[0])))
                unmodelled = bool(pred.arm.unmodelled[0] or pred.qemu.unmodelled[0])
                agree = unmodelled or (not aborted and bool(_matches(pred.arm, actual)[0]))
                key = None
                if not agree and not aborted:
                    key = next((name for name, kw in divergences.semantic_explanations(version, subject.geom)
                                if _matches(subject.predict(one, access, **kw), actual)[0]), None)
                    key = key or divergences.explain_key(
                        model, int(actual[0]), subject.geom, partial(subject.walk, addr, access), version)
            out.append(AddressVerdict(op, model.explain(), mmu, agree, key))
    finally:
        if target.alive:
            target.uninstall()
    return out
