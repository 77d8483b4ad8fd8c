"""Pod operations on the metadata store: create, configure, read, list, remove.

Library code: takes a ``State`` and plain values, returns plain values, raises
``yoi.errors`` types. Every read-modify-write happens under the Pod's lock.
"""

from __future__ import annotations

import functools
import math
import os

from yoi import metadata
from yoi.atomic import atomic_write, fsync_dir
from yoi.errors import AlreadyExists, Busy, StorageError, UsageError, YoiError
from yoi.lock import RUNTIME_LOCK_GRACE, lock_holder_pid, try_lock, write_pid
from yoi.names import check_name
from yoi.parsing import paused_gc
from yoi.pool import POOL_THRESHOLD, map_chunks
from yoi.state import State, make_private_dir, refuse_symlink
from yoi.txn import CREATING_MARK, Change, lock_pods, read_pod_file, remove_trash, remove_tree

_UNSET = object()


def read(state: State, name: str) -> dict:
    """NAME's record (no lock); NotFound if there is no such Pod."""
    check_name(name)
    pod = read_pod_file(state, name)
    if not pod.exists:
        raise state.no_such_pod(name)
    return pod.doc


def _utf8(value: str, what: str) -> str:
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
           labels: dict[str, str] | None = None) -> tuple[dict, bool]:
    """Create Pod NAME. Returns (record, created).

    ACCEPT_PEERS is the peer policy (``open``, ``ask``, ``never``; ``True`` and
    ``False`` mean ``open`` and ``never``), PEER_REQUEST_TTL how long a request
    to it stays pending (seconds; default ``metadata.DEFAULT_PEER_REQUEST_TTL``).
    With EXIST_OK an existing Pod is accepted only if its settings are the
    ones given (AlreadyExists naming each difference otherwise): "create" must
    not silently keep another handler than the one asked for.
    """
    check_name(name)
    labels = check_labels(labels)
    accept_peers = metadata.policy_value(accept_peers)
    if peer_request_ttl is not None:
        peer_request_ttl = metadata.ttl_value(peer_request_ttl)
    if exec_cmd is not None:
        _utf8(exec_cmd, "handler command")
    if cwd is not None:
        cwd = _utf8(os.path.abspath(cwd), "working directory")
    with lock_pods(state, [name]) as locked:
        pod = locked.read(name)
        if pod.exists:
            if exist_ok:
                differences = metadata.setting_differences(pod.doc, {
                    "exec": exec_cmd, "cwd": cwd, "accept_peers": accept_peers,
                    "peer_request_ttl": peer_request_ttl, "handler_timeout": handler_timeout,
                    "labels": labels})
                if differences:
                    raise _differs(name, differences)
                return pod.doc, False
            raise AlreadyExists(f"Pod {name!r} already exists", pod_name=name)
        remove_trash(state, name)
        record = metadata.new_record(name, exec_cmd=exec_cmd, cwd=cwd, accept_peers=accept_peers,
                                     peer_request_ttl=peer_request_ttl,
                                     handler_timeout=handler_timeout, labels=labels)
        # Build the directory aside and rename it into place: a crash leaves
        # either no Pod or a whole one.
        staging = state.pods_dir / f".{name}{CREATING_MARK}{os.getpid()}"
        try:
            make_private_dir(staging)
            atomic_write(staging / "metadata.toml", metadata.dumps(record))
            fd = os.open(staging / "session.jsonl",
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.fsync(fd)
            os.close(fd)
            os.rename(staging, state.pod_dir(name))
        except BaseException as e:
            remove_tree(staging)
            if isinstance(e, OSError):
                # Name the file as it would have been: the staging directory is gone.
                inside = os.path.relpath(e.filename, staging) if e.filename else "."
                what = "its directory" if inside == "." or inside.startswith("..") else inside
                raise StorageError(f"cannot create Pod {name!r} in {state.pods_dir}: "
                                   f"{e.strerror or e} (writing {what}); nothing was created",
                                   path=str(state.pod_dir(name)))
            raise
        try:
            fsync_dir(state.pods_dir)
        except OSError as e:  # the Pod exists: say so rather than "cannot create"
            raise StorageError(f"created Pod {name!r}, but syncing {state.pods_dir} failed: "
                               f"{e.strerror}; it may not survive a power cut") from e
        return record, True


def configure(state: State, name: str, exec_cmd=_UNSET, accept_peers=_UNSET, cwd=_UNSET,
              peer_request_ttl=_UNSET, handler_timeout=_UNSET, labels=_UNSET,
              set_labels: dict[str, str] | None = None, unset_labels=()) -> dict:
    """Change settings of NAME under its lock; everything else is preserved.

    ``exec_cmd=None`` removes the handler command. A policy given is written
    in its current form (``"open"``, ``"ask"``, ``"never"``), also over the
    older ``true``/``false``; a record whose policy is not given keeps its
    form. Changing the policy leaves pending requests pending. LABELS
    replaces the whole label table; SET_LABELS and UNSET_LABELS change single
    labels.
    """
    check_name(name)
    if accept_peers is not _UNSET:
        accept_peers = metadata.policy_value(accept_peers)
    if peer_request_ttl is not _UNSET:
        peer_request_ttl = metadata.ttl_value(peer_request_ttl)
    if exec_cmd is not _UNSET and exec_cmd is not None:
        _utf8(exec_cmd, "handler command")
    if cwd is not _UNSET:
        cwd = _utf8(os.path.abspath(cwd), "working directory")
    if labels is not _UNSET:
        labels = check_labels(labels)
    set_labels = check_labels(set_labels)
    with lock_pods(state, [name]) as locked:
        doc = locked.require(name).doc
        given = (("exec", exec_cmd), ("cwd", cwd), ("accept_peers", accept_peers),
                 ("peer_request_ttl", peer_request_ttl), ("handler_timeout", handler_timeout))
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
    exec, cwd, handler_timeout or peer_request_ttl, or no labels, removes them."""
    runtime = doc.setdefault("runtime", {})
    for key, value in changes.items():
        if key in ("exec", "cwd", "handler_timeout"):
            if value is None:
                runtime.pop(key, None)
            else:
                runtime[key] = value
        elif key == "accept_peers":
            doc["accept_peers"] = metadata.policy_value(value)
        elif key == "peer_request_ttl":
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
            _utf8(wanted[key], key)
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


def remove(state: State, name: str) -> dict:
    """Remove Pod NAME and NAME from every peer's list, in one transaction.

    Refuses a live Pod (Busy). Returns ``{"pod_name": NAME, "peers_updated": [...]}``.
    """
    check_name(name)
    names = {name}
    while True:
        with lock_pods(state, names) as locked:
            doc = locked.require(name).doc
            peers = set(metadata.peer_names(doc)) - {name}
            if not peers <= locked.names:
                names = locked.names | peers
                continue  # relock with the peers included, in sorted order
            try:
                runtime_fd = hold_runtime_lock(state, name)
            except Busy as e:
                who = f" (pid {e.details['pid']})" if e.details["pid"] else ""
                raise Busy(f"Pod {name!r} is running{who}; stop it first with "
                           f"`yoi pod stop {name}`", pod_name=name) from None
            try:
                changes = []
                updated = []
                for peer in sorted(peers):
                    pod = locked.read(peer)
                    if not pod.exists:
                        continue  # dangling entry: nothing to update on that side
                    metadata.drop_peer(pod.doc, name)
                    changes.append(Change(peer, "write", metadata.dump_record(pod.doc)))
                    updated.append(peer)
                changes.append(Change(name, "remove"))
                locked.commit(changes)
            finally:
                os.close(runtime_fd)
            return {"pod_name": name, "removed": True,
                    "peers_updated": [{"pod_name": p} for p in updated]}


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
