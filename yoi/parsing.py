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
once per level too. So is JSON that Python reads but we could never write
back as strict JSON in UTF-8: ``NaN``, ``Infinity`` and numbers too large for
a float (``1e999``), which other parsers (the original's, a browser's) refuse,
and a string with an unpaired surrogate escape (``"\\ud800"``), which is no
text at all.
"""

from __future__ import annotations

import gc
import math
import re
import sys
from contextlib import contextmanager

MAX_DEPTH = 64  # containers inside one another in a state file or a method line


class ParseError(ValueError):
    """Text that does not parse, or parses into something nested too deeply."""


def _constant(name: str):
    raise ParseError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ParseError(f"number {text[:40]} is out of range")
    return value


# An escape of half a surrogate pair; json pairs the halves that belong together.
_SURROGATE = {bytes: re.compile(rb"\\u[dD][89a-fA-F]"), str: re.compile(r"\\u[dD][89a-fA-F]")}

_decode = None  # what json.loads uses, made once: with the two checks above


def json_loads(data: bytes | str, max_depth: int = MAX_DEPTH):
    """Parse one JSON text; ParseError for anything that is not a value we accept."""
    import json  # measured: 1.2 ms that commands reading only TOML (peer register) skip
    global _decode
    if _decode is None:
        _decode = json.JSONDecoder(parse_constant=_constant, parse_float=_finite).decode
    try:
        if isinstance(data, (bytes, bytearray)):
            # UTF-8 only, strictly: also no surrogate encoded as bytes (json.loads
            # would let them through as "surrogatepass")
            value = _decode(bytes(data).decode("utf-8"))
        else:
            value = _decode(data)
    except ParseError:
        raise
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
    if ("\\u" in data if isinstance(data, str) else b"\\u" in data) and \
            _SURROGATE[str if isinstance(data, str) else bytes].search(data) and \
            _has_lone_surrogate(value):
        raise ParseError("a string holds an unpaired surrogate (\\ud800-\\udfff): not text")
    return value


def _has_lone_surrogate(value) -> bool:
    """Whether a string (or key) in VALUE cannot be written as UTF-8 (no recursion)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


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
