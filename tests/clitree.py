"""The `yoi` command tree, walked the way a user reaches it (lazy subcommands included)."""

from __future__ import annotations

import click


def walk(command: click.Command, path: tuple[str, ...] = ("yoi",)):
    """Yield (path, command) for COMMAND and everything below it, lazy ones included."""
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1])
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name!r} but cannot load it"
            yield from walk(sub, path + (name,))
