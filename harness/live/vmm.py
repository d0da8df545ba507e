"""The harness's own VMM (``firmware/vmm``, /init of :mod:`harness.live.initramfs`): what it reports,
parsed, and a kernel booted to run it.

    boot, report = start_vmm(KernelImage.find(), guest="dirty-log", mode="vhe")
    with boot:                                   # the guest spins: its stage 2 is live
        report.memslots()                        # {(vm, slot): Memslot} as the VMM left them
        report.pages                             # PageRun: IPA run -> host PFNs, access r/w/x
        report.dirty[0].dirty_pages()            # page indexes KVM_GET_DIRTY_LOG marked
        capture(parse_target(str(boot.gdb_socket)))

The VMM runs as PID 1 of a Linux arm64 kernel with KVM, creates a VM (or two), memslots from
anonymous memory (2 MiB aligned; ``madvise(MADV_HUGEPAGE)`` on the slots meant for 2 MiB blocks,
``MADV_NOHUGEPAGE`` on the others), one vCPU at EL1 with the MMU off (IPA = address), and runs a
guest pattern named by ``vmm.guest=NAME`` (:data:`PATTERNS`):

* ``touch``: reads (each load must return its own address, planted by the VMM), writes (the VMM
  checks each store landed in its memory) and fetches (a planted ``ret``) runs of 4K pages and
  whole 2 MiB THP-backed blocks, then spins;
* ``dirty-log``: touch, then the VMM turns on ``KVM_MEM_LOG_DIRTY_PAGES`` on the THP slot (slot
  1), the guest writes :data:`DIRTY_PAGES` of it, the VMM reads ``KVM_GET_DIRTY_LOG``;
* ``memslot``: touch, then slot 2 is deleted and slot 3 moved to a new IPA; the guest writes the
  moved slot at its new IPA and loads from both old IPAs (now MMIO exits, reported);
* ``two-vms``: two VMs, one process and one vCPU each, each touching its own pages.

Each record is a console line ``@@vmm {json}`` (anywhere in the line: kernel messages may share
the console); addresses and PFNs are ``"0x..."`` strings, counts plain integers. A phase ends with
an MMIO store to :data:`MMIO_DONE` (outside every memslot). ``ready`` comes once every guest spins;
``error`` (``what``, ``errno``) leaves the VMM asleep, never exiting (it is PID 1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import InputError, MachineryError
from harness.live.kernel import KernelBoot, KernelImage

MARKER = "@@vmm "
PATTERNS = ("touch", "dirty-log", "memslot", "two-vms")
MMIO_DONE = 0x1000_0000  # firmware/vmm/guest.h
PAGE_SIZE = 4096
DIRTY_PAGES = (3, 5, 64, 511, 512, 700, 1023)  # firmware/vmm/vmm.c: pages of slot 1 dirty-log writes
PHASES = {"touch": ("touched", "spinning"), "dirty-log": ("touched", "dirtied", "spinning"),
          "memslot": ("touched", "moved", "spinning"), "two-vms": ("touched", "spinning")}
MEMSLOT_OPS = ("create", "log", "delete", "move")
PANIC = re.compile(r"Kernel panic - not syncing")


class RecordError(InputError):
    """A malformed ``@@vmm`` record; the message names the line (number and text)."""


class VmmFailed(MachineryError):
    """The VMM reported an error, or never became ready (the message carries what it said)."""


@dataclass(frozen=True)
class Start:
    pattern: str
    pid: int


@dataclass(frozen=True)
class Vm:
    vm: int
    pid: int
    ipa_limit: int  # KVM_CAP_ARM_VM_IPA_SIZE


@dataclass(frozen=True)
class Memslot:
    """A KVM_SET_USER_MEMORY_REGION the VMM made: ``op`` create, log (flags now have
    KVM_MEM_LOG_DIRTY_PAGES), delete (``size`` 0) or move (``ipa`` is the new one)."""

    vm: int
    op: str
    slot: int
    ipa: int
    size: int
    uaddr: int
    flags: int
    advice: str  # "hugepage" or "nohugepage": the madvise on its memory

    @property
    def log_dirty(self) -> bool:
        return bool(self.flags & 1)

    @property
    def end(self) -> int:
        return self.ipa + self.size


@dataclass(frozen=True)
class Vcpu:
    vm: int
    target: int  # KVM_ARM_PREFERRED_TARGET
    pc: int
    pstate: int
    jobs: int


@dataclass(frozen=True)
class PageRun:
    """``count`` guest pages from ``ipa`` (host ``uaddr``), touched by the guest in ``phase`` with
    ``access`` (a subset of "rwx"), backed by host PFNs ``pfn`` .. ``pfn + count - 1``
    (/proc/self/pagemap; 0 when not ``present``); ``thp``: /proc/kpageflags says KPF_THP."""

    vm: int
    phase: str
    slot: int
    ipa: int
    uaddr: int
    count: int
    pfn: int
    present: bool
    thp: bool
    access: str

    @property
    def size(self) -> int:
        return self.count * PAGE_SIZE

    @property
    def pa(self) -> int:
        return self.pfn * PAGE_SIZE

    def pages(self) -> Iterator[tuple[int, int]]:
        """(IPA, host PA) of each page."""
        for i in range(self.count):
            yield self.ipa + i * PAGE_SIZE, (self.pfn + i) * PAGE_SIZE if self.present else 0


@dataclass(frozen=True)
class DirtyLog:
    """KVM_GET_DIRTY_LOG of ``slot`` (``pages`` pages from ``ipa``): 64-bit words, bit i of word w
    is page 64 w + i."""

    vm: int
    slot: int
    ipa: int
    pages: int
    bitmap: tuple[int, ...]

    def dirty_pages(self) -> tuple[int, ...]:
        return tuple(w * 64 + b for w, word in enumerate(self.bitmap) for b in range(64) if word >> b & 1)

    def dirty_ipas(self) -> tuple[int, ...]:
        return tuple(self.ipa + p * PAGE_SIZE for p in self.dirty_pages())


@dataclass(frozen=True)
class Phase:
    vm: int
    name: str


@dataclass(frozen=True)
class Mmio:
    """A KVM_EXIT_MMIO other than a phase's: a guest access outside every memslot."""

    vm: int
    ipa: int
    len: int
    write: bool
    data: int


@dataclass(frozen=True)
class Ready:
    pattern: str
    vms: int


@dataclass(frozen=True)
class VmmErrorRecord:
    """``what`` failed (``errno``, 0 when no system call failed); ``detail``: the rest (ipa, reason...)."""

    vm: int | None
    what: str
    errno: int
    detail: Mapping[str, int | str] = field(default_factory=dict)

    def text(self) -> str:
        where = f"VM {self.vm}: " if self.vm is not None else ""
        more = "".join(f", {k} {v:#x}" if isinstance(v, int) else f", {k} {v}" for k, v in self.detail.items())
        return f"{where}{self.what} (errno {self.errno}{more})"


Record = Start | Vm | Memslot | Vcpu | PageRun | DirtyLog | Phase | Mmio | Ready | VmmErrorRecord

# event -> (class, {key: kind}); kinds: int, hex ("0x..." string), str, bool, hexlist; "?" marks optional.
_INT, _HEX, _STR, _BOOL, _HEXLIST = "int", "hex", "str", "bool", "hexlist"
_SCHEMA: dict[str, tuple[Callable[..., Record], dict[str, str]]] = {
    "start": (Start, {"pattern": _STR, "pid": _INT}),
    "vm": (Vm, {"vm": _INT, "pid": _INT, "ipa_limit": _INT}),
    "memslot": (Memslot, {"vm": _INT, "op": _STR, "slot": _INT, "ipa": _HEX, "size": _HEX, "uaddr": _HEX,
                          "flags": _INT, "advice": _STR}),
    "vcpu": (Vcpu, {"vm": _INT, "target": _INT, "pc": _HEX, "pstate": _HEX, "jobs": _INT}),
    "pages": (PageRun, {"vm": _INT, "phase": _STR, "slot": _INT, "ipa": _HEX, "uaddr": _HEX, "count": _INT,
                        "pfn": _HEX, "present": _BOOL, "thp": _BOOL, "access": _STR}),
    "dirty": (DirtyLog, {"vm": _INT, "slot": _INT, "ipa": _HEX, "pages": _INT, "bitmap": _HEXLIST}),
    "phase": (Phase, {"vm": _INT, "name": _STR}),
    "mmio": (Mmio, {"vm": _INT, "ipa": _HEX, "len": _INT, "write": _BOOL, "data": _HEX}),
    "ready": (Ready, {"pattern": _STR, "vms": _INT}),
}
_HEX_RE = re.compile(r"0x[0-9a-f]+\Z")


def _value(kind: str, v: Any, key: str) -> Any:
    if kind == _INT and isinstance(v, int) and not isinstance(v, bool):
        return v
    if kind == _HEX and isinstance(v, str) and _HEX_RE.match(v):
        return int(v, 16)
    if kind == _STR and isinstance(v, str):
        return v
    if kind == _BOOL and isinstance(v, bool):
        return v
    if kind == _HEXLIST and isinstance(v, list):
        return tuple(_value(_HEX, x, f"{key}[{i}]") for i, x in enumerate(v))
    want = {_INT: "an integer", _HEX: 'a "0x..." hex string', _STR: "a string", _BOOL: "true or false",
            _HEXLIST: 'a list of "0x..." hex strings'}[kind]
    raise ValueError(f"{key}: expected {want}, got {json.dumps(v)}")


def _build(obj: dict[str, Any]) -> Record:
    event = obj.get("event")
    if event == "error":
        what: str = _value(_STR, obj.get("what"), "what")
        errno: int = _value(_INT, obj.get("errno"), "errno")
        vm: int | None = None if obj.get("vm") is None else _value(_INT, obj["vm"], "vm")
        detail = {k: (_value(_HEX, v, k) if isinstance(v, str) and v.startswith("0x") else _value(_STR, v, k))
                  for k, v in obj.items() if k not in ("event", "what", "errno", "vm")}
        return VmmErrorRecord(vm, what, errno, detail)
    if not isinstance(event, str) or event not in _SCHEMA:
        known = ", ".join([*_SCHEMA, "error"])
        raise ValueError(f"event: expected one of {known}, got {json.dumps(event)}")
    cls, keys = _SCHEMA[event]
    unknown = sorted(set(obj) - set(keys) - {"event"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in a {event!r} record")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{missing[0]}: missing from a {event!r} record")
    args = {k: _value(kind, obj[k], k) for k, kind in keys.items()}
    if event == "memslot" and args["op"] not in MEMSLOT_OPS:
        raise ValueError(f"op: expected one of {', '.join(MEMSLOT_OPS)}, got {args['op']!r}")
    if event == "pages" and (not args["access"] or set(args["access"]) - set("rwx")):
        raise ValueError(f"access: expected letters of 'rwx', got {args['access']!r}")
    return cls(**args)


def parse_line(line: str) -> Record | None:
    """The record on one console line, or None if it carries none; ValueError if malformed."""
    at = line.find(MARKER)
    if at < 0:
        return None
    payload = line[at + len(MARKER):].strip()
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return _build(obj)


def parse_records(text: str | bytes, source: str = "console") -> list[Record]:
    """Every ``@@vmm`` record in a serial log, in order; other lines are ignored. RecordError names
    the first malformed one (``source:LINE``)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    out: list[Record] = []
    for n, line in enumerate(text.splitlines(), start=1):
        try:
            rec = parse_line(line)
        except ValueError as exc:
            raise RecordError(f"{source}:{n}: malformed @@vmm record: {exc}: {line.strip()!r}") from None
        if rec is not None:
            out.append(rec)
    return out


T = TypeVar("T")


@dataclass(frozen=True)
class VmmReport:
    """All the records of one boot, in order, with views by kind."""

    records: tuple[Record, ...]
    source: str = "console"

    def of(self, cls: type[T]) -> list[T]:
        return [r for r in self.records if isinstance(r, cls)]

    @property
    def start(self) -> Start | None:
        s = self.of(Start)
        return s[0] if s else None

    @property
    def ready(self) -> Ready | None:
        r = self.of(Ready)
        return r[0] if r else None

    @property
    def errors(self) -> list[VmmErrorRecord]:
        return self.of(VmmErrorRecord)

    @property
    def pages(self) -> list[PageRun]:
        return self.of(PageRun)

    @property
    def dirty(self) -> list[DirtyLog]:
        return self.of(DirtyLog)

    @property
    def mmio(self) -> list[Mmio]:
        return self.of(Mmio)

    @property
    def vms(self) -> list[int]:
        return sorted({v.vm for v in self.of(Vm)})

    def phases(self, vm: int = 0) -> list[str]:
        return [p.name for p in self.of(Phase) if p.vm == vm]

    def memslot_ops(self, vm: int = 0) -> list[Memslot]:
        return [m for m in self.of(Memslot) if m.vm == vm]

    def memslots(self, vm: int | None = None) -> dict[tuple[int, int], Memslot]:
        """The memslots as the VMM left them, ``(vm, slot) -> Memslot`` (deleted ones gone)."""
        out: dict[tuple[int, int], Memslot] = {}
        for m in self.of(Memslot):
            if vm is not None and m.vm != vm:
                continue
            if m.op == "delete":
                out.pop((m.vm, m.slot), None)
            else:
                out[(m.vm, m.slot)] = m
        return out

    def page_map(self, vm: int = 0, live: bool = False) -> dict[int, int]:
        """IPA -> host PA of every page the guest of VM ``vm`` touched, as reported when it touched
        it; ``live``: only IPAs inside the memslots as the VMM left them (not those of a slot since
        deleted, or of a moved slot's old place)."""
        slots = list(self.memslots(vm).values())
        return {ipa: pa for run in self.pages if run.vm == vm for ipa, pa in run.pages()
                if not live or any(m.ipa <= ipa < m.end for m in slots)}

    def check(self) -> VmmReport:
        """This report, if the VMM became ready without an error; VmmFailed otherwise."""
        if self.errors:
            raise VmmFailed(f"the VMM reported: {'; '.join(e.text() for e in self.errors)} ({self.source})")
        if self.ready is None:
            raise VmmFailed(f"the VMM never reported ready ({self.source})")
        return self


def parse_report(text: str | bytes, source: str = "console") -> VmmReport:
    return VmmReport(tuple(parse_records(text, source)), source)


def read_report(path: Path | str) -> VmmReport:
    """The records of a serial log file (RecordError names an unreadable file or a bad line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecordError(f"--vmm: cannot read {path}: {exc.strerror}") from None
    report = parse_report(data, str(path))
    if not report.records:
        raise RecordError(f"--vmm: {path} has no '@@vmm' record: not the console log of the harness's VMM")
    return report


def start_vmm(image: KernelImage, guest: str = "touch", mode: str = "vhe", *, cpu: str = "max", smp: int = 1,
              initrd: Path | str | None = None, log_dir: Path | str | None = None, timeout: float = 120.0,
              append: str = "", gdb_socket: Path | str | None = None) -> tuple[KernelBoot, VmmReport]:
    """Boot ``image`` with the VMM's initramfs (built if ``initrd`` is None) running ``guest``, wait for
    the VMM's ready record and return the running boot (close it: a context manager) with its
    checked report. VmmFailed (boot closed) if the VMM reported an error or the kernel panicked."""
    if guest not in PATTERNS:
        raise InputError(f"guest: expected one of {', '.join(PATTERNS)}, got {guest!r}")
    if initrd is None:
        from harness.live.initramfs import vmm_initramfs

        initrd = vmm_initramfs()
    boot = KernelBoot(image, mode=mode, cpu=cpu, smp=smp, initrd=initrd, guest=guest, log_dir=log_dir,
                      timeout=timeout, append=append, gdb_socket=gdb_socket).start()
    try:
        report = parse_report(boot.serial_log.read_bytes(), str(boot.serial_log))
        if PANIC.search(boot.settled):
            raise VmmFailed(f"the kernel panicked before the VMM was ready: {boot.settled.strip()}\n"
                            f"--- console (tail) ---\n{boot.console_tail(1500)}")
        report.check()
    except BaseException:
        boot.close()
        raise
    return boot, report


def records_text(records: Iterable[Mapping[str, Any]]) -> str:
    """Console lines for records given as JSON objects (for tests and tools that fake a VMM)."""
    return "".join(MARKER + json.dumps(dict(r), separators=(",", ":")) + "\n" for r in records)
