"""Small identity-mapped tables built by hand (independent of the model's map code)."""

from __future__ import annotations

from dataclasses import replace

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Granule, Stage, level_size, pa_size_encoding
from harness.arch.registers import HCR_E2H, MairIndex, Stage1Regs, Stage2Regs, stage1_regs, stage2_regs
from harness.core.memory import PagePool, PoolImage
from harness.core.prot import Prot
from harness.target.layout import Layout, Region

# AP[2:1] in the EL2&0 regime (E2H = 1), written here from the Arm ARM: AP[1] = 0 keeps EL0 out,
# AP[2] = 1 makes it read-only (privileged RW = 0b00, privileged RO = 0b10).
HVHE_AP_RW = 0b00
HVHE_AP_RO = 0b10


def leaf_attrs(stage: Stage, prot: Prot, hvhe: bool = False) -> int:
    if stage is Stage.S1:
        idx = MairIndex.DEVICE_nGnRE if prot & Prot.DEVICE else MairIndex.NORMAL
        rw, ro = (HVHE_AP_RW, HVHE_AP_RO) if hvhe else (int(d.S1AP.RW), int(d.S1AP.RO))
        ap = rw if prot & Prot.W else ro
        return d.encode_fields(Stage.S1, AttrIndx=int(idx), AP=int(ap), SH=int(d.Shareability.INNER), AF=1,
                               XN=0 if prot & Prot.X else 1)
    mem = d.S2MemAttr.DEVICE_nGnRE if prot & Prot.DEVICE else d.S2MemAttr.NORMAL_WB
    s2ap = (d.S2AP.RO if prot & Prot.R else 0) | (d.S2AP.WO if prot & Prot.W else 0)
    return d.encode_fields(Stage.S2, MemAttr=int(mem), S2AP=int(s2ap), SH=int(d.Shareability.INNER), AF=1,
                           XN=d.S2_XN_EXEC if prot & Prot.X else d.S2_XN_NEVER)


class HandTable:
    """An identity map built with table_pte/leaf_pte: blocks at the last block level when aligned."""

    def __init__(self, geom: Geometry, layout: Layout, hvhe: bool = False) -> None:
        self.geom = geom
        self.hvhe = hvhe
        self.pool = PagePool(layout.pool_base, 16 << 20, geom.granule.size)
        self.pgd = self.pool.alloc_pages(geom.pgd_pages, geom.pgd_pages)

    def _entry_pa(self, table: int, level: int, addr: int) -> int:
        if level == self.geom.start_level:
            return table + 8 * self.geom.pgd_index(addr)
        return table + 8 * self.geom.index(level, addr)

    def map(self, base: int, size: int, prot: Prot, output: int | None = None) -> None:
        g = self.geom.granule
        attrs = leaf_attrs(self.geom.stage, prot, self.hvhe)
        block_level = max(self.geom.block_levels)
        addr, out = base, base if output is None else output
        while addr < base + size:
            bsize = level_size(g, block_level)
            if addr % bsize == 0 and out % bsize == 0 and base + size - addr >= bsize:
                level, step = block_level, bsize
            else:
                level, step = 3, g.size
            table = self.pgd
            for lvl in range(self.geom.start_level, level):
                pa = self._entry_pa(table, lvl, addr)
                pte = self.pool.read64(pa)
                if not d.is_valid(pte):
                    new = self.pool.alloc_page()
                    self.pool.write64(pa, d.table_pte(new, g))
                    table = new
                else:
                    table = d.pte_to_phys(pte, g)
            self.pool.write64(self._entry_pa(table, level, addr), d.leaf_pte(out, attrs, level, g))
            addr += step
            out += step

    def entry_pa(self, addr: int, level: int) -> int:
        """Where the level-``level`` entry for ``addr`` lives (the tables down to it must exist)."""
        table = self.pgd
        for lvl in range(self.geom.start_level, level):
            pte = self.pool.read64(self._entry_pa(table, lvl, addr))
            assert d.is_table(pte, lvl), f"no table at level {lvl} for {addr:#x}"
            table = d.pte_to_phys(pte, self.geom.granule)
        return self._entry_pa(table, level, addr)

    def map_regions(self, regions: list[Region], skip: tuple[str, ...] = ()) -> None:
        for r in regions:
            if r.name not in skip:
                self.map(r.base, r.size, r.prot)

    def image(self) -> PoolImage:
        return self.pool.export()

    def s1_regs(self) -> Stage1Regs:
        regs = stage1_regs(self.geom, self.pgd)
        return replace(regs, tcr_el2=hvhe_tcr_el2(self.geom), hcr_el2_set=HCR_E2H.mask) if self.hvhe else regs

    def s2_regs(self) -> Stage2Regs:
        return stage2_regs(self.geom, self.pgd)


def s1_identity(layout: Layout, granule: str = "4K", ia_bits: int = 39, skip: tuple[str, ...] = (),
                extra: list[Region] | None = None) -> HandTable:
    t = HandTable(Geometry.create(Stage.S1, Granule.parse(granule), ia_bits, 48), layout)
    t.map_regions(layout.stage1_regions() + (extra or []), skip)
    return t


def s2_identity(layout: Layout, granule: str = "4K", ia_bits: int = 40, skip: tuple[str, ...] = (),
                extra: list[Region] | None = None) -> HandTable:
    t = HandTable(Geometry.create(Stage.S2, Granule.parse(granule), ia_bits, 48), layout)
    t.map_regions(layout.stage2_regions() + (extra or []), skip)
    return t


def hvhe_tcr_el2(geom: Geometry) -> int:
    """TCR_EL2 in its E2H = 1 layout (the TCR_EL1 layout), written here from the Arm ARM field
    definitions as an independent check: T0SZ [5:0], IRGN0 [9:8], ORGN0 [11:10], SH0 [13:12],
    TG0 [15:14] (4K 0b00, 64K 0b01, 16K 0b10), EPD1 bit 23 (no TTBR1 walks), TG1 [31:30] (4K 0b10,
    set to a legal value though unused), IPS [34:32]."""
    tg0 = {Granule.K4: 0b00, Granule.K64: 0b01, Granule.K16: 0b10}[geom.granule]
    return ((64 - geom.ia_bits) | 0b01 << 8 | 0b01 << 10 | 0b11 << 12 | tg0 << 14 | 1 << 23 | 0b10 << 30
            | pa_size_encoding(geom.pa_bits) << 32)


def s1_hvhe_identity(layout: Layout, granule: str = "4K", ia_bits: int = 48,
                     extra: list[Region] | None = None) -> HandTable:
    t = HandTable(Geometry.create(Stage.S1, Granule.parse(granule), ia_bits, 48), layout, hvhe=True)
    t.map_regions(layout.stage1_regions() + (extra or []))
    return t
