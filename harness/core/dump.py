"""Decode raw translation tables into mapped ranges (the tables' own view, not the builder's).

Reads descriptors through any ``read64`` (the model's pool, or guest memory through gdb), walks
every valid table from the root across concatenated PGD pages, and merges leaves that continue
each other (next input address, next output address, same attributes) into ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from harness.arch import descriptors as d
from harness.arch.geometry import ENTRY_BYTES, Geometry, bits_per_level


class Memory(Protocol):
    def read64(self, pa: int) -> int: ...


@dataclass(frozen=True)
class MappedRange:
    va: int
    size: int
    pa: int
    attrs: int  # leaf attribute bits (upper and lower), AF included
    fields: tuple[tuple[str, int], ...]  # the stage's named leaf fields

    @property
    def end(self) -> int:
        return self.va + self.size

    def describe(self) -> str:
        f = " ".join(f"{k}={v:#x}" for k, v in self.fields if v)
        return f"[{self.va:#x}, {self.end:#x}) -> {self.pa:#x} {f}"

    def to_json(self) -> dict[str, object]:
        return {"va": self.va, "size": self.size, "pa": self.pa, "attrs": self.attrs, **dict(self.fields)}


def mapped_ranges(mem: Memory, geom: Geometry, root_pa: int) -> list[MappedRange]:
    """Every valid leaf reachable from ``root_pa``, merged into maximal ranges, in VA order."""
    out: list[MappedRange] = []
    fields_of = d.fields_of(geom.stage)

    def emit(va: int, size: int, pte: int) -> None:
        pa = d.pte_to_phys(pte, geom.granule) & ~(size - 1)
        attrs = d.leaf_attrs(pte)
        if out:
            last = out[-1]
            if last.end == va and last.pa + last.size == pa and last.attrs == attrs:
                out[-1] = MappedRange(last.va, last.size + size, last.pa, attrs, last.fields)
                return
        out.append(MappedRange(va, size, pa, attrs, tuple((f.name, f.get(pte)) for f in fields_of)))

    def table(pa: int, level: int, va_base: int, entries: int, depth: int) -> None:
        size = geom.size(level)
        for i in range(entries):
            pte = mem.read64(pa + i * ENTRY_BYTES)
            kind = d.kind(pte, level, geom.block_levels)
            va = va_base + i * size
            if kind is d.Kind.TABLE and depth < 4:
                table(d.pte_to_phys(pte, geom.granule), level + 1, va, 1 << bits_per_level(geom.granule), depth + 1)
            elif kind in (d.Kind.BLOCK, d.Kind.PAGE):
                emit(va, size, pte)

    table(root_pa, geom.start_level, 0, geom.pgd_entries, 0)
    return out


def diff_ranges(model: list[MappedRange], live: list[MappedRange]) -> tuple[list[MappedRange], list[MappedRange]]:
    """(only in the model, only in the live tables)."""
    a, b = set(model), set(live)
    return sorted(a - b, key=lambda r: r.va), sorted(b - a, key=lambda r: r.va)
