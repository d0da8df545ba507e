"""Merging the fuzzer's per-job reports (no QEMU): the tables of a run and their split over jobs,
and a merged report that is the same in any order and the same as the serial run's."""

from __future__ import annotations

import itertools
import random

import pytest

from harness.check.engine import MAX_EXPLAINED, CheckReport, Mismatch
from harness.check.fuzz import (
    Finding,
    FuzzOptions,
    FuzzReport,
    at_probes_per_address,
    block_size,
    job_indices,
    planned_tables,
    table_geometry,
)

DIVERGENCES = ("qemu-a", "qemu-b", "qemu-c", "qemu-d")
VOLATILE = ("seconds", "probes_per_s", "raw_at_per_s", "timings", "jobs")


def table_report(index: int) -> tuple[str, CheckReport]:
    """A made-up table check of table ``index``: probes, skips, withheld addresses and
    disagreements (unexplained ones on a few tables, known ones of several divergences)."""
    rng = random.Random(index)
    rep = CheckReport(f"fuzz 9/{index}", "geom", "10.0.2")
    rep.probes = {"S1E2R": rng.randrange(1000, 2000), "load": rng.randrange(0, 50)}
    rep.skipped = {"at-abort": rng.randrange(0, 3)} if rng.random() < 0.5 else {}
    rep.withheld = {"hazard": rng.randrange(1, 4)} if rng.random() < 0.3 else {}
    for n in range(rng.randrange(0, 6)):
        div = rng.choice(DIVERGENCES) if rng.random() < 0.6 else None
        if div is None and index % 3:
            continue  # unexplained ones on every third table only
        for _ in range(40 if div is None else 1):  # enough unexplained ones to reach the cap
            rep.add(Mismatch(0x1000 * n, "S1E2R", "fault", "ok", f"walk {index}/{n}", div), div)
    rep.timings = {"predict": 0.0}
    return f"stage {1 + index % 2} 4K", rep


def job_report(indices: list[int], seed: int = 9) -> FuzzReport:
    rep = FuzzReport(seed, "10.0.2", raw_at_per_s=4e6, seconds=1.0 + len(indices))
    for i in indices:
        key, t = table_report(i)
        rep.add(key, t, i, f"table-{i}")
        if i % 17 == 5:  # a death: counted as the fuzzer does
            rep.findings.append(Finding(seed, i, f"table-{i}", [i], "QemuExited: died"))
            rep.unexplained += 1
            rep.disagreements["target died"] = rep.disagreements.get("target died", 0) + 1
    return rep


def stable(rep: FuzzReport) -> dict[str, object]:
    js = rep.to_json()
    return {k: v for k, v in js.items() if k not in VOLATILE}


OPTS = FuzzOptions(9, 120 * 2 * 800, per_table=800, e2h=False)  # 2 AT probes per address


def test_planned_tables_follow_the_probes_and_min_tables() -> None:
    for seed in (0, 1, 7):
        opts = FuzzOptions(seed, 1_000_000)
        n = planned_tables(opts)
        probes = [at_probes_per_address(table_geometry(opts, i)) * opts.per_table for i in range(n)]
        assert sum(probes) >= opts.probes > sum(probes[:-1])  # the fewest tables that reach --probes
        assert {p // opts.per_table for p in probes} == {2, 4}  # EL2&0 tables count EL0's AT forms too
        assert n * 1e6 / sum(probes) >= 300  # the default run's promise: >= 300 tables per 10^6 probes
    assert planned_tables(FuzzOptions(0, 1, per_table=800, min_tables=5)) == 5
    assert planned_tables(OPTS) == 120


@pytest.mark.parametrize("jobs", [1, 2, 3, 5, 64])
def test_jobs_partition_the_tables_in_whole_blocks(jobs: int) -> None:
    parts = [job_indices(OPTS, j, jobs) for j in range(jobs)]
    assert sorted(i for p in parts for i in p) == list(range(planned_tables(OPTS)))
    block = block_size(OPTS)
    assert block % OPTS.tables_per_config == 0 and block % OPTS.access_every == 0
    for j, p in enumerate(parts):
        assert all((i // block) % jobs == j for i in p) and p == sorted(p)


def test_the_cap_and_the_known_divergences_are_exercised() -> None:
    serial = job_report(list(range(planned_tables(OPTS))))
    unexplained = [e for e in serial.examples if e.tag == "unexplained"]
    assert serial.disagreements["unexplained"] > MAX_EXPLAINED and len(serial.examples) == MAX_EXPLAINED
    assert len(unexplained) < MAX_EXPLAINED  # known ones came first on some tables
    assert {e.tag for e in serial.examples} >= set(DIVERGENCES)


@pytest.mark.parametrize("jobs", [2, 3, 5])
def test_merge_is_order_independent_and_equals_the_serial_run(jobs: int) -> None:
    serial = FuzzReport.merged([job_report(list(range(planned_tables(OPTS))))])
    parts = [job_report(job_indices(OPTS, j, jobs)) for j in range(jobs)]
    merged = [FuzzReport.merged(list(order)) for order in itertools.islice(itertools.permutations(parts), 6)]
    for m in merged:
        assert stable(m) == stable(serial)
        assert [(e.index, e.rank) for e in m.examples] == [(e.index, e.rank) for e in serial.examples]
        assert m.text(full=True).splitlines()[1:] == serial.text(full=True).splitlines()[1:]
        assert m.jobs == jobs and m.seconds == max(p.seconds for p in parts)
    assert serial.tables == planned_tables(OPTS) and serial.probes == sum(p.probes for p in parts)
    assert [f.index for f in serial.findings] == sorted(f.index for f in serial.findings) and serial.findings


def test_merge_of_one_is_the_report_itself() -> None:
    one = job_report(list(range(40)))
    m = FuzzReport.merged([one])
    assert stable(m) == stable(one) and m.raw_at_per_s == one.raw_at_per_s and m.seconds == one.seconds
