"""attach's EL0 view: in a two-range regime each range shows EL0's permissions beside the
privileged level's (AP[1], UXN, APTable[0], UXNTable), in text and JSON; one-range regimes show
none."""

from __future__ import annotations

from harness.arch.descriptors import S1_AP, S1_PXN, S1_UXN
from harness.check.attach import decode, perm_label
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable
from harness.core.prot import Prot
from harness.core.walker import Walker, WalkFlags
from harness.live.snapshot import from_tables

TEXT, DATA, USER = 0x1_0000_0000, 0x1_0010_0000, 0x1_0020_0000
AP_EL0 = 1 << S1_AP.lo  # AP[1]: EL0 access


def _table(e2h: bool) -> HypPgtable:
    t = HypPgtable(PagePool(0x4800_0000, 256 * 4096, 4096), "4K", 48, 48, e2h=e2h)
    t.map(TEXT, 0x10000, 0x5000_0000, Prot.RX)
    t.map(DATA, 0x10000, 0x5010_0000, Prot.RW)
    t.map(USER, 0x10000, 0x5020_0000, Prot.RX)
    return t


def _user_text(t: HypPgtable) -> None:
    """USER becomes a user process's text: EL0 may read and run it, EL2 may not run it (PXN)."""
    def edit(addr: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        pte = t.mem.read64(ptep)
        t.mem.write64(ptep, (pte | AP_EL0 | S1_PXN.mask) & ~S1_UXN.mask)

    t.walk(USER, USER + 0x10000, Walker(edit, WalkFlags.LEAF))


def _views(e2h: bool) -> dict[int, tuple[str, str | None, str]]:
    t = _table(e2h)
    if e2h:
        _user_text(t)
    (rd,) = decode(from_tables(t))
    return {r.va: (perm_label(r.perms), None if r.el0 is None else perm_label(r.el0), r.describe())
            for r in rd.ranges}


def test_el2_0_ranges_show_el0s_permissions() -> None:
    v = _views(e2h=True)
    assert v[TEXT][:2] == ("r-x", "--x")  # hyp text: AP[1] = 0, UXN = 0: execute-only at EL0
    assert v[DATA][:2] == ("rw-", "---")  # UXN | PXN (upstream's hVHE execute-never)
    assert v[USER][:2] == ("r--", "r-x")  # user text: not EL2-executable (PXN), EL0 runs it
    assert "r-- el0 r-x" in v[USER][2]


def test_el2_regime_has_no_el0_view() -> None:
    v = _views(e2h=False)
    assert all(el0 is None and " el0 " not in text for _, el0, text in v.values())
    (rd,) = decode(from_tables(_table(False)))
    assert rd.to_json()["ranges"][0]["el0_perms"] is None
    (rd,) = decode(from_tables(_table(True)))
    assert rd.to_json()["ranges"][0]["el0_perms"] == "--x"
