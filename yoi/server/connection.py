"""Client connections of a Pod: accepting, framing, bounded queues, hang-ups.

``Hub`` owns every connection and runs on the loop thread. A connection is
non-blocking and never stalls the loop:

* outbound, each client has a bounded queue (``OUTBOUND_LIMIT`` beyond its
  prelude); a client that lets it overflow is disconnected. Broadcasts,
  replayed alerts and snapshots are shared bytes objects queued as they are,
  so many idle clients cost little; clients that do not read keep the
  snapshot of the moment they connected alive, up to ``PINNED_LIMIT`` bytes
  of such snapshots, beyond which the clients holding the oldest are dropped.
  A queue is written with one ``sendmsg`` of up to ``IOV_MAX`` pieces, and
  while the Hub is corked (``cork``/``uncork``: while one client's input or
  one group commit is handled) what is sent waits to be written at once;
* inbound, lines are framed on ``\\n``; a line over ``protocol.MAX_METHOD_LINE``
  gets ``error`` and the rest of it is read and dropped as it streams in,
  never buffered whole. Methods are read only once the prelude is on its way
  (PROTOCOL.md), and every complete line goes to the Hub's ``on_line``. A
  client owed ``PENDING_LIMIT`` answers (a pipelining sender), or answers to
  entries of ``PENDING_BYTES`` being committed, has its further lines wait,
  unread, until some are answered: what a Pod holds for the work in progress
  is bounded per client, however far ahead the client writes;
* a client whose socket fails for writing is *hung up*: it gets nothing more,
  but what it wrote before its EOF is still handled (``yoi pod send
  --no-wait`` writes and closes at once).

Only clients of our own uid are accepted (``SO_PEERCRED``).
"""

from __future__ import annotations

import itertools
import os
import selectors
import socket
import struct
from collections import deque
from typing import Callable

from yoi import protocol
from yoi.server.log import log
from yoi.server.loop import Loop

OUTBOUND_LIMIT = 16 << 20      # bytes queued to one client beyond its prelude
PINNED_LIMIT = 128 << 20       # bytes of older snapshots kept for clients not reading them
RECV_CHUNK = 64 << 10
ACCEPT_BATCH = 64
ACCEPT_PAUSE = 0.1             # seconds the listener rests when accept() fails (no fds)
PENDING_LIMIT = 256           # answers one client may be owed before its lines wait,
PENDING_BYTES = 16 << 20      # or bytes of its entries being committed (at least one)
IOV_MAX = 1024                # pieces of a queue written by one sendmsg

_PEERCRED = struct.Struct("3i")


class Client:
    __slots__ = ("sock", "fd", "inbuf", "scanned", "discarding", "held", "resuming", "outq",
                 "queued", "limit", "prelude_left", "snap", "events", "closed", "eof", "hungup",
                 "pending", "pending_bytes")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.scanned = 0  # bytes at the start of inbuf known to hold no newline
        self.discarding = False
        self.held = False  # inbuf holds whole lines that wait for PENDING_LIMIT to allow them
        self.resuming = False
        self.outq: deque = deque()
        self.queued = 0
        self.limit = OUTBOUND_LIMIT
        self.prelude_left = 0
        self.snap: bytes | None = None  # the snapshot it is being sent, until it is sent
        self.events = 0
        self.closed = False
        self.eof = False
        self.hungup = False  # writing to it failed: it gets nothing more, but is still read
        self.pending = 0  # answers still owed (commits, operations)
        self.pending_bytes = 0  # of the entries being committed for it


def peer_uid(sock: socket.socket) -> int:
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return -1
    return _PEERCRED.unpack(cred)[1]


class Hub:
    """Every connection of one Pod, on the loop thread.

    ON_LINE(client, line) handles one method line; PRELUDE() returns the
    (alerts, snapshot) bytes a new client gets first.
    """

    def __init__(self, loop: Loop, listener: socket.socket,
                 on_line: Callable[[Client, bytes], None],
                 prelude: Callable[[], tuple[bytes, bytes]]):
        self.loop = loop
        self.listener = listener
        self.on_line = on_line
        self.prelude = prelude
        self.clients: dict[int, Client] = {}
        # Snapshots still being sent, oldest first: id -> (snapshot, its clients).
        self.pinned: dict[int, tuple[bytes, set[Client]]] = {}
        self.pinned_bytes = 0
        self.accepting = False
        self.reading = True
        self.corked = 0  # while > 0, sending only queues; ``uncork`` writes
        self.dirty: list[Client] = []  # clients given something while corked
        # Counts the reads of a client's input (and resumptions of held lines): the
        # lines of one were all written before it, so they can share one check.
        self.batch = 0

    # -- accepting ------------------------------------------------------------
    def start_accepting(self) -> None:
        self.listener.setblocking(False)
        self.loop.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self.accepting = True

    def stop(self) -> None:
        """Stop accepting and stop reading methods; queued events still go out."""
        if self.accepting:
            self.loop.unregister(self.listener)
            self.accepting = False
        self.listener.close()
        self.reading = False
        for c in list(self.clients.values()):
            self._set_events(c)

    def _on_accept(self, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                # Out of descriptors: rest the listener for a moment instead
                # of spinning on it.
                log(f"accept failed: {e.strerror or e}")
                self.loop.unregister(self.listener)
                self.accepting = False
                self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
                return
            if peer_uid(sock) != os.getuid():
                sock.close()
                continue
            self._welcome(sock)

    def _resume_accepting(self) -> None:
        if self.reading and not self.accepting:
            self.loop.register(self.listener, selectors.EVENT_READ, self._on_accept)
            self.accepting = True

    def _welcome(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        c = Client(sock)
        self.clients[c.fd] = c
        # Shared objects, queued as they are: a client costs no copy of them.
        alerts, snap = self.prelude()
        c.limit = OUTBOUND_LIMIT + len(alerts) + len(snap)
        c.prelude_left = len(alerts) + len(snap)
        self.loop.register(sock, selectors.EVENT_WRITE, lambda m, c=c: self._on_client(c, m))
        c.events = selectors.EVENT_WRITE
        self._pin(c, snap)
        if alerts:
            self.send(c, alerts)
        self.send(c, snap)

    # -- snapshots owed to clients ----------------------------------------------
    def _pin(self, c: Client, snap: bytes) -> None:
        """Count SNAP as held for C until C has it; drop clients that hold old ones."""
        c.snap = snap
        held = self.pinned.get(id(snap))
        if held is None:
            held = self.pinned[id(snap)] = (snap, set())
            self.pinned_bytes += len(snap)
        held[1].add(c)
        while self.pinned_bytes > PINNED_LIMIT and len(self.pinned) > 1:
            _, clients = next(iter(self.pinned.values()))
            log(f"{len(clients)} client(s) did not read their snapshot while "
                f"{self.pinned_bytes} bytes of snapshots waited; disconnecting them")
            for old in list(clients):
                self.close(old)

    def _unpin(self, c: Client) -> None:
        snap, c.snap = c.snap, None
        if snap is None:
            return
        _, clients = self.pinned[id(snap)]
        clients.discard(c)
        if not clients:
            del self.pinned[id(snap)]
            self.pinned_bytes -= len(snap)

    # -- writing ----------------------------------------------------------------
    def send(self, c: Client, data: bytes) -> None:
        if c.closed or c.hungup:
            return
        if c.queued + len(data) > c.limit:
            log(f"client fd {c.fd} does not read its events; disconnecting it")
            self.close(c)
            return
        c.outq.append(memoryview(data))
        c.queued += len(data)
        if len(c.outq) == 1:  # (else a write is pending already)
            if self.corked:
                self.dirty.append(c)
            else:
                self._flush(c)

    def broadcast(self, data: bytes, skip: Client | None = None) -> None:
        for c in list(self.clients.values()):
            if c is not skip:
                self.send(c, data)

    def cork(self) -> None:
        """Hold what is sent from now until the matching ``uncork`` in the clients'
        queues, so that many small events (acknowledgements) leave in one write."""
        self.corked += 1

    def uncork(self) -> None:
        self.corked -= 1
        if self.corked == 0 and self.dirty:
            dirty, self.dirty = self.dirty, []
            for c in dirty:
                if not c.closed:
                    self._flush(c)

    def busy(self) -> bool:
        """Whether any client still has events queued."""
        return any(c.outq for c in self.clients.values())

    def _flush(self, c: Client) -> None:
        outq = c.outq
        while outq:
            try:
                if len(outq) == 1:
                    n = c.sock.send(outq[0])
                else:
                    n = c.sock.sendmsg(outq if len(outq) <= IOV_MAX
                                       else list(itertools.islice(outq, IOV_MAX)))
            except BlockingIOError:
                break
            except OSError:
                self._hang_up(c)
                return
            c.queued -= n
            if c.prelude_left > 0:
                c.prelude_left -= n
                if c.prelude_left <= 0:
                    self._unpin(c)
            while outq and n >= len(outq[0]):
                n -= len(outq.popleft())
            if n:  # the first piece left was written in part: the socket is full
                outq[0] = outq[0][n:]
                break
        self.maybe_close(c)
        self._set_events(c)  # (nothing if it was closed)

    def _hang_up(self, c: Client) -> None:
        """Writing to C failed: it gets nothing more, but what it wrote is still read."""
        c.hungup = True
        self._unpin(c)
        c.outq.clear()
        c.queued = 0
        c.prelude_left = 0
        self.maybe_close(c)
        self._set_events(c)

    # -- reading ----------------------------------------------------------------
    def _on_client(self, c: Client, mask: int) -> None:
        if c.closed:
            return
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(c)
            if mask & selectors.EVENT_READ and not c.closed:
                self.cork()  # the answers to a chunk of lines leave together
                try:
                    self._read(c)
                finally:
                    self.uncork()
        except Exception:
            # A bug met serving this client: drop it (so that it cannot fail
            # again and again) and let the loop report the error.
            self.close(c)
            raise

    def _read(self, c: Client) -> None:
        try:
            data = c.sock.recv(RECV_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # reset: the kernel reports it only once all data was read
        if not data:
            # The client closed its side: answer what it asked, then close.
            c.eof = True
            self.maybe_close(c)
            self._set_events(c)
            return
        self._feed(c, data)

    def _feed(self, c: Client, data: bytes) -> None:
        self.batch += 1
        if c.discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            c.discarding = False
            data = data[nl + 1:]
        c.inbuf += data
        self._lines(c)

    def _lines(self, c: Client) -> None:
        """Hand every whole line of C's input to ON_LINE, while C may be owed more."""
        buf = c.inbuf
        start = 0
        c.held = False
        while not c.closed and self.reading and not self.loop.stopping:
            if c.pending >= PENDING_LIMIT or c.pending_bytes >= PENDING_BYTES:
                c.held = True
                break
            nl = buf.find(b"\n", start or c.scanned)
            if nl < 0:
                break
            if nl - start > protocol.MAX_METHOD_LINE:
                self._over_long(c)
            else:
                line = bytes(buf[start:nl])
                if line.strip():
                    self.on_line(c, line)
            start = nl + 1
        if c.closed:
            return
        rest = buf[start:] if start else buf
        if c.held:
            c.inbuf, c.scanned = rest, 0
            return
        if len(rest) > protocol.MAX_METHOD_LINE:
            self._over_long(c)
            c.discarding = True
            rest = bytearray()
        c.inbuf, c.scanned = rest, len(rest)

    def _resume(self, c: Client) -> None:
        c.resuming = False
        if not c.closed and c.held:
            self.batch += 1
            self._lines(c)
            self.maybe_close(c)
            self._set_events(c)

    def _over_long(self, c: Client) -> None:
        self.send(c, protocol.error_event(
            "invalid_request", f"method line over {protocol.MAX_METHOD_LINE} bytes; discarded"))

    # -- state --------------------------------------------------------------------
    def _set_events(self, c: Client) -> None:
        if c.closed:
            return
        # Methods are read only once the prelude is on its way (PROTOCOL.md).
        reading = (self.reading and not self.loop.stopping and c.prelude_left <= 0
                   and not c.eof and not c.held)
        events = (selectors.EVENT_READ if reading else 0) | (
            selectors.EVENT_WRITE if c.outq else 0)
        if events == c.events:
            return
        if events == 0:
            self.loop.unregister(c.sock)
        elif c.events == 0:
            self.loop.register(c.sock, events, lambda m, c=c: self._on_client(c, m))
        else:
            self.loop.modify(c.sock, events, lambda m, c=c: self._on_client(c, m))
        c.events = events

    def owe(self, c: Client, size: int = 0) -> None:
        """C is owed one more answer (a commit of SIZE bytes, an operation): it stays
        open for it."""
        c.pending += 1
        c.pending_bytes += size

    def paid(self, c: Client, size: int = 0) -> None:
        """One answer owed to C was sent (or cannot be); close C if it is done."""
        c.pending -= 1
        c.pending_bytes -= size
        if (c.held and c.pending < PENDING_LIMIT and c.pending_bytes < PENDING_BYTES
                and not c.resuming):
            c.resuming = True
            self.loop.call_soon(self._resume, c)
        self.maybe_close(c)

    def maybe_close(self, c: Client) -> None:
        if c.eof and not c.held and (c.hungup or (c.pending == 0 and not c.outq)):
            self.close(c)

    def close(self, c: Client) -> None:
        if c.closed:
            return
        c.closed = True
        if c.events:
            self.loop.unregister(c.sock)
        c.events = 0
        self.clients.pop(c.fd, None)
        self._unpin(c)
        c.outq.clear()
        c.inbuf = bytearray()
        try:
            c.sock.close()
        except OSError:
            pass

    def close_all(self) -> None:
        for c in list(self.clients.values()):
            self.close(c)


def flush_then_close(hub: Hub, loop: Loop, seconds: float) -> None:
    """Give clients up to SECONDS to read what is queued for them, then close them all."""
    loop.pump(hub.busy, seconds)
    hub.close_all()

