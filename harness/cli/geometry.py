"""`harness geometry`: start levels, concatenated PGD pages and block levels for every granule and
input size (no target)."""

from __future__ import annotations

import argparse
from typing import Any

from harness.arch.geometry import (
    MIN_IA_BITS,
    Geometry,
    GeometryError,
    Granule,
    Stage,
    max_ia_bits,
    oa_format_bits,
    stage2_start_levels,
)
from harness.cli.args import UsageError, add_json_arg, pa_size
from harness.cli.output import print_json, print_table

NAME = "geometry"
STAGES = {"1": (Stage.S1,), "2": (Stage.S2,), "both": (Stage.S1, Stage.S2)}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="geometry table for every granule and input size")
    add_json_arg(p)
    p.add_argument("--stage", default="both", help="1, 2 or both")
    p.add_argument("--pa-bits", type=pa_size, default=48,
                   help="stage-2 output size, VTCR_EL2.PS (default 48; the start levels allowed follow the "
                        "PE's PAMax, 52 bits on -cpu max)")
    p.add_argument("--lpa2", action="store_true", help="FEAT_LPA2 (DS = 1) geometries for the 4K and 16K granules")


def reachable_block_levels(geom: Geometry) -> list[int]:
    """The levels a walk from the start level can find a block at (the architecture allows a block
    at a level above the start level too, but no walk of this geometry reads one there)."""
    return [level for level in geom.block_levels if level >= geom.start_level]


def geometry_rows(stages: tuple[Stage, ...], pa_bits: int, lpa2: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for st in stages:
        for g in Granule:
            if lpa2 and g is Granule.K64:
                continue  # the 64K granule's 52-bit form is FEAT_LPA, without DS
            pa = min(pa_bits, oa_format_bits(g, lpa2)) if st is Stage.S2 else None
            for ia in range(MIN_IA_BITS, max_ia_bits(g, lpa2) + 1):
                try:
                    geom = Geometry.create(st, g, ia, pa, lpa2=lpa2)
                except GeometryError:
                    continue
                allowed = (stage2_start_levels(g, ia, geom.pamax, lpa2) if st is Stage.S2
                           else (geom.start_level,))
                rows.append({"stage": int(st), "granule": g.label, "lpa2": lpa2, "ia_bits": ia,
                             "pa_bits": geom.pa_bits, "start_level": geom.start_level, "levels": geom.levels,
                             "pgd_pages": geom.pgd_pages, "allowed_start_levels": list(allowed),
                             "block_levels": reachable_block_levels(geom)})
    return rows


def run(args: argparse.Namespace) -> int:
    stages = STAGES.get(str(args.stage))
    if stages is None:
        raise UsageError(f"--stage: expected 1, 2 or both, got {args.stage!r}")
    rows = geometry_rows(stages, args.pa_bits, args.lpa2)
    if args.json:
        print_json(rows)
    else:
        print_table(["stage", "granule", "ia", "pa", "start", "levels", "PGD pages", "allowed starts",
                     "block levels"],
                    [[r["stage"], r["granule"], r["ia_bits"], r["pa_bits"], r["start_level"], r["levels"],
                      r["pgd_pages"], ",".join(map(str, r["allowed_start_levels"])),
                      ",".join(map(str, r["block_levels"]))] for r in rows])
    return 0
