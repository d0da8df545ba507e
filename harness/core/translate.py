"""The architectural translation table walk, as an MMU performs it (scalar form).

:func:`translate` reads raw descriptors from memory exactly as the Arm ARM (DDI 0487) MMU walks
them, independent of how the tables were built, and returns a :class:`Translation`: either the
output address with its attributes and permissions, or the fault an ``AT`` instruction would
report, together with every step of the walk for mismatch reports. :func:`expected_par` gives the
PAR_EL1 value an ``AT`` would leave, and :func:`par_compare_mask` which of its bits are
architecturally defined here (the bits a differential check may compare).

Regimes (see :mod:`harness.arch.registers` for the register values the harness programs):

* Stage 1 is the EL2 regime with HCR_EL2.E2H = 0: one VA range through TTBR0_EL2, TBI = 0,
  SCTLR_EL2.WXN = 0, no hardware AF/dirty update. AP[1] is RES1 (only AP[2], read-only,
  matters), XN is bit 54, PXN and PXNTable are RES0 (ignored); the table attributes APTable[1]
  (bit 62: subtree read-only) and XNTable (bit 60) apply hierarchically. ``AT S1E2R/W``.
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
* 4K/16K granule (DS = 0): descriptor bits [50:48] are RES0 and take no part in the address
  (bit 51 is DBM); nonzero values are ignored by the Arm ARM pseudocode (``AArch64.LeafBase``,
  ``NextTableBase`` take bits [47:g]) and by QEMU 10.
* 64K granule: with FEAT_LPA (PAMax = 52) bits [15:12] are OA[51:48] whatever the PA size, so a
  nonzero value with a PA size under 52 bits is an Address size fault (Arm ARM). QEMU 10 only
  reads them when PS = 52 bits and otherwise ignores them: pass ``qemu_lpa_oa=True`` to model
  that known divergence.
* Leaf with AF = 0: Access flag fault at the leaf level; it takes priority over a Permission
  fault (Arm ARM ``AArch64.S1Translate``/QEMU check AF first).
* Access not allowed: Permission fault at the leaf level.
* A descriptor read outside ``mem``: no architectural outcome is predicted (the real memory
  there is unknown to the model): :attr:`Translation.unmodelled` is set, with the level in
  :attr:`Translation.fault_level`. :func:`par_compare_mask` is 0 for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Protocol

from harness.arch.descriptors import (
    AF,
    AP_TABLE,
    OA_51_48,
    S1_AP,
    S1_ATTRINDX,
    S1_NG,
    S1_XN,
    S2_AP,
    S2_MEMATTR,
    S2_XN,
    S2AP,
    SH,
    XN_TABLE,
    Decoded,
    Kind,
    Shareability,
    decode,
    oa_mask,
)
from harness.arch.geometry import (
    ENTRY_BYTES,
    MAX_PA_BITS,
    MAX_PA_BITS_LPA,
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
    FaultKind,
    fault_status,
    mair_attr,
    mair_value,
)

DEFAULT_MAIR = mair_value()

# PAR_EL1 bits an AT defines in this setting: the ones a differential check compares.
PAR_COMPARE_MASK_OK = PAR_F.mask | PAR_PA.mask | PAR_ATTR.mask | PAR_SH.mask | PAR_NS.mask
PAR_COMPARE_MASK_FAULT = PAR_F.mask | PAR_FST.mask | PAR_S.mask | PAR_PTW.mask

# The 64K granule's OA[51:48] field starts at PA bit 48.
OA_HI_SHIFT = 48
# TTBR / table bases: at least 64-byte aligned (TTBR BADDR low bits are RES0).
_MIN_TABLE_ALIGN = 64


class Access(enum.Enum):
    """The access being translated. AT S1E2R/S12E1R read; S1E2W/S12E1W write."""

    READ = "read"
    WRITE = "write"
    EXEC = "exec"  # an instruction fetch from EL2 (stage 1) or EL1 (stage 2); no AT form


READ = Access.READ
WRITE = Access.WRITE
EXEC = Access.EXEC

# Permission bits as carried in the batch form (and :attr:`Translation.perms`).
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
    """The PE's physical address size: 52 bits with FEAT_LPA (QEMU ``-cpu max``), else 48."""
    return MAX_PA_BITS_LPA if geom.feat_lpa else MAX_PA_BITS


def oa_hi_included(geom: Geometry, qemu_lpa_oa: bool = False) -> bool:
    """Whether descriptor bits [15:12] form OA[51:48] (64K granule only, see module notes)."""
    if geom.granule is not Granule.K64 or not geom.feat_lpa:
        return False
    return geom.pa_bits > MAX_PA_BITS or not qemu_lpa_oa


def root_table_base(geom: Geometry, root_pa: int) -> int:
    """The initial table's base as the walk uses it: the bits the index occupies are cleared
    (a misaligned base's low bits are RES0; QEMU masks them the same way)."""
    span = max(geom.pgd_entries * ENTRY_BYTES, _MIN_TABLE_ALIGN)
    return root_pa & ~(span - 1)


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
    sh: int | None = None  # descriptor SH
    perms: int = 0  # PERM_R | PERM_W | PERM_X, effective (table attributes applied)
    # Stage-1 leaf fields.
    attr_index: int | None = None
    ap: int | None = None
    xn: int | None = None  # stage 1: XN | XNTable; stage 2: XN[1:0]
    ng: int | None = None
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


def _allowed(stage: Stage, raw: int, xn_table: bool, ro_table: bool) -> tuple[int, int]:
    """(effective permissions, xn field) of a leaf."""
    if stage is Stage.S1:
        ro = bool(S1_AP.get(raw) >> 1) or ro_table
        xn = S1_XN.get(raw) | int(xn_table)
        perms = PERM_R | (0 if ro else PERM_W) | (0 if xn else PERM_X)
        return perms, xn
    s2ap = S2_AP.get(raw)
    xn = S2_XN.get(raw)
    perms = (PERM_R if s2ap & S2AP.RO else 0) | (PERM_W if s2ap & S2AP.WO else 0)
    if xn in (0b00, 0b11):  # FEAT_XNX: 0b01 and 0b10 forbid EL1 fetches
        perms |= PERM_X
    return perms, xn


def translate(
    mem: Memory,
    geom: Geometry,
    root_pa: int,
    address: int,
    access: Access = READ,
    mair: int = DEFAULT_MAIR,
    *,
    qemu_lpa_oa: bool = False,
) -> Translation:
    """Walk the tables at ``root_pa`` for ``address`` as the MMU does (see the module notes)."""
    if not 0 <= address < 1 << 64:
        raise ValueError(f"address: expected a 64-bit value, got {address!r}")
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
    if root_pa >> geom.pa_bits:
        return fault(FaultKind.ADDRESS_SIZE, 0,
                     f"table base {root_pa:#x} beyond the {geom.pa_bits}-bit PA size")

    granule = geom.granule
    addr_mask = oa_mask(granule)
    with_hi = oa_hi_included(geom, qemu_lpa_oa)
    table = root_table_base(geom, root_pa)
    level = geom.start_level
    xn_table = ro_table = False
    while True:
        index = geom.pgd_index(address) if level == geom.start_level else geom.index(level, address)
        desc_pa = table + index * ENTRY_BYTES
        if not mem.contains(desc_pa):
            steps.append(Step(level, table, index, desc_pa, None, None))
            return Translation(stage, address, access, tuple(steps), fault_level=level,
                               fault_stage2=is_s2, unmodelled=True,
                               note=f"descriptor at {desc_pa:#x} is outside modelled memory")
        raw = mem.read64(desc_pa)
        dec = decode(raw, level, granule, stage, geom.block_levels)
        steps.append(Step(level, table, index, desc_pa, raw, dec))
        if dec.kind is Kind.INVALID:
            return fault(FaultKind.TRANSLATION, level, "invalid descriptor (bit 0 clear)")
        if dec.kind is Kind.RESERVED:
            return fault(FaultKind.TRANSLATION, level,
                         f"reserved encoding: bit 1 clear at level {level}, which has no blocks "
                         f"for the {granule.label} granule")
        oa = raw & addr_mask
        if with_hi:
            oa |= OA_51_48.get(raw) << OA_HI_SHIFT
        if oa >> geom.pa_bits:
            return fault(FaultKind.ADDRESS_SIZE, level,
                         f"address {oa:#x} beyond the {geom.pa_bits}-bit PA size")
        if dec.kind is Kind.TABLE:
            if not is_s2:
                xn_table = xn_table or bool(XN_TABLE.get(raw))
                ro_table = ro_table or bool(AP_TABLE.get(raw) >> 1)
            table = oa
            level += 1
            continue

        # Block or page.
        size = geom.size(level)
        pa = (oa & ~(size - 1)) | (address & (size - 1))
        perms, xn = _allowed(stage, raw, xn_table, ro_table)
        memattr = S2_MEMATTR.get(raw) if is_s2 else None
        attr_index = None if is_s2 else S1_ATTRINDX.get(raw)
        attr = s2_attr(memattr) if memattr is not None else mair_attr(mair, attr_index or 0)
        leaf = Translation(
            stage, address, access, tuple(steps), descriptor=raw, level=level, size=size, pa=pa,
            attr=attr, sh=SH.get(raw), perms=perms, xn=xn, attr_index=attr_index,
            ap=None if is_s2 else S1_AP.get(raw), ng=None if is_s2 else S1_NG.get(raw),
            memattr=memattr, s2ap=S2_AP.get(raw) if is_s2 else None,
        )
        if not AF.get(raw):
            return _with_fault(leaf, FaultKind.ACCESS_FLAG, level, is_s2, "AF = 0 (no hardware AF)")
        if not perms & access_perm(access):
            why = f"{access.value} not permitted"
            if ro_table and access is Access.WRITE:
                why += " (APTable[1] set on the way down)"
            if xn_table and access is Access.EXEC:
                why += " (XNTable set on the way down)"
            return _with_fault(leaf, FaultKind.PERMISSION, level, is_s2, why)
        return leaf


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
