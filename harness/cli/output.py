"""Terminal and JSON output for the CLI: tables, JSON, progress. Every function that renders
text for the user is a ``print_*``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def print_json(data: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(data, out, indent=2, sort_keys=False, default=_default)
    out.write("\n")


def _default(o: object) -> object:
    if hasattr(o, "__int__"):
        return int(o)  # type: ignore[call-overload,unused-ignore]
    return str(o)


class Progress:
    """A one-line progress display on a terminal; silent elsewhere (CI logs stay clean)."""

    def __init__(self, total: int, enabled: bool | None = None, out: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.out = out = out or sys.stderr
        self.enabled = out.isatty() if enabled is None else enabled

    def print_step(self, label: str) -> None:
        if self.enabled:
            self.out.write(f"\r\033[K[{self.done + 1}/{self.total}] {label}")
            self.out.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            self.out.write("\r\033[K")
            self.out.flush()
