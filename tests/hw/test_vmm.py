"""A real KVM guest's stage 2: Debian's arm64 6.12 booted with the harness's own VMM as /init.

Each test boots the kernel (``-cpu max``) with the VMM's initramfs and a guest pattern
(``vmm.guest=NAME``), waits for the VMM's ``ready`` record (the guest then spins at EL1, so the
vCPU is in the guest almost all the time), checks what the VMM reported (memslots, the host PFN of
every page the guest touched, present and non-zero, phases, the dirty bitmap), then captures the
vCPU through QEMU's gdbstub and checks that the guest's stage 2, as the model decodes it from
VTTBR_EL2/VTCR_EL2, maps every touched IPA to the PFN the VMM read from /proc/self/pagemap.

Measured on Linux 6.12.117 under QEMU 10 (TCG), -cpu max: KVM (DIC set) maps guest memory
read/write/execute; a THP-backed slot gives 2 MiB stage-2 blocks (level 2), a MADV_NOHUGEPAGE slot
4K pages (level 3). Turning dirty logging on write-protects the slot; the guest's first write into
a block then replaces the whole block with a table holding that one page (6.12 does not split
blocks eagerly unless asked), and KVM_GET_DIRTY_LOG write-protects the dirtied pages again: the
slot's stage 2 ends up holding exactly the dirtied pages, 4K and read-only. nVHE uses a 40-bit IPA
stage 2 (3 levels, 2 concatenated PGD pages: the VMM asked for the default), protected mode (pKVM,
6.12: still host-managed for a non-protected VM) the full 52-bit IPA (level 0, 16 concatenated
pages) whatever the VMM asks. In VHE the host kernel runs at EL2 (HCR_EL2.E2H = 1) and, while the
guest runs, TTBR0_EL2 holds the VMM process's own user tables: the ``el2&0`` regime the capture
decodes is the VMM's address space, where the same PFNs back the memslots' user addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.arch.registers import HCR_E2H, HCR_TGE, HCR_VM
from harness.check.attach import LiveRange, RegimeDecode, decode, verify
from harness.check.guest import check_guest
from harness.core.translate import PERM_R, PERM_W
from harness.live.gdbstub import capture, parse_target
from harness.live.initramfs import vmm_initramfs
from harness.live.kernel import EXPECTED_BANNER, KernelBoot, KernelImage
from harness.live.vmm import DIRTY_PAGES, PHASES, PageRun, VmmReport, start_vmm
from harness.target.layout import Layout
from harness.target.target import Target

pytestmark = pytest.mark.hw

BLOCK = 2 << 20
PAGE = 4096
THP_SLOT = 1
CAPTURE_TRIES = 8


@pytest.fixture(scope="session")
def vmm_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vmm_initramfs(tmp_path_factory.mktemp("vmm") / "initramfs.cpio")


@contextmanager
def vmm(image: KernelImage, initrd: Path, logs: Path, mode: str, guest: str,
        smp: int = 1, cpu: str = "max") -> Iterator[tuple[KernelBoot, VmmReport]]:
    boot, report = start_vmm(image, guest=guest, mode=mode, smp=smp, initrd=initrd, log_dir=logs, timeout=180.0,
                             cpu=cpu)
    with boot:
        yield boot, report


def _vmid(rd: RegimeDecode) -> int:
    return rd.regime.registers["VTTBR_EL2"] >> 48


def _replay_target(layout: Layout) -> Target:
    return Target.start(timeout=60, layout=layout)


def guest_stage2(boot: KernelBoot, vms: int = 1, rep: VmmReport | None = None) -> list[tuple[RegimeDecode,
                                                                                              list[RegimeDecode]]]:
    """Capture until ``vms`` guest stage 2s (VMID != 0) are in use at once; each with the other
    regimes of the CPUs using it. A capture can stop a vCPU while the host runs (a timer tick):
    then try again. With ``rep``, the capture must pass the guest check against it
    (harness.check.guest: what ``harness attach --vmm`` runs). Every regime of that capture is then
    replayed on the harness's MMU (what ``harness attach --verify`` runs): 0 mismatches."""
    seen: list[str] = []
    for _ in range(CAPTURE_TRIES):
        cap = capture(parse_target(str(boot.gdb_socket)), timeout=60.0)
        decoded = decode(cap.snapshot, cap.regimes)
        guests = [rd for rd in decoded if rd.name == "stage2" and _vmid(rd) != 0]
        seen.append(", ".join(f"{rd.name}@{rd.cpus}" for rd in decoded))
        if len({_vmid(rd) for rd in guests}) >= vms:
            if rep is not None:
                res = check_guest(rep, decoded)
                assert res.ok and len(res.vms) == vms, res.text()
            report = verify(cap.snapshot, _replay_target, regimes=cap.regimes)
            assert report.mismatched == 0 and all(r.checked > 0 for r in report.regimes), report.text()
            assert sorted(r.regime for r in report.regimes) == sorted(r.name for r in cap.regimes)
            return [(rd, [o for o in decoded if o is not rd and set(o.cpus) & set(rd.cpus)]) for rd in guests]
    raise AssertionError(f"no capture with {vms} guest stage 2(s) in {CAPTURE_TRIES} tries: {seen}")


def _at(rd: RegimeDecode, addr: int) -> tuple[LiveRange, int] | None:
    for r in rd.ranges:
        if r.va <= addr < r.end:
            return r, r.range.pa + addr - r.va
    return None


def check_records(boot: KernelBoot, rep: VmmReport, mode: str, guest: str, vms: int = 1) -> None:
    assert boot.banner.split(": ", 1)[1].startswith(EXPECTED_BANNER[mode] + " mode initialized"), boot.banner
    assert rep.ready is not None and rep.ready.pattern == guest and rep.ready.vms == vms
    assert rep.start is not None and rep.start.pid == 1
    assert rep.vms == list(range(vms))
    for vm in range(vms):
        assert rep.phases(vm) == list(PHASES[guest])
        created = [m for m in rep.memslot_ops(vm) if m.op == "create"]
        assert [m.slot for m in created] == list(range(2 if guest == "two-vms" else 4))
        for m in created:
            assert m.ipa % BLOCK == 0 and m.uaddr % BLOCK == 0 and m.size % BLOCK == 0 and m.flags == 0
        runs = [p for p in rep.pages if p.vm == vm]
        assert runs and all(p.present and p.pfn != 0 for p in runs), [p for p in runs if not p.present]
        assert {p.access for p in runs} >= {"r", "w", "x"}
        # The THP slot: each 2 MiB block backed by one huge page (one run of 512 contiguous PFNs).
        thp = [p for p in runs if p.slot == THP_SLOT and p.phase == "touched"]
        assert [(p.count, p.thp, p.access) for p in thp] == [(512, True, "w"), (512, True, "rx")], thp
        assert all(p.pfn % (BLOCK // PAGE) == 0 for p in thp)
        assert not [p for p in runs if p.slot == 0 and p.thp]  # MADV_NOHUGEPAGE: 4K pages
    assert not rep.errors


def check_stage2(rd: RegimeDecode, rep: VmmReport, vm: int, skip_slot: int | None = None) -> None:
    """Every live page the guest touched maps to its host PFN; THP blocks as level-2 blocks."""
    slots = rep.memslots(vm)
    pages = rep.page_map(vm, live=True)
    assert pages
    for ipa, pa in pages.items():
        slot = next(s for (v, s), m in slots.items() if v == vm and m.ipa <= ipa < m.end)
        if slot == skip_slot:
            continue
        hit = _at(rd, ipa)
        assert hit is not None, f"VM {vm}: IPA {ipa:#x} (slot {slot}) is not mapped in stage 2"
        assert hit[1] == pa, f"VM {vm}: IPA {ipa:#x} -> {hit[1]:#x} in stage 2, pagemap says {pa:#x}"
        assert hit[0].perms & PERM_R
    for run in rep.pages:
        if run.vm == vm and run.thp and run.count == 512 and run.slot != skip_slot and run.ipa in pages:
            hit = _at(rd, run.ipa)
            assert hit is not None and hit[0].level == 2, f"THP run {run} not a stage-2 block: {hit}"
    for p in rep.pages:
        if p.vm == vm and p.slot == 0:
            hit = _at(rd, p.ipa)
            assert hit is not None and hit[0].level == 3


def check_host_stage1(rd: RegimeDecode, runs: list[PageRun]) -> None:
    """VHE: the VMM's own user tables (TTBR0_EL2) map each memslot page to the same PFN."""
    assert rd.name == "el2&0"
    for run in runs:
        for i in range(0, run.count, 37):
            hit = _at(rd, run.uaddr + i * PAGE)
            assert hit is not None and hit[1] == run.pa + i * PAGE, (run, i, hit)


def check_regimes(rd: RegimeDecode, others: list[RegimeDecode], mode: str, cpu: str = "max") -> None:
    hcr = rd.regime.registers["HCR_EL2"]
    assert HCR_VM.get(hcr) and not HCR_TGE.get(hcr)
    assert bool(HCR_E2H.get(hcr)) == (mode != "nvhe")
    # VHE: the host kernel's own TTBR1_EL2 range too (EPD1 = 0); hVHE sets EPD1
    assert [o.name for o in others] == {"nvhe": ["el2"], "protected": ["el2&0"], "vhe": ["el2&0", "el2&0:ttbr1"]}[mode]
    g = rd.regime.geom
    # protected: pKVM gives every VM the full IPA range (52 bits with LPA2, else 48); otherwise the
    # VMM's default, 40 bits
    full = (52, 0, 16) if cpu == "max" else (48, 0, 1)
    assert (g.ia_bits, g.start_level, g.pgd_pages) == (full if mode == "protected" else (40, 1, 2))
    assert g.lpa2 is (cpu == "max")


MODES = ["nvhe", "protected", "vhe"]
CPUS = [pytest.param("max", id="max"), pytest.param("max,lpa2=off", id="lpa2off")]


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("mode", MODES)
def test_touch(kernel_image: KernelImage, vmm_initrd: Path, tmp_path: Path, mode: str, cpu: str,
               record_property: Callable[[str, object], None]) -> None:
    with vmm(kernel_image, vmm_initrd, tmp_path, mode, "touch", cpu=cpu) as (boot, rep):
        record_property("boot_to_ready_s", round(boot.timings["settled"], 2))
        check_records(boot, rep, mode, "touch")
        [(rd, others)] = guest_stage2(boot, rep=rep)
        check_regimes(rd, others, mode, cpu)
        check_stage2(rd, rep, 0)
        if mode == "vhe":
            check_host_stage1(others[0], rep.pages)


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("mode", MODES)
def test_dirty_log(kernel_image: KernelImage, vmm_initrd: Path, tmp_path: Path, mode: str, cpu: str) -> None:
    with vmm(kernel_image, vmm_initrd, tmp_path, mode, "dirty-log", cpu=cpu) as (boot, rep):
        check_records(boot, rep, mode, "dirty-log")
        log = [m for m in rep.memslot_ops(0) if m.op == "log"]
        assert [(m.slot, m.log_dirty) for m in log] == [(THP_SLOT, True)]
        [dirty] = rep.dirty
        slot = rep.memslots(0)[(0, THP_SLOT)]
        assert (dirty.slot, dirty.ipa, dirty.pages, len(dirty.bitmap)) == (THP_SLOT, slot.ipa, 1024, 16)
        assert dirty.dirty_pages() == DIRTY_PAGES  # exactly the pages written after logging began
        written = [p for p in rep.pages if p.phase == "dirtied"]
        assert sorted((p.ipa - slot.ipa) // PAGE for p in written) == list(DIRTY_PAGES)
        assert all(p.access == "w" and p.count == 1 for p in written)

        [(rd, others)] = guest_stage2(boot, rep=rep)
        check_regimes(rd, others, mode, cpu)
        check_stage2(rd, rep, 0, skip_slot=THP_SLOT)
        # The logged slot: only the dirtied pages are mapped, as 4K pages, write-protected again
        # by KVM_GET_DIRTY_LOG; the blocks they were in are gone.
        pages = rep.page_map(0)
        mapped = [r for r in rd.ranges if r.va < slot.end and r.end > slot.ipa]
        assert sorted((r.va - slot.ipa) // PAGE for r in mapped) == list(DIRTY_PAGES)
        for r in mapped:
            assert r.range.size == PAGE and r.level == 3 and not r.perms & PERM_W
            assert r.range.pa == pages[r.va]


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("mode", MODES)
def test_memslot(kernel_image: KernelImage, vmm_initrd: Path, tmp_path: Path, mode: str, cpu: str) -> None:
    with vmm(kernel_image, vmm_initrd, tmp_path, mode, "memslot", cpu=cpu) as (boot, rep):
        check_records(boot, rep, mode, "memslot")
        ops = {m.op: m for m in rep.memslot_ops(0) if m.op != "create"}
        deleted, moved = ops["delete"], ops["move"]
        old = next(m for m in rep.memslot_ops(0) if m.op == "create" and m.slot == moved.slot)
        assert (deleted.slot, deleted.size) == (2, 0) and moved.ipa != old.ipa and moved.uaddr == old.uaddr
        assert sorted(rep.memslots(0)) == [(0, 0), (0, 1), (0, 3)]
        # The guest's loads from both old places now exit to the VMM as MMIO.
        assert [(m.ipa, m.write) for m in rep.mmio] == [(deleted.ipa, False), (old.ipa, False)]
        before = [p for p in rep.pages if p.slot == moved.slot and p.phase == "touched"]
        after = [p for p in rep.pages if p.slot == moved.slot and p.phase == "moved"]
        assert [(p.ipa, p.pfn, p.count) for p in after] == [(moved.ipa, before[0].pfn, 512)]

        [(rd, others)] = guest_stage2(boot, rep=rep)
        check_regimes(rd, others, mode, cpu)
        check_stage2(rd, rep, 0)
        for gone in (deleted.ipa, old.ipa):
            assert not [r for r in rd.ranges if r.va < gone + BLOCK and r.end > gone], f"{gone:#x} still mapped"
        hit = _at(rd, moved.ipa)
        assert hit is not None and hit[1] == before[0].pa and hit[0].level == 2


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("mode", MODES)
def test_two_vms(kernel_image: KernelImage, vmm_initrd: Path, tmp_path: Path, mode: str, cpu: str) -> None:
    """Two VMs, one process and one vCPU each, on two CPUs: both guests' stage 2s are live at once
    (distinct VMIDs), each mapping its own VM's pages; in VHE each CPU's TTBR0_EL2 is its VMM's."""
    with vmm(kernel_image, vmm_initrd, tmp_path, mode, "two-vms", smp=2, cpu=cpu) as (boot, rep):
        check_records(boot, rep, mode, "two-vms", vms=2)
        pfns = [{p.pfn for p in rep.pages if p.vm == vm} for vm in (0, 1)]
        assert not pfns[0] & pfns[1]  # each VM its own memory
        guests = guest_stage2(boot, vms=2, rep=rep)
        assert len({_vmid(rd) for rd, _ in guests}) == 2
        matched = set()
        for rd, others in guests:
            check_regimes(rd, others, mode, cpu)
            maps = rep.page_map(0), rep.page_map(1)
            vm = next(v for v in (0, 1) if all((h := _at(rd, ipa)) is not None and h[1] == pa
                                               for ipa, pa in maps[v].items()))
            matched.add(vm)
            check_stage2(rd, rep, vm)
            if mode == "vhe":  # each CPU's TTBR0_EL2 is its VMM process's
                check_host_stage1(others[0], [p for p in rep.pages if p.vm == vm])
        assert matched == {0, 1}


def test_vhe_every_regime_decoded_and_verified(kernel_image: KernelImage, vmm_initrd: Path, tmp_path: Path) -> None:
    """VHE with the guest running: the VMM's own tables (TTBR0_EL2), the host
    kernel's (TTBR1_EL2: its linear map holds every page the guest touched) and the guest's stage 2
    are decoded, and the replay on the harness's MMU verifies all three with 0 mismatches. Neither
    stage-1 range leaves room for the payload (the VMM's user tables are PXNTable above every place
    its code could go; the kernel's linear map covers its addresses), so both replay through
    TTBR1_EL2 with the payload in TTBR0_EL2: the kernel's at its own addresses, the VMM's at
    VA + 2**64 - 2**ia_bits."""
    with vmm(kernel_image, vmm_initrd, tmp_path, "vhe", "touch") as (boot, rep):
        for _ in range(CAPTURE_TRIES):
            cap = capture(parse_target(str(boot.gdb_socket)), timeout=60.0)
            names = [r.name for r in cap.regimes]
            if "stage2" in names:
                break
        assert names == ["el2&0", "el2&0:ttbr1", "stage2"], names
        decoded = {rd.name: rd for rd in decode(cap.snapshot, cap.regimes)}
        kernel = decoded["el2&0:ttbr1"]
        assert kernel.regime.va_base == (1 << 64) - (1 << kernel.regime.geom.ia_bits)
        assert all(r.va >= kernel.regime.va_base for r in kernel.ranges)
        for run in rep.pages:  # the linear map: every guest page's PFN is mapped by the host kernel
            assert any(r.range.pa <= run.pa < r.range.pa + r.range.size for r in kernel.ranges), run
        check_stage2(decoded["stage2"], rep, 0)
        by_name = {r.name: r for r in cap.regimes}
        report = verify(cap.snapshot, _replay_target, regimes=[by_name[n] for n in ("el2&0", "el2&0:ttbr1", "stage2")])
        assert [r.regime for r in report.regimes] == ["el2&0", "el2&0:ttbr1", "stage2"]
        assert report.mismatched == 0 and all(r.checked > 0 for r in report.regimes), report.text()
        through = {r.regime: (r.through, r.va_offset, r.relocation_checked) for r in report.regimes}
        upper = (1 << 64) - (1 << kernel.regime.geom.ia_bits)
        assert through["el2&0:ttbr1"][:2] == ("TTBR1_EL2", upper), through
        assert through["el2&0"][:2] == ("TTBR1_EL2", (1 << 64) - (1 << by_name["el2&0"].geom.ia_bits)), through
        assert through["stage2"][:2] == ("VTTBR_EL2", 0), through
        assert all(n > 0 for _, _, n in through.values()), through
        fetched = {r.regime: r.to_json()["fetch"] for r in report.regimes}
        assert fetched["el2&0:ttbr1"]["probes"] > 0, fetched  # the kernel's executable text at EL2
