"""How the check splits its AT probes into requests (engine.at_request_sizes): few requests, a
small first one (predicted while nothing runs), growing, and a small last one (compared after)."""

from __future__ import annotations

import pytest

from harness.check import engine
from harness.check.engine import (
    AT_PIPELINE_CHUNK,
    AT_PIPELINE_FIRST,
    AT_PIPELINE_GROWTH,
    AT_PIPELINE_TAIL,
    at_request_sizes,
)

CAP = 2 << 20  # the firmware's max_at // 2 (both forms in one request)


@pytest.mark.parametrize("n", [0, 1, 1000, AT_PIPELINE_CHUNK, AT_PIPELINE_CHUNK + 1, 100_000, 200_000,
                               300_000, 1_000_000, 4_000_000, 10_000_000])
def test_sizes_cover_every_address_within_the_cap(n: int) -> None:
    sizes = at_request_sizes(n, CAP)
    assert sum(sizes) == n and all(0 < s <= CAP for s in sizes)
    if n <= AT_PIPELINE_CHUNK:
        assert sizes == ([n] if n else [])
    else:
        assert len(sizes) >= 2  # something to predict while the firmware runs
        assert sizes[0] <= max(AT_PIPELINE_FIRST, n // 2) and sizes[-1] <= max(AT_PIPELINE_TAIL, n - n // 2), sizes


def test_a_million_addresses_in_four_requests() -> None:
    sizes = at_request_sizes(1_000_000, CAP)
    assert sizes[:2] == [AT_PIPELINE_FIRST, AT_PIPELINE_FIRST * AT_PIPELINE_GROWTH]
    assert sizes[-1] == AT_PIPELINE_TAIL and len(sizes) == 4
    ten = at_request_sizes(10_000_000, CAP)  # the ramp grows by GROWTH up to the cap
    assert ten[:4] == [AT_PIPELINE_FIRST * AT_PIPELINE_GROWTH**i for i in range(4)] and ten[3] == CAP


def test_the_cap_bounds_the_bulk() -> None:
    sizes = at_request_sizes(1_000_000, 100_000)
    assert max(sizes) <= 100_000 and sum(sizes) == 1_000_000
    assert sizes[0] == AT_PIPELINE_FIRST and sizes[-1] == 100_000


def test_few_addresses_beyond_one_request_go_in_two_halves(monkeypatch: pytest.MonkeyPatch) -> None:
    n = AT_PIPELINE_CHUNK + 5
    assert at_request_sizes(n, CAP) == [n // 2, n - n // 2]
    monkeypatch.setattr(engine, "AT_PIPELINE_CHUNK", 10)  # the rule, not the constants
    assert at_request_sizes(11, CAP) == [5, 6]
