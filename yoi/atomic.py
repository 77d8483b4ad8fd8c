"""Atomic replace: a reader sees the old file or the new one, never a torn one.

Temp files are named ``.BASENAME.tmp-RANDOM`` in the target's directory, so a
leftover one from a killed writer is recognisable (``yoi doctor`` removes them).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from yoi.faults import fault

TMP_MARK = ".tmp-"


class NotRegularFile(OSError):
    """Something other than a regular file (a FIFO, a device) where one should be."""


def temp_name_for(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.urandom(6).hex()}")


def is_temp_name(filename: str) -> bool:
    return filename.startswith(".") and TMP_MARK in filename


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of DATA is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write DATA to PATH via temp file + fsync + rename + directory fsync.

    An OSError names the file it concerns (PATH, or its directory), also where
    the system call itself names none (a write or an fsync on a full disk).
    """
    tmp = stage(path, data, mode)
    try:
        sync_files({tmp: path})
    except BaseException:
        discard(tmp)
        raise
    replace_staged(tmp, path)
    sync_parents([path])


def stage(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write DATA to a new temp file beside PATH (not synced: ``sync_files``) and
    return its path; ``replace_staged`` puts it in PATH's place. Several files
    staged, synced one after the other and then renamed cost one wait for the
    disk, not one each, and a reader still sees each old file or its new one,
    also after a power cut."""
    tmp = temp_name_for(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
    except OSError as e:
        raise _naming(e, path)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
    except BaseException as e:
        discard(tmp)
        raise _naming(e, path) if isinstance(e, OSError) else e
    return tmp


def replace_staged(tmp: Path, path: Path) -> None:
    """Rename the staged (and synced) TMP to PATH; TMP is gone afterwards either way."""
    try:
        fault("atomic-before-replace")
        os.replace(tmp, path)
    except BaseException as e:
        discard(tmp)
        raise _naming(e, path) if isinstance(e, OSError) else e


def discard(tmp: Path) -> None:
    """Remove a staged temp file that will not be used (gone already is fine)."""
    try:
        os.unlink(tmp)
    except OSError:
        pass


def sync_files(files: dict[Path, Path]) -> None:
    """fsync each file's data (FILES: temp file -> the file it stands for, which an
    error names), one after the other: the first waits for the disk, the others
    find their data on its way."""
    for path, named in files.items():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _naming(e, named)


def sync_parents(paths: list[Path]) -> None:
    """fsync the directories holding PATHS (each once): their renames are durable."""
    for parent in dict.fromkeys(p.parent for p in paths):
        try:
            fsync_dir(parent)
        except OSError as e:
            raise _naming(e, parent)


def _naming(e: OSError, path: Path) -> OSError:
    """E, naming PATH (rather than a temp file, or nothing)."""
    e.filename = str(path)
    e.filename2 = None
    return e


def not_a_file(path: Path | str) -> str | None:
    """What is at PATH if it is not a regular file (``a symlink``, ``a directory``,
    ``not a regular file``); None for a regular file or nothing (lstat: not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    return ("a symlink" if stat.S_ISLNK(mode) else
            "a directory" if stat.S_ISDIR(mode) else "not a regular file")


def open_regular(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """A descriptor of the regular file at PATH (FLAGS: how to open it), found without
    blocking on anything else: never through a symlink (ELOOP); a directory is
    IsADirectoryError, anything else that is no regular file NotRegularFile. The
    descriptor is non-blocking, which a regular file ignores."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    try:
        st_mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes_nofollow(path: Path) -> bytes:
    """Read a whole regular file (``open_regular``'s refusals)."""
    fd = open_regular(path)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def remove_temp_files(directory: Path) -> list[Path]:
    """Remove leftover temp files in DIRECTORY; only call it under the owning lock."""
    removed = []
    try:
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):  # no Pod there: nothing of ours
        return removed
    for entry in entries:
        if is_temp_name(entry):
            p = directory / entry
            try:
                os.unlink(p)
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed
