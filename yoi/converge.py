"""``yoi up`` / ``yoi down``: converge a state directory to a declaration file.

A declaration (``yoi.toml``) names Pods with their settings and peers::

    [pods.reviewer]
    exec = "my-agent --stdin"     # handler command (none if absent)
    cwd = "."                     # relative to the file's directory
    accept_peers = "ask"          # "open" (the default), "ask" or "never"
    peer_request_ttl = 3600       # seconds a peer request stays pending
    handler_timeout = 600         # seconds one handler run may take
    queue_max_messages = 10000    # bounds of its queue (yoi pod send --queue)
    queue_max_bytes = 67108864
    labels = { team = "infra" }
    peers = ["coder"]             # relations, from either side
    start = true                  # default true: `yoi up` starts it

    [pods.coder]

``load`` reads and checks the whole file before anything is changed: an
unknown key, a bad name or value, a relation to a Pod that is neither
declared nor present, or a relation of a declared Pod on ``accept_peers =
"never"`` (no run could ever make it) is a ``UsageError`` naming the file and
the key.

``up`` then converges step by step, each step through the normal operation
that every command uses (its locks, its transaction): create a missing Pod,
change the settings of one that differs, register each missing relation,
start each Pod that is not live. Every step is idempotent, so a second run
changes nothing, two runs at once end converged, and a run that was
interrupted (even by SIGKILL) is finished by the next one. A step that fails
does not stop the independent ones; the report lists what changed and what
failed, and the error names the first failure.

A relation is registered as ``yoi pod peer register A B`` does, A being the
Pod whose ``peers`` declares it (B, the one asked, consents by its own
policy, whatever the names; declared on both sides, each asks the other, so
two Pods on ``ask`` that declare each other become peers, as two requests
that meet do): a B on ``accept_peers = "ask"`` is asked, and the
relation stays *pending* until B (its handler, if it is live) or the
operator decides. ``up`` cannot finish that by itself: recording the request
is a change (``requested``), and every relation still pending is a failed
step whose error is ``Pending`` (code ``pending``, exit 5), so a pending
relation is never reported as converged. Real failures come first: the
error is ``Pending`` only if nothing else failed.
"""

from __future__ import annotations

import os
from pathlib import Path

from yoi import consent, control, metadata, store, timeouts
from yoi.errors import AlreadyExists, Pending, UsageError, YoiError
from yoi.names import is_valid_name
from yoi.parsing import ParseError, toml_loads
from yoi.state import State
from yoi.timeouts import DEFAULT
from yoi.txn import read_pod_file

DEFAULT_FILE = "yoi.toml"
POD_KEYS = {"exec": str, "cwd": str, "accept_peers": (str, bool),
            "peer_request_ttl": (int, float), "handler_timeout": (int, float),
            "labels": dict, "peers": list, "start": bool, "queue_max_messages": int,
            "queue_max_bytes": int}
_TYPE_NAMES = {int: "a whole number", str: "a string", bool: "true or false", dict: "a table", list: "an array",
               (int, float): "a number of seconds",
               (str, bool): "\"open\", \"ask\" or \"never\" (or true/false)"}


class Declared:
    """One Pod of the file: its settings as ``metadata.settings_of`` names them."""

    __slots__ = ("name", "settings", "peers", "start")

    def __init__(self, name: str, settings: dict, peers: list[str], start: bool):
        self.name, self.settings, self.peers, self.start = name, settings, peers, start


class Plan:
    def __init__(self, path: Path, pods: list[Declared],
                 relations: list[tuple[str, str, bool]]):
        self.path, self.pods, self.relations = path, pods, relations


def find_file(path: str | None) -> Path:
    p = Path(path if path is not None else DEFAULT_FILE)
    if not p.is_file():
        where = "" if path is not None else " in the current directory (or give -f FILE)"
        raise UsageError(f"no declaration file {str(p)!r}{where}")
    return p.resolve()


def load(path: Path, state: State, labels: dict[str, str] | None = None,
         relations: bool = True) -> Plan:
    """Read and check PATH (LABELS are added to every Pod); UsageError if anything is
    wrong, before anything is changed.

    With RELATIONS false (``yoi down``, which does not touch relations) the
    relations are read but not checked: neither whether an undeclared peer
    exists in STATE nor whether one side is on ``never``.
    """
    def bad(where: str, what: str) -> UsageError:
        return UsageError(f"{path}: {where}: {what}")

    try:
        doc = toml_loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 (byte {e.start})")
    except ParseError as e:  # also nested too deep, or an integer too long
        raise UsageError(f"{path}: does not parse: {e}")
    unknown = sorted(set(doc) - {"pods"})
    if unknown:
        raise bad(unknown[0], "unknown key (known: pods)")
    table = doc.get("pods", {})
    if not isinstance(table, dict) or not table:
        raise bad("pods", "declare at least one Pod, e.g. [pods.reviewer]")
    pods = [_declared(name, spec, path.parent, labels, bad) for name, spec in table.items()]
    policy = {p.name: p.settings["accept_peers"] for p in pods}
    asks = set()  # (asker, asked): the Pod that declares the relation asks
    for p in pods:
        for other in p.peers:
            if relations:
                _check_relation(state, policy, p.name, other, bad)
            asks.add((p.name, other))
    # One relation per pair: asked from the side(s) that declare it.
    pairs = {}
    for a, b in sorted(asks):
        key = tuple(sorted((a, b)))
        pairs[key] = (key[0], key[1], True) if key in pairs else (a, b, False)
    return Plan(path, sorted(pods, key=lambda p: p.name), sorted(pairs.values()))


def _declared(name: str, spec, base: Path, labels: dict[str, str] | None, bad) -> Declared:
    """The Pod NAME as the file declares it (SPEC), checked; LABELS added to its own."""
    where = f"pods.{name}"
    if not is_valid_name(name):
        raise bad(where, "invalid Pod name: use 1-64 characters of [A-Za-z0-9._-], "
                         "starting with a letter or digit")
    if not isinstance(spec, dict):
        raise bad(where, "must be a table")
    for key, value in spec.items():
        kind = POD_KEYS.get(key)
        if kind is None:
            raise bad(f"{where}.{key}", "unknown key (known: " + ", ".join(POD_KEYS) + ")")
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
                kind if isinstance(kind, tuple) else (kind,))):
            raise bad(f"{where}.{key}", f"must be {_TYPE_NAMES[kind]}")
    pod_labels = dict(spec.get("labels", {}))
    pod_labels.update(labels or {})
    for key, value in pod_labels.items():
        problem = metadata.label_problem(key, value)
        if problem:
            raise bad(f"{where}.labels", problem)
    names = spec.get("peers", [])
    for other in names:
        if not is_valid_name(other):
            raise bad(f"{where}.peers", f"invalid Pod name {other!r}")
        if other == name:
            raise bad(f"{where}.peers", "a Pod cannot be its own peer")
    cwd = spec.get("cwd")
    settings = {"exec": spec.get("exec"),
                "cwd": os.path.abspath(base / cwd) if cwd is not None else None,
                "accept_peers": _policy(spec, where, bad),
                "peer_request_ttl": _seconds(spec, "peer_request_ttl", where, bad),
                "handler_timeout": _seconds(spec, "handler_timeout", where, bad),
                "labels": dict(sorted(pod_labels.items()))}
    for key in metadata.QUEUE_LIMITS:
        settings[key] = spec.get(key)
        if settings[key] is not None:
            try:
                metadata.queue_limit_value(key, settings[key])
            except UsageError as e:
                raise bad(f"{where}.{key}", e.message)
    for key in ("exec", "cwd"):
        value = settings[key]
        if value is not None and (not value or "\0" in value):
            raise bad(f"{where}.{key}", "must be a non-empty string without NUL")
    return Declared(name, settings, list(names), spec.get("start", True))


def _check_relation(state: State, policy: dict[str, str], name: str, other: str,
                    bad) -> None:
    """NAME's relation to OTHER can be made: OTHER is declared (POLICY has every
    declared Pod's accept_peers) or exists, and neither is declared on ``never``."""
    where = f"pods.{name}.peers"
    if other not in policy and not _exists(state, other):
        raise bad(where, f"{other!r} is neither declared in this file nor an existing Pod")
    never = [n for n in (name, other) if policy.get(n) == "never"]
    if never:
        who = " and ".join(never)
        raise bad(where, f"{name} and {other} can never be peers: {who} "
                         f"{'has' if len(never) == 1 else 'have'} accept_peers = \"never\" "
                         "(make it \"open\" or \"ask\", or drop the relation)")


def _seconds(spec: dict, key: str, where: str, bad) -> float | None:
    """The Pod's KEY, a duration checked by the rule of every duration."""
    value = spec.get(key)
    if value is None:
        return None
    try:
        return timeouts.parse(value, "")
    except UsageError as e:
        raise bad(f"{where}.{key}", e.message)


def _policy(spec: dict, where: str, bad) -> str:
    try:
        return metadata.policy_value(spec.get("accept_peers", "open"))
    except UsageError as e:
        raise bad(f"{where}.accept_peers", e.message)


def _exists(state: State, name: str) -> bool:
    try:
        return read_pod_file(state, name).exists
    except YoiError:
        return True  # there, but damaged: registering will say so


class Report:
    """What a run changed and what failed; ``to_json`` is the command's document."""

    def __init__(self, path: Path):
        self.path = path
        self.changes: list[dict] = []
        self.failed: list[dict] = []
        self.errors: list[YoiError] = []
        self.pods: list[str] = []
        self.relations = 0

    def change(self, action: str, name: str, **extra) -> None:
        self.changes.append({"action": action, "pod_name": name, **extra})

    def fail(self, action: str, name: str, err: YoiError, **extra) -> None:
        self.errors.append(err)
        self.failed.append({"action": action, "pod_name": name, **extra,
                            "error": err.to_json()})

    def to_json(self) -> dict:
        return {"file": str(self.path), "changed": bool(self.changes),
                "changes": self.changes, "failed": self.failed,
                "pods": [{"pod_name": n} for n in self.pods], "relations": self.relations}

    def error(self, verb: str) -> YoiError | None:
        """The error to fail with, or None if all went well: the type of the first
        failure that is not a pending relation, else ``Pending``."""
        if not self.errors:
            return None
        failed = [f for f in self.failed if f["error"]["code"] != Pending.code]
        pending = [f for f in self.failed if f["error"]["code"] == Pending.code]
        parts = []
        if failed:
            parts.append(f"{_count(len(failed), 'step')} failed ({_steps(failed)})")
        if pending:
            parts.append(f"{_count(len(pending), 'relation')} pending ({_steps(pending)})")
        msg = (f"{verb}: {', '.join(parts)}; {_count(len(self.changes), 'change')} "
               "made and kept")
        if verb == "up":
            msg += "; run `yoi up` again " + ("to finish" if failed else "once decided")
        first = next((e for e in self.errors if not isinstance(e, Pending)), self.errors[0])
        return type(first)(msg, data=self.to_json())


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _steps(failed: list[dict]) -> str:
    return "; ".join(f"{f['action']} {f['pod_name']}"
                     + (f" <-> {f['peer']['pod_name']}" if "peer" in f else "")
                     + f": {f['error']['message']}" for f in failed)


def up(state: State, plan: Plan, start: bool = True, timeout: float = DEFAULT) -> Report:
    """Converge STATE to PLAN (see the module docstring)."""
    report = Report(plan.path)
    report.pods = [p.name for p in plan.pods]
    report.relations = len(plan.relations)
    ready = set()
    for pod in plan.pods:
        try:
            _converge_pod(state, pod, report)
            ready.add(pod.name)
        except YoiError as e:
            report.fail("create", pod.name, e)
    for a, b, mutual in plan.relations:
        _converge_relation(state, a, b, report, mutual)
    if start:
        for pod in plan.pods:
            if not pod.start or pod.name not in ready:
                continue
            try:
                if control.restore(state, pod.name, timeout=timeout)["restored"]:
                    report.change("started", pod.name)
            except YoiError as e:
                report.fail("start", pod.name, e)
    return report


def _converge_relation(state: State, a: str, b: str, report: Report,
                       mutual: bool = False) -> None:
    """Register A <-> B as ``yoi pod peer register A B`` does (a live B on ``ask`` is
    told); with MUTUAL (both declare it) B asks A as well, and two requests that
    meet make the relation. A request left pending is a failed step (``Pending``),
    not a relation."""
    peer = {"pod_name": b}
    try:
        result = consent.request(state, a, b)
        if mutual and result["state"] == "pending":
            again = consent.request(state, b, a)
            if again["state"] != "pending":
                result = {**again, "changed": True}
    except YoiError as e:
        report.fail("register", a, e, peer=peer)
        return
    if result["state"] != "pending":
        if result["changed"]:
            report.change("registered", a, peer=peer)
        return
    request = metadata.to_jsonable(result["request"])
    if result["changed"]:
        report.change("requested", a, peer=peer, request=request)
    report.fail("register", a, Pending(
        f"{b} accepts peers only when asked: the request from {a} (id {request['id']}) "
        f"waits until {request['expires_at']}; {consent.how_decided(result)}",
        pod_name=b), peer=peer, request=request)


def _converge_pod(state: State, pod: Declared, report: Report) -> None:
    s = pod.settings
    try:
        store.create(state, pod.name, exec_cmd=s["exec"], cwd=s["cwd"],
                     accept_peers=s["accept_peers"], peer_request_ttl=s["peer_request_ttl"],
                     handler_timeout=s["handler_timeout"], labels=s["labels"],
                     queue_max_messages=s["queue_max_messages"],
                     queue_max_bytes=s["queue_max_bytes"])
        report.change("created", pod.name)
        return
    except AlreadyExists:
        pass  # then it is configured to match (another `yoi up` may have just made it)
    changed = store.converge_settings(state, pod.name, s)
    if changed:
        report.change("configured", pod.name, settings=changed)


def down(state: State, plan: Plan, remove: bool = False, timeout: float = DEFAULT,
         force: bool = False) -> Report:
    """Stop every Pod PLAN declares (and with REMOVE remove it); absent ones are fine."""
    report = Report(plan.path)
    report.pods = [p.name for p in plan.pods]
    report.relations = len(plan.relations)
    for pod in plan.pods:
        try:
            if not _exists(state, pod.name):
                continue
            if control.stop(state, pod.name, timeout=timeout, force=force)["stopped"]:
                report.change("stopped", pod.name)
            if remove:
                store.remove(state, pod.name)
                report.change("removed", pod.name)
        except YoiError as e:
            report.fail("remove" if remove else "stop", pod.name, e)
    return report
