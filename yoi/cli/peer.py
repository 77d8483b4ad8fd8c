"""``yoi pod peer``: introduce Pods to each other, decide requests, undo, list."""

from __future__ import annotations

import click

from yoi.cli.common import (SECONDS, LazyGroup, emit, json_option, pod_argument, say,
                            state_options)


@click.group(cls=LazyGroup)
def peer():
    """Register, approve, deny, remove and list peer relations between Pods.

    A peer relation is mutual and lives in both Pods' metadata; it grants
    visibility and messaging, nothing else. Register, approve and remove
    change both Pods as one transaction: after any failure or crash both show
    the old relation or both show the new one. A Pod on `--accept-peers ask`
    is asked first: the request waits in its record until it (its handler, if
    it is live) or the operator approves or denies it.

    \b
    Examples:
      yoi pod peer register reviewer coder
      yoi pod peer list coder --pending
      yoi pod peer approve coder reviewer
      yoi pod peer remove reviewer coder
    """


def pair_document(result: dict, name: str, other: str) -> dict:
    """A peer operation's result as JSON: the Pod named first on the command line is
    ``pod_name``, the other ``peer``; the rest (changed, state, request...) as is."""
    from yoi.metadata import to_jsonable
    rest = to_jsonable({k: v for k, v in result.items() if k not in ("source", "peer")})
    return {"pod_name": name, "peer": {"pod_name": other}, **rest}


def _run_pair(operation: str, source: str, target: str, as_json: bool, state,
              changed: str, unchanged: str) -> None:
    """Call ``yoi.peers.OPERATION`` on the pair and report it."""
    from yoi import peers
    result = getattr(peers, operation)(state, source, target)
    emit(as_json, pair_document(result, source, target),
         f"{changed if result['changed'] else unchanged} {source} <-> {target}")


@peer.command("register")
@pod_argument("source")
@pod_argument("target")
@click.option("--wait", "wait", type=SECONDS, default=None, metavar="SECONDS",
              help="If TARGET is asked, wait this long for its decision: exit 0 approved, "
                   "4 denied, 5 no decision in time (the request stays pending).")
@json_option
@state_options
def register_command(source, target, wait, as_json, state):
    """Make SOURCE and TARGET mutual peers, as TARGET's policy allows.

    TARGET's --accept-peers policy decides: `open` registers at once (both
    records, one transaction); `never` is refused (exit 4); `ask` records a
    pending request in TARGET's record and exits 0 reporting `pending`
    (--json: "state": "pending"). A live TARGET is told at once and its
    handler decides; otherwise the operator approves with `yoi pod peer
    approve TARGET SOURCE` or denies with `yoi pod peer deny TARGET SOURCE`.
    Registering again while the request is pending changes nothing (and tells
    a live TARGET again). A request expires after TARGET's
    --peer-request-ttl (default 24 hours).

    With --wait SECONDS a pending request is waited for: exit 0 once approved
    ("state": "registered"), 4 if denied, 5 if no decision came in time (the
    request stays pending) or it expired, 1 if it was withdrawn.

    Registering an existing relation succeeds and rewrites nothing. Refused
    (exit 4) when SOURCE and TARGET are the same Pod or TARGET does not accept
    peers; exit 3 names the Pod that does not exist.

    \b
    Examples:
      yoi pod peer register reviewer coder
      yoi pod peer register reviewer coder --json
      yoi pod peer register reviewer coder --wait 60
    """
    from yoi import consent
    from yoi.errors import Failed, Refused, Unreachable
    result = consent.request(state, source, target)
    data = pair_document(result, source, target)
    if result["state"] == "registered":
        unchanged = "already peers:"
        emit(as_json, data, f"{'registered' if result['changed'] else unchanged} "
                            f"{source} <-> {target}")
        return
    if wait is None:
        emit(as_json, data, _pending_text(source, target, data))
        return
    if not as_json:
        who = "its handler's" if data.get("decider") == "handler" else "the"
        say(f"pending: {target} accepts peers only when asked; waiting up to {wait:g}s for "
            f"{who} decision on request {data['request']['id']}")
    outcome = consent.wait(state, source, target, result["request"], wait)
    data["state"] = outcome
    rid = data["request"]["id"]
    if outcome == "registered":
        emit(as_json, data, f"registered {source} <-> {target} ({target} approved "
                            f"request {rid})")
    elif outcome == "denied":
        raise Refused(f"{target} denied the peer request from {source} (id {rid})",
                      data=data, pod_name=target)
    elif outcome == "pending":
        raise Unreachable(f"no decision on the peer request from {source} to {target} "
                          f"(id {rid}) within {wait:g}s; it stays pending until "
                          f"{data['request']['expires_at']}", data=data, pod_name=target)
    elif outcome == "expired":
        raise Unreachable(f"the peer request from {source} to {target} (id {rid}) expired "
                          "without a decision", data=data, pod_name=target)
    else:
        raise Failed(f"the peer request from {source} to {target} (id {rid}) was withdrawn "
                     "without a decision", data=data, pod_name=target)


def _pending_text(source: str, target: str, data: dict) -> str:
    from yoi import consent
    request = data["request"]
    again = "" if data["changed"] else "still "
    lines = [f"pending: {target} accepts peers only when asked; the request from {source} "
             f"(id {request['id']}) is {again}waiting, until {request['expires_at']}"]
    lines.append(consent.how_decided({**data, "source": source, "peer": target}) + (
        f" (`yoi pod log {target}` shows the decision)" if data.get("decider") == "handler"
        else ""))
    return "\n".join(lines)


def _decide(decision: str, name: str, requester: str, as_json: bool, state) -> None:
    from yoi import peers
    if decision == "approve":
        result = peers.approve(state, name, requester)
    else:
        result = peers.deny(state, name, requester)
    data = pair_document(result, name, requester)
    if not result["changed"]:
        text = f"already peers: {requester} <-> {name}"
    elif decision == "approve":
        text = f"approved: registered {requester} <-> {name} (request {data['request']['id']})"
    else:
        text = f"denied the peer request from {requester} to {name} " \
               f"(request {data['request']['id']})"
    emit(as_json, data, text)


@peer.command("approve")
@pod_argument("name")
@pod_argument("requester")
@json_option
@state_options
def approve_command(name, requester, as_json, state):
    """Approve REQUESTER's pending request to become a peer of NAME.

    Writes the relation to both Pods' records and clears the request, in one
    transaction: after any failure or crash either the request is still
    pending or the two are peers, never both or neither. Works whether or not
    NAME is live, and whatever NAME's policy is now. Exit 3 if there is no
    such pending request; approving Pods that are peers already succeeds with
    changed: false.

    \b
    Examples:
      yoi pod peer approve coder reviewer
      yoi pod peer approve coder reviewer --json
    """
    _decide("approve", name, requester, as_json, state)


@peer.command("deny")
@pod_argument("name")
@pod_argument("requester")
@json_option
@state_options
def deny_command(name, requester, as_json, state):
    """Deny REQUESTER's pending request to become a peer of NAME.

    Clears the request and records the denial in NAME's record (one record,
    replaced atomically); a requester waiting with `register --wait` exits 4.
    REQUESTER may ask again later. Exit 3 if there is no such pending request.

    \b
    Examples:
      yoi pod peer deny coder stranger
      yoi pod peer deny coder stranger --json
    """
    _decide("deny", name, requester, as_json, state)


@peer.command("remove")
@pod_argument("source")
@pod_argument("target")
@json_option
@state_options
def remove_command(source, target, as_json, state):
    """Remove the peer relation between SOURCE and TARGET, both directions.

    Also clears a request pending between the two (so SOURCE withdraws its
    request with it). Removing a relation that does not exist succeeds with
    changed: false.

    \b
    Examples:
      yoi pod peer remove reviewer coder
      yoi pod peer remove reviewer coder --json
    """
    _run_pair("unregister", source, target, as_json, state, "removed", "not peers:")


@peer.command("list")
@pod_argument()
@click.option("--pending", is_flag=True,
              help="List the peer requests waiting for NAME's decision instead.")
@json_option
@state_options
def list_command(name, pending, as_json, state):
    """List NAME's peers, when each was registered and whether it is reciprocal.

    A relation is always reciprocal unless the state was damaged from outside;
    `yoi doctor` reports and repairs that. With --pending, list the requests
    to become NAME's peers that wait for its decision: who asked, when, until
    when the request stands, and its id (expired requests are not listed).

    \b
    Examples:
      yoi pod peer list reviewer
      yoi pod peer list reviewer --json | jq -r '.peers[].pod_name'
      yoi pod peer list coder --pending
    """
    from yoi import peers
    from yoi.metadata import to_jsonable
    if pending:
        _list_pending(name, as_json, state)
        return
    items = to_jsonable(peers.list_peers(state, name))
    if as_json:
        emit(True, {"pod_name": name, "peers": items})
        return
    if not items:
        click.echo(f"{name} has no peers", err=True)
        return
    width = max(4, *(len(i["pod_name"]) for i in items))
    lines = [f"{'NAME':<{width}}  {'REGISTERED_AT':<20}  RECIPROCAL"]
    for i in items:
        mark = "yes" if i["reciprocal"] else ("no (missing Pod)" if not i["exists"] else "no")
        lines.append(f"{i['pod_name']:<{width}}  {i['registered_at'] or '-':<20}  {mark}")
    click.echo("\n".join(lines))


def _list_pending(name: str, as_json: bool, state) -> None:
    from yoi import peers
    from yoi.metadata import to_jsonable
    items = to_jsonable(peers.list_requests(state, name))
    if as_json:
        emit(True, {"pod_name": name, "requests": items})
        return
    if not items:
        click.echo(f"{name} has no pending peer requests", err=True)
        return
    width = max(4, *(len(i["pod_name"]) for i in items))
    lines = [f"{'FROM':<{width}}  {'REQUESTED_AT':<20}  {'EXPIRES_AT':<20}  ID"]
    for i in items:
        lines.append(f"{i['pod_name']:<{width}}  {i['requested_at']:<20}  "
                     f"{i['expires_at']:<20}  {i['id']}")
    click.echo("\n".join(lines))
