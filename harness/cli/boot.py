"""`harness boot [KERNEL]`: a real kernel with a real KVM guest, for `harness attach` and gdb's `pgt`.

    harness boot --mode vhe --guest dirty-log --gdb /tmp/k.sock --json &
    harness attach /tmp/k.sock

Boots KERNEL (a vmlinuz, or a directory with boot/vmlinuz-*; default: Debian's arm64 6.12 that
ci/kernel.sh unpacks into .cache/kernel) under qemu-system-aarch64 -M virt,virtualization=on with
the harness's own VMM as /init (an initramfs the harness writes: harness.live.initramfs). The VMM
creates a VM, memslots and a vCPU, and runs the guest pattern (--guest): touch, dirty-log,
memslot or two-vms (harness.live.vmm). Once the guest runs, one line is printed (--json: {"gdb":
SOCKET, "guest": {what the VMM reported}, ...}), and the kernel keeps running, its gdbstub reached
through SOCKET, until SIGTERM or Ctrl-C; then QEMU is killed and SOCKET removed.

An idle kernel burns no host core: QEMU is stopped (SIGSTOP) while no gdb client is connected to
SOCKET, and continued while one is (harness.live.gate: the harness listens on SOCKET and relays
each client to QEMU's own gdbstub). Its guest's clocks stand still with it.

--mode: vhe (the kernel at EL2, no kvm-arm.mode), nvhe or protected (kvm-arm.mode=).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.cli.args import add_json_arg, check_log_dir, check_output_file, integer, positive_seconds
from harness.cli.output import print_json
from harness.errors import EXIT_OK, InputError, MachineryError
from harness.live.gate import IdleGate
from harness.live.kernel import BANNER, EXPECTED_BANNER, MAX_SMP, MODES, KernelBoot, KernelImage, NoKvm, last_lines
from harness.live.vmm import PATTERNS, VmmFailed, VmmReport, start_vmm
from harness.target.errors import TargetError

NAME = "boot"


class BootFailed(MachineryError):
    """The kernel did not come up as asked (the message has the console's last lines and the logs)."""


class WrongMode(InputError):
    """The kernel came up in another KVM mode than --mode asked: the CPU cannot run that one."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="boot a kernel with a KVM guest of the harness's own VMM, for attach",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_json_arg(p)
    p.add_argument("kernel", metavar="KERNEL", nargs="?", help="a vmlinuz or a directory with boot/vmlinuz-* "
                   "(default: HARNESS_KERNEL, else .cache/kernel from ci/kernel.sh)")
    p.add_argument("--mode", choices=MODES, default="vhe", help="KVM's mode (default vhe)")
    p.add_argument("--cpu", default="max", help="QEMU -cpu (default max; e.g. max,lpa2=off)")
    p.add_argument("--smp", type=integer, default=1, help=f"vCPUs of the host, 1-{MAX_SMP} (two-vms wants 2)")
    p.add_argument("--guest", choices=PATTERNS, default="touch", help="the guest's pattern (default touch)")
    p.add_argument("--gdb", metavar="SOCKET", required=True, help="unix socket path for QEMU's gdbstub "
                   "(must not exist; removed at the end)")
    p.add_argument("--timeout", type=positive_seconds, default=180.0,
                   help="seconds allowed from boot to the guest running (default 180)")
    p.add_argument("--log-dir", help="keep the serial console and QEMU's logs here")


def _check_socket(path: str) -> Path:
    check_output_file(path, "--gdb")  # named, not a directory, in a directory a file can be made in
    sock = Path(path).absolute()
    try:
        mode = sock.lstat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        what = "a socket (another QEMU's?)" if stat.S_ISSOCK(mode) else "a file"
        raise InputError(f"--gdb: {sock} exists and is {what}; expected a new path")
    if len(str(sock).encode()) > 107:  # sockaddr_un.sun_path
        raise InputError(f"--gdb: {sock} is longer than a unix socket path may be (107 bytes)")
    return sock


def _image(text: str | None) -> KernelImage:
    return KernelImage.find(text or os.environ.get("HARNESS_KERNEL") or None, what="KERNEL")


def report_json(report: VmmReport) -> dict[str, Any]:
    """What the VMM reported, for the one line (every record but the bookkeeping ones, by kind)."""
    def rows(items: list[Any]) -> list[dict[str, Any]]:
        return [{k: (f"{v:#x}" if isinstance(v, int) and k in ("ipa", "uaddr", "pfn", "size", "data") else v)
                 for k, v in dataclasses.asdict(item).items()} for item in items]

    ready = report.ready
    return {
        "pattern": ready.pattern if ready else None, "vms": report.vms,
        "memslots": rows(sorted(report.memslots().values(), key=lambda m: (m.vm, m.slot))),
        "pages": rows(report.pages), "dirty": rows(report.dirty), "mmio": rows(report.mmio),
        "phases": {str(vm): report.phases(vm) for vm in report.vms},
    }


def run(args: argparse.Namespace) -> int:
    if isinstance(args.smp, bool) or not 1 <= args.smp <= MAX_SMP:
        raise InputError(f"--smp: expected 1 to {MAX_SMP} CPUs, got {args.smp}")
    if args.guest == "two-vms" and args.smp < 2:
        raise InputError("--guest two-vms: runs two vCPUs at once: give --smp 2 or more")
    sock = _check_socket(args.gdb)
    check_log_dir(args.log_dir)
    image = _image(args.kernel)
    keep = args.log_dir is not None
    logs = Path(args.log_dir) if keep else Path(tempfile.mkdtemp(prefix="pgtable-harness-boot-"))
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        boot, report = start_vmm(image, guest=args.guest, mode=args.mode, cpu=args.cpu, smp=args.smp,
                                 log_dir=logs, timeout=args.timeout)
    except (TargetError, VmmFailed, NoKvm) as exc:
        last = last_lines(logs / "serial.log")
        banner = BANNER.search((logs / "serial.log").read_bytes()) if (logs / "serial.log").exists() else None
        if banner is not None:
            _check_mode(banner.group(0).decode(), args.mode, args.cpu, logs)
        if isinstance(exc, NoKvm):
            raise NoKvm(f"{exc} (logs: {logs})") from exc
        raise BootFailed(f"{image.vmlinuz.name} did not run the guest: {_first_line(exc)}; console's last lines: "
                         f"{last} (logs: {logs})") from exc
    gate: IdleGate | None = None
    try:
        _check_mode(boot.banner, args.mode, args.cpu, boot.log_dir)
        assert boot.pid is not None
        gate = IdleGate(sock, boot.gdb_socket, boot.pid).start()
        _serve(args, boot, report, image, gate, t0)
    except (WrongMode, BootFailed):
        keep = True  # named in the message
        raise
    finally:
        if gate is not None:
            gate.close()
        boot.close()
        if not keep:
            shutil.rmtree(logs, ignore_errors=True)
    return EXIT_OK


def _serve(args: argparse.Namespace, boot: KernelBoot, report: VmmReport, image: KernelImage, gate: IdleGate,
           t0: float) -> None:
    """Say the guest runs, then keep the kernel until a signal ends the harness."""
    sock = gate.listen
    line = {"gdb": str(sock), "idle": "QEMU stopped while no gdb client is connected", "mode": args.mode,
            "cpu": args.cpu, "smp": args.smp, "banner": boot.banner,
            "kernel": str(image.vmlinuz), "serial_log": str(boot.serial_log),
            "qemu_pid": boot.pid, "seconds": round(time.perf_counter() - t0, 2), "guest": report_json(report)}
    if args.json:
        print_json(line)
        sys.stdout.flush()  # a caller reads this line while the kernel runs
    else:
        ready = report.ready
        print(f"harness boot: {image.vmlinuz.name} up ({boot.banner.split(': ', 1)[-1]}), guest "
              f"{ready.pattern if ready else '?'} running in {len(report.vms)} VM(s); gdbstub on {sock}; "
              f"console {boot.serial_log}; QEMU stopped until a gdb client connects; SIGTERM or Ctrl-C "
              "ends it", flush=True)
    _wait(boot, gate)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_mode(banner: str, mode: str, cpu: str, logs: Path) -> None:
    came = banner.split(": ", 1)[-1]
    if not came.startswith(EXPECTED_BANNER[mode] + " mode"):
        raise WrongMode(f"--mode {mode}: the kernel came up as {came!r} on -cpu {cpu}: that CPU cannot run "
                        f"{mode} (logs: {logs})")


def _wait(boot: KernelBoot, gate: IdleGate) -> None:
    """Until a signal ends the harness (the CLI's handlers unwind through here), QEMU exits or the
    gdb socket's relay fails."""
    while True:
        code = boot.poll()
        if code is not None:
            raise BootFailed(f"QEMU exited with status {code} while the guest ran (console: {boot.serial_log})\n"
                             f"{boot.console_tail(1500)}")
        if not gate.alive:
            raise BootFailed(f"the relay of {gate.listen} to QEMU's gdbstub failed: {gate.error!r} "
                             f"(console: {boot.serial_log})")
        time.sleep(0.2)
