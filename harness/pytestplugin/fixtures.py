"""The plugin's fixtures: one QEMU ``target`` per session (per xdist worker), restarted if a test
killed it and idle after every test; ``check_scenario``; ``legacy_qemu`` (Debian 12's QEMU 7.2)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from harness.check import live
from harness.check.engine import CheckReport
from harness.check.scenario import Scenario
from harness.pytestplugin.hooks import require_hw, skip_or_fail_without_tools
from harness.pytestplugin.reporter import record_check, record_target
from harness.target.errors import TargetError
from harness.target.target import Target

LEGACY_ENV = "HARNESS_QEMU_LEGACY"


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
        skip_or_fail_without_tools(request.node)
    t = target_holder.get()
    record_target(request.node, {"console log": str(t.console_log), "QEMU command": t.cmdline,
                                 "logs": str(t.log_dir)})
    yield t
    if t.alive:
        try:
            t.uninstall()
        except TargetError:
            target_holder.discard()
    else:
        target_holder.discard()


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


CheckScenario = Callable[..., CheckReport]


@pytest.fixture
def check_scenario(target: Target, request: pytest.FixtureRequest) -> CheckScenario:
    """Build a scenario with the model, install it, check every probe on the MMU, uninstall.
    Its operations run live on the installed tables (``live_ops=False``: applied to the model
    first), each one's TLB maintenance checked (the report's ``tlb``).

    Returns the :class:`~harness.check.engine.CheckReport`; its text is attached to the test's
    report (and to JUnit XML as a property) so a failure shows every mismatch walk by walk."""

    def run(sc: Scenario, seed: int = 1, live_ops: bool = True) -> CheckReport:
        report = live.check_scenario(sc, target, np.random.default_rng(seed), live=live_ops)
        record_check(request.node, report)
        return report

    return run
