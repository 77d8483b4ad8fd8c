"""Metadata locks: ``fcntl.flock`` on ``STATE/locks/NAME.lock`` with a timeout.

The holder writes its pid into the lock file so that a waiter that times out
can name it. flock locks belong to the open file description, so two threads
of one process that each open the file also exclude each other, and a process
that dies (even by SIGKILL) releases its locks.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from yoi.errors import Busy


RUNTIME_LOCK_GRACE = 2.0  # seconds a runtime-lock taker waits out a momentary looker


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _flock_until(fd: int, deadline: float) -> bool:
    """Take FD's exclusive flock, polling until DEADLINE; False if it stayed taken."""
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)


def try_lock(path: Path, grace: float = 0.0) -> int | None:
    """Take PATH's flock without waiting (or for at most GRACE seconds): the open
    descriptor (close it to release), or None if another open file description
    holds it.

    Commands that only look (``is_locked``: status, list, doctor) hold a lock
    for an instant; a GRACE lets a taker that must not be fooled by them
    (a Pod starting, a Pod being removed) tell them from a real holder.
    """
    fd = _open(path)
    try:
        if _flock_until(fd, time.monotonic() + grace):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def write_pid(fd: int) -> None:
    """Record our pid in a lock we hold, so that a waiter can name us.

    Never raises: the pid only names the holder, and failing here (a full
    disk) would leave a flock held by a descriptor nobody can release.
    """
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass


class FileLock:
    """A metadata lock: wait up to TIMEOUT seconds, else Busy naming the holder's pid."""

    def __init__(self, path: Path, timeout: float, label: str | None = None):
        self.path = path
        self.timeout = timeout
        self.label = label or path.name
        self.fd: int | None = None

    def acquire(self) -> "FileLock":
        fd = try_lock(self.path, self.timeout)
        if fd is None:
            holder = lock_holder_pid(self.path)
            who = f"pid {holder}" if holder else "another process"
            raise Busy(f"{self.label} is locked by {who} (waited {self.timeout:g}s)",
                       holder_pid=holder)
        write_pid(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(raw) if raw else None
    except (OSError, ValueError):
        return None


@contextmanager
def if_free(path: Path) -> Iterator[bool]:
    """Hold PATH's lock inside the block if nobody holds it; yield whether we do.

    For a repair that must not run beside a live Pod (its runtime lock).
    """
    fd = try_lock(path)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def is_locked(path: Path) -> bool | None:
    """True if someone holds PATH's flock, False if not, None if it does not exist.

    Takes the lock for an instant when it is free: use it only for diagnosis.
    """
    try:  # never waiting on a FIFO put in its place
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_holder_pid(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)
