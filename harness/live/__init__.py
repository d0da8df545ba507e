"""Live targets: a running system's translation state, read without changing it.

* :mod:`harness.live.gdbstub` - connect to a QEMU gdbstub, read every vCPU's EL2 control registers
  (each vCPU is a gdb thread) and every reachable table page (physical reads), leave the target as
  found; :func:`~harness.live.gdbstub.capture`.
* :mod:`harness.live.snapshot` - the captured state as a :class:`~harness.live.snapshot.Snapshot`
  (registers per CPU + pages), its versioned JSON file format, and table memory over it.
* :mod:`harness.live.regimes` - live registers to regimes, through the model's
  :func:`harness.arch.regimes.regimes_from_registers`; the same regime on several CPUs merged
  (:func:`~harness.live.regimes.regimes_by_cpu`).
* :mod:`harness.live.kernel` - boot a real kernel (Debian's arm64 6.12, ``ci/kernel.sh``) under QEMU
  until its KVM hypervisor is up.

Deciding (decode, replay on the MMU) is :mod:`harness.check.attach`; the command is ``harness attach``.
"""
