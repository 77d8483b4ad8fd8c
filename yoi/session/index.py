"""The id index of a session log: which committed entry carries a message id.

A Pod commits a message id at most once, so before committing it looks the
id up here. The index lives on disk (``pods/NAME/session.index``, SQLite in
WAL mode), so a Pod's memory and start time do not grow with its history.

It is a cache of the log, never the truth: it records the ids of the lines
before ``end`` (an offset of the log), and the writer adds a batch's ids
only after the batch is durable in the log. So after any crash the index
lags the log, never leads it, and recovery indexes the lines from ``end`` to
the end of the log: only the tail written since the index last caught up.
An index that does not belong to the log (another inode, an ``end`` beyond
the log or not at a line start) or cannot be read is rebuilt from the log.
Something else in its place (a symlink, a directory) is never followed or
removed: the Pod refuses to start, naming it (``yoi doctor`` reports it too).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import zlib
from pathlib import Path

from yoi.atomic import not_a_file
from yoi.errors import Failed

# 2: a notification's handler run is indexed too (``session.HANDLED_PREFIX``); an
# index of schema 1 is rebuilt from the log, which files the runs already there.
SCHEMA = 2
LOOKUP_BATCH = 500  # ids per query (SQLite limits the parameters of one statement)
_FILES = ("", "-wal", "-shm")


TAIL_CHECK = 4096  # bytes before the covered end whose checksum is kept


def tail_check(fd: int, end: int) -> int:
    """A checksum of the TAIL_CHECK bytes of the log before END: an index is trusted
    only if the log still has them (a file's inode can be reused by another one)."""
    start = max(0, end - TAIL_CHECK)
    return zlib.crc32(os.pread(fd, end - start, start))


class IdIndex:
    """SQLite table id -> (offset, length), plus the log offset it covers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()  # the writer thread adds, the loop thread looks up
        self.db: sqlite3.Connection | None = None

    def open(self) -> None:
        self._check_files()
        try:
            self._connect()
        except sqlite3.DatabaseError:
            self.close()
            self.remove()
            self._connect()

    def _check_files(self) -> None:
        """Refuse an index file (or its -wal, -shm) that is not a regular file."""
        for suffix in _FILES:
            path = f"{self.path}{suffix}"
            what = not_a_file(path)
            if what is not None:
                raise Failed(f"{path} is {what}, not the Pod's id index (never followed); "
                             "remove it: the index is rebuilt from the session log")

    def _connect(self) -> None:
        # Created 0600 here: SQLite gives its -wal and -shm files the same mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600))
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # the log is durable; this only lags
        db.execute("PRAGMA cache_size=-256")  # KiB: lookups are rare (retries only)
        db.execute("CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY, offset INTEGER, "
                   "length INTEGER) WITHOUT ROWID")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA,))
        elif row[0] != SCHEMA:
            raise sqlite3.DatabaseError(f"index schema {row[0]}, expected {SCHEMA}")

    def covers(self) -> tuple[int, int, int]:
        """(end, inode, check): the log offset indexed up to, the log it belongs to, and
        the checksum of the bytes just before END (see ``tail_check``)."""
        with self.lock:
            rows = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        return rows.get("end", 0), rows.get("inode", -1), rows.get("check", 0)

    def reset(self, inode: int) -> None:
        """Forget everything: the index now covers nothing of the log INODE."""
        with self.lock:
            db = self.db
            db.execute("BEGIN")
            db.execute("DELETE FROM ids")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('end', 0), ('inode', ?), "
                       "('check', 0)", (inode,))
            db.execute("COMMIT")

    def add(self, rows: list[tuple[str, int, int]], end: int, check: int) -> None:
        """Record ROWS (id, offset, length) and that the log is indexed up to END, where
        the bytes before END have the checksum CHECK.

        The first occurrence of an id wins, as it does for the Pod.
        """
        with self.lock:
            db = self.db
            db.execute("BEGIN")
            try:
                if rows:
                    db.executemany("INSERT OR IGNORE INTO ids VALUES (?, ?, ?)", rows)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('end', ?), ('check', ?)",
                           (end, check))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def lookup(self, ids: list[str]) -> dict[str, tuple[int, int]]:
        """Where the entries with IDS are (id -> (offset, length)), for those indexed."""
        out: dict[str, tuple[int, int]] = {}
        with self.lock:
            for k in range(0, len(ids), LOOKUP_BATCH):
                part = ids[k:k + LOOKUP_BATCH]
                query = ("SELECT id, offset, length FROM ids WHERE id IN (%s)"
                         % ",".join("?" * len(part)))
                for msg_id, offset, length in self.db.execute(query, part):
                    out[msg_id] = (offset, length)
        return out

    def get(self, msg_id: str) -> tuple[int, int] | None:
        with self.lock:
            return self.db.execute("SELECT offset, length FROM ids WHERE id = ?",
                                   (msg_id,)).fetchone()

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None

    def remove(self) -> None:
        for suffix in _FILES:
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass
