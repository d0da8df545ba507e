"""JSON as the harness reads every input file (scenario files, attach's snapshots), strictly:

* each key once (TOML refuses a duplicate; Python's json lets the last one win);
* a number of more than :data:`MAX_NUMBER_TEXT` digits kept as its length (:class:`LongNumber`):
  Python's ``int`` refuses 4300 digits with a ValueError, and no value of ours takes even 80;
* nesting at most ``max_depth`` deep (json's recursion ends in a RecursionError far deeper).

No I/O: the caller reads the text and names the file in its own error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from harness.errors import printable, shown

MAX_NUMBER_TEXT = 80  # characters: a 64-bit number in binary with its 0b (separators not counted)


class JsonError(ValueError):
    """What is wrong with the text (a duplicate key, too deep), without the file's name."""


class LongNumber:
    """A JSON number of more than :data:`MAX_NUMBER_TEXT` digits, kept as its length."""

    def __init__(self, digits: str) -> None:
        self.digits = len(digits.lstrip("-"))

    def __repr__(self) -> str:
        return f"a {self.digits}-digit number"


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _int(text: str) -> int | LongNumber:
    return int(text) if len(text) <= MAX_NUMBER_TEXT else LongNumber(text)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def loads(text: str, max_depth: int) -> Any:
    """The data of a JSON text. JsonError for a duplicate key or nesting deeper than ``max_depth``;
    json.JSONDecodeError (the caller's wording) for text that is not JSON."""
    try:
        data = json.loads(text, parse_int=_int, object_pairs_hook=_object)
    except _DuplicateKey as e:
        raise JsonError(f"key {shown(e.key)} given twice; expected each key once") from None
    except RecursionError:
        raise JsonError(f"nested too deeply; expected at most {max_depth} levels") from None
    deep = too_deep(data, max_depth)
    if deep is not None:
        raise JsonError(f"{deep}: nested too deeply; expected at most {max_depth} levels")
    return data


def too_deep(data: Any, limit: int) -> str | None:
    """The key path of the first value nested deeper than ``limit``, or None."""
    todo: list[tuple[Any, str, int]] = [(data, "", 1)]
    while todo:
        value, path, depth = todo.pop()
        if isinstance(value, Mapping):
            children = [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            continue
        if depth > limit:
            return printable(path) or "(top level)"
        todo += [(v, p, depth + 1) for v, p in children]
    return None
