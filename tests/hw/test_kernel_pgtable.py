"""A kernel tree's own pgtable.c at EL2, checked operation by operation (harness kernel-pgtable).

The matrix runs on Debian's 6.12 and 6.1 trees (``bash ci/ksource.sh``; in CI they must be there):
every configuration each tree supports per page size, 0 unexplained findings, and 6.12's hVHE
execute-never bug reported as the known upstream bug, shown on the MMU by a fetch at EL2. Planted
bugs (real upstream bugs re-introduced as minimal edits in a shadow copy of the 6.12 tree) must each
be caught, with the finding kind named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.arch.geometry import Granule, Stage
from harness.check.kernel_run import RunOptions, TreeReport, run_tree, summary_lines
from harness.kernel.tree import KernelTree, debian_tree, locate_tree, plant, shadow_tree

pytestmark = [pytest.mark.hw, pytest.mark.kbuild]
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def real_tree(series: str) -> KernelTree:
    try:
        return locate_tree(debian_tree(series), what="--debian")
    except Exception as exc:
        if IN_CI:
            raise AssertionError(f"Debian's {series} tree must be fetched in CI (bash ci/ksource.sh): {exc}") from exc
        pytest.skip(f"Debian's {series} tree is not fetched (bash ci/ksource.sh): {exc}")


def _failures(report: TreeReport) -> str:
    return "\n".join(summary_lines(report))


@pytest.mark.parametrize("series,granule,cc", [
    ("6.12", Granule.K4, "gcc"), ("6.12", Granule.K16, "gcc"), ("6.12", Granule.K64, "gcc"),
    ("6.12", Granule.K4, "clang"),
    ("6.1", Granule.K4, "gcc"), ("6.1", Granule.K16, "gcc"), ("6.1", Granule.K64, "gcc"),
], ids=lambda v: v.label if isinstance(v, Granule) else str(v))
def test_matrix(series: str, granule: Granule, cc: str) -> None:
    tree = real_tree(series)
    opts = RunOptions(granules=(granule,), compilers=(cc,), random_sequences=2, random_length=12)
    report = run_tree(tree, opts)
    assert report.configs, "no configuration ran"
    assert report.ops >= 20 * len(report.configs)
    assert report.unexplained == 0, _failures(report)
    for c in report.configs:  # every configuration checked something on the MMU
        assert sum(r.mmu_checked for r in c.results) > 0, c.name
    hvhe = [c for c in report.configs if c.config.hvhe]
    if series == "6.12":
        assert hvhe, "6.12 has hVHE configurations"
        for c in hvhe:
            keys = {f.known for f in c.findings}
            assert "hvhe-hyp-xn-el0-only" in keys, f"{c.name}: the hVHE execute-never bug was not reported"
        proofs = [f.evidence.get("fetch_at_el2", "") for c in hvhe for f in c.findings
                  if f.known == "hvhe-hyp-xn-el0-only"]
        assert any(p.startswith("the code at") and "ran" in p for p in proofs), proofs
        # without hVHE the same maps are execute-never at EL2: nothing of the kind
        assert not [f for c in report.configs if not c.config.hvhe for f in c.findings
                    if f.known == "hvhe-hyp-xn-el0-only"]
    else:
        assert not hvhe, "6.1 has no hVHE"


# -- planted bugs -----------------------------------------------------------------------------------------
PLANTED = {
    # a9f0e3d5a089: no reload after TABLE_PRE: table-to-block replacement descends into the freed table
    "no-reload-after-table-pre": (
        "\t\tret = kvm_pgtable_visitor_cb(data, &ctx, KVM_PGTABLE_WALK_TABLE_PRE);\n\t\treload = true;\n",
        "\t\tret = kvm_pgtable_visitor_cb(data, &ctx, KVM_PGTABLE_WALK_TABLE_PRE);\n",
        "s2-4K-40bit", "table-to-block", {"use-after-free"}),
    # 357ad203d45c: after a leaf, advance without aligning down: a walk starting inside a block skips the next
    "leaf-advance-without-align": (
        "\t\tdata->addr = ALIGN_DOWN(data->addr, kvm_granule_size(level));\n", "",
        "s2-4K-40bit", "range-from-inside-block", {"mismatch"}),
    # e2fc6a9f686d: the shifted MemAttr field compared with an unshifted value: cache maintenance skipped
    "memattr-shift": (
        "\tu64 memattr = pte & KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR;\n",
        "\tu64 memattr = FIELD_GET(KVM_PTE_LEAF_ATTR_LO_S2_MEMATTR, pte);\n",
        "s2-4K-40bit", "pages", {"cmo-missing"}),
    # a table page's reference leaked on unmap (the 5c646b7e1d8b family): the emptied table is never freed
    "unmap-leaks-table": (
        "\tif (childp)\n\t\tmm_ops->put_page(childp);\n\n\treturn 0;\n}\n\nint kvm_pgtable_stage2_unmap(",
        "\treturn 0;\n}\n\nint kvm_pgtable_stage2_unmap(",
        "s2-4K-40bit", "pages", {"leak"}),
    # a leaf unmapped without its TLB invalidation (the be097997a273 family: a path that skips the TLBI)
    "unmap-without-tlbi": (
        "\t\t} else if (!stage2_unmap_defer_tlb_flush(pgt)) {\n\t\t\tkvm_call_hyp(__kvm_tlb_flush_vmid_ipa, mmu, "
        "ctx->addr,\n\t\t\t\t     ctx->level);\n",
        "\t\t} else if (!stage2_unmap_defer_tlb_flush(pgt)) {\n",
        # against upstream (tlbi-missing), by the rules (tlb-missing) and on the MMU: the warm TLB
        # still gives the unmapped pages (tlb-stale)
        "s2-4K-40bit", "pages", {"tlbi-missing", "tlb-missing", "tlb-stale"}),
    # 3a0b870e3448: a table replaced by a block invalidates one page, not the block's range: the other
    # pages' TLB entries survive (QEMU's vmalle1is after any IPA flush drops them, so only the rules see it)
    "merge-invalidates-one-page": (
        "\t\t\tkvm_tlb_flush_vmid_range(mmu, addr, size);\n",
        "\t\t\tkvm_call_hyp(__kvm_tlb_flush_vmid_ipa, mmu, addr, ctx->level);\n",
        "s2-4K-40bit", "table-to-block", {"tlb-missing"}),
    # 36e008323926: an emptied table entry invalidated with a level hint (a leaf level) instead of none
    "table-tlbi-with-leaf-hint": (
        "\t\t\tkvm_call_hyp(__kvm_tlb_flush_vmid_ipa, mmu, ctx->addr,\n\t\t\t\t     TLBI_TTL_UNKNOWN);\n",
        "\t\t\tkvm_call_hyp(__kvm_tlb_flush_vmid_ipa, mmu, ctx->addr,\n\t\t\t\t     ctx->level);\n",
        "s2-4K-40bit", "pages", {"tlb-hint"}),
    # a hyp leaf unmapped without its inline TLBI (the hyp code's own tlbi, trapped and recorded)
    "hyp-unmap-without-tlbi": (
        "\t\t__tlbi_level(vale2is, __TLBI_VADDR(ctx->addr, 0), ctx->level);\n\t\t*unmapped += granule;\n",
        "\t\t*unmapped += granule;\n",
        "s1-4K-48bit", "pages", {"tlb-missing"}),
    # a reference dropped twice (the c60d847be7b8 family): hyp destroy puts each table page twice
    "hyp-free-double-put": (
        "\tif (kvm_pte_table(ctx->old, ctx->level))\n\t\tmm_ops->put_page(kvm_pte_follow(ctx->old, mm_ops));\n"
        "\n\treturn 0;\n}\n\nvoid kvm_pgtable_hyp_destroy(",
        "\tif (kvm_pte_table(ctx->old, ctx->level)) {\n\t\tmm_ops->put_page(kvm_pte_follow(ctx->old, mm_ops));\n"
        "\t\tmm_ops->put_page(kvm_pte_follow(ctx->old, mm_ops));\n\t}\n"
        "\n\treturn 0;\n}\n\nvoid kvm_pgtable_hyp_destroy(",
        "s1-4K-48bit", "destroy", {"refcount"}),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_caught(bug: str, tmp_path: Path) -> None:
    old, new, config, sequence, kinds = PLANTED[bug]
    src = real_tree("6.12")
    tree = shadow_tree(src.path, tmp_path / "tree")
    plant(tree, old, new)
    stage = Stage.S1 if config.startswith("s1") else Stage.S2
    opts = RunOptions(granules=(Granule.K4,), stage=stage, random_sequences=0, only_config=config,
                      only_sequence=sequence, shrink=False)
    report = run_tree(locate_tree(tree), opts, build_cache=tmp_path / "kbuild")
    assert [c.config.name for c in report.configs] == [config]
    found = {f.kind for f in report.findings if f.known is None}
    assert kinds <= found, f"{bug}: expected {kinds}, found {found}\n{_failures(report)}"


def test_unmodified_shadow_tree_is_clean(tmp_path: Path) -> None:
    """The planted-bug tests' control: the same shadow tree, no edit, the same runs, no finding."""
    tree = shadow_tree(real_tree("6.12").path, tmp_path / "tree")
    for config, sequence in {(c, s) for _, _, c, s, _ in PLANTED.values()}:
        stage = Stage.S1 if config.startswith("s1") else Stage.S2
        opts = RunOptions(granules=(Granule.K4,), stage=stage, random_sequences=0, only_config=config,
                          only_sequence=sequence, shrink=False)
        report = run_tree(locate_tree(tree), opts, build_cache=tmp_path / "kbuild")
        assert report.ops > 0 and report.unexplained == 0, _failures(report)


# -- the command line ---------------------------------------------------------------------------------------
def _harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=900, check=False)


def test_cli_json_and_ktap_on_one_configuration() -> None:
    real_tree("6.12")
    args = ["kernel-pgtable", "--debian", "6.12", "--granule", "4K", "--stage", "1", "--e2h",
            "--config", "s1-4K-48bit-hvhe", "--sequences", "1"]
    p = _harness(*args, "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["ops"] > 0 and rep["unexplained"] == 0 and rep["known_bugs"].get("hvhe-hyp-xn-el0-only", 0) > 0
    (cfg,) = rep["configurations"]
    assert {"ops", "checked", "findings", "disagreements", "unexplained"} <= set(cfg)
    assert all("kind" in f for f in cfg["findings"])
    strict = _harness(*args, "--ktap", "--strict")
    assert strict.returncode == 1
    assert strict.stdout.startswith("KTAP version 1\n") and "not ok 1 s1-4K-48bit-hvhe-gcc" in strict.stdout
    assert "# known bug hvhe-hyp-xn-el0-only" in strict.stdout


def test_cli_bad_inputs(tmp_path: Path) -> None:
    notatree = _harness("kernel-pgtable", "--tree", str(tmp_path))
    assert notatree.returncode == 2 and str(tmp_path) in notatree.stderr and "Traceback" not in notatree.stderr
    (tmp_path / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 99\n")
    (tmp_path / "arch/arm64").mkdir(parents=True)
    (tmp_path / "arch/arm64/Kconfig").write_text("config ARM64\n")
    nopg = _harness("kernel-pgtable", "--tree", str(tmp_path))
    assert nopg.returncode == 2 and "pgtable.c" in nopg.stderr
    series = _harness("kernel-pgtable", "--debian", "5.10")
    assert series.returncode == 2 and "--debian" in series.stderr
    e2h = _harness("kernel-pgtable", "--debian", "6.12", "--stage", "2", "--e2h")
    assert e2h.returncode == 2 and "--e2h" in e2h.stderr


def test_cli_build_failure_names_first_error_and_log(tmp_path: Path) -> None:
    tree = shadow_tree(real_tree("6.12").path, tmp_path / "tree")
    plant(tree, "static bool stage2_pte_cacheable(", "static bool stage2_pte_cacheable(int planted_syntax_error ")
    p = subprocess.run([sys.executable, "-m", "harness.cli", "kernel-pgtable", "--tree", str(tree), "--granule", "4K",
                        "--stage", "2", "--config", "s2-4K-40bit"], capture_output=True, text=True, timeout=600,
                       check=False, env={**os.environ, "HARNESS_KBUILD_DIR": str(tmp_path / "kbuild")})
    assert p.returncode == 3, p.stderr
    assert "error:" in p.stderr and "pgtable.c" in p.stderr and "log" in p.stderr and "Traceback" not in p.stderr


def test_failing_random_sequence_shrinks_to_a_reproducer(tmp_path: Path) -> None:
    """A planted bug found by a random sequence: the sequence shrinks to a few operations that still
    show it, and the reproducer names how to replay it."""
    old, new, config, _, kinds = PLANTED["memattr-shift"]
    tree = shadow_tree(real_tree("6.12").path, tmp_path / "tree")
    plant(tree, old, new)
    opts = RunOptions(granules=(Granule.K4,), stage=Stage.S2, scripted=False, builtins=False, random_sequences=1,
                      random_length=12, seed=3, only_config=config, mmu=False)
    report = run_tree(locate_tree(tree), opts, build_cache=tmp_path / "kbuild")
    (rep,) = report.reproducers()
    assert rep["config"] == config and rep["sequence"] == "random-0" and rep["seed"] == 3
    assert set(rep["kinds"]) & kinds
    assert 1 <= len(rep["ops"]) <= 3, rep["ops"]
    assert any(op["op"] == "map" for op in rep["ops"])


# -- --jobs -------------------------------------------------------------------------------------------------
def _stable(x: object) -> object:
    """A report's JSON without the times (and the per-sequence seconds they are made of)."""
    if isinstance(x, dict):
        return {k: _stable(v) for k, v in x.items() if k not in ("seconds", "ops_per_s", "timings")}
    if isinstance(x, list):
        return [_stable(v) for v in x]
    return x


def test_jobs_deal_configurations_and_merge_to_the_serial_report() -> None:
    """Three configurations, a few random sequences each: one job and two (each its own QEMU,
    the build done once before they start) give the same report, configurations in matrix order."""
    tree = real_tree("6.12")
    opts = RunOptions(granules=(Granule.K4,), stage=Stage.S1, lpa2=False, e2h=False, scripted=False, builtins=False,
                      random_sequences=2, random_length=6, seed=4)
    serial = run_tree(tree, opts)
    lines: list[str] = []
    split = run_tree(tree, dataclasses.replace(opts, jobs=2), lines.append)
    assert len(serial.configs) == 3 and serial.ops > 0 and serial.unexplained == 0, _failures(serial)
    assert len(split.builds) == 1 and len(lines) == 6, lines  # one build; every sequence's progress line
    assert [c.name for c in split.configs] == [c.name for c in serial.configs]
    assert _stable(split.as_json()) == _stable(serial.as_json())
    assert "\n".join(summary_lines(split)).split("\n")[1:] == "\n".join(summary_lines(serial)).split("\n")[1:]
