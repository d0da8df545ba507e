"""Target errors, each carrying the evidence needed to understand it without a rerun."""

from __future__ import annotations

import signal

from harness.errors import MachineryError


class TargetError(MachineryError):
    """Base class: something went wrong with the QEMU/gdb target."""


class ToolMissing(TargetError):
    """A required tool (QEMU, gdb, cross compiler) is absent or too old."""


def exit_text(returncode: int | None) -> str:
    """How a child process ended, as Popen's ``returncode`` tells it: "exited with code 1", "was
    killed by SIGKILL", or (None) "ended, its exit status not yet collected"."""
    if returncode is None:
        return "ended, its exit status not yet collected"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class QemuExited(TargetError):
    """QEMU exited while it was expected to run."""

    def __init__(self, message: str, returncode: int | None, console_tail: str, stderr_tail: str) -> None:
        self.returncode = returncode
        self.console_tail = console_tail
        self.stderr_tail = stderr_tail
        super().__init__(
            f"{message}: QEMU {exit_text(returncode)}\n"
            f"--- console (tail) ---\n{console_tail}\n--- QEMU stderr (tail) ---\n{stderr_tail}"
        )


class TargetTimeout(TargetError):
    """Waiting for the target took longer than allowed; ``evidence`` holds what was collected."""

    def __init__(self, awaited: str, timeout: float, evidence: dict[str, str], cause: str | None = None) -> None:
        self.awaited = awaited
        self.timeout = timeout
        self.evidence = evidence
        self.cause = cause
        lines = "\n".join(f"  {k}: {v}" for k, v in evidence.items())
        why = f" ({cause})" if cause else ""
        super().__init__(f"timed out after {timeout:.1f} s waiting for {awaited}{why}\n{lines}")


class GdbLost(TargetError):
    """gdb died or stopped answering."""


class FirmwareException(TargetError):
    """The firmware took an unexpected exception and reported it through the mailbox."""

    def __init__(self, vector: int, vector_name: str, esr: int, esr_text: str, far: int, elr: int, spsr: int,
                 hpfar: int, extra: dict[str, int], disassembly: str, console_tail: str) -> None:
        self.vector = vector
        self.esr = esr
        self.far = far
        self.elr = elr
        self.spsr = spsr
        self.hpfar = hpfar
        self.extra = extra
        self.disassembly = disassembly
        extras = " ".join(f"{k}={v:#x}" for k, v in extra.items())
        super().__init__(
            f"firmware exception ({vector_name}): {esr_text}\n"
            f"  FAR_EL2={far:#x} ELR_EL2={elr:#x} SPSR_EL2={spsr:#x} HPFAR_EL2={hpfar:#x}\n"
            f"  {extras}\n--- around ELR ---\n{disassembly}\n--- console (tail) ---\n{console_tail}"
        )


class RequestFailed(TargetError):
    """The firmware rejected a request (bad command or argument)."""
