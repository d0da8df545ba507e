"""Register values written from the Arm ARM field definitions (D19), not from the code under test.

VTCR_EL2: T0SZ [5:0], SL0 [7:6], IRGN0 [9:8], ORGN0 [11:10], SH0 [13:12], TG0 [15:14]
(4K 0b00, 64K 0b01, 16K 0b10), PS [18:16] (48 bits 0b101, 52 bits 0b110), bit 31 RES1.
TCR_EL2 (E2H = 0): the same T0SZ/IRGN0/ORGN0/SH0/TG0/PS positions, bits 31 and 23 RES1.
"""

from __future__ import annotations

import pytest

from harness.arch.geometry import Geometry
from harness.arch.registers import Par, Stage1Regs, Stage2Regs, mair_value, regime_regs, ttbr_baddr


@pytest.mark.parametrize(
    ("granule", "ia", "pa", "vtcr"),
    [
        # 4K/40: T0SZ 24, start level 1 -> SL0 1, PS 48, inner/outer WBWA, inner shareable
        ("4K", 40, 48, (1 << 31) | (0b101 << 16) | (0b00 << 14) | (0b11 << 12) | (1 << 10) | (1 << 8) | (1 << 6) | 24),
        # 16K/47: T0SZ 17, start level 1 -> SL0 2, TG0 16K
        ("16K", 47, 48, (1 << 31) | (0b101 << 16) | (0b10 << 14) | (0b11 << 12) | (1 << 10) | (1 << 8) | (2 << 6) | 17),
        # 64K/40: T0SZ 24, start level 2 -> SL0 1, TG0 64K
        ("64K", 40, 48, (1 << 31) | (0b101 << 16) | (0b01 << 14) | (0b11 << 12) | (1 << 10) | (1 << 8) | (1 << 6) | 24),
        # 64K/52: T0SZ 12, start level 1 -> SL0 2, PS 52
        ("64K", 52, 52, (1 << 31) | (0b110 << 16) | (0b01 << 14) | (0b11 << 12) | (1 << 10) | (1 << 8) | (2 << 6) | 12),
    ],
)
def test_vtcr_el2(granule: str, ia: int, pa: int, vtcr: int) -> None:
    regs = regime_regs(Geometry.create(2, granule, ia, pa), 0x4800_0000)
    assert isinstance(regs, Stage2Regs)
    assert regs.vtcr_el2 == vtcr
    assert regs.hcr_el2_set == (1 << 31) | (1 << 12) | (1 << 0)  # RW, DC, VM


def test_known_vtcr_encodings() -> None:
    assert regime_regs(Geometry.create(2, "4K", 40, 48), 0x4800_0000).vtcr_el2 == 0x80053558  # type: ignore[union-attr]


def test_tcr_el2_mair_sctlr_ttbr() -> None:
    regs = regime_regs(Geometry.create(1, "4K", 40, 48), 0x4800_0000)
    assert isinstance(regs, Stage1Regs)
    assert regs.tcr_el2 == 0x80853518  # RES1 31, 23; PS 48; SH0 inner; WBWA; T0SZ 24
    assert regs.mair_el2 == 0x4404FF == mair_value()  # 0: normal WB, 1: device nGnRE, 2: normal NC, 3: nGnRnE
    assert regs.sctlr_el2_set == (1 << 12) | (1 << 2) | (1 << 0)  # I, C, M
    assert regs.ttbr0_el2 == 0x4800_0000
    regs16 = regime_regs(Geometry.create(1, "16K", 47, 48), 0x4800_0000)
    assert isinstance(regs16, Stage1Regs)
    assert regs16.tcr_el2 == (1 << 31) | (1 << 23) | (0b101 << 16) | (0b10 << 14) | (0b11 << 12) | 0x500 | 17


def test_vttbr_vmid_and_concatenated_alignment() -> None:
    geom = Geometry.create(2, "4K", 43, 48)  # 16 PGD pages: 64K-aligned base
    regs = regime_regs(geom, 0x4801_0000, vmid=5)
    assert isinstance(regs, Stage2Regs)
    assert regs.vttbr_el2 == (5 << 48) | 0x4801_0000
    with pytest.raises(ValueError, match="aligned to 0x10000"):
        regime_regs(geom, 0x4800_8000)


def test_52bit_table_base_in_ttbr_bits_5_2() -> None:
    geom = Geometry.create(2, "64K", 52, 52)
    assert ttbr_baddr(0xF_0000_0001_0000, geom) == 0x1_0000 | (0xF << 2)
    with pytest.raises(ValueError, match="beyond 48 bits"):
        ttbr_baddr(0xF_0000_0001_0000, Geometry.create(2, "4K", 40, 48))


def test_par_decoding() -> None:
    ok = Par(0xFF00000040001B80)  # facts.md: normal WB, inner shareable, PA 0x40001000
    assert (ok.fault, ok.pa, ok.attr, ok.sh) == (False, 0x4000_1000, 0xFF, 3)
    fault = Par(0xA1F)  # stage-2 permission fault, level 3
    assert fault.fault and fault.stage2 and fault.fst == 0b001111
    assert "permission fault level 3 (stage 2)" in str(fault)
