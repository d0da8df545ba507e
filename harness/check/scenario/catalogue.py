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
        s1_ops = (
            OpSpec("unmap", 0x1_0000_0000 + 4 * g, 2 * g),
            OpSpec("unmap", 0x1_0000_0000 + 136 * g, 8 * g),  # the second half of the read-only run
        )
        out.append(Scenario(f"s1-{gran.label}", Stage.S1, gran, 40, maps=s1_maps, ops=s1_ops, access=True))
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
            OpSpec("relax_perms", 0x1000_0000 + 66 * g, prot=Prot.RW),  # read-only -> read-write
            OpSpec("unmap", l2 * 16 + 3 * g, g),  # splits the level-2 block
        )
        out.append(Scenario(f"s2-{gran.label}", Stage.S2, gran, ia, pa_bits=48, maps=maps, ops=ops,
                            access=True))
    out.append(Scenario(
        "s2-64K-52bit-pa", Stage.S2, Granule.K64, 48, pa_bits=52,
        maps=(MapSpec(0x20_0000_0000, 1 << 29, 0xF_FFFF_E000_0000, Prot.RW),
              MapSpec(0x30_0000_0000, 16 * 0x1_0000, 0xF_0000_0001_0000, Prot.R)),
    ))
    out += lpa2_scenarios()
    return out


def lpa2_scenarios() -> list[Scenario]:
    """FEAT_LPA2 (DS = 1) and hVHE as Linux 6.12's protected mode runs them on ``-cpu max``: hyp
    stage 1 in the EL2&0 regime with 4K pages and a 52-bit VA (start level -1), host stage 2 with
    a 52-bit IPA at level 0 over 16 concatenated pages; and 16K with DS = 1 at stage 2. Blocks at
    the levels only DS = 1 allows (4K level 0, 16K level 1) go to 52-bit output addresses (AT only:
    no RAM there); real accesses go to scratch RAM."""
    k4, k16 = Granule.K4.size, Granule.K16.size
    high = 0xF_FFFF_0000_0000  # OA[51:48] = 0xf: descriptor bits [9:8] and [49:48] with DS = 1
    hyp = Scenario(
        "s1-4K-lpa2-hvhe", Stage.S1, Granule.K4, 52, pa_bits=52, lpa2=True, e2h=True, access=True, sample=8192,
        maps=(MapSpec(0x1_0000_0000, 64 * k4, SCRATCH, Prot.RW),
              MapSpec(0x1_0000_0000 + 128 * k4, 16 * k4, SCRATCH + 128 * k4, Prot.R),
              MapSpec(0x2_0000_0000, 1 << 21, SCRATCH + (1 << 21), Prot.R | Prot.X),  # level-2 block
              MapSpec(0x3_0000_0000, 8 * k4, 0x0A00_0000, Prot.RW | Prot.DEVICE),
              MapSpec(0x8_0000_0000_0000, 1 << 30, high, Prot.R),  # level-1 block, VA[51] set
              MapSpec((1 << 52) - 4 * k4, 4 * k4, SCRATCH + 256 * k4, Prot.RW)),  # the top of the VA range
        ops=(OpSpec("unmap", 0x1_0000_0000 + 4 * k4, 2 * k4),
             OpSpec("unmap", 0x2_0000_0000 + 7 * k4, k4)),  # splits the level-2 block
    )
    host = Scenario(
        "s2-4K-lpa2", Stage.S2, Granule.K4, 52, pa_bits=52, start_level=0, lpa2=True, access=True, sample=8192,
        maps=(MapSpec(0x1000_0000, 32 * k4, SCRATCH, Prot.RW),
              MapSpec(0x1000_0000 + 64 * k4, 8 * k4, SCRATCH + 64 * k4, Prot.R),
              MapSpec(0x2000_0000, 1 << 21, SCRATCH + (1 << 21), Prot.RW),  # level-2 blocks in scratch
              MapSpec(0x2040_0000, 1 << 21, SCRATCH + (2 << 21), Prot.RW),
              MapSpec(0xA_0000_0000_0000, 1 << 39, 0xF_8000_0000_0000, Prot.RW),  # level-0 block (DS = 1)
              MapSpec(0x5_0000_1000_0000, 16 * k4, high, Prot.RW),
              MapSpec((1 << 52) - 4 * k4, 4 * k4, SCRATCH + 256 * k4, Prot.RW)),
        ops=(OpSpec("wrprotect", 0x1000_0000 + 8 * k4, 4 * k4),
             OpSpec("mkold", 0x1000_0000 + 16 * k4),
             OpSpec("unmap", 0x1000_0000 + 20 * k4, 2 * k4),
             OpSpec("unmap", 0x2040_0000 + 5 * k4, k4)),  # splits the second block
    )
    s2_16k = Scenario(
        "s2-16K-lpa2", Stage.S2, Granule.K16, 52, pa_bits=52, lpa2=True, access=True, sample=8192,
        maps=(MapSpec(0x1000_0000, 32 * k16, SCRATCH, Prot.RW),
              MapSpec(0x1000_0000 + 64 * k16, 8 * k16, SCRATCH + 64 * k16, Prot.R),
              MapSpec(0x2000_0000, 1 << 25, SCRATCH + (1 << 25), Prot.RW),  # level-2 block in scratch
              MapSpec(0x8_0000_0000_0000, 1 << 36, 0xC_0000_0000_0000, Prot.RW),  # level-1 blocks (DS = 1)
              MapSpec(0x8_0010_0000_0000, 1 << 36, 0xC_0010_0000_0000, Prot.R),
              MapSpec(0x1_0000_0000_0000, 8 * k16, high, Prot.RW),
              MapSpec((1 << 52) - 4 * k16, 4 * k16, SCRATCH + 256 * k16, Prot.RW)),
        ops=(OpSpec("wrprotect", 0x1000_0000 + 8 * k16, 4 * k16),
             OpSpec("mkold", 0x1000_0000 + 16 * k16),
             OpSpec("unmap", 0x8_0010_0000_0000 + 3 * (1 << 25), 1 << 25)),  # splits the second 64 GiB block
    )
    return [hyp, host, s2_16k]


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
