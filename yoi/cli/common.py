"""Shared CLI machinery: lazy groups, shared options, output and error rendering.

This package is the only place that knows Click. Commands parse, call the
library, render; every ``YoiError`` becomes ``yoi: error: ...`` on stderr (and
``{"ok": false, ...}`` on stdout with ``--json``) and its own exit code.
"""

from __future__ import annotations

import functools
import importlib

import click

from yoi.errors import StorageError, UsageError, YoiError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def report_error(err: YoiError, as_json: bool) -> None:
    message = " ".join(str(err.message).split("\n"))
    click.echo(f"yoi: error: {message}", err=True)
    if as_json:
        import json  # only --json pays for it
        click.echo(json.dumps({"ok": False, "error": err.to_json()}))


class HouseUsageErrors:
    """Click's own usage errors (bad option, missing argument, unknown command)
    rendered like every other error: one ``yoi: error:`` line on stderr, a
    failure document on stdout with ``--json``, exit 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)  # Click's parser consumes ARGS
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            _usage_exit(ctx, e, given)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        given = list(args)
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            _usage_exit(ctx, e, given)


def _usage_exit(ctx: click.Context, e: click.UsageError, args: list[str]):
    where = (e.ctx or ctx).command_path
    message = e.format_message().rstrip(".")
    report_error(UsageError(f"{message} (see '{where} -h')"), "--json" in args)
    ctx.exit(UsageError.exit_code)


class YoiCommand(HouseUsageErrors, click.Command):
    """A command whose YoiErrors become one stderr line and their exit code."""

    def invoke(self, ctx: click.Context):
        as_json = bool(ctx.params.get("as_json"))
        try:
            return super().invoke(ctx)
        except YoiError as e:
            report_error(e, as_json)
            ctx.exit(e.exit_code)
        except BrokenPipeError:
            # Our reader went away (`yoi pod list | head -1`): stop quietly, as
            # other tools do, and keep Python from complaining at exit.
            import os
            import sys
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            report_error(StorageError(f"{e.strerror or e}{where}"), as_json)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("yoi: interrupted", err=True)
            ctx.exit(130)


class LazyGroup(HouseUsageErrors, click.Group):
    """A group whose subcommands are imported only when used (imports cost time)."""

    command_class = YoiCommand

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_subcommands))

    def get_command(self, ctx, cmd_name):
        target = self.lazy_subcommands.get(cmd_name)
        if target is not None:
            module_name, attr = target.split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, cmd_name)


LazyGroup.group_class = LazyGroup


def emit(as_json: bool, data: dict, text: str | None = None) -> None:
    """stdout is data: one JSON document with --json, else TEXT (if any)."""
    if as_json:
        import json
        click.echo(json.dumps({"ok": True, **data}, default=str))
    elif text is not None:
        click.echo(text)


def say(message: str) -> None:
    """Talk (progress, notes) goes to stderr."""
    click.echo(message, err=True)


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout (also on failure).")


class Seconds(click.FloatRange):
    """A duration: not NaN, at most a week (sockets and poll() cannot wait longer);
    zero allowed only where it means "do not wait" (a lock timeout), not where
    it would mean "fail at once" (a timeout for a Pod's answer)."""

    name = "seconds"

    def __init__(self, zero_ok: bool = False):
        super().__init__(min=0, max=7 * 86400, min_open=not zero_ok)

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv != rv:  # FloatRange lets NaN through; a wait on it would never end
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return rv


SECONDS = Seconds()


def state_options(f):
    """Add --state-dir and --lock-timeout; pass the resolved ``state`` instead."""

    @click.option("--state-dir", type=click.Path(file_okay=False), default=None,
                  help="State directory (default: $YOI_HOME, else ~/.yoi).")
    @click.option("--lock-timeout", type=Seconds(zero_ok=True), default=None,
                  metavar="SECONDS",
                  help="Wait this long for a Pod's lock before failing with exit 6 "
                       "(default: $YOI_LOCK_TIMEOUT, else 10).")
    @functools.wraps(f)
    def wrapper(*args, state_dir, lock_timeout, **kwargs):
        from yoi.state import State
        if state_dir == "":
            raise UsageError("--state-dir must not be empty")
        return f(*args, state=State.resolve(state_dir, lock_timeout), **kwargs)

    return wrapper


def _complete_pod_names(ctx, param, incomplete):
    from yoi.state import State
    try:
        state = State.resolve(ctx.params.get("state_dir"))
        return [n for n in state.pod_names() if n.startswith(incomplete)]
    except Exception:
        return []


class PodNameType(click.ParamType):
    """A Pod name; validated by the library (exit 2), completed from the state dir."""

    name = "NAME"

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem
        return [CompletionItem(n) for n in _complete_pod_names(ctx, param, incomplete)]


POD = PodNameType()


def pod_argument(name: str = "name", **kwargs):
    return click.argument(name, type=POD, metavar=kwargs.pop("metavar", name.upper()), **kwargs)


def check_names(*names: str) -> None:
    """Validate names before anything is touched (exit 2, nothing written)."""
    from yoi.names import check_name
    for n in names:
        check_name(n)
