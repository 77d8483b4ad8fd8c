"""The session log: ``pods/NAME/session.jsonl``, the Pod's replayable history.

One line per entry, and a line is exactly the event object the Pod broadcast
when it committed the entry (compact JSON, UTF-8), nothing added::

    {"event":"system_item","data":{"item":{"kind":"notification","message":M,"body":B,"source":S,"id":ID,"at":"2026-...Z"}}}
    {"event":"user_message","data":{"segments":[{"kind":"text","content":"..."}]}}
    {"event":"text_done","data":{"text":"..."}}
    {"event":"run_end","data":{"result":"finished"}}

A notification's *(ours)* fields ``source``, ``id`` and ``at`` live inside
``data.item``. An operator notification (no source) has no ``source`` key at
all and ``body == message``; ``id`` is present only when the sender gave one.

Writing (``SessionLog``, used by the Pod process only, which holds the runtime
lock): appends go through one writer thread. Everything submitted while the
previous batch was being written is written with one ``write`` and made durable
with one ``fsync`` (group commit); each submitter is told its entry's offset
only after that fsync. A failed write is truncated away and reported to every
submitter of the batch.

A crash in the middle of an append leaves a last line without its newline (a
torn line). Opening the log detects it, ends it with a newline so new entries
start on a fresh line, and reports it; lines that are not JSON event objects
are skipped by every reader. The torn bytes are kept as evidence.

Reading (``tail``, ``parse_entry``) needs no lock: a reader sees whole lines
up to some point, possibly followed by a line still being written, which it
treats like a torn one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from yoi import protocol
from yoi.atomic import fsync_dir, write_all
from yoi.faults import fault
from yoi.parsing import ParseError, json_loads

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Committed:
    """Where a committed line lives in the file (length includes the newline)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def parse_entry(line: bytes) -> dict | None:
    """A log line as an event object, or None if it is not one."""
    try:
        obj = json_loads(line)
    except ParseError:  # also nested too deep, or an integer too long
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        return None
    if "data" in obj and not isinstance(obj["data"], dict):
        return None
    return obj


def notification_id(obj: dict) -> str | None:
    """The sender's id of a committed notification entry, if any."""
    if obj.get("event") != "system_item":
        return None
    item = (obj.get("data") or {}).get("item")
    if isinstance(item, dict) and item.get("kind") == "notification":
        msg_id = item.get("id")
        if isinstance(msg_id, str):
            return msg_id
    return None


def entries(path: Path | str, n: int | None = None,
            end: int | None = None) -> "Iterator[tuple[bytes, dict | None]]":
    """The lines of the last N entries (all if N is None) of PATH before END.

    Yields ``(line, entry)`` in order; ``entry`` is None for a line that is
    not an entry (a torn line), which does not count towards N. A whole log
    is read forward in blocks, never all at once.
    """
    if n is None:
        for line in _forward(path, end):
            yield line, parse_entry(line)
        return
    want = n
    while True:
        lines = tail(path, want, end)
        found = [(line, parse_entry(line)) for line in lines]
        good = sum(1 for _, obj in found if obj is not None)
        if good >= n or len(lines) < want:
            break
        want = max(2 * want, want + n - good)
    keep: list[tuple[bytes, dict | None]] = []
    kept = 0
    for line, obj in reversed(found):  # newest first, until N entries are kept
        if obj is not None:
            if kept == n:
                break
            kept += 1
        keep.append((line, obj))
    while keep and keep[-1][1] is None:  # lines before the oldest entry kept
        keep.pop()
    yield from reversed(keep)


def _forward(path: Path | str, end: int | None) -> "Iterator[bytes]":
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        stop = os.fstat(fd).st_size if end is None else end
        pos, rest = 0, b""
        while pos < stop:
            chunk = os.pread(fd, min(READ_CHUNK, stop - pos), pos)
            if not chunk:
                break
            pos += len(chunk)
            *lines, rest = (rest + chunk).split(b"\n")
            yield from (line for line in lines if line.strip())
        if rest.strip():
            yield rest
    finally:
        os.close(fd)


def tail(path: Path | str, n: int | None = None, end: int | None = None) -> list[bytes]:
    """The last N lines (all if N is None) of PATH before byte offset END.

    Lines come without their newline; a last line without a newline (torn, or
    still being written) is included and left for ``parse_entry`` to judge.
    Reads backwards in blocks, so a short tail of a huge log is cheap.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        size = os.fstat(fd).st_size
        pos = size if end is None else min(end, size)
        if n is None:
            data = os.pread(fd, pos, 0) if pos else b""
            return [ln for ln in data.split(b"\n") if ln.strip()]
        if n <= 0:
            return []
        chunks: list[bytes] = []
        newlines = 0
        while pos > 0 and newlines <= n:
            step = min(READ_CHUNK, pos)
            pos -= step
            chunk = os.pread(fd, step, pos)
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
        data = b"".join(reversed(chunks))
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        if pos > 0:
            lines = lines[1:]  # the first piece may be the middle of a line
        return lines[-n:]
    finally:
        os.close(fd)


@dataclass
class Opened:
    """What opening a log found: problems to report as alerts."""

    torn_bytes: int = 0
    unreadable: int = 0

    def problems(self, path: Path) -> list[str]:
        out = []
        if self.torn_bytes:
            out.append(f"{path} ended with a torn line ({self.torn_bytes} bytes, from a crash "
                       "during an append); it is kept but skipped, and new entries start on "
                       "a fresh line")
        if self.unreadable:
            out.append(f"{path}: skipped {self.unreadable} line(s) that are not JSON event "
                       "objects")
        return out


class Recent:
    """The most recent entries: at most COUNT lines and, beyond the newest, BUDGET bytes.

    This is what a connect-time snapshot holds. Entries can be large (a
    notification of 1 MiB, handler output), so a count alone would let the
    snapshot, and the Pod's memory, grow to gigabytes.
    """

    def __init__(self, count: int = protocol.SNAPSHOT_ENTRIES,
                 budget: int = protocol.SNAPSHOT_BYTES):
        self.lines: deque[bytes] = deque()
        self.count = count
        self.budget = budget
        self.size = 0

    def append(self, line: bytes) -> None:
        lines = self.lines
        lines.append(line)
        self.size += len(line)
        while len(lines) > self.count or (self.size > self.budget and len(lines) > 1):
            self.size -= len(lines.popleft())

    def __iter__(self):
        return iter(self.lines)

    def __len__(self) -> int:
        return len(self.lines)


Done = Callable[[Committed | None, OSError | None], None]


class SessionLog:
    """The writer side of a session log (one per Pod process)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.recent = Recent()  # the last entries, as opened
        self.size = 0
        self._ids: dict[str, tuple[int, int]] = {}
        self._fd: int | None = None
        self._rfd: int | None = None
        self._queue: list[tuple[bytes, Done, str | None]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- opening ------------------------------------------------------------
    def open(self) -> Opened:
        """Scan the file (ids, recent entries, torn tail), then start the writer."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600)
        self._rfd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        found = self._scan()
        if found.torn_bytes:
            os.write(self._fd, b"\n")
            os.fsync(self._fd)
            self.size += 1
        self._thread = threading.Thread(target=self._writer, name="session-writer",
                                        daemon=True)
        self._thread.start()
        return found

    def _scan(self) -> Opened:
        found = Opened()
        offset = 0
        rest = b""
        recent = Recent()  # lines, readable or not
        while True:
            chunk = os.read(self._rfd, READ_CHUNK)
            if not chunk:
                break
            data = rest + chunk if rest else chunk
            start = 0
            while True:
                nl = data.find(b"\n", start)
                if nl < 0:
                    break
                line = data[start:nl]
                if line.strip():
                    self._index(line, offset + start, nl - start + 1)
                    recent.append(line)
                start = nl + 1
            offset += start
            rest = data[start:]
        self.size = offset + len(rest)
        if rest:
            found.torn_bytes = len(rest)
        for line in recent:
            if parse_entry(line) is None:
                found.unreadable += 1
            else:
                self.recent.append(line)
        return found

    def _index(self, line: bytes, offset: int, length: int) -> None:
        # Only notifications carry ids; skip the JSON parse for everything else.
        if b'"notification"' not in line or b'"id"' not in line:
            return
        obj = parse_entry(line)
        msg_id = notification_id(obj) if obj is not None else None
        if msg_id is not None and msg_id not in self._ids:
            self._ids[msg_id] = (offset, length)

    # -- idempotency --------------------------------------------------------
    def committed_line(self, msg_id: str) -> bytes | None:
        """The committed line (with newline) of the notification with MSG_ID, if any."""
        with self._cond:
            where = self._ids.get(msg_id)
        if where is None:
            return None
        return os.pread(self._rfd, where[1], where[0])

    def read(self, entry: Committed) -> bytes:
        """The committed line at ENTRY (any thread)."""
        return os.pread(self._rfd, entry.length, entry.offset)

    # -- appending ----------------------------------------------------------
    def submit(self, line: bytes, done: Done, msg_id: str | None = None) -> None:
        """Queue LINE (one JSON object + newline); DONE(committed, error) runs after fsync.

        DONE runs on the writer thread, in submission order.
        """
        if not line.endswith(b"\n") or b"\n" in line[:-1]:
            raise ValueError("a session log entry is exactly one line")
        with self._cond:
            if self._closing:
                raise OSError("the session log is closed")
            self._queue.append((line, done, msg_id))
            self._cond.notify()

    def append(self, line: bytes, done: Done | None = None) -> Committed:
        """Submit LINE and wait until it is durable; raise OSError on failure."""
        ev = threading.Event()
        box: list = []

        def finished(res, err):
            if done is not None:
                done(res, err)
            box.append((res, err))
            ev.set()

        self.submit(line, finished)
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
            self._write_batch(batch)

    def _write_batch(self, batch) -> None:
        data = b"".join(line for line, _, _ in batch)
        start = self.size
        try:
            half = len(data) // 2
            self._write_all(data[:half])
            fault("session-mid-write")  # a crash here leaves a torn line
            self._write_all(data[half:])
            fault("session-before-fsync")
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            for _, done, _ in batch:
                done(None, e)
            return
        self.size = start + len(data)
        results = []
        offset = start
        with self._cond:
            for line, _, msg_id in batch:
                if msg_id is not None and msg_id not in self._ids:
                    self._ids[msg_id] = (offset, len(line))
                results.append(Committed(offset, len(line)))
                offset += len(line)
        for (_, done, _), res in zip(batch, results):
            done(res, None)

    def _write_all(self, data: bytes) -> None:
        write_all(self._fd, data)

    def close(self) -> None:
        """Commit everything already submitted, stop the writer, close the file."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for fd in (self._fd, self._rfd):
            if fd is not None:
                os.close(fd)
        self._fd = self._rfd = None


# -- a torn last line (``yoi doctor``) ---------------------------------------------

TORN_MARK = ".torn-"


def torn_tail(path: Path | str) -> tuple[int, int, str] | None:
    """Find a torn last line of a JSON Lines log: (good_end, size, why) or None.

    ``good_end`` is the offset just past the last good line. Reads only the
    tail of the file, backwards, until the last line is whole.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        chunk = 8192
        pos = max(0, size - chunk)
        buf = os.pread(fd, size - pos, pos)
        complete = buf.endswith(b"\n")
        body_end = len(buf) - 1 if complete else len(buf)
        while True:
            start = buf.rfind(b"\n", 0, body_end)
            if start >= 0 or pos == 0:
                break
            step = min(pos, chunk * 8)
            buf = os.pread(fd, step, pos - step) + buf
            body_end += step
            pos -= step
    finally:
        os.close(fd)
    good_end = pos + start + 1
    if not complete:
        return good_end, size, f"no newline at the end ({size - good_end} bytes)"
    line = buf[start + 1:body_end]
    if not line.strip():
        return None  # blank lines are ignored by readers
    try:
        json_loads(line)
    except ParseError:
        return good_end, size, f"not valid JSON ({size - good_end} bytes)"
    return None


def set_aside_torn_tail(path: Path) -> Path | None:
    """Move a torn last line of PATH into PATH.torn-TIME (fsynced) and cut it off.

    Only with the Pod stopped (the caller holds its runtime lock). Returns the
    file the bytes went to, or None if the tail is whole.
    """
    torn = torn_tail(path)
    if torn is None:
        return None
    good_end, size, _ = torn
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        tail = os.pread(fd, size - good_end, good_end)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        backup = _create_exclusive(path.with_name(f"{path.name}{TORN_MARK}{stamp}"), tail)
        os.ftruncate(fd, good_end)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(backup.parent)
    return backup


def _create_exclusive(path: Path, data: bytes) -> Path:
    """Write DATA to a new file PATH (or PATH-2, PATH-3 ...), fsynced; return it."""
    n = 1
    candidate = path
    while True:
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return candidate
