"""Live targets: a running system's translation state, read without changing it.

* :mod:`harness.live.gdbstub` - connect to a QEMU gdbstub, read the EL2 control registers and every
  reachable table page (physical reads), leave the target as found; :func:`~harness.live.gdbstub.capture`.
* :mod:`harness.live.snapshot` - the captured state as a :class:`~harness.live.snapshot.Snapshot`
  (registers + pages), its versioned JSON file format, and table memory over it.
* :mod:`harness.live.regimes` - live registers to regimes, through the model's
  :func:`harness.arch.regimes.regimes_from_registers`.
* :mod:`harness.live.kernel` - boot a real kernel (Debian's arm64 6.12, ``ci/kernel.sh``) under QEMU
  until its KVM hypervisor is up.

Deciding (decode, replay on the MMU) is :mod:`harness.check.attach`; the command is ``harness attach``.
"""
