"""Named bit fields of 64-bit registers and descriptors: each field is declared once."""

from __future__ import annotations

from dataclasses import dataclass

MASK64 = (1 << 64) - 1


def genmask(hi: int, lo: int) -> int:
    """Bits hi..lo set (inclusive), like the kernel's GENMASK."""
    return ((1 << (hi - lo + 1)) - 1) << lo


@dataclass(frozen=True)
class Field:
    """Bits [hi:lo] of a 64-bit value."""

    name: str
    hi: int
    lo: int

    @property
    def width(self) -> int:
        return self.hi - self.lo + 1

    @property
    def mask(self) -> int:
        return genmask(self.hi, self.lo)

    @property
    def max(self) -> int:
        return (1 << self.width) - 1

    def get(self, word: int) -> int:
        return (word >> self.lo) & self.max

    def prep(self, value: int) -> int:
        """``value`` shifted into place; a value that does not fit is an error."""
        if not 0 <= value <= self.max:
            raise ValueError(f"{self.name}: expected 0..{self.max} ({self.width} bits), got {value!r}")
        return value << self.lo

    def set(self, word: int, value: int) -> int:
        return (word & ~self.mask & MASK64) | self.prep(value)


def bit(name: str, n: int) -> Field:
    return Field(name, n, n)
