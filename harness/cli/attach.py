"""``harness attach TARGET``: decode a live target's translation tables, and verify them on the MMU.

TARGET is a QEMU gdbstub (``HOST:PORT`` or a unix socket path) or a snapshot file written by
``--save``. The target is stopped while its registers and table pages are read, and left as it
was found (resumed if it was running; nothing is written).

Every vCPU's registers are read (each has its own HCR_EL2, VTTBR_EL2, ...): a regime that several
vCPUs use (the same tables under the same controls) is shown once, with its vCPUs; --cpu N
reads and shows vCPU N alone.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from harness.check import attach as att
from harness.cli.args import check_log_dir, start_target
from harness.cli.output import print_json
from harness.errors import EXIT_MISMATCH, EXIT_OK, HarnessError, InputError
from harness.live.gdbstub import capture, parse_target
from harness.live.snapshot import Snapshot
from harness.target.layout import Layout
from harness.target.target import Target

REGIME_NAMES = ("el2", "el2&0", "stage2")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("attach", help="decode (and --verify) a live target's tables through its gdbstub",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="TARGET", help="gdbstub HOST:PORT or unix socket path, or a snapshot FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cpu", metavar="N", help="only vCPU N (QEMU's CPU index: gdb thread N+1)")
    p.add_argument("--regime", action="append", choices=REGIME_NAMES, help="only these regimes (repeatable)")
    p.add_argument("--range", dest="window", metavar="START:END", help="only ranges overlapping this input "
                   "range (clipped to it); START+SIZE also accepted")
    p.add_argument("--perm", metavar="SPEC", help="only ranges with these permissions, e.g. x, rw, 'x!w' "
                   "(executable and not writable)")
    p.add_argument("--explain", metavar="ADDR", help="the walk of this input address in every regime")
    p.add_argument("--save", metavar="FILE", help="write the snapshot (registers + table pages, JSON) here")
    p.add_argument("--verify", action="store_true", help="replay the tables on the harness's QEMU and check "
                   "every range and hole with AT against the model (exit 1 on a mismatch)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for gdb commands and the replay target")
    p.add_argument("--samples", type=int, default=3, help="--verify: addresses sampled inside each range/hole")
    p.add_argument("--seed", type=int, default=0, help="--verify: seed for the samples")
    p.add_argument("--log-dir", help="--verify: keep the replay target's logs here")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except HarnessError as exc:
        print(f"harness attach: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InputError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    check_log_dir(args.log_dir)
    if args.samples < 0:
        raise InputError(f"--samples: expected 0 or more, got {args.samples}")
    window = att.parse_window(args.window) if args.window else None
    perms = att.PermFilter.parse(args.perm) if args.perm else None
    address = _address(args.explain) if args.explain else None
    cpu = _cpu(args.cpu) if args.cpu is not None else None
    if args.save:
        save = Path(args.save)
        if not save.parent.is_dir():
            raise InputError(f"--save: directory {save.parent} does not exist")
    spec = parse_target(args.target)
    timings: dict[str, float] = {}
    if spec.kind == "file":
        snap = Snapshot.load(spec.where)
        if cpu is not None:
            snap = snap.only_cpu(cpu)
        regimes = snap.regimes()
    else:
        cap = capture(spec, timeout=args.timeout, cpu=cpu)
        snap, regimes = cap.snapshot, cap.regimes
        timings.update(cap.timings)
    if args.regime:
        regimes = [r for r in regimes if r.name in args.regime]
    if args.save:
        snap.save(args.save)
    decoded = att.decode(snap, regimes)
    out: dict[str, Any] = {"source": snap.source, "pages": len(snap.pages), "cpus": _cpus_json(snap, decoded),
                           "regimes": []}
    if "cpsr" in snap.registers:  # PSTATE.EL of the first vCPU (gdb has no CurrentEL register)
        out["current_el"] = _el(snap.registers)
    for rd in decoded:
        js = rd.to_json()
        js["ranges"] = [r.to_json() for r in att.filter_ranges(rd.ranges, window, perms)]
        out["regimes"].append(js)
    found = att.findings(decoded)
    out["findings"] = [f.to_json() for f in found]
    if address is not None:
        out["explain"] = [{"regime": name, "cpus": list(rd.cpus), "address": address, "ok": t.ok, "pa": t.pa,
                           "walk": t.explain()}
                          for (name, t), rd in zip(att.explain(snap, address, regimes), decoded, strict=True)]
    code = EXIT_OK
    report = None
    if args.verify:
        def start(layout: Layout) -> Target:
            return start_target(args, layout)

        report = att.verify(snap, start, samples=args.samples, seed=args.seed, regimes=regimes)
        out["verify"] = report.to_json()
        if len(out["verify"]["regimes"]) == len(decoded):  # verify goes regime by regime, in order
            for js, rd in zip(out["verify"]["regimes"], decoded, strict=True):
                js["cpus"] = list(rd.cpus)
        out["checked"] = report.checked
        out["mismatched"] = report.mismatched
        code = EXIT_OK if report.ok else EXIT_MISMATCH
    out["timings"] = timings
    if args.json:
        print_json(out)
        return code
    print(f"{snap.source or args.target}: {len(snap.pages)} table pages"
          + (f" (saved to {args.save})" if args.save else ""))
    for c in out["cpus"]:
        el = f"EL{c['el']}" if c["el"] is not None else "EL?"
        uses = ", ".join(decoded[i].name for i in c["regimes"]) or "no regime enabled"
        state = f" ({c['state']})" if c.get("state") else ""
        print(f"  vCPU {c['cpu']}: stopped at {el}{state}: {uses}")
    for rd in decoded:
        regs = " ".join(f"{k}={v:#x}" for k, v in rd.regime.registers.items())
        print(f"\n{rd.name} ({_cpu_list(rd.cpus)}): {rd.regime.geom.describe()}, root {rd.regime.root:#x}\n"
              f"  {regs}")
        shown = att.filter_ranges(rd.ranges, window, perms)
        print(f"  {len(shown)} of {len(rd.ranges)} ranges")
        for r in shown:
            print(f"  {r.describe()}")
    if found:
        print("\nfindings:")
        for f in found:
            print("  " + f.text().replace("\n", "\n  "))
    for item in out.get("explain", []):
        print(f"\n{item['regime']} ({_cpu_list(tuple(item['cpus']))}): {item['walk']}")
    if report is not None:
        print("\n" + report.text())
    return code


def _el(regs: dict[str, int]) -> int | None:
    """PSTATE.EL from gdb's cpsr (gdb has no CurrentEL register)."""
    return (regs["cpsr"] >> 2) & 3 if "cpsr" in regs else None


def _cpus_json(snap: Snapshot, decoded: list[att.RegimeDecode]) -> list[dict[str, Any]]:
    """Each vCPU of the snapshot: its exception level, QEMU's state for it, the indexes (into
    ``regimes``) of the regimes it uses, and every register read on it (a regime's "registers"
    are its first vCPU's: HCR_EL2 and SCTLR_EL2 bits the walk ignores may differ on the others)."""
    out = []
    for cpu in sorted(snap.cpus):
        regs = snap.cpus[cpu]
        entry: dict[str, Any] = {"cpu": cpu, "el": _el(regs), "pc": regs.get("pc"),
                                 "regimes": [i for i, rd in enumerate(decoded) if cpu in rd.cpus]}
        if cpu in snap.cpu_states:
            entry["state"] = snap.cpu_states[cpu]
        entry["registers"] = {k: f"{v:#x}" for k, v in regs.items()}
        out.append(entry)
    return out


def _cpu_list(cpus: tuple[int, ...]) -> str:
    return f"vCPU{'s' if len(cpus) != 1 else ''} {', '.join(map(str, cpus))}" if cpus else "no vCPU"


def _cpu(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise InputError(f"--cpu: expected a vCPU index (0, 1, ...), got {text!r}") from None
    if value < 0:
        raise InputError(f"--cpu: expected a vCPU index (0, 1, ...), got {text!r}")
    return value


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise InputError(f"--explain: expected an address like 0x40001000, got {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise InputError(f"--explain: expected a 64-bit address, got {text!r}")
    return value
