"""``harness attach --verify`` on hand-made snapshots: the cases other decoders get wrong, replayed
on the payload's MMU (tables relocated into the pool, payload spliced in) with 0 mismatches; a
wrong model is caught; a snapshot that leaves no room for the payload is refused."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from harness.arch.geometry import Geometry
from harness.arch.registers import SCTLR_WXN
from harness.check import attach
from harness.check.attach import VerifyRefused, verify
from harness.check.engine import Subject
from harness.cli import main
from harness.core.batch import BatchResult
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable, KvmPgtable, Stage2Pgtable
from harness.core.prot import Prot
from harness.live.snapshot import from_tables
from harness.target.layout import Layout
from harness.target.target import Target

pytestmark = pytest.mark.hw
MIB = 1 << 20


def _start(layout: Layout) -> Target:
    return Target.start(timeout=60, layout=layout)


def _pool(size: int) -> PagePool:
    return PagePool(0x4800_0000, 256 * size, size)


def _s2_concat() -> KvmPgtable:
    t = Stage2Pgtable(_pool(4096), "4K", 43, 44, start_level=1)  # 16 concatenated PGD pages
    t.map(0x4000_0000, 2 * MIB, 0x5000_0000, Prot.RW)
    t.map((1 << 43) - 2 * MIB, 2 * MIB, 0x6000_0000, Prot.RX)
    t.map(0x8000_0000, 64 * 1024, 0x0900_0000, Prot.RW | Prot.DEVICE)
    return t


def _s1_4k_40() -> KvmPgtable:
    t = HypPgtable(_pool(4096), "4K", 40)
    t.map(0x1000, 4096, 0x5000_0000, Prot.RX)
    t.map((1 << 40) - 4096, 4096, 0x5000_1000, Prot.R)
    t.map(0x80_0000_0000, 2 * MIB, 0x5020_0000, Prot.RW)
    return t


def _s1_16k_ds0() -> KvmPgtable:
    t = HypPgtable(_pool(16384), "16K", 48, 48)
    t.map(0x1_0000_0000, 32 * MIB, 0xFFFF_FE00_0000, Prot.RW)
    return t


def _s64k(stage: int) -> Callable[[], KvmPgtable]:
    def build() -> KvmPgtable:
        pool = _pool(65536)
        t: KvmPgtable = HypPgtable(pool, "64K", 48, 52) if stage == 1 else Stage2Pgtable(pool, "64K", 48, 52)
        t.map(0x1_0000_0000, 512 * MIB, 0xF_FFFF_E000_0000, Prot.RW)
        t.map(0x2_0000_0000, 64 * 1024, 0xA_0000_0001_0000, Prot.R)
        return t
    return build


def _s1_lpa2(granule: str, e2h: bool) -> Callable[[], KvmPgtable]:
    def build() -> KvmPgtable:
        t = HypPgtable(_pool(4096 if granule == "4K" else 16384), granule, 52, 52, lpa2=True, e2h=e2h)
        t.map(0x1_0000_0000, 32 * MIB, 0xF_FFFF_FE00_0000, Prot.RW)
        t.map((1 << 52) - 32 * MIB, 32 * MIB, 0xC_0000_4000_0000, Prot.RX)
        return t
    return build


def _s2_lpa2() -> KvmPgtable:
    t = Stage2Pgtable(_pool(4096), "4K", 52, 52, start_level=0, lpa2=True)
    t.map(0x4000_0000, 2 * MIB, 0x4000_0000, Prot.RW)
    t.map((1 << 52) - 2 * MIB, 2 * MIB, 0xF_0000_0020_0000, Prot.RW)
    return t


CASES = {"s1-4K-lpa2-level-1": _s1_lpa2("4K", False), "s1-4K-lpa2-hVHE": _s1_lpa2("4K", True),
         "s1-16K-lpa2-hVHE": _s1_lpa2("16K", True), "s2-4K-lpa2-16-concatenated": _s2_lpa2,
         "s2-4K-43bit-16-concatenated": _s2_concat, "s1-4K-40bit": _s1_4k_40, "s1-16K-DS0-SH": _s1_16k_ds0,
         "s1-64K-PA52": _s64k(1), "s2-64K-PA52": _s64k(2)}


@pytest.mark.parametrize("name", list(CASES))
def test_verify_handmade(name: str) -> None:
    snap = from_tables(CASES[name]())
    report = verify(snap, _start)
    (r,) = report.regimes
    assert r.checked > 20 and r.ranges >= 1
    assert report.mismatched == 0, report.text()


def test_cli_verify_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.json"
    from_tables(_s2_concat()).save(path)
    assert main(["attach", str(path), "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checked"] > 0 and out["mismatched"] == 0
    assert out["verify"]["regimes"][0]["regime"] == "stage2"


def test_verify_catches_a_wrong_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AT check itself (the check engine over the replayed tables) catches a wrong model."""
    real = Subject.predict_each

    def off_by_a_page(self: Subject, addrs: object, accesses: object, **kw: object) -> tuple[BatchResult, ...]:
        return tuple(dataclasses.replace(res, pa=res.pa ^ np.uint64(1 << 12))
                     for res in real(self, addrs, accesses, **kw))  # type: ignore[arg-type]

    monkeypatch.setattr(Subject, "predict_each", off_by_a_page)
    report = verify(from_tables(_s1_4k_40()), _start)
    (r,) = report.regimes
    assert r.check.mismatched > 0 and r.relocation_mismatched == 0
    assert not report.ok


def test_verify_catches_a_wrong_relocation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The model's walk of the original snapshot is what the replay is held to: a relocation that
    points one table descriptor (the first rewritten: the deepest, to a level-3 table) at the
    wrong page is caught, and the payload is then not run on the copy."""
    real = attach._with_table_address
    calls: list[int] = []

    def wrong_page(pte: int, pa: int, geom: Geometry) -> int:
        calls.append(pa)
        return real(pte, pa + (64 * geom.granule.size if len(calls) == 1 else 0), geom)

    monkeypatch.setattr(attach, "_with_table_address", wrong_page)
    path = tmp_path / "s.json"
    from_tables(_s1_4k_40()).save(path)
    report = verify(from_tables(_s1_4k_40()), _start)
    (r,) = report.regimes
    assert r.relocation_mismatched > 0 and r.check.checked == 0 and not report.ok
    calls.clear()
    assert main(["attach", str(path), "--verify"]) == 1


def test_verify_refuses_when_no_room_for_the_payload() -> None:
    t = HypPgtable(_pool(4096), "4K", 39)
    t.map(0x0800_0000, 32 * MIB, 0x0800_0000, Prot.RW | Prot.DEVICE)  # the UART's address taken
    with pytest.raises(VerifyRefused, match="uart"):
        verify(from_tables(t), _start)


def test_attach_refused_connection_is_machinery_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attach", "127.0.0.1:1"]) == 3
    assert "connecting gdb" in capsys.readouterr().err


@pytest.mark.parametrize("e2h", [False, True], ids=["el2", "hVHE"])
def test_verify_replays_sctlr_el2_wxn(e2h: bool) -> None:
    """A snapshot taken with SCTLR_EL2.WXN = 1 (as Linux runs) is replayed with WXN = 1: the
    payload runs under it (its code r-x, its data rw-), SCTLR_EL2 read back from the MMU has it,
    and the model predicts with it. ``AT S1E2R/W`` has no fetch form, so the MMU confirms the
    replay's configuration and the read/write answers; execute permission stays the model's."""
    t = HypPgtable(_pool(4096), "4K", 48, 48, e2h=e2h)
    t.map(0x1_0000_0000, 2 * MIB, 0x5000_0000, Prot.RW)
    t.map(0x1_0020_0000, 64 * 1024, 0x5020_0000, Prot.RX)
    snap = from_tables(t)
    snap.registers["SCTLR_EL2"] |= SCTLR_WXN.mask
    report = verify(snap, _start)
    (r,) = report.regimes
    assert r.wxn and r.sctlr_el2 is not None and SCTLR_WXN.get(r.sctlr_el2) == 1
    assert r.checked > 20 and report.mismatched == 0, report.text()
    assert report.to_json()["regimes"][0]["wxn"] is True


class _Watched:
    """A replay target that reads SCTLR_EL2 back when verify closes it (after its uninstall)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sctlr_after: int | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self.target, name)

    def close(self) -> None:
        self.sctlr_after = self.target.sysreg("SCTLR_EL2")
        self.target.close()


def test_replayed_wxn_does_not_outlive_its_install() -> None:
    """The firmware's uninstall clears SCTLR_EL2.WXN with M, C and I: a later install without it
    does not inherit the replay's."""
    t = HypPgtable(_pool(4096), "4K", 48, 48)
    t.map(0x1_0000_0000, 2 * MIB, 0x5000_0000, Prot.RW)
    snap = from_tables(t)
    snap.registers["SCTLR_EL2"] |= SCTLR_WXN.mask
    seen: list[_Watched] = []

    def start(layout: Layout) -> _Watched:
        seen.append(_Watched(_start(layout)))
        return seen[-1]

    report = verify(snap, start)
    assert report.mismatched == 0 and SCTLR_WXN.get(report.regimes[0].sctlr_el2 or 0) == 1
    (w,) = seen
    assert w.sctlr_after is not None and SCTLR_WXN.get(w.sctlr_after) == 0 and w.sctlr_after & 1 == 0


def _two_ranges(uart_taken: bool) -> tuple[KvmPgtable, KvmPgtable]:
    """hVHE tables for both ranges of EL2&0 in one pool: TTBR0's (the UART's address mapped when
    ``uart_taken``: no room to splice the payload in) and TTBR1's."""
    pool = _pool(4096)
    t0 = HypPgtable(pool, "4K", 48, 48, e2h=True)
    t0.map(0x1_0000_0000, 2 * MIB, 0x5000_0000, Prot.RW)
    if uart_taken:
        t0.map(0x0800_0000, 32 * MIB, 0x0800_0000, Prot.RW | Prot.DEVICE)
    t1 = HypPgtable(pool, "4K", 48, 48, e2h=True)
    t1.map(0x1000, 4096, 0x5010_0000, Prot.RX)  # the upper range's first page
    t1.map((1 << 48) - 2 * MIB, 2 * MIB, 0x5020_0000, Prot.RW)  # and its last block
    t1.map(0x8000_0000, 64 * 1024, 0x5040_0000, Prot.R)
    return t0, t1


def _with_ttbr1(snap_table: KvmPgtable, upper: KvmPgtable) -> dict[str, int]:
    from harness.arch.registers import TCR_E2H_EPD1, ttbr_baddr

    assert upper.pgd is not None
    snap = from_tables(snap_table)
    regs = snap.registers
    regs["TCR_EL2"] &= ~TCR_E2H_EPD1.mask
    regs["TTBR1_EL2"] = ttbr_baddr(upper.pgd, upper.geom)
    return regs


@pytest.mark.parametrize("uart_taken", [False, True], ids=["room", "no-room"])
def test_verify_both_ranges_of_el2_and_0(uart_taken: bool) -> None:
    """Both ranges of EL2&0 replay: TTBR1's always through TTBR1_EL2 at its own addresses (the
    payload in TTBR0_EL2, a table of its own), TTBR0's by the splice when there is room, else
    through TTBR1_EL2 too, at VA + 2**64 - 2**48: 0 mismatches, fetches included."""
    t0, t1 = _two_ranges(uart_taken)
    snap = from_tables(t0)
    regs = _with_ttbr1(t0, t1)
    snap.cpus[0] = regs
    names = [r.name for r in snap.regimes()]
    assert names == ["el2&0", "el2&0:ttbr1"], names
    report = verify(snap, _start)
    assert report.mismatched == 0, report.text()
    by = {r.regime: r for r in report.regimes}
    upper = (1 << 64) - (1 << 48)
    assert (by["el2&0:ttbr1"].through, by["el2&0:ttbr1"].va_offset) == ("TTBR1_EL2", upper)
    want0 = ("TTBR1_EL2", upper) if uart_taken else ("TTBR0_EL2", 0)
    assert (by["el2&0"].through, by["el2&0"].va_offset) == want0
    assert all(r.checked > 20 for r in report.regimes)
    assert by["el2&0:ttbr1"].to_json()["fetch"]["probes"] > 0
    assert f"in TTBR1_EL2 at VA + {upper:#x}" in report.text()


def _leaf_pa(t: KvmPgtable, va: int) -> int:
    from harness.core.translate import translate

    assert t.pgd is not None
    return translate(t.mem, t.geom, t.pgd, va).steps[-1].desc_pa


@pytest.mark.parametrize("e2h", [False, True], ids=["el2", "hVHE"])
def test_verify_hardware_access_flag_and_dirty_state(e2h: bool) -> None:
    """TCR_EL2.HA and HD (FEAT_HAFDBS, which Linux sets): a leaf with AF = 0 takes no Access flag
    fault with HA, a write to a read-only leaf with DBM = 1 is permitted with HD. The replay
    programs the snapshot's TCR_EL2 and the model predicts with it: 0 mismatches with both set
    and with both clear, and the two predictions differ where they must."""
    from harness.arch.descriptors import AF, S1_DBM
    from harness.arch.registers import TCR_E2H_HA, TCR_E2H_HD, TCR_EL2_HA, TCR_EL2_HD
    from harness.check.attach import walk
    from harness.core.translate import WRITE

    t = HypPgtable(_pool(4096), "4K", 48, 48, e2h=e2h)
    t.map(0x1_0000_0000, 64 * 1024, 0x5000_0000, Prot.R)
    t.map(0x1_0001_0000, 64 * 1024, 0x5001_0000, Prot.RW)
    clean, old = 0x1_0000_3000, 0x1_0001_5000
    t.mem.write64(_leaf_pa(t, clean), t.mem.read64(_leaf_pa(t, clean)) | S1_DBM.mask)  # writable-clean
    t.mem.write64(_leaf_pa(t, old), t.mem.read64(_leaf_pa(t, old)) & ~AF.mask)  # old
    ha, hd = (TCR_E2H_HA, TCR_E2H_HD) if e2h else (TCR_EL2_HA, TCR_EL2_HD)
    outcomes = {}
    for on in (True, False):
        snap = from_tables(t)
        if on:
            snap.registers["TCR_EL2"] |= ha.mask | hd.mask
        (regime,) = snap.regimes()
        assert (regime.ha, regime.hd) == (on, on)
        outcomes[on] = (walk(snap, regime, clean, WRITE).fault, walk(snap, regime, old).fault)
        report = verify(snap, _start)
        assert report.mismatched == 0 and report.checked > 20, report.text()
    assert outcomes[True] == (None, None)
    assert outcomes[False][0] is not None and outcomes[False][1] is not None
