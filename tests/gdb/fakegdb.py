"""A stand-in for gdb's Python module (``import gdb`` inside gdb), backed by a
:class:`harness.live.snapshot.Snapshot`: the target's vCPUs are the snapshot's CPUs (gdb thread
N+1 is CPU N, details ``CPU#N [running]``), their registers the snapshot's, and physical memory
the snapshot's pages, served the way QEMU's gdbstub serves them (``first_thread`` renumbers the
threads, as gdb does after a reconnect; the details still name the CPU):

* ``server="qemu"``: ``maint packet Qqemu.PhyMemMode:N`` answers ``OK`` and switches the mode
  (tracked in :attr:`FakeGdb.phymem`); ``read_memory`` raises ``gdb.MemoryError`` while the mode
  is 0 (virtual reads: the fake has no virtual memory), and in physical mode returns the
  snapshot's bytes, or **zeros** for an address no captured page holds (QEMU reads addresses
  with no RAM behind them as zeros, not as an error); such reads are recorded in
  :attr:`FakeGdb.uncaptured`.
* ``server="direct"``: a server whose reads already are physical (a JTAG memory access port):
  it answers nothing (``received: ""``) to the packet and every read is physical.

Only what :mod:`harness.gdb` uses is here, with real gdb's shapes: ``gdb.Command`` (records each
command registered, by name, in :attr:`FakeGdb.commands`), ``GdbError`` (not a ``gdb.error``),
``error`` (a RuntimeError) and ``MemoryError`` (a ``gdb.error``), ``string_to_argv``,
``write``, ``execute``, ``selected_inferior`` / ``selected_thread`` / ``selected_frame`` /
``newest_frame``, frames with ``level``/``older``/``select``/``read_register``/``architecture``,
``parse_and_eval`` and ``lookup_type``. Register values are signed like gdb's ``int64`` (the
code under test must mask them) and 4 bytes wide for ``cpsr``.

Faults, for the interruption tests: :attr:`FakeGdb.read_faults` maps a memory read's ordinal
(1-based) to the exception it raises, :attr:`FakeGdb.register_faults` a register read's,
:attr:`FakeGdb.switch_faults` a thread switch's;
:attr:`FakeGdb.execute_faults` is a list of ``(prefix, exc, after)``, each raised once by the next
``execute`` of a command starting with ``prefix``: before the command takes effect (``after``
False), or after it did (``after`` True: the packet reached the server and the Ctrl-C came while
gdb waited for the reply, which is when gdb raises it).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from harness.live.snapshot import Snapshot

COMMAND_DATA = 3
COMPLETE_NONE = 0
COMPLETE_FILENAME = 1
STDOUT, STDERR, STDLOG = 0, 1, 2
FRAME_DEPTH = 3  # frames 0..2 on every thread

# Registers gdb's aarch64 target describes besides the system registers a snapshot holds.
CORE_REGISTERS = (*(f"x{i}" for i in range(31)), "sp", "pc", "cpsr", "fpsr", "fpcr")


class GdbError(Exception):
    """gdb.GdbError: an error gdb prints as one line, without a traceback."""


class error(RuntimeError):
    """gdb.error."""


class MemoryError(error):
    """gdb.MemoryError (a gdb.error)."""


@dataclass
class Type:
    name: str
    sizeof: int


U64 = Type("unsigned long long", 8)


class Value:
    """A gdb.Value of an integer register or expression: int() gives the signed value for a
    signed type (gdb's int64 registers), as gdb does."""

    def __init__(self, raw: int, type_: Type, signed: bool = True) -> None:
        self.raw = raw & ((1 << (8 * type_.sizeof)) - 1)
        self.type = type_
        self.signed = signed

    def __int__(self) -> int:
        bits = 8 * self.type.sizeof
        if self.signed and self.raw >> (bits - 1):
            return self.raw - (1 << bits)
        return self.raw

    def __index__(self) -> int:
        return int(self)

    def cast(self, type_: Type) -> Value:
        return Value(self.raw, type_, signed=not type_.name.startswith("unsigned"))


@dataclass
class RegisterDescriptor:
    name: str


class Architecture:
    def __init__(self, names: list[str]) -> None:
        self._names = names

    def name(self) -> str:
        return "aarch64"

    def registers(self, reggroup: str | None = None) -> Iterator[RegisterDescriptor]:
        return iter([RegisterDescriptor(n) for n in self._names])


class Frame:
    def __init__(self, gdb: FakeGdb, thread: Thread, level: int) -> None:
        self._gdb = gdb
        self.thread = thread
        self._level = level

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (self.thread.num, self._level) == (other.thread.num, other._level)

    def __hash__(self) -> int:
        return hash((self.thread.num, self._level))

    def level(self) -> int:
        return self._level

    def is_valid(self) -> bool:
        return True

    def older(self) -> Frame | None:
        return Frame(self._gdb, self.thread, self._level + 1) if self._level + 1 < FRAME_DEPTH else None

    def newer(self) -> Frame | None:
        return Frame(self._gdb, self.thread, self._level - 1) if self._level else None

    def select(self) -> None:
        if self._gdb.selected is not self.thread:
            raise error("frame of another thread")  # gdb selects the frame's thread; ours never asks
        self._gdb.frame_level = self._level

    def architecture(self) -> Architecture:
        return Architecture(self._gdb.register_names())

    def read_register(self, name: str) -> Value:
        self._gdb.register_reads += 1
        fault = self._gdb.register_faults.get(self._gdb.register_reads)
        if fault is not None:
            raise fault
        regs = self._gdb.registers_of(self.thread, self._level)
        if name not in regs:
            raise ValueError(f"Bad register: {name}")  # gdb raises ValueError for an unknown name
        return Value(regs[name], Type("uint32" if name == "cpsr" else "int64", 4 if name == "cpsr" else 8))


@dataclass
class Thread:
    gdb: FakeGdb
    num: int
    details: str
    cpu: int
    stopped: bool = True
    valid: bool = True

    @property
    def global_num(self) -> int:
        return self.num

    @property
    def ptid(self) -> tuple[int, int, int]:
        return (1, self.num, 0)

    def is_stopped(self) -> bool:
        return self.stopped

    def is_running(self) -> bool:
        return not self.stopped

    def is_valid(self) -> bool:
        return self.valid

    def switch(self) -> None:
        self.gdb.switches += 1
        fault = self.gdb.switch_faults.get(self.gdb.switches)
        if fault is not None:
            raise fault
        if self.gdb.selected is not self:  # gdb: switching to the current thread keeps its frame
            self.gdb.selected = self
            self.gdb.frame_level = 0  # ... to another, selects that one's innermost frame


@dataclass
class Connection:
    type: str = "remote"
    details: str | None = "localhost:1234"
    num: int = 1


class Inferior:
    def __init__(self, gdb: FakeGdb) -> None:
        self._gdb = gdb
        self.num = 1

    @property
    def connection(self) -> Connection | None:
        return self._gdb.connection

    def threads(self) -> tuple[Thread, ...]:
        return tuple(self._gdb.threads)

    def read_memory(self, addr: int, length: int) -> memoryview:
        return self._gdb.read_memory(int(addr), int(length))


@dataclass
class Read:
    addr: int
    length: int
    physical: bool


@dataclass
class FakeGdb:
    """The module: pass it where :mod:`harness.gdb` takes ``gdb`` (module doc)."""

    snapshot: Snapshot
    server: str = "qemu"  # or "direct"
    connection: Connection | None = field(default_factory=Connection)
    extra_registers: dict[str, int] = field(default_factory=dict)  # e.g. x0; same on every thread
    symbols: dict[str, int] = field(default_factory=dict)  # &name in parse_and_eval
    first_thread: int = 1  # gdb's number of CPU 0's thread (QEMU's gdbstub: 1; more after a reconnect)

    def __post_init__(self) -> None:
        self.COMMAND_DATA = COMMAND_DATA
        self.COMPLETE_NONE = COMPLETE_NONE
        self.COMPLETE_FILENAME = COMPLETE_FILENAME
        self.STDOUT, self.STDERR, self.STDLOG = STDOUT, STDERR, STDLOG
        self.GdbError = GdbError
        self.error = error
        self.MemoryError = MemoryError
        self.commands: dict[str, Any] = {}
        self.threads = [Thread(self, self.first_thread + i, f"CPU#{cpu} [running]", cpu)
                        for i, cpu in enumerate(sorted(self.snapshot.cpus))]
        self.selected: Thread | None = self.threads[0] if self.threads else None
        self.frame_level = 0
        self.phymem = 0
        self.out: list[str] = []
        self.err: list[str] = []
        self.executed: list[str] = []
        self.reads: list[Read] = []
        self.uncaptured: list[int] = []
        self.read_faults: dict[int, BaseException] = {}
        self.register_faults: dict[int, BaseException] = {}
        self.switch_faults: dict[int, BaseException] = {}
        self.completed: list[int] = []  # indexes in ``executed`` of the commands done without a fault
        self.execute_faults: list[tuple[str, BaseException, bool]] = []
        self.register_reads = 0
        self.switches = 0
        self.dont_repeats = 0
        self.Command = self._command_class()

    # -- gdb.Command -----------------------------------------------------------------------
    def _command_class(self) -> type:
        fake = self

        class Command:
            def __init__(self, name: str, command_class: int, completer_class: int = COMPLETE_NONE,
                         prefix: bool = False) -> None:
                self._name = name
                self.command_class = command_class
                self.completer_class = completer_class
                self.prefix = prefix
                fake.commands[name] = self

            def dont_repeat(self) -> None:
                fake.dont_repeats += 1

            def invoke(self, argument: str, from_tty: bool) -> None:
                raise error(f"{self._name}: no invoke")

        return Command

    def run(self, line: str) -> None:
        """What gdb does for a typed command line: the longest registered command name that
        prefixes it is invoked with the rest (``pgt ranges --json`` -> ``pgt ranges``)."""
        words = line.split(None)
        for n in range(len(words), 0, -1):
            name = " ".join(words[:n])
            if name in self.commands:
                rest = line.split(None, n)[n] if len(line.split(None, n)) > n else ""
                self.commands[name].invoke(rest, True)
                return
        raise error(f'Undefined command: "{words[0] if words else ""}".  Try "help".')

    # -- module functions ------------------------------------------------------------------
    @staticmethod
    def string_to_argv(arg: str) -> list[str]:
        return shlex.split(arg)

    def write(self, text: str, stream: int | None = None) -> None:
        (self.err if stream == STDERR else self.out).append(text)

    def flush(self, stream: int | None = None) -> None:
        pass

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def execute(self, command: str, from_tty: bool = False, to_string: bool = False) -> str | None:
        self.executed.append(command)
        fault: tuple[str, BaseException, bool] | None = None
        for i, f in enumerate(self.execute_faults):
            if command.startswith(f[0]):
                fault = self.execute_faults.pop(i)
                break
        if fault is not None and not fault[2]:
            raise fault[1]
        out = self._execute(command)
        if fault is not None:
            raise fault[1]
        self.completed.append(len(self.executed) - 1)
        if to_string:
            return out
        self.write(out)
        return None

    def _execute(self, command: str) -> str:
        m = re.fullmatch(r"maint(?:enance)? packet Qqemu\.PhyMemMode:(\d)", command)
        if m:
            if self.connection is None:
                raise error("Can't send packets: no remote connection.")
            if self.server != "qemu":
                return f'sending: "Qqemu.PhyMemMode:{m[1]}"\nreceived: ""\n'
            self.phymem = int(m[1])
            return f'sending: "Qqemu.PhyMemMode:{m[1]}"\nreceived: "OK"\n'
        if command == "monitor info status":
            if self.connection is None:
                raise error('"monitor" command not supported by this target.')
            if self.server != "qemu":
                raise error("Target does not support this command.")
            return "VM status: paused\r\n"
        if command in ("maint flush dcache", "maintenance flush dcache"):
            return ""
        raise error(f'Undefined command: "{command}".  Try "help".')

    def selected_inferior(self) -> Inferior:
        return Inferior(self)

    def inferiors(self) -> tuple[Inferior, ...]:
        return (Inferior(self),)

    def selected_thread(self) -> Thread | None:
        return self.selected

    def _frame(self, level: int) -> Frame:
        if self.selected is None or self.connection is None:
            raise error("No stack.")
        return Frame(self, self.selected, level)

    def selected_frame(self) -> Frame:
        return self._frame(self.frame_level)

    def newest_frame(self) -> Frame:
        return self._frame(0)

    def lookup_type(self, name: str) -> Type:
        if name in ("unsigned long long", "unsigned long", "uint64_t"):
            return Type(name, 8)
        if name in ("long long", "long"):
            return Type(name, 8)
        raise error(f"No type named {name}.")

    def parse_and_eval(self, expression: str) -> Value:
        """Numbers, ``$register``, ``&symbol``, ``symbol``, each optionally ``+``/``-`` a number."""
        m = re.fullmatch(r"\s*([$&]?\w+)\s*(?:([+-])\s*(\w+))?\s*", expression)
        if not m:
            raise error(f"A syntax error in expression, near `{expression}'.")
        base = self._term(m[1])
        if m[2]:
            delta = int(self._term(m[3]))
            base = Value(int(base) + (delta if m[2] == "+" else -delta), U64, signed=False)
        return base

    def _term(self, text: str) -> Value:
        if text.startswith("$"):
            if self.selected is None:
                raise error("No registers.")
            regs = self.registers_of(self.selected, self.frame_level)
            if text[1:] not in regs:
                return Value(0, Type("void", 1))  # gdb: an unset convenience variable is void
            return Value(regs[text[1:]], Type("int64", 8))
        if text.startswith("&"):
            if text[1:] not in self.symbols:
                raise error(f'No symbol "{text[1:]}" in current context.')
            return Value(self.symbols[text[1:]], U64, signed=False)
        if text[0].isdigit():
            try:
                return Value(int(text, 0), Type("long", 8))
            except ValueError:
                raise error(f'Invalid number "{text}".') from None
        raise error(f'No symbol "{text}" in current context.')

    # -- the target ------------------------------------------------------------------------
    def register_names(self) -> list[str]:
        names = list(CORE_REGISTERS)
        for regs in self.snapshot.cpus.values():
            names += [n for n in regs if n not in names]
        return names + [n for n in self.extra_registers if n not in names]

    def registers_of(self, thread: Thread, level: int = 0) -> dict[str, int]:
        """The snapshot's registers of the thread's CPU (core registers it lacks read as 0), as
        frame ``level`` has them: an outer frame's pc is its return address (0x1000 further per
        level, here); the system registers are the same in every frame."""
        regs = {**dict.fromkeys(CORE_REGISTERS, 0), **self.extra_registers, **self.snapshot.cpus[thread.cpu]}
        regs["pc"] += 0x1000 * level
        return regs

    def read_memory(self, addr: int, length: int) -> memoryview:
        self.reads.append(Read(addr, length, self.physical))
        fault = self.read_faults.get(len(self.reads))
        if fault is not None:
            raise fault
        if self.connection is None:
            raise error("The program has no registers now.")
        if not self.physical:
            raise MemoryError(f"Cannot access memory at address {addr:#x}")
        out = bytearray()
        size = self.snapshot.page_size
        pa = addr
        while len(out) < length:
            base = pa - pa % size
            take = min(length - len(out), base + size - pa)
            page = self.snapshot.pages.get(base)
            if page is None:
                self.uncaptured.append(base)
                out += bytes(take)
            else:
                out += page[pa - base : pa - base + take]
            pa += take
        return memoryview(bytes(out))

    @property
    def physical(self) -> bool:
        return self.server == "direct" or self.phymem == 1

    # -- helpers for the tests ---------------------------------------------------------------
    def select(self, thread_num: int, level: int) -> None:
        """``thread N`` then ``frame L``."""
        self.selected = next(t for t in self.threads if t.num == thread_num)
        self.frame_level = level

    @property
    def selection(self) -> tuple[int | None, int]:
        return (None if self.selected is None else self.selected.num, self.frame_level)

    def disconnect(self) -> None:
        """``disconnect``: no connection, no threads, nothing selected."""
        self.connection = None
        self.threads = []
        self.selected = None
        self.frame_level = 0

    def done(self, command: str) -> list[int]:
        """Where in :attr:`executed` ``command`` ran to its end (no fault)."""
        return [i for i in self.completed if self.executed[i] == command]

    def packets(self) -> list[str]:
        return [c for c in self.executed if "PhyMemMode" in c]


def install(snapshot: Snapshot, register: Callable[[Any], None] | None = None, **kw: Any) -> FakeGdb:
    """A fake gdb serving ``snapshot``, with the ``pgt`` commands registered."""
    fake = FakeGdb(snapshot, **kw)
    if register is None:
        from harness.gdb import commands

        register = commands.register
    register(fake)
    return fake
