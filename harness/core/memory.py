"""Physical memory for translation tables: a pool of pages at a real physical address.

Tables are real bytes at real physical addresses, so the pool's image can be copied into guest
RAM at ``base`` and walked by an MMU as it is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_U64 = struct.Struct("<Q")


class PoolError(RuntimeError):
    """Misuse of the page pool: exhaustion, bad address, double free."""


@dataclass(frozen=True)
class PoolImage:
    """The pool's bytes and where they belong in physical memory."""

    base: int
    data: bytes


class PagePool:
    """Zeroed, reference-counted pages of ``page_size`` bytes in ``[base, base + size)``."""

    def __init__(self, base: int, size: int, page_size: int) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise PoolError(f"page_size: expected a power of two, got {page_size!r}")
        if base % page_size:
            raise PoolError(f"base: {base:#x} is not aligned to the page size {page_size:#x}")
        if size <= 0 or size % page_size:
            raise PoolError(f"size: expected a positive multiple of {page_size:#x}, got {size:#x}")
        self.base = base
        self.size = size
        self.page_size = page_size
        self.pages = size // page_size
        self._mem = bytearray(size)
        self._refcount: list[int] = [0] * self.pages
        self._used = 0
        self._next_free = 0  # allocation hint: lowest page that may be free
        self._top = 0  # every page from this index up is free (a bound, tightened by used_extent)
        # Undo journal while a transaction is open: (kind, index, old value).
        self._journal: list[tuple[str, int, int]] | None = None

    # -- transactions -----------------------------------------------------------------------
    def begin(self) -> None:
        """Start recording every word write and reference-count change, to undo on failure."""
        if self._journal is not None:
            raise PoolError("begin: a transaction is already open")
        self._journal = []

    def commit(self) -> None:
        self._journal = None

    def rollback(self) -> None:
        """Undo everything since :meth:`begin`: words, reference counts, allocations."""
        journal, self._journal = self._journal, None
        if journal is None:
            raise PoolError("rollback: no transaction is open")
        for kind, index, old in reversed(journal):
            if kind == "word":
                _U64.pack_into(self._mem, index, old)
            else:
                self._used += (old != 0) - (self._refcount[index] != 0)
                self._refcount[index] = old
                if old == 0:
                    self._next_free = min(self._next_free, index)
                else:
                    self._top = max(self._top, index + 1)

    def _set_refcount(self, index: int, value: int) -> None:
        old = self._refcount[index]
        if self._journal is not None:
            self._journal.append(("ref", index, old))
        self._refcount[index] = value
        self._used += (value != 0) - (old != 0)
        if value:
            self._top = max(self._top, index + 1)

    # -- allocation -------------------------------------------------------------------------
    @property
    def used_pages(self) -> int:
        return self._used

    def alloc_pages(self, count: int = 1, align_pages: int = 1) -> int:
        """Allocate ``count`` contiguous zeroed pages whose physical address is aligned to
        ``align_pages`` pages. Returns the physical address of the first."""
        if count < 1 or align_pages < 1:
            raise PoolError(f"count/align_pages: expected at least 1, got {count}/{align_pages}")
        refs = self._refcount
        start = -1
        if count == 1 and align_pages == 1:
            for cand in range(self._next_free, self.pages):
                if not refs[cand]:
                    start = cand
                    break
        else:
            first = (-(self.base // self.page_size)) % align_pages
            for cand in range(first, self.pages - count + 1, align_pages):
                if not any(refs[cand : cand + count]):
                    start = cand
                    break
        if start < 0:
            raise PoolError(
                f"page pool exhausted: no {count} free page(s) aligned to "
                f"{align_pages * self.page_size:#x} among {self.pages} pages at {self.base:#x} "
                f"({self.used_pages} in use)"
            )
        for idx in range(start, start + count):
            self._set_refcount(idx, 1)
        off = start * self.page_size
        self._mem[off : off + count * self.page_size] = bytes(count * self.page_size)
        if count == 1 and align_pages == 1:
            self._next_free = start + 1
        return self.base + off

    def alloc_page(self) -> int:
        return self.alloc_pages(1)

    def _page(self, pa: int) -> int:
        if pa % self.page_size or not self.base <= pa < self.base + self.size:
            raise PoolError(f"pa: {pa:#x} is not a page of the pool [{self.base:#x}, "
                            f"{self.base + self.size:#x})")
        return (pa - self.base) // self.page_size

    def get_page(self, pa: int) -> None:
        """Take one more reference to the page at ``pa``."""
        idx = self._page(pa)
        if self._refcount[idx] == 0:
            raise PoolError(f"get_page: page {pa:#x} is free")
        self._set_refcount(idx, self._refcount[idx] + 1)

    def put_page(self, pa: int) -> None:
        """Drop a reference; the page is freed when the count reaches zero."""
        idx = self._page(pa)
        if self._refcount[idx] == 0:
            raise PoolError(f"put_page: page {pa:#x} is already free")
        self._set_refcount(idx, self._refcount[idx] - 1)
        if self._refcount[idx] == 0:
            self._next_free = min(self._next_free, idx)

    def refcount(self, pa: int) -> int:
        return self._refcount[self._page(pa)]

    # -- access -----------------------------------------------------------------------------
    def contains(self, pa: int, length: int = 8) -> bool:
        return self.base <= pa and pa + length <= self.base + self.size

    def _offset(self, pa: int) -> int:
        if pa & 7 or not self.contains(pa):
            raise PoolError(f"pa: {pa:#x} is not an aligned 64-bit word of the pool "
                            f"[{self.base:#x}, {self.base + self.size:#x})")
        return pa - self.base

    def read64(self, pa: int) -> int:
        off = pa - self.base
        if pa & 7 or off < 0 or off + 8 > self.size:
            self._offset(pa)  # raises with the full message
        return int(_U64.unpack_from(self._mem, off)[0])

    def write64(self, pa: int, value: int) -> None:
        off = self._offset(pa)
        if self._journal is not None:
            self._journal.append(("word", off, int(_U64.unpack_from(self._mem, off)[0])))
        _U64.pack_into(self._mem, off, value)

    def words(self) -> npt.NDArray[np.uint64]:
        """The whole pool as little-endian 64-bit words (a live view)."""
        return np.frombuffer(self._mem, dtype="<u8")

    def export(self) -> PoolImage:
        return PoolImage(self.base, bytes(self._mem))

    def used_extent(self) -> int:
        """Bytes from ``base`` up to the end of the highest page in use (0 if none)."""
        while self._top and not self._refcount[self._top - 1]:
            self._top -= 1
        return self._top * self.page_size


@dataclass(frozen=True)
class WordsMemory:
    """Table memory as an array of u64 words at ``base`` (a snapshot, or a view of guest RAM), as the
    model's walks read it."""

    base: int
    data: npt.NDArray[np.uint64]

    def words(self) -> npt.NDArray[np.uint64]:
        return self.data

    def read64(self, pa: int) -> int:
        off = pa - self.base
        if off < 0 or off + 8 > 8 * int(self.data.size):
            return 0
        return int(self.data[off >> 3])

    def contains(self, pa: int, length: int = 8) -> bool:
        return self.base <= pa and pa + length <= self.base + 8 * int(self.data.size)
