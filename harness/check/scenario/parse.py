"""Scenario files and dicts -> :class:`Scenario`, strictly: every key's type is checked, unknown
keys are refused, and each error names its key path (``maps[0].size``).

The schema is a set of pydantic models (strict mode: ``access = "no"`` is an error, not True);
sizes and addresses take integers or strings with ``0x``, ``_`` and K/M/G/T suffixes (any case).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from harness.arch.geometry import GeometryError, Granule, Stage, parse_stage
from harness.check.scenario.data import OPS, MapSpec, OpSpec, Scenario, ScenarioError
from harness.core.prot import Prot

ADDRESS_LIMIT = 1 << 64
SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_int(value: object) -> int:
    """An integer, or a string: decimal, 0x hex, _ separators, a K/M/G/T suffix (any case)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an integer (e.g. 4096, 0x1000, 2M), got {value!r}")
    if isinstance(value, int):
        return value
    text = value.strip().replace("_", "")
    mult = 1
    if text[-1:].upper() in SUFFIXES and not text.lower().startswith("0x"):
        text, mult = text[:-1], SUFFIXES[text[-1].upper()]
    try:
        return int(text, 0) * mult
    except ValueError:
        raise ValueError(f"expected an integer (e.g. 4096, 0x1000, 2M), got {value!r}") from None


def _address(value: object) -> int:
    n = parse_int(value)
    if not 0 <= n < ADDRESS_LIMIT:
        raise ValueError(f"expected an address from 0 to 2^64 - 1, got {value!r}")
    return n


def _size(value: object) -> int:
    n = parse_int(value)
    if not 0 < n < ADDRESS_LIMIT:
        raise ValueError(f"expected a size > 0, got {value!r}")
    return n


def _op_size(value: object) -> int:
    n = parse_int(value)
    if not 0 <= n < ADDRESS_LIMIT:
        raise ValueError(f"expected a size >= 0, got {value!r}")
    return n


def _prot(value: object) -> Prot:
    if not isinstance(value, str):
        raise ValueError(f"expected a string such as 'rw', 'rx', 'r', 'rw+device', got {value!r}")
    return Prot.parse(value)


def _granule(value: object) -> Granule:
    if isinstance(value, bool) or not isinstance(value, int | str | Granule):
        raise ValueError(f"expected 4K, 16K or 64K, got {value!r}")
    return Granule.parse(value)


def _stage(value: object) -> Stage:
    if isinstance(value, bool) or not isinstance(value, int | str | Stage):
        raise ValueError(f"expected 1 (hyp stage 1) or 2 (guest stage 2), got {value!r}")
    return parse_stage(value)


def _bits(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a number of bits, got {value!r}")
    return parse_int(value)


def _level(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer level, got {value!r}")
    return value


def _sample(value: object) -> int:
    n = parse_int(value)
    if n < 1:
        raise ValueError(f"expected a positive count of pages, got {value!r}")
    return n


Address = Annotated[int, BeforeValidator(_address)]
Size = Annotated[int, BeforeValidator(_size)]
ProtField = Annotated[Prot, BeforeValidator(_prot)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)


class MapModel(_Strict):
    addr: Address
    size: Size
    pa: Address
    prot: ProtField = Prot.RW


class OpModel(_Strict):
    op: Literal["unmap", "wrprotect", "mkold", "mkyoung", "relax_perms", "get_leaf", "split"]
    addr: Address
    size: Annotated[int, BeforeValidator(_op_size)] = 0
    prot: ProtField = Prot.NONE


class ScenarioModel(_Strict):
    name: str | None = None
    stage: Annotated[Stage, BeforeValidator(_stage)]
    granule: Annotated[Granule, BeforeValidator(_granule)]
    ia_bits: Annotated[int, BeforeValidator(_bits)]
    pa_bits: Annotated[int, BeforeValidator(_bits)] | None = None
    start_level: Annotated[int, BeforeValidator(_level)] | None = None
    maps: list[MapModel] = Field(default_factory=list)
    ops: list[OpModel] = Field(default_factory=list)
    access: bool = False
    sample: Annotated[int, BeforeValidator(_sample)] | None = None
    lpa2: bool = False
    e2h: bool = False


assert set(OPS) == set(OpModel.model_fields["op"].annotation.__args__)  # type: ignore[union-attr]


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = part
        elif part.startswith(("function-", "lax-", "strict-")) or part in ("int", "str", "bool"):
            continue  # pydantic's names for union members, not keys
        else:
            out += f".{part}"
    return out or "(scenario)"


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind == "literal_error" and "op" in err["loc"]:
        return f"expected one of {', '.join(OPS)}, got {err['input']!r}"
    if kind in ("bool_type", "list_type", "string_type", "model_type", "dict_type"):
        return f"{msg}, got {err['input']!r}"
    return msg


def _validation_message(name: str, e: ValidationError) -> str:
    errors = e.errors(include_url=False)
    parts = [f"{_key_path(tuple(err['loc']))}: {_message(err)}" for err in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"{name}: " + "; ".join(parts) + more


def from_dict(d: object, name: str = "scenario") -> Scenario:
    """A scenario from a JSON/TOML-shaped dict; every error names its key path."""
    if not isinstance(d, Mapping):
        raise ScenarioError(f"{name}: expected a table/object, got {type(d).__name__}")
    if isinstance(d.get("name"), str):
        name = d["name"]
    try:
        m = ScenarioModel.model_validate(dict(d))
    except ValidationError as e:
        raise ScenarioError(_validation_message(name, e)) from None
    sc = Scenario(
        name=m.name if m.name is not None else name,
        stage=m.stage, granule=m.granule, ia_bits=m.ia_bits, pa_bits=m.pa_bits, start_level=m.start_level,
        maps=tuple(MapSpec(x.addr, x.size, x.pa, x.prot) for x in m.maps),
        ops=tuple(OpSpec(x.op, x.addr, x.size, x.prot) for x in m.ops),
        access=m.access, sample=m.sample, lpa2=m.lpa2, e2h=m.e2h,
    )
    try:
        sc.geometry()
    except GeometryError as e:
        raise ScenarioError(f"{name}: {e}") from e
    return sc


def load(path: str | Path) -> list[Scenario]:
    """Scenarios from a JSON or TOML file (``.toml``: TOML, else JSON): one scenario, a list, or
    ``{"scenario": [...]}``."""
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(f"scenario file: {p} does not exist or is not a file")
    kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError(f"scenario file: {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ScenarioError(f"scenario file: {p}: cannot read it ({e.strerror})") from None
    try:
        data: Any = tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"scenario file: {p}: not valid {kind}: {e}") from e
    items = data.get("scenario", data) if isinstance(data, Mapping) else data
    if isinstance(items, Mapping):
        items = [items]
    if not isinstance(items, list) or not items:
        raise ScenarioError(f"scenario file: {p}: expected a scenario object or a non-empty list")
    return [from_dict(item, f"{p.name}[{i}]") for i, item in enumerate(items)]
