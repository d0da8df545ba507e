"""``harness kernel-pgtable``'s job: a tree's walker over its configuration matrix.

For each page size (and compiler), the tree's objects are built (:mod:`harness.kernel.build`) and
linked into the payload (:mod:`harness.kernel.payload`); for each configuration
(:func:`harness.kernel.config.matrix`) the image is patched for the configuration's CPU
capabilities, booted, and every sequence (scripted, then seeded random ones) runs through the check
(:mod:`harness.check.kernel`). A sequence that fails is shrunk to a short reproducer. A fault in
the C code leaves the payload's state unknown: the payload is booted again for what follows.

Every build happens first, in this process; with ``RunOptions.jobs`` > 1 the configurations are
then dealt round-robin (in matrix order) to that many jobs (:mod:`harness.check.jobs`: each a
process with its own QEMU; never more jobs than configurations), and their reports put back in
matrix order: each configuration's sequences are a function of the seed, its name and their index,
so the merged report's verdict and counts are the same for any number of jobs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.arch.geometry import Geometry, Granule, Stage
from harness.check import kernel_bugs
from harness.check.jobs import JobCall, Send, run_jobs
from harness.check.kernel import SequenceResult, Session, run_sequence
from harness.check.kernel_seqs import KSequence, available_ops, from_scenario, random_sequence, scripted, shrink
from harness.check.live import TlbTally
from harness.check.scenario.catalogue import builtin, lpa2_scenarios
from harness.check.scenario.data import Scenario
from harness.kernel import elf as kelf
from harness.kernel.build import BuildConfig, BuiltObjects, build_objects
from harness.kernel.config import KernelConfig, config_for, matrix
from harness.kernel.driver import KernelWalker
from harness.kernel.payload import LinkedPayload, link
from harness.kernel.tree import KernelTree
from harness.target.target import Target


@dataclass(frozen=True)
class RunOptions:
    granules: tuple[Granule, ...] = (Granule.K4, Granule.K16, Granule.K64)
    compilers: tuple[str, ...] = ("gcc",)
    stage: Stage | None = None
    lpa2: bool | None = None
    e2h: bool | None = None
    seed: int = 0
    random_sequences: int = 2  # per configuration
    random_length: int = 12
    scripted: bool = True
    mmu: bool = True
    shrink: bool = True
    timeout: float = 30.0
    log_dir: Path | None = None
    only_config: str | None = None  # replay one configuration by name
    only_sequence: str | None = None  # ... and one sequence by name (e.g. random-3)
    scenarios: tuple[Scenario, ...] = ()  # scripts to run instead of the matrix (each in its own configuration)
    builtins: bool = True  # the matrix run also runs harness run's built-in scenarios as scripts
    jobs: int = 1  # processes the configurations are dealt to, each with its own QEMU


@dataclass
class ConfigReport:
    config: KernelConfig
    compiler: str
    results: list[SequenceResult] = field(default_factory=list)
    boots: int = 0
    seconds: float = 0.0
    reproducers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ops(self) -> int:
        return sum(r.ops for r in self.results)

    @property
    def checked(self) -> int:
        return sum(r.checked for r in self.results)

    @property
    def findings(self) -> list[Any]:
        return [f for r in self.results for f in r.findings]

    @property
    def unexplained(self) -> int:
        return sum(len(r.unexplained) for r in self.results)

    @property
    def name(self) -> str:
        return f"{self.config.name}-{self.compiler}"

    def tlb(self) -> TlbTally:
        out = TlbTally()
        for r in self.results:
            out.merge(r.tlb)
        return out

    def as_json(self) -> dict[str, Any]:
        known = Counter(f.known for f in self.findings if f.known)
        return {"config": {**self.config.as_json(), "compiler": self.compiler}, "name": self.name,
                "ops": self.ops, "checked": self.checked,
                "mmu_checked": sum(r.mmu_checked for r in self.results),
                "tlb": self.tlb().counts(),
                "findings": [f.as_json() for f in self.findings], "disagreements": len(self.findings),
                "unexplained": self.unexplained, "known_bugs": dict(known), "boots": self.boots,
                "seconds": round(self.seconds, 3), "sequences": [r.as_json() for r in self.results],
                "reproducers": self.reproducers}


@dataclass
class TreeReport:
    tree: KernelTree
    configs: list[ConfigReport] = field(default_factory=list)
    builds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    qemu: str = ""

    @property
    def ops(self) -> int:
        return sum(c.ops for c in self.configs)

    @property
    def findings(self) -> list[Any]:
        return [f for c in self.configs for f in c.findings]

    @property
    def unexplained(self) -> int:
        return sum(c.unexplained for c in self.configs)

    def reproducers(self) -> list[dict[str, Any]]:
        return [{**r, "config": c.config.name} for c in self.configs for r in c.reproducers]

    def as_json(self) -> dict[str, Any]:
        known = Counter(f.known for f in self.findings if f.known)
        run_s = sum(c.seconds for c in self.configs)
        tlb = TlbTally()
        for c in self.configs:
            tlb.merge(c.tlb())
        return {"tree": str(self.tree.path), "version": self.tree.version, "qemu": self.qemu,
                "ops": self.ops, "checked": sum(c.checked for c in self.configs), "tlb": tlb.counts(),
                "findings": [f.as_json() for f in self.findings], "disagreements": len(self.findings),
                "unexplained": self.unexplained, "known_bugs": dict(known),
                "known_bug_declarations": {b.key: {"fix": b.fix, "title": b.title, "rule": b.rule,
                                                   "affects": b.affects} for b in kernel_bugs.KNOWN_BUGS},
                "ops_per_s": round(self.ops / run_s, 1) if run_s else 0.0,
                "configurations": [c.as_json() for c in self.configs], "builds": self.builds,
                "seconds": round(self.seconds, 3), "api": self.tree.api.as_json()}


def sequences_for(geom: Geometry, cfg: KernelConfig, opts: RunOptions, has_split: bool = True,
                  scripts: Sequence[KSequence] = ()) -> list[KSequence]:
    if scripts:
        return list(scripts)
    ops = available_ops(cfg.stage, has_split)
    out = scripted(geom, ops=ops) if opts.scripted else []
    out += [random_sequence(geom, opts.seed, cfg.name, i, opts.random_length, ops=ops)
            for i in range(opts.random_sequences)]
    if opts.only_sequence is not None:
        out = [s for s in out if s.name == opts.only_sequence]
    return out


class _Booted:
    """The payload of one configuration, booted on demand (again after a fault)."""

    def __init__(self, image: Path, elf: kelf.PayloadElf, opts: RunOptions, report: ConfigReport) -> None:
        self.image, self.elf, self.opts, self.report = image, elf, opts, report
        self.target: Target | None = None

    def walker(self) -> KernelWalker:
        if self.target is None or not self.target.alive:
            self.close()
            logs = None if self.opts.log_dir is None else \
                self.opts.log_dir / f"{self.report.name}-boot{self.report.boots + 1}"
            self.target = Target.start(timeout=self.opts.timeout, elf=self.image, log_dir=logs)
            self.report.boots += 1
        return KernelWalker(self.target, self.elf)

    def close(self) -> None:
        if self.target is not None:
            self.target.close()
            self.target = None


def _patched_image(payload: LinkedPayload, objs: BuiltObjects, cfg: KernelConfig) -> tuple[Path, kelf.PayloadElf]:
    pe = kelf.PayloadElf(payload.elf)
    caps = [c for c in cfg.caps() if c in objs.cpucaps]
    out = payload.elf.with_name(f"payload-{cfg.name}.elf")
    if not out.exists():
        tmp = out.with_suffix(f".tmp{os.getpid()}")  # one per process: pytest-xdist workers patch the same image
        pe.write_patched(tmp, kelf.caps_named(caps, objs.cpucaps), objs.cpucaps)
        tmp.replace(out)
    return out, kelf.PayloadElf(out)


def run_config(tree: KernelTree, objs: BuiltObjects, payload: LinkedPayload, cfg: KernelConfig, compiler: str,
               opts: RunOptions, progress: Callable[[str], None] | None = None,
               scripts: Sequence[KSequence] = ()) -> ConfigReport:
    t0 = time.perf_counter()
    report = ConfigReport(cfg, compiler)
    image, pe = _patched_image(payload, objs, cfg)
    booted = _Booted(image, pe, opts, report)
    series = "6.12" if tree.api.map_has_flags else "6.1"
    pa52 = objs.kconfig.get("CONFIG_ARM64_PA_BITS") == "52"  # the kernel's own PA range (64K: 48 or 52)
    try:
        kw = booted.walker()
        geom = _geometry_probe(kw, cfg, tree, series, opts, pa52)
        for seq in sequences_for(geom, cfg, opts, tree.api.split, scripts):
            kw = booted.walker()
            session = Session(kw, cfg, tree.api, series, mmu=opts.mmu, rng_seed=opts.seed, pa_bits_52=pa52)
            res = run_sequence(session, seq)
            report.results.append(res)
            if res.aborted or res.pool_left:  # a fault or a leak: the next sequence starts on a fresh pool
                booted.close()
            if progress:
                progress(f"{report.name} {seq.name}: {res.ops} ops, {len(res.findings)} finding(s)")
            if res.unexplained and opts.shrink and len(seq.ops) > 2:
                report.reproducers.append(_shrink(booted, cfg, tree, series, opts, seq, res, pa52))
    finally:
        booted.close()
    report.seconds = time.perf_counter() - t0
    return report


def _geometry_probe(kw: KernelWalker, cfg: KernelConfig, tree: KernelTree, series: str, opts: RunOptions,
                    pa52: bool) -> Geometry:
    """The configuration's geometry as the C code sets it up (stage 2: from kvm_get_vtcr)."""
    probe = Session(kw, cfg, tree.api, series, mmu=False, pa_bits_52=pa52)
    res = SequenceResult(cfg.name, KSequence("probe", ()))
    probe.start(res)
    geom = probe.geom
    if probe.c is not None:
        probe.finish(res)
    if geom is None:
        return Geometry.create(cfg.stage, cfg.granule, cfg.ia_bits, lpa2=cfg.lpa2, e2h=cfg.hvhe)
    return geom


def _shrink(booted: _Booted, cfg: KernelConfig, tree: KernelTree, series: str, opts: RunOptions, seq: KSequence,
            res: SequenceResult, pa52: bool) -> dict[str, Any]:
    kinds = {(f.kind, f.known) for f in res.unexplained}

    def fails(cand: KSequence) -> bool:
        kw = booted.walker()
        r = run_sequence(Session(kw, cfg, tree.api, series, mmu=opts.mmu, rng_seed=opts.seed, pa_bits_52=pa52), cand)
        if r.aborted or r.pool_left:
            booted.close()
        return any((f.kind, f.known) in kinds for f in r.unexplained)

    small = shrink(seq, fails)
    return {"sequence": seq.name, "seed": seq.seed, "index": seq.index, "ops": [op.as_json() for op in small.ops],
            "kinds": sorted(k for k, _ in kinds)}


def _script_configs(tree: KernelTree, scenarios: Sequence[Scenario], granule: Granule, compiler: str,
                    opts: RunOptions) -> list[tuple[KernelConfig, list[KSequence]]]:
    """Scenarios of this granule as scripts, grouped by the configuration they ask for."""
    out: dict[KernelConfig, list[KSequence]] = {}
    for sc in scenarios:
        if sc.granule is not granule or (opts.stage is not None and sc.stage is not opts.stage):
            continue
        if (opts.lpa2 is not None and sc.lpa2 != opts.lpa2) or (opts.e2h is not None and sc.e2h != opts.e2h):
            continue
        cfg = config_for(sc.stage, sc.granule, sc.ia_bits, sc.lpa2, sc.e2h, tree.api, compiler, f"scenario {sc.name}")
        out.setdefault(cfg, []).append(from_scenario(sc))
    return list(out.items())


def _work(tree: KernelTree, granule: Granule, compiler: str,
          opts: RunOptions) -> list[tuple[KernelConfig, list[KSequence]]]:
    """The configurations to run for one build, each with its scripts (empty: the default ones)."""
    if opts.scenarios:
        return _script_configs(tree, opts.scenarios, granule, compiler, opts)
    work: list[tuple[KernelConfig, list[KSequence]]] = [
        (cfg, []) for cfg in matrix(tree.api, granule, compiler, stage=opts.stage, lpa2=opts.lpa2, hvhe=opts.e2h)]
    if opts.builtins and opts.only_sequence is None:
        usable = [sc for sc in [*builtin(), *lpa2_scenarios()] if _tree_has(tree, sc)]
        for cfg, scripts in _script_configs(tree, usable, granule, compiler, opts):
            work.append((dataclasses.replace(cfg, label="builtin"), scripts))
    return work


def _tree_has(tree: KernelTree, sc: Scenario) -> bool:
    api = tree.api
    return (not sc.lpa2 or (api.lpa2 and "HAS_LPA2" in api.caps)) and (not sc.e2h or "KVM_HVHE" in api.caps) \
        and all(o.op != "split" or api.split for o in sc.ops)


@dataclass(frozen=True)
class _Item:
    """One configuration to run, with the build it runs on."""

    objs: BuiltObjects
    payload: LinkedPayload
    cfg: KernelConfig
    compiler: str
    scripts: tuple[KSequence, ...]


@dataclass(frozen=True)
class ConfigJob:
    """What one job of a run over jobs gets: its configurations."""

    tree: KernelTree
    opts: RunOptions
    items: tuple[_Item, ...]


def run_tree(tree: KernelTree, opts: RunOptions, progress: Callable[[str], None] | None = None,
             build_cache: Path | None = None) -> TreeReport:
    t0 = time.perf_counter()
    tree.api.require_supported()
    report = TreeReport(tree)
    items = _plan(tree, opts, report, build_cache)
    report.configs = _run_items(tree, opts, items, progress)
    report.seconds = time.perf_counter() - t0
    return report


def _plan(tree: KernelTree, opts: RunOptions, report: TreeReport, build_cache: Path | None) -> list[_Item]:
    """Every configuration to run, in matrix order; every build they need done (recorded in
    ``report.builds``)."""
    items: list[_Item] = []
    for compiler in opts.compilers:
        for granule in opts.granules:
            if granule.size not in tree.api.page_sizes:
                continue
            work = [(cfg, scripts) for cfg, scripts in _work(tree, granule, compiler, opts)
                    if opts.only_config is None or cfg.name == opts.only_config]
            if not work:
                continue
            objs = build_objects(tree, BuildConfig(granule.size, compiler), build_cache)  # type: ignore[arg-type]
            payload = link(objs, tree.api.c_defines())
            report.builds.append({"granule": granule.label, "compiler": compiler, "build_dir": str(objs.build_dir),
                                  "timings": objs.timings})
            items += [_Item(objs, payload, cfg, compiler, tuple(scripts)) for cfg, scripts in work]
    return items


def _run_items(tree: KernelTree, opts: RunOptions, items: Sequence[_Item],
               progress: Callable[[str], None] | None) -> list[ConfigReport]:
    """The configurations' reports in the items' order: here, or dealt round-robin to jobs."""
    n = min(opts.jobs, len(items))
    if n <= 1:
        return config_job(ConfigJob(tree, opts, tuple(items)), progress)
    calls = [JobCall("harness.check.kernel_run:config_job", ConfigJob(tree, opts, tuple(items[j::n])),
                     None if opts.log_dir is None else opts.log_dir / f"job{j}-stderr.txt") for j in range(n)]
    dealt: list[list[ConfigReport]] = run_jobs(calls, None if progress is None else lambda _, line: progress(line))
    return [dealt[k % n][k // n] for k in range(len(items))]


def config_job(job: ConfigJob, send: Send | None) -> list[ConfigReport]:
    """The configurations of one job, in order (``send``: each sequence's progress line)."""
    return [run_config(job.tree, it.objs, it.payload, it.cfg, it.compiler, job.opts, send, it.scripts)
            for it in job.items]


def summary_lines(report: TreeReport) -> list[str]:
    out = [f"{report.tree.label}: {len(report.configs)} configurations, {report.ops} operations, "
           f"{len(report.findings)} finding(s), {report.unexplained} unexplained ({report.seconds:.1f} s)"]
    for c in report.configs:
        verdict = "ok" if not c.unexplained else "FAIL"
        known = Counter(f.known for f in c.findings if f.known)
        extra = ("; known: " + ", ".join(f"{k} x{n}" for k, n in known.items())) if known else ""
        out.append(f"  {verdict:4} {c.name:36} {c.ops:5} ops {c.checked:7} checked{extra}")
    shown = 0
    for f in report.findings:
        if f.known is None:
            out.append("  " + f.text())
            if shown < 5 and "c_walk" in f.evidence:  # both walks of the first differing address
                shown += 1
                out += ["    the C code's tables:", *("      " + ln for ln in str(f.evidence["c_walk"]).splitlines()),
                        "    upstream's (the oracle's):",
                        *("      " + ln for ln in str(f.evidence["oracle_walk"]).splitlines())]
    for r in report.reproducers():
        out.append(f"  reproducer ({', '.join(r['kinds'])}): --config {r['config']} --sequence {r['sequence']} "
                   f"--seed {r['seed']}; shrunk to {len(r['ops'])} ops: "
                   + "; ".join(_op_text(op) for op in r["ops"]))
    seen: set[str] = set()
    for f in report.findings:
        if f.known and f.known not in seen:
            seen.add(f.known)
            out.append(f"  known bug {f.known}: {kernel_bugs.by_key(f.known).title}; first: {f.text()}")
    return out


def _op_text(op: dict[str, Any]) -> str:
    return " ".join(str(v) for v in op.values())
