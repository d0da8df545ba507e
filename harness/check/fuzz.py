"""The fuzzer: random raw tables against the MMU, every disagreement classified.

Each table ``i`` of a run with seed ``S`` comes from ``numpy.random.default_rng([S, i])`` (a
random configuration, random raw tables, random probe addresses), so any finding is reproduced
by its seed and index. A run of ``--probes N`` is :func:`planned_tables` tables, decided before
it starts (enough tables for ``N`` AT probes: each of a table's addresses is probed with both AT
forms, and in the EL2&0 regime with both again as EL0's; real accesses add a few probes, addresses
that cannot be probed take a few away), so that its tables
do not depend on how the run is split: with ``jobs`` > 1 (:func:`fuzz_jobs`), job ``j`` of ``n``
runs the tables whose block of :func:`block_size` consecutive indices is ``j`` mod ``n`` (a block
keeps a configuration's tables and an access-sampled table together), each job in its own process
with its own QEMU, and :meth:`FuzzReport.merged` makes the one report: the same tables, counts and
examples (in index order) whatever the number of jobs. Tables are swapped through the mailbox
without a reboot. A disagreement is either explained by a declared QEMU departure
(:mod:`harness.check.divergences`) or it is unexplained (a model bug until shown otherwise). If
QEMU itself dies, the table and the address chunk are recorded as a finding (the dead target's log
directory named, ``error.txt`` there), a new target is started, and the run goes on.

Throughput (a run is a stream of round trips to the firmware: install, AT read, AT write, real
loads and stores when due; no uninstall: the next install swaps the tables in the same request,
except after a stage-1 table, see :meth:`harness.target.Target.install`): the next table is made
in slices while the firmware runs this one's AT requests, each AT chunk is predicted while the
previous one runs and compared while the next one does, only the part of the table window that may
differ from zero is written into guest RAM, and the sampled real accesses are batched on every
``access_every``-th table (the addresses withheld from AT are accessed on every table).
``FuzzReport.timings`` tells where the time went.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from harness.arch.geometry import Geometry, Granule, Stage
from harness.check import divergences, rawtables
from harness.check.engine import (
    AT_OPS,
    MAX_EXPLAINED,
    CheckReport,
    Mismatch,
    TargetLike,
    check_subject,
    has_el0,
)
from harness.check.jobs import JobCall, Send, run_jobs
from harness.errors import MachineryError
from harness.target.target import Target

# addresses per table (each probed with both AT forms, as EL0's too in EL2&0): ~3.3 K probes on
# average over the drawn configurations, >= 300 tables per 10^6 probes
DEFAULT_PER_TABLE = 1300
RAW_AT_PROBES = 1 << 19
V = TypeVar("V")
UNEXPLAINED = "unexplained"
EXPLAIN_PER_TABLE = 16  # disagreements of one table re-walked in full (all are counted and classified)


class FuzzTarget(TargetLike, Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True)
class FuzzOptions:
    seed: int
    probes: int
    stage: Stage | None = None
    granule: Granule | None = None
    per_table: int = DEFAULT_PER_TABLE
    min_tables: int = 1
    max_deaths: int = 10  # stop the run after this many targets died (each is a finding)
    tables_per_config: int = 2  # consecutive tables share a configuration
    accesses_per_table: int = 32  # real loads and stores (each, on average) besides those withheld from AT
    access_every: int = 4  # the sampled real accesses go to every n-th table (n times as many): fewer requests
    lpa2: bool | None = None  # only DS = 1 (True), only DS = 0 (False), or drawn (None)
    e2h: bool | None = None  # only the EL2&0 regime at stage 1 (True), never (False), or drawn (None)
    # instruction-fetch probes on the tables that get sampled real accesses: off by default, since
    # every later firmware request gets slower with the number of distinct guest pages code has ever
    # run from (QEMU 10.0.2, measured: a NOP request 1.15 ms after fetches on 1 K pages, 1.5 ms
    # after 16 K, 2.2 ms after 32 K; random tables put each fetch on a new page); what QEMU keeps
    # per code page is never dropped, so the cost stays for the target's life
    fetches: bool = False


@dataclass
class Finding:
    """QEMU or the firmware died on a table: enough to replay it."""

    seed: int
    index: int
    table: str
    addresses: list[int]
    error: str
    log_dir: str = ""  # the dead target's logs (error.txt there has the whole story)

    def text(self) -> str:
        head = ", ".join(f"{a:#x}" for a in self.addresses[:8])
        logs = f" (logs: {self.log_dir})" if self.log_dir else ""
        return f"table {self.seed}/{self.index} ({self.table}): {self.error}; addresses {head} ...{logs}"


@dataclass(frozen=True)
class Example:
    """A disagreement's text, where it came from (table ``index``, ``rank`` within the table:
    unexplained ones first) and its ``tag`` (the divergence's key, or ``unexplained``)."""

    index: int
    rank: int
    tag: str
    text: str


@dataclass
class _Examples:
    """The rule for which disagreements a report keeps as examples, offered in index order:
    every unexplained one up to :data:`MAX_EXPLAINED` in all, and the first of each known
    divergence. A job keeps a superset of what it contributes to a serial run's choice (what
    comes before an example in the job came before it in the run), so choosing again over the
    jobs' examples in index order gives the serial run's."""

    kept: list[Example] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def offer(self, e: Example) -> None:
        if len(self.kept) >= MAX_EXPLAINED or (e.tag != UNEXPLAINED and e.tag in self.seen):
            return
        self.seen.add(e.tag)
        self.kept.append(e)

    @classmethod
    def chosen(cls, examples: Iterable[Example]) -> list[Example]:
        ex = cls()
        for e in sorted(examples, key=lambda e: (e.index, e.rank)):
            ex.offer(e)
        return ex.kept


@dataclass
class FuzzReport:
    seed: int
    qemu: str
    probes: int = 0
    tables: int = 0
    disagreements: dict[str, int] = field(default_factory=dict)
    unexplained: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    withheld: dict[str, int] = field(default_factory=dict)
    by_config: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    raw_at_per_s: float = 0.0
    examples: list[Example] = field(default_factory=list)  # disagreements shown (see _Examples)
    findings: list[Finding] = field(default_factory=list)
    restarts: int = 0
    stopped: str = ""  # why the run ended early, if it did
    timings: dict[str, float] = field(default_factory=dict)  # seconds by phase (engine's keys, "install", ...)
    jobs: int = 1  # processes (each with its QEMU) the run was split over

    @property
    def probes_per_s(self) -> float:
        return self.probes / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return self.unexplained == 0

    def add(self, key: str, rep: CheckReport, index: int, table: str) -> None:
        for k, t in rep.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + t
        self.tables += 1
        self.probes += rep.checked
        self.unexplained += rep.mismatched
        row = self.by_config.setdefault(key, {"tables": 0, "probes": 0, "unexplained": 0, "known": 0})
        row["tables"] += 1
        row["probes"] += rep.checked
        row["unexplained"] += rep.mismatched
        row["known"] += rep.known
        if rep.mismatched:
            _bump(self.disagreements, "unexplained", rep.mismatched)
        for k, v in rep.known_by.items():
            _bump(self.disagreements, k, v)
        for k, v in rep.skipped.items():
            _bump(self.skipped, k, v)
        for k, v in rep.withheld.items():
            _bump(self.withheld, k, v)
        ex = _Examples(self.examples, {e.tag for e in self.examples})
        for rank, m in enumerate(sorted(rep.mismatches, key=lambda m: m.divergence is not None)):
            tag = m.divergence or UNEXPLAINED
            ex.offer(Example(index, rank, tag, f"[{tag}] table {self.seed}/{index} {table}\n{_indent(m)}"))

    @classmethod
    def merged(cls, reports: Sequence[FuzzReport]) -> FuzzReport:
        """One report of a run split over jobs (``reports``: one per job, any order): counts
        summed, examples chosen again in index order, findings in index order; ``seconds`` the
        longest job's, ``raw_at_per_s`` the mean of the jobs' (each measured by one QEMU)."""
        out = cls(reports[0].seed, reports[0].qemu, jobs=len(reports))
        for r in reports:
            out.probes += r.probes
            out.tables += r.tables
            out.unexplained += r.unexplained
            out.restarts += r.restarts
            for mine, theirs in ((out.disagreements, r.disagreements), (out.skipped, r.skipped),
                                 (out.withheld, r.withheld)):
                for k, v in theirs.items():
                    _bump(mine, k, v)
            for key, row in r.by_config.items():
                for k, v in row.items():
                    _bump(out.by_config.setdefault(key, {}), k, v)
            for k, t in r.timings.items():
                _bump_time(out.timings, k, t)
        out.disagreements, out.skipped, out.withheld = (_sorted(out.disagreements), _sorted(out.skipped),
                                                        _sorted(out.withheld))
        out.by_config, out.timings = _sorted(out.by_config), _sorted(out.timings)
        out.examples = _Examples.chosen(e for r in reports for e in r.examples)
        out.findings = sorted((f for r in reports for f in r.findings), key=lambda f: f.index)
        out.seconds = max(r.seconds for r in reports)
        rates = [r.raw_at_per_s for r in reports if r.raw_at_per_s]
        out.raw_at_per_s = statistics.fmean(rates) if rates else 0.0
        out.stopped = "; ".join(sorted({r.stopped for r in reports if r.stopped}))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "qemu": self.qemu, "ok": self.ok, "probes": self.probes, "tables": self.tables,
            "disagreements": self.disagreements, "unexplained": self.unexplained, "skipped": self.skipped,
            "withheld_from_at": self.withheld, "probes_per_s": self.probes_per_s,
            "raw_at_per_s": self.raw_at_per_s, "seconds": self.seconds, "by_config": self.by_config,
            "findings": [f.__dict__ for f in self.findings], "restarts": self.restarts, "stopped": self.stopped,
            "timings": {k: round(v, 3) for k, v in sorted(self.timings.items())},
            "jobs": self.jobs, "examples": [e.text for e in self.examples],
        }

    def text(self, full: bool = False) -> str:
        verdict = "OK" if self.ok else "UNEXPLAINED DISAGREEMENTS"
        lines = [f"{verdict}: fuzz seed {self.seed} on QEMU {self.qemu}: {self.probes} probes over {self.tables} "
                 f"tables in {self.seconds:.1f} s ({self.probes_per_s / 1e6:.2f} M probes/s; raw AT "
                 f"{self.raw_at_per_s / 1e6:.2f} M/s{self._jobs_text()}), {self.unexplained} unexplained"]
        lines += [f"  disagreements {k}: {v}" for k, v in sorted(self.disagreements.items())]
        lines += [f"  withheld from AT ({k}): {v}" for k, v in sorted(self.withheld.items())]
        lines += [f"  skipped ({k}): {v}" for k, v in sorted(self.skipped.items())]
        lines += [f"  {k}: {v['tables']} tables, {v['probes']} probes, {v['unexplained']} unexplained, "
                  f"{v['known']} known" for k, v in sorted(self.by_config.items())]
        if self.timings:
            lines.append("  seconds by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.timings.items())))
        lines += [f"  finding: {f.text()}" for f in self.findings]
        lines += [f"  {self.stopped}"] if self.stopped else []
        shown = self.examples if full else self.examples[:20]
        lines += [e.text for e in shown]
        if len(shown) < len(self.examples):
            lines.append(f"  ... {len(self.examples) - len(shown)} more examples (--report FILE keeps them)")
        return "\n".join(lines)

    def _jobs_text(self) -> str:
        return f"; {self.jobs} jobs, each its own QEMU" if self.jobs > 1 else ""


def _sorted(d: dict[str, V]) -> dict[str, V]:
    return dict(sorted(d.items()))


def _bump(d: dict[str, int], k: str, v: int) -> None:
    d[k] = d.get(k, 0) + v


def _bump_time(d: dict[str, float], k: str, v: float) -> None:
    d[k] = d.get(k, 0.0) + v


def _indent(m: Mismatch) -> str:
    return "  " + m.text().replace("\n", "\n  ")


def config_key(geom: Geometry) -> str:
    extra = "".join(f" {name}" for name, on in (("lpa2", geom.lpa2), ("e2h", geom.e2h)) if on)
    return f"stage {int(geom.stage)} {geom.granule.label}{extra}"


_WINDOW_UNIT = 4096  # the smallest granule: the unit of what is known of the windows in guest RAM
_WINDOW_UNITS = max(rawtables.WINDOW_BYTES.values()) // _WINDOW_UNIT


def _all_dirty() -> npt.NDArray[np.bool_]:
    return np.ones(_WINDOW_UNITS, dtype=np.bool_)


@dataclass
class _GuestWindow:
    """What is known of the table windows in guest RAM (they share their base; a granule's
    window is :data:`rawtables.WINDOW_BYTES`): which 4K units may differ from zero. A table's
    image covers its window up to the last such unit in it, or its own extent if larger: the
    rest of its window is zero on both sides."""

    dirty: npt.NDArray[np.bool_] = field(default_factory=_all_dirty)

    def extent(self, raw: rawtables.RawTables) -> int:
        units = np.flatnonzero(self.dirty[: raw.pool.size // _WINDOW_UNIT])
        return max(int(units[-1]) + 1 if units.size else 0, raw.extent // _WINDOW_UNIT) * _WINDOW_UNIT

    def written(self, raw: rawtables.RawTables, covered: int, before: npt.NDArray[np.bool_]) -> None:
        """The image of ``raw`` (``covered`` bytes) is in place: below them only the table's
        extent may be nonzero; beyond them, what was dirty ``before`` still is."""
        self.dirty = before.copy()
        self.dirty[: covered // _WINDOW_UNIT] = False
        self.dirty[: -(-raw.extent // _WINDOW_UNIT)] = True

    def unknown(self) -> None:
        self.dirty = _all_dirty()


@dataclass
class _Table:
    """One random table of the run, ready to check."""

    index: int
    geom: Geometry
    raw: rawtables.RawTables
    addrs: npt.NDArray[np.uint64]
    rng: np.random.Generator

    @classmethod
    def steps(cls, opts: FuzzOptions, index: int, layout: Any) -> Iterator[_Table | None]:
        """Table ``index`` of the run, made in steps (None between them, the table last)."""
        rng = np.random.default_rng([opts.seed, index])
        geom = table_geometry(opts, index)
        raw = None
        for raw in rawtables.random_tables_steps(rng, geom, layout, outside_ram=True):
            if raw is None:
                yield None
        assert raw is not None
        yield cls(index, geom, raw, rawtables.probe_addresses(rng, raw, opts.per_table), rng)

    @classmethod
    def make(cls, opts: FuzzOptions, index: int, layout: Any) -> _Table:
        return _Maker(cls.steps(opts, index, layout)).finish()


class _Maker:
    """The next table, made in slices while the firmware runs AT requests (check_at's
    ``background``): a time slice in each earlier request, the rest during the last."""

    SLICE = 0.0008  # seconds of work while an earlier request is in flight (it takes ~1-2 ms)

    def __init__(self, steps: Iterator[_Table | None]) -> None:
        self._steps = steps
        self.table: _Table | None = None

    def work(self, last: bool) -> None:
        t0 = time.perf_counter()
        while self.table is None and (last or time.perf_counter() - t0 < self.SLICE):
            self.table = next(self._steps)

    def finish(self) -> _Table:
        self.work(True)
        assert self.table is not None
        return self.table


def raw_at_rate(target: TargetLike, rng: np.random.Generator, probes: int = RAW_AT_PROBES) -> float:
    """The firmware's bare AT loop rate (translations/s) on a stage-1 table that maps the
    firmware's regions only (its walks stay inside tables the model wrote). Writes the whole
    table window."""
    geom = rawtables.random_geometry(rng, Stage.S1, Granule.K4, lpa2=False, e2h=False)
    subject = rawtables.firmware_only(geom, target.layout).subject("raw AT rate")
    addrs = rng.integers(0, 1 << 31, size=probes, dtype=np.uint64)
    target.install(subject.regs, subject.image)
    try:
        target.at(addrs[:1000], AT_OPS[Stage.S1][0][0])
        t0 = time.perf_counter()
        for op, _ in AT_OPS[Stage.S1]:
            target.at(addrs, op)
        return 2 * addrs.size / (time.perf_counter() - t0)
    finally:
        target.uninstall()


def table_geometry(opts: FuzzOptions, index: int) -> Geometry:
    """The configuration of table ``index``: drawn from the seed and the index's configuration
    alone (``tables_per_config`` consecutive tables share it)."""
    return rawtables.random_geometry(np.random.default_rng([opts.seed, index // opts.tables_per_config]),
                                     opts.stage, opts.granule, opts.lpa2, opts.e2h)


def at_probes_per_address(geom: Geometry) -> int:
    """AT probes of one address: both forms, and both again as EL0's where the regime has one."""
    return len(AT_OPS[geom.stage]) * (2 if has_el0(geom) else 1)


@functools.lru_cache(maxsize=16)
def planned_tables(opts: FuzzOptions) -> int:
    """The tables of a run, decided before it starts: the fewest whose AT probes
    (:func:`at_probes_per_address` for each of ``opts.per_table`` addresses) reach ``opts.probes``,
    at least ``opts.min_tables``. Only the configurations are drawn (cheap), one per
    ``tables_per_config`` tables."""
    tables = probes = 0
    while probes < opts.probes:
        per_address = at_probes_per_address(table_geometry(opts, tables))
        for _ in range(opts.tables_per_config):
            if probes >= opts.probes:
                break
            probes += per_address * opts.per_table
            tables += 1
    return max(opts.min_tables, tables)


def block_size(opts: FuzzOptions) -> int:
    """Consecutive table indices that go to one job: whole configurations (``tables_per_config``)
    and whole rounds of access sampling (``access_every``)."""
    return math.lcm(opts.tables_per_config, opts.access_every)


def job_indices(opts: FuzzOptions, job: int, jobs: int) -> list[int]:
    """The table indices job ``job`` of ``jobs`` runs: the blocks ``job`` mod ``jobs``."""
    block = block_size(opts)
    return [i for i in range(planned_tables(opts)) if (i // block) % jobs == job]


def fuzz(start: Callable[[], FuzzTarget], opts: FuzzOptions, progress: Callable[[FuzzReport], None] | None = None,
         first: FuzzTarget | None = None, indices: Sequence[int] | None = None) -> FuzzReport:
    """Run the tables ``indices`` (default: all of :func:`planned_tables`), in their order.

    ``start`` boots a target (again after QEMU died); ``first``, if given, is used first and
    left open unless it died."""
    todo = list(range(planned_tables(opts)) if indices is None else indices)
    target = first if first is not None else start()
    try:
        report = FuzzReport(opts.seed, ".".join(map(str, target.qemu_version)))
        report.raw_at_per_s = raw_at_rate(target, np.random.default_rng([opts.seed, 1 << 40]))
        window = _GuestWindow()  # raw_at_rate wrote all of it, but trust nothing
        t0 = time.perf_counter()
        nxt = _Table.make(opts, todo[0], target.layout) if todo else None
        for pos, index in enumerate(todo):
            assert nxt is not None
            cur = nxt
            after = todo[pos + 1] if pos + 1 < len(todo) else None
            maker = _Maker(_Table.steps(opts, after, target.layout)) if after is not None else None
            raw = cur.raw
            name = f"fuzz {opts.seed}/{index}"
            rep = CheckReport(name, cur.geom.describe(), report.qemu, explain_limit=EXPLAIN_PER_TABLE)
            sample = opts.accesses_per_table * opts.access_every if index % opts.access_every == 0 else 0
            try:
                subject = raw.subject(name, window.extent(raw))
                if divergences.unusable(target.qemu_version, cur.geom):
                    subject = dataclasses.replace(subject, accesses=False)
                before = window.dirty
                window.unknown()  # until the install is known to have written it
                check_subject(subject, target, cur.addrs, cur.rng, report=rep,
                              access=sample > 0 and raw.can_access, access_sample=max(sample, 1),
                              fetch_sample=None if opts.fetches else 0,
                              background=maker.work if maker is not None else None,
                              uninstall=False)  # the next install swaps
                if not rep.mismatched:  # (a stray store may have hit the window)
                    window.written(raw, len(subject.image.data), before)
            except MachineryError as exc:
                report.findings.append(Finding(opts.seed, index, raw.describe(), [int(a) for a in cur.addrs],
                                               f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                                               _died_in(target, exc)))
                report.unexplained += 1
                _bump(report.disagreements, "target died", 1)
                if target is not first:
                    target.close()
                if len(report.findings) >= opts.max_deaths:
                    report.stopped = f"stopped after {len(report.findings)} targets died"
                    break
                target = start()
                window.unknown()
                report.restarts += 1
            else:
                report.add(config_key(cur.geom), rep, index, raw.describe())
            if maker is None:
                break
            if maker.table is None:
                t1 = time.perf_counter()
                maker.finish()
                _bump_time(report.timings, "generate (not overlapped)", time.perf_counter() - t1)
            nxt = maker.finish()
            if progress is not None:
                report.seconds = time.perf_counter() - t0
                progress(report)
        report.seconds = time.perf_counter() - t0
        return report
    finally:
        if target is not first:
            target.close()


def _died_in(target: FuzzTarget, exc: BaseException) -> str:
    """The dead target's log directory, with the whole story in ``error.txt`` ("" if it has none)."""
    log_dir: Path | None = getattr(target, "log_dir", None)
    if log_dir is None:
        return ""
    with contextlib.suppress(OSError):
        (log_dir / "error.txt").write_text("".join(traceback.format_exception(exc)))
    return str(log_dir)


# -- a run over jobs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Boots:
    """How a run boots its targets: ``timeout`` for the boot and each request; each boot logs
    into a directory of its own below ``log_base`` (``boot1``, ``boot2`` ... after a death;
    ``job0-boot1`` ... with jobs), or into one of its own the target removes when closed."""

    timeout: float = 60.0
    log_base: Path | None = None

    def starter(self, prefix: str = "") -> Callable[[], Target]:
        boots = 0

        def start() -> Target:
            nonlocal boots
            boots += 1
            logs = None if self.log_base is None else self.log_base / f"{prefix}boot{boots}"
            if logs is not None:
                logs.mkdir(parents=True, exist_ok=True)
            return Target.start(timeout=self.timeout, request_timeout=self.timeout, log_dir=logs)

        return start


@dataclass(frozen=True)
class FuzzJob:
    opts: FuzzOptions
    job: int
    jobs: int
    boots: Boots


@dataclass(frozen=True)
class JobProgress:
    """What a job has done so far (sent to the parent after each table)."""

    tables: int
    probes: int
    unexplained: int


def fuzz_job(job: FuzzJob, send: Send) -> FuzzReport:
    """One job of :func:`fuzz_jobs` (in its own process): its tables on its own targets."""
    return fuzz(job.boots.starter(f"job{job.job}-"), job.opts,
                lambda r: send(JobProgress(r.tables, r.probes, r.unexplained)),
                indices=job_indices(job.opts, job.job, job.jobs))


def fuzz_jobs(opts: FuzzOptions, jobs: int, boots: Boots,
              progress: Callable[[JobProgress], None] | None = None) -> FuzzReport:
    """The run of ``opts`` over ``jobs`` processes, each with its own QEMU (one: in this
    process; never more than there are blocks of tables), merged; ``progress`` gets the run's
    totals after each table of any job."""
    jobs = min(jobs, -(-planned_tables(opts) // block_size(opts)))
    if jobs == 1:
        def each(r: FuzzReport) -> None:
            if progress is not None:
                progress(JobProgress(r.tables, r.probes, r.unexplained))

        return FuzzReport.merged([fuzz(boots.starter(), opts, each)])
    latest = [JobProgress(0, 0, 0)] * jobs

    def seen(job: int, msg: JobProgress) -> None:
        latest[job] = msg
        if progress is not None:
            progress(JobProgress(sum(p.tables for p in latest), sum(p.probes for p in latest),
                                 sum(p.unexplained for p in latest)))

    calls = [JobCall("harness.check.fuzz:fuzz_job", FuzzJob(opts, j, jobs, boots),
                     None if boots.log_base is None else boots.log_base / f"job{j}-stderr.txt")
             for j in range(jobs)]
    return FuzzReport.merged(run_jobs(calls, seen))
