"""The guest's physical memory map, defined once.

The firmware's linker script and C constants are generated from this module, and the stage-1 /
stage-2 regions a table under test must map (identity) are exported from here as data.

Every region is 64K-aligned with a 64K-multiple size, so each granule (4K, 16K, 64K) can map it.
QEMU's ``virt`` board puts the device tree at the start of RAM (0x4000_0000) below an ELF
``-kernel`` image, so the firmware starts 2 MiB into RAM.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from harness.core.prot import Prot
from harness.target.mailbox import ACCESS_RECORD

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
ALIGN = 64 * KIB
DTB_RESERVE = 2 * MIB  # QEMU's device tree at the start of RAM, below an ELF -kernel image


@dataclass(frozen=True)
class Region:
    """A physical range ``[base, base + size)`` and the protection it needs when mapped."""

    name: str
    base: int
    size: int
    prot: Prot

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.base <= addr and addr + length <= self.end

    def __str__(self) -> str:
        return f"{self.name:<12} [{self.base:#012x}, {self.end:#012x}) {self.prot.label()}"


@dataclass(frozen=True)
class Layout:
    """Physical layout of the guest (QEMU ``virt``, 1 GiB of RAM at 0x4000_0000)."""

    ram_base: int = 0x4000_0000
    ram_size: int = 1 * GIB
    uart: int = 0x0900_0000  # PL011
    uart_size: int = 64 * KIB
    code: int = 0x4020_0000  # firmware text + rodata (entry point at the start)
    code_size: int = 512 * KIB
    el1_stub: int = 0x4028_0000  # EL1 probe stub + EL1 vectors, own 64K page (stage 2 maps it R+X)
    el1_stub_size: int = 64 * KIB
    data: int = 0x4030_0000  # firmware data, bss and stacks
    data_size: int = 1 * MIB
    mailbox: int = 0x4040_0000
    mailbox_size: int = 64 * KIB
    kpgt: int = 0x4080_0000  # the kernel-walker host's state and own EL2 tables (harness.kernel.protocol)
    kpgt_size: int = 2 * MIB
    probe_addrs: int = 0x4100_0000  # u64 addresses to probe (access probes: values in the upper half)
    probe_addrs_size: int = 32 * MIB
    probe_results: int = 0x4300_0000  # u64 PAR_EL1 values or access records
    probe_results_size: int = 64 * MIB
    pool_base: int = 0x4800_0000  # translation-table pages of the model
    pool_size: int = 128 * MIB
    scratch_base: int = 0x5000_0000  # free RAM for access-probe targets
    scratch_size: int = 0x3000_0000

    @property
    def ram_end(self) -> int:
        return self.ram_base + self.ram_size

    @property
    def scratch(self) -> Region:
        return Region("scratch", self.scratch_base, self.scratch_size, Prot.RW)

    @property
    def pool(self) -> Region:
        return Region("pool", self.pool_base, self.pool_size, Prot.RW)

    @property
    def max_at(self) -> int:
        """Addresses one AT request can take (results are 8 bytes each)."""
        return min(self.probe_addrs_size // 8, self.probe_results_size // 8)

    @property
    def probe_values(self) -> int:
        """Where an ACCESS request's values go: the upper half of the address buffer."""
        return self.probe_addrs + self.probe_addrs_size // 2

    @property
    def max_access(self) -> int:
        """Addresses one ACCESS request can take (address and value: 16 bytes; one record each)."""
        return min(self.probe_addrs_size // 16, self.probe_results_size // ACCESS_RECORD.size)

    def stage1_regions(self) -> list[Region]:
        """What an EL2 stage-1 table must map (identity) for the firmware to run on it."""
        return [
            Region("code", self.code, self.code_size, Prot.RX),
            Region("data", self.data, self.data_size, Prot.RW),
            Region("mailbox", self.mailbox, self.mailbox_size, Prot.RW),
            Region("probe_addrs", self.probe_addrs, self.probe_addrs_size, Prot.RW),
            Region("probe_results", self.probe_results, self.probe_results_size, Prot.RW),
            Region("uart", self.uart, self.uart_size, Prot.RW | Prot.DEVICE),
        ]

    def stage2_regions(self) -> list[Region]:
        """What a stage-2 table must map (IPA == PA) for the EL1 probe stub to run."""
        return [Region("el1_stub", self.el1_stub, self.el1_stub_size, Prot.RX)]

    def firmware_regions(self) -> list[Region]:
        """Every fixed region of the firmware (the RAM ones, in address order)."""
        regions = [*self.stage1_regions(), *self.stage2_regions(), self.pool,
                   Region("kpgt", self.kpgt, self.kpgt_size, Prot.RW)]
        return sorted((r for r in regions if r.name != "uart"), key=lambda r: r.base)

    def free_ram(self) -> list[Region]:
        """RAM the payload never uses: everything above QEMU's device tree (the first 2 MiB) that
        no firmware region (nor the pool) holds, in address order (``scratch`` is part of it; a
        moved layout also leaves the RAM below its code free)."""
        out: list[Region] = []
        lo = self.ram_base + DTB_RESERVE
        for r in [*self.firmware_regions(), Region("end", self.ram_end, 0, Prot.NONE)]:
            if r.base > lo:
                out.append(Region("free", lo, r.base - lo, Prot.RW))
            lo = max(lo, r.end)
        return out

    def check(self) -> None:
        """Alignment, containment in RAM and no overlap; raises ValueError."""
        regions = [*self.firmware_regions(), self.scratch]
        for r in [*regions, Region("uart", self.uart, self.uart_size, Prot.RW)]:
            if r.base % ALIGN or r.size % ALIGN or r.size <= 0:
                raise ValueError(f"layout: {r} is not 64K-aligned with a 64K-multiple size")
        for r in regions:
            if not (self.ram_base <= r.base and r.end <= self.ram_end):
                raise ValueError(f"layout: {r} is outside RAM [{self.ram_base:#x}, {self.ram_end:#x})")
        ordered = sorted(regions, key=lambda r: r.base)
        for a, b in itertools.pairwise(ordered):
            if a.end > b.base:
                raise ValueError(f"layout: {a} overlaps {b}")
        if self.code < self.ram_base + DTB_RESERVE:
            raise ValueError("layout: keep the first 2 MiB of RAM free for QEMU's device tree")

    def constants(self) -> dict[str, int]:
        """Named constants for the generated C header and linker script."""
        return {
            "RAM_BASE": self.ram_base,
            "RAM_SIZE": self.ram_size,
            "UART_BASE": self.uart,
            "CODE_BASE": self.code,
            "CODE_SIZE": self.code_size,
            "EL1_STUB_BASE": self.el1_stub,
            "EL1_STUB_SIZE": self.el1_stub_size,
            "DATA_BASE": self.data,
            "DATA_SIZE": self.data_size,
            "MAILBOX_BASE": self.mailbox,
            "MAILBOX_SIZE": self.mailbox_size,
            "PROBE_ADDRS_BASE": self.probe_addrs,
            "PROBE_ADDRS_SIZE": self.probe_addrs_size,
            "PROBE_RESULTS_BASE": self.probe_results,
            "PROBE_RESULTS_SIZE": self.probe_results_size,
            "POOL_BASE": self.pool_base,
            "POOL_SIZE": self.pool_size,
            "KPGT_BASE": self.kpgt,
            "KPGT_SIZE": self.kpgt_size,
        }

    def linker_script(self) -> str:
        """The firmware's linker script (generated: the layout is defined only here)."""
        return f"""/* GENERATED from harness/target/layout.py: do not edit. */
OUTPUT_ARCH(aarch64)
ENTRY(_start)
MEMORY
{{
    CODE (rx)  : ORIGIN = {self.code:#x}, LENGTH = {self.code_size:#x}
    STUB (rx)  : ORIGIN = {self.el1_stub:#x}, LENGTH = {self.el1_stub_size:#x}
    DATA (rw)  : ORIGIN = {self.data:#x}, LENGTH = {self.data_size:#x}
}}
SECTIONS
{{
    .text : {{ KEEP(*(.text.start)) *(.text .text.*) }} > CODE
    /* The host's breakpoint (idle) and panic alone in their page: QEMU runs every TB of a page holding
       a gdb breakpoint one instruction at a time, unchained, so hot loops must live elsewhere. */
    .text.hostbp ALIGN(0x1000) : {{ KEEP(*(.hostbp)) . = ALIGN(0x1000); }} > CODE
    .rodata : {{ *(.rodata .rodata.*) }} > CODE
    /* a linked-in tree's pgtable.c (harness.kernel.payload): its alternatives and bug table */
    .altinstructions : {{ __alt_instructions = .; KEEP(*(.altinstructions)) __alt_instructions_end = .; }} > CODE
    __bug_table : {{ __start___bug_table = .; KEEP(*(__bug_table)) __stop___bug_table = .; }} > CODE
    .el1stub : {{ KEEP(*(.el1stub)) }} > STUB
    .data : {{ *(.data .data.*) }} > DATA
    .bss (NOLOAD) : {{ __bss_start = .; *(.bss .bss.* COMMON) . = ALIGN(16); __bss_end = .; }} > DATA
    .stack (NOLOAD) : {{ . = ALIGN(16); __stack_bottom = .; . += 0x10000; __stack_top = .;
                        __panic_stack_bottom = .; . += 0x4000; __panic_stack_top = .; }} > DATA
    /DISCARD/ : {{ *(.comment) *(.note*) *(.eh_frame*) }}
}}
"""


LAYOUT = Layout()
