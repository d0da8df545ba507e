"""The fuzzer on the MMU: bounded runs with fixed seeds (0 unexplained), and planted model bugs
that it must catch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.arch import descriptors as d
from harness.arch.bits import Field
from harness.arch.geometry import Geometry, Granule, Stage
from harness.check import divergences, rawtables
from harness.check.engine import SKIP_AT_ABORT
from harness.check.fuzz import FuzzOptions, FuzzReport, fuzz
from harness.core import batch, translate
from harness.target.target import Target

pytestmark = pytest.mark.hw

LPA_KEY = "qemu-64k-oa-51-48-below-52bit-ps"
PERMISSION_HAZARD = divergences.AT_HAZARDS[0].key


def run(target: Target, seed: int, probes: int, stage: Stage | None = None, granule: Granule | None = None,
        per_table: int = 800, max_deaths: int = 10) -> FuzzReport:
    opts = FuzzOptions(seed, probes, stage, granule, per_table=per_table, max_deaths=max_deaths)
    return fuzz(lambda: Target.start(), opts, first=target)


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: f"s{int(s)}")
@pytest.mark.parametrize("granule", list(Granule), ids=lambda g: g.label)
def test_bounded_fuzz(target: Target, stage: Stage, granule: Granule) -> None:
    """Fixed seeds, every stage and granule: every disagreement is a declared divergence."""
    rep = run(target, 100 + 10 * int(stage) + granule.shift, 50_000, stage, granule)
    assert rep.ok, rep.text(full=True)
    assert rep.tables >= 25 and rep.probes >= 50_000 and not rep.findings
    assert rep.by_config[f"stage {int(stage)} {granule.label}"]["tables"] == rep.tables
    if granule is Granule.K64:
        assert rep.disagreements.get(LPA_KEY, 0) > 0, rep.text()
    if stage is Stage.S2:
        assert rep.withheld.get(PERMISSION_HAZARD, 0) > 0, rep.text()
    assert rep.skipped.get(SKIP_AT_ABORT, 0) > 0, rep.text()


def test_mixed_fuzz_covers_both_stages(target: Target) -> None:
    rep = run(target, 7, 120_000, per_table=1600)
    assert rep.ok, rep.text(full=True)
    assert {k.split()[1] for k in rep.by_config} == {"1", "2"}
    assert rep.tables >= 30 and rep.raw_at_per_s > 0 and rep.probes_per_s > 0
    js = rep.to_json()
    for key in ("probes", "tables", "disagreements", "unexplained", "skipped", "probes_per_s", "raw_at_per_s"):
        assert key in js


# -- planted model bugs ---------------------------------------------------------------------------


def _wrong_level_shift(mp: pytest.MonkeyPatch) -> None:
    real = Geometry.shift
    mp.setattr(Geometry, "shift", lambda self, level: real(self, level) + (1 if level == 2 else 0))


def _af_ignored(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(batch, "AF", d.VALID)  # every leaf has bit 0 set: the access flag never faults


def _ap2_read_as_ap1(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(translate, "S1_AP", Field("AP", d.S1_AP.hi - 1, d.S1_AP.lo - 1))  # the walks' shared predicate


def _root_rounded_to_64(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(batch, "root_table_base", lambda geom, root: root & ~63)


def _lost_oa_51_48(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(batch, "oa_hi_included", lambda geom, qemu_lpa_oa=False: False)


PLANTED: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], Stage | None, Granule | None]] = {
    "wrong level shift": (_wrong_level_shift, None, None),
    "AF ignored": (_af_ignored, None, None),
    "AP[2] read as AP[1]": (_ap2_read_as_ap1, Stage.S1, None),
    "roots rounded to 64 bytes": (_root_rounded_to_64, None, Granule.K4),
    "lost OA[51:48]": (_lost_oa_51_48, None, Granule.K64),
}


@pytest.fixture
def planted(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Stage | None,
                                                                                                   Granule | None]]:
    plant, stage, granule = PLANTED[request.param]
    plant(monkeypatch)
    rawtables._BASES.clear()
    yield stage, granule
    rawtables._BASES.clear()


@pytest.mark.parametrize("planted", list(PLANTED), indirect=True)
def test_planted_model_bug_is_caught(target: Target, planted: tuple[Stage | None, Granule | None]) -> None:
    stage, granule = planted
    rep = run(target, 31, 40_000, stage, granule)
    assert rep.unexplained > 0, rep.text()
    assert rep.disagreements.get("unexplained", 0) > 0  # (QEMU may also die: withholding trusts the model)


def test_qemu_death_is_a_finding_and_the_run_goes_on(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the AT hazard list emptied, AT S12E1W meets stage-2 permission faults and QEMU 10
    aborts: each death is recorded (table and addresses), the target restarted, the run goes on."""
    if target.qemu_version < (8, 0, 0):
        pytest.skip("QEMU 7.2 answers AT S12E1W at a stage-2 permission fault")
    monkeypatch.setattr(divergences, "AT_HAZARDS", ())
    rep = run(target, 5, 6_000, Stage.S2, Granule.K4, max_deaths=3)
    assert len(rep.findings) == 3 and rep.restarts == 2, rep.text()  # the run went on after each death
    assert rep.stopped and rep.disagreements["target died"] == 3 and rep.unexplained >= 3
    f = rep.findings[0]
    assert "QemuExited" in f.error and f.addresses and "stage 2 4K" in f.table


def test_fuzz_command(tmp_path: Path) -> None:
    """`harness fuzz`: exit 0, the JSON figures, the report file."""
    report = tmp_path / "fuzz.txt"
    out = subprocess.run([sys.executable, "-m", "harness.cli", "fuzz", "--seed", "2", "--probes", "15000",
                          "--json", "--report", str(report)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    assert js["unexplained"] == 0 and js["probes"] >= 15000 and js["tables"] >= 1
    assert js["raw_at_per_s"] > 0 and js["probes_per_s"] > 0
    assert report.read_text().startswith("OK: fuzz seed 2")
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "fuzz", "--granule", "8K"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "granule" in bad.stderr and "Traceback" not in bad.stderr


def test_fuzz_on_qemu_7_2(legacy_qemu: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12's QEMU 7.2: its own bugs (reserved-level blocks, PAR.SH) are declared divergences,
    also met together with a departure of walk semantics on one descriptor."""
    monkeypatch.setenv("HARNESS_QEMU", legacy_qemu)
    with Target.start() as t:
        assert t.qemu_version < (8, 0, 0)
        rep = run(t, 3, 60_000)
    assert rep.ok, rep.text(full=True)
    assert {"qemu-par-sh-non-cacheable", "qemu-l1-block-16k"} <= set(rep.disagreements), rep.text()
