"""VMSAv8-64 translation table descriptors (Arm ARM D8.3), DS = 0 and DS = 1 (FEAT_LPA2).

Bit 0 is valid. Bit 1 selects table (levels -1..2) or page (level 3) when set, block when clear
at a level that allows blocks. The output (or next-level table) address lives in bits [47:g];
with the 64K granule and FEAT_LPA, OA[51:48] sits in bits [15:12]. With DS = 1 (4K and 16K),
bits [49:g] hold OA[49:g] and bits [9:8] hold OA[51:50] (no SH field in the descriptor: the
shareability is TCR/VTCR SH0's). Upper and lower attributes of leaves differ between stage 1
and stage 2; software may use bits [58:55].

The address helpers (:func:`descriptor_oa`) work on ints and on numpy ``uint64`` arrays alike,
so the scalar and the batch walks share one definition.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from harness.arch.bits import Field, bit, genmask
from harness.arch.geometry import LAST_LEVEL, Granule, Stage, oa_format_bits

VALID = bit("valid", 0)
TYPE = bit("type", 1)  # 1: table (level < 3) or page (level 3); 0: block
TYPE_TABLE = 1
TYPE_PAGE = 1
TYPE_BLOCK = 0

OA_51_48 = Field("oa[51:48]", 15, 12)  # 64K granule only (FEAT_LPA)
OA_51_50_LPA2 = Field("oa[51:50]", 9, 8)  # 4K/16K with DS = 1 (where SH is with DS = 0)
OA_HI_LPA2 = 49  # with DS = 1, descriptor bits [49:g] are OA[49:g]
OA_HI = 47  # otherwise bits [47:g]
SW = Field("sw", 58, 55)

# Table descriptor hierarchical attributes (stage 1 only; RES0/ignored at stage 2).
PXN_TABLE = bit("PXNTable", 59)
XN_TABLE = bit("XNTable", 60)
AP_TABLE = Field("APTable", 62, 61)
NS_TABLE = bit("NSTable", 63)

# Leaf attributes common to both stages.
SH = Field("SH", 9, 8)
AF = bit("AF", 10)
CONTIG = bit("contiguous", 52)

# Stage-1 leaf attributes.
S1_ATTRINDX = Field("AttrIndx", 4, 2)
S1_NS = bit("NS", 5)
S1_AP = Field("AP", 7, 6)
S1_NG = bit("nG", 11)
S1_PXN = bit("PXN", 53)  # EL2's execute-never in the EL2&0 regime; RES0 in the EL2 regime
S1_XN = bit("XN", 54)  # XN in the EL2 single-range regime
S1_UXN = bit("UXN", 54)  # the same bit in the EL2&0 regime (E2H = 1): EL0's execute-never
# Guarded Page (FEAT_BTI, Arm ARM D8.3 "Stage 1 attribute fields in Block and Page descriptors":
# GP, bit [50]): instruction fetches from the page are subject to branch target checks. With DS = 1
# bit 50 is still GP (the output address reaches only bit 49 there).
S1_GP = bit("GP", 50)
# Dirty Bit Modifier (FEAT_HAFDBS): with TCR.HD = 1 (and HA = 1) a write to a leaf with DBM = 1 and
# AP[2] = 1 ("writable-clean") is permitted, and the MMU clears AP[2]; without HD it is ignored.
S1_DBM = bit("DBM", 51)

# Stage-2 leaf attributes.
S2_MEMATTR = Field("MemAttr", 5, 2)
S2_AP = Field("S2AP", 7, 6)
S2_XN = Field("XN", 54, 53)  # bit 54 alone without FEAT_XNX

LEAF_ATTR_LO = genmask(11, 2)
LEAF_ATTR_HI = genmask(63, 51)

S1_FIELDS: tuple[Field, ...] = (S1_ATTRINDX, S1_NS, S1_AP, SH, AF, S1_NG, CONTIG, S1_PXN, S1_XN, SW)
S1_FIELDS_E2H: tuple[Field, ...] = tuple(S1_UXN if f is S1_XN else f for f in S1_FIELDS)
S2_FIELDS: tuple[Field, ...] = (S2_MEMATTR, S2_AP, SH, AF, CONTIG, S2_XN, SW)


class Shareability(enum.IntEnum):
    NON = 0
    OUTER = 2
    INNER = 3


class S1AP(enum.IntEnum):
    """Stage-1 AP[2:1] in the EL2 regime: AP[1] is RES1, AP[2] selects read-only."""

    RW = 0b01
    RO = 0b11


class S1AP_E2H(enum.IntEnum):
    """Stage-1 AP[2:1] in the EL2&0 regime (E2H = 1): AP[2] read-only, AP[1] EL0 access.
    KVM's hVHE hyp mappings use RW_EL0_NONE and RO_EL0_NONE."""

    RW_EL0_NONE = 0b00
    RW_EL0_RW = 0b01
    RO_EL0_NONE = 0b10
    RO_EL0_RO = 0b11


class S2AP(enum.IntEnum):
    NONE = 0b00
    RO = 0b01
    WO = 0b10
    RW = 0b11


class S2MemAttr(enum.IntEnum):
    """Stage-2 MemAttr[3:0] without FEAT_S2FWB."""

    DEVICE_nGnRnE = 0x0
    DEVICE_nGnRE = 0x1
    NORMAL_NC = 0x5
    NORMAL_WB = 0xF


class S2MemAttrFWB(enum.IntEnum):
    """Stage-2 MemAttr[3:0] with FEAT_S2FWB and HCR_EL2.FWB = 1 (Arm ARM DDI 0487K.a, D8.6 "Stage 2
    memory type and Cacheability attributes when FEAT_S2FWB is enabled"): MemAttr[2] = 0 is Device
    with MemAttr[1:0] the device type (Table D8-04: 0b00 nGnRnE, 0b01 nGnRE, 0b10 nGRE, 0b11 GRE);
    MemAttr[2] = 1 is Normal with MemAttr[1:0] 0b01 Non-cacheable, 0b10 Write-Back (forced,
    whatever stage 1 says), 0b11 the stage-1 attributes. MemAttr[3] is not used (0 here)."""

    DEVICE_nGnRnE = 0b0000
    DEVICE_nGnRE = 0b0001
    NORMAL_NC = 0b0101
    NORMAL_WB = 0b0110
    AS_S1 = 0b0111


S2_XN_EXEC = 0b00
S2_XN_NEVER = 0b10


Word = TypeVar("Word", int, npt.NDArray[np.integer[Any]])


def oa_mask(granule: Granule, lpa2: bool = False) -> int:
    """Bits [47:g] (DS = 1: [49:g]) of a descriptor that hold the output / next-level address."""
    return genmask(OA_HI_LPA2 if lpa2 else OA_HI, granule.shift)


def descriptor_oa(desc: Word, granule: Granule, lpa2: bool = False, with_oa_hi: bool = True) -> Word:
    """The output (or next-table) address a descriptor holds, as the walk reads it: bits [47:g];
    with 64K, OA[51:48] from bits [15:12]; with DS = 1, bits [49:g] and OA[51:50] from bits
    [9:8]. ``with_oa_hi`` False leaves out that high field ([15:12] or [9:8]): QEMU's reading
    below a 52-bit PA size. The address is not aligned to a block's size (its low RES0 bits are
    kept, as the raw-bits size check needs)."""
    oa = desc & oa_mask(granule, lpa2)
    if granule is Granule.K64 and with_oa_hi:
        oa |= ((desc >> OA_51_48.lo) & OA_51_48.max) << 48
    if lpa2 and with_oa_hi:
        oa |= ((desc >> OA_51_50_LPA2.lo) & OA_51_50_LPA2.max) << 50
    return oa


def pte_to_phys(pte: int, granule: Granule, lpa2: bool = False) -> int:
    """``kvm_pte_to_phys``: the address in a descriptor (LPA2 form with ``lpa2``)."""
    return descriptor_oa(pte, granule, lpa2)


def phys_to_pte(pa: int, granule: Granule, lpa2: bool = False) -> int:
    """``kvm_phys_to_pte``: encode an output address; raises if it is unaligned or does not fit
    the descriptor format (52 bits with 64K or DS = 1, else 48)."""
    if pa & ((1 << granule.shift) - 1):
        raise ValueError(f"pa: {pa:#x} is not aligned to the {granule.label} granule")
    limit = oa_format_bits(granule, lpa2)
    if pa >> limit:
        raise ValueError(
            f"pa: {pa:#x} needs more than {limit} bits; the {granule.label} granule "
            f"{'with' if lpa2 else 'without'} FEAT_LPA2 encodes output addresses up to {limit} bits"
        )
    pte = pa & oa_mask(granule, lpa2)
    if granule is Granule.K64:
        pte |= OA_51_48.prep(pa >> 48)
    if lpa2:
        pte |= OA_51_50_LPA2.prep(pa >> 50)
    return pte


class Kind(enum.Enum):
    INVALID = "invalid"
    TABLE = "table"
    BLOCK = "block"
    PAGE = "page"
    RESERVED = "reserved"  # valid, but a type the level does not allow


def kind(pte: int, level: int, block_levels: tuple[int, ...]) -> Kind:
    if not VALID.get(pte):
        return Kind.INVALID
    if level == LAST_LEVEL:
        return Kind.PAGE if TYPE.get(pte) == TYPE_PAGE else Kind.RESERVED
    if TYPE.get(pte) == TYPE_TABLE:
        return Kind.TABLE
    return Kind.BLOCK if level in block_levels else Kind.RESERVED


def is_valid(pte: int) -> bool:
    return bool(VALID.get(pte))


def is_table(pte: int, level: int) -> bool:
    """The walker's notion (as kvm_pte_table): a valid entry with bit 1 set above level 3."""
    return level != LAST_LEVEL and is_valid(pte) and TYPE.get(pte) == TYPE_TABLE


def table_pte(table_pa: int, granule: Granule, lpa2: bool = False) -> int:
    return phys_to_pte(table_pa, granule, lpa2) | TYPE.prep(TYPE_TABLE) | VALID.prep(1)


def leaf_attr_mask(lpa2: bool = False) -> int:
    """Leaf attribute bits: [11:2] and [63:51]; with DS = 1 bits [9:8] are OA[51:50], not SH."""
    mask = LEAF_ATTR_LO | LEAF_ATTR_HI
    return mask & ~SH.mask if lpa2 else mask


def leaf_pte(pa: int, attrs: int, level: int, granule: Granule, lpa2: bool = False) -> int:
    """A block (levels -1..2) or page (level 3) descriptor with the given attribute bits."""
    typ = TYPE_PAGE if level == LAST_LEVEL else TYPE_BLOCK
    attrs &= leaf_attr_mask(lpa2)
    return phys_to_pte(pa, granule, lpa2) | attrs | TYPE.prep(typ) | VALID.prep(1)


def leaf_attrs(pte: int, lpa2: bool = False) -> int:
    return pte & leaf_attr_mask(lpa2)


def fields_of(stage: Stage, lpa2: bool = False, e2h: bool = False) -> tuple[Field, ...]:
    """The leaf fields by name: without SH with DS = 1; bit 54 named UXN in the EL2&0 regime."""
    fields = (S1_FIELDS_E2H if e2h else S1_FIELDS) if stage is Stage.S1 else S2_FIELDS
    return tuple(f for f in fields if f is not SH) if lpa2 else fields


def encode_fields(stage: Stage, **values: int) -> int:
    """Attribute bits from named fields, e.g. ``encode_fields(Stage.S1, AttrIndx=1, AF=1)``."""
    by_name = {f.name: f for f in fields_of(stage)}
    word = 0
    for name, value in values.items():
        if name not in by_name:
            raise ValueError(
                f"{name}: not a stage-{int(stage)} leaf field; expected one of {', '.join(by_name)}"
            )
        word |= by_name[name].prep(value)
    return word


@dataclass(frozen=True)
class Decoded:
    """A descriptor taken apart: its kind at a level, address, and named attribute fields."""

    raw: int
    level: int
    kind: Kind
    address: int
    fields: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"{self.raw:#018x} L{self.level} {self.kind.value}"]
        if self.kind in (Kind.TABLE, Kind.BLOCK, Kind.PAGE):
            parts.append(f"-> {self.address:#x}")
        parts.extend(f"{k}={v:#x}" for k, v in self.fields.items() if v)
        return " ".join(parts)


def decode(pte: int, level: int, granule: Granule, stage: Stage, block_levels: tuple[int, ...],
           lpa2: bool = False, e2h: bool = False) -> Decoded:
    k = kind(pte, level, block_levels)
    addr = pte_to_phys(pte, granule, lpa2) if k is not Kind.INVALID else 0
    fields: dict[str, int] = {}
    if k in (Kind.BLOCK, Kind.PAGE):
        fields = {f.name: f.get(pte) for f in fields_of(stage, lpa2, e2h)}
    elif k is Kind.TABLE and stage is Stage.S1:
        fields = {f.name: f.get(pte) for f in (PXN_TABLE, XN_TABLE, AP_TABLE, NS_TABLE)}
    return Decoded(pte, level, k, addr, fields)
