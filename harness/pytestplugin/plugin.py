"""pytest plugin: the ``hw`` marker, ``--require-hw``, and a session-wide QEMU ``target`` fixture.

* Tests marked ``hw`` need QEMU (>= 7.2.1), gdb-multiarch and an AArch64 compiler. Without them
  they are skipped with the reason; with ``--require-hw`` or ``HARNESS_REQUIRE_HW=1`` a missing
  tool is an error instead.
* ``target``: one :class:`~harness.target.target.Target` per session (so one QEMU per xdist worker),
  restarted if a test killed it, with the regime uninstalled after every test. A failing test's
  report gets a section with the console log path and the QEMU command line.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import numpy as np
import pytest

from harness.check.engine import CheckReport, check_built
from harness.check.scenario import Scenario, build
from harness.target.errors import TargetError, ToolMissing
from harness.target.firmware import choose_toolchain
from harness.target.qemu import check_qemu
from harness.target.target import Target, gdb_binary

REQUIRE_ENV = "HARNESS_REQUIRE_HW"
pytest_plugins = ["harness.pytestplugin.kernel"]  # live_kernel: a real kernel's live tables
_TARGET_KEY = pytest.StashKey[dict[str, str]]()


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


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("hw") is None:
        return
    why = missing_tools()
    if why:
        if require_hw(item.config):
            pytest.fail(f"hardware tools required (--require-hw / {REQUIRE_ENV}) but missing: {why}",
                        pytrace=False)
        pytest.skip(f"hw test needs tools that are missing: {why}")


class TargetHolder:
    """The session's target, started lazily and restarted after a test killed or wedged it."""

    def __init__(self, log_root: Path, request_timeout: float) -> None:
        self.log_root = log_root
        self.request_timeout = request_timeout
        self._target: Target | None = None
        self._starts = 0

    def get(self) -> Target:
        t = self._target
        if t is not None and t.alive:
            return t
        if t is not None:
            t.close()
        self._starts += 1
        self._target = Target.start(timeout=30.0, request_timeout=self.request_timeout,
                                    log_dir=self.log_root / f"boot{self._starts}")
        return self._target

    def discard(self) -> None:
        if self._target is not None:
            self._target.close()
        self._target = None


@pytest.fixture(scope="session")
def target_holder(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[TargetHolder]:
    holder = TargetHolder(tmp_path_factory.mktemp("target"), float(pytestconfig.getoption("--hw-timeout")))
    yield holder
    holder.discard()


@pytest.fixture
def target(target_holder: TargetHolder, request: pytest.FixtureRequest) -> Iterator[Target]:
    """The session's QEMU target, idle, with no regime installed."""
    if request.node.get_closest_marker("hw") is None:
        request.node.add_marker(pytest.mark.hw)
        pytest_runtest_setup(request.node)
    t = target_holder.get()
    info = {"console log": str(t.console_log), "QEMU command": t.cmdline, "logs": str(t.log_dir)}
    request.node.stash[_TARGET_KEY] = info
    for k, v in info.items():
        request.node.user_properties.append((k, v))
    yield t
    if t.alive:
        try:
            t.uninstall()
        except TargetError:
            target_holder.discard()
    else:
        target_holder.discard()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    info = item.stash.get(_TARGET_KEY, None)
    if info and report.failed:
        report.sections.append(("pgtable-harness target", "\n".join(f"{k}: {v}" for k, v in info.items())))
        report.sections.append(("pgtable-harness serial console (tail)", _tail(Path(info["console log"]))))
    if report.failed:
        for key, value in item.user_properties:
            if key == MISMATCH_REPORT_KEY:
                report.sections.append(("pgtable-harness mismatch report", str(value)))


MISMATCH_REPORT_KEY = "mismatch report"
LEGACY_ENV = "HARNESS_QEMU_LEGACY"


@pytest.fixture(scope="session")
def legacy_qemu(pytestconfig: pytest.Config) -> str:
    """Debian 12's QEMU 7.2 (unpacked by ci/setup.sh into .cache/qemu-7.2, or $HARNESS_QEMU_LEGACY):
    the harness must still run on it, with its known divergences reported as such."""
    path = os.environ.get(LEGACY_ENV) or str(pytestconfig.rootpath / ".cache/qemu-7.2/usr/bin/qemu-system-aarch64")
    if not os.access(path, os.X_OK):
        why = f"QEMU 7.2 not found at {path} (bash ci/setup.sh unpacks it; or set {LEGACY_ENV})"
        if require_hw(pytestconfig):
            pytest.fail(f"hardware tools required but missing: {why}", pytrace=False)
        pytest.skip(why)
    return path


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(console log unreadable: {exc})"


CheckScenario = Callable[[Scenario], CheckReport]


@pytest.fixture
def check_scenario(target: Target, request: pytest.FixtureRequest) -> CheckScenario:
    """Build a scenario with the model, install it, check every probe on the MMU, uninstall.

    Returns the :class:`~harness.check.engine.CheckReport`; its text is attached to the test's
    report (and to JUnit XML as a property) so a failure shows every mismatch walk by walk."""

    def run(sc: Scenario, seed: int = 1) -> CheckReport:
        rep = check_built(build(sc, target.layout), target, np.random.default_rng(seed))
        request.node.user_properties.append((MISMATCH_REPORT_KEY, rep.text()))
        return rep

    return run
