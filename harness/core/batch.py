"""The architectural walk of :mod:`harness.core.translate`, vectorised over many addresses.

:func:`translate_batch` loops over the (at most five) levels, not over addresses: each level
step gathers every still-walking address's descriptor from the pool's words at once, and one leaf
stage finishes them. Both use the scalar walk's named predicates (:func:`descriptor_faults`,
:func:`descriptor_oa`, :func:`s1_perms` ...), which work on ints and arrays alike. The outcome
agrees field for field with :func:`harness.core.translate.translate` (same fault kinds, levels
and conventions; the attribute and shareability rules are the scalar functions tabulated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from harness.arch.descriptors import AF, S1_ATTRINDX, S2_AP, S2_MEMATTR, S2_XN, SH, descriptor_oa
from harness.arch.geometry import ENTRY_BYTES, MAX_LEVELS, Geometry, Stage, ptrs_per_table
from harness.arch.registers import (
    PAR_ATTR,
    PAR_F,
    PAR_FST,
    PAR_NS,
    PAR_PA,
    PAR_RES1,
    PAR_S,
    PAR_SH,
    SH_INNER,
    FaultKind,
    fault_status,
    mair_attr,
)
from harness.core.translate import (
    ARM_ARM,
    DEFAULT_MAIR,
    PAR_COMPARE_MASK_FAULT,
    PAR_COMPARE_MASK_OK,
    READ,
    Access,
    Translation,
    WalkSemantics,
    access_perm,
    check_hafdbs,
    check_wxn,
    descriptor_faults,
    descriptor_is_table,
    leaf_oa,
    oa_hi_included,
    oa_out_of_range,
    pamax,
    par_sh,
    root_table_base,
    s1_perms,
    s2_attr,
    s2_attr_reserved,
    s2_perms,
    sh_unpredictable,
    table_restrictions,
)

U64 = npt.NDArray[np.uint64]
I8 = npt.NDArray[np.int8]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]

NO_FAULT = -1
UNMODELLED = 16  # fault code of a descriptor read outside the modelled memory (not an FST class)

_U = np.uint64


def fault_code(t: Translation) -> int:
    """The batch ``fault`` code of a scalar translation."""
    if t.unmodelled:
        return UNMODELLED
    return NO_FAULT if t.fault is None else t.fault.value


@dataclass(frozen=True)
class BatchResult:
    """Per-address outcome arrays. Leaf fields are set only where ``ok``; elsewhere 0 (or -1)."""

    stage: Stage
    access: Access
    addresses: U64
    fault: I8  # NO_FAULT, FaultKind.value, or UNMODELLED
    fault_level: I8  # -1 where ok
    fault_stage2: Bools  # PAR_EL1.S
    pa: U64
    level: I8  # leaf level, -1 where not ok
    descriptor: U64  # leaf descriptor
    attr: U8  # combined attribute byte (PAR_EL1.ATTR)
    sh: U8  # descriptor SH
    par_sh: U8
    perms: U8  # PERM_R | PERM_W | PERM_X
    attr_unpredictable: Bools
    sh_unpredictable: Bools

    @property
    def ok(self) -> Bools:
        return np.equal(self.fault, np.int8(NO_FAULT))

    @property
    def unmodelled(self) -> Bools:
        return np.equal(self.fault, np.int8(UNMODELLED))

    def __len__(self) -> int:
        return int(self.addresses.size)


# Tabulated scalar rules, so both forms share one definition.
_S2_ATTR = np.array([s2_attr(m) for m in range(16)], dtype=np.uint8)
# s2_perms by S2AP | XN[54:53] << 2.
_S2_PERMS = np.array([s2_perms(S2_AP.prep(i & 3) | S2_XN.prep(i >> 2)) for i in range(16)], dtype=np.uint8)
_S2_ATTR_RESERVED = np.array([s2_attr_reserved(m) for m in range(16)], dtype=np.bool_)
_PAR_SH = np.array([[par_sh(a, s) for s in range(4)] for a in range(256)], dtype=np.uint8)
_SH_UNPRED = np.array([[sh_unpredictable(a, s) for s in range(4)] for a in range(256)],
                      dtype=np.bool_)


# FST per (fault code, level + 1): the scalar fault_status tabulated (level -1 has its own codes).
_FST = np.zeros((UNMODELLED + 1, 5), dtype=np.uint64)
for _kind in FaultKind:
    for _lvl in range(-1, 4):
        if _lvl >= 0 or _kind in (FaultKind.ADDRESS_SIZE, FaultKind.TRANSLATION):
            _FST[_kind.value, _lvl + 1] = fault_status(_kind, _lvl)


def _field(words: U64, f_lo: int, f_width: int) -> U64:
    return (words >> _U(f_lo)) & _U((1 << f_width) - 1)


class _Outcome:
    """Per-address outcome arrays being filled in by the walk."""

    def __init__(self, n: int) -> None:
        self.fault = np.full(n, NO_FAULT, dtype=np.int8)
        self.fault_level = np.full(n, -1, dtype=np.int8)
        self.fault_stage2 = np.zeros(n, dtype=np.bool_)
        self.pa = np.zeros(n, dtype=np.uint64)
        self.level = np.full(n, -1, dtype=np.int8)
        self.descriptor = np.zeros(n, dtype=np.uint64)
        self.attr = np.zeros(n, dtype=np.uint8)
        self.sh = np.zeros(n, dtype=np.uint8)
        self.par_sh = np.zeros(n, dtype=np.uint8)
        self.perms = np.zeros(n, dtype=np.uint8)
        self.attr_unpredictable = np.zeros(n, dtype=np.bool_)
        self.sh_unpredictable = np.zeros(n, dtype=np.bool_)

    def set_fault(self, lanes: Bools | npt.NDArray[np.intp], code: int | npt.NDArray[np.int8],
                  level: int | I8, stage2: bool) -> None:
        self.fault[lanes] = code
        self.fault_level[lanes] = level
        self.fault_stage2[lanes] = stage2


@dataclass
class _Lanes:
    """The addresses still walking: their lane numbers, addresses, current table and the stage-1
    hierarchical restrictions gathered so far."""

    lanes: npt.NDArray[np.intp]
    addr: U64
    table: U64
    restrictions: U64 | None  # stage 1 only

    def keep(self, mask: Bools) -> _Lanes:
        r = None if self.restrictions is None else self.restrictions[mask]
        return _Lanes(self.lanes[mask], self.addr[mask], self.table[mask], r)


@dataclass
class _Leaves:
    """Valid leaves found so far, per level."""

    lanes: list[npt.NDArray[np.intp]]
    desc: list[U64]
    oa: list[U64]
    level: list[I8]
    restrictions: list[U64]


@dataclass(frozen=True)
class _Params:
    geom: Geometry
    access: Access
    mair: int
    sh0: int
    with_oa_hi: bool
    check_final_oa: bool
    wxn: bool = False
    ha: bool = False
    hd: bool = False


def _level_step(p: _Params, out: _Outcome, words: U64, base_pa: int, cur: _Lanes, level: int,
                found: _Leaves) -> _Lanes:
    """One level of the walk for every lane: read the descriptor, fault or collect leaves, and
    return the lanes that go on to the next level."""
    geom = p.geom
    is_s2 = geom.stage is Stage.S2
    # Byte offset of the descriptor in the pool (in place: few temporaries). Below the pool it
    # wraps to a huge value, so one unsigned compare checks both ends.
    if level == geom.start_level:
        off = cur.addr & _U(geom.limit - 1)
        off >>= _U(geom.shift(level))
    else:
        off = cur.addr >> _U(geom.shift(level))
        off &= _U(ptrs_per_table(geom.granule) - 1)
    off <<= _U(3)
    off += cur.table
    off -= _U(base_pa)
    inside = off < _U(words.size * ENTRY_BYTES)
    if not inside.all():
        out.set_fault(cur.lanes[~inside], UNMODELLED, level, is_s2)
        cur, off = cur.keep(inside), off[inside]
    off >>= _U(3)
    desc = words[off.view(np.int64)]

    good = ~descriptor_faults(desc, level, geom.block_levels)
    if not good.all():
        out.set_fault(cur.lanes[~good], FaultKind.TRANSLATION.value, level, is_s2)
    oa = np.asarray(descriptor_oa(desc, geom.granule, geom.lpa2, p.with_oa_hi), dtype=np.uint64)
    too_big = good & oa_out_of_range(oa, geom.pa_bits)
    if too_big.any():
        out.set_fault(cur.lanes[too_big], FaultKind.ADDRESS_SIZE.value, level, is_s2)
        good &= ~too_big
    is_table = good & descriptor_is_table(desc, level)
    is_leaf = good & ~is_table
    if is_leaf.any():
        found.lanes.append(cur.lanes[is_leaf])
        found.desc.append(desc[is_leaf])
        found.oa.append(oa[is_leaf])
        found.level.append(np.full(int(is_leaf.sum()), level, dtype=np.int8))
        if cur.restrictions is not None:
            found.restrictions.append(cur.restrictions[is_leaf])
    restrictions = cur.restrictions
    if restrictions is not None:
        restrictions = restrictions | np.asarray(table_restrictions(desc, geom.e2h), dtype=np.uint64)
    nxt = _Lanes(cur.lanes, cur.addr, oa, restrictions)
    return nxt if is_table.all() else nxt.keep(is_table)


def _leaf_stage(p: _Params, out: _Outcome, addr: U64, found: _Leaves) -> None:
    """Final addresses, permissions and attributes of the leaves, with the final-OA, AF and
    permission faults in the scalar walk's order."""
    geom = p.geom
    is_s2 = geom.stage is Stage.S2
    lanes = np.concatenate(found.lanes)
    desc = np.concatenate(found.desc)
    oa = np.concatenate(found.oa)
    level = np.concatenate(found.level)

    if is_s2:
        perms = _S2_PERMS[((desc >> _U(S2_AP.lo)) & _U(S2_AP.max))
                          | (((desc >> _U(S2_XN.lo)) & _U(S2_XN.max)) << _U(S2_AP.width))]
    else:
        perms = s1_perms(desc, np.concatenate(found.restrictions), geom.e2h, p.wxn, p.hd).astype(np.uint8)
    if len(found.lanes) == 1:  # every leaf at one level
        size_mask = np.full(1, geom.size(int(level[0])) - 1, dtype=np.uint64)
    else:
        masks = np.array([geom.size(lvl) - 1 for lvl in range(geom.start_level, MAX_LEVELS)], dtype=np.uint64)
        size_mask = masks[level.astype(np.intp) - geom.start_level]
    pa = np.asarray(leaf_oa(oa, addr[lanes], size_mask), dtype=np.uint64)

    # The Arm ARM's order: final output address, then AF, then permissions. A leaf no larger
    # than 2**PS whose descriptor bits passed cannot reach beyond PS (the check is skipped).
    no_af = (desc & _U(AF.mask)) == 0
    if p.ha:  # the MMU sets AF instead
        no_af[:] = False
    denied = (perms & np.uint8(access_perm(p.access))) == 0
    faulted = no_af | denied
    largest = geom.size(min(int(lv[0]) for lv in found.level))
    oa_big = None
    if p.check_final_oa and largest > 1 << geom.pa_bits:
        oa_big = oa_out_of_range(pa, geom.pa_bits)
        faulted |= oa_big
    if faulted.any():
        if oa_big is not None:
            out.set_fault(lanes[oa_big], FaultKind.ADDRESS_SIZE.value, level[oa_big], is_s2)
            no_af &= ~oa_big
            denied &= ~oa_big
        denied &= ~no_af
        for mask, kind in ((no_af, FaultKind.ACCESS_FLAG), (denied, FaultKind.PERMISSION)):
            if mask.any():
                out.set_fault(lanes[mask], kind.value, level[mask], is_s2)
        ok = ~faulted
        lanes, desc, level, perms, pa = lanes[ok], desc[ok], level[ok], perms[ok], pa[ok]

    out.pa[lanes] = pa
    out.level[lanes] = level
    out.descriptor[lanes] = desc
    sh = _field(desc, SH.lo, SH.width).astype(np.intp)
    if geom.lpa2:  # bits [9:8] are OA[51:50]: the shareability is SH0's
        sh[:] = p.sh0
    if is_s2:
        memattr = _field(desc, S2_MEMATTR.lo, S2_MEMATTR.width).astype(np.intp)
        attr = _S2_ATTR[memattr]
        out.attr_unpredictable[lanes] = _S2_ATTR_RESERVED[memattr]
    else:
        mair_table = np.array([mair_attr(p.mair, i) for i in range(8)], dtype=np.uint8)
        attr = mair_table[_field(desc, S1_ATTRINDX.lo, S1_ATTRINDX.width).astype(np.intp)]
    out.attr[lanes] = attr
    out.sh[lanes] = sh
    out.par_sh[lanes] = _PAR_SH[attr, sh]
    out.sh_unpredictable[lanes] = _SH_UNPRED[attr, sh] | out.attr_unpredictable[lanes]
    out.perms[lanes] = perms


def _prechecks(p: _Params, out: _Outcome, addr: U64, root_pa: int) -> Bools:
    """Faults before the walk starts (as the scalar walk); returns the lanes that walk."""
    geom = p.geom
    is_s2 = geom.stage is Stage.S2
    active = np.ones(addr.size, dtype=np.bool_)
    if is_s2:
        bad = (addr >> _U(pamax(geom))) != 0
        out.set_fault(bad, FaultKind.ADDRESS_SIZE.value, 0, False)
        active &= ~bad
    bad = active & ((addr >> _U(geom.ia_bits)) != 0)
    out.set_fault(bad, FaultKind.TRANSLATION.value, 0, is_s2)
    active &= ~bad
    if oa_out_of_range(root_pa, geom.pa_bits):
        out.set_fault(active, FaultKind.ADDRESS_SIZE.value, 0, is_s2)
        active[:] = False
    return active


def translate_batch(
    words: U64,
    base_pa: int,
    geom: Geometry,
    root_pa: int,
    addresses: npt.ArrayLike,
    access: Access = READ,
    mair: int = DEFAULT_MAIR,
    *,
    sh0: int = SH_INNER,
    wxn: bool = False,
    ha: bool = False,
    hd: bool = False,
    qemu: WalkSemantics = ARM_ARM,
) -> BatchResult:
    """Translate every address in ``addresses`` through the tables at ``root_pa``.

    ``words`` is the modelled memory as little-endian 64-bit words starting at ``base_pa``
    (``PagePool.words()``); a descriptor outside it is :data:`UNMODELLED`. The keywords are
    :func:`harness.core.translate.translate`'s.
    """
    check_wxn(geom, wxn)
    check_hafdbs(geom, ha, hd)
    addr = np.ascontiguousarray(addresses, dtype=np.uint64).reshape(-1)
    words = np.asarray(words, dtype=np.uint64)
    p = _Params(geom, access, mair, sh0, oa_hi_included(geom, qemu), not qemu.final_oa_unchecked, wxn, ha, hd)
    out = _Outcome(addr.size)
    lanes = np.flatnonzero(_prechecks(p, out, addr, root_pa))
    cur = _Lanes(lanes, addr[lanes], np.full(lanes.size, root_table_base(geom, root_pa), dtype=np.uint64),
                 None if geom.stage is Stage.S2 else np.zeros(lanes.size, dtype=np.uint64))
    found = _Leaves([], [], [], [], [])
    for level in range(geom.start_level, MAX_LEVELS):
        if cur.lanes.size == 0:
            break
        cur = _level_step(p, out, words, base_pa, cur, level, found)
    if found.lanes:
        _leaf_stage(p, out, addr, found)
    return BatchResult(geom.stage, access, addr, out.fault, out.fault_level, out.fault_stage2,
                       out.pa, out.level, out.descriptor, out.attr, out.sh, out.par_sh, out.perms,
                       out.attr_unpredictable, out.sh_unpredictable)


def fault_status_batch(result: BatchResult) -> U64:
    """The 6-bit FST/DFSC per address (PAR_EL1.FST, ESR_ELx.ISS.DFSC) as
    :func:`harness.arch.registers.fault_status` gives it, level -1 codes included; 0 where the
    address translates or is unmodelled."""
    faulted = ~result.ok & ~result.unmodelled
    fst = (result.fault.astype(np.uint64) << _U(2)) | (result.fault_level.astype(np.uint64) & _U(3))
    minus1 = faulted & (result.fault_level == -1)  # FEAT_LPA2 level -1 has codes of its own
    if minus1.any():
        fst[minus1] = _FST[result.fault[minus1].astype(np.intp), 0]
    return np.asarray(np.where(faulted, fst, _U(0)), dtype=np.uint64)


def expected_par_batch(result: BatchResult, stage: Stage | None = None) -> U64:
    """PAR_EL1 per address, as :func:`harness.core.translate.expected_par` (0 where unmodelled)."""
    if stage is not None and stage is not result.stage:
        raise ValueError(f"stage: the result is for stage {int(result.stage)}, got {stage!r}")
    ok = result.ok
    par = np.full(len(result), PAR_RES1.mask, dtype=np.uint64)
    par |= np.where(ok, (result.pa & _U(PAR_PA.mask)) | _U(PAR_NS.mask)
                    | (result.par_sh.astype(np.uint64) << _U(PAR_SH.lo))
                    | (result.attr.astype(np.uint64) << _U(PAR_ATTR.lo)), _U(0))
    faulted = ~ok & ~result.unmodelled
    fst = fault_status_batch(result)
    par |= np.where(faulted, _U(PAR_F.mask) | (fst << _U(PAR_FST.lo))
                    | (result.fault_stage2.astype(np.uint64) << _U(PAR_S.lo)), _U(0))
    par[result.unmodelled] = 0
    return par


def par_compare_mask_batch(result: BatchResult) -> U64:
    """Per-address PAR_EL1 bits to compare, as :func:`harness.core.translate.par_compare_mask`."""
    ok = result.ok
    mask = np.where(ok, _U(PAR_COMPARE_MASK_OK), _U(PAR_COMPARE_MASK_FAULT))
    mask &= ~np.where(ok & result.attr_unpredictable, _U(PAR_ATTR.mask), _U(0))
    mask &= ~np.where(ok & result.sh_unpredictable, _U(PAR_SH.mask), _U(0))
    mask[result.unmodelled] = 0
    return mask
