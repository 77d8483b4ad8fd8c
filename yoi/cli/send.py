"""``yoi pod send``: message a Pod and report success only once it acknowledged."""

from __future__ import annotations

import os
import sys

import click

from yoi.cli.common import (PodNameType, YoiCommand, emit, json_option, say, state_options,
                            timeout_option)


@click.command("send", cls=YoiCommand)
@click.option("--from", "source", metavar="SOURCE", default=None,
              type=PodNameType("source Pod name", empty_ok=True),
              help="Send as a peer message from this Pod (default: $YOI_POD if set; "
                   "--from '' sends an operator notification).")
@click.option("--id", "msg_id", metavar="ID",
              help="Message id (default: a fresh random one); retrying with the same id "
                   "delivers at most once. With --lines: the prefix of ID-N, N the line number.")
@timeout_option(help="Bound on every step: connect, prelude, write, acknowledgement.")
@click.option("--no-wait", is_flag=True,
              help="Return after the write without waiting for the acknowledgement.")
@click.option("--lines", is_flag=True,
              help="Send every line of stdin as one message over one connection.")
@click.argument("target", type=PodNameType("target Pod name"), metavar="TARGET")
@click.argument("message", required=False, metavar="MESSAGE")
@json_option
@state_options
def send(source, msg_id, timeout, no_wait, lines, target, message, as_json, state):
    """Send MESSAGE to Pod TARGET and wait until TARGET has recorded it.

    With a source (--from, or $YOI_POD inside a handler) this is a peer
    message: SOURCE must list TARGET as a peer (exit 4) and TARGET must be
    running (exit 5; it is never started for you). Without a source it is an
    operator notification, accepted by any running Pod.

    Inside a Pod's handler, $YOI_POD and $YOI_HOME (set by the Pod) are the
    defaults for --from and the state directory, so a handler replies with
    just `yoi pod send "$YOI_FROM" TEXT`.

    MESSAGE `-` reads the message from stdin (without its trailing newline).
    Success means the Pod wrote the message to its session log and
    acknowledged it. When that is unclear (the connection closed, a timeout
    after the write) the command fails and names the id: re-run it with
    `--id ID` and the message is delivered exactly once.

    With --lines every non-blank line of stdin is one message, with the id
    PREFIX-N for line N (PREFIX from --id, else random), all sent over one
    connection with acknowledgements read as they come. It prints a summary
    and exits 0 only if every message was acknowledged.

    A Pod of the original Yoi has no message ids: a peer message is sent to
    it in the original's form (the sender in a header in the message), and
    a note says that sending again could deliver twice.

    Exit status: 0 delivered, 1 not acknowledged or malformed reply, 2 usage
    (bad name, empty or over-long message), 3 no such Pod, 4 not a peer or
    refused by TARGET, 5 TARGET not running or timed out.

    \b
    Examples:
      yoi pod send reviewer 'build 1234 is green'
      yoi pod send --from coder reviewer 'please review PR 42'
      yoi pod send reviewer - < release-notes.txt
      yoi pod send --id deploy-1234 --json reviewer 'deployed'
      yoi pod send --lines --id run-17 reviewer < events.txt
    """
    from yoi import delivery
    from yoi.errors import UsageError

    if source is None:
        source = os.environ.get("YOI_POD") or None
    elif source == "":
        source = None
    if lines:
        if message not in (None, "-"):
            raise UsageError("--lines reads the messages from stdin: give - or no MESSAGE")
        if no_wait:
            raise UsageError("--no-wait cannot be used with --lines: the Pod reads a stream "
                             "while it answers, and a sender that left early would lose the "
                             "messages not read yet (--lines already pipelines)")
        raw = sys.stdin.buffer.read()
        result = delivery.send_lines(state, target, delivery.split_lines(raw), source=source,
                                     id_prefix=msg_id, timeout=timeout)
        count = result["messages"]
        ids = (f"id {result['first_id']}" if count == 1
               else f"ids {result['first_id']} .. {result['last_id']}")
        what = f"{count} message{'s' if count != 1 else ''} to {target} ({ids})"
    else:
        if message is None:
            raise UsageError("missing MESSAGE (give - to read it from stdin)")
        if message == "-":
            message = delivery.message_from_stdin(sys.stdin.buffer.read())
        result = delivery.send(state, target, message, source=source, msg_id=msg_id,
                               timeout=timeout, wait=not no_wait)
        what = f"to {target} (id {result['id']})"
    text = (f"delivered {what}" if not no_wait
            else f"sent {what}; no acknowledgement was awaited")
    emit(as_json, result, text)
    if not result["deduplicates_retries"] and not as_json:
        say(f"yoi: note: {target} cannot deduplicate retries (it announces no message "
            "ids): sending again would deliver twice")
