"""``yoi demo``: create, start, introduce and message two Pods, fan out to two
children, then clean up."""

from __future__ import annotations

import click

from yoi.cli.common import YoiCommand, emit, given_state_dir, json_option, say


@click.command("demo", cls=YoiCommand)
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Run in this state directory instead of a temporary one.")
@click.option("--keep", is_flag=True,
              help="Keep what the demo made (its state directory, or its Pods) afterwards.")
@json_option
def demo(state_dir, keep, as_json):
    """Show Yoi's main job end to end, printing each command it runs.

    Creates two Pods (`reviewer`, and `coder` with a small handler that answers
    every message), starts them, registers them as peers, sends a message from
    reviewer to coder, waits for coder's reply to arrive in reviewer's log,
    has reviewer spawn two children (`words` and `shout`) with a task each and
    collects both results from its log, runs `yoi doctor`, and stops all the
    Pods. Exit 0 only if every step worked. Everything it made is removed
    afterwards unless --keep.

    \b
    Examples:
      yoi demo
      yoi demo --keep
      yoi demo --json 2>/dev/null | jq .steps
    """
    from yoi.demo import run_demo
    # With --json the running commentary is talk (stderr); stdout gets the summary.
    state, steps = run_demo(given_state_dir(state_dir), keep, say if as_json else click.echo)
    emit(as_json, {"state_dir": str(state), "kept": keep, "steps": steps},
         "\ndemo: ok" + (f" (state kept in {state})" if keep else ""))
