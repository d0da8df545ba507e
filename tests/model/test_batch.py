"""The vectorised walk agrees exactly with the scalar walk, garbage tables included."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Stage
from harness.arch.registers import FaultKind, fault_status
from harness.core import batch
from harness.core.batch import (
    NO_FAULT,
    UNMODELLED,
    BatchResult,
    expected_par_batch,
    fault_code,
    fault_status_batch,
    par_compare_mask_batch,
    translate_batch,
    translate_batch_each,
)
from harness.core.memory import PagePool
from harness.core.translate import (
    DEFAULT_MAIR,
    Access,
    Translation,
    WalkSemantics,
    expected_par,
    par_compare_mask,
    translate,
)

BASE = 0x4000_0000

GEOMS = [
    Geometry.create(1, "4K", 48, 48),
    Geometry.create(1, "4K", 39, 40),
    Geometry.create(1, "16K", 48, 44),
    Geometry.create(1, "16K", 36, 48),
    Geometry.create(1, "64K", 48, 48),
    Geometry.create(1, "64K", 52, 52),
    Geometry.create(2, "4K", 40, 48),
    Geometry.create(2, "4K", 36, 40),
    Geometry.create(2, "4K", 48, 48, start_level=0),
    Geometry.create(2, "16K", 40, 48),
    Geometry.create(2, "64K", 42, 48),
    Geometry.create(2, "64K", 52, 52),
    # FEAT_LPA2 (level -1, OA[51:48] in [9:8] and [49:48], blocks at 4K level 0 / 16K level 1),
    # the EL2&0 regime, and blocks larger than 2**PS (the final output-address check).
    Geometry.create(1, "4K", 52, 52, lpa2=True),
    Geometry.create(1, "16K", 52, 36, lpa2=True, e2h=True),
    Geometry.create(1, "4K", 40, 40, e2h=True),
    Geometry.create(2, "4K", 52, 52, -1, lpa2=True),
    Geometry.create(2, "4K", 44, 40, 0, lpa2=True),
    Geometry.create(2, "16K", 50, 48, 0, lpa2=True),
    Geometry.create(1, "64K", 48, 36),
]


def scalar_row(t: Translation) -> tuple[int, ...]:
    """The scalar outcome in the batch's representation."""
    code = fault_code(t)
    if code != NO_FAULT:
        assert t.fault_level is not None
        return (code, t.fault_level, int(t.fault_stage2), 0, -1, 0, 0, 0, 0, 0, 0, 0)
    assert t.pa is not None and t.level is not None and t.descriptor is not None
    assert t.attr is not None and t.sh is not None and t.par_sh is not None
    return (NO_FAULT, -1, 0, t.pa, t.level, t.descriptor, t.attr, t.sh, t.par_sh, t.perms,
            int(t.attr_unpredictable), int(t.sh_unpredictable))


def batch_row(r: BatchResult, i: int) -> tuple[int, ...]:
    return (int(r.fault[i]), int(r.fault_level[i]), int(r.fault_stage2[i]), int(r.pa[i]),
            int(r.level[i]), int(r.descriptor[i]), int(r.attr[i]), int(r.sh[i]),
            int(r.par_sh[i]), int(r.perms[i]), int(r.attr_unpredictable[i]),
            int(r.sh_unpredictable[i]))


def random_tables(rng: np.random.Generator, geom: Geometry, pages: int) -> PagePool:
    """A pool whose every entry is random: tables into the pool (mostly), leaves, invalid
    entries, pointers outside the pool or beyond the PA size, and pure garbage."""
    gsize = geom.granule.size
    pool = PagePool(BASE, pages * gsize, gsize)
    words = pool.words()
    n = words.size
    u = np.uint64
    pick = rng.integers(0, 100, n)
    rand = rng.integers(0, 2**63, n, dtype=np.uint64) * u(2) + rng.integers(0, 2, n, dtype=np.uint64)
    ignored = rand & u(0xFFF8_0000_0000_0FFC)  # attribute and ignored bits, [50:48], [11:2]
    # Table attributes; with DS = 1 and PS under 52 bits also OA[51:50] in [9:8], which QEMU
    # ignores (WalkSemantics.lpa2_oa) and the Arm ARM faults: both walks must agree on either reading.
    table_ignored = 0xF800_0000_0000_0000 | (d.OA_51_50_LPA2.mask if geom.lpa2 and geom.pa_bits < 52 else 0)
    hi = (rng.integers(0, 16, n, dtype=np.uint64) << u(12)) * (rng.integers(0, 4, n) == 0)
    page = u(BASE) + rng.integers(0, pages, n, dtype=np.uint64) * u(gsize)
    oa = (rng.integers(0, 1 << geom.pa_bits, n, dtype=np.uint64) & ~u(gsize - 1)) & u((1 << 48) - 1)
    big = oa | (u(1) << rng.integers(geom.pa_bits, 48, n, dtype=np.uint64)) if geom.pa_bits < 48 \
        else oa | hi
    out = np.select(
        [pick < 12, pick < 50, pick < 55, pick < 60, pick < 88],
        [rand & ~u(1),  # invalid
         page | u(3) | (ignored & u(table_ignored)),  # table into the pool
         oa | u(3),  # table somewhere else
         big | u(3) | (rand & u(2)),  # beyond the PA size
         oa | hi | ignored | u(1) | (rand & u(2)) | u(1 << 10) * (pick % 8 != 0)],  # leaf
        rand,  # garbage
    )
    words[:] = out
    return pool


def compare(pool: PagePool, geom: Geometry, root: int, addrs: npt.NDArray[np.uint64],
            access: Access, mair: int, qemu_lpa_oa: bool, qemu_final_oa_unchecked: bool = False,
            wxn: bool = False, qemu_lpa2_oa: bool = False) -> BatchResult:
    kw = {"qemu": WalkSemantics(qemu_lpa_oa, qemu_lpa2_oa, qemu_final_oa_unchecked),
          "wxn": wxn and geom.stage is Stage.S1}
    r = translate_batch(pool.words(), pool.base, geom, root, addrs, access, mair, **kw)
    pars = expected_par_batch(r)
    masks = par_compare_mask_batch(r)
    for i, a in enumerate(addrs.tolist()):
        t = translate(pool, geom, root, a, access, mair, **kw)
        assert batch_row(r, i) == scalar_row(t), t.explain()
        assert int(masks[i]) == par_compare_mask(t)
        if not t.unmodelled and access is not Access.EXEC:
            assert int(pars[i]) == expected_par(t), t.explain()
    return r


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    geom_index=st.integers(0, len(GEOMS) - 1),
    seed=st.integers(0, 2**32 - 1),
    pages=st.integers(1, 6),
    access=st.sampled_from(list(Access)),
    qemu_lpa_oa=st.booleans(),
    qemu_lpa2_oa=st.booleans(),
    random_mair=st.booleans(),
    bad_root=st.integers(0, 9),
    wxn=st.booleans(),
)
def test_batch_equals_scalar_on_random_tables(geom_index: int, seed: int, pages: int,
                                              access: Access, qemu_lpa_oa: bool, qemu_lpa2_oa: bool,
                                              random_mair: bool, bad_root: int, wxn: bool) -> None:
    geom = GEOMS[geom_index]
    rng = np.random.default_rng(seed)
    pool = random_tables(rng, geom, max(pages, geom.pgd_pages))
    mair = int(rng.integers(0, 2**63, dtype=np.uint64)) * 2 + 1 if random_mair else DEFAULT_MAIR
    root = BASE if bad_root else 1 << geom.pa_bits
    n = 300
    u = np.uint64
    within = rng.integers(0, 2**63, n, dtype=np.uint64) & u(geom.limit - 1)
    anywhere = rng.integers(0, 2**63, n, dtype=np.uint64) * u(2)
    near = u(geom.limit) + rng.integers(0, 1 << 20, n, dtype=np.uint64)
    above_pamax = (u(1) << u(52)) | within
    choice = rng.integers(0, 10, n)
    addrs = np.select([choice < 7, choice < 8, choice < 9], [within, anywhere, near], above_pamax)
    compare(pool, geom, root, addrs.astype(np.uint64), access, mair, qemu_lpa_oa, wxn=wxn,
            qemu_lpa2_oa=qemu_lpa2_oa)


def test_batch_on_hand_tables() -> None:
    """Concrete values: a 4K stage-2 table with a page, a block, an AF=0 page, an invalid entry."""
    geom = Geometry.create(2, "4K", 40, 48)
    pool = PagePool(BASE, 8 * 0x1000, 0x1000)
    pgd, l2, l3 = BASE, BASE + 0x2000, BASE + 0x3000  # PGD is two concatenated pages
    pool.write64(pgd + 8 * 0x201, l2 | 3)  # IPA 0x80_4000_0000 (second PGD page)
    pool.write64(l2 + 8 * 1, l3 | 3)  # IPA 0x80_4020_0000
    pool.write64(l2 + 8 * 2, 0x8000_0000 | 0x4C1 | 0xF << 2)  # 2M block, RW, AF, WB, SH 0
    pool.write64(l3 + 8 * 3, 0x4123_4000 | 0x7C3 | 0xF << 2)  # page, RW, AF, WB, SH inner
    pool.write64(l3 + 8 * 4, 0x4123_5000 | 0x3C3 | 0xF << 2)  # page, AF = 0
    pool.write64(l2 + 8 * 3, 0x9000_0000 | 3)  # table outside the pool
    addrs = np.array([0x80_4020_3000, 0x80_4045_6789, 0x80_4020_4000, 0x80_4020_5000,
                      0x1000, 1 << 40, 1 << 52, 0x80_4060_0000], dtype=np.uint64)
    r = compare(pool, geom, pgd, addrs, Access.WRITE, DEFAULT_MAIR, False)
    assert r.fault.tolist() == [NO_FAULT, NO_FAULT, FaultKind.ACCESS_FLAG.value,
                                FaultKind.TRANSLATION.value, FaultKind.TRANSLATION.value,
                                FaultKind.TRANSLATION.value, FaultKind.ADDRESS_SIZE.value,
                                UNMODELLED]
    assert r.fault_level.tolist() == [-1, -1, 3, 3, 1, 0, 0, 3]
    assert r.fault_stage2.tolist() == [False, False, True, True, True, True, False, True]
    assert r.pa[:2].tolist() == [0x4123_4000, 0x8005_6789]
    assert r.level[:2].tolist() == [3, 2]
    assert expected_par_batch(r).tolist() == [
        0xFF00_0000_4123_4B80, 0xFF00_0000_8005_6A00, 0xA17, 0xA0F, 0xA0B, 0xA09, 0x801, 0]
    assert r.ok.tolist() == [True, True] + [False] * 6
    assert r.unmodelled.tolist() == [False] * 7 + [True]
    with pytest.raises(ValueError, match="stage"):
        expected_par_batch(r, Stage.S1)


def test_batch_empty() -> None:
    geom = Geometry.create(1, "4K", 48)
    pool = PagePool(BASE, 0x1000, 0x1000)
    r = translate_batch(pool.words(), BASE, geom, BASE, np.zeros(0, dtype=np.uint64))
    assert len(r) == 0 and expected_par_batch(r).size == 0


def test_benchmark_table_translates() -> None:
    """The benchmark's hand-written table maps what it claims (a small run)."""
    from harness.bench.model_translate import run

    figures = run(count=2000, repeats=1)
    assert figures["addresses"] == 2000
    assert 0.85 * 2000 < figures["translated"] < 2000
    assert figures["table_pages"] == 2 + 2 + 128


@pytest.mark.parametrize("geom", GEOMS, ids=[g.describe() for g in GEOMS])
@pytest.mark.parametrize("final_unchecked", [False, True])
@pytest.mark.parametrize("wxn", [False, True], ids=["wxn0", "wxn1"])
def test_batch_equals_scalar_every_geometry(geom: Geometry, final_unchecked: bool, wxn: bool) -> None:
    """Stage 1 also with SCTLR_EL2.WXN = 1 (stage 2 ignores the flag here: it has no WXN)."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        pool = random_tables(rng, geom, max(4, geom.pgd_pages))
        within = rng.integers(0, 2**63, 200, dtype=np.uint64) & np.uint64(geom.limit - 1)
        for access in (Access.READ, Access.WRITE, Access.EXEC):
            compare(pool, geom, BASE, within, access, DEFAULT_MAIR, seed == 1, final_unchecked, wxn)


def check_each(pool: PagePool, geom: Geometry, root: int, addrs: npt.NDArray[np.uint64],
               accesses: tuple[Access, ...], **kw: Any) -> None:
    """translate_batch_each: per access, what the scalar walk gives at every address (and what
    translate_batch gives), each result with arrays of its own."""
    results = translate_batch_each(pool.words(), pool.base, geom, root, addrs, accesses, **kw)
    assert len(results) == len(accesses)
    for access, r in zip(accesses, results, strict=True):
        assert r.access is access and r.addresses.tolist() == addrs.tolist()
        one = translate_batch(pool.words(), pool.base, geom, root, addrs, access, **kw)
        fst = fault_status_batch(r)
        for i, a in enumerate(addrs.tolist()):
            t = translate(pool, geom, root, a, access, **kw)
            assert batch_row(r, i) == scalar_row(t) == batch_row(one, i), t.explain()
            faulted = t.fault is not None and not t.unmodelled
            assert int(fst[i]) == (fault_status(t.fault, t.fault_level) if faulted else 0)  # type: ignore[arg-type]
    arrays = [id(getattr(r, f.name)) for r in results for f in dataclasses.fields(r)
              if f.name != "addresses" and isinstance(getattr(r, f.name), np.ndarray)]
    assert len(arrays) == len(set(arrays))


@pytest.mark.parametrize("geom", GEOMS, ids=[g.describe() for g in GEOMS])
@pytest.mark.parametrize("by_prefix", [False, True], ids=["per-lane", "by-prefix"])
def test_batch_each_equals_scalar_every_geometry(geom: Geometry, by_prefix: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One walk, several accesses (the check's READ and WRITE forms, EXEC too): each access's
    outcome as the scalar walk's on random tables (table attributes included), 600 addresses a
    seed, with WXN and hardware-managed AF/dirty state on stage 1; the upper levels walked per
    lane, and (``by_prefix``) once per address prefix, as many lanes make the walk do."""
    monkeypatch.setattr(batch, "PREFIX_LANES", 0 if by_prefix else 1 << 62)
    assert (batch._prefix_level(geom, 1) is not None) == by_prefix
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        pool = random_tables(rng, geom, max(5, geom.pgd_pages))
        u = np.uint64
        within = rng.integers(0, 2**63, 500, dtype=np.uint64) & u(geom.limit - 1)
        beyond = rng.integers(0, 2**63, 100, dtype=np.uint64) * u(2)
        addrs = np.concatenate([within, beyond])
        s1 = geom.stage is Stage.S1
        kw: dict[str, Any] = {"wxn": s1 and seed == 1, "ha": s1 and seed == 2, "hd": s1 and seed == 2,
                              "qemu": WalkSemantics(seed == 1, seed == 2, seed == 0)}
        check_each(pool, geom, BASE, addrs, (Access.READ, Access.WRITE, Access.EXEC), **kw)
        check_each(pool, geom, BASE, addrs, (Access.WRITE, Access.READ), **kw)
        if s1 and geom.e2h:  # EL0's view of the EL2&0 regime (AT S1E0R/W)
            check_each(pool, geom, BASE, addrs, (Access.READ, Access.WRITE, Access.EXEC), el0=True, **kw)


def test_batch_each_on_the_bench_table() -> None:
    """The bench's table (no table attributes: the walk skips gathering restrictions; every leaf
    RW or R, so WRITE faults where READ translates), 20,000 random addresses over 8 GiB: enough
    for the walk to read levels 0 and 1 once per prefix."""
    from harness.bench.e2e import BENCH_SCENARIO, GIB
    from harness.check.scenario import build
    from harness.target.layout import LAYOUT

    table = build(BENCH_SCENARIO, LAYOUT).table
    assert table.pgd is not None
    rng = np.random.default_rng(7)
    addrs = np.uint64(0x1_0000_0000) + rng.integers(0, 8 * GIB, 20_000, dtype=np.uint64)
    assert batch._prefix_level(table.geom, addrs.size) == 1  # levels 0 and 1 walked by prefix
    read, write = translate_batch_each(table.mem.words(), table.mem.base, table.geom, table.pgd, addrs,
                                       (Access.READ, Access.WRITE))
    assert read.ok.sum() > 0 and 0 < write.ok.sum() < read.ok.sum()
    for r in (read, write):
        pars, masks = expected_par_batch(r), par_compare_mask_batch(r)
        for i in range(0, addrs.size, 7):
            t = translate(table.mem, table.geom, table.pgd, int(addrs[i]), r.access)
            assert batch_row(r, i) == scalar_row(t), t.explain()
            assert int(pars[i]) == expected_par(t) and int(masks[i]) == par_compare_mask(t)


def test_batch_each_no_access_and_empty() -> None:
    geom = Geometry.create(1, "4K", 48)
    pool = PagePool(BASE, 0x1000, 0x1000)
    assert translate_batch_each(pool.words(), BASE, geom, BASE, np.arange(4, dtype=np.uint64), ()) == ()
    (r,) = translate_batch_each(pool.words(), BASE, geom, BASE, np.zeros(0, dtype=np.uint64), (Access.WRITE,))
    assert len(r) == 0 and r.access is Access.WRITE
