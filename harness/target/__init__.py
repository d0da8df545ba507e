"""Drive the reference MMU: QEMU (virt, EL2) running the harness firmware, through gdb/MI.

The public entry point is :class:`harness.target.target.Target`.
"""
