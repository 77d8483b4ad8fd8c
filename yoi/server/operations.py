"""Operation threads: methods that take metadata locks or probe other Pods.

``list_pods``, ``restore_pod`` (and their aliases), ``register_peer`` and
``unregister_peer`` can wait on a lock or a hung peer, so they run here, never
on the loop. Each operation is a function returning the answer's data; its
event line goes back to the requesting client (or, for a broadcast answer,
to every client) through the loop.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

from yoi import metadata, protocol
from yoi.errors import NotFound, Refused, UsageError, YoiError
from yoi.server.connection import Client, Hub
from yoi.server.loop import Loop, report

OPS_THREADS = 2
MAX_PENDING_OPS = 64


class Invalid(Exception):
    """A request the Pod refuses with ``invalid_request``."""


def answer_line(answer: str, fn: Callable[[], dict],
                on_internal: Callable[[str, BaseException], None] | None = None
                ) -> tuple[bytes, bool]:
    """FN's result as the event ANSWER, or the ``error`` event its failure maps to,
    and whether it succeeded; an unexpected failure also goes to ON_INTERNAL(what,
    exception)."""
    try:
        return protocol.event(answer, metadata.to_jsonable(fn())), True
    except Invalid as e:
        return protocol.error_event("invalid_request", str(e)), False
    except (UsageError, NotFound, Refused) as e:
        return protocol.error_event("invalid_request", e.message), False
    except YoiError as e:
        return protocol.error_event("internal", e.message), False
    except Exception as e:
        if on_internal is None:
            report(answer, e)
        else:
            on_internal(answer, e)
        return protocol.error_event("internal", f"internal error ({answer})"), False


class Operations:
    """ON_ERROR(what, exception) reports an unexpected failure (on the loop thread)."""

    def __init__(self, loop: Loop, hub: Hub,
                 on_error: Callable[[str, BaseException], None] = report):
        self.loop = loop
        self.hub = hub
        self.on_error = on_error
        self.queue: queue.Queue = queue.Queue()
        self.pending = 0

    def start(self) -> None:
        for i in range(OPS_THREADS):
            threading.Thread(target=self._operate, name=f"ops-{i}", daemon=True).start()

    def stop(self) -> None:
        for _ in range(OPS_THREADS):
            self.queue.put(None)

    def offload(self, c: Client, answer: str, fn: Callable[[], dict],
                broadcast: bool = False) -> None:
        """Run FN on an operation thread and send C its answer (loop thread); with
        BROADCAST, a successful answer goes to every client (C among them)."""
        if self.pending >= MAX_PENDING_OPS:
            self.hub.send(c, protocol.error_event("internal", "too many operations in progress"))
            return
        self.pending += 1
        self.hub.owe(c)
        self.queue.put((c, answer, fn, broadcast))

    def _operate(self) -> None:
        while True:
            task = self.queue.get()
            if task is None:
                return
            c, answer, fn, broadcast = task
            line, ok = answer_line(answer, fn,
                                   lambda what, e: self.loop.call_soon(self.on_error, what, e))
            self.loop.call_soon(self._answered, c, line, ok, broadcast)

    def _answered(self, c: Client, line: bytes, ok: bool, broadcast: bool) -> None:
        self.pending -= 1
        if ok and broadcast:
            self.hub.broadcast(line)
        else:
            self.hub.send(c, line)
        self.hub.paid(c)
