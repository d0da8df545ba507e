"""A Linux source tree and the shape of its kvm_pgtable API, probed from the tree's own text.

    tree = locate_tree(debian_tree("6.12"))     # .cache/linux-source/6.12/linux-source-6.12 (ci/ksource.sh)
    tree.api.require_supported()                # UnsupportedApi unless the API has a known shape
    tree.api.c_defines()                        # ["-DKPGT_MAP_HAS_FLAGS=1", ..., "-DKPGT_LEVEL_T=s8"]

Everything in :class:`TreeApi` is read from the headers and sources (``kvm_pgtable.h``, ``pgtable.c``,
``kvm_host.h``, ``tools/cpucaps``, ``Kconfig``), never inferred from the version number: trees between
the known releases, and vendor trees, are described by what they declare. A tree is only read, never
written (a read-only tree works).

``python -m harness.kernel.tree --tree DIR`` (or ``--debian 6.12``) prints the probe as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from harness.errors import HarnessError, InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEBIAN_SERIES = ("6.12", "6.1")
KSOURCE_ENV = "HARNESS_KSOURCE_DIR"

HEADER = "arch/arm64/include/asm/kvm_pgtable.h"
PGTABLE_C = "arch/arm64/kvm/hyp/pgtable.c"
KVM_HOST_H = "arch/arm64/include/asm/kvm_host.h"
CPUCAPS = "arch/arm64/tools/cpucaps"
ARM64_KCONFIG = "arch/arm64/Kconfig"

# The capabilities pgtable.c's alternatives (or its callers' choices) depend on.
INTERESTING_CAPS = ("HAS_LPA2", "KVM_HVHE", "HAS_STAGE2_FWB", "HAS_TLB_RANGE", "HAS_ARMv8_4_TTL", "BTI",
                    "HAS_VIRT_HOST_EXTN", "ALWAYS_SYSTEM", "ALWAYS_BOOT")
PROT_NAMES = ("X", "W", "R", "DEVICE", "NORMAL_NC")
REQUIRED_PROT = ("X", "W", "R", "DEVICE")
REQUIRED_WALK = ("LEAF", "TABLE_PRE", "TABLE_POST")


class UnsupportedApi(InputError):
    """The tree's kvm_pgtable API is not one of the shapes the host code knows (the message says which part)."""


def debian_tree(series: str) -> Path:
    """The unpacked Debian ``linux-source-<series>`` tree (``bash ci/ksource.sh``): ``$HARNESS_KSOURCE_DIR``
    (default ``REPO_ROOT/.cache/linux-source``) ``/<series>/linux-source-<series>``."""
    if series not in DEBIAN_SERIES:
        raise InputError(f"--debian: {series!r} is not a known Debian source series "
                         f"(expected one of {', '.join(DEBIAN_SERIES)})")
    base = Path(os.environ.get(KSOURCE_ENV) or REPO_ROOT / ".cache" / "linux-source")
    path = base / series / f"linux-source-{series}"
    if not (path / "Makefile").is_file():
        raise InputError(f"--debian {series}: no unpacked tree at {path} (bash ci/ksource.sh fetches Debian's "
                         f"linux-source-{series} there; bash ci/setup.sh runs it)")
    return path


@dataclass(frozen=True)
class TreeApi:
    """The shape of one tree's kvm_pgtable API (booleans: the tree has it / takes it)."""

    map_has_flags: bool            # kvm_pgtable_stage2_map(..., prot, mc, enum kvm_pgtable_walk_flags flags)
    level_type: Literal["s8", "u32"]  # struct kvm_pgtable.start_level and kvm_pgtable_get_leaf's *level
    vtcr_in_mmu: bool              # struct kvm_s2_mmu has u64 vtcr (else pgtable.c reads mmu->arch->vtcr)
    test_clear_young: bool         # kvm_pgtable_stage2_test_clear_young(pgt, addr, size, mkold)
    mkold: bool                    # kvm_pgtable_stage2_mkold(pgt, addr)
    is_young: bool                 # kvm_pgtable_stage2_is_young(pgt, addr)
    mkyoung_has_flags: bool        # kvm_pgtable_stage2_mkyoung(pgt, addr, flags)
    relax_perms_has_flags: bool    # kvm_pgtable_stage2_relax_perms(pgt, addr, prot, flags)
    split: bool                    # kvm_pgtable_stage2_split
    pgd_size: bool                 # kvm_pgtable_stage2_pgd_size(vtcr)
    unlinked: bool                 # kvm_pgtable_stage2_create_unlinked / _free_unlinked
    free_unlinked_table: bool      # struct kvm_pgtable_mm_ops has free_unlinked_table
    visit_ctx: bool                # visitors take const struct kvm_pgtable_visit_ctx *
    pgd_pteref: bool               # struct kvm_pgtable.pgd is a kvm_pteref_t (else kvm_pte_t *)
    hyp_init_has_va_bits: bool     # kvm_pgtable_hyp_init(pgt, u32 va_bits, mm_ops)
    lpa2: bool                     # pgtable.c/kvm_pgtable.h use kvm_lpa2_is_enabled (LPA2 descriptors)
    hyp_init_params: str           # the exact parameter list of kvm_pgtable_hyp_init ("" if absent)
    map_params: str                # the exact parameter list of kvm_pgtable_stage2_map ("" if absent)
    stage2_init_args: str          # the parameter list of the kvm_pgtable_stage2_init macro or function
    stage2_init_is_macro: bool
    get_vtcr: str | None           # kvm_get_vtcr's parameter list, None if the tree has none
    caps: frozenset[str]           # those of INTERESTING_CAPS that arch/arm64/tools/cpucaps lists
    page_sizes: tuple[int, ...]    # from the ARM64_{4,16,64}K_PAGES options of arch/arm64/Kconfig
    prot_bits: dict[str, int] = field(default_factory=dict)   # "X" -> 1 << n, from enum kvm_pgtable_prot
    walk_flags: dict[str, int] = field(default_factory=dict)  # "LEAF" -> 1 << n, from kvm_pgtable_walk_flags
    problems: tuple[str, ...] = ()  # what the probe did not recognise (require_supported raises with them)

    BOOLEAN_FIELDS: ClassVar[tuple[str, ...]] = (
        "map_has_flags", "vtcr_in_mmu", "test_clear_young", "mkold", "is_young", "mkyoung_has_flags",
        "relax_perms_has_flags", "split", "pgd_size", "unlinked", "free_unlinked_table", "visit_ctx", "pgd_pteref",
        "hyp_init_has_va_bits", "lpa2", "stage2_init_is_macro")

    def c_defines(self) -> list[str]:
        """``-D`` options for host C code that must adapt to this API: every boolean as ``KPGT_<NAME>=0/1``
        (always defined, so ``#if`` under kbuild's ``-Wundef`` catches a misspelling), ``KPGT_GET_VTCR``,
        ``KPGT_LEVEL_S8`` / ``KPGT_LEVEL_U32`` and ``KPGT_LEVEL_T`` (the level type itself)."""
        out = [f"-DKPGT_{name.upper()}={int(getattr(self, name))}" for name in self.BOOLEAN_FIELDS]
        out.append(f"-DKPGT_GET_VTCR={int(self.get_vtcr is not None)}")
        out.append(f"-DKPGT_LEVEL_S8={int(self.level_type == 's8')}")
        out.append(f"-DKPGT_LEVEL_U32={int(self.level_type == 'u32')}")
        out.append(f"-DKPGT_LEVEL_T={self.level_type}")
        return out

    def require_supported(self) -> None:
        """UnsupportedApi naming every part of the API that has no known shape."""
        if self.problems:
            raise UnsupportedApi("kvm_pgtable API not supported: " + "; ".join(self.problems))

    def as_json(self) -> dict[str, object]:
        d = asdict(self)
        d["caps"] = sorted(self.caps)
        d["page_sizes"] = list(self.page_sizes)
        d["problems"] = list(self.problems)
        return d


@dataclass(frozen=True)
class KernelTree:
    """A Linux source tree with an arm64 KVM walker: its resolved path, version and API."""

    path: Path
    version: str
    api: TreeApi

    @property
    def label(self) -> str:
        return f"linux-{self.version}"

    @property
    def pgtable_c(self) -> Path:
        return self.path / PGTABLE_C

    def as_json(self) -> dict[str, object]:
        return {"path": str(self.path), "version": self.version, "label": self.label, "api": self.api.as_json()}


def locate_tree(path: Path | str, what: str = "--tree") -> KernelTree:
    """Check that ``path`` is a Linux tree with arm64 KVM's walker, read its version and probe its API.

    InputError (naming ``what`` and the path) when it does not exist, is not a directory, is not a kernel
    tree (a top Makefile with ``VERSION =``, ``arch/arm64/Kconfig``) or lacks pgtable.c / kvm_pgtable.h.
    The API is probed, not checked: call ``tree.api.require_supported()``."""
    given = Path(path)
    if not given.exists():
        raise InputError(f"{what}: {given} does not exist (expected a Linux source tree; bash ci/ksource.sh "
                         "unpacks Debian's 6.12 and 6.1 into .cache/linux-source)")
    if not given.is_dir():
        raise InputError(f"{what}: {given} is not a directory (expected the top of a Linux source tree)")
    root = given.resolve()
    makefile = root / "Makefile"
    version = _tree_version(makefile) if makefile.is_file() else None
    if version is None or not (root / ARM64_KCONFIG).is_file():
        raise InputError(f"{what}: {given} is not a Linux source tree (expected a top Makefile with VERSION = "
                         f"and {ARM64_KCONFIG})")
    for rel in (PGTABLE_C, HEADER):
        if not (root / rel).is_file():
            raise InputError(f"{what}: {given} (Linux {version}) has no {rel} (expected a tree with arm64 KVM's "
                             "stand-alone page-table walker, Linux 5.10 or later)")
    return KernelTree(path=root, version=version, api=probe_api(root))


def _tree_version(makefile: Path) -> str | None:
    """``VERSION.PATCHLEVEL.SUBLEVEL`` + ``EXTRAVERSION`` from the top Makefile, None without ``VERSION =``."""
    head = _read(makefile)[:4000]
    values: dict[str, str] = {}
    for key in ("VERSION", "PATCHLEVEL", "SUBLEVEL", "EXTRAVERSION"):
        m = re.search(rf"^{key}\s*=[ \t]*(\S*)[ \t]*$", head, re.MULTILINE)
        if m:
            values[key] = m.group(1)
    if not values.get("VERSION", "").isdigit():
        return None
    numbers = [values["VERSION"], values.get("PATCHLEVEL") or "0", values.get("SUBLEVEL") or "0"]
    return ".".join(numbers) + values.get("EXTRAVERSION", "")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror})") from exc


# ----------------------------------------------------------------------------------------------------------
# Text probes

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)


def strip_comments(text: str) -> str:
    """C text without comments (kernel-doc comments quote the prototypes they document)."""
    return _COMMENT.sub(" ", text)


def _norm(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s*\*\s*", " *", text).strip()


def _balanced(text: str, open_at: int) -> str | None:
    """The text between the parenthesis at ``open_at`` and its match."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
    return None


def split_params(params: str) -> list[str]:
    """A C parameter list split at its top-level commas, each normalised (``struct kvm_pgtable *pgt``)."""
    out: list[str] = []
    depth, cur = 0, ""
    for ch in params:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    parts = [_norm(p) for p in out]
    return [] if parts == [""] or parts == ["void"] else parts


def param_type(param: str) -> str:
    """``struct kvm_pgtable *pgt`` -> ``struct kvm_pgtable *``; ``u64 addr`` -> ``u64``."""
    m = re.fullmatch(r"(.*?[\s*])([A-Za-z_]\w*)", param)
    return _norm(m.group(1)) if m else param


def find_prototype(text: str, name: str) -> list[str] | None:
    """The parameters of the first declaration or definition of function ``name`` in comment-free ``text``
    (a line that starts with its return type), None if there is none."""
    for m in re.finditer(rf"^[ \t]*([A-Za-z_][\w \t*]*?)\b{re.escape(name)}[ \t]*\(", text, re.MULTILINE):
        if re.search(r"\b(return|if|while|define)\b", m.group(1)):
            continue
        params = _balanced(text, m.end() - 1)
        if params is None:
            continue
        after = text[m.end() - 1 + len(params) + 2:].lstrip()
        if after[:1] in (";", "{") or after.startswith("__"):  # prototype, definition, attributes
            return split_params(params)
    return None


def find_macro(text: str, name: str) -> list[str] | None:
    m = re.search(rf"^[ \t]*#[ \t]*define[ \t]+{re.escape(name)}\(([^)]*)\)", text, re.MULTILINE)
    return split_params(m.group(1)) if m else None


def struct_body(text: str, name: str) -> str | None:
    """The body of ``struct name { ... }`` (brace-matched) in comment-free ``text``."""
    m = re.search(rf"\bstruct[ \t]+{re.escape(name)}[ \t\n]*\{{", text)
    if not m:
        return None
    depth = 0
    for i in range(m.end() - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[m.end():i]
    return None


def enum_bits(text: str, enum: str, prefix: str) -> dict[str, int]:
    """``{SUFFIX: value}`` for ``prefix``SUFFIX ``= BIT(n)`` (or ``BIT_ULL(n)``, or a number) in ``enum``."""
    m = re.search(rf"\benum[ \t]+{re.escape(enum)}[ \t\n]*\{{([^}}]*)\}}", text)
    if not m:
        return {}
    out: dict[str, int] = {}
    for e in re.finditer(rf"\b{re.escape(prefix)}(\w+)\s*=\s*(?:BIT(?:_ULL)?\(\s*(\d+)\s*\)|(0x[0-9a-fA-F]+|\d+)\b)",
                         m.group(1)):
        out[e.group(1)] = 1 << int(e.group(2)) if e.group(2) is not None else int(e.group(3), 0)
    return out


def _shape(params: list[str] | None) -> list[str] | None:
    return None if params is None else [param_type(p) for p in params]


_PGT = "struct kvm_pgtable *"
_FLAGS = "enum kvm_pgtable_walk_flags"


def probe_api(root: Path) -> TreeApi:
    """Read the kvm_pgtable API's shape from the tree at ``root`` (see :class:`TreeApi`)."""
    header = strip_comments(_read(root / HEADER))
    source = strip_comments(_read(root / PGTABLE_C))
    host = strip_comments(_read(root / KVM_HOST_H))
    problems: list[str] = []

    def proto(name: str) -> list[str] | None:
        return find_prototype(header, name)

    # kvm_pgtable_stage2_map
    map_p = proto("kvm_pgtable_stage2_map")
    base_map = [_PGT, "u64", "u64", "u64", "enum kvm_pgtable_prot", "void *"]
    map_shape = _shape(map_p)
    map_has_flags = map_shape == [*base_map, _FLAGS]
    if map_shape not in (base_map, [*base_map, _FLAGS]):
        problems.append("kvm_pgtable_stage2_map: no known signature"
                        + (f" (found ({', '.join(map_p)}))" if map_p is not None else " (not declared)"))

    # level type: struct kvm_pgtable.start_level and kvm_pgtable_get_leaf's level
    pgt_body = struct_body(header, "kvm_pgtable") or ""
    start = re.search(r"\b(s8|u32|int|u8|s32)\s+start_level\s*;", pgt_body)
    leaf = _shape(proto("kvm_pgtable_get_leaf"))
    leaf_level = leaf[-1].removesuffix(" *") if leaf and len(leaf) == 4 else None
    level_type: Literal["s8", "u32"] = "u32"
    if start and start.group(1) in ("s8", "u32") and leaf_level == start.group(1):
        level_type = "s8" if start.group(1) == "s8" else "u32"
    else:
        problems.append(f"level type: struct kvm_pgtable.start_level is {start.group(1) if start else 'absent'}, "
                        f"kvm_pgtable_get_leaf's level is {leaf_level or 'absent'} (expected both s8 or both u32)")
    pgd_pteref = bool(re.search(r"\bkvm_pteref_t\s+pgd\s*;", pgt_body))
    if not pgd_pteref and not re.search(r"\bkvm_pte_t\s*\*\s*pgd\s*;", pgt_body):
        problems.append("struct kvm_pgtable.pgd: neither kvm_pteref_t nor kvm_pte_t *")

    # VTCR: mmu->vtcr (struct kvm_s2_mmu) or mmu->arch->vtcr
    mmu_body = struct_body(host, "kvm_s2_mmu") or ""
    vtcr_in_mmu = bool(re.search(r"\bu64\s+vtcr\s*;", mmu_body)) and "mmu->vtcr" in source
    if not vtcr_in_mmu and "mmu->arch->vtcr" not in source:
        problems.append("stage-2 VTCR: neither struct kvm_s2_mmu.vtcr (mmu->vtcr) nor mmu->arch->vtcr in pgtable.c")

    # access flag
    tcy = _shape(proto("kvm_pgtable_stage2_test_clear_young"))
    test_clear_young = tcy == [_PGT, "u64", "u64", "bool"]
    mkold = _shape(proto("kvm_pgtable_stage2_mkold")) == [_PGT, "u64"]
    is_young = _shape(proto("kvm_pgtable_stage2_is_young")) == [_PGT, "u64"]
    if not (test_clear_young or mkold):
        problems.append("access flag: neither kvm_pgtable_stage2_test_clear_young(pgt, addr, size, mkold) nor "
                        "kvm_pgtable_stage2_mkold(pgt, addr)")
    mky = _shape(proto("kvm_pgtable_stage2_mkyoung"))
    mkyoung_has_flags = mky == [_PGT, "u64", _FLAGS]
    if mky not in ([_PGT, "u64"], [_PGT, "u64", _FLAGS]):
        problems.append("kvm_pgtable_stage2_mkyoung: no known signature")
    relax = _shape(proto("kvm_pgtable_stage2_relax_perms"))
    relax_base = [_PGT, "u64", "enum kvm_pgtable_prot"]
    relax_perms_has_flags = relax == [*relax_base, _FLAGS]
    if relax not in (relax_base, [*relax_base, _FLAGS]):
        problems.append("kvm_pgtable_stage2_relax_perms: no known signature")
    for name, want in (("kvm_pgtable_stage2_unmap", [_PGT, "u64", "u64"]),
                       ("kvm_pgtable_stage2_wrprotect", [_PGT, "u64", "u64"]),
                       ("kvm_pgtable_stage2_destroy", [_PGT]),
                       ("kvm_pgtable_hyp_destroy", [_PGT]),
                       ("kvm_pgtable_hyp_unmap", [_PGT, "u64", "u64"])):
        if _shape(proto(name)) != want:
            problems.append(f"{name}: no known signature")
    hyp_map = _shape(proto("kvm_pgtable_hyp_map"))
    if hyp_map != [_PGT, "u64", "u64", "u64", "enum kvm_pgtable_prot"]:
        problems.append("kvm_pgtable_hyp_map: no known signature")
    if leaf is None or leaf[:3] != [_PGT, "u64", "kvm_pte_t *"]:
        problems.append("kvm_pgtable_get_leaf: no known signature")

    # init
    hyp_init = proto("kvm_pgtable_hyp_init")
    hyp_init_has_va_bits = _shape(hyp_init) == [_PGT, "u32", "struct kvm_pgtable_mm_ops *"]
    if not hyp_init_has_va_bits:
        problems.append("kvm_pgtable_hyp_init: no known signature (expected (pgt, u32 va_bits, mm_ops))")
    s2_macro = find_macro(header, "kvm_pgtable_stage2_init")
    s2_init = s2_macro if s2_macro is not None else proto("kvm_pgtable_stage2_init")
    if s2_init is None or len(s2_init) != 3 or (s2_macro is None and _shape(s2_init) != [
            _PGT, "struct kvm_s2_mmu *", "struct kvm_pgtable_mm_ops *"]):
        problems.append("kvm_pgtable_stage2_init: no known signature (expected (pgt, mmu, mm_ops))")
    get_vtcr = proto("kvm_get_vtcr")
    if _shape(get_vtcr) != ["u64", "u64", "u32"]:
        problems.append("kvm_get_vtcr: no known signature (expected (u64 mmfr0, u64 mmfr1, u32 phys_shift))")

    mm_ops = struct_body(header, "kvm_pgtable_mm_ops") or ""
    prot_all = enum_bits(header, "kvm_pgtable_prot", "KVM_PGTABLE_PROT_")
    prot_bits = {k: prot_all[k] for k in PROT_NAMES if k in prot_all}
    walk_flags = enum_bits(header, "kvm_pgtable_walk_flags", "KVM_PGTABLE_WALK_")
    missing_prot = [k for k in REQUIRED_PROT if k not in prot_bits]
    if missing_prot:
        problems.append(f"enum kvm_pgtable_prot: no KVM_PGTABLE_PROT_{', _'.join(missing_prot)} = BIT(n)")
    missing_walk = [k for k in REQUIRED_WALK if k not in walk_flags]
    if missing_walk:
        problems.append(f"enum kvm_pgtable_walk_flags: no KVM_PGTABLE_WALK_{', _'.join(missing_walk)} = BIT(n)")

    listed = {ln.strip() for ln in _read(root / CPUCAPS).splitlines() if ln.strip() and not ln.startswith("#")}
    kconfig = _read(root / ARM64_KCONFIG)
    page_sizes = tuple(sorted(int(k) * 1024 for k in re.findall(r"^config ARM64_(4|16|64)K_PAGES\s*$", kconfig,
                                                                re.MULTILINE)))
    if not page_sizes:
        problems.append(f"{ARM64_KCONFIG}: no ARM64_4K/16K/64K_PAGES options")

    return TreeApi(
        map_has_flags=map_has_flags,
        level_type=level_type,
        vtcr_in_mmu=vtcr_in_mmu,
        test_clear_young=test_clear_young,
        mkold=mkold,
        is_young=is_young,
        mkyoung_has_flags=mkyoung_has_flags,
        relax_perms_has_flags=relax_perms_has_flags,
        split=proto("kvm_pgtable_stage2_split") is not None,
        pgd_size=_shape(proto("kvm_pgtable_stage2_pgd_size")) == ["u64"],
        unlinked=(proto("kvm_pgtable_stage2_create_unlinked") is not None
                  and proto("kvm_pgtable_stage2_free_unlinked") is not None),
        free_unlinked_table=bool(re.search(r"\(\s*\*\s*free_unlinked_table\s*\)", mm_ops)),
        visit_ctx=struct_body(header, "kvm_pgtable_visit_ctx") is not None,
        pgd_pteref=pgd_pteref,
        hyp_init_has_va_bits=hyp_init_has_va_bits,
        lpa2="kvm_lpa2_is_enabled" in source or "kvm_lpa2_is_enabled" in header,
        hyp_init_params=", ".join(hyp_init or []),
        map_params=", ".join(map_p or []),
        stage2_init_args=", ".join(s2_init or []),
        stage2_init_is_macro=s2_macro is not None,
        get_vtcr=None if get_vtcr is None else ", ".join(get_vtcr),
        caps=frozenset(c for c in INTERESTING_CAPS if c in listed),
        page_sizes=page_sizes,
        prot_bits=prot_bits,
        walk_flags=walk_flags,
        problems=tuple(problems),
    )



# -- planted-bug copies ----------------------------------------------------------------------------------
SHADOW_REAL_DIRS = frozenset({"arch", "arch/arm64", "arch/arm64/kvm", "arch/arm64/kvm/hyp", "arch/arm64/kvm/hyp/nvhe"})


def shadow_tree(src: Path, dst: Path, real_dirs: frozenset[str] = SHADOW_REAL_DIRS,
                copies: frozenset[str] = frozenset({PGTABLE_C}), rel: str = "") -> Path:
    """A copy of a tree to edit without copying it: ``dst`` mirrors ``src`` with symlinks, except
    ``real_dirs`` (real directories) and ``copies`` (copied files, editable: by default pgtable.c).
    ``nvhe/`` is a real directory by default: the nVHE object is built from ``nvhe/../pgtable.c``,
    which through a symlinked ``nvhe`` would resolve to the original file. ``src`` is never written."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        sub = rel + entry.name
        if entry.is_dir() and not entry.is_symlink() and sub in real_dirs:
            shadow_tree(entry, dst / entry.name, real_dirs, copies, sub + "/")
        elif sub in copies:
            shutil.copy2(entry, dst / entry.name)
        else:
            (dst / entry.name).symlink_to(entry)
    return dst


def plant(tree: Path, old: str, new: str, path: str = PGTABLE_C) -> None:
    """Replace exactly one occurrence of ``old`` in a shadow tree's copied file (a planted bug)."""
    target = tree / path
    text = target.read_text()
    if text.count(old) != 1:
        raise InputError(f"plant: the edit's anchor occurs {text.count(old)} times in {target}: {old!r}")
    target.write_text(text.replace(old, new))

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.kernel.tree",
                                     description="Probe a Linux tree's kvm_pgtable API and print it as JSON.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tree", help="a Linux source tree")
    which.add_argument("--debian", choices=DEBIAN_SERIES, help="Debian's unpacked linux-source (ci/ksource.sh)")
    args = parser.parse_args(argv)
    try:
        tree = locate_tree(debian_tree(args.debian) if args.debian else args.tree,
                           what=f"--debian {args.debian}" if args.debian else "--tree")
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(tree.as_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
