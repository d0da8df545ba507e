"""Drive the reference MMU: QEMU (virt, EL2) running the harness firmware, through gdb/MI.

The public entry point is :class:`harness.target.target.Target`. Beside it:

* ``process``: every child (QEMU, gdb) starts through :func:`process.spawn` (parent-death signal,
  own process group, registry reaped on exit, SIGTERM and SIGHUP: :func:`process.install_signal_handlers`);
* ``qemu`` / ``gdbmi``: one QEMU process, one gdb/MI driver; ``physmem``: guest physical memory
  through gdb (:class:`physmem.GdbPhysMemory`);
* ``layout`` / ``mailbox`` / ``firmware``: the guest memory map, the host <-> firmware records and
  requests, and the firmware build (its headers generated from those and from :mod:`harness.arch`);
* ``errors``: the TargetError (MachineryError) family.
"""
