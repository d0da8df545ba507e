"""gdb's ``pgt`` commands against Debian's 6.12 under QEMU, compared with ``harness attach``.

Each configuration (nVHE and protected, with and without LPA2) boots once per session. gdb-multiarch
runs in batch mode with the file ``harness gdb-script`` prints, connects to the kernel's gdbstub,
runs every ``pgt`` command and then disconnects without detaching, so the VM stays stopped exactly
where gdb saw it. ``harness attach`` then reads the same stopped target and must print the same
thing: JSON (less timings), text, walks, the saved snapshot. Finally the target is resumed and
``harness attach`` must find it running and decodable again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pexpect
import pytest

from harness.cli import main
from harness.gdb import script_path
from harness.live.snapshot import Snapshot
from harness.pytestplugin.kernel import LiveKernel

pytestmark = pytest.mark.hw

CONFIGS = [pytest.param(m, c, id=f"{m}-{c.replace(',', '-').replace('=', '')}")
           for m in ("nvhe", "protected") for c in ("max,lpa2=off", "max")]
GDB = os.environ.get("HARNESS_GDB", "gdb-multiarch")
# What gdb prints on connecting to a target with no executable loaded: not an error of ours.
_GDB_NOISE = re.compile(r"^(warning: No executable has been specified|determining executable automatically|"
                        r"0x[0-9a-f]+ in \?\? \(\))")


def gdb_batch(socket: Path, commands: Sequence[str], leave: str = "disconnect", timeout: float = 120.0,
              source: bool = True) -> subprocess.CompletedProcess[str]:
    """gdb-multiarch -batch: (source the pgt script,) connect, run ``commands``, then ``leave``
    (``disconnect``: the VM stays stopped; ``detach``: QEMU resumes it)."""
    argv = [GDB, "-batch", "-nx"]
    if source:
        argv += ["-ex", f"source {script_path()}"]
    argv += ["-ex", f"target remote {socket}"]
    for c in [*commands, leave]:
        argv += ["-ex", c]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def errors(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip() and not _GDB_NOISE.match(line)]


def attach(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["attach", *argv])
    return code, capsys.readouterr().out


def _resume(socket: Path) -> None:
    done = gdb_batch(socket, [], leave="detach", source=False)
    assert done.returncode == 0, done.stderr


def _no_timings(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "timings"}


def pgt_then_attach(socket: Path, commands: Sequence[str], capsys: pytest.CaptureFixture[str],
                    *attach_args: str) -> tuple[str, str]:
    """gdb runs ``commands`` and disconnects, leaving the VM stopped where it saw it; then
    ``harness attach`` reads that same stopped state (and resumes the VM: QEMU reports "paused"
    either way, so attach takes it for a VM that its own connection stopped)."""
    done = gdb_batch(socket, commands)
    assert done.returncode == 0 and not errors(done), done.stderr
    code, out = attach(capsys, str(socket), *attach_args)
    assert code == 0, out
    return done.stdout, out


@pytest.mark.parametrize(("mode", "cpu"), CONFIGS)
def test_pgt_equals_attach(live_kernel: Callable[..., LiveKernel], mode: str, cpu: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """Each pgt command against attach on the same stopped state: JSON (less timings) and text equal."""
    k = live_kernel(mode=mode, cpu=cpu)
    sock, t = k.gdb_socket, tmp_path
    # A first look to choose addresses for the filters and the walks.
    code, out = attach(capsys, str(sock), "--json")
    assert code == 0
    first = json.loads(out)["regimes"][0]
    mapped = first["ranges"][len(first["ranges"]) // 2]
    addr = mapped["va"] + 0x18
    window = f"{mapped['va']:#x}-{mapped['va'] + mapped['size']:#x}"
    try:
        gdb_out, a_json = pgt_then_attach(sock, [
            f"pgt ranges --json --output {t}/ranges.json",
            "pgt regimes --cpu all --json",
            f"pgt explain {addr:#x}",
            f"pgt explain {addr:#x} --json",
            f"pgt save {t}/snap.json",
        ], capsys, "--json", "--explain", hex(addr))
        _, a_text = pgt_then_attach(sock, [f"pgt ranges --output {t}/ranges.txt"], capsys)
        _, a_filtered = pgt_then_attach(
            sock, [f"pgt ranges --perm x!w --range {window} --json --output {t}/filtered.json"], capsys,
            "--json", "--perm", "x!w", "--range", window)
        _, a_regime = pgt_then_attach(sock, [f"pgt ranges --regime {first['regime']} --output {t}/regime.txt"],
                                      capsys, "--regime", first["regime"])
    finally:
        _resume(sock)
    a = json.loads(a_json)
    pgt = json.loads((t / "ranges.json").read_text())
    assert _no_timings(pgt) == {kk: v for kk, v in _no_timings(a).items() if kk != "explain"}
    assert (t / "ranges.txt").read_text() == a_text
    assert _no_timings(json.loads((t / "filtered.json").read_text())) == _no_timings(json.loads(a_filtered))
    assert (t / "regime.txt").read_text() == a_regime
    # pgt regimes: the registers and geometry of every regime, no ranges.
    regimes_json = json.loads(gdb_out[gdb_out.index("{"):gdb_out.index("\n}\n") + 2])
    assert regimes_json["regimes"] == [{kk: v for kk, v in r.items() if kk != "ranges"} for r in a["regimes"]]
    assert regimes_json["cpus"] == a["cpus"]
    # pgt explain: attach --explain's walk lines, and its JSON entries.
    for item in a["explain"]:
        assert f"{item['regime']} (vCPU 0): {item['walk']}" in gdb_out
    assert json.dumps(a["explain"], indent=2) in gdb_out
    # pgt save: the same snapshot attach decodes from a file, with the same answer.
    code, from_file = attach(capsys, str(t / "snap.json"), "--json")
    assert code == 0
    assert _no_timings(json.loads(from_file))["regimes"] == a["regimes"]
    assert Snapshot.load(t / "snap.json").cpus == {c["cpu"]: {kk: int(v, 16) for kk, v in c["registers"].items()}
                                                    for c in a["cpus"]}
    # Left as found: resumed, and harness attach works on it again.
    cap = k.capture()
    assert cap.was_running, cap.vm_status
    assert [r.name for r in cap.regimes] == [r["regime"] for r in a["regimes"]]


@pytest.mark.parametrize("cpu", ["max,lpa2=off", "max"])
def test_pgt_decodes_what_other_tools_get_wrong(live_kernel: Callable[..., LiveKernel], cpu: str,
                                                tmp_path: Path) -> None:
    """PARange says 52 bits on both CPUs; only ``-cpu max`` has DS = 1. gef takes the LPA2 layout
    from PARange and reads the SH bits of DS = 0 descriptors as PA[51:50]: pgt's output addresses
    stay in the 48-bit space there. The host stage 2 of protected mode starts at level 0 with 16
    concatenated PGD pages on -cpu max (a gdb-pt-dump-free regime: EL2 and stage 2)."""
    k = live_kernel(mode="protected", cpu=cpu)
    try:
        done = gdb_batch(k.gdb_socket, [f"pgt ranges --json --output {tmp_path}/r.json"])
    finally:
        _resume(k.gdb_socket)
    assert done.returncode == 0 and not errors(done), done.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    mmfr0 = int(out["cpus"][0]["registers"]["ID_AA64MMFR0_EL1"], 16)
    assert mmfr0 & 0xF == 6  # PARange: 52 bits
    by_name = {r["regime"]: r for r in out["regimes"]}
    lpa2 = cpu == "max"
    for r in by_name.values():
        assert r["decoded"]["lpa2"] is lpa2
        top = max(x["pa"] + x["size"] for x in r["ranges"])
        assert top <= 1 << 40, f"{r['regime']}: an output address beyond 2**40 ({top:#x}): SH read as PA bits?"
    s2 = by_name["stage2"]["decoded"]
    assert (s2["ia_bits"], s2["start_level"], s2["pgd_pages"]) == ((52, 0, 16) if lpa2 else (48, 0, 1))


def test_pgt_ctrl_c_leaves_gdb_as_found(live_kernel: Callable[..., LiveKernel], tmp_path: Path) -> None:
    """Ctrl-C while ``pgt`` commands run in a loop: gdb prints one error line, no traceback; memory reads
    are virtual again (QEMU's own answer to qqemu.PhyMemMode), thread 2 and frame 0 still selected,
    and the next ``pgt`` command works."""
    k = live_kernel(mode="nvhe", cpu="max", smp=2)
    child = pexpect.spawn(GDB, ["-nx", "-q", "-ex", "set pagination off", "-ex", "set confirm off",
                                "-ex", f"source {script_path()}", "-ex", f"target remote {k.gdb_socket}",
                                "-ex", "thread 2"], encoding="utf-8", timeout=60, dimensions=(50, 300))
    try:
        child.sendline("echo sync-\\n")
        child.expect(r"sync-\r?\n")
        for delay in (0.2, 0.9, 1.7):  # into the first command, and later ones
            child.sendline("while 1\npgt ranges --output /dev/null\nend")
            time.sleep(delay)
            child.sendintr()
            child.expect(r"pgt ranges: interrupted \(gdb's thread, frame and memory reads as they were\)")
            assert "Traceback" not in child.before, child.before
            child.expect(r"\(gdb\) ")
            child.sendline("maint packet qqemu.PhyMemMode")
            child.expect(r'received: "(\d)"')
            assert child.match.group(1) == "0", delay
            child.sendline("thread")
            child.expect(r"Current thread is (\d+)")
            assert child.match.group(1) == "2", delay
        child.sendline(f"pgt ranges --json --output {tmp_path}/after.json")
        child.expect(r"\(gdb\) ")
        child.sendline("pgt ranges --cpu 7")
        child.expect(r"pgt ranges: --cpu: 7 is not a vCPU of unix:\S+ \(its vCPUs: 0, 1\)")
        child.sendline("detach")
        child.expect(r"\(gdb\) ")
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert json.loads((tmp_path / "after.json").read_text())["regimes"]
    cap = k.capture()
    assert cap.was_running, cap.vm_status


def test_pgt_errors_are_one_gdb_line(live_kernel: Callable[..., LiveKernel]) -> None:
    k = live_kernel(mode="nvhe", cpu="max")
    bad = {
        "pgt ranges --cpu x": r"^pgt ranges: --cpu: expected a vCPU index",
        "pgt ranges --range 0x2000-0x1000": r"^pgt ranges: --range: END must be above START",
        "pgt ranges --perm q": r"^pgt ranges: --perm: expected letters r, w, x",
        "pgt ranges --output /nonexistent/dir/x": r"^pgt ranges: --output: ",
        "pgt ranges --bogus": r"^pgt ranges: unrecognized arguments: --bogus \(help pgt ranges\)",
        "pgt explain no_such_symbol_here": r"^pgt explain: ADDR: expected an address or a gdb expression",
        "pgt regimes --regime el2": r"^pgt regimes: unrecognized arguments",
        "pgt bogus": r"^pgt: unknown subcommand 'bogus'",
    }
    try:
        for command, pattern in bad.items():
            done = gdb_batch(k.gdb_socket, [command], leave="detach")
            lines = errors(done)
            assert len(lines) == 1 and re.search(pattern, lines[0]), (command, done.stderr)
            assert "Traceback" not in done.stderr + done.stdout
    finally:
        _resume(k.gdb_socket)
    # Not connected: the commands say so, before anything else.
    done = subprocess.run([GDB, "-batch", "-nx", "-ex", f"source {script_path()}", "-ex", "pgt ranges"],
                          capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert errors(done) == ["pgt ranges: gdb is not connected to a target (connect first: target remote HOST:PORT)"]


def test_pgt_verify_from_gdb(live_kernel: Callable[..., LiveKernel]) -> None:
    """``pgt verify``: the snapshot replayed on the harness's own QEMU (not the one gdb is on), every
    range and hole checked with AT: 0 mismatches, streamed into gdb's console."""
    k = live_kernel(mode="nvhe", cpu="max,lpa2=off")
    try:
        done = gdb_batch(k.gdb_socket, ["pgt verify --json"], leave="detach", timeout=300)
    finally:
        _resume(k.gdb_socket)
    assert done.returncode == 0 and not errors(done), done.stderr
    out = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert out["mismatched"] == 0 and out["checked"] > 0, out["verify"]


def test_gdb_script_command(capsys: pytest.CaptureFixture[str]) -> None:
    """``harness gdb-script`` prints the file to source; ``--check`` loads it in gdb-multiarch."""
    assert main(["gdb-script"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == script_path() and path.is_file()
    assert main(["gdb-script", "--check", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["script"] == str(path) and info["help"].startswith("Decode the stopped target's translation tables")
    # The README's two-line setup works from a shell too.
    shell = f"{GDB} -batch -nx -ex {shlex.quote('source ' + str(path))} -ex 'help pgt ranges'"
    done = subprocess.run(shell, shell=True, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "usage: pgt ranges" in done.stdout, done.stderr
