"""harness.kernel.elf: .altinstructions and __bug_table of a linked AArch64 ELF, and the alternatives patcher.

The unit tests assemble a tiny ELF with the cross binutils: hand-written alternative entries (a plain
replacement whose branches and ADRP must be re-targeted, callbacks, and the forms the kernel's patcher
refuses) and bug-table entries. The expected patched image is assembled too, from the same source with
the replacements written in place, so the patch is checked byte for byte by the assembler, not by the
encoder under test. One more test reads the real 6.12 objects when a build of them is around.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from harness.errors import InputError
from harness.kernel.elf import (
    ALT_INSTR,
    BUG_ENTRY,
    NOP,
    AltPatchError,
    PayloadElf,
    PayloadElfError,
    cap_numbers,
    caps_named,
    caps_used,
    enabled_caps,
    pc_relative_form,
)

CROSS = os.environ.get("CROSS_COMPILE", "aarch64-linux-gnu-")
REPO_ROOT = Path(__file__).resolve().parents[2]
TREE_612 = REPO_ROOT / ".cache" / "linux-source" / "6.12" / "linux-source-6.12"

CAPS = {"ALWAYS_BOOT": 0, "ALWAYS_SYSTEM": 1, "PLAIN": 2, "ADR": 3, "LDR": 4, "SIMD": 5, "UNKNOWN_CB": 6,
        "RANGE": 7, "CB2": 8, "UNUSED": 9}
CB = 1 << 15

# The replacement of the PLAIN site, as written at the replacement (REPL) and as it must read once
# copied to the site (SITE): branches out of the replacement re-targeted, the one to its end kept
# relative, ADRP naming the same page.
PLAIN_REPL = """\
    b       far_fn
    bl      far_fn
    cbz     x0, mid
    tbnz    w1, #3, mid
    b.ne    repl_plain_end
    adrp    x2, data_word"""
PLAIN_SITE = PLAIN_REPL.replace("repl_plain_end", "site_plain_end")
PLAIN_ORIG = "\n".join(["    nop"] * 6)

SOURCE = """\
    .macro alt orig, orig_end, repl, repl_end, cap
    .pushsection .altinstructions, "a"
    .word   \\orig - .
    .word   \\repl - .
    .hword  \\cap
    .byte   \\orig_end - \\orig
    .byte   \\repl_end - \\repl
    .popsection
    .endm

    .macro bug addr, file, line, flags
    .pushsection __bug_table, "aw"
    .balign 4
    .long   \\addr - .
    .long   \\file - .
    .short  \\line
    .short  \\flags
    .balign 4
    .popsection
    .endm

    .text
    .globl  _start
_start:
site_plain:
{plain}
site_plain_end:
site_cb:
{cb}
site_cb_end:
site_cb2:
{cb2}
site_cb2_end:
site_adr:       nop
site_ldr:       nop
site_simd:      nop
site_unknown:   nop
site_range:     nop
    ret
bug_brk:
    brk     #0x800
warn_brk:
    brk     #0x800
    ret
    .globl  alt_cb_patch_nops
alt_cb_patch_nops:
    ret
other_cb:
    ret
    .skip   0x6000
mid:
    ret
    .skip   0x6000

    .subsection 1
repl_plain:
{plain_repl}
repl_plain_end:
repl_adr:       adr     x3, data_word
repl_ldr:       ldr     x3, data_word
repl_simd:      ldr     q0, data_word
repl_range:     tbz     x0, #1, far_fn
late:
    ret
far_fn:
    ret

    .data
    .balign 16
data_word:
    .quad   0

    .section .rodata.str, "aMS", @progbits, 1
file_cpufeature:    .string "arch/arm64/include/asm/cpufeature.h"
file_pgtable:       .string "arch/arm64/kvm/hyp/nvhe/../pgtable.c"

    alt site_plain, site_plain_end, repl_plain, repl_plain_end, {PLAIN}
    alt site_cb, site_cb_end, alt_cb_patch_nops, alt_cb_patch_nops, {ALWAYS_SYSTEM} | {CB}
    alt site_cb2, site_cb2_end, alt_cb_patch_nops, alt_cb_patch_nops, {CB2} | {CB}
    alt site_adr, site_ldr, repl_adr, repl_ldr, {ADR}
    alt site_ldr, site_simd, repl_ldr, repl_simd, {LDR}
    alt site_simd, site_unknown, repl_simd, repl_range, {SIMD}
    alt site_unknown, site_range, other_cb, other_cb, {UNKNOWN_CB} | {CB}
    alt site_range, site_range + 4, repl_range, late, {RANGE}

    bug bug_brk, file_cpufeature, 500, 0
    bug warn_brk, file_pgtable, 825, 0x903
"""
CB_ORIG = "    b       bug_brk"
CB2_ORIG = "    b       bug_brk\n    mov     x0, #1"


def source(*, plain: bool = False, cb: bool = False, cb2: bool = False) -> str:
    """The test program; ``plain``/``cb``/``cb2``: that site written as patched."""
    return SOURCE.format(plain=PLAIN_SITE if plain else PLAIN_ORIG, plain_repl=PLAIN_REPL,
                         cb="    nop" if cb else CB_ORIG, cb2="    nop\n    nop" if cb2 else CB2_ORIG, CB=CB, **CAPS)


def _need_binutils() -> None:
    missing = [CROSS + t for t in ("as", "ld") if shutil.which(CROSS + t) is None]
    if missing:
        msg = f"cross binutils missing: {', '.join(missing)} (bash ci/setup.sh installs binutils-aarch64-linux-gnu)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def _run(*argv: str | Path) -> None:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(map(str, argv))}:\n{done.stderr}"


Build = Callable[..., Path]


@pytest.fixture
def build(tmp_path: Path) -> Build:
    """``build(name, text, *extra_objects)``: assemble ``text`` and link it statically at 0x40200000."""
    _need_binutils()

    def _build(name: str, text: str, *extra: Path) -> Path:
        src, obj, elf = tmp_path / f"{name}.s", tmp_path / f"{name}.o", tmp_path / f"{name}.elf"
        src.write_text(text)
        _run(CROSS + "as", "-o", obj, src)
        _run(CROSS + "ld", "-nostdlib", "-static", "-Ttext=0x40200000", "-o", elf, obj, *extra)
        return elf

    return _build


@pytest.fixture
def tiny(build: Build) -> PayloadElf:
    return PayloadElf(build("tiny", source()))


def test_layouts_are_the_kernel_structs() -> None:
    assert ALT_INSTR.itemsize == 12 and ALT_INSTR.names == ("orig_offset", "alt_offset", "cpucap", "orig_len",
                                                            "alt_len")
    assert BUG_ENTRY.itemsize == 12 and BUG_ENTRY.names == ("bug_addr_disp", "file_disp", "line", "flags")


def test_alternatives_parse(tiny: PayloadElf) -> None:
    alts = tiny.alternatives()
    assert len(alts) == 8
    sec = tiny.sections[".altinstructions"]
    assert [a.entry for a in alts] == [sec.addr + 12 * i for i in range(8)]
    plain, cb, cb2 = alts[:3]
    assert (plain.orig, plain.alt, plain.cap, plain.is_callback, plain.orig_len, plain.alt_len) == (
        tiny.symbol("site_plain"), tiny.symbol("repl_plain"), CAPS["PLAIN"], False, 24, 24)
    assert (cb.orig, cb.alt, cb.cap, cb.is_callback, cb.orig_len, cb.alt_len) == (
        tiny.symbol("site_cb"), tiny.symbol("alt_cb_patch_nops"), CAPS["ALWAYS_SYSTEM"], True, 4, 0)
    assert cb2.orig_len == 8 and cb2.cap == CAPS["CB2"]
    assert tiny.callback_name(cb) == "alt_cb_patch_nops"
    assert tiny.callback_name(alts[6]) == "other_cb"
    assert caps_used(tiny) == {c: 1 for c in (1, 2, 3, 4, 5, 6, 7, 8)}


def test_bug_table(tiny: PayloadElf) -> None:
    bug, warn = tiny.bug_table()
    assert (bug.addr, bug.file, bug.line, bug.flags) == (tiny.symbol("bug_brk"), "arch/arm64/include/asm/cpufeature.h",
                                                         500, 0)
    assert not bug.warning and not bug.once
    assert warn.addr == tiny.symbol("warn_brk") and warn.line == 825
    assert warn.warning and warn.once and warn.taint == 9
    assert warn.file == "arch/arm64/kvm/hyp/nvhe/../pgtable.c"
    assert warn.location == "arch/arm64/kvm/hyp/pgtable.c:825"
    assert tiny.bug_at(warn.addr) == warn
    assert tiny.bug_at(tiny.symbol("_start")) is None


def test_terse_bug_table(build: Build) -> None:
    """Without CONFIG_DEBUG_BUGVERBOSE an entry is {addr_disp, flags} padded to 8 bytes."""
    elf = PayloadElf(build("terse", """\
    .text
    .globl _start
_start: brk #0x800
w:      brk #0x800
    .pushsection __bug_table, "aw"
    .balign 4
    .long _start - .
    .short 0
    .balign 4
    .long w - .
    .short 0x901
    .balign 4
    .popsection
"""))
    entries = elf.bug_table()
    assert [(b.addr, b.file, b.line, b.flags) for b in entries] == [(0x40200000, "", 0, 0), (0x40200004, "", 0, 0x901)]


def _loaded(path: Path) -> list[tuple[int, int, int]]:
    """The file ranges QEMU ``-kernel`` loads: (vaddr, offset, filesz) of each PT_LOAD."""
    with path.open("rb") as f:
        return [(s["p_vaddr"], s["p_offset"], s["p_filesz"]) for s in ELFFile(f).iter_segments()
                if s["p_type"] == "PT_LOAD"]


@pytest.mark.parametrize(("caps", "variant"), [
    (set(), {"cb": True}),  # ALWAYS_SYSTEM is always patched
    ({CAPS["PLAIN"]}, {"plain": True, "cb": True}),
    ({CAPS["PLAIN"], CAPS["CB2"], CAPS["UNUSED"]}, {"plain": True, "cb": True, "cb2": True}),
    ({CAPS["ALWAYS_SYSTEM"]: True, CAPS["PLAIN"]: False, CAPS["CB2"]: True}, {"cb": True, "cb2": True}),
])
def test_patch_matches_assembled_replacement(build: Build, caps: set[int] | dict[int, bool],
                                             variant: dict[str, bool]) -> None:
    """The patched file is the input except at the enabled sites, and what it loads is, byte for byte,
    the program assembled with those sites written as patched (only its symbol table's order differs)."""
    path = build("tiny", source())
    elf = PayloadElf(path)
    expected_path = build("expected", source(**variant))
    patched = elf.patched(caps, CAPS)
    assert len(patched) == len(elf.data)
    sites = [(p.addr, len(p.new)) for p in elf.patches(caps, CAPS)]
    in_site = bytearray(len(patched))
    for addr, size in sites:
        off = elf.file_offset(addr, size)
        in_site[off:off + size] = b"\1" * size
    assert all(a == b for a, b, s in zip(patched, elf.data, in_site, strict=True) if not s)
    segments = _loaded(path)
    assert segments == _loaded(expected_path)
    expected = expected_path.read_bytes()
    for _, off, size in segments:
        assert patched[off:off + size] == expected[off:off + size]
    assert elf.data[:64] == patched[:64]  # the ELF header


def test_patch_details(tiny: PayloadElf, tmp_path: Path) -> None:
    patches = tiny.patches({CAPS["PLAIN"], CAPS["CB2"]}, CAPS)
    assert [p.addr for p in patches] == [tiny.symbol(s) for s in ("site_plain", "site_cb", "site_cb2")]
    assert [p.callback for p in patches] == [None, "alt_cb_patch_nops", "alt_cb_patch_nops"]
    assert patches[1].new == NOP.to_bytes(4, "little") and patches[2].new == NOP.to_bytes(4, "little") * 2
    assert patches[0].old == NOP.to_bytes(4, "little") * 6
    # every re-targeted branch reaches the same absolute address as it did from the replacement
    plain = patches[0]
    for i in range(6):
        repl = int.from_bytes(tiny.read(plain.alt.alt + 4 * i, 4), "little")
        new = int.from_bytes(plain.new[4 * i:4 * i + 4], "little")
        form = pc_relative_form(repl)
        assert form is not None
        src, dst = plain.alt.alt + 4 * i, plain.addr + 4 * i
        if form.name == "b.cond":  # to the replacement's end: copied as is
            assert new == repl
        else:
            assert form.base(dst) + form.offset(new) == form.base(src) + form.offset(repl)
    out = tiny.write_patched(tmp_path / "out.elf", {CAPS["PLAIN"]}, CAPS)
    reread = PayloadElf(out)
    assert reread.read(plain.addr, 24) == plain.new
    assert reread.alternatives() == tiny.alternatives()


@pytest.mark.parametrize(("cap", "site", "what"), [
    ("ADR", "site_adr", r"adr at 0x[0-9a-f]+ .*cannot re-target"),
    ("LDR", "site_ldr", r"ldr \(literal\) at .*cannot re-target"),
    ("SIMD", "site_simd", r"ldr \(literal, SIMD&FP\) at .*cannot re-target"),
    ("UNKNOWN_CB", "site_unknown", r"callback 'other_cb' is not implemented"),
    ("RANGE", "site_range", r"tbz at 0x[0-9a-f]+ .*out of its range"),
])
def test_refused(tiny: PayloadElf, cap: str, site: str, what: str) -> None:
    with pytest.raises(AltPatchError, match=rf"alternative at {tiny.symbol(site):#x} \(cap {CAPS[cap]}\).*{what}"):
        tiny.patched({CAPS[cap]}, CAPS)


def test_not_a_linked_elf(build: Build, tmp_path: Path) -> None:
    build("tiny", source())
    with pytest.raises(PayloadElfError, match="relocatable object"):
        PayloadElf(tmp_path / "tiny.o")
    (tmp_path / "junk").write_bytes(b"not an elf")
    with pytest.raises(PayloadElfError, match="not an ELF"):
        PayloadElf(tmp_path / "junk")
    with pytest.raises(PayloadElfError, match="cannot read"):
        PayloadElf(tmp_path / "absent")


def test_symbols(tiny: PayloadElf) -> None:
    assert tiny.symbol("_start") == 0x40200000
    assert tiny.symbols_at(tiny.symbol("alt_cb_patch_nops")) == ("alt_cb_patch_nops",)
    with pytest.raises(PayloadElfError, match="no symbol 'nope'"):
        tiny.symbol("nope")


def test_cap_numbers_and_names() -> None:
    text = "\n".join(f"#define ARM64_{n:<30}\t{v}" for n, v in CAPS.items()) + "\n#define ARM64_NCAPS\t\t10\n"
    assert cap_numbers("#ifndef X\n#define X\n" + text) == CAPS
    with pytest.raises(PayloadElfError):
        cap_numbers("nothing here")
    assert caps_named(["PLAIN", "ARM64_CB2"], CAPS) == {2, 8}
    with pytest.raises(InputError, match="HAS_NOTHING"):
        caps_named(["HAS_NOTHING"], CAPS)
    assert enabled_caps({5}, CAPS) == {0, 1, 5}
    assert enabled_caps({5: True, 6: False}, {}) == {5}


# -- the real 6.12 objects, when a build of them is around ---------------------------------------

def _built_612() -> Path | None:
    """The 6.12 tree's 4K gcc build (harness.kernel.build, cached), when the tree is fetched; in CI it must be."""
    if not TREE_612.is_dir():
        if os.environ.get("CI", "").lower() in ("true", "1"):
            raise AssertionError(f"{TREE_612} must be fetched in CI (bash ci/ksource.sh)")
        return None
    from harness.kernel.build import BuildConfig, build_objects
    from harness.kernel.tree import locate_tree

    return build_objects(locate_tree(TREE_612), BuildConfig(4096, "gcc")).build_dir


STUBS = """\
    .text
    .globl __kvm_tlb_flush_vmid, __kvm_tlb_flush_vmid_ipa, __kvm_tlb_flush_vmid_ipa_nsh
    .globl __kvm_tlb_flush_vmid_range, alt_cb_patch_nops, memset
__kvm_tlb_flush_vmid: ret
__kvm_tlb_flush_vmid_ipa: ret
__kvm_tlb_flush_vmid_ipa_nsh: ret
__kvm_tlb_flush_vmid_range: ret
alt_cb_patch_nops: ret
memset: ret
"""


def test_real_612_nvhe_object(build: Build) -> None:
    out = _built_612()
    if out is None:
        pytest.skip(f"{TREE_612} is not fetched (bash ci/ksource.sh)")
    names = cap_numbers((out / "arch/arm64/include/generated/asm/cpucap-defs.h").read_text())
    elf = PayloadElf(build("stubs", STUBS, out / "arch/arm64/kvm/hyp/pgtable.nvhe.o"))
    used = {n: caps_used(elf).get(names[n], 0) for n in ("ALWAYS_SYSTEM", "KVM_HVHE", "HAS_TLB_RANGE",
                                                          "HAS_ARMv8_4_TTL", "HAS_STAGE2_FWB")}
    assert all(used.values()), used
    assert {elf.callback_name(a) for a in elf.alternatives() if a.is_callback} == {"alt_cb_patch_nops"}
    # every site patches; the ALWAYS_SYSTEM sites (cpus_have_final_cap's branch to BUG) become NOPs
    patches = elf.patches(set(caps_used(elf)), names)
    assert len(patches) == len(elf.alternatives())
    for p in patches:
        if p.alt.cap == names["ALWAYS_SYSTEM"]:
            assert p.new == NOP.to_bytes(4, "little") * (p.alt.orig_len // 4)
    # the bug table names WARN_ON/BUG_ON lines of pgtable.c and the BUG() in cpus_have_final_cap
    lines = (TREE_612 / "arch/arm64/kvm/hyp/pgtable.c").read_text().splitlines()
    entries = elf.bug_table()
    assert entries
    for b in entries:
        assert elf.read(b.addr, 4) == (0xD4210000).to_bytes(4, "little")
        if b.source == "arch/arm64/kvm/hyp/pgtable.c":
            assert b.warning
            assert re.search(r"\b(WARN_ON|WARN_ON_ONCE|WARN|BUG_ON)\(", lines[b.line - 1]), lines[b.line - 1]
        else:
            assert b.source == "arch/arm64/include/asm/cpufeature.h" and not b.warning
