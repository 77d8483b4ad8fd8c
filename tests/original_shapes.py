"""The original Rust Yoi's wire shapes, as strict validators (golden fixtures).

Written from the descriptions of the original's ``protocol`` crate: its June
2026 release (the peer-handshake release) and the later one (August 2026),
which renamed Pod to Worker on the wire. They check what serde would: every
required field is there with its type, enums hold only known values (an
unknown method or event name, ``kind``, ``action`` or enum value is refused,
as serde refuses it), and unknown fields are ignored (as serde ignores them).
Where the descriptions of the later release say only what was renamed, its
shape is the June shape with that renaming.

``event(line, generation)`` and ``method(line, generation)`` check one
JSON line and return ``(name, data)``; a mismatch raises ``Mismatch`` naming
where. ``OURS`` are the events only our own clients ask for.
"""

from __future__ import annotations

import json

JUNE, AUGUST = "june", "august"
GENERATIONS = (JUNE, AUGUST)


class Mismatch(AssertionError):
    """A line the original's types would not parse."""


# -- scalars ------------------------------------------------------------------

def _string(v, where):
    if not isinstance(v, str):
        raise Mismatch(f"{where}: expected a string, got {v!r}")


def _boolean(v, where):
    if not isinstance(v, bool):
        raise Mismatch(f"{where}: expected a boolean, got {v!r}")


def _uint(v, where):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise Mismatch(f"{where}: expected an unsigned integer, got {v!r}")


def _enum(*values):
    def check(v, where):
        if v not in values:
            raise Mismatch(f"{where}: unknown variant {v!r}, expected one of {values}")
    return check


def _option(inner):
    def check(v, where):
        if v is not None:
            inner(v, where)
    return check


def _list(inner):
    def check(v, where):
        if not isinstance(v, list):
            raise Mismatch(f"{where}: expected a list, got {v!r}")
        for i, x in enumerate(v):
            inner(x, f"{where}[{i}]")
    return check


def _struct(required: dict, optional: dict | None = None):
    """An object with REQUIRED fields and OPTIONAL ones (absent or null); others ignored."""
    def check(v, where):
        if not isinstance(v, dict):
            raise Mismatch(f"{where}: expected an object, got {v!r}")
        for name, inner in required.items():
            if name not in v:
                raise Mismatch(f"{where}: missing field {name!r}")
            inner(v[name], f"{where}.{name}")
        for name, inner in (optional or {}).items():
            _option(inner)(v.get(name), f"{where}.{name}")
    return check


def _tagged(tag: str, variants: dict):
    """Internally tagged by TAG: VARIANTS maps each tag value to its struct check."""
    def check(v, where):
        if not isinstance(v, dict):
            raise Mismatch(f"{where}: expected an object, got {v!r}")
        if tag not in v:
            raise Mismatch(f"{where}: missing field {tag!r}")
        if v[tag] not in variants:
            raise Mismatch(f"{where}.{tag}: unknown variant {v[tag]!r}, expected one of "
                           f"{tuple(variants)}")
        variants[v[tag]](v, where)
    return check


# -- shared types ------------------------------------------------------------

STATUS = _enum("idle", "running", "paused")
SEGMENT = _tagged("kind", {"text": _struct({"content": _string})})
SYSTEM_ITEM = _tagged("kind", {"notification": _struct({"message": _string,
                                                        "body": _string})})
# The session log entry: tagged by kind, with ts in unix milliseconds.
LOG_ENTRY = _tagged("kind", {
    "system_item": _struct({"ts": _uint, "item": SYSTEM_ITEM}),
    "user_message": _struct({"ts": _uint, "segments": _list(SEGMENT)}),
})
GREETING_FIELDS = {"cwd": _string, "provider": _string, "model": _string,
                   "scope_summary": _string, "tools": _list(lambda v, w: None),
                   "context_window": _uint, "context_tokens": _uint}
ALERT_SOURCES = {JUNE: ("pod", "worker", "compactor", "agents_md"),
                 AUGUST: ("worker", "engine", "compactor", "agents_md")}
PEER_RESULT = _struct({"source": _string, "peer": _string})


def _named(generation: str) -> str:
    return "pod_name" if generation == JUNE else "worker_name"


def _visible(generation: str):
    return _struct({
        _named(generation): _string,
        "visibility": _enum("self_pod", "peer", "spawned_child"),
        "state": _enum("readable", "missing", "corrupt"),
        "live": _struct({"socket_path": _string, "reachable": _boolean},
                        {"status": STATUS, "error": _string}),
        "restore": _struct({"possible": _boolean},
                           {"restore_name": _string, "reason": _string}),
        "comm_registry": _struct({"registered": _boolean}, {"socket_path": _string}),
        "spawned_children": _struct({"count": _uint, "reachable": _uint,
                                     "unreachable": _uint}),
    }, {"active": _boolean, "error": _string})


def _restored(generation: str):
    name = _named(generation)
    return _tagged("action", {
        "already_live": _struct({name: _string, "socket_path": _string}, {"status": STATUS}),
        "restored": _struct({name: _string, "socket_path": _string}),
    })


UNIT = None  # a variant without data


def events(generation: str) -> dict:
    """Event name -> data check (UNIT: none) for GENERATION."""
    table = {
        "alert": _struct({"level": _enum("warn", "error"),
                          "source": _enum(*ALERT_SOURCES[generation]),
                          "message": _string, "timestamp_ms": _uint}),
        "snapshot": _struct({"entries": _list(LOG_ENTRY),
                             "greeting": _struct({_named(generation): _string,
                                                  **GREETING_FIELDS}),
                             "status": STATUS}),
        "status": _struct({"status": STATUS}),
        "system_item": _struct({"item": SYSTEM_ITEM}),
        "user_message": _struct({"segments": _list(SEGMENT)}),
        "invoke_start": _struct({"kind": _enum("user_send", "notify", "pod_event",
                                               "system_reminder", "wakeup")}),
        "text_done": _struct({"text": _string}),
        "run_end": _struct({"result": _enum("finished", "paused", "limit_reached",
                                            "rolled_back")}),
        "peer_registered": _struct({"result": PEER_RESULT}),
        "error": _struct({"code": _enum("already_running", "not_running", "not_paused",
                                        "provider_error", "tool_error", "invalid_request",
                                        "internal"),
                          "message": _string}),
        "shutdown": UNIT,
    }
    if generation == JUNE:
        table["pods_listed"] = _struct({"pods": _list(_visible(JUNE))})
        table["pod_restored"] = _struct({"result": _restored(JUNE)})
    else:
        table["workers_listed"] = _struct({"workers": _list(_visible(AUGUST))})
        table["worker_restored"] = _struct({"result": _restored(AUGUST)})
    return table


def methods(generation: str) -> dict:
    """Method name -> params check (UNIT: none) for GENERATION."""
    name = _struct({"name": _string})
    table = {
        "run": _struct({"input": _list(SEGMENT)}),
        "notify": _struct({"message": _string}),
        "shutdown": UNIT,
        "register_peer": name,
    }
    if generation == JUNE:
        table.update(list_pods=UNIT, restore_pod=name)
    else:
        table.update(list_workers=UNIT, restore_worker=name)
    return table


# Our own events, sent only to the client that asked with our own method.
OURS = {"peer_unregistered": _struct({"result": PEER_RESULT})}


def _adjacent(line: bytes, tag: str, content: str, table: dict) -> tuple[str, dict | None]:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise Mismatch(f"not JSON: {e}: {line[:200]!r}")
    if not isinstance(obj, dict):
        raise Mismatch(f"not an object: {line[:200]!r}")
    name = obj.get(tag)
    if name not in table:
        raise Mismatch(f"unknown variant {name!r} of {tag!r}: {line[:200]!r}")
    check = table[name]
    if check is UNIT:
        if content in obj:
            raise Mismatch(f"{name}: unexpected {content!r} for a variant without data")
        return name, None
    if content not in obj:
        raise Mismatch(f"{name}: missing {content!r}")
    check(obj[content], f"{name}.{content}")
    return name, obj[content]


def event(line: bytes, generation: str = JUNE, ours: bool = False) -> tuple[str, dict | None]:
    """Check one event line as GENERATION's client would parse it (and, with OURS,
    allow our own answers)."""
    table = events(generation)
    if ours:
        table.update(OURS)
    return _adjacent(line, "event", "data", table)


def method(line: bytes, generation: str = JUNE) -> tuple[str, dict | None]:
    """Check one method line as GENERATION's Pod would parse it."""
    return _adjacent(line, "method", "params", methods(generation))
