"""The harness's error classes and the exit-code contract, defined once.

Every command ends with exactly one of these exit statuses:

* ``0`` (:data:`EXIT_OK`): every check matched (or the command had nothing to check);
* ``1`` (:data:`EXIT_MISMATCH`): a check found a disagreement between the model and the MMU;
* ``2`` (:data:`EXIT_USAGE`): bad arguments, a bad scenario or snapshot file, a configuration the
  architecture forbids: found before anything boots (:class:`InputError`);
* ``3`` (:data:`EXIT_MACHINERY`): the target or the machinery failed: QEMU or gdb died or hung,
  a toolchain is missing or failed, an I/O error, /dev/shm full (:class:`MachineryError`).

Layers raise subclasses of these two bases; the command line maps them to exit codes and prints
one line (no traceback unless ``--debug``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_MACHINERY = 3
EXIT_INTERRUPTED = 130  # SIGINT, as shells report it


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""

    exit_code = EXIT_MACHINERY


class InputError(HarnessError, ValueError):
    """Bad input: the message names the argument or key and what was expected (exit 2)."""

    exit_code = EXIT_USAGE


class MachineryError(HarnessError, RuntimeError):
    """The target or the machinery failed (exit 3); the message says what and where the logs are."""

    exit_code = EXIT_MACHINERY


def printable(text: str) -> str:
    """``text`` with every character ``str.isprintable`` refuses (controls such as a newline or
    ESC, format characters such as the bidi overrides, separators other than the space) escaped
    as ``repr`` writes it (``\\n``, ``\\x1b``, ``\\u202e``): a message stays one line and shows
    what it was given."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def shown(value: object, limit: int = 60) -> str:
    """``value`` as a message quotes it: its repr, escaped to one line (:func:`printable`) and
    shortened to about ``limit`` characters (a number too long to print by its size in bits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"a number of {value.bit_length()} bits"
    try:
        text = printable(repr(value))
    except (RecursionError, ValueError):  # nested too deeply to print; an int past Python's digit limit
        return f"a {type(value).__name__} too large to print"
    if len(text) <= limit:
        return text
    return f"{text[:limit - 16]}...{text[-8:]} ({len(text)} characters)"
