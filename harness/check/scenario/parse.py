"""Scenario files and dicts -> :class:`Scenario`, strictly: every key's type is checked, unknown
keys are refused, and each error names its key path (``maps[0].size``).

The schema is a set of pydantic models (strict mode: ``access = "no"`` is an error, not True);
sizes and addresses take integers or strings (ASCII) with ``0x``, ``_`` and K/M/G/T suffixes (any case);
JSON keys are unique, numbers at most 64 bits, nesting at most MAX_DEPTH deep.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from harness import strict_json
from harness.arch.geometry import GeometryError, Granule, Stage, parse_stage
from harness.check.addresses import BATCH_REASON, MAX_BATCH_ADDRESSES
from harness.check.scenario.data import OPS, MapSpec, OpSpec, Scenario, ScenarioError
from harness.core.prot import Prot
from harness.errors import printable, shown
from harness.strict_json import MAX_NUMBER_TEXT, LongNumber, too_deep

ADDRESS_LIMIT = 1 << 64
SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_DEPTH = 8  # nesting of a scenario file: {"scenario": [{"maps": [{"addr": 0}]}]} is 5 deep
INT_EXAMPLES = "e.g. 4096, 0x1000, 2M"
_SCIENTIFIC = re.compile(r"[0-9]+(?:\.[0-9]*)?[eE]\+?[0-9]{1,3}")


def int_text(text: str, what: str = "an integer") -> int:
    """An integer from text: decimal, 0x/0o/0b, ``_`` separators, a K/M/G/T suffix (any case).
    ASCII only and at most :data:`MAX_NUMBER_TEXT` characters (``int`` alone takes other scripts'
    digits, ``"１２３"``, and thousands of them); ValueError naming what was expected otherwise."""
    if not text.isascii():
        raise ValueError(f"expected {what} in ASCII digits ({INT_EXAMPLES}), got {shown(text)}")
    body = text.strip().replace("_", "")
    if len(body) > MAX_NUMBER_TEXT:
        raise ValueError(f"expected {what} of at most 64 bits, got {len(body)} characters")
    mult = 1
    if body[-1:].upper() in SUFFIXES and not body.lower().startswith(("0x", "-0x", "+0x")):
        body, mult = body[:-1], SUFFIXES[body[-1].upper()]
    try:
        return int(body, 0) * mult
    except ValueError:
        raise ValueError(f"expected {what} ({INT_EXAMPLES}), got {shown(text)}") from None


def count_text(text: str, what: str = "a count") -> int:
    """A count from text: as :func:`int_text`, or in scientific notation if it is a whole number
    (``1e6``, ``2.5e3``)."""
    body = text.strip().replace("_", "")
    if not (text.isascii() and _SCIENTIFIC.fullmatch(body)):
        return int_text(text, what)
    value = Decimal(body)
    if value != value.to_integral_value():
        raise ValueError(f"expected {what} (a whole number), got {shown(text)}")
    return int(value)


def parse_int(value: object) -> int:
    """An integer, or a string as :func:`int_text` reads it."""
    if isinstance(value, LongNumber):
        raise ValueError(f"expected an integer of at most 64 bits, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an integer ({INT_EXAMPLES}), got {shown(value)}")
    return value if isinstance(value, int) else int_text(value)


def _address(value: object) -> int:
    n = parse_int(value)
    if not 0 <= n < ADDRESS_LIMIT:
        raise ValueError(f"expected an address from 0 to 2^64 - 1, got {shown(value)}")
    return n


def _size(value: object) -> int:
    n = parse_int(value)
    if n <= 0:
        raise ValueError(f"expected a size > 0, got {shown(value)}")
    if n >= ADDRESS_LIMIT:
        raise ValueError(f"expected a size below 2^64, got {shown(value)}")
    return n


def _op_size(value: object) -> int:
    n = parse_int(value)
    if not 0 <= n < ADDRESS_LIMIT:
        raise ValueError(f"expected a size from 0 to 2^64 - 1, got {shown(value)}")
    return n


def _prot(value: object) -> Prot:
    if not isinstance(value, str):
        raise ValueError(f"expected a string such as 'rw', 'rx', 'r', 'rw+device', got {shown(value)}")
    return Prot.parse(value)


def _granule(value: object) -> Granule:
    if isinstance(value, bool) or not isinstance(value, int | str | Granule):
        raise ValueError(f"expected 4K, 16K or 64K, got {shown(value)}")
    return Granule.parse(value)


def _stage(value: object) -> Stage:
    if isinstance(value, bool) or not isinstance(value, int | str | Stage):
        raise ValueError(f"expected 1 (hyp stage 1) or 2 (guest stage 2), got {shown(value)}")
    return parse_stage(value)


def _small(n: int, value: object, what: str) -> int:
    """``n`` if it is a plausible ``what`` (a geometry's own check names the exact bounds)."""
    if not -(1 << 8) < n < 1 << 8:
        raise ValueError(f"expected {what}, got {shown(value)}")
    return n


def _bits(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a number of bits, got {shown(value)}")
    return _small(parse_int(value), value, "a number of bits (e.g. 40)")


def _level(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer level, got {shown(value)}")
    return _small(value, value, "a level from -1 to 3")


def _sample(value: object) -> int:
    n = count_text(value) if isinstance(value, str) else parse_int(value)  # a count: 1e6 too, as --sample takes
    if n < 1:
        raise ValueError(f"expected a positive count of pages, got {shown(value)}")
    if n > MAX_BATCH_ADDRESSES:
        raise ValueError(f"expected at most {MAX_BATCH_ADDRESSES} pages ({BATCH_REASON}), got {shown(value)}")
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
    key = next((part for part in reversed(err["loc"]) if isinstance(part, str)), None)
    if key is not None:
        msg = msg.removeprefix(f"{key}: ")  # a parser's own "stage: ..." under the key path "stage"
    if kind == "literal_error" and "op" in err["loc"]:
        return f"expected one of {', '.join(OPS)}, got {shown(err['input'])}"
    if kind in ("bool_type", "list_type", "string_type", "model_type", "dict_type"):
        return f"{msg}, got {shown(err['input'])}"
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
        name = _label(d["name"])
    try:
        m = ScenarioModel.model_validate(dict(d))
    except ValidationError as e:
        raise ScenarioError(_validation_message(name, e)) from None
    sc = Scenario(
        name=printable(m.name) if m.name is not None else name,  # a newline or bidi override, shown escaped
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
    data = _decode(text, kind, f"scenario file: {p}")
    items = data.get("scenario", data) if isinstance(data, Mapping) else data
    if isinstance(items, Mapping):
        items = [items]
    if not isinstance(items, list) or not items:
        raise ScenarioError(f"scenario file: {p}: expected a scenario object or a non-empty list")
    return [from_dict(item, f"{p.name}[{i}]") for i, item in enumerate(items)]


def _label(name: str, limit: int = 60) -> str:
    """A scenario's name as an error message's prefix: one line, not a page."""
    text = printable(name)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _decode(text: str, kind: str, where: str) -> Any:
    """The file's data, nested at most :data:`MAX_DEPTH` deep; every error a ScenarioError."""
    try:
        data = tomllib.loads(text) if kind == "TOML" else strict_json.loads(text, MAX_DEPTH)
    except strict_json.JsonError as e:
        raise ScenarioError(f"{where}: {e}") from None
    except RecursionError:  # TOML's
        raise ScenarioError(f"{where}: nested too deeply; expected at most {MAX_DEPTH} levels") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{where}: not valid {kind}: {e}") from e
    except ValueError as e:  # tomllib: an integer beyond Python's digit limit
        raise ScenarioError(f"{where}: {_long_number(text) or e}") from None
    deep = too_deep(data, MAX_DEPTH)  # TOML's (JSON's was checked)
    if deep is not None:
        raise ScenarioError(f"{where}: {deep}: nested too deeply; expected at most {MAX_DEPTH} levels")
    return data


def _long_number(text: str) -> str | None:
    """Where the first number too long for Python's ``int`` is in a TOML text, and its key (the key
    of its line), as an error message."""
    m = re.search(rf"[0-9](?:_?[0-9]){{{sys.get_int_max_str_digits()},}}", text)
    if m is None:
        return None
    line_no = text.count("\n", 0, m.start()) + 1
    line = text.splitlines()[line_no - 1]
    key = re.match(r"\s*([^=\s]+)\s*=", line)
    where = f"line {line_no}" + (f" ({key[1]})" if key else "")
    return f"{where}: expected an integer of at most 64 bits, got a {len(m[0].replace('_', ''))}-digit number"
