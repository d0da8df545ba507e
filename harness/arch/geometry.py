"""Translation-table geometry: granules, levels, input sizes, start levels, concatenation.

Every rule here is an Arm ARM (DDI 0487) rule for VMSAv8-64, with and without FEAT_LPA2 (DS):

* A granule of ``2**g`` bytes (g = 12, 14, 16) holds ``2**(g - 3)`` eight-byte entries, so each
  level resolves ``g - 3`` bits of the input address; the level-``n`` entry covers
  ``2**((g - 3) * (4 - n) + 3)`` bytes. Levels run from 0 to 3, and from -1 with the 4K granule
  and DS = 1 (a 52-bit input: the level -1 table has 16 entries).
* Input and output addresses reach 52 bits with the 64K granule (FEAT_LPA/FEAT_LVA) or with
  DS = 1 (FEAT_LPA2, 4K and 16K); otherwise 48 bits (:func:`max_ia_bits`, :func:`oa_format_bits`).
* Stage 1 starts at level ``4 - ceil((ia - g) / (g - 3))``.
* Stage 2 (``AArch64.S2InvalidSL``, ``AArch64.S2InconsistentSL``): the initial level resolves
  between 1 and ``(g - 3) + 4`` bits (up to 16 concatenated tables). Which SL0 (and SL2)
  encodings are valid depends on **PAMax**, the PE's physical address size
  (ID_AA64MMFR0_EL1.PARange, 52 bits on QEMU's ``-cpu max``), never on VTCR_EL2.PS: 4K level 0
  needs PAMax >= 44, level -1 needs DS = 1 (SL2 = 1, SL0 = 0), level 3 needs FEAT_TTST (not
  modelled); 16K level 0 needs DS = 1, level 1 PAMax >= 42; 64K never level 0, level 1 needs
  PAMax >= 44. An IPA larger than the PA size (VTCR_EL2.PS) is not itself a fault in the ASL
  (the pseudocode refers only to PAMax); only the output addresses are checked against PS.
* Block descriptors (``AArch64.BlockDescSupported``): 4K at levels 1 and 2, and 0 with DS = 1;
  16K at level 2, and 1 with DS = 1; 64K at level 2, and 1 when PAMax is 52.
* The initial table is aligned to its own size (entries * 8 bytes), at least 64 bytes when its
  base address has the 52-bit form (64K with PS = 52 bits, or DS = 1): ``AArch64.S1TTBaseAddress``
  and ``S2TTBaseAddress``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property

from harness.errors import InputError

MAX_LEVELS = 4
LAST_LEVEL = MAX_LEVELS - 1
MIN_LEVEL = -1  # 4K granule with DS = 1
ENTRY_BYTES = 8
MAX_PGD_PAGES = 16
CONCAT_EXTRA_BITS = 4  # log2(MAX_PGD_PAGES)

MIN_IA_BITS = 25  # T0SZ <= 39 without FEAT_TTST
WIDE_ADDRESS_BITS = 52  # 64K granule (FEAT_LPA/LVA) or DS = 1 (FEAT_LPA2)
NARROW_ADDRESS_BITS = 48  # 4K and 16K with DS = 0
PA_SIZES = (32, 36, 40, 42, 44, 48, 52)  # TCR.PS / VTCR.PS / ID_AA64MMFR0_EL1.PARange 0..6
PAMAX_REFERENCE = 52  # QEMU -cpu max: ID_AA64MMFR0_EL1.PARange = 0b0110
TABLE_BASE_52BIT_ALIGN = 64  # a 52-bit table base keeps BADDR[51:48] in TTBR bits [5:2]


class GeometryError(InputError):
    """A configuration the architecture does not allow; the message names the argument."""


class Stage(enum.IntEnum):
    """Translation stage: 1 is the EL2 (hyp) regime, 2 the guest stage 2 (IPA to PA)."""

    S1 = 1
    S2 = 2


class Granule(enum.IntEnum):
    """Translation granule, valued by its shift."""

    K4 = 12
    K16 = 14
    K64 = 16

    @property
    def shift(self) -> int:
        return int(self.value)

    @property
    def size(self) -> int:
        return 1 << self.value

    @property
    def label(self) -> str:
        return f"{self.size // 1024}K"

    @classmethod
    def parse(cls, value: object) -> Granule:
        """Accept a Granule, "4K"/"16K"/"64K", a size in bytes (4096 ...) or a shift (12 ...)."""
        if isinstance(value, Granule):
            return value
        text = str(value).strip().upper().removesuffix("B")
        for g in cls:
            if text in (g.label, str(g.size), str(g.shift)):
                return g
        raise GeometryError(f"granule: expected one of 4K, 16K, 64K (or 4096, 16384, 65536), got {value!r}")


def parse_stage(value: object) -> Stage:
    text = str(value).strip().lower().removeprefix("s").removeprefix("stage").strip("-_ ")
    if isinstance(value, Stage):
        return value
    if text in ("1", "hyp"):
        return Stage.S1
    if text in ("2", "guest"):
        return Stage.S2
    raise GeometryError(f"stage: expected 1 (hyp stage 1) or 2 (guest stage 2), got {value!r}")


def bits_per_level(granule: Granule) -> int:
    """Input-address bits one full table resolves."""
    return granule.shift - 3


def ptrs_per_table(granule: Granule) -> int:
    return 1 << bits_per_level(granule)


def level_shift(granule: Granule, level: int) -> int:
    """Shift of the input-address bits that index a table at ``level`` (the entry's span)."""
    return bits_per_level(granule) * (MAX_LEVELS - level) + 3


def level_size(granule: Granule, level: int) -> int:
    """Bytes of input address one entry at ``level`` covers."""
    return 1 << level_shift(granule, level)


def table_index(granule: Granule, level: int, addr: int) -> int:
    return (addr >> level_shift(granule, level)) & (ptrs_per_table(granule) - 1)


def wide_addresses(granule: Granule, lpa2: bool = False) -> bool:
    """Whether addresses reach 52 bits: the 64K granule (FEAT_LPA, FEAT_LVA) or DS = 1."""
    return granule is Granule.K64 or lpa2


def max_ia_bits(granule: Granule, lpa2: bool = False) -> int:
    """The largest input size (the smallest TxSZ, 12 or 16) for the granule and DS."""
    return WIDE_ADDRESS_BITS if wide_addresses(granule, lpa2) else NARROW_ADDRESS_BITS


def oa_format_bits(granule: Granule, lpa2: bool = False) -> int:
    """The widest output address a descriptor of this format encodes (OA[51:48] with 64K in
    bits [15:12]; with DS = 1, OA[51:50] in [9:8] and OA[49:48] in [49:48])."""
    return WIDE_ADDRESS_BITS if wide_addresses(granule, lpa2) else NARROW_ADDRESS_BITS


def min_level(granule: Granule, lpa2: bool = False) -> int:
    """The lowest level a walk may start at: -1 only with 4K and DS = 1."""
    return MIN_LEVEL if granule is Granule.K4 and lpa2 else 0


def check_lpa2(granule: Granule, lpa2: bool, pamax: int = PAMAX_REFERENCE) -> None:
    if lpa2 and granule is Granule.K64:
        raise GeometryError(
            "lpa2: FEAT_LPA2 (DS = 1) applies to the 4K and 16K granules; the 64K granule's "
            "52-bit form is FEAT_LPA (no lpa2 needed)"
        )
    if lpa2 and pamax != WIDE_ADDRESS_BITS:
        raise GeometryError(f"lpa2: DS = 1 needs a PE with 52-bit physical addresses, got pamax={pamax}")


def check_ia_bits(granule: Granule, ia_bits: int, lpa2: bool = False) -> None:
    hi = max_ia_bits(granule, lpa2)
    if not isinstance(ia_bits, int) or not MIN_IA_BITS <= ia_bits <= hi:
        raise GeometryError(
            f"ia_bits: expected an input size from {MIN_IA_BITS} to {hi} bits for the "
            f"{granule.label} granule{' with lpa2' if lpa2 else ''}, got {ia_bits!r}"
            + ("" if lpa2 or hi == WIDE_ADDRESS_BITS else " (52 bits need lpa2)")
        )


def check_pamax(pamax: int) -> None:
    if pamax not in PA_SIZES:
        raise GeometryError(f"pamax: expected one of {', '.join(map(str, PA_SIZES))}, got {pamax!r}")


def check_pa_bits(granule: Granule, pa_bits: int, lpa2: bool = False, pamax: int = PAMAX_REFERENCE) -> None:
    top = min(oa_format_bits(granule, lpa2), pamax)
    allowed = [p for p in PA_SIZES if p <= top]
    if pa_bits not in allowed:
        why = ""
        if pa_bits == WIDE_ADDRESS_BITS and not wide_addresses(granule, lpa2):
            why = " (52-bit output addresses with 4K/16K need lpa2)"
        raise GeometryError(
            f"pa_bits: expected one of {', '.join(map(str, allowed))} for the {granule.label} "
            f"granule{' with lpa2' if lpa2 else ''} and a {pamax}-bit PAMax, got {pa_bits!r}{why}"
        )


def pa_size_encoding(pa_bits: int) -> int:
    """The TCR_EL2.PS / VTCR_EL2.PS encoding of a physical address size."""
    if pa_bits not in PA_SIZES:
        raise GeometryError(f"pa_bits: expected one of {PA_SIZES}, got {pa_bits!r}")
    return PA_SIZES.index(pa_bits)


def upper_range_base(ia_bits: int) -> int:
    """The lowest address of a stage-1 TTBR1 range of ``ia_bits`` input bits: ``2**64 - 2**ia_bits``
    (its walks index the same bits as a TTBR0 range's, the top bits only select the TTBR)."""
    return (1 << 64) - (1 << ia_bits)


def stage1_levels(granule: Granule, ia_bits: int, lpa2: bool = False) -> int:
    check_ia_bits(granule, ia_bits, lpa2)
    step = bits_per_level(granule)
    return -(-(ia_bits - granule.shift) // step)


def stage1_start_level(granule: Granule, ia_bits: int, lpa2: bool = False) -> int:
    return MAX_LEVELS - stage1_levels(granule, ia_bits, lpa2)


def bits_at_level(granule: Granule, ia_bits: int, level: int) -> int:
    """Input-address bits resolved by the lookup at ``level`` when the walk starts there."""
    return ia_bits - level_shift(granule, level)


def stage2_level_valid(granule: Granule, level: int, pamax: int, lpa2: bool = False) -> bool:
    """``AArch64.S2InvalidSL`` negated: whether an SL0/SL2 encoding of ``level`` is valid on a PE
    with a ``pamax``-bit physical address size (FEAT_TTST, 4K level 3, is not modelled)."""
    if granule is Granule.K4:
        return {-1: lpa2, 0: pamax >= 44, 1: True, 2: True}.get(level, False)
    if granule is Granule.K16:
        return {0: lpa2, 1: pamax >= 42, 2: True, 3: True}.get(level, False)
    return {1: pamax >= 44, 2: True, 3: True}.get(level, False)


def stage2_level_consistent(granule: Granule, ia_bits: int, level: int) -> bool:
    """``AArch64.S2InconsistentSL`` negated: the start level resolves 1 .. (g - 3) + 4 bits."""
    return 1 <= bits_at_level(granule, ia_bits, level) <= bits_per_level(granule) + CONCAT_EXTRA_BITS


def stage2_start_level_allowed(granule: Granule, ia_bits: int, pamax: int, level: int,
                               lpa2: bool = False) -> bool:
    return stage2_level_valid(granule, level, pamax, lpa2) and stage2_level_consistent(granule, ia_bits, level)


def stage2_start_levels(granule: Granule, ia_bits: int, pamax: int = PAMAX_REFERENCE,
                        lpa2: bool = False) -> tuple[int, ...]:
    """Every start level the architecture allows for this stage-2 input size (ascending) on a PE
    whose physical address size is ``pamax`` bits."""
    check_ia_bits(granule, ia_bits, lpa2)
    check_pamax(pamax)
    return tuple(
        lvl for lvl in range(MIN_LEVEL, MAX_LEVELS)
        if stage2_start_level_allowed(granule, ia_bits, pamax, lvl, lpa2)
    )


def stage2_default_start_level(granule: Granule, ia_bits: int, pamax: int = PAMAX_REFERENCE,
                               lpa2: bool = False) -> int:
    """KVM's choice: the fewest levels, concatenating as many PGD pages as allowed."""
    levels = stage2_start_levels(granule, ia_bits, pamax, lpa2)
    if not levels:
        raise GeometryError(
            f"ia_bits: no stage-2 start level allows a {ia_bits}-bit IPA with the "
            f"{granule.label} granule and a {pamax}-bit PAMax"
        )
    return levels[-1]


def pgd_pages(granule: Granule, ia_bits: int, start_level: int) -> int:
    """Concatenated tables at the initial lookup level (1 for any stage-1 walk)."""
    extra = bits_at_level(granule, ia_bits, start_level) - bits_per_level(granule)
    return 1 << extra if extra > 0 else 1


def pgd_entries(granule: Granule, ia_bits: int, start_level: int) -> int:
    """Entries the initial lookup resolves, across all concatenated PGD pages."""
    return 1 << bits_at_level(granule, ia_bits, start_level)


def pgd_page_span(granule: Granule, start_level: int) -> int:
    """Input bytes one (full) PGD page covers: the span of an entry of the level above the start
    level ("may underflow": the level above level 0 is well defined)."""
    return level_size(granule, start_level - 1)


def pgd_page_index(granule: Granule, ia_bits: int, start_level: int, addr: int) -> int:
    """Which concatenated PGD page holds the initial-level entry for ``addr``: the input bits
    above one full table at the start level (the seed's ``__kvm_pgd_page_idx``)."""
    return (addr & ((1 << ia_bits) - 1)) >> level_shift(granule, start_level - 1)


def root_table_align(granule: Granule, ia_bits: int, start_level: int, base_52bit: bool) -> int:
    """Alignment of the initial table (``AArch64.S1TTBaseAddress`` / ``S2TTBaseAddress``): its
    own size in bytes, at least 64 bytes when the base address has the 52-bit form."""
    size = pgd_entries(granule, ia_bits, start_level) * ENTRY_BYTES
    return max(size, TABLE_BASE_52BIT_ALIGN) if base_52bit else size


def block_levels(granule: Granule, pamax: int = PAMAX_REFERENCE, lpa2: bool = False) -> tuple[int, ...]:
    """Levels at which a block descriptor is valid (``AArch64.BlockDescSupported``)."""
    if granule is Granule.K4:
        return (0, 1, 2) if lpa2 else (1, 2)
    if granule is Granule.K16:
        return (1, 2) if lpa2 else (2,)
    return (1, 2) if pamax == WIDE_ADDRESS_BITS else (2,)


@dataclass(frozen=True)
class Geometry:
    """The shape of one translation regime: granule, input size, start level, PGD pages.

    ``pa_bits`` is the configured output size (TCR_EL2.PS/IPS, VTCR_EL2.PS), ``pamax`` the PE's
    (ID_AA64MMFR0_EL1.PARange); ``lpa2`` is TCR/VTCR.DS = 1; ``e2h`` the EL2&0 regime
    (HCR_EL2.E2H = 1, stage 1 only).
    """

    stage: Stage
    granule: Granule
    ia_bits: int
    pa_bits: int
    start_level: int
    pamax: int = PAMAX_REFERENCE
    lpa2: bool = False
    e2h: bool = False

    @classmethod
    def create(
        cls,
        stage: Stage | int | str,
        granule: Granule | int | str,
        ia_bits: int,
        pa_bits: int | None = None,
        start_level: int | None = None,
        *,
        pamax: int = PAMAX_REFERENCE,
        lpa2: bool = False,
        e2h: bool = False,
    ) -> Geometry:
        st = parse_stage(stage)
        gr = Granule.parse(granule)
        check_pamax(pamax)
        check_lpa2(gr, lpa2, pamax)
        check_ia_bits(gr, ia_bits, lpa2)
        pa = min(oa_format_bits(gr, lpa2), pamax) if pa_bits is None else pa_bits
        check_pa_bits(gr, pa, lpa2, pamax)
        if st is Stage.S1:
            natural = stage1_start_level(gr, ia_bits, lpa2)
            if start_level is not None and start_level != natural:
                raise GeometryError(
                    f"start_level: a stage-1 walk of a {ia_bits}-bit input with the {gr.label} "
                    f"granule starts at level {natural}, got {start_level}"
                )
            return cls(st, gr, ia_bits, pa, natural, pamax, lpa2, e2h)
        if e2h:
            raise GeometryError("e2h: the EL2&0 regime (HCR_EL2.E2H = 1) is a stage-1 regime; "
                                "expected e2h only with stage 1")
        allowed = stage2_start_levels(gr, ia_bits, pamax, lpa2)
        if start_level is None:
            start_level = stage2_default_start_level(gr, ia_bits, pamax, lpa2)
        elif start_level not in allowed:
            raise GeometryError(
                f"start_level: a stage-2 walk of a {ia_bits}-bit IPA with the {gr.label} granule "
                f"{'with lpa2 ' if lpa2 else ''}on a {pamax}-bit PAMax PE may start at level "
                f"{', '.join(map(str, allowed)) or '(none)'}, got {start_level}"
            )
        return cls(st, gr, ia_bits, pa, start_level, pamax, lpa2, e2h)

    @property
    def levels(self) -> int:
        return MAX_LEVELS - self.start_level

    @property
    def pgd_pages(self) -> int:
        return pgd_pages(self.granule, self.ia_bits, self.start_level)

    @property
    def pgd_entries(self) -> int:
        return pgd_entries(self.granule, self.ia_bits, self.start_level)

    @property
    def limit(self) -> int:
        return 1 << self.ia_bits

    @property
    def feat_lpa(self) -> bool:
        """The PE implements 52-bit physical addresses (PAMax = 52)."""
        return self.pamax == WIDE_ADDRESS_BITS

    @property
    def oa_format_bits(self) -> int:
        return oa_format_bits(self.granule, self.lpa2)

    @property
    def base_52bit(self) -> bool:
        """Table base addresses have the 52-bit form (TTBR BADDR[51:48] in bits [5:2]): 64K with
        PS = 52 bits, or DS = 1."""
        return self.lpa2 or (self.granule is Granule.K64 and self.pa_bits == WIDE_ADDRESS_BITS)

    @property
    def root_align(self) -> int:
        return root_table_align(self.granule, self.ia_bits, self.start_level, self.base_52bit)

    @cached_property
    def block_levels(self) -> tuple[int, ...]:
        return block_levels(self.granule, self.pamax, self.lpa2)

    @cached_property
    def _shifts(self) -> dict[int, int]:
        return {lvl: level_shift(self.granule, lvl) for lvl in range(MIN_LEVEL - 1, MAX_LEVELS)}

    def shift(self, level: int) -> int:
        return self._shifts[level]

    def size(self, level: int) -> int:
        return 1 << self._shifts[level]

    def index(self, level: int, addr: int) -> int:
        return table_index(self.granule, level, addr)

    def pgd_index(self, addr: int) -> int:
        """Index of ``addr`` across the (possibly concatenated) initial-level entries."""
        return (addr & (self.limit - 1)) >> self.shift(self.start_level)

    @property
    def pgd_page_span(self) -> int:
        """Input bytes one PGD page covers (the whole input range when there is one page)."""
        return min(pgd_page_span(self.granule, self.start_level), self.limit)

    def pgd_page_index(self, addr: int) -> int:
        """Which concatenated PGD page holds the initial entry for ``addr``."""
        return pgd_page_index(self.granule, self.ia_bits, self.start_level, addr)

    def describe(self) -> str:
        extra = "".join(f" {name}" for name, on in (("lpa2", self.lpa2), ("e2h", self.e2h)) if on)
        return (
            f"stage {int(self.stage)} {self.granule.label} ia={self.ia_bits} pa={self.pa_bits}{extra} "
            f"start level {self.start_level} ({self.levels} levels), {self.pgd_pages} PGD page(s)"
        )
