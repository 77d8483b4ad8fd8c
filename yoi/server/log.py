"""The Pod process's own diagnostics: timestamped lines on stderr (pod.log when detached).

Everything the Pod writes about itself, and the part of its handlers' stderr
it keeps, goes through here, from any thread. When stderr is the Pod's
``pod.log`` (a detached Pod), the file is rotated by size while the Pod
runs (``yoi.podlog``), so it stays bounded however long the Pod lives.
Nothing here ever raises: a full disk must not take the Pod down.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from yoi import podlog

_lock = threading.Lock()
_rotating: "_Rotation | None" = None


class _Rotation:
    __slots__ = ("path", "max_bytes", "keep", "size")

    def __init__(self, path: Path, max_bytes: int, keep: int, size: int):
        self.path, self.max_bytes, self.keep, self.size = path, max_bytes, keep, size


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def log(msg: str) -> None:
    write_raw(f"{now_iso()} {msg}\n".encode("utf-8", "replace"))


def write_raw(data: bytes) -> None:
    """Append DATA to the Pod's log as it is (e.g. a handler's stderr)."""
    if not data:
        return
    with _lock:
        try:
            sys.stderr.flush()  # what Python itself wrote there (a thread's traceback) first
            view = memoryview(data)
            while view:
                view = view[os.write(2, view):]
        except (OSError, ValueError):
            return  # a full disk or a closed stderr: the Pod goes on without its diagnostics
        rot = _rotating
        if rot is not None:
            rot.size += len(data)
            if rot.size > rot.max_bytes:
                _rotate(rot)


def rotate_by_size(path: Path, max_bytes: int = podlog.MAX_BYTES,
                   keep: int = podlog.KEEP) -> bool:
    """Rotate PATH while the process runs, if it is this process's stderr (and stdout).

    Returns whether it is: a Pod in the foreground logs wherever its
    supervisor points stderr, and that is not ours to rotate.
    """
    global _rotating
    try:
        st = os.fstat(2)
        if not os.path.samestat(st, os.stat(path)):
            return False
    except OSError:
        return False
    with _lock:
        _rotating = _Rotation(path, max_bytes, keep, st.st_size)
        if st.st_size > max_bytes:
            _rotate(_rotating)
    return True


def _rotate(rot: _Rotation) -> None:
    """Move the log aside and point stdout and stderr at a fresh one (lock held)."""
    try:
        rot.size = os.fstat(2).st_size  # what others wrote counts too
        if rot.size <= rot.max_bytes:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        fd = podlog.rotate_and_open(rot.path, rot.keep)
    except (OSError, ValueError):
        rot.size = 0  # try again after another MAX_BYTES
        return
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    rot.size = 0
