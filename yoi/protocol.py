"""The Pod socket protocol (PROTOCOL.md): JSON Lines, adjacently tagged.

Methods are ``{"method": NAME, "params": {...}}`` (no ``params`` when empty);
events are ``{"event": NAME, "data": {...}}`` (no ``data`` when empty). This
module only builds and parses lines; sockets live in ``yoi.client`` and the
runtime.
"""

from __future__ import annotations

import json
import re
from json.encoder import encode_basestring as _encode_str  # (C) a str as JSON, not ASCII-only

from yoi.names import NAME_PATTERN, NAME_RE
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

# (ours) What a Pod announces in its snapshot (``data.yoi``, the snapshot's
# first field, so a client reads it from the line's prefix): "id", it echoes
# a notify's ``id`` in the acknowledgement and commits an id at most once;
# "source", it takes a peer message's sender from ``source`` and checks the
# relation itself; "compact_ack", a notify with an ``id`` and
# ``"ack": "compact"`` is acknowledged to its sender by an ``ack`` event
# (``ack_event``) instead of the entry's broadcast. A Pod that announces
# nothing (the original) is answered in the original's terms:
# acknowledgements are matched by message, and a peer message carries its
# sender in a header inside the message.
PROTOCOL_VERSION = 1
SUPPORTS = ("id", "source", "compact_ack")

# (ours) The ``state`` of an ``ack``: the notify committed its message now, or
# an earlier one with the same id had (a retry; nothing was committed again).
# Either way the message is durable in the Pod's log.
ACK_COMMITTED = "committed"
ACK_DUPLICATE = "duplicate"

# The one alert source both generations of the original accept ("pod" became
# "worker"/"engine" in its August 2026 release; "worker" was already known).
ALERT_SOURCE = "worker"

# The text an agent sees for a notification (``item.body``), as the original's Pod
# builds it around the message.
NOTIFICATION_HEAD = "[Notification]\n"
NOTIFICATION_TAIL = ("\n\nThis is a notification, not a blocking request. If you are in "
                     "the middle of a task, continue your current work and address this at "
                     "a natural stopping point.")

_PEER_HEADER_RE = re.compile(rf"\[Peer message from `({NAME_PATTERN})`\]\n", re.ASCII)
_ANNOUNCEMENT_RE = re.compile(
    rb'\s*\{\s*"event"\s*:\s*"snapshot"\s*,\s*"data"\s*:\s*\{\s*"yoi"\s*:\s*(\{[^{}]*\})')



class ProtocolError(ValueError):
    """A line that is not a well-formed message of this protocol."""


# json.dumps with these arguments builds an encoder per call: one, made once
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _dumps(obj: dict) -> bytes:
    return (_encode(obj) + "\n").encode("utf-8")


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


def notify_method(message: str, msg_id: str, source: str | None = None,
                  supports=SUPPORTS, in_reply_to: str | None = None) -> bytes:
    """A ``notify`` line: the message, its id, for a peer message its source and, for
    a reply, the id of the message it answers (IN_REPLY_TO).

    Towards a Pod that SUPPORTS no ``source`` (the original), a peer message
    is written as the original's sender writes it: the header in the message.
    The id and ``in_reply_to`` ride along either way (a Pod that does not know
    them ignores them). A Pod that SUPPORTS ``compact_ack`` is asked for one.
    """
    # Spliced rather than built and dumped (a streaming sender encodes thousands a
    # second): only the message needs JSON escaping. The result is exactly what
    # method("notify", {"message": ..., "id": ..., ["source": ...,] ["in_reply_to": ...,]
    # ["ack": ...]}) writes, for ids and a source that are valid (they need no escaping).
    if not (is_valid_message_id(msg_id) and (source is None or NAME_RE.match(source))
            and (in_reply_to is None or is_valid_message_id(in_reply_to))):
        params = {"message": wire_message(message, source, supports), "id": msg_id}
        if source is not None and "source" in supports:
            params["source"] = source
        if in_reply_to is not None:
            params["in_reply_to"] = in_reply_to
        if "compact_ack" in supports:
            params["ack"] = "compact"
        return method("notify", params)
    parts = [b'{"method":"notify","params":{"message":',
             _encode_str(wire_message(message, source, supports)).encode("utf-8"),
             b',"id":"', msg_id.encode(), b'"']
    if source is not None and "source" in supports:
        parts += (b',"source":"', source.encode(), b'"')
    if in_reply_to is not None:
        parts += (b',"in_reply_to":"', in_reply_to.encode(), b'"')
    if "compact_ack" in supports:
        parts.append(b',"ack":"compact"')
    parts.append(b"}}\n")
    return b"".join(parts)


# An ``ack`` line exactly as ``ack_event`` writes it: nothing in it is escaped, so
# this match reads it as a JSON parser would (a line of any other form is parsed).
_ACK_RE = re.compile(rb'\{"event":"ack","data":\{"id":"([A-Za-z0-9._:-]{1,128})",'
                     rb'"seq":(0|[1-9][0-9]{0,17}),"at":"([0-9A-Za-z:.+-]{1,64})",'
                     rb'"state":"([a-z_]{1,32})"\}\}')


def ack_event(msg_id: str, seq: int, at: str, state: str) -> bytes:
    """*(ours)* The compact acknowledgement of a notify: its id, the ``seq`` and
    ``at`` of the entry that holds the message, and ``state`` (``ACK_COMMITTED``
    or ``ACK_DUPLICATE``). MSG_ID is a valid message id and AT an RFC 3339
    time: neither needs escaping."""
    return b'{"event":"ack","data":{"id":"%s","seq":%d,"at":"%s","state":"%s"}}\n' % (
        msg_id.encode(), seq, at.encode(), state.encode())


def wire_message(message: str, source: str | None, supports=SUPPORTS) -> str:
    """The ``message`` a notify carries for MESSAGE from SOURCE to a Pod that SUPPORTS."""
    if source is not None and "source" not in supports:
        return with_peer_header(source, message)
    return message


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
    m = _ACK_RE.fullmatch(line) if line[:14] == b'{"event":"ack"' else None
    if m is not None:  # (a pipelining sender reads thousands a second)
        return "ack", {"id": m[1].decode(), "seq": int(m[2]), "at": m[3].decode(),
                       "state": m[4].decode()}
    return parse_line(line, "event")


def with_peer_header(source: str, message: str) -> str:
    """MESSAGE as the original's peer sender writes it: its header, then the text."""
    return f"[Peer message from `{source}`]\n{message}"


def peer_header_source(message: str) -> str | None:
    """The sender named by a peer header at the start of MESSAGE (the original's
    form of a peer message), or None if it has none."""
    m = _PEER_HEADER_RE.match(message)
    return m.group(1) if m else None


def notification_body(message: str) -> str:
    """``item.body`` for MESSAGE (as sent in the original's form), exactly as the original."""
    return NOTIFICATION_HEAD + message + NOTIFICATION_TAIL


def announcement() -> dict:
    """The snapshot's ``yoi`` field *(ours)*."""
    return {"protocol": PROTOCOL_VERSION, "supports": list(SUPPORTS)}


def supports_of(value: object) -> frozenset:
    """What an announcement (the snapshot's ``yoi`` value) says the Pod supports."""
    if not isinstance(value, dict):
        return frozenset()
    supports = value.get("supports")
    if not isinstance(supports, list):
        return frozenset()
    return frozenset(s for s in supports if isinstance(s, str))


def announced_in_prefix(prefix: bytes) -> frozenset:
    """What a snapshot line announces, read from its first bytes alone (the line
    itself may be many MiB, and is not parsed)."""
    m = _ANNOUNCEMENT_RE.match(prefix)
    if m is None:
        return frozenset()
    try:
        return supports_of(json.loads(m.group(1)))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return frozenset()


def is_valid_message_id(value: object) -> bool:
    return isinstance(value, str) and MESSAGE_ID_RE.match(value) is not None
