"""The CLI's commands: argument handling and output; the work is done by harness.check/core/target."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from harness.arch.geometry import (
    MIN_IA_BITS,
    Geometry,
    GeometryError,
    Granule,
    Stage,
    max_ia_bits,
    stage2_start_levels,
)
from harness.arch.registers import Par, Stage1Regs, ttbr_table_base
from harness.check import scenario as sc_mod
from harness.check.addresses import probe_addresses
from harness.check.divergences import at_unsafe
from harness.check.engine import AT_OPS, CheckReport, check_built, used_image
from harness.check.scenario import Built, Scenario, ScenarioError
from harness.cli.output import Progress, emit_json, table
from harness.core.batch import UNMODELLED, expected_par_batch, par_compare_mask_batch, translate_batch
from harness.core.dump import diff_ranges, mapped_ranges
from harness.core.translate import WRITE, expected_par, par_compare_mask, translate
from harness.target.errors import ToolMissing
from harness.target.layout import LAYOUT
from harness.target.target import Target


class UsageError(Exception):
    """Bad arguments or set-up: exit status 2 with this message."""


def dispatch(args: argparse.Namespace) -> int:
    handler = {
        "run": cmd_run, "check": cmd_check, "explain": cmd_explain, "export": cmd_export, "dump": cmd_dump,
        "review": cmd_review, "bench": cmd_bench, "geometry": cmd_geometry,
    }[args.command]
    try:
        return handler(args)
    except (ScenarioError, GeometryError) as e:
        raise UsageError(str(e)) from e
    except ToolMissing as e:
        raise UsageError(f"{e} (run ci/setup.sh)") from e


@contextmanager
def _target(args: argparse.Namespace) -> Iterator[Target]:
    if args.timeout <= 0:
        raise UsageError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    with Target.start(timeout=args.timeout, request_timeout=max(args.timeout, 60.0), log_dir=args.log_dir) as t:
        yield t


# -- scenarios from arguments ----------------------------------------------------------------

def _split(spec: str, n_min: int, n_max: int, what: str, form: str) -> list[str]:
    parts = spec.split(":")
    if not n_min <= len(parts) <= n_max:
        raise UsageError(f"{what}: expected {form}, got {spec!r}")
    return parts


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    given = [x for x in ("scenario", "builtin") if getattr(args, x)]
    inline = args.stage is not None or args.granule is not None or args.ia_bits is not None or args.map
    if len(given) + bool(inline) > 1:
        raise UsageError("scenario: give one of --scenario FILE, --builtin NAME, or --stage/--granule/--ia-bits")
    if args.scenario:
        found = sc_mod.load(args.scenario)
        if len(found) != 1:
            raise UsageError(f"--scenario: {args.scenario} holds {len(found)} scenarios; this command takes one")
        sc = found[0]
    elif args.builtin:
        names = {s.name: s for s in sc_mod.builtin()}
        if args.builtin not in names:
            raise UsageError(f"--builtin: expected one of {', '.join(names)}, got {args.builtin!r}")
        sc = names[args.builtin]
    else:
        missing = [o for o, v in (("--stage", args.stage), ("--granule", args.granule), ("--ia-bits", args.ia_bits))
                   if v is None]
        if missing:
            raise UsageError(f"scenario: {', '.join(missing)} required (or --scenario FILE / --builtin NAME)")
        maps = []
        for m in args.map:
            p = _split(m, 3, 4, "--map", "ADDR:SIZE:PA[:PROT]")
            maps.append({"addr": p[0], "size": p[1], "pa": p[2], "prot": p[3] if len(p) > 3 else "rw"})
        ops = []
        for o in args.op:
            p = _split(o, 2, 4, "--op", "OP:ADDR[:SIZE][:PROT]")
            op: dict[str, Any] = {"op": p[0], "addr": p[1]}
            if len(p) > 2 and p[2]:
                op["size"] = p[2]
            if len(p) > 3:
                op["prot"] = p[3]
            ops.append(op)
        sc = sc_mod.from_dict({"name": "cli", "stage": args.stage, "granule": args.granule, "ia_bits": args.ia_bits,
                               "pa_bits": args.pa_bits, "start_level": args.start_level, "maps": maps, "ops": ops},
                              "command line")
    if getattr(args, "access", False):
        sc = Scenario(**{**sc.__dict__, "access": True})
    if getattr(args, "sample", None) is not None:
        if args.sample < 1:
            raise UsageError(f"--sample: expected a positive count, got {args.sample}")
        sc = Scenario(**{**sc.__dict__, "sample": args.sample})
    return sc


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        raise UsageError(f"{what}: expected an integer such as 0x40001000, got {text!r}") from None


# -- run / check --------------------------------------------------------------------------------

def _summary_rows(reports: list[CheckReport]) -> list[list[object]]:
    return [[("ok" if r.ok else "MISMATCH"), r.scenario, r.geometry, r.checked, r.matched, r.mismatched, r.known,
             sum(r.withheld.values())] for r in reports]


def _print_reports(reports: list[CheckReport], args: argparse.Namespace, elapsed: float, t: Target) -> None:
    if args.json:
        emit_json({"ok": all(r.ok for r in reports), "elapsed_s": elapsed, "qemu": t.cmdline,
                   "console_log": str(t.console_log), "reports": [r.to_json() for r in reports]})
        return
    for r in reports:
        if not r.ok:
            print(r.text())
    table(["verdict", "scenario", "geometry", "checked", "matched", "mismatched", "known QEMU div.", "withheld AT"],
          _summary_rows(reports))
    total = sum(r.checked for r in reports)
    bad = sum(r.mismatched for r in reports)
    print(f"\n{total} translations checked in {elapsed:.1f} s on QEMU {'.'.join(map(str, t.qemu_version))}: "
          f"{'all matched' if not bad else f'{bad} mismatched'}")
    if bad:
        print(f"logs: {t.log_dir}\nreproduce QEMU: {t.cmdline}")


def _write_report(path: str | None, reports: list[CheckReport]) -> None:
    if path:
        Path(path).write_text("\n\n".join(r.text() for r in reports) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    scenarios = sc_mod.builtin()
    if args.only:
        names = {s.name for s in scenarios}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise UsageError(f"--only: unknown scenario(s) {unknown}; expected some of {sorted(names)}")
        scenarios = [s for s in scenarios if s.name in args.only]
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    reports: list[CheckReport] = []
    with _target(args) as t:
        progress = Progress(len(scenarios), enabled=None if not args.json else False)
        try:
            for s in scenarios:
                progress.step(s.label())
                reports.append(check_built(sc_mod.build(s, t.layout), t, rng))
                progress.advance()
        finally:
            progress.close()
        _print_reports(reports, args, time.perf_counter() - t0, t)
    _write_report(args.report, reports)
    return 0 if all(r.ok for r in reports) else 1


def cmd_check(args: argparse.Namespace) -> int:
    s = scenario_from_args(args)
    t0 = time.perf_counter()
    with _target(args) as t:
        rep = check_built(sc_mod.build(s, t.layout), t, np.random.default_rng(args.seed))
        _print_reports([rep], args, time.perf_counter() - t0, t)
        if not args.json:
            print(rep.text() if rep.ok else "")
    _write_report(args.report, [rep])
    return 0 if rep.ok else 1


# -- explain ------------------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    s = scenario_from_args(args)
    addr = _parse_int(args.address, "ADDRESS")
    out: list[dict[str, Any]] = []
    with _target(args) as t:
        built = sc_mod.build(s, t.layout)
        tb = built.table
        assert tb.pgd is not None
        t.install(tb.regs(), used_image(tb))
        try:
            for op, access in AT_OPS[tb.stage]:
                model = translate(tb.mem, tb.geom, tb.pgd, addr, access)
                pred = translate_batch(tb.mem.words(), tb.mem.base, tb.geom, tb.pgd,
                                       np.array([addr], dtype=np.uint64), access)
                unsafe, keys = at_unsafe(pred, t.qemu_version)
                if unsafe.any():
                    rec = t.access(np.array([addr], dtype=np.uint64), write=access is WRITE, stage=tb.stage)[0]
                    mmu = ("access completed" if rec["completed"] else
                           f"access faulted: ESR {int(rec['esr']):#x} FAR {int(rec['far']):#x} "
                           f"HPFAR {int(rec['hpfar']):#x}") + f" (AT withheld: {', '.join(keys)})"
                    agree = bool(rec["completed"]) == model.ok
                else:
                    par = int(t.at(np.array([addr], dtype=np.uint64), op)[0])
                    mmu = str(Par(par))
                    agree = not model.unmodelled and (expected_par(model) ^ par) & par_compare_mask(model) == 0
                out.append({"op": op, "model": model.explain(), "mmu": mmu, "agree": agree})
        finally:
            t.uninstall()
    if args.json:
        emit_json({"address": addr, "scenario": s.label(), "results": out})
    else:
        print(s.label())
        for r in out:
            print(f"\n== {r['op']} {addr:#x}: {'agree' if r['agree'] else 'DISAGREE'}")
            print("model: " + r["model"].replace("\n", "\n       "))
            print(f"MMU:   {r['mmu']}")
    return 0 if all(r["agree"] for r in out) else 1


# -- export -------------------------------------------------------------------------------------

EXPORT_SCHEMA = "pgtable-harness-export/1"


def export_built(built: Built, directory: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Write ``tables.bin`` (raw image at ``image_base``), ``config.json`` and ``expected.json``."""
    tb = built.table
    assert tb.pgd is not None
    image = used_image(tb)
    (directory / "tables.bin").write_bytes(image.data)
    regs = tb.regs()
    reg_values = {k: getattr(regs, k) for k in regs.__dataclass_fields__}
    addrs = probe_addresses(tb, rng, built.scenario.sample)
    ops = []
    for op, access in AT_OPS[tb.stage]:
        pred = translate_batch(tb.mem.words(), tb.mem.base, tb.geom, tb.pgd, addrs, access)
        ops.append({
            "op": op, "access": access.value,
            "ok": pred.ok.tolist(), "pa": [int(x) for x in pred.pa], "level": pred.level.tolist(),
            "attr": pred.attr.tolist(), "sh": pred.par_sh.tolist(), "fault": [
                None if f < 0 else ("unmodelled" if f == UNMODELLED else ["address_size", "translation", "access_flag",
                                                                 "permission"][f]) for f in pred.fault.tolist()],
            "fault_level": pred.fault_level.tolist(), "fault_stage2": pred.fault_stage2.tolist(),
            "par": [int(x) for x in expected_par_batch(pred, tb.stage)],
            "par_mask": [int(x) for x in par_compare_mask_batch(pred)],
        })
    config = {
        "schema": EXPORT_SCHEMA,
        "scenario": built.scenario.name,
        "stage": int(tb.stage), "granule": tb.granule.label, "ia_bits": tb.geom.ia_bits, "pa_bits": tb.geom.pa_bits,
        "start_level": tb.geom.start_level, "pgd_pages": tb.geom.pgd_pages, "pgd": tb.pgd,
        "image": {"file": "tables.bin", "base": image.base, "size": len(image.data)},
        "registers": reg_values,
        "enable": ("SCTLR_EL2 |= sctlr_el2_set after MAIR/TCR/TTBR0 and TLBI ALLE2" if isinstance(regs, Stage1Regs)
                   else "HCR_EL2 |= hcr_el2_set after VTCR/VTTBR and TLBI VMALLS12E1"),
        "regions": [{"name": r.name, "base": r.base, "size": r.size, "prot": r.prot.label(),
                     "mapping": "identity"} for r in built.regions],
        "maps": [{"addr": m.addr, "size": m.size, "pa": m.pa, "prot": m.prot.label()} for m in built.scenario.maps],
        "ops": [{"op": o.op, "addr": o.addr, "size": o.size, "prot": o.prot.label()} for o in built.scenario.ops],
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "expected.json").write_text(json.dumps({"schema": EXPORT_SCHEMA, "addresses": [int(a) for a in addrs],
                                                         "probes": ops}) + "\n")
    return {"directory": str(directory), "image_base": image.base, "image_size": len(image.data),
            "addresses": int(addrs.size), "registers": reg_values}


def cmd_export(args: argparse.Namespace) -> int:
    s = scenario_from_args(args)
    d = Path(args.directory)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise UsageError(f"DIRECTORY: {d} exists and is not an empty directory")
    d.mkdir(parents=True, exist_ok=True)
    info = export_built(sc_mod.build(s, LAYOUT), d, np.random.default_rng(args.seed))
    if args.json:
        emit_json(info)
    else:
        print(f"exported {s.label()} to {d}: tables.bin ({info['image_size']} bytes at {info['image_base']:#x}), "
              f"config.json, expected.json ({info['addresses']} addresses)")
        for k, v in info["registers"].items():
            print(f"  {k:<14} {v:#018x}")
    return 0


# -- dump ---------------------------------------------------------------------------------------

class _GdbPhysMemory:
    """Guest physical memory read through gdb, a table page at a time."""

    def __init__(self, t: Target, page: int) -> None:
        self.t = t
        self.page = page
        self.cache: dict[int, bytes] = {}
        self.reads = 0

    def read64(self, pa: int) -> int:
        base = pa & ~(self.page - 1)
        if base not in self.cache:
            self.cache[base] = self.t.gdb.read_memory(base, self.page)
            self.reads += 1
        off = pa - base
        return int.from_bytes(self.cache[base][off : off + 8], "little")


def cmd_dump(args: argparse.Namespace) -> int:
    s = scenario_from_args(args)
    with _target(args) as t:
        built = sc_mod.build(s, t.layout)
        tb = built.table
        assert tb.pgd is not None
        model = mapped_ranges(tb.mem, tb.geom, tb.pgd)
        t.install(tb.regs(), used_image(tb))
        try:
            regname = "TTBR0_EL2" if tb.stage is Stage.S1 else "VTTBR_EL2"
            root = ttbr_table_base(t.sysreg(regname), tb.geom)
            mem = _GdbPhysMemory(t, tb.granule.size)
            t.gdb.physical_mode(True)
            try:
                t0 = time.perf_counter()
                live = mapped_ranges(mem, tb.geom, root)
                dt = time.perf_counter() - t0
            finally:
                t.gdb.physical_mode(False)
        finally:
            t.uninstall()
    only_model, only_live = diff_ranges(model, live)
    if args.json:
        emit_json({"scenario": s.label(), "root": root, "live": [r.to_json() for r in live],
                   "only_in_model": [r.to_json() for r in only_model], "only_live": [r.to_json() for r in only_live],
                   "gdb_page_reads": mem.reads, "seconds": dt})
    else:
        print(f"{s.label()}\nlive tables at {regname}={root:#x} ({mem.reads} table pages read through gdb "
              f"in {dt:.2f} s):")
        for r in live:
            print("  " + r.describe())
        if only_model or only_live:
            print("DIFFERENCES:")
            for r in only_model:
                print("  model only: " + r.describe())
            for r in only_live:
                print("  live only:  " + r.describe())
        else:
            print(f"identical to the model ({len(model)} ranges)")
    return 0 if not (only_model or only_live) else 1


# -- review / fuzz (their modules own their options) ----------------------------------------------

def cmd_review(args: argparse.Namespace) -> int:
    from harness.check import review

    return review.main(["--json"] if args.json else [])




# -- bench --------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench.e2e import run_bench

    if args.probes < 1000:
        raise UsageError(f"--probes: expected at least 1000, got {args.probes}")
    with _target(args) as t:
        result = run_bench(t, args.probes, np.random.default_rng(args.seed))
    if args.json:
        emit_json(result)
    else:
        print(f"scenario: {result['scenario']}")
        print(f"raw AT loop:           {result['raw_at_per_s'] / 1e6:6.2f} M translations/s")
        print(f"verified end to end:   {result['verified_per_s'] / 1e6:6.2f} M translations/s "
              f"({result['verified']} checked, {result['mismatched']} mismatched)")
        print(f"ratio verified/raw:    {result['ratio']:.2f}")
        print("stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in result["timings"].items()))
    return 0 if result["mismatched"] == 0 else 1


# -- geometry -----------------------------------------------------------------------------------

def cmd_geometry(args: argparse.Namespace) -> int:
    stages = {"1": [Stage.S1], "2": [Stage.S2], "both": [Stage.S1, Stage.S2]}.get(str(args.stage))
    if stages is None:
        raise UsageError(f"--stage: expected 1, 2 or both, got {args.stage!r}")
    rows: list[dict[str, Any]] = []
    for st in stages:
        for g in Granule:
            pa = min(args.pa_bits, max_ia_bits(g)) if st is Stage.S2 else None
            for ia in range(MIN_IA_BITS, max_ia_bits(g) + 1):
                try:
                    geom = Geometry.create(st, g, ia, pa if st is Stage.S2 else None)
                except GeometryError:
                    continue
                allowed = stage2_start_levels(g, ia, geom.pa_bits) if st is Stage.S2 else (geom.start_level,)
                rows.append({"stage": int(st), "granule": g.label, "ia_bits": ia, "pa_bits": geom.pa_bits,
                             "start_level": geom.start_level, "levels": geom.levels, "pgd_pages": geom.pgd_pages,
                             "allowed_start_levels": list(allowed), "block_levels": list(geom.block_levels)})
    if args.json:
        emit_json(rows)
    else:
        table(["stage", "granule", "ia", "pa", "start", "levels", "PGD pages", "allowed starts", "block levels"],
              [[r["stage"], r["granule"], r["ia_bits"], r["pa_bits"], r["start_level"], r["levels"], r["pgd_pages"],
                ",".join(map(str, r["allowed_start_levels"])), ",".join(map(str, r["block_levels"]))] for r in rows])
    return 0


__all__ = ["UsageError", "dispatch"]
