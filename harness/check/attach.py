"""Decode a live target's snapshot, and verify the decode on the harness's own MMU.

* :func:`decode` - every regime in use on any CPU (the same regime on several CPUs once, with
  their list: :attr:`RegimeDecode.cpus`), its registers and its mapped ranges (merged leaves, via
  :func:`harness.core.dump.mapped_ranges` over the snapshot's pages), each with the permissions
  and attributes the model's architectural walk gives its first address, under the regime's own
  SCTLR_EL2.WXN (:attr:`LiveRegime.wxn`; Linux sets it).
* :func:`findings` - what the decoded permissions say about W^X at EL2, from the ranges alone:
  writable and executable, execute-never only through WXN, execute-never at EL0 only (UXN = 1,
  PXN = 0) in the EL2&0 regime (Linux 6.12's hVHE hyp mappings).
* :func:`explain` - one address's walk in every regime (:func:`harness.core.translate.translate`).
* :func:`verify` - replay: the snapshot's table pages are copied into the payload's page pool
  (next-level pointers relocated, leaves untouched), the payload's own regions are spliced into
  input-address space the snapshot leaves unmapped (the payload is moved, by choosing a memory
  layout, until that is possible; refused with the reason otherwise), the same control register
  values are programmed with the relocated root (SCTLR_EL2.WXN included), and ``AT`` checks
  every mapped range (both edges and samples inside) and the holes between them against the
  model's walk of the *original* snapshot. The model's walk of the relocated copy must give the same answers (only
  table addresses moved): that is checked too. In a stage-1 regime, execute permission at EL2 is
  checked with instruction fetches (:func:`harness.check.engine.check_exec`) at the probe
  addresses whose leaf lies in RAM the payload does not use (:meth:`Layout.free_ram`: the replay's
  RAM holds none of the snapshot's data, so a stub is planted there and restored). Not at stage 2:
  the EL1 stub would run through the snapshot's own stage-2 mapping of its page.

  A regime of two ranges (EL2&0, EL1&0) has a second way, needing no room in the snapshot: the
  payload runs from a table of its own in TTBR0_EL2 and the snapshot's copy goes in TTBR1_EL2
  (:meth:`LiveRegime.as_both_ranges`), each probe at ``VA + 2**64 - 2**ia_bits``
  (:class:`UpperRangeTarget`). A TTBR1 range (a VHE host kernel's, whose linear map covers the
  payload's addresses) always replays so, at its own addresses; a TTBR0 range when the splice is
  refused (a Linux process's tables are PXNTable above every place the payload's code could go).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from harness.arch import descriptors as d
from harness.arch.geometry import (
    ENTRY_BYTES,
    LAST_LEVEL,
    Geometry,
    Granule,
    Stage,
    ptrs_per_table,
    upper_range_base,
)
from harness.arch.registers import (
    HCR_DC,
    HCR_E2H,
    HCR_RW,
    HCR_VM,
    SCTLR_C,
    SCTLR_I,
    SCTLR_M,
    SCTLR_WXN,
    TTBR_BADDR,
    TTBR_BADDR_51_48,
    Stage1Regs,
    Stage2Regs,
    mair_attr,
    ttbr_baddr,
)
from harness.check.engine import AT_OPS, CheckReport, FetchProbes, Subject, check_at, check_exec
from harness.core.dump import MappedRange, mapped_ranges
from harness.core.memory import PagePool, PoolImage
from harness.core.pgtable import KvmPgtable, PgtableError
from harness.core.prot import Prot
from harness.core.translate import (
    DEFAULT_MAIR,
    PERM_R,
    PERM_W,
    PERM_X,
    READ,
    Access,
    Translation,
    expected_par,
    par_compare_mask,
    translate,
)
from harness.errors import InputError
from harness.live.regimes import Regime
from harness.live.snapshot import Snapshot, SnapshotMemory
from harness.target.layout import LAYOUT, MIB, Layout, Region

U64 = npt.NDArray[np.uint64]


class VerifyRefused(InputError):
    """The snapshot cannot be replayed on the payload (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Decode.


def perm_label(perms: int) -> str:
    return "".join(c if perms & b else "-" for c, b in (("r", PERM_R), ("w", PERM_W), ("x", PERM_X)))


@dataclass(frozen=True)
class LiveRange:
    """One merged range of a regime, with what the architectural walk says of it (SCTLR_EL2.WXN
    applied: ``xn_by_wxn`` when the descriptors alone would let EL2 execute it). ``perms`` are the
    privileged level's (EL2, or EL1 for EL1&0); ``el0`` EL0's, in a two-range regime (EL2&0 or
    EL1&0: AP[1], UXN and their table bits), else None."""

    range: MappedRange
    perms: int
    attr: int | None  # MAIR encoding of the memory type (PAR_EL1.ATTR)
    level: int | None
    xn_by_wxn: bool = False  # writable at EL2, execute-never at EL2 only through SCTLR_EL2.WXN
    el0: int | None = None

    @property
    def va(self) -> int:
        return self.range.va

    @property
    def end(self) -> int:
        return self.range.end

    def to_json(self) -> dict[str, Any]:
        return {**self.range.to_json(), "perms": perm_label(self.perms),
                "el0_perms": None if self.el0 is None else perm_label(self.el0), "attr": self.attr,
                "level": self.level, "xn_by_wxn": self.xn_by_wxn}

    def describe(self) -> str:
        r = self.range
        attr = f" attr={self.attr:#04x}" if self.attr is not None else ""
        wxn = " (x by descriptor, off by WXN)" if self.xn_by_wxn else ""
        el0 = f" el0 {perm_label(self.el0)}" if self.el0 is not None else ""
        return (f"[{r.va:#018x}, {r.end:#018x}) {r.size:#12x} -> {r.pa:#014x} "
                f"{perm_label(self.perms)}{el0}{attr} L{self.level}{wxn}")


@dataclass
class RegimeDecode:
    regime: Regime
    ranges: list[LiveRange]
    cpus: tuple[int, ...] = ()  # the CPUs of the snapshot using it (``regime.registers``: the first's)

    @property
    def name(self) -> str:
        return self.regime.name

    def to_json(self) -> dict[str, Any]:
        g = self.regime.geom
        mair = self.regime.mair
        return {
            "regime": self.regime.name,
            "cpus": list(self.cpus),
            "geometry": g.describe(),
            "decoded": {
                "stage": int(g.stage), "granule": g.granule.label, "ia_bits": g.ia_bits, "pa_bits": g.pa_bits,
                "pamax": g.pamax, "start_level": g.start_level, "levels": g.levels, "pgd_pages": g.pgd_pages,
                "lpa2": g.lpa2, "e2h": g.e2h, "sh0": self.regime.sh0, "wxn": self.regime.wxn,
                "ha": self.regime.ha, "hd": self.regime.hd,
                "mair_attrs": None if mair is None else [f"{mair_attr(mair, i):#04x}" for i in range(8)],
            },
            "root": self.regime.root,
            "registers": {k: f"{v:#x}" for k, v in self.regime.registers.items()},
            "ranges": [r.to_json() for r in self.ranges],
        }


def walk(snapshot: Snapshot, regime: Regime, address: int, access: Access = READ,
         wxn: bool | None = None, el0: bool = False) -> Translation:
    """The model's walk as the regime's registers configure it (MAIR, SH0, SCTLR_EL2.WXN, TCR.HA
    and HD; ``wxn`` overrides WXN); ``el0``: EL0's access (two-range regimes only)."""
    mair = regime.mair if regime.mair is not None else DEFAULT_MAIR
    options = regime.walk_options() | ({} if wxn is None else {"wxn": wxn}) | ({"el0": True} if el0 else {})
    t = translate(snapshot.memory(), regime.geom, regime.root, regime.local(address), access, mair, **options)
    return replace(t, address=address) if regime.upper else t


def has_el0(regime: Regime) -> bool:
    """Whether the regime has an EL0 (a two-range stage-1 regime: EL2&0 or EL1&0)."""
    return regime.geom.stage is Stage.S1 and regime.geom.e2h


def decode(snapshot: Snapshot, regimes: Sequence[Regime] | None = None) -> list[RegimeDecode]:
    """Every regime's merged ranges, with permissions (SCTLR_EL2.WXN applied) and attributes, and
    the CPUs using it; ``regimes`` default: every distinct regime of every CPU of the snapshot."""
    out = []
    for regime in regimes if regimes is not None else snapshot.regimes():
        mem = snapshot.memory()
        ranges = []
        for r in mapped_ranges(mem, regime.geom, regime.root):
            r = replace(r, va=r.va + regime.va_base)  # a TTBR1 range's addresses are its top ones
            t = walk(snapshot, regime, r.va)
            by_wxn = regime.wxn and not t.perms & PERM_X \
                and bool(walk(snapshot, regime, r.va, wxn=False).perms & PERM_X)
            el0 = walk(snapshot, regime, r.va, el0=True).perms if has_el0(regime) else None
            ranges.append(LiveRange(r, t.perms, t.attr, t.level, by_wxn, el0))
        out.append(RegimeDecode(regime, ranges, snapshot.cpus_using(regime)))
    return out


# ---------------------------------------------------------------------------------------------
# Findings: what the decoded permissions say about the hypervisor's W^X, from the ranges alone.

FINDING_WRITABLE_EXECUTABLE = "writable-executable"
FINDING_WXN_ONLY = "wxn-only"
FINDING_EL0_ONLY_XN = "el0-only-xn"
HYP_REGIMES = ("el2", "el2&0")  # the regimes the W^X findings judge


@dataclass(frozen=True)
class Finding:
    """A property of a regime's mappings worth a human's attention (``kind`` is one of the
    FINDING_* keys); ``ranges`` are the ranges it concerns."""

    kind: str
    regime: str
    summary: str
    ranges: tuple[LiveRange, ...]
    cpus: tuple[int, ...] = ()  # the CPUs using the regime

    @property
    def size(self) -> int:
        return sum(r.range.size for r in self.ranges)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "regime": self.regime, "cpus": list(self.cpus), "summary": self.summary,
                "count": len(self.ranges),
                "bytes": self.size, "ranges": [r.to_json() for r in self.ranges]}

    def text(self, limit: int = 8) -> str:
        on = f" (vCPU{'s' if len(self.cpus) != 1 else ''} {', '.join(map(str, self.cpus))})" if self.cpus else ""
        lines = [f"{self.regime}{on}: {self.summary}"]
        lines.extend(f"    {r.describe()}" for r in self.ranges[:limit])
        if len(self.ranges) > limit:
            lines.append(f"    ... and {len(self.ranges) - limit} more")
        return "\n".join(lines)


def _count(ranges: Sequence[LiveRange]) -> str:
    return f"{len(ranges)} range{'s' if len(ranges) != 1 else ''} ({sum(r.range.size for r in ranges):#x} bytes)"


def el0_only_xn(r: LiveRange) -> bool:
    """EL2&0 leaf fields UXN = 1, PXN = 0: execute-never at EL0 only (EL2's bit is PXN)."""
    fields = dict(r.range.fields)
    return fields.get(d.S1_UXN.name) == 1 and fields.get(d.S1_PXN.name) == 0


def regime_findings(rd: RegimeDecode) -> list[Finding]:
    """The stage-1 findings, computed from the decoded ranges (a System.map would be needed to
    tell which executable ranges are text; these need none):

    * ``writable-executable``: writable and executable at EL2 (SCTLR_EL2.WXN = 0);
    * ``wxn-only``: writable at EL2 and executable by its descriptors (XN/PXN clear), execute-never
      at EL2 only because SCTLR_EL2.WXN = 1: W^X holds only through WXN;
    * ``el0-only-xn`` (EL2&0 regime): execute-never at EL0 only (UXN = 1, PXN = 0), so executable
      at EL2 unless WXN removes it: read-only ones (data, not text) run at EL2.

    They are the hypervisor's rules (:data:`HYP_REGIMES`: EL2's regime, EL2&0's lower range): a
    kernel's own tables (EL1&0, a VHE host's TTBR1_EL2) are meant to map their text UXN = 1, PXN = 0.
    """
    if rd.regime.geom.stage is not Stage.S1 or rd.name not in HYP_REGIMES:
        return []
    out = []
    wx = [r for r in rd.ranges if r.perms & PERM_W and r.perms & PERM_X]
    if wx:
        out.append(Finding(FINDING_WRITABLE_EXECUTABLE, rd.name,
                           f"{_count(wx)} writable and executable at EL2 (SCTLR_EL2.WXN = 0)", tuple(wx), rd.cpus))
    by_wxn = [r for r in rd.ranges if r.xn_by_wxn]
    if by_wxn:
        out.append(Finding(FINDING_WXN_ONLY, rd.name,
                           f"W^X holds only through SCTLR_EL2.WXN: {_count(by_wxn)} writable at EL2 with "
                           "XN/PXN clear (executable at EL2 without WXN)", tuple(by_wxn), rd.cpus))
    if rd.regime.geom.e2h:
        uxn = [r for r in rd.ranges if el0_only_xn(r) and (r.perms & PERM_X or r.xn_by_wxn)]
        if uxn:
            ro = [r for r in uxn if r.perms & PERM_X and not r.perms & PERM_W]
            saved = [r for r in uxn if r.xn_by_wxn]
            out.append(Finding(FINDING_EL0_ONLY_XN, rd.name,
                               f"execute-never at EL0 only (UXN = 1, PXN = 0) in the EL2&0 regime: {_count(uxn)}; "
                               f"{_count(ro)} read-only and executable at EL2, {_count(saved)} writable and "
                               "execute-never at EL2 only through SCTLR_EL2.WXN", tuple(uxn), rd.cpus))
    return out


def findings(decoded: Iterable[RegimeDecode]) -> list[Finding]:
    return [f for rd in decoded for f in regime_findings(rd)]


@dataclass(frozen=True)
class PermFilter:
    """``rx`` (all of these), ``!w`` (none of these), or both: ``x!w``."""

    need: int
    refuse: int

    @classmethod
    def parse(cls, text: str) -> PermFilter:
        need = refuse = 0
        negate = False
        bits = {"r": PERM_R, "w": PERM_W, "x": PERM_X}
        for ch in text.strip().lower():
            if ch == "!":
                negate = True
                continue
            if ch == "-":
                continue
            if ch not in bits:
                raise InputError(f"--perm: expected letters r, w, x, each optionally preceded by '!' "
                                 f"(e.g. 'x!w'), got {text!r}")
            if negate:
                refuse |= bits[ch]
            else:
                need |= bits[ch]
            negate = False
        return cls(need, refuse)

    def __call__(self, perms: int) -> bool:
        return perms & self.need == self.need and not perms & self.refuse


def parse_window(text: str) -> tuple[int, int]:
    """``START:END`` or ``START-END`` (END exclusive), or ``START+SIZE``; numbers in any base Python
    reads (0x...), ASCII digits only."""
    try:
        if not text.isascii():
            raise ValueError(text)
        if "+" in text:
            a, b = text.split("+", 1)
            start = int(a, 0)
            return start, start + int(b, 0)
        a, b = text.replace("-", ":", 1).split(":", 1)
        start, end = int(a, 0), int(b, 0)
    except ValueError:
        raise InputError(f"--range: expected START:END, START-END or START+SIZE (e.g. 0x40000000:0x80000000), "
                         f"got {text!r}") from None
    if end <= start:
        raise InputError(f"--range: END must be above START, got {text!r}")
    return start, end


def filter_ranges(ranges: Iterable[LiveRange], window: tuple[int, int] | None = None,
                  perms: PermFilter | None = None) -> list[LiveRange]:
    """The ranges overlapping ``window`` (clipped to it) whose permissions pass ``perms``."""
    out = []
    for r in ranges:
        if perms is not None and not perms(r.perms):
            continue
        if window is not None:
            lo, hi = max(r.va, window[0]), min(r.end, window[1])
            if lo >= hi:
                continue
            if (lo, hi) != (r.va, r.end):
                m = r.range
                r = replace(r, range=replace(m, va=lo, size=hi - lo, pa=m.pa + (lo - m.va)))
        out.append(r)
    return out


def explain(snapshot: Snapshot, address: int, regimes: Sequence[Regime] | None = None) -> list[tuple[str, Translation]]:
    return [(r.name, walk(snapshot, r, address))
            for r in (regimes if regimes is not None else snapshot.regimes())]


# ---------------------------------------------------------------------------------------------
# Replay: relocate the tables into the payload's pool.


def _address_bits(geom: Geometry) -> int:
    """Descriptor bits that hold the next-level (or output) address for this geometry."""
    bits = d.oa_mask(geom.granule, geom.lpa2)
    if geom.granule is Granule.K64:
        bits |= d.OA_51_48.mask
    if geom.lpa2:
        bits |= d.OA_51_50_LPA2.mask
    return bits


def _table_address(pte: int, geom: Geometry) -> int:
    return d.pte_to_phys(pte, geom.granule, geom.lpa2)


def _with_table_address(pte: int, pa: int, geom: Geometry) -> int:
    return (pte & ~_address_bits(geom)) | d.phys_to_pte(pa, geom.granule, geom.lpa2)


@dataclass
class Replay:
    """The snapshot's tables copied into the payload's page pool, as the model's own table
    (:class:`KvmPgtable` over the pool, so the payload's regions are mapped by its ``map``):
    ``moved`` maps each original table page to its copy; ``added`` are the pages the splice made."""

    table: KvmPgtable
    moved: dict[int, int] = field(default_factory=dict)
    added: set[int] = field(default_factory=set)
    payload: KvmPgtable | None = None  # the payload's own table (TTBR0), the copy then in TTBR1

    @property
    def va_offset(self) -> int:
        """What the MMU's input address adds to the walk's: ``2**64 - 2**ia_bits`` when the copy
        replays through TTBR1, else 0."""
        return upper_range_base(self.geom.ia_bits) if self.payload is not None else 0

    @property
    def through(self) -> str:
        """The table base register the copy is installed in."""
        if self.geom.stage is Stage.S2:
            return "VTTBR_EL2"
        return "TTBR1_EL2" if self.payload is not None else "TTBR0_EL2"

    @property
    def geom(self) -> Geometry:
        return self.table.geom

    @property
    def pool(self) -> PagePool:
        return self.table.mem

    @property
    def root(self) -> int:
        assert self.table.pgd is not None
        return self.table.pgd

    def pages_in_use(self) -> set[int]:
        g = self.pool.page_size
        return {self.pool.base + off for off in range(0, self.pool.used_extent(), g)
                if self.pool.refcount(self.pool.base + off)}

    def map_identity(self, region: Region) -> None:
        """Map ``region`` (identity, the model's attributes for its protection); refuse if any
        part of it is already mapped."""
        before = self.pages_in_use()
        try:
            self.table.map(region.base, region.size, region.base, region.prot)
        except PgtableError as exc:
            raise VerifyRefused(f"the payload's {region.name} region cannot be mapped: {exc}") from None
        self.added |= self.pages_in_use() - before


def relocate(snapshot: Snapshot, regime: Regime, layout: Layout) -> Replay:
    """Copy every table page reachable from the regime's root into a pool at ``layout.pool_base``,
    rewriting next-level table addresses (leaves untouched)."""
    geom = regime.geom
    pool = PagePool(layout.pool_base, layout.pool_size, geom.granule.size)
    rep = Replay(KvmPgtable.for_geometry(geom, pool))
    src = snapshot.memory()

    def copy(orig: int, new: int, level: int, entries: int) -> None:
        for i in range(entries):
            pte = _read(src, orig + i * ENTRY_BYTES)
            if level < LAST_LEVEL and d.kind(pte, level, geom.block_levels) is d.Kind.TABLE:
                child = _table_address(pte, geom)
                if child not in rep.moved:
                    rep.moved[child] = pool.alloc_page()
                    copy(child, rep.moved[child], level + 1, ptrs_per_table(geom.granule))
                pte = _with_table_address(pte, rep.moved[child], geom)
            pool.write64(new + i * ENTRY_BYTES, pte)

    copy(regime.root, rep.root, geom.start_level, geom.pgd_entries)
    return rep


def _read(mem: SnapshotMemory, pa: int) -> int:
    if not mem.contains(pa):
        raise VerifyRefused(f"table word {pa:#x} is not in the snapshot (capture incomplete)")
    return mem.read64(pa)


def splice(rep: Replay, regions: Sequence[Region], taken: Sequence[tuple[int, int]]) -> set[int]:
    """Map each region (identity) into the relocated tables, refusing when the snapshot maps any
    of it; returns the physical addresses of the words the splice changed in copied pages."""
    pool = rep.pool
    used = pool.used_extent()
    before = pool.words()[: used // ENTRY_BYTES].copy()
    for r in regions:
        for lo, hi in taken:
            if r.base < hi and lo < r.end:
                raise VerifyRefused(f"the payload's {r.name} region [{r.base:#x}, {r.end:#x}) is mapped by "
                                    f"the snapshot ([{lo:#x}, {hi:#x})): cannot splice it in")
        if r.end > rep.geom.limit:
            raise VerifyRefused(f"the payload's {r.name} region ends above the {rep.geom.ia_bits}-bit input range")
        rep.map_identity(r)
    after = pool.words()[: used // ENTRY_BYTES]
    return {pool.base + int(i) * ENTRY_BYTES for i in np.nonzero(before != after)[0]}


def _check_spliced(regime: Regime, rep: Replay, regions: Sequence[Region]) -> None:
    """The payload must get what it needs where it was spliced in: the snapshot's own table entries
    on the way (APTable, XNTable/PXNTable: a Linux user process's tables are PXNTable) may take
    it away, and the payload would then fault on its first instruction after the install."""
    mair = regime.mair if regime.mair is not None else DEFAULT_MAIR
    for r in regions:
        need = (PERM_R if r.prot & Prot.R else 0) | (PERM_W if r.prot & Prot.W else 0) \
            | (PERM_X if r.prot & Prot.X else 0)
        t = translate(rep.pool, rep.geom, rep.root, r.base, READ, mair, **regime.walk_options())
        if t.perms & need != need:
            raise VerifyRefused(f"the snapshot's table entries above the payload's {r.name} region [{r.base:#x}, "
                                f"{r.end:#x}) leave it {perm_label(t.perms)} where it needs {perm_label(need)} "
                                "(hierarchical APTable/XNTable/PXNTable): cannot splice it in")


def split(snapshot: Snapshot, regime: Regime, layout: Layout) -> Replay:
    """The copy for TTBR1, and the payload's regions (identity) in a table of the same geometry
    for TTBR0, both in the layout's pool: the copy is not changed at all."""
    rep = relocate(snapshot, regime, layout)
    rep.payload = KvmPgtable.for_geometry(rep.geom, rep.pool)
    for r in layout.stage1_regions():
        try:
            rep.payload.map(r.base, r.size, r.base, r.prot)
        except PgtableError as exc:  # the payload's regions above the regime's input size
            raise VerifyRefused(f"the payload's {r.name} region cannot be mapped in TTBR0_EL2 "
                                f"({rep.geom.ia_bits}-bit input range): {exc}") from None
    return rep


class UpperRangeTarget:
    """The replay target as the check engine sees it when the copy is in TTBR1: each probe's
    input address goes to the MMU as ``address + offset`` (AT and fetches), and the FAR of a
    fetch's abort comes back as the walk's address; the rest is the target's."""

    def __init__(self, target: Any, offset: int) -> None:
        self.target = target
        self.offset = np.uint64(offset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def _up(self, addresses: npt.ArrayLike) -> U64:
        with np.errstate(over="ignore"):
            return np.asarray(addresses, dtype=np.uint64) + self.offset

    def at_start(self, addresses: npt.ArrayLike, op: Any) -> None:
        self.target.at_start(self._up(addresses), op)

    def at_start_both(self, reads: npt.ArrayLike, writes: npt.ArrayLike, stage: Any, uninstall: bool = False, *,
                      el0: bool = False) -> None:
        self.target.at_start_both(self._up(reads), self._up(writes), stage, uninstall=uninstall, el0=el0)

    def at(self, addresses: npt.ArrayLike, op: Any) -> U64:
        out: U64 = self.target.at(self._up(addresses), op)
        return out

    def fetch(self, addresses: npt.ArrayLike, stage: Any = None, *, el0: bool = False) -> Any:
        rec = self.target.fetch(self._up(addresses), stage=stage, el0=el0).copy()
        faulted = ~np.asarray(rec["completed"], dtype=np.bool_)
        with np.errstate(over="ignore"):
            rec["far"][faulted] = rec["far"][faulted].astype(np.uint64) - self.offset
        return rec


def layouts(base: Layout = LAYOUT) -> list[Layout]:
    """Candidate payload layouts: the default, then the whole block (code .. pool) moved up RAM."""
    out = [base]
    span = base.pool_base + base.pool_size - base.code
    step = 256 * MIB
    for k in range(1, 4):
        off = k * step
        if base.code + off + span > base.ram_end:
            break
        moved = {name: getattr(base, name) + off for name in
                 ("code", "el1_stub", "data", "mailbox", "kpgt", "probe_addrs", "probe_results", "pool_base")}
        end = base.pool_base + base.pool_size + off
        if end < base.ram_end:
            scratch = {"scratch_base": end, "scratch_size": base.ram_end - end}
        else:
            scratch = {"scratch_base": base.code, "scratch_size": base.code + off - base.code}
        cand = replace(base, **moved, **scratch)
        cand.check()
        out.append(cand)
    return out


# ---------------------------------------------------------------------------------------------
# Probe addresses.


def probe_addresses(ranges: Sequence[MappedRange], limit: int, granule: int, rng: np.random.Generator,
                    samples: int = 3) -> U64:
    """Both edges of each range and ``samples`` addresses inside it; the same for every hole
    between ranges (and before the first and after the last, up to ``limit``)."""
    out: list[int] = []

    def span(lo: int, hi: int) -> None:
        if hi <= lo:
            return
        out.extend((lo, hi - 1))
        if hi - lo > 2 * granule:
            out.extend(int(x) for x in rng.integers(lo + granule, hi - granule, size=samples, dtype=np.uint64))
        elif hi - lo > granule:
            out.append(lo + granule)

    prev = 0
    for r in ranges:
        span(prev, r.va)
        span(r.va, r.end)
        prev = r.end
    span(prev, limit)
    return np.unique(np.array(out, dtype=np.uint64))


# ---------------------------------------------------------------------------------------------
# Verify.


@dataclass
class Mismatch:
    """The model's walk of the relocated copy disagrees with its walk of the original snapshot."""

    regime: str
    op: str
    address: int
    expected: str
    actual: str
    walk: str

    def to_json(self) -> dict[str, Any]:
        return {"regime": self.regime, "op": self.op, "address": self.address, "expected": self.expected,
                "actual": self.actual, "walk": self.walk}


@dataclass
class RegimeVerify:
    """One regime's replay: the engine's AT check of the replayed tables (``check``), and the
    model's walks of the replayed copy against the original snapshot (``relocation_*``)."""

    regime: str
    check: CheckReport
    relocation_checked: int = 0
    relocation_mismatched: int = 0  # the relocated copy walks differently (a harness bug)
    excluded: int = 0  # walks through tables the splice added: compared with the replayed model only
    pages: int = 0
    ranges: int = 0
    spliced: list[str] = field(default_factory=list)
    layout_code: int = 0
    through: str = "TTBR0_EL2"  # the table base register the replay installs the copy in
    va_offset: int = 0  # the MMU is asked at the walk's address + this (2**64 - 2**ia_bits in TTBR1)
    relocation_mismatches: list[Mismatch] = field(default_factory=list)
    wxn: bool = False  # SCTLR_EL2.WXN of the snapshot, programmed on the replay and predicted with
    sctlr_el2: int | None = None  # SCTLR_EL2 read back from the replay target while checking (stage 1)
    fetches: FetchProbes | None = None  # instruction fetches at EL2 on the replay (stage 1)

    @property
    def checked(self) -> int:
        return self.check.checked

    @property
    def mismatched(self) -> int:
        return self.check.mismatched + self.relocation_mismatched

    def to_json(self) -> dict[str, Any]:
        return {"regime": self.regime, **self.check.to_json(), "mismatched": self.mismatched,
                "at_mismatched": self.check.mismatched, "relocation_checked": self.relocation_checked,
                "relocation_mismatched": self.relocation_mismatched, "through_spliced_tables": self.excluded,
                "pages": self.pages, "ranges": self.ranges, "spliced": self.spliced,
                "payload_code": f"{self.layout_code:#x}", "through": self.through,
                "va_offset": f"{self.va_offset:#x}", "wxn": self.wxn,
                "sctlr_el2": None if self.sctlr_el2 is None else f"{self.sctlr_el2:#x}",
                "relocation_mismatches": [m.to_json() for m in self.relocation_mismatches[:50]],
                "fetch": self._fetch_json()}

    def _fetch_json(self) -> dict[str, int]:
        f = self.fetches
        if f is None:
            return {"probes": 0, "completed": 0, "faulted": 0}
        done = int(np.count_nonzero(f.records["completed"]))
        return {"probes": int(f.addresses.size), "completed": done, "faulted": int(f.addresses.size) - done}


@dataclass
class VerifyReport:
    regimes: list[RegimeVerify]
    qemu: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def checked(self) -> int:
        return sum(r.checked for r in self.regimes)

    @property
    def mismatched(self) -> int:
        return sum(r.mismatched for r in self.regimes)

    @property
    def known(self) -> int:
        return sum(r.check.known for r in self.regimes)

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "mismatched": self.mismatched,
                "known_divergences": self.known, "qemu": self.qemu,
                "regimes": [r.to_json() for r in self.regimes], "timings": self.timings}

    def text(self) -> str:
        lines = [f"verify: {'OK' if self.ok else 'MISMATCH'}: {self.checked} probes (AT, fetch), "
                 f"{self.mismatched} mismatched ({self.qemu})"]
        for r in self.regimes:
            where = (f"in {r.through} at VA + {r.va_offset:#x}, the payload in TTBR0_EL2 (its own table)"
                     if r.va_offset else f"in {r.through}; payload at {r.layout_code:#x}, spliced "
                     f"{', '.join(r.spliced) or 'nothing'}; {r.excluded} walks through spliced tables")
            lines.append(f"  {r.regime}: {r.pages} table pages, {r.ranges} ranges; replayed {where}; "
                         f"relocation: {r.relocation_mismatched} of {r.relocation_checked} walks differ"
                         + (f"; SCTLR_EL2 {r.sctlr_el2:#x} (WXN {int(r.wxn)})" if r.sctlr_el2 is not None else ""))
            lines.append("    " + r.check.text().replace("\n", "\n    "))
            for m in r.relocation_mismatches[:20]:
                lines.append(f"    relocation {m.op} {m.address:#x}: original {m.expected}; relocated {m.actual}")
                lines.extend(f"      {ln}" for ln in m.walk.splitlines())
        return "\n".join(lines)


TargetFactory = Callable[[Layout], Any]  # a started harness.target.target.Target for a layout

def replay_sctlr_el2_set(regime: Regime) -> int:
    """SCTLR_EL2 bits the replay sets: the payload's M, C, I, and the snapshot's WXN, so that the
    MMU is asked under the same WXN the model predicts with (the payload runs under it: its code
    is mapped r-x, its data rw-). ``AT`` cannot observe WXN (no fetch form); the payload's own
    fetches under it can."""
    return SCTLR_M.prep(1) | SCTLR_C.prep(1) | SCTLR_I.prep(1) | SCTLR_WXN.prep(int(regime.wxn))


def _regs_for(regime: Regime, rep: Replay) -> Stage1Regs | Stage2Regs:
    regs = regime.registers
    root = rep.root
    if regime.geom.stage is Stage.S1:
        # Any stage-1 range replays as EL2's (E2H = 0) or EL2&0's: through TTBR0_EL2 (a TTBR1 range
        # by the same walk of VA - va_base), or through TTBR1_EL2 with the payload's own table in
        # TTBR0_EL2 (rep.payload); EL1&0 in EL2&0 (the same two-range layout).
        ttbr = regs.get(regime.base, 0)
        new_ttbr = (ttbr & ~(TTBR_BADDR.mask | TTBR_BADDR_51_48.mask)) | ttbr_baddr(root, regime.geom)
        new_ttbr &= ~1  # CnP off: one PE
        hcr = HCR_E2H.prep(int(regime.geom.e2h))
        mair = regime.mair if regime.mair is not None else DEFAULT_MAIR
        if rep.payload is not None:
            assert rep.payload.pgd is not None
            return Stage1Regs(mair_el2=mair, tcr_el2=regime.as_both_ranges(),
                              ttbr0_el2=ttbr_baddr(rep.payload.pgd, regime.geom), ttbr1_el2=new_ttbr,
                              sctlr_el2_set=replay_sctlr_el2_set(regime), hcr_el2_set=hcr)
        return Stage1Regs(mair_el2=mair, tcr_el2=regime.as_lower_range(), ttbr0_el2=new_ttbr,
                          sctlr_el2_set=replay_sctlr_el2_set(regime), hcr_el2_set=hcr)
    vttbr = regs.get("VTTBR_EL2", 0)
    new_vttbr = (vttbr & ~(TTBR_BADDR.mask | TTBR_BADDR_51_48.mask)) | ttbr_baddr(root, regime.geom)
    return Stage2Regs(vtcr_el2=regs["VTCR_EL2"], vttbr_el2=new_vttbr & ~1,
                      hcr_el2_set=HCR_VM.prep(1) | HCR_RW.prep(1) | HCR_DC.prep(1))


def _par(t: Translation) -> int:
    return 0 if t.unmodelled else expected_par(t)


def _occupied(ranges: Sequence[MappedRange]) -> list[tuple[int, int]]:
    return [(r.va, r.end) for r in ranges]


def _prepare(snapshot: Snapshot, regime: Regime,
             ranges: Sequence[MappedRange]) -> tuple[Layout, Replay, list[Region], set[int]]:
    """How the regime replays: through TTBR1_EL2 at once for a TTBR1 range (its own addresses);
    otherwise the first payload layout whose regions splice into the snapshot's unmapped input
    space, and for a TTBR0 range of EL2&0 when none does, through TTBR1_EL2 (:func:`split`)."""
    reasons: list[str] = []
    two_ranges = regime.geom.stage is Stage.S1 and regime.geom.e2h
    if not (two_ranges and regime.upper):
        for layout in layouts():
            try:
                return _spliced(snapshot, regime, ranges, layout)
            except VerifyRefused as exc:
                reasons.append(f"payload at {layout.code:#x}: {exc}")
    if two_ranges:
        try:
            return LAYOUT, split(snapshot, regime, LAYOUT), [], set()
        except VerifyRefused as exc:
            reasons.append(f"payload in TTBR0_EL2, the tables in TTBR1_EL2: {exc}")
    raise VerifyRefused(f"{regime.name}: no payload layout fits the snapshot's unmapped input space: "
                        + "; ".join(reasons))


def _spliced(snapshot: Snapshot, regime: Regime, ranges: Sequence[MappedRange],
             layout: Layout) -> tuple[Layout, Replay, list[Region], set[int]]:
    """The snapshot's copy with the payload's regions of ``layout`` spliced into its unmapped input
    space (refused with :class:`VerifyRefused` where they do not fit)."""
    taken = _occupied(ranges)
    want = layout.stage1_regions() if regime.geom.stage is Stage.S1 else layout.stage2_regions()
    rep = relocate(snapshot, regime, layout)
    if regime.geom.stage is Stage.S2:
        # AT S12E1* runs at EL2: the EL1 stub is needed only for real accesses; splice it when
        # the snapshot leaves its IPA unmapped, else leave the snapshot's mapping alone.
        want = [r for r in want if not any(r.base < hi and lo < r.end for lo, hi in taken)]
    changed = splice(rep, want, taken)
    if regime.geom.stage is Stage.S1:
        _check_spliced(regime, rep, want)
    return layout, rep, want, changed


def verify(snapshot: Snapshot, start_target: TargetFactory, samples: int = 3, seed: int = 0,
           regimes: Sequence[Regime] | None = None) -> VerifyReport:
    """Replay every regime of ``snapshot`` on targets from ``start_target(layout)`` (see module doc)."""
    t0 = time.perf_counter()
    report = VerifyReport([])
    rng = np.random.default_rng(seed)
    targets: dict[Layout, Any] = {}
    try:
        for regime in regimes if regimes is not None else snapshot.regimes():
            report.regimes.append(_verify_regime(snapshot, regime, targets, start_target, rng, samples, report))
    finally:
        for t in targets.values():
            t.close()
    report.timings["total"] = time.perf_counter() - t0
    return report


def _verify_regime(snapshot: Snapshot, regime: Regime, targets: dict[Layout, Any], start_target: TargetFactory,
                   rng: np.random.Generator, samples: int, report: VerifyReport) -> RegimeVerify:
    geom = regime.geom
    ranges = mapped_ranges(snapshot.memory(), geom, regime.root)
    layout, rep, spliced, changed = _prepare(snapshot, regime, ranges)
    res = RegimeVerify(regime.name, CheckReport(regime.name, geom.describe(), ""),
                       pages=len(rep.moved) + geom.pgd_pages, ranges=len(ranges),
                       spliced=[r.name for r in spliced], layout_code=layout.code, wxn=regime.wxn,
                       through=rep.through, va_offset=rep.va_offset)
    pool, root = rep.pool, rep.root
    addrs = probe_addresses(ranges, geom.limit, geom.granule.size, rng, samples)
    for r in spliced:  # the payload's own regions, edges and a sample inside (checked as replayed)
        addrs = np.union1d(addrs, np.array([r.base, r.end - 1, r.base + r.size // 2], dtype=np.uint64))
    image = pool.export()
    used = max(pool.used_extent(), geom.granule.size)
    mair = regime.mair if regime.mair is not None else DEFAULT_MAIR
    options = regime.walk_options()
    mem = snapshot.memory()
    # The model's walk of the copy must equal its walk of the original (relocation moves table
    # addresses only), except where it goes through what the splice added.
    for op, access in AT_OPS[geom.stage]:
        for a in addrs:
            replayed = translate(pool, geom, root, int(a), access, mair, **options)
            if any(st.table_pa in rep.added or st.desc_pa in changed for st in replayed.steps):
                res.excluded += 1
                continue
            original = translate(mem, geom, regime.root, int(a), access, mair, **options)
            res.relocation_checked += 1
            mask = par_compare_mask(original)
            if (_par(original) ^ _par(replayed)) & mask or replayed.unmodelled != original.unmodelled:
                res.relocation_mismatched += 1
                if len(res.relocation_mismatches) < 20:
                    res.relocation_mismatches.append(Mismatch(
                        regime.name, op, int(a), original.summary(), replayed.summary(), original.explain()))
    if res.relocation_mismatched:
        # The copy is not the snapshot: running the payload on it proves nothing (and may hang it).
        res.check.count(res.check.skipped, "replay differs from the snapshot: AT not run", int(addrs.size))
        return res
    if layout not in targets:
        for t in targets.values():
            t.close()
        targets.clear()
        targets[layout] = start_target(layout)
    target = targets[layout] if not rep.va_offset else UpperRangeTarget(targets[layout], rep.va_offset)
    report.qemu = res.check.qemu = ".".join(map(str, target.qemu_version))
    regs = _regs_for(regime, rep)
    subject = Subject(f"{regime.name} (replayed)", geom, pool, root, regs,
                      PoolImage(image.base, image.data[:used]), mair, accesses=False, options=options)
    target.install(regs, subject.image)
    try:
        if geom.stage is Stage.S1:  # what the MMU runs under, read back (WXN included)
            res.sctlr_el2 = target.sysreg("SCTLR_EL2")
        check_at(res.check, target, subject, addrs)
        if geom.stage is Stage.S1:  # execute permission at EL2: fetches where the leaf's PA is free RAM
            res.fetches = check_exec(res.check, target, subject, addrs, rng, where=layout.free_ram())
    finally:
        target.uninstall()
    return res
