"""The protocol methods a Pod answers (PROTOCOL.md), one function each.

``METHODS`` maps a method name to ``fn(pod, client, params)``; a new method
is one function and one row. Methods run on the loop thread and must not
block: anything that takes a lock or talks to another Pod is offloaded to
the operation threads (``pod.ops.offload``). A method refuses a request by
raising ``Invalid`` (answered with ``error invalid_request``).
"""

from __future__ import annotations


from yoi import consent as live_consent
from yoi import control, discovery, metadata, peers, protocol
from yoi.errors import YoiError
from yoi.faults import fault
from yoi.names import is_valid_name
from yoi.server import consent
from yoi.server.connection import Client
from yoi.session import Entry, now_iso, text_segments
from yoi.server.operations import Invalid
from yoi.server.worker import Job


def handle_line(pod, c: Client, line: bytes) -> None:
    """Parse one method line from C and run its method; errors are answered, never raised.

    Whatever happens while handling one line ends there: a refusal is
    answered ``invalid_request``; anything unexpected is answered
    ``internal``, logged with its traceback and raised as an alert, and the
    Pod and the connection go on.
    """
    name = None
    try:
        fault("handle-line")
        try:
            name, params = protocol.parse_method(line)
        except protocol.ProtocolError as e:
            raise Invalid(f"bad method line: {e}") from None
        method = METHODS.get(name)
        if method is None:
            raise Invalid(f"unknown method {name!r}")
        method(pod, c, params)
    except Invalid as e:
        pod.hub.send(c, protocol.error_event("invalid_request", str(e)))
    except Exception as e:
        what = f"the {name} method" if name in METHODS else "a method line"
        pod.hub.send(c, protocol.error_event("internal", f"internal error in {what}"))
        pod.internal_error(what, e)


def shutdown(pod, c: Client, params: dict) -> None:
    pod.loop.request_stop("shutdown method")


def notify(pod, c: Client | None, params: dict, done=None) -> None:
    """A notification; a peer message names its sender in ``source`` (ours) or, as the
    original's sender writes it, in a header at the start of ``message``. Either way
    the sender must be a peer now, and ``body`` is what the original's Pod makes of
    the message in the original's form.

    A queued message is committed here too, with C None (``yoi.server.drain``):
    DONE(outcome), on the loop thread, then tells how it ended: None (committed
    now), ``"duplicate"`` (its id was committed before) or the commit's OSError."""
    message, original, source, msg_id, reply_to = _notify_params(params)
    refusal = pod.peer_refusal(source) if source is not None else None
    if refusal:
        raise Invalid(refusal)
    # (ours) a compact acknowledgement instead of the entry's broadcast (needs an id)
    compact = c is not None and msg_id is not None and params.get("ack") == "compact"
    if msg_id is not None and _in_flight(pod, c, msg_id, compact, done):
        return
    try:
        entry = _notification(message, original, source, msg_id, reply_to)
    except BaseException:
        if msg_id is not None:
            pod.pending_ids.pop(msg_id, None)  # in flight no more: a retry is answered
        raise

    def after(res, err):
        waiting = pod.pending_ids.pop(msg_id, []) if msg_id is not None else []
        for w in waiting:
            if not isinstance(w, tuple):
                w("duplicate" if err is None else err)  # a queued copy's DONE
                continue
            w, w_compact = w
            if err is None:
                pod.hub.send(w, pod.acknowledgement(entry, res, w_compact, again=True))
            else:
                pod.commit_failed(w, err)
            pod.hub.paid(w)
        if err is None and not res.duplicate and pod.exec_cmd:
            pod.worker.submit(Job("notify", res, source, msg_id))
        if done is not None:
            done("duplicate" if err is None and res.duplicate else err)

    pod.commit(c, entry, after, compact)


def _notify_params(params: dict) -> tuple[str, str, str | None, str | None, str | None]:
    """A notify's (message, the message in the original's form, source, id,
    in_reply_to), checked (Invalid); a sender named only by the original's header in
    the message is its source."""
    message = params.get("message")
    if not isinstance(message, str):
        raise Invalid("notify needs a string 'message'")
    source = params.get("source")
    msg_id = params.get("id")
    if source is not None and not (isinstance(source, str) and is_valid_name(source)):
        raise Invalid("'source' must be a Pod name")
    if msg_id is not None and not protocol.is_valid_message_id(msg_id):
        raise Invalid("'id' must be 1-128 characters of [A-Za-z0-9._:-]")
    if msg_id is not None and msg_id.startswith(metadata.NOTICE_PREFIX):
        raise Invalid(f"ids that start with {metadata.NOTICE_PREFIX!r} are the Pod's own "
                      "(its notices about its children)")
    reply_to = params.get("in_reply_to")
    if reply_to is not None and not protocol.is_valid_message_id(reply_to):
        raise Invalid("'in_reply_to' must be a message id: 1-128 characters of "
                      "[A-Za-z0-9._:-]")
    if source is None:
        source = protocol.peer_header_source(message)
        original = message
    else:
        claimed = protocol.peer_header_source(message)
        if claimed is not None and claimed != source:  # the original's clients read this
            raise Invalid(f"the message starts with a peer header naming {claimed!r} but comes "
                          f"from {source!r}; refused")
        original = protocol.with_peer_header(source, message)
    return message, original, source, msg_id, reply_to


def _notification(message: str, original: str, source: str | None, msg_id: str | None,
                  reply_to: str | None) -> Entry:
    item = {"kind": "notification", "message": message,
            "body": protocol.notification_body(original)}
    if source is not None:
        item["source"] = source
    if msg_id is not None:
        item["id"] = msg_id
    if reply_to is not None:
        item["in_reply_to"] = reply_to
    item["at"] = at = now_iso()
    return Entry("system_item", {"item": item}, msg_id, at=at)


def _in_flight(pod, c: Client | None, msg_id: str, compact: bool, done=None) -> bool:
    """A retry of MSG_ID while it is being committed: C is acknowledged once the
    commit lands (a queued copy, C None, is told through DONE), and nothing is
    committed again. (A retry of an id committed before is found by the session
    writer.) COMPACT: C asked for a compact acknowledgement."""
    waiting = pod.pending_ids.get(msg_id)
    if waiting is not None:
        if c is not None:
            waiting.append((c, compact))
            pod.hub.owe(c)
        elif done is not None:
            waiting.append(done)
        return True
    pod.pending_ids[msg_id] = []
    return False


def run(pod, c: Client, params: dict) -> None:
    segments = params.get("input")
    if isinstance(segments, str):
        segments = [{"kind": "text", "content": segments}]
    segments = text_segments(segments)
    if segments is None:
        raise Invalid("run needs 'input': a list of segments "
                      '{"kind":"text","content":"..."}')
    entry = Entry("user_message", {"segments": segments})
    pod.busy(+1)  # status running is announced before the user message

    def after(res, err):
        if err is None:
            pod.worker.submit(Job("run", res, None, None))
        pod.busy(-1)

    pod.commit(c, entry, after)


def _listing(answer: str, key: str, worker_names: bool = False):
    """``list_pods`` (answered ``pods_listed {pods}``) and its later alias
    ``list_workers`` (``workers_listed {workers}``, each item also with ``worker_name``)."""

    def method(pod, c: Client, params: dict) -> None:
        live = discovery.probe_result(pod.socket_path, True, pod.status)

        def op():
            items = discovery.visible(pod.state, pod.name, self_live=live)
            if worker_names:
                items = [{"worker_name": i["pod_name"], **i} for i in items]
            return {key: items}

        pod.ops.offload(c, answer, op)

    return method


def _restoring(answer: str, worker_names: bool = False):
    """``restore_pod`` (answered ``pod_restored``) and its later alias ``restore_worker``
    (``worker_restored``, also with ``worker_name``). The result is tagged by
    ``action``, as the original's: ``already_live`` (with the status, when known)
    or ``restored``."""

    def method(pod, c: Client, params: dict) -> None:
        target = name_param(params)

        def op():
            if target != pod.name and not pod.reaches(target):
                raise Invalid(f"Pod {target!r} is not visible from {pod.name!r}")
            if target == pod.name:
                result = {"action": "already_live", "pod_name": target,
                          "socket_path": str(pod.socket_path), "status": pod.status}
            else:
                res = control.restore(pod.state, target)
                result = {"action": "restored" if res["restored"] else "already_live",
                          "pod_name": target, "socket_path": res["socket_path"]}
            if worker_names:
                result["worker_name"] = target
            return {"result": result}

        pod.ops.offload(c, answer, op)

    return method


# A Pod telling another that it has been asked waits this long for its answer
# (on an operation thread: a hung Pod must not hold it for long).
OFFER_TIMEOUT = 2.0


def _peer_change(action):
    """A method running the CLI's routine with this Pod as the source: registering
    follows the target's policy, so a target on ``ask`` is asked (and told, if live);
    the request is pending and the answer an ``error`` saying so.

    ``peer_registered`` goes to every client, as the original's; our own
    ``peer_unregistered`` only to the requester. A refusal goes to the requester."""
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

        pod.ops.offload(c, answer, op, broadcast=action == "register")

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


def drain_queue(pod, c: Client, params: dict) -> None:
    """(ours) "Messages are queued for you": commit what waits in this Pod's queue
    (``yoi.server.drain``); answered ``queue_drained`` once a pass that began after
    this request has ended. ``ids`` (optional): message ids to report on."""
    ids = params.get("ids", [])
    if not (isinstance(ids, list) and len(ids) <= MAX_DRAIN_IDS
            and all(protocol.is_valid_message_id(i) for i in ids)):
        raise Invalid(f"'ids' must be a list of at most {MAX_DRAIN_IDS} message ids")
    pod.hub.owe(c)

    def answer(result: dict) -> None:
        data = {k: v for k, v in result.items() if k != "rejections"}
        data["ids"] = {i: pod.drainer.outcome(i, result) for i in ids}
        pod.hub.send(c, protocol.event("queue_drained", data))
        pod.hub.paid(c)

    pod.drainer.request(answer)


MAX_DRAIN_IDS = 100
def child_update(pod, c: Client, params: dict) -> None:
    """(ours) "Child NAME has news (its task is done, it stops)": read its log now; answer
    ``child_update_seen`` once the notices it calls for are committed."""
    name = name_param(params)
    try:
        record = pod._record(pod.name) or {}
    except YoiError as e:
        raise Invalid(f"cannot read this Pod's record: {e.message}")
    if not metadata.has_child(record, name):
        raise Invalid(f"{name!r} is not a child of {pod.name!r}")
    pod.hub.owe(c)

    def answered() -> None:
        pod.hub.send(c, protocol.event("child_update_seen", {"name": name}))
        pod.hub.paid(c)

    pod.children.wake(name, answered)


def name_param(params: dict) -> str:
    name = params.get("name")
    if not isinstance(name, str) or not is_valid_name(name):
        raise Invalid("'name' must be a Pod name")
    return name


METHODS = {
    "run": run,
    "notify": notify,
    "shutdown": shutdown,
    "list_pods": _listing("pods_listed", "pods"),
    "restore_pod": _restoring("pod_restored"),
    # the names of the original's later release (Pod became Worker on the wire)
    "list_workers": _listing("workers_listed", "workers", worker_names=True),
    "restore_worker": _restoring("worker_restored", worker_names=True),
    "register_peer": _peer_change("register"),
    "unregister_peer": _peer_change("unregister"),
    "offer_peer_request": offer_peer_request,
    "drain_queue": drain_queue,
    "child_update": child_update,
}
