"""``pods/NAME/pod.log``: a detached Pod's own output, rotated by size.

A detached Pod's stdout and stderr go to ``pod.log`` (opened by ``yoi pod
start``). When it grows over ``MAX_BYTES`` -- checked at start and, by the
Pod itself, while it runs -- it becomes ``pod.log.1``, the older ones move
up to ``pod.log.KEEP``, and the oldest is dropped: at most
``(KEEP + 1) * MAX_BYTES`` bytes, plus one write, in all.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_BYTES = 4 << 20
KEEP = 3


def open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600)


def rotate_and_open(path: Path, keep: int = KEEP) -> int:
    """Shift PATH to PATH.1 (PATH.1 to PATH.2 ... dropping PATH.KEEP); open a new PATH."""
    for i in range(keep - 1, 0, -1):
        try:
            os.replace(f"{path}.{i}", f"{path}.{i + 1}")
        except FileNotFoundError:
            pass
    try:
        os.replace(path, f"{path}.1")
    except FileNotFoundError:
        pass
    return open_append(path)


def open_for_start(path: Path) -> int:
    """Open PATH for a starting Pod, rotating it first if it is over ``MAX_BYTES``."""
    try:
        if os.stat(path).st_size > MAX_BYTES:
            return rotate_and_open(path)
    except FileNotFoundError:
        pass
    return open_append(path)
