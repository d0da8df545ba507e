"""A real hypervisor's tables: Debian's arm64 6.12 kernel under QEMU, attached, decoded, verified.

Four configurations: ``kvm-arm.mode=nvhe`` and ``kvm-arm.mode=protected`` on ``-cpu max`` and
``-cpu max,lpa2=off``. Each boots once per session (the ``live_kernel`` fixture, about 2 s), is
captured through its gdbstub, and must (1) decode into the regimes the kernel uses (hyp stage 1;
protected mode adds the host's stage 2), (2) verify on the payload's MMU with 0 mismatches, and
(3) agree with the kernel itself: the hyp text named by the package's System.map is mapped, only
read-only and executable, nothing is writable and executable (SCTLR_EL2.WXN, which Linux sets, is
part of the model's walk), and in nVHE nothing else is executable.

The hVHE execute-never finding. In the EL2&0 regime (``kvm-arm.mode=protected`` here) bit 54 is UXN
(EL0's execute-never) and EL2's is PXN (bit 53). Linux 6.12.117 marks hyp mappings execute-never
with bit 54 alone, so the hyp rodata (and the ro_after_init page) is executable at EL2 (r-x:
PXN = 0, UXN = 1), and writable hyp memory is kept from EL2 execution only by SCTLR_EL2.WXN. This
is the upstream bug fixed by "KVM: arm64: Fix EL2 S1 XN handling for hVHE setups" (Marc Zyngier,
2025-12-10; Fixes: 6537565fd9b7f), which makes the hVHE execute-never UXN | PXN. The tests assert
it from the decoded descriptor bits and the model's walk; the MMU confirms the replayed tables'
read and write permissions (``AT S1E2R/W``: 0 mismatches, every range's edges probed, under the
snapshot's SCTLR_EL2.WXN, read back from the replay target), and their execute permission at EL2
with instruction fetches (``AT`` has no fetch form): in the replay, a ``movz x0, #tag; ret`` is
planted at each probed range's PA (RAM the payload does not use, restored afterwards) and the
payload branches to the VA at EL2: the hyp rodata runs, the writable pages take a permission
fault (WXN), exactly as the model predicts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.arch.descriptors import S1_PXN, S1_UXN
from harness.arch.registers import ESR_EC, ISS_DFSC, SCTLR_WXN, ExceptionClass, FaultKind, fault_status
from harness.check.attach import (
    FINDING_EL0_ONLY_XN,
    FINDING_WXN_ONLY,
    LiveRange,
    RegimeDecode,
    decode,
    findings,
    verify,
    walk,
)
from harness.cli import main
from harness.core.translate import PERM_R, PERM_W, PERM_X
from harness.live.capture import Capture
from harness.live.gdbstub import parse_target, session
from harness.live.kernel import EXPECTED_BANNER, HYP_IDMAP_TEXT, HYP_RODATA, HYP_TEXT, find_image_pa
from harness.pytestplugin.kernel import LiveKernel
from harness.target.layout import Layout
from harness.target.target import Target

pytestmark = pytest.mark.hw

# Linux 6.12 on QEMU 10: nvhe on -cpu max,lpa2=off is EL2 stage 1, 4K, 48 bits (E2H = 0, DS = 0);
# on -cpu max DS = 1 (52-bit VA, start level -1); protected is hVHE (E2H = 1) with the host's
# stage 2, DS = 1 on -cpu max (52-bit IPA, level 0, 16 concatenated PGD pages).
CONFIGS = [pytest.param(m, c, id=f"{m}-{c.replace(',', '-').replace('=', '')}")
           for m in ("nvhe", "protected") for c in ("max,lpa2=off", "max")]
EXPECTED_REGIMES = {"nvhe": ["el2"], "protected": ["el2&0", "stage2"]}


def _start(layout: Layout) -> Target:
    return Target.start(timeout=60, layout=layout)


@pytest.mark.parametrize(("mode", "cpu"), CONFIGS)
def test_decode_and_verify(live_kernel: Callable[..., LiveKernel], mode: str, cpu: str) -> None:
    k = live_kernel(mode=mode, cpu=cpu)
    assert EXPECTED_BANNER[mode] + " mode initialized successfully" in k.banner
    cap = k.capture()
    assert cap.was_running, cap.vm_status  # and so it was resumed
    assert [r.name for r in cap.regimes] == EXPECTED_REGIMES[mode]
    decoded = decode(cap.snapshot, cap.regimes)
    for rd in decoded:
        assert rd.ranges, f"{rd.name}: no mapped range"
    report = verify(cap.snapshot, _start, regimes=cap.regimes)
    assert [r.regime for r in report.regimes] == EXPECTED_REGIMES[mode]
    for r in report.regimes:
        assert r.checked > 2 * r.ranges, r
    assert report.mismatched == 0, report.text()
    # Linux runs EL2 with SCTLR_EL2.WXN = 1: the replay ran under it too (read back from the MMU).
    hyp = report.regimes[0]
    assert hyp.wxn and hyp.sctlr_el2 is not None and SCTLR_WXN.get(hyp.sctlr_el2), hyp.to_json()


@dataclass
class _Hyp:
    """A kernel's hyp stage 1 decoded, with its System.map sections as physical ranges."""

    cap: Capture
    hyp: RegimeDecode
    text: list[tuple[int, int]]  # hyp text and hyp idmap text
    rodata: tuple[int, int]

    def in_text(self, r: LiveRange) -> bool:
        return any(_pa_overlap(r, lo, hi) for lo, hi in self.text)

    def in_rodata(self, r: LiveRange) -> bool:
        return _pa_overlap(r, *self.rodata)


def _pa_overlap(r: LiveRange, lo: int, hi: int) -> bool:
    return r.range.pa < hi and lo < r.range.pa + r.range.size


def _xn_bits(r: LiveRange) -> tuple[int, int]:
    """(PXN, UXN) of the range's leaf descriptors (EL2&0 regime)."""
    f = dict(r.range.fields)
    return f[S1_PXN.name], f[S1_UXN.name]


def _hyp(k: LiveKernel) -> _Hyp:
    with session(parse_target(str(k.gdb_socket))) as sess:
        base = find_image_pa(sess.read_physical, k.image)
    assert base is not None, "the kernel Image's header is not in RAM at any 2 MiB boundary"
    text = [(base + lo, base + hi) for lo, hi in (k.image.section(*HYP_TEXT), k.image.section(*HYP_IDMAP_TEXT))]
    rodata_lo, rodata_hi = (base + x for x in k.image.section(*HYP_RODATA))
    cap = k.capture()
    hyp = decode(cap.snapshot, cap.regimes)[0]
    assert hyp.regime.geom.stage == 1
    return _Hyp(cap, hyp, text, (rodata_lo, rodata_hi))


@pytest.mark.parametrize(("mode", "cpu"), CONFIGS)
def test_hyp_text_read_only_executable(live_kernel: Callable[..., LiveKernel], mode: str, cpu: str) -> None:
    """The decode against the kernel's own System.map: hyp text r-x, hyp rodata not writable, W^X
    (with SCTLR_EL2.WXN); nVHE: nothing else executable, and no finding."""
    h = _hyp(live_kernel(mode=mode, cpu=cpu))
    covered = 0
    for r in h.hyp.ranges:
        m = r.range
        if h.in_text(r):
            assert r.perms & PERM_X and not r.perms & PERM_W, f"hyp text mapped {r.describe()}"
            covered += sum(max(0, min(m.pa + m.size, hi) - max(m.pa, lo)) for lo, hi in h.text)
        assert not (r.perms & PERM_X and r.perms & PERM_W), f"writable and executable: {r.describe()}"
        if h.in_rodata(r):
            assert not r.perms & PERM_W, f"hyp rodata mapped writable: {r.describe()}"
        if r.perms & PERM_X and not h.in_text(r):
            # nVHE: only the hyp text is executable. hVHE: test_hvhe_execute_never_finding.
            assert h.hyp.name == "el2&0", f"executable hyp mapping outside the hyp text: {r.describe()}"
    # Every byte of the hyp text (page-rounded) is mapped, once through its hyp VA at least.
    text_lo, text_hi = h.text[0]
    assert covered >= text_hi - text_lo
    if mode == "nvhe":
        # EL2 regime: bit 54 is XN and Linux sets it on everything but text: W^X without WXN.
        found = findings([h.hyp])
        assert not found, [f.text() for f in found]


@pytest.mark.parametrize("cpu", ["max,lpa2=off", "max"])
def test_hvhe_execute_never_finding(live_kernel: Callable[..., LiveKernel], cpu: str) -> None:
    """Linux 6.12.117's hVHE execute-never bug (module text), precisely: the hyp rodata is r-x at
    EL2 (PXN = 0, UXN = 1); every executable range outside the hyp text is such read-only data
    (rodata, the ro_after_init page); every writable range has the same bits and is execute-never
    at EL2 only through SCTLR_EL2.WXN. From the decoded descriptors and the model's walk, then on
    the MMU: the replay fetches from every range whose PA is free RAM there (instruction-fetch
    probes at EL2, the snapshot's WXN programmed): the hyp rodata runs at EL2, every writable page
    takes a permission fault at its leaf, and the model agrees with each probe."""
    h = _hyp(live_kernel(mode="protected", cpu=cpu))
    assert h.hyp.name == "el2&0" and h.hyp.regime.wxn
    found = {f.kind: f for f in findings([h.hyp])}
    assert set(found) == {FINDING_WXN_ONLY, FINDING_EL0_ONLY_XN}, [f.text() for f in found.values()]
    rodata = [r for r in h.hyp.ranges if h.in_rodata(r)]
    assert rodata, "the hyp rodata is not mapped"
    for r in rodata:
        assert _xn_bits(r) == (0, 1), f"hyp rodata {r.describe()}: (PXN, UXN) = {_xn_bits(r)}"
        assert r.perms == PERM_R | PERM_X, f"hyp rodata not r-x at EL2: {r.describe()}"
    outside_text = [r for r in h.hyp.ranges if r.perms & PERM_X and not h.in_text(r)]
    assert set(rodata) <= set(outside_text)
    for r in outside_text:
        assert _xn_bits(r) == (0, 1) and r.perms == PERM_R | PERM_X, r.describe()
    writable = [r for r in h.hyp.ranges if r.perms & PERM_W]
    assert writable and list(found[FINDING_WXN_ONLY].ranges) == writable
    for r in writable:
        assert _xn_bits(r) == (0, 1) and r.xn_by_wxn and r.perms == PERM_R | PERM_W, r.describe()
        assert walk(h.cap.snapshot, h.hyp.regime, r.va, wxn=False).perms == PERM_R | PERM_W | PERM_X
    # The el0-only-xn finding is exactly those two kinds of range.
    assert sorted(found[FINDING_EL0_ONLY_XN].ranges, key=lambda r: r.va) == \
        sorted([*outside_text, *writable], key=lambda r: r.va)
    # The text itself is executable at EL0 and EL2 alike (PXN = UXN = 0), read-only.
    for r in h.hyp.ranges:
        if h.in_text(r):
            assert _xn_bits(r) == (0, 0) and r.perms == PERM_R | PERM_X, r.describe()
    # On the MMU: fetch from the replayed hyp tables at EL2.
    report = verify(h.cap.snapshot, _start, regimes=[h.hyp.regime])
    assert report.mismatched == 0, report.text()
    f = report.regimes[0].fetches
    assert f is not None and f.agree.all()
    for r in rodata:  # r-x at EL2 through UXN-only execute-never: the MMU ran it
        ran = f.completed_in(r.va, r.end)
        assert ran.size and ran.all(), f"hyp rodata {r.describe()}: fetched {ran.tolist()}"
    faulted = 0
    for r in writable:  # rw-, PXN = 0: execute-never at EL2 only through WXN, and the MMU faults
        inside = (f.addresses >= r.va) & (f.addresses < r.end)
        for esr in f.records["esr"][inside]:
            assert ESR_EC.get(int(esr)) == ExceptionClass.IABT_SAME
            assert ISS_DFSC.get(int(esr)) >> 2 == FaultKind.PERMISSION.value
            faulted += 1
        assert not f.completed_in(r.va, r.end).any()
    assert faulted, "no writable hyp page was fetched from"
    assert any(int(ISS_DFSC.get(int(e))) == fault_status(FaultKind.PERMISSION, 3) for e in f.records["esr"])


def test_attach_leaves_target_running(live_kernel: Callable[..., LiveKernel]) -> None:
    k = live_kernel(mode="nvhe", cpu="max,lpa2=off")
    k.capture()
    with session(parse_target(str(k.gdb_socket))) as sess:
        assert sess.was_running, sess.vm_status  # the first attach resumed it
        pc = sess.gdb.read_registers(["pc"])["pc"]
        # Physical mode was switched back off: a virtual read at the kernel's pc works.
        assert sess.gdb.read_memory(pc & ~3, 4) != b"\0\0\0\0"


_CARVEOUT = re.compile(rb"kvm \[\d+\]: Reserved (\d+) MiB at (0x[0-9a-f]+)")


@pytest.mark.parametrize("cpu", ["max,lpa2=off", "max"])
def test_protected_hyp_memory_not_in_host_stage2(live_kernel: Callable[..., LiveKernel], cpu: str) -> None:
    """pKVM's own memory (the carve-out the kernel reports at boot) is mapped by the hypervisor's
    stage 1 and by nothing in the host's stage 2: the host cannot reach it."""
    k = live_kernel(mode="protected", cpu=cpu)
    m = _CARVEOUT.search(k.serial_log.read_bytes())
    assert m, "no 'kvm [0]: Reserved N MiB at ADDR' line in the serial log"
    lo = int(m[2], 16)
    hi = lo + (int(m[1]) << 20)
    cap = k.capture()
    hyp, host = decode(cap.snapshot, cap.regimes)
    assert host.name == "stage2"
    pieces = sorted((max(r.range.pa, lo), min(r.range.pa + r.range.size, hi)) for r in hyp.ranges
                    if r.range.pa < hi and lo < r.range.pa + r.range.size)
    covered_to = lo
    for a, b in pieces:  # the union of the hyp's mappings of the carve-out (some pages are aliased)
        assert a <= covered_to, f"hyp stage 1 leaves [{covered_to:#x}, {a:#x}) of the carve-out unmapped"
        covered_to = max(covered_to, b)
    assert covered_to == hi, f"hyp stage 1 leaves [{covered_to:#x}, {hi:#x}) of the carve-out unmapped"
    for r in host.ranges:
        assert not (r.range.pa < hi and lo < r.range.pa + r.range.size), f"host stage 2 maps {r.describe()}"
        assert not (r.va < hi and lo < r.end), f"host stage 2 maps {r.describe()}"


def test_cli_attach_socket_save_and_file(live_kernel: Callable[..., LiveKernel], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`harness attach SOCKET --json --save FILE` and `harness attach FILE` decode the same; the
    filters pick the hyp text out of the protected hypervisor's ranges."""
    k = live_kernel(mode="protected", cpu="max")
    saved = tmp_path / "pkvm.json"
    assert main(["attach", str(k.gdb_socket), "--json", "--save", str(saved)]) == 0
    live = json.loads(capsys.readouterr().out)
    assert [r["regime"] for r in live["regimes"]] == ["el2&0", "stage2"]
    assert live["current_el"] in (0, 1, 2)
    assert main(["attach", str(saved), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["regimes"] == live["regimes"] and again["pages"] == live["pages"]
    assert main(["attach", str(saved), "--json", "--regime", "el2&0", "--perm", "x!w"]) == 0
    (hyp,) = json.loads(capsys.readouterr().out)["regimes"]
    assert hyp["ranges"] and all(r["perms"] == "r-x" for r in hyp["ranges"])
    first = hyp["ranges"][0]
    assert main(["attach", str(saved), "--json", "--regime", "el2&0", "--explain", hex(first["va"] + 8)]) == 0
    (ex,) = json.loads(capsys.readouterr().out)["explain"]
    assert ex["ok"] and ex["pa"] == first["pa"] + 8


# -- several CPUs: every vCPU read, the shared hyp stage 1 found once -----------------------------------

@pytest.mark.parametrize("mode", ["nvhe", "protected"])
def test_smp_every_vcpu(live_kernel: Callable[..., LiveKernel], mode: str, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """``-smp 2``: attach reads both vCPUs (gdb threads 1 and 2), finds the hyp stage 1 (and pKVM's
    host stage 2, programmed on each CPU by pKVM's finalisation) once, used by both; the decode
    and ``--verify`` give 0 mismatches; ``--cpu`` reads one vCPU; the target is left as found:
    running, gdb's selected thread unchanged, physical memory mode off."""
    k = live_kernel(mode=mode, cpu="max", smp=2)
    cap = k.capture()
    assert cap.was_running, cap.vm_status
    assert [(v.cpu, v.thread) for v in cap.vcpus] == [(0, "1"), (1, "2")]
    assert sorted(cap.snapshot.cpus) == [0, 1]
    assert [(u.name, u.cpus) for u in cap.uses] == [(name, (0, 1)) for name in EXPECTED_REGIMES[mode]]
    for regs in cap.snapshot.cpus.values():  # both in the host kernel at EL1 after the panic
        assert (regs["cpsr"] >> 2) & 3 == 1, f"cpsr {regs['cpsr']:#x}"
    for rd in decode(cap.snapshot, cap.regimes):
        assert rd.cpus == (0, 1) and rd.ranges, rd.name

    saved = tmp_path / "smp.json"
    assert main(["attach", str(k.gdb_socket), "--json", "--verify", "--save", str(saved)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["regime"], r["cpus"]) for r in out["regimes"]] == [(n, [0, 1]) for n in EXPECTED_REGIMES[mode]]
    assert [(c["cpu"], c["el"], c["regimes"]) for c in out["cpus"]] == [
        (cpu, 1, list(range(len(EXPECTED_REGIMES[mode])))) for cpu in (0, 1)]
    assert out["checked"] > 0 and out["mismatched"] == 0, out["verify"]
    assert [(r["regime"], r["cpus"]) for r in out["verify"]["regimes"]] == [
        (n, [0, 1]) for n in EXPECTED_REGIMES[mode]]
    assert [c["cpu"] for c in json.loads(saved.read_text())["cpus"]] == [0, 1]
    # pKVM's hVHE execute-never findings (test_hvhe_execute_never_finding) concern both vCPUs' regime.
    assert [(f["regime"], f["cpus"]) for f in out["findings"]] == (
        [("el2&0", [0, 1])] * 2 if mode == "protected" else [])

    one = k.capture(cpu=1)
    assert [v.cpu for v in one.vcpus] == [1] and list(one.snapshot.cpus) == [1]
    assert [(u.name, u.cpus, u.regime.root) for u in one.uses] == [(u.name, (1,), u.regime.root) for u in cap.uses]
    assert main(["attach", str(k.gdb_socket), "--cpu", "2"]) == 2
    assert "--cpu: 2 is not a vCPU" in capsys.readouterr().err

    with session(parse_target(str(k.gdb_socket))) as sess:
        assert sess.was_running  # resumed after every attach above
        before = sess.selected_thread
        sess.read_registers(sess.vcpus()[1])
        assert sess.gdb.command("-thread-info")["payload"]["current-thread-id"] == before
        # Physical mode is off again: a kernel virtual address reads the instruction there.
        pc = cap.snapshot.cpus[0]["pc"]
        assert sess.gdb.read_memory(pc & ~3, 4) != bytes(4)


def test_smp_vcpu_never_started(live_kernel: Callable[..., LiveKernel], capsys: pytest.CaptureFixture[str]) -> None:
    """``-smp 2`` with ``maxcpus=1``: Linux leaves CPU 1 off (PSCI), so its EL2 registers are
    QEMU's powered-off ones (SCTLR_EL2 = 0, at EL2): the vCPUs differ, and attach says so: the hyp
    stage 1 is vCPU 0's alone, vCPU 1 has no regime; ``--cpu 1`` decodes nothing and succeeds."""
    k = live_kernel(mode="nvhe", cpu="max", smp=2, append="maxcpus=1")
    cap = k.capture()
    assert [(u.name, u.cpus) for u in cap.uses] == [("el2", (0,))]
    off = cap.snapshot.cpus[1]
    assert off["SCTLR_EL2"] & 1 == 0 and off["HCR_EL2"] & 1 == 0 and (off["cpsr"] >> 2) & 3 == 2
    assert main(["attach", str(k.gdb_socket), "--json", "--cpu", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["regimes"] == [] and [(c["cpu"], c["el"], c["regimes"]) for c in out["cpus"]] == [(1, 2, [])]
    assert main(["attach", str(k.gdb_socket), "--perm", "x"]) == 0
    text = capsys.readouterr().out
    assert "vCPU 1: stopped at EL2" in text and "no regime enabled" in text and "el2 (vCPU 0):" in text
