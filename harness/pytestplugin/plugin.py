"""pytest plugin (entry point ``harness.pytestplugin.plugin``): registers its parts.

* :mod:`.hooks`: the ``hw`` marker, ``--require-hw`` / ``HARNESS_REQUIRE_HW=1``, ``--hw-timeout``;
* :mod:`.fixtures`: ``target`` (one QEMU per session), ``check_scenario``, ``legacy_qemu``;
* :mod:`.reporter`: a failing test's report: target, serial console, check reports, and the kind
  of failure (mismatch, machinery, bad input, test).

A new part (e.g. a kernel-booting fixture module) is one more line in :data:`pytest_plugins`.
"""

from __future__ import annotations

pytest_plugins = [
    "harness.pytestplugin.hooks",
    "harness.pytestplugin.reporter",
    "harness.pytestplugin.fixtures",  # imports the two above: registered after them
    "harness.pytestplugin.kernel",  # live_kernel: a real kernel's live tables
]
