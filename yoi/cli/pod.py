"""``yoi pod``: create, configure, inspect and remove Pods."""

from __future__ import annotations

import click

from yoi.cli.common import (POD, SECONDS, LazyGroup, emit, json_option, pod_argument, say,
                            state_options)

POD_SUBCOMMANDS: dict[str, str] = {
    "peer": "yoi.cli.peer:peer",
    "send": "yoi.cli.send:send",
    "start": "yoi.cli.runtime:start_command",
    "stop": "yoi.cli.runtime:stop_command",
    "restore": "yoi.cli.runtime:restore_command",
    "status": "yoi.cli.runtime:status_command",
    "log": "yoi.cli.runtime:log_command",
}


@click.group(cls=LazyGroup, lazy_subcommands=POD_SUBCOMMANDS)
def pod():
    """Create, run, introduce and message Pods.

    \b
    Examples:
      yoi pod create reviewer --exec 'my-agent --stdin'
      yoi pod list
      yoi pod show reviewer --json
    """


def _record_json(name: str, doc: dict, live: dict | None = None) -> dict:
    from yoi.metadata import to_jsonable
    out = to_jsonable(doc)
    out["pod_name"] = name
    if live is not None:
        out["live"] = live
    return out


def _record_text(name: str, doc: dict, live: dict | None = None) -> str:
    from yoi.metadata import peer_names, peer_policy, pending_requests, to_jsonable
    runtime = doc.get("runtime") or {}
    rows = [
        ("name", name),
        ("created_at", to_jsonable(doc.get("created_at"))),
        ("accept_peers", peer_policy(doc)),
        ("exec", runtime.get("exec", "-")),
        ("cwd", runtime.get("cwd", "-")),
    ]
    if live is not None:
        rows.append(("socket", live.get("socket_path") or "-"))
        rows.append(("live", "yes" if live.get("reachable") else
                     f"no ({live.get('error')})" if live.get("error") else "no"))
    peers = peer_names(doc)
    rows.append(("peers", ", ".join(peers) if peers else "-"))
    requests = [r["pod_name"] for r in pending_requests(doc)]
    if requests:
        rows.append(("requests", ", ".join(requests) + " (`yoi pod peer list "
                     f"{name} --pending`)"))
    return "\n".join(f"{k + ':':<14}{v}" for k, v in rows)


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


@pod.command("create")
@pod_argument()
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="Handler command run for each message (turns an agent CLI into a Pod).")
@click.option("--cwd", type=click.Path(file_okay=False), help="Working directory of the handler.")
@policy_options
@click.option("--exist-ok", is_flag=True, help="Succeed if the Pod already exists.")
@json_option
@state_options
def create_command(name, exec_cmd, cwd, accept_peers, no_accept_peers, peer_request_ttl,
                   exist_ok, as_json, state):
    """Create a Pod: its metadata record and an empty session log.

    --accept-peers sets who may become its peer (default open); with `ask`,
    `yoi pod peer register X NAME` leaves a request for NAME to approve.

    \b
    Examples:
      yoi pod create reviewer
      yoi pod create coder --exec 'my-agent --stdin' --cwd ~/project
      yoi pod create vault --accept-peers ask --peer-request-ttl 3600
    """
    from yoi import store
    policy = _policy(accept_peers, no_accept_peers) or "open"
    doc, created = store.create(state, name, exec_cmd=exec_cmd, cwd=cwd, accept_peers=policy,
                                exist_ok=exist_ok, peer_request_ttl=peer_request_ttl)
    if not created and not as_json:
        say(f"Pod {name!r} already exists")  # talk: stdout stays the record alone
    emit(as_json, {"created": created, "pod": _record_json(name, doc)}, _record_text(name, doc))


@pod.command("config")
@pod_argument()
@click.option("--exec", "exec_cmd", metavar="CMD", help="Set the handler command.")
@click.option("--no-exec", is_flag=True, help="Remove the handler command.")
@policy_options
@click.option("--cwd", type=click.Path(file_okay=False), help="Set the handler's working directory.")
@json_option
@state_options
def config_command(name, exec_cmd, no_exec, accept_peers, no_accept_peers, peer_request_ttl,
                   cwd, as_json, state):
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
    """
    from yoi import store
    from yoi.errors import UsageError
    if exec_cmd is not None and no_exec:
        raise UsageError("--exec and --no-exec are mutually exclusive")
    kwargs = {}
    if exec_cmd is not None:
        kwargs["exec_cmd"] = exec_cmd
    if no_exec:
        kwargs["exec_cmd"] = None
    policy = _policy(accept_peers, no_accept_peers)
    if policy is not None:
        kwargs["accept_peers"] = policy
    if peer_request_ttl is not None:
        kwargs["peer_request_ttl"] = peer_request_ttl
    if cwd is not None:
        kwargs["cwd"] = cwd
    if not kwargs:
        raise UsageError("nothing to change: give --exec, --no-exec, --accept-peers, "
                         "--no-accept-peers, --peer-request-ttl or --cwd")
    doc = store.configure(state, name, **kwargs)
    emit(as_json, {"pod": _record_json(name, doc)}, _record_text(name, doc))


@pod.command("list")
@click.option("--as", "as_name", type=POD, metavar="NAME",
              help="Only what Pod NAME can see: itself and its peers.")
@json_option
@state_options
def list_command(as_name, as_json, state):
    """List every Pod in the state directory with its peers count and live state.

    With --as NAME, list NAME's visibility set instead: NAME itself and its
    peers, with their state, liveness and whether they can be restored. Live
    Pods are probed concurrently with a short timeout.

    \b
    Examples:
      yoi pod list
      yoi pod list --json | jq -r '.pods[].pod_name'
      yoi pod list --as reviewer
    """
    if as_name is not None:
        _list_visible(as_name, as_json, state)
        return
    from yoi.discovery import list_pods
    items = list_pods(state)
    if as_json:
        emit(True, {"pods": items})
        return
    if not items:
        click.echo("no Pods", err=True)
        return
    width = max(4, *(len(i["pod_name"]) for i in items))
    lines = [f"{'NAME':<{width}}  {'PEERS':>5}  {'LIVE':<4}  STATE"]
    for i in items:
        peers = "-" if i["peers"] is None else str(i["peers"])
        lines.append(f"{i['pod_name']:<{width}}  {peers:>5}  "
                     f"{'yes' if i['live']['reachable'] else 'no':<4}  {i['state']}")
    click.echo("\n".join(lines))


def _list_visible(name: str, as_json: bool, state) -> None:
    from yoi.discovery import visible
    items = visible(state, name)
    if as_json:
        emit(True, {"as": name, "pods": items})
        return
    width = max(4, *(len(i["pod_name"]) for i in items))
    lines = [f"{'NAME':<{width}}  {'VISIBILITY':<10}  {'STATE':<7}  {'LIVE':<4}  "
             f"{'STATUS':<7}  RESTORE"]
    for i in items:
        live = i["live"]
        restore = "possible" if i["restore"]["possible"] else i["restore"]["reason"]
        lines.append(f"{i['pod_name']:<{width}}  {i['visibility']:<10}  {i['state']:<7}  "
                     f"{'yes' if live['reachable'] else 'no':<4}  "
                     f"{live.get('status') or '-':<7}  {restore}")
    click.echo("\n".join(lines))


@pod.command("show")
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
    emit(as_json, {"pod": _record_json(name, doc, live)}, _record_text(name, doc, live))


@pod.command("rm")
@pod_argument()
@json_option
@state_options
def rm_command(name, as_json, state):
    """Remove a Pod and remove it from every peer's list, in one transaction.

    A running Pod is refused (exit 6): stop it first.

    \b
    Examples:
      yoi pod rm old-reviewer
    """
    from yoi import store
    result = store.remove(state, name)
    emit(as_json, result, f"removed {name}")
