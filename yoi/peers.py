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
from yoi.txn import Change, journaled_together, list_journals, lock_pods, read_pod_file


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


def _linked(a, b) -> bool:
    return (a.exists and b.exists and metadata.has_peer(a.doc, b.name)
            and metadata.has_peer(b.doc, a.name))


def _link(locked, a, b, now) -> None:
    """Write the relation into both records as one transaction, clearing any request
    (and recorded denial) between the two: a relation and a request never coexist.

    A child (a Pod spawned by another) has peers only within its scope: Refused
    otherwise, and nothing is written."""
    _check_scope(locked.state, a, b)
    changes = []
    for pod, other in ((a, b.name), (b, a.name)):
        changed = False
        if not metadata.has_peer(pod.doc, other):
            pod.doc.setdefault("peers", []).append({"pod_name": other, "registered_at": now})
            changed = True
        changed = metadata.drop_requests(pod.doc, other) or changed
        changed = metadata.drop_denials(pod.doc, other) or changed
        if changed:
            changes.append(Change(pod.name, "write", metadata.dump_record(pod.doc)))
    locked.commit(changes)


def _check_scope(state: State, a, b) -> None:
    """Refused if A or B is a child whose scope does not reach the other."""
    def read(n):
        return {a.name: a.doc, b.name: b.doc}.get(n) or read_pod_file(state, n).doc

    for child, other in ((a, b), (b, a)):
        if metadata.parent_of(child.doc) is not None and not metadata.within_scope(
                child.name, child.doc, other.name, other.doc, read):
            raise Refused(f"{other.name} cannot become a peer of {child.name}: "
                          f"{metadata.scope_words(child.name, child.doc)}",
                          pod_name=child.name)


def _result(source: str, target: str, changed: bool, state: str = "registered",
            request: dict | None = None) -> dict:
    out = {"source": source, "peer": target, "changed": changed, "state": state}
    if request is not None:
        out["request"] = request_json(request)
    return out


def request_json(request: dict) -> dict:
    """A request as reported: ``{"pod_name", "id", "requested_at", "expires_at"}``
    (datetimes: ``metadata.to_jsonable`` makes them text)."""
    return {k: request[k] for k in ("pod_name", "id", "requested_at", "expires_at")}


def register(state: State, source: str, target: str, now=None) -> dict:
    """Ask for SOURCE and TARGET to become mutual peers; TARGET's policy decides.

    ``open``: the relation is written to both records in one transaction.
    ``never``: Refused. ``ask``: a request from SOURCE is recorded in TARGET's
    record (a single-record change) and left pending for TARGET to approve or
    deny; registering again while it is pending changes nothing. If TARGET has
    itself asked SOURCE, registering is SOURCE's approval of that request.
    Idempotent: an existing relation is left as it is.

    Returns ``{"source", "peer", "changed", "state"}`` with ``state``
    ``"registered"`` or ``"pending"`` (then also ``"request"``). Raises
    UsageError (bad name), Refused (self-peer, TARGET does not accept peers),
    NotFound, Busy, CorruptMetadata, StorageError; on any of them neither file
    has changed.
    """
    _check_pair(source, target)
    now = now or metadata.utcnow()
    with lock_pods(state, [source, target]) as locked:
        a, b = _read_pair(locked, source, target)
        if not b.exists:
            raise NotFound(f"no such Pod: {target} (target)", pod_name=target)
        if _linked(a, b):
            return _result(source, target, False)
        policy = metadata.peer_policy(b.doc)
        if metadata.pending_request(a.doc, target, now) is None:
            if policy == "never":
                raise Refused(f"Pod {target!r} does not accept peers", pod_name=target)
            if policy == "ask":
                request = metadata.pending_request(b.doc, source, now)
                if request is not None:
                    return _result(source, target, False, "pending", request)
                request = metadata.add_request(b.doc, source, now)
                locked.write_one(target, b.doc)
                return _result(source, target, True, "pending", request)
        _link(locked, a, b, now)
        return _result(source, target, True)


def approve(state: State, name: str, requester: str, request_id: str | None = None,
            now=None) -> dict:
    """NAME approves REQUESTER's pending request: the relation is written to both
    records and the request cleared, in one transaction.

    With REQUEST_ID, only that request (a handler decides the request it was
    shown, not a later one). Approving when the two are peers already succeeds
    with ``changed`` false. NotFound if there is no such pending request.
    """
    _check_pair(requester, name)
    now = now or metadata.utcnow()
    with lock_pods(state, [requester, name]) as locked:
        b = locked.require(name)
        a = locked.read(requester)
        if _linked(a, b):
            return _result(requester, name, False)
        request = _the_request(b.doc, name, requester, request_id, now)
        if not a.exists:
            raise NotFound(f"no such Pod: {requester} (it asked {name}); `yoi doctor --fix` "
                           "clears its request", pod_name=requester)
        if metadata.predates(request, a.doc):
            raise NotFound(f"the peer request {request['id']} to {name} was made by an "
                           f"earlier Pod named {requester}, since removed: the {requester} "
                           f"there is now never asked; `yoi doctor --fix` clears the request",
                           pod_name=requester)
        _link(locked, a, b, now)
        return _result(requester, name, True, "registered", request)


def deny(state: State, name: str, requester: str, request_id: str | None = None,
         by: str = "operator", now=None) -> dict:
    """NAME denies REQUESTER's pending request: it is cleared and the denial recorded
    (``[[peer_denials]]``, the latest per requester), a single-record change.
    NotFound if there is no such pending request."""
    _check_pair(requester, name)
    now = now or metadata.utcnow()
    with lock_pods(state, [name]) as locked:
        b = locked.require(name)
        request = _the_request(b.doc, name, requester, request_id, now)
        metadata.drop_requests(b.doc, requester)
        metadata.record_denial(b.doc, request, by, now)
        locked.write_one(name, b.doc)
        return _result(requester, name, True, "denied", request)


def _the_request(doc: dict, name: str, requester: str, request_id: str | None, now) -> dict:
    request = metadata.pending_request(doc, requester, now)
    if request is None or (request_id is not None and request["id"] != request_id):
        which = f" {request_id}" if request_id is not None else ""
        raise NotFound(f"no pending peer request{which} from {requester} to {name}",
                       pod_name=name, requester=requester)
    return request


def unregister(state: State, source: str, target: str) -> dict:
    """Remove the relation in both directions, and any request between the two (so
    this also withdraws a pending request). Removing nothing is a no-op.

    A TARGET that no longer exists is fine as long as SOURCE still lists it (a
    dangling entry is removed); otherwise NotFound.
    """
    _check_pair(source, target)
    with lock_pods(state, [source, target]) as locked:
        a, b = _read_pair(locked, source, target)
        a_has = metadata.has_peer(a.doc, target)
        if not b.exists and not a_has:
            raise NotFound(f"no such Pod: {target} (target)", pod_name=target)
        changes = []
        for pod, other in ((a, target), (b, source)):
            if not pod.exists:
                continue
            changed = metadata.has_peer(pod.doc, other)
            if changed:
                metadata.drop_peer(pod.doc, other)
            changed = metadata.drop_requests(pod.doc, other) or changed
            if changed:
                changes.append(Change(pod.name, "write", metadata.dump_record(pod.doc)))
        locked.commit(changes)
        return {"source": source, "peer": target, "changed": bool(changes)}


def list_peers(state: State, name: str) -> list[dict]:
    """NAME's peers with ``registered_at``, ``exists`` and ``reciprocal``.

    Takes NAME's lock, so a transaction on NAME is either finished or (after a
    crash) rolled back first, and no relation of NAME changes while it reads:
    every peer change that involves NAME holds NAME's lock too.
    """
    _require_present(state, name)
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


def _require_present(state: State, name: str) -> None:
    """NotFound unless NAME is there, or a leftover journal's rollback brings it back
    (a Pod whose removal was interrupted is only set aside): before a lock that would
    create a state directory just to fail."""
    check_name(name)
    if not state.pod_dir(name).exists() and not any(
            name in j.pods for j in list_journals(state)):
        raise state.no_such_pod(name)


def list_requests(state: State, name: str) -> list[dict]:
    """The peer requests pending in NAME's record (expired ones are not), oldest first.

    Takes NAME's lock, as ``list_peers`` does, so an approval in progress is
    either finished or rolled back first.
    """
    _require_present(state, name)
    with lock_pods(state, [name]) as locked:
        return [request_json(r) for r in metadata.pending_requests(locked.require(name).doc)]


def is_peer(state: State, name: str, other: str, read=None) -> bool:
    """Are NAME and OTHER peers now? Both records must list each other: a one-sided
    entry (a registration interrupted between its two writes, not yet recovered)
    is no relation. No lock is taken; READ(name) -> record or None may supply
    cached records (the Pod runtime re-reads only files that changed).
    """
    return relation(state, name, other, read)[0] == "peers"


def relation(state: State, name: str, other: str, read=None) -> tuple[str, str | None]:
    """``metadata.relation`` of NAME and OTHER, their records read without a lock (see
    ``is_peer``): a kind of ``metadata.REACH`` (``peers``, ``parent``, ``child``,
    ``parent_peer``), ``("pending", WHY)`` when only a request between the two is
    pending (WHY names it), ``("in_doubt", WHY)`` when the records show a relation
    but a change to both is not committed (its journal is still there: it may be
    rolled back), or ``("none", WHY)``."""
    if read is None:
        def read(n):
            return read_pod_file(state, n).doc
    kind, why = metadata.relation(name, other, read)
    if kind in metadata.REACH and journaled_together(state, name, other):
        return "in_doubt", (
            f"a change to the records of {name} and {other} is not committed (its "
            f"journal is still there: in progress, or left by an interrupted command, "
            f"which the next command on either Pod undoes, e.g. `yoi pod peer list "
            f"{name}`)")
    return kind, why


def may_reach(state: State, name: str, other: str, read=None) -> bool:
    """May NAME and OTHER message each other now (peers, parent and child, or within
    a child's scope)?"""
    return relation(state, name, other, read)[0] in metadata.REACH
