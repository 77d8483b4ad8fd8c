"""``yoi up`` / ``yoi down``: converge the state directory to a yoi.toml, or undo it."""

from __future__ import annotations

import click

from yoi.cli.common import (YoiCommand, emit, json_option, note_missing_state, state_options,
                            timeout_option)

file_option = click.option("-f", "--file", "path", metavar="FILE", default=None,
                           help="The declaration file (default: ./yoi.toml).")


def _describe(change: dict) -> str:
    action, name = change["action"], change["pod_name"]
    if "request" in change:
        return (f"{action} {name} <-> {change['peer']['pod_name']} (pending: request "
                f"{change['request']['id']})")
    if "peer" in change:
        return f"{action} {name} <-> {change['peer']['pod_name']}"
    if change.get("settings"):
        return f"{action} {name} ({', '.join(change['settings'])})"
    return f"{action} {name}"


def _finish(verb: str, report, as_json: bool, nothing: str) -> None:
    lines = [_describe(c) for c in report.changes]
    err = report.error(verb)
    if err is not None:
        if not as_json and lines:
            click.echo("\n".join(lines))
        raise err
    n = len(report.changes)
    lines.append(f"{verb}: {n} change{'s' if n != 1 else ''}" if n else f"{verb}: {nothing}")
    emit(as_json, report.to_json(), "\n".join(lines))


@click.command("up", cls=YoiCommand)
@file_option
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Add this label to every declared Pod (repeatable), e.g. the job's id.")
@click.option("--no-start", is_flag=True, help="Create, configure and register, but start nothing.")
@timeout_option(help="How long to wait for each Pod to start.")
@json_option
@state_options
def up(path, labels, no_start, timeout, as_json, state):
    """Converge the state directory to yoi.toml: create, configure, register, start.

    Reads the whole file first and refuses an invalid one (unknown keys, bad
    names or values, a peer that is neither declared nor an existing Pod, a
    relation of a declared Pod on accept_peers = "never") with exit 2 before
    changing anything. Then, through the same locks and transactions as the
    single commands: creates each missing Pod, changes the settings of one
    that differs, registers each missing peer relation and starts each Pod
    that is not live. Prints one line per change, or "up: nothing to
    change". Running it again, or twice at once, is safe; a run that failed
    or was killed half-way is finished by the next one.

    A relation to a Pod on accept_peers = "ask" is requested, not made:
    "requested A <-> B (pending: request ID)". Until B (its handler) or the
    operator approves it (`yoi pod peer approve B A`), it is a failed step
    with error code "pending" and, if nothing else failed, the exit status is
    5.

    \b
    Examples:
      yoi up
      yoi up -f ci/yoi.toml --label job=$CI_JOB_ID --json
      yoi up --no-start
    """
    from yoi import converge
    from yoi.cli.pod import parse_labels
    plan = converge.load(converge.find_file(path), state, parse_labels(labels))
    report = converge.up(state, plan, start=not no_start, timeout=timeout)
    _finish("up", report, as_json, "nothing to change "
            f"({len(plan.pods)} Pod{'s' if len(plan.pods) != 1 else ''}, "
            f"{len(plan.relations)} relation{'s' if len(plan.relations) != 1 else ''})")


@click.command("down", cls=YoiCommand)
@file_option
@click.option("--rm", "remove", is_flag=True,
              help="Also remove the Pods (and so their peer relations).")
@timeout_option(help="How long to wait for each Pod to stop.")
@click.option("--force", is_flag=True,
              help="SIGTERM then SIGKILL a Pod that does not stop in time.")
@json_option
@state_options
def down(path, remove, timeout, force, as_json, state):
    """Stop every Pod yoi.toml declares; with --rm, remove them too.

    Pods of the state directory that the file does not declare are left
    alone, and a declared Pod that does not exist is skipped. One that fails
    to stop does not keep the others running; the exit status is the first
    failure's. The file's relations are not checked (down does not touch
    them): a peer removed since `yoi up` does not keep its Pods running.

    \b
    Examples:
      yoi down
      yoi down -f ci/yoi.toml --rm --json
    """
    from yoi import converge
    note_missing_state(state)
    plan = converge.load(converge.find_file(path), state, relations=False)
    report = converge.down(state, plan, remove=remove, timeout=timeout, force=force)
    _finish("down", report, as_json, "nothing to stop")
