"""A planted-bug copy of a kernel tree: symlinks to the original everywhere, except real directories
down to the edited file and the edited file itself (the tree is never written, nothing 1.7 GB is
copied). ``nvhe/`` must be a real directory too: the nVHE object is built from ``nvhe/../pgtable.c``,
which through a symlinked ``nvhe`` would resolve to the original file."""

from __future__ import annotations

import shutil
from pathlib import Path

PGTABLE_C = "arch/arm64/kvm/hyp/pgtable.c"
REAL_DIRS = {"arch", "arch/arm64", "arch/arm64/kvm", "arch/arm64/kvm/hyp", "arch/arm64/kvm/hyp/nvhe"}


def shadow_tree(src: Path, dst: Path, real_dirs: set[str] = REAL_DIRS, copies: frozenset[str] = frozenset({PGTABLE_C}),
                rel: str = "") -> Path:
    """``dst`` mirrors ``src`` with symlinks, except ``real_dirs`` (real directories) and ``copies``
    (copied files, editable)."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        sub = rel + entry.name
        if entry.is_dir() and not entry.is_symlink() and sub in real_dirs:
            shadow_tree(entry, dst / entry.name, real_dirs, copies, sub + "/")
        elif sub in copies:
            shutil.copy2(entry, dst / entry.name)
        else:
            (dst / entry.name).symlink_to(entry)
    return dst


def plant(tree: Path, old: str, new: str) -> None:
    """Replace exactly one occurrence of ``old`` in the shadow tree's pgtable.c."""
    path = tree / PGTABLE_C
    text = path.read_text()
    if text.count(old) != 1:
        raise AssertionError(f"the planted edit's anchor occurs {text.count(old)} times in {path}: {old!r}")
    path.write_text(text.replace(old, new))
