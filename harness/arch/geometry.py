"""Translation-table geometry: granules, levels, input sizes, start levels, concatenation.

Every rule here is an Arm ARM (DDI 0487) rule for VMSAv8-64 without FEAT_LPA2 (DS = 0):

* A granule of ``2**g`` bytes (g = 12, 14, 16) holds ``2**(g - 3)`` eight-byte entries, so each
  level resolves ``g - 3`` bits of the input address; the level-``n`` entry covers
  ``2**((g - 3) * (4 - n) + 3)`` bytes.
* Stage 1 starts at level ``4 - ceil((ia - g) / (g - 3))``.
* Stage 2 may concatenate up to 16 tables at the initial lookup level: the bits resolved there
  must number between 1 and ``(g - 3) + 4``. The 4K granule starts at level 0 only when the PA
  size is over 42 bits; 16K and 64K never start at level 0; 16K starts at level 1 only when the
  PA size is over 40 bits, 64K only when it is over 42 bits. A 4K stage-2 walk starting at level
  3 needs FEAT_TTST and is not modelled. An IPA larger than the PA size is CONSTRAINED
  UNPREDICTABLE and rejected.
* Block descriptors: 4K at levels 1 and 2; 16K at level 2; 64K at level 2, and at level 1 when
  the PE implements 52-bit physical addresses (FEAT_LPA).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property

from harness.errors import InputError

MAX_LEVELS = 4
LAST_LEVEL = MAX_LEVELS - 1
ENTRY_BYTES = 8
MAX_PGD_PAGES = 16
CONCAT_EXTRA_BITS = 4  # log2(MAX_PGD_PAGES)

MIN_IA_BITS = 25  # T0SZ <= 39 without FEAT_TTST
MAX_PA_BITS_LPA = 52  # 64K granule with FEAT_LPA
MAX_PA_BITS = 48  # 4K and 16K without FEAT_LPA2
PA_SIZES = (32, 36, 40, 42, 44, 48, 52)  # TCR.PS / VTCR.PS encodings 0..6


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


def max_ia_bits(granule: Granule) -> int:
    return MAX_PA_BITS_LPA if granule is Granule.K64 else MAX_PA_BITS


def max_pa_bits(granule: Granule) -> int:
    return MAX_PA_BITS_LPA if granule is Granule.K64 else MAX_PA_BITS


def check_ia_bits(granule: Granule, ia_bits: int) -> None:
    hi = max_ia_bits(granule)
    if not isinstance(ia_bits, int) or not MIN_IA_BITS <= ia_bits <= hi:
        raise GeometryError(
            f"ia_bits: expected an input size from {MIN_IA_BITS} to {hi} bits for the "
            f"{granule.label} granule, got {ia_bits!r}"
        )


def check_pa_bits(granule: Granule, pa_bits: int) -> None:
    allowed = [p for p in PA_SIZES if p <= max_pa_bits(granule)]
    if pa_bits not in allowed:
        raise GeometryError(
            f"pa_bits: expected one of {', '.join(map(str, allowed))} for the {granule.label} "
            f"granule, got {pa_bits!r}"
        )


def pa_size_encoding(pa_bits: int) -> int:
    """The TCR_EL2.PS / VTCR_EL2.PS encoding of a physical address size."""
    if pa_bits not in PA_SIZES:
        raise GeometryError(f"pa_bits: expected one of {PA_SIZES}, got {pa_bits!r}")
    return PA_SIZES.index(pa_bits)


def stage1_levels(granule: Granule, ia_bits: int) -> int:
    check_ia_bits(granule, ia_bits)
    step = bits_per_level(granule)
    return -(-(ia_bits - granule.shift) // step)


def stage1_start_level(granule: Granule, ia_bits: int) -> int:
    return MAX_LEVELS - stage1_levels(granule, ia_bits)


def bits_at_level(granule: Granule, ia_bits: int, level: int) -> int:
    """Input-address bits resolved by the lookup at ``level`` when the walk starts there."""
    return ia_bits - level_shift(granule, level)


def stage2_start_level_allowed(granule: Granule, ia_bits: int, pa_bits: int, level: int) -> bool:
    if not 0 <= level <= LAST_LEVEL:
        return False
    bits = bits_at_level(granule, ia_bits, level)
    if not 1 <= bits <= bits_per_level(granule) + CONCAT_EXTRA_BITS:
        return False
    if granule is Granule.K4:
        return not (level == 0 and pa_bits <= 42) and level != LAST_LEVEL
    if granule is Granule.K16:
        return level != 0 and not (level == 1 and pa_bits <= 40)
    return level != 0 and not (level == 1 and pa_bits <= 42)


def stage2_start_levels(granule: Granule, ia_bits: int, pa_bits: int) -> tuple[int, ...]:
    """Every start level the architecture allows for this stage-2 configuration (ascending)."""
    check_ia_bits(granule, ia_bits)
    check_pa_bits(granule, pa_bits)
    if ia_bits > pa_bits:
        raise GeometryError(
            f"ia_bits: a stage-2 input size ({ia_bits}) larger than the PA size ({pa_bits}) is "
            "CONSTRAINED UNPREDICTABLE; expected ia_bits <= pa_bits"
        )
    return tuple(
        lvl for lvl in range(MAX_LEVELS) if stage2_start_level_allowed(granule, ia_bits, pa_bits, lvl)
    )


def stage2_default_start_level(granule: Granule, ia_bits: int, pa_bits: int) -> int:
    """KVM's choice: the fewest levels, concatenating as many PGD pages as allowed."""
    levels = stage2_start_levels(granule, ia_bits, pa_bits)
    if not levels:
        raise GeometryError(
            f"ia_bits: no stage-2 start level allows a {ia_bits}-bit IPA with the "
            f"{granule.label} granule and a {pa_bits}-bit PA size"
        )
    return levels[-1]


def pgd_pages(granule: Granule, ia_bits: int, start_level: int) -> int:
    """Concatenated tables at the initial lookup level (1 for any stage-1 walk)."""
    extra = bits_at_level(granule, ia_bits, start_level) - bits_per_level(granule)
    return 1 << extra if extra > 0 else 1


def pgd_entries(granule: Granule, ia_bits: int, start_level: int) -> int:
    """Entries the initial lookup resolves, across all concatenated PGD pages."""
    return 1 << bits_at_level(granule, ia_bits, start_level)


def block_levels(granule: Granule, feat_lpa: bool = True) -> tuple[int, ...]:
    """Levels at which a block descriptor is valid (DS = 0)."""
    if granule is Granule.K4:
        return (1, 2)
    if granule is Granule.K16:
        return (2,)
    return (1, 2) if feat_lpa else (2,)


def leaf_levels(granule: Granule, feat_lpa: bool = True) -> tuple[int, ...]:
    return (*block_levels(granule, feat_lpa), LAST_LEVEL)


@dataclass(frozen=True)
class Geometry:
    """The shape of one translation regime: granule, input size, start level, PGD pages."""

    stage: Stage
    granule: Granule
    ia_bits: int
    pa_bits: int
    start_level: int
    feat_lpa: bool = True  # the reference PE (-cpu max) implements 52-bit PAs

    @classmethod
    def create(
        cls,
        stage: Stage | int | str,
        granule: Granule | int | str,
        ia_bits: int,
        pa_bits: int | None = None,
        start_level: int | None = None,
    ) -> Geometry:
        st = parse_stage(stage)
        gr = Granule.parse(granule)
        check_ia_bits(gr, ia_bits)
        pa = max_pa_bits(gr) if pa_bits is None else pa_bits
        check_pa_bits(gr, pa)
        if st is Stage.S1:
            natural = stage1_start_level(gr, ia_bits)
            if start_level is not None and start_level != natural:
                raise GeometryError(
                    f"start_level: a stage-1 walk of a {ia_bits}-bit input with the {gr.label} "
                    f"granule starts at level {natural}, got {start_level}"
                )
            return cls(st, gr, ia_bits, pa, natural)
        allowed = stage2_start_levels(gr, ia_bits, pa)
        if start_level is None:
            start_level = stage2_default_start_level(gr, ia_bits, pa)
        elif start_level not in allowed:
            raise GeometryError(
                f"start_level: a stage-2 walk of a {ia_bits}-bit IPA with the {gr.label} granule "
                f"and {pa}-bit PA may start at level {', '.join(map(str, allowed)) or '(none)'}, "
                f"got {start_level}"
            )
        return cls(st, gr, ia_bits, pa, start_level)

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

    @cached_property
    def block_levels(self) -> tuple[int, ...]:
        return block_levels(self.granule, self.feat_lpa)

    @cached_property
    def _shifts(self) -> tuple[int, ...]:
        return tuple(level_shift(self.granule, lvl) for lvl in range(MAX_LEVELS))

    def shift(self, level: int) -> int:
        return self._shifts[level]

    def size(self, level: int) -> int:
        return 1 << self._shifts[level]

    def index(self, level: int, addr: int) -> int:
        return table_index(self.granule, level, addr)

    def pgd_index(self, addr: int) -> int:
        """Index of ``addr`` across the (possibly concatenated) initial-level entries."""
        return (addr & (self.limit - 1)) >> self.shift(self.start_level)

    def pgd_page_index(self, addr: int) -> int:
        """Which concatenated PGD page holds the initial entry for ``addr``."""
        return self.pgd_index(addr) >> bits_per_level(self.granule)

    def describe(self) -> str:
        return (
            f"stage {int(self.stage)} {self.granule.label} ia={self.ia_bits} pa={self.pa_bits} "
            f"start level {self.start_level} ({self.levels} levels), {self.pgd_pages} PGD page(s)"
        )
