"""Scenarios: plain data (:mod:`.data`), strict parsing from JSON/TOML (:mod:`.parse`), the
built-in catalogue (:mod:`.catalogue`), and the one route to a model table (:mod:`.builder`)."""

from harness.check.scenario.builder import (
    BuiltScenario,
    LayoutLike,
    PoolOnlyLayout,
    RegionLike,
    apply_op,
    build,
    empty_table,
    firmware_regions,
)
from harness.check.scenario.catalogue import SCRATCH, builtin, builtin_named, builtin_subset
from harness.check.scenario.data import OPS, MapSpec, OpSpec, Scenario, ScenarioError, with_options
from harness.check.scenario.parse import from_dict, load, parse_int

__all__ = [
    "OPS", "SCRATCH", "BuiltScenario", "LayoutLike", "MapSpec", "OpSpec", "PoolOnlyLayout",
    "RegionLike", "Scenario", "ScenarioError", "apply_op", "build", "builtin", "builtin_named", "builtin_subset",
    "empty_table", "firmware_regions", "from_dict", "load", "parse_int", "with_options",
]
