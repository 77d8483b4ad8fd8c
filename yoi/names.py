"""Pod names: they become file and socket names, so the alphabet is narrow."""

from __future__ import annotations

import re

from yoi.errors import UsageError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_RE = re.compile(NAME_PATTERN + r"\Z", re.ASCII)
# The message ids a parent Pod gives its notices about its children: no client's.
NOTICE_PREFIX = "child:"


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.match(name) is not None


def check_name(name: object, what: str = "Pod name") -> str:
    """Return NAME if valid, else raise UsageError (exit 2)."""
    if not is_valid_name(name):
        raise UsageError(
            f"invalid {what} {name!r}: use 1-64 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name  # type: ignore[return-value]
