"""The architectural walk of :mod:`harness.core.translate`, vectorised over many addresses.

:func:`translate_batch` loops over the (at most five) levels, not over addresses: each level
step gathers every still-walking address's descriptor from the pool's words at once, and one leaf
stage finishes them (:func:`translate_batch_each`: one walk for several accesses, only the
permission check per access; lanes are picked by index, never by a random boolean mask). Both
use the scalar walk's named predicates (:func:`descriptor_faults`, :func:`descriptor_oa`,
:func:`s1_perms` ...), which work on ints and arrays alike. The outcome agrees field for field
with :func:`harness.core.translate.translate` (same fault kinds, levels and conventions; the
attribute and shareability rules and the PAR_EL1 encodings are the scalar functions tabulated).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    WalkParams,
    WalkSemantics,
    access_perm,
    descriptor_faults,
    descriptor_is_table,
    leaf_oa,
    oa_out_of_range,
    pamax,
    par_sh,
    root_table_base,
    s1_el0_perms,
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


def _field(words: U64, f_lo: int, f_width: int) -> U64:
    return (words >> _U(f_lo)) & _U((1 << f_width) - 1)


def _where(mask: Bools) -> npt.NDArray[np.intp]:
    """The lanes set in ``mask``, as indices: gathering with indices is several times faster
    than with a random boolean mask, and one index array serves every field."""
    return np.flatnonzero(mask)


# What a lane holds before (and where it lacks) a valid leaf: the one definition of BatchResult's
# "0 (or -1) where not ok", for the fields, their types and a permission fault's clearing.
_LEAF_EMPTY: dict[str, tuple[int, type[np.generic]]] = {
    "pa": (0, np.uint64), "level": (-1, np.int8), "descriptor": (0, np.uint64), "attr": (0, np.uint8),
    "sh": (0, np.uint8), "par_sh": (0, np.uint8), "perms": (0, np.uint8),
    "attr_unpredictable": (False, np.bool_), "sh_unpredictable": (False, np.bool_),
}
_FAULT_EMPTY: dict[str, tuple[int, type[np.generic]]] = {
    "fault": (NO_FAULT, np.int8), "fault_level": (-1, np.int8), "fault_stage2": (False, np.bool_),
}


@dataclass
class _Outcome:
    """Per-address outcome arrays being filled in by the walk (BatchResult's fields)."""

    fields: dict[str, npt.NDArray[np.generic]]

    @classmethod
    def empty(cls, n: int) -> _Outcome:
        return cls({k: np.full(n, v, dtype=t) for k, (v, t) in (_FAULT_EMPTY | _LEAF_EMPTY).items()})

    def copy(self) -> _Outcome:
        return _Outcome({k: v.copy() for k, v in self.fields.items()})

    def set_fault(self, lanes: npt.NDArray[np.intp], code: int, level: int | I8, stage2: bool) -> None:
        self.fields["fault"][lanes] = code
        self.fields["fault_level"][lanes] = level
        self.fields["fault_stage2"][lanes] = stage2

    def clear_leaf(self, lanes: npt.NDArray[np.intp]) -> None:
        for k, (v, _) in _LEAF_EMPTY.items():
            self.fields[k][lanes] = v

    def result(self, stage: Stage, access: Access, addr: U64) -> BatchResult:
        return BatchResult(stage, access, addr, **self.fields)  # type: ignore[arg-type]


@dataclass
class _Lanes:
    """The addresses still walking: their lane numbers, addresses, current table and the stage-1
    hierarchical restrictions gathered so far (None: none so far, or stage 2)."""

    lanes: npt.NDArray[np.intp]
    addr: U64
    table: U64
    restrictions: U64 | None

    def take(self, idx: npt.NDArray[np.intp], table: U64 | None = None) -> _Lanes:
        r = None if self.restrictions is None else self.restrictions[idx]
        return _Lanes(self.lanes[idx], self.addr[idx], self.table[idx] if table is None else table, r)


@dataclass
class _Leaves:
    """Valid leaves found so far, one group per level (restrictions None: none gathered)."""

    lanes: list[npt.NDArray[np.intp]]
    desc: list[U64]
    oa: list[U64]
    level: list[int]
    restrictions: list[U64 | None]

    def extend(self, lanes: npt.NDArray[np.intp], desc: U64, oa: U64, level: int, restrictions: U64 | None) -> None:
        self.lanes.append(lanes)
        self.desc.append(desc)
        self.oa.append(oa)
        self.level.append(level)
        self.restrictions.append(restrictions)

    def add(self, cur: _Lanes, idx: npt.NDArray[np.intp], desc: U64, oa: U64, level: int) -> None:
        self.extend(cur.lanes[idx], desc[idx], oa[idx], level,
                    None if cur.restrictions is None else cur.restrictions[idx])

    def levels(self) -> I8:
        return np.repeat(np.array(self.level, dtype=np.int8), [lanes.size for lanes in self.lanes])

    def all_restrictions(self) -> U64:
        """The leaves' stage-1 restrictions in lane order (0 where none were gathered)."""
        if all(r is None for r in self.restrictions):
            return np.zeros(1, dtype=np.uint64)  # broadcasts
        return np.concatenate([np.zeros(lanes.size, dtype=np.uint64) if r is None else r
                               for lanes, r in zip(self.lanes, self.restrictions, strict=True)])


def _restriction_bits(e2h: bool) -> int:
    """The descriptor bits :func:`table_restrictions` reads (derived from it, bit by bit)."""
    return sum(1 << b for b in range(64) if table_restrictions(1 << b, e2h))


_RESTRICTION_BITS = {e2h: _U(_restriction_bits(e2h)) for e2h in (False, True)}


def _level_step(p: WalkParams, out: _Outcome, words: U64, base_pa: int, cur: _Lanes, level: int,
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
        out.set_fault(cur.lanes[_where(~inside)], UNMODELLED, level, is_s2)
        keep = _where(inside)
        cur, off = cur.take(keep), off[keep]
    off >>= _U(3)
    desc = np.take(words, off.view(np.int64))

    good = ~descriptor_faults(desc, level, geom.block_levels)
    oa = np.asarray(descriptor_oa(desc, geom.granule, geom.lpa2, p.with_oa_hi), dtype=np.uint64)
    if not good.all():
        out.set_fault(cur.lanes[_where(~good)], FaultKind.TRANSLATION.value, level, is_s2)
    if p.oa_may_exceed:
        too_big = good & oa_out_of_range(oa, geom.pa_bits)
        if too_big.any():
            out.set_fault(cur.lanes[_where(too_big)], FaultKind.ADDRESS_SIZE.value, level, is_s2)
            good &= ~too_big
    is_table = good & descriptor_is_table(desc, level)
    if is_table.all():  # every lane goes on: no leaf, no fault here
        tdesc = desc
        nxt = _Lanes(cur.lanes, cur.addr, oa, cur.restrictions)
    else:
        leaf = _where(good & ~is_table)
        if leaf.size:
            found.add(cur, leaf, desc, oa, level)
        tidx = _where(is_table)
        tdesc = desc[tidx]
        nxt = cur.take(tidx, oa[tidx])
    if nxt.lanes.size and not is_s2 and np.bitwise_and(tdesc, _RESTRICTION_BITS[geom.e2h]).any():
        added = np.asarray(table_restrictions(tdesc, geom.e2h), dtype=np.uint64)
        nxt.restrictions = added if nxt.restrictions is None else nxt.restrictions | added
    return nxt


# The upper levels' descriptors are the same for every address with the same high bits: where the
# lanes outnumber those prefixes, the walk reads each upper-level descriptor once per prefix and
# hands the outcome to the lanes by one gather (the bench's 40-bit stage 1: two levels for 1024
# prefixes instead of for every address).
PREFIX_LANES = 4  # lanes per prefix at least, for a level to be walked by prefix
MAX_PREFIXES = 1 << 16


def _prefix_level(geom: Geometry, lanes: int) -> int | None:
    """The deepest level (above the last) down to which the walk reads the tables once per
    address prefix (None: at no level do enough lanes share a prefix)."""
    best = None
    for level in range(geom.start_level, MAX_LEVELS - 1):
        count = 1 << max(0, geom.ia_bits - geom.shift(level))
        if count <= MAX_PREFIXES and count * PREFIX_LANES <= lanes:
            best = level
    return best


@dataclass(frozen=True)
class _PrefixWalk:
    """The walk of every prefix (bits [ia-1 : shift]) down to a level, dense by prefix: ``kind``
    0 a fault (``out``'s), 1 a table to go on with (``table``, ``restrictions``), 2 + j a leaf
    at the ``j``-th level of the walk (``desc``, ``oa``, ``restrictions``)."""

    shift: int
    out: _Outcome
    kind: I8
    table: U64
    desc: U64
    oa: U64
    restrictions: U64 | None
    levels: tuple[int, ...]

    @classmethod
    def walk(cls, p: WalkParams, words: U64, base_pa: int, root: U64, upto: int) -> _PrefixWalk:
        geom = p.geom
        shift = geom.shift(upto)
        count = 1 << max(0, geom.ia_bits - shift)
        out = _Outcome.empty(count)
        cur = _Lanes(np.arange(count), np.arange(count, dtype=np.uint64) << _U(shift), root[:1].repeat(count), None)
        found = _Leaves([], [], [], [], [])
        levels = tuple(range(geom.start_level, upto + 1))
        for level in levels:
            if cur.lanes.size == 0:
                break
            cur = _level_step(p, out, words, base_pa, cur, level, found)
        kind = np.zeros(count, dtype=np.int8)
        kind[cur.lanes] = 1
        table, desc, oa = (np.zeros(count, dtype=np.uint64) for _ in range(3))
        table[cur.lanes] = cur.table
        restrictions = None
        if cur.restrictions is not None or any(r is not None for r in found.restrictions):
            restrictions = np.zeros(count, dtype=np.uint64)
            if cur.restrictions is not None:
                restrictions[cur.lanes] = cur.restrictions
        for lanes, d, o, level, r in zip(found.lanes, found.desc, found.oa, found.level, found.restrictions,
                                         strict=True):
            kind[lanes] = 2 + levels.index(level)
            desc[lanes] = d
            oa[lanes] = o
            if r is not None and restrictions is not None:
                restrictions[lanes] = r
        return cls(shift, out, kind, table, desc, oa, restrictions, levels)

    def expand(self, out: _Outcome, cur: _Lanes, found: _Leaves) -> _Lanes:
        """Hand each lane its prefix's outcome: faults into ``out``, leaves into ``found``; returns
        the lanes that go on below the prefix levels."""
        prefix = (cur.addr >> _U(self.shift)).astype(np.intp)
        kind = np.take(self.kind, prefix)
        fault = _where(kind == 0)
        if fault.size:
            src, lanes = prefix[fault], cur.lanes[fault]
            for k in _FAULT_EMPTY:
                out.fields[k][lanes] = np.take(self.out.fields[k], src)
        for j, level in enumerate(self.levels):
            leaf = _where(kind == 2 + j)
            if leaf.size:
                src = prefix[leaf]
                found.extend(cur.lanes[leaf], np.take(self.desc, src), np.take(self.oa, src), level,
                             None if self.restrictions is None else np.take(self.restrictions, src))
        go = _where(kind == 1)
        src = prefix[go]
        return _Lanes(cur.lanes[go], cur.addr[go], np.take(self.table, src),
                      None if self.restrictions is None else np.take(self.restrictions, src))



@dataclass(frozen=True)
class _PermissionCheck:
    """The leaves that passed the final-OA and AF checks (their leaf fields are set in the
    outcome): what each access's permission check needs."""

    lanes: npt.NDArray[np.intp]
    level: I8
    perms: U8

    def apply(self, out: _Outcome, access: Access, stage2: bool) -> None:
        """Permission faults (after the Arm ARM's final-OA and AF checks) for ``access``."""
        denied = _where((self.perms & np.uint8(access_perm(access))) == 0)
        if denied.size:
            lanes = self.lanes[denied]
            out.set_fault(lanes, FaultKind.PERMISSION.value, self.level[denied], stage2)
            out.clear_leaf(lanes)


def _leaf_stage(p: WalkParams, out: _Outcome, addr: U64, found: _Leaves) -> _PermissionCheck:
    """Final addresses, permissions and attributes of the leaves, with the final-OA and AF
    faults in the scalar walk's order (the permission faults, which depend on the access, are
    left to the returned check)."""
    geom = p.geom
    is_s2 = geom.stage is Stage.S2
    lanes = np.concatenate(found.lanes)
    desc = np.concatenate(found.desc)
    oa = np.concatenate(found.oa)
    level = found.levels()

    if is_s2:
        perms = np.take(_S2_PERMS, (((desc >> _U(S2_AP.lo)) & _U(S2_AP.max))
                                    | (((desc >> _U(S2_XN.lo)) & _U(S2_XN.max)) << _U(S2_AP.width))).astype(np.intp))
    else:
        restrictions = found.all_restrictions()
        perms = np.asarray(s1_el0_perms(desc, restrictions, p.wxn, p.hd) if p.el0 else
                           s1_perms(desc, restrictions, geom.e2h, p.wxn, p.hd)).astype(np.uint8)
    if len(found.lanes) == 1:  # every leaf at one level
        size_mask = np.full(1, geom.size(found.level[0]) - 1, dtype=np.uint64)
    else:
        masks = np.array([geom.size(lvl) - 1 for lvl in range(geom.start_level, MAX_LEVELS)], dtype=np.uint64)
        size_mask = masks[level.astype(np.intp) - geom.start_level]
    pa = np.asarray(leaf_oa(oa, np.take(addr, lanes), size_mask), dtype=np.uint64)

    # The Arm ARM's order: final output address, then AF, then permissions. A leaf no larger
    # than 2**PS whose descriptor bits passed cannot reach beyond PS (the check is skipped).
    faulted = np.zeros(lanes.size, dtype=np.bool_)
    if p.check_final_oa and geom.size(min(found.level)) > 1 << geom.pa_bits:
        oa_big = oa_out_of_range(pa, geom.pa_bits)
        if oa_big.any():
            big = _where(oa_big)
            out.set_fault(lanes[big], FaultKind.ADDRESS_SIZE.value, level[big], is_s2)
            faulted |= oa_big
    if not p.ha:  # with HA the MMU sets AF instead
        no_af = ~faulted & ((desc & _U(AF.mask)) == 0)
        if no_af.any():
            old = _where(no_af)
            out.set_fault(lanes[old], FaultKind.ACCESS_FLAG.value, level[old], is_s2)
            faulted |= no_af
    if faulted.any():
        ok = _where(~faulted)
        lanes, desc, level, perms, pa = lanes[ok], desc[ok], level[ok], perms[ok], pa[ok]

    f = out.fields
    f["pa"][lanes] = pa
    f["level"][lanes] = level
    f["descriptor"][lanes] = desc
    sh = _field(desc, SH.lo, SH.width).astype(np.intp)
    if geom.lpa2:  # bits [9:8] are OA[51:50]: the shareability is SH0's
        sh[:] = p.sh0
    if is_s2:
        memattr = _field(desc, S2_MEMATTR.lo, S2_MEMATTR.width).astype(np.intp)
        attr = _S2_ATTR[memattr]
        attr_unpredictable = _S2_ATTR_RESERVED[memattr]
        f["attr_unpredictable"][lanes] = attr_unpredictable
    else:
        mair_table = np.array([mair_attr(p.mair, i) for i in range(8)], dtype=np.uint8)
        attr = mair_table[_field(desc, S1_ATTRINDX.lo, S1_ATTRINDX.width).astype(np.intp)]
        attr_unpredictable = np.zeros(lanes.size, dtype=np.bool_)
    f["attr"][lanes] = attr
    f["sh"][lanes] = sh
    attr_sh = attr.astype(np.intp)  # the (attr, sh) tables' flat index
    attr_sh <<= 2
    attr_sh |= sh
    f["par_sh"][lanes] = np.take(_PAR_SH.reshape(-1), attr_sh)
    f["sh_unpredictable"][lanes] = np.take(_SH_UNPRED.reshape(-1), attr_sh) | attr_unpredictable
    f["perms"][lanes] = perms
    return _PermissionCheck(lanes, level, perms)


def _prechecks(p: WalkParams, out: _Outcome, addr: U64, root_pa: int) -> Bools:
    """Faults before the walk starts (as the scalar walk); returns the lanes that walk."""
    geom = p.geom
    is_s2 = geom.stage is Stage.S2
    active = np.ones(addr.size, dtype=np.bool_)
    if is_s2:
        bad = (addr >> _U(pamax(geom))) != 0
        if bad.any():
            out.set_fault(_where(bad), FaultKind.ADDRESS_SIZE.value, 0, False)
            active &= ~bad
    bad = active & ((addr >> _U(geom.ia_bits)) != 0)
    if bad.any():
        out.set_fault(_where(bad), FaultKind.TRANSLATION.value, 0, is_s2)
        active &= ~bad
    if oa_out_of_range(root_pa, geom.pa_bits):
        out.set_fault(_where(active), FaultKind.ADDRESS_SIZE.value, 0, is_s2)
        active[:] = False
    return active


def translate_batch_each(
    words: U64,
    base_pa: int,
    geom: Geometry,
    root_pa: int,
    addresses: npt.ArrayLike,
    accesses: Sequence[Access],
    mair: int = DEFAULT_MAIR,
    *,
    sh0: int = SH_INNER,
    wxn: bool = False,
    ha: bool = False,
    hd: bool = False,
    el0: bool = False,
    qemu: WalkSemantics = ARM_ARM,
) -> tuple[BatchResult, ...]:
    """:func:`translate_batch` for each of ``accesses`` over the same addresses, from one walk:
    the tables are read and the leaves decoded once; only the permission check is per access.
    Each result equals ``translate_batch`` with that access (and owns its arrays)."""
    p = WalkParams.of(geom, mair, sh0, wxn, ha, hd, el0, qemu)
    addr = np.ascontiguousarray(addresses, dtype=np.uint64).reshape(-1)
    words = np.asarray(words, dtype=np.uint64)
    out = _Outcome.empty(addr.size)
    active = _prechecks(p, out, addr, root_pa)
    if active.all():
        lanes, start = np.arange(addr.size), addr
    else:
        lanes = _where(active)
        start = addr[lanes]
    cur = _Lanes(lanes, start, np.full(lanes.size, root_table_base(geom, root_pa), dtype=np.uint64), None)
    found = _Leaves([], [], [], [], [])
    first = geom.start_level
    upto = _prefix_level(geom, lanes.size)
    if upto is not None and lanes.size:
        cur = _PrefixWalk.walk(p, words, base_pa, cur.table, upto).expand(out, cur, found)
        first = upto + 1
    for level in range(first, MAX_LEVELS):
        if cur.lanes.size == 0:
            break
        cur = _level_step(p, out, words, base_pa, cur, level, found)
    check = _leaf_stage(p, out, addr, found) if found.lanes else None
    results = []
    for n, access in enumerate(accesses):
        mine = out if n == len(accesses) - 1 else out.copy()  # the last one takes the walk's arrays
        if check is not None:
            check.apply(mine, access, geom.stage is Stage.S2)
        results.append(mine.result(geom.stage, access, addr))
    return tuple(results)


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
    el0: bool = False,
    qemu: WalkSemantics = ARM_ARM,
) -> BatchResult:
    """Translate every address in ``addresses`` through the tables at ``root_pa``.

    ``words`` is the modelled memory as little-endian 64-bit words starting at ``base_pa``
    (``PagePool.words()``); a descriptor outside it is :data:`UNMODELLED`. The keywords are
    :func:`harness.core.translate.translate`'s.
    """
    return translate_batch_each(words, base_pa, geom, root_pa, addresses, (access,), mair, sh0=sh0, wxn=wxn,
                                ha=ha, hd=hd, el0=el0, qemu=qemu)[0]


# Per-lane outcome classes for the PAR tables: the fault code and level (NO_FAULT and level -1
# map to 0), as uint8 arithmetic (int8 -1 wraps to 255, + 1 to 0).
_CODES = UNMODELLED + 2  # NO_FAULT .. UNMODELLED, shifted by one
_LEVELS = MAX_LEVELS + 1  # -1 .. 3, shifted by one


def _code_level(fault: I8, level: I8) -> npt.NDArray[np.intp]:
    """Each lane's class, to index the tables with (a gather by intp indices: several times
    faster than by uint8 ones)."""
    out = fault.view(np.uint8) + np.uint8(1)
    out *= np.uint8(_LEVELS)
    out += level.view(np.uint8)
    out += np.uint8(1)
    return out.astype(np.intp)


def _state_fst(code: int, level: int) -> int:
    """FST of a (fault code, level) class: :func:`fault_status`; 0 where the lane translates, is
    unmodelled, or the pair cannot occur."""
    if code in (NO_FAULT, UNMODELLED) or code not in FaultKind._value2member_map_:
        return 0
    try:
        return fault_status(FaultKind(code), level)
    except ValueError:
        return 0


def _classes() -> list[tuple[int, int]]:
    return [(code, level) for code in range(-1, _CODES - 1) for level in range(-1, _LEVELS - 1)]


_FST = np.array([_state_fst(c, lv) for c, lv in _classes()], dtype=np.uint64)
# PAR_EL1 without the leaf fields, per class and PAR_EL1.S; and which classes keep the leaf fields.
_PAR_BASE = np.array([[0 if c == UNMODELLED else PAR_RES1.mask | (
    PAR_NS.mask if c == NO_FAULT else PAR_F.mask | (fst << PAR_FST.lo) | (s2 << PAR_S.lo))
    for s2 in (0, 1)] for (c, _), fst in zip(_classes(), _FST.tolist(), strict=True)], dtype=np.uint64)
_PAR_LEAF = np.array([[(1 << 64) - 1 if c == NO_FAULT else 0] * 2 for c, _ in _classes()], dtype=np.uint64)
# par_compare_mask per fault code and the two UNPREDICTABLE flags (ATTR, SH) of a translation.
_COMPARE_MASK = np.array([[[0 if c == UNMODELLED else PAR_COMPARE_MASK_FAULT if c != NO_FAULT else
                            PAR_COMPARE_MASK_OK & ~(PAR_ATTR.mask * au) & ~(PAR_SH.mask * su)
                            for au in (0, 1)] for su in (0, 1)] for c in range(-1, _CODES - 1)],
                         dtype=np.uint64).reshape(-1)


def fault_status_batch(result: BatchResult) -> U64:
    """The 6-bit FST/DFSC per address (PAR_EL1.FST, ESR_ELx.ISS.DFSC) as
    :func:`harness.arch.registers.fault_status` gives it, level -1 codes included; 0 where the
    address translates or is unmodelled."""
    return np.take(_FST, _code_level(result.fault, result.fault_level))


def expected_par_batch(result: BatchResult, stage: Stage | None = None) -> U64:
    """PAR_EL1 per address, as :func:`harness.core.translate.expected_par` (0 where unmodelled)."""
    if stage is not None and stage is not result.stage:
        raise ValueError(f"stage: the result is for stage {int(result.stage)}, got {stage!r}")
    cls = _code_level(result.fault, result.fault_level)
    cls <<= 1
    cls |= result.fault_stage2
    leaf = result.pa & _U(PAR_PA.mask)
    leaf |= result.par_sh.astype(np.uint64) << _U(PAR_SH.lo)
    leaf |= result.attr.astype(np.uint64) << _U(PAR_ATTR.lo)
    leaf &= np.take(_PAR_LEAF.reshape(-1), cls)
    leaf |= np.take(_PAR_BASE.reshape(-1), cls)
    return leaf


def par_compare_mask_batch(result: BatchResult) -> U64:
    """Per-address PAR_EL1 bits to compare, as :func:`harness.core.translate.par_compare_mask`."""
    idx = result.fault.view(np.uint8) + np.uint8(1)
    idx <<= np.uint8(1)
    idx |= result.sh_unpredictable
    idx <<= np.uint8(1)
    idx |= result.attr_unpredictable
    return np.take(_COMPARE_MASK, idx.astype(np.intp))
