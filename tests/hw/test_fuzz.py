"""The fuzzer on the MMU: bounded runs with fixed seeds (0 unexplained), and planted model bugs
that it must catch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.arch import descriptors as d
from harness.arch.bits import Field
from harness.arch.geometry import Geometry, Granule, Stage
from harness.check import divergences, rawtables
from harness.check.engine import SKIP_AT_ABORT, SKIP_UNPROBEABLE
from harness.check.fuzz import Boots, FuzzJob, FuzzOptions, FuzzReport, fuzz, fuzz_job, fuzz_jobs, planned_tables
from harness.cli import main
from harness.core import batch, translate
from harness.target.process import RUNTIME_PREFIX, process_state
from harness.target.target import Target

pytestmark = pytest.mark.hw

LPA_KEY = "qemu-64k-oa-51-48-below-52bit-ps"
LPA2_KEY = "qemu-lpa2-oa-51-50-below-52bit-ps"
PERMISSION_HAZARD = divergences.AT_HAZARDS[0].key


def run(target: Target, seed: int, probes: int, stage: Stage | None = None, granule: Granule | None = None,
        per_table: int = 800, max_deaths: int = 10, lpa2: bool | None = None,
        e2h: bool | None = None, fetches: bool = False) -> FuzzReport:
    opts = FuzzOptions(seed, probes, stage, granule, per_table=per_table, max_deaths=max_deaths, lpa2=lpa2, e2h=e2h,
                       fetches=fetches)
    return fuzz(lambda: Target.start(), opts, first=target)


def tables_of(rep: FuzzReport, prefix: str) -> int:
    return sum(v["tables"] for k, v in rep.by_config.items() if k == prefix or k.startswith(prefix + " "))


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: f"s{int(s)}")
@pytest.mark.parametrize("granule", list(Granule), ids=lambda g: g.label)
def test_bounded_fuzz(target: Target, stage: Stage, granule: Granule) -> None:
    """Fixed seeds, every stage and granule: every disagreement is a declared divergence."""
    rep = run(target, 100 + 10 * int(stage) + granule.shift, 50_000, stage, granule)
    assert rep.ok, rep.text(full=True)
    # (an EL2&0 table's addresses get 4 AT probes, EL0's forms too: fewer tables reach the probes)
    assert rep.tables >= 15 and rep.probes >= 50_000 and not rep.findings
    assert tables_of(rep, f"stage {int(stage)} {granule.label}") == rep.tables
    if granule is Granule.K64:
        assert rep.disagreements.get(LPA_KEY, 0) > 0, rep.text()
    if stage is Stage.S2:
        assert rep.withheld.get(PERMISSION_HAZARD, 0) > 0, rep.text()
    assert rep.skipped.get(SKIP_AT_ABORT, 0) > 0, rep.text()


@pytest.mark.parametrize(("stage", "granule", "e2h"), [(Stage.S1, Granule.K4, False), (Stage.S1, Granule.K16, True),
                                                      (Stage.S2, Granule.K4, False), (Stage.S2, Granule.K16, False)],
                         ids=["s1-4K", "s1-16K-e2h", "s2-4K", "s2-16K"])
def test_bounded_fuzz_lpa2(target: Target, stage: Stage, granule: Granule, e2h: bool) -> None:
    """DS = 1 (FEAT_LPA2: 52-bit addresses, OA[51:50] in bits [9:8], 4K level -1, 16K level 0,
    blocks at 4K level 0 and 16K level 1), with the EL2&0 regime (hVHE) at stage 1: every
    disagreement declared; QEMU ignoring OA[51:50] below a 52-bit PS is met and explained."""
    rep = run(target, 300 + 10 * int(stage) + granule.shift, 40_000, stage, granule, lpa2=True, e2h=e2h)
    assert rep.ok, rep.text(full=True)
    assert not rep.findings and rep.tables >= (10 if e2h else 20)  # EL2&0: 4 AT probes per address
    key = f"stage {int(stage)} {granule.label} lpa2" + (" e2h" if e2h else "")
    assert rep.by_config[key]["tables"] == rep.tables, rep.text()
    assert rep.disagreements.get(LPA2_KEY, 0) > 0, rep.text()
    if stage is Stage.S2:
        assert rep.withheld.get(PERMISSION_HAZARD, 0) > 0, rep.text()


def test_bounded_fuzz_hvhe(target: Target) -> None:
    """The EL2&0 regime (AP[1] is EL0's permission, PXN and UXN) on every granule."""
    rep = run(target, 401, 40_000, Stage.S1, lpa2=False, e2h=True)
    assert rep.ok, rep.text(full=True)
    assert {k for k in rep.by_config} == {"stage 1 4K e2h", "stage 1 16K e2h", "stage 1 64K e2h"}, rep.text()


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: f"s{int(s)}")
def test_bounded_fuzz_with_fetches(target: Target, stage: Stage) -> None:
    """Instruction-fetch probes on random tables too (off by default in the fuzzer; they once met
    the IPA of the firmware's idle breakpoint, see test_fuzz_points): every disagreement
    declared, QEMU and the firmware never die."""
    rep = run(target, 132, 50_000, stage, fetches=True)
    assert rep.ok and not rep.findings, rep.text(full=True)
    assert rep.timings.get("fetch", 0) > 0, rep.text()


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
    mp.setattr(translate, "oa_hi_included", lambda geom, *qemu: False)  # WalkParams.of: batch and scalar


def _lost_oa_51_50_lpa2(mp: pytest.MonkeyPatch) -> None:
    real = batch.descriptor_oa

    def oa(desc: Any, granule: Granule, lpa2: bool = False, with_oa_hi: bool = True) -> Any:
        return real(desc, granule, lpa2, with_oa_hi) & ~np.uint64(d.OA_51_50_LPA2.max << 50)

    mp.setattr(batch, "descriptor_oa", oa)


PLANTED: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], Stage | None, Granule | None, bool | None]] = {
    "wrong level shift": (_wrong_level_shift, None, None, None),
    "AF ignored": (_af_ignored, None, None, None),
    "AP[2] read as AP[1]": (_ap2_read_as_ap1, Stage.S1, None, None),
    "roots rounded to 64 bytes": (_root_rounded_to_64, None, Granule.K4, None),
    "lost OA[51:48]": (_lost_oa_51_48, None, Granule.K64, None),
    "lost OA[51:50] with DS = 1": (_lost_oa_51_50_lpa2, None, Granule.K4, True),
}


@pytest.fixture
def planted(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Stage | None,
                                                                                                   Granule | None,
                                                                                                   bool | None]]:
    plant, stage, granule, lpa2 = PLANTED[request.param]
    plant(monkeypatch)
    rawtables._BASES.clear()
    yield stage, granule, lpa2
    rawtables._BASES.clear()


@pytest.mark.parametrize("planted", list(PLANTED), indirect=True)
def test_planted_model_bug_is_caught(target: Target, planted: tuple[Stage | None, Granule | None,
                                                                     bool | None]) -> None:
    stage, granule, lpa2 = planted
    rep = run(target, 31, 40_000, stage, granule, lpa2=lpa2)
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
                          "--per-table", "800", "--json", "--report", str(report)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    assert js["unexplained"] == 0 and js["probes"] >= 15000 and js["tables"] >= 1
    assert js["raw_at_per_s"] > 0 and js["probes_per_s"] > 0
    assert report.read_text().startswith("OK: fuzz seed 2")
    split = subprocess.run([sys.executable, "-m", "harness.cli", "fuzz", "--seed", "2", "--probes", "15000",
                            "--per-table", "800", "--json", "--jobs", "2"], capture_output=True, text=True, timeout=300)
    assert split.returncode == 0, split.stderr
    two = json.loads(split.stdout)
    assert two["jobs"] == 2 and two["log_dir"] is None
    assert {k: two[k] for k in ("tables", "probes", "disagreements", "by_config", "examples")} == \
        {k: js[k] for k in ("tables", "probes", "disagreements", "by_config", "examples")}
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


def test_fuzz_lpa2_on_qemu_7_2(legacy_qemu: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU 7.2 with DS = 1: reserved blocks at 16K level 0 and 4K level -1 taken as blocks, the
    DS = 1 stage-2 start levels refused, and level -1 faults that abort it (neither AT nor a real
    access may meet one: skipped and counted). All declared; QEMU never dies."""
    monkeypatch.setenv("HARNESS_QEMU", legacy_qemu)
    with Target.start() as t:
        s1 = run(t, 9, 200_000, Stage.S1, lpa2=True, per_table=1550)
        s2 = run(t, 9, 300_000, Stage.S2, lpa2=True, per_table=1550)
    for rep in (s1, s2):
        assert rep.ok and not rep.findings, rep.text(full=True)
        assert LPA2_KEY in rep.disagreements and rep.skipped.get(SKIP_UNPROBEABLE, 0) > 0, rep.text()
    assert "qemu-l0-block-16k" in s1.disagreements, s1.text()
    assert "qemu-s2-lpa2-start-level" in s2.disagreements, s2.text()


# -- --jobs: one merged report whatever the split; nothing left behind --------------------------------


def _same(a: FuzzReport, b: FuzzReport) -> None:
    for key in ("tables", "probes", "unexplained", "disagreements", "skipped", "withheld", "by_config", "restarts"):
        assert getattr(a, key) == getattr(b, key), (key, a.text(), b.text())
    assert [e.text for e in a.examples] == [e.text for e in b.examples]
    assert [(f.index, f.error) for f in a.findings] == [(f.index, f.error) for f in b.findings]


def test_jobs_merge_to_the_serial_report(target: Target) -> None:
    """The same seed and probes on one QEMU, on two and on three jobs (each its own process and
    QEMU): the same tables, probes, disagreements by class and examples in index order."""
    opts = FuzzOptions(23, 24_000, per_table=800)
    serial = FuzzReport.merged([fuzz(lambda: Target.start(), opts, first=target)])
    assert serial.tables == planned_tables(opts) >= 9 and serial.examples, serial.text()  # 3 blocks of 4
    for jobs in (2, 3):
        split = fuzz_jobs(opts, jobs, Boots())
        assert split.jobs == jobs and split.ok, split.text(full=True)
        _same(serial, split)


def _deaths_possible(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the AT hazard list emptied, AT S12E1W meets stage-2 permission faults and QEMU 10 aborts."""
    if target.qemu_version < (8, 0, 0):
        pytest.skip("QEMU 7.2 answers AT S12E1W at a stage-2 permission fault")
    monkeypatch.setattr(divergences, "AT_HAZARDS", ())


def test_a_death_in_a_job_names_its_log_dir_with_error_txt(target: Target, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """A job's dead target keeps its logs under the job's name, with error.txt, and the finding
    names them."""
    _deaths_possible(target, monkeypatch)
    opts = FuzzOptions(5, 12_000, Stage.S2, Granule.K4, per_table=800, max_deaths=2)
    rep = fuzz_job(FuzzJob(opts, 1, 2, Boots(30.0, tmp_path)), lambda _: None)
    assert len(rep.findings) == 2 and rep.stopped, rep.text()
    for f in rep.findings:
        assert Path(f.log_dir).parent == tmp_path and Path(f.log_dir).name.startswith("job1-boot")
        assert "QemuExited" in (Path(f.log_dir) / "error.txt").read_text()
        assert f.log_dir in f.text()


def test_fuzz_command_names_the_kept_logs(target: Target, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`harness fuzz` with unexplained findings: exit 1, the log directory named on stdout and
    stderr, error.txt in the dead boot's directory below it."""
    _deaths_possible(target, monkeypatch)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    code = main(["fuzz", "--seed", "5", "--probes", "6000", "--stage", "2", "--granule", "4K", "--per-table", "800",
                 "--max-deaths", "1"])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    (base,) = [p for p in tmp_path.iterdir() if p.name.startswith("pgtable-harness-log-")]
    assert f"logs: {base}" in out and str(base) in err.splitlines()[-1], (out, err)
    assert "QemuExited" in (base / "boot1" / "error.txt").read_text()


MARK = "PGTABLE_FUZZ_JOBS_TEST"


def _marked(tag: str) -> dict[int, str]:
    """Live processes carrying ``MARK=tag`` (the harness, its jobs, their QEMUs and gdbs), by name."""
    want = f"{MARK}={tag}".encode()
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or want not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if process_state(int(entry.name)) not in (None, "Z"):
            out[int(entry.name)] = comm
    return out


def _parent(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (None if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _family(tag: str) -> dict[int, tuple[str, int | None]]:
    """:func:`_marked` with each one's parent pid: what a failed check shows."""
    return {pid: (comm, _parent(pid)) for pid, comm in _marked(tag).items()}


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signal_to_a_jobs_run_leaves_no_qemu(sig: signal.Signals) -> None:
    """`harness fuzz --jobs 2` killed mid-run (Ctrl-C, SIGTERM, SIGKILL): no QEMU of its jobs,
    no job, and (but for SIGKILL, which runs no clean-up) no run-time directory of a job survives."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "fuzz", "--jobs", "2", "--probes", "1e8"],
                            env=dict(os.environ, **{MARK: tag}), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        qemus = lambda: [p for p, c in _marked(tag).items() if c.startswith("qemu")]  # noqa: E731
        if not _wait(lambda: len(qemus()) == 2, 60):
            proc.kill()
            raise AssertionError(f"two QEMUs did not start: {_marked(tag)}: {proc.communicate()[1].decode()}")
        # the harness's own children: a job's gdb between fork and exec is a "python" with the mark too
        jobs = [p for p, c in _marked(tag).items() if c.startswith("python") and _parent(p) == proc.pid]
        assert len(jobs) == 2, _family(tag)
        time.sleep(1.0)  # mid-run
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode in (-sig, 128 + sig, 130), (proc.returncode, err)
        assert _wait(lambda: not _marked(tag), 10), f"left running: {_family(tag)}"
        if sig is not signal.SIGKILL:
            left = [d for j in jobs for d in Path("/dev/shm").glob(f"{RUNTIME_PREFIX}{j}-*")]
            assert not left, left
            assert "Traceback" not in err.decode(), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _marked(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
