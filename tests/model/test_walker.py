"""The walker on hand-built tables: order, flags, range rules, reloads, errors, properties."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.arch import descriptors as d
from harness.arch.geometry import Granule
from harness.core.memory import PagePool
from harness.core.walker import (
    V3_RULES,
    Walker,
    WalkError,
    WalkFlags,
    WalkRangeError,
    walk,
)

GB = 1 << 30
MB2 = 1 << 21
K4 = 0x1000


@dataclass
class Table:
    """A minimal struct kvm_pgtable: 4K granule, 32-bit input, start level 1 (hand-built)."""

    mem: PagePool
    pgd: int | None
    ia_bits: int = 32
    start_level: int = 1
    granule: Granule = Granule.K4
    lpa2: bool = False


def hand_table() -> tuple[Table, dict[str, int]]:
    """PGD (level 1): entry 0 -> level-2 table; entry 1 -> 1G block; rest invalid.
    Level 2 entry 0 -> level-3 table with pages 0 and 1 valid; entry 1 -> 2M block."""
    mem = PagePool(0x4800_0000, 64 * K4, K4)
    pgd = mem.alloc_page()
    l2 = mem.alloc_page()
    l3 = mem.alloc_page()
    mem.write64(pgd + 0, d.table_pte(l2, Granule.K4))
    mem.write64(pgd + 8, d.leaf_pte(0x8000_0000, 0, 1, Granule.K4))
    mem.write64(l2 + 0, d.table_pte(l3, Granule.K4))
    mem.write64(l2 + 8, d.leaf_pte(0x4020_0000, 0, 2, Granule.K4))
    mem.write64(l3 + 0, d.leaf_pte(0x4000_0000, 0, 3, Granule.K4))
    mem.write64(l3 + 8, d.leaf_pte(0x4000_1000, 0, 3, Granule.K4))
    return Table(mem, pgd), {"pgd": pgd, "l2": l2, "l3": l3}


def record(tbl: Table, addr: int, size: int, flags: WalkFlags, **kw: object) -> list[tuple[int, int, str, int]]:
    seen: list[tuple[int, int, str, int]] = []

    def cb(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        seen.append((a, level, flag.name or "", ptep))

    walk(tbl, addr, size, Walker(cb, flags), **kw)  # type: ignore[arg-type]
    return seen


def test_order_and_flags() -> None:
    tbl, p = hand_table()
    seen = record(tbl, 0, 2 * GB, WalkFlags.LEAF | WalkFlags.TABLE_PRE | WalkFlags.TABLE_POST)
    kinds = [(a, lvl, f) for a, lvl, f, _ in seen]
    assert kinds[:4] == [(0, 1, "TABLE_PRE"), (0, 2, "TABLE_PRE"), (0, 3, "LEAF"), (K4, 3, "LEAF")]
    # the rest of the level-3 table is visited as invalid leaves
    assert kinds[514] == (0, 2, "TABLE_POST")
    assert kinds[515] == (MB2, 2, "LEAF")
    assert kinds[-2] == (0, 1, "TABLE_POST")
    assert kinds[-1] == (GB, 1, "LEAF")
    assert len(kinds) == 2 + 512 + 1 + 511 + 1 + 1
    assert seen[2][3] == p["l3"] and seen[-1][3] == p["pgd"] + 8


def test_leaf_only_visits() -> None:
    tbl, _ = hand_table()
    seen = record(tbl, 0, 3 * K4, WalkFlags.LEAF)
    assert [(a, lvl) for a, lvl, _, _ in seen] == [(0, 3), (K4, 3), (2 * K4, 3)]


def test_start_and_end_are_aligned_to_the_granule() -> None:
    tbl, _ = hand_table()
    seen = record(tbl, 0x1800, 0x1000, WalkFlags.LEAF)
    assert [a for a, *_ in seen] == [K4, 2 * K4]


def test_end_equal_to_limit_is_accepted_and_visits_the_last_entry() -> None:
    tbl, _ = hand_table()
    seen = record(tbl, (1 << 32) - K4, K4, WalkFlags.LEAF)
    assert [(a, lvl) for a, lvl, *_ in seen] == [((1 << 32) - K4, 1)]


def test_one_granule_past_the_limit_is_rejected() -> None:
    tbl, _ = hand_table()
    with pytest.raises(WalkRangeError):
        record(tbl, (1 << 32) - K4, 2 * K4, WalkFlags.LEAF)
    with pytest.raises(WalkRangeError):
        record(tbl, (1 << 32) + K4, 0, WalkFlags.LEAF)


def test_start_equal_to_limit_walks_nothing() -> None:
    tbl, _ = hand_table()
    assert record(tbl, 1 << 32, 0, WalkFlags.LEAF) == []


def test_no_pgd_is_an_error() -> None:
    tbl, _ = hand_table()
    tbl.pgd = None
    with pytest.raises(WalkError, match="pgd"):
        record(tbl, 0, K4, WalkFlags.LEAF)


def test_leaf_callback_installing_a_table_is_descended() -> None:
    tbl, p = hand_table()
    newl3 = tbl.mem.alloc_page()
    tbl.mem.write64(newl3 + 16, d.leaf_pte(0x4100_2000, 0, 3, Granule.K4))
    seen: list[tuple[int, int]] = []

    def cb(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        seen.append((a, level))
        if level == 2 and ptep == p["l2"] + 16:  # invalid entry for [4M, 6M)
            tbl.mem.write64(ptep, d.table_pte(newl3, Granule.K4))

    walk(tbl, 2 * MB2, 3 * K4, Walker(cb, WalkFlags.LEAF))
    assert seen == [(2 * MB2, 2), (2 * MB2, 3), (2 * MB2 + K4, 3), (2 * MB2 + 2 * K4, 3)]


def test_table_pre_removing_a_table_is_not_followed() -> None:
    tbl, _p = hand_table()
    seen: list[tuple[int, int, str]] = []

    def cb(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        seen.append((a, level, flag.name or ""))
        if flag is WalkFlags.TABLE_PRE and level == 2:
            tbl.mem.write64(ptep, d.leaf_pte(0x5000_0000, 0, 2, Granule.K4))

    walk(tbl, 0, K4, Walker(cb, WalkFlags.LEAF | WalkFlags.TABLE_PRE))
    assert (0, 3, "LEAF") not in seen
    assert seen == [(0, 1, "TABLE_PRE"), (0, 2, "TABLE_PRE")]


def test_seed_rules_follow_a_removed_table() -> None:
    """Without a9f0e3d5a089 the walk descends into the (now stale) table pointer it read first."""
    tbl, _p = hand_table()
    seen: list[tuple[int, int, str]] = []

    def cb(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        seen.append((a, level, flag.name or ""))
        if flag is WalkFlags.TABLE_PRE and level == 2:
            tbl.mem.write64(ptep, 0)

    walk(tbl, 0, K4, Walker(cb, WalkFlags.LEAF | WalkFlags.TABLE_PRE), V3_RULES)
    assert (0, 3, "LEAF") in seen


class Boom(Exception):
    pass


def test_callback_error_stops_the_walk_unchanged() -> None:
    tbl, _ = hand_table()
    calls: list[int] = []
    err = Boom("stop here")

    def cb(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        calls.append(a)
        if a == K4:
            raise err

    with pytest.raises(Boom) as info:
        walk(tbl, 0, GB, Walker(cb, WalkFlags.LEAF))
    assert info.value is err
    assert calls == [0, K4]


def test_unaligned_start_inside_a_block_does_not_skip_the_next_entry() -> None:
    """357ad203d45c: [2M + 4K, 4M + 4K) covers the block at 2M and the first page of [4M, 6M)."""
    tbl, _ = hand_table()
    fixed = record(tbl, MB2 + K4, MB2, WalkFlags.LEAF)
    assert [(a, lvl) for a, lvl, *_ in fixed] == [(MB2 + K4, 2), (2 * MB2, 2)]
    seed = record(tbl, MB2 + K4, MB2, WalkFlags.LEAF, rules=V3_RULES)
    assert [(a, lvl) for a, lvl, *_ in seed] == [(MB2 + K4, 2)]  # the seed skips the entry at 4M


@dataclass
class ConcatTable:
    mem: PagePool
    pgd: int | None
    ia_bits: int = 40
    start_level: int = 1
    granule: Granule = Granule.K4
    lpa2: bool = False


def test_walk_crosses_concatenated_pgd_pages() -> None:
    mem = PagePool(0x4800_0000, 16 * K4, K4)
    pgd = mem.alloc_pages(2, align_pages=2)
    mem.write64(pgd + 511 * 8, d.leaf_pte(0x1_0000_0000, 0, 1, Granule.K4))
    mem.write64(pgd + K4, d.leaf_pte(0x2_0000_0000, 0, 1, Granule.K4))
    tbl = ConcatTable(mem, pgd)
    seen: list[tuple[int, int]] = []

    def cb(a: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        seen.append((a, ptep))

    walk(tbl, 511 * GB, 2 * GB, Walker(cb, WalkFlags.LEAF))  # type: ignore[arg-type]
    assert seen == [(511 * GB, pgd + 511 * 8), (512 * GB, pgd + K4)]
    seen.clear()
    walk(tbl, (1 << 40) - GB, GB, Walker(cb, WalkFlags.LEAF))  # type: ignore[arg-type]
    assert seen == [((1 << 40) - GB, pgd + K4 + 511 * 8)]


# -- property: any sub-range visits each overlapping leaf exactly once, in order -------------

@st.composite
def random_tables(draw: st.DrawFn) -> tuple[Table, list[tuple[int, int]]]:
    """A random 4K/32-bit table; returns it and the list of (start, size) of every leaf."""
    mem = PagePool(0x4800_0000, 256 * K4, K4)
    pgd = mem.alloc_page()
    leaves: list[tuple[int, int]] = []
    for i in range(4):  # level-1 entries
        kind = draw(st.sampled_from(["invalid", "block", "table"]))
        base = i * GB
        if kind == "block":
            mem.write64(pgd + 8 * i, d.leaf_pte(base, 0, 1, Granule.K4))
            leaves.append((base, GB))
            continue
        if kind == "invalid":
            leaves.append((base, GB))
            continue
        l2 = mem.alloc_page()
        mem.write64(pgd + 8 * i, d.table_pte(l2, Granule.K4))
        tables = set(draw(st.lists(st.integers(0, 511), max_size=4)))
        for j in range(512):
            b2 = base + j * MB2
            if j in tables:
                l3 = mem.alloc_page()
                mem.write64(l2 + 8 * j, d.table_pte(l3, Granule.K4))
                leaves.extend((b2 + k * K4, K4) for k in range(512))
            else:
                leaves.append((b2, MB2))
    return Table(mem, pgd), leaves


@settings(max_examples=40, deadline=None)
@given(random_tables(), st.integers(0, (1 << 32) - 1), st.integers(0, 1 << 31))
def test_every_overlapping_leaf_visited_once_in_order(
    tl: tuple[Table, list[tuple[int, int]]], addr: int, size: int
) -> None:
    tbl, leaves = tl
    size = min(size, (1 << 32) - addr)
    start = addr & ~(K4 - 1)
    end = (addr + size + K4 - 1) & ~(K4 - 1)
    expected = [b for b, s in leaves if b < end and b + s > start]
    seen = [a & ~(s - 1) for a, s in (
        (a, 1 << (39 - 9 * lvl)) for a, lvl, _, _ in record(tbl, addr, size, WalkFlags.LEAF))]
    assert seen == expected
