"""Parsing JSON and TOML that come from outside this process: the one place for both.

Method lines from clients, events from a Pod, session log lines and the TOML
files of the state directory can hold anything. Python's parsers answer some
inputs with exceptions their callers do not expect: ``RecursionError`` for
brackets nested a few hundred deep, a bare ``ValueError`` for an integer of
more than 4,300 digits. Here every such input becomes ``ParseError`` (a
``ValueError``), so one ``except`` at each caller covers them all.

Values nested deeper than a limit are refused as well, even when the parser
managed them: whatever handles a parsed value later (``json.dumps``,
``tomli_w``, a snapshot a client must parse with its own limit) may recurse
once per level too.
"""

from __future__ import annotations

import gc
import sys
from contextlib import contextmanager

MAX_DEPTH = 64  # containers inside one another in a state file or a method line


class ParseError(ValueError):
    """Text that does not parse, or parses into something nested too deeply."""


_decode = None  # what json.loads uses, without its checks per call


def json_loads(data: bytes | str, max_depth: int = MAX_DEPTH):
    """Parse one JSON text; ParseError for anything that is not a value we accept."""
    import json  # measured: 1.2 ms that commands reading only TOML (peer register) skip
    global _decode
    if _decode is None:
        _decode = json.JSONDecoder().decode
    try:
        if isinstance(data, bytes) and data[:1] == b"{" and data[1:2] not in (b"", b"\0"):
            # UTF-8, as json.loads detects for such a start: the same result, sooner
            value = _decode(data.decode("utf-8", "surrogatepass"))
        else:
            value = json.loads(data)
    except RecursionError:
        raise ParseError(_too_deep(max_depth)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParseError(str(e)) from None
    except ValueError:
        raise ParseError(_too_long()) from None
    # Only text with that many brackets can nest that deep: most lines skip the walk.
    opening = (b"[", b"{") if isinstance(data, (bytes, bytearray)) else ("[", "{")
    if data.count(opening[0]) + data.count(opening[1]) > max_depth and \
            nested_deeper(value, max_depth):
        raise ParseError(_too_deep(max_depth))
    return value


def toml_loads(text: str, max_depth: int = MAX_DEPTH) -> dict:
    """Parse a TOML document; ParseError (its message says where) on any problem."""
    import tomllib  # measured: 2 ms, which `yoi pod send` to a live Pod does not need
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        raise ParseError(_too_deep(max_depth)) from None
    except tomllib.TOMLDecodeError as e:
        raise ParseError(str(e)) from None
    except ValueError:
        raise ParseError(_too_long()) from None
    # Every level below the top is opened by a "[", a "{" or, in a key, a "." (dotted
    # keys and table headers nest tables without a bracket): a text with fewer of
    # them than the limit cannot nest that deep, and most files skip the walk.
    if (text.count("[") + text.count("{") + text.count(".") >= max_depth
            and nested_deeper(doc, max_depth)):
        raise ParseError(_too_deep(max_depth))
    return doc


@contextmanager
def paused_gc():
    """No cyclic garbage collection while many parsed documents pile up.

    Parsed JSON and TOML hold no reference cycles, so collecting finds nothing,
    yet each collection walks every object kept so far: reading 10,000 Pod
    records spent a fifth of its time there, and more the more records.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def nested_deeper(value, limit: int) -> bool:
    """Whether VALUE has more than LIMIT dicts/lists inside one another (no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _too_deep(limit: int) -> str:
    return f"nested deeper than {limit} levels"


def _too_long() -> str:
    # The only other ValueError these parsers raise: int() refusing a number
    # too long to convert in reasonable time.
    return f"an integer of more than {sys.get_int_max_str_digits()} digits"
