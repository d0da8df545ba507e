"""``harness boot``: a kernel with the harness's own KVM guest, its gdbstub for ``harness attach``.

The command runs in the background as a user would run it; its one JSON line says where the
gdbstub is and what the VMM reported; ``harness attach`` then finds the guest's stage 2 (a
capture may stop the vCPU in the host: a few tries); SIGTERM ends it and leaves nothing behind
(no QEMU, no socket). Bad input is refused before anything boots, and a CPU that cannot run the
mode asked is said so with exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.live.kernel import KernelImage
from harness.target.process import OWNER_ENV, process_state

pytestmark = pytest.mark.hw

HARNESS = [sys.executable, "-m", "harness.cli"]


def _qemus_of(pid: int) -> list[int]:
    """QEMUs whose environment names ``pid`` as their owner (harness.target.process)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"{OWNER_ENV}={pid}".encode() in env and b"qemu-system" in cmd:
            out.append(int(proc.name))
    return out


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _assert_idle(pid: int) -> None:
    """QEMU is stopped (within 3 s) and burns no CPU time while it is."""
    deadline = time.monotonic() + 3
    while process_state(pid) != "T":
        assert time.monotonic() < deadline, f"QEMU {pid} still {process_state(pid)!r} with no gdb client"
        time.sleep(0.05)
    before = _cpu_ticks(pid)
    time.sleep(0.5)
    assert _cpu_ticks(pid) == before and process_state(pid) == "T"


def test_boot_attach_and_sigterm(kernel_image: KernelImage, tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    proc = subprocess.Popen([*HARNESS, "boot", str(kernel_image.vmlinuz), "--mode", "nvhe", "--guest", "touch",
                             "--gdb", str(sock), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        text = ""
        while not text.rstrip().endswith("}") or text.count("{") != text.count("}"):
            line = proc.stdout.readline()
            assert line, f"harness boot ended: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
            text += line
        info = json.loads(text)
        assert info["gdb"] == str(sock) and sock.is_socket()
        assert info["banner"].endswith("Hyp nVHE mode initialized successfully")
        guest = info["guest"]
        assert guest["pattern"] == "touch" and guest["vms"] == [0] and guest["memslots"] and guest["pages"]
        (qemu,) = _qemus_of(proc.pid)
        _assert_idle(qemu)  # nobody connected: the spinning guest costs no host core
        # --in-guest: captured again until the vCPU is stopped in the guest (it spins there)
        done = subprocess.run([*HARNESS, "attach", str(sock), "--json", "--in-guest", "--vmm", info["serial_log"]],
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr + done.stdout[-2000:]
        out = json.loads(done.stdout)
        check = out["guest_check"]  # the guest's stage 2 against the VMM's account
        assert check["ok"] and check["vms"] == {"0": 1} and check["pages"] > 1000, check
        assert [(c["context"], c["vmid"]) for c in out["cpus"]] == [("guest", 1)]
        _assert_idle(qemu)  # stopped again once attach is done
        guests = [r for r in out["regimes"] if r["regime"] == "stage2"]
        text = subprocess.run([*HARNESS, "attach", str(sock), "--in-guest"], capture_output=True, text=True,
                              timeout=300, check=False).stdout
        assert "; in a guest (VMID 1)" in text.splitlines()[1], text[:400]
        (s2,) = guests
        ipas = {int(p["ipa"], 16) for p in guest["pages"]}
        mapped = [(r["va"], r["va"] + r["size"]) for r in s2["ranges"]]
        assert all(any(lo <= ipa < hi for lo, hi in mapped) for ipa in ipas)
        _assert_idle(qemu)
        # gdb itself through the same socket: a session that detaches (QEMU resumes the VM), then idle again
        gdb = subprocess.run(["gdb-multiarch", "-nx", "-batch", "-ex", "set architecture aarch64",
                              "-ex", f"target remote {sock}", "-ex", "info registers pc", "-ex", "detach"],
                             capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
        assert gdb.returncode == 0 and "pc " in gdb.stdout, gdb.stderr + gdb.stdout
        _assert_idle(qemu)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 128 + signal.SIGTERM, proc.stderr.read() if proc.stderr else ""
    assert not sock.exists()
    deadline = time.monotonic() + 5
    while _qemus_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _qemus_of(proc.pid)


@pytest.mark.parametrize(("args", "needle"), [
    (["--gdb", "{tmp}/no/such/dir/k.sock"], "--gdb: directory"),
    (["--gdb", "{tmp}"], "--gdb: "),
    (["--gdb", "{tmp}/k.sock", "--guest", "two-vms"], "--guest two-vms: runs two vCPUs at once"),
    (["--gdb", "{tmp}/k.sock", "--smp", "99"], "--smp: expected 1 to"),
    (["/nonexistent/vmlinuz", "--gdb", "{tmp}/k.sock"], "KERNEL"),
    (["--gdb", "{tmp}/k.sock", "--guest", "nope"], "--guest"),
])
def test_boot_bad_input_exit_2(kernel_image: KernelImage, tmp_path: Path, args: list[str], needle: str) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    t0 = time.monotonic()
    done = subprocess.run([*HARNESS, "boot", *argv], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "HARNESS_KERNEL": str(kernel_image.vmlinuz)})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness boot: error: ") and needle in lines[0], lines
    assert time.monotonic() - t0 < 20  # refused before anything booted


def test_boot_mode_the_cpu_cannot_run(kernel_image: KernelImage, tmp_path: Path) -> None:
    """VHE needs FEAT_VHE, which cortex-a57 lacks: the kernel comes up in nVHE, and boot says so."""
    done = subprocess.run([*HARNESS, "boot", str(kernel_image.vmlinuz), "--mode", "vhe", "--cpu", "cortex-a57",
                           "--gdb", str(tmp_path / "k.sock")], capture_output=True, text=True, timeout=300,
                          check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "--mode vhe: the kernel came up as 'Hyp nVHE mode initialized successfully'" in line, line
    assert "on -cpu cortex-a57: that CPU cannot run vhe" in line
    assert not (tmp_path / "k.sock").exists()


def test_live_kernel_fixture_with_a_guest(live_kernel: Any) -> None:
    """``live_kernel(guest=...)``: the kernel runs the VMM's guest; its report comes along, and the
    capture (retried: the vCPU may be in the host) passes the guest check."""
    from harness.check.attach import decode
    from harness.check.guest import check_guest

    k = live_kernel(mode="vhe", guest="dirty-log")
    assert k.vmm is not None and k.vmm.ready is not None and k.vmm.ready.pattern == "dirty-log"
    for _ in range(8):
        cap = k.capture()
        res = check_guest(k.vmm, decode(cap.snapshot, cap.regimes))
        if "missing-vm" not in res.by_kind:
            break
    assert res.ok, res.text()
