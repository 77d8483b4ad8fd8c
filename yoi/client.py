"""The raw socket helper: every client in the project talks to a Pod through this.

A one-shot exchange is: connect (bounded), drain the connect-time prelude (any
number of ``alert`` events, then exactly one ``snapshot``; a snapshot of many
MiB is read and dropped without holding more than a small prefix of it), write
one method, then wait for the answer event, ignoring unrelated broadcasts.
Writing before the prelude is drained was the reference's first review blocker.

Every step has its own deadline. Failures map onto the project's exit codes:
no socket / refused / timed out -> ``Unreachable`` (5); refused by the Pod's
``error`` event -> ``Refused`` (4); closed early or malformed data ->
``Failed`` (1).
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass

from yoi import protocol
from yoi.errors import Failed, Refused, Unreachable

DRAIN_LINE_LIMIT = 64 << 10  # prelude lines longer than this are skipped, not kept
_EVENT_PREFIX_RE = re.compile(rb'^\s*\{\s*"event"\s*:\s*"([A-Za-z_]+)"')


class Closed(Failed):
    """The Pod closed the connection."""


@dataclass
class OverLong:
    """A line longer than the caller's limit: only its prefix was kept."""

    prefix: bytes
    length: int

    def event_name(self) -> str | None:
        m = _EVENT_PREFIX_RE.match(self.prefix)
        return m.group(1).decode() if m else None


class Connection:
    """A client connection to a Pod socket with bounded, deadline-driven reads."""

    def __init__(self, sock: socket.socket, path: str):
        self.sock = sock
        self.path = path
        self.buf = bytearray()
        self.snapshot: dict | None = None
        self.alerts: list[dict] = []

    # -- lifecycle --------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, timeout: float = protocol.DEFAULT_TIMEOUT,
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
    def connect(cls, path: str | os.PathLike, timeout: float = protocol.DEFAULT_TIMEOUT
                ) -> "Connection":
        path = os.fspath(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except FileNotFoundError:
            s.close()
            raise Unreachable(f"no socket at {path}: the Pod is not running", socket_path=path)
        except ConnectionRefusedError:
            s.close()
            raise Unreachable(f"connection refused at {path}: the Pod is not running "
                              "(stale socket)", socket_path=path)
        except socket.timeout:
            s.close()
            raise Unreachable(f"timed out after {timeout:g}s connecting to {path}",
                              socket_path=path)
        except OSError as e:
            s.close()
            raise Unreachable(f"cannot connect to {path}: {e.strerror or e}", socket_path=path)
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
            raise Unreachable(f"timed out waiting for {what} from {self.path}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except socket.timeout:
            raise Unreachable(f"timed out waiting for {what} from {self.path}")
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
        while True:
            idx = self.buf.find(b"\n")
            if idx >= 0:
                line = bytes(self.buf[:idx])
                del self.buf[:idx + 1]
                if line.strip():
                    return line
                continue
            if len(self.buf) > limit:
                return self._discard_rest(deadline, what)
            self.buf += self._recv(deadline, what)

    def _discard_rest(self, deadline: float, what: str) -> OverLong:
        prefix = bytes(self.buf[:4096])
        length = len(self.buf)
        self.buf.clear()
        while True:
            chunk = self._recv(deadline, what)
            idx = chunk.find(b"\n")
            if idx >= 0:
                length += idx
                self.buf += chunk[idx + 1:]
                return OverLong(prefix, length)
            length += len(chunk)

    def read_event(self, deadline: float, what: str = "an event") -> tuple[str, dict]:
        line = self.read_line(deadline, what=what)
        if isinstance(line, OverLong):
            raise Failed(f"malformed data from {self.path}: an event line over "
                         f"{protocol.MAX_EVENT_LINE} bytes")
        try:
            return protocol.parse_event(line)
        except protocol.ProtocolError as e:
            raise Failed(f"malformed data from {self.path}: {e}")

    def drain_prelude(self, timeout: float, keep_snapshot: bool = False) -> None:
        """Read and drop alerts up to and including the snapshot."""
        deadline = time.monotonic() + timeout
        limit = protocol.MAX_EVENT_LINE if keep_snapshot else DRAIN_LINE_LIMIT
        while True:
            line = self.read_line(deadline, limit=limit, what="the connect-time snapshot")
            if isinstance(line, OverLong):
                name = line.event_name()
                if name == "snapshot":
                    return
                if name is None:
                    raise Failed(f"malformed data from {self.path}: an over-long line "
                                 "that is not an event")
                continue
            try:
                name, data = protocol.parse_event(line)
            except protocol.ProtocolError as e:
                raise Failed(f"malformed data from {self.path}: {e}")
            if name == "snapshot":
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
        except socket.timeout:
            raise Unreachable(f"timed out writing to {self.path}")
        except (BrokenPipeError, ConnectionResetError):
            raise Closed("the Pod closed the connection before the method was written")
        except OSError as e:
            raise Failed(f"writing to {self.path}: {e.strerror or e}")

    # -- one exchange -----------------------------------------------------
    def wait_for(self, names: set[str], timeout: float, what: str,
                 match=None) -> tuple[str, dict]:
        """Wait for an event in NAMES (and MATCH(data), if given); ``error`` raises Refused."""
        deadline = time.monotonic() + timeout
        while True:
            name, data = self.read_event(deadline, what=what)
            if name == "error":
                code = data.get("code", "error")
                raise Refused(f"refused by the Pod: {data.get('message', '')} ({code})",
                              pod_error=code)
            if name in names and (match is None or match(data)):
                return name, data


def request(path: str | os.PathLike, method_line: bytes, answers: set[str],
            timeout: float = protocol.DEFAULT_TIMEOUT, what: str = "the answer",
            match=None) -> tuple[str, dict]:
    """One-shot: connect, drain, write METHOD_LINE, return the first answer event."""
    with Connection.open(path, timeout) as conn:
        conn.send(method_line, timeout)
        return conn.wait_for(answers, timeout, what, match)


def notify_ack_matches(msg_id: str):
    """Predicate: a ``system_item`` whose id is MSG_ID (in ``item`` or in ``data``)."""

    def match(data: dict) -> bool:
        item = data.get("item")
        if isinstance(item, dict) and item.get("id") == msg_id:
            return True
        return data.get("id") == msg_id

    return match


def notify(path: str | os.PathLike, message: str, msg_id: str, source: str | None = None,
           timeout: float = protocol.DEFAULT_TIMEOUT, wait: bool = True) -> dict | None:
    """Send a ``notify`` and, if WAIT, return the acknowledging ``system_item`` data.

    The acknowledgement is the broadcast ``system_item`` carrying MSG_ID, which
    the Pod sends only after the entry is durable in its session log.
    """
    params: dict = {"message": message, "id": msg_id}
    if source is not None:
        params["source"] = source
    with Connection.open(path, timeout) as conn:
        conn.send(protocol.method("notify", params), timeout)
        if not wait:
            return None
        try:
            _, data = conn.wait_for({"system_item"}, timeout, "the acknowledgement",
                                    notify_ack_matches(msg_id))
        except Closed:
            raise Failed("not acknowledged: the message may or may not have been delivered; "
                         f"retry with --id {msg_id}", id=msg_id)
        return data
