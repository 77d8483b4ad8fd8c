"""A Pod's history as a reader sees it: its session log, then what it commits live.

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
from typing import Iterator

from yoi import session, store
from yoi.client import Closed, Connection, TimedOut
from yoi.errors import Unreachable
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
            if isinstance(data.get("seq"), int) and data.get("kind") == name:
                yield data  # a committed entry
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
