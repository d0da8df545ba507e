"""The architectural translation table walk, as an MMU performs it (scalar form).

:func:`translate` reads raw descriptors from memory exactly as the Arm ARM (DDI 0487) MMU walks
them, independent of how the tables were built, and returns a :class:`Translation`: either the
output address with its attributes and permissions, or the fault an ``AT`` instruction would
report, together with every step of the walk for mismatch reports. :func:`expected_par` gives the
PAR_EL1 value an ``AT`` would leave, and :func:`par_compare_mask` which of its bits are
architecturally defined here (the bits a differential check may compare).

Regimes (see :mod:`harness.arch.registers` for the register values the harness programs):

* Stage 1 is the EL2 regime with HCR_EL2.E2H = 0: one VA range through TTBR0_EL2, TBI = 0.
  AP[1] is RES1 (only AP[2], read-only,
  matters), XN is bit 54, PXN and PXNTable are RES0 (ignored); the table attributes APTable[1]
  (bit 62: subtree read-only) and XNTable (bit 60) apply hierarchically. ``AT S1E2R/W``.
* Stage 1 with ``geom.e2h`` is the EL2&0 regime (HCR_EL2.E2H = 1, TGE = 0: KVM's hVHE), the
  accesses being EL2's (privileged) with PSTATE.PAN = 0: AP[2] selects read-only, AP[1] grants
  EL0 access and does not restrict EL2 reads or writes; EL2 fetches obey PXN (bit 53) and
  PXNTable (bit 59), and memory writable at EL0 (AP = 0b01) is never executable at EL2; UXN
  (bit 54) and UXNTable (bit 60) concern EL0 only.
* EL0 of the EL2&0 regime (``el0=True``: ``AT S1E0R/W`` at EL2 with HCR_EL2.{E2H, TGE} = {1, 1},
  and EL0's own accesses): AP[1] grants EL0 access unless APTable[0] was set on the way down;
  AP[2] or APTable[1] make it read-only; UXN or UXNTable forbid EL0 fetches, AP[1] or not
  (execute-only memory); with WXN, memory writable at EL0 is execute-never at EL0
  (:func:`s1_el0_perms`). The same rules are EL1&0's EL0 view.
* SCTLR_EL2.WXN (``wxn=True``, stage 1 only; Linux sets it): memory writable at EL2 is
  execute-never at EL2, whatever XN/PXN say (:func:`wxn_executable`). ``AT`` cannot observe it
  (it has no instruction-fetch form); the default ``wxn=False`` is what the harness's own
  firmware programs.
* Hardware updates (FEAT_HAFDBS, off by default as the harness's own firmware runs): ``ha``
  (TCR/VTCR.HA) - a leaf with AF = 0 takes no Access flag fault (the MMU sets AF); ``hd``
  (TCR.HD, only with HA; stage 1) - a write to a leaf with DBM = 1 is permitted where AP[2] alone
  forbids it (the MMU clears AP[2]; APTable[1] still forbids it). Reads and fetches see the
  descriptor as it is: WXN and the EL2&0 rule for EL0-writable memory use AP[2] unchanged (QEMU
  10 clears AP[2] for stores only, before the permission check). Linux sets both on the CPUs
  that have them (a VHE host's TCR_EL2; its user pages are writable-clean until written).
* Stage 2 is the EL1&0 stage 2 with EL1's stage 1 off and HCR_EL2.DC = 1, so the IPA is the VA
  and the stage-1 attributes are Normal write-back non-shareable: the combined attributes are
  stage 2's. S2AP[0] allows reads, S2AP[1] writes; XN[54:53] (FEAT_XNX) for EL1 fetches.
  ``AT S12E1R/W``.

Fault and level conventions (Arm ARM pseudocode, and QEMU 10.0 ``get_phys_addr_lpae``):

* Input address >= 2**ia_bits: Translation fault at level 0, for both stages (the walk never
  starts; the Arm ARM reports level 0, QEMU sets ``level = 0`` before the range check). At stage
  2, an address at or above 2**PAMax (52 bits here) is first caught by the disabled EL1 stage 1:
  a stage-1 Address size fault at level 0 (PAR_EL1.S = 0).
* A table base (TTBR) beyond the PA size: Address size fault at level 0.
* bit 0 clear, or bit 1 clear at level 3 or at a level without blocks
  (:attr:`Geometry.block_levels`): Translation fault at that level.
* Output or next-table address bits at or above the PA size (raw descriptor bits [47:pa_bits],
  before aligning a block's address): Address size fault at the level of that descriptor.
* The final output address (a block's base plus the input's offset in it) at or above the PA
  size: Address size fault at the leaf level (``AArch64.OAOutOfRange`` on the stage's output
  address; reachable only with blocks larger than 2**PS, e.g. a 64K level-1 block with PS = 36).
  QEMU 10 checks only the descriptor's bits: ``qemu=WalkSemantics(final_oa_unchecked=True)``.
* FEAT_LPA2 (``geom.lpa2``, DS = 1): OA[51:50] in descriptor bits [9:8], OA[49:48] in [49:48],
  for next-table addresses too; the shareability is TCR/VTCR SH0 (``sh0``), not the descriptor.
  The Arm ARM reads bits [9:8] whatever the PA size, so a nonzero value with PS under 52 bits is
  an Address size fault. QEMU 10 reads them only when PS = 52 bits and otherwise ignores them
  (in table descriptors too), while bits [49:48] are read and checked against PS as the Arm ARM
  says: ``qemu=WalkSemantics(lpa2_oa=True)`` models that known divergence.
* The initial table's base is aligned to the table's size (at least 64 bytes for a 52-bit base):
  :attr:`Geometry.root_align`.
* 4K/16K granule (DS = 0): descriptor bits [50:48] are RES0 and take no part in the address
  (bit 51 is DBM); nonzero values are ignored by the Arm ARM pseudocode (``AArch64.LeafBase``,
  ``NextTableBase`` take bits [47:g]) and by QEMU 10.
* 64K granule: with FEAT_LPA (PAMax = 52) bits [15:12] are OA[51:48] whatever the PA size, so a
  nonzero value with a PA size under 52 bits is an Address size fault (Arm ARM). QEMU 10 only
  reads them when PS = 52 bits and otherwise ignores them: ``qemu=WalkSemantics(lpa_oa=True)``
  models that known divergence.
* Leaf with AF = 0 (and HA = 0): Access flag fault at the leaf level; it takes priority over a Permission
  fault (Arm ARM ``AArch64.S1Translate``/QEMU check AF first).
* Access not allowed: Permission fault at the leaf level.
* A descriptor read outside ``mem``: no architectural outcome is predicted (the real memory
  there is unknown to the model): :attr:`Translation.unmodelled` is set, with the level in
  :attr:`Translation.fault_level`. :func:`par_compare_mask` is 0 for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Protocol, overload

import numpy as np
import numpy.typing as npt

from harness.arch.descriptors import (
    AF,
    AP_TABLE,
    PXN_TABLE,
    S1_AP,
    S1_ATTRINDX,
    S1_DBM,
    S1_PXN,
    S1_UXN,
    S1_XN,
    S2_AP,
    S2_MEMATTR,
    S2_XN,
    S2AP,
    SH,
    TYPE,
    VALID,
    XN_TABLE,
    Decoded,
    Shareability,
    Word,
    decode,
    descriptor_oa,
)
from harness.arch.geometry import (
    ENTRY_BYTES,
    LAST_LEVEL,
    WIDE_ADDRESS_BITS,
    Geometry,
    Granule,
    Stage,
)
from harness.arch.registers import (
    PAR_ATTR,
    PAR_F,
    PAR_FST,
    PAR_NS,
    PAR_PA,
    PAR_PTW,
    PAR_RES1,
    PAR_S,
    PAR_SH,
    SH_INNER,
    FaultKind,
    fault_status,
    mair_attr,
    mair_value,
)

DEFAULT_MAIR = mair_value()

U64s = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]

# PAR_EL1 bits an AT defines in this setting: the ones a differential check compares.
PAR_COMPARE_MASK_OK = PAR_F.mask | PAR_PA.mask | PAR_ATTR.mask | PAR_SH.mask | PAR_NS.mask
PAR_COMPARE_MASK_FAULT = PAR_F.mask | PAR_FST.mask | PAR_S.mask | PAR_PTW.mask

class Access(enum.Enum):
    """The access being translated. AT S1E2R/S12E1R read; S1E2W/S12E1W write."""

    READ = "read"
    WRITE = "write"
    EXEC = "exec"  # an instruction fetch from EL2 (stage 1) or EL1 (stage 2); no AT form


READ = Access.READ
WRITE = Access.WRITE
EXEC = Access.EXEC

# The effective permissions of a translation (:attr:`Translation.perms`, the batch ``perms``):
# which accesses the regime grants, after hierarchical table attributes. Not the requested
# mapping protection (:class:`harness.core.prot.Prot`) nor a descriptor field (``S2AP``).
PERM_R = 1
PERM_W = 2
PERM_X = 4
_ACCESS_PERM = {Access.READ: PERM_R, Access.WRITE: PERM_W, Access.EXEC: PERM_X}


def access_perm(access: Access) -> int:
    return _ACCESS_PERM[access]


class Memory(Protocol):
    """What the walk reads tables from (a :class:`harness.core.memory.PagePool` fits)."""

    def read64(self, pa: int) -> int: ...

    def contains(self, pa: int) -> bool: ...


def pamax(geom: Geometry) -> int:
    """The PE's physical address size (ID_AA64MMFR0_EL1.PARange; 52 bits on QEMU ``-cpu max``)."""
    return geom.pamax


@dataclass(frozen=True)
class WalkSemantics:
    """QEMU 10's declared departures from the Arm ARM's walk, the ``qemu`` keyword of both walks
    (:func:`translate`, :func:`harness.core.batch.translate_batch`); :data:`ARM_ARM` (all False)
    is the Arm ARM's walk. See the module notes for each.

    * ``lpa_oa``: 64K granule with FEAT_LPA, PS under 52 bits: descriptor bits [15:12] ignored
      (not OA[51:48]).
    * ``lpa2_oa``: DS = 1, PS under 52 bits: descriptor bits [9:8] ignored (not OA[51:50]), in
      tables and leaves; OA[49:48] in bits [49:48] still read and checked.
    * ``final_oa_unchecked``: only the descriptor's address is checked against PS, not the final
      output address (a block's base plus the input's offset in it)."""

    lpa_oa: bool = False
    lpa2_oa: bool = False
    final_oa_unchecked: bool = False

    def __or__(self, other: WalkSemantics) -> WalkSemantics:
        """Both sets of departures (a walk may meet two)."""
        return WalkSemantics(self.lpa_oa or other.lpa_oa, self.lpa2_oa or other.lpa2_oa,
                             self.final_oa_unchecked or other.final_oa_unchecked)

    @property
    def departs(self) -> bool:
        """Whether this walk is not the Arm ARM's."""
        return self != ARM_ARM


ARM_ARM = WalkSemantics()


def oa_hi_included(geom: Geometry, qemu: WalkSemantics = ARM_ARM) -> bool:
    """Whether the walk reads the descriptor's high output-address field: bits [15:12] as
    OA[51:48] (64K granule with FEAT_LPA) or bits [9:8] as OA[51:50] (DS = 1). The Arm ARM reads
    it whatever the PA size; QEMU 10 only when PS = 52 bits (``qemu.lpa_oa`` for 64K,
    ``qemu.lpa2_oa`` for DS = 1; see the module notes)."""
    if geom.lpa2:
        return geom.pa_bits == WIDE_ADDRESS_BITS or not qemu.lpa2_oa
    if geom.granule is not Granule.K64 or not geom.feat_lpa:
        return False
    return geom.pa_bits == WIDE_ADDRESS_BITS or not qemu.lpa_oa


def root_table_base(geom: Geometry, root_pa: int) -> int:
    """The initial table's base as the walk uses it: aligned down to the table's own size (at
    least 64 bytes for a 52-bit base); the low bits of a misaligned base are RES0."""
    return root_pa & ~(geom.root_align - 1)


# ---------------------------------------------------------------------------------------------
# Named predicates of the walk, shared by the scalar and the batch form (ints or uint64 arrays).

_TABLE_XN = 1  # hierarchical restriction: no execution below (XNTable; PXNTable with E2H = 1)
_TABLE_RO = 2  # hierarchical restriction: read-only below (APTable[1])
_TABLE_NO_EL0 = 4  # hierarchical restriction: no EL0 access below (APTable[0], E2H = 1 only)
_TABLE_UXN = 8  # hierarchical restriction: no EL0 execution below (UXNTable, E2H = 1 only)


@overload
def descriptor_faults(desc: int, level: int, block_levels: tuple[int, ...]) -> bool: ...
@overload
def descriptor_faults(desc: U64s, level: int, block_levels: tuple[int, ...]) -> Bools: ...
def descriptor_faults(desc: int | U64s, level: int, block_levels: tuple[int, ...]) -> bool | Bools:
    """Where the descriptor gives a Translation fault at ``level``: invalid (bit 0 clear), or
    bit 1 clear where the level has no blocks (level 3 included)."""
    low = desc & (TYPE.mask | VALID.mask)
    if level in block_levels:
        return (low & VALID.mask) != VALID.mask
    return low != TYPE.mask | VALID.mask


@overload
def descriptor_is_table(desc: int, level: int) -> bool: ...
@overload
def descriptor_is_table(desc: U64s, level: int) -> Bools: ...
def descriptor_is_table(desc: int | U64s, level: int) -> bool | Bools:
    """Where a valid descriptor points to a next-level table (bit 1 set above level 3)."""
    if level == LAST_LEVEL:
        return desc != desc  # False, of the argument's shape
    return (desc & TYPE.mask) != 0


@overload
def oa_out_of_range(oa: int, pa_bits: int) -> bool: ...
@overload
def oa_out_of_range(oa: U64s, pa_bits: int) -> Bools: ...
def oa_out_of_range(oa: int | U64s, pa_bits: int) -> bool | Bools:
    """Where an address has bits at or above the PA size (``AArch64.OAOutOfRange``)."""
    return oa >= 1 << pa_bits


def table_restrictions(desc: Word, e2h: bool) -> Word:
    """The stage-1 hierarchical restrictions a table descriptor adds (_TABLE_XN | _TABLE_RO, and
    _TABLE_NO_EL0 | _TABLE_UXN in the EL2&0 regime, where bit 60 is UXNTable)."""
    xn = PXN_TABLE if e2h else XN_TABLE
    out = ((desc >> xn.lo) & 1) * _TABLE_XN | ((desc >> (AP_TABLE.lo + 1)) & 1) * _TABLE_RO
    if e2h:
        out |= ((desc >> AP_TABLE.lo) & 1) * _TABLE_NO_EL0 | ((desc >> XN_TABLE.lo) & 1) * _TABLE_UXN
    return out


def wxn_executable(x: Word, w: Word, wxn: bool) -> Word:
    """EL2's execute permission (0/1) once SCTLR_EL2.WXN applies: with WXN = 1 a location
    writable at EL2 is execute-never at EL2 (``AArch64.S1DirectBasePermissions`` computes
    ``wxn = WXN AND w AND x`` from the accessing EL's base permissions - EL2's, PAN = 0 - and
    ``AArch64.S1ComputePermissions`` then clears ``x``). In the EL2&0 regime ``x`` already
    excludes memory writable at EL0; WXN looks at EL2's own write permission only."""
    return x & (w ^ 1) if wxn else x


def s1_perms(desc: Word, restrictions: Word, e2h: bool, wxn: bool = False, hd: bool = False) -> Word:
    """EL2's effective permissions for a stage-1 leaf (PERM_R | PERM_W | PERM_X): AP[2] or
    APTable[1] read-only; XN or XNTable forbid fetches (E2H = 0). With E2H = 1 PXN or PXNTable
    forbid EL2 fetches, and so does memory writable at EL0 after the table attributes (AP[2:1] =
    0b01 with neither APTable bit set: ``AArch64.S1DirectBasePermissions``). ``wxn``:
    SCTLR_EL2.WXN (:func:`wxn_executable`). ``hd``: TCR.HD (with HA): DBM = 1 makes the leaf
    writable unless APTable[1] forbids it; execute permission still sees AP[2] as it is."""
    table_ro = (restrictions >> 1) & 1
    ro = ((desc >> (S1_AP.lo + 1)) & 1) | table_ro
    if e2h:
        el0_access = ((desc >> S1_AP.lo) & 1) & (((restrictions >> 2) & 1) ^ 1)
        el0_writable = el0_access & (ro ^ 1)
        xn = ((desc >> S1_PXN.lo) & 1) | (restrictions & _TABLE_XN) | el0_writable
    else:
        xn = ((desc >> S1_XN.lo) & 1) | (restrictions & _TABLE_XN)
    w = ro ^ 1
    w_data = w | ((desc >> S1_DBM.lo) & 1) & (table_ro ^ 1) if hd else w
    return PERM_R | w_data * PERM_W | wxn_executable(xn ^ 1, w, wxn) * PERM_X


def s1_el0_perms(desc: Word, restrictions: Word, wxn: bool = False, hd: bool = False) -> Word:
    """EL0's effective permissions for a leaf of the EL2&0 regime (``AT S1E0R/W`` at EL2 with
    HCR_EL2.{E2H, TGE} = {1, 1}, EL0's own accesses; PERM_R | PERM_W | PERM_X): AP[1] grants EL0
    access unless APTable[0] forbids it below; AP[2] or APTable[1] make it read-only; UXN or
    UXNTable forbid EL0 fetches, whatever AP[1] says (execute-only memory); with ``wxn`` memory
    writable at EL0 is execute-never at EL0 (:func:`wxn_executable` with EL0's write permission).
    ``hd``: DBM = 1 makes an EL0-accessible leaf writable unless APTable[1] forbids it."""
    table_ro = (restrictions >> 1) & 1
    el0 = ((desc >> S1_AP.lo) & 1) & (((restrictions >> 2) & 1) ^ 1)
    w = el0 & ((((desc >> (S1_AP.lo + 1)) & 1) | table_ro) ^ 1)
    w_data = w | el0 & ((desc >> S1_DBM.lo) & 1) & (table_ro ^ 1) if hd else w
    xn = ((desc >> S1_UXN.lo) & 1) | ((restrictions >> 3) & 1)
    return el0 * PERM_R | w_data * PERM_W | wxn_executable(xn ^ 1, w, wxn) * PERM_X


def check_el0(geom: Geometry, el0: bool) -> None:
    """EL0's view is modelled for the EL2&0 regime's stage 1 only (ValueError otherwise: the EL2
    regime has no EL0, and stage 2's EL0 accesses are EL1&0's)."""
    if el0 and (geom.stage is not Stage.S1 or not geom.e2h):
        raise ValueError("el0: EL0's accesses are modelled in the EL2&0 regime (stage 1 with E2H = 1) only")


def check_wxn(geom: Geometry, wxn: bool) -> None:
    """SCTLR_EL2.WXN governs the EL2 and EL2&0 stage 1 only (ValueError for stage 2)."""
    if wxn and geom.stage is not Stage.S1:
        raise ValueError("wxn: SCTLR_EL2.WXN applies to the EL2 stage-1 regimes, not to stage 2")


def check_hafdbs(geom: Geometry, ha: bool, hd: bool) -> None:
    """TCR.HD is modelled for stage 1 only, and only with HA (the Arm ARM manages the dirty state
    only where the Access flag is managed too): ValueError otherwise."""
    if hd and not ha:
        raise ValueError("hd: hardware dirty state is managed only with ha (TCR.HA = 1)")
    if hd and geom.stage is not Stage.S1:
        raise ValueError("hd: stage 2's dirty state (VTCR_EL2.HD, S2 DBM) is not modelled")


def s2_perms(desc: Word) -> Word:
    """EL1's stage-2 permissions: S2AP[0] read, S2AP[1] write; XN[54:53] 0b00 and 0b11 allow
    EL1 fetches (FEAT_XNX)."""
    s2ap = (desc >> S2_AP.lo) & S2_AP.max
    xn = (desc >> S2_XN.lo) & S2_XN.max
    return (s2ap & int(S2AP.RO)) * PERM_R | ((s2ap & int(S2AP.WO)) >> 1) * PERM_W \
        | (((xn ^ (xn >> 1)) & 1) ^ 1) * PERM_X


def leaf_oa(oa: Word, address: Word, size_mask: Word) -> Word:
    """The final output address: the block's (or page's) base and the input's offset in it."""
    return (oa & ~size_mask) | (address & size_mask)


# ---------------------------------------------------------------------------------------------
# Memory attributes.


def s2_attr(memattr: int) -> int:
    """PAR_EL1.ATTR (MAIR encoding) for stage-2 MemAttr combined with a stage 1 that HCR_EL2.DC
    makes Normal inner/outer write-back read/write-allocate (FEAT_S2FWB off).

    Device (MemAttr[3:2] = 0): the stage-2 device type, 0b0000dd00. Normal: per half, stage 2
    non-cacheable gives non-cacheable (0x4), write-through gives write-through with stage 1's
    allocation hints (0xB), write-back keeps stage 1's write-back (0xF).
    """
    outer = (memattr >> 2) & 3
    inner = memattr & 3
    if outer == 0:
        return inner << 2
    nibble = {0: 0xF, 1: 0x4, 2: 0xB, 3: 0xF}  # inner 0 is reserved (see s2_attr_reserved)
    return (nibble[outer] << 4) | nibble[inner]


def s2_attr_reserved(memattr: int) -> bool:
    """MemAttr 0bxx00 with xx != 0 is a reserved (CONSTRAINED UNPREDICTABLE) encoding."""
    return (memattr >> 2) & 3 != 0 and memattr & 3 == 0


def is_outer_shareable_type(attr: int) -> bool:
    """Device, and Normal inner and outer non-cacheable, are always Outer Shareable."""
    return attr & 0xF0 == 0 or attr == 0x44


def par_sh(attr: int, sh: int) -> int:
    """PAR_EL1.SH for memory of attribute byte ``attr`` mapped with descriptor SH ``sh``."""
    return int(Shareability.OUTER) if is_outer_shareable_type(attr) else sh


def sh_unpredictable(attr: int, sh: int) -> bool:
    """Whether PAR_EL1.SH is not architecturally fixed: SH = 0b01 (reserved) for cacheable
    memory, or MAIR 0x40 (FEAT_XS Normal non-cacheable, which QEMU 10 does not force to Outer)."""
    if attr == 0x40:
        return True
    return not is_outer_shareable_type(attr) and sh == 0b01


# ---------------------------------------------------------------------------------------------
# Result types.


@dataclass(frozen=True)
class Step:
    """One descriptor read of the walk."""

    level: int
    table_pa: int
    index: int
    desc_pa: int
    raw: int | None  # None: the read fell outside the modelled memory
    decoded: Decoded | None

    def __str__(self) -> str:
        where = f"L{self.level} table {self.table_pa:#x}[{self.index}] @ {self.desc_pa:#x}"
        if self.raw is None:
            return f"{where}: outside modelled memory"
        return f"{where}: {self.decoded}"


@dataclass(frozen=True)
class Translation:
    """The outcome of one walk: a translation, a fault, or an unmodelled read."""

    stage: Stage
    address: int
    access: Access
    steps: tuple[Step, ...] = ()
    # Fault (fault is None on success and for unmodelled reads).
    fault: FaultKind | None = None
    fault_level: int | None = None
    fault_stage2: bool = False  # PAR_EL1.S
    unmodelled: bool = False
    note: str = ""
    # Leaf (set whenever the walk reached a valid leaf, also for AF/permission faults).
    descriptor: int | None = None
    level: int | None = None
    size: int | None = None
    pa: int | None = None
    attr: int | None = None  # combined attribute byte, MAIR encoding (PAR_EL1.ATTR)
    sh: int | None = None  # descriptor SH (with lpa2: TCR/VTCR SH0)
    perms: int = 0  # PERM_R | PERM_W | PERM_X, effective (table attributes applied)
    # Stage-1 leaf fields.
    attr_index: int | None = None
    ap: int | None = None
    # stage 1: XN | XNTable (E2H = 1: PXN | PXNTable), the bits only (EL0-writable and
    # SCTLR_EL2.WXN take execution away in ``perms``); stage 2: XN[1:0]
    xn: int | None = None
    # Stage-2 leaf fields.
    memattr: int | None = None
    s2ap: int | None = None

    @property
    def ok(self) -> bool:
        return self.fault is None and not self.unmodelled

    @property
    def readable(self) -> bool:
        return bool(self.perms & PERM_R)

    @property
    def writable(self) -> bool:
        return bool(self.perms & PERM_W)

    @property
    def executable(self) -> bool:
        return bool(self.perms & PERM_X)

    @property
    def read_only(self) -> bool:
        return self.readable and not self.writable

    @property
    def par_sh(self) -> int | None:
        if self.attr is None or self.sh is None:
            return None
        return par_sh(self.attr, self.sh)

    @property
    def attr_unpredictable(self) -> bool:
        return self.memattr is not None and s2_attr_reserved(self.memattr)

    @property
    def sh_unpredictable(self) -> bool:
        if self.attr_unpredictable:
            return True
        return self.attr is not None and self.sh is not None and sh_unpredictable(self.attr, self.sh)

    def summary(self) -> str:
        what = f"stage {int(self.stage)} {self.access.value} {self.address:#x}"
        if self.unmodelled:
            return f"{what}: table read outside modelled memory at level {self.fault_level}"
        if self.fault is not None:
            s = " (stage 2)" if self.fault_stage2 else " (stage 1)" if self.stage is Stage.S2 else ""
            return f"{what}: {self.fault.name.lower()} fault level {self.fault_level}{s}"
        perms = "".join(c if self.perms & b else "-" for c, b in (("r", PERM_R), ("w", PERM_W),
                                                                  ("x", PERM_X)))
        return (f"{what} -> {self.pa:#x} (level {self.level}, {self.size:#x} bytes, "
                f"ATTR {self.attr:#04x}, SH {self.sh:#x}, {perms})")

    def explain(self) -> str:
        lines = [self.summary()]
        lines.extend(f"  {step}" for step in self.steps)
        if self.note:
            lines.append(f"  because: {self.note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ---------------------------------------------------------------------------------------------
# The walk.


@dataclass(frozen=True)
class WalkParams:
    """The parameters of one walk beyond the geometry (the QEMU switches included), shared by the
    scalar walk and the batch form (:mod:`harness.core.batch`)."""

    geom: Geometry
    mair: int
    sh0: int
    with_oa_hi: bool
    check_final_oa: bool
    wxn: bool = False
    ha: bool = False
    hd: bool = False
    el0: bool = False

    @classmethod
    def of(cls, geom: Geometry, mair: int, sh0: int, wxn: bool, ha: bool, hd: bool, el0: bool,
           qemu: WalkSemantics) -> WalkParams:
        """:func:`translate`'s keywords, checked (ValueError where the regime has no such control)."""
        check_wxn(geom, wxn)
        check_hafdbs(geom, ha, hd)
        check_el0(geom, el0)
        return cls(geom, mair, sh0, oa_hi_included(geom, qemu), not qemu.final_oa_unchecked, wxn, ha, hd, el0)

    @property
    def oa_may_exceed(self) -> bool:
        """Whether a descriptor can hold an address at or beyond the PA size at all (else the
        per-descriptor check cannot fire)."""
        widest = descriptor_oa((1 << 64) - 1, self.geom.granule, self.geom.lpa2, self.with_oa_hi)
        return bool(oa_out_of_range(widest, self.geom.pa_bits))


def _leaf(w: WalkParams, address: int, access: Access, steps: list[Step], raw: int, level: int,
          oa: int, restrictions: int) -> Translation:
    """The leaf stage: final address, attributes and permissions, then the AF, final-OA and
    permission faults in the Arm ARM's order."""
    geom = w.geom
    is_s2 = geom.stage is Stage.S2
    size = geom.size(level)
    pa = leaf_oa(oa, address, size - 1)
    if is_s2:
        perms, xn = s2_perms(raw), S2_XN.get(raw)
        memattr: int | None = S2_MEMATTR.get(raw)
        attr_index = None
        attr = s2_attr(S2_MEMATTR.get(raw))
    else:
        if w.el0:
            perms = s1_el0_perms(raw, restrictions, w.wxn, w.hd)
            xn = S1_UXN.get(raw) | ((restrictions & _TABLE_UXN) >> 3)
        else:
            perms = s1_perms(raw, restrictions, geom.e2h, w.wxn, w.hd)
            xn = (S1_PXN if geom.e2h else S1_XN).get(raw) | (restrictions & _TABLE_XN)
        memattr = None
        attr_index = S1_ATTRINDX.get(raw)
        attr = mair_attr(w.mair, attr_index)
    leaf = Translation(
        geom.stage, address, access, tuple(steps), descriptor=raw, level=level, size=size, pa=pa,
        attr=attr, sh=w.sh0 if geom.lpa2 else SH.get(raw), perms=perms, xn=xn,
        attr_index=attr_index, ap=None if is_s2 else S1_AP.get(raw), memattr=memattr,
        s2ap=S2_AP.get(raw) if is_s2 else None,
    )
    if w.check_final_oa and oa_out_of_range(pa, geom.pa_bits):
        return _with_fault(leaf, FaultKind.ADDRESS_SIZE, level, is_s2,
                           f"output address {pa:#x} beyond the {geom.pa_bits}-bit PA size")
    if not AF.get(raw) and not w.ha:
        return _with_fault(leaf, FaultKind.ACCESS_FLAG, level, is_s2, "AF = 0 (no hardware AF)")
    if not perms & access_perm(access):
        why = f"{access.value} not permitted" + (" at EL0" if w.el0 else "")
        if w.el0 and not perms & PERM_R and access is not Access.EXEC:
            why += " (AP[1] = 0)" if not S1_AP.get(raw) & 1 else " (APTable[0] set on the way down)"
        if restrictions & _TABLE_RO and access is Access.WRITE:
            why += " (APTable[1] set on the way down)"
        if restrictions & (_TABLE_UXN if w.el0 else _TABLE_XN) and access is Access.EXEC:
            why += " (UXNTable set on the way down)" if w.el0 else " (XNTable set on the way down)"
        if access is Access.EXEC and not is_s2 and w.wxn and perms & PERM_W:
            why += f" (SCTLR_EL2.WXN: writable at {'EL0' if w.el0 else 'EL2'})"
        return _with_fault(leaf, FaultKind.PERMISSION, level, is_s2, why)
    return leaf


def translate(
    mem: Memory,
    geom: Geometry,
    root_pa: int,
    address: int,
    access: Access = READ,
    mair: int = DEFAULT_MAIR,
    *,
    sh0: int = SH_INNER,
    wxn: bool = False,
    ha: bool = False,
    hd: bool = False,
    el0: bool = False,
    qemu: WalkSemantics = ARM_ARM,
) -> Translation:
    """Walk the tables at ``root_pa`` for ``address`` as the MMU does (see the module notes).

    ``sh0`` is TCR_EL2/VTCR_EL2.SH0 (the shareability with lpa2); ``wxn`` is SCTLR_EL2.WXN (stage
    1 only); ``ha``/``hd`` are TCR.HA/HD (hardware Access flag and dirty state; ``hd`` stage 1
    only, with ``ha``); ``el0``: EL0's accesses in the EL2&0 regime (``AT S1E0R/W``,
    :func:`s1_el0_perms`) instead of EL2's. ``qemu`` selects QEMU's declared departures from the Arm ARM
    (:class:`WalkSemantics`)."""
    if not 0 <= address < 1 << 64:
        raise ValueError(f"address: expected a 64-bit value, got {address!r}")
    w = WalkParams.of(geom, mair, sh0, wxn, ha, hd, el0, qemu)
    stage = geom.stage
    is_s2 = stage is Stage.S2
    steps: list[Step] = []

    def fault(kind: FaultKind, level: int, note: str, stage2: bool = is_s2) -> Translation:
        return Translation(stage, address, access, tuple(steps), fault=kind, fault_level=level,
                           fault_stage2=stage2, note=note)

    if is_s2 and address >> pamax(geom):
        return fault(FaultKind.ADDRESS_SIZE, 0, f"address above PAMax ({pamax(geom)} bits) with "
                     "EL1's stage 1 off: stage-1 address size fault", stage2=False)
    if address >> geom.ia_bits:
        return fault(FaultKind.TRANSLATION, 0, f"input address beyond 2**{geom.ia_bits}")
    if oa_out_of_range(root_pa, geom.pa_bits):
        return fault(FaultKind.ADDRESS_SIZE, 0,
                     f"table base {root_pa:#x} beyond the {geom.pa_bits}-bit PA size")

    granule = geom.granule
    table = root_table_base(geom, root_pa)
    level = geom.start_level
    restrictions = 0
    while True:
        index = geom.pgd_index(address) if level == geom.start_level else geom.index(level, address)
        desc_pa = table + index * ENTRY_BYTES
        if not mem.contains(desc_pa):
            steps.append(Step(level, table, index, desc_pa, None, None))
            return Translation(stage, address, access, tuple(steps), fault_level=level,
                               fault_stage2=is_s2, unmodelled=True,
                               note=f"descriptor at {desc_pa:#x} is outside modelled memory")
        raw = mem.read64(desc_pa)
        steps.append(Step(level, table, index, desc_pa, raw,
                          decode(raw, level, granule, stage, geom.block_levels, geom.lpa2, geom.e2h)))
        if descriptor_faults(raw, level, geom.block_levels):
            if not VALID.get(raw):
                return fault(FaultKind.TRANSLATION, level, "invalid descriptor (bit 0 clear)")
            return fault(FaultKind.TRANSLATION, level,
                         f"reserved encoding: bit 1 clear at level {level}, which has no blocks "
                         f"for the {granule.label} granule")
        oa = descriptor_oa(raw, granule, geom.lpa2, w.with_oa_hi)
        if oa_out_of_range(oa, geom.pa_bits):
            return fault(FaultKind.ADDRESS_SIZE, level,
                         f"address {oa:#x} beyond the {geom.pa_bits}-bit PA size")
        if not descriptor_is_table(raw, level):
            return _leaf(w, address, access, steps, raw, level, oa, restrictions)
        if not is_s2:
            restrictions |= table_restrictions(raw, geom.e2h)
        table = oa
        level += 1


def _with_fault(t: Translation, kind: FaultKind, level: int, stage2: bool, note: str) -> Translation:
    return replace(t, fault=kind, fault_level=level, fault_stage2=stage2, note=note)


# ---------------------------------------------------------------------------------------------
# PAR_EL1.


def expected_par(t: Translation, stage: Stage | None = None) -> int:
    """PAR_EL1 after ``AT S1E2R/W`` (stage 1) or ``AT S12E1R/W`` (stage 2) for ``t``.

    Success: PA, ATTR, SH (Outer for Device / Normal non-cacheable), NS = 1 (non-secure), bit
    11 RES1 reads 1. Fault: F, FST, S (stage-2 fault), bit 11. Compare under
    :func:`par_compare_mask`. Unmodelled walks have no expected value (ValueError).
    """
    if stage is not None and stage is not t.stage:
        raise ValueError(f"stage: the translation is for stage {int(t.stage)}, got {stage!r}")
    if t.unmodelled:
        raise ValueError(f"no expected PAR_EL1: {t.summary()}")
    if t.access is Access.EXEC:
        raise ValueError("access: AT has no instruction-fetch form")
    par = PAR_RES1.prep(1)
    if t.fault is not None:
        assert t.fault_level is not None
        par |= PAR_F.prep(1) | PAR_FST.prep(fault_status(t.fault, t.fault_level))
        return par | PAR_S.prep(int(t.fault_stage2))
    assert t.pa is not None and t.attr is not None and t.sh is not None
    return (par | PAR_PA.prep(t.pa >> 12) | PAR_NS.prep(1) | PAR_SH.prep(par_sh(t.attr, t.sh))
            | PAR_ATTR.prep(t.attr))


def par_compare_mask(t: Translation) -> int:
    """PAR_EL1 bits whose value is architecturally fixed for ``t`` (0 when unmodelled)."""
    if t.unmodelled:
        return 0
    if t.fault is not None:
        return PAR_COMPARE_MASK_FAULT
    mask = PAR_COMPARE_MASK_OK
    if t.attr_unpredictable:
        mask &= ~PAR_ATTR.mask
    if t.sh_unpredictable:
        mask &= ~PAR_SH.mask
    return mask
