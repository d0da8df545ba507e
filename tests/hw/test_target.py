"""The QEMU target: firmware build, boot, every request, and failure paths (marker ``hw``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from handmade import HVHE_AP_RO, leaf_attrs, s1_hvhe_identity, s1_identity, s2_identity

from harness.arch import descriptors as d
from harness.arch.geometry import Geometry, Granule, Stage
from harness.arch.registers import (
    ESR_EC,
    HCR_E2H,
    HCR_TGE,
    HCR_VM,
    HPFAR_FIPA,
    ISS_DFSC,
    ISS_WNR,
    SCTLR_M,
    ExceptionClass,
    FaultKind,
    Par,
    fault_status,
    stage1_regs,
)
from harness.core.prot import Prot
from harness.target import mailbox as mbx
from harness.target.errors import FirmwareException, QemuExited, RequestFailed, TargetError, TargetTimeout
from harness.target.firmware import available_toolchains, build, choose_toolchain
from harness.target.layout import LAYOUT, Region
from harness.target.physmem import GdbPhysMemory
from harness.target.target import Target

pytestmark = pytest.mark.hw

SCRATCH = Region("scratch0", LAYOUT.scratch_base, 4 << 20, Prot.RW)
SCRATCH_RO = Region("scratch_ro", LAYOUT.scratch_base + (4 << 20), 2 << 20, Prot.R)
UNMAPPED = LAYOUT.scratch_base + (64 << 20)


def _symbols(elf: Path) -> dict[str, int]:
    nm = os.environ.get("CROSS_COMPILE", "aarch64-linux-gnu-") + "nm"
    out = subprocess.run([nm, str(elf)], capture_output=True, text=True, check=True).stdout
    return {p[2]: int(p[0], 16) for p in (line.split() for line in out.splitlines()) if len(p) == 3}


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_toolchain_builds(compiler: str) -> None:
    chains = {c.name: c for c in available_toolchains()}
    if compiler not in chains:
        pytest.skip(f"{compiler} toolchain is not installed")
    elf = build(cc=" ".join(chains[compiler].cc[:1]))
    assert elf.read_bytes()[:4] == b"\x7fELF"
    syms = _symbols(elf)
    assert syms["_start"] == LAYOUT.code
    assert syms["el1_stub_ld"] == LAYOUT.el1_stub
    assert LAYOUT.data <= syms["__panic_stack_top"] <= LAYOUT.data + LAYOUT.data_size
    assert LAYOUT.code <= syms["idle"] < LAYOUT.code + LAYOUT.code_size


def test_layout_is_consistent() -> None:
    LAYOUT.check()
    for r in [*LAYOUT.stage1_regions(), *LAYOUT.stage2_regions()]:
        assert r.base % 0x10000 == 0 and r.size % 0x10000 == 0
    assert choose_toolchain().name in ("gcc", "clang")


def test_banner_and_mailbox(target: Target) -> None:
    log = target.console_log.read_text()
    assert "pgtable-harness firmware: EL2" in log and "ready" in log
    assert int.from_bytes(target.read_pa(LAYOUT.mailbox, 8), "little") == mbx.MAGIC
    assert target.qemu_version >= (7, 2, 1)
    assert target.sysreg("VBAR_EL2") & ~0x7FF == target.sysreg("VBAR_EL2")
    assert (target.sysreg("cpsr") >> 2) & 3 == 2  # EL2


@pytest.mark.parametrize("granule", ["4K", "16K", "64K"])
def test_install_s1_and_at(target: Target, granule: str) -> None:
    tab = s1_identity(LAYOUT, granule, extra=[SCRATCH, SCRATCH_RO])
    regs = tab.s1_regs()
    target.install(regs, tab.image())
    assert target.sysreg("TCR_EL2") == regs.tcr_el2
    assert target.sysreg("TTBR0_EL2") == regs.ttbr0_el2
    assert target.sysreg("SCTLR_EL2") & SCTLR_M.mask
    addrs = [SCRATCH.base + 0x1238, LAYOUT.code + 0x10, UNMAPPED]
    pars = [Par(int(p)) for p in target.at(addrs, "S1E2R")]
    assert not pars[0].fault and pars[0].pa == SCRATCH.base + 0x1000 and pars[0].attr == 0xFF
    assert not pars[1].fault and pars[1].pa == LAYOUT.code
    assert pars[2].fault and pars[2].fst >> 2 == FaultKind.TRANSLATION.value
    # write to a read-only page: permission fault
    w = Par(int(target.at([SCRATCH_RO.base], "S1E2W")[0]))
    assert w.fault and w.fst >> 2 == FaultKind.PERMISSION.value
    # the firmware ran on the table: reading through the regime works
    assert target.read_va(LAYOUT.mailbox, 8) == target.read_pa(LAYOUT.mailbox, 8)
    target.uninstall()
    assert not target.sysreg("SCTLR_EL2") & SCTLR_M.mask


def test_at_many_and_nonblocking(target: Target) -> None:
    tab = s1_identity(LAYOUT, "4K", extra=[SCRATCH])
    target.install(tab.s1_regs(), tab.image())
    addrs = SCRATCH.base + np.arange(100_000, dtype=np.uint64) * 64 % SCRATCH.size
    target.at_start(addrs, "S1E2R")
    expect = (addrs & ~np.uint64(0xFFF))
    pars = target.at_wait()
    assert ((pars & np.uint64(1)) == 0).all()
    assert ((pars & np.uint64(0xFFFFFFFFF000)) == expect).all()


def test_access_s1(target: Target) -> None:
    tab = s1_identity(LAYOUT, "4K", extra=[SCRATCH, SCRATCH_RO])
    target.install(tab.s1_regs(), tab.image())
    target.write_pa(SCRATCH.base, bytes(32))
    tokens = [0x1111_2222_3333_4444, 0x5555, 0xAAAA_BBBB_CCCC_DDDD]
    rec = target.access([SCRATCH.base + 8, UNMAPPED, SCRATCH.base + 17], write=True, values=tokens)
    assert rec["completed"].tolist() == [True, False, True]
    assert rec["value"].tolist() == tokens
    assert ESR_EC.get(int(rec["esr"][1])) == ExceptionClass.DABT_SAME
    assert ISS_DFSC.get(int(rec["esr"][1])) >> 2 == FaultKind.TRANSLATION.value
    assert ISS_WNR.get(int(rec["esr"][1]))
    assert int(rec["far"][1]) == UNMAPPED
    # 64-bit stores at the aligned word: the tokens are in RAM where the identity map says
    assert target.ram_u64(SCRATCH.base + 8, 2).tolist() == [tokens[0], tokens[2]]
    # loads read what is planted there
    target.write_pa(SCRATCH_RO.base, (0x0123_4567_89AB_CDEF).to_bytes(8, "little"))
    ro = target.access([SCRATCH_RO.base, SCRATCH_RO.base + 4, UNMAPPED], write=False)
    assert ro["completed"].tolist() == [True, True, False]
    assert ro["value"].tolist() == [0x0123_4567_89AB_CDEF, 0x0123_4567_89AB_CDEF, 0]
    # default store values: unique tokens, reported in the record
    dflt = target.access([SCRATCH.base + 0x100, SCRATCH.base + 0x108], write=True)
    assert len(set(dflt["value"].tolist())) == 2
    assert target.ram_u64(SCRATCH.base + 0x100, 2).tolist() == dflt["value"].tolist()
    rw = target.access([SCRATCH_RO.base], write=True)
    assert ISS_DFSC.get(int(rw["esr"][0])) >> 2 == FaultKind.PERMISSION.value


def test_install_s2_at_and_access(target: Target) -> None:
    tab = s2_identity(LAYOUT, "4K", extra=[SCRATCH, SCRATCH_RO])
    target.install(tab.s2_regs(), tab.image())
    assert target.sysreg("VTCR_EL2") == tab.s2_regs().vtcr_el2
    pars = [Par(int(p)) for p in target.at([SCRATCH.base + 0x2345, UNMAPPED], "S12E1R")]
    assert not pars[0].fault and pars[0].pa == SCRATCH.base + 0x2000
    assert pars[1].fault and pars[1].stage2
    assert pars[1].fst == fault_status(FaultKind.TRANSLATION, 2)  # 4K, 40-bit IPA: level-2 table missing
    target.write_pa(SCRATCH.base + 16, (0xFEED_FACE_CAFE_BEEF).to_bytes(8, "little"))
    rec = target.access([SCRATCH.base + 16, UNMAPPED + 0x123], write=False)
    assert rec["completed"].tolist() == [True, False]
    assert rec["value"].tolist() == [0xFEED_FACE_CAFE_BEEF, 0]
    st = target.access([SCRATCH.base + 0x40], write=True, values=[0x0BAD_C0DE_0000_0001])
    assert st["completed"].all() and target.ram_u64(SCRATCH.base + 0x40, 1)[0] == 0x0BAD_C0DE_0000_0001
    esr = int(rec["esr"][1])
    assert ESR_EC.get(esr) == ExceptionClass.DABT_LOWER
    assert ISS_DFSC.get(esr) == fault_status(FaultKind.TRANSLATION, 2)
    assert HPFAR_FIPA.get(int(rec["hpfar"][1])) == (UNMAPPED >> 12)
    w = target.access([SCRATCH_RO.base + 1], write=True)
    assert ESR_EC.get(int(w["esr"][0])) == ExceptionClass.DABT_LOWER
    assert ISS_DFSC.get(int(w["esr"][0])) >> 2 == FaultKind.PERMISSION.value


def test_s2_without_stub_page_is_reported(target: Target) -> None:
    tab = s2_identity(LAYOUT, "4K", skip=("el1_stub",), extra=[SCRATCH])
    target.install(tab.s2_regs(), tab.image())
    with pytest.raises(FirmwareException) as info:
        target.access([SCRATCH.base], write=False)
    assert ESR_EC.get(info.value.esr) == ExceptionClass.IABT_LOWER
    assert not target.alive  # parked: the fixture starts a new target


def test_faulting_table_raises_firmware_exception(target: Target) -> None:
    tab = s1_identity(LAYOUT, "4K", skip=("probe_results",), extra=[SCRATCH])
    target.install(tab.s1_regs(), tab.image())
    with pytest.raises(FirmwareException) as info:
        target.at([SCRATCH.base], "S1E2R")
    exc = info.value
    assert ESR_EC.get(exc.esr) == ExceptionClass.DABT_SAME
    assert LAYOUT.probe_results <= exc.far < LAYOUT.probe_results + LAYOUT.probe_results_size
    assert "=>" in exc.disassembly and "str" in exc.disassembly
    assert "UNEXPECTED EXCEPTION" in str(exc)
    assert exc.extra["sctlr"] & SCTLR_M.mask == 0  # the handler turned the MMU off before reporting


def test_target_restarts_after_exception(target: Target) -> None:
    tab = s1_identity(LAYOUT, "4K", extra=[SCRATCH])
    target.install(tab.s1_regs(), tab.image())
    assert not Par(int(target.at([SCRATCH.base], "S1E2R")[0])).fault


# -- accesses prove the physical address -------------------------------------------------------------

PAGES = LAYOUT.scratch_base + (16 << 20)  # 64 KiB mapped with pages (not block aligned in size)


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_redirected_page_is_caught_by_its_token(target: Target, stage: Stage) -> None:
    """A descriptor corrupted to point one page further: the access completes (so completion alone
    proves nothing), but the token lands at the wrong PA and a load reads the wrong PA's value."""
    tab = s1_identity(LAYOUT, "4K") if stage is Stage.S1 else s2_identity(LAYOUT, "4K")
    tab.map(PAGES, 0x10000, Prot.RW)
    victim, wrong = PAGES + 0x3000, PAGES + 0x5000
    entry = tab.entry_pa(victim, 3)
    tab.pool.write64(entry, d.leaf_pte(wrong, leaf_attrs(stage, Prot.RW), 3, tab.geom.granule))
    target.install(tab.s1_regs() if stage is Stage.S1 else tab.s2_regs(), tab.image())
    target.write_pa(PAGES, bytes(0x10000))
    token = 0x70CE_0000_0000_0001 + int(stage)
    rec = target.access([victim + 0x18, PAGES + 0x2018], write=True, values=[token, token + 0x100])
    assert rec["completed"].all()
    assert target.ram_u64(victim + 0x18, 1)[0] == 0, "the token reached the expected PA through a wrong descriptor"
    assert target.ram_u64(wrong + 0x18, 1)[0] == token  # a checker looking at the expected PA catches it
    assert target.ram_u64(PAGES + 0x2018, 1)[0] == token + 0x100  # the intact neighbour is where it should be
    target.write_pa(victim + 0x20, (0x1111).to_bytes(8, "little"))
    target.write_pa(wrong + 0x20, (0x2222).to_bytes(8, "little"))
    ld = target.access([victim + 0x20], write=False)
    assert ld["completed"].all() and ld["value"].tolist() == [0x2222]


# -- AT that takes an exception ---------------------------------------------------------------------

NO_RAM = 0x8000_0000_0000  # below 2^48, nothing behind it on virt: a walk reading here aborts


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_at_external_abort_is_recorded_and_the_loop_goes_on(target: Target, stage: Stage) -> None:
    tab = s1_identity(LAYOUT, "4K", extra=[SCRATCH]) if stage is Stage.S1 else s2_identity(
        LAYOUT, "4K", extra=[SCRATCH])
    va = 0x40_0000_0000  # level-1 index 256: a table pointer to PA NO_RAM
    tab.pool.write64(tab.entry_pa(va, 1), d.table_pte(NO_RAM, tab.geom.granule))
    target.install(tab.s1_regs() if stage is Stage.S1 else tab.s2_regs(), tab.image())
    before = target.at_exceptions
    op = "S1E2R" if stage is Stage.S1 else "S12E1R"
    par = target.at([SCRATCH.base, va + 0x1000, SCRATCH.base + 0x2000, va + 0x20_0000, UNMAPPED], op)
    exc = mbx.is_at_exception(par)
    assert exc.tolist() == [False, True, False, True, False]
    esr = mbx.at_exception_esr(par)
    for e in esr[exc]:
        assert ESR_EC.get(int(e)) == ExceptionClass.DABT_SAME
        assert ISS_DFSC.get(int(e)) == 0b010100 | 2  # synchronous external abort on the walk, level 2
    assert [Par(int(p)).pa for p in par[[0, 2]]] == [SCRATCH.base, SCRATCH.base + 0x2000]
    assert Par(int(par[4])).fault and not mbx.is_at_exception(par[4:5])[0]
    assert target.at_exceptions == before + 2
    assert all(Par(int(p)).fault for p in par[exc])  # a reader of PAR.F alone sees a fault
    assert not Par(int(target.at([SCRATCH.base + 0x3000], op)[0])).fault  # the target is still usable


def test_at_exception_helpers() -> None:
    esr = (int(ExceptionClass.DABT_SAME) << ESR_EC.lo) | (1 << 25) | 0b010110
    slot = mbx.at_exception_value(esr)
    assert mbx.is_at_exception(np.array([slot, 0xFF00_0000_4000_1B80, 0x809], dtype=np.uint64)).tolist() == [
        True, False, False]
    assert int(mbx.at_exception_esr(np.array([slot], dtype=np.uint64))[0]) == esr
    assert Par(slot).fault and Par(slot).fst == 0b010110


# -- hVHE: the EL2&0 regime ------------------------------------------------------------------------


def test_hvhe_stage1(target: Target) -> None:
    """HCR_EL2.E2H = 1 with TCR_EL2 in its E2H = 1 layout; AT S1E2* and accesses in the EL2&0
    regime; UNINSTALL returns to E2H = 0 and the plain EL2 regime works again."""
    tab = s1_hvhe_identity(LAYOUT, "4K", 48, extra=[SCRATCH, SCRATCH_RO])
    regs = tab.s1_regs()
    assert regs.hcr_el2_set == HCR_E2H.mask
    assert d.S1_AP.get(tab.pool.read64(tab.entry_pa(SCRATCH_RO.base, 2))) == HVHE_AP_RO
    target.install(regs, tab.image())
    assert target.sysreg("HCR_EL2") & HCR_E2H.mask
    assert target.sysreg("TCR_EL2") == regs.tcr_el2
    high = 0xFFFF_0000_0000  # a 48-bit VA: TTBR0's range with T0SZ = 16, nothing mapped
    pars = [Par(int(p)) for p in target.at([SCRATCH.base + 0x1238, SCRATCH_RO.base, high], "S1E2R")]
    assert not pars[0].fault and pars[0].pa == SCRATCH.base + 0x1000
    assert not pars[1].fault and pars[1].pa == SCRATCH_RO.base
    assert pars[2].fault and pars[2].fst == fault_status(FaultKind.TRANSLATION, 0)
    w = [Par(int(p)) for p in target.at([SCRATCH_RO.base, SCRATCH.base], "S1E2W")]
    assert w[0].fault and w[0].fst == fault_status(FaultKind.PERMISSION, 2)
    assert not w[1].fault
    rec = target.access([SCRATCH.base + 0x40, SCRATCH_RO.base], write=True, values=[0xE2E2, 0xBAD])
    assert rec["completed"].tolist() == [True, False]
    assert ISS_DFSC.get(int(rec["esr"][1])) == fault_status(FaultKind.PERMISSION, 2)
    assert target.ram_u64(SCRATCH.base + 0x40, 1)[0] == 0xE2E2
    target.uninstall()
    assert not target.sysreg("HCR_EL2") & HCR_E2H.mask
    assert not target.sysreg("SCTLR_EL2") & SCTLR_M.mask
    plain = s1_identity(LAYOUT, "4K", extra=[SCRATCH])
    target.install(plain.s1_regs(), plain.image())
    assert not target.sysreg("HCR_EL2") & HCR_E2H.mask
    assert Par(int(target.at([SCRATCH.base], "S1E2R")[0])).pa == SCRATCH.base


def test_install_swaps_in_one_request(target: Target) -> None:
    """INSTALL uninstalls first in the firmware: from nothing or stage 2 a swap is one request
    (HCR_EL2.VM goes with stage 2, E2H with hVHE); after stage 1 the host uninstalls first (its
    image would overwrite the tables the firmware's own code is translated by)."""
    target.uninstall()
    s2 = s2_identity(LAYOUT, "4K", extra=[SCRATCH])
    hvhe = s1_hvhe_identity(LAYOUT, "4K", 48, extra=[SCRATCH])
    plain = s1_identity(LAYOUT, "64K", extra=[SCRATCH])

    def requests() -> int:
        return int(target.ram_u64(LAYOUT.mailbox + mbx.OFFSET["requests"], 1)[0])

    before = requests()
    target.install(s2.s2_regs(), s2.image())  # nothing installed: one request
    assert requests() == before + 1 and target.sysreg("HCR_EL2") & HCR_VM.mask
    before = requests()
    target.install(hvhe.s1_regs(), hvhe.image())  # stage 2 -> hVHE stage 1: one request
    assert requests() == before + 1
    assert not target.sysreg("HCR_EL2") & HCR_VM.mask and target.sysreg("HCR_EL2") & HCR_E2H.mask
    assert Par(int(target.at([SCRATCH.base + 0x1238], "S1E2R")[0])).pa == SCRATCH.base + 0x1000
    before = requests()
    target.install(plain.s1_regs(), plain.image())  # stage 1 -> stage 1: uninstall, install
    assert requests() == before + 2 and not target.sysreg("HCR_EL2") & HCR_E2H.mask
    assert Par(int(target.at([SCRATCH.base + 0x1238], "S1E2R")[0])).pa == SCRATCH.base + 0x1000
    before = requests()
    target.install(s2.s2_regs(), s2.image())
    assert requests() == before + 2 and not target.sysreg("SCTLR_EL2") & SCTLR_M.mask
    pars = [Par(int(p)) for p in target.at([SCRATCH.base + 0x2345, UNMAPPED], "S12E1R")]
    assert not pars[0].fault and pars[0].pa == SCRATCH.base + 0x2000 and pars[1].stage2
    before = requests()
    target.install(s2.s2_regs(), s2.image())  # stage 2 -> stage 2: one request
    assert requests() == before + 1
    assert Par(int(target.at([SCRATCH.base + 0x2345], "S12E1R")[0])).pa == SCRATCH.base + 0x2000
    target.uninstall()
    assert not target.sysreg("HCR_EL2") & HCR_VM.mask


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_both_at_forms_in_one_request(target: Target, stage: Stage) -> None:
    """AT_S1E2RW / AT_S12E1RW: the read form over one list, the write form over another, one
    request; the same PARs as the single-form requests."""
    if stage is Stage.S1:
        tab = s1_identity(LAYOUT, "4K", extra=[SCRATCH, SCRATCH_RO])
        target.install(tab.s1_regs(), tab.image())
        ops = ("S1E2R", "S1E2W")
    else:
        tab = s2_identity(LAYOUT, "4K", extra=[SCRATCH, SCRATCH_RO])
        target.install(tab.s2_regs(), tab.image())
        ops = ("S12E1R", "S12E1W")
    # (at stage 2 a write form meeting a stage-2 permission fault aborts QEMU 10.0.2: facts.md)
    ro = SCRATCH_RO.base if stage is Stage.S1 else UNMAPPED + 0x5000
    reads = np.array([SCRATCH.base + 0x1238, ro + 8, UNMAPPED], dtype=np.uint64)
    writes = np.array([ro, SCRATCH.base + 0x3000], dtype=np.uint64)
    before = int(target.ram_u64(LAYOUT.mailbox + mbx.OFFSET["requests"], 1)[0])
    target.at_start_both(reads, writes, stage)
    pars = target.at_wait()
    assert int(target.ram_u64(LAYOUT.mailbox + mbx.OFFSET["requests"], 1)[0]) == before + 1
    assert pars.tolist() == [*target.at(reads, ops[0]).tolist(), *target.at(writes, ops[1]).tolist()]
    w = Par(int(pars[3]))
    assert w.fault and w.fst >> 2 == (FaultKind.PERMISSION if stage is Stage.S1 else FaultKind.TRANSLATION).value
    assert not Par(int(pars[0])).fault and not Par(int(pars[4])).fault
    r, wr = target.at_both(reads, stage)
    assert r.tolist() == pars[:3].tolist() and wr.tolist() == target.at(reads, ops[1]).tolist()
    target.at_start_both(reads, reads[:0], stage)  # an empty half
    assert target.at_wait().tolist() == r.tolist()
    with pytest.raises(RequestFailed):  # the second count beyond the buffers
        target.request(mbx.Cmd.AT, int(mbx.AtOp.S1E2RW), 1, LAYOUT.probe_addrs, LAYOUT.probe_results,
                       LAYOUT.probe_addrs_size // 8, 0)
    with pytest.raises(ValueError):
        target.at_start(reads, "S1E2RW")  # the paired ops are at_start_both's
    before = int(target.ram_u64(LAYOUT.mailbox + mbx.OFFSET["requests"], 1)[0])
    target.at_start_both(reads, writes, stage, uninstall=True)  # a table's last probes, then uninstall
    assert target.at_wait().tolist() == pars.tolist() and target.installed is None
    assert int(target.ram_u64(LAYOUT.mailbox + mbx.OFFSET["requests"], 1)[0]) == before + 1
    assert not target.sysreg("SCTLR_EL2") & SCTLR_M.mask and not target.sysreg("HCR_EL2") & HCR_VM.mask
    flat = Par(int(target.at([UNMAPPED], ops[0])[0]))
    assert not flat.fault and flat.pa == UNMAPPED  # nothing installed: the flat map


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_loads_and_stores_in_one_request(target: Target, stage: Stage) -> None:
    """ACCESS write = 2: loads over one list, then stores over another, one request; records as
    from a load request and a store request."""
    if stage is Stage.S1:
        tab = s1_identity(LAYOUT, "4K", extra=[SCRATCH, SCRATCH_RO])
        target.install(tab.s1_regs(), tab.image())
    else:
        tab = s2_identity(LAYOUT, "4K", extra=[SCRATCH, SCRATCH_RO])
        target.install(tab.s2_regs(), tab.image())
    target.write_pa(SCRATCH.base + 0x100, (0x10AD_0000_0000_0001).to_bytes(8, "little"))
    loads = [SCRATCH.base + 0x100, UNMAPPED + 0x10, SCRATCH_RO.base]
    stores = [SCRATCH.base + 0x200, SCRATCH_RO.base + 8, UNMAPPED]
    before = int(target.ram_u64(LAYOUT.mailbox + mbx.OFFSET["requests"], 1)[0])
    ld, st = target.access_both(loads, stores, stage)
    assert int(target.ram_u64(LAYOUT.mailbox + mbx.OFFSET["requests"], 1)[0]) == before + 1
    assert ld["completed"].tolist() == [True, False, True] and int(ld["value"][0]) == 0x10AD_0000_0000_0001
    assert st["completed"].tolist() == [True, False, False]
    assert target.ram_u64(SCRATCH.base + 0x200, 1)[0] == st["value"][0] and st["value"][0] != 0
    ld2 = target.access(loads, write=False, stage=stage)
    st2 = target.access(stores, write=True, stage=stage)
    for name in ("status", "esr", "far", "hpfar"):
        assert ld[name].tolist() == ld2[name].tolist() and st[name].tolist() == st2[name].tolist()
    assert ISS_WNR.get(int(st["esr"][1])) == 1 and ISS_WNR.get(int(ld["esr"][1])) == 0
    target.uninstall()


def test_install_in_flight(target: Target) -> None:
    """install_start leaves the request in flight (nothing else may be asked meanwhile), install_wait
    finishes it."""
    tab = s2_identity(LAYOUT, "4K", extra=[SCRATCH])
    target.install_start(tab.s2_regs(), tab.image())
    with pytest.raises(TargetError, match="install_wait"):
        target.request_nop()
    with pytest.raises(TargetError):
        target.at_wait()
    target.install_wait()
    assert target.installed is Stage.S2
    assert Par(int(target.at([SCRATCH.base + 0x2345], "S12E1R")[0])).pa == SCRATCH.base + 0x2000
    with pytest.raises(TargetError):
        target.install_wait()
    target.uninstall()


def test_install_s1_refuses_other_hcr_bits(target: Target) -> None:
    tab = s1_identity(LAYOUT, "4K")
    with pytest.raises(RequestFailed):
        target.install(replace(tab.s1_regs(), hcr_el2_set=HCR_TGE.mask), tab.image())
    target.uninstall()


# -- failure paths with private targets ---------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_qemu_killed_mid_request(tmp_path: Path) -> None:
    with Target.start(log_dir=tmp_path) as t:
        t.at_start(np.full(LAYOUT.max_at, LAYOUT.code, dtype=np.uint64), "S1E2R")  # ~1 s of work
        threading.Timer(0.1, lambda: os.kill(t.pids["qemu"], signal.SIGKILL)).start()
        with pytest.raises(QemuExited) as info:
            t.at_wait()
        assert info.value.returncode == -signal.SIGKILL
        assert "ready" in info.value.console_tail
        assert not t.alive


def test_hung_qemu_times_out(tmp_path: Path) -> None:
    with Target.start(log_dir=tmp_path, request_timeout=1.0) as t:
        os.kill(t.pids["qemu"], signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(TargetTimeout) as info:
            t.uninstall()
        assert time.monotonic() - t0 < 10
        assert "UNINSTALL" in info.value.awaited


def test_spinning_firmware_times_out_with_evidence(tmp_path: Path) -> None:
    with Target.start(log_dir=tmp_path) as t:
        with pytest.raises(TargetTimeout) as info:
            t.spin(timeout=0.5)
        ev = info.value.evidence
        assert ev["exception level"] == "EL2"
        assert LAYOUT.code <= int(ev["pc"], 16) < LAYOUT.code + LAYOUT.code_size
        assert "around pc" in ev


@pytest.mark.parametrize("how", ["success", "error", "timeout", "keyboard_interrupt"])
def test_no_process_outlives_target(tmp_path: Path, how: str) -> None:
    pids: dict[str, int] = {}
    workdir: Path | None = None
    expected: type[BaseException] | None = {
        "success": None, "error": FirmwareException, "timeout": TargetTimeout,
        "keyboard_interrupt": KeyboardInterrupt,
    }[how]
    try:
        with Target.start(log_dir=tmp_path) as t:
            pids = dict(t.pids)
            workdir = t.workdir
            assert pids.keys() == {"qemu", "gdb"} and all(not _gone(p) for p in pids.values())
            if how == "error":
                tab = s1_identity(LAYOUT, "4K", skip=("probe_results",))
                t.install(tab.s1_regs(), tab.image())
                t.at([LAYOUT.code], "S1E2R")
            elif how == "timeout":
                t.spin(timeout=0.3)
            elif how == "keyboard_interrupt":
                old = signal.signal(signal.SIGALRM, signal.default_int_handler)
                signal.setitimer(signal.ITIMER_REAL, 0.3)
                try:
                    t.request(mbx.Cmd.SPIN, timeout=30)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, old)
            else:
                t.uninstall()
    except BaseException as exc:
        assert expected is not None and isinstance(exc, expected), repr(exc)
    else:
        assert expected is None
    assert pids
    for name, pid in pids.items():
        assert _gone(pid), f"{name} (pid {pid}) outlived the target ({how})"
    assert workdir is not None and not workdir.exists()


def test_gdb_physical_memory_reads_tables(target: Target) -> None:
    tab = s1_identity(LAYOUT, "4K", extra=[SCRATCH])
    target.install(tab.s1_regs(), tab.image())
    target.write_pa(SCRATCH.base + 0xFF8, (0x0102_0304_0506_0708).to_bytes(8, "little") + b"\xAA" * 8)
    with GdbPhysMemory(target.gdb, 0x1000) as mem:
        assert mem.read64(tab.pgd) == tab.pool.read64(tab.pgd)
        assert mem.read64(SCRATCH.base + 0xFF8) == 0x0102_0304_0506_0708
        assert mem.read(SCRATCH.base + 0xFFC, 8) == bytes([4, 3, 2, 1]) + b"\xAA" * 4  # spans two pages
        reads = mem.reads
        mem.read64(tab.pgd + 8)
        assert mem.reads == reads  # cached


def test_qemu_sigbus_names_the_ram_backing(tmp_path: Path) -> None:
    """QEMU dies of SIGBUS when tmpfs cannot back a guest RAM page (/dev/shm full): say so."""
    with Target.start(log_dir=tmp_path) as t:
        os.kill(t.pids["qemu"], signal.SIGBUS)
        with pytest.raises(QemuExited) as info:
            t.uninstall()
        assert info.value.returncode == -signal.SIGBUS
        msg = str(info.value)
        assert "SIGBUS" in msg and "full" in msg and ("/dev/shm" in msg or "tmp" in msg)


@pytest.mark.parametrize("granule", ["4K", "16K", "64K"])
def test_model_hvhe_registers_drive_the_firmware(target: Target, granule: str) -> None:
    """The model's hVHE register values (Geometry e2h=True) on a hand-built EL2&0 table."""
    tab = s1_hvhe_identity(LAYOUT, granule, 48, extra=[SCRATCH, SCRATCH_RO])
    geom = Geometry.create(Stage.S1, Granule.parse(granule), 48, 48, e2h=True)
    regs = stage1_regs(geom, tab.pgd)
    common = 0x7_0080_FF3F  # IPS, EPD1, TG0, SH0, ORGN0, IRGN0, T0SZ: what both layouts must agree on
    assert regs.tcr_el2 & common == tab.s1_regs().tcr_el2 & common
    target.install(regs, tab.image())
    assert target.sysreg("HCR_EL2") & HCR_E2H.mask
    par = [Par(int(p)) for p in target.at([SCRATCH.base + 0x18, SCRATCH_RO.base], "S1E2W")]
    assert not par[0].fault and par[0].pa == SCRATCH.base
    assert par[1].fault and par[1].fst >> 2 == FaultKind.PERMISSION.value


def test_own_log_dir_removed_after_clean_close_kept_after_failure() -> None:
    with Target.start() as t:
        clean = t.log_dir
        t.uninstall()
        assert clean.is_dir()
    assert not clean.exists()
    t = Target.start()
    try:
        with pytest.raises(TargetTimeout):
            t.spin(timeout=0.3)
    finally:
        t.close()
    try:
        assert (t.log_dir / "console.log").is_file()  # kept for the error message's paths
    finally:
        shutil.rmtree(t.log_dir, ignore_errors=True)


def test_qemu_killed_even_when_closing_gdb_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.target import process
    from harness.target.gdbmi import GdbMI

    t = Target.start(log_dir=tmp_path)
    pids = dict(t.pids)
    gdb_proc = t.gdb.proc

    def broken_close(self: GdbMI) -> None:
        raise RuntimeError("gdb close failed")

    monkeypatch.setattr(GdbMI, "close", broken_close)
    with pytest.raises(RuntimeError, match="gdb close failed"):
        t.close()
    assert wait_gone(pids["qemu"]), "QEMU outlived a failing gdb close"
    process.kill(gdb_proc)  # the test's own cleanup of the gdb whose close was broken
    assert _gone(pids["gdb"])


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return _gone(pid)


# -- instruction fetches -----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [Stage.S1, Stage.S2])
def test_fetch_records_return_aborts_and_wrong_code(target: Target, stage: Stage) -> None:
    """FETCH: a planted ``ret`` returns x0 = the address, a planted stub its tag; a non-executable
    page is an instruction abort (EC 0x21 at EL2, 0x20 from EL1 with HPFAR); code that is not a
    return (zeros: ``udf #0``) is recorded, not a panic, and the loop goes on."""
    x = Region("x", SCRATCH.base, 1 << 20, Prot.RX)
    nx = Region("nx", SCRATCH.base + (2 << 20), 1 << 20, Prot.RW)
    tab = s1_identity(LAYOUT, "4K", extra=[x, nx]) if stage is Stage.S1 else s2_identity(LAYOUT, "4K", extra=[x, nx])
    target.install(tab.s1_regs() if stage is Stage.S1 else tab.s2_regs(), tab.image())
    ret_at, stub_at, zero_at, nx_at = x.base + 0x104, x.base + 0x200, x.base + 0x300, nx.base + 0x40
    target.write_pa(x.base, bytes(0x1000))
    target.write_pa(ret_at, mbx.A64_RET.to_bytes(4, "little"))
    target.write_pa(stub_at, mbx.fetch_stub(0xBEEF))
    target.write_pa(nx_at, mbx.fetch_stub(1))
    rec = target.fetch([ret_at + 2, stub_at, nx_at, zero_at, stub_at])  # +2: taken 4-byte aligned
    assert rec["completed"].tolist() == [True, True, False, False, True]
    assert [int(v) for v in rec["value"][[0, 1, 4]]] == [ret_at, 0xBEEF, 0xBEEF]
    esr = int(rec["esr"][2])
    assert ESR_EC.get(esr) == (ExceptionClass.IABT_SAME if stage is Stage.S1 else ExceptionClass.IABT_LOWER)
    assert ISS_DFSC.get(esr) == fault_status(FaultKind.PERMISSION, 3)
    assert int(rec["far"][2]) == nx_at
    if stage is Stage.S2:
        assert HPFAR_FIPA.get(int(rec["hpfar"][2])) == nx_at >> 12
    # udf #0 at the target: EC 0 (unknown), at EL2 (stage 1) or at EL1 (stage 2, ESR_EL1)
    want = mbx.AccessStatus.FAULT if stage is Stage.S1 else mbx.AccessStatus.EL1_EXCEPTION
    assert rec["status"][3] == want and ESR_EC.get(int(rec["esr"][3])) == ExceptionClass.UNKNOWN
    assert target.fetch([stub_at])["completed"].all()  # still usable
    with pytest.raises(ValueError, match="stage"):
        target.fetch([stub_at], stage=3)


def test_fetch_stub_encoding() -> None:
    code = mbx.fetch_stub(0x1234)
    words = [int.from_bytes(code[i : i + 4], "little") for i in range(0, 16, 4)]
    assert words == [0xD503_245F, 0xD282_4680, 0xD65F_03C0, 0xD420_0000]  # bti c; movz x0, #0x1234; ret; brk #0
    assert mbx.fetch_stubs(np.array([0x1234, 0x1_1234], dtype=np.uint64)).astype("<u8").tobytes() == code * 2
    with pytest.raises(ValueError, match="tag"):
        mbx.fetch_stub(1 << 16)


def test_fetch_guarded_page_needs_a_landing_pad(target: Target) -> None:
    """Stage-1 GP (bit 50, FEAT_BTI on -cpu max): the probe's blr must land on a BTI: a bare ret
    takes a Branch Target exception (EC 0x0D, recorded); the stub's ``bti c`` runs. Why every
    planted stub starts with it (found by the fuzzer: random descriptors set GP)."""
    tab = s1_identity(LAYOUT, "4K")
    tab.map(PAGES, 0x10000, Prot.RX)
    entry = tab.entry_pa(PAGES, 3)
    tab.pool.write64(entry, tab.pool.read64(entry) | 1 << 50)
    target.install(tab.s1_regs(), tab.image())
    target.write_pa(PAGES, bytes(0x100))
    target.write_pa(PAGES + 0x10, mbx.A64_RET.to_bytes(4, "little"))
    target.write_pa(PAGES + 0x20, mbx.fetch_stub(7))
    target.write_pa(PAGES + 0x1010, mbx.A64_RET.to_bytes(4, "little"))  # next page: not guarded
    rec = target.fetch([PAGES + 0x10, PAGES + 0x20, PAGES + 0x1010])
    assert rec["completed"].tolist() == [False, True, True]
    assert ESR_EC.get(int(rec["esr"][0])) == 0x0D  # Branch Target exception
    assert int(rec["value"][1]) == 7


def test_free_ram_is_ram_no_firmware_region_uses() -> None:
    free = LAYOUT.free_ram()
    assert LAYOUT.scratch.base in [r.base for r in free] and free[-1].end == LAYOUT.ram_end
    regions = LAYOUT.firmware_regions()
    for f in free:
        assert LAYOUT.ram_base + (2 << 20) <= f.base < f.end <= LAYOUT.ram_end
        assert not any(f.base < r.end and r.base < f.end for r in regions), f
    covered = sum(f.size for f in free) + sum(r.size for r in regions)
    assert covered == LAYOUT.ram_size - (LAYOUT.code - LAYOUT.ram_base)  # nothing else is left out
