"""Registers back to geometry, with register values written from the Arm ARM field definitions.

TCR_EL2 (E2H = 0): T0SZ [5:0], IRGN0 [9:8], ORGN0 [11:10], SH0 [13:12], TG0 [15:14] (4K 0b00,
64K 0b01, 16K 0b10), PS [18:16], bits 23 and 31 RES1, DS 32.
TCR_EL2 (E2H = 1, TCR_EL1's layout): T0SZ [5:0], EPD0 7, SH0 [13:12], TG0 [15:14],
T1SZ [21:16], EPD1 23, TG1 [31:30] (16K 0b01, 4K 0b10, 64K 0b11), IPS [34:32], DS 59.
VTCR_EL2: T0SZ [5:0], SL0 [7:6], TG0 [15:14], PS [18:16], bit 31 RES1, DS 32, SL2 33.
ID_AA64MMFR0_EL1 on QEMU -cpu max: 0x32310201126 (PARange 52 bits, TGran4 = 1 and TGran16 = 2:
52-bit capable; TGran4_2 = 3, TGran16_2 = 3, TGran64_2 = 2).
"""

from __future__ import annotations

import pytest

from harness.arch.geometry import Geometry, Stage
from harness.arch.regimes import RegisterDecodeError, regimes_from_registers
from harness.arch.registers import Stage1Regs, Stage2Regs, regime_regs
from harness.errors import InputError

CPU_MAX = 0x32310201126
M = 1 << 0
VM = 1 << 0
E2H = 1 << 34

# Linux 6.12 on QEMU -cpu max (facts.md).
HVHE_TCR = 0x095001F7B5CE350C  # 4K, DS = 1 (bit 59), T0SZ 12: 52-bit VA, start level -1
HOST_VTCR = 0x1802E358C  # 4K, DS = 1 (bit 32), T0SZ 12, SL0 = 2: level 0, 16 pages
NVHE_TCR = 0x80853510  # 4K, T0SZ 16, PS 48


def regs(**kw: int) -> dict[str, int]:
    base = {"SCTLR_EL2": 0, "HCR_EL2": 0, "ID_AA64MMFR0_EL1": CPU_MAX}
    base.update(kw)
    return base


def test_linux_612_protected_hvhe_and_host_stage2() -> None:
    found = regimes_from_registers(regs(
        SCTLR_EL2=M, HCR_EL2=E2H | VM, TCR_EL2=HVHE_TCR, TTBR0_EL2=0x4_1234_5000 | (0x3 << 2),
        MAIR_EL2=0xFF, VTCR_EL2=HOST_VTCR, VTTBR_EL2=(7 << 48) | 0x8_0000_0000 | (0x1 << 2)))
    s1, s2 = found
    assert s1.name == "el2&0" and s2.name == "stage2"
    assert s1.geom == Geometry.create(1, "4K", 52, 52, lpa2=True, e2h=True)
    assert (s1.geom.start_level, s1.geom.pgd_entries) == (-1, 16)
    # BADDR[51:48] in bits [5:2]: 0x3 -> PA bits 49:48.
    assert s1.root == 0x3_0004_1234_5000 & ~0x7F
    assert s1.mair == 0xFF and s1.sh0 == 0b11
    assert s2.geom == Geometry.create(2, "4K", 52, 52, 0, lpa2=True)
    assert (s2.geom.start_level, s2.geom.pgd_pages) == (0, 16)
    assert s2.root == 0x1_0008_0000_0000
    assert s2.mair is None and s2.registers["VTCR_EL2"] == HOST_VTCR


def test_linux_612_nvhe() -> None:
    (s1,) = regimes_from_registers(regs(SCTLR_EL2=M, TCR_EL2=NVHE_TCR, TTBR0_EL2=0x4800_0000,
                                        MAIR_EL2=0x4404FF))
    assert s1.name == "el2" and s1.geom == Geometry.create(1, "4K", 48, 48)
    assert s1.root == 0x4800_0000 and s1.geom.start_level == 0
    assert set(s1.registers) >= {"TCR_EL2", "TTBR0_EL2", "MAIR_EL2", "SCTLR_EL2", "HCR_EL2"}


def test_nothing_enabled_and_extra_keys_ignored() -> None:
    assert regimes_from_registers(regs()) == []
    assert regimes_from_registers(regs(TTBR1_EL2=0x1234, pc=0x4000_0000)) == []


def test_ips_0b111_reads_as_the_smaller_of_format_and_pamax() -> None:
    # IPS 0b111 (56 bits, FEAT_D128) with DS = 0: the 4K format holds 48 bits.
    tcr = (0b111 << 32) | (1 << 23) | (0b10 << 30) | 16
    (s1,) = regimes_from_registers(regs(SCTLR_EL2=M, HCR_EL2=E2H, TCR_EL2=tcr, TTBR0_EL2=0x1000,
                                        MAIR_EL2=0))
    assert s1.geom.pa_bits == 48 and s1.geom.e2h and not s1.geom.lpa2


ROUND_TRIP = [
    Geometry.create(1, "4K", 48, 48),
    Geometry.create(1, "16K", 36, 40),
    Geometry.create(1, "64K", 52, 52),
    Geometry.create(1, "64K", 42, 44, e2h=True),
    Geometry.create(1, "4K", 52, 52, lpa2=True),
    Geometry.create(1, "4K", 52, 52, lpa2=True, e2h=True),
    Geometry.create(1, "16K", 52, 52, lpa2=True, e2h=True),
    Geometry.create(1, "16K", 47, 48, lpa2=True),
    Geometry.create(2, "4K", 40, 48),
    Geometry.create(2, "4K", 40, 40, 0),
    Geometry.create(2, "4K", 43, 48),
    Geometry.create(2, "4K", 52, 52, -1, lpa2=True),
    Geometry.create(2, "4K", 52, 52, 0, lpa2=True),
    Geometry.create(2, "4K", 49, 52, -1, lpa2=True),
    Geometry.create(2, "16K", 52, 52, 0, lpa2=True),
    Geometry.create(2, "16K", 40, 48, 1),
    Geometry.create(2, "64K", 52, 52),
    Geometry.create(2, "64K", 33, 48, 3),
]


@pytest.mark.parametrize("geom", ROUND_TRIP, ids=[g.describe() for g in ROUND_TRIP])
def test_harness_registers_round_trip(geom: Geometry) -> None:
    pgd = 0xF_0000_0000_0000 if geom.base_52bit else 0x4000_0000
    pgd += 16 * geom.root_align  # aligned, not 64K-aligned
    r = regime_regs(geom, pgd)
    if isinstance(r, Stage1Regs):
        values = regs(SCTLR_EL2=r.sctlr_el2_set, HCR_EL2=r.hcr_el2_set, TCR_EL2=r.tcr_el2,
                      TTBR0_EL2=r.ttbr0_el2, MAIR_EL2=r.mair_el2)
    else:
        assert isinstance(r, Stage2Regs)
        values = regs(HCR_EL2=r.hcr_el2_set, VTCR_EL2=r.vtcr_el2, VTTBR_EL2=r.vttbr_el2)
    (live,) = regimes_from_registers(values)
    assert live.geom == geom
    assert live.root == pgd
    assert live.name == ("stage2" if geom.stage is Stage.S2 else "el2&0" if geom.e2h else "el2")


def test_known_lpa2_and_e2h_encodings() -> None:
    r = regime_regs(Geometry.create(1, "4K", 52, 52, lpa2=True, e2h=True), 0x4000_0000)
    assert isinstance(r, Stage1Regs)
    # T0SZ 12, IRGN0/ORGN0 WBWA, SH0 inner, TG0 4K, T1SZ 12, EPD1, IRGN1/ORGN1 WBWA, SH1 inner,
    # TG1 4K (0b10), IPS 52 (0b110), DS.
    assert r.tcr_el2 == (12 | (1 << 8) | (1 << 10) | (3 << 12) | (12 << 16) | (1 << 23) | (1 << 24)
                         | (1 << 26) | (3 << 28) | (0b10 << 30) | (0b110 << 32) | (1 << 59))
    assert r.hcr_el2_set == E2H
    r2 = regime_regs(Geometry.create(2, "4K", 52, 52, -1, lpa2=True), 0x4000_0000)
    assert isinstance(r2, Stage2Regs)
    # SL0 0, SL2 1, DS 1, PS 52, T0SZ 12.
    assert r2.vtcr_el2 == (12 | (1 << 8) | (1 << 10) | (3 << 12) | (0b110 << 16) | (1 << 31) | (1 << 32)
                           | (1 << 33))
    nvhe = regime_regs(Geometry.create(1, "16K", 48, 48, lpa2=True), 0x4000_0000)
    assert isinstance(nvhe, Stage1Regs)
    assert nvhe.tcr_el2 == 16 | 0x500 | (3 << 12) | (0b10 << 14) | (0b101 << 16) | (1 << 23) | (1 << 31) | (1 << 32)
    assert nvhe.hcr_el2_set == 0


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        (regs(SCTLR_EL2=M, TCR_EL2=(0b11 << 14) | 16, TTBR0_EL2=0, MAIR_EL2=0), "TCR_EL2.TG0"),
        (regs(SCTLR_EL2=M, TCR_EL2=12, TTBR0_EL2=0, MAIR_EL2=0), "TCR_EL2.T0SZ"),  # 52 bits, DS = 0
        (regs(SCTLR_EL2=M, TCR_EL2=40, TTBR0_EL2=0, MAIR_EL2=0), "TCR_EL2.T0SZ"),  # 24 bits
        (regs(SCTLR_EL2=M, HCR_EL2=E2H, TCR_EL2=(1 << 7) | 16, TTBR0_EL2=0, MAIR_EL2=0), "EPD0"),
        (regs(SCTLR_EL2=M, TCR_EL2=16), "TTBR0_EL2"),
        (regs(HCR_EL2=VM, VTCR_EL2=(1 << 33) | (1 << 32) | (1 << 6) | 12, VTTBR_EL2=0), "SL2"),
        (regs(HCR_EL2=VM, VTCR_EL2=(3 << 6) | 25, VTTBR_EL2=0), "FEAT_TTST"),
        (regs(HCR_EL2=VM, VTCR_EL2=(0b01 << 14) | (3 << 6) | 25, VTTBR_EL2=0), "reserved"),
        # 16K level 0 (SL0 = 3) needs DS = 1.
        (regs(HCR_EL2=VM, VTCR_EL2=(0b10 << 14) | (3 << 6) | (0b101 << 16) | 16, VTTBR_EL2=0), "start_level"),
        # 4K level 0 (SL0 = 2) with PAMax 40 bits (PARange 0b0010): AArch64.S2InvalidSL.
        (regs(HCR_EL2=VM, VTCR_EL2=(2 << 6) | (0b010 << 16) | 24, VTTBR_EL2=0,
              ID_AA64MMFR0_EL1=0x2), "start_level"),
        # Level 1 with a 44-bit IPA resolves 14 bits at level 1: more than 9 + 4.
        (regs(HCR_EL2=VM, VTCR_EL2=(1 << 6) | (0b101 << 16) | 20, VTTBR_EL2=0), "start_level"),
        # DS = 1 on a PE without 52-bit 4K support (TGran4 = 0, TGran4_2 = 0).
        (regs(HCR_EL2=VM, VTCR_EL2=(1 << 32) | (2 << 6) | (0b110 << 16) | 12, VTTBR_EL2=0,
              ID_AA64MMFR0_EL1=0x6), "DS"),
        (regs(HCR_EL2=VM, VTCR_EL2=24, VTTBR_EL2=0, ID_AA64MMFR0_EL1=0xF << 28), "TG0"),  # no 4K
        (regs(ID_AA64MMFR0_EL1=0x7), "PARange"),
        ({"SCTLR_EL2": 0, "HCR_EL2": 0}, "ID_AA64MMFR0_EL1"),
    ],
)
def test_refusals_name_the_field(values: dict[str, int], needle: str) -> None:
    with pytest.raises(RegisterDecodeError, match=needle) as info:
        regimes_from_registers(values)
    assert isinstance(info.value, InputError)


# -- the other ranges: EL2&0's TTBR1_EL2 (a VHE host kernel), EL1&0 (TTBR0/1_EL1) -------------------

# Linux 6.12's TCR_EL1 / VHE TCR_EL2 on -cpu max (measured): 4K both ranges, T0SZ = T1SZ = 12 (52-bit
# VAs, DS = 1), EPD0 = EPD1 = 0, HA = 1.
LINUX_TCR = 0x095001F6B54C350C


def _tcr_e2h(t0sz: int, tg0: int, t1sz: int, tg1: int, epd0: int = 0, epd1: int = 0, ips: int = 5,
             sh1: int = 3) -> int:
    return (t0sz | epd0 << 7 | tg0 << 14 | t1sz << 16 | epd1 << 23 | sh1 << 28 | tg1 << 30 | ips << 32)


def test_vhe_host_kernel_range_through_ttbr1_el2() -> None:
    tcr = _tcr_e2h(t0sz=16, tg0=0b00, t1sz=25, tg1=0b01)  # lower 4K 48 bits; upper 16K 39 bits
    found = regimes_from_registers(regs(SCTLR_EL2=M, HCR_EL2=E2H, TCR_EL2=tcr, TTBR0_EL2=0x4000_0000,
                                        TTBR1_EL2=0x4100_0000 | (7 << 48), MAIR_EL2=0xFF))
    lower, upper = found
    assert (lower.name, upper.name) == ("el2&0", "el2&0:ttbr1")
    assert (lower.geom.granule.label, lower.geom.ia_bits, lower.va_base, lower.root) == ("4K", 48, 0, 0x4000_0000)
    assert (upper.geom.granule.label, upper.geom.ia_bits, upper.root, upper.base) == ("16K", 39, 0x4100_0000,
                                                                                       "TTBR1_EL2")
    assert upper.va_base == (1 << 64) - (1 << 39) and upper.upper and not lower.upper
    assert upper.local(upper.va_base + 0x1234) == 0x1234 and upper.local(0x1234) >= 1 << 39
    assert upper.sh0 == 3  # SH1
    view = upper.as_lower_range()  # the same walk through TTBR0: T1SZ, TG1 as TG0, SH1 ... moved
    assert (view & 0x3F, (view >> 14) & 3, (view >> 12) & 3, (view >> 7) & 1, (view >> 23) & 1) == (25, 0b10, 3, 0, 1)
    assert lower.as_lower_range() == tcr
    # Without TTBR1_EL2 read, or with EPD1 = 1, there is no upper range.
    assert [r.name for r in regimes_from_registers(regs(SCTLR_EL2=M, HCR_EL2=E2H, TCR_EL2=tcr,
                                                        TTBR0_EL2=0, MAIR_EL2=0))] == ["el2&0"]
    assert [r.name for r in regimes_from_registers(regs(SCTLR_EL2=M, HCR_EL2=E2H, TCR_EL2=tcr | 1 << 23,
                                                        TTBR0_EL2=0, TTBR1_EL2=0, MAIR_EL2=0))] == ["el2&0"]


def test_el1_regime_when_its_mmu_is_on() -> None:
    el1 = {"SCTLR_EL1": M | 1 << 19, "TCR_EL1": LINUX_TCR, "TTBR0_EL1": 0x41EFD000, "TTBR1_EL1": 0x41EFE001,
           "MAIR_EL1": 0x40044FFFF}
    found = regimes_from_registers(regs(SCTLR_EL2=M, TCR_EL2=NVHE_TCR, TTBR0_EL2=0x4000_0000, MAIR_EL2=0, **el1))
    assert [r.name for r in found] == ["el2", "el1&0", "el1&0:ttbr1"]
    _, low, high = found
    assert (low.control, low.base, low.sctlr, low.mair) == ("TCR_EL1", "TTBR0_EL1", "SCTLR_EL1", 0x40044FFFF)
    assert low.wxn and high.wxn  # SCTLR_EL1.WXN (bit 19), not SCTLR_EL2's
    assert (high.geom.ia_bits, high.geom.start_level, high.geom.lpa2) == (52, -1, True)
    assert high.va_base == 0xFFF0_0000_0000_0000 and high.root == 0x41EFE000
    # MMU off at EL1: no EL1&0 regime; EPD0 = 1: the upper range alone.
    off = regimes_from_registers(regs(SCTLR_EL2=M, TCR_EL2=NVHE_TCR, TTBR0_EL2=0, MAIR_EL2=0,
                                      **{**el1, "SCTLR_EL1": 0}))
    assert [r.name for r in off] == ["el2"]
    epd0 = regimes_from_registers(regs(**{**el1, "TCR_EL1": LINUX_TCR | 1 << 7}))
    assert [r.name for r in epd0] == ["el1&0:ttbr1"]


@pytest.mark.parametrize(("tcr", "field"), [
    (_tcr_e2h(16, 0, 16, 0b00), "TCR_EL1.TG1"),  # TG1 0b00 is reserved
    (_tcr_e2h(16, 0, 16, 0b10) | 1 << 42, "TCR_EL1.HPD1"),  # hierarchical permissions disabled
    (_tcr_e2h(16, 0, 16, 0b10) | 1 << 41, "TCR_EL1.HPD0"),
    (_tcr_e2h(16, 0, 50, 0b10), "TCR_EL1.T1SZ"),  # a 14-bit upper range
])
def test_el1_refusals_name_the_field(tcr: int, field: str) -> None:
    with pytest.raises(RegisterDecodeError, match=field.replace(".", r"\.")):
        regimes_from_registers(regs(SCTLR_EL1=M, TCR_EL1=tcr, TTBR0_EL1=0, TTBR1_EL1=0, MAIR_EL1=0))


def test_both_ranges_tcr_puts_a_range_in_ttbr1() -> None:
    """as_both_ranges: TTBR1's fields take this range's walk, TTBR0's the same geometry, both walk."""
    tcr = _tcr_e2h(t0sz=16, tg0=0b00, t1sz=25, tg1=0b01, epd1=0)
    lower, upper = regimes_from_registers(regs(SCTLR_EL2=M, HCR_EL2=E2H, TCR_EL2=tcr | 1 << 37,  # TBI0
                                               TTBR0_EL2=0x4000_0000, TTBR1_EL2=0x4100_0000, MAIR_EL2=0xFF))

    def fields(v: int) -> tuple[int, ...]:  # T0SZ, TG0, T1SZ, TG1, EPD0, EPD1, TBI0, TBI1, SH0, SH1
        return (v & 0x3F, (v >> 14) & 3, (v >> 16) & 0x3F, (v >> 30) & 3, (v >> 7) & 1, (v >> 23) & 1,
                (v >> 37) & 1, (v >> 38) & 1, (v >> 12) & 3, (v >> 28) & 3)

    assert fields(lower.as_both_ranges()) == (16, 0b00, 16, 0b10, 0, 0, 1, 1, 0, 0)  # 4K 48 bits twice
    assert fields(upper.as_both_ranges()) == (25, 0b10, 25, 0b01, 0, 0, 0, 0, 3, 3)  # 16K 39 bits twice
    assert lower.upper_base == (1 << 64) - (1 << 48) and upper.upper_base == upper.va_base
    assert lower.as_both_ranges() >> 32 & 7 == 5  # the rest (IPS) kept
    nvhe = regimes_from_registers(regs(SCTLR_EL2=M, TCR_EL2=NVHE_TCR, TTBR0_EL2=0x4000_0000, MAIR_EL2=0))[0]
    with pytest.raises(ValueError, match="one range"):
        nvhe.as_both_ranges()


@pytest.mark.parametrize(("e2h", "ha_bit", "hd_bit"), [(False, 21, 22), (True, 39, 40)])
def test_hardware_af_and_dirty_from_tcr(e2h: bool, ha_bit: int, hd_bit: int) -> None:
    """TCR_EL2.HA/HD in either layout; HD counts only with HA; VTCR_EL2.HA for stage 2, no HD."""
    base = _tcr_e2h(t0sz=16, tg0=0b00, t1sz=16, tg1=0b10, epd1=1) if e2h else NVHE_TCR
    for bits, want in ((0, (False, False)), (1 << ha_bit, (True, False)), (1 << hd_bit, (False, False)),
                       (1 << ha_bit | 1 << hd_bit, (True, True))):
        (r,) = regimes_from_registers(regs(SCTLR_EL2=M, HCR_EL2=E2H if e2h else 0, TCR_EL2=base | bits,
                                           TTBR0_EL2=0x4000_0000, MAIR_EL2=0))
        assert (r.ha, r.hd) == want, hex(bits)
        assert r.walk_options() == {"sh0": r.sh0, "wxn": False, "ha": want[0], "hd": want[1]}
