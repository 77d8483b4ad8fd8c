"""Shared CLI machinery: lazy groups, shared options, output and error rendering.

This package is the only place that knows Click. Commands parse, call the
library, render. Errors leave by one path: every ``YoiError`` -- raised by
the library, by a parameter type, or by a command that reports a failure --
becomes ``yoi: error: ...`` on stderr (and ``{"ok": false, ..., "error":
{...}}`` on stdout with ``--json``) and its own exit code, in
``report_error``; Click's own usage errors are rendered the same way.

Imports: every ``yoi`` run pays for what it imports, and ``import click``
already dominates start-up, so command groups are loaded lazily (only the
command that runs is imported) and a command imports the library modules it
needs inside its function. Library modules themselves import at the top,
unless a measurement shows a path that must avoid one (see
``tests/test_cli_help.py``, which pins what ``yoi --version`` and ``yoi pod
send`` import).
"""

from __future__ import annotations

import functools
import importlib

import click

from yoi import timeouts
from yoi.errors import StorageError, UsageError, YoiError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def report_error(err: YoiError, as_json: bool) -> None:
    """The one way an error leaves: a line on stderr, a failure document with --json."""
    message = " ".join(str(err.message).split("\n"))
    click.echo(f"yoi: error: {message}", err=True)
    if as_json:
        import json  # only --json pays for it
        click.echo(json.dumps({"ok": False, **(err.data or {}), "error": err.to_json()},
                              default=str))


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
        except YoiError as e:  # a parameter type's check (a Pod name, $YOI_LOCK_TIMEOUT)
            report_error(e, "--json" in given)
            ctx.exit(e.exit_code)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        given = list(args)
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            _usage_exit(ctx, e, given)


def _did_you_mean(word: str, choices) -> str:
    import difflib
    close = difflib.get_close_matches(word, sorted(set(choices)), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def _visible_options(command: click.Command) -> list[str]:
    return [o for p in command.params if isinstance(p, click.Option) and not p.hidden
            for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]


def _usage_message(ctx: click.Context, e: click.UsageError) -> str:
    """Click's message, with a suggestion of what was meant where one is close."""
    where = e.ctx or ctx
    if isinstance(e, click.NoSuchOption):
        return (f"no such option {e.option_name!r} for {where.command_path}"
                + _did_you_mean(e.option_name, _visible_options(where.command)))
    message = e.format_message().rstrip(".")
    if message.startswith("No such command ") and isinstance(where.command, click.Group):
        name = message.split("'")[1] if "'" in message else ""
        return (f"no such command {name!r} in {where.command_path}"
                + _did_you_mean(name, where.command.list_commands(where)))
    return message


def _usage_exit(ctx: click.Context, e: click.UsageError, args: list[str]):
    where = (e.ctx or ctx).command_path
    message = _usage_message(ctx, e)
    report_error(UsageError(f"{message} (see '{where} -h')"), "--json" in args)
    ctx.exit(UsageError.exit_code)


STREAMING = "yoi.streaming"  # ctx.meta: the command has begun its JSON Lines stream


def streaming() -> None:
    """Say that the running command has begun its JSON Lines stream (``yoi pod log
    --json``): from now on a failure or an interrupt is reported on stderr and by
    the exit status only, so that every line of the stream has its documented
    shape. Before, a failure prints the failure document as everywhere."""
    click.get_current_context().meta[STREAMING] = True


class YoiCommand(HouseUsageErrors, click.Command):
    """A command whose YoiErrors become one stderr line and their exit code."""

    def invoke(self, ctx: click.Context):
        def document() -> bool:  # a failure document on stdout?
            return bool(ctx.params.get("as_json")) and not ctx.meta.get(STREAMING)

        try:
            return super().invoke(ctx)
        except YoiError as e:
            report_error(e, document())
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
            report_error(StorageError(f"{e.strerror or e}{where}"), document())
            ctx.exit(1)
        except KeyboardInterrupt:
            from yoi.errors import Interrupted
            report_error(Interrupted("interrupted"), document())
            ctx.exit(Interrupted.exit_code)


class LazyGroup(HouseUsageErrors, click.Group):
    """A group whose subcommands are imported only when used (imports cost time)."""

    command_class = YoiCommand

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_subcommands))

    def format_commands(self, ctx, formatter):
        """The command list with each summary line whole (Click cuts them at 45
        characters with "..."); the formatter wraps a long one instead."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx, cmd_name):
        target = self.lazy_subcommands.get(cmd_name)
        if target is not None:
            module_name, attr = target.split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, cmd_name)


LazyGroup.group_class = LazyGroup


class RootGroup(LazyGroup):
    """The ``yoi`` group: run from the command line, it ends the process as soon as
    the command is done (``exit_now``)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if args is not None or not standalone_mode:  # called as a library (tests)
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            super().main(None, prog_name, complete_var, standalone_mode, **extra)
        except SystemExit as e:
            exit_now(e.code)
        exit_now(0)


def exit_now(code) -> None:
    """Leave with CODE once the output is flushed and the exit handlers ran, without
    tearing the interpreter down: freeing every module and object one by one costs
    a short command as much as 5 ms, a tenth of its run, and frees nothing the
    kernel would not. Everything a command writes to files it writes and syncs
    itself, through descriptors, so nothing is left in a buffer but stdout and
    stderr. If anything still runs (a thread that is not a daemon), a profiler or
    tracer watches (it writes its results after the program), or flushing fails,
    the usual exit does its work."""
    import os
    import sys
    import threading
    if not (code is None or isinstance(code, int)) or any(
            t.is_alive() and not t.daemon for t in threading.enumerate()
            if t is not threading.main_thread()) or sys.getprofile() or sys.gettrace():
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # e.g. the reader went away: let Python report it as usual
        sys.exit(code)
    import atexit
    atexit._run_exitfuncs()
    os._exit(code or 0)


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


class Seconds(click.ParamType):
    """A duration in seconds, checked by ``yoi.timeouts.parse`` (one rule for flags
    and for $YOI_LOCK_TIMEOUT); ZERO_OK where 0 means "do not wait"."""

    name = "seconds"

    def __init__(self, zero_ok: bool = False):
        self.zero_ok = zero_ok

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return timeouts.parse(value, "", self.zero_ok)
        except UsageError as e:
            self.fail(e.message, param, ctx)


SECONDS = Seconds()


def timeout_option(default: float = timeouts.DEFAULT, help: str = "How long to wait."):
    return click.option("--timeout", type=SECONDS, default=default, show_default=True,
                        metavar="SECONDS", help=help)


STATE_DIR_HELP = "State directory (default: $YOI_HOME, else ~/.yoi)."
LOCK_TIMEOUT_HELP = ("Wait this long for a Pod's lock before failing with exit 6 "
                     f"(default: $YOI_LOCK_TIMEOUT, else {timeouts.DEFAULT:g}).")


def root_state_options(f):
    """--state-dir and --lock-timeout on the root group (``yoi --state-dir D pod list``);
    a command's own option wins over them (see ``given_state_dir``)."""
    f = click.option("--lock-timeout", type=Seconds(zero_ok=True), default=None,
                     metavar="SECONDS", help=LOCK_TIMEOUT_HELP)(f)
    return click.option("--state-dir", type=click.Path(file_okay=False), default=None,
                        help=STATE_DIR_HELP)(f)


def _given(name: str, own, ctx: click.Context | None = None):
    """OWN if the command was given it, else the root group's value (or None)."""
    if own is not None:
        return own
    ctx = ctx or click.get_current_context(silent=True)
    return None if ctx is None else ctx.find_root().params.get(name)


def given_state_dir(own: str | None, ctx: click.Context | None = None) -> str | None:
    """The --state-dir in force: the command's own, else the root group's."""
    state_dir = _given("state_dir", own, ctx)
    if state_dir == "":
        raise UsageError("--state-dir must not be empty")
    return state_dir


def state_options(f):
    """Add --state-dir and --lock-timeout; pass the resolved ``state`` instead.

    The same options on the root group apply when the command is not given its
    own (the command's own wins)."""

    @click.option("--state-dir", type=click.Path(file_okay=False), default=None,
                  help=STATE_DIR_HELP)
    @click.option("--lock-timeout", type=Seconds(zero_ok=True), default=None,
                  metavar="SECONDS", help=LOCK_TIMEOUT_HELP)
    @functools.wraps(f)
    def wrapper(*args, state_dir, lock_timeout, **kwargs):
        from yoi.state import State
        return f(*args, state=State.resolve(given_state_dir(state_dir),
                                            _given("lock_timeout", lock_timeout)), **kwargs)

    return wrapper


def note_missing_state(state) -> bool:
    """For a command that only reads: say on stderr that STATE's directory does not
    exist (an empty answer would look like "no Pods" in a real one). True if so."""
    if state.root.exists():
        return False
    say(f"yoi: note: no state directory at {state.root}")
    return True


def _complete_pod_names(ctx, param, incomplete):
    from yoi.state import State
    try:
        state = State.resolve(given_state_dir(ctx.params.get("state_dir"), ctx) or None)
        return [n for n in state.pod_names() if n.startswith(incomplete)]
    except Exception:
        return []


class PodNameType(click.ParamType):
    """A Pod name, checked once here by ``yoi.names.check_name`` (exit 2 with the
    library's message), completed from the state directory."""

    name = "NAME"

    def __init__(self, what: str = "Pod name", empty_ok: bool = False):
        self.what = what
        self.empty_ok = empty_ok  # '' passes: an option that means "none" when empty

    def convert(self, value, param, ctx):
        from yoi.names import check_name
        if value == "" and self.empty_ok:
            return value
        return check_name(value, self.what)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem
        return [CompletionItem(n) for n in _complete_pod_names(ctx, param, incomplete)]


POD = PodNameType()


def pod_argument(name: str = "name", what: str = "Pod name", **kwargs):
    metavar = kwargs.pop("metavar", name.upper())
    return click.argument(name, type=PodNameType(what), metavar=metavar, **kwargs)
