"""Descriptor encodings: known values from the Arm ARM layout, and round trips for every field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.arch import descriptors as d
from harness.arch.geometry import Granule, Stage


def test_known_table_and_page_encodings() -> None:
    assert d.table_pte(0x4800_1000, Granule.K4) == 0x4800_1003
    assert d.leaf_pte(0x4000_1000, 0, 3, Granule.K4) == 0x4000_1003  # page: bits 1:0 = 0b11
    assert d.leaf_pte(0x4020_0000, 0, 2, Granule.K4) == 0x4020_0001  # block: bits 1:0 = 0b01


def test_known_stage1_attributes() -> None:
    # AttrIndx 1, AP 0b11 (read-only), SH inner, AF, XN.
    attrs = d.encode_fields(Stage.S1, AttrIndx=1, AP=3, SH=3, AF=1, XN=1)
    assert attrs == (1 << 2) | (3 << 6) | (3 << 8) | (1 << 10) | (1 << 54)


def test_known_stage2_attributes() -> None:
    attrs = d.encode_fields(Stage.S2, MemAttr=0xF, S2AP=3, SH=3, AF=1, XN=2)
    assert attrs == (0xF << 2) | (3 << 6) | (3 << 8) | (1 << 10) | (1 << 54)


def test_64k_52bit_output_address() -> None:
    pa = 0xF_FFFF_F234_0000
    pte = d.leaf_pte(pa, 0, 2, Granule.K64) & ~0x1FFFFFFF_FFFF0000 | d.phys_to_pte(pa & ~0x1FFFFFFF, Granule.K64)
    pte = d.phys_to_pte(0xF_FFFF_E000_0000, Granule.K64) | 1
    assert (pte >> 12) & 0xF == 0xF  # PA[51:48] in bits [15:12]
    assert d.pte_to_phys(pte, Granule.K64) == 0xF_FFFF_E000_0000
    assert pa  # keep the example value visible


def test_output_address_limits() -> None:
    with pytest.raises(ValueError, match="48 bits"):
        d.phys_to_pte(1 << 48, Granule.K4)
    with pytest.raises(ValueError, match="aligned"):
        d.phys_to_pte(0x4000_0800, Granule.K4)
    with pytest.raises(ValueError, match="AttrIndx"):
        d.encode_fields(Stage.S1, AttrIndx=8)
    with pytest.raises(ValueError, match="MemAttr"):
        d.encode_fields(Stage.S1, MemAttr=1)


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_every_field_round_trips(stage: Stage) -> None:
    for f in d.fields_of(stage):
        for value in {0, 1, f.max, f.max >> 1}:
            word = d.encode_fields(stage, **{f.name: value})
            dec = d.decode(d.leaf_pte(0x4000_0000, word, 3, Granule.K4), 3, Granule.K4, stage, (1, 2))
            assert dec.fields[f.name] == value, f.name
            others = {k: v for k, v in dec.fields.items() if k != f.name}
            assert not any(others.values()), (f.name, others)


@given(st.sampled_from(list(Granule)), st.integers(min_value=0, max_value=(1 << 52) - 1), st.integers(0, 3))
def test_address_round_trip(granule: Granule, pa: int, level: int) -> None:
    limit = 52 if granule is Granule.K64 else 48
    pa = (pa & ((1 << limit) - 1)) & ~(granule.size - 1)
    pte = d.leaf_pte(pa, 0, level, granule)
    assert d.pte_to_phys(pte, granule) == pa
    assert d.pte_to_phys(d.table_pte(pa, granule), granule) == pa


def test_kinds() -> None:
    levels = (1, 2)
    assert d.kind(0, 2, levels) is d.Kind.INVALID
    assert d.kind(0b11, 2, levels) is d.Kind.TABLE
    assert d.kind(0b01, 2, levels) is d.Kind.BLOCK
    assert d.kind(0b01, 0, levels) is d.Kind.RESERVED  # no level-0 blocks with 4K
    assert d.kind(0b11, 3, levels) is d.Kind.PAGE
    assert d.kind(0b01, 3, levels) is d.Kind.RESERVED  # level 3 with bit 1 clear
    assert d.is_table(0b11, 2) and not d.is_table(0b11, 3)
