"""A deliberately plain socket client for tests about raw bytes on the wire."""

from __future__ import annotations

import json
import socket
import time


class Raw:
    """Blocking Unix socket with a deadline per read; reads whole lines."""

    def __init__(self, path, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.timeout = timeout
        self.buf = b""

    def read_line(self) -> bytes:
        """The next line, newline included, exactly as sent."""
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError(f"closed; unterminated rest: {self.buf[:200]!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def event(self) -> dict:
        return json.loads(self.read_line())

    def prelude(self) -> tuple[list[dict], dict]:
        """(alerts, snapshot) of the connect-time prelude."""
        alerts = []
        while True:
            ev = self.event()
            if ev["event"] == "snapshot":
                return alerts, ev
            assert ev["event"] == "alert", ev
            alerts.append(ev)

    def pending(self) -> bytes:
        """What has arrived and not been read yet, without waiting for more."""
        out = self.buf
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    chunk = self.sock.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            self.sock.settimeout(self.timeout)
        self.buf = out
        return out

    def send(self, obj) -> None:
        data = obj if isinstance(obj, bytes) else (json.dumps(obj) + "\n").encode()
        self.sock.sendall(data)

    def until(self, name: str, pred=None) -> tuple[dict, list[dict]]:
        """Read events until one named NAME (and PRED(data)); return it and all seen."""
        seen = []
        while True:
            ev = self.event()
            seen.append(ev)
            if ev["event"] == name and (pred is None or pred(ev.get("data"))):
                return ev, seen

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
