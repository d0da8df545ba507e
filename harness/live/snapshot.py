"""A live target's translation state, frozen: register values plus every reachable table page.

A :class:`Snapshot` is what ``harness attach`` captures from a running target (or loads from a
file) and everything later decoding needs: no other memory is ever read, so a snapshot decodes
and verifies the same way later, elsewhere.

File format (``harness attach --save FILE``), version 2: one JSON object (UTF-8)::

    {
      "format": "pgtable-harness-snapshot",
      "version": 2,
      "source": "unix:/tmp/gdb.sock",              # where it was captured (free text)
      "captured": "2026-11-24T23:40:00Z",
      "cpus": [                                     # every CPU read, one entry each, ascending
        {"cpu": 0,                                  # QEMU's CPU index (gdb thread N is CPU N - 1)
         "state": "running",                        # optional free text (gdb's thread details)
         "registers": {"TCR_EL2": "0x80853510", ...}},  # every register read, hex strings
        {"cpu": 1, "registers": {...}}
      ],
      "page_size": 4096,                            # bytes per captured page
      "pages": {"0x43a1e000": "<base64 of page_size bytes>", ...},
      "notes": {...}                                # optional free-form strings (banner, QEMU ...)
    }

The pages are the union of the table pages reachable from every CPU's regimes, each stored once.
Version 1 (still read) had one ``"registers"`` object instead of ``"cpus"``: the CPU gdb had
selected on connecting, which is QEMU's first (CPU 0); it loads as ``cpus = {0: registers}``.

Page addresses are physical and aligned to ``page_size``; pages are stored as read (physical
reads of addresses with no memory behind them read as zeros on QEMU). Unknown keys are ignored;
a missing key, a wrong type or another ``format``/``version`` is an :class:`SnapshotError`
naming the key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness import strict_json
from harness.arch.registers import Stage1Regs
from harness.core.pgtable import KvmPgtable
from harness.errors import InputError
from harness.live.regimes import Regime, RegimeUse, regime_key, regimes_by_cpu

FORMAT = "pgtable-harness-snapshot"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_U64 = struct.Struct("<Q")
MAX_DEPTH = 8  # nesting of a snapshot: {"cpus": [{"registers": {"TCR_EL2": "0x..."}}]} is 4 deep


class SnapshotError(InputError):
    """A snapshot file that cannot be read as one (the message names the key)."""


class MissingPage(SnapshotError, KeyError):
    """A table page the regimes reach is not in the snapshot (a KeyError too, for readers that
    probe memory that way)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NoSuchCpu(InputError):
    """A CPU the snapshot or target does not have (the message names ``--cpu`` and lists them)."""


@dataclass
class Snapshot:
    """Each CPU's register values (keyed by QEMU's CPU index) and the physical pages their
    tables are in (``page_size`` bytes each, keyed by address)."""

    cpus: dict[int, dict[str, int]]
    pages: dict[int, bytes]
    page_size: int = 4096
    source: str = ""
    captured: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    cpu_states: dict[int, str] = field(default_factory=dict)  # gdb's thread details, for the record

    def __post_init__(self) -> None:
        if not self.cpus:
            raise SnapshotError("cpus: a snapshot has the registers of one CPU at least")

    @property
    def registers(self) -> dict[str, int]:
        """The first CPU's registers (the only CPU's, in a one-CPU snapshot)."""
        return self.cpus[min(self.cpus)]

    def memory(self) -> SnapshotMemory:
        return SnapshotMemory(self.pages, self.page_size)

    # -- regimes -------------------------------------------------------------------------
    def uses(self) -> list[RegimeUse]:
        """The distinct regimes in use on the CPUs, each with its CPUs (:func:`regimes_by_cpu`)."""
        return regimes_by_cpu(self.cpus)

    def regimes(self) -> list[Regime]:
        """The distinct regimes in use on any CPU, in order of first use."""
        return [u.regime for u in self.uses()]

    def cpus_using(self, regime: Regime) -> tuple[int, ...]:
        """The CPUs whose registers put this regime (the same one: :func:`regime_key`) in use."""
        key = regime_key(regime)
        return next((u.cpus for u in self.uses() if regime_key(u.regime) == key), ())

    def only_cpu(self, cpu: int) -> Snapshot:
        """The same snapshot restricted to one CPU's registers (pages kept as captured)."""
        if cpu not in self.cpus:
            raise NoSuchCpu(f"--cpu: {cpu} is not a CPU of this snapshot (its CPUs: "
                            f"{', '.join(map(str, sorted(self.cpus)))})")
        states = {cpu: self.cpu_states[cpu]} if cpu in self.cpu_states else {}
        return replace(self, cpus={cpu: self.cpus[cpu]}, cpu_states=states)

    # -- file form -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        cpus = []
        for cpu in sorted(self.cpus):
            entry: dict[str, Any] = {"cpu": cpu}
            if cpu in self.cpu_states:
                entry["state"] = self.cpu_states[cpu]
            entry["registers"] = {k: f"{v:#x}" for k, v in sorted(self.cpus[cpu].items())}
            cpus.append(entry)
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "captured": self.captured,
            "cpus": cpus,
            "page_size": self.page_size,
            "pages": {f"{pa:#x}": base64.b64encode(data).decode("ascii")
                      for pa, data in sorted(self.pages.items())},
            "notes": dict(self.notes),
        }

    def save(self, path: Path | str) -> None:
        """Write the file whole or not at all (a temporary sibling renamed over ``path``); an
        OSError names the path."""
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.to_json(), indent=1) + "\n")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def from_json(cls, obj: object, where: str = "snapshot") -> Snapshot:
        if not isinstance(obj, dict):
            raise SnapshotError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if obj.get("format") != FORMAT:
            raise SnapshotError(f"{where}: format: expected {FORMAT!r}, got {obj.get('format')!r}")
        version = obj.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise SnapshotError(f"{where}: version: expected one of {', '.join(map(str, READABLE_VERSIONS))}, "
                                f"got {version!r}")
        page_size = obj.get("page_size")
        if not isinstance(page_size, int) or page_size not in (4096, 16384, 65536):
            raise SnapshotError(f"{where}: page_size: expected 4096, 16384 or 65536, got {page_size!r}")
        states: dict[int, str] = {}
        if version == 1:
            cpus = {0: _hex_map(obj.get("registers"), f"{where}: registers")}
        else:
            cpus, states = _cpus(obj.get("cpus"), f"{where}: cpus")
        raw_pages = obj.get("pages")
        if not isinstance(raw_pages, dict):
            raise SnapshotError(f"{where}: pages: expected an object of address: base64, "
                                f"got {type(raw_pages).__name__}")
        pages: dict[int, bytes] = {}
        for key, text in raw_pages.items():
            pa = _hex(key, f"{where}: pages key")
            if pa % page_size:
                raise SnapshotError(f"{where}: pages[{key}]: not aligned to page_size {page_size:#x}")
            try:
                data = base64.b64decode(str(text), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise SnapshotError(f"{where}: pages[{key}]: expected base64: {exc}") from None
            if len(data) != page_size:
                raise SnapshotError(f"{where}: pages[{key}]: expected {page_size} bytes, got {len(data)}")
            pages[pa] = data
        notes = obj.get("notes", {})
        if not isinstance(notes, dict):
            raise SnapshotError(f"{where}: notes: expected an object")
        return cls(cpus, pages, page_size, str(obj.get("source", "")), str(obj.get("captured", "")),
                   {str(k): str(v) for k, v in notes.items()}, states)

    @classmethod
    def load(cls, path: Path | str) -> Snapshot:
        p = Path(path)
        try:
            text = p.read_bytes().decode("utf-8")
        except OSError as exc:
            raise SnapshotError(f"snapshot file {p}: cannot read it: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise SnapshotError(f"snapshot file {p}: not a snapshot (not UTF-8 text: byte {exc.start} is "
                                f"{exc.object[exc.start]:#04x})") from None
        try:
            obj = strict_json.loads(text, MAX_DEPTH)
        except strict_json.JsonError as exc:
            raise SnapshotError(f"snapshot file {p}: not a snapshot ({exc})") from None
        except json.JSONDecodeError as exc:
            raise SnapshotError(f"snapshot file {p}: not JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_json(obj, f"snapshot file {p}")


def _cpus(value: object, where: str) -> tuple[dict[int, dict[str, int]], dict[int, str]]:
    if not isinstance(value, list) or not value:
        raise SnapshotError(f"{where}: expected a non-empty list of {{\"cpu\": N, \"registers\": {{...}}}}")
    cpus: dict[int, dict[str, int]] = {}
    states: dict[int, str] = {}
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise SnapshotError(f"{where}[{i}]: expected an object with cpu and registers")
        cpu = entry.get("cpu")
        if not isinstance(cpu, int) or isinstance(cpu, bool) or cpu < 0:
            raise SnapshotError(f"{where}[{i}].cpu: expected a CPU index (0, 1, ...), got {cpu!r}")
        if cpu in cpus:
            raise SnapshotError(f"{where}[{i}].cpu: CPU {cpu} appears twice")
        cpus[cpu] = _hex_map(entry.get("registers"), f"{where}[{i}].registers")
        if "state" in entry:
            states[cpu] = str(entry["state"])
    return cpus, states


def _hex(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        num = value
    elif isinstance(value, str):
        try:
            num = int(value, 0)
        except ValueError:
            raise SnapshotError(f"{where}: expected a number like '0x1000', got {value!r}") from None
    else:
        raise SnapshotError(f"{where}: expected a number like '0x1000', got {value!r}")
    if not 0 <= num < 1 << 64:
        raise SnapshotError(f"{where}: expected a 64-bit value, got {value!r}")
    return num


def _hex_map(value: object, where: str) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise SnapshotError(f"{where}: expected an object of name: value")
    return {str(k): _hex(v, f"{where}[{k}]") for k, v in value.items()}


class SnapshotMemory:
    """The captured pages as table memory (``read64`` + ``contains``), for the model's decoders.

    A read outside the captured pages is outside modelled memory: ``contains`` says no and
    ``read64`` raises KeyError (the walkers check ``contains`` first).
    """

    def __init__(self, pages: Mapping[int, bytes], page_size: int) -> None:
        self.pages = pages
        self.page_size = page_size

    def contains(self, pa: int, length: int = 8) -> bool:
        base = pa - pa % self.page_size
        return base in self.pages and pa + length <= base + self.page_size

    def read64(self, pa: int) -> int:
        base = pa - pa % self.page_size
        page = self.pages.get(base)
        if page is None:
            raise MissingPage(f"snapshot: pages: no page {base:#x}, which the tables reach (word {pa:#x}): "
                              "the snapshot is incomplete")
        if pa & 7:
            raise KeyError(f"pa {pa:#x} is not an aligned word of a captured page")
        return int(_U64.unpack_from(page, pa - base)[0])


# ID_AA64MMFR0_EL1 of QEMU's -cpu max (10.0): PARange 52 bits, 4K/16K/64K at both stages, LPA2.
QEMU_MAX_MMFR0 = 0x2100032310201126


def from_tables(table: KvmPgtable, mmfr0: int = QEMU_MAX_MMFR0, source: str = "model") -> Snapshot:
    """A snapshot of tables the model built: the register values that install them (as a live
    target would show them) and every page of the pool in use, in 4K pieces."""
    pool = table.mem
    regs: dict[str, int] = {"ID_AA64MMFR0_EL1": mmfr0, "SCTLR_EL2": 0, "HCR_EL2": 0, "TCR_EL2": 0,
                            "TTBR0_EL2": 0, "VTCR_EL2": 0, "VTTBR_EL2": 0, "MAIR_EL2": 0}
    r = table.regs()
    if isinstance(r, Stage1Regs):
        regs.update(SCTLR_EL2=r.sctlr_el2_set, HCR_EL2=r.hcr_el2_set, TCR_EL2=r.tcr_el2, TTBR0_EL2=r.ttbr0_el2,
                    MAIR_EL2=r.mair_el2)
    else:
        regs.update(HCR_EL2=r.hcr_el2_set, VTCR_EL2=r.vtcr_el2, VTTBR_EL2=r.vttbr_el2)
    data = pool.export().data
    pages: dict[int, bytes] = {}
    unit = 4096
    for off in range(0, pool.used_extent(), pool.page_size):
        if pool.refcount(pool.base + off):
            for piece in range(off, off + pool.page_size, unit):
                pages[pool.base + piece] = data[piece : piece + unit]
    return Snapshot({0: regs}, pages, unit, source=source)
