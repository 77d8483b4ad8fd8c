"""``yoi pod spawn``: a Pod delegates work to a child Pod it owns."""

from __future__ import annotations

import click

from yoi.cli.common import (PodNameType, YoiCommand, emit, json_option, state_options,
                            timeout_option)


@click.command("spawn", cls=YoiCommand)
@click.argument("parent", type=PodNameType("parent Pod name"), metavar="PARENT")
@click.argument("child", type=PodNameType("child Pod name"), metavar="CHILD")
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="The child's handler command (runs its task and every later message).")
@click.option("--cwd", type=click.Path(file_okay=False),
              help="Working directory of the child's handler.")
@click.option("--scope", type=click.Choice(["parent", "peers"]), default="parent",
              show_default=True,
              help="What the child may reach besides its parent and its own children: "
                   "nothing (parent), or its parent's peers too (peers).")
@click.option("--task", metavar="TEXT", help="The child's first message: its task.")
@click.option("--task-file", type=click.File("rb"), metavar="FILE",
              help="Read the task from FILE (- for stdin).")
@timeout_option(help="How long to wait for the child to start and take its task.")
@json_option
@state_options
def spawn_command(parent, child, exec_cmd, cwd, scope, task, task_file, timeout, as_json,
                  state):
    """Create Pod CHILD owned by PARENT, start it, and give it its task.

    CHILD's record names PARENT (and its scope); PARENT's lists CHILD. Both
    records change, and CHILD's directory appears, as one transaction: after
    any crash there is no child or a complete one. The task is CHILD's first
    message, sent from PARENT with the id task:CHILD:1, so spawning again
    (the same PARENT, CHILD and settings: a retry) starts CHILD if it is not
    running and delivers the task at most once.

    When CHILD's handler run for its task ends, PARENT's log gets one
    child_completed entry (with the handler's exit status and output), and
    each time CHILD stops or dies one child_stopped entry; a PARENT that is
    not live gets them when it starts. Wait for them with `yoi pod wait
    PARENT --from CHILD`, and read what CHILD wrote since PARENT last looked
    with `yoi pod log CHILD --as PARENT --new`.

    Exit status: 0 spawned (or found spawned), 1 CHILD exists otherwise or
    with other settings, 2 usage (a task needs --exec), 3 no PARENT, 4 CHILD
    is another Pod's child, 5 CHILD did not start or take its task in time.

    \b
    Examples:
      yoi pod spawn lead lint --exec 'ruff check .' --task 'check PR 42'
      yoi pod spawn lead tests --exec ./run-tests --task-file task.txt --json
      yoi pod spawn lead scout --scope peers --exec 'my-agent --stdin'
    """
    from yoi import children, delivery
    from yoi.cli.records import record_json
    from yoi.errors import UsageError
    if task is not None and task_file is not None:
        raise UsageError("--task and --task-file are mutually exclusive")
    if task_file is not None:
        task = delivery.decode(task_file.read(), "task file")
    result = children.spawn(state, parent, child, exec_cmd=exec_cmd, cwd=cwd, scope=scope,
                            task=task, timeout=timeout)
    result["record"] = record_json(child, result["record"])
    how = "spawned" if result["created"] else "already spawned"
    text = [f"{how} {child} (child of {parent}, scope {result['scope']}): "
            + ("started" if result["started"] else "live")]
    if result["task"] is not None:
        text.append(f"task delivered (id {result['task']['id']})")
    emit(as_json, result, "\n".join(text))
