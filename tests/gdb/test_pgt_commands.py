"""gdb's ``pgt`` commands (:mod:`harness.gdb`) on a stand-in gdb (:mod:`fakegdb`) whose target is a
snapshot of tables the model built: no QEMU, no real gdb (but for the bootstrap tests at the end,
which run gdb-multiarch without a target).

* what ``pgt`` prints equals what ``harness attach`` prints for the same snapshot saved to a file;
* the cases today's decoders get wrong (facts file: gef, gdb-pt-dump) decode rightly;
* every command leaves gdb as it found it (virtual memory reads, thread, frame), whether it
  succeeds, fails or is interrupted (Ctrl-C, gdb's Quit) at any point;
* every failure is one ``gdb.GdbError`` line starting with ``pgt SUB:``;
* help texts, ``pgt regimes``, and ``pgt.py``'s loading in a real gdb.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakegdb import FakeGdb, GdbError, install
from fakegdb import error as GdbRuntimeError

from harness.arch.descriptors import S1_PXN
from harness.arch.registers import HCR_VM, SCTLR_WXN, TCR_E2H_TG1
from harness.check.attach import decode
from harness.cli import main
from harness.core.dump import mapped_ranges
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable, KvmPgtable, Stage2Pgtable
from harness.core.prot import Prot
from harness.core.walker import Walker, WalkFlags
from harness.gdb import script_path
from harness.gdb.commands import PREFIX, SUBCOMMANDS, SUMMARY
from harness.live.snapshot import QEMU_MAX_MMFR0, Snapshot, from_tables

KIB, MIB = 1 << 10, 1 << 20
SOURCE = "localhost:1234"  # the fake connection's details
PAGE = {"4K": 4096, "16K": 16384, "64K": 65536}
HYP_POOL, GUEST_POOL = 0x4800_0000, 0x4A00_0000


# ---------------------------------------------------------------------------------------------
# Targets: model-built tables, as a live QEMU would show them.


def pool_for(granule: str, base: int = HYP_POOL) -> PagePool:
    return PagePool(base, 256 * PAGE[granule], PAGE[granule])


def reachable(snap: Snapshot) -> Snapshot:
    """The snapshot with only the 4K pieces its regimes' walks read: what a capture of a live
    target holding these tables reads (from_tables keeps every page of the pool in use, e.g. all
    of a 16K PGD page of which the walk reads one word)."""
    mem = snap.memory()
    touched: set[int] = set()

    class Recording:
        def read64(self, pa: int) -> int:
            touched.add(pa - pa % snap.page_size)
            return mem.read64(pa)

    for regime in snap.regimes():
        mapped_ranges(Recording(), regime.geom, regime.root)
    return replace(snap, pages={pa: snap.pages[pa] for pa in sorted(touched)})


def live(snap: Snapshot) -> Snapshot:
    """``snap`` as QEMU's gdbstub shows it: the fake connection as its source, gdb's thread
    details, the core registers a capture also reads (cpsr at EL2h, pc), a TTBR1_EL2 with bit 63
    set (gdb gives it as a negative int64), and only the pages the walks read."""
    for cpu, regs in snap.cpus.items():
        regs.setdefault("cpsr", 0x3C9)
        regs.setdefault("pc", 0x4000_1000 + 0x40 * cpu)
        regs.setdefault("TTBR1_EL2", 0x8001_0000_4900_0000)
    return reachable(replace(snap, source=SOURCE, cpu_states={c: f"CPU#{c} [running]" for c in snap.cpus}))


def target(table: KvmPgtable, mmfr0: int = QEMU_MAX_MMFR0) -> Snapshot:
    return live(from_tables(table, mmfr0))


def demo_4k_39() -> KvmPgtable:
    t = HypPgtable(pool_for("4K"), "4K", 39)
    t.map(0x4000_0000, 2 * MIB, 0x4000_0000, Prot.RX)
    t.map(0x4020_0000, 64 * KIB, 0x5000_0000, Prot.RW)
    t.map(0x0900_0000, 4096, 0x0900_0000, Prot.RW | Prot.DEVICE)
    return t


def hvhe_findings() -> KvmPgtable:
    """Linux 6.12's hVHE hyp execute-never (PXN clear) with text, rodata, data: findings to print."""
    t = HypPgtable(pool_for("4K"), "4K", 48, 48, e2h=True)
    t.map(0x4000_0000, 64 * KIB, 0x5000_0000, Prot.RX)
    t.map(0x4010_0000, 64 * KIB, 0x5010_0000, Prot.R)
    t.map(0x4020_0000, 64 * KIB, 0x5020_0000, Prot.RW)

    def clear_pxn(addr: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
        t.mem.write64(ptep, t.mem.read64(ptep) & ~S1_PXN.mask)

    t.walk(0, t.geom.limit, Walker(clear_pxn, WalkFlags.LEAF))
    return t


def s1_16k_47() -> KvmPgtable:
    t = HypPgtable(pool_for("16K"), "16K", 47)
    t.map(0x4000_0000, 32 * MIB, 0x6000_0000, Prot.RX)
    t.map(0x7FFF_FFFF_C000, 16 * KIB, 0x4400_0000, Prot.RW)
    return t


def s1_64k_52() -> KvmPgtable:
    t = HypPgtable(pool_for("64K"), "64K", 48, 52)
    t.map(0x4000_0000, 512 * MIB, 0xF_FFFF_E000_0000, Prot.RW)
    t.map(0x8000_0000, 64 * KIB, 0xA_0000_0001_0000, Prot.R)
    return t


def s1_4k_52_lpa2() -> KvmPgtable:
    t = HypPgtable(pool_for("4K"), "4K", 52, 52, lpa2=True)
    t.map(0x4000_0000, 32 * MIB, 0xF_FFFF_FE00_0000, Prot.RW)
    t.map((1 << 52) - 32 * MIB, 32 * MIB, 0xC_0000_4000_0000, Prot.RX)
    return t


def s2_4k_40_concat() -> KvmPgtable:
    t = Stage2Pgtable(pool_for("4K"), "4K", 40, 40, start_level=1)
    t.map(0x4000_0000, 2 * MIB, 0x5000_0000, Prot.RW)
    t.map((1 << 40) - 2 * MIB, 2 * MIB, 0x6000_0000, Prot.RX)
    t.map(0x0900_0000, 4096, 0x0900_0000, Prot.RW | Prot.DEVICE)
    return t


def s2_16k_42() -> KvmPgtable:
    t = Stage2Pgtable(pool_for("16K"), "16K", 42)
    t.map(0x4000_0000, 32 * MIB, 0x4000_0000, Prot.RWX)
    t.map(0x3_0000_0000, 16 * KIB, 0x5000_0000, Prot.R)
    return t


def s2_64k_52() -> KvmPgtable:
    t = Stage2Pgtable(pool_for("64K"), "64K", 48, 52)
    t.map(0x4000_0000, 512 * MIB, 0xF_FFFF_E000_0000, Prot.RW)
    t.map(0x8000_0000, 64 * KIB, 0xA_0000_0001_0000, Prot.R)
    return t


def smp() -> Snapshot:
    """:func:`built_smp`'s snapshot, a copy the test may change."""
    return copy.deepcopy(built_smp())


@functools.cache
def built_smp() -> Snapshot:
    """Two vCPUs: both at the hyp's EL2 (4K, 48 bits: four levels, several table pages), vCPU 1
    also running a guest (stage 2 on, 4K 40 bits, VMID 1)."""
    hyp = HypPgtable(pool_for("4K"), "4K", 48, 48)
    hyp.map(0x4000_0000, 2 * MIB, 0x4000_0000, Prot.RX)
    hyp.map(0x4020_0000, 64 * KIB, 0x5000_0000, Prot.RW)
    hyp.map(0x8000_0000_0000, 4096, 0x0900_0000, Prot.RW | Prot.DEVICE)
    guest = Stage2Pgtable(PagePool(GUEST_POOL, 256 * 4096, 4096), "4K", 40)
    guest.map(0x4000_0000, 2 * MIB, 0x6000_0000, Prot.RW)
    h, g = from_tables(hyp), from_tables(guest)
    cpu1 = {**h.registers, "HCR_EL2": h.registers["HCR_EL2"] | HCR_VM.mask,
            "VTCR_EL2": g.registers["VTCR_EL2"], "VTTBR_EL2": g.registers["VTTBR_EL2"]}
    return live(Snapshot({0: dict(h.registers), 1: cpu1}, {**h.pages, **g.pages}, 4096))


TARGETS: dict[str, Callable[[], Snapshot]] = {
    "s1-4K-39": lambda: target(demo_4k_39()),
    "s1-4K-48-hvhe-findings": lambda: _wxn(target(hvhe_findings())),
    "s1-16K-47": lambda: target(s1_16k_47()),
    "s1-64K-52": lambda: target(s1_64k_52()),
    "s1-4K-52-lpa2": lambda: target(s1_4k_52_lpa2()),
    "s2-4K-40-2pgd": lambda: target(s2_4k_40_concat()),
    "s2-16K-42": lambda: target(s2_16k_42()),
    "s2-64K-52": lambda: target(s2_64k_52()),
    "smp-hyp-guest": smp,
}


def _wxn(snap: Snapshot) -> Snapshot:
    snap.registers["SCTLR_EL2"] |= SCTLR_WXN.mask
    return snap


# ---------------------------------------------------------------------------------------------
# Running pgt and attach.


def pgt(fake: FakeGdb, args: str) -> str:
    """``pgt ARGS`` typed at gdb's prompt; what it wrote to gdb's console. Anything other than
    success fails the test, a KeyboardInterrupt too (it must not reach pytest)."""
    start = len(fake.out)
    try:
        fake.run(f"{PREFIX} {args}")
    except BaseException as exc:
        pytest.fail(f"pgt {args}: {type(exc).__name__}: {exc}")
    return "".join(fake.out[start:])


def pgt_json(fake: FakeGdb, args: str) -> Any:
    return json.loads(pgt(fake, args))


def pgt_error(fake: FakeGdb, args: str) -> str:
    """``pgt ARGS`` must fail with one gdb.GdbError line (nothing else reaches gdb); the line."""
    try:
        fake.run(f"{PREFIX} {args}")
    except BaseException as exc:
        assert type(exc) is GdbError, f"pgt {args}: {type(exc).__name__} reached gdb: {exc}"
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        assert "internal error" not in message and "Traceback" not in message, message
        return message
    pytest.fail(f"pgt {args}: no error")


def attach(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    code = main(["attach", *argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def no_timings(obj: dict[str, Any]) -> dict[str, Any]:
    assert "timings" in obj
    return {k: v for k, v in obj.items() if k != "timings"}


def served(snap: Snapshot, **kw: Any) -> FakeGdb:
    return install(snap, **kw)


def first_address(snap: Snapshot) -> int:
    return next(rd.ranges[0].va for rd in decode(snap) if rd.ranges) + 0x123


# ---------------------------------------------------------------------------------------------
# 1. What pgt prints is what harness attach prints.


@pytest.mark.parametrize("name", list(TARGETS))
def test_ranges_equal_attach(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = TARGETS[name]()
    path = tmp_path / "snap.json"
    snap.save(path)
    fake = served(snap)
    js, text = tmp_path / "pgt.json", tmp_path / "pgt.txt"
    assert pgt(fake, f"ranges --json --output {js}") == ""  # nothing on the console
    assert pgt(fake, f"ranges --output {text}") == ""
    want = json.loads(attach(capsys, str(path), "--json"))
    got = json.loads(js.read_text())
    assert no_timings(got) == no_timings(want)  # source included: the fake's connection
    assert got["regimes"] and all(r["ranges"] for r in got["regimes"])
    assert text.read_text() == attach(capsys, str(path))
    assert fake.uncaptured == []  # nothing read but the tables' pages


@pytest.mark.parametrize("filters", ["--perm r!w", "--range 0x40000000+0x100000 --perm x",
                                     "--range 0x40000000:0x40000800 --regime stage2", "--regime el2"])
def test_filters_equal_attach(filters: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = smp()
    path = tmp_path / "snap.json"
    snap.save(path)
    fake = served(snap)
    got = pgt_json(fake, f"ranges --json {filters}")
    assert no_timings(got) == no_timings(json.loads(attach(capsys, str(path), "--json", *filters.split())))
    assert pgt(fake, f"ranges {filters}") == attach(capsys, str(path), *filters.split())


@pytest.mark.parametrize("name", ["s1-4K-39", "s1-4K-52-lpa2", "s2-4K-40-2pgd", "smp-hyp-guest"])
def test_explain_equals_attach(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = TARGETS[name]()
    path = tmp_path / "snap.json"
    snap.save(path)
    fake = served(snap, symbols={"hyp_text": 0x4000_0000})
    for addr in (first_address(snap), 0x1234_5000):  # mapped, and a hole
        want = json.loads(attach(capsys, str(path), "--json", "--explain", hex(addr)))["explain"]
        assert want and want[0]["address"] == addr
        assert pgt_json(fake, f"explain {addr:#x} --json") == want
        text = pgt(fake, f"explain {addr:#x}")
        assert text.strip() and not text.startswith("\n")
        full = attach(capsys, str(path), "--explain", hex(addr))
        assert full.endswith("\n\n" + text)  # attach's walk lines, all of them
        assert all(f"{item['regime']} (" in text for item in want)
    # gdb expressions: $pc (vCPU 0's, the selected thread's), &symbol + offset, $x0
    pc = snap.cpus[0]["pc"]
    assert pgt_json(fake, "explain $pc --json") == json.loads(
        attach(capsys, str(path), "--json", "--explain", hex(pc)))["explain"]
    assert [e["address"] for e in pgt_json(fake, "explain '&hyp_text + 0x10' --json")] == [0x4000_0010] * len(want)
    fake.extra_registers["x0"] = -0x10 & (1 << 64) - 1  # a negative int64 in gdb: masked to 64 bits
    assert {e["address"] for e in pgt_json(fake, "explain $x0 --json")} == {(1 << 64) - 0x10}


@pytest.mark.parametrize("name", ["s1-4K-39", "s1-16K-47", "s2-64K-52", "smp-hyp-guest"])
def test_save_then_attach_decodes_the_same(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = TARGETS[name]()
    original = tmp_path / "snap.json"
    snap.save(original)
    fake = served(snap)
    saved = tmp_path / "saved.json"
    said = pgt(fake, f"save {saved}")
    assert said == f"saved {len(snap.pages)} table pages and the registers of " \
                   f"vCPU{'s' if len(snap.cpus) > 1 else ''} {', '.join(map(str, sorted(snap.cpus)))} to {saved}\n"
    back = Snapshot.load(saved)
    assert back.cpus == snap.cpus  # every register, unsigned (TTBR1_EL2's bit 63 too)
    assert back.pages == snap.pages and back.source == SOURCE
    assert back.cpu_states == snap.cpu_states
    assert back.notes.get("vm_status") == "VM status: paused"
    assert no_timings(json.loads(attach(capsys, str(saved), "--json"))) == no_timings(
        json.loads(attach(capsys, str(original), "--json")))
    assert no_timings(json.loads(attach(capsys, str(saved), "--json"))) == no_timings(pgt_json(fake, "ranges --json"))


def test_cpu_option_equals_attach(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = smp()
    path = tmp_path / "smp.json"
    snap.save(path)
    fake = served(snap)
    for cpu in (0, 1):
        # a capture of one vCPU reads the pages of its regimes only (a file keeps all it has)
        one = tmp_path / f"cpu{cpu}.json"
        reachable(snap.only_cpu(cpu)).save(one)
        got = pgt_json(fake, f"ranges --json --cpu {cpu}")
        assert no_timings(got) == no_timings(json.loads(attach(capsys, str(one), "--json", "--cpu", str(cpu))))
        assert [c["cpu"] for c in got["cpus"]] == [cpu]
        assert pgt(fake, f"ranges --cpu {cpu}") == attach(capsys, str(one), "--cpu", str(cpu))
    for regime in ("el2", "stage2"):
        assert no_timings(pgt_json(fake, f"ranges --json --regime {regime}")) == no_timings(
            json.loads(attach(capsys, str(path), "--json", "--regime", regime)))


def test_no_regime_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vCPUs with the MMU off and stage 2 off: the header alone, as attach prints it."""
    snap = smp()
    for regs in snap.cpus.values():
        regs.update(SCTLR_EL2=0, HCR_EL2=0)
    snap = reachable(snap)
    assert snap.pages == {}
    path = tmp_path / "off.json"
    snap.save(path)
    fake = served(snap)
    assert pgt(fake, "ranges") == attach(capsys, str(path))
    assert no_timings(pgt_json(fake, "ranges --json")) == no_timings(json.loads(attach(capsys, str(path), "--json")))
    assert pgt(fake, "explain 0x40001000") == "no regime in use\n"
    assert pgt_json(fake, "explain 0x40001000 --json") == []
    assert "no regime enabled" in pgt(fake, "regimes --cpu all")
    assert fake.reads == [] and fake.phymem == 0


FAKE_ATTACH = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
out = os.environ["FAKE_ATTACH_OUT"]
json.dump(args, open(out + "/argv.json", "w"))
shutil.copy(args[3], out + "/snapshot.json")
print("checked 12 ranges: all matched")
print("bye")
sys.exit(int(os.environ["FAKE_ATTACH_EXIT"]))
"""


@pytest.mark.parametrize(("code", "error"), [(0, None), (1, "pgt verify: verify: the MMU disagreed with the decode"),
                                             (3, "pgt verify: verify: harness attach --verify ended with exit "
                                                 "status 3")])
def test_verify_hands_the_snapshot_to_attach(code: int, error: str | None, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``pgt verify`` captures here and runs ``harness attach SNAPSHOT --verify`` in the harness's
    environment (HARNESS_GDB_PYTHON; a stand-in here), its output streamed into gdb's console."""
    fake_python = tmp_path / "python"
    fake_python.write_text(FAKE_ATTACH.format(python=sys.executable))
    fake_python.chmod(0o755)
    monkeypatch.setenv("HARNESS_GDB_PYTHON", str(fake_python))
    monkeypatch.setenv("FAKE_ATTACH_OUT", str(tmp_path))
    monkeypatch.setenv("FAKE_ATTACH_EXIT", str(code))
    snap = smp()
    fake = served(snap)
    fake.select(2, 1)
    args = "verify --regime stage2 --samples 5 --seed 7 --timeout 30 --json"
    if error is None:
        assert pgt(fake, args) == "checked 12 ranges: all matched\nbye\n"
    else:
        assert pgt_error(fake, args).startswith(error)
        assert fake.stdout.endswith("bye\n")  # its output, before the error
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:3] == ["-m", "harness.cli", "attach"] and argv[4] == "--verify"
    assert argv[5:] == ["--samples", "5", "--seed", "7", "--timeout", "30.0", "--regime", "stage2", "--json"]
    assert not Path(argv[3]).exists()  # the temporary snapshot is gone
    back = Snapshot.load(tmp_path / "snapshot.json")
    assert back.cpus == snap.cpus and back.pages == snap.pages
    assert fake.phymem == 0 and fake.selection == (2, 1)


# A missing interpreter (HARNESS_GDB_PYTHON) is one error line naming it, not an internal error.
def test_verify_without_the_harness_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "gone" / "bin" / "python"
    monkeypatch.setenv("HARNESS_GDB_PYTHON", str(missing))
    fake = served(smp())
    fake.select(2, 1)
    message = pgt_error(fake, "verify")  # one GdbError line, not an "internal error"
    assert message.startswith("pgt verify: ") and str(missing) in message
    assert fake.phymem == 0 and fake.selection == (2, 1)


# ---------------------------------------------------------------------------------------------
# 2. The cases today's decoders get wrong (facts file: "What the decoders people use today get wrong").


def ranges_of(fake: FakeGdb, args: str = "") -> list[tuple[int, int, int, str]]:
    (reg,) = pgt_json(fake, f"ranges --json {args}")["regimes"]
    return [(r["va"], r["size"], r["pa"], r["perms"]) for r in reg["ranges"]]


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("granule", ["4K", "16K"])
def test_ds0_sh_bits_are_not_pa_51_50(granule: str, stage: int) -> None:
    """gef takes bits [9:8] as PA[51:50] whenever PARange is 52 bits; with DS = 0 they are SH."""
    block = 2 * MIB if granule == "4K" else 32 * MIB
    pa = (1 << 48) - block  # the top block of a 48-bit output: PA[47:...] all ones
    t: KvmPgtable = (HypPgtable(pool_for(granule), granule, 48, 48) if stage == 1
                     else Stage2Pgtable(pool_for(granule), granule, 48, 48))
    t.map(0x4000_0000, block, pa, Prot.RW)
    t.map(0x8000_0000, PAGE[granule], 0x4000_0000, Prot.R)
    snap = target(t, QEMU_MAX_MMFR0)
    assert QEMU_MAX_MMFR0 & 0xF == 6  # PARange: 52 bits
    fake = served(snap)
    (reg,) = pgt_json(fake, "ranges --json")["regimes"]
    assert reg["decoded"]["lpa2"] is False
    assert [r["SH"] for r in reg["ranges"]] == [3, 3]  # inner shareable in bits [9:8] ...
    assert [(r["va"], r["size"], r["pa"]) for r in reg["ranges"]] == [
        (0x4000_0000, block, pa), (0x8000_0000, PAGE[granule], 0x4000_0000)]
    assert all(r["pa"] >> 48 == 0 for r in reg["ranges"])  # ... and no PA bit above 47
    walk = pgt_json(fake, f"explain {0x4000_0000 + block - 8:#x} --json")
    assert walk[0]["pa"] == pa + block - 8


@pytest.mark.parametrize(("ia_bits", "pa_bits", "pgd_pages"), [(40, 40, 2), (42, 42, 8), (43, 44, 16)])
def test_every_concatenated_stage2_pgd_page(ia_bits: int, pa_bits: int, pgd_pages: int) -> None:
    """gef walks the first of concatenated stage-2 PGD pages only."""
    t = Stage2Pgtable(pool_for("4K"), "4K", ia_bits, pa_bits, start_level=1)
    assert t.geom.pgd_pages == pgd_pages
    last = (1 << ia_bits) - 2 * MIB  # indexed from the last PGD page
    middle = (1 << (ia_bits - 1)) + 0x4000_0000  # a page of the second half
    t.map(0x4000_0000, 2 * MIB, 0x5000_0000, Prot.RW)
    t.map(middle, 4096, 0x5800_0000, Prot.R)
    t.map(last, 2 * MIB, 0x6000_0000, Prot.RX)
    fake = served(target(t))
    assert ranges_of(fake) == [(0x4000_0000, 2 * MIB, 0x5000_0000, "rw-"), (middle, 4096, 0x5800_0000, "r--"),
                               (last, 2 * MIB, 0x6000_0000, "r-x")]
    (walk,) = pgt_json(fake, f"explain {last + 0x1234:#x} --json")
    assert walk["ok"] and walk["pa"] == 0x6000_1234


GEOMETRY_CASES = {
    "s1-4K-39": (demo_4k_39, 1),
    "s1-4K-40": (lambda: HypPgtable(pool_for("4K"), "4K", 40), 0),
    "s1-4K-48": (lambda: HypPgtable(pool_for("4K"), "4K", 48, 44), 0),
    "s1-4K-52-lpa2": (s1_4k_52_lpa2, -1),
    "s1-16K-36": (lambda: HypPgtable(pool_for("16K"), "16K", 36, 40), 2),
    "s1-16K-47-hvhe": (lambda: HypPgtable(pool_for("16K"), "16K", 47, e2h=True), 1),
    "s1-16K-48": (lambda: HypPgtable(pool_for("16K"), "16K", 48, 48), 0),
    "s1-64K-52": (s1_64k_52, 1),
    "s1-64K-42": (lambda: HypPgtable(pool_for("64K"), "64K", 42, 42), 2),
    "s2-4K-40-sl1": (s2_4k_40_concat, 1),
    "s2-4K-40-sl0": (lambda: Stage2Pgtable(pool_for("4K"), "4K", 40, 40, start_level=0), 0),
    "s2-4K-34-sl2": (lambda: Stage2Pgtable(pool_for("4K"), "4K", 34, 36, start_level=2), 2),  # 16 PGD pages
    "s2-16K-42": (s2_16k_42, None),
    "s2-64K-52": (s2_64k_52, None),
}


@pytest.mark.parametrize("name", list(GEOMETRY_CASES))
def test_ps_start_level_and_pgd_pages(name: str) -> None:
    """gef prints PS and the start level wrongly: the decoded fields are the model's geometry."""
    build, level = GEOMETRY_CASES[name]
    t = build()
    g = t.geom
    if level is not None:
        assert g.start_level == level
    fake = served(target(t))
    (reg,) = pgt_json(fake, "ranges --json")["regimes"]
    dec = reg["decoded"]
    assert (dec["stage"], dec["granule"], dec["ia_bits"], dec["pa_bits"], dec["start_level"], dec["levels"],
            dec["pgd_pages"], dec["lpa2"], dec["e2h"]) == (
        int(g.stage), g.granule.label, g.ia_bits, g.pa_bits, g.start_level, g.levels, g.pgd_pages, g.lpa2, g.e2h)
    assert reg["geometry"].startswith(g.describe().split(" pa=")[0])  # stage, granule, ia (pamax may differ)
    text = pgt(fake, "regimes")
    assert f"{reg['regime']} (vCPU 0): {reg['geometry']}, root {reg['root']:#x}" in text


@pytest.mark.parametrize("stage", [1, 2])
def test_4k_40_bit_is_four_levels(stage: int) -> None:
    """gdb-pt-dump is one level short when (ia_bits - 12) mod 9 = 1 (4K, 40 bits: level 0 has 2
    entries)."""
    t: KvmPgtable = (HypPgtable(pool_for("4K"), "4K", 40) if stage == 1
                     else Stage2Pgtable(pool_for("4K"), "4K", 40, 40, start_level=0))
    assert (t.geom.start_level, t.geom.pgd_entries) == (0, 2)
    top = (1 << 40) - 4096
    t.map(0x1000, 4096, 0x5000_0000, Prot.RX)
    t.map(0x80_4000_0000, 2 * MIB, 0x5020_0000, Prot.RW)  # behind level-0 entry 1
    t.map(top, 4096, 0x5000_1000, Prot.R)
    fake = served(target(t))
    assert ranges_of(fake) == [(0x1000, 4096, 0x5000_0000, "r-x"), (0x80_4000_0000, 2 * MIB, 0x5020_0000, "rw-"),
                               (top, 4096, 0x5000_1000, "r--")]
    (reg,) = pgt_json(fake, "ranges --json")["regimes"]
    assert [r["level"] for r in reg["ranges"]] == [3, 2, 3]
    (walk,) = pgt_json(fake, f"explain {top + 0x10:#x} --json")
    assert walk["pa"] == 0x5000_1010 and "L0" in walk["walk"] and "L3" in walk["walk"]


@pytest.mark.parametrize("stage", [1, 2])
def test_64k_pa_51_48_kept(stage: int) -> None:
    """gdb-pt-dump drops PA[51:48] of 64K descriptors."""
    t = s1_64k_52() if stage == 1 else s2_64k_52()
    fake = served(target(t))
    got = ranges_of(fake)
    assert [(va, size, pa) for va, size, pa, _ in got] == [(0x4000_0000, 512 * MIB, 0xF_FFFF_E000_0000),
                                                           (0x8000_0000, 64 * KIB, 0xA_0000_0001_0000)]
    assert all(pa >> 48 for _, _, pa, _ in got)
    (walk,) = pgt_json(fake, "explain 0x80000010 --json")
    assert walk["pa"] == 0xA_0000_0001_0010


@pytest.mark.parametrize("granule", ["4K", "16K", "64K"])
def test_hvhe_tcr_with_tg1_zero(granule: str) -> None:
    """gdb-pt-dump crashes on TCR_EL1.TG1 = 0. Our regimes are EL2's; with E2H = 1 TCR_EL2 has
    TCR_EL1's layout and a TG1 field (TTBR1_EL2's granule, walks disabled by EPD1): TG1 = 0 is
    decoded (TTBR0_EL2's walk does not read it) or refused in one gdb error line, never a crash."""
    t = HypPgtable(pool_for(granule), granule, 39 if granule != "64K" else 42, e2h=True)
    t.map(0x4000_0000, PAGE[granule], 0x5000_0000, Prot.RX)
    snap = target(t)
    want = ranges_of(served(snap))
    assert TCR_E2H_TG1.get(snap.registers["TCR_EL2"]) != 0
    snap.registers["TCR_EL2"] &= ~TCR_E2H_TG1.mask
    fake = served(snap)
    try:
        fake.run("pgt ranges --json")
    except BaseException as exc:
        assert type(exc) is GdbError and "\n" not in str(exc), f"{type(exc).__name__}: {exc}"
        assert str(exc).startswith("pgt ranges: ") and "TG1" in str(exc) and "internal error" not in str(exc)
    else:
        (reg,) = json.loads(fake.stdout)["regimes"]
        assert reg["regime"] == "el2&0" and reg["decoded"]["e2h"] is True
        assert [(r["va"], r["size"], r["pa"], r["perms"]) for r in reg["ranges"]] == want
        assert want == [(0x4000_0000, PAGE[granule], 0x5000_0000, "r-x")]
    assert fake.phymem == 0


# ---------------------------------------------------------------------------------------------
# 3. gdb left as found: virtual reads, the thread and frame selected, whatever happens.

COMMANDS = ["ranges", "regimes", "explain $pc --regime el2", "save {tmp}/saved.json"]


@functools.cache
def _dry_run(command: str) -> tuple[int, int, int]:
    """(memory reads, register reads, thread switches) of ``command`` on :func:`smp`'s target
    with thread 2 frame 1 selected, uninterrupted."""
    fake = served(smp())
    fake.select(2, 1)
    with tempfile.TemporaryDirectory() as tmp:
        pgt(fake, command.format(tmp=tmp))
    reads_tables = not command.startswith("regimes")  # pgt regimes reads registers only
    assert (len(fake.reads) >= 3) == reads_tables and fake.uncaptured == [] and fake.register_reads
    assert fake.switches
    return len(fake.reads), fake.register_reads, fake.switches


def _fault(table: dict[int, BaseException], n: int, exc: BaseException, expect: str) -> str:
    table[n] = exc
    return expect


def _packet(fake: FakeGdb, on: int, exc: BaseException, after: bool, expect: str) -> str:
    fake.execute_faults.append((f"maint packet Qqemu.PhyMemMode:{on}", exc, after))
    return expect


def _command(fake: FakeGdb, command: str, exc: BaseException, expect: str | None) -> str | None:
    fake.execute_faults.append((command, exc, False))
    return expect


def _twice_off(fake: FakeGdb) -> str:
    for _ in range(2):
        fake.execute_faults.append(("maint packet Qqemu.PhyMemMode:0", KeyboardInterrupt(), False))
    return CTRL_C


def _restore_switch(fake: FakeGdb, last: int) -> None:
    fake.switch_faults[last] = KeyboardInterrupt()  # the command itself succeeds


def _bad_tcr(fake: FakeGdb) -> str:
    fake.snapshot.cpus[1]["TCR_EL2"] |= 3 << 14  # TG0 = 0b11: reserved
    return "CPU 1: TCR_EL2.TG0: 0b11 is a reserved granule encoding"


Arrange = Callable[[FakeGdb, tuple[int, int, int]], "str | None"]
CTRL_C = "interrupted (gdb's thread, frame and memory reads as they were)"
# Each fault: how to arrange it on the fake (given the dry run's numbers of memory and register
# reads), returning the error expected (a part of the message) or None: the command succeeds.
FAULTS: dict[str, Arrange] = {
    "none": lambda f, n: None,
    "read-1-ctrl-c": lambda f, n: _fault(f.read_faults, 1, KeyboardInterrupt(), CTRL_C),
    "read-3-ctrl-c": lambda f, n: _fault(f.read_faults, 3, KeyboardInterrupt(), CTRL_C),
    "read-last-ctrl-c": lambda f, n: _fault(f.read_faults, n[0], KeyboardInterrupt(), CTRL_C),
    "read-2-memory-error": lambda f, n: _fault(f.read_faults, 2, f.MemoryError("Cannot access memory"),
                                               "reading 4096 bytes at physical 0x"),
    "read-last-quit": lambda f, n: _fault(f.read_faults, n[0], GdbRuntimeError("Quit"), "gdb: Quit"),
    "register-1-ctrl-c": lambda f, n: _fault(f.register_faults, 1, KeyboardInterrupt(), CTRL_C),
    "register-last-ctrl-c": lambda f, n: _fault(f.register_faults, n[1], KeyboardInterrupt(), CTRL_C),
    "phymem-on-quit-before": lambda f, n: _packet(f, 1, GdbRuntimeError("Quit"), False, "gdb: Quit"),
    "phymem-on-quit-after": lambda f, n: _packet(f, 1, GdbRuntimeError("Quit"), True, "gdb: Quit"),
    "phymem-on-ctrl-c-after": lambda f, n: _packet(f, 1, KeyboardInterrupt(), True, CTRL_C),
    "phymem-off-ctrl-c-before": lambda f, n: _packet(f, 0, KeyboardInterrupt(), False, CTRL_C),
    "phymem-off-ctrl-c-after": lambda f, n: _packet(f, 0, KeyboardInterrupt(), True, CTRL_C),
    "phymem-off-quit-before": lambda f, n: _packet(f, 0, GdbRuntimeError("Quit"), False, "gdb: Quit"),
    # the capture's PhyMemMode:0 and the clean-up's first: the clean-up tries again
    "phymem-off-ctrl-c-twice": lambda f, n: _twice_off(f),
    # the clean-up's thread switch (the last one): tried again
    "restore-switch-ctrl-c": lambda f, n: _restore_switch(f, n[2]),
    "monitor-ctrl-c": lambda f, n: _command(f, "monitor info status", KeyboardInterrupt(), CTRL_C),
    "flush-ctrl-c": lambda f, n: _command(f, "maint flush dcache", KeyboardInterrupt(), None),  # retried
    "no-such-cpu": lambda f, n: "--cpu: 9 is not a vCPU of localhost:1234 (its vCPUs: 0, 1)",  # --cpu 9
    "undecodable-cpu-1": lambda f, n: _bad_tcr(f),
}


# A Ctrl-C (KeyboardInterrupt, or gdb.error "Quit") raised after QEMU applied Qqemu.PhyMemMode:1
# ("-after" faults) must still end with the mode switched back: physical_on is set when it is sent.
FAULT_PARAMS = list(FAULTS)


@pytest.mark.parametrize("fault", FAULT_PARAMS)
@pytest.mark.parametrize("command", COMMANDS, ids=["ranges", "regimes", "explain-pc", "save"])
def test_gdb_left_as_found(command: str, fault: str, tmp_path: Path) -> None:
    """Thread 2 (vCPU 1) frame 1 selected; after the command, succeeding or not: the same thread
    and frame selected, QEMU's reads virtual again (PhyMemMode 0), gdb's memory cache flushed
    after the last packet, nothing left undone, and a failure reached gdb as one GdbError."""
    counts = _dry_run(command)
    fake = served(smp())
    fake.select(2, 1)
    expect = FAULTS[fault](fake, counts)
    registers_only = command.startswith("regimes") and fault.startswith(("read-", "phymem-"))
    if registers_only:  # pgt regimes reads no memory and sends no PhyMemMode: the fault never fires
        expect = None
    line = command.format(tmp=tmp_path) + (" --cpu 9" if fault == "no-such-cpu" else "")
    raised: BaseException | None = None
    try:
        fake.run(f"{PREFIX} {line}")
    except BaseException as exc:
        raised = exc
    if expect is None:
        assert raised is None, f"{type(raised).__name__}: {raised}"
    else:
        assert type(raised) is GdbError, f"{type(raised).__name__}: {raised}"
        message = str(raised)
        assert message.startswith(f"pgt {line.split()[0]}: ") and "\n" not in message, message
        assert expect in message and "internal error" not in message, message
    assert fake.phymem == 0, f"memory reads left physical: {fake.packets()}"
    assert fake.selection == (2, 1), "thread and frame not selected again"
    assert fake.err == [], fake.err  # no clean-up step left undone
    packets = fake.packets()
    if command.startswith("regimes"):
        assert packets == [] and fake.reads == [], packets
    if packets:  # gdb's memory cache flushed after the last packet
        last = max(i for i, c in enumerate(fake.executed) if "PhyMemMode" in c)
        assert any(i > last for i in fake.done("maint flush dcache")), fake.executed
    if command.startswith("save"):
        assert (tmp_path / "saved.json").exists() == (raised is None)  # a failed save writes nothing


def test_register_reads_are_unsigned_innermost_and_selection_kept() -> None:
    """Registers are read in each vCPU's innermost frame (not the selected outer one, whose pc is
    a return address), as unsigned values of their width."""
    snap = smp()
    fake = served(snap)
    fake.select(2, 2)
    (cpu,) = pgt_json(fake, "regimes --json")["cpus"]
    assert cpu["cpu"] == 1 and cpu["registers"]["TTBR1_EL2"] == "0x8001000049000000"
    assert cpu["registers"]["cpsr"] == "0x3c9" and cpu["el"] == 2
    assert cpu["pc"] == snap.cpus[1]["pc"] and cpu["registers"]["pc"] == f"{snap.cpus[1]['pc']:#x}"
    assert fake.selection == (2, 2) and fake.dont_repeats == 1
    assert [c["pc"] for c in pgt_json(fake, "ranges --json")["cpus"]] == [snap.cpus[0]["pc"], snap.cpus[1]["pc"]]
    assert fake.selection == (2, 2)


def test_vcpus_are_qemu_cpu_indexes_not_thread_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After a reconnect gdb numbers the threads on (here 5 and 6): --cpu N and the selected
    thread's vCPU are QEMU's CPU index, from the thread details "CPU#N"."""
    snap = smp()
    fake = served(snap, first_thread=5)
    path = tmp_path / "smp.json"
    snap.save(path)
    assert no_timings(pgt_json(fake, "ranges --json")) == no_timings(json.loads(attach(capsys, str(path), "--json")))
    fake.select(6, 0)
    assert [c["cpu"] for c in pgt_json(fake, "regimes --json")["cpus"]] == [1]
    assert [c["cpu"] for c in pgt_json(fake, "ranges --json --cpu 0")["cpus"]] == [0]
    assert pgt_error(fake, "ranges --cpu 5").startswith("pgt ranges: --cpu: 5 is not a vCPU")
    assert fake.selection == (6, 0)


def test_twice_interrupted_clean_up_warns() -> None:
    """A clean-up step that fails twice is named on gdb's stderr (and the error still reaches gdb)."""
    fake = served(smp())
    fake.select(2, 1)
    fake.read_faults[1] = KeyboardInterrupt()
    for _ in range(3):
        fake.execute_faults.append(("maint packet Qqemu.PhyMemMode:0", KeyboardInterrupt(), False))
    message = pgt_error(fake, "ranges")
    assert message.startswith("pgt ranges: interrupted")
    assert fake.phymem == 1  # could not be switched back ...
    assert any("Qqemu.PhyMemMode:0" in e for e in fake.err), fake.err  # ... and gdb's user is told how
    assert fake.selection == (2, 1)


# ---------------------------------------------------------------------------------------------
# 4. Errors: one gdb.GdbError line, "pgt SUB: ...".

BAD = [
    ("ranges --cpu x", "pgt ranges: --cpu: expected a vCPU index"),
    ("ranges --cpu -1", "pgt ranges: --cpu: expected a vCPU index"),
    ("regimes --cpu one", "pgt regimes: --cpu: expected a vCPU index"),
    ("ranges --cpu 5", "pgt ranges: --cpu: 5 is not a vCPU of localhost:1234 (its vCPUs: 0, 1)"),
    ("regimes --cpu 2", "pgt regimes: --cpu: 2 is not a vCPU of localhost:1234"),
    ("explain 0x1000 --cpu 9", "pgt explain: --cpu: 9 is not a vCPU"),
    ("save {tmp}/s.json --cpu 3", "pgt save: --cpu: 3 is not a vCPU"),
    ("ranges --range 5:1", "pgt ranges: --range: END must be above START"),
    ("ranges --range x:y", "pgt ranges: --range: expected START:END"),
    ("ranges --perm rq", "pgt ranges: --perm: expected letters r, w, x"),
    ("explain nosuchsymbol", "pgt explain: ADDR: expected an address or a gdb expression, got 'nosuchsymbol'"),
    ("explain '1 +'", "pgt explain: ADDR: expected an address or a gdb expression"),
    ("explain", "pgt explain: the following arguments are required: ADDR (help pgt explain)"),
    ("ranges --bogus", "pgt ranges: unrecognized arguments: --bogus (help pgt ranges)"),
    ("ranges --jso", "pgt ranges: unrecognized arguments: --jso"),  # no abbreviations
    ("ranges --regime el3", "pgt ranges: argument --regime: invalid choice: 'el3'"),
    ("ranges --phys jtag", "pgt ranges: argument --phys: invalid choice: 'jtag'"),
    ("ranges --output {tmp}/nodir/out.json", "pgt ranges: --output: directory {tmp}/nodir does not exist"),
    ("ranges --output {tmp}", "pgt ranges: --output: {tmp} is a directory"),
    ("save {tmp}", "pgt save: FILE: {tmp} is a directory"),
    ("save {tmp}/nodir/s.json", "pgt save: FILE: directory {tmp}/nodir does not exist"),
    ("save", "pgt save: the following arguments are required: FILE (help pgt save)"),
    ("verify --samples x", "pgt verify: argument --samples: invalid int value: 'x'"),
]


@pytest.mark.parametrize(("args", "expect"), BAD)
def test_bad_arguments_are_one_line(args: str, expect: str, tmp_path: Path) -> None:
    fake = served(smp())
    fake.select(2, 1)
    line = args.format(tmp=tmp_path)
    message = pgt_error(fake, line)
    assert message.startswith(expect.format(tmp=tmp_path)), message
    assert fake.phymem == 0 and fake.selection == (2, 1) and fake.err == []
    assert not (tmp_path / "nodir").exists() and not list(tmp_path.glob("*.json"))


def test_unknown_subcommand() -> None:
    fake = served(smp())
    message = pgt_error(fake, "bogus --json")
    assert message.startswith("pgt: unknown subcommand 'bogus'"), message
    assert all(s.name in message for s in SUBCOMMANDS)
    assert fake.executed == [] and fake.reads == []


@pytest.mark.parametrize("args", ["ranges", "regimes", "regimes --cpu all", "explain 0x40001000", "save {tmp}/s.json"])
def test_disconnected(args: str, tmp_path: Path) -> None:
    fake = served(smp())
    fake.disconnect()
    sub = args.split()[0]
    message = pgt_error(fake, args.format(tmp=tmp_path))
    assert message.startswith(f"pgt {sub}: gdb is not connected to a target"), message
    assert "target remote" in message and fake.reads == [] and fake.packets() == []


def test_explain_expression_when_disconnected() -> None:
    fake = served(smp())
    fake.disconnect()
    assert pgt_error(fake, "explain $pc").startswith("pgt explain: ")


@pytest.mark.parametrize("args", ["ranges", "regimes", "explain 0x40001000", "save {tmp}/s.json"])
def test_running_target(args: str, tmp_path: Path) -> None:
    fake = served(smp())
    fake.select(2, 1)
    fake.threads[1].stopped = False
    message = pgt_error(fake, args.format(tmp=tmp_path))
    assert message.startswith(f"pgt {args.split()[0]}: the target localhost:1234 is running: interrupt it first")
    assert fake.reads == [] and fake.packets() == [] and fake.register_reads == 0
    assert fake.selection == (2, 1) and not (tmp_path / "s.json").exists()


def test_no_threads() -> None:
    fake = served(smp())
    fake.threads = []
    assert pgt_error(fake, "ranges").startswith("pgt ranges: gdb lists no thread")


def test_server_without_phymemmode_then_phys_direct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A server that answers nothing to Qqemu.PhyMemMode:1 is refused with what to do; with
    --phys direct its reads are taken as physical, and no packet is sent."""
    snap = smp()
    fake = served(snap, server="direct")
    fake.select(2, 1)
    message = pgt_error(fake, "ranges")
    assert message.startswith("pgt ranges: localhost:1234 does not switch to physical reads "
                              '(Qqemu.PhyMemMode:1 answered received: "")'), message
    assert "--phys direct" in message
    assert fake.reads == [] and fake.packets() == ["maint packet Qqemu.PhyMemMode:1"]
    fake.executed.clear()
    got = pgt_json(fake, "ranges --json --phys direct")
    assert fake.packets() == [] and fake.reads and all(r.physical for r in fake.reads)
    path = tmp_path / "snap.json"
    snap.save(path)
    assert no_timings(got) == no_timings(json.loads(attach(capsys, str(path), "--json")))
    assert pgt(fake, "ranges --phys direct") == attach(capsys, str(path))
    saved = tmp_path / "saved.json"
    pgt(fake, f"save {saved} --phys direct")
    back = Snapshot.load(saved)
    assert back.pages == snap.pages and back.notes["vm_status"] == "unknown (no QEMU monitor)"
    assert fake.packets() == [] and fake.selection == (2, 1)


def test_phys_direct_on_virtual_reads_fails_in_one_line() -> None:
    """--phys direct on QEMU (reads still virtual): the failing read is named."""
    fake = served(smp())
    message = pgt_error(fake, "ranges --phys direct")
    assert message.startswith("pgt ranges: reading 4096 bytes at physical 0x"), message
    assert "Cannot access memory" in message and fake.packets() == []


def test_phymemmode_empty_answer() -> None:
    """A server whose maint packet prints nothing at all."""
    fake = served(smp())
    fake.execute_faults.clear()
    real = fake._execute

    def silent(command: str) -> str:
        return "" if "PhyMemMode" in command else real(command)

    fake._execute = silent  # type: ignore[method-assign]
    message = pgt_error(fake, "ranges")
    assert "answered nothing" in message and "--phys direct" in message


# ---------------------------------------------------------------------------------------------
# 5. help


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    fake = served(smp())
    prefix = fake.commands[PREFIX]
    assert prefix.prefix is True and type(prefix).__doc__.startswith(SUMMARY + "\n")
    assert set(fake.commands) == {PREFIX, *(f"{PREFIX} {s.name}" for s in SUBCOMMANDS)}
    for sub in SUBCOMMANDS:
        cmd = fake.commands[f"{PREFIX} {sub.name}"]
        doc = type(cmd).__doc__
        assert doc.split("\n", 1)[0] == sub.summary, doc  # gdb's `help pgt` lists this line
        assert f"usage: pgt {sub.name}" in doc and "--phys" in doc and "--help" in doc
        assert cmd.completer_class == (fake.COMPLETE_FILENAME if sub.name == "save" else fake.COMPLETE_NONE)
        assert cmd.command_class == fake.COMMAND_DATA
    for option in ("--cpu", "--regime", "--range", "--perm", "--json", "--output"):
        assert option in type(fake.commands["pgt ranges"]).__doc__
    assert "ADDR" in type(fake.commands["pgt explain"]).__doc__
    assert "FILE" in type(fake.commands["pgt save"]).__doc__
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("args", ["", "--help", "-h", "help"])
def test_pgt_help(args: str, capsys: pytest.CaptureFixture[str]) -> None:
    fake = served(smp())
    out = pgt(fake, args)
    assert out.startswith(SUMMARY)
    for sub in SUBCOMMANDS:
        assert f"pgt {sub.name}" in out and sub.summary in out
    assert fake.executed == [] and fake.reads == []
    assert capsys.readouterr() == ("", "")  # through gdb.write only


@pytest.mark.parametrize("sub", [s.name for s in SUBCOMMANDS])
def test_subcommand_help(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    fake = served(smp())
    fake.select(2, 1)
    for flag in ("--help", "-h"):
        out = pgt(fake, f"{sub} {flag}")
        assert out.startswith(f"usage: pgt {sub}"), out
        assert "--phys" in out
        # also when other arguments come before it (argparse stops at --help)
        assert pgt(fake, f"{sub} --json {flag}" if sub != "save" else f"{sub} x.json {flag}") == out
    assert fake.executed == [] and fake.reads == [] and fake.selection == (2, 1)
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------------------------------
# 6. pgt regimes


def test_regimes_default_is_the_selected_vcpu() -> None:
    fake = served(smp())
    for thread, cpu, regimes in ((1, 0, [("el2", [0])]), (2, 1, [("el2", [1]), ("stage2", [1])])):
        fake.select(thread, 0)
        out = pgt_json(fake, "regimes --json")
        assert [c["cpu"] for c in out["cpus"]] == [cpu]
        assert [(r["regime"], r["cpus"]) for r in out["regimes"]] == regimes
        assert all("ranges" not in r for r in out["regimes"]) and "findings" not in out and "pages" not in out
        assert out["source"] == SOURCE and out["current_el"] == 2
        assert fake.selection == (thread, 0)
        text = pgt(fake, "regimes")
        assert text.startswith(f"{SOURCE}\n") and f"vCPU {cpu}: stopped at EL2 (CPU#{cpu} [running]): " in text
        assert "ranges" not in text and " -> " not in text and "findings" not in text
        assert all(f"{name} (vCPU {cpu}): " in text for name, _ in regimes)


def test_regimes_cpu_all_and_n() -> None:
    snap = smp()
    fake = served(snap)
    out = pgt_json(fake, "regimes --cpu all --json")
    assert [c["cpu"] for c in out["cpus"]] == [0, 1]
    assert [(r["regime"], r["cpus"]) for r in out["regimes"]] == [("el2", [0, 1]), ("stage2", [1])]
    assert all("ranges" not in r for r in out["regimes"])
    assert out["regimes"][1]["registers"]["VTTBR_EL2"] == f"{snap.cpus[1]['VTTBR_EL2']:#x}"
    text = pgt(fake, "regimes --cpu all")
    assert "el2 (vCPUs 0, 1): " in text and "stage2 (vCPU 1): " in text and " -> " not in text
    assert f"VTCR_EL2={snap.cpus[1]['VTCR_EL2']:#x}" in text
    one = pgt_json(fake, "regimes --cpu 1 --json")
    assert [c["cpu"] for c in one["cpus"]] == [1]
    assert [(r["regime"], r["cpus"]) for r in one["regimes"]] == [("el2", [1]), ("stage2", [1])]


# ---------------------------------------------------------------------------------------------
# 7. pgt.py in a real gdb (no target)

GDB = shutil.which("gdb-multiarch")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb-multiarch is not on PATH")


def gdb_batch(script: Path, *commands: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert GDB is not None
    argv = [GDB, "-batch", "-nx", "-ex", f"source {script}"]
    for c in commands:
        argv += ["-ex", c]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
                          env=env)


def clean_env(**more: str) -> dict[str, str]:
    """The environment without anything pointing at an environment of the harness: PATH holds
    gdb's directory and the system's, no `harness` script, no PYTHONPATH/VIRTUAL_ENV/HARNESS_*."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("HARNESS_")}
    dirs = [str(Path(GDB or "/usr/bin").parent), "/usr/bin", "/bin"]
    env["PATH"] = os.pathsep.join(d for d in dict.fromkeys(dirs) if not (Path(d) / "harness").exists())
    env.update(more)
    return env


def gdb_errors(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


def skip_if_python_differs(done: subprocess.CompletedProcess[str]) -> None:
    if "gdb's Python is" in done.stderr and "cannot load here" in done.stderr:
        pytest.skip(f"gdb's Python is not this environment's: {done.stderr.strip()}")


@needs_gdb
def test_bootstrap_in_gdb() -> None:
    """The script, sourced twice (as from ~/.gdbinit and by hand), defines the commands once more
    without a complaint; with no target they fail in one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env["HARNESS_VENV"] = sys.prefix  # the environment these tests run in
    done = gdb_batch(script_path(), f"source {script_path()}", "help pgt", "help pgt ranges", "pgt ranges",
                     "pgt ranges --help", "pgt bogus", env=env)
    skip_if_python_differs(done)
    assert SUMMARY in done.stdout and "pgt ranges -- " in done.stdout, done.stdout + done.stderr
    assert all(f"pgt {s.name} -- {s.summary}" in done.stdout for s in SUBCOMMANDS)
    assert "usage: pgt ranges" in done.stdout
    errors = gdb_errors(done)
    # the only errors: `pgt ranges` with no target and `pgt bogus`, one line each
    assert len(errors) == 2, errors
    assert errors[0].startswith("pgt ranges: gdb is not connected to a target"), errors
    assert errors[1].startswith("pgt: unknown subcommand 'bogus'"), errors


def symlinked_checkout(root: Path, venv: Path | None) -> Path:
    """A checkout at ``root`` whose harness package is this one's (symlinked file by file, pgt.py
    copied: it finds its package root from its own resolved path), with ``venv`` as its .venv."""
    src = script_path().parent.parent  # .../harness
    (root / "harness" / "gdb").mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name not in ("gdb", "__pycache__"):
            (root / "harness" / entry.name).symlink_to(entry)
    for entry in (src / "gdb").iterdir():
        if entry.name.endswith(".py") and entry.name != "pgt.py":
            (root / "harness" / "gdb" / entry.name).symlink_to(entry)
    shutil.copy(script_path(), root / "harness" / "gdb" / "pgt.py")
    if venv is not None:
        (root / ".venv").symlink_to(venv)
    return root / "harness" / "gdb" / "pgt.py"


def fake_venv(where: Path, python: str = "python3.99") -> Path:
    (where / "lib" / python / "site-packages").mkdir(parents=True)
    (where / "bin").mkdir()
    (where / "pyvenv.cfg").write_text(f"home = /nowhere\nversion = {python[6:]}.0\n")
    return where


# pgt verify runs the interpreter of the environment whose site-packages was loaded.
@needs_gdb
def test_bootstrap_verify_python_is_the_loaded_environments(tmp_path: Path) -> None:
    script = symlinked_checkout(tmp_path / "checkout", Path(sys.prefix))
    other = fake_venv(tmp_path / "venv-3.99")
    done = gdb_batch(script, "help pgt", "python import os; print('PY=' + os.environ['HARNESS_GDB_PYTHON'])",
                     env=clean_env(HARNESS_VENV=str(other)))
    skip_if_python_differs(done)
    assert SUMMARY in done.stdout and gdb_errors(done) == [], done.stderr  # loaded from the checkout's .venv
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("PY=")]
    assert line == f"PY={tmp_path / 'checkout' / '.venv' / 'bin' / 'python'}"


@needs_gdb
def test_bootstrap_refuses_another_python(tmp_path: Path) -> None:
    """$HARNESS_VENV with compiled modules for another Python: one line, no command defined."""
    script = symlinked_checkout(tmp_path / "checkout", None)  # no .venv beside it
    venv = fake_venv(tmp_path / "venv")
    assert not any((p / "pyvenv.cfg").exists() for p in script.parents)
    done = gdb_batch(script, "help pgt", env=clean_env(HARNESS_VENV=str(venv)))
    errors = gdb_errors(done)
    assert len(errors) == 2, errors
    assert errors[0].startswith("pgt: gdb's Python is 3.") and str(venv) in errors[0], errors
    assert "python3.99" in errors[0] and "cannot load here" in errors[0]
    assert "Undefined command" in errors[1] and '"pgt"' in errors[1]  # nothing defined
    assert SUMMARY not in done.stdout


@needs_gdb
def test_bootstrap_without_harness_package(tmp_path: Path) -> None:
    """No environment anywhere, and no harness beside the script: one "cannot load" line."""
    script = tmp_path / "tree" / "harness" / "gdb" / "pgt.py"
    script.parent.mkdir(parents=True)
    shutil.copy(script_path(), script)
    done = gdb_batch(script, "help pgt", env=clean_env())
    errors = gdb_errors(done)
    assert len(errors) == 2, errors
    assert errors[0].startswith("pgt: cannot load the harness in gdb's Python"), errors
    assert "none found" in errors[0]
    assert "Undefined command" in errors[1]

