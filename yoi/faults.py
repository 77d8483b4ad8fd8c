"""Fault injection: a testing aid for crash and I/O-error paths.

Set ``YOI_FAULT`` to one or more comma-separated ``POINT:ACTION[:N]`` rules:

* ``POINT`` names a step, e.g. ``after-lock``, ``after-journal``,
  ``before-write-2``, ``after-write-1``, ``before-journal-remove``,
  ``after-journal-remove``, ``recovery-after-write-1``,
  ``atomic-before-replace`` (see ``yoi.txn`` for the full list, in order);
* ``ACTION`` is ``crash`` (the process dies at once with ``os._exit(137)``, no
  cleanup, like SIGKILL) or ``eio`` (an ``OSError(EIO)`` is raised there);
* ``N`` (default 1) fires on the Nth time the point is reached in this process.

Example: ``YOI_FAULT=atomic-before-replace:eio:3 yoi pod peer register a b``
fails the third atomic write (the second Pod's file) and must leave both Pods
as they were. ``tests/test_peers_faults.py`` walks every point.

The variable is read once, at import; when it is unset ``fault()`` returns at
its first test. Never set it outside tests and benchmarks.
"""

from __future__ import annotations

import errno
import os

_rules: dict[str, tuple[str, int]] = {}
_hits: dict[str, int] = {}


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    rules = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        bits = part.split(":")
        if len(bits) not in (2, 3) or bits[1] not in ("crash", "eio"):
            raise ValueError(f"bad YOI_FAULT rule {part!r}: want POINT:crash|eio[:N]")
        rules[bits[0]] = (bits[1], int(bits[2]) if len(bits) == 3 else 1)
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
