"""A Pod's history as a reader sees it: its session log, then what it commits live.

``wait`` blocks until an entry that matches a ``Match`` is in a Pod's log: it
looks at what is there, then at what the Pod commits, live or not.

``Log(state, name, follow=...)`` checks that the Pod exists and, to follow
it, connects *before* the log file is read: the file is then read only up to
the offset the Pod's snapshot names, and everything after comes over the
socket, so nothing committed in between is missed or shown twice.

A Pod whose snapshot names no offset is not one of ours (the original Yoi
keeps its log elsewhere): its history is the entries of its snapshot, and
what it broadcasts of the entry kinds (without our ``seq``) is read as
entries too.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Iterator

from yoi import cursors, peers, session, store
from yoi.client import Closed, Connection, TimedOut
from yoi.errors import Failed, Refused, StorageError, TimedOutWaiting, Unreachable, YoiError
from yoi.state import State
from yoi.timeouts import DEFAULT

IDLE_WAIT = 3600.0  # seconds one read of a followed socket waits before waiting again
# Events that carry an entry: ours send the entry itself, the original the same
# fields without ``kind``, ``ts`` or ``seq``.
ENTRY_EVENTS = frozenset({"system_item", "user_message", "text_done", "run_end"})


class Log:
    def __init__(self, state: State, name: str, follow: bool = False,
                 timeout: float = DEFAULT):
        doc = store.read(state, name)
        self.path = state.session_path(name)
        self.conn: Connection | None = None
        self.end: int | None = None
        self.snapshot_entries: list | None = None  # the history of a Pod not ours
        if follow:
            self.conn = Connection.open(state.socket_path(name, doc), timeout,
                                        keep_snapshot=True)
            snap = self.conn.snapshot or {}
            end = snap.get("session_offset")
            if isinstance(end, int):
                self.end = end
            else:
                entries = snap.get("entries")
                self.snapshot_entries = entries if isinstance(entries, list) else []

    def entries(self, count: int | None = None,
                after: int | None = None) -> Iterator[tuple[bytes, dict | None]]:
        """The last COUNT entries (all if None) as ``(line, entry)``, only those after
        seq AFTER if given; ``entry`` is None for a line that is not an entry."""
        if self.snapshot_entries is None:
            return session.entries(self.path, count, self.end, after)
        found = [e for e in self.snapshot_entries if isinstance(e, dict) and (
            after is None or (session.entry_seq(e) or 0) > after)]
        if count is not None:
            found = found[-count:] if count else []
        return iter([(json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode(), e)
                     for e in found])

    def live(self) -> Iterator[dict]:
        """What the followed Pod broadcasts: each entry it commits (an entry dict, as
        in the log) and its other events (``{"event": ..., "data": ...}``: status,
        alert, shutdown), until it shuts down (Unreachable if it goes away without
        saying so)."""
        while self.conn is not None:
            try:
                name, data = self.conn.read_event(time.monotonic() + IDLE_WAIT, what="an event")
            except TimedOut:
                continue  # a long quiet spell: keep waiting
            except Closed:
                raise Unreachable("the Pod closed the connection")
            entry = session.from_event(name, data)
            if entry is not None:
                yield entry  # a committed entry
            elif name in ENTRY_EVENTS and "kind" not in data:
                yield {"kind": name, **data}  # an entry, as the original broadcasts it
            else:
                yield {"event": name, **({"data": data} if data else {})}
            if name == "shutdown":
                return

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def __enter__(self) -> "Log":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- waiting for an entry ---------------------------------------------------------

def check_reader(state: State, name: str, reader: str) -> None:
    """READER must exist and see NAME's log: itself, or related to it (Refused, 4)."""
    store.read(state, name)
    store.read(state, reader)
    if reader != name and not peers.may_reach(state, reader, name):
        raise Refused(f"{reader} cannot see {name}: they are neither peers nor parent and "
                      f"child (see `yoi pod list --as {reader}`)", pod_name=name,
                      reader={"pod_name": reader})


class NewEntries:
    """NAME's entries after READER's cursor (``yoi.cursors``), read under READER's cursor
    lock (``with``): iterate for ``(line, entry)``. An entry counts as read, and the
    cursor moves past it, only once the next one is asked for: one whose printing
    failed is given again next time. A last line still being written ends it.
    ``skipped`` counts the lines that are not entries. The cursor is saved on leaving
    (StorageError, saying how far it got, if it cannot be)."""

    def __init__(self, state: State, name: str, reader: str):
        self.state, self.name, self.reader = state, name, reader
        self.skipped = 0
        self._held = ExitStack()

    def __enter__(self) -> "NewEntries":
        with ExitStack() as stack:
            stack.enter_context(cursors.held(self.state, self.name, self.reader))
            self.log = stack.enter_context(Log(self.state, self.name))
            self.reading = cursors.Reading(self.state, self.name, self.reader)
            self._held = stack.pop_all()
        return self

    def __iter__(self) -> Iterator[tuple[bytes, dict]]:
        for raw, entry in self.log.entries(None, self.reading.after):
            seq = None if entry is None else session.entry_seq(entry)
            if seq is None:
                self.skipped += 1
                continue
            if not session.whole(raw):
                return  # still being written: next time
            yield raw, entry
            self.reading.advance(seq)

    def __exit__(self, *exc) -> None:
        with self._held:
            try:
                self.reading.save()
            except OSError as e:
                raise StorageError(f"gave entries up to #{self.reading.last} but could not "
                                   f"record {self.reader}'s cursor: {e.strerror or e}; they "
                                   "will be given again") from e


class Match:
    """What ``wait`` waits for: every filter given must hold."""

    __slots__ = ("reply_to", "source", "msg_id", "kind")

    def __init__(self, reply_to: str | None = None, source: str | None = None,
                 msg_id: str | None = None, kind: str | None = None):
        self.reply_to, self.source, self.msg_id, self.kind = reply_to, source, msg_id, kind

    def __call__(self, entry: dict) -> bool:
        return ((self.reply_to is None or session.entry_reply_to(entry) == self.reply_to)
                and (self.source is None or session.entry_source(entry) == self.source)
                and (self.msg_id is None or session.entry_id(entry) == self.msg_id)
                and (self.kind is None or entry.get("kind") == self.kind))

    def describe(self) -> str:
        """E.g. ``a reply to q-1 from agent``, ``a handler_result entry with id q-1``."""
        if self.reply_to is not None:
            words = [f"a reply to {self.reply_to}"]
            if self.kind is not None:
                words.append(f"of kind {self.kind}")
        else:
            words = [f"a {self.kind} entry" if self.kind is not None else "an entry"]
        if self.source is not None:
            words.append(f"from {self.source}")
        if self.msg_id is not None:
            words.append(f"with id {self.msg_id}")
        return " ".join(words)


POLL_FIRST, POLL_MOST = 0.02, 0.5  # seconds between looks at a Pod that is not live


def wait(state: State, name: str, match: Match, after: int | None = None,
         timeout: float = DEFAULT) -> dict:
    """The first entry of NAME's log (after seq AFTER, if given) that MATCH accepts,
    waiting up to TIMEOUT seconds for it to be committed.

    An entry already in the log counts. While NAME is live, its broadcasts are
    followed: the connection is made before the log file is read up to the
    offset its snapshot names, so nothing committed in between is missed;
    while it is not, the log is looked at again, more and more slowly, and a
    Pod that starts is followed from then on. Raises ``TimedOutWaiting`` (exit
    5) saying what was waited for.
    """
    doc = store.read(state, name)
    path = state.session_path(name)
    deadline = time.monotonic() + timeout
    seen = after  # entries up to this seq were looked at
    pause = POLL_FIRST
    while True:
        conn = _follow(state, name, doc, deadline)
        try:
            end = _offset(conn) if conn is not None else None
            found, seen = _scan(path, match, seen, end)
            if found is not None:
                return found
            if conn is not None:
                found, seen = _watch(conn, match, seen, deadline)
                if found is not None:
                    return found
                pause = POLL_FIRST  # it went away: look again soon
        finally:
            if conn is not None:
                conn.close()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimedOutWaiting(
                f"timed out after {timeout:g}s waiting for {match.describe()} in {name}'s log"
                + (f" after seq {after}" if after is not None else ""),
                pod_name=name, waited_for=match.describe(), after=after)
        time.sleep(min(pause, left))
        pause = min(pause * 2, POLL_MOST)


def _follow(state: State, name: str, doc: dict, deadline: float) -> Connection | None:
    """A connection to NAME if it is live (its prelude read), else None."""
    path = state.socket_path(name, doc)
    try:
        return Connection.open(path, min(2.0, max(0.05, deadline - time.monotonic())),
                               keep_snapshot=True)
    except YoiError:
        return None


def _offset(conn: Connection) -> int | None:
    end = (conn.snapshot or {}).get("session_offset")
    return end if isinstance(end, int) else None


def _scan(path, match: Match, seen: int | None, end: int | None) -> tuple[dict | None, int | None]:
    """The first matching entry of the file after seq SEEN (up to offset END)."""
    for line, entry in session.entries(path, end=end, after=seen):
        if entry is None or not session.whole(line):
            continue  # damaged, or still being written (its commit comes live or later)
        seq = session.entry_seq(entry)
        if seq is not None:
            seen = seq
        if match(entry):
            return entry, seen
    return None, seen


def _watch(conn: Connection, match: Match, seen: int | None,
           deadline: float) -> tuple[dict | None, int | None]:
    """Read the live Pod's broadcasts until a matching entry, DEADLINE, or its end."""
    while True:
        try:
            name, data = conn.read_event(deadline, what="an entry")
        except TimedOut:
            return None, seen
        except (Closed, Failed):
            return None, seen  # it stopped: go on with its log file
        entry = session.from_event(name, data)
        if entry is None:
            continue
        seq = session.entry_seq(entry)
        if seen is not None and seq is not None and seq <= seen:
            continue  # already looked at in the file
        if seq is not None:
            seen = seq
        if match(entry):
            return entry, seen


# -- what a Pod's handler did lately -------------------------------------------------

RECENT_RUNS = 10           # handler runs `yoi pod status` looks back on
SCAN_BYTES = 4 * 1024 * 1024  # at most this much of the log's end is read for them


def handler_runs(path, runs: int = RECENT_RUNS, scan: int = SCAN_BYTES) -> list[dict]:
    """The last RUNS ``handler_result`` entries of the log at PATH, newest first,
    among its last SCAN bytes, read backwards only as far as needed."""
    found: list[dict] = []
    for line in session.backward(path, scan):
        if b'"handler_result"' not in line:
            continue
        entry = session.parse_entry(line)
        if entry is not None and entry.get("kind") == "handler_result":
            found.append(entry)
            if len(found) == runs:
                break
    return found


def failed(entry: dict) -> bool:
    """Whether a handler result is a failure of the handler; a run cut short because
    the Pod stopped (``ended: stopped``) is not."""
    return entry.get("ok") is False and entry.get("ended") != "stopped"


def handler_summary(path, runs: int = RECENT_RUNS) -> dict:
    """``{"last", "recent_runs", "recent_failures", "failing_streak"}``: the last
    handler result (or None), how many of the last RUNS failed, and how many of
    the newest failed in a row (runs the Pod's stop cut short are passed over)."""
    recent = handler_runs(path, runs)
    streak = 0
    for entry in recent:
        if entry.get("ended") == "stopped":
            continue
        if not failed(entry):
            break
        streak += 1
    return {"last": recent[0] if recent else None, "recent_runs": len(recent),
            "recent_failures": sum(1 for e in recent if failed(e)),
            "failing_streak": streak}


def failure_words(entry: dict) -> str:
    """How a failed run ended and the first line of what it said on stderr."""
    if entry.get("ended") == "timed_out":
        how = "timed out"
    elif entry.get("ended") == "stopped":
        how = "cut short: the Pod stopped"
    elif entry.get("ended") == "not_started":
        how = "could not start"
    elif entry.get("signal") is not None:
        how = f"killed by signal {entry['signal']}"
    else:
        how = f"exit status {entry.get('exit_status')}"
    said = next((ln.strip() for ln in str(entry.get("stderr_tail") or "").splitlines()
                 if ln.strip()), "")
    return f"{how}: {said}" if said else how
