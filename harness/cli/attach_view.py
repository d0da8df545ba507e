"""What ``harness attach`` shows of a snapshot, as JSON and as text: one renderer, also used by gdb's
``pgt`` commands (:mod:`harness.gdb.commands`), so the two print the same thing for the same target.

:func:`view` decodes the snapshot's regimes (:func:`harness.check.attach.decode`) and builds the
JSON object; :func:`text` renders that object (and the decode) for a terminal. The parts are
separate functions (:func:`header_lines`, :func:`regime_lines`, :func:`explain_lines`) so that a
``pgt`` subcommand prints only its part, in the same words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.arch.regimes import guest_vmid
from harness.check import attach as att
from harness.check.scenario.parse import int_text
from harness.cli import args
from harness.errors import InputError
from harness.live.regimes import Regime
from harness.live.snapshot import Snapshot

REGIME_NAMES = ("el2", "el2&0", "el2&0:ttbr1", "el1&0", "el1&0:ttbr1", "stage2")


@dataclass(frozen=True)
class Filters:
    """The selection options of ``harness attach`` (and ``pgt``): --regime, --range, --perm,
    --explain."""

    regimes: tuple[str, ...] = ()
    window: tuple[int, int] | None = None
    perms: att.PermFilter | None = None
    address: int | None = None

    def select(self, regimes: Sequence[Regime]) -> list[Regime]:
        return [r for r in regimes if not self.regimes or r.name in self.regimes]


@dataclass
class View:
    """A decoded snapshot and its JSON form (``out``: attach's ``--json`` object, less what only
    ``--verify`` adds)."""

    snapshot: Snapshot
    decoded: list[att.RegimeDecode]
    findings: list[att.Finding]
    out: dict[str, Any]


def parse_regimes(values: Sequence[str] | None) -> tuple[str, ...]:
    for v in values or ():
        if v not in REGIME_NAMES:
            raise InputError(f"--regime: expected one of {', '.join(REGIME_NAMES)}, got {v!r}")
    return tuple(values or ())


def parse_address(text: str, option: str = "--explain") -> int:
    return args.parse_address(text, option)


def parse_cpu(text: str) -> int:
    try:
        value = int_text(text, "a vCPU index")
    except ValueError:
        value = -1
    if value < 0:
        raise InputError(f"--cpu: expected a vCPU index (0, 1, ...), got {text!r}")
    return value


def view(snap: Snapshot, regimes: Sequence[Regime], filters: Filters, timings: dict[str, float] | None = None,
         read_tables: bool = True) -> View:
    """Decode ``regimes`` (already selected) of the snapshot and build attach's JSON object.
    With ``read_tables`` False the ranges are not decoded (``pgt regimes``: registers only)."""
    chosen = filters.select(regimes)
    decoded = att.decode(snap, chosen) if read_tables else [
        att.RegimeDecode(r, [], snap.cpus_using(r)) for r in chosen]
    out: dict[str, Any] = {"source": snap.source, "pages": len(snap.pages), "cpus": cpus_json(snap, decoded),
                           "regimes": []}
    if not read_tables:
        del out["pages"]
    if "cpsr" in snap.registers:  # PSTATE.EL of the first vCPU (gdb has no CurrentEL register)
        out["current_el"] = current_el(snap.registers)
    for rd in decoded:
        js = rd.to_json()
        if read_tables:
            js["ranges"] = [r.to_json() for r in att.filter_ranges(rd.ranges, filters.window, filters.perms)]
        else:
            js.pop("ranges", None)
        out["regimes"].append(js)
    found = att.findings(decoded) if read_tables else []
    if read_tables:
        out["findings"] = [f.to_json() for f in found]
    if filters.address is not None:
        out["explain"] = [{"regime": name, "cpus": list(rd.cpus), "address": filters.address, "ok": t.ok,
                           "pa": t.pa, "walk": t.explain()}
                          for (name, t), rd in zip(att.explain(snap, filters.address, chosen), decoded, strict=True)]
    out["timings"] = dict(timings or {})
    return View(snap, decoded, found, out)


def text(v: View, filters: Filters, source: str, saved_to: str | None = None) -> str:
    """attach's text output (without the verify report): header, every regime, findings, walks."""
    lines = header_lines(v, source, saved_to)
    for rd in v.decoded:
        lines += regime_lines(rd, filters)
    if v.findings:
        lines += ["", "findings:"]
        lines += ["  " + f.text().replace("\n", "\n  ") for f in v.findings]
    lines += explain_lines(v)
    return "\n".join(lines)


def header_lines(v: View, source: str, saved_to: str | None = None) -> list[str]:
    snap = v.snapshot
    pages = f": {v.out['pages']} table pages" if "pages" in v.out else ""
    lines = [f"{snap.source or source}{pages}" + (f" (saved to {saved_to})" if saved_to else "")]
    for c in v.out["cpus"]:
        el = f"EL{c['el']}" if c["el"] is not None else "EL?"
        uses = ", ".join(v.decoded[i].name for i in c["regimes"]) or "no regime enabled"
        state = f" ({c['state']})" if c.get("state") else ""
        guest = f"; in a guest (VMID {c['vmid']})" if c.get("context") == "guest" else ""
        lines.append(f"  vCPU {c['cpu']}: stopped at {el}{state}: {uses}{guest}")
    return lines


def regime_lines(rd: att.RegimeDecode, filters: Filters, ranges: bool = True) -> list[str]:
    regs = " ".join(f"{k}={v:#x}" for k, v in rd.regime.registers.items())
    lines = ["", f"{rd.name} ({cpu_list(rd.cpus)}): {rd.regime.geom.describe()}, root {rd.regime.root:#x}",
             f"  {regs}"]
    if ranges:
        shown = att.filter_ranges(rd.ranges, filters.window, filters.perms)
        lines.append(f"  {len(shown)} of {len(rd.ranges)} ranges")
        lines += [f"  {r.describe()}" for r in shown]
    return lines


def explain_lines(v: View) -> list[str]:
    lines: list[str] = []
    for item in v.out.get("explain", []):
        lines += ["", f"{item['regime']} ({cpu_list(tuple(item['cpus']))}): {item['walk']}"]
    return lines


def current_el(regs: dict[str, int]) -> int | None:
    """PSTATE.EL from gdb's cpsr (gdb has no CurrentEL register)."""
    return (regs["cpsr"] >> 2) & 3 if "cpsr" in regs else None


def cpus_json(snap: Snapshot, decoded: list[att.RegimeDecode]) -> list[dict[str, Any]]:
    """Each vCPU of the snapshot: its exception level, the context it was stopped in ("guest" with
    its VMID, or "host": :func:`harness.arch.regimes.guest_vmid`), QEMU's state for it, the indexes (into
    ``regimes``) of the regimes it uses, and every register read on it (a regime's "registers"
    are its first vCPU's: HCR_EL2 and SCTLR_EL2 bits the walk ignores may differ on the others)."""
    out = []
    for cpu in sorted(snap.cpus):
        regs = snap.cpus[cpu]
        vmid = guest_vmid(regs)
        entry: dict[str, Any] = {"cpu": cpu, "el": current_el(regs), "pc": regs.get("pc"),
                                 "context": "host" if vmid is None else "guest", "vmid": vmid,
                                 "regimes": [i for i, rd in enumerate(decoded) if cpu in rd.cpus]}
        if cpu in snap.cpu_states:
            entry["state"] = snap.cpu_states[cpu]
        entry["registers"] = {k: f"{v:#x}" for k, v in regs.items()}
        out.append(entry)
    return out


def cpu_list(cpus: tuple[int, ...]) -> str:
    return f"vCPU{'s' if len(cpus) != 1 else ''} {', '.join(map(str, cpus))}" if cpus else "no vCPU"
