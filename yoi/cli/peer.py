"""``yoi pod peer``: introduce Pods to each other, undo it, list a Pod's peers."""

from __future__ import annotations

import click

from yoi.cli.common import LazyGroup, emit, json_option, pod_argument, state_options


@click.group(cls=LazyGroup)
def peer():
    """Register, remove and list peer relations between Pods.

    A peer relation is mutual and lives in both Pods' metadata; it grants
    visibility and messaging, nothing else. Register and remove change both
    Pods as one transaction: after any failure or crash both show the old
    relation or both show the new one.

    \b
    Examples:
      yoi pod peer register reviewer coder
      yoi pod peer list reviewer
      yoi pod peer remove reviewer coder
    """


def _run_pair(operation: str, source: str, target: str, as_json: bool, state,
              changed: str, unchanged: str) -> None:
    """Call ``yoi.peers.OPERATION`` on the pair and report it."""
    from yoi import peers
    result = getattr(peers, operation)(state, source, target)
    data = {"pod_name": result["source"], "peer": {"pod_name": result["peer"]},
            "changed": result["changed"]}
    emit(as_json, data, f"{changed if data['changed'] else unchanged} {source} <-> {target}")


@peer.command("register")
@pod_argument("source")
@pod_argument("target")
@json_option
@state_options
def register_command(source, target, as_json, state):
    """Make SOURCE and TARGET mutual peers.

    Registering an existing relation succeeds and rewrites nothing. Refused
    (exit 4) when SOURCE and TARGET are the same Pod or TARGET does not accept
    peers; exit 3 names the Pod that does not exist.

    \b
    Examples:
      yoi pod peer register reviewer coder
      yoi pod peer register reviewer coder --json
    """
    _run_pair("register", source, target, as_json, state, "registered", "already peers:")


@peer.command("remove")
@pod_argument("source")
@pod_argument("target")
@json_option
@state_options
def remove_command(source, target, as_json, state):
    """Remove the peer relation between SOURCE and TARGET, both directions.

    Removing a relation that does not exist succeeds with changed: false.

    \b
    Examples:
      yoi pod peer remove reviewer coder
      yoi pod peer remove reviewer coder --json
    """
    _run_pair("unregister", source, target, as_json, state, "removed", "not peers:")


@peer.command("list")
@pod_argument()
@json_option
@state_options
def list_command(name, as_json, state):
    """List NAME's peers, when each was registered and whether it is reciprocal.

    A relation is always reciprocal unless the state was damaged from outside;
    `yoi doctor` reports and repairs that.

    \b
    Examples:
      yoi pod peer list reviewer
      yoi pod peer list reviewer --json | jq -r '.peers[].pod_name'
    """
    from yoi import peers
    from yoi.metadata import to_jsonable
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
