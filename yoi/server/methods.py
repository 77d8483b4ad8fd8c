"""The protocol methods a Pod answers (PROTOCOL.md), one function each.

``METHODS`` maps a method name to ``fn(pod, client, params)``; a new method
is one function and one row. Methods run on the loop thread and must not
block: anything that takes a lock or talks to another Pod is offloaded to
the operation threads (``pod.ops.offload``). A method refuses a request by
raising ``Invalid`` (answered with ``error invalid_request``).
"""

from __future__ import annotations

import os
import traceback

from yoi import consent as live_consent
from yoi import control, discovery, peers, protocol
from yoi.names import is_valid_name
from yoi.server import consent
from yoi.server.connection import Client
from yoi.server.log import log, now_iso
from yoi.session import Entry, event_of
from yoi.server.operations import Invalid
from yoi.server.worker import Job


def handle_line(pod, c: Client, line: bytes) -> None:
    """Parse one method line from C and run its method; errors are answered, never raised."""
    try:
        name, params = protocol.parse_method(line)
    except protocol.ProtocolError as e:
        pod.hub.send(c, protocol.error_event("invalid_request", f"bad method line: {e}"))
        return
    method = METHODS.get(name)
    if method is None:
        pod.hub.send(c, protocol.error_event("invalid_request", f"unknown method {name!r}"))
        return
    try:
        method(pod, c, params)
    except Invalid as e:
        pod.hub.send(c, protocol.error_event("invalid_request", str(e)))
    except Exception:
        log(f"internal error in {name}:\n" + traceback.format_exc())
        pod.hub.send(c, protocol.error_event("internal", f"internal error in {name}"))


def shutdown(pod, c: Client, params: dict) -> None:
    pod.loop.request_stop("shutdown method")


def notify(pod, c: Client, params: dict) -> None:
    message = params.get("message")
    if not isinstance(message, str):
        raise Invalid("notify needs a string 'message'")
    source = params.get("source")
    msg_id = params.get("id")
    if source is not None and not (isinstance(source, str) and is_valid_name(source)):
        raise Invalid("'source' must be a Pod name")
    if msg_id is not None and not protocol.is_valid_message_id(msg_id):
        raise Invalid("'id' must be 1-128 characters of [A-Za-z0-9._:-]")
    refusal = pod.peer_refusal(source) if source is not None else None
    if refusal:
        raise Invalid(refusal)
    if msg_id is not None and _answered_by_id(pod, c, msg_id):
        return
    item = {"kind": "notification", "message": message,
            "body": protocol.peer_body(source, message) if source is not None else message}
    if source is not None:
        item["source"] = source
    if msg_id is not None:
        item["id"] = msg_id
    item["at"] = at = now_iso()
    entry = Entry("system_item", {"item": item}, msg_id, at=at)

    def after(res, err):
        waiting = pod.pending_ids.pop(msg_id, []) if msg_id is not None else []
        for w in waiting:
            if err is None:
                pod.hub.send(w, entry.event(res.seq))
            else:
                pod.commit_failed(w, err)
            pod.hub.paid(w)
        if err is None and pod.exec_cmd:
            pod.worker.submit(Job("notify", res, source, msg_id))

    pod.commit(c, entry, after)


def _answered_by_id(pod, c: Client, msg_id: str) -> bool:
    """A retry of MSG_ID: acknowledge again (or once its commit lands), commit nothing."""
    original = pod.session.committed_line(msg_id)
    if original is not None:
        pod.hub.send(c, event_of(original, "system_item"))
        return True
    waiting = pod.pending_ids.get(msg_id)
    if waiting is not None:
        waiting.append(c)
        pod.hub.owe(c)
        return True
    pod.pending_ids[msg_id] = []
    return False


def run(pod, c: Client, params: dict) -> None:
    segments = params.get("input")
    if isinstance(segments, str):
        segments = [{"kind": "text", "content": segments}]
    if not isinstance(segments, list) or not all(
            isinstance(s, dict) and isinstance(s.get("content", ""), str) for s in segments):
        raise Invalid("run needs 'input': a list of segments "
                      '{"kind":"text","content":"..."}')
    pod.busy(+1)  # status running is announced before the user message
    entry = Entry("user_message", {"segments": segments})

    def after(res, err):
        if err is None:
            pod.worker.submit(Job("run", res, None, None))
        pod.busy(-1)

    pod.commit(c, entry, after)


def list_pods(pod, c: Client, params: dict) -> None:
    live = discovery.probe_result(pod.socket_path, True, pod.status)
    pod.ops.offload(c, "pods_listed", lambda: {
        "pods": discovery.visible(pod.state, pod.name, self_live=live)})


def restore_pod(pod, c: Client, params: dict) -> None:
    target = name_param(params)

    def op():
        if target != pod.name and not pod.is_peer(target):
            raise Invalid(f"Pod {target!r} is not visible from {pod.name!r}")
        if target == pod.name:
            return {"result": {"pod_name": target, "restored": False,
                               "message": "already live", "pid": os.getpid(),
                               "socket_path": str(pod.socket_path)}}
        return {"result": control.restore(pod.state, target)}

    pod.ops.offload(c, "pod_restored", op)


# A Pod telling another that it has been asked waits this long for its answer
# (on an operation thread: a hung Pod must not hold it for long).
OFFER_TIMEOUT = 2.0


def _peer_change(action):
    """A method running the CLI's routine with this Pod as the source: registering
    follows the target's policy, so a target on ``ask`` is asked (and told, if live);
    the request is pending and the answer an ``error`` saying so."""
    answer = {"register": "peer_registered", "unregister": "peer_unregistered"}[action]

    def method(pod, c: Client, params: dict) -> None:
        target = name_param(params)

        def op():
            if action == "register":
                res = live_consent.request(pod.state, pod.name, target, OFFER_TIMEOUT)
            else:
                res = peers.unregister(pod.state, pod.name, target)
            if res.get("state") == "pending":
                raise Invalid(pending_message(res))
            return {"result": {"source": res["source"], "peer": res["peer"]}}

        pod.ops.offload(c, answer, op)

    return method


def pending_message(res: dict) -> str:
    """The words for a pending request (``yoi.consent.request``'s result)."""
    return (f"peer request pending: {res['peer']} accepts peers only when asked; the "
            f"request (id {res['request']['id']}) is recorded; "
            f"{live_consent.how_decided(res)}")


def offer_peer_request(pod, c: Client, params: dict) -> None:
    """(ours) "Pod NAME has asked to become your peer": see ``yoi.server.consent``."""
    requester = name_param(params)
    pod.ops.offload(c, "peer_request_offered", lambda: consent.offer_request(pod, requester))


def name_param(params: dict) -> str:
    name = params.get("name")
    if not isinstance(name, str) or not is_valid_name(name):
        raise Invalid("'name' must be a Pod name")
    return name


METHODS = {
    "run": run,
    "notify": notify,
    "shutdown": shutdown,
    "list_pods": list_pods,
    "restore_pod": restore_pod,
    "register_peer": _peer_change("register"),
    "unregister_peer": _peer_change("unregister"),
    "offer_peer_request": offer_peer_request,
}
