"""pytest fixtures for tests against a real kernel's live translation tables.

    @pytest.mark.hw
    def test_hyp_text_is_not_writable(live_kernel):
        k = live_kernel(mode="protected", cpu="max", smp=2)  # booted, KVM up, tables live
        cap = k.capture()                                     # every vCPU + table pages, target resumed
        for rd in decode(cap.snapshot, cap.regimes): ...      # rd.cpus: the vCPUs using the regime

* ``live_kernel``: a factory; each call boots (or reuses, per session, for the same mode, CPU model,
  extra command line and number of CPUs ``smp``, default 1) QEMU running the kernel until KVM
  reports ``initialized successfully`` and
  the kernel settles (the root-fs panic that follows with no root file system). The result is a
  :class:`LiveKernel`: ``gdb_socket`` (for ``harness attach``), ``capture(cpu=None)`` (every vCPU,
  or vCPU ``cpu`` alone), ``image`` (with the
  package's System.map symbols), ``banner``, ``serial_log``. QEMU is killed at the end of the
  session.
* The kernel: ``--kernel PATH`` or ``HARNESS_KERNEL=PATH`` (a vmlinuz, or a directory holding
  ``boot/vmlinuz-*``); default this tree's ``.cache/kernel`` (``bash ci/kernel.sh`` fetches
  Debian's arm64 6.12). Tests using it carry the ``hw`` marker; without a kernel they are skipped,
  or fail under ``--require-hw`` / ``HARNESS_REQUIRE_HW=1``.
* A failing test's report gets a section with the kernel's serial log path and QEMU command.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.live.capture import Capture
from harness.live.gdbstub import capture, parse_target
from harness.live.kernel import KernelBoot, KernelImage, KernelImageError
from harness.live.vmm import VmmReport, start_vmm

REQUIRE_ENV = "HARNESS_REQUIRE_HW"
_BootKey = tuple[str, str, str, int, str]  # mode, CPU model, extra command line, number of CPUs, guest
_BOOTS_KEY = pytest.StashKey[dict[_BootKey, "LiveKernel"]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgtable-harness")
    group.addoption("--kernel", default=None, metavar="PATH",
                    help="kernel for the live_kernel fixture: a vmlinuz or a directory with boot/vmlinuz-* "
                         "(also HARNESS_KERNEL; default .cache/kernel from ci/kernel.sh)")
    group.addoption("--kernel-timeout", type=float, default=120.0,
                    help="seconds allowed for a kernel to bring KVM up (default 120)")


@dataclass
class LiveKernel:
    """A booted kernel with its hypervisor up (see the module text)."""

    boot: KernelBoot
    captures: list[Capture] = field(default_factory=list)
    vmm: VmmReport | None = None  # with guest=: what the harness's VMM reported (harness.live.vmm)

    @property
    def image(self) -> KernelImage:
        return self.boot.image

    @property
    def gdb_socket(self) -> Path:
        return self.boot.gdb_socket

    @property
    def banner(self) -> str:
        return self.boot.banner

    @property
    def serial_log(self) -> Path:
        return self.boot.serial_log

    @property
    def smp(self) -> int:
        return self.boot.smp

    def capture(self, timeout: float = 30.0, cpu: int | None = None) -> Capture:
        """Every vCPU's registers (or vCPU ``cpu``'s) and every table page reachable from their
        regimes, through the gdbstub (target left running)."""
        cap = capture(parse_target(str(self.boot.gdb_socket)), timeout=timeout, cpu=cpu)
        self.captures.append(cap)
        return cap


def _require(config: pytest.Config) -> bool:
    return bool(config.getoption("--require-hw", default=False)) or os.environ.get(REQUIRE_ENV, "") not in ("", "0")


@pytest.fixture(scope="session")
def kernel_image(request: pytest.FixtureRequest) -> KernelImage:
    """The kernel the live_kernel fixture boots (``--kernel`` / ``HARNESS_KERNEL`` / .cache/kernel)."""
    try:
        return KernelImage.find(request.config.getoption("--kernel"), what="--kernel / HARNESS_KERNEL")
    except KernelImageError as exc:
        if _require(request.config):
            pytest.fail(f"a kernel is required ({REQUIRE_ENV}) but: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def _kernel_boots(request: pytest.FixtureRequest) -> Iterator[dict[_BootKey, LiveKernel]]:
    boots: dict[_BootKey, LiveKernel] = {}
    request.config.stash[_BOOTS_KEY] = boots
    try:
        yield boots
    finally:
        for k in boots.values():
            k.boot.close()
        boots.clear()


@pytest.fixture
def live_kernel(request: pytest.FixtureRequest, kernel_image: KernelImage, tmp_path_factory: pytest.TempPathFactory,
                _kernel_boots: dict[_BootKey, LiveKernel]) -> Iterator[Callable[..., LiveKernel]]:
    """``live_kernel(mode="nvhe", cpu="max", append="", smp=1, guest=None)`` -> a :class:`LiveKernel`
    (session-cached); ``mode`` also "vhe"; ``guest``: a pattern of the harness's VMM
    (:data:`harness.live.vmm.PATTERNS`) run as /init, its report in ``LiveKernel.vmm``. Between the
    tests that use them the session's kernels are stopped (SIGSTOP: a booted kernel spins after its
    root-fs panic, and a guest spins by design, a host core each) and continued when a test asks for
    one again."""
    timeout = float(request.config.getoption("--kernel-timeout"))

    def get(mode: str = "nvhe", cpu: str = "max", append: str = "", smp: int = 1,
            guest: str | None = None) -> LiveKernel:
        key = (mode, cpu, append, smp, guest or "")
        k = _kernel_boots.get(key)
        if k is not None and k.boot.pid is not None and _alive(k):
            _signal(k, signal.SIGCONT)
            return k
        smp_tag = f"-smp{smp}" if smp != 1 else ""
        logs = tmp_path_factory.mktemp(f"kernel-{mode}-{cpu.replace(',', '-').replace('=', '')}{smp_tag}")
        if guest is not None:  # the harness's VMM as /init, running that guest pattern
            boot, report = start_vmm(kernel_image, guest=guest, mode=mode, cpu=cpu, smp=smp, log_dir=logs,
                                     timeout=timeout, append=append)
        else:
            boot, report = KernelBoot(kernel_image, mode=mode, cpu=cpu, append=append, timeout=timeout,
                                      log_dir=logs, smp=smp).start(), None
        k = _kernel_boots[key] = LiveKernel(boot, vmm=report)
        return k

    try:
        yield get
    finally:
        for k in _kernel_boots.values():
            if _alive(k):
                _signal(k, signal.SIGSTOP)


def _signal(k: LiveKernel, sig: signal.Signals) -> None:
    """Stop or continue a kernel's QEMU (gone already: nothing to do)."""
    proc = k.boot._proc
    if proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def _alive(k: LiveKernel) -> bool:
    proc = k.boot._proc
    return proc is not None and proc.poll() is None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when != "call" or not rep.failed or "live_kernel" not in getattr(item, "fixturenames", ()):
        return
    boots = item.config.stash.get(_BOOTS_KEY, {})
    for (mode, cpu, _, smp, _guest), k in boots.items():
        rep.sections.append((f"kernel {mode} on -cpu {cpu} -smp {smp}",
                             f"serial log: {k.serial_log}\nQEMU: {k.boot.cmdline}\n"
                             f"--- serial tail ---\n{k.boot.console_tail(1500)}"))
