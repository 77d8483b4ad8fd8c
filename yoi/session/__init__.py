"""The session log: ``pods/NAME/session.jsonl``, a Pod's replayable history.

One line per committed entry (compact JSON, UTF-8). An entry is the
original's session log entry, internally tagged by ``kind`` with ``ts`` (unix
milliseconds), plus *(ours)* ``seq``, ``at`` and, for a message, ``id``::

    {"seq":7,"kind":"system_item","ts":1764590000000,"at":"2026-12-01T12:00:00Z","id":"m1","item":{"kind":"notification","message":M,"body":B,"source":S,"id":"m1","at":"..."}}
    {"seq":8,"kind":"user_message","ts":...,"at":"...","segments":[{"kind":"text","content":"..."}]}
    {"seq":9,"kind":"text_done","ts":...,"at":"...","text":"..."}
    {"seq":10,"kind":"run_end","ts":...,"at":"...","result":"finished"}

``seq`` is strictly increasing per Pod and never reused: it is assigned by
the writer in commit order and continues from the last entry in the file
after a restart. ``seq`` comes first in every line, so a reader finds an
entry by its ``seq`` with a binary search over the file (``offset_after``).
When the Pod broadcasts an entry, the event is the entry itself as ``data``:
``{"event": KIND, "data": ENTRY}`` (an original client reads the fields it
knows, e.g. ``data.item``, and ignores the rest).

Lines written by versions before sequence numbers (``{"event":..,"data":..}``)
are read as entries without a ``seq``; a Pod converts such a log once, when
it starts (``yoi.session.writer``).

Reading needs no lock: a reader sees whole lines up to some point, possibly
followed by a line still being written, which it treats like a torn one
(not an entry). Writing is ``yoi.session.writer.SessionLog`` (the Pod
process only).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Iterator

from yoi import protocol
from yoi.atomic import fsync_dir, open_regular, write_all
from yoi.parsing import ParseError, json_loads

READ_CHUNK = 1 << 20
_SEQ_PREFIX = b'{"seq":'


# json.dumps with these arguments builds an encoder per call: one, made once
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _dumps(obj) -> bytes:
    return _encode(obj).encode("utf-8")


_now = (0, "")  # (unix second, its RFC 3339 form): formatted once per second


def now_iso() -> str:
    global _now
    t = int(time.time())
    if t != _now[0]:
        _now = (t, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)))
    return _now[1]


class Entry:
    """An entry to commit: everything but its ``seq``, encoded once.

    ``line(seq)`` is the log line, ``event(seq)`` the broadcast; both are
    spliced from the same bytes, so committing costs one ``json.dumps``.
    """

    __slots__ = ("kind", "msg_id", "key", "at", "_rest")

    def __init__(self, kind: str, fields: dict, msg_id: str | None = None,
                 at: str | None = None, ts: int | None = None, key: str | None = None):
        self.kind = kind
        self.msg_id = msg_id
        self.key = msg_id if key is None else key  # what the id index files it under
        self.at = at = at or now_iso()
        head = {"kind": kind, "ts": time.time_ns() // 1_000_000 if ts is None else ts,
                "at": at}
        if msg_id is not None:
            head["id"] = msg_id
        if head.keys() & fields.keys():  # (never so far) both, as they are
            body = _dumps(fields)
            self._rest = _dumps(head)[1:-1] + (b"," + body[1:] if body != b"{}" else b"}")
        else:  # one encoding of everything
            head.update(fields)
            self._rest = _dumps(head)[1:]

    @property
    def size(self) -> int:
        """About the bytes this entry holds until it is committed."""
        return len(self._rest)

    def line(self, seq: int) -> bytes:
        """The log line (with its newline)."""
        return b"%s%d,%s\n" % (_SEQ_PREFIX, seq, self._rest)

    def event(self, seq: int) -> bytes:
        return event_of(self.line(seq), self.kind)


# How a committed entry is broadcast. The original's clients reject event names they
# do not know, so an entry of a kind of ours goes out in a shape they know, with the
# entry's own fields riding along (``data.kind`` and ``data.seq`` tell our clients
# what it is): a handler's result as ``text_done`` (its output is its ``text``), any
# other as a ``system_item`` notification whose message sums it up.
ORIGINAL_EVENTS = frozenset({"system_item", "user_message", "text_done", "run_end"})
BROADCAST_AS = {"handler_result": "text_done"}


def event_of(line: bytes, kind: str) -> bytes:
    """The broadcast event of the committed log LINE (with or without its newline)."""
    line = line.rstrip(b"\n")
    if kind in ORIGINAL_EVENTS or kind in BROADCAST_AS:
        return b'{"event":"%s","data":%s}\n' % (BROADCAST_AS.get(kind, kind).encode(), line)
    entry = parse_entry(line) or {}
    text = summary(entry)
    item = _dumps({"kind": "notification", "message": text, "body": text})
    return b'{"event":"system_item","data":%s,"item":%s}}\n' % (line[:-1], item)


def summary(entry: dict) -> str:
    """One line that says what an entry of one of our own kinds is."""
    rest = {k: v for k, v in entry.items() if k not in ("seq", "kind", "ts", "at")}
    text = json.dumps(rest, ensure_ascii=False, separators=(",", ":"))
    return f"[{entry.get('kind')}] {text[:500]}"


def from_event(name: str, data: dict) -> dict | None:
    """The entry a broadcast event carries (see ``event_of``), or None for an event
    that is no entry (status, alert, shutdown...)."""
    kind = data.get("kind")
    if not (isinstance(data.get("seq"), int) and isinstance(kind, str)):
        return None
    if kind in ORIGINAL_EVENTS or kind in BROADCAST_AS:
        return data if BROADCAST_AS.get(kind, kind) == name else None
    if name != "system_item":
        return None
    return {k: v for k, v in data.items() if k != "item"}  # the summary was for others


def parse_entry(line: bytes) -> dict | None:
    """A log line as an entry (see the module docstring), or None if it is not one.

    Never raises: a line nested too deep for the parser, or with a number too
    long to convert, is not an entry.
    """
    try:
        obj = json_loads(line)
    except ParseError:  # also nested too deep, or an integer too long
        return None
    if not isinstance(obj, dict):
        return None
    kind = obj.get("kind")
    if isinstance(kind, str):
        return obj
    if isinstance(obj.get("event"), str):
        return _from_event(obj)
    return None


def _from_event(obj: dict) -> dict | None:
    """An entry of the format before sequence numbers (an event line), as an entry."""
    data = obj.get("data", {})
    if not isinstance(data, dict):
        return None
    entry = {**data, "seq": None, "kind": obj["event"]}
    item = data.get("item")
    if isinstance(item, dict):
        if isinstance(item.get("id"), str):
            entry["id"] = item["id"]
        if isinstance(item.get("at"), str):
            entry["at"] = item["at"]
    return entry


def entry_id(entry: dict) -> str | None:
    """The message id of an entry, if it has one."""
    msg_id = entry.get("id")
    return msg_id if isinstance(msg_id, str) else None


def entry_source(entry: dict) -> str | None:
    """The Pod an entry comes from: a message's sender (None for the operator), or the
    ``source`` an entry of ours names."""
    item = entry.get("item")
    source = item.get("source") if isinstance(item, dict) else entry.get("source")
    return source if isinstance(source, str) else None


def entry_reply_to(entry: dict) -> str | None:
    """The message id an entry answers: a reply's ``in_reply_to``."""
    item = entry.get("item")
    value = item.get("in_reply_to") if isinstance(item, dict) else entry.get("in_reply_to")
    return value if isinstance(value, str) else None


# A rejected delivery (``delivery_rejected``, see ``yoi.server.drain``) is indexed
# under its message id behind this prefix: a key no message id can be (ids have
# no "/"), so a retry of the message is not taken for it, and a drain repeated
# after a crash finds the rejection already recorded.
REJECTED_PREFIX = "rejected/"
# The handler run of a notification with an id (its ``handler_result``) is indexed
# under the id behind this prefix, so that a drain finds out whether a queued
# message committed before a crash has had its handler run, without reading the log.
HANDLED_PREFIX = "handled/"


def handled_key(msg_id: str) -> str:
    return HANDLED_PREFIX + msg_id


def index_key(entry: dict) -> str | None:
    """What the id index files ENTRY under: its message id, a rejection's key or a
    notification's handler run's key."""
    kind = entry.get("kind")
    if kind == "delivery_rejected":
        msg_id = entry.get("message_id")
        return REJECTED_PREFIX + msg_id if isinstance(msg_id, str) else None
    if kind == "handler_result":
        msg_id = entry_id(entry)
        return (handled_key(msg_id) if msg_id is not None and entry.get("handled") == "notify"
                else None)
    return entry_id(entry)


def entry_seq(entry: dict) -> int | None:
    seq = entry.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def whole(line: bytes) -> bool:
    """Whether LINE (an entry's, without its newline) is complete: an entry ends with
    its closing brace, and the last line of a log may still be being written."""
    return line.endswith(b"}")


def line_seq(line: bytes) -> int | None:
    """The ``seq`` a line starts with, read without parsing the line."""
    if not line.startswith(_SEQ_PREFIX):
        return None
    end = line.find(b",", len(_SEQ_PREFIX), len(_SEQ_PREFIX) + 24)
    digits = line[len(_SEQ_PREFIX):end] if end > 0 else b""
    return int(digits) if digits.isdigit() else None


def entries(path: Path | str, n: int | None = None, end: int | None = None,
            after: int | None = None) -> "Iterator[tuple[bytes, dict | None]]":
    """The lines of the last N entries (all if N is None) of PATH before END,
    only those with a ``seq`` above AFTER if given.

    Yields ``(line, entry)`` in order; ``entry`` is None for a line that is
    not an entry (a torn line), which does not count towards N. A whole log
    is read forward in blocks, never all at once.
    """
    start = 0 if after is None else offset_after(path, after, end)
    if n is None or after is not None:
        found = ((line, parse_entry(line)) for line in _forward(path, end, start))
        if n is None:
            yield from found
        else:
            yield from _last(list(found), n)  # bounded by what follows AFTER
        return
    want = n
    while True:
        lines = tail(path, want, end)
        found = [(line, parse_entry(line)) for line in lines]
        good = sum(1 for _, obj in found if obj is not None)
        if good >= n or len(lines) < want:
            break
        want = max(2 * want, want + n - good)
    yield from _last(found, n)


def _last(found: list, n: int) -> list:
    """The last N entries of FOUND, with the non-entries among them."""
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
    return keep[::-1]


def open_log(path: Path | str) -> int:
    """A descriptor to read the log at PATH: never through a symlink (ELOOP), never
    blocking on a FIFO put in its place, and only a regular file (OSError naming
    what it is otherwise)."""
    return open_regular(path)


def _forward(path: Path | str, end: int | None, start: int = 0) -> "Iterator[bytes]":
    try:
        fd = open_log(path)
    except FileNotFoundError:
        return
    try:
        stop = os.fstat(fd).st_size if end is None else end
        pos, rest = start, b""
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
        fd = open_log(path)
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


def backward(path: Path | str, limit: int) -> "Iterator[bytes]":
    """PATH's lines newest first, read backwards in blocks, stopping after LIMIT
    bytes: a reader that wants the last few of some kind pays for what it reads,
    however long the lines or the log are. A line cut by LIMIT is not yielded."""
    try:
        fd = open_log(path)
    except FileNotFoundError:
        return
    try:
        pos = os.fstat(fd).st_size
        stop = max(0, pos - limit)
        rest = b""  # the start of a line whose beginning is not read yet
        while pos > stop:
            step = min(READ_CHUNK, pos - stop)
            pos -= step
            lines = (os.pread(fd, step, pos) + rest).split(b"\n")
            rest = lines[0]
            for line in reversed(lines[1:]):
                if line.strip():
                    yield line
        if pos == 0 and rest.strip():
            yield rest
    finally:
        os.close(fd)


def offset_after(path: Path | str, seq: int, end: int | None = None) -> int:
    """The offset of the first line with a ``seq`` above SEQ (END or the size if none).

    A binary search over the file: ``seq`` is strictly increasing and starts
    every line, so this reads a few blocks even of a huge log. Lines without
    a ``seq`` (from before sequence numbers, or damaged) are stepped over.
    """
    try:
        fd = open_log(path)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size if end is None else end
        lo, hi = 0, size  # every line starting before lo has a seq <= SEQ
        while hi - lo > 1 << 16:
            mid = (lo + hi) // 2
            found = _seq_line_from(fd, mid, hi)
            if found is None:
                hi = mid
            elif found[1] <= seq:
                lo = found[2]
            else:
                hi = found[0]
        pos = lo
        while pos < size:
            found = _seq_line_from(fd, pos, size, exact=True)
            if found is None:
                return size
            if found[1] > seq:
                return found[0]
            pos = found[2]
        return size
    finally:
        os.close(fd)


def _seq_line_from(fd: int, pos: int, stop: int,
                   exact: bool = False) -> tuple[int, int, int] | None:
    """The first whole line with a seq that starts at or after POS (at POS exactly if
    EXACT, POS being a line start) and before STOP: (start, seq, next start)."""
    if not exact and pos > 0:
        pos = _next_line_start(fd, pos - 1, stop)
    while pos is not None and pos < stop:
        head = os.pread(fd, 64, pos)
        nl = _next_line_start(fd, pos, stop)
        if nl is None:
            return None  # the last line, not whole yet
        seq = line_seq(head)
        if seq is not None:
            return pos, seq, nl
        pos = nl
    return None


def _next_line_start(fd: int, pos: int, stop: int) -> int | None:
    """The offset just after the first newline at or after POS (None: none before STOP)."""
    while pos < stop:
        chunk = os.pread(fd, min(1 << 16, stop - pos), pos)
        if not chunk:
            return None
        nl = chunk.find(b"\n")
        if nl >= 0:
            return pos + nl + 1
        pos += len(chunk)
    return None


def last_seq(path: Path | str, end: int | None = None) -> int:
    """The highest ``seq`` in the log (0 if none): that of its last entry line."""
    want = 64
    while True:
        lines = tail(path, want, end)
        for line in reversed(lines):
            seq = line_seq(line)
            if seq is not None and whole(line):
                return seq
        if len(lines) < want:
            return 0
        want *= 4


# The entry kinds the original's clients know. A snapshot carries entries of
# these kinds only: an original client rejects a whole snapshot for one entry
# of a kind it does not know. Entries of other kinds (``text_done``,
# ``run_end``, ...) stay in the log, and are broadcast when committed as the
# events of the same name; they are only held back from snapshots.
SNAPSHOT_KINDS = frozenset({"system_item", "user_message"})


def snapshot_line(line: bytes, entry: dict) -> bytes:
    """LINE, an entry read back from the log, as a snapshot may carry it: in the shape
    the original's clients read, or ``b""`` (held back) if it cannot be. Logs of
    older versions hold ``user_message`` segments stored as a client sent them,
    without their ``kind``: those get it (the log itself is never rewritten)."""
    kind = entry.get("kind")
    if kind not in SNAPSHOT_KINDS:
        return line
    ts = entry.get("ts")
    if not (isinstance(ts, int) and ts >= 0):
        return b""
    if kind == "system_item":
        item = entry.get("item")
        good = (isinstance(item, dict) and item.get("kind") == "notification"
                and isinstance(item.get("message"), str) and isinstance(item.get("body"), str))
        return line if good else b""
    segments = entry.get("segments")
    mended = text_segments(segments)
    if mended is None:
        return b""
    if all("kind" in s and "content" in s for s in segments):
        return line
    return _dumps({**entry, "segments": mended})


def text_segments(segments) -> list[dict] | None:
    """SEGMENTS (a ``user_message``'s) each with its kind and content, as the original's
    clients read them (an older entry may leave out ``"kind": "text"`` or an empty
    content); None if they are not a list of text segments."""
    if not (isinstance(segments, list) and all(
            isinstance(s, dict) and s.get("kind", "text") == "text"
            and isinstance(s.get("content", ""), str) for s in segments)):
        return None
    return [{**s, "kind": "text", "content": s.get("content", "")} for s in segments]


class Recent:
    """What a connect-time snapshot holds: of the most recent COUNT entries, those of
    ``SNAPSHOT_KINDS``, and beyond the newest of them at most BUDGET bytes.

    Entries can be large (a notification of 1 MiB, handler output), so a count
    alone would let the snapshot, and the Pod's memory, grow to gigabytes.
    """

    def __init__(self, count: int = protocol.SNAPSHOT_ENTRIES,
                 budget: int = protocol.SNAPSHOT_BYTES):
        self.lines: deque[bytes] = deque()  # b"" for an entry held back (it still counts)
        self.count = count
        self.budget = budget
        self.size = 0
        self.kept = 0  # lines not held back

    def append(self, line: bytes, kind: str) -> None:
        """Add the newest entry LINE (without its newline), of KIND."""
        if kind not in SNAPSHOT_KINDS:
            line = b""
        lines = self.lines
        lines.append(line)
        self.size += len(line)
        self.kept += line != b""
        while len(lines) > self.count or (self.size > self.budget and self.kept > 1):
            old = lines.popleft()
            self.size -= len(old)
            self.kept -= old != b""

    def joined(self, sep: bytes) -> bytes:
        """The lines kept (not those held back), oldest first, joined by SEP."""
        return sep.join(iter(self))

    def __iter__(self):
        return (line for line in self.lines if line)


# -- a torn last line (``yoi doctor``) ---------------------------------------------

TORN_MARK = ".torn-"


def torn_tail(path: Path | str) -> tuple[int, int, str] | None:
    """Find a torn last line of a JSON Lines log: (good_end, size, why) or None.

    ``good_end`` is the offset just past the last good line. Reads only the
    tail of the file, backwards, until the last line is whole.
    """
    fd = open_log(path)
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
        backup = create_exclusive(path.with_name(f"{path.name}{TORN_MARK}{stamp}"), tail)
        os.ftruncate(fd, good_end)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(backup.parent)
    return backup


def create_exclusive(path: Path, data: bytes) -> Path:
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
