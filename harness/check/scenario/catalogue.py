"""The built-in scenarios of `harness run` (and the scratch RAM they map)."""

from __future__ import annotations

from harness.arch.geometry import Granule, Stage, level_size
from harness.check.scenario.data import MapSpec, OpSpec, Scenario, ScenarioError
from harness.core.prot import Prot

SCRATCH = 0x5000_0000  # RAM the probes may really touch (the layout's scratch area)


def builtin() -> list[Scenario]:
    """Both stages, all granules: blocks at every allowed level, pages, unmapped holes,
    device memory, read-only, concatenated PGDs, 52-bit outputs with 64K, stage-2 updates."""
    out: list[Scenario] = []
    G = 1 << 30
    for gran in Granule:
        g = gran.size
        l2 = level_size(gran, 2)  # level-2 block size
        s1_maps = (
            MapSpec(0x1_0000_0000, 64 * g, SCRATCH, Prot.RW),
            MapSpec(0x1_0000_0000 + 128 * g, 16 * g, SCRATCH + 128 * g, Prot.R),
            MapSpec(0x2_0000_0000, l2, 0x1_0000_0000 if gran is not Granule.K4 else 0x8000_0000, Prot.RW),
            MapSpec(0x3_0000_0000, 8 * g, 0x0A00_0000, Prot.RW | Prot.DEVICE),
        )
        out.append(Scenario(f"s1-{gran.label}", Stage.S1, gran, 40, maps=s1_maps, access=True))
    for gran, ia, extra in (
        (Granule.K4, 40, (MapSpec(2 * G, G, 0x1_0000_0000, Prot.RW),)),  # level-1 block, 2 PGD pages
        (Granule.K16, 40, ()),  # 16 concatenated PGD pages
        (Granule.K64, 40, ()),  # start level 2, one PGD page
    ):
        g = gran.size
        l2 = level_size(gran, 2)
        top = 1 << ia
        maps = (
            MapSpec(0x1000_0000, 32 * g, SCRATCH, Prot.RW),
            MapSpec(0x1000_0000 + 64 * g, 8 * g, SCRATCH + 64 * g, Prot.R),
            MapSpec(0x1000_0000 + 96 * g, 8 * g, SCRATCH + 96 * g, Prot.RW | Prot.X),
            MapSpec(l2 * 16, l2, 0x2_0000_0000, Prot.RW),
            MapSpec(top - 4 * g, 4 * g, SCRATCH + 256 * g, Prot.RW),  # the last pages of the IPA range
            *extra,
        )
        ops = (
            OpSpec("wrprotect", 0x1000_0000 + 8 * g, 4 * g),
            OpSpec("mkold", 0x1000_0000 + 16 * g),
            OpSpec("unmap", 0x1000_0000 + 20 * g, 2 * g),
        )
        out.append(Scenario(f"s2-{gran.label}", Stage.S2, gran, ia, pa_bits=48, maps=maps, ops=ops,
                            access=True))
    out.append(Scenario(
        "s2-64K-52bit-pa", Stage.S2, Granule.K64, 48, pa_bits=52,
        maps=(MapSpec(0x20_0000_0000, 1 << 29, 0xF_FFFF_E000_0000, Prot.RW),
              MapSpec(0x30_0000_0000, 16 * 0x1_0000, 0xF_0000_0001_0000, Prot.R)),
    ))
    return out


def builtin_named(name: str, what: str = "builtin") -> Scenario:
    """The built-in scenario called ``name``; ``what`` names the argument in the error."""
    names = {s.name: s for s in builtin()}
    if name not in names:
        raise ScenarioError(f"{what}: expected one of {', '.join(names)}, got {name!r}")
    return names[name]


def builtin_subset(names: list[str], what: str = "only") -> list[Scenario]:
    """The built-in scenarios named (in catalogue order); all of them when ``names`` is empty."""
    scenarios = builtin()
    known = {s.name for s in scenarios}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ScenarioError(f"{what}: unknown scenario(s) {unknown}; expected some of {sorted(known)}")
    return [s for s in scenarios if not names or s.name in names]
