"""EL0's AT forms (AT S1E0R/W at EL2 with HCR_EL2.{E2H, TGE} = {1, 1}) in the EL2&0 regime, on the
MMU, against the model's EL0 view (``translate(..., el0=True)``): random raw tables with random
AP, UXN and table attributes, every PAR_EL1 compared (marker ``hw``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from handmade import HandTable, s1_hvhe_identity, s1_identity

from harness.arch import descriptors as d
from harness.arch.geometry import Stage
from harness.arch.registers import ESR_EC, ISS_DFSC, ExceptionClass, FaultKind, fault_status
from harness.check import divergences, rawtables
from harness.check.engine import check_subject
from harness.core.batch import BatchResult, expected_par_batch, par_compare_mask_batch, translate_batch
from harness.core.prot import Prot
from harness.core.translate import EXEC, READ, WRITE, Access, translate
from harness.target import mailbox as mbx
from harness.target.errors import RequestFailed
from harness.target.layout import LAYOUT
from harness.target.target import Target

pytestmark = pytest.mark.hw

TABLES = 24
PER_TABLE = 600


def _predict(raw: rawtables.RawTables, addrs: np.ndarray, access: Access, el0: bool,
             version: tuple[int, ...]) -> BatchResult:
    kw = divergences.qemu_semantics(version, raw.geom)
    return translate_batch(raw.pool.words(), raw.pool.base, raw.geom, raw.root, addrs, access, raw.mair,
                           el0=el0, **kw)


def test_el0_at_forms_match_the_model(target: Target) -> None:
    compared = differ = 0
    for i in range(TABLES):
        rng = np.random.default_rng([20, i])
        geom = rawtables.random_geometry(rng, Stage.S1, None, None, True)
        raw = rawtables.random_tables(rng, geom, target.layout, outside_ram=True)
        addrs = rawtables.probe_addresses(rng, raw, PER_TABLE)
        subject = raw.subject(f"el0 {i}")
        target.install(subject.regs, subject.image)
        try:
            pars = dict(zip((READ, WRITE), target.at_both(addrs, Stage.S1, el0=True), strict=True))
        finally:
            target.uninstall()
        for access, actual in pars.items():
            pred = _predict(raw, addrs, access, True, target.qemu_version)
            el2 = _predict(raw, addrs, access, False, target.qemu_version)
            keep = ~np.asarray(mbx.is_at_exception(actual), dtype=np.bool_) & (par_compare_mask_batch(pred) != 0)
            want = expected_par_batch(pred)
            bad = np.flatnonzero(keep & (((want ^ actual) & par_compare_mask_batch(pred)) != 0))
            assert bad.size == 0, (f"{geom.describe()} {access.value} at {int(addrs[bad[0]]):#x}: "
                                   f"PAR {int(actual[bad[0]]):#x}, model {int(want[bad[0]]):#x}")
            compared += int(keep.sum())
            differ += int((keep & (want != expected_par_batch(el2))).sum())
    assert compared > TABLES * PER_TABLE  # both forms of most probes were modelled
    assert differ > compared // 20, (differ, compared)  # EL0's view is not EL2's: the test can tell


def test_el0_at_forms_refused_without_the_el2_0_regime(target: Target) -> None:
    tab = s1_identity(LAYOUT, "4K", 40)
    target.install(tab.s1_regs(), tab.image())
    try:
        with pytest.raises(RequestFailed):
            target.at_both(np.array([LAYOUT.code], dtype=np.uint64), Stage.S1, el0=True)
    finally:
        target.uninstall()
    with pytest.raises(ValueError, match="el0"):
        target.at_start_both([0], [0], Stage.S2, el0=True)


def _el0_pages() -> tuple[HandTable, list[int]]:
    """An EL2&0 identity map with four scratch pages whose AP[2:1] are 0b00, 0b01, 0b10, 0b11."""
    tab = s1_hvhe_identity(LAYOUT, "4K", 48)
    base = LAYOUT.scratch_base + 0x1000  # not block-aligned: level-3 pages
    tab.map(base, 4 * 0x1000, Prot.RW)
    pages = [base + i * 0x1000 for i in range(4)]
    for ap, va in enumerate(pages):
        pa = tab.entry_pa(va, 3)
        tab.pool.write64(pa, (tab.pool.read64(pa) & ~d.S1_AP.mask) | d.S1_AP.prep(ap))
    return tab, pages


def test_el0_loads_and_stores_are_unprivileged(target: Target) -> None:
    """ldtr/sttr with HCR_EL2.{E2H, TGE} = {1, 1} are EL0's accesses: AP[1] lets EL0 in, AP[2]
    keeps it read-only; EL2's own accesses to the same pages are not restricted by AP[1]."""
    tab, pages = _el0_pages()
    addrs = np.array([p + 0x80 for p in pages], dtype=np.uint64)
    target.install(tab.s1_regs(), tab.image())
    try:
        loads, stores = target.access_both(addrs, addrs, Stage.S1, el0=True)
        el2_loads = target.access(addrs, False, Stage.S1)
        written = [int(target.ram_u64(int(a), 1)[0]) for a in addrs]
    finally:
        target.uninstall()
    geom = replace(tab.geom, e2h=True)  # the hand-made table's own geometry leaves E2H to its registers
    model = [[translate(tab.pool, geom, tab.pgd, int(a), acc, el0=True).ok for a in addrs] for acc in (READ, WRITE)]
    assert model == [[False, True, False, True], [False, True, False, False]]  # AP 00, 01, 10, 11
    assert loads["completed"].tolist() == model[0]
    assert stores["completed"].tolist() == model[1]
    assert el2_loads["completed"].all()
    for rec in (loads, stores):
        for i in np.flatnonzero(~rec["completed"]):
            esr = int(rec["esr"][i])
            assert ExceptionClass(ESR_EC.get(esr)) is ExceptionClass.DABT_SAME  # taken from EL2
            assert ISS_DFSC.get(esr) == fault_status(FaultKind.PERMISSION, 3)
            assert int(rec["far"][i]) == int(addrs[i])
    assert [w == int(v) for w, v in zip(written, stores["value"], strict=True)] == model[1]


def test_el0_accesses_refused_without_the_el2_0_regime(target: Target) -> None:
    tab = s1_identity(LAYOUT, "4K", 40)
    target.install(tab.s1_regs(), tab.image())
    try:
        with pytest.raises(RequestFailed):
            target.access(np.array([LAYOUT.scratch_base], dtype=np.uint64), False, Stage.S1, el0=True)
        with pytest.raises(RequestFailed):
            target.fetch(np.array([LAYOUT.code], dtype=np.uint64), Stage.S1, el0=True)
    finally:
        target.uninstall()
    with pytest.raises(ValueError, match="el0"):
        target.access([0], False, Stage.S2, el0=True)


def test_el0_fetches_obey_uxn(target: Target) -> None:
    """Branches made at EL0 of the EL2&0 regime: UXN = 0 runs whatever AP[1] says (execute-only),
    UXN = 1 takes an instruction abort from EL0 (EC 0x20, permission, level 3); EL2's own fetches
    see PXN = 0 and the EL0-writable rule instead - the two views differ, as the model says."""
    tab, pages = _el0_pages()
    for i, va in enumerate(pages):  # UXN on the odd pages
        pa = tab.entry_pa(va, 3)
        pte = tab.pool.read64(pa) & ~(d.S1_UXN.mask | d.S1_PXN.mask)
        tab.pool.write64(pa, pte | (d.S1_UXN.mask if i % 2 else 0))
    addrs = np.array(pages, dtype=np.uint64)
    target.install(tab.s1_regs(), tab.image())
    try:
        stubs = mbx.fetch_stubs(np.arange(4) + 0x500)
        for i, va in enumerate(pages):
            target.ram_u64(va, mbx.FETCH_STUB_WORDS)[:] = stubs[i]
        el0 = target.fetch(addrs, Stage.S1, el0=True)
        el2 = target.fetch(addrs, Stage.S1)
        after = target.access(addrs, False, Stage.S1)  # PSTATE.PAN is not left set by EL0's exceptions
    finally:
        target.uninstall()
    geom = replace(tab.geom, e2h=True)
    model = [translate(tab.pool, geom, tab.pgd, int(a), EXEC, el0=True).ok for a in addrs]
    assert model == [True, False, True, False]
    assert el0["completed"].tolist() == model
    assert [int(v) for v in el0["value"][::2]] == [0x500, 0x502]
    for i in (1, 3):
        esr = int(el0["esr"][i])
        assert ExceptionClass(ESR_EC.get(esr)) is ExceptionClass.IABT_LOWER
        assert ISS_DFSC.get(esr) == fault_status(FaultKind.PERMISSION, 3) and int(el0["far"][i]) == pages[i]
    el2_model = [translate(tab.pool, geom, tab.pgd, int(a), EXEC).ok for a in addrs]
    assert el2_model == [True, False, True, True]  # PXN = 0, but EL0-writable (AP 0b01) is EL2-XN
    assert el2["completed"].tolist() == el2_model
    assert after["completed"].all(), after


def test_check_subject_probes_el0_after_el2(target: Target) -> None:
    """The engine's whole check of an EL2&0 table runs every probe kind a second time as EL0's,
    and the MMU agrees with the model on all of them; el0=False (or the EL2 regime) has none."""
    kinds: dict[str, int] = {}
    for i in range(8):
        rng = np.random.default_rng([21, i])
        geom = rawtables.random_geometry(rng, Stage.S1, None, False, True)
        raw = rawtables.random_tables(rng, geom, target.layout)
        addrs = rawtables.probe_addresses(rng, raw, 400)
        report = check_subject(raw.subject(f"el0 {i}"), target, addrs, rng, access=raw.can_access)
        assert report.mismatched == 0, report.text()
        for k, v in report.probes.items():
            kinds[k] = kinds.get(k, 0) + v
    assert {"S1E2R", "S1E2W", "S1E0R", "S1E0W", "load EL0", "store EL0", "fetch EL0"} <= set(kinds), kinds
    assert kinds["S1E0R"] == kinds["S1E2R"]
    rng = np.random.default_rng([21, 99])
    geom = rawtables.random_geometry(rng, Stage.S1, None, False, True)
    raw = rawtables.random_tables(rng, geom, target.layout)
    plain = check_subject(raw.subject("el2 only"), target, rawtables.probe_addresses(rng, raw, 100), rng, el0=False)
    assert not any("E0" in k or "EL0" in k for k in plain.probes), plain.probes
