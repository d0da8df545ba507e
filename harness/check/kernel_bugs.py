"""Known upstream ``kvm_pgtable`` bugs, declared once (as :mod:`harness.check.divergences`
declares QEMU's): the rule each breaks, the commit that fixed it, the releases it affects, and how
a finding of ``harness kernel-pgtable`` is recognised as it.

A finding that one of these explains is reported as that known bug (by key), not as a new one:
the command exits 0 for it unless ``--strict``. The trees are never identified by version: a
declaration matches the symptom (what the C code's tables do against the oracle's), so a tree
that has the fix simply never shows it, and a backport is recognised by its absence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.arch import descriptors as d
from harness.core.translate import PERM_X


@dataclass(frozen=True)
class KnownBug:
    key: str
    fix: str  # the upstream commit that fixed it
    title: str
    rule: str  # what the code should do (the Arm ARM rule or the API's contract)
    affects: str  # the releases that have it
    matches: Callable[[dict[str, Any]], bool]  # on a finding's evidence (see harness.check.kernel.Finding)


def _hvhe_xn(ev: dict[str, Any]) -> bool:
    """An hVHE hyp leaf the oracle makes execute-never at EL2 that the C code left executable,
    with UXN (bit 54) set and PXN (bit 53) clear: execute-never for EL0 only."""
    if ev.get("kind") != "mismatch" or ev.get("stage") != 1 or not ev.get("hvhe"):
        return False
    c, o = ev.get("c"), ev.get("oracle")
    if not c or not o or c.get("fault") is not None or o.get("fault") is not None:
        return False
    pte = int(c.get("descriptor", 0))
    if not (int(c["perms"]) & PERM_X) or int(o["perms"]) & PERM_X:
        return False
    same_otherwise = (int(c["perms"]) & ~PERM_X) == (int(o["perms"]) & ~PERM_X) and c["pa"] == o["pa"]
    return same_otherwise and bool(d.S1_XN.get(pte)) and not d.S1_PXN.get(pte)


def _hvhe_xn_entry(ev: dict[str, Any]) -> bool:
    """The same, seen in an entry an operation returns (get_leaf): identical but for PXN, which the
    oracle sets and the C code does not."""
    if ev.get("kind") != "return-code" or ev.get("stage") != 1 or not ev.get("hvhe"):
        return False
    c, o = ev.get("c", {}), ev.get("oracle", {})
    if c.get("ret") != o.get("ret"):
        return False
    c1, o1 = int(c.get("ret1", 0)), int(o.get("ret1", 0))
    return c1 != o1 and (c1 ^ o1) == d.S1_PXN.mask and bool(o1 & d.S1_PXN.mask) and bool(d.S1_XN.get(c1))


def _hyp_map_over_block(ev: dict[str, Any]) -> bool:
    """A hyp reference-count, leak or TLB finding where upstream's own code (the oracle) breaks the
    rule the same way: a hyp map inside an existing block (the block is overwritten in place, with
    no invalidation)."""
    if ev.get("stage") != 1 or not ev.get("upstream_same"):
        return False
    kind = ev.get("kind")
    return kind in ("refcount", "leak") or (kind in ("tlb-missing", "tlb-bbm") and ev.get("op_name") == "map")


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        key="hvhe-hyp-xn-el0-only",
        fix="8d8e882c2b4b (\"KVM: arm64: Fix EL2 S1 XN handling for hVHE setups\", Dec 2025)",
        title="hVHE hyp mappings executable at EL2: execute-never set with bit 54 (UXN) only",
        rule=("In the EL2&0 regime (HCR_EL2.E2H = 1) stage-1 descriptor bit 54 is UXN and bit 53 PXN; "
              "execute-never at EL2 needs PXN (Arm ARM D8.4.1.2, S1DirectBasePermissions): a hyp mapping "
              "without KVM_PGTABLE_PROT_X must set both"),
        affects="since 6537565fd9b7f (hVHE, v6.6) until 8d8e882c2b4b; Linux 6.12.117 (Debian) has it",
        matches=lambda ev: _hvhe_xn(ev) or _hvhe_xn_entry(ev),
    ),
    KnownBug(
        key="hyp-map-into-block",
        fix="none in the trees checked (6.12.117, 6.1.192): KVM never maps a hyp range twice",
        title=("kvm_pgtable_hyp_map inside an existing block replaces the block with an empty table: "
               "no break-before-make and no TLB invalidation of the block, the rest of the block unmapped, and a "
               "reference taken on a slot that already held one (the table page is never freed)"),
        rule=("a table page's reference count is one plus its valid entries (kvm_pgtable's own invariant); "
              "replacing a valid block by a table needs break-before-make (Arm ARM D8.16.1); "
              "hyp_map_walker_try_leaf WARNs only when a leaf of the same size changes"),
        affects="every release since the hyp walker (v5.10); the callers never map over a live block",
        matches=_hyp_map_over_block,
    ),
)


def classify(evidence: dict[str, Any]) -> str | None:
    """The key of the known bug that explains a finding, if any."""
    for bug in KNOWN_BUGS:
        if bug.matches(evidence):
            return bug.key
    return None


def by_key(key: str) -> KnownBug:
    return next(b for b in KNOWN_BUGS if b.key == key)
