"""``yoi pod``: the group. Its commands load lazily, each with what it needs (a
`yoi pod send` pays for no other command's options); the record commands (create,
config, list, show, rm) are in ``yoi.cli.records``."""

from __future__ import annotations

import click

from yoi.cli.common import LazyGroup

POD_SUBCOMMANDS: dict[str, str] = {
    "create": "yoi.cli.records:create_command",
    "config": "yoi.cli.records:config_command",
    "list": "yoi.cli.records:list_command",
    "show": "yoi.cli.records:show_command",
    "rm": "yoi.cli.records:rm_command",
    "peer": "yoi.cli.peer:peer",
    "send": "yoi.cli.send:send",
    "start": "yoi.cli.runtime:start_command",
    "stop": "yoi.cli.runtime:stop_command",
    "restore": "yoi.cli.runtime:restore_command",
    "status": "yoi.cli.runtime:status_command",
    "log": "yoi.cli.runtime:log_command",
    "wait": "yoi.cli.runtime:wait_command",
    "spawn": "yoi.cli.spawn:spawn_command",
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


def parse_labels(values, option: str = "--label") -> dict[str, str]:
    """KEY=VALUE arguments of a repeatable option -> {KEY: VALUE} (UsageError if bad)."""
    from yoi.errors import UsageError
    from yoi.store import check_labels
    labels: dict[str, str] = {}
    for value in values:
        key, eq, val = value.partition("=")
        if not eq:
            raise UsageError(f"{option} {value!r}: give KEY=VALUE")
        if key in labels and labels[key] != val:
            raise UsageError(f"{option}: {key} is given twice with different values")
        labels[key] = val
    return check_labels(labels)
