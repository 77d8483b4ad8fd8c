"""Live consent: a Pod on ``accept_peers = "ask"`` is asked before it becomes a peer.

The records (``yoi.peers``): ``register`` writes a pending request into the
asked Pod's record (a single-record change), ``approve`` writes the relation
into both records and clears the request in one transaction, ``deny`` clears
it and records the denial. This module adds what is live about it:

* ``request`` registers and, if the request is pending and the asked Pod is
  live, tells that Pod (the ``offer_peer_request`` method, ours): the Pod
  commits a ``peer_request`` entry to its session log and, if it has a
  handler, runs it with ``YOI_EVENT=peer_request`` and decides by its
  verdict (``yoi.server.consent``). Telling is a courtesy: the request is
  durable before, and a Pod that was not told (not live, or the requester
  died in between) is offered it at its next start, or by a repeated
  ``register``, or the operator decides.
* ``wait`` watches the asked Pod's record until the request is decided,
  expires or the time is up; a decision it sees is confirmed under both
  Pods' locks, so an interrupted approval (rolled back later) is never
  reported as one.
* ``verdict`` reads a handler's answer: its first output line, ``approve``
  or ``deny``.
"""

from __future__ import annotations

import os
import time

from yoi import metadata, peers
from yoi.errors import YoiError
from yoi.state import State
from yoi.txn import lock_pods, read_doc

OFFER_TIMEOUT = 5.0   # seconds to tell a live Pod it has been asked
POLL_FIRST, POLL_MAX = 0.01, 0.25  # seconds between looks at the asked Pod's record
VERDICTS = ("approve", "deny")


def request(state: State, source: str, target: str, offer_timeout: float = OFFER_TIMEOUT
            ) -> dict:
    """``peers.register``, then, for a pending request, tell TARGET if it is live.

    A pending result also has ``live`` (TARGET was told) and ``decider``
    (``"handler"`` when TARGET's handler decides, else ``"operator"``).
    """
    result = peers.register(state, source, target)
    if result["state"] == "pending":
        result.update(offer(state, target, source, offer_timeout))
    return result


def how_decided(result: dict) -> str:
    """Who decides a pending request (``request``'s RESULT), and how, in words."""
    source, target = result["source"], result["peer"]
    if result.get("decider") == "handler":
        return f"{target} is live and its handler decides"
    return (f"{target} approves with `yoi pod peer approve {target} {source}` or denies "
            f"with `yoi pod peer deny {target} {source}`")


def offer(state: State, name: str, requester: str, timeout: float = OFFER_TIMEOUT) -> dict:
    """Tell Pod NAME, if live, about REQUESTER's pending request: ``{"offered",
    "decider"}`` (``offered``: a live NAME was told)."""
    doc = read_doc(state, name)
    path = state.socket_path(name, doc or {})
    if doc is None or not os.path.exists(path):
        return {"offered": False, "decider": "operator"}
    # measured: the socket client (with json) is a quarter of what `yoi pod peer
    # register` adds to Python and Click, and only a pending request needs it
    from yoi import client, protocol
    line = protocol.method("offer_peer_request", {"name": requester})
    try:
        _, data = client.request(path, line, {"peer_request_offered"}, timeout,
                                 "the Pod's answer to the peer request")
    except YoiError:
        return {"offered": False, "decider": "operator"}
    result = data.get("result") if isinstance(data.get("result"), dict) else {}
    return {"offered": True,
            "decider": "handler" if result.get("decider") == "handler" else "operator"}


def outcome(a_doc: dict | None, b_doc: dict | None, requester: str, name: str,
            request: dict, now=None) -> str:
    """What became of REQUEST (REQUESTER asking NAME) given both records:
    ``registered``, ``denied``, ``pending``, ``expired`` or ``withdrawn``."""
    if a_doc is not None and b_doc is not None and metadata.has_peer(
            a_doc, name) and metadata.has_peer(b_doc, requester):
        return "registered"
    if b_doc is None:
        return "withdrawn"
    for r in b_doc.get("peer_requests", []):
        if r.get("id") == request["id"]:
            return "expired" if metadata.is_expired(r, now) else "pending"
    if metadata.denial(b_doc, request["id"]) is not None:
        return "denied"
    if metadata.is_expired(request, now):
        return "expired"  # cleared as expired by a later write or `yoi doctor --fix`
    return "withdrawn"


def _stat_key(state: State, names: tuple[str, ...]) -> tuple:
    key = []
    for name in names:
        try:
            st = os.stat(state.metadata_path(name))
            key.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            key.append(None)
    return tuple(key)


def confirmed_outcome(state: State, requester: str, name: str, request: dict) -> str:
    """``outcome`` read under both Pods' locks (leftover journals rolled back first)."""
    with lock_pods(state, [requester, name]) as locked:
        a, b = locked.read(requester), locked.read(name)
        return outcome(a.doc, b.doc, requester, name, request)


def wait(state: State, requester: str, name: str, request: dict, timeout: float) -> str:
    """Wait up to TIMEOUT seconds for REQUEST to be decided; return its ``outcome``
    (``pending`` when the time ran out first).

    The records are looked at when they change (polled, with back-off); what
    is no longer ``pending`` is confirmed under the locks.
    """
    deadline = time.monotonic() + timeout
    names = (requester, name)
    delay, seen = POLL_FIRST, None
    while True:
        key = _stat_key(state, names)
        if key != seen or metadata.is_expired(request):
            seen = key
            now = metadata.utcnow()
            quick = outcome(read_doc(state, requester), read_doc(state, name),
                            requester, name, request, now)
            if quick != "pending":
                result = confirmed_outcome(state, requester, name, request)
                if result != "pending":
                    return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "pending"
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, POLL_MAX)


def verdict(output: bytes) -> str | None:
    """``approve`` or ``deny`` if OUTPUT's first line says so (case and surrounding
    blanks aside), else None: anything else decides nothing."""
    first = output.split(b"\n", 1)[0].strip().lower()
    word = first.decode("ascii", "replace")
    return word if word in VERDICTS else None


def request_text(name: str, requester: str, request: dict) -> str:
    """What a handler reads on stdin for a peer request."""
    expires = metadata.to_jsonable(request.get("expires_at"))
    return (f"Pod {requester} asks to become a peer of {name} (request {request['id']}, "
            f"expires {expires}).\n"
            "A peer can see this Pod and send it messages, nothing else.\n"
            "Answer with a first line of `approve` or `deny`.\n")
