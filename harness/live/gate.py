"""A gdb socket in front of a booted kernel's gdbstub that keeps QEMU stopped while nobody uses it.

A booted kernel with a guest spinning in it burns a host core for as long as it runs. ``harness
boot`` keeps it for a developer who attaches now and then, so :class:`IdleGate` listens on the
developer's socket path in QEMU's place, and

* while no client is connected, QEMU is stopped (SIGSTOP: no vCPU thread, no timer runs);
* when a client connects, QEMU is continued (SIGCONT) and the gate connects to QEMU's own
  gdbstub socket and relays both ways, byte for byte, until either side closes;
* then it closes the other side, lets QEMU handle the end of its session (``grace`` seconds: a
  detach resumes the VM, a disconnect leaves it paused), and stops QEMU again.

One client at a time, as QEMU's gdbstub itself takes one: a second waits in the listen backlog
until the first is done. While QEMU is stopped its guest's clocks stand still with it (the
kernel sees a jump when it continues, as after a host suspend). :meth:`IdleGate.close` continues
QEMU (so it can be killed or go on) and removes the socket.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import threading
from pathlib import Path

from harness.target import process

RELAY_CHUNK = 1 << 16
GRACE_SECONDS = 0.3


class IdleGate:
    """Listen on ``listen`` (a new unix socket path), relay each client to ``upstream`` (QEMU's
    gdbstub socket), and keep QEMU (``pid``) stopped between clients. Use :meth:`start`, always
    :meth:`close`."""

    def __init__(self, listen: Path, upstream: Path, pid: int, grace: float = GRACE_SECONDS) -> None:
        self.listen = listen
        self.upstream = upstream
        self.pid = pid
        self.grace = grace
        self.sessions = 0  # clients served so far
        self.error: BaseException | None = None  # what ended the gate's thread, if not close()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe()

    def start(self) -> IdleGate:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(str(self.listen))
            server.listen(1)
        except OSError:
            server.close()
            raise
        self._server = server
        self._stop_qemu()
        self._thread = threading.Thread(target=self._serve, name="gdb idle gate", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def qemu_stopped(self) -> bool:
        return process.process_state(self.pid) == "T"

    def close(self) -> None:
        """End the gate (idempotent): the relay closed, QEMU continued, the socket removed."""
        self._closing.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(OSError):
                self.listen.unlink()
        self._signal(signal.SIGCONT)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- the thread ------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._closing.is_set():
                client = self._accept()
                if client is None:
                    return
                with client:
                    self._session(client)
        except BaseException as exc:
            if not self._closing.is_set():
                self.error = exc

    def _accept(self) -> socket.socket | None:
        assert self._server is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._server, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._server:
                        conn, _ = self._server.accept()
                        return conn
                    return None  # woken by close()

    def _session(self, client: socket.socket) -> None:
        self.sessions += 1
        self._signal(signal.SIGCONT)
        try:
            qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with qemu:
                qemu.connect(str(self.upstream))
                self._relay(client, qemu)
        finally:
            if not self._closing.wait(self.grace):  # QEMU ends its gdb session (detach: the VM resumes)
                self._stop_qemu()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a.fileno(): b, b.fileno(): a}
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        return
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    try:
                        data = src.recv(RELAY_CHUNK)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    try:
                        peer[src.fileno()].sendall(data)
                    except OSError:
                        return

    def _stop_qemu(self) -> None:
        self._signal(signal.SIGSTOP)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, sig)
