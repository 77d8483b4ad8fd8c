"""The event loop of a Pod process: readiness callbacks, timers, calls from other threads.

One thread (the main one) runs ``Loop.run``; it owns every socket and all the
Pod's in-memory state. Other threads (the session writer, the handler worker,
the operation threads) and signal handlers reach it only through
``call_soon`` and ``request_stop``, which append to a queue and write a byte
to a wake-up socket pair. No exception in a callback ends the loop: it goes
to ``on_error(what, exception)`` (the Pod logs it and raises an alert).
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import signal
import socket
import threading
import time
import traceback
from collections import deque
from typing import Callable

from yoi.server.log import log
from yoi.timeouts import POLL_CHUNK


class Loop:
    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.calls: deque = deque()
        self.timers: list = []  # heap of (when, n, fn, args)
        self._n = itertools.count()
        self.stopping = False
        self.stop_reason = ""
        self.tick = 0  # counts iterations: what was read in one was read at one moment
        self.on_error: Callable[[str, BaseException], None] = report
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)

    # -- registration ---------------------------------------------------------
    def register(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        self.sel.register(fileobj, events, callback)

    def modify(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        self.sel.modify(fileobj, events, callback)

    def unregister(self, fileobj) -> None:
        self.sel.unregister(fileobj)

    # -- calls and timers -----------------------------------------------------
    def call_soon(self, fn: Callable, *args) -> None:
        """Run FN(*ARGS) on the loop thread (callable from any thread)."""
        self.calls.append((fn, args))
        self._wake()

    def call_later(self, delay: float, fn: Callable, *args) -> None:
        """Run FN(*ARGS) on the loop thread in DELAY seconds (loop thread only)."""
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self._n), fn, args))

    def request_stop(self, reason: str) -> None:
        """Thread- and signal-safe: ask the loop to stop; the first reason is kept."""
        if not self.stopping:
            self.stop_reason = reason
        self.stopping = True
        self._wake()

    def install_signals(self) -> None:
        """SIGTERM and SIGINT stop the loop (only possible on the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum, frame):
            self.request_stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- running --------------------------------------------------------------
    def run(self) -> None:
        """Dispatch until ``request_stop``."""
        while not self.stopping:
            self.run_once(self._next_timeout())

    def run_once(self, timeout: float | None) -> None:
        events = self.sel.select(timeout)
        self.tick += 1
        for key, mask in events:
            self._guarded(key.data, (mask,))
            if self.stopping:
                break
        self._run_timers()
        self.run_calls()

    def pump(self, busy: Callable[[], bool], seconds: float) -> None:
        """Keep dispatching while BUSY() holds, for at most SECONDS (used at shut-down)."""
        deadline = time.monotonic() + seconds
        while busy() and time.monotonic() < deadline:
            for key, mask in self.sel.select(max(0.0, deadline - time.monotonic())):
                self._guarded(key.data, (mask,))

    def run_calls(self) -> None:
        while self.calls:
            fn, args = self.calls.popleft()
            self._guarded(fn, args)

    def _next_timeout(self) -> float | None:
        if not self.timers:
            return None
        return min(max(0.0, self.timers[0][0] - time.monotonic()), POLL_CHUNK)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(self.timers)
            self._guarded(fn, args)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the buffer is full: the loop is awake already

    def _on_wake(self, mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        self.run_calls()

    def close(self) -> None:
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _guarded(self, fn: Callable, args: tuple) -> None:
        """A failing callback is reported; it never ends the loop."""
        try:
            fn(*args)
        except Exception as e:
            try:
                self.on_error("the event loop", e)
            except Exception as e2:  # reporting failed too: the log is the last resort
                report("reporting an internal error", e2)


def report(what: str, exc: BaseException) -> None:
    """Write an unexpected exception and its traceback to the Pod's log."""
    log(f"internal error in {what}:\n" + "".join(traceback.format_exception(exc)).rstrip())


class Background:
    """A Pod's helper thread NAME running ``_run``: ``cond`` guards its state and wakes
    it, ``stopping`` tells it to end (``stop``; with JOIN, wait that long for it)."""

    def __init__(self, pod, name: str):
        self.pod = pod
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, join: float | None = None) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if join is not None:
            self.thread.join(join)

    def _run(self) -> None:
        raise NotImplementedError


TRIM_AFTER = 1000   # commits since the last trim that make one worth it
TRIM_QUIET = 0.2    # seconds without a commit that end a burst


class Trimmer:
    """Give back to the system the heap a burst of messages left behind, once the Pod
    is quiet again.

    The C library keeps memory freed by Python in its heap: a stream of 200,000
    messages left a Pod 8 to 11 MB larger for good, most of it free heap.
    ``malloc_trim`` returns it. Counted on the loop thread (``count``, once per
    commit); after TRIM_AFTER commits the next TRIM_QUIET seconds without one
    trim once. A C library without ``malloc_trim`` (musl) keeps its memory.
    """

    def __init__(self, loop: Loop):
        self.loop = loop
        self.commits = 0
        self.trimmed_at = 0
        self.armed = False

    def count(self) -> None:
        self.commits += 1
        if not self.armed and self.commits - self.trimmed_at >= TRIM_AFTER:
            self.armed = True
            self.loop.call_later(TRIM_QUIET, self._quiet, self.commits)

    def _quiet(self, seen: int) -> None:
        if self.commits != seen:  # still busy: look again
            self.loop.call_later(TRIM_QUIET, self._quiet, self.commits)
            return
        self.armed = False
        self.trimmed_at = self.commits
        release_memory()


_malloc_trim = None


def release_memory() -> bool:
    """Return the C heap's free memory to the system; whether this C library can."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes  # measured: 3 ms, paid only once a Pod has had a burst
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError, ImportError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True
