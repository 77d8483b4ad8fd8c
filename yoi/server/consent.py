"""A live Pod's side of peer consent: offering requests and applying its handler's verdict.

A request to this Pod (``accept_peers = "ask"``) is durable in its record
before the Pod hears of it. It is *offered* to the Pod:

* when the requester tells it (the ``offer_peer_request`` method, sent by
  ``yoi.consent.request``; a repeated ``yoi pod peer register`` tells it
  again), and
* at start-up, for a Pod with a handler: every request still pending in its
  record, so one that was being decided when the Pod stopped is decided now.

Offering commits a ``peer_request`` entry to the session log (broadcast as
the event ``peer_request``) and, if the Pod has a handler, queues a handler
run with ``YOI_EVENT=peer_request``. The handler's first output line decides
(``yoi.consent.verdict``); ``peers.approve``/``peers.deny`` apply it to
exactly the request the handler was shown, under the locks, so a request
decided meanwhile (by the operator, or expired) is not decided again; the
outcome is committed as a ``peer_decision`` entry. No verdict leaves the
request pending for the operator, with an alert. A request is offered once
per process (``pod.offered``), whatever the handler made of it: repeated
offers (a requester registering again and again) cost no handler runs; the
next start offers what is still pending.
"""

from __future__ import annotations

import json
import threading

from yoi import consent, peers
from yoi.errors import Failed, YoiError
from yoi.metadata import to_jsonable
from yoi.server.operations import Invalid
from yoi.server.worker import Job
from yoi.session import Entry

LOOP_WAIT = 30.0  # seconds an operation thread waits for the loop to commit an offer
ANSWER_CHARS = 200  # of the handler's first line, kept in the decision entry


def offer_request(pod, requester: str) -> dict:
    """The ``offer_peer_request`` operation (an operation thread): offer REQUESTER's
    pending request, once it is committed to the log answer ``peer_request_offered``."""
    request = next((r for r in peers.list_requests(pod.state, pod.name)
                    if r["pod_name"] == requester), None)
    if request is None:
        raise Invalid(f"no pending peer request from {requester} to {pod.name}")
    done = threading.Event()
    box: list = []

    def finished(outcome) -> None:
        box.append(outcome)
        done.set()

    pod.loop.call_soon(offer, pod, request, finished)
    if not done.wait(LOOP_WAIT):
        raise Failed("the peer request was not logged in time")
    if isinstance(box[0], BaseException):
        raise Failed(f"the peer request could not be logged: {box[0]}")
    return {"result": {"source": requester, "peer": pod.name, "id": request["id"],
                       "decider": "handler" if pod.exec_cmd else "operator",
                       "offered": box[0]}}


def offer_pending(pod) -> None:
    """At start-up: offer every pending request to this Pod's handler, if it has one."""
    if not pod.exec_cmd:
        return
    try:
        requests = peers.list_requests(pod.state, pod.name)
    except YoiError as e:
        pod.alert("warn", f"could not read the pending peer requests: {e.message}")
        return
    for request in requests:
        pod.loop.call_soon(offer, pod, request, None)


def offer(pod, request: dict, finished=None) -> None:
    """Commit the ``peer_request`` entry and queue the handler run (loop thread).

    FINISHED(outcome) gets True (offered now), False (already offered) or the
    commit's OSError.
    """
    rid, requester = request["id"], request["pod_name"]
    if rid in pod.offered:
        if finished is not None:
            finished(False)
        return
    pod.offered.add(rid)
    decider = "handler" if pod.exec_cmd else "operator"
    entry = Entry("peer_request", {"source": requester, "request_id": rid,
                                   "requested_at": to_jsonable(request["requested_at"]),
                                   "expires_at": to_jsonable(request["expires_at"]),
                                   "decider": decider})

    def after(res, err):
        if err is not None:
            pod.offered.discard(rid)
        elif pod.exec_cmd:
            pod.worker.submit(Job("peer_request", res, requester, rid))
        if finished is not None:
            finished(True if err is None else err)

    pod.commit(None, entry, after)


def handle(pod, worker, job: Job) -> None:
    """Run the handler on a peer request and apply its verdict (the handler thread)."""
    entry = json.loads(pod.session.read(job.entry))
    text = consent.request_text(pod.name, job.source,
                                {"id": job.msg_id, "expires_at": entry.get("expires_at")})
    outcome = worker.run(text, job.source, job.msg_id, event="peer_request")
    if pod.loop.stopping:
        return  # undecided: still pending in the record, offered again at the next start
    for level, message in outcome.problems:
        pod.loop.call_soon(pod.alert, level, message)
    errors = [message for level, message in outcome.problems if level == "error"]
    if outcome.truncated:  # a verdict is never read from a flood (a warning elsewhere)
        errors.append(f"its output was cut at {len(outcome.out)} bytes (truncated)")
    fields = decide(pod, job.source, job.msg_id, outcome.out, "; ".join(errors) or None)
    pod.loop.call_soon(pod.commit, None, Entry("peer_decision", fields))


def decide(pod, requester: str, rid: str, out: bytes, problem: str | None) -> dict:
    """Apply the handler's verdict on request RID; the ``peer_decision`` entry's fields."""
    word = None if problem else consent.verdict(out)
    first = out.split(b"\n", 1)[0].decode("utf-8", "replace").strip()[:ANSWER_CHARS]
    fields = {"source": requester, "request_id": rid, "by": "handler", "answer": first}
    why = None
    if word is None:
        why = problem or ("the handler printed nothing" if not out else
                          "the handler's first output line is not `approve` or `deny`")
    else:
        try:
            if word == "approve":
                peers.approve(pod.state, pod.name, requester, request_id=rid)
            else:
                peers.deny(pod.state, pod.name, requester, request_id=rid, by="handler")
        except YoiError as e:
            why = e.message
    if why is None:
        fields["decision"] = "approved" if word == "approve" else "denied"
        return fields
    fields["decision"] = "none"
    fields["reason"] = why
    pod.loop.call_soon(
        pod.alert, "warn", f"peer request from {requester} (id {rid}) not decided by the "
        f"handler: {why}; unless it was decided already it stays pending for the operator: "
        f"`yoi pod peer approve {pod.name} {requester}` or `yoi pod peer deny {pod.name} "
        f"{requester}`")
    return fields
