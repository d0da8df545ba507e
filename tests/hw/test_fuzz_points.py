"""The five findings of issue 11 on the MMU, and accesses that prove their physical address.

1. a root smaller than 64 bytes is aligned to its own size;
2. stage-2 start levels are legal by PAMax, not VTCR_EL2.PS;
3. what is withheld from ``AT S12E1*`` follows QEMU's walk, not the Arm ARM's;
4. an AT whose walk reads outside RAM takes an external abort: recorded, classified, no hang;
5. the final output address beyond the PA size (ASL ``AArch64.OAOutOfRange``): declared.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Granule, Stage
from harness.check import divergences, rawtables
from harness.check.engine import (
    SKIP_AT_ABORT,
    CheckReport,
    check_access,
    check_built,
    check_subject,
    subject_of_built,
)
from harness.check.scenario import SCRATCH, BuiltScenario, MapSpec, Scenario, build
from harness.core.batch import expected_par_batch, par_compare_mask_batch, translate_batch
from harness.core.memory import PoolImage
from harness.core.prot import Prot
from harness.core.translate import READ, translate
from harness.target.target import Target

pytestmark = pytest.mark.hw

LPA_KEY = "qemu-64k-oa-51-48-below-52bit-ps"


def leaf_pa(built: BuiltScenario, addr: int) -> int:
    """Where the leaf descriptor of ``addr`` lives."""
    t = built.table
    assert t.pgd is not None
    return translate(t.mem, t.geom, t.pgd, addr).steps[-1].desc_pa


def test_1_root_aligned_to_its_own_size(target: Target) -> None:
    """Stage 2, 4K, 31-bit IPA, start level 1: a two-entry (16-byte) root at a 16-byte offset."""
    geom = Geometry.create(Stage.S2, Granule.K4, 31, 48, 1)
    for seed in range(100):
        rng = np.random.default_rng(seed)
        raw = rawtables.random_tables(rng, geom, target.layout)
        if raw.root % 64:
            break
    assert raw.root % 64 in (16, 32, 48)
    addrs = rawtables.probe_addresses(rng, raw, 4000)
    rep = check_subject(raw.subject("root-16"), target, addrs, rng)
    assert rep.ok and rep.matched > 1000, rep.text()
    # the check can tell: a walk from the root rounded down to 64 bytes disagrees with the MMU
    mem = raw.pool
    wrong = translate_batch(mem.words(), mem.base, geom, raw.root & ~63, addrs, READ)
    target.install(raw.regs, PoolImage(mem.base, mem.words().tobytes()))
    try:
        right = raw.subject("root-16").predict(addrs, READ)
        ok = ~wrong.unmodelled & ~right.unmodelled & ~divergences.at_unsafe(right, target.qemu_version)[0]
        actual = target.at(addrs[ok], "S12E1R")
    finally:
        target.uninstall()
    w = np.flatnonzero(ok)
    sub = translate_batch(mem.words(), mem.base, geom, raw.root & ~63, addrs[w], READ)
    assert (((expected_par_batch(sub) ^ actual) & par_compare_mask_batch(sub)) != 0).any()


@pytest.mark.parametrize(("granule", "ia", "pa", "level"), [(Granule.K4, 40, 40, 0), (Granule.K16, 38, 40, 1),
                                                           (Granule.K4, 42, 42, 0)])
def test_2_stage2_start_level_by_pamax(target: Target, granule: Granule, ia: int, pa: int, level: int) -> None:
    """Legal with PAMax = 52 bits (-cpu max) although VTCR_EL2.PS is smaller; QEMU translates."""
    geom = Geometry.create(Stage.S2, granule, ia, pa, level)
    rng = np.random.default_rng(ia)
    raw = rawtables.random_tables(rng, geom, target.layout)
    rep = check_subject(raw.subject(f"pamax-{granule.label}"), target, rawtables.probe_addresses(rng, raw, 6000), rng)
    assert rep.ok and rep.matched > 1000, rep.text()


def test_3_withholding_follows_qemus_walk(target: Target) -> None:
    """64K, PS = 48: a read-only page whose descriptor has OA[51:48] bits. The Arm ARM says
    address size fault; QEMU ignores the bits and meets a stage-2 permission fault on a write,
    which would abort it under AT S12E1W: the check must withhold it and store for real."""
    sc = Scenario("s2-lpa-ro", Stage.S2, Granule.K64, 40, 48,
                  maps=(MapSpec(0x1000_0000, 0x20000, SCRATCH, Prot.R),), access=False)
    built = build(sc, target.layout)
    ptep = leaf_pa(built, 0x1000_0000)
    built.table.mem.write64(ptep, built.table.mem.read64(ptep) | d.OA_51_48.prep(0x3))
    addrs = np.array([0x1000_0000, 0x1000_0008, 0x1001_0000], dtype=np.uint64)
    rep = check_built(built, target, addresses=addrs)
    assert target.alive
    assert rep.ok, rep.text()
    assert rep.withheld == {divergences.AT_HAZARDS[0].key: 3}  # the write form at each read-only page
    assert rep.probes["store"] == 3 and rep.known_by.get(LPA_KEY, 0) >= 2, rep.text()


def test_4_at_external_abort_is_recorded_and_classified(target: Target) -> None:
    """A table pointer to a PA with nothing behind it: every AT under it takes a synchronous
    external abort; the firmware records it, the check classifies it, nothing hangs."""
    sc = Scenario("s1-outside-ram", Stage.S1, Granule.K4, 40, maps=(MapSpec(0x1_0000_0000, 0x2000, SCRATCH, Prot.RW),))
    built = build(sc, target.layout)
    assert built.table.pgd is not None
    built.table.mem.write64(built.table.pgd + 8, d.table_pte(rawtables.OUTSIDE_RAM, Granule.K4))  # VA 2^39
    addrs = np.array([1 << 39, (1 << 39) + 0x1234_5678, 0x1_0000_0000, 0x1_0000_1008], dtype=np.uint64)
    rep = check_built(built, target, addresses=addrs)
    assert target.alive
    assert rep.ok, rep.text()
    assert rep.skipped.get(SKIP_AT_ABORT) == 4, rep.text()  # two addresses x two AT forms
    assert rep.matched == 4



def test_5_final_output_address_beyond_pa_size(any_qemu: Target) -> None:
    """64K, stage 1, PS = 36: a level-1 block (4 TiB) with OA 0. Its input offsets at or above
    2^36 give output addresses the ASL (AArch64.OAOutOfRange) calls an address size fault (the
    model follows the ASL); QEMU 10.0.2 and 7.2.22 translate them: the declared departure."""
    target = any_qemu
    sc = Scenario("s1-64k-ps36", Stage.S1, Granule.K64, 48, 36)
    built = build(sc, target.layout)
    assert built.table.pgd is not None
    attrs = built.table.leaf_attrs(Prot.RW)
    block_va = 1 << 42  # level-1 entry 1
    built.table.mem.write64(built.table.pgd + 8, d.leaf_pte(0, attrs, 1, Granule.K64))
    addrs = np.array([block_va + SCRATCH, block_va + (1 << 37) + 0x10, block_va + (1 << 41)], dtype=np.uint64)
    rep = check_built(built, target, addresses=addrs)
    assert rep.ok, rep.text()
    assert rep.matched == 2 and rep.known_by == {"qemu-final-oa-beyond-ps": 4}, rep.text()  # 2 addresses x 2 forms


def _redirected(built: BuiltScenario, addr: int, to: int) -> PoolImage:
    """The table image with ``addr``'s leaf pointing at ``to`` instead (the model keeps the truth)."""
    image = bytearray(subject_of_built(built).image.data)
    ptep = leaf_pa(built, addr)
    off = ptep - built.table.mem.base
    pte = int.from_bytes(image[off : off + 8], "little")
    granule = built.table.granule
    pte = (pte & ~d.oa_mask(granule)) | d.phys_to_pte(to, granule)
    image[off : off + 8] = pte.to_bytes(8, "little")
    return PoolImage(built.table.mem.base, bytes(image))


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: f"s{int(s)}")
def test_redirected_page_fails_the_access_check(target: Target, stage: Stage) -> None:
    """A corrupted descriptor that sends a page elsewhere in scratch RAM: loads read the wrong
    planted value and stores leave their token at the wrong PA, so the check fails (with the
    true tables the same accesses pass)."""
    va = 0x1000_0000 if stage is Stage.S2 else 0x1_0000_0000
    sc = Scenario(f"redirect-s{int(stage)}", stage, Granule.K4, 40, 48,
                  maps=(MapSpec(va, 0x4000, SCRATCH, Prot.RW),), access=True)
    built = build(sc, target.layout)
    subject = subject_of_built(built)
    addrs = np.arange(va, va + 0x4000, 0x400, dtype=np.uint64)
    rng = np.random.default_rng(0)
    for image, expect_ok in ((subject.image, True), (_redirected(built, va + 0x1000, SCRATCH + 0x10_0000), False)):
        rep = CheckReport(sc.name, built.table.geom.describe(), "")
        target.install(subject.regs, image)
        try:
            check_access(rep, target, subject, addrs, rng)
        finally:
            target.uninstall()
        assert rep.probes == {"load": addrs.size, "store": addrs.size}
        if expect_ok:
            assert rep.ok, rep.text()
        else:
            bad = {(m.probe, m.address) for m in rep.mismatches}
            redirected = {int(a) for a in addrs if va + 0x1000 <= a < va + 0x2000}
            assert bad == {(p, a) for p in ("load", "store") for a in redirected}, rep.text()


def test_store_gone_astray_is_caught_in_its_page(target: Target) -> None:
    """Stores redirected into a page where other stores are expected, at other offsets: the
    words they change are caught (no store was expected there)."""
    va = 0x1_0000_0000
    sc = Scenario("astray", Stage.S1, Granule.K4, 40, 48, maps=(MapSpec(va, 0x4000, SCRATCH, Prot.RW),))
    built = build(sc, target.layout)
    subject = subject_of_built(built)
    pages = np.arange(4, dtype=np.uint64)
    addrs = (np.uint64(va) + pages * np.uint64(0x1000) + np.where(pages == 1, 0x208, 0x8).astype(np.uint64))
    rep = CheckReport(sc.name, built.table.geom.describe(), "")
    target.install(subject.regs, _redirected(built, va + 0x1000, SCRATCH + 0x2000))
    try:
        check_access(rep, target, subject, addrs, np.random.default_rng(0))
    finally:
        target.uninstall()
    strays = [m for m in rep.mismatches if m.expected.startswith("no store lands here")]
    assert [m.address for m in strays] == [SCRATCH + 0x2208], rep.text()


def test_fetches_never_run_at_the_firmwares_breakpoints(target: Target) -> None:
    """Found by the fuzzer: a random stage 2 mapping the IPA of the firmware's ``idle`` (EL1's VA
    is the IPA) to scratch RAM; a fetch there stopped at gdb's hardware breakpoint on ``idle``
    (it matches the PC at any EL) as if the request had ended. Fetch probes keep out of the
    firmware's code region; the target stays usable."""
    from harness.check.engine import subject_of_table
    from harness.core.memory import PagePool
    from harness.core.pgtable import KvmPgtable

    layout = target.layout
    code = next(r for r in layout.firmware_regions() if r.name == "code")
    geom = Geometry.create(Stage.S2, Granule.K4, 35, 40, 1)
    table = KvmPgtable.for_geometry(geom, PagePool(layout.pool_base, 4 << 20, 4096))
    for r in layout.stage2_regions():
        table.map(r.base, r.size, r.base, r.prot)
    table.map(code.base, code.size, layout.scratch.base, Prot.R | Prot.X)
    table.map(0x1000_0000, 0x1000, layout.scratch.base + code.size, Prot.R | Prot.X)
    addrs = np.concatenate([np.arange(code.base, code.base + code.size, 16, dtype=np.uint64),
                            np.array([0x1000_0000], dtype=np.uint64)])
    rep = check_subject(subject_of_table(table, "fetch-at-idle"), target, addrs, np.random.default_rng(0),
                        access=True, access_sample=64, fetch_sample=2000)
    assert target.alive and rep.ok, rep.text()
    assert rep.probes.get("fetch") == 1, rep.text()
