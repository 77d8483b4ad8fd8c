"""Fault injection: a testing aid for crash and I/O-error paths.

Set ``YOI_FAULT`` to one or more comma-separated ``POINT:ACTION[:N]`` rules:

* ``POINT`` names a step, e.g. ``after-lock``, ``after-journal``,
  ``before-write-2``, ``after-write-1``, ``before-journal-remove``,
  ``after-journal-remove``, ``recovery-after-write-1``,
  ``atomic-before-replace`` (see ``yoi.txn`` for the full list, in order),
  ``handle-line`` (a Pod handling a method line);
* ``ACTION`` is ``crash`` (the process dies at once with ``os._exit(137)``, no
  cleanup, like SIGKILL) or ``eio`` (an ``OSError(EIO)`` is raised there);
* ``N`` (default 1) fires on the Nth time the point is reached in this process.

Example: ``YOI_FAULT=atomic-before-replace:eio:3 yoi pod peer register a b``
fails the third atomic write (the second Pod's file) and must leave both Pods
as they were. ``tests/test_peers_faults.py`` walks every point.

The variable is read once, at import; when it is unset ``fault()`` returns at
its first test. A malformed value makes the import raise ``UsageError``, so a
command fails with one line and exit 2 instead of silently running without
the fault a test asked for. Never set it outside tests and benchmarks.
"""

from __future__ import annotations

import errno
import os

from yoi.errors import UsageError

_rules: dict[str, tuple[str, int]] = {}
_hits: dict[str, int] = {}


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    """The rules of SPEC; a malformed one is a usage error (exit 2), never ignored."""
    rules = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        bits = part.split(":")
        nth = bits[2] if len(bits) == 3 else "1"
        if (len(bits) not in (2, 3) or not bits[0] or bits[1] not in ("crash", "eio")
                or not (nth.isascii() and nth.isdigit() and int(nth) >= 1)):
            raise UsageError(f"bad YOI_FAULT rule {part!r}: want POINT:crash|eio[:N] "
                             "with N >= 1 (YOI_FAULT is a testing aid: unset it)")
        rules[bits[0]] = (bits[1], int(nth))
    return rules


_rules = _parse(os.environ.get("YOI_FAULT", ""))


def fault(point: str) -> None:
    """Fire the fault configured for POINT, if any."""
    if not _rules:
        return
    rule = _rules.get(point)
    if rule is None:
        return
    action, nth = rule
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != nth:
        return
    if action == "crash":
        os._exit(137)
    raise OSError(errno.EIO, f"injected I/O error at {point}")
