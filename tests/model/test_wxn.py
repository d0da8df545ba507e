"""SCTLR_EL2.WXN in the model's walk (scalar and batch), on hand-encoded stage-1 tables.

Arm ARM ``AArch64.S1DirectBasePermissions``: ``wxn = WXN AND w AND x`` for the accessing EL's
base permissions (EL2's here, PAN = 0), and ``AArch64.S1ComputePermissions`` then makes the
location execute-never. So with WXN = 1 memory writable at EL2 is never executable at EL2, in the
EL2 regime (E2H = 0) and in the EL2&0 regime (E2H = 1) alike; read-only memory keeps what XN/PXN
say. In the EL2&0 regime memory writable at EL0 (AP = 0b01) is EL2-execute-never already,
whatever WXN. Stage 2 has no WXN.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.arch.geometry import Geometry
from harness.arch.regimes import LiveRegime, regimes_from_registers
from harness.arch.registers import SCTLR_WXN, FaultKind
from harness.core.batch import translate_batch
from harness.core.memory import PagePool
from harness.core.translate import (
    EXEC,
    PERM_R,
    PERM_W,
    PERM_X,
    READ,
    WRITE,
    translate,
    wxn_executable,
)

BASE = 0x4000_0000
PAGE = 0b11
AF = 1 << 10
AP_RO = 0b10 << 6
AP_EL0_RW = 0b01 << 6
PXN = 1 << 53
XN = UXN = 1 << 54
RWX, RW, RX = PERM_R | PERM_W | PERM_X, PERM_R | PERM_W, PERM_R | PERM_X
VA = 0x12_3456_7000


def one_page(geom: Geometry, leaf_bits: int, table_bits: int = 0) -> PagePool:
    """Tables mapping VA to 0x8000_0000 with one 4K page carrying ``leaf_bits``."""
    pool = PagePool(BASE, 8 * 4096, 4096)
    table = BASE
    for i, level in enumerate(range(geom.start_level, 3)):
        nxt = BASE + (i + 1) * 4096
        pool.write64(table + 8 * geom.index(level, VA), nxt | 0b11 | table_bits)
        table = nxt
    pool.write64(table + 8 * geom.index(3, VA), 0x8000_0000 | PAGE | AF | (0b11 << 8) | leaf_bits)
    return pool


@pytest.mark.parametrize(
    ("e2h", "bits", "table_bits", "perms_wxn0", "perms_wxn1"),
    [
        # EL2 regime (E2H = 0): bit 54 is XN.
        (False, 0, 0, RWX, RW),  # writable: WXN takes execution away
        (False, AP_RO, 0, RX, RX),  # read-only: untouched
        (False, 0, 1 << 62, RX, RX),  # APTable[1] made it read-only: untouched
        (False, XN, 0, RW, RW),
        # EL2&0 regime (E2H = 1): PXN (53) is EL2's execute-never, bit 54 is UXN (EL0 only).
        (True, 0, 0, RWX, RW),
        (True, UXN, 0, RWX, RW),  # KVM 6.12's hVHE "XN": UXN only, so only WXN saves a RW page
        (True, AP_RO | UXN, 0, RX, RX),  # ... and read-only data stays EL2-executable
        (True, AP_RO | UXN | PXN, 0, PERM_R, PERM_R),  # the upstream fix: XN = UXN | PXN
        (True, AP_EL0_RW, 0, RW, RW),  # EL0-writable: EL2-execute-never without WXN
        (True, AP_EL0_RW, 1 << 61, RWX, RW),  # APTable[0]: not EL0-accessible; writable at EL2
        (True, 0, 1 << 62, RX, RX),
    ],
)
@pytest.mark.parametrize("granule", ["4K"])
def test_wxn_permissions(granule: str, e2h: bool, bits: int, table_bits: int, perms_wxn0: int,
                         perms_wxn1: int) -> None:
    geom = Geometry.create(1, granule, 39, 40, e2h=e2h)
    pool = one_page(geom, bits, table_bits)
    for wxn, perms in ((False, perms_wxn0), (True, perms_wxn1)):
        t = translate(pool, geom, BASE, VA, wxn=wxn)
        assert t.perms == perms, t.explain()
        for access, perm in ((READ, PERM_R), (WRITE, PERM_W), (EXEC, PERM_X)):
            r = translate(pool, geom, BASE, VA, access, wxn=wxn)
            assert (r.fault is None) == bool(perms & perm), r.explain()
            if r.fault is not None:
                assert r.fault is FaultKind.PERMISSION and r.fault_level == 3
            res = translate_batch(pool.words(), pool.base, geom, BASE, np.array([VA], dtype=np.uint64),
                                  access, wxn=wxn)
            assert int(res.fault[0]) == (-1 if r.fault is None else r.fault.value)
            assert int(res.perms[0]) == (perms if r.ok else 0)


def test_wxn_fault_explains_itself() -> None:
    geom = Geometry.create(1, "4K", 39, 40)
    t = translate(one_page(geom, 0), geom, BASE, VA, EXEC, wxn=True)
    assert t.fault is FaultKind.PERMISSION
    assert "SCTLR_EL2.WXN" in t.note


def test_wxn_predicate_on_ints_and_arrays() -> None:
    assert [wxn_executable(x, w, True) for x, w in ((1, 1), (1, 0), (0, 0), (0, 1))] == [0, 1, 0, 0]
    assert [wxn_executable(x, w, False) for x, w in ((1, 1), (1, 0), (0, 0), (0, 1))] == [1, 1, 0, 0]
    x = np.array([1, 1, 0, 0], dtype=np.uint64)
    w = np.array([1, 0, 0, 1], dtype=np.uint64)
    assert wxn_executable(x, w, True).tolist() == [0, 1, 0, 0]


def test_stage2_has_no_wxn() -> None:
    geom = Geometry.create(2, "4K", 40, 40)
    pool = PagePool(BASE, 8 * 4096, 4096)
    with pytest.raises(ValueError, match="wxn"):
        translate(pool, geom, BASE, 0, wxn=True)
    with pytest.raises(ValueError, match="wxn"):
        translate_batch(pool.words(), pool.base, geom, BASE, np.zeros(1, dtype=np.uint64), wxn=True)


def test_live_regime_decodes_wxn_from_sctlr_el2() -> None:
    """Linux 6.12's SCTLR_EL2 (0xf8ed383d) has WXN set; the stage-2 regime has no WXN."""
    regs = {"SCTLR_EL2": 0xF8ED383D, "HCR_EL2": 0x30480080001, "TCR_EL2": 0x15001F5B5D53510,
            "TTBR0_EL2": 0x7F301001, "VTCR_EL2": 0x802D3590, "VTTBR_EL2": 0x7F709001,
            "MAIR_EL2": 0x40044FFFF, "ID_AA64MMFR0_EL1": 0x2100022200101126}  # protected, lpa2=off
    s1, s2 = regimes_from_registers(regs)
    assert SCTLR_WXN.get(regs["SCTLR_EL2"]) == 1
    assert s1.wxn and not s2.wxn
    off = regimes_from_registers({**regs, "SCTLR_EL2": regs["SCTLR_EL2"] & ~SCTLR_WXN.mask})
    assert not off[0].wxn
    assert isinstance(s1, LiveRegime)


DBM = 1 << 51


@pytest.mark.parametrize("e2h", [False, True])
@pytest.mark.parametrize(
    ("bits", "table_bits", "af", "ha", "hd", "read_ok", "write_ok", "perms"),
    [
        (AP_RO | DBM, 0, True, False, False, True, False, RX),  # DBM ignored without HD
        (AP_RO | DBM, 0, True, True, True, True, True, RWX),  # writable-clean: a write is permitted
        (AP_RO | DBM, 1 << 62, True, True, True, True, False, RX),  # APTable[1] still forbids it
        (AP_RO, 0, True, True, True, True, False, RX),  # no DBM: read-only
        (0, 0, False, False, False, False, False, None),  # AF = 0: Access flag fault
        (0, 0, False, True, False, True, True, RWX),  # with HA the MMU sets AF
    ],
)
def test_hardware_af_and_dirty_state(e2h: bool, bits: int, table_bits: int, af: bool, ha: bool, hd: bool,
                                     read_ok: bool, write_ok: bool, perms: int | None) -> None:
    """FEAT_HAFDBS in the walk, scalar and batch alike (TCR.HA, TCR.HD)."""
    geom = Geometry.create(1, "4K", 39, 40, e2h=e2h)
    pool = one_page(geom, bits, table_bits)
    if not af:
        leaf = translate(pool, geom, BASE, VA).steps[-1].desc_pa
        pool.write64(leaf, pool.read64(leaf) & ~AF)
    for access, ok in ((READ, read_ok), (WRITE, write_ok)):
        t = translate(pool, geom, BASE, VA, access, ha=ha, hd=hd)
        assert t.ok == ok, t.explain()
        if not ok:
            assert t.fault is (FaultKind.ACCESS_FLAG if not af and not ha else FaultKind.PERMISSION)
        res = translate_batch(pool.words(), pool.base, geom, BASE, np.array([VA], dtype=np.uint64), access,
                              ha=ha, hd=hd)
        assert int(res.fault[0]) == (-1 if t.fault is None else t.fault.value)
    if perms is not None:
        assert translate(pool, geom, BASE, VA, ha=ha, hd=hd).perms == perms


def test_writable_clean_stays_executable_under_wxn() -> None:
    """Reads and fetches see AP[2] as it is: WXN does not take a writable-clean page's execution."""
    geom = Geometry.create(1, "4K", 39, 40)
    pool = one_page(geom, AP_RO | DBM)
    assert translate(pool, geom, BASE, VA, EXEC, wxn=True, ha=True, hd=True).ok


def test_hd_needs_ha_and_stage_1() -> None:
    pool = PagePool(BASE, 8 * 4096, 4096)
    with pytest.raises(ValueError, match="only with ha"):
        translate(pool, Geometry.create(1, "4K", 39, 40), BASE, 0, hd=True)
    with pytest.raises(ValueError, match="stage 2"):
        translate(pool, Geometry.create(2, "4K", 40, 40), BASE, 0, ha=True, hd=True)


AP_EL0_RO = 0b11 << 6
AP_TABLE0 = 1 << 61  # APTable[0]: no EL0 access below (EL2&0)
AP_TABLE1 = 1 << 62  # APTable[1]: read-only below
UXN_TABLE = 1 << 60  # UXNTable (EL2&0)
NONE = 0


@pytest.mark.parametrize(
    ("bits", "table_bits", "wxn", "hd", "el0_perms", "el2_perms"),
    [
        (0, 0, False, False, PERM_X, RWX),  # AP = 0b00: EL2 only; EL0 may still execute (execute-only)
        (AP_EL0_RW, 0, False, False, RWX, RW),  # EL0 RW: EL2 may not execute it
        (AP_EL0_RW, 0, True, False, RW, RW),  # WXN: writable at EL0 is execute-never at EL0
        (AP_EL0_RO, 0, True, False, RX, RX),  # read-only at EL0: WXN leaves it executable
        (AP_EL0_RW | UXN, 0, False, False, RW, RW),
        (AP_EL0_RW, UXN_TABLE, False, False, RW, RW),  # UXNTable: EL0 only
        (AP_EL0_RW, PXN >> 53 << 59, False, False, RWX, RW),  # PXNTable: EL2 only
        (AP_EL0_RW, AP_TABLE0, False, False, PERM_X, RWX),  # APTable[0]: EL0 keeps execution only
        (AP_EL0_RW, AP_TABLE1, False, False, RX, RX),  # APTable[1]: read-only for both
        (AP_EL0_RO | DBM, 0, False, True, RWX, RWX),  # writable-clean at EL0 and EL2 (HD)
        (AP_EL0_RO | DBM, AP_TABLE1, False, True, RX, RX),
        (AP_RO | DBM, 0, False, True, PERM_X, RWX),  # not EL0-accessible: DBM gives EL0 nothing
    ],
)
def test_el0_permissions(bits: int, table_bits: int, wxn: bool, hd: bool, el0_perms: int, el2_perms: int) -> None:
    """EL0's view of an EL2&0 leaf (AT S1E0R/W; scalar and batch alike) beside EL2's."""
    geom = Geometry.create(1, "4K", 39, 40, e2h=True)
    pool = one_page(geom, bits, table_bits)
    kw = {"wxn": wxn, "ha": hd, "hd": hd}
    assert translate(pool, geom, BASE, VA, **kw).perms == el2_perms
    assert translate(pool, geom, BASE, VA, el0=True, **kw).perms == el0_perms
    for access, perm in ((READ, PERM_R), (WRITE, PERM_W), (EXEC, PERM_X)):
        t = translate(pool, geom, BASE, VA, access, el0=True, **kw)
        assert t.ok == bool(el0_perms & perm), t.explain()
        if not t.ok:
            assert t.fault is FaultKind.PERMISSION and t.fault_level == 3 and "at EL0" in t.note
        res = translate_batch(pool.words(), pool.base, geom, BASE, np.array([VA], dtype=np.uint64), access,
                              el0=True, **kw)
        assert int(res.fault[0]) == (-1 if t.fault is None else t.fault.value)
        assert int(res.perms[0]) == (el0_perms if t.ok else 0)


def test_el0_fault_says_why() -> None:
    geom = Geometry.create(1, "4K", 39, 40, e2h=True)
    assert "AP[1] = 0" in translate(one_page(geom, 0), geom, BASE, VA, el0=True).note
    assert "APTable[0]" in translate(one_page(geom, AP_EL0_RW, AP_TABLE0), geom, BASE, VA, el0=True).note
    assert "UXNTable" in translate(one_page(geom, AP_EL0_RW, UXN_TABLE), geom, BASE, VA, EXEC, el0=True).note


@pytest.mark.parametrize(("stage", "e2h"), [(1, False), (2, False)])
def test_el0_only_in_the_el2_0_regime(stage: int, e2h: bool) -> None:
    geom = Geometry.create(stage, "4K", 39 if stage == 1 else 40, 40, e2h=e2h)
    pool = PagePool(BASE, 8 * 4096, 4096)
    with pytest.raises(ValueError, match="el0"):
        translate(pool, geom, BASE, 0, el0=True)
    with pytest.raises(ValueError, match="el0"):
        translate_batch(pool.words(), pool.base, geom, BASE, np.zeros(1, dtype=np.uint64), el0=True)
