"""The Pod socket protocol (PROTOCOL.md): JSON Lines, adjacently tagged.

Methods are ``{"method": NAME, "params": {...}}`` (no ``params`` when empty);
events are ``{"event": NAME, "data": {...}}`` (no ``data`` when empty). This
module only builds and parses lines; sockets live in ``yoi.client`` and the
runtime.
"""

from __future__ import annotations

import json
import re

from yoi.parsing import MAX_DEPTH, ParseError, json_loads

MAX_METHOD_LINE = 1 << 20        # one method line read by a Pod
MAX_EVENT_LINE = 64 << 20        # one event line read by a client
MAX_METHOD_DEPTH = MAX_DEPTH     # (ours) containers nested in a method line, and so in an entry
MAX_EVENT_DEPTH = 128            # (ours) ... in an event line: a snapshot nests entries 3 deep;
                                 # serde_json, which the original uses, stops at 128 too
SNAPSHOT_ENTRIES = 1000          # log entries in a connect-time snapshot
SNAPSHOT_BYTES = 16 << 20        # (ours) and at most this many bytes of them, so that a
                                 # snapshot fits a client's line and the Pod's memory

MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z", re.ASCII)



class ProtocolError(ValueError):
    """A line that is not a well-formed message of this protocol."""


def _dumps(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def method(name: str, params: dict | None = None) -> bytes:
    obj: dict = {"method": name}
    if params is not None:
        obj["params"] = params
    return _dumps(obj)


def event(name: str, data: dict | None = None) -> bytes:
    obj: dict = {"event": name}
    if data is not None:
        obj["data"] = data
    return _dumps(obj)


def notify_method(message: str, msg_id: str, source: str | None = None) -> bytes:
    """A ``notify`` line: the message, its id and, for a peer message, its source."""
    params = {"message": message, "id": msg_id}
    if source is not None:
        params["source"] = source
    return method("notify", params)


def error_event(code: str, message: str, **extra) -> bytes:
    """An ``error`` event; EXTRA: *(ours)* fields an original client ignores."""
    return event("error", {"code": code, "message": message, **extra})


def parse_line(line: bytes, key: str) -> tuple[str, dict]:
    """Parse one line into (name, params-or-data) where KEY is "method" or "event".

    Any line at all gives a result or ProtocolError: nesting 100,000 deep and
    integers of 5,000 digits included.
    """
    try:
        obj = json_loads(line, MAX_METHOD_DEPTH if key == "method" else MAX_EVENT_DEPTH)
    except ParseError as e:
        raise ProtocolError(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    name = obj.get(key)
    if not isinstance(name, str):
        raise ProtocolError(f"missing {key!r}")
    body = obj.get("params" if key == "method" else "data", {})
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ProtocolError(f"{'params' if key == 'method' else 'data'} is not an object")
    return name, body


def parse_method(line: bytes) -> tuple[str, dict]:
    return parse_line(line, "method")


def parse_event(line: bytes) -> tuple[str, dict]:
    return parse_line(line, "event")


def peer_body(source: str, message: str) -> str:
    """The text an agent sees for a peer message, exactly as the reference."""
    return f"[Peer message from `{source}`]\n{message}"


def is_valid_message_id(value: object) -> bool:
    return isinstance(value, str) and MESSAGE_ID_RE.match(value) is not None
