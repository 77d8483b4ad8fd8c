"""The JSON shapes of every `--json` document, written once (yoi(1), JSON OUTPUT), and
a small checker for them.

A shape is a Python value:
  * a type (``str``, ``int``, ``bool``) or ``None``: a value of that type (bool is not int);
  * ``Nullable(S)``: null or S; ``Enum(a, b, ...)``: one of those values;
  * ``ListOf(S)``: an array of S; ``MapOf(S)``: an object whose values are S;
  * a dict ``{key: S}``: an object with exactly those keys (a key ending in ``?``
    may be absent); ``Open({...})``: the same, other keys allowed too;
  * ``ANY``: anything.

Besides each command's own shape, ``check`` applies the rules every document
follows, at any depth: a Pod is named ``pod_name`` (never ``pod``); a second
Pod in a role (``source``, ``peer``, ``as``) is ``{"pod_name": ...}`` or null;
``live`` is always the live object. A log entry in a document (``entry``,
``reply``) is stored data, as ``yoi pod log`` prints it: the rules do not
reach into it (a notice about a child names it in ``source``, as a text).
A new command adds a row to ``COMMANDS``
(and a scenario to ``test_json_contract.py``); a new document kind adds a
shape here and a line to the man page.
"""

from __future__ import annotations


class Nullable:
    def __init__(self, shape):
        self.shape = shape


class Enum:
    def __init__(self, *values):
        self.values = values


class ListOf:
    def __init__(self, shape):
        self.shape = shape


class MapOf:
    def __init__(self, shape):
        self.shape = shape


class Open:
    def __init__(self, fields: dict):
        self.fields = fields


ANY = object()

# -- the pieces ------------------------------------------------------------------------

POD_REF = {"pod_name": str}
# `live`, in every document: the same object as the wire's pods_listed item.
LIVE = {"socket_path": Nullable(str), "reachable": bool, "status": Nullable(str),
        "error": Nullable(str)}
# A Pod's metadata record as JSON: unknown keys are kept, so the object is open.
RECORD = Open({"schema": int, "pod_name": str, "created_at": str, "accept_peers?": ANY,
               "runtime?": Open({"exec?": str, "cwd?": str, "pid?": int,
                                 "socket_path?": str}),
               "labels?": MapOf(str),
               "peers?": ListOf(Open({"pod_name": str, "registered_at?": str})),
               # a spawned child's, and a parent's
               "parent?": str, "scope?": Enum("parent", "peers"), "spawn_id?": str,
               "task_id?": str,
               "children?": ListOf(Open({"pod_name": str, "spawned_at?": str}))})
ERROR = Open({"code": str, "message": str, "exit_code": int})
# A session log entry (`yoi pod log --json`, one per line): as stored. `id` is the
# message id where the entry has one (system_item; handler_result: the message it
# answers).
ENTRY = Open({"seq": int, "kind": str, "ts": int, "at": str, "id?": str})
ENTRY_KINDS = {
    "system_item": Open({"seq": int, "kind": str, "ts": int, "at": str, "id?": str,
                         "item": Open({"kind": str, "message": str, "body": str,
                                       "source?": str, "id?": str, "in_reply_to?": str,
                                       "at?": str})}),
    # A queued message not committed: its relation was gone when the Pod started.
    "delivery_rejected": {"seq": int, "kind": str, "ts": int, "at": str, "message_id": str,
                          "source": Nullable(str), "reason": str, "message": str,
                          "queued_at": str, "in_reply_to?": str},
    # One run of a Pod's handler (the Pod commits it when the run is over).
    "handler_result": {"seq": int, "kind": str, "ts": int, "at": str, "id?": str,
                       "handled": Enum("notify", "run"), "ok": bool,
                       "ended": Enum("exited", "timed_out", "output_held", "not_started",
                                     "stopped"),
                       "exit_status": Nullable(int), "signal": Nullable(int),
                       "duration_ms": int, "text": str, "truncated": bool,
                       "stderr_tail": str},
    # A parent's notices about a child it spawned (see yoi.children).
    "child_completed": {"seq": int, "kind": str, "ts": int, "at": str, "id": str,
                        "source": str, "task_id": str, "child_seq": int, "ok": bool,
                        "ended": Nullable(str), "exit_status": Nullable(int),
                        "signal": Nullable(int), "duration_ms": Nullable(int),
                        "output": str, "truncated": bool},
    "child_stopped": {"seq": int, "kind": str, "ts": int, "at": str, "id": str,
                      "source": str, "run": int, "ended": Enum("stopped", "died"),
                      "exit_status": Nullable(int), "task_id": Nullable(str),
                      "child_seq": Nullable(int), "output": str, "truncated": bool},
    # A child's own runs.
    "pod_started": {"seq": int, "kind": str, "ts": int, "at": str, "pid": int,
                    "parent": str},
    "pod_stopped": {"seq": int, "kind": str, "ts": int, "at": str, "run": Nullable(int)},
}
EVENT = {"event": str, "data?": ANY}  # `log --follow --json`: a Pod event that is no entry
# `log --queued --json`, one per line: a message waiting in a Pod's queue, as stored.
QUEUED = {"id": str, "source": Nullable(str), "message": str, "queued_at": str,
          "in_reply_to?": str}
LIST_ITEM = {"pod_name": str, "state": Enum("readable", "corrupt"),
             "peer_count": Nullable(int), "labels": MapOf(str), "live": LIVE,
             "queued": Nullable(int), "error": Nullable(str)}
# The wire's pods_listed item (yoi.discovery.visible), the original's visible-Pod item.
VISIBLE_ITEM = {"pod_name": str,
                "visibility": Enum("self_pod", "peer", "spawned_child"),
                "state": Enum("readable", "missing", "corrupt"),
                "live": LIVE,
                "restore": {"possible": bool, "restore_name": Nullable(str),
                            "reason": Nullable(str)},
                "comm_registry": {"registered": bool, "socket_path": Nullable(str)},
                "spawned_children": {"count": int, "reachable": int, "unreachable": int},
                "relation": Enum("self", "parent", "peer", "parent_peer", "child"),
                "error": Nullable(str)}
STOPPED = {"pod_name": str, "stopped": bool, "forced": Nullable(str), "pid": Nullable(int),
           "message": str, "stale_socket_removed?": bool}
PROBLEM = {"code": str, "severity": Enum("error", "warning"), "pod_name": Nullable(str),
           "path": str, "message": str, "fixable": bool, "fixed": bool}
# A pending peer request (`peer register` of a Pod on `ask`, `peer list --pending`).
REQUEST = Open({"pod_name": str, "id": str, "requested_at": str, "expires_at": str})
CHANGE = {"action": Enum("created", "configured", "registered", "requested", "started",
                         "stopped", "removed"),
          "pod_name": str, "peer?": POD_REF, "settings?": ListOf(str), "request?": REQUEST}
# a relation still pending is a failed step too: its request, error code "pending"
FAILED_STEP = {"action": str, "pod_name": str, "peer?": POD_REF, "request?": REQUEST,
               "error": ERROR}
CONVERGED = {"file": str, "changed": bool, "changes": ListOf(CHANGE),
             "failed": ListOf(FAILED_STEP), "pods": ListOf(POD_REF), "relations": int}
LINES_SENT = {"pod_name": str, "source": Nullable(POD_REF), "id_prefix": str, "messages": int,
              "first_id": Nullable(str), "last_id": Nullable(str), "lines_read": int,
              "skipped_blank": int, "acknowledged": bool, "acknowledged_count": int,
              "interrupted": bool, "deduplicates_retries": bool,
              "state?": Enum("delivered", "queued"), "refused?": ListOf(str),
              "not_recorded?": ListOf(str), "not_acknowledged?": ListOf(str),
              "not_sent?": ListOf(str)}

# -- one shape per kind of document (the `ok`/`error` frame is added by `check`) ----------

DOCUMENTS = {
    "pod-created": {"pod_name": str, "created": bool, "record": RECORD},
    "pod-record": {"pod_name": str, "record": RECORD},
    "pod-shown": {"pod_name": str, "live": LIVE, "record": RECORD},
    "pod-list": {"pods": ListOf(LIST_ITEM)},
    "pod-visible": {"as": POD_REF, "pods": ListOf(VISIBLE_ITEM)},
    "pod-removed": {"pod_name": str, "removed": bool, "peers_updated": ListOf(POD_REF),
                    "children_removed?": ListOf(POD_REF), "parent_updated?": POD_REF},
    "pod-spawned": {"pod_name": str, "parent": POD_REF, "created": bool,
                    "scope": Enum("parent", "peers"), "started": bool, "socket_path": str,
                    "task": Nullable({"id": str, "acknowledged": bool, "at": Nullable(str)}),
                    "record": RECORD},
    "pod-started": {"pod_name": str, "started": bool, "pid": int, "socket_path": str,
                    "log": str},
    "pod-serving": {"pod_name": str, "socket_path": str},  # start --foreground, once ready
    "pod-stopped": STOPPED,
    "pods-stopped": {"pods": ListOf(STOPPED)},
    "pod-restored": {"pod_name": str, "restored": bool, "message": str, "pid": Nullable(int),
                     "socket_path": str, "log?": str},
    "pod-status": {"pod_name": str, "running": bool, "pid": Nullable(int),
                   "exec": Nullable(str), "live": LIVE, "queued": int,
                   "handler": {"last": Nullable(ENTRY), "recent_runs": int,
                               "recent_failures": int, "failing_streak": int}},
    "sent": {"pod_name": str, "source": Nullable(POD_REF), "id": str, "acknowledged": bool,
             "at": Nullable(str), "deduplicates_retries": bool,
             "state": Enum("delivered", "sent", "queued"), "reply?": ENTRY},
    "waited": {"pod_name": str, "entry": ENTRY},
    "lines-sent": LINES_SENT,
    "peer-changed": {"pod_name": str, "peer": POD_REF, "changed": bool,
                     "state?": Enum("registered", "pending", "denied", "expired", "withdrawn"),
                     "request?": REQUEST, "offered?": bool,
                     "decider?": Enum("handler", "operator")},
    "peer-requests": {"pod_name": str, "requests": ListOf(REQUEST)},
    "peer-list": {"pod_name": str,
                  "peers": ListOf({"pod_name": str, "registered_at": Nullable(str),
                                   "exists": bool, "reciprocal": bool})},
    "doctor": {"strict": bool, "state_exists": bool,
               "checked": {"pods": int, "relations": int, "journals": int, "sessions": int,
                           "sockets": int},
               "errors": int, "warnings": int, "problems": ListOf(PROBLEM)},
    "doctor-checks": {"checks": ListOf({"code": str, "severity": Enum("error", "warning"),
                                        "description": str, "fixable": bool})},
    "demo": {"state_dir": str, "kept": bool, "steps": ListOf(ANY)},
    "converged": CONVERGED,
}

# Which kinds each command prints (`log` prints JSON Lines, not a document: of ENTRY/EVENT,
# "entries", or with --queued of QUEUED, "queued").
COMMANDS = {
    "yoi pod create": ["pod-created"],
    "yoi pod config": ["pod-record"],
    "yoi pod show": ["pod-shown"],
    "yoi pod list": ["pod-list", "pod-visible"],
    "yoi pod rm": ["pod-removed"],
    "yoi pod spawn": ["pod-spawned"],
    "yoi pod start": ["pod-started", "pod-serving"],
    "yoi pod stop": ["pod-stopped", "pods-stopped"],
    "yoi pod restore": ["pod-restored"],
    "yoi pod status": ["pod-status"],
    "yoi pod log": ["entries", "queued"],
    "yoi pod send": ["sent", "lines-sent"],
    "yoi pod wait": ["waited"],
    "yoi pod peer register": ["peer-changed"],
    "yoi pod peer remove": ["peer-changed"],
    "yoi pod peer list": ["peer-list", "peer-requests"],
    "yoi pod peer approve": ["peer-changed"],
    "yoi pod peer deny": ["peer-changed"],
    "yoi doctor": ["doctor", "doctor-checks"],
    "yoi demo": ["demo"],
    "yoi up": ["converged"],
    "yoi down": ["converged"],
}

ROLE_KEYS = ("source", "peer", "as")
ENTRY_KEYS = ("entry", "reply")  # a log entry, as stored


def _fail(where: str, what: str, value) -> str:
    return f"{where or '.'}: {what}, not {value!r}"[:300]


def conform(value, shape, where: str = "") -> list[str]:
    """The ways VALUE does not fit SHAPE (empty if it fits)."""
    if shape is ANY:
        return []
    if shape is None:
        return [] if value is None else [_fail(where, "null", value)]
    if isinstance(shape, Nullable):
        return [] if value is None else conform(value, shape.shape, where)
    if isinstance(shape, Enum):
        return [] if value in shape.values else [_fail(where, f"one of {shape.values}", value)]
    if isinstance(shape, ListOf):
        if not isinstance(value, list):
            return [_fail(where, "an array", value)]
        return [p for i, v in enumerate(value) for p in conform(v, shape.shape, f"{where}[{i}]")]
    if isinstance(shape, MapOf):
        if not isinstance(value, dict):
            return [_fail(where, "an object", value)]
        return [p for k, v in value.items() for p in conform(v, shape.shape, f"{where}.{k}")]
    if isinstance(shape, (dict, Open)):
        fields = shape.fields if isinstance(shape, Open) else shape
        if not isinstance(value, dict):
            return [_fail(where, "an object", value)]
        problems = []
        known = set()
        for key, sub in fields.items():
            name = key.rstrip("?")
            known.add(name)
            if name in value:
                problems += conform(value[name], sub, f"{where}.{name}")
            elif not key.endswith("?"):
                problems.append(f"{where}.{name}: missing")
        if not isinstance(shape, Open):
            problems += [f"{where}.{k}: not in the documented shape" for k in value
                         if k not in known]
        return problems
    if shape is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, shape)
    return [] if ok else [_fail(where, shape.__name__, value)]


def rules(value, where: str = "") -> list[str]:
    """The rules every document follows, at any depth (see the module docstring)."""
    problems = []
    if isinstance(value, dict):
        for key, sub in value.items():
            at = f"{where}.{key}"
            if key == "pod":
                problems.append(f"{at}: a Pod is named pod_name, never pod")
            elif key in ROLE_KEYS and where.count(".") < 2:  # not inside a record or item
                problems += conform(sub, Nullable(POD_REF), at)
            elif key == "live":
                problems += conform(sub, LIVE, at)
            elif key == "pod_name" and sub is not None and not isinstance(sub, str):
                problems.append(_fail(at, "a Pod name", sub))
            if key not in ENTRY_KEYS:
                problems += rules(sub, at)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            problems += rules(sub, f"{where}[{i}]")
    return problems


def check(doc: dict, kind: str, ok: bool = True, complete: bool = True) -> list[str]:
    """Problems of DOC as a `--json` document of KIND: success if OK, else a failure
    that carries the command's report (its fields plus ``error``), the whole report
    unless COMPLETE is false (then each field may be missing: "as far as it got")."""
    shape = dict(DOCUMENTS[kind])
    if ok:
        shape["ok"] = Enum(True)
    else:
        if not complete:
            shape = {k if k.endswith("?") else k + "?": v for k, v in shape.items()}
        shape.update({"ok": Enum(False), "error": ERROR})
    return conform(doc, shape) + rules(doc)


def check_failure(doc: dict) -> list[str]:
    """Problems of DOC as a failure document without a report: the frame alone."""
    return conform(doc, {"ok": Enum(False), "error": ERROR}) + rules(doc)


LINE_KINDS = ("entries", "queued")  # kinds printed as JSON Lines


def check_line(obj: dict, kind: str) -> list[str]:
    """Problems of one JSON line that a command printing KIND wrote."""
    return check_entry(obj) if kind == "entries" else conform(obj, QUEUED)


def check_entry(entry: dict) -> list[str]:
    if "event" in entry:
        return conform(entry, EVENT)
    shape = ENTRY_KINDS.get(entry.get("kind"), ENTRY)
    return conform(entry, shape) + conform(entry, ENTRY)
