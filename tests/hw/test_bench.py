"""``harness bench``: raw and verified rates measured the same way, over the same addresses, in
rounds; the ratio is each round's median, and verified can never beat raw."""

from __future__ import annotations

import json

import pytest

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
