"""The raw socket helper: every client in the project talks to a Pod through this.

A one-shot exchange is: connect (bounded), drain the connect-time prelude (any
number of ``alert`` events, then exactly one ``snapshot``; a snapshot of many
MiB is read and dropped without holding more than a small prefix of it), write
one method, then wait for the answer event, ignoring unrelated broadcasts.
A method written before the prelude is drained can be dropped by a Pod that is
still writing its snapshot, while the sender believes it was delivered.

``notify_pipelined`` is the high-throughput variant: many ``notify`` lines over
one connection, written while the acknowledgements are read (the Pod
broadcasts every ``system_item`` to this client too, so a writer that stopped
reading would deadlock against a Pod blocked on writing to it).

A socket is trusted only if it is ours: before connecting, its directory
(and, for a short socket directory, the fallback root above it) must be owned
by this user and writable by nobody else; after connecting, the process
serving it (``SO_PEERCRED``) must run as this user. Otherwise another local
user could pose as the Pod, acknowledge a message and read it.

Every step has its own deadline. Failures map onto the project's exit codes:
no socket or connection refused -> ``NotRunning`` (5); a socket that may be
another user's -> ``Untrusted`` (5); a step that timed out -> ``TimedOut``
(5); the Pod's ``error`` event -> ``Refused`` (4), except code ``internal``
(the Pod failed, e.g. its disk is full: nothing was refused) -> ``PodFailed``
(1); the connection closed early -> ``Closed`` (1); data that is not this
protocol -> ``Malformed`` (1).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections import deque
from pathlib import Path

# The C socket type itself: the ``socket`` module's Python layer (and the
# ``selectors`` it imports) adds import time to every `yoi pod send`, which CI
# calls hundreds of times, and nothing here needs it.
import _socket

from yoi import protocol
from yoi.errors import Failed, Refused, Unreachable, YoiError
from yoi.state import private_dir_problem, socket_dir_chain
from yoi.timeouts import DEFAULT, POLL_CHUNK

DRAIN_LINE_LIMIT = 64 << 10  # prelude lines longer than this are skipped, not kept
# Bytes of notify lines written but not yet acknowledged, at most. An
# acknowledgement other than a compact one carries the message back (twice:
# message and body), and a Pod disconnects a client that lets 16 MiB of events
# pile up unread.
MAX_IN_FLIGHT = 4 << 20
_EVENT_PREFIX_RE = re.compile(rb'^\s*\{\s*"event"\s*:\s*"([A-Za-z_]+)"')

NOT_ACKNOWLEDGED = "not acknowledged: the message may or may not have been delivered"


class Closed(Failed):
    """The Pod closed the connection."""


class Malformed(Failed):
    """The Pod sent data that is not this protocol."""


class NotRunning(Unreachable):
    """Nothing listens at the socket path (no socket file, or connection refused)."""


class TimedOut(Unreachable):
    """A step did not finish within its timeout."""


class PodFailed(Failed):
    """The Pod answered ``error`` with code ``internal``: it could not do what was
    asked (e.g. write its log: its disk is full). Not a refusal: trying again later
    can succeed."""


class Untrusted(Unreachable):
    """The socket may be another user's: its directory or the process serving it."""


class OverLong:
    """A line longer than the caller's limit: only its prefix was kept."""

    __slots__ = ("prefix", "length")

    def __init__(self, prefix: bytes, length: int):
        self.prefix = prefix
        self.length = length

    def event_name(self) -> str | None:
        m = _EVENT_PREFIX_RE.match(self.prefix)
        return m.group(1).decode() if m else None


def _connect_error(e: OSError, path: str, timeout: float) -> Unreachable:
    if isinstance(e, FileNotFoundError):
        err, reason = NotRunning(f"no socket at {path}: the Pod is not running",
                                 socket_path=path), "no socket"
    elif isinstance(e, ConnectionRefusedError):
        err, reason = NotRunning(f"connection refused at {path}: the Pod is not running "
                                 "(stale socket)", socket_path=path), "connection refused"
    elif isinstance(e, TimeoutError):
        err, reason = TimedOut(f"timed out after {timeout:g}s connecting to {path}",
                               socket_path=path), "timed out connecting"
    else:
        reason = e.strerror or str(e)
        err = Unreachable(f"cannot connect to {path}: {reason}", socket_path=path)
    err.reason = reason
    return err


def _untrusted(path: str, why: str) -> Untrusted:
    err = Untrusted(f"refusing the socket {path}: {why}; another user could be posing as "
                    "the Pod", socket_path=path)
    err.reason = f"untrusted: {why}"
    return err


def _server_uid(sock: _socket.socket) -> int | None:
    """The uid of the process that serves SOCK (Linux SO_PEERCRED: pid, uid, gid)."""
    try:
        cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    except OSError:
        return None
    return int.from_bytes(cred[4:8], sys.byteorder)


def _refusal(data: dict) -> Refused | PodFailed:
    """The error an ``error`` event's DATA stands for."""
    code = data.get("code", "error")
    message = data.get("message", "")
    if code == "internal":
        return PodFailed(f"the Pod failed: {message} ({code})", pod_error=code,
                         pod_message=message)
    return Refused(f"refused by the Pod: {message} ({code})", pod_error=code,
                   pod_message=message)


class Connection:
    """A client connection to a Pod socket with bounded, deadline-driven reads."""

    def __init__(self, sock: _socket.socket, path: str):
        self.sock = sock
        self.path = path
        self.buf = bytearray()
        self._scan = 0  # bytes of buf already known to hold no newline
        self.snapshot: dict | None = None
        self.alerts: list[dict] = []
        self.supports: frozenset = frozenset()  # what the Pod announced (protocol.SUPPORTS)

    # -- lifecycle --------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, timeout: float = DEFAULT,
             keep_snapshot: bool = False) -> "Connection":
        """Connect and drain the prelude; the connection is then ready for a method."""
        conn = cls.connect(path, timeout)
        try:
            conn.drain_prelude(timeout, keep_snapshot=keep_snapshot)
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    def connect(cls, path: str | os.PathLike, timeout: float = DEFAULT) -> "Connection":
        """Connect to PATH if it is ours; a failure's ``reason`` says briefly why (for probes)."""
        path = os.fspath(path)
        for d in socket_dir_chain(Path(os.path.abspath(path)).parent):
            problem = private_dir_problem(d)
            if problem:
                raise _untrusted(path, f"the socket directory {problem}")
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise _connect_error(e, path, timeout) from None
        uid = _server_uid(s)
        if uid != os.getuid():
            s.close()
            raise _untrusted(path, "the kernel does not say which user serves it" if uid is None
                             else f"the process serving it runs as uid {uid}, not as this "
                                  f"user (uid {os.getuid()})")
        return cls(s, path)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ----------------------------------------------------------
    def _recv(self, deadline: float, what: str) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimedOut(f"timed out waiting for {what} from {self.path}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            raise TimedOut(f"timed out waiting for {what} from {self.path}")
        except ConnectionResetError:
            chunk = b""
        except OSError as e:
            raise Failed(f"reading from {self.path}: {e.strerror or e}")
        if not chunk:
            raise Closed(f"the Pod closed the connection before {what}")
        return chunk

    def read_line(self, deadline: float, limit: int = protocol.MAX_EVENT_LINE,
                  what: str = "an event") -> bytes | OverLong:
        """Next non-blank line (without newline), or OverLong if it exceeds LIMIT."""
        buf = self.buf
        while True:
            idx = buf.find(b"\n", self._scan)
            if idx >= 0:
                line = bytes(buf[:idx])
                del buf[:idx + 1]
                self._scan = 0
                if line and not line.isspace():
                    return line
                continue
            self._scan = len(buf)
            if len(buf) > limit:
                return self._discard_rest(deadline, what)
            buf += self._recv(deadline, what)

    def _discard_rest(self, deadline: float, what: str) -> OverLong:
        prefix = bytes(self.buf[:4096])
        length = len(self.buf)
        self.buf.clear()
        self._scan = 0
        while True:
            chunk = self._recv(deadline, what)
            idx = chunk.find(b"\n")
            if idx >= 0:
                length += idx
                self.buf += chunk[idx + 1:]
                return OverLong(prefix, length)
            length += len(chunk)

    def _malformed(self, why: str) -> Malformed:
        return Malformed(f"malformed data from {self.path}: {why}")

    def read_event(self, deadline: float, what: str = "an event") -> tuple[str, dict]:
        line = self.read_line(deadline, what=what)
        if isinstance(line, OverLong):
            raise self._malformed(f"an event line over {protocol.MAX_EVENT_LINE} bytes")
        try:
            return protocol.parse_event(line)
        except protocol.ProtocolError as e:
            raise self._malformed(str(e))

    def drain_prelude(self, timeout: float, keep_snapshot: bool = False) -> None:
        """Read and drop alerts up to and including the snapshot.

        What the Pod announces in its snapshot lands in ``supports``; it is
        read from the line's prefix, so a snapshot too long to keep is still
        skipped without being parsed.
        """
        deadline = time.monotonic() + timeout
        limit = protocol.MAX_EVENT_LINE if keep_snapshot else DRAIN_LINE_LIMIT
        while True:
            line = self.read_line(deadline, limit=limit, what="the connect-time snapshot")
            if isinstance(line, OverLong):
                name = line.event_name()
                if name == "snapshot":
                    self.supports = protocol.announced_in_prefix(line.prefix)
                    return
                if name is None:
                    raise self._malformed("an over-long line that is not an event")
                continue
            try:
                name, data = protocol.parse_event(line)
            except protocol.ProtocolError as e:
                raise self._malformed(str(e))
            if name == "snapshot":
                self.supports = protocol.supports_of(data.get("yoi"))
                if keep_snapshot:
                    self.snapshot = data
                return
            if name == "alert":
                self.alerts.append(data)
            # anything else before the snapshot is not ours to interpret: skip it

    # -- writing ----------------------------------------------------------
    def send(self, data: bytes, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise TimedOut(f"timed out writing to {self.path}")
        except (BrokenPipeError, ConnectionResetError):
            raise Closed("the Pod closed the connection before the method was written")
        except OSError as e:
            raise Failed(f"writing to {self.path}: {e.strerror or e}")

    # -- one exchange -----------------------------------------------------
    def wait_for(self, names: set[str], timeout: float, what: str,
                 match=None) -> tuple[str, dict]:
        """Wait for an event in NAMES (and MATCH(name, data), if given); ``error``
        raises Refused, or PodFailed for code ``internal``."""
        deadline = time.monotonic() + timeout
        while True:
            name, data = self.read_event(deadline, what=what)
            if name == "error":
                raise _refusal(data)
            if name in names and (match is None or match(name, data)):
                return name, data


def request(path: str | os.PathLike, method_line: bytes, answers: set[str],
            timeout: float = DEFAULT, what: str = "the answer",
            match=None) -> tuple[str, dict]:
    """One-shot: connect, drain, write METHOD_LINE, return the first answer event."""
    with Connection.open(path, timeout) as conn:
        conn.send(method_line, timeout)
        return conn.wait_for(answers, timeout, what, match)


ACK_EVENTS = frozenset({"system_item", "ack"})


def acknowledgement(name: str, data: dict, by_id: bool = True) -> object:
    """What the event NAME with DATA acknowledges: a message id (BY_ID), or the
    message itself from a Pod without ids; None if it is no acknowledgement.

    The one place that knows what an acknowledgement looks like: *(ours)* an
    ``ack`` carrying the id (from a Pod that announces ``compact_ack``, to a
    notify that asked for one), or the broadcast ``system_item`` notification
    carrying the id (in ``item``, else in ``data``); from a Pod without ids
    (the original), the first ``system_item`` notification whose ``message``
    equals the one sent, and a retry cannot be told from a new message.
    """
    if name == "ack":
        key = data.get("id") if by_id else None
    elif name != "system_item":
        return None
    else:
        item = data.get("item")
        if by_id:
            key = item["id"] if isinstance(item, dict) and "id" in item else data.get("id")
        elif isinstance(item, dict) and item.get("kind") == "notification":
            key = item.get("message")
        else:
            return None
    return key if isinstance(key, str) else None  # what a hostile Pod sends is no key


def acknowledged_at(data: dict) -> str | None:
    """When the acknowledged message was committed (``at``), from an acknowledgement's DATA."""
    item = data.get("item")
    at = item.get("at") if isinstance(item, dict) else data.get("at")
    return at if isinstance(at, str) else None


def sent_key(line: bytes, supports) -> object:
    """The key (see ``acknowledgement``) of the notify LINE: its id, or its message."""
    params = protocol.parse_method(line)[1]
    return params.get("id") if "id" in supports else params.get("message")


def notify(path: str | os.PathLike, message: str, msg_id: str, source: str | None = None,
           timeout: float = DEFAULT, wait: bool = True) -> dict | None:
    """Send a ``notify`` and, if WAIT, return the acknowledging ``system_item`` data
    (the whole entry: no compact acknowledgement is asked for)."""
    return deliver(path, lambda supports: protocol.notify_method(
        message, msg_id, source, supports - {"compact_ack"}), msg_id, timeout, wait)[0]


def open_for_sending(path: str | os.PathLike, timeout: float) -> Connection:
    """``Connection.open`` whose failures say that nothing was sent."""
    try:
        return Connection.open(path, timeout)
    except TimedOut as e:
        raise TimedOut(f"{e.message} (after {timeout:g}s); nothing was sent", **e.details)
    except (Closed, Malformed) as e:
        raise type(e)(f"{e.message}; nothing was sent", **e.details)


def retry_advice(supports, msg_id: str) -> str:
    """How to retry a message whose delivery is unclear, given what the Pod SUPPORTS."""
    if "id" in supports:
        return f"retry with --id {msg_id}"
    return ("the Pod cannot deduplicate retries (it announces no message ids): "
            "sending again may deliver it twice")


def deliver(path: str | os.PathLike, line, msg_id: str, timeout: float = DEFAULT,
            wait: bool = True) -> tuple[dict | None, frozenset]:
    """Write one ``notify`` and, if WAIT, wait for its acknowledgement.

    LINE is the encoded line, or a function of what the Pod supports
    (``Connection.supports``) that returns it. Returns the acknowledgement's
    data (None without WAIT) and what the Pod supports.

    The acknowledgement is the ``ack`` or the broadcast ``system_item`` carrying
    MSG_ID (or, from a Pod without ids, the message; see ``acknowledgement``),
    which the Pod sends only after the entry is durable in its session log;
    any other broadcast is ignored. Before the write, a failure means nothing
    was sent; after it, the message may or may not have been delivered, and the
    error says how to retry (with the same id, which a Pod with ids commits at
    most once).
    """
    with open_for_sending(path, timeout) as conn:
        supports = conn.supports
        if callable(line):
            line = line(supports)
        by_id = "id" in supports
        want = msg_id if by_id else sent_key(line, supports)  # by id: no need to parse LINE
        retry = retry_advice(supports, msg_id)
        details = {"id": msg_id, "deduplicates_retries": "id" in supports}
        try:
            conn.send(line, timeout)
            if not wait:
                return None, supports
            _, data = conn.wait_for(ACK_EVENTS, timeout, "the acknowledgement",
                                    lambda name, data: acknowledgement(name, data, by_id) == want)
        except Closed:
            raise _written(Closed(f"{NOT_ACKNOWLEDGED}; {retry}", **details))
        except TimedOut as e:
            raise _written(TimedOut(f"{e.message} (after {timeout:g}s): the message may or "
                                    f"may not have been delivered; {retry}", **details))
        except Malformed as e:
            raise _written(Malformed(f"{e.message}; {NOT_ACKNOWLEDGED}; {retry}", **details))
        return data, supports


def _written(e: YoiError) -> YoiError:
    """E, marked as a failure after the message was (perhaps) written: ``e.written``."""
    e.written = True
    return e


def request_drain(path: str | os.PathLike, ids: list[str], timeout: float = DEFAULT) -> dict | None:
    """Ask the Pod at PATH to commit what is queued for it (*ours*: ``drain_queue``).

    Returns the ``queue_drained`` data (``ids``: what became of each of IDS),
    with ``acks``: the ``system_item`` of each of IDS seen on the way (its
    acknowledgement, as for a live send); None if nothing listens at PATH.
    Other failures raise as ``request`` does.
    """
    try:
        conn = Connection.open(path, timeout)
    except NotRunning:
        return None
    with conn:
        conn.send(protocol.method("drain_queue", {"ids": ids}), timeout)
        deadline = time.monotonic() + timeout
        acks = {}
        while True:
            name, data = conn.read_event(deadline, what="the end of the queue's delivery")
            if name == "error":
                raise _refusal(data)
            acked = acknowledgement(name, data, True) if name == "system_item" else None
            if acked in ids:
                acks[acked] = data
            elif name == "queue_drained":
                return {**data, "acks": acks}


# -- pipelined notifications ---------------------------------------------------

UNSENT, SENT, ACKED, REFUSED, FAILED = 0, 1, 2, 3, 4  # FAILED: the Pod could not record it


class Batch:
    """The outcome of ``notify_pipelined``: one status per message, the first failure.

    ``interrupted`` is set when an interrupt (SIGINT, SIGTERM, SIGHUP under
    ``Interrupts``) stopped the run; ``complete`` when the input was read to
    its end."""

    def __init__(self):
        self.ids: list[str] = []
        self.status = bytearray()  # UNSENT / SENT / ACKED / REFUSED / FAILED
        self.acked = 0
        self.refused = 0  # error events received: one per refused (or failed) message
        self.failure: Exception | None = None
        self.supports: frozenset = frozenset()  # what the Pod announced
        self.interrupted = False
        self.complete = False

    def add(self, msg_id: str) -> int:
        self.ids.append(msg_id)
        self.status.append(UNSENT)
        return len(self.ids) - 1

    def with_status(self, status: int) -> list[str]:
        st = self.status
        return [self.ids[i] for i in range(len(st)) if st[i] == status]

    def fail(self, err: Exception) -> None:
        if self.failure is None:
            self.failure = err


class ListFeed:
    """Messages known up front: encoded LINES with ids IDS; LINES may also be a
    function of what the Pod supports that returns them."""

    fd = None  # nothing to wait for

    def __init__(self, lines, ids: list[str]):
        self.lines, self.ids = lines, ids
        self.supports: frozenset = frozenset()  # set once connected
        self.exhausted = False
        self.error: Exception | None = None

    def pull(self) -> list[tuple[str, bytes]]:
        lines = self.lines(self.supports) if callable(self.lines) else self.lines
        self.exhausted = True
        self.lines = []
        return list(zip(self.ids, lines))


class Interrupts:
    """While active (main thread only), SIGINT, SIGTERM and SIGHUP ask a pipelined
    send to stop cleanly instead of killing it: the first one sets ``requested``
    (and wakes its poll through ``fd``), a second one raises KeyboardInterrupt."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.requested = False
        self.fd: int | None = None

    def __enter__(self) -> "Interrupts":
        import signal  # measured: 0.6 ms (enum), paid only by --lines
        if threading.current_thread() is not threading.main_thread():
            return self
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fd = self._r
        self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {}

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        import signal  # see __enter__
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._r)
        os.close(self._w)
        self.fd = None

    def drain(self) -> None:
        try:
            while os.read(self._r, 64):
                pass
        except (BlockingIOError, OSError):
            pass


def notify_pipelined(path: str | os.PathLike, lines=None,
                     ids: list[str] | None = None, timeout: float = DEFAULT,
                     chunk_bytes: int = 256 << 10, in_flight: int = MAX_IN_FLIGHT,
                     feed=None, interrupts: Interrupts | None = None,
                     on_open=None) -> Batch:
    """Send encoded ``notify`` lines over one connection, pipelined.

    The messages are LINES with ids IDS (LINES may be a function of what the Pod
    supports that returns them), or come from FEED as they arrive: an object
    with ``supports`` (set to what the Pod announced once connected, so that
    lines are encoded for it), ``fd`` (a descriptor to wait on for more input, or None),
    ``pull()`` -> ``[(id, line), ...]`` (called when ``fd`` is readable, or at
    once when it is None; it must not block), ``exhausted`` (no more will
    come) and ``error`` (why the input stopped early, e.g. a bad line; it
    becomes the batch's failure). Each message is written as soon as it is
    pulled and the in-flight bound allows.

    One thread, one socket, ``poll``: lines are written in chunks of whole
    lines while events are read, so neither side blocks the other.
    Acknowledgements are matched by id (by message, in order, from a Pod
    without ids: see ``acknowledgement``). The Pod answers
    every method either with the acknowledgement or with an ``error`` event
    (which carries no id and may overtake an acknowledgement still being
    committed), so errors are counted: once acknowledgements plus errors cover
    every message written, the messages left unacknowledged are exactly the
    refused ones. The first error also stops further writing (a refusal here
    means the relation changed; the rest would be refused too). At most
    IN_FLIGHT bytes of lines (but always at least one line) are written and
    not yet acknowledged, so the echoed acknowledgements cannot pile up in the
    Pod faster than they are read; no more input is pulled while the window
    is full.

    With INTERRUPTS, the first interrupt stops pulling input and writing new
    lines; the messages in flight are still awaited (bounded by TIMEOUT), so
    the batch tells exactly what was acknowledged (``Batch.interrupted``).

    The deadline is progress-based: ``TimedOut`` once TIMEOUT seconds pass
    with messages in flight and neither a byte written nor an answer
    received; waiting for input has no deadline. A failure before the first
    write raises; later ones end up in ``Batch.failure``, with the messages in
    doubt left in status SENT. ON_OPEN() is called once connected.
    """
    if feed is None:
        feed = ListFeed(lines or [], ids or [])
    batch = Batch()
    conn = open_for_sending(path, timeout)
    batch.supports = feed.supports = conn.supports
    if on_open is not None:
        on_open()
    pipe = _Pipeline(conn, feed, batch, timeout, chunk_bytes, in_flight, interrupts)
    try:
        pipe.run()
    except (Failed, Unreachable) as e:
        batch.fail(e)
    except OSError as e:
        batch.fail(Failed(f"talking to {conn.path}: {e.strerror or e}"))
    except KeyboardInterrupt:  # a second interrupt: stop waiting, report what is known
        batch.interrupted = True
    finally:
        conn.close()
    return batch


class _Pipeline:
    """The state of one ``notify_pipelined`` run (see there)."""

    def __init__(self, conn: Connection, feed, batch: Batch, timeout: float,
                 chunk_bytes: int, in_flight: int, interrupts: Interrupts | None):
        self.conn, self.feed, self.batch = conn, feed, batch
        self.timeout, self.chunk_bytes, self.in_flight = timeout, chunk_bytes, in_flight
        self.interrupts = interrupts
        self.lines: list[bytes] = []  # by message index; emptied once acknowledged
        self.by_id = "id" in batch.supports
        # by id: id -> message index; from a Pod without ids: message -> the indices
        # sent with it, in order (the same text may repeat)
        self.index: dict = {}
        self.scanned = 0    # bytes of conn.buf known to hold no newline
        self.queued = 0     # messages before this one are written or being written
        self.unacked = 0    # bytes of the lines written (or being written), not acknowledged
        self.pending = 0    # bytes of the lines pulled but not yet written
        self.view = None    # the rest of the chunk being written
        self.stop = False
        self.refusal = None
        self.last = time.monotonic()  # the last progress

    def _pull(self) -> None:
        feed, batch = self.feed, self.batch
        for msg_id, line in feed.pull():
            i = batch.add(msg_id)
            if self.by_id:
                self.index[msg_id] = i
            else:
                self.index.setdefault(sent_key(line, batch.supports), deque()).append(i)
            self.lines.append(line)
            self.pending += len(line)
        if feed.error is not None:  # what came before the bad input is still sent
            batch.fail(feed.error)
        elif feed.exhausted:
            batch.complete = True

    def _wants_input(self) -> bool:
        return (not self.stop and not self.feed.exhausted
                and self.unacked + self.pending < self.in_flight)

    def run(self) -> None:
        import select  # measured: 0.3 ms a one-shot send does not need
        batch = self.batch
        self.conn.sock.setblocking(False)
        poller = select.poll()
        fd = self.conn.sock.fileno()
        in_fd = self.feed.fd
        stop_fd = self.interrupts.fd if self.interrupts is not None else None
        if stop_fd is not None:
            poller.register(stop_fd, select.POLLIN)
        while True:
            if stop_fd is not None and self.interrupts.requested and not batch.interrupted:
                batch.interrupted = self.stop = True
                self.last = time.monotonic()  # the in-flight wait gets a whole TIMEOUT
            if in_fd is None and self._wants_input():
                self._pull()
            self._read_answers()
            if self.view is None:
                self._next_chunk()
            outstanding = self.queued - batch.acked - batch.refused
            if self.view is None and outstanding <= 0 and (
                    self.stop or (self.feed.exhausted and self.queued == len(self.lines))):
                break
            if self.view is not None or outstanding > 0:
                remaining = self.last + self.timeout - time.monotonic()
                if remaining <= 0:
                    raise TimedOut(
                        f"timed out after {self.timeout:g}s without progress sending to "
                        f"{self.conn.path} ({outstanding} in flight, "
                        f"{len(self.lines) - self.queued} not sent)")
            else:
                remaining = POLL_CHUNK  # only waiting for input: no deadline
            poller.register(fd, select.POLLIN | (select.POLLOUT if self.view is not None else 0))
            reading = in_fd is not None and self._wants_input()
            if reading:
                poller.register(in_fd, select.POLLIN)
            ready = poller.poll(min(remaining, POLL_CHUNK) * 1000 + 1)
            if reading:
                poller.unregister(in_fd)
            for ready_fd, events in ready:
                if ready_fd == fd:
                    self._io(events)
                elif ready_fd == in_fd:
                    self._pull()
                elif ready_fd == stop_fd:
                    self.interrupts.drain()
        if self.refusal is not None:
            status, q = batch.status, self.queued
            answered = FAILED if isinstance(self.refusal, PodFailed) else REFUSED
            status[:q] = status[:q].replace(bytes([SENT]), bytes([answered]))
            batch.fail(self.refusal)

    def _read_answers(self) -> None:
        """Handle every complete line received so far."""
        buf = self.conn.buf
        end = buf.rfind(b"\n", self.scanned)
        if end < 0:
            self.scanned = len(buf)  # a long line arrives in pieces: scan each piece once
            if self.scanned > protocol.MAX_EVENT_LINE:
                raise self.conn._malformed(f"an event line over {protocol.MAX_EVENT_LINE} bytes")
            return
        block = bytes(buf[:end])
        del buf[:end + 1]
        self.scanned = 0
        batch, status = self.batch, self.batch.status
        for line in block.split(b"\n"):
            if not line or line.isspace():
                continue
            try:
                name, data = protocol.parse_event(line)
            except protocol.ProtocolError as e:
                raise self.conn._malformed(str(e))
            if name == "error":
                batch.refused += 1
                self.refusal = self.refusal or _refusal(data)
                self.stop = True
                self.last = time.monotonic()
                continue
            i = self._acknowledged(name, data) if name in ACK_EVENTS else None
            if i is not None and status[i] == SENT:
                status[i] = ACKED
                batch.acked += 1
                self.unacked -= len(self.lines[i])
                self.lines[i] = b""  # a long stream keeps only the ids of what is done
                self.last = time.monotonic()

    def _acknowledged(self, name: str, data: dict) -> int | None:
        """The index of the message an event acknowledges, if one of ours."""
        key = acknowledgement(name, data, self.by_id)
        if self.by_id:
            return self.index.get(key)
        waiting = self.index.get(key)
        if waiting and self.batch.status[waiting[0]] == SENT:
            return waiting.popleft()
        return None

    def _next_chunk(self) -> None:
        """Take the next lines to write, within the chunk size and the in-flight bound."""
        lines, q, n = self.lines, self.queued, len(self.lines)
        if self.stop or q >= n or self.unacked >= self.in_flight:
            return
        j, size = q, 0
        while j < n and size < self.chunk_bytes:
            if self.unacked + size + len(lines[j]) > self.in_flight and (j > q or self.unacked):
                break  # (one line is written even if it alone is over the bound)
            size += len(lines[j])
            j += 1
        if j > q:
            self.view = memoryview(b"".join(lines[q:j]))
            self.batch.status[q:j] = bytes([SENT]) * (j - q)
            self.queued = j
            self.unacked += size
            self.pending -= size

    def _io(self, events: int) -> None:
        import select  # loaded by run()
        sock = self.conn.sock
        if events & select.POLLOUT and self.view is not None:
            try:
                sent = sock.send(self.view)
            except BlockingIOError:
                sent = 0
            except (BrokenPipeError, ConnectionResetError):
                raise Closed(f"the Pod closed the connection ({self.conn.path})")
            if sent:
                self.view = self.view[sent:] if sent < len(self.view) else None
                self.last = time.monotonic()
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            try:
                chunk = sock.recv(1 << 18)
            except BlockingIOError:
                return
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(f"the Pod closed the connection ({self.conn.path})")
            self.conn.buf += chunk
