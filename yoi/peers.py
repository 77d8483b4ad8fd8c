"""Peer relations: reciprocal, written to both Pods as one transaction.

A relation is real only when both Pods list each other. ``register`` and
``unregister`` take both metadata locks (sorted), journal the exact prior bytes
of both files, and either both files change or neither does (``yoi.txn``).
Used by the CLI and by a running Pod's ``register_peer``/``unregister_peer``.
"""

from __future__ import annotations

from yoi import metadata
from yoi.errors import NotFound, Refused, YoiError
from yoi.names import check_name
from yoi.state import State
from yoi.txn import Change, list_journals, lock_pods, read_pod_file


def _check_pair(source: str, target: str) -> None:
    check_name(source, "source Pod name")
    check_name(target, "target Pod name")
    if source == target:
        raise Refused(f"a Pod cannot be its own peer ({source!r})", pod_name=source)


def _read_pair(locked, source: str, target: str):
    """Both records under the locks; SOURCE must exist (TARGET is the caller's call)."""
    a = locked.read(source)
    if not a.exists:
        raise NotFound(f"no such Pod: {source} (source)", pod_name=source)
    return a, locked.read(target)


def register(state: State, source: str, target: str) -> dict:
    """Make SOURCE and TARGET mutual peers. Idempotent.

    Returns ``{"source", "peer", "changed"}``. Raises UsageError (bad name),
    Refused (self-peer, target does not accept peers), NotFound, Busy,
    CorruptMetadata, StorageError; on any of them neither file has changed.
    """
    _check_pair(source, target)
    with lock_pods(state, [source, target]) as locked:
        a, b = _read_pair(locked, source, target)
        if not b.exists:
            raise NotFound(f"no such Pod: {target} (target)", pod_name=target)
        a_has, b_has = metadata.has_peer(a.doc, target), metadata.has_peer(b.doc, source)
        if a_has and b_has:
            return {"source": source, "peer": target, "changed": False}
        if not metadata.accepts_peers(b.doc):
            raise Refused(f"Pod {target!r} does not accept peers", pod_name=target)
        now = metadata.utcnow()
        changes = []
        for pod, other, has in ((a, target, a_has), (b, source, b_has)):
            if not has:
                pod.doc.setdefault("peers", []).append({"pod_name": other, "registered_at": now})
                changes.append(Change(pod.name, "write", metadata.dumps(pod.doc)))
        locked.commit(changes)
        return {"source": source, "peer": target, "changed": True}


def unregister(state: State, source: str, target: str) -> dict:
    """Remove the relation in both directions. Removing a missing relation is a no-op.

    A TARGET that no longer exists is fine as long as SOURCE still lists it (a
    dangling entry is removed); otherwise NotFound.
    """
    _check_pair(source, target)
    with lock_pods(state, [source, target]) as locked:
        a, b = _read_pair(locked, source, target)
        a_has = metadata.has_peer(a.doc, target)
        b_has = b.exists and metadata.has_peer(b.doc, source)
        if not b.exists and not a_has:
            raise NotFound(f"no such Pod: {target} (target)", pod_name=target)
        changes = []
        for pod, other, has in ((a, target, a_has), (b, source, b_has)):
            if has:
                metadata.drop_peer(pod.doc, other)
                changes.append(Change(pod.name, "write", metadata.dumps(pod.doc)))
        locked.commit(changes)
        return {"source": source, "peer": target, "changed": bool(changes)}


def list_peers(state: State, name: str) -> list[dict]:
    """NAME's peers with ``registered_at``, ``exists`` and ``reciprocal``.

    Takes NAME's lock, so a transaction on NAME is either finished or (after a
    crash) rolled back first, and no relation of NAME changes while it reads:
    every peer change that involves NAME holds NAME's lock too.
    """
    check_name(name)
    # Do not create a state dir just to fail; but a Pod whose removal was
    # interrupted is only set aside: its journal's rollback brings it back.
    if not state.pod_dir(name).exists() and not any(
            name in j.pods for j in list_journals(state)):
        raise state.no_such_pod(name)
    with lock_pods(state, [name]) as locked:
        pod = locked.require(name)
        out = []
        for entry in pod.doc.get("peers", []):
            other = entry["pod_name"]
            item = {"pod_name": other, "registered_at": entry.get("registered_at"),
                    "exists": False, "reciprocal": False}
            try:
                peer = read_pod_file(state, other)
            except YoiError:  # a corrupt peer is reported as non-reciprocal here
                peer = None
            if peer is not None and peer.exists:
                item["exists"] = True
                item["reciprocal"] = metadata.has_peer(peer.doc, name)
            out.append(item)
        return out


def is_peer(state: State, name: str, other: str, read=None) -> bool:
    """Are NAME and OTHER peers now? Both records must list each other: a one-sided
    entry (a registration interrupted between its two writes, not yet recovered)
    is no relation. No lock is taken; READ(name) -> record or None may supply
    cached records (the Pod runtime re-reads only files that changed).
    """
    if read is None:
        def read(n):
            return read_pod_file(state, n).doc
    return (metadata.has_peer(read(name) or {}, other)
            and metadata.has_peer(read(other) or {}, name))
