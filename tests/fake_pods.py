"""Scripted fake Pod servers: hostile peers for the socket client's tests.

A ``FakePod`` listens on a real Unix socket and runs a script for every
connection in its own thread. Scripts are plain functions of a ``Peer`` (the
server end of one connection); the ones below are the behaviours the tests
need, from a correct Pod to one that never answers. A fake is never a
stand-in for the real runtime: it plays what a real Pod must not do, or
checks what a client must do (``Peer.prelude`` drops a method written before
the snapshot ended, like the reference Pod whose sender lost messages).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from yoi import protocol
from yoi.state import make_private_dir

HANG_LIMIT = 60.0  # a hanging script gives up after this, whatever happens


class Peer:
    """The server end of one client connection."""

    def __init__(self, pod: "FakePod", sock: socket.socket):
        self.pod = pod
        self.sock = sock
        self.buf = bytearray()

    # -- writing ---------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def event(self, name: str, data: dict | None = None) -> None:
        self.send(protocol.event(name, data))

    def prelude(self, alerts: int = 1, snapshot_bytes: int = 0, announce: bool = True,
                entries: list[dict] | None = None) -> None:
        """Alerts, then one snapshot of about SNAPSHOT_BYTES; drop early writes.

        With ANNOUNCE the snapshot says what it supports as our Pods do
        (``data.yoi`` first); without, it is the original's snapshot. ENTRIES
        are its history (default: one notification of the filler).

        The snapshot line is written in two parts. Between them the client
        cannot have read the whole snapshot yet, so anything it has written
        by then was written too early: it is read and discarded (recorded in
        ``FakePod.early``), as the reference Pod effectively did.
        """
        for i in range(alerts):
            self.event("alert", {"level": "warn", "source": "pod",
                                 "message": f"replayed alert {i}", "timestamp_ms": 0})
        filler = "x" * max(0, snapshot_bytes)
        if entries is None:
            entries = [{"kind": "system_item", "ts": 1764590000000, "item": {
                "kind": "notification", "message": filler, "body": filler}}]
        data = {"yoi": protocol.announcement()} if announce else {}
        data.update({
            "entries": entries,
            "greeting": {"pod_name": self.pod.name, "cwd": "/", "provider": "fake",
                         "model": "fake", "scope_summary": "", "tools": [],
                         "context_window": 0, "context_tokens": 0},
            "status": "idle"})
        line = protocol.event("snapshot", data)
        cut = len(line) // 2
        self.send(line[:cut])
        time.sleep(0.02)
        early = self._take_pending()
        if early:
            self.pod.early.append(early)
        self.send(line[cut:])

    def _take_pending(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return out
            if not chunk:
                return out
            out += chunk

    def ack(self, params: dict, msg_id: str | None = None) -> None:
        """The acknowledging ``system_item`` for a notify with PARAMS."""
        message = params.get("message", "")
        source = params.get("source")
        item = {"kind": "notification", "message": message,
                "body": protocol.notification_body(
                    protocol.with_peer_header(source, message) if source else message),
                "id": msg_id if msg_id is not None else params.get("id"),
                "at": "2026-11-27T10:00:00Z"}
        if source:
            item["source"] = source
        self.event("system_item", {"item": item})

    # -- reading ---------------------------------------------------------
    def read_method(self, timeout: float = 10.0) -> tuple[str, dict] | None:
        """The next method line, parsed; None at EOF or after TIMEOUT."""
        line = self.read_line(timeout)
        if line is None:
            return None
        name, params = protocol.parse_method(line)
        self.pod.methods.append((name, params))
        return name, params

    def read_line(self, timeout: float = 10.0) -> bytes | None:
        """The next non-blank line as received; None at EOF or after TIMEOUT."""
        deadline = time.monotonic() + timeout
        while True:
            idx = self.buf.find(b"\n")
            if idx >= 0:
                line = bytes(self.buf[:idx])
                del self.buf[:idx + 1]
                if not line.strip():
                    continue
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.pod.stopping.is_set():
                return None
            self.sock.settimeout(min(remaining, 0.2))
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def hang(self) -> None:
        """Keep the connection open, saying nothing, until the fake stops."""
        self.pod.stopping.wait(HANG_LIMIT)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class FakePod:
    """A threaded Unix-socket server running SCRIPT(peer) for every connection."""

    def __init__(self, path: Path, script, name: str = "fake"):
        self.path = Path(path)
        self.script = script
        self.name = name
        self.methods: list[tuple[str, dict]] = []
        self.early: list[bytes] = []
        self.errors: list[BaseException] = []
        self.connections = 0
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._peers: list[Peer] = []
        self._listener: socket.socket | None = None

    def start(self) -> "FakePod":
        make_private_dir(self.path.parent)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.fspath(self.path))
        s.listen(64)
        s.settimeout(0.1)
        self._listener = s
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            peer = Peer(self, conn)
            self._peers.append(peer)
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(peer,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, peer: Peer) -> None:
        try:
            self.script(peer)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: not the script's fault
        except BaseException as e:  # surfaced by stop() so a broken fake fails its test
            self.errors.append(e)
        finally:
            peer.close()

    def stop(self) -> None:
        self.stopping.set()
        if self._listener is not None:
            self._listener.close()
        for peer in list(self._peers):
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(10)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def notified_ids(self) -> list[str]:
        return [p.get("id") for name, p in self.methods if name == "notify"]

    def __enter__(self) -> "FakePod":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- scripts ---------------------------------------------------------------

def good(peer: Peer, snapshot_bytes: int = 0) -> None:
    """A correct Pod: prelude first, then acknowledge every notify by its id."""
    peer.prelude(snapshot_bytes=snapshot_bytes)
    while True:
        got = peer.read_method()
        if got is None:
            return
        name, params = got
        if name == "notify":
            peer.ack(params)
        else:
            peer.event("error", {"code": "invalid_request", "message": f"unknown {name}"})


def good_big_snapshot(peer: Peer) -> None:
    good(peer, snapshot_bytes=2 << 20)


def chatty(peer: Peer) -> None:
    """Correct, but floods every client with unrelated broadcasts around each ack.

    Its writes block while the client does not read: a client that writes
    everything before reading deadlocks against it.
    """
    peer.prelude()
    noise = protocol.event("system_item", {"item": {
        "kind": "notification", "message": "n" * 2000, "body": "n" * 2000,
        "id": "someone-else", "at": "2026-11-27T10:00:00Z"}}) * 8
    while True:
        got = peer.read_method()
        if got is None:
            return
        peer.send(noise)
        peer.ack(got[1])


def no_snapshot(peer: Peer) -> None:
    peer.event("alert", {"level": "warn", "source": "pod", "message": "starting",
                         "timestamp_ms": 0})
    peer.hang()


def garbage(peer: Peer) -> None:
    peer.send(b"this is not JSON at all\n")
    peer.hang()


def garbage_after_method(peer: Peer) -> None:
    peer.prelude()
    peer.read_method()
    peer.send(b"{\"event\": \"system_item\", \"data\": [not json\n")
    peer.hang()


DEEP_EVENT = b'{"event":"alert","data":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n"
# Under the 64 KiB a sender's prelude drain parses (longer lines are skipped unread).
DEEP_PRELUDE = b'{"event":"alert","data":{"x":' + b"[" * 60_000 + b"]" * 10 + b"}}\n"
HUGE_INT_EVENT = b'{"event":"system_item","data":{"item":{"id":' + b"9" * 5000 + b"}}}\n"


def hostile_prelude(line: bytes):
    """Send LINE where the prelude belongs, then hang."""

    def script(peer: Peer) -> None:
        peer.send(line)
        peer.hang()

    return script


def hostile_answer(line: bytes):
    """A correct prelude, then LINE as the answer to the first method."""

    def script(peer: Peer) -> None:
        peer.prelude()
        peer.read_method()
        peer.send(line)
        peer.hang()

    return script


def close_after_snapshot(peer: Peer) -> None:
    peer.prelude()


def close_after_method(peer: Peer) -> None:
    peer.prelude()
    peer.read_method()


def ack_other_id(peer: Peer) -> None:
    peer.prelude()
    got = peer.read_method()
    if got:
        peer.ack(got[1], msg_id="some-other-id")
    peer.hang()


def answer_error(peer: Peer) -> None:
    peer.prelude()
    while peer.read_method() is not None:
        peer.event("error", {"code": "invalid_request",
                             "message": "source is not a peer of this Pod"})


def silent(peer: Peer) -> None:
    """Prelude, then read methods and never answer."""
    peer.prelude()
    while peer.read_method() is not None:
        pass


def close_after(n: int, refuse: bool = False):
    """Acknowledge N notifies, then close (or, with REFUSE, refuse the rest)."""

    def script(peer: Peer) -> None:
        peer.prelude()
        count = 0
        while True:
            got = peer.read_method()
            if got is None:
                return
            if count < n:
                peer.ack(got[1])
            elif refuse:
                peer.event("error", {"code": "invalid_request",
                                     "message": "source is not a peer of this Pod"})
            else:
                return
            count += 1

    return script


# -- the original Yoi's Pod --------------------------------------------------------

def original_body(message: str) -> str:
    """``item.body`` as the original's Pod writes it."""
    return ("[Notification]\n" + message + "\n\nThis is a notification, not a blocking "
            "request. If you are in the middle of a task, continue your current work and "
            "address this at a natural stopping point.")


def original_notification(message: str) -> dict:
    return {"kind": "notification", "message": message, "body": original_body(message)}


# Its history: a peer message (sent by the original's sender: the header in the
# message), then a user message.
ORIGINAL_HISTORY = [
    {"kind": "system_item", "ts": 1764590000000,
     "item": original_notification("[Peer message from `A`]\nearlier, from A")},
    {"kind": "user_message", "ts": 1764590060000,
     "segments": [{"kind": "text", "content": "do the thing"}]},
]


def original(peer: Peer, answer: bool = True, decoys_only: bool = False,
             reverse: bool = False) -> None:
    """The original's Pod: no announcement, its own snapshot entries, and a ``notify``
    answered with a ``system_item`` echoing the message and no id (after an unrelated
    one, which a client must not take for its acknowledgement). Every method line
    is checked against the original's types: a line it would not parse fails the
    test (``FakePod.errors``). DECOYS_ONLY: only the unrelated one, and a hostile
    one whose message is no string. REVERSE: the notifies of a stream answered
    last first, each twice, once it ends."""
    import original_shapes
    peer.prelude(announce=False, entries=ORIGINAL_HISTORY)
    held = []
    while True:
        line = peer.read_line(timeout=0.5 if held else 10.0)
        if line is None:
            for params in reversed(held):
                for _ in range(2):
                    peer.event("system_item", {"item": original_notification(params["message"])})
            if held and not peer.pod.stopping.is_set():
                held = []
                continue
            return
        name, params = original_shapes.method(line)
        peer.pod.methods.append((name, params))
        if name == "notify" and decoys_only:
            peer.event("system_item", {"item": original_notification("someone else's")})
            peer.event("system_item", {"item": {**original_notification("x"),
                                                "message": {"a": 1}}})
        elif name == "notify" and reverse:
            held.append(params)
        elif name == "notify" and answer:
            peer.event("system_item", {"item": original_notification("someone else's")})
            peer.event("system_item", {"item": original_notification(params["message"])})
        elif name != "notify":
            peer.event("error", {"code": "invalid_request",
                                 "message": f"not in this fake: {name}"})


def original_decoys(peer: Peer) -> None:
    """The original's Pod that answers only with what acknowledges nothing sent."""
    original(peer, decoys_only=True)


def original_reversed(peer: Peer) -> None:
    """The original's Pod that acknowledges a stream out of order, each twice."""
    original(peer, reverse=True)


def original_silent(peer: Peer) -> None:
    """The original's Pod that reads and never acknowledges."""
    original(peer, answer=False)


def original_then_shutdown(peer: Peer) -> None:
    """The original's Pod broadcasting one peer message, then shutting down."""
    peer.prelude(announce=False, entries=ORIGINAL_HISTORY)
    peer.event("system_item", {"item": original_notification(
        "[Peer message from `A`]\nlive, from A")})
    peer.event("shutdown")


def read_log(path: Path) -> list[dict]:
    """A JSON Lines file as a list of objects (helper for log assertions)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def fake(state):
    """Start fake Pods: ``fake(script, name="B")`` creates Pod NAME if needed and
    serves SCRIPT on its socket path. All are stopped afterwards; a script that
    crashed fails the test."""
    from yoi import store
    started: list[FakePod] = []

    def start(script, name: str = "B") -> FakePod:
        store.create(state, name, exist_ok=True)
        pod = FakePod(state.default_socket_path(name), script, name).start()
        started.append(pod)
        return pod

    yield start
    for pod in started:
        pod.stop()
    for pod in started:
        assert not pod.errors, pod.errors
