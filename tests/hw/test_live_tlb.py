"""Live table updates on the MMU and their TLB maintenance (harness.check.live).

Every built-in scenario's operations run live on warm tables (every granule, both stages, LPA2,
hVHE): no stale translation and no broken rule. Planted bugs in the model must each be caught,
by the MMU (``tlb-stale``, check 1) or by the rules (``tlb-*``, check 2), as the test says. QEMU
7.2 is measured the same way (any_qemu).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from harness.arch.geometry import Geometry, Granule, Stage
from harness.arch.registers import regime_regs
from harness.check import live
from harness.check.scenario import MapSpec, OpSpec, Scenario, builtin
from harness.check.scenario.catalogue import SCRATCH
from harness.core import kvmops, pgtable, tlb
from harness.core.memory import PagePool, PoolImage, WordsMemory
from harness.core.prot import Prot
from harness.target.target import Target

pytestmark = pytest.mark.hw

LIVE = [s for s in builtin() if s.ops]


def test_builtins_cover_every_regime() -> None:
    """The live updates run for every granule at both stages, with LPA2 and with hVHE."""
    kinds = {(s.stage, s.granule) for s in LIVE}
    assert len(kinds) == 6, kinds
    assert any(s.lpa2 and s.stage is Stage.S1 and s.e2h for s in LIVE)
    assert any(s.lpa2 and s.stage is Stage.S2 for s in LIVE)


@pytest.mark.parametrize("sc", LIVE, ids=lambda s: s.name)
def test_builtin_operations_live(target: Target, sc: Scenario) -> None:
    rep = live.check_scenario(sc, target, np.random.default_rng(5))
    t = rep.tlb
    assert t is not None and t.updates == len(sc.ops)
    assert t.checked > 0 and t.judged > 0, t.as_json()
    assert t.stale == 0 and t.ok, rep.text()
    assert rep.ok, rep.text()
    assert "tlb" in rep.to_json() and rep.to_json()["tlb"]["stale"] == 0


def test_no_live_keeps_the_old_path(target: Target) -> None:
    sc = LIVE[0]
    rep = live.check_scenario(sc, target, np.random.default_rng(5), live=False)
    assert rep.ok and rep.tlb is not None and rep.tlb.updates == 0


# -- planted bugs in the model ----------------------------------------------------------------------
@pytest.fixture
def no_leaf_tlbi(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The model with no invalidation on unmap (leaves cleared, never invalidated)."""
    monkeypatch.setattr(pgtable.KvmPgtable, "_tlbi_leaf", lambda self, addr, level: None)
    yield


def _unmap_scenario(stage: Stage) -> Scenario:
    if stage is Stage.S1:
        return Scenario("planted-s1", Stage.S1, Granule.K4, 40, access=True,
                        maps=(MapSpec(0x1_0000_0000, 16 << 12, SCRATCH, Prot.RW),),
                        ops=(OpSpec("unmap", 0x1_0000_0000 + (4 << 12), 2 << 12),))
    return Scenario("planted-s2", Stage.S2, Granule.K4, 40, access=True,
                    maps=(MapSpec(0x1000_0000, 16 << 12, SCRATCH, Prot.RW),),
                    ops=(OpSpec("unmap", 0x1000_0000 + (4 << 12), 2 << 12),))


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2], ids=["s1", "s2"])
def test_planted_unmap_without_invalidation(target: Target, no_leaf_tlbi: None, stage: Stage) -> None:
    """Caught by both checks: the MMU still gives the unmapped pages (tlb-stale) and the rules see
    no invalidation (tlb-missing)."""
    rep = live.check_scenario(_unmap_scenario(stage), target, np.random.default_rng(1))
    t = rep.tlb
    assert t is not None and not rep.ok
    # two pages, each a load (it completes) and a store (write permission went: it completes)
    assert t.checked == 4 and t.stale == 4 and t.by_kind.get("tlb-stale") == 4, t.as_json()
    assert t.by_kind.get("tlb-missing") == 2, t.as_json()
    stale = [f for f in t.findings if f.kind == "tlb-stale"]
    assert all("completed" in f.message and f.invalidations == () for f in stale), [f.text() for f in stale]


def test_planted_wrprotect_without_flush(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """wrprotect without the caller's VMID flush: stores still complete through the warm entries
    (tlb-stale) and the rules see the missing invalidation."""
    monkeypatch.setattr(pgtable.Stage2Pgtable, "_flush_vmid", lambda self: None)
    sc = Scenario("planted-wp", Stage.S2, Granule.K4, 40, access=True,
                  maps=(MapSpec(0x1000_0000, 16 << 12, SCRATCH, Prot.RW),),
                  ops=(OpSpec("wrprotect", 0x1000_0000, 4 << 12),))
    t = live.check_scenario(sc, target, np.random.default_rng(1)).tlb
    assert t is not None and t.stale == 4 and t.by_kind.get("tlb-missing") == 4, t.as_json()
    assert all("store" in f.message for f in t.findings if f.kind == "tlb-stale")


def test_planted_wrong_level_hint(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leaf invalidated with another level's hint: the rules catch it (tlb-hint); QEMU's TLBI
    ignores the TTL hint and invalidates anyway, so the MMU shows nothing (check 2 only)."""
    orig = pgtable.KvmPgtable._tlbi_leaf
    monkeypatch.setattr(pgtable.KvmPgtable, "_tlbi_leaf", lambda self, addr, level: orig(self, addr, level - 1))
    t = live.check_scenario(_unmap_scenario(Stage.S1), target, np.random.default_rng(1)).tlb
    assert t is not None and t.by_kind.get("tlb-hint") == 2 and t.stale == 0, t.as_json()


class _OnePageMerge(kvmops.KernelModel):
    """Upstream before 3a0b870e3448: a table replaced by a block invalidates one page."""

    def _flush_vmid_range(self, addr: int, size: int) -> None:
        self._log(kvmops.EventKind.TLB_FLUSH_VMID_IPA, addr, 0, 3)


@pytest.mark.parametrize("buggy", [False, True], ids=["upstream", "one-page"])
def test_table_to_block_merge_live(target: Target, buggy: bool) -> None:
    """The 6.12 oracle's table->block merge applied live at stage 2: clean as upstream does it;
    with one page invalidated the rules find the other 15 pages (tlb-missing). On QEMU every
    stage-2 helper ends in ``tlbi vmalle1is``, which drops all of EL1's combined entries, so the
    MMU shows no stale page either way: check 2 is what catches it."""
    lay = target.layout
    geom = Geometry.create(Stage.S2, "4K", 40)
    pool = PagePool(lay.pool_base, 32 << 20, 4096)
    cls = _OnePageMerge if buggy else kvmops.KernelModel
    m = cls(geom, pool, kvmops.KernelFeatures(tlb_range=True))
    rw = kvmops.KPROT_R | kvmops.KPROT_W
    for r in lay.stage2_regions():
        assert m.stage2_map(r.base, r.size, r.base, kvmops.prot_from_model(r.prot)) == 0
    ipa = 0x1000_0000
    assert m.stage2_map(ipa, 16 << 12, SCRATCH, rw) == 0
    assert m.pgd is not None
    root = m.pgd
    regs = regime_regs(geom, root)
    target.install(regs, PoolImage(pool.base, pool.words()[: pool.used_extent() // 8].tobytes()))
    try:
        before = WordsMemory(pool.base, pool.words().copy())
        m.maint = tlb.MaintLog()
        assert m.stage2_map(ipa, 2 << 20, SCRATCH, rw) == 0  # the block over the table
        steps = m.maint.take()
        tally = live.TlbTally()
        no_access = tuple((r.base, r.size) for r in lay.stage2_regions())
        live.live_update(target, geom, root, before, pool, steps, "merge", (ipa, 2 << 20),
                         np.random.default_rng(2), tally, no_access)
    finally:
        target.uninstall()
    assert tally.judged == 17 and tally.stale == 0, tally.as_json()
    if buggy:  # the 15 pages past the one invalidated; the table entry's own hint and what follows
        assert tally.by_kind.get("tlb-missing") == 15, tally.as_json()
        assert {"tlb-hint", "tlb-bbm", "tlb-order"} <= set(tally.by_kind), tally.as_json()
    else:
        assert tally.ok, tally.as_json()


# -- QEMU 7.2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2], ids=["s1", "s2"])
def test_stale_translations_on_each_qemu(any_qemu: Target, stage: Stage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both QEMUs keep a translation until a TLBI (the live check's premise): with the invalidation
    the update is clean; without it the pages are stale on the MMU."""
    sc = _unmap_scenario(stage)
    ok = live.check_scenario(sc, any_qemu, np.random.default_rng(1)).tlb
    assert ok is not None and ok.stale == 0 and ok.checked == 4 and ok.ok, ok.as_json()
    monkeypatch.setattr(pgtable.KvmPgtable, "_tlbi_leaf", lambda self, addr, level: None)
    bad = live.check_scenario(sc, any_qemu, np.random.default_rng(1)).tlb
    assert bad is not None and bad.stale == 4, bad.as_json()
