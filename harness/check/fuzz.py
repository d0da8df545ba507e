"""The fuzzer: random raw tables against the MMU, every disagreement classified.

Each table ``i`` of a run with seed ``S`` comes from ``numpy.random.default_rng([S, i])`` (a
random configuration, random raw tables, random probe addresses), so any finding is reproduced
by its seed and index. Tables are swapped through the mailbox without a reboot. A disagreement
is either explained by a declared QEMU departure (:mod:`harness.check.divergences`) or it is
unexplained (a model bug until shown otherwise). If QEMU itself dies, the table and the address
chunk are recorded as a finding, a new target is started, and the run goes on.

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

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

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
)
from harness.errors import MachineryError

DEFAULT_PER_TABLE = 1550  # addresses per table (each probed with both AT forms): ~3.3 K probes, >= 300 tables/10^6
RAW_AT_PROBES = 1 << 19
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

    def text(self) -> str:
        head = ", ".join(f"{a:#x}" for a in self.addresses[:8])
        return f"table {self.seed}/{self.index} ({self.table}): {self.error}; addresses {head} ..."


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
    examples: list[str] = field(default_factory=list)  # text of disagreements (unexplained first)
    findings: list[Finding] = field(default_factory=list)
    restarts: int = 0
    stopped: str = ""  # why the run ended early, if it did
    timings: dict[str, float] = field(default_factory=dict)  # seconds by phase (engine's keys, "install", ...)

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
        seen = {e.split("]", 1)[0] for e in self.examples}
        for m in sorted(rep.mismatches, key=lambda m: m.divergence is not None):
            tag = f"[{m.divergence or 'unexplained'}"
            if len(self.examples) >= MAX_EXPLAINED or (m.divergence and tag in seen):
                continue  # every unexplained one (up to the cap), one example per known divergence
            seen.add(tag)
            self.examples.append(f"{tag}] table {self.seed}/{index} {table}\n{_indent(m)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "qemu": self.qemu, "ok": self.ok, "probes": self.probes, "tables": self.tables,
            "disagreements": self.disagreements, "unexplained": self.unexplained, "skipped": self.skipped,
            "withheld_from_at": self.withheld, "probes_per_s": self.probes_per_s,
            "raw_at_per_s": self.raw_at_per_s, "seconds": self.seconds, "by_config": self.by_config,
            "findings": [f.__dict__ for f in self.findings], "restarts": self.restarts, "stopped": self.stopped,
            "timings": {k: round(v, 3) for k, v in sorted(self.timings.items())},
            "examples": self.examples,
        }

    def text(self, full: bool = False) -> str:
        verdict = "OK" if self.ok else "UNEXPLAINED DISAGREEMENTS"
        lines = [f"{verdict}: fuzz seed {self.seed} on QEMU {self.qemu}: {self.probes} probes over {self.tables} "
                 f"tables in {self.seconds:.1f} s ({self.probes_per_s / 1e6:.2f} M probes/s; raw AT "
                 f"{self.raw_at_per_s / 1e6:.2f} M/s), {self.unexplained} unexplained"]
        lines += [f"  disagreements {k}: {v}" for k, v in sorted(self.disagreements.items())]
        lines += [f"  withheld from AT ({k}): {v}" for k, v in self.withheld.items()]
        lines += [f"  skipped ({k}): {v}" for k, v in self.skipped.items()]
        lines += [f"  {k}: {v['tables']} tables, {v['probes']} probes, {v['unexplained']} unexplained, "
                  f"{v['known']} known" for k, v in sorted(self.by_config.items())]
        if self.timings:
            lines.append("  seconds by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.timings.items())))
        lines += [f"  finding: {f.text()}" for f in self.findings]
        lines += [f"  {self.stopped}"] if self.stopped else []
        shown = self.examples if full else self.examples[:20]
        lines += shown
        if len(shown) < len(self.examples):
            lines.append(f"  ... {len(self.examples) - len(shown)} more examples (--report FILE keeps them)")
        return "\n".join(lines)


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
        geom = rawtables.random_geometry(np.random.default_rng([opts.seed, index // opts.tables_per_config]),
                                         opts.stage, opts.granule, opts.lpa2, opts.e2h)
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


def fuzz(start: Callable[[], FuzzTarget], opts: FuzzOptions, progress: Callable[[FuzzReport], None] | None = None,
         first: FuzzTarget | None = None) -> FuzzReport:
    """Run random tables until ``opts.probes`` probes (and ``opts.min_tables`` tables) are done.

    ``start`` boots a target (again after QEMU died); ``first``, if given, is used first and
    left open unless it died."""
    target = first if first is not None else start()
    try:
        report = FuzzReport(opts.seed, ".".join(map(str, target.qemu_version)))
        report.raw_at_per_s = raw_at_rate(target, np.random.default_rng([opts.seed, 1 << 40]))
        window = _GuestWindow()  # raw_at_rate wrote all of it, but trust nothing
        t0 = time.perf_counter()
        nxt = _Table.make(opts, 0, target.layout)
        while report.probes < opts.probes or report.tables < opts.min_tables:
            cur = nxt
            index = cur.index
            maker = _Maker(_Table.steps(opts, index + 1, target.layout))  # while the firmware runs AT
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
                              fetch_sample=None if opts.fetches else 0, background=maker.work,
                              uninstall=False)  # the next install swaps
                if not rep.mismatched:  # (a stray store may have hit the window)
                    window.written(raw, len(subject.image.data), before)
            except MachineryError as exc:
                report.findings.append(Finding(opts.seed, index, raw.describe(), [int(a) for a in cur.addrs],
                                               f"{type(exc).__name__}: {str(exc).splitlines()[0]}"))
                report.unexplained += 1
                _bump(report.disagreements, "target died", 1)
                if target is not first:
                    target.close()
                if len(report.findings) >= opts.max_deaths:
                    report.stopped = f"stopped after {len(report.findings)} targets died"
                    break
                target = start()
                report.restarts += 1
            else:
                report.add(config_key(cur.geom), rep, index, raw.describe())
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
