"""Liveness probing, listing and visibility (DESIGN.md "Visibility").

A probe connects to a Pod's socket and drains the connect-time prelude,
keeping the snapshot to read the Pod's status; the whole probe is bounded by
one short timeout, and many probes run concurrently, so a hung Pod costs one
timeout, not one per Pod.

``list_pods`` is the operator's view (every Pod of the state directory);
``visible`` is what one Pod P sees, each item in the shape of the original's
visible-Pod item (a Pod answers ``list_pods`` with these, and original
clients parse them): P itself (visibility ``self_pod``), P's parent, P's
peers and, for a child on scope ``peers``, its parent's peers (``peer``:
the original has no other value for them), and P's children
(``spawned_child``), each with ``pod_name``, ``visibility``, ``relation``
(ours: ``self``, ``parent``, ``peer``, ``parent_peer`` or ``child``),
``state`` (``readable``, ``missing`` or ``corrupt``), ``live``
(``socket_path``, ``reachable``, ``status``, ``error``), ``restore``
(``possible``, ``restore_name``, ``reason``), ``comm_registry``
(``registered``, ``socket_path``: the socket path its record holds, if
any), ``spawned_children`` (``count``: the children its record lists,
``reachable`` and ``unreachable``: whether their sockets answer) and
``error`` (why a record is corrupt).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from yoi import offline, store
from yoi.client import Connection, TimedOut
from yoi.errors import YoiError
from yoi.lock import is_locked
from yoi.metadata import (child_names, has_labels, labels_of, parent_of, peer_names,
                           scope_of)
from yoi.state import State
from yoi.txn import read_doc, read_pod_file

PROBE_TIMEOUT = 1.0


def probe_result(path: Path | str | None, reachable: bool = False, status: str | None = None,
                 error: str | None = None) -> dict:
    """The ``live`` object every listing reports for a Pod."""
    return {"socket_path": None if path is None else str(path), "reachable": reachable,
            "status": status, "error": error}


def probe(path: Path, timeout: float = PROBE_TIMEOUT) -> dict:
    """Connect to PATH and read its snapshot: {"socket_path", "reachable", "status", "error"}."""
    deadline = time.monotonic() + timeout
    try:
        conn = Connection.connect(path, timeout)
    except YoiError as e:
        return probe_result(path, error=getattr(e, "reason", e.message))
    try:
        conn.drain_prelude(max(0.001, deadline - time.monotonic()), keep_snapshot=True)
    except TimedOut:
        return probe_result(path, error="timed out waiting for the snapshot")
    except YoiError as e:
        return probe_result(path, error=e.message)
    finally:
        conn.close()
    status = (conn.snapshot or {}).get("status")
    if isinstance(status, dict):  # tolerate {"status": "..."} as well as "..."
        status = status.get("status")
    return probe_result(path, True, status if isinstance(status, str) else None)


def probe_many(paths: list[Path], timeout: float = PROBE_TIMEOUT) -> list[dict]:
    """Probe every path concurrently: a hung Pod costs one timeout, not one each.

    A path with no socket file is not probed; whether there is one is read from
    one listing of its directory (a state directory's Pods share one), not
    looked up once per path."""
    results: list[dict | None] = [None] * len(paths)
    pending = []
    listings: dict[str, set[str] | None] = {}
    for i, p in enumerate(paths):
        parent, base = os.path.split(p)
        if parent not in listings:
            try:
                listings[parent] = set(os.listdir(parent))
            except OSError:
                listings[parent] = None  # (not a directory we can list: ask each path)
        names = listings[parent]
        if (base not in names) if names is not None else not os.path.exists(p):
            results[i] = probe_result(p, error="no socket")
        else:
            pending.append(i)
    if len(pending) <= 1:
        for i in pending:
            results[i] = probe(paths[i], timeout)
        return results  # type: ignore[return-value]

    def work(i):
        results[i] = probe(paths[i], timeout)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in pending]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results  # type: ignore[return-value]


def _listed_record(doc: dict) -> dict:
    """What ``list_pods`` reads of a record, as a record: its labels and socket path
    hint, and its peers counted (small: at scale it comes back from a worker)."""
    out = {"labels": labels_of(doc), "peer_count": len(peer_names(doc))}
    hint = (doc.get("runtime") or {}).get("socket_path")
    if hint:
        out["runtime"] = {"socket_path": hint}
    return out


def list_pods(state: State, labels: dict[str, str] | None = None) -> list[dict]:
    """Every Pod of the state directory (only those with LABELS, if given) with its
    peer count, labels and queue depth, probed concurrently. A queue that cannot be
    counted is ``queued`` None, and ``error`` says why."""
    listed = store.list_all(state, reduce=_listed_record)
    if labels:
        listed = [p for p in listed if p.doc is not None and has_labels(p.doc, labels)]
    probes = probe_many([state.socket_path(p.name, p.doc) for p in listed])
    items = []
    for p, live in zip(listed, probes):
        try:
            queued, problem = offline.depth(state.queue_path(p.name)), None
        except YoiError as e:  # e.g. a directory where the queue goes: the others still list
            queued, problem = None, e.message
        items.append({"pod_name": p.name, "state": p.state,
                      "peer_count": p.doc["peer_count"] if p.doc else None,
                      "labels": labels_of(p.doc), "live": live, "queued": queued,
                      "error": p.error.message if p.error else problem})
    return items


def show(state: State, name: str) -> tuple[dict, dict]:
    """NAME's record and its ``live`` object."""
    doc = store.read(state, name)
    return doc, probe(state.socket_path(name, doc))


STATUSES = ("idle", "running", "paused")  # the original's status values


def _row(state: State, name: str, visibility: str, relation: str) -> dict:
    """A visible Pod, its record read (``state`` ``missing`` or ``corrupt`` if it cannot be)."""
    row = {"pod_name": name, "visibility": visibility, "relation": relation,
           "state": "readable", "doc": None, "why": None}
    try:
        pod = read_pod_file(state, name)
        if pod.exists:
            row["doc"] = pod.doc
        else:
            row["state"] = "missing"
    except YoiError as e:
        row["state"], row["why"] = "corrupt", e.message
    return row


def _visible_rows(state: State, doc: dict, name: str) -> list[dict]:
    """Who NAME sees besides itself: its parent, its peers, its parent's peers if its
    scope reaches them, its children; each once, in that order."""
    rows: dict[str, dict] = {}

    def add(other: str, visibility: str, relation: str) -> dict | None:
        if other == name or other in rows:
            return None
        rows[other] = _row(state, other, visibility, relation)
        return rows[other]

    parent = parent_of(doc)
    parent_row = add(parent, "peer", "parent") if parent is not None else None
    for peer in sorted(set(peer_names(doc))):
        add(peer, "peer", "peer")
    if parent_row is not None and parent_row["doc"] is not None and scope_of(doc) == "peers":
        for peer in sorted(set(peer_names(parent_row["doc"]))):
            add(peer, "peer", "parent_peer")
    for child in sorted(set(child_names(doc))):
        add(child, "spawned_child", "child")
    return list(rows.values())


def _restore(state: State, row: dict, live: dict) -> dict:
    def no(reason: str) -> dict:
        return {"possible": False, "restore_name": None, "reason": reason}

    if row["state"] == "missing":
        return no("no such Pod")
    if row["state"] == "corrupt":
        return no(f"metadata is corrupt: {row['why']}")
    if live["reachable"]:
        return no("already live")
    if is_locked(state.runtime_lock_path(row["pod_name"])):
        return no("running but not answering")
    return {"possible": True, "restore_name": row["pod_name"], "reason": "not running"}


def _item(state: State, row: dict, live: dict) -> dict:
    """One visible-Pod item, in the original's shape."""
    if live.get("status") not in STATUSES:
        live = {**live, "status": None}
    recorded = ((row["doc"] or {}).get("runtime") or {}).get("socket_path")
    return {"pod_name": row["pod_name"], "visibility": row["visibility"],
            "state": row["state"], "live": live, "restore": _restore(state, row, live),
            "comm_registry": {"registered": bool(recorded),
                              "socket_path": str(recorded) if recorded else None},
            "spawned_children": row.get("children") or {"count": 0, "reachable": 0,
                                                        "unreachable": 0},
            "relation": row["relation"], "error": row["why"]}


def visible(state: State, name: str, timeout: float = PROBE_TIMEOUT,
            self_live: dict | None = None) -> list[dict]:
    """NAME's visibility set: itself, its parent, its peers (sorted), its parent's peers
    if its scope reaches them, its children (sorted), each probed concurrently.

    SELF_LIVE, if given, is used for NAME instead of probing it (a running Pod
    answering ``list_pods`` describes itself). Raises NotFound for an unknown
    NAME and CorruptMetadata if NAME's own record does not parse.
    """
    doc = store.read(state, name)
    rows = [{"pod_name": name, "visibility": "self_pod", "relation": "self",
             "state": "readable", "doc": doc, "why": None}]
    rows += _visible_rows(state, doc, name)
    to_probe = [r for r in rows if r["state"] == "readable" and not (
        self_live is not None and r["visibility"] == "self_pod")]
    paths = [state.socket_path(r["pod_name"], r["doc"]) for r in to_probe]
    # Each visible Pod's own children are counted too (spawned_children): probed in the
    # same batch, each socket once.
    kids = {r["pod_name"]: child_names(r["doc"]) for r in rows if r["doc"] is not None}
    docs = {r["pod_name"]: r["doc"] for r in rows}  # read already: not again
    kid_paths = {}
    for kid in sorted(set().union(*kids.values())):
        kdoc = docs[kid] if kid in docs else read_doc(state, kid)
        if kdoc is not None:
            kid_paths[kid] = state.socket_path(kid, kdoc)
    batch = list(dict.fromkeys(paths + list(kid_paths.values())))
    probed = dict(zip(batch, probe_many(batch, timeout)))
    for r, path in zip(to_probe, paths):
        r["live"] = probed[path]
    for r in rows:
        if r["pod_name"] in kids:
            listed = kids[r["pod_name"]]
            up = sum(1 for k in listed if k in kid_paths and probed[kid_paths[k]]["reachable"])
            r["children"] = {"count": len(listed), "reachable": up,
                             "unreachable": len(listed) - up}
    out = []
    for r in rows:
        live = r.get("live")
        if r["visibility"] == "self_pod" and self_live is not None:
            live = dict(self_live)
        if live is None:  # no record to read the socket path from: where it would be
            live = probe_result(state.default_socket_path(r["pod_name"]), error=r["state"])
        out.append(_item(state, r, live))
    return out
