"""Random raw tables: legal configurations, the firmware's regions kept identity, one walk."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from harness.arch import descriptors as d
from harness.arch.geometry import PA_SIZES, Geometry, GeometryError, Granule, Stage
from harness.check import rawtables
from harness.core.batch import fault_code, translate_batch
from harness.core.prot import Prot
from harness.core.translate import READ, WRITE, WalkSemantics
from harness.target.layout import LAYOUT

SEEDS = range(40)


def tables(seed: int, **kw: object) -> rawtables.RawTables:
    rng = np.random.default_rng([seed, 7])
    geom = rawtables.random_geometry(rng, **kw)  # type: ignore[arg-type]
    return rawtables.random_tables(rng, geom, LAYOUT, outside_ram=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_configuration_is_legal(seed: int) -> None:
    g = rawtables.random_geometry(np.random.default_rng(seed))
    assert Geometry.create(g.stage, g.granule, g.ia_bits, g.pa_bits,
                           g.start_level if g.stage is Stage.S2 else None, lpa2=g.lpa2, e2h=g.e2h) == g


def test_configurations_cover_every_stage_granule_and_start_level() -> None:
    seen = {(g.stage, g.granule, g.start_level, g.lpa2, g.e2h)
            for g in (rawtables.random_geometry(np.random.default_rng(s)) for s in range(5000))}
    legal = set()
    for gr in Granule:
        for ds in (False, True):
            for ia in range(25, 53):
                for pa in PA_SIZES:
                    for sl in range(-1, 4):
                        try:
                            g = Geometry.create(Stage.S2, gr, ia, pa, sl, lpa2=ds)
                        except GeometryError:
                            continue
                        legal.add((Stage.S2, gr, g.start_level, ds, False))
                    if ia >= 31:
                        for e2h in (False, True):
                            with contextlib.suppress(GeometryError):
                                g = Geometry.create(Stage.S1, gr, ia, pa, lpa2=ds, e2h=e2h)
                                legal.add((Stage.S1, gr, g.start_level, ds, e2h))
    assert seen == legal
    only = {rawtables.random_geometry(np.random.default_rng(s), Stage.S1, Granule.K4, lpa2=True, e2h=True)
            for s in range(20)}
    assert all(g.lpa2 and g.e2h and g.granule is Granule.K4 for g in only)
    pgd = {rawtables.random_geometry(np.random.default_rng(s), Stage.S2).pgd_pages for s in range(2000)}
    assert {1, 2, 16} <= pgd


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: f"s{int(s)}")
@pytest.mark.parametrize("seed", SEEDS)
def test_firmware_regions_stay_identity(seed: int, stage: Stage) -> None:
    """Whatever is random, the firmware's own regions translate to themselves with their
    permissions (so the firmware keeps running on the table under test), on the grafted identity
    map as on the one the builder writes for the configuration itself."""
    raw = tables(seed, stage=stage)
    subject = raw.subject("t")
    for r in raw.protected:
        addrs = np.arange(r.base, r.base + r.size, raw.geom.granule.size, dtype=np.uint64) + np.uint64(8)
        for access in (READ, WRITE):
            pred = subject.predict(addrs, access)
            if access is WRITE and not r.prot & Prot.W:
                assert not pred.ok.any()
                continue
            assert pred.ok.all(), r
            assert (pred.pa == addrs).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_and_scalar_walks_agree_on_random_tables(seed: int) -> None:
    raw = tables(seed)
    rng = np.random.default_rng(seed)
    addrs = rawtables.probe_addresses(rng, raw, 400)
    subject = raw.subject("t")
    for access in (READ, WRITE):
        pred = subject.predict(addrs, access)
        for i in range(0, addrs.size, 7):
            t = subject.walk(int(addrs[i]), access)
            assert fault_code(t) == pred.fault[i], t.explain()
            if t.ok:
                assert t.pa == pred.pa[i] and t.attr == pred.attr[i]


def test_random_content_is_varied_and_reproducible() -> None:
    a, b = tables(3), tables(3)
    assert a.root == b.root and (a.pool.words() == b.pool.words()).all()
    stats: dict[str, int] = {}
    for s in SEEDS:
        for k, v in tables(s).stats.items():
            stats[k] = stats.get(k, 0) + v
    for kind in rawtables.KIND_NAMES:
        assert stats.get(kind, 0) > 0, kind


def test_roots_at_every_legal_alignment() -> None:
    """Roots smaller than a page land at sub-page offsets, down to their own size (16 bytes)."""
    offsets = set()
    for s in range(300):
        rng = np.random.default_rng(s)
        g = Geometry.create(Stage.S2, Granule.K4, 31, 48, 1)  # two entries: a 16-byte root
        raw = rawtables.random_tables(rng, g, LAYOUT)
        offsets.add(raw.root % 64)
        reg = raw.regs
        assert reg.vttbr_el2 & 0xFFFF_FFFF_FFFF == raw.root
    assert offsets >= {16, 32, 48}


def test_leaves_carry_every_kind_of_bit() -> None:
    words = np.concatenate([tables(s, granule=Granule.K64).pool.words() for s in range(10)])
    valid = words[(words & np.uint64(1)) == 1]
    for field in (d.AF, d.CONTIG, d.S1_NG, d.SW, d.OA_51_48, d.AP_TABLE, d.XN_TABLE):
        assert ((valid & np.uint64(field.mask)) != 0).any(), field.name


def test_declared_departures_are_model_keywords() -> None:
    """Every walk-semantics keyword a divergence declares is accepted by both walks, and every
    divergence names its Arm ARM rule and what QEMU does."""
    from harness.check import divergences

    raw = tables(1, granule=Granule.K64)
    subject = raw.subject("t")
    for dv in divergences.DIVERGENCES:
        assert dv.rule and dv.qemu and dv.key
        if dv.semantics.departs:
            subject.predict(np.array([0], dtype=np.uint64), READ, qemu=dv.semantics)
            subject.walk(0, READ, qemu=dv.semantics)
    assert divergences.qemu_semantics((10, 0, 2), Geometry.create(Stage.S1, Granule.K64, 48, 48)) == \
        {"qemu": WalkSemantics(lpa_oa=True)}
    assert divergences.qemu_semantics((10, 0, 2), Geometry.create(Stage.S1, Granule.K4, 48, 48)) == {}


@pytest.mark.parametrize("seed", range(60))
def test_grafted_identity_map_is_the_builders(seed: int) -> None:
    """The identity map grafted from one build per family walks exactly as the one the builder
    writes for the configuration itself (same leaves, attributes and faults over the regions)."""
    from harness.core.memory import PagePool
    from harness.core.pgtable import KvmPgtable

    geom = rawtables.random_geometry(np.random.default_rng([seed, 3]))
    raw = rawtables.firmware_only(geom, LAYOUT)
    pool = PagePool(LAYOUT.pool_base, rawtables.WINDOW_BYTES[geom.granule], geom.granule.size)
    own = KvmPgtable.for_geometry(geom, pool)
    for r in raw.protected:
        own.map(r.base, r.size, r.base, r.prot)
    assert own.pgd is not None
    addrs = np.concatenate([np.arange(r.base, r.base + r.size, 4096, dtype=np.uint64) for r in raw.protected]
                           + [np.arange(0, min(geom.limit, 1 << 32), 1 << 21, dtype=np.uint64)])
    for access in (READ, WRITE):
        a = raw.subject("graft").predict(addrs, access)
        b = translate_batch(pool.words(), pool.base, geom, own.pgd, addrs, access)
        assert (a.fault == b.fault).all() and (a.pa[a.ok] == b.pa[b.ok]).all() and (a.attr == b.attr).all(), geom


def test_guest_window_writes_only_what_changed_and_leaves_no_stale_bytes() -> None:
    """The fuzzer writes a table's image up to what may still be dirty (not the whole window):
    over a run of mixed granules, guest RAM's window always equals the model's."""
    from harness.check.fuzz import _GuestWindow

    top = max(rawtables.WINDOW_BYTES.values())
    ram = np.frombuffer(bytearray(np.random.default_rng(0).bytes(top)), dtype=np.uint64).copy()  # junk at first
    window = _GuestWindow()
    written = 0
    for s in range(60):
        raw = tables(s)
        subject = raw.subject("t", window.extent(raw))
        before = window.dirty
        data = np.frombuffer(subject.image.data, dtype=np.uint64)
        ram[: data.size] = data
        written += data.size
        window.written(raw, len(subject.image.data), before)
        words = raw.pool.words()
        assert (ram[: words.size] == words).all(), s
    assert written < 60 * top // 8 // 2  # much less than whole windows
