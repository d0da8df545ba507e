"""The architectural walk of :mod:`harness.core.translate`, vectorised over many addresses.

:func:`translate_batch` loops over the (at most four) levels, not over addresses: each level
gathers every still-walking address's descriptor from the pool's words at once. The outcome
agrees field for field with :func:`harness.core.translate.translate` (same fault kinds, levels
and conventions; the attribute and shareability rules are the scalar functions tabulated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from harness.arch.descriptors import (
    AF,
    AP_TABLE,
    OA_51_48,
    S1_AP,
    S1_ATTRINDX,
    S1_XN,
    S2_AP,
    S2_MEMATTR,
    S2_XN,
    S2AP,
    SH,
    TYPE,
    VALID,
    XN_TABLE,
    oa_mask,
)
from harness.arch.geometry import ENTRY_BYTES, LAST_LEVEL, MAX_LEVELS, Geometry, Stage, ptrs_per_table
from harness.arch.registers import (
    PAR_ATTR,
    PAR_F,
    PAR_FST,
    PAR_NS,
    PAR_PA,
    PAR_RES1,
    PAR_S,
    PAR_SH,
    FaultKind,
    mair_attr,
)
from harness.core.translate import (
    DEFAULT_MAIR,
    OA_HI_SHIFT,
    PAR_COMPARE_MASK_FAULT,
    PAR_COMPARE_MASK_OK,
    PERM_R,
    PERM_W,
    PERM_X,
    READ,
    Access,
    Translation,
    access_perm,
    oa_hi_included,
    pamax,
    par_sh,
    root_table_base,
    s2_attr,
    s2_attr_reserved,
    sh_unpredictable,
)

U64 = npt.NDArray[np.uint64]
I8 = npt.NDArray[np.int8]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]

NO_FAULT = -1
UNMODELLED = 16  # fault code of a descriptor read outside the modelled memory (not an FST class)

_U = np.uint64
_T_XN = 1
_T_RO = 2


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
_S2_ATTR_RESERVED = np.array([s2_attr_reserved(m) for m in range(16)], dtype=np.bool_)
_PAR_SH = np.array([[par_sh(a, s) for s in range(4)] for a in range(256)], dtype=np.uint8)
_SH_UNPRED = np.array([[sh_unpredictable(a, s) for s in range(4)] for a in range(256)],
                      dtype=np.bool_)


def _field(words: U64, f_lo: int, f_width: int) -> U64:
    return (words >> _U(f_lo)) & _U((1 << f_width) - 1)


def translate_batch(
    words: U64,
    base_pa: int,
    geom: Geometry,
    root_pa: int,
    addresses: npt.ArrayLike,
    access: Access = READ,
    mair: int = DEFAULT_MAIR,
    *,
    qemu_lpa_oa: bool = False,
) -> BatchResult:
    """Translate every address in ``addresses`` through the tables at ``root_pa``.

    ``words`` is the modelled memory as little-endian 64-bit words starting at ``base_pa``
    (``PagePool.words()``); a descriptor outside it is :data:`UNMODELLED`.
    """
    addr = np.ascontiguousarray(addresses, dtype=np.uint64).reshape(-1)
    words = np.asarray(words, dtype=np.uint64)
    n = addr.size
    stage = geom.stage
    is_s2 = stage is Stage.S2

    fault = np.full(n, NO_FAULT, dtype=np.int8)
    fault_level = np.full(n, -1, dtype=np.int8)
    fault_stage2 = np.zeros(n, dtype=np.bool_)
    active = np.ones(n, dtype=np.bool_)

    def set_fault(mask: Bools | npt.NDArray[np.intp], code: int, level: int, s2: bool) -> None:
        fault[mask] = code
        fault_level[mask] = level
        fault_stage2[mask] = s2

    if is_s2:
        bad = (addr >> _U(pamax(geom))) != 0
        set_fault(bad, FaultKind.ADDRESS_SIZE.value, 0, False)
        active &= ~bad
    bad = active & ((addr >> _U(geom.ia_bits)) != 0)
    set_fault(bad, FaultKind.TRANSLATION.value, 0, is_s2)
    active &= ~bad
    if root_pa >> geom.pa_bits:
        set_fault(active, FaultKind.ADDRESS_SIZE.value, 0, is_s2)
        active[:] = False

    addr_mask = _U(oa_mask(geom.granule))
    with_hi = oa_hi_included(geom, qemu_lpa_oa)
    base = _U(base_pa)
    pool_bytes = _U(words.size * ENTRY_BYTES)
    type_valid = _U(TYPE.mask | VALID.mask)
    idx_mask = _U(ptrs_per_table(geom.granule) - 1)
    limit_mask = _U(geom.limit - 1)

    lanes = np.flatnonzero(active)
    a = addr[lanes]
    table = np.full(lanes.size, root_table_base(geom, root_pa), dtype=np.uint64)
    # Stage-1 hierarchical attributes gathered so far: _T_XN | _T_RO (unused at stage 2).
    tattr = np.zeros(0 if is_s2 else lanes.size, dtype=np.uint8)

    leaf_lanes: list[npt.NDArray[np.intp]] = []
    leaf_desc: list[U64] = []
    leaf_oa: list[U64] = []
    leaf_level: list[I8] = []
    leaf_tattr: list[U8] = []

    for level in range(geom.start_level, MAX_LEVELS):
        if lanes.size == 0:
            break
        shift = _U(geom.shift(level))
        # Byte offset of the descriptor in the pool (in place: few temporaries). Below the pool
        # it wraps to a huge value, so one unsigned compare checks both ends.
        if level == geom.start_level:
            off = a & limit_mask
            off >>= shift
        else:
            off = a >> shift
            off &= idx_mask
        off <<= _U(3)
        off += table
        off -= base
        inside = off < pool_bytes
        if not inside.all():
            set_fault(lanes[~inside], UNMODELLED, level, is_s2)
            lanes, a, off = lanes[inside], a[inside], off[inside]
            if not is_s2:
                tattr = tattr[inside]
        off >>= _U(3)
        desc = words[off.view(np.int64)]

        low = desc & type_valid
        typ = low >= _U(TYPE.mask)
        good = (low & _U(VALID.mask)) != 0 if level in geom.block_levels else low == type_valid
        if not good.all():
            set_fault(lanes[~good], FaultKind.TRANSLATION.value, level, is_s2)
        oa = desc & addr_mask
        if with_hi:
            oa |= _field(desc, OA_51_48.lo, OA_51_48.width) << _U(OA_HI_SHIFT)
        too_big = good & ((oa >> _U(geom.pa_bits)) != 0)
        if too_big.any():
            set_fault(lanes[too_big], FaultKind.ADDRESS_SIZE.value, level, is_s2)
        good &= ~too_big
        is_table = good & typ if level < LAST_LEVEL else np.zeros_like(good)
        is_leaf = good & ~is_table
        if is_leaf.any():
            leaf_lanes.append(lanes[is_leaf])
            leaf_desc.append(desc[is_leaf])
            leaf_oa.append(oa[is_leaf])
            leaf_level.append(np.full(int(is_leaf.sum()), level, dtype=np.int8))
            if not is_s2:
                leaf_tattr.append(tattr[is_leaf])
        if not is_s2:
            tattr = tattr | (_field(desc, XN_TABLE.lo, 1).astype(np.uint8) * np.uint8(_T_XN)
                             | _field(desc, AP_TABLE.lo + 1, 1).astype(np.uint8) * np.uint8(_T_RO))
        if is_table.all():
            table = oa
        else:
            lanes, a, table = lanes[is_table], a[is_table], oa[is_table]
            if not is_s2:
                tattr = tattr[is_table]

    pa = np.zeros(n, dtype=np.uint64)
    out_level = np.full(n, -1, dtype=np.int8)
    descriptor = np.zeros(n, dtype=np.uint64)
    attr = np.zeros(n, dtype=np.uint8)
    sh = np.zeros(n, dtype=np.uint8)
    psh = np.zeros(n, dtype=np.uint8)
    perms = np.zeros(n, dtype=np.uint8)
    attr_unpred = np.zeros(n, dtype=np.bool_)
    sh_unpred = np.zeros(n, dtype=np.bool_)

    if leaf_lanes:
        ll = np.concatenate(leaf_lanes)
        d = np.concatenate(leaf_desc)
        loa = np.concatenate(leaf_oa)
        lv = np.concatenate(leaf_level)

        if is_s2:
            s2ap = _field(d, S2_AP.lo, S2_AP.width)
            xn2 = _field(d, S2_XN.lo, S2_XN.width)
            lperm = (np.where((s2ap & _U(S2AP.RO)) != 0, PERM_R, 0)
                     | np.where((s2ap & _U(S2AP.WO)) != 0, PERM_W, 0)
                     | np.where((xn2 == 0) | (xn2 == 3), PERM_X, 0)).astype(np.uint8)
        else:
            ltattr = np.concatenate(leaf_tattr)
            ro = ((d & _U(1 << (S1_AP.lo + 1))) != 0) | ((ltattr & np.uint8(_T_RO)) != 0)
            xn = ((d & _U(S1_XN.mask)) != 0) | ((ltattr & np.uint8(_T_XN)) != 0)
            lperm = (PERM_R | np.where(ro, 0, PERM_W) | np.where(xn, 0, PERM_X)).astype(np.uint8)

        no_af = (d & _U(AF.mask)) == 0
        denied = ~no_af & ((lperm & np.uint8(access_perm(access))) == 0)
        for mask, kind in ((no_af, FaultKind.ACCESS_FLAG), (denied, FaultKind.PERMISSION)):
            if mask.any():
                fault[ll[mask]] = kind.value
                fault_level[ll[mask]] = lv[mask]
                fault_stage2[ll[mask]] = is_s2
        okm = ~(no_af | denied)
        ll, d, loa, lv, lperm = ll[okm], d[okm], loa[okm], lv[okm], lperm[okm]

        shifts = np.array([geom.shift(lvl) for lvl in range(MAX_LEVELS)], dtype=np.uint64)
        size_mask = (_U(1) << shifts[lv]) - _U(1)
        pa[ll] = (loa & ~size_mask) | (addr[ll] & size_mask)
        out_level[ll] = lv
        descriptor[ll] = d
        lsh = _field(d, SH.lo, SH.width).astype(np.intp)
        if is_s2:
            memattr = _field(d, S2_MEMATTR.lo, S2_MEMATTR.width).astype(np.intp)
            lattr = _S2_ATTR[memattr]
            attr_unpred[ll] = _S2_ATTR_RESERVED[memattr]
        else:
            mair_table = np.array([mair_attr(mair, i) for i in range(8)], dtype=np.uint8)
            lattr = mair_table[_field(d, S1_ATTRINDX.lo, S1_ATTRINDX.width).astype(np.intp)]
        attr[ll] = lattr
        sh[ll] = lsh
        psh[ll] = _PAR_SH[lattr, lsh]
        sh_unpred[ll] = _SH_UNPRED[lattr, lsh] | attr_unpred[ll]
        perms[ll] = lperm

    return BatchResult(stage, access, addr, fault, fault_level, fault_stage2, pa, out_level,
                       descriptor, attr, sh, psh, perms, attr_unpred, sh_unpred)


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
    fst = (result.fault.astype(np.uint64) << _U(2)) | (result.fault_level.astype(np.uint64) & _U(3))
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
