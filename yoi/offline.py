"""Offline delivery: the durable queue of messages for a Pod that is not live.

``yoi pod send --queue`` to a Pod that is not live appends the message to
``pods/NAME/queue.jsonl``, one JSON record per line::

    {"id":"m1","source":"coder","message":"...","queued_at":"2026-12-01T12:00:00Z"}

(``source`` null for the operator; ``in_reply_to``, the id of the message it
answers, when given). The Pod, when it starts (and whenever it is asked,
or sees records there), commits them to its session log in order, exactly
as a live ``notify`` (``yoi.server.drain``), and removes each record only
once it is committed and, if the Pod has a handler, its handler has run.

Crash consistency rests on one lock and one idempotent step:

* every change of the file happens under the Pod's metadata lock
  (``locks/NAME.lock``, ``yoi.txn.lock_pods``): an append writes whole
  records and fsyncs before the sender reports ``queued``; a drain holds the
  lock from reading the file to emptying it, so nothing is appended between;
* committing is idempotent by id (the session log's id index), and a record
  is removed only after it is committed and its handler run (if the Pod has
  a handler) has its ``handler_result`` committed. A crash before that leaves
  the record, which the next drain finds committed: it runs the handler if
  that has no result yet and drops it otherwise. So every queued message is
  committed exactly once and handled.

Damage is never deleted: a last record without its newline (a crash during
an append; its sender never reported it queued) is moved aside into
``queue.jsonl.torn-TIME``, and whole lines that are not records into
``queue.jsonl.bad-TIME``, by the next append, the next drain or ``yoi doctor
--fix``. A Pod's queue is bounded by its record's ``queue_max_messages`` and
``queue_max_bytes``: an append that would go over adds nothing.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from yoi import protocol
from yoi.atomic import atomic_write, fsync_dir, not_a_file, write_all
from yoi.errors import Failed, StorageError
from yoi.faults import fault
from yoi.metadata import queue_limits
from yoi.names import is_valid_name
from yoi.parsing import ParseError, json_loads
from yoi.state import State
from yoi.txn import lock_pods

BAD_MARK = ".bad-"


# -- records ------------------------------------------------------------------------

def record_line(msg_id: str, message: str, source: str | None,
                in_reply_to: str | None = None, queued_at: str | None = None) -> bytes:
    """One queue record, with its newline; ``id`` first (see ``_id_marker``)."""
    from yoi.session import now_iso  # see _aside
    rec = {"id": msg_id, "source": source, "message": message,
           "queued_at": queued_at or now_iso()}
    if in_reply_to is not None:
        rec["in_reply_to"] = in_reply_to
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _id_marker(msg_id: str) -> bytes:
    # Records are written by record_line only, and an id needs no JSON escaping.
    return b'{"id":"%s",' % msg_id.encode("ascii")


_ID_AT_LINE_START = re.compile(rb'^\{"id":"([A-Za-z0-9._:-]+)",', re.M)


def _queued_ids(data: bytes) -> set[str]:
    """The ids of the records in DATA (a queue's bytes), read from the line starts."""
    return {m.decode("ascii") for m in _ID_AT_LINE_START.findall(data)}


def parse_record(line: bytes) -> dict | None:
    """A queue line as a record, or None if it is not a valid one."""
    try:
        rec = json_loads(line)
    except ParseError:
        return None
    if not isinstance(rec, dict):
        return None
    source, reply = rec.get("source"), rec.get("in_reply_to")
    message = rec.get("message")
    if (not protocol.is_valid_message_id(rec.get("id"))
            or not isinstance(message, str) or not message.strip()
            or not (source is None or is_valid_name(source))
            or not (reply is None or protocol.is_valid_message_id(reply))
            or not isinstance(rec.get("queued_at"), str)):
        return None
    return rec


def notify_params(rec: dict) -> dict:
    """The ``notify`` parameters a queued record is committed with, as if sent live."""
    params = {"message": rec["message"], "id": rec["id"]}
    if rec.get("source") is not None:
        params["source"] = rec["source"]
    if rec.get("in_reply_to") is not None:
        params["in_reply_to"] = rec["in_reply_to"]
    return params


# -- reading --------------------------------------------------------------------------

class Contents:
    """What a queue file holds: its valid records in order, the whole lines that are not
    records (line number, bytes), and a torn last line (bytes, None if whole)."""

    __slots__ = ("records", "bad", "torn", "size")

    def __init__(self, records: list[dict], bad: list[tuple[int, bytes]],
                 torn: bytes | None, size: int):
        self.records, self.bad, self.torn, self.size = records, bad, torn, size


def check_file(path: Path) -> None:
    """Refuse what is at PATH if it is not a regular file (a directory, a symlink: it is
    never followed, read or removed), naming it."""
    what = not_a_file(path)
    if what is not None:
        raise Failed(f"{path} is {what}, not the Pod's message queue (never followed); "
                     "move it out of the way (`yoi doctor` reports it)", path=str(path))


def _read_bytes(path: Path) -> bytes:
    check_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def parse(data: bytes) -> Contents:
    end = data.rfind(b"\n") + 1
    records, bad = [], []
    for n, line in enumerate(data[:end].split(b"\n")[:-1] if end else [], 1):
        if not line.strip():
            continue
        rec = parse_record(line)
        if rec is None:
            bad.append((n, line))
        else:
            records.append(rec)
    return Contents(records, bad, data[end:] or None, len(data))


def read(path: Path) -> Contents:
    """The queue at PATH (no lock: a reader may see a record being appended as torn).
    Failed if something else is at PATH (``check_file``), StorageError if it cannot
    be read."""
    return parse(_readable(path))


def depth(path: Path) -> int:
    """How many messages wait at PATH: its whole lines (no lock, no parsing). Raises as
    ``read`` does."""
    try:
        if os.lstat(path).st_size == 0:
            return 0
    except (FileNotFoundError, NotADirectoryError):  # no queue; no Pod directory at all
        return 0
    return _readable(path).count(b"\n")


def _readable(path: Path) -> bytes:
    try:
        return _read_bytes(path)
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror or e}", path=str(path))


# -- changing (the caller holds the Pod's metadata lock) ----------------------------------

def _aside(path: Path, torn: bool, data: bytes) -> Path:
    """DATA into a new ``queue.jsonl.torn-TIME`` (TORN) or ``.bad-TIME``, synced."""
    # Imported here: `yoi pod list` and `status` count queues (``depth``) and do not
    # load the session module (pinned by tests/test_runtime_cli.py).
    from yoi.session import TORN_MARK, create_exclusive
    mark = TORN_MARK if torn else BAD_MARK
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = create_exclusive(path.with_name(f"{path.name}{mark}{stamp}"), data)
    fsync_dir(path.parent)
    return backup


def set_aside_damage(path: Path, contents: Contents) -> list[str]:
    """Move a torn last line and the lines that are not records out of the queue, into
    ``queue.jsonl.torn-TIME`` and ``queue.jsonl.bad-TIME`` (written and synced first,
    then the queue is rewritten without them). Returns what was done, in words."""
    done = []
    if contents.torn is not None:
        moved = _aside(path, True, contents.torn)
        done.append(f"its last record was torn ({len(contents.torn)} bytes, from a crash "
                    f"during an append); it was moved to {moved}")
    if contents.bad:
        moved = _aside(path, False, b"".join(line + b"\n" for _, line in contents.bad))
        lines = ", ".join(str(n) for n, _ in contents.bad[:5])
        done.append(f"{len(contents.bad)} line(s) that are not queue records (line "
                    f"{lines}{' ...' if len(contents.bad) > 5 else ''}) were moved to {moved}")
    if done:
        rewrite(path, contents.records)
        contents.torn, contents.bad = None, []
    return done


def rewrite(path: Path, records: list[dict]) -> None:
    """Replace the queue atomically with RECORDS (empty: the file is emptied)."""
    atomic_write(path, b"".join(_line_of(r) for r in records))


def _line_of(rec: dict) -> bytes:
    return record_line(rec["id"], rec["message"], rec.get("source"), rec.get("in_reply_to"),
                       rec["queued_at"])


def remove(path: Path, records: list[dict], ids: set[str]) -> None:
    """Remove the records with IDS from the queue, whose records are RECORDS (the
    caller has held the lock since it read them): emptied if none stays (``clear``),
    else replaced atomically with the others (``rewrite``)."""
    if not ids:
        return
    kept = [r for r in records if r["id"] not in ids]
    if kept:
        rewrite(path, kept)
    else:
        clear(path)


def clear(path: Path) -> None:
    """Empty the queue (no record in it waits any more): one truncate, synced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.ftruncate(fd, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- appending (a sender) -------------------------------------------------------------------

class QueueFull(Failed):
    """The target's queue would go over one of its limits."""


def append(state: State, target: str, items: list[tuple[str, bytes]]) -> dict:
    """Append ITEMS (``(id, record line)``, in order) to TARGET's queue under its lock.

    An id already in the queue is not appended again (a retry of a queued
    send), nor one given twice. Either every new record is written and synced
    or, over a limit (QueueFull) or on an I/O error (StorageError), none is.
    Returns ``{"appended": [ids], "already": [ids], "depth": N, "notes": [...]}``.
    """
    path = state.queue_path(target)
    with lock_pods(state, [target]) as locked:
        doc = locked.require(target).doc  # removed meanwhile: NotFound
        max_messages, max_bytes = queue_limits(doc)
        try:
            return _append_locked(path, target, items, max_messages, max_bytes)
        except OSError as e:
            raise StorageError(f"cannot queue for {target}: writing {path}: "
                               f"{e.strerror or e}; nothing was queued", path=str(path))


def _append_locked(path: Path, target: str, items, max_messages: int, max_bytes: int) -> dict:
    check_file(path)
    created = not os.path.lexists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        data = _read_bytes(path) if not created else b""
        notes = []
        if data and not data.endswith(b"\n"):
            contents = parse(data)
            notes = set_aside_damage(path, contents) if contents.torn is not None else []
            os.close(fd)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            data = _read_bytes(path)
        seen = set()
        new, already = [], []
        queued = _queued_ids(data) if len(items) > 1 else None
        for msg_id, line in items:
            if msg_id in seen or (queued is not None and msg_id in queued) or (
                    queued is None and data and _id_marker(msg_id) in data):
                already.append(msg_id)
            else:
                seen.add(msg_id)
                new.append((msg_id, line))
        count = data.count(b"\n")
        size = len(data) + sum(len(line) for _, line in new)
        if new and (count + len(new) > max_messages or size > max_bytes):
            raise QueueFull(
                f"{target}'s queue is full: {count} message(s), {len(data)} bytes waiting; "
                f"{len(new)} more ({size - len(data)} bytes) would go over its limit of "
                f"{max_messages} messages / {max_bytes} bytes; nothing was queued (start "
                f"{target} to deliver what waits, or raise the limit with `yoi pod config "
                f"{target} --queue-max-messages N --queue-max-bytes N`)",
                pod_name=target, queued=count, queued_bytes=len(data),
                max_messages=max_messages, max_bytes=max_bytes)
        if new:
            blob = b"".join(line for _, line in new)
            half = len(blob) // 2
            try:
                write_all(fd, blob[:half])
                fault("queue-mid-append")  # a crash here leaves a torn record
                write_all(fd, blob[half:])
                fault("queue-before-fsync")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, len(data))  # nothing half-written stays
                raise
            if created:
                fsync_dir(path.parent)
        return {"appended": [i for i, _ in new], "already": already,
                "depth": count + len(new), "notes": notes}
    finally:
        os.close(fd)
