"""Hyp stage-1 and guest stage-2 page tables: every operation is a visitor of the one walker.

Reference counting follows KVM's stage-2 scheme for both stages: a table page holds one
reference for being allocated plus one per valid entry in it. When a walk leaves a table with
no valid entry (reference count back to 1) the parent entry is cleared and the page freed, and
destroy returns every page to the pool.

A failing operation leaves the tables as they were: each runs as a pool transaction.

TLB maintenance (:mod:`harness.core.tlb`): with ``maint`` set (a :class:`~harness.core.tlb.MaintLog`)
every operation records what it does, in order: each descriptor write, each invalidation, each table
page freed, following upstream's visitors: a leaf cleared by unmap is invalidated at its level
(stage 2 ``__kvm_tlb_flush_vmid_ipa(addr, level)``, hyp ``tlbi vale2is``), an empty table cleared
and invalidated with no level hint before its page is freed, a block split break-before-make
(cleared, invalidated at its level, then the table written), wrprotect and mkold followed by the
VMID-wide flush their callers issue (``kvm_flush_remote_tlbs_memslot``, the MMU notifier's
``clear_flush_young``), relax_perms by ``__kvm_tlb_flush_vmid_ipa_nsh(addr, level)``; mkyoung needs
none (an entry with AF = 0 is never cached) and map only fills invalid slots. A failed operation's
record is dropped with its writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from harness.arch import descriptors as d
from harness.arch.geometry import LAST_LEVEL, PAMAX_REFERENCE, Geometry, Granule, Stage
from harness.arch.registers import MairIndex, RegimeRegs, regime_regs
from harness.core.memory import PagePool
from harness.core.prot import Prot
from harness.core.tlb import Flush, MaintLog
from harness.core.walker import (
    UPSTREAM_RULES,
    GeometryShape,
    Walker,
    WalkFlags,
    WalkRules,
    align_down,
    walk,
)


class PgtableError(ValueError):
    """An operation the table cannot perform; the message says which argument and why."""


class MapConflictError(PgtableError):
    """A valid, different mapping is already in place."""


@dataclass
class _MapData:
    """A map walk's state (``struct stage2_map_data`` / ``hyp_map_data``): the next output
    address and the leaf attributes."""

    phys: int
    attrs: int


@dataclass(frozen=True)
class Leaf:
    """A leaf entry found in the table: the descriptor, its level and the range it maps."""

    pte: int
    level: int
    addr: int
    size: int


class KvmPgtable(GeometryShape):
    """Common state (``struct kvm_pgtable``): geometry, memory, PGD."""

    def __init__(self, geom: Geometry, mem: PagePool, rules: WalkRules = UPSTREAM_RULES) -> None:
        if mem.page_size != geom.granule.size:
            raise PgtableError(
                f"mem: the pool's page size {mem.page_size:#x} differs from the "
                f"{geom.granule.label} granule"
            )
        self.geom = geom
        self.mem = mem
        self.rules = rules  # which upstream walker fixes every operation's walk applies
        self.maint: MaintLog | None = None  # set: operations record their writes, invalidations and frees
        n = geom.pgd_pages
        self.pgd: int | None = mem.alloc_pages(n, align_pages=n)

    # Protocol for the walker: ia_bits, start_level, granule, lpa2 (GeometryShape), pgd, mem.
    @property
    def stage(self) -> Stage:
        return self.geom.stage

    @staticmethod
    def for_geometry(geom: Geometry, mem: PagePool, rules: WalkRules = UPSTREAM_RULES) -> KvmPgtable:
        """The table class that builds ``geom``'s regime (hyp stage 1 or guest stage 2)."""
        if geom.stage is Stage.S1:
            return HypPgtable(mem, geom.granule, geom.ia_bits, geom.pa_bits, rules, pamax=geom.pamax,
                              lpa2=geom.lpa2, e2h=geom.e2h)
        return Stage2Pgtable(mem, geom.granule, geom.ia_bits, geom.pa_bits, geom.start_level,
                             rules=rules, pamax=geom.pamax, lpa2=geom.lpa2)

    def walk(self, addr: int, size: int, walker: Walker, rules: WalkRules | None = None) -> None:
        walk(self, addr, size, walker, self.rules if rules is None else rules)

    # -- entry helpers ------------------------------------------------------------------------
    def _page_of(self, ptep: int) -> int:
        return align_down(ptep, self.granule.size)

    def _write(self, ptep: int, pte: int) -> None:
        if self.maint is not None:
            self.maint.write(ptep, self.mem.read64(ptep), pte)
        self.mem.write64(ptep, pte)

    def _install(self, ptep: int, pte: int) -> None:
        """Write a valid entry into an invalid slot, taking a reference on its table page."""
        self._write(ptep, pte)
        self.mem.get_page(self._page_of(ptep))

    def _clear(self, ptep: int) -> None:
        """Invalidate a valid entry, dropping the reference on its table page."""
        self._write(ptep, 0)
        self.mem.put_page(self._page_of(ptep))

    # -- TLB maintenance (recorded; the firmware runs it in a live update) ---------------------
    def _tlbi_leaf(self, addr: int, level: int) -> None:
        """What upstream invalidates for a leaf it cleared or changed: by address, its level hinted."""
        if self.maint is not None:
            self.maint.tlbi(Flush.S2_IPA if self.stage is Stage.S2 else Flush.EL2_VA_LAST, addr, level)

    def _tlbi_table(self, addr: int) -> None:
        """What upstream invalidates for a table entry it cleared: by address, no level hint."""
        if self.maint is not None:
            self.maint.tlbi(Flush.S2_IPA if self.stage is Stage.S2 else Flush.EL2_VA, addr, None)

    def _free_table(self, page: int) -> None:
        self.mem.put_page(page)
        if self.maint is not None and self.mem.refcount(page) == 0:
            self.maint.free(page)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.mem.begin()
        mark = len(self.maint.steps) if self.maint is not None else 0
        try:
            yield
        except BaseException:
            self.mem.rollback()
            if self.maint is not None:
                del self.maint.steps[mark:]
            raise
        self.mem.commit()

    def _require_pgd(self) -> int:
        if self.pgd is None:
            raise PgtableError("pgd: the page table was destroyed")
        return self.pgd

    # -- arguments ----------------------------------------------------------------------------
    def _check_range(self, addr: int, size: int, what: str = "addr") -> None:
        gran = self.granule.size
        if addr < 0 or addr % gran:
            raise PgtableError(f"{what}: {addr:#x} is not aligned to the {self.granule.label} granule")
        if size <= 0 or size % gran:
            raise PgtableError(f"size: expected a positive multiple of {gran:#x}, got {size:#x}")
        if addr + size > self.geom.limit:
            raise PgtableError(
                f"{what}/size: [{addr:#x}, {addr + size:#x}) is beyond the {self.ia_bits}-bit "
                f"input range (limit {self.geom.limit:#x})"
            )

    def _check_phys(self, pa: int, size: int) -> None:
        if pa < 0 or pa % self.granule.size:
            raise PgtableError(f"pa: {pa:#x} is not aligned to the {self.granule.label} granule")
        top = pa + size
        if top > 1 << self.geom.pa_bits:
            raise PgtableError(
                f"pa: [{pa:#x}, {top:#x}) is beyond the configured {self.geom.pa_bits}-bit "
                "physical address size"
            )
        fmt = self.geom.oa_format_bits
        if top > 1 << fmt:
            raise PgtableError(
                f"pa: [{pa:#x}, {top:#x}) needs more than {fmt} bits; the {self.granule.label} "
                f"granule {'with' if self.lpa2 else 'without'} FEAT_LPA2 encodes output addresses "
                f"up to {fmt} bits"
            )

    # -- attributes (per stage) ---------------------------------------------------------------
    def leaf_attrs(self, prot: Prot) -> int:
        raise NotImplementedError

    # -- map ------------------------------------------------------------------------------------
    def _block_mapping_supported(self, addr: int, end: int, phys: int, level: int) -> bool:
        size = self.geom.size(level)
        if level != LAST_LEVEL and level not in self.geom.block_levels:
            return False
        if size > end - addr:
            return False
        return addr % size == 0 and phys % size == 0

    def _map(self, addr: int, size: int, phys: int, attrs: int) -> None:
        data = _MapData(phys, attrs)
        granule = self.granule

        def visit(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
            pa = data.phys
            if self._block_mapping_supported(a, end, pa, level):
                new = d.leaf_pte(pa, data.attrs, level, granule, self.lpa2)
                old = self.mem.read64(ptep)
                if d.is_valid(old):
                    if old != new:
                        raise MapConflictError(
                            f"addr: {a:#x} is already mapped at level {level} by {old:#018x}; "
                            f"the new mapping would be {new:#018x} (unmap first)"
                        )
                else:
                    self._install(ptep, new)
                data.phys = pa + self.geom.size(level)
                return
            old = self.mem.read64(ptep)
            if d.is_valid(old):
                raise MapConflictError(
                    f"addr: {a:#x} lies in a level-{level} block {old:#018x}; a smaller mapping "
                    "cannot be placed inside it (unmap first)"
                )
            child = self.mem.alloc_page()
            self._install(ptep, d.table_pte(child, granule, self.lpa2))

        self._require_pgd()
        with self._transaction():
            self.walk(addr, size, Walker(visit, WalkFlags.LEAF))

    def map(self, addr: int, size: int, phys: int, prot: Prot) -> None:
        """Map ``[addr, addr + size)`` to ``phys`` with ``prot``; blocks where aligned."""
        self._check_range(addr, size)
        self._check_phys(phys, size)
        self._map(addr, size, phys, self.leaf_attrs(Prot(prot)))

    # -- unmap ------------------------------------------------------------------------------------
    def _split_block(self, ptep: int, pte: int, level: int, addr: int) -> None:
        """Replace the block at ``addr`` by a table of next-level leaves with the same attributes,
        break-before-make (the block cleared and invalidated before the table is written; the
        entry's reference stays, as it is valid again)."""
        child = self.mem.alloc_page()
        attrs = d.leaf_attrs(pte, self.lpa2)
        base = d.pte_to_phys(pte, self.granule, self.lpa2)
        step = self.geom.size(level + 1)
        for i in range(1 << (self.granule.shift - 3)):
            self._install(child + 8 * i, d.leaf_pte(base + i * step, attrs, level + 1, self.granule, self.lpa2))
        self._write(ptep, 0)
        self._tlbi_leaf(align_down(addr, self.geom.size(level)), level)
        self._write(ptep, d.table_pte(child, self.granule, self.lpa2))

    def unmap(self, addr: int, size: int) -> None:
        """Unmap ``[addr, addr + size)``; a block partly inside the range is split first, and
        tables left empty are freed."""
        self._check_range(addr, size)
        granule = self.granule

        def visit(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
            pte = self.mem.read64(ptep)
            if flag is WalkFlags.TABLE_POST:
                child = d.pte_to_phys(pte, granule, self.lpa2)
                if self.mem.refcount(child) == 1:
                    self._clear(ptep)
                    self._tlbi_table(a)
                    self._free_table(child)
                return
            if not d.is_valid(pte):
                return
            size_here = self.geom.size(level)
            start = align_down(a, size_here)
            if start >= a and start + size_here <= end:
                self._clear(ptep)
                self._tlbi_leaf(a, level)
            else:
                self._split_block(ptep, pte, level, a)

        self._require_pgd()
        with self._transaction():
            self.walk(addr, size, Walker(visit, WalkFlags.LEAF | WalkFlags.TABLE_POST))

    # -- queries --------------------------------------------------------------------------------
    def get_leaf(self, addr: int) -> Leaf:
        """The entry that ends the walk for ``addr`` (invalid entries included) and its level."""
        found: list[Leaf] = []

        def visit(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
            size = self.geom.size(level)
            found.append(Leaf(self.mem.read64(ptep), level, align_down(a, size), size))

        self._require_pgd()
        self.walk(align_down(addr, self.granule.size), self.granule.size, Walker(visit, WalkFlags.LEAF))
        return found[0]

    def leaves(self, addr: int = 0, size: int | None = None) -> list[Leaf]:
        """Every valid leaf overlapping ``[addr, addr + size)`` in address order."""
        out: list[Leaf] = []

        def visit(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
            pte = self.mem.read64(ptep)
            if d.is_valid(pte):
                sz = self.geom.size(level)
                out.append(Leaf(pte, level, align_down(a, sz), sz))

        self._require_pgd()
        self.walk(addr, self.geom.limit - addr if size is None else size, Walker(visit, WalkFlags.LEAF))
        return out

    # -- attribute updates on valid leaves (whole leaves, as KVM does) ------------------------------
    def _update_leaf_attrs(self, addr: int, size: int, set_bits: int, clear_bits: int,
                           flush: Flush | None = None) -> list[int]:
        """Set/clear attribute bits of every valid leaf in the range; returns the old entries.
        ``flush``: the invalidation that follows a changed leaf (by its address and level), as the
        operation's upstream counterpart issues it."""
        olds: list[int] = []

        def visit(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
            pte = self.mem.read64(ptep)
            if not d.is_valid(pte):
                return
            olds.append(pte)
            new = (pte & ~clear_bits) | set_bits
            if new != pte:
                self._write(ptep, new)
                if flush is not None and self.maint is not None:
                    self.maint.tlbi(flush, align_down(a, self.geom.size(level)), level)

        self._require_pgd()
        with self._transaction():
            self.walk(addr, size, Walker(visit, WalkFlags.LEAF))
        return olds

    # -- destroy ------------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Free every table page; the table's pool use returns to what it was before init."""
        pgd = self._require_pgd()
        granule = self.granule

        def visit(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
            pte = self.mem.read64(ptep)
            if not d.is_valid(pte):
                return
            self._clear(ptep)
            if flag is WalkFlags.TABLE_POST:
                self._free_table(d.pte_to_phys(pte, granule, self.lpa2))

        self.walk(0, self.geom.limit, Walker(visit, WalkFlags.LEAF | WalkFlags.TABLE_POST))
        for i in range(self.geom.pgd_pages):
            self.mem.put_page(pgd + i * granule.size)
        self.pgd = None

    # -- registers ---------------------------------------------------------------------------------
    def regs(self, vmid: int = 1) -> RegimeRegs:
        """The register values that install this table (TCR/MAIR/TTBR0 or VTCR/VTTBR, ...)."""
        return regime_regs(self.geom, self._require_pgd(), vmid)


class HypPgtable(KvmPgtable):
    """The EL2 (hyp) stage-1 table: one VA range through TTBR0_EL2; with ``e2h`` the EL2&0
    regime's lower range (KVM's hVHE)."""

    def __init__(self, mem: PagePool, granule: Granule | int | str, ia_bits: int,
                 pa_bits: int | None = None, rules: WalkRules = UPSTREAM_RULES, *,
                 pamax: int = PAMAX_REFERENCE, lpa2: bool = False, e2h: bool = False) -> None:
        geom = Geometry.create(Stage.S1, granule, ia_bits, pa_bits, pamax=pamax, lpa2=lpa2, e2h=e2h)
        super().__init__(geom, mem, rules)

    def leaf_attrs(self, prot: Prot) -> int:
        """Hyp attributes: MAIR index (normal / device nGnRE), inner-shareable (SH0 with lpa2),
        AF set, read-only unless W, execute-never unless X. With ``e2h`` as KVM's hVHE encodes
        them: AP[1] = 0 (no EL0 access) and execute-never is PXN | UXN."""
        if not prot & Prot.R:
            raise PgtableError(f"prot: hyp mappings must be readable, got {prot.label()}")
        if prot & Prot.X and prot & Prot.W:
            raise PgtableError(f"prot: hyp mappings may not be both writable and executable, got {prot.label()}")
        if prot & Prot.X and prot & Prot.DEVICE:
            raise PgtableError(f"prot: device mappings may not be executable, got {prot.label()}")
        idx = MairIndex.DEVICE_nGnRE if prot & Prot.DEVICE else MairIndex.NORMAL
        e2h = self.geom.e2h
        if e2h:
            ap: int = d.S1AP_E2H.RW_EL0_NONE if prot & Prot.W else d.S1AP_E2H.RO_EL0_NONE
        else:
            ap = d.S1AP.RW if prot & Prot.W else d.S1AP.RO
        xn = d.S1_XN.prep(1) | (d.S1_PXN.prep(1) if e2h else 0)
        return (
            d.S1_ATTRINDX.prep(idx)
            | d.S1_AP.prep(ap)
            | (0 if self.lpa2 else d.SH.prep(d.Shareability.INNER))
            | d.AF.prep(1)
            | (0 if prot & Prot.X else xn)
        )


class Stage2Pgtable(KvmPgtable):
    """A guest stage-2 table: IPA to PA, with a possibly concatenated PGD."""

    def __init__(self, mem: PagePool, granule: Granule | int | str, ia_bits: int,
                 pa_bits: int | None = None, start_level: int | None = None, vmid: int = 1,
                 rules: WalkRules = UPSTREAM_RULES, *, pamax: int = PAMAX_REFERENCE,
                 lpa2: bool = False) -> None:
        geom = Geometry.create(Stage.S2, granule, ia_bits, pa_bits, start_level, pamax=pamax, lpa2=lpa2)
        super().__init__(geom, mem, rules)
        if not 0 <= vmid <= 0xFF:
            raise PgtableError(f"vmid: expected an 8-bit VMID 0..255, got {vmid!r}")
        self.vmid = vmid

    def leaf_attrs(self, prot: Prot) -> int:
        """Stage-2 attributes: MemAttr normal write-back or device nGnRE, S2AP from R and W,
        execute-never unless X, inner-shareable (SH0 with lpa2), AF set."""
        if prot & Prot.X and prot & Prot.DEVICE:
            raise PgtableError(f"prot: device mappings may not be executable, got {prot.label()}")
        mem_attr = d.S2MemAttr.DEVICE_nGnRE if prot & Prot.DEVICE else d.S2MemAttr.NORMAL_WB
        s2ap = (d.S2AP.RO if prot & Prot.R else 0) | (d.S2AP.WO if prot & Prot.W else 0)
        return (
            d.S2_MEMATTR.prep(mem_attr)
            | d.S2_AP.prep(s2ap)
            | (0 if self.lpa2 else d.SH.prep(d.Shareability.INNER))
            | d.AF.prep(1)
            | d.S2_XN.prep(d.S2_XN_EXEC if prot & Prot.X else d.S2_XN_NEVER)
        )

    def regs(self, vmid: int | None = None) -> RegimeRegs:
        return super().regs(self.vmid if vmid is None else vmid)

    def wrprotect(self, addr: int, size: int) -> None:
        """Remove write permission from every valid leaf in the range."""
        self._check_range(addr, size)
        self._update_leaf_attrs(addr, size, 0, d.S2_AP.prep(d.S2AP.WO))
        self._flush_vmid()

    def _flush_vmid(self) -> None:
        """The VMID-wide flush KVM's callers issue after a walk that changed many leaves."""
        if self.maint is not None:
            self.maint.tlbi(Flush.S2_VMID)

    def mkyoung(self, addr: int) -> int:
        """Set the access flag of the leaf mapping ``addr``; returns the new entry (0 if none)."""
        olds = self._update_leaf_attrs(align_down(addr, self.granule.size), self.granule.size,
                                       d.AF.prep(1), 0)
        return (olds[0] | d.AF.prep(1)) if olds else 0

    def mkold(self, addr: int) -> bool:
        """Clear the access flag of the leaf mapping ``addr``; returns whether it was young."""
        olds = self._update_leaf_attrs(align_down(addr, self.granule.size), self.granule.size,
                                       0, d.AF.prep(1))
        young = bool(olds and d.AF.get(olds[0]))
        if young:
            self._flush_vmid()  # clear_flush_young: the notifier flushes when the page was young
        return young

    def is_young(self, addr: int) -> bool:
        leaf = self.get_leaf(addr)
        return d.is_valid(leaf.pte) and bool(d.AF.get(leaf.pte))

    def relax_perms(self, addr: int, prot: Prot) -> None:
        """Add the permissions in ``prot`` (R, W, X) to the leaf mapping ``addr``."""
        prot = Prot(prot)
        if prot & Prot.DEVICE:
            raise PgtableError("prot: relax_perms takes R, W and X only, not DEVICE")
        leaf = self.get_leaf(addr)
        if not d.is_valid(leaf.pte):
            raise PgtableError(f"addr: {addr:#x} is not mapped; nothing to relax")
        if prot & Prot.X and d.S2_MEMATTR.get(leaf.pte) != d.S2MemAttr.NORMAL_WB:
            raise PgtableError(f"prot: {addr:#x} is device memory and cannot become executable")
        set_bits = (d.S2_AP.prep(d.S2AP.RO) if prot & Prot.R else 0) | (
            d.S2_AP.prep(d.S2AP.WO) if prot & Prot.W else 0)
        clear_bits = d.S2_XN.mask if prot & Prot.X else 0
        self._update_leaf_attrs(align_down(addr, self.granule.size), self.granule.size,
                                set_bits, clear_bits, Flush.S2_IPA_NSH)
