"""The ``kbuild`` marker: tests that run the kernel's own build system on a real tree."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kbuild: builds a real Linux tree's pgtable.c with kbuild (~10-20 s each "
                                       "from scratch; needs the cross toolchain, flex, bison, bc)")
