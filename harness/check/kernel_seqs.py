"""Operation sequences for a tree's walker: scripted ones (the built-in scenarios as scripts, or a
scenario file's maps and ops) and seeded random ones, and shrinking a failing sequence.

A sequence is a list of :class:`KOp` (plain data: an operation name and its arguments, in the
vocabulary of the kvm_pgtable API: ``map``, ``unmap``, ``wrprotect``, ``mkold``, ``mkyoung``,
``relax_perms``, ``split``, ``get_leaf``, ``destroy``). The init and the identity maps of the
payload's own regions come first and are not part of it. Random sequence *i* of seed *S* for
configuration *C* is a function of (S, C.name, i) alone, so it replays by itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from harness.arch.geometry import Geometry, Stage
from harness.check.scenario.data import Scenario
from harness.core.prot import Prot
from harness.target.layout import LAYOUT, Layout

STAGE1_OPS = ("map", "unmap", "get_leaf")
STAGE2_OPS = ("map", "unmap", "wrprotect", "mkold", "mkyoung", "relax_perms", "split", "get_leaf")


@dataclass(frozen=True)
class KOp:
    """One operation: ``name`` and its arguments (``prot`` as the model's :class:`Prot`)."""

    name: str
    addr: int = 0
    size: int = 0
    phys: int = 0
    prot: Prot = Prot.NONE

    def text(self) -> str:
        if self.name == "map":
            return f"map {self.addr:#x}+{self.size:#x} -> {self.phys:#x} {self.prot.label()}"
        if self.name == "relax_perms":
            return f"relax_perms {self.addr:#x} {self.prot.label()}"
        if self.name in ("mkold", "mkyoung", "get_leaf"):
            return f"{self.name} {self.addr:#x}"
        if self.name == "destroy":
            return "destroy"
        return f"{self.name} {self.addr:#x}+{self.size:#x}"

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"op": self.name}
        if self.name != "destroy":
            out["addr"] = f"{self.addr:#x}"
        if self.size:
            out["size"] = f"{self.size:#x}"
        if self.name == "map":
            out["pa"] = f"{self.phys:#x}"
        if self.name in ("map", "relax_perms"):
            out["prot"] = self.prot.label()
        return out


@dataclass(frozen=True)
class KSequence:
    """A named sequence of operations (``seed``/``index`` for a random one: how to replay it)."""

    name: str
    ops: tuple[KOp, ...]
    seed: int | None = None
    index: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def with_ops(self, ops: Sequence[KOp], suffix: str = "") -> KSequence:
        return KSequence(self.name + suffix, tuple(ops), self.seed, self.index, self.notes)


# -- scripted ----------------------------------------------------------------------------------------
def available_ops(stage: Stage, has_split: bool) -> tuple[str, ...]:
    """The operations a tree has for a stage (split came with 6.5)."""
    ops = STAGE1_OPS if stage is Stage.S1 else STAGE2_OPS
    return tuple(op for op in ops if op != "split" or has_split)


def scripted(geom: Geometry, layout: Layout = LAYOUT, ops: Sequence[str] | None = None) -> list[KSequence]:
    """Hand-written scripts over the scratch window, one property each, sized in the granule's
    own page and block sizes: pages, a block, blocks next to pages, a range starting inside a
    block, remaps, table-to-block replacement, attribute updates, and destroy."""
    g = geom.granule.size
    blk = geom.size(2) if 2 in geom.block_levels else g * 16
    base = _window(geom, layout, 4 * blk)
    pa = layout.scratch_base
    rw, ro, rx = Prot.RW, Prot.R, Prot.RX
    out = [
        KSequence("pages", (KOp("map", base, 4 * g, pa, rw), KOp("get_leaf", base + g),
                            KOp("unmap", base + g, g), KOp("get_leaf", base + g), KOp("unmap", base, 4 * g))),
        KSequence("block", (KOp("map", base, blk, pa, rw), KOp("get_leaf", base + g), KOp("unmap", base, blk))),
        KSequence("block-next-to-pages", (KOp("map", base, blk, pa, rw), KOp("map", base + blk, 3 * g, pa + blk, ro),
                                          KOp("unmap", base + blk - g, 2 * g))),
        KSequence("unmap-inside-block", (KOp("map", base, 2 * blk, pa, rw), KOp("unmap", base + 3 * g, g),
                                         KOp("get_leaf", base), KOp("unmap", base, 2 * blk))),
        KSequence("remap-prot", (KOp("map", base, 2 * g, pa, rw), KOp("map", base, 2 * g, pa, ro),
                                 KOp("map", base, 2 * g, pa + 4 * g, rw))),
        KSequence("table-to-block", (KOp("map", base, 8 * g, pa, rw), KOp("map", base, blk, pa, rw),
                                     KOp("get_leaf", base + 9 * g), KOp("unmap", base, blk))),
        KSequence("device-and-exec", (KOp("map", base, g, pa, rw | Prot.DEVICE), KOp("map", base + g, g, pa + g, rx),
                                      KOp("unmap", base, 2 * g))),
        KSequence("edge-of-input", (KOp("map", geom.limit - 2 * g, 2 * g, pa, rw), KOp("get_leaf", geom.limit - g),
                                    KOp("unmap", geom.limit - 2 * g, 2 * g))),
    ]
    if geom.stage is Stage.S2:
        out += [
            KSequence("attributes", (KOp("map", base, blk, pa, rw), KOp("map", base + blk, 2 * g, pa + blk, rw),
                                     KOp("wrprotect", base, blk + 2 * g), KOp("mkold", base + blk),
                                     KOp("mkyoung", base + blk), KOp("relax_perms", base + blk, Prot.W),
                                     KOp("relax_perms", base, Prot.X), KOp("mkold", base + 5 * g))),
            KSequence("split", (KOp("map", base, blk, pa, rw), KOp("split", base, blk), KOp("get_leaf", base + g),
                                KOp("unmap", base + g, g))),
            # a walk that starts inside a block goes on to the next one (357ad203d45c)
            KSequence("range-from-inside-block", (KOp("map", base, 2 * blk, pa, rw), KOp("wrprotect", base + g, blk),
                                                  KOp("get_leaf", base + blk), KOp("unmap", base + g, blk))),
        ]
    out.append(KSequence("destroy", (KOp("map", base, blk + 3 * g, pa, rw), KOp("destroy"))))
    allowed = set(ops or (STAGE1_OPS if geom.stage is Stage.S1 else STAGE2_OPS)) | {"destroy"}
    return [s for s in out if all(op.name in allowed for op in s.ops)]


def _window(geom: Geometry, layout: Layout, size: int) -> int:
    """An input address for scripts: the scratch window (identity of scratch RAM), which every
    input size the payload can run under holds."""
    return layout.scratch_base


def from_scenario(sc: Scenario) -> KSequence:
    """A scenario (a file's, or a built-in of ``harness run``) as an operation script: its maps in
    order, then its ops."""
    ops = [KOp("map", m.addr, m.size, m.pa, m.prot) for m in sc.maps]
    for o in sc.ops:
        if o.op == "relax_perms":
            ops.append(KOp(o.op, o.addr, prot=o.prot))
        elif o.op in ("unmap", "wrprotect", "split"):
            ops.append(KOp(o.op, o.addr, o.size))
        else:
            ops.append(KOp(o.op, o.addr))
    return KSequence(f"scenario:{sc.name}", tuple(ops))


# -- random -------------------------------------------------------------------------------------------
def random_sequence(geom: Geometry, seed: int, config_name: str, index: int, length: int,
                    layout: Layout = LAYOUT, ops: Sequence[str] | None = None) -> KSequence:
    """Random sequence ``index`` of ``seed`` for a configuration: overlapping maps, blocks next to
    pages, ranges starting inside blocks, holes, remaps of mapped ranges, table-to-block
    replacement, attribute updates; inputs in two windows (scratch, and the top of the input
    range), outputs mostly in scratch RAM (real accesses can prove those), sometimes beyond RAM."""
    rng = random.Random(f"{seed}/{config_name}/{index}")
    g = geom.granule.size
    blocks = sorted(geom.size(lv) for lv in geom.block_levels if geom.size(lv) <= 1 << 30)
    blk = blocks[-1] if blocks else g * 512
    small_blk = blocks[0] if blocks else blk
    windows = [layout.scratch_base]
    top = geom.limit - 4 * small_blk
    if top > layout.scratch_base + layout.scratch_size:
        windows.append(top - top % small_blk)
    names = list(ops or (STAGE1_OPS if geom.stage is Stage.S1 else STAGE2_OPS))
    weights = {"map": 40, "unmap": 16, "wrprotect": 8, "mkold": 6, "mkyoung": 6, "relax_perms": 8, "split": 4,
               "get_leaf": 6}
    mapped: list[tuple[int, int]] = []
    out: list[KOp] = []
    keep_out = [(r.base, r.size) for r in [*layout.firmware_regions(), *layout.stage1_regions()]]
    for _ in range(length):
        name = rng.choices(names, [weights[n] for n in names])[0]
        w = rng.choice(windows)
        span = 4 * small_blk
        if mapped and rng.random() < 0.6:  # near something mapped: remaps, overlaps, inside blocks
            a, s = rng.choice(mapped)
            addr = a + rng.randrange(0, max(s // g, 1)) * g if rng.random() < 0.5 else a
        else:
            addr = w + rng.randrange(0, span // g) * g
        size = rng.choice([g, 2 * g, 3 * g, 8 * g, small_blk, small_blk + g, 2 * small_blk, small_blk - g])
        if rng.random() < 0.3:
            addr -= addr % small_blk
        size = max(g, min(size, geom.limit - addr))
        if name != "get_leaf" and _overlaps(addr, size, keep_out):
            # never over the payload's own regions: the tables are installed with the payload running on
            # them (stage 1) or its EL1 stub running through them (stage 2)
            addr = layout.scratch_base + addr % small_blk if small_blk <= layout.scratch_size // 2 \
                else layout.scratch_base
            size = max(g, min(size, layout.scratch_base + layout.scratch_size - addr))
        if name == "map":
            phys = _phys(rng, geom, layout, addr, size, small_blk)
            prot = _prot(rng, geom)
            out.append(KOp("map", addr, size, phys, prot))
            mapped.append((addr, size))
        elif name in ("unmap", "wrprotect", "split"):
            out.append(KOp(name, addr, size))
        elif name == "relax_perms":
            out.append(KOp(name, addr, prot=rng.choice([Prot.R, Prot.W, Prot.X, Prot.RW, Prot.RWX])))
        else:
            out.append(KOp(name, addr))
    if rng.random() < 0.5:
        out.append(KOp("destroy"))
    return KSequence(f"random-{index}", tuple(out), seed, index)


def _overlaps(addr: int, size: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(addr < base + n and base < addr + size for base, n in ranges)


def _phys(rng: random.Random, geom: Geometry, layout: Layout, addr: int, size: int, blk: int) -> int:
    off = addr % blk if rng.random() < 0.8 else 0  # keep the block alignment most of the time
    if rng.random() < 0.85:
        room = layout.scratch_size - size - blk
        base = layout.scratch_base + (rng.randrange(0, max(room // blk, 1)) * blk)
        return base + off
    high = min(1 << geom.pa_bits, 1 << 48) - size - blk  # no RAM there: AT only
    return max(blk, (rng.randrange(1 << 32, max(high, (1 << 32) + blk)) // blk) * blk) + off


def _prot(rng: random.Random, geom: Geometry) -> Prot:
    if geom.stage is Stage.S1:
        return rng.choice([Prot.R, Prot.RW, Prot.RX, Prot.RW, Prot.R | Prot.DEVICE, Prot.RW | Prot.DEVICE,
                           Prot.W, Prot.RWX])  # the last two are refused by the kernel
    return rng.choice([Prot.R, Prot.RW, Prot.RX, Prot.RWX, Prot.RW | Prot.DEVICE, Prot.NONE, Prot.W, Prot.X])


# -- shrinking -----------------------------------------------------------------------------------------
def shrink(seq: KSequence, fails: Callable[[KSequence], bool], budget: int = 60) -> KSequence:
    """A shorter sequence that still fails (delta debugging over the ops, then one op at a time);
    ``fails`` replays a candidate from scratch. At most ``budget`` replays."""
    ops = list(seq.ops)
    tries = 0
    chunk = max(1, len(ops) // 2)
    while chunk >= 1 and tries < budget:
        i = 0
        changed = False
        while i < len(ops) and tries < budget:
            cand = ops[:i] + ops[i + chunk:]
            tries += 1
            if cand and fails(seq.with_ops(cand)):
                ops = cand
                changed = True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return seq.with_ops(ops, f" (shrunk from {len(seq.ops)} to {len(ops)} ops)")
