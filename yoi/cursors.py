"""Output cursors: how far a reader has read a Pod's log, kept between reads.

A cursor is ``pods/NAME/cursors/READER``: ``{"seq": N}``, the seq of the last
entry READER was given, replaced atomically (temp file, fsync, rename). A
reader that reads "what is new" (``yoi pod log NAME --as READER --new``)
holds ``cursors/.READER.lock`` from reading the cursor to advancing it, so
two readers at once are given disjoint entries, and advances it only past
entries it has written out whole (``advance``): an entry is never skipped.
Seqs are never reused, so a cursor stays right whatever the Pod does
meanwhile (restarts, crashes, a torn last line set aside).

A cursor whose name starts with a dot is not a reader's (no Pod name does):
``.parent`` is the parent Pod's, how far it has read the log for its
notices (``yoi.server.children``); it also names the spawn it belongs to
(``spawn_id``), so a cursor left by a watch of an earlier child of the same
name is never applied to a new one.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from yoi.atomic import TMP_MARK, atomic_write, read_bytes_nofollow
from yoi.errors import CorruptMetadata, StorageError
from yoi.lock import FileLock
from yoi.state import State, refuse_symlink


def cursor_dir(state: State, name: str) -> Path:
    return state.pod_dir(name) / "cursors"


def load(state: State, name: str, reader: str, spawn_id: str | None = None) -> int | None:
    """READER's cursor on NAME's log (None: it has read nothing yet, or, given SPAWN_ID,
    the cursor is of another spawn); CorruptMetadata naming the file if it is not a
    cursor."""
    path = cursor_dir(state, name) / reader
    try:
        raw = read_bytes_nofollow(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror or e}", path=str(path))
    try:
        doc = json.loads(raw)
        seq = doc["seq"]
    except (ValueError, TypeError, KeyError):
        doc, seq = {}, None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise CorruptMetadata(f"{path}: not a cursor ({{\"seq\": N}}); remove it to read "
                              "from the start", path=str(path))
    if spawn_id is not None and doc.get("spawn_id") != spawn_id:
        return None  # left by a watch of an earlier child of this name
    return seq


def store(state: State, name: str, reader: str, seq: int, spawn_id: str | None = None) -> None:
    """Set READER's cursor on NAME's log to SEQ (of spawn SPAWN_ID, if given), durably."""
    doc = {"seq": seq} if spawn_id is None else {"seq": seq, "spawn_id": spawn_id}
    atomic_write(_ensure_dir(state, name) / reader, json.dumps(doc).encode() + b"\n")


def _ensure_dir(state: State, name: str) -> Path:
    """NAME's cursor directory, made (0700) if need be, but never NAME's directory: a
    Pod removed meanwhile is not brought back (FileNotFoundError)."""
    d = cursor_dir(state, name)
    refuse_symlink(d, "cursor directory")
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    return d


@contextmanager
def held(state: State, name: str, reader: str):
    """Hold READER's cursor lock on NAME's log (Busy after the lock timeout)."""
    d = _ensure_dir(state, name)
    with FileLock(d / f".{reader}.lock", state.lock_timeout,
                  label=f"{reader}'s cursor on {name}"):
        for entry in os.listdir(d):  # READER's writers that died: none is at work now
            if entry.startswith(f".{reader}{TMP_MARK}"):
                try:
                    os.unlink(d / entry)
                except FileNotFoundError:
                    pass
        yield


class Reading:
    """What READER has not read of NAME's log, read under its cursor lock: ``after``
    (the cursor), then each entry ``advance``d past once it was written out."""

    def __init__(self, state: State, name: str, reader: str):
        self.state, self.name, self.reader = state, name, reader
        self.after = load(state, name, reader)
        self.last = self.after

    def advance(self, seq: int) -> None:
        """The entry SEQ was written out whole."""
        self.last = seq

    def save(self) -> bool:
        """Record how far it got; False if there was nothing to record."""
        if self.last is None or self.last == self.after:
            return False
        store(self.state, self.name, self.reader, self.last)
        return True
