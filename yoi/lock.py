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
from pathlib import Path

from yoi.errors import Busy


class FileLock:
    def __init__(self, path: Path, timeout: float, label: str | None = None):
        self.path = path
        self.timeout = timeout
        self.label = label or path.name
        self.fd: int | None = None

    def acquire(self) -> "FileLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    who = f"pid {holder}" if holder else "another process"
                    raise Busy(f"{self.label} is locked by {who} "
                               f"(waited {self.timeout:g}s)", holder_pid=holder)
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.05)
            except BaseException:
                os.close(fd)
                raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            # The pid only lets a waiter name the holder. Raising here would
            # leave the flock held by a descriptor nobody can release (for the
            # whole life of a Pod process) when the disk is full.
            pass
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


def try_lock(path: Path, grace: float = 0.0) -> int | None:
    """Take PATH's flock without waiting (or for at most GRACE seconds): the open
    descriptor (close it to release), or None if another open file description
    holds it.

    Commands that only look (``is_locked``: status, list, doctor) hold a lock
    for an instant; a GRACE lets a taker that must not be fooled by them
    (a Pod starting, a Pod being removed) tell them from a real holder.
    """
    deadline = time.monotonic() + grace
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.01)
    except BaseException:
        os.close(fd)
        raise


def is_locked(path: Path) -> bool | None:
    """True if someone holds PATH's flock, False if not, None if it does not exist.

    Takes the lock for an instant when it is free: use it only for diagnosis.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
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
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)
