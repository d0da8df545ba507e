"""``harness bench``: raw and verified rates measured the same way, over the same addresses, in
rounds; the ratio is each round's median, and verified can never beat raw."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from harness.bench.e2e import BENCH_SCENARIO, GIB
from harness.check.engine import CheckReport, at_request_sizes, check_at, used_image
from harness.check.scenario import build
from harness.cli import main

pytestmark = pytest.mark.hw


def test_bench_rounds_and_median(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--probes", "200000", "--rounds", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rounds"] == 3 and len(out["ratios"]) == 3 and out["mismatched"] == 0
    assert out["verified"] == 3 * 2 * 200_000  # every address, both AT forms, every round
    assert sorted(out["ratios"])[1] == pytest.approx(out["ratio"], abs=1e-3)
    # the verified pass runs the raw pass's AT loop and more: it cannot be faster, beyond noise
    assert 0 < out["ratio"] < 1.05, out["ratios"]
    assert out["machine"]["cpus"] >= 1 and out["machine"]["cpu_model"]


def test_bench_text_says_what_to_compare(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--probes", "20000", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "ratio verified/raw:" in text and "compare the ratio between machines" in text


def test_bench_rounds_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse's refusal, before anything boots
        main(["bench", "--rounds", "0"])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("harness bench: error: ") and "--rounds" in line


def test_bench_check_issues_the_planned_requests(target: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The verified pass over the bench's table: the requests engine.at_request_sizes plans (both
    forms each, every host piece of a request in it, in order), every probe compared, none off."""
    table = build(BENCH_SCENARIO, target.layout).table
    rng = np.random.default_rng(3)
    n = 300_000
    addrs = (np.uint64(0x1_0000_0000) + rng.integers(0, 8 * GIB, size=n, dtype=np.uint64)) & ~np.uint64(7)
    sent: list[tuple[int, int]] = []
    start = target.at_start_both

    def counting(reads: Any, writes: Any, *args: Any, **kw: Any) -> None:
        assert np.array_equal(reads, writes)  # nothing withheld on this table
        sent.append((int(np.asarray(reads)[0]), int(np.asarray(reads).size)))
        start(reads, writes, *args, **kw)

    monkeypatch.setattr(target, "at_start_both", counting)
    report = CheckReport(BENCH_SCENARIO.name, table.geom.describe(), "")
    target.install(table.regs(), used_image(table))
    try:
        check_at(report, target, table, addrs)
    finally:
        target.uninstall()
    sizes = at_request_sizes(n, target.layout.max_at // 2)
    assert [s for _, s in sent] == sizes and len(sizes) > 1
    assert [a for a, _ in sent] == [int(addrs[lo]) for lo in np.cumsum([0, *sizes[:-1]])]
    assert report.checked == report.matched == 2 * n and report.mismatched == report.known == 0
