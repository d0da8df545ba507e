"""``harness attach`` on hand-made snapshots: the file format, filters, explain, bad input, and the
cases today's decoders get wrong (facts file): concatenated stage-2 PGD pages (gef walks only the
first), 4K/16K outputs on a 52-bit-capable CPU with DS = 0 (gef turns SH into PA[51:50]), a 4K
40-bit stage 1 (gdb-pt-dump is one level short when (ia - 12) mod 9 = 1), 64K PA[51:48]
(gdb-pt-dump drops them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from harness.arch.descriptors import S1_PXN
from harness.arch.geometry import Stage
from harness.arch.registers import HCR_VM, SCTLR_WXN
from harness.check.attach import (
    FINDING_EL0_ONLY_XN,
    FINDING_WRITABLE_EXECUTABLE,
    FINDING_WXN_ONLY,
    PermFilter,
    decode,
    filter_ranges,
    findings,
    parse_window,
    perm_label,
)
from harness.cli import main
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable, KvmPgtable, Stage2Pgtable
from harness.core.prot import Prot
from harness.core.walker import Walker, WalkFlags
from harness.errors import InputError
from harness.live.gdbstub import Session, TargetSpecError, VCpu, _restore_thread, parse_target
from harness.live.kernel import KernelBoot, KernelImage
from harness.live.regimes import RegisterDecodeError, regime_key, regimes_by_cpu, regimes_from_registers
from harness.live.snapshot import FORMAT, QEMU_MAX_MMFR0, Snapshot, SnapshotError, from_tables

MIB = 1 << 20
GIB = 1 << 30


def pool_for(granule: str) -> PagePool:
    size = {"4K": 4096, "16K": 16384, "64K": 65536}[granule]
    return PagePool(0x4800_0000, 256 * size, size)


def ranges_of(table: KvmPgtable) -> list[tuple[int, int, int, str]]:
    snap = from_tables(table)
    (rd,) = decode(snap)
    return [(r.va, r.range.size, r.range.pa, r.to_json()["perms"]) for r in rd.ranges]


# -- the decoders' known failures ------------------------------------------------------------------

@pytest.mark.parametrize(("ia_bits", "pa_bits", "pgd_pages"), [(40, 40, 2), (42, 42, 8), (43, 44, 16)])
def test_concatenated_stage2_pgd_pages_all_walked(ia_bits: int, pa_bits: int, pgd_pages: int) -> None:
    t = Stage2Pgtable(pool_for("4K"), "4K", ia_bits, pa_bits, start_level=1)
    assert t.geom.pgd_pages == pgd_pages
    last = (1 << ia_bits) - 2 * MIB  # indexed from the last concatenated PGD page
    t.map(0x4000_0000, 2 * MIB, 0x5000_0000, Prot.RW)
    t.map(last, 2 * MIB, 0x6000_0000, Prot.RX)
    assert ranges_of(t) == [(0x4000_0000, 2 * MIB, 0x5000_0000, "rw-"), (last, 2 * MIB, 0x6000_0000, "r-x")]


@pytest.mark.parametrize("granule", ["4K", "16K"])
def test_ds0_output_address_ignores_sh_on_52_bit_cpu(granule: str) -> None:
    t = HypPgtable(pool_for(granule), granule, 48, 48)
    pa = 0xFFFF_FFE0_0000 if granule == "4K" else 0xFFFF_FE00_0000
    t.map(0x4000_0000, 2 * MIB if granule == "4K" else 32 * MIB, pa, Prot.RW)
    snap = from_tables(t)
    assert snap.registers["ID_AA64MMFR0_EL1"] & 0xF == 6  # PARange: 52 bits
    (rd,) = decode(snap)
    (r,) = rd.ranges
    assert dict(r.range.fields)["SH"] == 3  # inner shareable in descriptor bits [9:8] ...
    assert r.range.pa == pa  # ... which are not PA[51:50] with DS = 0


def test_4k_40_bit_stage1_has_four_levels() -> None:
    t = HypPgtable(pool_for("4K"), "4K", 40)
    assert t.geom.start_level == 0 and t.geom.pgd_entries == 2  # (40 - 12) mod 9 = 1
    top = (1 << 40) - 4096
    t.map(0x1000, 4096, 0x5000_0000, Prot.RX)
    t.map(top, 4096, 0x5000_1000, Prot.R)
    assert ranges_of(t) == [(0x1000, 4096, 0x5000_0000, "r-x"), (top, 4096, 0x5000_1000, "r--")]


@pytest.mark.parametrize("stage", [1, 2])
def test_64k_pa_51_48(stage: int) -> None:
    pool = pool_for("64K")
    t: KvmPgtable = HypPgtable(pool, "64K", 48, 52) if stage == 1 else Stage2Pgtable(pool, "64K", 48, 52)
    pa = 0xF_FFFF_E000_0000
    t.map(0x4000_0000, 512 * MIB, pa, Prot.RW)
    t.map(0x8000_0000, 64 * 1024, 0xA_0000_0001_0000, Prot.R)
    assert ranges_of(t) == [(0x4000_0000, 512 * MIB, pa, "rw-"), (0x8000_0000, 65536, 0xA_0000_0001_0000, "r--")]


@pytest.mark.parametrize(("granule", "e2h"), [("4K", False), ("4K", True), ("16K", False), ("16K", True)])
def test_lpa2_stage1_52_bit_outputs(granule: str, e2h: bool) -> None:
    """DS = 1: bits [9:8] are OA[51:50] (not SH), a 4K walk starts at level -1; hVHE (E2H = 1)."""
    t = HypPgtable(pool_for(granule), granule, 52, 52, lpa2=True, e2h=e2h)
    assert t.geom.start_level == (-1 if granule == "4K" else 0)
    top = (1 << 52) - 32 * MIB
    t.map(0x4000_0000, 32 * MIB, 0xF_FFFF_FE00_0000, Prot.RW)
    t.map(top, 32 * MIB, 0xC_0000_4000_0000, Prot.RX)
    snap = from_tables(t)
    (r,) = regimes_from_registers(snap.registers)
    assert r.name == ("el2&0" if e2h else "el2") and r.geom.lpa2 and r.geom.e2h == e2h
    assert ranges_of(t) == [(0x4000_0000, 32 * MIB, 0xF_FFFF_FE00_0000, "rw-"),
                            (top, 32 * MIB, 0xC_0000_4000_0000, "r-x")]


def test_lpa2_stage2_level0_16_concatenated_pages() -> None:
    """Linux 6.12's host stage 2 on -cpu max: 4K, DS = 1, 52-bit IPA, level 0, 16 PGD pages."""
    t = Stage2Pgtable(pool_for("4K"), "4K", 52, 52, start_level=0, lpa2=True)
    assert t.geom.pgd_pages == 16
    last = (1 << 52) - 2 * MIB
    t.map(0x4000_0000, 2 * MIB, 0x4000_0000, Prot.RWX)
    t.map(last, 2 * MIB, 0xF_0000_0020_0000, Prot.RW)
    assert ranges_of(t) == [(0x4000_0000, 2 * MIB, 0x4000_0000, "rwx"), (last, 2 * MIB, 0xF_0000_0020_0000, "rw-")]


# -- registers -------------------------------------------------------------------------------------

def test_registers_of_linux_6_12_nvhe() -> None:
    """The values Linux 6.12 programs in nVHE on -cpu max,lpa2=off (read through QEMU's gdbstub)."""
    regs = {"SCTLR_EL2": 0xF8ED383D, "HCR_EL2": 0x30080000000, "TCR_EL2": 0x80853510, "TTBR0_EL2": 0x43A1E001,
            "VTCR_EL2": 0, "VTTBR_EL2": 0, "MAIR_EL2": 0x40044FFFF, "ID_AA64MMFR0_EL1": 0x2100022200101126}
    (r,) = regimes_from_registers(regs)
    assert r.name == "el2" and r.geom.stage is Stage.S1
    assert (r.geom.granule.label, r.geom.ia_bits, r.geom.pa_bits, r.geom.start_level) == ("4K", 48, 48, 0)
    assert r.root == 0x43A1E000  # CnP (bit 0) is not part of the address
    assert r.mair == 0x40044FFFF


MMFR0_LPA2_OFF = 0x2100022200101126  # -cpu max,lpa2=off: PARange 48 bits
MMFR0_MAX = 0x2100032310201126  # -cpu max: PARange 52 bits, LPA2 granules


@pytest.mark.parametrize(("regs", "expected"), [
    pytest.param({"HCR_EL2": 0x30080000000, "TCR_EL2": 0x18086350C, "TTBR0_EL2": 0x43A1D001,
                  "ID_AA64MMFR0_EL1": MMFR0_MAX},
                 [("el2", "4K", 52, 52, -1, 1, True, False)], id="nvhe-max"),
    pytest.param({"HCR_EL2": 0x30480080001, "TCR_EL2": 0x15001F5B5D53510, "TTBR0_EL2": 0x7F301001,
                  "VTCR_EL2": 0x802D3590, "VTTBR_EL2": 0x7F709001, "ID_AA64MMFR0_EL1": MMFR0_LPA2_OFF},
                 [("el2&0", "4K", 48, 48, 0, 1, False, True), ("stage2", "4K", 48, 48, 0, 1, False, False)],
                 id="protected-max-lpa2off"),
    pytest.param({"HCR_EL2": 0x30480080001, "TCR_EL2": 0x95001F7B5CE350C, "TTBR0_EL2": 0x7F301001,
                  "VTCR_EL2": 0x1802E358C, "VTTBR_EL2": 0x7F710001, "ID_AA64MMFR0_EL1": MMFR0_MAX},
                 [("el2&0", "4K", 52, 52, -1, 1, True, True), ("stage2", "4K", 52, 52, 0, 16, True, False)],
                 id="protected-max"),
])
def test_registers_of_linux_6_12(regs: dict[str, int], expected: list[tuple[object, ...]]) -> None:
    """The values Linux 6.12.117 programs under QEMU 10.0.2, read through the gdbstub: regime,
    granule, input and output size, start level, concatenated PGD pages, DS, E2H (what gef's
    pagewalk prints wrongly for the PS and start level)."""
    full = {"SCTLR_EL2": 0xF8ED383D, "MAIR_EL2": 0x40044FFFF, "VTCR_EL2": 0, "VTTBR_EL2": 0, **regs}
    got = [(r.name, r.geom.granule.label, r.geom.ia_bits, r.geom.pa_bits, r.geom.start_level, r.geom.pgd_pages,
            r.geom.lpa2, r.geom.e2h) for r in regimes_from_registers(full)]
    assert got == expected
    roots = [r.root for r in regimes_from_registers(full)]
    assert roots == [full[k] & ~1 for k in ("TTBR0_EL2", "VTTBR_EL2") if full[k]]  # CnP is not address


def test_stage2_only_when_hcr_vm() -> None:
    t = Stage2Pgtable(pool_for("4K"), "4K", 40)
    snap = from_tables(t)
    assert [r.name for r in regimes_from_registers(snap.registers)] == ["stage2"]
    snap.registers["HCR_EL2"] = 0
    assert regimes_from_registers(snap.registers) == []


# -- the file format -------------------------------------------------------------------------------

def _demo() -> KvmPgtable:
    t = HypPgtable(pool_for("4K"), "4K", 39)
    t.map(0x4000_0000, 2 * MIB, 0x4000_0000, Prot.RX)
    t.map(0x4020_0000, 64 * 1024, 0x5000_0000, Prot.RW)
    t.map(0x0900_0000, 4096, 0x0900_0000, Prot.RW | Prot.DEVICE)
    return t


def test_snapshot_round_trip(tmp_path: Path) -> None:
    snap = from_tables(_demo())
    path = tmp_path / "s.json"
    snap.save(path)
    obj = json.loads(path.read_text())
    assert obj["format"] == FORMAT and obj["version"] == 2 and obj["page_size"] == 4096
    assert [c["cpu"] for c in obj["cpus"]] == [0] and "registers" not in obj
    back = Snapshot.load(path)
    assert back.cpus == snap.cpus and back.registers == snap.registers and back.pages == snap.pages
    assert [r.to_json() for r in decode(back)[0].ranges] == [r.to_json() for r in decode(snap)[0].ranges]


@pytest.mark.parametrize(("edit", "key"), [
    (lambda o: o.update(format="other"), "format"),
    (lambda o: o.update(version=3), "version"),
    (lambda o: o.update(version=True), "version"),
    (lambda o: o.update(page_size=1000), "page_size"),
    (lambda o: o["cpus"][0]["registers"].update(TCR_EL2="zz"), "cpus[0].registers[TCR_EL2]"),
    (lambda o: o.update(cpus=[]), "cpus: expected a non-empty list"),
    (lambda o: o.pop("cpus"), "cpus: expected a non-empty list"),
    (lambda o: o["cpus"].append(dict(o["cpus"][0])), "cpus[1].cpu: CPU 0 appears twice"),
    (lambda o: o["cpus"][0].update(cpu="0"), "cpus[0].cpu: expected a CPU index"),
    (lambda o: o["cpus"][0].update(cpu=-1), "cpus[0].cpu: expected a CPU index"),
    (lambda o: o["cpus"][0].pop("registers"), "cpus[0].registers: expected an object"),
    (lambda o: o.update(version=1), "registers: expected an object"),  # version 1 has no cpus
    (lambda o: o.update(pages=[]), "pages"),
    (lambda o: o["pages"].update({"0x1234": ""}), "pages[0x1234]"),
    (lambda o: o["pages"].update({"0x1000": "AAAA"}), "pages[0x1000]: expected 4096 bytes"),
    (lambda o: o["pages"].update({"0x2000": "@@@"}), "pages[0x2000]: expected base64"),
])
def test_bad_snapshot_names_the_key(tmp_path: Path, edit: object, key: str) -> None:
    obj = from_tables(_demo()).to_json()
    edit(obj)  # type: ignore[operator]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(SnapshotError, match=key.replace("[", r"\[").replace("]", r"\]")):
        Snapshot.load(path)
    assert main(["attach", str(path)]) == 2


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("{")
    with pytest.raises(SnapshotError, match="not JSON"):
        Snapshot.load(path)


# -- targets, filters ------------------------------------------------------------------------------

def test_parse_target(tmp_path: Path) -> None:
    assert parse_target("localhost:1234").kind == "gdb"
    assert parse_target("[::1]:1234").kind == "gdb"
    f = tmp_path / "snap.json"
    f.write_text("{}")
    assert parse_target(str(f)).kind == "file"
    for bad in ("nowhere", "host:99999", str(tmp_path / "missing.json")):
        with pytest.raises(TargetSpecError, match="TARGET"):
            parse_target(bad)
    with pytest.raises(TargetSpecError, match="neither a unix socket nor a regular file"):
        parse_target(str(tmp_path))


def test_filters() -> None:
    (rd,) = decode(from_tables(_demo()))
    assert [r.va for r in filter_ranges(rd.ranges, perms=PermFilter.parse("x"))] == [0x4000_0000]
    assert [r.va for r in filter_ranges(rd.ranges, perms=PermFilter.parse("w!x"))] == [0x0900_0000, 0x4020_0000]
    clipped = filter_ranges(rd.ranges, window=parse_window("0x40100000:0x40210000"))
    assert [(r.va, r.range.size, r.range.pa) for r in clipped] == [
        (0x4010_0000, MIB, 0x4010_0000), (0x4020_0000, 0x10000, 0x5000_0000)]
    assert parse_window("0x1000+0x2000") == (0x1000, 0x3000)
    for bad in ("1:1", "x:y", "12"):
        with pytest.raises(InputError, match="--range"):
            parse_window(bad)
    with pytest.raises(InputError, match="--perm"):
        PermFilter.parse("rq")


def test_cli_json_explain_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.json"
    from_tables(_demo()).save(path)
    assert main(["attach", str(path), "--json", "--perm", "rw", "--explain", "0x40201234"]) == 0
    out = json.loads(capsys.readouterr().out)
    (reg,) = out["regimes"]
    assert reg["regime"] == "el2" and reg["registers"]["TCR_EL2"].startswith("0x")
    dec = reg["decoded"]
    assert (dec["granule"], dec["ia_bits"], dec["start_level"], dec["levels"], dec["lpa2"], dec["e2h"]) == (
        "4K", 39, 1, 3, False, False)
    assert dec["mair_attrs"][:2] == ["0xff", "0x04"]  # the harness's MAIR: normal WB, device nGnRE
    assert [(r["va"], r["size"], r["pa"], r["perms"]) for r in reg["ranges"]] == [
        (0x0900_0000, 4096, 0x0900_0000, "rw-"), (0x4020_0000, 0x10000, 0x5000_0000, "rw-")]
    (ex,) = out["explain"]
    assert ex["ok"] and ex["pa"] == 0x5000_1234 and "L3" in ex["walk"]
    assert main(["attach", str(path), "--range", "0x4000_0000:0x4010_0000"]) == 0
    text = capsys.readouterr().out
    assert "1 of 3 ranges" in text and "r-x" in text


@pytest.mark.parametrize("args", [["--perm", "z"], ["--range", "5:1"], ["--explain", "nope"],
                                  ["--timeout", "0"], ["--save", "/nonexistent-dir/x.json"]])
def test_cli_bad_arguments_exit_2(tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.json"
    from_tables(_demo()).save(path)
    assert _exit_status(["attach", str(path), *args]) == 2
    assert args[0] in capsys.readouterr().err


def test_cli_missing_target_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attach", "/nonexistent/gdb.sock"]) == 2
    assert "TARGET" in capsys.readouterr().err


def test_mmfr0_constant_is_qemu_max() -> None:
    assert QEMU_MAX_MMFR0 & 0xF == 6


# -- findings: W^X through SCTLR_EL2.WXN, and EL0-only execute-never in the EL2&0 regime -------------

TEXT, RODATA, DATA = 0x4000_0000, 0x4010_0000, 0x4020_0000


def _hyp(e2h: bool, linux_6_12_xn: bool, wxn: bool) -> Snapshot:
    """A hyp stage 1 with text r-x, rodata r--, data rw- as KVM maps them; ``linux_6_12_xn``: the
    hVHE execute-never of Linux before "KVM: arm64: Fix EL2 S1 XN handling for hVHE setups"
    (bit 54 alone, UXN there: PXN cleared); ``wxn``: SCTLR_EL2.WXN = 1 as Linux sets it."""
    t = HypPgtable(pool_for("4K"), "4K", 48, 48, e2h=e2h)
    t.map(TEXT, 64 * 1024, 0x5000_0000, Prot.RX)
    t.map(RODATA, 64 * 1024, 0x5010_0000, Prot.R)
    t.map(DATA, 64 * 1024, 0x5020_0000, Prot.RW)
    if linux_6_12_xn:
        def clear_pxn(addr: int, end: int, level: int, ptep: int, flag: WalkFlags) -> None:
            t.mem.write64(ptep, t.mem.read64(ptep) & ~S1_PXN.mask)

        t.walk(0, t.geom.limit, Walker(clear_pxn, WalkFlags.LEAF))
    snap = from_tables(t)
    if wxn:
        snap.registers["SCTLR_EL2"] |= SCTLR_WXN.mask
    return snap


def _findings(snap: Snapshot) -> dict[str, list[tuple[int, str, bool]]]:
    return {f.kind: [(r.va, perm_label(r.perms), r.xn_by_wxn) for r in f.ranges] for f in findings(decode(snap))}


def test_findings_linux_6_12_hvhe() -> None:
    """Linux 6.12.117's pKVM hyp stage 1: rodata is executable at EL2, data only WXN keeps from it."""
    snap = _hyp(e2h=True, linux_6_12_xn=True, wxn=True)
    (rd,) = decode(snap)
    assert rd.regime.wxn
    assert [(r.va, perm_label(r.perms), r.xn_by_wxn) for r in rd.ranges] == [
        (TEXT, "r-x", False), (RODATA, "r-x", False), (DATA, "rw-", True)]
    assert _findings(snap) == {FINDING_WXN_ONLY: [(DATA, "rw-", True)],
                               FINDING_EL0_ONLY_XN: [(RODATA, "r-x", False), (DATA, "rw-", True)]}
    # Without WXN the same tables are writable and executable at EL2.
    assert _findings(_hyp(e2h=True, linux_6_12_xn=True, wxn=False)) == {
        FINDING_WRITABLE_EXECUTABLE: [(DATA, "rwx", False)],
        FINDING_EL0_ONLY_XN: [(RODATA, "r-x", False), (DATA, "rwx", False)]}


@pytest.mark.parametrize("e2h", [False, True])
@pytest.mark.parametrize("wxn", [False, True])
def test_no_findings_when_xn_is_right(e2h: bool, wxn: bool) -> None:
    """nVHE (XN = bit 54), and hVHE with the upstream fix (XN = UXN | PXN): nothing to report."""
    snap = _hyp(e2h=e2h, linux_6_12_xn=False, wxn=wxn)
    (rd,) = decode(snap)
    assert [perm_label(r.perms) for r in rd.ranges] == ["r-x", "r--", "rw-"]
    assert not any(r.xn_by_wxn for r in rd.ranges)
    assert findings([rd]) == []


def test_findings_in_cli_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hvhe.json"
    _hyp(e2h=True, linux_6_12_xn=True, wxn=True).save(str(path))
    assert main(["attach", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(f["kind"], f["regime"], f["cpus"], f["count"]) for f in out["findings"]] == [
        (FINDING_WXN_ONLY, "el2&0", [0], 1), (FINDING_EL0_ONLY_XN, "el2&0", [0], 2)]
    assert out["regimes"][0]["decoded"]["wxn"] is True
    assert main(["attach", str(path)]) == 0
    text = capsys.readouterr().out
    assert "W^X holds only through SCTLR_EL2.WXN" in text and "UXN = 1, PXN = 0" in text
    assert "el2&0 (vCPU 0): W^X" in text


# -- several CPUs: one regime per distinct set of tables and controls, with its CPUs -----------------

V1_FILE = Path(__file__).parent / "data" / "snapshot-v1.json"


def test_reads_a_version_1_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file written by the one-CPU format (version 1, top-level "registers"; made by main 6e89948's
    from_tables) loads as CPU 0, decodes as before, and is written back as version 2."""
    assert json.loads(V1_FILE.read_text())["version"] == 1
    old = Snapshot.load(V1_FILE)
    assert list(old.cpus) == [0] and old.registers["TCR_EL2"] == 0x80853519 and old.registers["cpsr"] == 0x3C9
    (rd,) = decode(old)
    assert rd.cpus == (0,)
    assert [(r.va, r.range.size, r.range.pa, perm_label(r.perms)) for r in rd.ranges] == [
        (0x0900_0000, 4096, 0x0900_0000, "rw-"), (0x4000_0000, 2 * MIB, 0x4000_0000, "r-x"),
        (0x4020_0000, 0x10000, 0x5000_0000, "rw-")]
    assert [r.to_json() for r in rd.ranges] == [r.to_json() for r in decode(from_tables(_demo()))[0].ranges]
    assert main(["attach", str(V1_FILE), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["current_el"] == 2 and [c["cpu"] for c in out["cpus"]] == [0]
    assert out["regimes"][0]["cpus"] == [0]
    again = tmp_path / "v2.json"
    old.save(again)
    assert json.loads(again.read_text())["version"] == 2 and Snapshot.load(again).cpus == old.cpus


GUEST_POOL = 0x4A00_0000
HCR_IMO_FMO = 0x18  # interrupts routed to EL2 while a guest runs: a difference the stage 1 ignores


def _hyp_and_guest() -> tuple[Snapshot, Snapshot]:
    """An nVHE hyp stage 1 and a guest's stage 2, in separate pools, as from_tables sees them."""
    hyp = HypPgtable(pool_for("4K"), "4K", 48, 48)
    hyp.map(0x4000_0000, 2 * MIB, 0x4000_0000, Prot.RX)
    hyp.map(0x4020_0000, 64 * 1024, 0x5000_0000, Prot.RW)
    guest = Stage2Pgtable(PagePool(GUEST_POOL, 256 * 4096, 4096), "4K", 40)
    guest.map(0x4000_0000, 2 * MIB, 0x6000_0000, Prot.RW)
    return from_tables(hyp), from_tables(guest)


def _smp(*cpus: dict[str, int], pages: dict[int, bytes]) -> Snapshot:
    return Snapshot(dict(enumerate(cpus)), pages, 4096, source="model smp")


def _guest_on(hyp: dict[str, int], guest: dict[str, int], vmid: int = 1) -> dict[str, int]:
    """A vCPU at the hyp's EL2 running a guest: stage 2 on with that guest's VMID and tables."""
    return {**hyp, "HCR_EL2": hyp["HCR_EL2"] | HCR_VM.mask | HCR_IMO_FMO,
            "VTCR_EL2": guest["VTCR_EL2"], "VTTBR_EL2": guest["VTTBR_EL2"] | vmid << 48}


def test_regimes_by_cpu_shares_the_hyp_and_splits_the_guests() -> None:
    """CPU 0 in the host (stage 2 off), CPUs 1 and 2 running the same guest (same VMID), CPU 3
    running another VM with the same tables but VMID 2, CPU 4 not started (SCTLR_EL2.M = 0). The hyp
    stage 1 is one regime of CPUs 0-3, although their HCR_EL2 differ; the stage 2 is two."""
    hyp, guest = _hyp_and_guest()
    h, g = hyp.registers, guest.registers
    off = {**h, "SCTLR_EL2": 0, "HCR_EL2": 0}
    uses = regimes_by_cpu({0: h, 1: _guest_on(h, g), 2: _guest_on(h, g), 3: _guest_on(h, g, vmid=2), 4: off})
    assert [(u.name, u.cpus) for u in uses] == [("el2", (0, 1, 2, 3)), ("stage2", (1, 2)), ("stage2", (3,))]
    assert uses[0].regime.registers["HCR_EL2"] == h["HCR_EL2"]  # the first CPU's values
    assert uses[1].regime.root == uses[2].regime.root == guest.regimes()[0].root
    assert regime_key(uses[1].regime) != regime_key(uses[2].regime)  # VTTBR_EL2.VMID
    # Each of WXN, MAIR, TCR, TTBR0 (an ASID or CnP too) makes another stage-1 regime.
    for change in ({"SCTLR_EL2": h["SCTLR_EL2"] | SCTLR_WXN.mask}, {"MAIR_EL2": h["MAIR_EL2"] ^ 0xFF00},
                   {"TCR_EL2": h["TCR_EL2"] | 1 << 20}, {"TTBR0_EL2": h["TTBR0_EL2"] | 1}):
        split = regimes_by_cpu({0: h, 1: {**h, **change}})
        assert [(u.name, u.cpus) for u in split] == [("el2", (0,)), ("el2", (1,))], change
    # ... and SCTLR_EL2 bits the walk does not read do not.
    assert [u.cpus for u in regimes_by_cpu({0: h, 1: {**h, "SCTLR_EL2": h["SCTLR_EL2"] | 1 << 2}})] == [(0, 1)]


def test_regimes_by_cpu_names_the_cpu_it_cannot_decode() -> None:
    hyp, _ = _hyp_and_guest()
    bad = {**hyp.registers, "TCR_EL2": hyp.registers["TCR_EL2"] | 1 << 14 | 1 << 15}  # TG0 = 0b11: reserved
    with pytest.raises(RegisterDecodeError, match=r"CPU 1: TCR_EL2\.TG0"):
        regimes_by_cpu({0: hyp.registers, 1: bad})


def test_smp_snapshot_decode_save_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two vCPUs sharing the hyp stage 1, vCPU 1 in a guest: each table page is stored once, the
    hyp is decoded once with both vCPUs, the guest's stage 2 with vCPU 1; --cpu keeps one vCPU."""
    hyp, guest = _hyp_and_guest()
    snap = _smp(hyp.registers, _guest_on(hyp.registers, guest.registers), pages={**hyp.pages, **guest.pages})
    decoded = decode(snap)
    assert [(rd.name, rd.cpus) for rd in decoded] == [("el2", (0, 1)), ("stage2", (1,))]
    assert [r.range.pa for r in decoded[1].ranges] == [0x6000_0000]
    path = tmp_path / "smp.json"
    snap.save(path)
    obj = json.loads(path.read_text())
    assert [c["cpu"] for c in obj["cpus"]] == [0, 1] and len(obj["pages"]) == len(hyp.pages) + len(guest.pages)
    back = Snapshot.load(path)
    assert back.cpus == snap.cpus and back.pages == snap.pages
    assert main(["attach", str(path), "--json", "--explain", "0x40001000"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["regime"], r["cpus"]) for r in out["regimes"]] == [("el2", [0, 1]), ("stage2", [1])]
    assert [(c["cpu"], c["regimes"]) for c in out["cpus"]] == [(0, [0]), (1, [0, 1])]
    assert out["cpus"][1]["registers"]["VTTBR_EL2"] == f"{snap.cpus[1]['VTTBR_EL2']:#x}"
    assert [(e["regime"], e["cpus"], e["pa"]) for e in out["explain"]] == [
        ("el2", [0, 1], 0x4000_1000), ("stage2", [1], 0x6000_1000)]
    assert main(["attach", str(path)]) == 0
    text = capsys.readouterr().out
    assert "el2 (vCPUs 0, 1):" in text and "stage2 (vCPU 1):" in text and "vCPU 1: stopped at EL?: el2, stage2" in text
    for cpu, want in ((0, [("el2", [0])]), (1, [("el2", [1]), ("stage2", [1])])):
        assert main(["attach", str(path), "--json", "--cpu", str(cpu)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert [(r["regime"], r["cpus"]) for r in out["regimes"]] == want
        assert [c["cpu"] for c in out["cpus"]] == [cpu]


@pytest.mark.parametrize("bad", ["2", "-1", "one", "0x"])
def test_cli_bad_cpu_exit_2(tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    hyp, _ = _hyp_and_guest()
    path = tmp_path / "smp.json"
    _smp(hyp.registers, hyp.registers, pages=hyp.pages).save(path)
    assert main(["attach", str(path), f"--cpu={bad}"]) == 2
    err = capsys.readouterr().err
    assert "--cpu" in err and (bad != "2" or "its CPUs: 0, 1" in err)


class _FakeGdb:
    """gdb/MI answers as gdb 13 gives them for QEMU's gdbstub with -smp 3 (threads are vCPUs)."""

    def __init__(self, current: str) -> None:
        self.current = current
        self.sent: list[str] = []

    def command(self, cmd: str, timeout: float | None = None) -> dict[str, Any]:
        self.sent.append(cmd)
        if cmd.startswith("-thread-select "):
            self.current = cmd.split()[1]
            return {"payload": {}}
        assert cmd == "-thread-info", cmd
        threads = [{"id": "3", "target-id": "Thread 1.3", "details": "CPU#2 [halted ]", "state": "stopped"},
                   {"id": "1", "target-id": "Thread 1.1", "details": "CPU#0 [running]", "state": "stopped"},
                   {"id": "2", "target-id": "Thread 1.2", "state": "stopped"}]  # no details: thread id - 1
        return {"payload": {"threads": threads, "current-thread-id": self.current}}


def test_vcpus_from_gdb_threads_and_selection_restored() -> None:
    gdb = _FakeGdb("1")
    sess = Session(gdb, parse_target("localhost:1234"), 5.0)  # type: ignore[arg-type]
    assert sess.vcpus() == [VCpu(0, "1", "CPU#0 [running]"), VCpu(1, "2", ""), VCpu(2, "3", "CPU#2 [halted ]")]
    _restore_thread(gdb, "1")  # type: ignore[arg-type]
    assert gdb.sent[-1] == "-thread-info"  # unchanged: nothing to do
    gdb.current = "3"
    _restore_thread(gdb, "1")  # type: ignore[arg-type]
    assert gdb.sent[-1] == "-thread-select 1" and gdb.current == "1"


def test_kernel_boot_smp_argument(tmp_path: Path) -> None:
    image = KernelImage(tmp_path / "vmlinuz-6.12", None, None)
    assert "-smp" not in KernelBoot(image, log_dir=tmp_path).args
    args = KernelBoot(image, smp=2, log_dir=tmp_path).args
    assert args[args.index("-smp") + 1] == "2"
    for bad in (0, 9, True, "2"):
        with pytest.raises(InputError, match="smp: expected a number of CPUs from 1 to 8"):
            KernelBoot(image, smp=bad, log_dir=tmp_path)  # type: ignore[arg-type]


# -- bad snapshots and output paths: exit 2, one line naming what is wrong, nothing left behind ----------

def _saved(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    t = HypPgtable(pool_for("4K"), "4K", 48, 48)
    t.map(0x4000_0000, 4 * 4096, 0x5000_0000, Prot.RW)
    t.map(0x8000_0000, 2 * MIB, 0x6000_0000, Prot.RX)
    path = tmp_path / "snap.json"
    from_tables(t).save(path)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("which", ["root", "last"])
def test_snapshot_missing_a_table_page_exit_2(tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]) -> None:
    path, obj = _saved(tmp_path)
    regs = obj["cpus"][0]["registers"]
    root = f"{int(regs['TTBR0_EL2'], 16) & ~0xFFF:#x}"
    drop = root if which == "root" else max(obj["pages"], key=lambda k: int(k, 16))
    assert drop in obj["pages"] and (which == "root" or drop != root)
    del obj["pages"][drop]
    path.write_text(json.dumps(obj))
    for extra in ([], ["--verify"]):
        assert main(["attach", str(path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"no page {drop}" in err, err


@pytest.mark.parametrize("content", [b"\x00\xff\xfe\x00 binary", b'{"format": "\xff"}', bytes(range(256))])
def test_snapshot_not_text_exit_2(tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bin.json"
    path.write_bytes(content)
    assert main(["attach", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not UTF-8" in err, err


@pytest.mark.parametrize(("args", "needle"), [
    (["--save", "/proc/pgtable-harness-x"], "--save: "),
    (["--save", "{tmp}"], "--save: "),
    (["--save", "{tmp}/no/such/dir/x.json"], "--save: "),
    (["--seed", "-1", "--verify"], "--seed: expected an integer >= 0"),
    (["--seed", "１", "--verify"], "--seed: expected an integer in ASCII digits"),
    (["--samples", "100000000000", "--verify"], "--samples: expected at most 100000 addresses per range and hole"),
    (["--samples", "１２３", "--verify"], "--samples: expected a count in ASCII digits"),
    (["--samples", "1e3", "--verify", "--timeout", "１"], "--timeout: expected a number of seconds"),
])
def test_attach_bad_options_exit_2_before_anything(tmp_path: Path, args: list[str], needle: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _saved(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert _exit_status(["attach", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.json"]  # nothing written, no 0-byte file


def _exit_status(argv: list[str]) -> int:
    """``main``'s exit status, argparse's own refusals (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def test_failed_save_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot is written to a temporary sibling and renamed: an error while writing (disk full,
    here a failing encoder) leaves neither a partial file nor the temporary one."""
    path, _ = _saved(tmp_path)
    snap = Snapshot.load(path)
    out = tmp_path / "out.json"

    def broken(self: Snapshot) -> dict[str, Any]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Snapshot, "to_json", broken)
    with pytest.raises(OSError, match="No space"):
        snap.save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.json"]


def test_refused_connection_said_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listens on the port: gdb is told not to retry, and the error says refused (not a
    timeout) within a few seconds."""
    import socket
    import time

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    assert main(["attach", f"127.0.0.1:{port}", "--timeout", "30"]) == 3
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "connection refused" in err and "timed out" not in err, err


def test_timeout_bounds_gdbs_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A gdb that never answers: --timeout applies to its first command too (not gdb's 10 s
    default), and the stand-in is not left running."""
    import os
    import time

    from harness.target.process import owned_processes

    hung = tmp_path / "gdb"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    monkeypatch.setenv("HARNESS_GDB", str(hung))
    t0 = time.monotonic()
    assert main(["attach", "127.0.0.1:1", "--timeout", "0.5"]) == 3
    assert time.monotonic() - t0 < 4
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("harness attach: error: timed out after 0.5 s waiting for gdb's answer"), line
    assert [pid for pid in owned_processes(os.getpid()) if _exe(pid) == "sleep"] == []  # the stand-in reaped


def _exe(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/exe").resolve(strict=True).name
    except OSError:
        return ""


def test_upper_range_decoded_at_its_top_addresses(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Tables installed through TTBR1_EL2 (E2H = 1; a VHE host kernel's): their ranges start at
    2**64 - 2**ia_bits, a walk of a top address finds the same leaf as the lower range's walk of
    VA - va_base, and the W^X findings (the hypervisor's rules) do not judge them."""
    t = HypPgtable(pool_for("4K"), "4K", 48, 48, e2h=True)
    t.map(0x4000_0000, 2 * MIB, 0x5000_0000, Prot.RX)
    snap = from_tables(t)
    regs = snap.cpus[0]
    tcr = regs["TCR_EL2"]
    t0sz, tg0_4k = tcr & 0x3F, 0b10  # TG1's 4K encoding
    regs.update(TCR_EL2=(tcr & ~((0x3F << 16) | (3 << 30) | (1 << 23))) | (t0sz << 16) | (tg0_4k << 30) | (1 << 7),
                TTBR1_EL2=regs["TTBR0_EL2"], TTBR0_EL2=0)
    (rd,) = decode(snap)
    base = (1 << 64) - (1 << 48)
    assert rd.name == "el2&0:ttbr1" and rd.regime.va_base == base
    [(va, size, pa, perms)] = [(r.va, r.range.size, r.range.pa, r.to_json()["perms"]) for r in rd.ranges]
    assert (va, size, pa, perms) == (base + 0x4000_0000, 2 * MIB, 0x5000_0000, "r-x")
    assert findings([rd]) == []  # a kernel's text is PXN = 0, UXN = 1: not the hyp's el0-only-xn
    path = tmp_path / "upper.json"
    snap.save(path)
    assert main(["attach", str(path), "--json", "--explain", hex(base + 0x4000_1234)]) == 0
    (ex,) = json.loads(capsys.readouterr().out)["explain"]
    assert ex["ok"] and ex["pa"] == 0x5000_1234 and hex(base + 0x4000_1234) in ex["walk"]
    assert main(["attach", str(path), "--json", "--explain", "0x40001234"]) == 0  # below the range
    (ex,) = json.loads(capsys.readouterr().out)["explain"]
    assert not ex["ok"]


def test_vmm_log_bad_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _saved(tmp_path)
    plain = tmp_path / "console.log"
    plain.write_text("[    0.0] Booting Linux on physical CPU 0x0\n")
    for log, needle in ((tmp_path / "missing.log", "--vmm: cannot read"), (plain, "no '@@vmm' record")):
        assert main(["attach", str(path), "--vmm", str(log)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


# -- --verify's failures: the replay target's logs kept and named as every command names them ---------

class _ReplayStandIn:
    """A started replay target that answers what verify asks before its probes (no QEMU)."""

    qemu_version = (10, 0, 2)

    def install(self, *args: object) -> None:
        pass

    def uninstall(self) -> None:
        pass

    def sysreg(self, name: str) -> int:
        return 0

    def close(self) -> None:
        pass


def _replay_with(monkeypatch: pytest.MonkeyPatch, probes: Any) -> None:
    """--verify's targets are stand-ins (each writing a console log into its log directory, as QEMU
    does) and its AT probes are ``probes(report)``."""
    import harness.check.attach as att_mod
    from harness.target.target import Target

    def start(*args: object, **kwargs: object) -> _ReplayStandIn:
        log_dir = kwargs["log_dir"]
        assert isinstance(log_dir, Path) and log_dir.is_dir()
        (log_dir / "console.log").write_text("ready\n")
        return _ReplayStandIn()

    monkeypatch.setattr(Target, "start", start)
    monkeypatch.setattr(att_mod, "check_at", lambda report, *a, **k: probes(report))
    monkeypatch.setattr(att_mod, "check_exec", lambda *a, **k: None)


def _named_logs(line: str, words: str) -> list[Path]:
    assert words in line, line
    listed = line.split(words, 1)[1].split(")", 1)[0].split(";", 1)[0]
    return [Path(p) for p in listed.split(", ")]


def test_verify_mismatch_keeps_and_names_its_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 1: the replay's log directory kept, named in the words of run and check."""
    from harness.check.engine import Mismatch

    path, _ = _saved(tmp_path)
    _replay_with(monkeypatch, lambda report: report.add(Mismatch(0x4000_0000, "S1E2R", "PA 0x1", "fault", ""), None))
    assert main(["attach", str(path), "--verify"]) == 1
    out, err = capsys.readouterr()
    assert "verify: MISMATCH" in out
    (line,) = err.strip().splitlines()
    logs = _named_logs(line, "harness attach: logs kept in ")
    try:
        assert logs and all((d / "console.log").exists() for d in logs), line
    finally:
        for d in logs:
            shutil.rmtree(d, ignore_errors=True)


def test_verify_machinery_failure_names_its_logs_with_error_txt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 3: one line `harness attach: error: ... (logs: DIR)`, DIR/error.txt the whole story."""
    from harness.target.errors import QemuExited

    def dies(report: object) -> None:
        raise QemuExited("AT S1E2R", -9, "console tail", "")

    path, _ = _saved(tmp_path)
    _replay_with(monkeypatch, dies)
    assert main(["attach", str(path), "--verify"]) == 3
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("harness attach: error: ") and "killed by SIGKILL" in line, line
    logs = _named_logs(line, "(logs: ")
    try:
        assert logs and all((d / "console.log").exists() for d in logs), line
        assert all("console tail" in (d / "error.txt").read_text() for d in logs), line
    finally:
        for d in logs:
            shutil.rmtree(d, ignore_errors=True)


def test_verify_user_log_dir_is_named_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from harness.check.engine import Mismatch

    path, _ = _saved(tmp_path)
    _replay_with(monkeypatch, lambda report: report.add(Mismatch(0x4000_0000, "S1E2R", "PA 0x1", "fault", ""), None))
    logs = tmp_path / "logs"
    assert main(["attach", str(path), "--verify", "--log-dir", str(logs)]) == 1
    capsys.readouterr()
    assert (logs / "console.log").exists()
