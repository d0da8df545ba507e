"""Execute permission on the MMU: instruction-fetch probes (marker ``hw``).

``AT`` has no fetch form, so XN, PXN/UXN, XNTable/PXNTable, SCTLR_EL2.WXN and stage-2 XN[54:53]
are only seen by branching to an address. Each case below is a 4K page with a hand-written leaf
(independent of the model's map code): the MMU's outcome is asserted against the Arm ARM rule,
and the same table is then checked against the model's EXEC walk by ``check_exec``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest
from handmade import HVHE_AP_RO, HVHE_AP_RW, HandTable, s1_hvhe_identity, s1_identity, s2_identity

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Granule, Stage
from harness.arch.registers import (
    ESR_EC,
    HCR_DC,
    HPFAR_FIPA,
    ISS_DFSC,
    SCTLR_WXN,
    ExceptionClass,
    FaultKind,
    MairIndex,
    Stage1Regs,
    fault_status,
)
from harness.check.engine import CheckReport, Subject, check_exec, check_subject, subject_of_built
from harness.check.scenario import MapSpec, Scenario, build
from harness.core import batch, translate
from harness.core.prot import Prot
from harness.core.translate import DEFAULT_MAIR, EXEC, PERM_X
from harness.target import mailbox as mbx
from harness.target.layout import LAYOUT
from harness.target.target import Target

pytestmark = pytest.mark.hw

PAGES = LAYOUT.scratch_base + (32 << 20)  # one 2 MiB block's worth of 4K pages, each its own case
TABLE_ATTR = LAYOUT.scratch_base + (36 << 20)  # a 2 MiB region whose level-2 table descriptor is edited
PAGE = 0x1000
RUNS = "runs"

# hVHE AP[2:1] with EL0 access (AP[1] = 1): EL0 read/write, and read-only at both
HVHE_AP_EL0_RW = 0b01
HVHE_AP_EL0_RO = 0b11


@dataclass(frozen=True)
class Case:
    name: str
    attrs: int  # the leaf's attribute bits
    outcome: str | FaultKind  # RUNS, or the fault at the leaf (level 3)
    table_bits: int = 0  # bits set in the level-2 table descriptor above the leaf (own 2 MiB region)


def s1_attrs(ap: int, xn: int = 0, pxn: int = 0, af: int = 1, device: bool = False) -> int:
    idx = MairIndex.DEVICE_nGnRE if device else MairIndex.NORMAL
    return d.encode_fields(Stage.S1, AttrIndx=int(idx), AP=ap, SH=int(d.Shareability.INNER), AF=af, XN=xn, PXN=pxn)


def s2_attrs(xn: int, s2ap: int = int(d.S2AP.RW), af: int = 1, device: bool = False) -> int:
    mem = d.S2MemAttr.DEVICE_nGnRE if device else d.S2MemAttr.NORMAL_WB
    return d.encode_fields(Stage.S2, MemAttr=int(mem), S2AP=s2ap, SH=int(d.Shareability.INNER), AF=af, XN=xn)


def _place(tab: HandTable, cases: list[Case]) -> list[int]:
    """One page per case (identity): leaves written by hand; a case with table bits gets its own
    2 MiB region, the bits set in its level-2 table descriptor."""
    g = tab.geom.granule
    tab.map(PAGES, len(cases) * PAGE, Prot.RW)
    addrs = []
    for i, c in enumerate(cases):
        va = TABLE_ATTR + i * (2 << 20) if c.table_bits else PAGES + i * PAGE
        if c.table_bits:
            tab.map(va, PAGE, Prot.RW)
            entry = tab.entry_pa(va, 2)
            tab.pool.write64(entry, tab.pool.read64(entry) | c.table_bits)
        tab.pool.write64(tab.entry_pa(va, 3), d.leaf_pte(va, c.attrs, 3, g))
        addrs.append(va + 0x100 + mbx.FETCH_STUB_SIZE * i)
    return addrs


def _subject(tab: HandTable, name: str, geom: Geometry, regs: Stage1Regs | None = None) -> Subject:
    if geom.stage is Stage.S1:
        r = regs or tab.s1_regs()
        return Subject(name, geom, tab.pool, tab.pgd, r, tab.image(), r.mair_el2,
                       tuple((x.base, x.size) for x in LAYOUT.stage1_regions()))
    return Subject(name, geom, tab.pool, tab.pgd, tab.s2_regs(), tab.image(), DEFAULT_MAIR,
                   tuple((x.base, x.size) for x in LAYOUT.stage2_regions()))


def _fetch_planted(target: Target, addrs: list[int], stage: Stage) -> np.ndarray:
    """Plant ``bti c; movz x0, #tag; ret`` at each (identity) address, fetch, restore."""
    before = [target.read_pa(a, mbx.FETCH_STUB_SIZE) for a in addrs]
    for i, a in enumerate(addrs):
        target.write_pa(a, mbx.fetch_stub(0x4000 + i))
    try:
        return target.fetch(addrs, stage)
    finally:
        for a, b in zip(addrs, before, strict=True):
            target.write_pa(a, b)


def _assert_outcomes(rec: np.ndarray, cases: list[Case], addrs: list[int], stage: Stage) -> None:
    ec = ExceptionClass.IABT_SAME if stage is Stage.S1 else ExceptionClass.IABT_LOWER
    for i, (c, r, a) in enumerate(zip(cases, rec, addrs, strict=True)):
        if c.outcome == RUNS:
            assert r["completed"] and int(r["value"]) == 0x4000 + i, f"{c.name}: {r}"
            continue
        assert isinstance(c.outcome, FaultKind)
        esr = int(r["esr"])
        assert r["status"] == mbx.AccessStatus.FAULT, f"{c.name}: completed, expected {c.outcome.name}"
        assert ESR_EC.get(esr) == ec, f"{c.name}: ESR {esr:#x}"
        assert ISS_DFSC.get(esr) == fault_status(c.outcome, 3), f"{c.name}: ESR {esr:#x}"
        assert int(r["far"]) == a
        if stage is Stage.S2:
            assert HPFAR_FIPA.get(int(r["hpfar"])) == a >> 12


def _run(target: Target, tab: HandTable, subject: Subject, cases: list[Case], addrs: list[int]) -> CheckReport:
    """The MMU's outcome for each case, then the model's EXEC walk checked against it."""
    target.install(subject.regs, subject.image)
    try:
        _assert_outcomes(_fetch_planted(target, addrs, subject.stage), cases, addrs, subject.stage)
    finally:
        target.uninstall()
    pred = subject.predict(np.array(addrs, dtype=np.uint64), EXEC, wxn=bool(
        isinstance(subject.regs, Stage1Regs) and subject.regs.sctlr_el2_set & SCTLR_WXN.mask))
    model = ["runs" if ok else FaultKind(int(f)).name for ok, f in zip(pred.ok, pred.fault, strict=True)]
    assert model == [c.outcome if c.outcome == RUNS else c.outcome.name for c in cases]  # type: ignore[union-attr]
    rep = check_subject(subject, target, np.array(addrs, dtype=np.uint64), np.random.default_rng(1), access=True)
    assert rep.ok, rep.text()
    assert rep.probes.get("fetch") == len(cases), rep.probes
    return rep


# -- stage 1, EL2 regime (E2H = 0) -------------------------------------------------------------------

RW, RO = int(d.S1AP.RW), int(d.S1AP.RO)
GP = 1 << 50  # stage-1 Guarded Page (FEAT_BTI), bit 50: not a permission, but it governs a blr's target
S1_CASES = [
    Case("rw, XN = 0", s1_attrs(RW), RUNS),
    Case("rw, XN = 1", s1_attrs(RW, xn=1), FaultKind.PERMISSION),
    Case("ro, XN = 0", s1_attrs(RO), RUNS),
    Case("AF = 0 before XN", s1_attrs(RW, xn=1, af=0), FaultKind.ACCESS_FLAG),
    Case("AF = 0, executable", s1_attrs(RO, af=0), FaultKind.ACCESS_FLAG),
    Case("PXN = 1 is RES0 at EL2 (E2H = 0)", s1_attrs(RO, pxn=1), RUNS),
    Case("Device, XN = 0: fetched as Normal non-cacheable", s1_attrs(RO, device=True), RUNS),
    Case("Device, XN = 1", s1_attrs(RO, xn=1, device=True), FaultKind.PERMISSION),
    Case("XNTable above", s1_attrs(RO), FaultKind.PERMISSION, d.XN_TABLE.mask),
    Case("PXNTable above is RES0 (E2H = 0)", s1_attrs(RO), RUNS, d.PXN_TABLE.mask),
    Case("GP = 1 (guarded page): the stub's bti c is a landing pad", s1_attrs(RO) | GP, RUNS),
]


def test_stage1_execute_never(target: Target) -> None:
    tab = s1_identity(LAYOUT, "4K")
    addrs = _place(tab, S1_CASES)
    _run(target, tab, _subject(tab, "exec-s1", tab.geom), S1_CASES, addrs)


def test_stage1_wxn(target: Target) -> None:
    """SCTLR_EL2.WXN = 1: writable at EL2 means execute-never at EL2, whatever XN says; read-only
    stays executable (the firmware's own code is r-x, its data rw-, so it runs under WXN)."""
    cases = [
        Case("rw, XN = 0, WXN", s1_attrs(RW), FaultKind.PERMISSION),
        Case("ro, XN = 0, WXN", s1_attrs(RO), RUNS),
        Case("rw, AF = 0, WXN", s1_attrs(RW, af=0), FaultKind.ACCESS_FLAG),
    ]
    tab = s1_identity(LAYOUT, "4K")
    addrs = _place(tab, cases)
    regs = tab.s1_regs()
    regs = replace(regs, sctlr_el2_set=regs.sctlr_el2_set | SCTLR_WXN.mask)
    _run(target, tab, _subject(tab, "exec-s1-wxn", tab.geom, regs), cases, addrs)


# -- stage 1, EL2&0 regime (E2H = 1, hVHE) -----------------------------------------------------------

HVHE_CASES = [
    Case("UXN = 1 only: EL2 still executes", s1_attrs(HVHE_AP_RW, xn=1), RUNS),
    Case("PXN = 1", s1_attrs(HVHE_AP_RW, pxn=1), FaultKind.PERMISSION),
    Case("ro, UXN = 1 (6.12's hyp rodata)", s1_attrs(HVHE_AP_RO, xn=1), RUNS),
    Case("EL0-writable implies PXN", s1_attrs(HVHE_AP_EL0_RW), FaultKind.PERMISSION),
    Case("EL0 read-only, PXN = 0", s1_attrs(HVHE_AP_EL0_RO), RUNS),
    Case("AF = 0 before PXN", s1_attrs(HVHE_AP_RW, pxn=1, af=0), FaultKind.ACCESS_FLAG),
    Case("PXNTable above", s1_attrs(HVHE_AP_RO), FaultKind.PERMISSION, d.PXN_TABLE.mask),
    Case("UXNTable above: EL0 only", s1_attrs(HVHE_AP_RO), RUNS, d.XN_TABLE.mask),
]


def test_hvhe_fetches_obey_pxn_not_uxn(target: Target) -> None:
    tab = s1_hvhe_identity(LAYOUT, "4K", 48)
    addrs = _place(tab, HVHE_CASES)
    geom = Geometry.create(Stage.S1, Granule.K4, 48, 48, e2h=True)
    _run(target, tab, _subject(tab, "exec-hvhe", geom), HVHE_CASES, addrs)


# -- stage 2: XN[54:53] for EL1 fetches (FEAT_XNX) -----------------------------------------------------

S2_CASES = [
    Case("XN 0b00: EL1 and EL0 execute", s2_attrs(0b00), RUNS),
    Case("XN 0b01: EL0 only (PXN)", s2_attrs(0b01), FaultKind.PERMISSION),
    Case("XN 0b10: nobody", s2_attrs(0b10), FaultKind.PERMISSION),
    Case("XN 0b11: EL1 only (UXN)", s2_attrs(0b11), RUNS),
    Case("S2AP none, XN 0b00: execute-only", s2_attrs(0b00, s2ap=0), RUNS),
    Case("AF = 0 before XN", s2_attrs(0b10, af=0), FaultKind.ACCESS_FLAG),
    Case("Device, XN 0b00: fetched as Normal non-cacheable", s2_attrs(0b00, device=True), RUNS),
]


def test_stage2_xn_for_el1(target: Target) -> None:
    tab = s2_identity(LAYOUT, "4K")
    addrs = _place(tab, S2_CASES)
    _run(target, tab, _subject(tab, "exec-s2", tab.geom), S2_CASES, addrs)


def test_stage2_xn_for_el1_without_hcr_dc(target: Target) -> None:
    """HCR_EL2.DC = 0: EL1's instruction fetches with its MMU off are still to Normal memory
    (SCTLR_EL1.I decides only their cacheability), so stage 2's XN[54:53] alone decides, as with
    DC = 1 (the MMU only: the model's stage-2 attributes assume DC = 1, so no AT comparison)."""
    tab = s2_identity(LAYOUT, "4K")
    addrs = _place(tab, S2_CASES)
    regs = tab.s2_regs()
    target.install(replace(regs, hcr_el2_set=regs.hcr_el2_set & ~HCR_DC.mask), tab.image())
    assert not target.sysreg("HCR_EL2") & HCR_DC.mask
    _assert_outcomes(_fetch_planted(target, addrs, Stage.S2), S2_CASES, addrs, Stage.S2)


# -- tables the model built ------------------------------------------------------------------------

X, RWX = Prot.R | Prot.X, Prot.RW | Prot.X


@pytest.mark.parametrize(("stage", "granule", "e2h"), [(Stage.S1, Granule.K4, False), (Stage.S1, Granule.K16, True),
                                                        (Stage.S1, Granule.K64, False), (Stage.S2, Granule.K4, False),
                                                        (Stage.S2, Granule.K64, False)])
def test_model_built_tables(target: Target, stage: Stage, granule: Granule, e2h: bool) -> None:
    base = LAYOUT.scratch_base
    maps = (MapSpec(base, 4 << 20, base, X), MapSpec(base + (4 << 20), 2 << 20, base + (4 << 20), Prot.RW),
            MapSpec(base + (8 << 20), 1 << 20, base + (8 << 20), RWX if stage is Stage.S2 else Prot.R),
            MapSpec(base + (10 << 20), 256 << 10, base + (10 << 20), Prot.R | Prot.DEVICE))
    sc = Scenario("exec-model", stage, granule, 48 if e2h else 40, maps=maps, access=True, e2h=e2h)
    built = build(sc, LAYOUT)
    subject = subject_of_built(built)
    rep = check_subject(subject, target, np.arange(base, base + (11 << 20), 0x800, dtype=np.uint64) + 0x10,
                        np.random.default_rng(3), access=True)
    assert rep.ok, rep.text()
    assert rep.probes["fetch"] >= 1000
    pred = subject.predict(np.arange(base, base + (11 << 20), 0x800, dtype=np.uint64), EXEC)
    assert pred.ok.any() and (~pred.ok).any()  # both outcomes were there to be checked


# -- a model bug the check must catch --------------------------------------------------------------


def test_planted_xn_ignored_is_caught(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that ignores XN (stage 1) / XN[54:53] (stage 2) predicts fetches that complete;
    the MMU takes instruction aborts, and check_exec reports them as mismatches."""
    tab1 = s1_identity(LAYOUT, "4K")
    addrs1 = _place(tab1, S1_CASES)
    tab2 = s2_identity(LAYOUT, "4K")
    addrs2 = _place(tab2, S2_CASES)
    real_s1, real_s2 = translate.s1_perms, translate.s2_perms

    def s1_no_xn(desc, restrictions, e2h, wxn=False, hd=False):  # type: ignore[no-untyped-def]
        return real_s1(desc, restrictions, e2h, wxn, hd) | PERM_X

    def s2_no_xn(desc):  # type: ignore[no-untyped-def]
        return real_s2(desc) | PERM_X

    monkeypatch.setattr(translate, "s1_perms", s1_no_xn)
    monkeypatch.setattr(batch, "s1_perms", s1_no_xn)
    monkeypatch.setattr(translate, "s2_perms", s2_no_xn)
    monkeypatch.setattr(batch, "_S2_PERMS", batch._S2_PERMS | np.uint8(PERM_X))
    for tab, addrs, cases in ((tab1, addrs1, S1_CASES), (tab2, addrs2, S2_CASES)):
        subject = _subject(tab, "planted-xn-ignored", tab.geom)
        rep = check_subject(subject, target, np.array(addrs, dtype=np.uint64), np.random.default_rng(1),
                            access=True)
        faults = sum(c.outcome is FaultKind.PERMISSION for c in cases)
        fetch_bad = [m for m in rep.mismatches if m.probe == "fetch"]
        assert len(fetch_bad) == faults, rep.text()
        assert all("completes" in m.expected and "IABT" in m.actual for m in fetch_bad), rep.text()


def test_check_exec_without_candidates_does_nothing(target: Target) -> None:
    """Addresses whose leaf lies outside scratch RAM (the firmware's code) are never fetched."""
    tab = s1_identity(LAYOUT, "4K")
    subject = _subject(tab, "no-candidates", tab.geom)
    subject = replace(subject, no_access=())
    target.install(subject.regs, subject.image)
    rep = CheckReport("no-candidates", "", "")
    check_exec(rep, target, subject, np.array([LAYOUT.code + 0x40, LAYOUT.data], dtype=np.uint64),
               np.random.default_rng(0))
    assert rep.probes == {} and rep.matched == 0


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_redirected_executable_page_is_caught_by_its_tag(target: Target, stage: Stage) -> None:
    """A leaf corrupted on the target side only (the image says one PA, the model another): the
    fetch completes, but returns the tag of the wrong PA's stub (or runs zeros): a mismatch."""
    attrs = s1_attrs(RO) if stage is Stage.S1 else s2_attrs(0b00)
    tabs = []
    for _ in range(2):  # the model's (intact) and the MMU's (corrupted): allocated alike
        tab = s1_identity(LAYOUT, "4K") if stage is Stage.S1 else s2_identity(LAYOUT, "4K")
        tab.map(PAGES, 0x10000, Prot.RW)
        for va in range(PAGES, PAGES + 16 * PAGE, PAGE):
            tab.pool.write64(tab.entry_pa(va, 3), d.leaf_pte(va, attrs, 3, tab.geom.granule))
        tabs.append(tab)
    model, mmu = tabs
    assert model.pgd == mmu.pgd
    mmu.pool.write64(mmu.entry_pa(PAGES + 3 * PAGE, 3), d.leaf_pte(PAGES + 5 * PAGE, attrs, 3, mmu.geom.granule))
    subject = replace(_subject(model, "redirect", model.geom), image=mmu.image())
    target.write_pa(PAGES, bytes(0x10000))
    addrs = np.array([PAGES + i * PAGE + 0x80 for i in range(16)], dtype=np.uint64)
    rep = check_subject(subject, target, addrs, np.random.default_rng(2), access=True)
    bad = [m for m in rep.mismatches if m.probe == "fetch"]
    assert [m.address for m in bad] == [PAGES + 3 * PAGE + 0x80], rep.text()
    assert "ran from another PA" in bad[0].actual


# -- Debian 12's QEMU 7.2 ------------------------------------------------------------------------------


@pytest.fixture
def qemu_7_2(legacy_qemu: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    monkeypatch.setenv("HARNESS_QEMU", legacy_qemu)
    with Target.start() as t:
        assert t.qemu_version < (8, 0, 0)
        yield t


def test_execute_permission_on_qemu_7_2(qemu_7_2: Target) -> None:
    """No fetch divergence on 7.2.22 either: every stage-1, hVHE and stage-2 case above, measured."""
    tab = s1_identity(LAYOUT, "4K")
    addrs = _place(tab, S1_CASES)  # before the subject: its image is the pool's bytes now
    _run(qemu_7_2, tab, _subject(tab, "exec-s1", tab.geom), S1_CASES, addrs)
    tab = s1_hvhe_identity(LAYOUT, "4K", 48)
    addrs = _place(tab, HVHE_CASES)
    _run(qemu_7_2, tab, _subject(tab, "exec-hvhe", Geometry.create(Stage.S1, Granule.K4, 48, 48, e2h=True)),
         HVHE_CASES, addrs)
    tab = s2_identity(LAYOUT, "4K")
    addrs = _place(tab, S2_CASES)
    _run(qemu_7_2, tab, _subject(tab, "exec-s2", tab.geom), S2_CASES, addrs)
