"""metadata.toml: parse, check and serialise a Pod's current-state record.

A record is kept as the plain dict ``tomllib`` returns, so keys this version
does not know survive a rewrite untouched.

Peer consent lives here too, as plain functions on a record: the policy
``accept_peers`` (``"open"``, ``"ask"`` or ``"never"``; records written
before it was a policy hold ``true``/``false``, read as ``"open"``/``"never"``
and kept as they are until the policy is changed), the request lifetime
``peer_request_ttl`` (seconds) and the ``[[peer_requests]]`` still pending
and ``[[peer_denials]]`` recorded in the record of the Pod that was asked.
An expired request is, to every reader, no request.

So does the family a Pod belongs to: a child Pod's record names its
``parent`` and its ``scope`` (``"parent"`` or ``"peers"``: what it may reach
besides its parent and its own children), and the parent's record lists it
in ``[[children]]``. Like a peer relation, a parent/child relation is real
only when both records hold it. ``relation`` is the one check of who may
message whom (peers, parent and child, a child's scope), used by the sender
and by the receiving Pod alike.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from pathlib import Path

from yoi.errors import CorruptMetadata, UsageError
from yoi.names import is_valid_name
from yoi.parsing import ParseError, toml_loads
from yoi.timeouts import MAX as MAX_SECONDS

SCHEMA = 1
POLICIES = ("open", "ask", "never")
DEFAULT_PEER_REQUEST_TTL = 86400  # seconds a peer request stays pending: 24 h
# The bounds of a Pod's queue of messages waiting for it to start (yoi.offline):
# setting -> (default, highest allowed, unit).
QUEUE_LIMITS = {"queue_max_messages": (10_000, 1_000_000_000, "messages"),
                "queue_max_bytes": (64 << 20, 1 << 40, "bytes")}


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def new_record(name: str, exec_cmd: str | None = None, cwd: str | None = None,
               accept_peers: str | bool = "open", peer_request_ttl: float | None = None,
               handler_timeout: float | None = None,
               labels: dict[str, str] | None = None, queue_max_messages: int | None = None,
               queue_max_bytes: int | None = None) -> dict:
    record: dict = {
        "schema": SCHEMA,
        "pod_name": name,
        "created_at": utcnow(),
        "accept_peers": policy_value(accept_peers),
        "runtime": {},
        "peers": [],
    }
    if peer_request_ttl is not None:
        record["peer_request_ttl"] = ttl_value(peer_request_ttl)
    if exec_cmd is not None:
        record["runtime"]["exec"] = exec_cmd
    if cwd is not None:
        record["runtime"]["cwd"] = cwd
    if handler_timeout is not None:
        record["runtime"]["handler_timeout"] = check_seconds(handler_timeout,
                                                             "the handler timeout")
    if labels:
        record["labels"] = dict(sorted(labels.items()))
    for key, value in (("queue_max_messages", queue_max_messages),
                       ("queue_max_bytes", queue_max_bytes)):
        if value is not None:
            record[key] = queue_limit_value(key, value)
    return record


def queue_limit_value(key: str, value) -> int:
    """VALUE as the queue limit KEY (a whole number within its bounds), else UsageError."""
    _, top, unit = QUEUE_LIMITS[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise UsageError(f"{key} must be a whole number of {unit} from 1 to {top}, "
                         f"not {value!r}")
    return value


def queue_limits(doc: dict) -> tuple[int, int]:
    """(most messages, most bytes) the queue of the Pod whose record is DOC may hold."""
    return tuple(doc.get(key, default) for key, (default, _, _) in QUEUE_LIMITS.items())


# -- labels: KEY=VALUE tags a job puts on its Pods (`yoi pod list --label`) ----------

LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}\Z", re.ASCII)
LABEL_VALUE_MAX = 256


def label_problem(key: object, value: object) -> str | None:
    """What is wrong with the label KEY=VALUE, or None."""
    if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
        return (f"label key {key!r}: use 1-63 characters of [A-Za-z0-9._/-], "
                "starting with a letter or digit")
    if not isinstance(value, str):
        return f"label {key}: the value must be a string, not {value!r}"
    if len(value) > LABEL_VALUE_MAX or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return (f"label {key}: the value must be at most {LABEL_VALUE_MAX} characters "
                "without control characters")
    return None


def labels_of(doc: dict | None) -> dict[str, str]:
    labels = (doc or {}).get("labels")
    return dict(labels) if isinstance(labels, dict) else {}


def has_labels(doc: dict | None, wanted: dict[str, str]) -> bool:
    """True if DOC carries every label in WANTED with the same value."""
    have = labels_of(doc)
    return all(have.get(k) == v for k, v in wanted.items())


def settings_of(doc: dict) -> dict:
    """The settings a user gives (create, config, yoi.toml), as stored in DOC."""
    runtime = doc.get("runtime") or {}
    return {"exec": runtime.get("exec"), "cwd": runtime.get("cwd"),
            "accept_peers": peer_policy(doc), "peer_request_ttl": doc.get("peer_request_ttl"),
            "handler_timeout": runtime.get("handler_timeout"), "labels": labels_of(doc),
            "queue_max_messages": doc.get("queue_max_messages"),
            "queue_max_bytes": doc.get("queue_max_bytes")}


def setting_differences(doc: dict, wanted: dict) -> list[dict]:
    """The settings in WANTED (keys of ``settings_of``) whose stored value differs."""
    have = settings_of(doc)
    return [{"setting": k, "stored": have[k], "given": v}
            for k, v in wanted.items() if have[k] != v]


def parse(text: bytes | str, path: Path | str, expect_name: str | None = None) -> dict:
    """Parse and check a record; raise CorruptMetadata naming PATH on any problem."""
    doc = loads(text, path)
    problem = schema_problem(doc, expect_name)
    if problem:
        raise CorruptMetadata(f"{path}: {problem}", path=str(path))
    return doc


def loads(text: bytes | str, path: Path | str, what: str = "") -> dict:
    """Decode and parse a TOML state file without the schema check (the one place
    that does: records and journals alike); CorruptMetadata naming PATH, WHAT
    (e.g. "journal ") saying what the file is."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text.count(b"\n", 0, e.start) + 1
            column = e.start - text.rfind(b"\n", 0, e.start)
            raise CorruptMetadata(f"{path}: {what}not UTF-8 (at line {line}, column {column})",
                                  path=str(path), line=line, column=column)
    try:
        return toml_loads(text)
    except ParseError as e:
        raise CorruptMetadata(f"{path}: {what}does not parse: {e}", path=str(path),
                              **_line_col(str(e)))


def _line_col(message: str) -> dict:
    m = re.search(r"line (\d+), column (\d+)", message)
    return {"line": int(m.group(1)), "column": int(m.group(2))} if m else {}


# The [runtime] hints and settings, and the types every reader of them expects.
RUNTIME_TYPES = {"pid": (int, "an integer"), "socket_path": (str, "a string"),
                 "exec": (str, "a string"), "cwd": (str, "a string"),
                 "handler_timeout": ((int, float), "a number of seconds above 0 and at "
                                                   f"most {MAX_SECONDS:.0f}")}


def schema_problem(doc: dict, expect_name: str | None = None) -> str | None:
    """Describe the first schema violation in DOC, or return None."""
    if doc.get("schema") != SCHEMA:
        return f"unsupported schema {doc.get('schema')!r} (expected {SCHEMA})"
    name = doc.get("pod_name")
    if not is_valid_name(name):
        return f"pod_name {name!r} is missing or not a valid Pod name"
    if expect_name is not None and name != expect_name:
        return f"pod_name {name!r} does not match its directory {expect_name!r}"
    if "accept_peers" in doc and not (isinstance(doc["accept_peers"], bool)
                                      or doc["accept_peers"] in POLICIES):
        return (f"accept_peers must be \"open\", \"ask\" or \"never\" (or true/false), "
                f"not {doc['accept_peers']!r}")
    if "peer_request_ttl" in doc and seconds_problem(doc["peer_request_ttl"]):
        return (f"peer_request_ttl must be a number of seconds above 0 and at most "
                f"{MAX_SECONDS:.0f}, not {doc['peer_request_ttl']!r}")
    for key in QUEUE_LIMITS:
        if key in doc:
            try:
                queue_limit_value(key, doc[key])
            except UsageError as e:
                return e.message
    if "runtime" in doc and not isinstance(doc["runtime"], dict):
        return "runtime must be a table"
    for key, (kind, what) in RUNTIME_TYPES.items():
        value = (doc.get("runtime") or {}).get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)
                                  or (key == "handler_timeout" and seconds_problem(value))):
            return f"runtime.{key} must be {what}, not {value!r}"
    labels = doc.get("labels", {})
    if not isinstance(labels, dict):
        return "labels must be a table"
    for key, value in labels.items():
        problem = label_problem(key, value)
        if problem:
            return problem
    problem = _named_tables_problem(doc, "peers", _is_peer_name) or _family_problem(doc)
    if problem:
        return problem
    for key, stamps in (("peer_requests", ("requested_at", "expires_at")),
                        ("peer_denials", ("denied_at",))):
        problem = _table_list_problem(doc, key, stamps)
        if problem:
            return problem
    return None


# Valid names met in peer lists: a listing of many records checks each name once,
# not once in every record that lists it (bounded: a long-lived Pod reads records too).
_peer_names_seen: set[str] = set()
PEER_NAMES_SEEN = 1 << 16


def _is_peer_name(name: object) -> bool:
    if type(name) is str and name in _peer_names_seen:
        return True
    if not is_valid_name(name):
        return False
    if len(_peer_names_seen) >= PEER_NAMES_SEEN:
        _peer_names_seen.clear()
    _peer_names_seen.add(name)
    return True


def _named_tables_problem(doc: dict, key: str, valid=is_valid_name) -> str | None:
    """What is wrong with DOC[KEY] as an array of tables that each name a Pod."""
    entries = doc.get(key, [])
    if not isinstance(entries, list):
        return f"{key} must be an array of tables"
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not valid(e.get("pod_name")):
            return f"{key}[{i}] has no valid pod_name"
    return None


def _table_list_problem(doc: dict, key: str, stamps: tuple[str, ...]) -> str | None:
    problem = _named_tables_problem(doc, key)
    if problem:
        return problem
    for i, e in enumerate(doc.get(key, [])):
        if not isinstance(e.get("id"), str) or not REQUEST_ID_RE.match(e["id"]):
            return f"{key}[{i}] has no valid id"
        for stamp in stamps:
            if not _is_utc_time(e.get(stamp)):
                return f"{key}[{i}].{stamp} must be a date-time with a UTC offset"
    return None


def _is_utc_time(value) -> bool:
    return isinstance(value, _dt.datetime) and value.tzinfo is not None


def seconds_problem(value) -> bool:
    """Whether VALUE is not a stored number of seconds: above 0, at most MAX_SECONDS
    (the range ``yoi.timeouts.parse`` gives every duration)."""
    return (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (math.isfinite(value) and 0 < value <= MAX_SECONDS))


def check_seconds(value, what: str):
    """VALUE if it can be stored as seconds; else UsageError naming WHAT."""
    if seconds_problem(value):
        raise UsageError(f"{what} must be a number of seconds above 0 and at most "
                         f"{MAX_SECONDS:.0f}, not {value!r}")
    return value


def dumps(doc: dict) -> bytes:
    import tomli_w  # measured: ~3 ms that readers (list, show, send) do not pay
    return tomli_w.dumps(doc).encode("utf-8")


def dump_record(doc: dict) -> bytes:
    """DOC serialised for writing; expired peer requests are cleared on the way."""
    prune_expired(doc)
    return dumps(doc)


def peer_names(doc: dict) -> list[str]:
    return [p["pod_name"] for p in doc.get("peers", [])]


def has_peer(doc: dict, name: str) -> bool:
    return any(p.get("pod_name") == name for p in doc.get("peers", []))


def drop_peer(doc: dict, name: str) -> None:
    """Remove every entry for NAME from DOC's peer list."""
    doc["peers"] = [p for p in doc.get("peers", []) if p.get("pod_name") != name]


# -- consent: the policy and the requests -------------------------------------

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z", re.ASCII)


def peer_policy(doc: dict) -> str:
    """``open``, ``ask`` or ``never``; the boolean form of older records read as such
    (the record's schema was checked)."""
    return policy_value(doc.get("accept_peers", True))


def policy_value(value: str | bool) -> str:
    """A policy as written now; a boolean (the older form) is translated."""
    if value is True:
        return "open"
    if value is False:
        return "never"
    if value not in POLICIES:
        raise UsageError(f"invalid peer policy {value!r}: use open, ask or never")
    return value


def ttl_value(seconds: float) -> int | float:
    """SECONDS as stored: a whole number as an integer."""
    check_seconds(seconds, "the peer request lifetime")
    return int(seconds) if float(seconds).is_integer() else float(seconds)


def peer_request_ttl(doc: dict) -> float:
    return float(doc.get("peer_request_ttl", DEFAULT_PEER_REQUEST_TTL))


def new_request_id() -> str:
    return os.urandom(6).hex()


def _now(now: _dt.datetime | None) -> _dt.datetime:
    return utcnow() if now is None else now


def is_expired(request: dict, now: _dt.datetime | None = None) -> bool:
    return request["expires_at"] <= _now(now)


def pending_requests(doc: dict, now: _dt.datetime | None = None) -> list[dict]:
    """The requests in DOC that have not expired, in the order they were made."""
    now = _now(now)
    return [r for r in doc.get("peer_requests", []) if not is_expired(r, now)]


def pending_request(doc: dict, source: str, now: _dt.datetime | None = None) -> dict | None:
    """SOURCE's request to DOC's Pod, unless there is none or it has expired."""
    for r in pending_requests(doc, now):
        if r["pod_name"] == source:
            return r
    return None


def pending_between(a_doc: dict, b_doc: dict, a: str, b: str) -> str | None:
    """Describe the request pending between A and B (either way), if there is one."""
    for asked, asker, doc in ((b, a, b_doc), (a, b, a_doc)):
        request = pending_request(doc, asker)
        if request is not None:
            return (f"the peer request from {asker} to {asked} (id {request['id']}) is "
                    f"pending: {asked} approves it with `yoi pod peer approve {asked} {asker}`")
    return None


def add_request(doc: dict, source: str, now: _dt.datetime | None = None) -> dict:
    """Record SOURCE's request in DOC (expiring after DOC's lifetime); return it."""
    now = _now(now)
    ttl = _dt.timedelta(seconds=peer_request_ttl(doc))
    expires = now + ttl
    if expires.microsecond:  # whole seconds, rounded up: never before the lifetime is over
        expires = expires.replace(microsecond=0) + _dt.timedelta(seconds=1)
    request = {"pod_name": source, "id": new_request_id(), "requested_at": now,
               "expires_at": expires}
    drop_requests(doc, source)
    doc.setdefault("peer_requests", []).append(request)
    return request


def predates(request: dict, requester_doc: dict) -> bool:
    """Whether REQUEST was made before its requester's record was created: it came from
    an earlier Pod of that name, since removed, and is void (never approved)."""
    created, made = requester_doc.get("created_at"), request.get("requested_at")
    return (isinstance(created, _dt.datetime) and isinstance(made, _dt.datetime)
            and made < created)


def drop_requests(doc: dict, source: str) -> bool:
    """Remove every request of SOURCE from DOC (expired or not); True if there was one."""
    return _drop_named(doc, "peer_requests", source)


def record_denial(doc: dict, request: dict, by: str, now: _dt.datetime | None = None) -> None:
    """Remember that REQUEST was denied: one entry per requester, the latest."""
    source = request["pod_name"]
    drop_denials(doc, source)
    doc.setdefault("peer_denials", []).append(
        {"pod_name": source, "id": request["id"], "denied_at": _now(now), "by": by})


def drop_denials(doc: dict, source: str) -> bool:
    return _drop_named(doc, "peer_denials", source)


def _drop_named(doc: dict, key: str, source: str) -> bool:
    before = doc.get(key, [])
    after = [e for e in before if e.get("pod_name") != source]
    if len(after) == len(before):
        return False
    _set_list(doc, key, after)
    return True


def denial(doc: dict, request_id: str) -> dict | None:
    for d in doc.get("peer_denials", []):
        if d.get("id") == request_id:
            return d
    return None


def prune_expired(doc: dict, now: _dt.datetime | None = None) -> bool:
    """Remove the expired requests from DOC (before it is written anyway)."""
    before = doc.get("peer_requests", [])
    after = pending_requests(doc, now)
    if len(after) == len(before):
        return False
    _set_list(doc, "peer_requests", after)
    return True


def _set_list(doc: dict, key: str, entries: list) -> None:
    if entries:
        doc[key] = entries
    else:
        doc.pop(key, None)  # no empty table array left behind


def to_jsonable(value):
    """TOML values -> JSON values (datetimes as RFC 3339 with Z)."""
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None and value.utcoffset() == _dt.timedelta(0):
            return value.replace(tzinfo=None).isoformat() + "Z"
        return value.isoformat()
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    return value


# -- family: a parent and the children it spawned ------------------------------

SCOPES = ("parent", "peers")
SPAWN_ID_RE = re.compile(r"[0-9a-f]{12}\Z", re.ASCII)
# What a Pod may reach (message, be messaged by): the kinds of ``relation``.
REACH = frozenset({"peers", "parent", "child", "parent_peer"})
from yoi.names import NOTICE_PREFIX  # noqa: E402  (the ids of a parent's notices)


def _family_problem(doc: dict) -> str | None:
    parent = doc.get("parent")
    if parent is not None and not is_valid_name(parent):
        return f"parent {parent!r} is not a valid Pod name"
    if "scope" in doc and doc["scope"] not in SCOPES:
        return f"scope must be \"parent\" or \"peers\", not {doc['scope']!r}"
    if "spawn_id" in doc and not (isinstance(doc["spawn_id"], str)
                                  and SPAWN_ID_RE.match(doc["spawn_id"])):
        return f"spawn_id must be 12 hexadecimal digits, not {doc['spawn_id']!r}"
    if "task_id" in doc and not (isinstance(doc["task_id"], str)
                                 and REQUEST_ID_RE.match(doc["task_id"])):
        return f"task_id {doc['task_id']!r} is not a message id"
    return _named_tables_problem(doc, "children")


def parent_of(doc: dict | None) -> str | None:
    """The parent DOC's Pod names (None: it is no child)."""
    parent = (doc or {}).get("parent")
    return parent if isinstance(parent, str) else None


def scope_of(doc: dict | None) -> str | None:
    """A child's scope (``parent`` unless it says ``peers``); None for a Pod that is
    no child."""
    if parent_of(doc) is None:
        return None
    return "peers" if (doc or {}).get("scope") == "peers" else "parent"


def child_names(doc: dict | None) -> list[str]:
    return [c["pod_name"] for c in (doc or {}).get("children", [])]


def has_child(doc: dict | None, name: str) -> bool:
    return any(c.get("pod_name") == name for c in (doc or {}).get("children", []))


def add_child(doc: dict, name: str, now: _dt.datetime | None = None) -> None:
    if not has_child(doc, name):
        doc.setdefault("children", []).append({"pod_name": name, "spawned_at": _now(now)})


def drop_child(doc: dict, name: str) -> bool:
    """Remove every entry for NAME from DOC's children; True if there was one."""
    return _drop_named(doc, "children", name)


def task_id_for(child: str) -> str:
    """The id of the task a child is spawned with: its first message."""
    return f"task:{child}:1"


def notice_id(child: str, spawn_id: str, what: str) -> str:
    """The id of a parent's notice about CHILD (the spawn SPAWN_ID of that name):
    ``child:CHILD:SPAWN:done`` or ``child:CHILD:SPAWN:stopped:RUN``. Derived from what
    it is about, so a notice committed once is never committed again."""
    return f"{NOTICE_PREFIX}{child}:{spawn_id}:{what}"


def relation(name: str, other: str, read) -> tuple[str, str | None]:
    """How NAME and OTHER are related now, both records agreeing: one of ``REACH``
    (``peers``; ``parent``: OTHER is NAME's parent; ``child``: OTHER is NAME's child;
    ``parent_peer``: one is a child on scope ``peers`` and the other a peer of its
    parent), or ``("pending", WHY)`` when only a peer request between the two is
    pending, or ``("none", WHY)``, WHY saying so when a child's scope is what stands
    in the way (else None).

    READ(n) gives Pod n's record (None if there is none). A relation is
    symmetric: whom a child may message may message it. A child (a record
    naming a parent) reaches its parent, its own children and, on scope
    ``peers``, its parent's peers: nothing else, whatever peers it lists.
    """
    mine, theirs = read(name) or {}, read(other) or {}
    if parent_of(mine) == other and has_child(theirs, name):
        return "parent", None
    if parent_of(theirs) == name and has_child(mine, other):
        return "child", None
    bound = False
    for child, doc, outsider, outsider_doc in ((name, mine, other, theirs),
                                               (other, theirs, name, mine)):
        if parent_of(doc) is None:
            continue
        bound = True
        if not within_scope(child, doc, outsider, outsider_doc, read):
            return "none", scope_words(child, doc)
    if bound:
        return "parent_peer", None
    if has_peer(mine, other) and has_peer(theirs, name):
        return "peers", None
    why = pending_between(mine, theirs, name, other)
    return ("pending", why) if why else ("none", None)


def within_scope(child: str, doc: dict, other: str, other_doc: dict | None, read) -> bool:
    """May CHILD (whose record is DOC) reach OTHER, a Pod that is neither its parent nor
    its child? Only on scope ``peers``, and only a peer of its parent (both records
    of each relation agreeing)."""
    parent = parent_of(doc)
    if scope_of(doc) != "peers" or parent is None or other == parent:
        return False
    pdoc = read(parent)
    return (pdoc is not None and has_child(pdoc, child) and has_peer(pdoc, other)
            and has_peer(other_doc or {}, parent))


def scope_words(child: str, doc: dict) -> str:
    """What CHILD may reach, in words (a refusal's reason)."""
    parent = parent_of(doc)
    if scope_of(doc) == "peers":
        return (f"{child} is a child of {parent} on scope peers: it may reach only {parent}, "
                f"the peers of {parent} and its own children")
    return (f"{child} is a child of {parent} on scope parent: it may reach only {parent} "
            "and its own children")
