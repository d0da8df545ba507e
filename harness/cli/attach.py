"""``harness attach TARGET``: decode a live target's translation tables, and verify them on the MMU.

TARGET is a QEMU gdbstub (``HOST:PORT`` or a unix socket path) or a snapshot file written by
``--save``. The target is stopped while its registers and table pages are read, and left as it
was found (resumed if it was running; nothing is written).

Every vCPU's registers are read (each has its own HCR_EL2, VTTBR_EL2, ...): a regime that several
vCPUs use (the same tables under the same controls) is shown once, with its vCPUs; --cpu N
reads and shows vCPU N alone.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from harness.arch.regimes import guest_vmid
from harness.check import attach as att
from harness.check.guest import GuestCheck, check_guest
from harness.cli import attach_view as av
from harness.cli.args import check_output_file, count, non_negative_int, positive_seconds, start_target
from harness.cli.output import print_json
from harness.errors import EXIT_MISMATCH, EXIT_OK, InputError, MachineryError
from harness.live.capture import Capture
from harness.live.gdbstub import TargetSpec, capture, parse_target
from harness.live.regimes import Regime
from harness.live.snapshot import Snapshot
from harness.live.vmm import VmmReport, read_report
from harness.target.layout import Layout
from harness.target.target import Target

REGIME_NAMES = av.REGIME_NAMES
MAX_SAMPLES = 100_000  # --verify probes (samples + edges) per range and hole: beyond this, memory not time
SAMPLES_REASON = "each range and hole of every regime is probed in one batch"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("attach", help="decode (and --verify) a live target's tables through its gdbstub",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="TARGET", help="gdbstub HOST:PORT or unix socket path, or a snapshot FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cpu", metavar="N", help="only vCPU N (QEMU's CPU index: gdb thread N+1)")
    p.add_argument("--regime", action="append", choices=REGIME_NAMES, help="only these regimes (repeatable)")
    p.add_argument("--range", dest="window", metavar="START:END", help="only ranges overlapping this input "
                   "range (clipped to it); START-END and START+SIZE also accepted")
    p.add_argument("--perm", metavar="SPEC", help="only ranges with these permissions, e.g. x, rw, 'x!w' "
                   "(executable and not writable)")
    p.add_argument("--all-ranges", action="store_true", help="also EL1&0's ranges (TTBR0/1_EL1) when the "
                   "vCPU's EL1 MMU is on: an nVHE host kernel's own tables, a guest's stage 1")
    p.add_argument("--in-guest", action="store_true", help="capture again (up to 8 times) until a vCPU is "
                   "stopped in a guest (HCR_EL2.VM = 1, VMID != 0): a running guest's vCPU is sometimes in the host")
    p.add_argument("--vmm", metavar="LOG", help="hold the guest's stage 2 to the account of the harness's VMM "
                   "in this console log (harness boot's serial_log): exit 1 where they disagree")
    p.add_argument("--explain", metavar="ADDR", help="the walk of this input address in every regime")
    p.add_argument("--save", metavar="FILE", help="write the snapshot (registers + table pages, JSON) here")
    p.add_argument("--verify", action="store_true", help="replay the tables on the harness's QEMU and check "
                   "every range and hole with AT against the model (exit 1 on a mismatch)")
    p.add_argument("--timeout", type=positive_seconds, default=60.0,
                   help="seconds for gdb's start, each gdb command and the replay target (default 60)")
    p.add_argument("--samples", type=count(0, MAX_SAMPLES, SAMPLES_REASON, "addresses per range and hole"), default=3,
                   help="--verify: addresses sampled inside each range/hole (default 3)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="--verify: seed for the samples (default 0)")
    p.add_argument("--log-dir", help="--verify: keep the replay target's logs here")


def run(args: argparse.Namespace) -> int:
    filters, cpu = _check_args(args)
    vmm_report = read_report(args.vmm) if args.vmm else None
    snap, regimes, timings = _snapshot(args, cpu)
    if args.save:
        _save(snap, args.save)
    v = av.view(snap, regimes, filters, timings)
    guest = _guest_check(vmm_report, v)
    report = _verify(args, v) if args.verify else None
    _print(args, v, filters, guest, report)
    return EXIT_OK if (report is None or report.ok) and (guest is None or guest.ok) else EXIT_MISMATCH


def _snapshot(args: argparse.Namespace, cpu: int | None) -> tuple[Snapshot, list[Regime], dict[str, float]]:
    """The snapshot TARGET names (a file read, or a live target captured), its regimes and the
    capture's timings."""
    spec = parse_target(args.target)
    if spec.kind == "file":
        snap = Snapshot.load(spec.where)
        if cpu is not None:
            snap = snap.only_cpu(cpu)
        return snap, snap.regimes(), {}
    cap = _capture(spec, args, cpu)
    return cap.snapshot, cap.regimes, dict(cap.timings)


def _guest_check(vmm_report: VmmReport | None, v: av.View) -> GuestCheck | None:
    """--vmm: the guest's stage 2 held to the VMM's account (into ``v.out``)."""
    if vmm_report is None:
        return None
    guest = check_guest(vmm_report, v.decoded)
    v.out["guest_check"] = guest.to_json()
    return guest


def _print(args: argparse.Namespace, v: av.View, filters: av.Filters, guest: GuestCheck | None,
           report: att.VerifyReport | None) -> None:
    if args.json:
        print_json(v.out)
        return
    print(av.text(v, filters, args.target, args.save))
    for part in (guest, report):
        if part is not None:
            print("\n" + part.text())


def _check_args(args: argparse.Namespace) -> tuple[av.Filters, int | None]:
    """Every option checked before anything connects or boots."""
    check_output_file(args.save, "--save")  # --log-dir: by harness.cli.app; --timeout, --samples, --seed: their types
    filters = av.Filters(av.parse_regimes(args.regime),
                         att.parse_window(args.window) if args.window else None,
                         att.PermFilter.parse(args.perm) if args.perm else None,
                         av.parse_address(args.explain) if args.explain else None)
    return filters, av.parse_cpu(args.cpu) if args.cpu is not None else None


GUEST_TRIES = 8


class NoGuest(MachineryError):
    """--in-guest: no capture found a vCPU in a guest."""


def _capture(spec: TargetSpec, args: argparse.Namespace, cpu: int | None) -> Capture:
    """One capture, or with --in-guest the first of up to GUEST_TRIES with a vCPU in a guest (the
    target runs between tries)."""
    seen = []
    for _ in range(GUEST_TRIES if args.in_guest else 1):
        cap = capture(spec, timeout=args.timeout, cpu=cpu, all_ranges=args.all_ranges)
        if not args.in_guest or any(guest_vmid(regs) is not None for regs in cap.snapshot.cpus.values()):
            return cap
        seen.append(",".join(f"EL{av.current_el(r)}" for r in cap.snapshot.cpus.values()))
        time.sleep(0.05)
    raise NoGuest(f"--in-guest: no vCPU of {spec} was stopped in a guest in {GUEST_TRIES} captures (stopped at: "
                  f"{'; '.join(seen)}): is a guest running?")


def _save(snap: Snapshot, path: str) -> None:
    try:
        snap.save(path)
    except OSError as exc:
        raise InputError(f"--save: cannot write {path}: {exc.strerror}") from None


def _verify(args: argparse.Namespace, v: av.View) -> att.VerifyReport:
    """Replay the shown regimes on the harness's QEMU; the report goes into ``v.out``."""
    def start(layout: Layout) -> Target:
        return start_target(args, layout)

    report = att.verify(v.snapshot, start, samples=args.samples, seed=args.seed,
                        regimes=[rd.regime for rd in v.decoded])
    js = report.to_json()
    if len(js["regimes"]) == len(v.decoded):  # verify goes regime by regime, in order
        for entry, rd in zip(js["regimes"], v.decoded, strict=True):
            entry["cpus"] = list(rd.cpus)
    timings = v.out.pop("timings")
    v.out.update(verify=js, checked=report.checked, mismatched=report.mismatched, timings=timings)
    return report
