"""A guest's stage 2 as decoded, against the account of the VMM that made the guest.

The harness's VMM (:mod:`harness.live.vmm`) reports its memslots, the host PFN behind every page
its guest touched (``/proc/self/pagemap``), the access the guest made, and the dirty bitmaps it
read. :func:`check_guest` holds each captured guest stage 2 (VMID != 0) to that account:

* ``unmapped`` / ``wrong-pa`` / ``too-little-access``: every page the guest touched inside a live
  memslot is mapped, to the PA pagemap gave, with at least the access the guest made (r, w, x;
  a write into a slot under dirty logging is not required to stay writable);
* ``outside-memslots``: nothing is mapped outside the memslots as the VMM left them (a deleted
  slot, a moved slot's old place);
* ``dirty-log``: in a slot under dirty logging the mappings are single 4K pages, none writable
  (KVM_GET_DIRTY_LOG write-protects the pages it reports, and the guest writes nothing after the
  VMM read the bitmap), each a page the bitmap marked; the bitmap marks exactly the pages the
  guest wrote after logging began;
* ``vmids``: a report of N VMs is matched by N stage 2s with distinct VMIDs, each VM's pages in
  one of them (a capture holds the stage 2s of the vCPUs in a guest at that moment: fewer is
  reported as ``missing-vm``, for the caller to capture again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.arch.registers import VTTBR_VMID
from harness.check.attach import LiveRange, RegimeDecode, perm_label
from harness.core.translate import PERM_R, PERM_W, PERM_X
from harness.live.vmm import PAGE_SIZE, Memslot, VmmReport

_ACCESS = {"r": PERM_R, "w": PERM_W, "x": PERM_X}
MAX_SHOWN = 20


@dataclass(frozen=True)
class GuestFinding:
    kind: str
    vm: int
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vm": self.vm, "text": self.text}


@dataclass
class GuestCheck:
    """What was checked and what disagreed (``findings`` capped at :data:`MAX_SHOWN` per kind;
    ``by_kind`` counts them all)."""

    vms: dict[int, int] = field(default_factory=dict)  # VM -> VMID of the stage 2 matched to it
    pages: int = 0
    ranges: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    findings: list[GuestFinding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.by_kind

    def add(self, kind: str, vm: int, text: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if self.by_kind[kind] <= MAX_SHOWN:
            self.findings.append(GuestFinding(kind, vm, text))

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "vms": {str(k): v for k, v in self.vms.items()}, "pages": self.pages,
                "ranges": self.ranges, "by_kind": self.by_kind, "findings": [f.to_json() for f in self.findings]}

    def text(self) -> str:
        head = (f"guest check: {'OK' if self.ok else 'DISAGREES WITH THE VMM'}: {len(self.vms)} VM(s) "
                f"({', '.join(f'VM {vm} = VMID {vmid}' for vm, vmid in sorted(self.vms.items()))}), "
                f"{self.pages} touched pages, {self.ranges} stage-2 ranges")
        return "\n".join([head, *(f"  {f.kind} (VM {f.vm}): {f.text}" for f in self.findings)])


def vmid(rd: RegimeDecode) -> int:
    return VTTBR_VMID.get(rd.regime.registers.get("VTTBR_EL2", 0))


def _leaf(rd: RegimeDecode, ipa: int) -> tuple[LiveRange, int] | None:
    for r in rd.ranges:
        if r.va <= ipa < r.end:
            return r, r.range.pa + ipa - r.va
    return None


def _logged(slots: Sequence[Memslot], ipa: int) -> bool:
    return any(m.log_dirty and m.ipa <= ipa < m.end for m in slots)


def _match(report: VmmReport, guests: Sequence[RegimeDecode]) -> dict[int, RegimeDecode]:
    """Each VM's stage 2: the one mapping most of its touched pages to their pagemap PAs."""
    out: dict[int, RegimeDecode] = {}
    for vm in report.vms:
        pages = report.page_map(vm, live=True)

        def score(rd: RegimeDecode, pages: dict[int, int] = pages) -> int:
            return sum(1 for ipa, pa in pages.items() if (hit := _leaf(rd, ipa)) is not None and hit[1] == pa)

        free = [rd for rd in guests if rd not in out.values()]
        if free:
            best = max(free, key=score)
            if score(best):
                out[vm] = best
    return out


def check_guest(report: VmmReport, decoded: Sequence[RegimeDecode]) -> GuestCheck:
    """Hold the captured guest stage 2s to the VMM's account (module doc)."""
    res = GuestCheck()
    guests = [rd for rd in decoded if rd.name == "stage2" and vmid(rd) != 0]
    matched = _match(report, guests)
    for vm in report.vms:
        if vm not in matched:
            res.add("missing-vm", vm, f"no captured stage 2 maps VM {vm}'s pages (stage 2s with VMIDs "
                    f"{sorted(vmid(g) for g in guests)}): capture when its vCPU is in the guest (--in-guest)")
    if len({vmid(rd) for rd in matched.values()}) != len(matched):
        res.add("vmids", -1, f"two VMs share a VMID: {sorted(vmid(rd) for rd in matched.values())}")
    for vm, rd in sorted(matched.items()):
        res.vms[vm] = vmid(rd)
        _check_vm(res, report, vm, rd)
    return res


def _check_vm(res: GuestCheck, report: VmmReport, vm: int, rd: RegimeDecode) -> None:
    slots = list(report.memslots(vm).values())
    res.ranges += len(rd.ranges)
    for r in rd.ranges:
        if not any(m.ipa <= r.va and r.end <= m.end for m in slots):
            res.add("outside-memslots", vm, f"{r.describe()} is not inside a memslot as the VMM left them "
                    f"({', '.join(f'[{m.ipa:#x}, {m.end:#x})' for m in slots)})")
    dirtied = {ipa for run in report.pages if run.vm == vm and run.phase == "dirtied" for ipa, _ in run.pages()}
    for run in report.pages:
        if run.vm != vm or not any(m.ipa <= run.ipa < m.end for m in slots):
            continue  # a slot since deleted, or a moved slot's old place: checked as outside above
        need = sum(_ACCESS[a] for a in run.access)
        for ipa, pa in run.pages():
            logged = _logged(slots, ipa)
            if logged and ipa not in dirtied:
                continue  # dirty logging dropped the block it was in: not required to be mapped
            res.pages += 1
            hit = _leaf(rd, ipa)
            if hit is None:
                res.add("unmapped", vm, f"IPA {ipa:#x} (slot {run.slot}, {run.access} in {run.phase}) is not "
                        "mapped in stage 2")
                continue
            leaf, got = hit
            if got != pa:
                res.add("wrong-pa", vm, f"IPA {ipa:#x} -> {got:#x} in stage 2, pagemap says {pa:#x}")
            want = need & ~PERM_W if logged else need
            if leaf.perms & want != want:
                res.add("too-little-access", vm, f"IPA {ipa:#x}: the guest made {run.access} accesses, stage 2 "
                        f"gives {perm_label(leaf.perms)}")
    _check_dirty(res, report, vm, rd, slots, dirtied)


def _check_dirty(res: GuestCheck, report: VmmReport, vm: int, rd: RegimeDecode, slots: Sequence[Memslot],
                 dirtied: set[int]) -> None:
    for log in (d for d in report.dirty if d.vm == vm):
        marked = set(log.dirty_ipas())
        written = {ipa for ipa in dirtied if log.ipa <= ipa < log.ipa + log.pages * PAGE_SIZE}
        if marked != written:
            res.add("dirty-log", vm, f"slot {log.slot}: the bitmap marks {len(marked)} pages, the guest wrote "
                    f"{len(written)} after logging began (only marked: "
                    f"{sorted(hex(a) for a in marked - written)[:8]}, only written: "
                    f"{sorted(hex(a) for a in written - marked)[:8]})")
    for m in slots:
        if not m.log_dirty:
            continue
        marked = {ipa for log in report.dirty if log.vm == vm and log.slot == m.slot for ipa in log.dirty_ipas()}
        for r in rd.ranges:
            if not (r.va < m.end and m.ipa < r.end):
                continue
            if r.range.size != PAGE_SIZE or r.level != 3:
                res.add("dirty-log", vm, f"slot {m.slot} is under dirty logging, yet {r.describe()} is not a "
                        "single 4K page")
            elif r.perms & PERM_W:
                res.add("dirty-log", vm, f"slot {m.slot}: {r.describe()} is writable after KVM_GET_DIRTY_LOG "
                        "write-protected it, and the guest wrote nothing since")
            elif r.va not in marked:
                res.add("dirty-log", vm, f"slot {m.slot}: {r.describe()} is mapped, but the bitmap does not mark "
                        "it: its block should have gone when logging began")
