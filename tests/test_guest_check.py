"""The guest check (harness.check.guest) on stage 2 tables the model builds, against a VMM account
written as records: agreement, and each kind of disagreement it must find."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from harness.arch.registers import VTTBR_VMID
from harness.check.attach import RegimeDecode, decode
from harness.check.guest import check_guest
from harness.core.memory import PagePool
from harness.core.pgtable import Stage2Pgtable
from harness.core.prot import Prot
from harness.live.snapshot import from_tables
from harness.live.vmm import parse_report, records_text

MIB = 1 << 20
PAGE = 4096
SLOT0, SLOT1 = 0x4000_0000, 0x4040_0000  # slot 0: 4K pages; slot 1: a 2 MiB block, then dirty-logged
PA0, PA1 = 0x6000_0000, 0x6200_0000


def _slot(op: str, slot: int, ipa: int, size: int, flags: int = 0) -> dict[str, Any]:
    return {"event": "memslot", "vm": 0, "op": op, "slot": slot, "ipa": f"{ipa:#x}", "size": f"{size:#x}",
            "uaddr": f"{0xffff_8000_0000 + slot * 0x100_0000:#x}", "flags": flags, "advice": "hugepage"}


def _pages(phase: str, slot: int, ipa: int, count: int, pa: int, access: str) -> dict[str, Any]:
    return {"event": "pages", "vm": 0, "phase": phase, "slot": slot, "ipa": f"{ipa:#x}",
            "uaddr": f"{0xffff_8000_0000 + ipa - SLOT0:#x}", "count": count, "pfn": f"{pa // PAGE:#x}",
            "present": True, "thp": count == 512, "access": access}


def records(dirty: bool = False) -> list[dict[str, Any]]:
    recs = [{"event": "start", "pattern": "dirty-log" if dirty else "touch", "pid": 1},
            {"event": "vm", "vm": 0, "pid": 1, "ipa_limit": 40},
            _slot("create", 0, SLOT0, 2 * MIB), _slot("create", 1, SLOT1, 2 * MIB),
            _pages("touched", 0, SLOT0, 4, PA0, "rx"), _pages("touched", 0, SLOT0 + 4 * PAGE, 2, PA0 + 4 * PAGE, "w"),
            _pages("touched", 1, SLOT1, 512, PA1, "w"), {"event": "phase", "vm": 0, "name": "touched"}]
    if dirty:
        recs += [_slot("log", 1, SLOT1, 2 * MIB, flags=1),
                 _pages("dirtied", 1, SLOT1 + 3 * PAGE, 1, PA1 + 3 * PAGE, "w"),
                 _pages("dirtied", 1, SLOT1 + 9 * PAGE, 1, PA1 + 9 * PAGE, "w"),
                 {"event": "dirty", "vm": 0, "slot": 1, "ipa": f"{SLOT1:#x}", "pages": 512,
                  "bitmap": [f"{(1 << 3) | (1 << 9):#x}"] + ["0x0"] * 7}]
    return [*recs, {"event": "phase", "vm": 0, "name": "spinning"},
            {"event": "ready", "pattern": "dirty-log" if dirty else "touch", "vms": 1}]


Edit = Callable[[Stage2Pgtable], None]


def stage2(dirty: bool = False, edit: Edit | None = None, vmid: int = 1) -> list[RegimeDecode]:
    """What KVM builds for :func:`records`: slot 0 as 4K pages rwx, slot 1 as a block (or, under
    dirty logging, just the dirtied pages, read-only)."""
    t = Stage2Pgtable(PagePool(0x4800_0000, 256 * PAGE, PAGE), "4K", 40, 40, start_level=1)
    t.map(SLOT0, 6 * PAGE, PA0, Prot.RWX)
    if dirty:
        for page in (3, 9):
            t.map(SLOT1 + page * PAGE, PAGE, PA1 + page * PAGE, Prot.RX)
    else:
        t.map(SLOT1, 2 * MIB, PA1, Prot.RWX)
    if edit is not None:
        edit(t)
    snap = from_tables(t)
    regs = snap.cpus[0]
    regs["VTTBR_EL2"] = (regs["VTTBR_EL2"] & ~VTTBR_VMID.mask) | VTTBR_VMID.prep(vmid)
    return decode(snap)


@pytest.mark.parametrize("dirty", [False, True])
def test_agrees(dirty: bool) -> None:
    res = check_guest(parse_report(records_text(records(dirty))), stage2(dirty))
    assert res.ok, res.text()
    assert res.vms == {0: 1} and res.pages == 6 + (2 + 2 if dirty else 512)  # dirtied pages: as touched and as dirtied


@pytest.mark.parametrize(("dirty", "edit", "kind"), [
    (False, lambda t: t.unmap(SLOT0 + PAGE, PAGE), "unmapped"),
    (False, lambda t: (t.unmap(SLOT0, PAGE), t.map(SLOT0, PAGE, PA0 + 0x10_0000, Prot.RWX)), "wrong-pa"),
    (False, lambda t: (t.unmap(SLOT0 + 4 * PAGE, PAGE), t.map(SLOT0 + 4 * PAGE, PAGE, PA0 + 4 * PAGE, Prot.RX)),
     "too-little-access"),
    (False, lambda t: t.map(0x4100_0000, PAGE, 0x6400_0000, Prot.RW), "outside-memslots"),
    (True, lambda t: t.map(SLOT1 + 20 * PAGE, PAGE, PA1 + 20 * PAGE, Prot.RX), "dirty-log"),  # unmarked page
    (True, lambda t: (t.unmap(SLOT1 + 3 * PAGE, PAGE), t.map(SLOT1 + 3 * PAGE, PAGE, PA1 + 3 * PAGE, Prot.RW)),
     "dirty-log"),  # still writable
    (True, lambda t: t.unmap(SLOT1 + 9 * PAGE, PAGE), "unmapped"),  # a dirtied page must be mapped
])
def test_finds(dirty: bool, edit: Edit, kind: str) -> None:
    res = check_guest(parse_report(records_text(records(dirty))), stage2(dirty, edit))
    assert not res.ok and kind in res.by_kind, res.text()


def test_dirty_bitmap_must_match_the_writes() -> None:
    recs = records(True)
    (dirty,) = [r for r in recs if r["event"] == "dirty"]
    dirty["bitmap"] = [f"{1 << 3:#x}"] + ["0x0"] * 7  # page 9 written but not marked
    res = check_guest(parse_report(records_text(recs)), stage2(True))
    assert res.by_kind.get("dirty-log", 0) >= 2, res.text()  # the bitmap, and page 9 mapped yet unmarked


def test_no_guest_stage2_is_missing_vm() -> None:
    rep = parse_report(records_text(records()))
    res = check_guest(rep, stage2(vmid=0))  # VMID 0: a host stage 2 (pKVM), not the guest's
    assert res.by_kind == {"missing-vm": 1} and "--in-guest" in res.findings[0].text
