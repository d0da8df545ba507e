"""A real hypervisor's tables: Debian's arm64 6.12 kernel under QEMU, attached, decoded, verified.

Four configurations: ``kvm-arm.mode=nvhe`` and ``kvm-arm.mode=protected`` on ``-cpu max`` and
``-cpu max,lpa2=off``. Each boots once per session (the ``live_kernel`` fixture, about 2 s), is
captured through its gdbstub, and must (1) decode into the regimes the kernel uses (hyp stage 1;
protected mode adds the host's stage 2), (2) verify on the payload's MMU with 0 mismatches, and
(3) agree with the kernel itself: the hyp text named by the package's System.map is mapped, only
read-only and executable, nothing is writable and executable (SCTLR_EL2.WXN counted), and in nVHE
nothing else is executable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.check.attach import decode, verify
from harness.cli import main
from harness.core.translate import PERM_W, PERM_X
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


@pytest.mark.parametrize(("mode", "cpu"), CONFIGS)
def test_hyp_text_read_only_executable(live_kernel: Callable[..., LiveKernel], mode: str, cpu: str) -> None:
    """The decode against the kernel's own System.map: hyp text r-x, hyp rodata r--, W^X."""
    k = live_kernel(mode=mode, cpu=cpu)
    with session(parse_target(str(k.gdb_socket))) as sess:
        base = find_image_pa(sess.read_physical, k.image)
    assert base is not None, "the kernel Image's header is not in RAM at any 2 MiB boundary"
    text = [(base + lo, base + hi) for lo, hi in (k.image.section(*HYP_TEXT), k.image.section(*HYP_IDMAP_TEXT))]
    rodata_lo, rodata_hi = (base + x for x in k.image.section(*HYP_RODATA))
    cap = k.capture()
    hyp = decode(cap.snapshot, cap.regimes)[0]
    assert hyp.regime.geom.stage == 1

    def pa_overlap(r_pa: int, size: int, lo: int, hi: int) -> bool:
        return r_pa < hi and lo < r_pa + size

    covered = 0
    for r in hyp.ranges:
        m = r.range
        in_text = any(pa_overlap(m.pa, m.size, lo, hi) for lo, hi in text)
        if in_text:
            assert r.perms & PERM_X and not r.perms & PERM_W, f"hyp text mapped {r.describe()}"
            covered += sum(max(0, min(m.pa + m.size, hi) - max(m.pa, lo)) for lo, hi in text)
        assert not (r.perms & PERM_X and r.perms & PERM_W), f"writable and executable: {r.describe()}"
        if pa_overlap(m.pa, m.size, rodata_lo, rodata_hi):
            assert not r.perms & PERM_W, f"hyp rodata mapped writable: {r.describe()}"
        if r.perms & PERM_X and not in_text:
            # nVHE: only the hyp text is executable. hVHE (EL2&0 regime): Linux 6.12 marks hyp
            # mappings execute-never with bit 54 alone, which is UXN there; PXN (bit 53) stays 0,
            # so read-only data (hyp rodata, ro_after_init) is executable at EL2.
            assert hyp.name == "el2&0", f"executable hyp mapping outside the hyp text: {r.describe()}"
    # Every byte of the hyp text (page-rounded) is mapped, once through its hyp VA at least.
    text_lo, text_hi = text[0]
    assert covered >= text_hi - text_lo


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
