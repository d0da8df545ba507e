"""The declared QEMU divergences, shown on the QEMUs they concern.

Each scenario runs on the reference QEMU (10.0) and on Debian 12's QEMU 7.2: the check passes on
both, and the 7.2 disagreements are reported as the declared divergences, by key, not hidden.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness.arch import descriptors as d
from harness.arch.geometry import Granule, Stage
from harness.check.engine import CheckReport, check_built
from harness.check.scenario import SCRATCH, MapSpec, Scenario, build
from harness.core.prot import Prot
from harness.target.target import Target

pytestmark = pytest.mark.hw

L0_BLOCK_VA = 0x80_0000_0000  # PGD entry 1 of a 4K / 40-bit stage-1 table (start level 0)



def check_with_l0_block(t: Target) -> CheckReport:
    """Stage 1, 4K, 40 bits: a raw level-0 *block* descriptor (reserved with 4K and DS = 0)."""
    sc = Scenario("l0-block", Stage.S1, Granule.K4, 40,
                  maps=(MapSpec(0x1_0000_0000, 0x4000, SCRATCH, Prot.RW),
                        MapSpec(0x3_0000_0000, 0x4000, 0x0A00_0000, Prot.RW | Prot.DEVICE)))
    built = build(sc, t.layout)
    assert built.table.pgd is not None
    attrs = built.table.leaf_attrs(Prot.RW)
    built.table.mem.write64(built.table.pgd + 8, d.VALID.prep(1) | attrs)  # block, OA 0, level 0
    addrs = np.array([L0_BLOCK_VA, L0_BLOCK_VA + 0x1000, 0x1_0000_0000, 0x3_0000_0000], dtype=np.uint64)
    return check_built(built, t, addresses=addrs)


def test_level0_block_and_device_shareability(any_qemu: Target) -> None:
    rep = check_with_l0_block(any_qemu)
    assert rep.ok, rep.text()
    known = {m.divergence for m in rep.mismatches}
    if any_qemu.qemu_version < (8, 2, 0):
        # 7.2 takes the level-0 block, and reports the descriptor's SH for Device memory
        assert known == {"qemu-l0-block-4k", "qemu-par-sh-non-cacheable"}
        assert rep.known == 2 * 2 + 2  # two addresses x two AT forms, and the device page x two forms
    else:
        assert known == set() and rep.matched == rep.checked == 8


def test_stage2_permission_faults_under_at(any_qemu: Target) -> None:
    """QEMU 10.0.2 aborts on AT S12E1W at a stage-2 read-only page: the check must not send it
    there (it uses a real store instead); QEMU 7.2 answers, and the AT result is checked."""
    sc = Scenario("s2-ro", Stage.S2, Granule.K4, 40, 48,
                  maps=(MapSpec(0x1000_0000, 0x2000, SCRATCH, Prot.R),), access=True)
    rep = check_built(build(sc, any_qemu.layout), any_qemu, np.random.default_rng(3))
    assert rep.ok, rep.text()
    withheld = sum(rep.withheld.values())
    if any_qemu.qemu_version >= (8, 0, 0):
        assert withheld > 0 and rep.probes["store"] >= withheld
    else:
        assert withheld == 0
    assert any_qemu.alive
