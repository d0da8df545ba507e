"""The plugin's options and the ``hw`` marker: hw tests skip without QEMU/gdb/toolchain, or fail
with ``--require-hw`` / ``HARNESS_REQUIRE_HW=1``."""

from __future__ import annotations

import os
import shutil

import pytest

from harness.target.errors import ToolMissing
from harness.target.firmware import choose_toolchain
from harness.target.qemu import check_qemu
from harness.target.target import gdb_binary

REQUIRE_ENV = "HARNESS_REQUIRE_HW"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgtable-harness")
    group.addoption("--require-hw", action="store_true", default=False,
                    help=f"a missing QEMU/gdb/toolchain fails hw tests instead of skipping them "
                         f"(also {REQUIRE_ENV}=1)")
    group.addoption("--hw-timeout", type=float, default=60.0,
                    help="seconds allowed for each firmware request (default 60)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hw: needs QEMU, gdb-multiarch and an AArch64 cross compiler")


def require_hw(config: pytest.Config) -> bool:
    return bool(config.getoption("--require-hw")) or os.environ.get(REQUIRE_ENV, "") not in ("", "0")


_missing_cache: list[str | None] = []


def missing_tools() -> str | None:
    """Why hw tests cannot run here, or None."""
    if _missing_cache:
        return _missing_cache[0]
    reasons = []
    try:
        check_qemu()
    except ToolMissing as exc:
        reasons.append(str(exc))
    if not shutil.which(gdb_binary()):
        reasons.append(f"{gdb_binary()} is not on PATH")
    try:
        choose_toolchain()
    except ToolMissing as exc:
        reasons.append(str(exc))
    _missing_cache.append("; ".join(reasons) or None)
    return _missing_cache[0]


def skip_or_fail_without_tools(item: pytest.Item) -> None:
    why = missing_tools()
    if why:
        if require_hw(item.config):
            pytest.fail(f"hardware tools required (--require-hw / {REQUIRE_ENV}) but missing: {why}",
                        pytrace=False)
        pytest.skip(f"hw test needs tools that are missing: {why}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("hw") is not None:
        skip_or_fail_without_tools(item)
