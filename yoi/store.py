"""Pod operations on the metadata store: create, configure, read, list, remove.

Library code: takes a ``State`` and plain values, returns plain values, raises
``yoi.errors`` types. Every read-modify-write happens under the Pod's lock.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import ExitStack, contextmanager

from yoi import metadata
from yoi.atomic import fsync_dir
from yoi.errors import AlreadyExists, Busy, Refused, StorageError, UsageError, YoiError
from yoi.lock import RUNTIME_LOCK_GRACE, lock_holder_pid, try_lock, write_pid
from yoi.names import check_name
from yoi.parsing import paused_gc
from yoi.pool import POOL_THRESHOLD, map_chunks
from yoi.state import State, refuse_symlink
from yoi.txn import (Change, create_pod_dir, lock_pods, read_doc, read_pod_file,
                     remove_trash, staging_path)

_UNSET = object()


def read(state: State, name: str) -> dict:
    """NAME's record (no lock); NotFound if there is no such Pod."""
    check_name(name)
    pod = read_pod_file(state, name)
    if not pod.exists:
        raise state.no_such_pod(name)
    return pod.doc


def utf8_text(value: str, what: str) -> str:
    """VALUE if TOML can hold it; a string from a non-UTF-8 argument cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} {value!r} is not valid UTF-8 text") from None
    return value


def check_labels(labels: dict[str, str] | None) -> dict[str, str]:
    """LABELS if every KEY=VALUE is valid (UsageError naming the first bad one)."""
    for key, value in (labels or {}).items():
        problem = metadata.label_problem(key, value)
        if problem:
            raise UsageError(f"invalid {problem}")
    return dict(labels or {})


def _differs(name: str, differences: list[dict]) -> AlreadyExists:
    def show(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}={x}" for k, x in sorted(v.items())) + "}"
        return "none" if v is None else repr(v) if isinstance(v, str) else str(v).lower()
    what = "; ".join(f"{d['setting']} is {show(d['stored'])}, not {show(d['given'])}"
                     for d in differences)
    return AlreadyExists(f"Pod {name!r} already exists with other settings ({what}); "
                         f"change them with `yoi pod config {name}`", pod_name=name,
                         differences=differences)


def create(state: State, name: str, exec_cmd: str | None = None, cwd: str | None = None,
           accept_peers: str | bool = "open", exist_ok: bool = False,
           peer_request_ttl: float | None = None, handler_timeout: float | None = None,
           labels: dict[str, str] | None = None, queue_max_messages: int | None = None,
           queue_max_bytes: int | None = None) -> tuple[dict, bool]:
    """Create Pod NAME. Returns (record, created).

    ACCEPT_PEERS is the peer policy (``open``, ``ask``, ``never``; ``True`` and
    ``False`` mean ``open`` and ``never``), PEER_REQUEST_TTL how long a request
    to it stays pending (seconds; default ``metadata.DEFAULT_PEER_REQUEST_TTL``).
    With EXIST_OK an existing Pod is accepted only if its settings are the
    ones given (AlreadyExists naming each difference otherwise): "create" must
    not silently keep another handler than the one asked for. QUEUE_MAX_MESSAGES
    and QUEUE_MAX_BYTES bound its queue (``yoi.offline``; None: the defaults).
    """
    check_name(name)
    labels = check_labels(labels)
    accept_peers = metadata.policy_value(accept_peers)
    if peer_request_ttl is not None:
        peer_request_ttl = metadata.ttl_value(peer_request_ttl)
    if exec_cmd is not None:
        utf8_text(exec_cmd, "handler command")
    if cwd is not None:
        cwd = utf8_text(os.path.abspath(cwd), "working directory")
    limits = _queue_limits(queue_max_messages=queue_max_messages,
                           queue_max_bytes=queue_max_bytes)
    with lock_pods(state, [name]) as locked:
        pod = locked.read(name)
        if pod.exists:
            if exist_ok:
                differences = metadata.setting_differences(pod.doc, {
                    "exec": exec_cmd, "cwd": cwd, "accept_peers": accept_peers,
                    "peer_request_ttl": peer_request_ttl, "handler_timeout": handler_timeout,
                    "labels": labels, **limits})
                if differences:
                    raise _differs(name, differences)
                return pod.doc, False
            raise AlreadyExists(f"Pod {name!r} already exists", pod_name=name)
        remove_trash(state, name)
        record = metadata.new_record(name, exec_cmd=exec_cmd, cwd=cwd, accept_peers=accept_peers,
                                     peer_request_ttl=peer_request_ttl,
                                     handler_timeout=handler_timeout, labels=labels,
                                     **limits)
        staging = staging_path(state, name)
        try:
            create_pod_dir(state, name, metadata.dumps(record))
        except OSError as e:
            # Name the file as it would have been: the staging directory is gone.
            inside = os.path.relpath(e.filename, staging) if e.filename else "."
            what = "its directory" if inside == "." or inside.startswith("..") else inside
            raise StorageError(f"cannot create Pod {name!r} in {state.pods_dir}: "
                               f"{e.strerror or e} (writing {what}); nothing was created",
                               path=str(state.pod_dir(name)))
        try:
            fsync_dir(state.pods_dir)
        except OSError as e:  # the Pod exists: say so rather than "cannot create"
            raise StorageError(f"created Pod {name!r}, but syncing {state.pods_dir} failed: "
                               f"{e.strerror}; it may not survive a power cut") from e
        return record, True


def _queue_limits(**given) -> dict:
    """The queue limits GIVEN (None: the default), checked (UsageError)."""
    return {key: None if value is None else metadata.queue_limit_value(key, value)
            for key, value in given.items()}


def configure(state: State, name: str, exec_cmd=_UNSET, accept_peers=_UNSET, cwd=_UNSET,
              peer_request_ttl=_UNSET, handler_timeout=_UNSET, labels=_UNSET,
              set_labels: dict[str, str] | None = None, unset_labels=(),
              queue_max_messages=_UNSET, queue_max_bytes=_UNSET) -> dict:
    """Change settings of NAME under its lock; everything else is preserved.

    ``exec_cmd=None`` removes the handler command. A policy given is written
    in its current form (``"open"``, ``"ask"``, ``"never"``), also over the
    older ``true``/``false``; a record whose policy is not given keeps its
    form. Changing the policy leaves pending requests pending. LABELS
    replaces the whole label table; SET_LABELS and UNSET_LABELS change single
    labels. A queue limit of None goes back to the default.
    """
    check_name(name)
    if accept_peers is not _UNSET:
        accept_peers = metadata.policy_value(accept_peers)
    if peer_request_ttl is not _UNSET:
        peer_request_ttl = metadata.ttl_value(peer_request_ttl)
    if handler_timeout is not _UNSET and handler_timeout is not None:
        metadata.check_seconds(handler_timeout, "the handler timeout")
    if exec_cmd is not _UNSET and exec_cmd is not None:
        utf8_text(exec_cmd, "handler command")
    if cwd is not _UNSET:
        cwd = utf8_text(os.path.abspath(cwd), "working directory")
    if labels is not _UNSET:
        labels = check_labels(labels)
    set_labels = check_labels(set_labels)
    limits = _queue_limits(**{k: v for k, v in (("queue_max_messages", queue_max_messages),
                                                ("queue_max_bytes", queue_max_bytes))
                              if v is not _UNSET})
    with lock_pods(state, [name]) as locked:
        doc = locked.require(name).doc
        given = (("exec", exec_cmd), ("cwd", cwd), ("accept_peers", accept_peers),
                 ("peer_request_ttl", peer_request_ttl), ("handler_timeout", handler_timeout),
                 *limits.items())
        changes = {key: value for key, value in given if value is not _UNSET}
        if labels is not _UNSET or set_labels or unset_labels:
            new = metadata.labels_of(doc) if labels is _UNSET else labels
            new.update(set_labels)
            for key in unset_labels:
                new.pop(key, None)
            changes["labels"] = new
        _apply_settings(doc, changes)
        locked.write_one(name, doc)
        return doc


def _apply_settings(doc: dict, changes: dict) -> None:
    """Set the settings in CHANGES (keys of ``metadata.settings_of``) in DOC; None for
    exec, cwd, handler_timeout, peer_request_ttl or a queue limit, or no labels,
    removes them."""
    runtime = doc.setdefault("runtime", {})
    for key, value in changes.items():
        if key in ("exec", "cwd", "handler_timeout"):
            if value is None:
                runtime.pop(key, None)
            else:
                runtime[key] = value
        elif key == "accept_peers":
            doc["accept_peers"] = metadata.policy_value(value)
        elif key in ("peer_request_ttl", *metadata.QUEUE_LIMITS):
            if value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
        elif value:
            doc["labels"] = dict(sorted(value.items()))
        else:
            doc.pop("labels", None)


def converge_settings(state: State, name: str, wanted: dict) -> list[str]:
    """Give NAME the settings WANTED (keys of ``metadata.settings_of``), under its lock,
    writing only if one differs. Returns the names of the settings changed."""
    check_name(name)
    check_labels(wanted.get("labels"))
    for key in ("exec", "cwd"):
        if wanted.get(key) is not None:
            utf8_text(wanted[key], key)
    with lock_pods(state, [name]) as locked:
        doc = locked.require(name).doc
        differences = metadata.setting_differences(doc, wanted)
        if not differences:
            return []
        _apply_settings(doc, {d["setting"]: d["given"] for d in differences})
        locked.write_one(name, doc)
        return [d["setting"] for d in differences]


def update(state: State, name: str, fn) -> dict:
    """Run FN(doc) -> doc on NAME's record under its lock and write the result."""
    check_name(name)
    with lock_pods(state, [name]) as locked:
        doc = fn(locked.require(name).doc)
        locked.write_one(name, doc)
        return doc


class Listed:
    """One entry of ``list_all``: a plain class, since `yoi pod list` pays for imports."""

    __slots__ = ("name", "doc", "error")

    def __init__(self, name: str, doc: dict | None, error: YoiError | None):
        self.name, self.doc, self.error = name, doc, error

    @property
    def state(self) -> str:
        return "readable" if self.doc is not None else "corrupt"


def list_all(state: State, reduce=None) -> list[Listed]:
    """Every Pod in the state directory, sorted by name, corrupt ones included.

    REDUCE(doc) -> doc, if given, is applied where a record is read, which for
    many Pods is a worker process (``yoi.pool``): only what it keeps is sent
    back. Without it the records are read here.
    """
    out = []
    with paused_gc():
        for chunk in map_chunks(functools.partial(_read_listed, state.root, reduce),
                                state.pod_names(),
                                LIST_POOL_THRESHOLD if reduce is not None else math.inf):
            out.extend(Listed(*item) for item in chunk)
    return out


LIST_POOL_THRESHOLD = POOL_THRESHOLD


def _read_listed(root, reduce, names: list[str]) -> list[tuple]:
    """``list_all``'s items (as tuples) for NAMES of the state directory ROOT."""
    state = State(root)
    out = []
    for name in names:
        try:
            pod = read_pod_file(state, name)
        except YoiError as e:
            out.append((name, None, e))
            continue
        if pod.exists:
            out.append((name, pod.doc if reduce is None else reduce(pod.doc), None))
    return out


def remove(state: State, name: str, recursive: bool = False) -> dict:
    """Remove Pod NAME, and NAME from every peer's list and from its parent's children,
    in one transaction.

    A Pod with children is refused (Refused, naming them) unless RECURSIVE:
    then its whole tree (children, their children...) goes in the same
    transaction, each Pod also from its peers' lists. A running Pod in it is
    refused (Busy). Returns ``{"pod_name": NAME, "removed": True,
    "peers_updated": [...]}``, plus ``children_removed`` (the other Pods of the
    tree) and ``parent_updated`` when there were any.
    """
    check_name(name)
    names = {name}
    while True:
        with lock_pods(state, names) as locked:
            docs = {name: locked.require(name).doc}
            need: set[str] = set()
            tree = _tree(locked, name, docs, need)
            parent = metadata.parent_of(docs[name])
            outside = {parent} if parent is not None else set()
            for member in tree:
                outside |= set(metadata.peer_names(docs[member]))
            outside -= set(tree)
            need |= outside
            if not need <= locked.names:
                names = locked.names | need
                continue  # relock with them included, in sorted order
            if len(tree) > 1 and not recursive:
                kids = [c for c in tree if metadata.parent_of(docs[c]) == name]
                raise Refused(f"Pod {name!r} has children: {', '.join(kids)}; remove them "
                              f"first, or the whole tree with `yoi pod rm {name} --recursive`",
                              pod_name=name, children=[{"pod_name": c} for c in kids])
            with ExitStack() as held:
                for member in tree:
                    held.enter_context(_runtime_held(state, member, name))
                return _remove_tree(locked, tree, sorted(outside), parent)


def descendants(state: State, name: str) -> list[str]:
    """NAME's children, their children..., read without locks, deepest first (the order
    to stop them in); each child must name its parent back."""
    read = functools.partial(read_doc, state)
    order, seen = [], {name}
    level = [(name, read(name))]
    while level:
        below = []
        for member, doc in level:
            for c in metadata.child_names(doc) if doc is not None else ():
                cdoc = None if c in seen else read(c)
                if cdoc is not None and metadata.parent_of(cdoc) == member:
                    seen.add(c)
                    below.append((c, cdoc))
        order = [c for c, _ in below] + order
        level = below
    return order


def _tree(locked, root: str, docs: dict, need: set) -> list[str]:
    """ROOT and every Pod below it (each child naming its parent back), breadth first;
    records go into DOCS. A child not locked yet goes into NEED instead."""
    order = [root]
    for member in order:
        for child in metadata.child_names(docs[member]):
            if child in docs:
                continue
            if child not in locked.names:
                need.add(child)
                continue
            pod = locked.read(child)
            if pod.exists and metadata.parent_of(pod.doc) == member:
                docs[child] = pod.doc
                order.append(child)
    return order


def _remove_tree(locked, tree: list[str], outside: list[str], parent: str | None) -> dict:
    """One transaction: the Pods of TREE leave the records of the Pods OUTSIDE it (their
    peers, and the parent of its root), then go."""
    changes, updated, parent_updated = [], [], None
    for other in outside:
        pod = locked.read(other)
        if not pod.exists:
            continue  # dangling entry: nothing to update on that side
        peer_of = [m for m in tree if metadata.has_peer(pod.doc, m)]
        for member in peer_of:
            metadata.drop_peer(pod.doc, member)
        unlisted = other == parent and metadata.drop_child(pod.doc, tree[0])
        if peer_of or unlisted:
            changes.append(Change(other, "write", metadata.dump_record(pod.doc)))
        if peer_of:
            updated.append(other)
        if unlisted:
            parent_updated = {"pod_name": other}
    changes += [Change(member, "remove") for member in tree]
    locked.commit(changes)
    result = {"pod_name": tree[0], "removed": True,
              "peers_updated": [{"pod_name": p} for p in updated]}
    if len(tree) > 1:
        result["children_removed"] = [{"pod_name": c} for c in tree[1:]]
    if parent_updated is not None:
        result["parent_updated"] = parent_updated
    return result


@contextmanager
def _runtime_held(state: State, name: str, root: str):
    """Hold NAME's runtime lock (so that it cannot start meanwhile); Busy if it runs."""
    try:
        fd = hold_runtime_lock(state, name)
    except Busy as e:
        who = f" (pid {e.details['pid']})" if e.details["pid"] else ""
        how = (f"`yoi pod stop {name}`" if name == root
               else f"`yoi pod stop {root} --recursive`")
        raise Busy(f"Pod {name!r} is running{who}; stop it first with {how}",
                   pod_name=name) from None
    try:
        yield
    finally:
        os.close(fd)


def hold_runtime_lock(state: State, name: str, grace: float = RUNTIME_LOCK_GRACE) -> int:
    """Take pods/NAME/runtime.lock and record our pid in it; raise Busy if NAME runs.

    A live Pod holds this lock for its whole life; a Pod being removed holds
    it so that it cannot start meanwhile. Commands that only look (``yoi pod
    status``, ``list``, ``doctor``) hold it for an instant, hence GRACE
    seconds before calling the Pod running. Returns the descriptor: closing
    it releases the lock.
    """
    path = state.runtime_lock_path(name)
    refuse_symlink(path, "runtime lock")
    fd = try_lock(path, grace)
    if fd is None:
        pid = lock_holder_pid(path)
        who = f" (pid {pid})" if pid else ""
        raise Busy(f"Pod {name!r} is already running{who}", pod_name=name, pid=pid)
    write_pid(fd)
    return fd
