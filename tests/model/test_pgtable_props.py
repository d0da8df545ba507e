"""Property: after any sequence of maps and unmaps, `translate` of every page agrees with a plain
dictionary of what should be mapped, and destroy returns every page to the pool."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.arch.geometry import Granule, Stage, level_size
from harness.core.batch import translate_batch
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable, KvmPgtable, MapConflictError, Stage2Pgtable
from harness.core.prot import Prot
from harness.core.translate import PERM_W, READ

PROTS = [Prot.R, Prot.RW]


@st.composite
def programs(draw: st.DrawFn) -> tuple[Stage, Granule, list[tuple[str, int, int, int, Prot]]]:
    stage = draw(st.sampled_from([Stage.S1, Stage.S2]))
    granule = draw(st.sampled_from(list(Granule)))
    pages_per_block = level_size(granule, 2) // granule.size
    window = 2 * pages_per_block  # two level-2 blocks
    ops = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["map", "map", "map_block", "unmap"]))
        if kind == "map_block":
            first, count = draw(st.integers(0, 1)) * pages_per_block, pages_per_block
            pa_page = draw(st.integers(0, 3)) * pages_per_block
        else:
            first = draw(st.integers(0, window - 1))
            count = draw(st.integers(1, min(64, window - first)))
            pa_page = draw(st.integers(0, 4 * pages_per_block))
        ops.append(("unmap" if kind == "unmap" else "map", first, count, pa_page, draw(st.sampled_from(PROTS))))
    return stage, granule, ops


BASE_VA = 0x1_0000_0000
BASE_PA = 0x8000_0000


@settings(max_examples=60, deadline=None)
@given(programs())
def test_translate_agrees_with_a_dictionary(prog: tuple[Stage, Granule, list[tuple[str, int, int, int, Prot]]]) -> None:
    stage, granule, ops = prog
    g = granule.size
    pool = PagePool(0x4800_0000, 64 * g, g)
    table: KvmPgtable = HypPgtable(pool, granule, 40) if stage is Stage.S1 else Stage2Pgtable(pool, granule, 40, 48)
    expect: dict[int, tuple[int, Prot]] = {}
    for kind, first, count, pa_page, prot in ops:
        va = BASE_VA + first * g
        if kind == "unmap":
            table.unmap(va, count * g)
            for p in range(first, first + count):
                expect.pop(p, None)
            continue
        wanted = {first + i: (BASE_PA + (pa_page + i) * g, prot) for i in range(count)}
        clash = any(p in expect and expect[p] != v for p, v in wanted.items())
        before = pool.export().data
        try:
            table.map(va, count * g, BASE_PA + pa_page * g, prot)
        except MapConflictError:
            assert pool.export().data == before  # a refused map leaves the tables as they were
            # refused: an existing different mapping, or a block in the way of a smaller mapping
            assert clash or any(p in expect for p in wanted)
            continue
        assert not clash
        expect.update(wanted)

    pages = 2 * level_size(granule, 2) // g
    addrs = np.uint64(BASE_VA) + np.arange(pages, dtype=np.uint64) * np.uint64(g)
    assert table.pgd is not None
    res = translate_batch(pool.words(), pool.base, table.geom, table.pgd, addrs, READ)
    for i in range(pages):
        if i in expect:
            pa, prot = expect[i]
            assert bool(res.ok[i]) and int(res.pa[i]) == pa, (hex(int(addrs[i])), hex(int(res.pa[i])), hex(pa))
            assert bool(res.perms[i] & PERM_W) == bool(prot & Prot.W)
        else:
            assert not res.ok[i], hex(int(addrs[i]))
    table.destroy()
    assert pool.used_pages == 0
