"""A Pod's history as a reader sees it: its session log, then what it commits live.

``entries`` reads the log file (no lock: the log is append-only) and, with
``follow``, goes on with the events the live Pod broadcasts. It connects
*before* reading the file and reads the file only up to the offset the
Pod's snapshot names, so nothing committed in between is missed or shown
twice.
"""

from __future__ import annotations

import time
from typing import Iterator

from yoi import session, store
from yoi.client import Closed, Connection, TimedOut
from yoi.errors import Unreachable
from yoi.state import State
from yoi.timeouts import DEFAULT

IDLE_WAIT = 3600.0  # seconds one read of a followed socket waits before waiting again


def entries(state: State, name: str, count: int | None = None, follow: bool = False,
            timeout: float = DEFAULT) -> Iterator[tuple[bytes | None, dict | None]]:
    """NAME's last COUNT entries (all if None) as ``(line, entry)``; ``entry`` is None
    for a line that is not an entry (a torn line). With FOLLOW, then the live
    events as ``(None, event)``, until the Pod shuts down (Unreachable if it
    goes away without saying so)."""
    doc = store.read(state, name)
    conn = end = None
    if follow:
        conn = Connection.open(state.socket_path(name, doc), timeout, keep_snapshot=True)
        end = (conn.snapshot or {}).get("session_offset")
        if not isinstance(end, int):
            end = None
    try:
        yield from session.entries(state.session_path(name), count, end)
        if conn is not None:
            yield from _live(conn)
    finally:
        if conn is not None:
            conn.close()


def _live(conn: Connection) -> Iterator[tuple[None, dict]]:
    while True:
        try:
            name, data = conn.read_event(time.monotonic() + IDLE_WAIT, what="an event")
        except TimedOut:
            continue  # a long quiet spell: keep waiting
        except Closed:
            raise Unreachable("the Pod closed the connection")
        yield None, {"event": name, **({"data": data} if data else {})}
        if name == "shutdown":
            return
