"""Decode raw translation tables into mapped ranges (the tables' own view, not the builder's).

Reads descriptors through any ``read64`` (the model's pool, or guest memory through gdb) with the
one walker (:mod:`harness.core.walker`) from the root across concatenated PGD pages, and merges
leaves that continue each other (next input address, next output address, same attributes) into
ranges. DS = 1 (LPA2) descriptors and level -1 are read as the geometry says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry
from harness.core.translate import root_table_base
from harness.core.walker import GeometryShape, Walker, WalkFlags, align_down, walk


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


@dataclass(frozen=True)
class _RawTables(GeometryShape):
    """Raw tables as the walker sees them (``WalkablePgtable``): a geometry, a root, a memory."""

    geom: Geometry
    pgd: int
    mem: _OneEntryCache


class _OneEntryCache:
    """The walker and its visitor read each entry up to three times; a memory behind gdb is
    slow, so the last word read is kept (the dump writes nothing)."""

    __slots__ = ("_mem", "_pa", "_value")

    def __init__(self, mem: Memory) -> None:
        self._mem = mem
        self._pa = -1
        self._value = 0

    def read64(self, pa: int) -> int:
        if pa != self._pa:
            self._value = self._mem.read64(pa)
            self._pa = pa
        return self._value


def mapped_ranges(mem: Memory, geom: Geometry, root_pa: int) -> list[MappedRange]:
    """Every valid leaf reachable from ``root_pa``, merged into maximal ranges, in VA order: a
    LEAF visitor of the one walker over the whole input range (concatenated PGD pages included),
    reading through any ``read64`` (the model's pool, or live memory through gdb)."""
    out: list[MappedRange] = []
    tables = _RawTables(geom, root_table_base(geom, root_pa), _OneEntryCache(mem))
    fields_of = d.fields_of(geom.stage, geom.lpa2, geom.e2h)

    def visit(addr: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        pte = tables.mem.read64(ptep)
        if d.kind(pte, level, geom.block_levels) not in (d.Kind.BLOCK, d.Kind.PAGE):
            return
        size = geom.size(level)
        va = align_down(addr, size)
        pa = d.pte_to_phys(pte, geom.granule, geom.lpa2) & ~(size - 1)
        attrs = d.leaf_attrs(pte, geom.lpa2)
        if out:
            last = out[-1]
            if last.end == va and last.pa + last.size == pa and last.attrs == attrs:
                out[-1] = MappedRange(last.va, last.size + size, last.pa, attrs, last.fields)
                return
        out.append(MappedRange(va, size, pa, attrs, tuple((f.name, f.get(pte)) for f in fields_of)))

    walk(tables, 0, geom.limit, Walker(visit, WalkFlags.LEAF))
    return out


def diff_ranges(model: list[MappedRange], live: list[MappedRange]) -> tuple[list[MappedRange], list[MappedRange]]:
    """(only in the model, only in the live tables)."""
    a, b = set(model), set(live)
    return sorted(a - b, key=lambda r: r.va), sorted(b - a, key=lambda r: r.va)
