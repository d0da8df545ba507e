"""gdb's ``pgt`` commands: ``harness attach``'s decoder inside a developer's own gdb session.

* ``pgt.py`` - the file to ``source`` in gdb-multiarch (``harness gdb-script`` prints its path):
  it finds this package and the environment it is installed in, then registers the commands;
* :mod:`harness.gdb.access` - the session as a :class:`harness.live.capture.TargetAccess`
  (threads, registers, physical memory through gdb's Python API; selection kept);
* :mod:`harness.gdb.commands` - the ``pgt`` command family, printing with attach's renderer.

Only :func:`script_path` is meant for use outside gdb.
"""

from __future__ import annotations

from pathlib import Path

SCRIPT_NAME = "pgt.py"


def script_path() -> Path:
    """The file to ``source`` in gdb."""
    return Path(__file__).resolve().parent / SCRIPT_NAME
