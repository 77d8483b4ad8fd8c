"""Sending messages to Pods: the checks, the ids, one message or a pipelined stream.

A message with a SOURCE is a peer message: SOURCE must list TARGET as a peer
(the receiving Pod checks again against its own metadata) and TARGET must be
running; nothing ever starts it. Without a source it is an operator
notification, which any existing Pod accepts.

Success means acknowledged: the Pod broadcasts the ``system_item`` carrying
our id only after it is durable in its session log. Every message has an id
(``--id`` or a fresh random one); the Pod commits an id at most once, so a
retry with the same id after an unclear failure delivers exactly once.

Order of checks (nothing is sent unless all pass): names, id and message
(UsageError, 2); both Pods exist (NotFound, 3); the peer relation (Refused,
4); the target is running (Unreachable, 5).
"""

from __future__ import annotations

import os

from yoi import client, protocol
from yoi.errors import NotFound, Refused, Unreachable, UsageError, YoiError
from yoi.metadata import has_peer, pending_between
from yoi.names import check_name
from yoi.state import State
from yoi.timeouts import DEFAULT
from yoi.txn import read_pod_file

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


def split_lines(raw: bytes) -> list[str]:
    """``--lines`` input: one message per line (``\\n`` or ``\\r\\n``)."""
    text = decode(raw, "input")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def encode(message: str, msg_id: str, source: str | None, where: str = "") -> bytes:
    """The ``notify`` line for MESSAGE; UsageError if it is empty or over the limit."""
    if not message.strip():
        raise UsageError(f"{where}empty message: nothing to send")
    try:
        line = protocol.notify_method(message, msg_id, source)
    except UnicodeEncodeError:
        raise UsageError(f"{where}the message is not valid UTF-8")
    if len(line) - 1 > protocol.MAX_METHOD_LINE:  # the Pod's limit excludes the newline
        raise UsageError(
            f"{where}message too long: it encodes to a {len(line) - 1}-byte notify line, "
            f"over the protocol limit of {protocol.MAX_METHOD_LINE} bytes (1 MiB) per line")
    return line


def check_id(msg_id: str, what: str = "--id") -> str:
    if not protocol.is_valid_message_id(msg_id):
        raise UsageError(f"invalid {what} {msg_id!r}: {_ID_RULE}")
    return msg_id


def _check_names(target: str, source: str | None) -> None:
    check_name(target, "target Pod name")
    if source is not None:
        check_name(source, "source Pod name")


def resolve_target(state: State, target: str, source: str | None):
    """Check that TARGET exists and, for a peer message, that SOURCE lists it.

    Returns TARGET's socket path (a hint: connecting tells whether it is live).
    """
    pod = read_pod_file(state, target)
    if not pod.exists:
        raise NotFound(f"no such Pod: {target}", pod=target)
    if source is not None:
        src = read_pod_file(state, source)
        if not src.exists:
            raise NotFound(f"no such Pod: {source} (the source)", pod=source)
        if not has_peer(src.doc, target):
            pending = pending_between(src.doc, pod.doc, source, target)
            if pending:
                raise Refused(f"not a peer yet: {pending}", source=source, target=target)
            raise Refused(f"not a peer: {source} does not list {target} as a peer "
                          f"(introduce them with `yoi pod peer register {source} {target}`)",
                          source=source, target=target)
    return state.socket_path(target, pod.doc)


def _not_running(target: str, err: YoiError) -> Unreachable:
    return Unreachable(f"{target} is not running; start it with `yoi pod restore {target}`",
                       pod=target, **err.details)


def _refused(target: str, err: Refused, what: str = "the message") -> Refused:
    return Refused(f"{target} refused {what}: {err.details.get('pod_message', '')} "
                   f"({err.details.get('pod_error', 'error')})", pod=target, **err.details)


def send(state: State, target: str, message: str, *, source: str | None = None,
         msg_id: str | None = None, timeout: float = DEFAULT,
         wait: bool = True) -> dict:
    """Send one message; with WAIT, return only once TARGET acknowledged it.

    Returns ``{"target", "source", "id", "acknowledged", "at"}``.
    """
    _check_names(target, source)
    msg_id = check_id(msg_id) if msg_id is not None else new_id()
    line = encode(message, msg_id, source)
    path = resolve_target(state, target, source)
    try:
        data = client.deliver(path, line, msg_id, timeout, wait)
    except client.NotRunning as e:
        raise _not_running(target, e)
    except Refused as e:
        raise _refused(target, e)
    item = (data or {}).get("item") or {}
    return {"target": target, "source": source, "id": msg_id, "acknowledged": wait,
            "at": item.get("at")}


def _abbrev(ids: list[str], most: int = 5) -> str:
    shown = ", ".join(ids[:most])
    return shown + (f" and {len(ids) - most} more" if len(ids) > most else "")


def send_lines(state: State, target: str, lines: list[str], *, source: str | None = None,
               id_prefix: str | None = None,
               timeout: float = DEFAULT) -> dict:
    """Send every non-blank line as one message over one connection, pipelined.

    The message on input line N gets the id ``PREFIX-N`` (blank lines are
    skipped but counted), so re-running the same input with the same prefix
    retries exactly the messages that were not acknowledged. Every line is
    checked before anything is sent. Returns a summary; if a message was not
    acknowledged, raises the first failure's error type with the summary in
    its details.
    """
    _check_names(target, source)
    width = len(str(max(len(lines), 1)))
    if id_prefix is None:
        id_prefix = new_id(6)
    elif not protocol.is_valid_message_id(id_prefix) or len(id_prefix) + 1 + width > 128:
        raise UsageError(f"invalid --id prefix {id_prefix!r}: {_ID_RULE}, leaving room "
                         f"for '-{len(lines)}'")
    encoded, ids = [], []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        mid = f"{id_prefix}-{n}"
        encoded.append(encode(text, mid, source, where=f"line {n}: "))
        ids.append(mid)
    if not ids:
        raise UsageError("no messages: the input has no non-blank line")
    path = resolve_target(state, target, source)
    try:
        batch = client.notify_pipelined(path, encoded, ids, timeout)
    except client.NotRunning as e:
        raise _not_running(target, e)
    summary = {"target": target, "source": source, "id_prefix": id_prefix,
               "messages": len(ids), "first_id": ids[0], "last_id": ids[-1],
               "skipped_blank": len(lines) - len(ids), "acknowledged": False,
               "acknowledged_count": batch.acked}
    if batch.failure is None:
        summary["acknowledged"] = True
        return summary
    raise _batch_failure(target, batch, summary, id_prefix)


def _batch_failure(target: str, batch, summary: dict, id_prefix: str) -> YoiError:
    """The error for a batch that was not all acknowledged: what happened to which ids."""
    failure, ids = batch.failure, batch.ids
    refused = batch.with_status(client.REFUSED)
    in_doubt = batch.with_status(client.SENT)
    not_sent = batch.with_status(client.UNSENT)
    summary.update(refused=refused, not_acknowledged=in_doubt, not_sent=not_sent)
    parts = [f"{len(ids) - batch.acked} of {len(ids)} messages to {target} not acknowledged"]
    if isinstance(failure, Refused):
        parts.append(_refused(target, failure, refused[0] if refused else "a message").message)
    else:
        parts.append(failure.message)
        if batch.refused:
            parts.append(f"{batch.refused} refused by {target}")
    if refused:
        parts.append(f"refused: {_abbrev(refused)}")
    if in_doubt:
        parts.append(f"may or may not have been delivered: {_abbrev(in_doubt)}")
    if not_sent:
        parts.append(f"not sent: {_abbrev(not_sent)}")
    parts.append(f"retry with --id {id_prefix}")
    details = {k: v for k, v in failure.details.items() if k not in summary}
    return type(failure)("; ".join(parts), **details, **summary)
