"""Source this file in gdb-multiarch to get the ``pgt`` commands (``harness gdb-script`` prints
its path; put ``source PATH`` in ``~/.gdbinit`` to have them always).

It needs nothing installed beside the harness: it puts the directory holding the ``harness``
package on gdb's ``sys.path``, and the site-packages of the virtual environment the harness is
installed in (for numpy): the environment this file is inside, else ``$HARNESS_VENV``, the
``.venv`` beside a source checkout, ``$VIRTUAL_ENV``, or the one whose ``harness`` command is on
PATH. When gdb's Python cannot load it (no Python in this gdb, another Python version than the
environment's), it says so in one line and defines nothing.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # .../harness/gdb
_PACKAGE_ROOT = _HERE.parent.parent  # the directory holding harness/


def _venv_candidates() -> list[Path]:
    out = [p for p in _HERE.parents if (p / "pyvenv.cfg").is_file()][:1]
    for var in ("HARNESS_VENV", "VIRTUAL_ENV"):
        if os.environ.get(var):
            out.append(Path(os.environ[var]))
    out.append(_PACKAGE_ROOT / ".venv")
    script = shutil.which("harness")
    if script:
        try:
            first = Path(script).read_text(errors="replace").splitlines()[0]
        except (OSError, IndexError):
            first = ""
        if first.startswith("#!"):
            out.append(Path(first[2:].strip().split()[0]).parent.parent)
    return [p for p in out if (p / "pyvenv.cfg").is_file()]


def _site_packages(venv: Path) -> Path | None:
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / want / "site-packages"
    return site if site.is_dir() else None


def _load() -> str | None:
    """Put the harness and its environment on sys.path and register; an error line or None."""
    venvs = _venv_candidates()
    usable = [(v, s) for v, s in ((v, _site_packages(v)) for v in venvs) if s is not None]
    if venvs and not usable:
        found = ", ".join(sorted({p.name for v in venvs for p in (v / "lib").glob("python3*")}))
        return (f"pgt: gdb's Python is {sys.version_info.major}.{sys.version_info.minor} but the harness "
                f"environment {venvs[0]} is for {found or 'another Python'}: its compiled modules cannot load "
                "here (install the harness with this gdb's Python version)")
    for path in reversed([str(_PACKAGE_ROOT), *(str(site) for _, site in usable[:1])]):
        if path not in sys.path:
            sys.path.insert(0, path)
    if usable:  # pgt verify runs the harness with the interpreter of the environment loaded here
        os.environ.setdefault("HARNESS_GDB_PYTHON", str(usable[0][0] / "bin" / "python"))
    try:
        gdb = importlib.import_module("gdb")  # only inside gdb
        commands = importlib.import_module("harness.gdb.commands")  # after sys.path is set
    except ImportError as exc:
        return (f"pgt: cannot load the harness in gdb's Python {sys.version.split()[0]}: {exc} "
                f"(looked for an environment in: {', '.join(map(str, venvs)) or 'none found'})")
    commands.register(gdb)
    return None


_error = _load()
if _error:
    sys.stderr.write(_error + "\n")
