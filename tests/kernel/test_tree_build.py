"""harness.kernel: locating a Linux tree, probing its kvm_pgtable API, building its pgtable.c with kbuild.

Fast tests use fake trees (and, for the build orchestration, a fake ``make`` and compiler on PATH); the
tests on Debian's real trees (``bash ci/ksource.sh``) skip without them, and fail instead when ``CI=true``.
The ``kbuild`` tests run the real kernel build (~10 s from scratch per configuration).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import InputError
from harness.kernel import build as kbuild
from harness.kernel.build import (
    BuildConfig,
    TreeBuildError,
    build_objects,
    check_tools,
    compile_c,
    first_error,
    read_cmd,
    read_cpucaps,
    read_kconfig,
)
from harness.kernel.tree import KernelTree, UnsupportedApi, debian_tree, locate_tree, shadow_tree
from harness.target.errors import ToolMissing

IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


# ----------------------------------------------------------------------------------------------------------
# Fake trees

def fake_header(*, level: str = "s8", map_flags: bool = True, young: str = "test_clear_young", new: bool = True,
                mkyoung_flags: bool = False, relax_flags: bool = False, extra_map_arg: bool = False) -> str:
    """A kvm_pgtable.h with the declarations the probe reads, 6.12-shaped by default (6.1: level="u32",
    map_flags=False, young="mkold", new=False)."""
    flags = "enum kvm_pgtable_walk_flags flags"
    lpa2 = "#define kvm_lpa2_is_enabled()\t\tsystem_supports_lpa2()\n" if new else ""
    mm_new = "\tvoid\t\t(*free_unlinked_table)(void *addr, s8 level);\n" if new else ""
    nc = "\tKVM_PGTABLE_PROT_NORMAL_NC\t\t= BIT(4),\n" if new else ""
    shared = "\tKVM_PGTABLE_WALK_SHARED\t\t\t= BIT(3),\n" if new else ""
    ctx = f"struct kvm_pgtable_visit_ctx {{\n\tkvm_pte_t *ptep;\n\t{level} level;\n}};\n" if new else ""
    pgd = "kvm_pteref_t\t\t\t\tpgd;" if new else "kvm_pte_t\t\t\t\t*pgd;"
    map_tail = ",\n\t\t\t   void *mc" + (f", {flags}" if map_flags else "") + (", int extra" if extra_map_arg else "")
    if young == "test_clear_young":
        aging = ("bool kvm_pgtable_stage2_test_clear_young(struct kvm_pgtable *pgt, u64 addr,\n"
                 "\t\t\t\t\t u64 size, bool mkold);\n")
    elif young == "mkold":
        aging = ("kvm_pte_t kvm_pgtable_stage2_mkold(struct kvm_pgtable *pgt, u64 addr);\n"
                 "bool kvm_pgtable_stage2_is_young(struct kvm_pgtable *pgt, u64 addr);\n")
    else:
        aging = ""
    new_fns = ("size_t kvm_pgtable_stage2_pgd_size(u64 vtcr);\n"
               "void kvm_pgtable_stage2_free_unlinked(struct kvm_pgtable_mm_ops *mm_ops, void *pgtable, s8 level);\n"
               "kvm_pte_t *kvm_pgtable_stage2_create_unlinked(struct kvm_pgtable *pgt,\n"
               "\t\t\t\t\t      u64 phys, s8 level, enum kvm_pgtable_prot prot, void *mc, bool force_pte);\n"
               "int kvm_pgtable_stage2_split(struct kvm_pgtable *pgt, u64 addr, u64 size,\n"
               "\t\t\t     struct kvm_mmu_memory_cache *mc);\n") if new else ""
    return f"""/* SPDX-License-Identifier: GPL-2.0-only */
#ifndef __ARM64_KVM_PGTABLE_H__
#define __ARM64_KVM_PGTABLE_H__
{lpa2}
typedef u64 kvm_pte_t;
typedef kvm_pte_t *kvm_pteref_t;

struct kvm_pgtable_mm_ops {{
	void*		(*zalloc_page)(void *arg);
{mm_new}	void		(*get_page)(void *addr);
}};

enum kvm_pgtable_prot {{
	KVM_PGTABLE_PROT_X			= BIT(0),
	KVM_PGTABLE_PROT_W			= BIT(1),
	KVM_PGTABLE_PROT_R			= BIT(2),

	KVM_PGTABLE_PROT_DEVICE			= BIT(3),
{nc}
	KVM_PGTABLE_PROT_SW0			= BIT(55),
}};

enum kvm_pgtable_walk_flags {{
	KVM_PGTABLE_WALK_LEAF			= BIT(0),
	KVM_PGTABLE_WALK_TABLE_PRE		= BIT(1),
	KVM_PGTABLE_WALK_TABLE_POST		= BIT(2),
{shared}}};
{ctx}
struct kvm_pgtable {{
	u32					ia_bits;
	{level}					start_level;
	{pgd}
	struct kvm_pgtable_mm_ops		*mm_ops;
}};

/**
 * kvm_pgtable_hyp_init() - a kernel-doc comment quoting a wrong prototype:
 * int kvm_pgtable_stage2_map(struct kvm_pgtable *pgt, u64 addr);
 */
int kvm_pgtable_hyp_init(struct kvm_pgtable *pgt, u32 va_bits,
				struct kvm_pgtable_mm_ops *mm_ops);
void kvm_pgtable_hyp_destroy(struct kvm_pgtable *pgt);
int kvm_pgtable_hyp_map(struct kvm_pgtable *pgt, u64 addr, u64 size, u64 phys,
			enum kvm_pgtable_prot prot);
u64 kvm_pgtable_hyp_unmap(struct kvm_pgtable *pgt, u64 addr, u64 size);
u64 kvm_get_vtcr(u64 mmfr0, u64 mmfr1, u32 phys_shift);
int __kvm_pgtable_stage2_init(struct kvm_pgtable *pgt, struct kvm_s2_mmu *mmu,
				struct kvm_pgtable_mm_ops *mm_ops,
				enum kvm_pgtable_stage2_flags flags,
				kvm_pgtable_force_pte_cb_t force_pte_cb);
#define kvm_pgtable_stage2_init(pgt, mmu, mm_ops) \\
	__kvm_pgtable_stage2_init(pgt, mmu, mm_ops, 0, NULL)
void kvm_pgtable_stage2_destroy(struct kvm_pgtable *pgt);
{new_fns}int kvm_pgtable_stage2_map(struct kvm_pgtable *pgt, u64 addr, u64 size,
				u64 phys, enum kvm_pgtable_prot prot{map_tail});
int kvm_pgtable_stage2_unmap(struct kvm_pgtable *pgt, u64 addr, u64 size);
int kvm_pgtable_stage2_wrprotect(struct kvm_pgtable *pgt, u64 addr, u64 size);
kvm_pte_t kvm_pgtable_stage2_mkyoung(struct kvm_pgtable *pgt, u64 addr{', ' + flags if mkyoung_flags else ''});
{aging}int kvm_pgtable_stage2_relax_perms(struct kvm_pgtable *pgt, u64 addr,
					enum kvm_pgtable_prot prot{', ' + flags if relax_flags else ''});
int kvm_pgtable_get_leaf(struct kvm_pgtable *pgt, u64 addr,
				kvm_pte_t *ptep, {level} *level);

static inline int a_caller(struct kvm_pgtable *pgt)
{{
	return kvm_pgtable_stage2_map(pgt, 0, 0, 0, 0, NULL);
}}
#endif
"""


def make_fake_tree(root: Path, *, header: str | None = None, vtcr_in_mmu: bool = True, lpa2: bool = True,
                   with_pgtable: bool = True, extraversion: str = "") -> Path:
    """A directory that passes for a Linux tree: top Makefile, arch/arm64/Kconfig, the KVM files, and the two
    scripts the build calls (scripts/config, scripts/min-tool-version.sh)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Makefile").write_text("# SPDX-License-Identifier: GPL-2.0\nVERSION = 6\nPATCHLEVEL = 99\n"
                                   f"SUBLEVEL = 3\nEXTRAVERSION = {extraversion}\nNAME = Fake\n")
    arch = root / "arch" / "arm64"
    (arch / "tools").mkdir(parents=True)
    (arch / "Kconfig").write_text("config ARM64\n\tdef_bool y\n\nchoice\n\tprompt \"Page size\"\n\n"
                                  "config ARM64_4K_PAGES\n\tbool \"4KB\"\n\nconfig ARM64_16K_PAGES\n\tbool \"16KB\"\n\n"
                                  "config ARM64_64K_PAGES\n\tbool \"64KB\"\n\nendchoice\n")
    (arch / "tools" / "cpucaps").write_text("# SPDX-License-Identifier: GPL-2.0\n#\n# comment HAS_LPA2\n\n"
                                            "ALWAYS_BOOT\nALWAYS_SYSTEM\nBTI\nHAS_LPA2\nHAS_NESTED_VIRT\nKVM_HVHE\n")
    (arch / "include" / "asm").mkdir(parents=True)
    (arch / "include" / "asm" / "kvm_pgtable.h").write_text(header if header is not None else fake_header())
    mmu = "\tu64\tvtcr;\n" if vtcr_in_mmu else "\tstruct kvm_arch *arch;\n"
    (arch / "include" / "asm" / "kvm_host.h").write_text(
        f"struct kvm_s2_mmu {{\n\tstruct kvm_vmid vmid;\n{mmu}\tint __percpu *last_vcpu_ran;\n}};\n"
        "struct kvm_arch {\n\tu64 vtcr;\n};\n")
    if with_pgtable:
        (arch / "kvm" / "hyp").mkdir(parents=True)
        vtcr = "mmu->vtcr" if vtcr_in_mmu else "mmu->arch->vtcr"
        body = "\tif (kvm_lpa2_is_enabled())\n\t\treturn 1;\n" if lpa2 else ""
        (arch / "kvm" / "hyp" / "pgtable.c").write_text(
            f"/* mmu->arch->vtcr in a comment does not count */\nstatic u64 f(struct kvm_s2_mmu *mmu)\n{{\n{body}"
            f"\treturn {vtcr};\n}}\n")
    scripts = root / "scripts"
    scripts.mkdir()
    (scripts / "config").write_text(
        '#!/bin/bash\nf=$2; shift 2\nwhile [ $# -gt 0 ]; do case $1 in\n'
        '  -d) sed -i "s/^CONFIG_$2=y/# CONFIG_$2 is not set/" "$f";;\n'
        '  -e) [ -n "${FAKE_NO_PAGES:-}" ] || echo "CONFIG_$2=y" >> "$f";;\n'
        'esac; shift 2; done\n')
    (scripts / "min-tool-version.sh").write_text('#!/bin/sh\ncase "$1" in gcc) echo 5.1.0;; llvm) echo 13.0.1;; '
                                                 '*) exit 1;; esac\n')
    return root


# ----------------------------------------------------------------------------------------------------------
# locate_tree

def test_missing_path_names_argument_and_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--tree: .*nope does not exist"):
        locate_tree(tmp_path / "nope")


def test_file_is_not_a_tree(tmp_path: Path) -> None:
    f = tmp_path / "Makefile"
    f.write_text("VERSION = 6\n")
    with pytest.raises(InputError, match=r"--src: .*Makefile is not a directory"):
        locate_tree(f, what="--src")


def test_directory_without_makefile(tmp_path: Path) -> None:
    (tmp_path / "arch" / "arm64").mkdir(parents=True)
    (tmp_path / "arch" / "arm64" / "Kconfig").write_text("")
    with pytest.raises(InputError, match=r"is not a Linux source tree \(expected a top Makefile with VERSION ="):
        locate_tree(tmp_path)


def test_makefile_without_version_or_arm64(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("all:\n\techo hi\n")
    with pytest.raises(InputError, match="is not a Linux source tree"):
        locate_tree(tmp_path)
    (tmp_path / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 1\n")
    with pytest.raises(InputError, match="arch/arm64/Kconfig"):
        locate_tree(tmp_path)


def test_tree_without_pgtable_c(tmp_path: Path) -> None:
    root = make_fake_tree(tmp_path / "t", with_pgtable=False)
    with pytest.raises(InputError, match=r"--tree: .*\(Linux 6\.99\.3\) has no arch/arm64/kvm/hyp/pgtable\.c"):
        locate_tree(root)


def test_tree_without_header(tmp_path: Path) -> None:
    root = make_fake_tree(tmp_path / "t")
    (root / "arch/arm64/include/asm/kvm_pgtable.h").unlink()
    with pytest.raises(InputError, match=r"has no arch/arm64/include/asm/kvm_pgtable\.h"):
        locate_tree(root)


def test_version_and_label(tmp_path: Path) -> None:
    tree = locate_tree(make_fake_tree(tmp_path / "t", extraversion="-rc2"))
    assert tree.version == "6.99.3-rc2"
    assert tree.label == "linux-6.99.3-rc2"
    assert tree.path == (tmp_path / "t").resolve()


def test_read_only_fake_tree(tmp_path: Path) -> None:
    root = make_fake_tree(tmp_path / "t")
    for p in sorted(root.rglob("*"), reverse=True):
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        assert locate_tree(root).api.problems == ()
    finally:
        for p in root.rglob("*"):
            p.chmod(p.stat().st_mode | 0o200)


def test_debian_tree_series_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match=r"--debian: '5\.10' .*expected one of 6\.12, 6\.1"):
        debian_tree("5.10")
    monkeypatch.setenv("HARNESS_KSOURCE_DIR", str(tmp_path))
    with pytest.raises(InputError, match=r"--debian 6\.1: no unpacked tree at .*bash ci/ksource\.sh"):
        debian_tree("6.1")
    make_fake_tree(tmp_path / "6.1" / "linux-source-6.1")
    assert debian_tree("6.1") == tmp_path / "6.1" / "linux-source-6.1"


# ----------------------------------------------------------------------------------------------------------
# The API probe on fake headers

def test_probe_612_shape(tmp_path: Path) -> None:
    api = locate_tree(make_fake_tree(tmp_path / "t")).api
    api.require_supported()
    assert api.map_has_flags and api.level_type == "s8" and api.vtcr_in_mmu
    assert api.test_clear_young and not api.mkold and not api.is_young
    assert not api.mkyoung_has_flags and not api.relax_perms_has_flags
    assert api.split and api.pgd_size and api.unlinked and api.free_unlinked_table and api.visit_ctx
    assert api.pgd_pteref and api.hyp_init_has_va_bits and api.lpa2
    assert api.hyp_init_params == "struct kvm_pgtable *pgt, u32 va_bits, struct kvm_pgtable_mm_ops *mm_ops"
    assert api.map_params.endswith("void *mc, enum kvm_pgtable_walk_flags flags")
    assert api.stage2_init_args == "pgt, mmu, mm_ops" and api.stage2_init_is_macro
    assert api.get_vtcr == "u64 mmfr0, u64 mmfr1, u32 phys_shift"
    assert api.caps == {"ALWAYS_BOOT", "ALWAYS_SYSTEM", "BTI", "HAS_LPA2", "KVM_HVHE"}
    assert api.page_sizes == (4096, 16384, 65536)
    assert api.prot_bits == {"X": 1, "W": 2, "R": 4, "DEVICE": 8, "NORMAL_NC": 16}
    assert api.walk_flags == {"LEAF": 1, "TABLE_PRE": 2, "TABLE_POST": 4, "SHARED": 8}
    defines = api.c_defines()
    assert "-DKPGT_MAP_HAS_FLAGS=1" in defines and "-DKPGT_MKOLD=0" in defines
    assert "-DKPGT_LEVEL_S8=1" in defines and "-DKPGT_LEVEL_U32=0" in defines and "-DKPGT_LEVEL_T=s8" in defines
    assert len({d.split("=")[0] for d in defines}) == len(defines)


def test_probe_61_shape(tmp_path: Path) -> None:
    header = fake_header(level="u32", map_flags=False, young="mkold", new=False)
    api = locate_tree(make_fake_tree(tmp_path / "t", header=header, vtcr_in_mmu=False, lpa2=False)).api
    api.require_supported()
    assert not api.map_has_flags and api.level_type == "u32" and not api.vtcr_in_mmu
    assert not api.test_clear_young and api.mkold and api.is_young
    assert not (api.split or api.pgd_size or api.unlinked or api.free_unlinked_table or api.visit_ctx)
    assert not api.pgd_pteref and not api.lpa2 and api.hyp_init_has_va_bits
    assert api.prot_bits == {"X": 1, "W": 2, "R": 4, "DEVICE": 8}
    assert "-DKPGT_LEVEL_T=u32" in api.c_defines() and "-DKPGT_MAP_HAS_FLAGS=0" in api.c_defines()


def test_probe_flags_on_mkyoung_and_relax(tmp_path: Path) -> None:
    api = locate_tree(make_fake_tree(tmp_path / "t", header=fake_header(mkyoung_flags=True, relax_flags=True))).api
    api.require_supported()
    assert api.mkyoung_has_flags and api.relax_perms_has_flags


def test_unsupported_map_signature(tmp_path: Path) -> None:
    api = locate_tree(make_fake_tree(tmp_path / "t", header=fake_header(extra_map_arg=True))).api
    with pytest.raises(UnsupportedApi, match=r"kvm_pgtable_stage2_map: no known signature \(found \(.*int extra\)"):
        api.require_supported()


def test_unsupported_names_every_missing_part(tmp_path: Path) -> None:
    header = fake_header(young="none", level="s8").replace("kvm_pte_t *ptep, s8 *level", "kvm_pte_t *ptep, u32 *level")
    api = locate_tree(make_fake_tree(tmp_path / "t", header=header)).api
    with pytest.raises(UnsupportedApi) as info:
        api.require_supported()
    msg = str(info.value)
    assert "access flag: neither kvm_pgtable_stage2_test_clear_young" in msg
    assert "level type: struct kvm_pgtable.start_level is s8, kvm_pgtable_get_leaf's level is u32" in msg
    assert isinstance(info.value, InputError)


def test_unknown_vtcr_location(tmp_path: Path) -> None:
    root = make_fake_tree(tmp_path / "t")
    (root / "arch/arm64/kvm/hyp/pgtable.c").write_text("static u64 f(void) { return read_vtcr(); }\n")
    with pytest.raises(UnsupportedApi, match="stage-2 VTCR: neither"):
        locate_tree(root).api.require_supported()


# ----------------------------------------------------------------------------------------------------------
# Debian's real trees

def real_tree(series: str) -> KernelTree:
    try:
        return locate_tree(debian_tree(series), what=f"--debian {series}")
    except InputError as exc:
        if IN_CI:
            pytest.fail(f"CI=true and Debian's linux-source-{series} is missing (ci/setup.sh runs ci/ksource.sh): "
                        f"{exc}")
        pytest.skip(str(exc))


def test_real_612_api() -> None:
    tree = real_tree("6.12")
    api = tree.api
    print(json.dumps(tree.as_json(), indent=1))
    api.require_supported()
    assert tree.version.startswith("6.12.")
    assert api.map_has_flags and api.level_type == "s8" and api.vtcr_in_mmu and api.test_clear_young
    assert not api.mkold and not api.mkyoung_has_flags and not api.relax_perms_has_flags
    assert api.split and api.pgd_size and api.free_unlinked_table and api.lpa2 and api.hyp_init_has_va_bits
    assert api.stage2_init_args == "pgt, mmu, mm_ops"
    assert api.get_vtcr == "u64 mmfr0, u64 mmfr1, u32 phys_shift"
    assert {"HAS_LPA2", "KVM_HVHE", "HAS_VIRT_HOST_EXTN", "ALWAYS_SYSTEM"} <= api.caps
    assert api.page_sizes == (4096, 16384, 65536)
    assert api.prot_bits == {"X": 1, "W": 2, "R": 4, "DEVICE": 8, "NORMAL_NC": 16}
    assert {"LEAF", "TABLE_PRE", "TABLE_POST", "SHARED", "HANDLE_FAULT"} <= api.walk_flags.keys()


def test_real_61_api() -> None:
    tree = real_tree("6.1")
    api = tree.api
    print(json.dumps(tree.as_json(), indent=1))
    api.require_supported()
    assert tree.version.startswith("6.1.")
    assert not api.map_has_flags and api.level_type == "u32" and not api.vtcr_in_mmu
    assert api.mkold and api.is_young and not api.test_clear_young
    assert not (api.split or api.pgd_size or api.free_unlinked_table or api.lpa2)
    assert api.hyp_init_has_va_bits and api.stage2_init_args == "pgt, mmu, mm_ops"
    assert "HAS_LPA2" not in api.caps and "KVM_HVHE" not in api.caps and "HAS_VIRT_HOST_EXTN" in api.caps
    assert api.prot_bits == {"X": 1, "W": 2, "R": 4, "DEVICE": 8}
    assert api.walk_flags == {"LEAF": 1, "TABLE_PRE": 2, "TABLE_POST": 4}


# ----------------------------------------------------------------------------------------------------------
# Build orchestration, with a fake make and compiler

FAKE_MAKE = r'''#!{python}
import json, os, pathlib, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\n")
tree = args[args.index("-C") + 1]
b = pathlib.Path(next(a[2:] for a in args if a.startswith("O=")))
prefix = os.environ.get("FAKE_CMD_PREFIX", "savedcmd")
for t in [a for a in args[2:] if "=" not in a and not a.startswith("-")]:
    if t == os.environ.get("FAKE_FAIL"):
        print("  CC      arch/arm64/kernel/asm-offsets.s")
        print(f"{tree}/include/linux/x.h:3:5: error: boom")
        print(f"{tree}/include/linux/x.h:4:5: error: second")
        print("make[1]: *** [scripts/Makefile.build:117: x] Error 1")
        sys.exit(2)
    if t == "defconfig":
        cc = "CONFIG_CC_IS_CLANG=y" if "CC=clang" in args else "CONFIG_CC_IS_GCC=y"
        (b / ".config").write_text("CONFIG_ARM64_4K_PAGES=y\n# CONFIG_ARM64_16K_PAGES is not set\n"
                                   + cc + '\nCONFIG_CC_VERSION_TEXT="fake \\"cc\\" 12"\n')
    elif t == "prepare":
        d = b / "arch/arm64/include/generated/asm"
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpucap-defs.h").write_text("#ifndef X\n#define ARM64_ALWAYS_BOOT\t\t0\n#define ARM64_HAS_LPA2\t\t36\n"
                                         "#define ARM64_NCAPS\t\t102\n#endif\n")
    elif t.endswith(".o"):
        obj = pathlib.Path(os.path.normpath(b / t))
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(b"ELF")
        src = f"{tree}/{os.path.dirname(t)}/pgtable.c"
        flag = "-D__KVM_NVHE_HYPERVISOR__" if "nvhe" in t else "-D__KVM_VHE_HYPERVISOR__"
        d = os.path.dirname(t)
        (obj.parent / f".{obj.name}.cmd").write_text(
            f"{prefix}_{t} := aarch64-linux-gnu-gcc -Wp,-MMD,{d}/.{obj.name}.d -nostdinc -I./include "
            f"-DKBUILD_MODNAME='\"pgtable\"' -DPRICE='$$5' {flag} -c -o {t} {src}  \n\n"
            f"source_{t} := {src}\n\ndeps_{t} := \\\n  {src} \\\n")
'''

FAKE_CC = r'''#!{python}
import json, os, sys
if sys.argv[1:] == ["--version"]:
    print("aarch64-linux-gnu-gcc (Fake 12.2.0-14) 12.2.0")
    sys.exit(0)
with open(os.environ["FAKE_CC_CALLS"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}) + "\n")
if os.environ.get("FAKE_CC_FAIL"):
    print(sys.argv[-1] + ":1:1: error: unknown type name 'oops'", file=sys.stderr)
    sys.exit(1)
open(sys.argv[sys.argv.index("-o") + 1], "wb").write(b"ELF")
'''


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin directory first on PATH with a fake make (records its calls in FAKE_CALLS, acts like kbuild's
    config/prepare/object steps) and a fake cross compiler; returns the calls file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("make", FAKE_MAKE), ("aarch64-linux-gnu-gcc", FAKE_CC)):
        (bindir / name).write_text(text.replace("{python}", sys.executable))
    for name in ("flex", "bison", "bc", "aarch64-linux-gnu-ld", "aarch64-linux-gnu-objcopy"):
        (bindir / name).write_text("#!/bin/sh\nexit 0\n")
    for p in bindir.iterdir():
        p.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    calls = tmp_path / "make-calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_CC_CALLS", str(tmp_path / "cc-calls.jsonl"))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    return calls


def make_targets(calls: Path) -> list[str]:
    if not calls.exists():
        return []
    out = []
    for line in calls.read_text().splitlines():
        args = json.loads(line)
        out.append(" ".join(a for a in args[2:] if "=" not in a and not a.startswith("-")))
    return out


OBJECTS = f"{kbuild.NVHE_TARGET} {kbuild.KERNEL_TARGET}"


def test_fake_build_once_then_objects_only(tmp_path: Path, fake_tools: Path) -> None:
    tree = locate_tree(make_fake_tree(tmp_path / "t"))
    objs = build_objects(tree, BuildConfig(4096, "gcc"), cache=tmp_path / "cache")
    assert make_targets(fake_tools) == ["defconfig", "prepare", OBJECTS]
    assert objs.build_dir == tmp_path / "cache" / kbuild.cache_key(tree, objs.config)
    assert objs.build_dir.name.startswith("linux-6.99.3-4K-gcc-")
    assert objs.nvhe_obj == objs.build_dir / "arch/arm64/kvm/hyp/pgtable.nvhe.o" and objs.nvhe_obj.is_file()
    assert objs.kernel_obj.is_file()
    assert objs.nvhe_cmd == ["aarch64-linux-gnu-gcc", "-nostdinc", "-I./include", '-DKBUILD_MODNAME="pgtable"',
                             "-DPRICE=$5", "-D__KVM_NVHE_HYPERVISOR__", "-c"]
    assert "-D__KVM_VHE_HYPERVISOR__" in objs.kernel_cmd
    assert objs.cpucaps == {"ALWAYS_BOOT": 0, "HAS_LPA2": 36}
    assert objs.kconfig["CONFIG_ARM64_4K_PAGES"] == "y"
    assert objs.kconfig["CONFIG_CC_VERSION_TEXT"] == 'fake "cc" 12'
    assert "CONFIG_ARM64_16K_PAGES" not in objs.kconfig
    assert {"defconfig", "prepare", "objects", "total"} <= objs.timings.keys()
    assert "$ cd " in objs.log.read_text()

    again = build_objects(tree, BuildConfig(4096, "gcc"), cache=tmp_path / "cache")
    assert make_targets(fake_tools)[3:] == [OBJECTS]
    assert "prepare" not in again.timings and "defconfig" not in again.timings
    assert again.nvhe_cmd == objs.nvhe_cmd
    json.dumps(again.as_json())


def test_fake_build_61_style_cmd_files(tmp_path: Path, fake_tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CMD_PREFIX", "cmd")
    objs = build_objects(locate_tree(make_fake_tree(tmp_path / "t")), BuildConfig(4096), cache=tmp_path / "c")
    assert objs.nvhe_cmd[-2:] == ["-D__KVM_NVHE_HYPERVISOR__", "-c"]


def test_fake_build_16k_switches_page_size(tmp_path: Path, fake_tools: Path) -> None:
    objs = build_objects(locate_tree(make_fake_tree(tmp_path / "t")), BuildConfig.parse("16k"), cache=tmp_path / "c")
    assert make_targets(fake_tools) == ["defconfig", "olddefconfig", "prepare", OBJECTS]
    assert objs.kconfig.get("CONFIG_ARM64_16K_PAGES") == "y" and "CONFIG_ARM64_4K_PAGES" not in objs.kconfig
    assert objs.config.granule == "16K" and "-16K-gcc-" in objs.build_dir.name


def test_fake_build_page_size_that_does_not_take(tmp_path: Path, fake_tools: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NO_PAGES", "1")
    with pytest.raises(TreeBuildError, match=r"has CONFIG_ARM64_64K_PAGES=\(unset\) after defconfig"):
        build_objects(locate_tree(make_fake_tree(tmp_path / "t")), BuildConfig(65536), cache=tmp_path / "c")


def test_fake_build_failure_reports_first_error_and_log(tmp_path: Path, fake_tools: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tree = locate_tree(make_fake_tree(tmp_path / "t"))
    monkeypatch.setenv("FAKE_FAIL", "prepare")
    with pytest.raises(TreeBuildError) as info:
        build_objects(tree, BuildConfig(4096), cache=tmp_path / "c")
    first = str(info.value).splitlines()[0]
    assert "make prepare for linux-6.99.3 (4K, gcc) failed (exit 2)" in first
    assert "include/linux/x.h:3:5: error: boom" in first and "second" not in first
    assert str(tmp_path / "c") in first and "harness-make.log" in first
    # the killed/failed directory is not trusted: the next call starts over
    monkeypatch.delenv("FAKE_FAIL")
    build_objects(tree, BuildConfig(4096), cache=tmp_path / "c")
    assert make_targets(fake_tools) == ["defconfig", "prepare", "defconfig", "prepare", OBJECTS]


def test_fake_partial_directory_is_redone(tmp_path: Path, fake_tools: Path) -> None:
    tree = locate_tree(make_fake_tree(tmp_path / "t"))
    objs = build_objects(tree, BuildConfig(4096), cache=tmp_path / "c")
    (objs.build_dir / kbuild.STAMP).unlink()  # as if killed before the stamp was written
    (objs.build_dir / "junk").write_text("left by a killed run")
    build_objects(tree, BuildConfig(4096), cache=tmp_path / "c")
    assert make_targets(fake_tools) == ["defconfig", "prepare", OBJECTS, "defconfig", "prepare", OBJECTS]
    assert not (objs.build_dir / "junk").exists()


def test_fake_cache_from_environment(tmp_path: Path, fake_tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = locate_tree(make_fake_tree(tmp_path / "t"))
    monkeypatch.setenv("HARNESS_KBUILD_DIR", str(tmp_path / "env-cache"))
    assert build_objects(tree, BuildConfig(4096)).build_dir.parent == tmp_path / "env-cache"
    monkeypatch.delenv("HARNESS_KBUILD_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kbuild.build_dir_for(tree, BuildConfig(4096)).parent == tmp_path / "xdg" / "pgtable-harness" / "kbuild"


def test_fake_compile_c(tmp_path: Path, fake_tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objs = build_objects(locate_tree(make_fake_tree(tmp_path / "t")), BuildConfig(4096), cache=tmp_path / "c")
    src = tmp_path / "host.c"
    src.write_text("int x;\n")
    compile_c(objs, "nvhe", src, tmp_path / "out" / "host.o", ["-DKPGT_X=1", "-I/somewhere"])
    call = json.loads((tmp_path / "cc-calls.jsonl").read_text().splitlines()[-1])
    assert call["cwd"] == str(objs.build_dir)
    assert call["argv"] == [*objs.nvhe_cmd[1:], "-DKPGT_X=1", "-I/somewhere", "-o", str(tmp_path / "out/host.o"),
                            str(src)]
    assert (tmp_path / "out" / "host.o").is_file()
    monkeypatch.setenv("FAKE_CC_FAIL", "1")
    with pytest.raises(TreeBuildError) as info:
        compile_c(objs, "kernel", src, tmp_path / "host.o")
    first = str(info.value).splitlines()[0]
    assert f"{src}:1:1: error: unknown type name 'oops'" in first and str(objs.log) in first
    with pytest.raises(InputError, match=r"src: .*missing\.c is not a file"):
        compile_c(objs, "nvhe", tmp_path / "missing.c", tmp_path / "m.o")


def test_missing_build_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = locate_tree(make_fake_tree(tmp_path / "t"))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    want = r"make, flex, bison, bc, gcc not on PATH \(apt-get install flex bison bc make gcc"
    with pytest.raises(ToolMissing, match=want):
        build_objects(tree, BuildConfig(4096), cache=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_missing_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = locate_tree(make_fake_tree(tmp_path / "t"))
    monkeypatch.setattr(kbuild.shutil, "which", lambda t: None if t in ("clang", "ld.lld") else f"/bin/{t}")
    with pytest.raises(ToolMissing, match=r"--cc clang: clang, ld\.lld not on PATH \(apt-get install clang lld"):
        check_tools(tree, BuildConfig(4096, "clang"))


def test_clang_older_than_tree_minimum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = locate_tree(make_fake_tree(tmp_path / "t"))
    monkeypatch.setattr(kbuild.shutil, "which", lambda t: f"/bin/{t}")
    monkeypatch.setattr(kbuild, "compiler_version", lambda cc: "12.0.1")
    with pytest.raises(ToolMissing, match=r"clang 12\.0\.1 is older .*min-tool-version\.sh asks for clang 13\.0\.1"):
        check_tools(tree, BuildConfig(4096, "clang"))


def test_build_config_validation() -> None:
    assert BuildConfig.parse("64K", "clang") == BuildConfig(65536, "clang")
    assert BuildConfig(16384).granule == "16K"
    with pytest.raises(InputError, match="--granule: page size 8192"):
        BuildConfig(8192)
    with pytest.raises(InputError, match=r"--granule: '8K' is not one of 4K, 16K, 64K"):
        BuildConfig.parse("8K")
    with pytest.raises(InputError, match=r"--cc: 'icc' is not one of gcc, clang"):
        BuildConfig.parse("4K", "icc")
    assert "CC=clang" in BuildConfig(4096, "clang").make_vars()
    assert not any(v.startswith("CC=") for v in BuildConfig(4096, "gcc").make_vars())


def test_read_cmd_second_command_and_missing(tmp_path: Path) -> None:
    d = tmp_path / "arch/arm64/kvm/hyp"
    d.mkdir(parents=True)
    t = "arch/arm64/kvm/hyp/pgtable.o"
    (d / ".pgtable.o.cmd").write_text(f"savedcmd_{t} := clang --target=aarch64-linux-gnu -Wp,-MD,x.d "
                                      f"-DX='\"a b\"' -c -o {t} /src/pgtable.c; ./tools/objtool/objtool {t}\n")
    assert read_cmd(tmp_path, t) == ["clang", "--target=aarch64-linux-gnu", '-DX="a b"', "-c"]
    with pytest.raises(TreeBuildError, match=r"kbuild left no readable .*\.pgtable\.nvhe\.o\.cmd"):
        read_cmd(tmp_path, kbuild.NVHE_TARGET)


def test_read_cpucaps_61_name_and_kconfig(tmp_path: Path) -> None:
    d = tmp_path / "arch/arm64/include/generated/asm"
    d.mkdir(parents=True)
    (d / "cpucaps.h").write_text("#define ARM64_ALWAYS_BOOT\t0\n#define ARM64_BTI  2\n#define ARM64_NCAPS 85\n")
    assert read_cpucaps(tmp_path) == {"ALWAYS_BOOT": 0, "BTI": 2}
    (tmp_path / ".config").write_text('# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_D=0x10\n')
    assert read_kconfig(tmp_path / ".config") == {"CONFIG_A": "y", "CONFIG_C": "x y", "CONFIG_D": "0x10"}
    with pytest.raises(TreeBuildError, match="generated none of"):
        read_cpucaps(tmp_path / "nowhere")


def test_first_error() -> None:
    out = ("  CC  a.o\nIn file included from x.c:1:\nfoo/bar.h:10:2: error: 'x' undeclared\n"
           "baz.c:3: error: later\nmake[2]: *** [a] Error 1\n")
    assert first_error(out) == "foo/bar.h:10:2: error: 'x' undeclared"
    assert first_error("flex: not found\nmake[1]: *** [scripts/Makefile.host:9: lexer] Error 127\n") == \
        "make[1]: *** [scripts/Makefile.host:9: lexer] Error 127"
    assert first_error("just this\n") == "just this"


def test_cli_reports_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert kbuild.main(["--tree", str(tmp_path / "none")]) == 2
    assert "--tree: " in capsys.readouterr().err
    assert kbuild.main(["--tree", str(tmp_path), "--granule", "2K"]) == 2
    assert "--granule: '2K'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Real builds (kbuild)

def require_build_tools(tree: KernelTree, config: BuildConfig) -> None:
    try:
        check_tools(tree, config)
    except ToolMissing as exc:
        if IN_CI:
            pytest.fail(f"CI=true and the build tools are missing: {exc}")
        pytest.skip(str(exc))


HOST_C = """\
#include <linux/types.h>
#include <asm/kvm_pgtable.h>

int kpgt_probe(struct kvm_pgtable *pgt);

int kpgt_probe(struct kvm_pgtable *pgt)
{
#if KPGT_LEVEL_S8
	KPGT_LEVEL_T level = pgt->start_level;
	return level + KPGT_MAP_HAS_FLAGS;
#else
	return -1;
#endif
}
"""


@pytest.mark.kbuild
def test_build_612_4k_gcc(tmp_path: Path) -> None:
    tree = real_tree("6.12")
    config = BuildConfig(4096, "gcc")
    require_build_tools(tree, config)
    objs = build_objects(tree, config)  # the default cache: quick when an earlier run built it
    print(f"first call ({objs.build_dir}): {objs.timings}")
    assert objs.nvhe_obj.is_file() and objs.kernel_obj.is_file()
    assert objs.nvhe_obj.read_bytes()[:4] == b"\x7fELF"
    assert "-D__KVM_NVHE_HYPERVISOR__" in objs.nvhe_cmd and "-D__KVM_NVHE_HYPERVISOR__" not in objs.kernel_cmd
    assert objs.nvhe_cmd[0] == "aarch64-linux-gnu-gcc" and "-c" in objs.nvhe_cmd
    assert not any(a.startswith("-Wp,-MMD") or a.endswith("pgtable.c") for a in objs.nvhe_cmd + objs.kernel_cmd)
    assert "HAS_LPA2" in objs.cpucaps and "KVM_HVHE" in objs.cpucaps
    assert objs.kconfig["CONFIG_ARM64_4K_PAGES"] == "y"

    again = build_objects(tree, config)
    print(f"second call: {again.timings}")
    assert "defconfig" not in again.timings and "prepare" not in again.timings
    assert again.timings["total"] < 30
    assert again.cpucaps == objs.cpucaps and again.nvhe_cmd == objs.nvhe_cmd

    src = tmp_path / "host.c"
    src.write_text(HOST_C)
    for which in ("nvhe", "kernel"):
        out = tmp_path / f"host-{which}.o"
        compile_c(again, which, src, out, tree.api.c_defines())
        assert out.read_bytes()[:4] == b"\x7fELF"
    src.write_text("int broken(void) { return undeclared_thing; }\n")
    with pytest.raises(TreeBuildError) as info:
        compile_c(again, "nvhe", src, tmp_path / "broken.o")
    first = str(info.value).splitlines()[0]
    assert f"{src}:1:" in first and "error:" in first and str(again.log) in first


def snapshot(root: Path) -> dict[str, int]:
    """Every file's and directory's mtime under ``root`` (symlinks not followed): any write shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames, "."):
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.lstat(p).st_mtime_ns
    return out


@pytest.mark.kbuild
def test_build_from_scratch_concurrent_read_only_and_incremental(tmp_path: Path) -> None:
    """Two processes build one key at once (one waits, then reuses the other's prepare); neither the tree nor
    what it links to is written; an edited pgtable.c rebuilds both objects and nothing else."""
    real = real_tree("6.12")
    config = BuildConfig(4096, "gcc")
    require_build_tools(real, config)
    farm = shadow_tree(real.path, tmp_path / "tree")
    tree = locate_tree(farm)
    before_real, before_farm = snapshot(real.path), snapshot(farm)
    cache = tmp_path / "cache"

    other = subprocess.Popen([sys.executable, "-m", "harness.kernel.build", "--tree", str(farm), "--cache",
                              str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    objs = build_objects(tree, config, cache=cache)
    out, err = other.communicate(timeout=900)
    assert other.returncode == 0, err
    theirs = json.loads(out)
    print(f"from scratch, this process: {objs.timings}; the other: {theirs['timings']}")
    assert theirs["build_dir"] == str(objs.build_dir)
    assert ["prepare" in objs.timings, "prepare" in theirs["timings"]].count(True) == 1

    stamps = {p: p.stat().st_mtime_ns for p in (objs.nvhe_obj, objs.kernel_obj)}
    t = time.monotonic()
    same = build_objects(tree, config, cache=cache)
    print(f"no change: {time.monotonic() - t:.2f} s {same.timings}")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert snapshot(real.path) == before_real and snapshot(farm) == before_farm

    edited = farm / "arch/arm64/kvm/hyp/pgtable.c"
    edited.write_text(edited.read_text() + "\n/* edited by the test */\n")
    before_farm = snapshot(farm)
    size = objs.log.stat().st_size
    t = time.monotonic()
    rebuilt = build_objects(tree, config, cache=cache)
    print(f"touched pgtable.c: {time.monotonic() - t:.2f} s {rebuilt.timings}")
    assert all(p.stat().st_mtime_ns > m for p, m in stamps.items())
    with rebuilt.log.open() as f:
        f.seek(size)
        compiled = [ln.split()[1] for ln in f.read().splitlines() if ln.startswith("  CC ")]
    assert sorted(compiled) == sorted([kbuild.NVHE_TARGET, kbuild.KERNEL_TARGET])
    assert snapshot(real.path) == before_real and snapshot(farm) == before_farm


# ----------------------------------------------------------------------------------------------------------
# harness kernel-pgtable on trees it must refuse before building anything

def _kernel_pgtable(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", "kernel-pgtable", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_cli_refuses_unknown_api_by_name(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "t", header=fake_header(extra_map_arg=True))
    p = _kernel_pgtable("--tree", str(tree))
    assert p.returncode == 2, p.stderr
    assert "kvm_pgtable_stage2_map: no known signature" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cli_refuses_non_trees_naming_the_path(tmp_path: Path) -> None:
    p = _kernel_pgtable("--tree", str(tmp_path / "missing"))
    assert p.returncode == 2 and str(tmp_path / "missing") in p.stderr
    tree = make_fake_tree(tmp_path / "nopg", with_pgtable=False)
    p = _kernel_pgtable("--tree", str(tree))
    assert p.returncode == 2 and "pgtable.c" in p.stderr and len(p.stderr.strip().splitlines()) == 1
