"""Sending messages to Pods: the checks, the ids, one message or a pipelined stream.

A message with a SOURCE is a peer message: SOURCE must list TARGET as a peer,
or the two be parent and child, or TARGET be within the scope of a child
(``metadata.relation``; the receiving Pod checks again against its own
metadata), and TARGET must be running; nothing ever starts it. Without a source it is an operator
notification, which any existing Pod accepts.

Success means acknowledged: the Pod broadcasts the ``system_item`` carrying
our id only after it is durable in its session log. Every message has an id
(``--id`` or a fresh random one); the Pod commits an id at most once, so a
retry with the same id after an unclear failure delivers exactly once.

A Pod that does not announce id support (the original Yoi) is sent the
original's form (a peer message's sender in a header inside the message),
its acknowledgement is the notification that echoes the message, and the
result says ``deduplicates_retries: false``: a retry there may deliver twice.

Order of checks (nothing is committed unless all pass): names, id and
message (UsageError, 2); both Pods exist (NotFound, 3); the peer relation
(Refused, 4); the target is running (Unreachable, 5).

One message to a live Pod of ours is written first, and the records read
only if it is refused or TARGET is not running: the Pod checks the relation
itself (against both records) and refuses what the checks above would stop,
and the refusal is then explained by those checks, with the same errors and
exit statuses. A failure after the message was written (no acknowledgement
in time) is reported as such, whatever the records say by then: the message
may be in. An operator message needs TARGET's record to exist, not to parse:
a live Pod whose record was damaged still takes it (``yoi doctor`` reports
the record).
Reading the records first would cost every send the TOML parser (a fifth
of the time a send takes beyond Python and Click). To a Pod that does not
check (the original's), nothing is written before the checks pass.

With QUEUE, a target that is not running is no error: once both records of
the relation are checked (as the target would check its own), the message is
appended to its queue (``yoi.offline``), durably, and the result's ``state`` says
``queued``; TARGET commits it when it starts. Since the target may have
started between our attempt and our append, we then ask it to drain
(``client.request_drain``): if it is live, the message is committed at once
and the state is ``delivered`` after all.
"""

from __future__ import annotations

import os

from yoi import client, protocol
from yoi.errors import (Interrupted, Refused, TimedOutWaiting, Unreachable, UsageError,
                        YoiError)
from yoi.names import NOTICE_PREFIX, check_name
from yoi.state import State
from yoi.timeouts import DEFAULT

_ID_RULE = "use 1-128 characters of [A-Za-z0-9._:-]"


def new_id(nbytes: int = 12) -> str:
    return os.urandom(nbytes).hex()


def decode(raw: bytes, what: str = "message") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"the {what} is not valid UTF-8 (byte {e.start})")


def message_from_stdin(raw: bytes) -> str:
    """MESSAGE ``-``: stdin as text, without the one trailing newline ``echo`` adds."""
    text = decode(raw, "message on stdin")
    return text[:-1] if text.endswith("\n") else text


def encode(message: str, msg_id: str, source: str | None, where: str = "",
           supports=protocol.SUPPORTS, reply_to: str | None = None) -> bytes:
    """The ``notify`` line for MESSAGE to a Pod that SUPPORTS (see
    ``protocol.notify_method``), answering message REPLY_TO if given; UsageError
    if it is empty or over the limit."""
    if not message.strip():
        raise UsageError(f"{where}empty message: nothing to send")
    try:
        line = protocol.notify_method(message, msg_id, source, supports, reply_to)
    except UnicodeEncodeError:
        raise UsageError(f"{where}the message is not valid UTF-8")
    if len(line) - 1 > protocol.MAX_METHOD_LINE:  # the Pod's limit excludes the newline
        raise UsageError(
            f"{where}message too long: it encodes to a {len(line) - 1}-byte notify line, "
            f"over the protocol limit of {protocol.MAX_METHOD_LINE} bytes (1 MiB) per line")
    return line


def check_id(msg_id: str, what: str = "--id", sent: bool = True) -> str:
    """MSG_ID if it is a message id (UsageError naming WHAT otherwise); one to be SENT
    may not look like a Pod's own notice."""
    if not protocol.is_valid_message_id(msg_id):
        raise UsageError(f"invalid {what} {msg_id!r}: {_ID_RULE}")
    if sent and msg_id.startswith(NOTICE_PREFIX):
        raise UsageError(f"invalid {what} {msg_id!r}: ids that start with {NOTICE_PREFIX!r} "
                         "are a Pod's own (its notices about its children)")
    return msg_id


def pod_ref(name: str | None) -> dict | None:
    """A second Pod in a JSON document (``source``, ``peer``): ``{"pod_name": NAME}``,
    or None (a message without a source is the operator's)."""
    return None if name is None else {"pod_name": name}


def _check_names(target: str, source: str | None) -> None:
    check_name(target, "target Pod name")
    if source is not None:
        check_name(source, "source Pod name")


def resolve_target(state: State, target: str, source: str | None):
    """Check that TARGET exists and, for a peer message, that SOURCE may reach it:
    parent and child, within a child's scope, or SOURCE lists TARGET as a peer.

    Returns TARGET's socket path (a hint: connecting tells whether it is live).
    """
    # measured: these (with tomllib) are a fifth of a one-shot send beyond Click,
    # which reads the records only when a message is not delivered
    from yoi.metadata import REACH, has_peer, pending_between, relation
    from yoi.txn import read_pod_file
    pod = read_pod_file(state, target)
    if not pod.exists:
        raise state.no_such_pod(target)
    if source == target:
        raise Refused(f"{source} cannot send itself a peer message; to notify it as the "
                      f"operator, send without --from and with YOI_POD unset "
                      f"(`yoi pod send --from '' {target} ...`)", pod_name=target,
                      source=pod_ref(source))
    if source is not None:
        src = read_pod_file(state, source)
        if not src.exists:
            raise state.no_such_pod(source, "the source")
        known = {source: src.doc, target: pod.doc}
        kind, why = relation(source, target, lambda n: known[n] if n in known
                             else read_pod_file(state, n).doc)
        if kind == "none" and why:  # a child's scope: whatever peers it lists
            raise Refused(f"not allowed: {why}", pod_name=target, source=pod_ref(source))
        if kind not in REACH and not has_peer(src.doc, target):
            pending = pending_between(src.doc, pod.doc, source, target)
            if pending:
                raise Refused(f"not a peer yet: {pending}", source=source, target=target)
            raise Refused(f"not a peer: {source} does not list {target} as a peer "
                          f"(introduce them with `yoi pod peer register {source} {target}`)",
                          pod_name=target, source=pod_ref(source))
    return state.socket_path(target, pod.doc)


def _not_running(target: str, err: YoiError) -> Unreachable:
    return Unreachable(f"{target} is not running; start it with `yoi pod restore {target}`",
                       pod_name=target, **err.details)


def _refused(target: str, err: Refused, what: str = "the message") -> Refused:
    return Refused(f"{target} refused {what}: {err.details.get('pod_message', '')} "
                   f"({err.details.get('pod_error', 'error')})", pod_name=target, **err.details)


class _CheckFailed(Exception):
    """A check of the records failed (ERROR says how), kept apart from the errors of
    the delivery around it."""

    def __init__(self, error: YoiError):
        super().__init__(error.message)
        self.error = error


def _not_recorded(target: str, err: client.PodFailed, msg_id: str,
                  what: str = "the message") -> client.PodFailed:
    """TARGET failed to record (e.g. its disk is full): exit 1, and a retry is safe."""
    return client.PodFailed(f"{target} could not record {what}: "
                            f"{err.details.get('pod_message', '')}; retry with --id {msg_id}",
                            pod_name=target, id=msg_id, **err.details)


# Long (about 60 lines of code): the send-first attempt, the checks that explain its
# failure and the queueing fallback are one decision, read best in one place.
def send(state: State, target: str, message: str, *, source: str | None = None,
         msg_id: str | None = None, timeout: float = DEFAULT,
         wait: bool = True, reply_to: str | None = None, queue: bool = False) -> dict:
    """Send one message (the answer to message REPLY_TO, if given); with WAIT, return
    only once TARGET acknowledged it; with QUEUE, queue it if TARGET is not running
    (see the module docstring).

    Returns ``{"pod_name": TARGET, "source", "id", "acknowledged", "at",
    "deduplicates_retries", "state"}``, ``state`` being ``delivered``
    (acknowledged), ``sent`` (not WAIT) or ``queued``; a queued message may add
    ``notes`` (what its append repaired, in words).
    """
    _check_names(target, source)
    msg_id = check_id(msg_id) if msg_id is not None else new_id()
    if reply_to is not None:
        check_id(reply_to, "--reply-to", sent=False)
    encode(message, msg_id, source, reply_to=reply_to)  # checked before anything happens
    # Sent first (see the module docstring) where the Pod would bind: not without
    # waiting (a refusal would go unseen), nor from the target to itself.
    path = state.local_socket_path(target) if wait and source != target else None
    checked = path is None

    def check():
        """The checks of the records (their errors, unchanged, leave ``send``)."""
        nonlocal checked
        checked = True
        try:
            return resolve_target(state, target, source)
        except YoiError as e:
            raise _CheckFailed(e)

    def line(supports):
        if not checked and source is not None and "source" not in supports:
            check()  # the original's Pod does not check: check before writing
        return encode(message, msg_id, source, supports=supports, reply_to=reply_to)

    try:
        if checked:
            path = check()
        elif source is None and not os.path.lexists(state.metadata_path(target)):
            check()  # no such Pod (NotFound) even if something answers at its socket
        try:
            data, supports = client.deliver(path, line, msg_id, timeout, wait)
        except (Unreachable, Refused) as e:
            if checked or (getattr(e, "written", False) and not isinstance(e, Refused)):
                raise  # no acknowledgement: whatever the records say now, it may be in
            recorded = check()  # explains the failure, or says where TARGET lives
            if recorded == path or not isinstance(e, client.NotRunning):
                raise
            path = recorded
            data, supports = client.deliver(recorded, line, msg_id, timeout, wait)
    except client.NotRunning as e:
        if not queue:
            raise _not_running(target, e)
        return _queue_one(state, target, path, message, source, msg_id, reply_to, timeout)
    except Refused as e:
        raise _refused(target, e)
    except client.PodFailed as e:
        raise _not_recorded(target, e, msg_id)
    except _CheckFailed as e:
        raise e.error from None
    return {"pod_name": target, "source": pod_ref(source), "id": msg_id,
            "acknowledged": wait, "at": client.acknowledged_at(data) if data else None,
            "deduplicates_retries": "id" in supports,
            "state": "delivered" if wait else "sent"}


def _check_both_records(state: State, target: str, source: str | None) -> None:
    """Before queueing a peer message: TARGET is not live to check its own record of
    the relation, as a live TARGET does, so both records are checked here (Refused
    unless each lists the other, e.g. when only SOURCE's does)."""
    if source is None:
        return
    from yoi import peers  # measured: a live send loads no TOML parser (nor these)
    from yoi.metadata import REACH
    kind, why = peers.relation(state, target, source)
    if kind == "pending":
        raise Refused(f"not a peer yet: {why}; nothing was queued", source=source,
                      target=target)
    if kind == "in_doubt":  # both list each other, but a change to them is unfinished
        raise Refused(f"{source} is not surely a peer of {target}: {why}; nothing was "
                      "queued", pod_name=target, source=pod_ref(source))
    if kind == "none" and why:  # a child's scope stands in the way
        raise Refused(f"{source} may not message {target}: {why}; nothing was queued",
                      pod_name=target, source=pod_ref(source))
    if kind not in REACH:
        raise Refused(f"not a peer: {source} and {target} do not both list each other as "
                      f"peers, so {target} would refuse the message; nothing was queued "
                      f"(introduce them with `yoi pod peer register {source} {target}`)",
                      pod_name=target, source=pod_ref(source))


def _queue_one(state: State, target: str, path, message: str, source: str | None,
               msg_id: str, reply_to: str | None, timeout: float) -> dict:
    from yoi import offline  # measured: a live send does not pay for the queue's imports
    _check_both_records(state, target, source)
    appended = offline.append(state, target, [
        (msg_id, offline.record_line(msg_id, message, source, reply_to))])
    result = {"pod_name": target, "source": pod_ref(source), "id": msg_id,
              "acknowledged": False, "at": None, "deduplicates_retries": True,
              "state": "queued"}
    drained = _ask_to_drain(path, [msg_id], timeout)
    outcome = ((drained or {}).get("ids") or {}).get(msg_id) or {}
    if outcome.get("state") == "delivered":
        result.update(state="delivered", acknowledged=True,
                      at=client.acknowledged_at(drained["acks"].get(msg_id) or {}))
    elif outcome.get("state") == "rejected":
        raise Refused(f"{target} started meanwhile and refused the queued message: "
                      f"{outcome.get('reason', '')} (recorded in its session log as a "
                      "rejected delivery)", pod_name=target, id=msg_id, source=pod_ref(source))
    if appended["notes"]:
        result["notes"] = [f"{target}'s queue: {n}" for n in appended["notes"]]
    return result


def _ask_to_drain(path, ids: list[str], timeout: float) -> dict | None:
    """Ask TARGET (at PATH) to drain its queue, if it is live now; None if it is not, or
    did not answer: what is queued stays queued, durably, and a live Pod finds it
    by itself within a second (``yoi.server.drain``)."""
    try:
        return client.request_drain(path, ids, timeout)
    except YoiError:
        return None


def ask(state: State, target: str, message: str, *, source: str | None,
        reply_timeout: float, msg_id: str | None = None, timeout: float = DEFAULT,
        reply_to: str | None = None, queue: bool = False) -> dict:
    """Send MESSAGE from SOURCE (queued with QUEUE if TARGET is not running) and wait up to REPLY_TIMEOUT seconds for the reply to it
    (an entry ``in_reply_to`` its id) in SOURCE's log: the send's result with
    ``reply``, the reply entry.

    SOURCE must be a live Pod: the reply lands in its log (UsageError without
    one, Unreachable if it is not live). With a fresh id the reply counts
    from the moment before the message is sent, so a fast one is not missed;
    with a given MSG_ID (a retry) any reply to it in SOURCE's log counts,
    also one that came while an earlier try was no longer waiting. On timeout
    ``TimedOutWaiting`` (exit 5) names the message id, so that ``yoi pod wait
    SOURCE --reply-to ID`` can go on waiting.
    """
    # measured: a plain send does not need these (tests/test_cli_help.py pins its imports)
    from yoi import discovery, history, session, store
    if source is None:
        raise UsageError("--wait-reply needs a Pod for the reply to land in: give --from "
                         "POD (or set $YOI_POD); a script can create, start and introduce "
                         "one, e.g. `yoi pod create ci && yoi pod start ci && "
                         f"yoi pod peer register ci {target}`")
    check_name(source, "source Pod name")
    retry = msg_id is not None  # a reply to a given id may have come before this run
    msg_id = check_id(msg_id) if retry else new_id()
    if not discovery.probe(state.socket_path(source, store.read(state, source)))["reachable"]:
        raise Unreachable(f"{source} is not running, so a reply to it has nowhere to land; "
                          f"start it with `yoi pod start {source}`", pod_name=source)
    after = None if retry else session.last_seq(state.session_path(source))
    result = send(state, target, message, source=source, msg_id=msg_id, timeout=timeout,
                  reply_to=reply_to, queue=queue)
    try:
        reply = history.wait(state, source, history.Match(reply_to=msg_id), after,
                             reply_timeout)
    except TimedOutWaiting as e:
        what = (f"message {msg_id} is queued for {target}, which is not running"
                if result["state"] == "queued" else f"{target} acknowledged message {msg_id}")
        raise TimedOutWaiting(
            f"{what}, but no reply to it came to {source} "
            f"within {reply_timeout:g}s; go on waiting with `yoi pod wait {source} "
            f"--reply-to {msg_id}" + (f" --after {after}`" if after is not None else "`"),
            data=result, **e.details) from None
    return {**result, "reply": reply}


def _abbrev(ids: list[str], most: int = 5) -> str:
    shown = ", ".join(ids[:most])
    return shown + (f" and {len(ids) - most} more" if len(ids) > most else "")


class LineFeed:
    """``--lines`` input as messages, as it arrives (a feed of ``client.notify_pipelined``).

    Line N (``\\n`` or ``\\r\\n``; a last line without a newline counts) is the
    message with id ``PREFIX-N``; blank lines are counted but not sent. Reads
    FD when ``pull`` is called (after poll said it is readable, so one read
    does not block), or takes DATA, all of it known. A bad line (not UTF-8,
    too long) stops the feed there with ``error`` set: the lines before it
    are sent, nothing from it on.
    """

    def __init__(self, id_prefix: str, source: str | None, fd: int | None = None,
                 data: bytes = b""):
        self.id_prefix, self.source, self.fd = id_prefix, source, fd
        self.supports = protocol.SUPPORTS  # what the Pod announced, once connected
        self.buf = bytearray(data)
        self.eof = fd is None
        self.scan = 0           # bytes of buf known to hold no newline
        self.lines = 0          # input lines read so far
        self.blank = 0
        self.exhausted = False
        self.error: YoiError | None = None
        self.record = None  # to queue: RECORD(id, text) is what each message becomes

    def pull(self) -> list[tuple[str, bytes]]:
        if self.fd is not None and not self.eof:
            chunk = os.read(self.fd, 1 << 16)
            if chunk:
                self.buf += chunk
            else:
                self.eof = True
        out: list[tuple[str, bytes]] = []
        buf = self.buf
        while True:
            i = buf.find(b"\n", self.scan)
            if i < 0:
                if not (self.eof and buf):
                    break
                i = len(buf)
            raw = bytes(buf[:i])
            del buf[:i + 1]
            self.scan = 0
            self.lines += 1
            try:
                item = self._message(raw)
            except YoiError as e:
                self.error, self.exhausted = e, True
                return out
            if item is not None:
                out.append(item)
        self.scan = len(buf)
        if len(buf) > protocol.MAX_METHOD_LINE:  # no message can come of it
            self.error = UsageError(f"line {self.lines + 1}: message too long: over "
                                    f"{protocol.MAX_METHOD_LINE} bytes (1 MiB) without a "
                                    "newline")
            self.exhausted = True
        elif self.eof and not buf:
            self.exhausted = True
        return out

    def _message(self, raw: bytes) -> tuple[str, bytes] | None:
        n = self.lines
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        text = decode(raw, f"input on line {n}")
        if not text.strip():
            self.blank += 1
            return None
        msg_id = f"{self.id_prefix}-{n}"
        if not protocol.is_valid_message_id(msg_id):
            raise UsageError(f"line {n}: the id {msg_id!r} is too long: {_ID_RULE}")
        line = encode(text, msg_id, self.source, f"line {n}: ", self.supports)
        return msg_id, (line if self.record is None else self.record(msg_id, text))


def lines_prefix(id_prefix: str | None) -> str:
    """The --lines id prefix: ID_PREFIX checked (room for '-1' included), else a random one."""
    if id_prefix is None:
        return new_id(6)
    if id_prefix.startswith(NOTICE_PREFIX):
        check_id(id_prefix)  # the same refusal as for one message
    if not protocol.is_valid_message_id(f"{id_prefix}-1"):
        raise UsageError(f"invalid --id prefix {id_prefix!r}: {_ID_RULE}, leaving room "
                         "for '-N' (N the line number)")
    return id_prefix


def send_lines(state: State, target: str, *, source: str | None = None,
               id_prefix: str | None = None, timeout: float = DEFAULT,
               fd: int | None = None, data: bytes = b"",
               interrupts: client.Interrupts | None = None, on_open=None,
               queue: bool = False) -> dict:
    """Send every non-blank input line as one message over one connection, pipelined,
    each as soon as it is read (from FD as it arrives, or from DATA).

    The message on input line N gets the id ``PREFIX-N`` (ID_PREFIX is
    checked by ``lines_prefix``), so re-running over the same input with the
    same prefix delivers exactly the messages that were not acknowledged (the
    Pod commits an id once and acknowledges a repeat again). Returns a
    summary; if a message was not acknowledged, or INTERRUPTS stopped the
    run, raises the matching error (``Interrupted`` for an interrupt) with the
    summary in its data.

    With QUEUE, a TARGET that is not running gets them all queued instead, in
    line order (``queue_lines``).
    """
    _check_names(target, source)
    id_prefix = lines_prefix(id_prefix)
    path = resolve_target(state, target, source)
    feed = LineFeed(id_prefix, source, fd, data)
    try:
        batch = client.notify_pipelined(path, timeout=timeout, feed=feed,
                                        interrupts=interrupts, on_open=on_open)
    except client.NotRunning as e:
        if not queue:
            raise _not_running(target, e)
        return queue_lines(state, target, path, feed, timeout, interrupts)
    ids = batch.ids
    # `acknowledged`: every message sent was (an interrupted run may have read only
    # part of the input: `interrupted` and `lines_read` say so)
    summary = {"pod_name": target, "source": pod_ref(source), "id_prefix": id_prefix,
               "messages": len(ids), "first_id": ids[0] if ids else None,
               "last_id": ids[-1] if ids else None, "lines_read": feed.lines,
               "skipped_blank": feed.blank, "acknowledged": bool(ids) and batch.acked == len(ids),
               "acknowledged_count": batch.acked, "interrupted": batch.interrupted,
               "deduplicates_retries": "id" in batch.supports}
    if batch.failure is None and not batch.interrupted:
        if not ids:
            raise UsageError("no messages: the input has no non-blank line", data=summary)
        summary["state"] = "delivered"
        return summary
    raise _batch_failure(target, batch, summary, id_prefix)


def queue_lines(state: State, target: str, path, feed: LineFeed, timeout: float,
                interrupts: client.Interrupts | None = None) -> dict:
    """--lines --queue to a TARGET that is not running: read the input to its end,
    then queue every message in line order under one lock: all of them, or none
    if that would go over TARGET's limits. A bad line stops there, as a live
    stream does: the lines before it are queued, then its error is raised. An
    interrupt while reading queues nothing (``Interrupted``)."""
    from yoi import offline  # measured: a live send does not pay for the queue's imports
    _check_both_records(state, target, feed.source)
    feed.record = lambda msg_id, text: offline.record_line(msg_id, text, feed.source)
    items = []
    while not feed.exhausted:
        if feed.fd is not None:
            _wait_readable(feed.fd, interrupts)
        if interrupts is not None and interrupts.requested:
            raise Interrupted(f"interrupted while reading the input; nothing was queued for "
                              f"{target} ({feed.lines} line(s) read)")
        items += feed.pull()
    summary = {"pod_name": target, "source": pod_ref(feed.source),
               "id_prefix": feed.id_prefix, "messages": len(items),
               "first_id": items[0][0] if items else None,
               "last_id": items[-1][0] if items else None, "lines_read": feed.lines,
               "skipped_blank": feed.blank, "acknowledged": False, "acknowledged_count": 0,
               "interrupted": False, "deduplicates_retries": True, "state": "queued"}
    if not items and feed.error is None:
        raise UsageError("no messages: the input has no non-blank line", data=summary)
    if items:
        appended = offline.append(state, target, items)
        if appended["notes"]:
            summary["notes"] = [f"{target}'s queue: {n}" for n in appended["notes"]]
        _ask_to_drain(path, [], timeout)
    if feed.error is not None:
        raise type(feed.error)(f"{feed.error.message}; the {len(items)} message(s) before it "
                               f"were queued for {target}", data=summary, **feed.error.details)
    return summary


def _wait_readable(fd: int, interrupts: client.Interrupts | None) -> None:
    import select  # measured: 0.3 ms a one-shot send does not need
    stop = [interrupts.fd] if interrupts is not None and interrupts.fd is not None else []
    select.select([fd, *stop], [], [])


def _batch_failure(target: str, batch, summary: dict, id_prefix: str) -> YoiError:
    """The error for a batch that was not all acknowledged: what happened to which ids."""
    failure, ids = batch.failure, batch.ids
    refused = batch.with_status(client.REFUSED)
    failed = batch.with_status(client.FAILED)
    in_doubt = batch.with_status(client.SENT)
    not_sent = batch.with_status(client.UNSENT)
    summary.update(refused=refused, not_recorded=failed, not_acknowledged=in_doubt,
                   not_sent=not_sent)
    only_interrupted = failure is None  # nothing failed: it was stopped
    resume = (f"{'resume' if only_interrupted else 'retry'} with --id {id_prefix} over the "
              "same input (what was delivered is not delivered again)"
              if "id" in batch.supports else client.retry_advice(batch.supports, id_prefix))
    if only_interrupted:
        failure = Interrupted("interrupted")
    if not ids:
        parts = [f"nothing sent to {target}"]
    elif batch.acked == len(ids):
        parts = [f"{batch.acked} of {len(ids)} messages to {target} acknowledged"]
    else:
        parts = [f"{len(ids) - batch.acked} of {len(ids)} messages to {target} not "
                 "acknowledged"]
    if only_interrupted:
        lines = summary["lines_read"]
        parts.append(f"interrupted after line {lines}" if lines
                     else "interrupted before the first line")
    elif isinstance(failure, Refused):
        parts.append(_refused(target, failure, refused[0] if refused else "a message").message)
    elif isinstance(failure, client.PodFailed):
        parts.append(f"{target} could not record {failed[0] if failed else 'a message'}: "
                     f"{failure.details.get('pod_message', '')}")
    else:
        parts.append(failure.message)
        if batch.refused:
            parts.append(f"{batch.refused} refused by {target}")
    if batch.interrupted and not isinstance(failure, Interrupted):
        parts.append("interrupted")
    if refused:
        parts.append(f"refused: {_abbrev(refused)}")
    if failed:
        parts.append(f"not recorded: {_abbrev(failed)}")
    if in_doubt:
        parts.append(f"may or may not have been delivered: {_abbrev(in_doubt)}")
    if not_sent:
        parts.append(f"not sent: {_abbrev(not_sent)}")
    if not (batch.complete or only_interrupted or isinstance(failure, UsageError)):
        parts.append(f"input read up to line {summary['lines_read']}")
    parts.append(resume)
    details = {k: v for k, v in failure.details.items() if k not in summary}
    cls = Interrupted if batch.interrupted else type(failure)
    return cls("; ".join(parts), data=summary, **details)
