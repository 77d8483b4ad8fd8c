"""``yoi pod create|config|list|show|rm``: the commands on Pod records (loaded lazily
by the ``yoi pod`` group, see ``yoi.cli.pod``)."""

from __future__ import annotations

import click

from yoi import timeouts
from yoi.cli.common import (POD, SECONDS, YoiCommand, emit, json_option, note_missing_state,
                            pod_argument, say, state_options)
from yoi.cli.pod import parse_labels


handler_timeout_option = click.option(
    "--handler-timeout", type=SECONDS, default=None, metavar="SECONDS",
    help="Stop a handler run (its whole process group) after this long "
         f"(default {timeouts.HANDLER:g}).")


def record_json(name: str, doc: dict) -> dict:
    """A Pod's record (its metadata.toml) as JSON, named ``pod_name`` like everything."""
    from yoi.metadata import to_jsonable
    out = to_jsonable(doc)
    out["pod_name"] = name
    return out


def _pod_document(name: str, doc: dict, **extra) -> dict:
    """What create, config and show print: ``pod_name``, ``record``, then EXTRA."""
    return {"pod_name": name, **extra, "record": record_json(name, doc)}


def _record_text(name: str, doc: dict, live: dict | None = None) -> str:
    from yoi.metadata import (child_names, labels_of, parent_of, peer_names, peer_policy,
                              pending_requests, queue_limits, scope_of, to_jsonable)
    runtime = doc.get("runtime") or {}
    labels = labels_of(doc)
    rows = [
        ("name", name),
        ("created_at", to_jsonable(doc.get("created_at"))),
        ("accept_peers", peer_policy(doc)),
        ("exec", runtime.get("exec", "-")),
        ("cwd", runtime.get("cwd", "-")),
        ("timeout", f"{runtime['handler_timeout']:g}s per handler run" if "handler_timeout"
         in runtime else f"{timeouts.HANDLER:g}s per handler run (default)"),
        ("labels", ", ".join(f"{k}={v}" for k, v in labels.items()) if labels else "-"),
    ]
    if "queue_max_messages" in doc or "queue_max_bytes" in doc:  # else the defaults
        rows.append(("queue", "at most {} messages / {} bytes".format(*queue_limits(doc))))
    if live is not None:
        rows.append(("socket", live.get("socket_path") or "-"))
        rows.append(("live", "yes" if live.get("reachable") else
                     f"no ({live.get('error')})" if live.get("error") else "no"))
    peers = peer_names(doc)
    rows.append(("peers", ", ".join(peers) if peers else "-"))
    if parent_of(doc) is not None:
        rows.append(("parent", f"{parent_of(doc)} (scope {scope_of(doc)})"))
    kids = child_names(doc)
    if kids:
        rows.append(("children", ", ".join(kids)))
    requests = [r["pod_name"] for r in pending_requests(doc)]
    if requests:
        rows.append(("requests", ", ".join(requests) + " (`yoi pod peer list "
                     f"{name} --pending`)"))
    return "\n".join(f"{k + ':':<14}{v}" for k, v in rows)


def queue_options(f):
    """--queue-max-messages N, --queue-max-bytes N: the bounds of a Pod's queue."""
    f = click.option("--queue-max-bytes", type=click.IntRange(min=1), default=None,
                     metavar="N", help="At most N bytes of messages queued for it while "
                                       "it is not running (default 67108864: 64 MiB).")(f)
    return click.option("--queue-max-messages", type=click.IntRange(min=1), default=None,
                        metavar="N", help="At most N messages queued for it while it is not "
                                          "running (default 10000).")(f)


label_option = click.option(
    "--label", "labels", multiple=True, metavar="KEY=VALUE",
    help="A label (repeatable), e.g. --label job=$CI_JOB_ID.")


def policy_options(f):
    """--accept-peers POLICY, its alias --no-accept-peers, --peer-request-ttl."""
    f = click.option("--peer-request-ttl", type=SECONDS, default=None, metavar="SECONDS",
                     help="How long a peer request to this Pod stays pending "
                          "(default 86400: 24 hours).")(f)
    f = click.option("--no-accept-peers", is_flag=True,
                     help="The same as --accept-peers never.")(f)
    return click.option("--accept-peers", "accept_peers",
                        type=click.Choice(["open", "ask", "never"]), is_flag=False,
                        flag_value="open", default=None, metavar="POLICY",
                        help="Who may become a peer: open (anyone registers), ask (a request "
                             "waits for this Pod's handler or the operator), never. Without "
                             "a value: open.")(f)


def _policy(accept_peers: str | None, no_accept_peers: bool) -> str | None:
    from yoi.errors import UsageError
    if no_accept_peers:
        if accept_peers not in (None, "never"):
            raise UsageError(f"--no-accept-peers and --accept-peers {accept_peers} "
                             "contradict each other")
        return "never"
    return accept_peers


@click.command("create", cls=YoiCommand)
@pod_argument()
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="Handler command run for each message (turns an agent CLI into a Pod).")
@click.option("--cwd", type=click.Path(file_okay=False), help="Working directory of the handler.")
@policy_options
@handler_timeout_option
@queue_options
@label_option
@click.option("--exist-ok", is_flag=True,
              help="Succeed if the Pod already exists with these settings (exit 1 naming "
                   "what differs if not).")
@json_option
@state_options
def create_command(name, exec_cmd, cwd, accept_peers, no_accept_peers, peer_request_ttl,
                   handler_timeout, queue_max_messages, queue_max_bytes, labels, exist_ok,
                   as_json, state):
    """Create a Pod: its metadata record and an empty session log.

    --accept-peers sets who may become its peer (default open); with `ask`,
    `yoi pod peer register X NAME` leaves a request for NAME to approve.
    --queue-max-messages and --queue-max-bytes bound its queue: the messages
    `yoi pod send --queue` leaves for it while it is not running.
    With --exist-ok an existing Pod is fine if its settings (--exec, --cwd,
    --accept-peers, --peer-request-ttl, --handler-timeout, --queue-max-*,
    --label) are the ones given; if one differs the command exits 1 naming
    it: change settings with `yoi pod config`.

    \b
    Examples:
      yoi pod create reviewer
      yoi pod create coder --exec 'my-agent --stdin' --cwd ~/project
      yoi pod create build-bot --label job=$CI_JOB_ID --exist-ok
      yoi pod create vault --accept-peers ask --peer-request-ttl 3600
    """
    from yoi import store
    policy = _policy(accept_peers, no_accept_peers) or "open"
    doc, created = store.create(state, name, exec_cmd=exec_cmd, cwd=cwd, accept_peers=policy,
                                exist_ok=exist_ok, peer_request_ttl=peer_request_ttl,
                                handler_timeout=handler_timeout, labels=parse_labels(labels),
                                queue_max_messages=queue_max_messages,
                                queue_max_bytes=queue_max_bytes)
    if not created and not as_json:
        say(f"Pod {name!r} already exists")  # talk: stdout stays the record alone
    emit(as_json, _pod_document(name, doc, created=created), _record_text(name, doc))


@click.command("config", cls=YoiCommand)
@pod_argument()
@click.option("--exec", "exec_cmd", metavar="CMD", help="Set the handler command.")
@click.option("--no-exec", is_flag=True, help="Remove the handler command.")
@policy_options
@click.option("--cwd", type=click.Path(file_okay=False), help="Set the handler's working directory.")
@handler_timeout_option
@queue_options
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Set a label (repeatable).")
@click.option("--unset-label", "unset", multiple=True, metavar="KEY",
              help="Remove a label (repeatable).")
@json_option
@state_options
def config_command(name, exec_cmd, no_exec, accept_peers, no_accept_peers, peer_request_ttl,
                   cwd, handler_timeout, queue_max_messages, queue_max_bytes, labels, unset,
                   as_json, state):
    """Change a Pod's settings; everything else in its record is preserved.

    A new policy (--accept-peers) applies to new registrations: existing
    relations stay, and pending requests stay pending until decided or
    expired. A policy is written as open/ask/never, also over the true/false
    of older records (which read as open/never until then).

    \b
    Examples:
      yoi pod config reviewer --no-accept-peers
      yoi pod config coder --accept-peers ask
      yoi pod config coder --exec 'my-agent --stdin'
      yoi pod config coder --label team=infra --unset-label job
      yoi pod config reviewer --queue-max-messages 50000
    """
    from yoi import store
    from yoi.errors import UsageError
    if exec_cmd is not None and no_exec:
        raise UsageError("--exec and --no-exec are mutually exclusive")
    given = {"exec_cmd": exec_cmd, "accept_peers": _policy(accept_peers, no_accept_peers),
             "peer_request_ttl": peer_request_ttl, "cwd": cwd,
             "handler_timeout": handler_timeout, "queue_max_messages": queue_max_messages,
             "queue_max_bytes": queue_max_bytes}
    kwargs = {key: value for key, value in given.items() if value is not None}
    if no_exec:
        kwargs["exec_cmd"] = None
    if labels:
        kwargs["set_labels"] = parse_labels(labels)
    if unset:
        kwargs["unset_labels"] = unset
    if not kwargs:
        raise UsageError("nothing to change: give --exec, --no-exec, --accept-peers, "
                         "--no-accept-peers, --peer-request-ttl, --cwd, --handler-timeout, "
                         "--queue-max-messages, --queue-max-bytes, --label or --unset-label")
    doc = store.configure(state, name, **kwargs)
    emit(as_json, _pod_document(name, doc), _record_text(name, doc))


@click.command("list", cls=YoiCommand)
@click.option("--as", "as_name", type=POD, metavar="NAME",
              help="Only what Pod NAME can see: itself, its parent, its peers, its "
                   "children.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Only Pods with this label (repeatable: all must match).")
@json_option
@state_options
def list_command(as_name, labels, as_json, state):
    """List every Pod in the state directory with its peers count and live state.

    A QUEUED column (`queued` in --json) counts the messages waiting for a
    Pod that is not running (`yoi pod send --queue`); `?` (null) if its queue
    cannot be read, with a note on stderr saying why (`error` in --json).

    With --as NAME, list NAME's visibility set instead: NAME itself, its
    parent, its peers (and, for a child on scope peers, its parent's peers)
    and its children, with their state, liveness and whether they can be
    restored. Live Pods are probed concurrently with a short timeout. With
    --label, only the Pods that carry every label given.

    \b
    Examples:
      yoi pod list
      yoi pod list --json | jq -r '.pods[].pod_name'
      yoi pod list --label job=$CI_JOB_ID
      yoi pod list --as reviewer
    """
    wanted = parse_labels(labels)
    if as_name is not None:
        if wanted:
            from yoi.errors import UsageError
            raise UsageError("--label cannot be used with --as")
        _list_visible(as_name, as_json, state)
        return
    from yoi.discovery import list_pods
    missing = note_missing_state(state)
    items = list_pods(state, wanted)
    if as_json:
        emit(True, {"pods": items})
        return
    if not items:
        if not missing:
            say("no Pods" + (" with these labels" if wanted else ""))
        return
    width = max(4, *(len(i["pod_name"]) for i in items))
    labelled = any(i["labels"] for i in items)  # the LABELS column only when there are any
    queues = any(i["queued"] != 0 for i in items)  # and QUEUED only when a message waits
    lines = [f"{'NAME':<{width}}  {'PEERS':>5}  {'LIVE':<4}  "
             + (f"{'QUEUED':>6}  " if queues else "")
             + (f"{'STATE':<8}  LABELS" if labelled else "STATE")]
    for i in items:
        peers = "-" if i["peer_count"] is None else str(i["peer_count"])
        queued = "?" if i["queued"] is None else i["queued"]
        line = (f"{i['pod_name']:<{width}}  {peers:>5}  "
                f"{'yes' if i['live']['reachable'] else 'no':<4}  "
                + (f"{queued:>6}  " if queues else ""))
        if labelled:
            line += f"{i['state']:<8}  " + (",".join(f"{k}={v}" for k, v in i["labels"].items())
                                           or "-")
        else:
            line += i["state"]
        lines.append(line)
    click.echo("\n".join(lines))
    for i in items:
        if i["queued"] is None:
            say(f"yoi: note: {i['pod_name']}'s queue cannot be counted: {i['error']}")


def _list_visible(name: str, as_json: bool, state) -> None:
    from yoi.discovery import visible
    items = visible(state, name)
    if as_json:
        emit(True, {"as": {"pod_name": name}, "pods": items})
        return
    width = max(4, *(len(i["pod_name"]) for i in items))
    vis = max(10, *(len(_visibility(i)) for i in items))
    lines = [f"{'NAME':<{width}}  {'VISIBILITY':<{vis}}  {'STATE':<8}  {'LIVE':<4}  "
             f"{'STATUS':<7}  RESTORE"]
    for i in items:
        live = i["live"]
        restore = "possible" if i["restore"]["possible"] else i["restore"]["reason"]
        lines.append(f"{i['pod_name']:<{width}}  {_visibility(i):<{vis}}  {i['state']:<8}  "
                     f"{'yes' if live['reachable'] else 'no':<4}  "
                     f"{live.get('status') or '-':<7}  {restore}")
    click.echo("\n".join(lines))


def _visibility(item: dict) -> str:
    """The wire's visibility, and what a ``peer`` is when it is more than a peer."""
    extra = {"parent": " (parent)", "parent_peer": " (parent's peer)"}
    return item["visibility"] + extra.get(item.get("relation"), "")


@click.command("show", cls=YoiCommand)
@pod_argument()
@json_option
@state_options
def show_command(name, as_json, state):
    """Show everything known about one Pod.

    \b
    Examples:
      yoi pod show reviewer
      yoi pod show reviewer --json
    """
    from yoi.discovery import show
    doc, live = show(state, name)
    emit(as_json, _pod_document(name, doc, live=live), _record_text(name, doc, live))


@click.command("rm", cls=YoiCommand)
@pod_argument()
@click.option("--recursive", "-r", is_flag=True,
              help="Also remove its children, theirs, and so on, in the same transaction.")
@json_option
@state_options
def rm_command(name, recursive, as_json, state):
    """Remove a Pod and remove it from every peer's list, in one transaction.

    A running Pod is refused (exit 6): stop it first. A Pod with children is
    refused (exit 4, naming them) unless --recursive, which removes the whole
    tree (and each of its Pods from its peers' lists) as one transaction:
    after any crash all of it is there or none of it. A child that is
    removed leaves its parent's list of children in the same transaction.

    \b
    Examples:
      yoi pod rm old-reviewer
      yoi pod stop lead --recursive && yoi pod rm lead --recursive
    """
    from yoi import store
    result = store.remove(state, name, recursive=recursive)
    also = [c["pod_name"] for c in result.get("children_removed", [])]
    emit(as_json, result, f"removed {name}" + (f" and {', '.join(also)}" if also else ""))
