"""The writer side of a session log: one per Pod process, which holds the runtime lock.

Appends go through one writer thread. Everything submitted while the previous
batch was being written is written with one ``write`` and made durable with
one ``fsync`` (group commit). Each entry gets its ``seq`` in that order; its
submitter is told where it landed only after the fsync, and after its id is
in the index (``yoi.session.index``), so a retry of the same id always finds
it. The writer is also where an id is committed at most once: the ids of a
batch are looked up (one query) before it is written, and an entry whose id
was committed before, or earlier in the same batch, is not written again;
its submitter is told where the first one is (``Committed.duplicate``). A
failed write is truncated away (its ``seq`` numbers were never committed and
are used again) and reported to every submitter of the batch.

Opening recovers from whatever a crash left:

* a last line without its newline: if it is a whole entry (the crash came
  between its last byte and its newline) it is kept and ended; otherwise the
  fragment is moved aside into ``session.jsonl.torn-TIME`` (never deleted)
  and cut off. Either way every entry the log keeps is indexed below, so an
  id is never committed twice;
* a log of the format before sequence numbers is converted once;
* the index catches up with the log: the lines after the offset it covers.

Fault-injection points (``yoi.faults``): ``session-mid-write`` (between the
two halves of a batch's write), ``session-before-fsync``,
``session-before-index`` (durable in the log, not yet indexed).
"""

from __future__ import annotations

import calendar
import errno
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

from yoi import protocol
from yoi.atomic import fsync_dir, not_a_file, open_regular, write_all
from yoi.faults import fault
from yoi.session import (READ_CHUNK, Entry, Recent, entry_id, index_key, last_seq, line_seq,
                         parse_entry, set_aside_torn_tail, snapshot_line, tail)
from yoi.session.index import IdIndex, tail_check

INDEX_BATCH = 10_000  # rows per index transaction while catching up
MIGRATING = ".migrating"


class Committed:
    """Where a committed line lives in the file (length includes the newline), its seq;
    ``duplicate``: the entry was not written, since this line (committed before) has
    its id."""

    __slots__ = ("offset", "length", "seq", "duplicate")

    def __init__(self, offset: int, length: int, seq: int, duplicate: bool = False):
        self.offset, self.length, self.seq = offset, length, seq
        self.duplicate = duplicate

    @property
    def end(self) -> int:
        return self.offset + self.length


Done = Callable[[Committed | None, OSError | None], None]


class SessionLog:
    def __init__(self, path: Path, index_path: Path,
                 on_problem: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.index = IdIndex(index_path)
        self.on_problem = on_problem or (lambda message: None)
        self.recent = Recent()  # the last entries, as opened
        self.size = 0
        self.seq = 0                # the last seq committed
        self._fd: int | None = None
        self._rfd: int | None = None
        self._queue: list[tuple[Entry, Done]] = []
        self._unindexed: dict[str, tuple[int, int]] = {}  # while the index cannot be written
        self._broken: OSError | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- opening ------------------------------------------------------------------
    def open(self) -> list[str]:
        """Recover (see the module docstring), then start the writer; the problems found."""
        problems: list[str] = []
        _remove_quiet(self.path.with_name(self.path.name + MIGRATING))
        if not_a_file(self.path) not in (None, "a symlink"):  # a symlink: ELOOP below
            raise OSError(errno.EINVAL, f"the session log is {not_a_file(self.path)}",
                          str(self.path))
        self._fd = open_regular(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.set_blocking(self._fd, True)
        self._settle_torn_tail(problems)
        if _needs_migration(self.path):
            self._migrate(problems)
        self._rfd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        self.seq = last_seq(self.path, self.size)
        for line in tail(self.path, protocol.SNAPSHOT_ENTRIES, self.size):
            entry = parse_entry(line)
            if entry is not None:
                self.recent.append(snapshot_line(line, entry), entry["kind"])
        self._catch_up_index(problems)
        self._thread = threading.Thread(target=self._writer, name="session-writer",
                                        daemon=True)
        self._thread.start()
        return problems

    def _settle_torn_tail(self, problems: list[str]) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0 or _pread(self.path, 1, size - 1) == b"\n":
            return
        start = _line_start_before(self.path, size)
        fragment = _pread(self.path, size - start, start)
        if line_seq(fragment) is not None and parse_entry(fragment) is not None:
            # A whole entry: only its newline is missing. Keep it (and index it below).
            write_all(self._fd, b"\n")
            os.fsync(self._fd)
            problems.append(f"{self.path}: the last entry had no newline (a crash during an "
                            "append); it is kept")
            return
        moved = set_aside_torn_tail(self.path)
        problems.append(f"{self.path} ended with a torn line ({size - start} bytes, from a "
                        f"crash during an append); it was moved to {moved}")

    def _migrate(self, problems: list[str]) -> None:
        """Rewrite a log of the format before sequence numbers, atomically."""
        tmp = self.path.with_name(self.path.name + MIGRATING)
        count = 0
        # An old entry without a time (only notifications had one) gets the time of
        # the last one before it that had, or else the log's last change.
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.stat(self.path).st_mtime))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            out = []
            for line in _lines(self.path):
                obj = parse_entry(line)
                if obj is not None and obj.get("seq") is None:
                    count += 1
                    at = obj["at"] if isinstance(obj.get("at"), str) else at
                    line = _legacy_entry(obj, at).line(count).rstrip(b"\n")
                out.append(line + b"\n")
                if len(out) >= 4096:
                    write_all(fd, b"".join(out))
                    out.clear()
            write_all(fd, b"".join(out))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        problems.append(f"{self.path}: converted {count} entries of the format before sequence "
                        "numbers")

    def _catch_up_index(self, problems: list[str]) -> None:
        index = self.index
        index.open()
        end, inode, check = index.covers()
        ino = os.fstat(self._rfd).st_ino
        if (inode != ino or end > self.size
                or (end > 0 and os.pread(self._rfd, 1, end - 1) != b"\n")
                or tail_check(self._rfd, end) != check):
            index.reset(ino)
            end = 0
        rows: list[tuple[str, int, int]] = []
        unreadable = 0
        for line, offset in _lines_at(self._rfd, end, self.size):
            if b'"id"' in line or b'"delivery_rejected"' in line:
                obj = parse_entry(line)
                msg_id = index_key(obj) if obj is not None else None
                if msg_id is not None:
                    rows.append((msg_id, offset, len(line) + 1))
                elif obj is None:
                    unreadable += 1
            elif line.strip() and parse_entry(line) is None:
                unreadable += 1
            if len(rows) >= INDEX_BATCH:
                upto = offset + len(line) + 1
                index.add(rows, upto, tail_check(self._rfd, upto))
                rows = []
        index.add(rows, self.size, tail_check(self._rfd, self.size))
        if unreadable:
            problems.append(f"{self.path}: skipped {unreadable} line(s) that are not entries "
                            "(kept in the log)")

    # -- looking up ------------------------------------------------------------------
    def committed_line(self, msg_id: str) -> bytes | None:
        """The committed line (with newline) of the entry with MSG_ID, if any."""
        where = self.lookup(msg_id)
        return None if where is None else self.read(where)

    def committed_at(self, msg_id: str) -> tuple[Committed, bytes] | None:
        """Where the entry with MSG_ID is committed, and its line (with newline), if it is."""
        where = self.lookup(msg_id)
        return None if where is None else (where, self.read(where))

    def lookup(self, msg_id: str) -> Committed | None:
        """Where the entry with MSG_ID (an index key: a message id, or one of
        ``session.index_key``'s) was committed (``duplicate``: an entry with it would
        not be written again), if it was."""
        with self._cond:
            where = self._unindexed.get(msg_id)
        if where is None:
            where = self.index.get(msg_id)
        return None if where is None else self._earlier(*where)

    def lookup_many(self, keys: list[str]) -> dict[str, Committed]:
        """``lookup`` of each of KEYS (those committed), with one index query per
        ``index.LOOKUP_BATCH`` keys: for a reader of many ids at once (a queue's drain)."""
        with self._cond:
            known = {k: self._unindexed[k] for k in keys if k in self._unindexed}
        known.update(self.index.lookup([k for k in keys if k not in known]))
        return {k: self._earlier(*where) for k, where in known.items()}

    def _earlier(self, offset: int, length: int) -> Committed:
        seq = line_seq(os.pread(self._rfd, min(length, 64), offset))
        return Committed(offset, length, seq or 0, duplicate=True)

    def read(self, entry: Committed) -> bytes:
        """The committed line at ENTRY (any thread)."""
        return os.pread(self._rfd, entry.length, entry.offset)

    # -- appending ---------------------------------------------------------------------
    def submit(self, entry: Entry, done: Done) -> None:
        """Queue ENTRY; DONE(committed, error) runs after its fsync, on the writer
        thread, in submission order."""
        with self._cond:
            if self._closing:
                raise OSError("the session log is closed")
            if self._broken is not None:
                raise self._broken
            self._queue.append((entry, done))
            self._cond.notify()

    def append(self, entry: Entry, done: Done | None = None) -> Committed:
        """Submit ENTRY and wait until it is durable; raise OSError on failure."""
        ev = threading.Event()
        box: list = []

        def finished(res, err):
            if done is not None:
                done(res, err)
            box.append((res, err))
            ev.set()

        self.submit(entry, finished)
        ev.wait()
        res, err = box[0]
        if err is not None:
            raise err
        return res

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                batch, self._queue = self._queue, []
            if not batch:
                return
            batch = [(entry, _Once(done)) for entry, done in batch]
            try:
                self._write_batch(batch)
            except BaseException as e:  # a bug, MemoryError: never die silently
                self._give_up(batch, e)
                return
            batch = None  # do not keep the last batch alive while waiting for the next

    def _give_up(self, batch: list[tuple[Entry, Done]], exc: BaseException) -> None:
        """The writer failed unexpectedly: take no more entries, and answer every entry
        not answered yet with an error (what was durable already stays in the log,
        and a retry with the same id after a restart is answered as a duplicate)."""
        why = f"the session log writer failed ({type(exc).__name__}: {exc}); restart the Pod"
        broken = OSError(why)
        with self._cond:
            self._broken = broken
            waiting, self._queue = self._queue, []
        self.on_problem(f"{self.path}: {why}; no more entries are accepted")
        for answers, err in ((batch, Uncertain(why)), (waiting, broken)):
            for _, done in answers:
                try:
                    done(None, err)
                except Exception:
                    pass  # its client is told by the Pod's own error handling, if at all

    def _write_batch(self, batch: list[tuple[Entry, Done]]) -> None:
        results, lookup_error = self._committed_before(batch)
        new: list[int] = []            # the entries to write, by their place in BATCH
        first: dict[str, int] = {}     # key -> the entry of this batch that commits it
        again: dict[int, int] = {}     # an entry -> the earlier entry of this batch with its key
        for k, (entry, _) in enumerate(batch):
            key = entry.key
            if key is not None:
                if k in results or lookup_error is not None:
                    continue
                if key in first:
                    again[k] = first[key]
                    continue
                first[key] = k
            new.append(k)
        start, seq = self.size, self.seq
        lines = [batch[k][0].line(seq + i) for i, k in enumerate(new, 1)]
        data = b"".join(lines)
        if data:
            try:
                half = len(data) // 2
                write_all(self._fd, data[:half])
                fault("session-mid-write")  # a crash here leaves a torn line
                write_all(self._fd, data[half:])
                fault("session-before-fsync")
                os.fsync(self._fd)
            except OSError as e:
                self._undo(start, e)
                for k, (_, done) in enumerate(batch):  # (ids committed before still are)
                    res = results.get(k)
                    done(res, None if res is not None else e)
                return
            self.size, self.seq = start + len(data), seq + len(new)
            rows, offset = [], start
            for i, (k, line) in enumerate(zip(new, lines), 1):
                results[k] = Committed(offset, len(line), seq + i)
                key = batch[k][0].key
                if key is not None:
                    rows.append((key, offset, len(line)))
                offset += len(line)
            fault("session-before-index")
            self._index(rows)
        for k, j in again.items():
            res = results[j]
            results[k] = Committed(res.offset, res.length, res.seq, duplicate=True)
        for k, (_, done) in enumerate(batch):
            res = results.get(k)
            done(res, None if res is not None else lookup_error)

    def _committed_before(self, batch: list[tuple[Entry, Done]]
                          ) -> tuple[dict[int, Committed], OSError | None]:
        """The entries of BATCH whose key (id) is committed already (their place in
        BATCH -> where, ``duplicate``), with one index query for the batch; or, if the
        index cannot be read, the error (the entries with a key then fail: writing
        them could commit an id twice)."""
        ids = [entry.key for entry, _ in batch if entry.key is not None]
        if not ids:
            return {}, None
        with self._cond:
            known = {i: self._unindexed[i] for i in ids if i in self._unindexed}
        try:
            known.update(self.index.lookup([i for i in ids if i not in known]))
        except (sqlite3.Error, OSError) as e:
            return {}, OSError(f"cannot look message ids up in {self.index.path}: {e}")
        found = {}
        for k, (entry, _) in enumerate(batch):
            where = known.get(entry.key) if entry.key is not None else None
            if where is not None:
                found[k] = self._earlier(*where)
        return found, None

    def _undo(self, start: int, err: OSError) -> None:
        """Cut a failed write away; if even that fails, take no more entries."""
        try:
            os.ftruncate(self._fd, start)
        except OSError as e:
            with self._cond:
                self._broken = e
            self.on_problem(f"could not cut a failed write out of {self.path} "
                            f"({e.strerror or e}); no more entries are accepted")

    def _index(self, rows: list[tuple[str, int, int]]) -> None:
        """Index a committed batch; on failure keep the ids in memory and retry later."""
        with self._cond:
            pending = list(self._unindexed.items())
        try:
            self.index.add([(i, o, n) for i, (o, n) in pending] + rows, self.size,
                           tail_check(self._rfd, self.size))
        except (sqlite3.Error, OSError) as e:
            with self._cond:
                for msg_id, offset, length in rows:
                    self._unindexed.setdefault(msg_id, (offset, length))
            self.on_problem(f"could not update the index of {self.path}: {e}; "
                            f"{len(self._unindexed)} id(s) are kept in memory")
            return
        if pending:
            with self._cond:
                for msg_id, _ in pending:
                    self._unindexed.pop(msg_id, None)

    def close(self) -> None:
        """Commit everything already submitted, stop the writer, close the files."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for fd in (self._fd, self._rfd):
            if fd is not None:
                os.close(fd)
        self._fd = self._rfd = None
        self.index.close()


# -- helpers -----------------------------------------------------------------------------

class Uncertain(OSError):
    """The writer failed while it wrote: the entry may or may not be in the log (its
    id is recorded at most once, so a retry after a restart is safe)."""


class _Once:
    """A DONE callback that runs at most once (the writer may give up half-way)."""

    __slots__ = ("done",)

    def __init__(self, done: Done):
        self.done: Done | None = done

    def __call__(self, res, err) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(res, err)


def _pread(path: Path, n: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def _line_start_before(path: Path, size: int) -> int:
    """The offset just after the last newline before SIZE (0 if none)."""
    pos = size
    while pos > 0:
        step = min(READ_CHUNK, pos)
        chunk = _pread(path, step, pos - step)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            return pos - step + nl + 1
        pos -= step
    return 0


def _lines_at(fd: int, start: int, stop: int):
    """(line without newline, its offset) for every whole line in [START, STOP)."""
    pos, rest, rest_at = start, b"", start
    while pos < stop:
        chunk = os.pread(fd, min(READ_CHUNK, stop - pos), pos)
        if not chunk:
            break
        pos += len(chunk)
        data = rest + chunk
        at = 0
        while True:
            nl = data.find(b"\n", at)
            if nl < 0:
                break
            yield data[at:nl], rest_at + at
            at = nl + 1
        rest, rest_at = data[at:], rest_at + at


def _lines(path: Path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for line, _ in _lines_at(fd, 0, os.fstat(fd).st_size):
            yield line
    finally:
        os.close(fd)


def _needs_migration(path: Path, look: int = 100) -> bool:
    """Whether the log's first entries are of the format before sequence numbers."""
    for i, line in enumerate(_lines(path)):
        if i >= look:
            return False
        obj = parse_entry(line)
        if obj is not None:
            return obj.get("seq") is None
    return False


def _legacy_entry(obj: dict, at: str) -> Entry:
    fields = {k: v for k, v in obj.items() if k not in ("seq", "kind", "id", "at")}
    return Entry(obj["kind"], fields, entry_id(obj), at=at, ts=_ms(at))


def _ms(at) -> int:
    try:
        return calendar.timegm(time.strptime(at, "%Y-%m-%dT%H:%M:%SZ")) * 1000
    except (TypeError, ValueError):
        return 0


def _remove_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
