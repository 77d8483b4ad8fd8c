"""``yoi pod send``: message a Pod and report success only once it acknowledged."""

from __future__ import annotations

import os
import sys

import click

from yoi.cli.common import (SECONDS, PodNameType, YoiCommand, emit, json_option, say,
                            state_options, timeout_option)


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
@click.option("--reply-to", "reply_to", metavar="ID",
              help="This message answers message ID (recorded as in_reply_to).")
@click.option("--wait-reply", "wait_reply", type=SECONDS, default=None, metavar="SECONDS",
              help="Then wait this long for the reply to it in the sender's log (needs "
                   "--from or $YOI_POD naming a live Pod) and print it.")
@click.option("--queue", is_flag=True,
              help="If TARGET is not running, queue the message(s) for it (exit 0, state "
                   "queued): TARGET commits them, in order, when it starts.")
@click.argument("target", type=PodNameType("target Pod name"), metavar="TARGET")
@click.argument("message", required=False, metavar="MESSAGE")
@json_option
@state_options
def send(source, msg_id, timeout, no_wait, lines, reply_to, wait_reply, queue, target,
         message, as_json, state):
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

    With --lines every non-blank line of stdin is one message, sent as soon
    as it is read (`tail -f log | yoi pod send --lines T` works), with the id
    PREFIX-N for line N (PREFIX from --id, else random and shown on stderr),
    all over one connection with acknowledgements read as they come. It
    prints a summary and exits 0 only if every message was acknowledged. On
    Ctrl-C, SIGTERM or SIGHUP it stops reading, waits for the messages in
    flight, reports what was acknowledged and the prefix, and exits 130;
    re-running over the same input with --id PREFIX then delivers each line
    exactly once. A bad line stops the stream there (exit 2).

    A reply names the message it answers: --reply-to ID (inside a handler,
    `yoi pod send "$YOI_FROM" --reply-to "$YOI_MESSAGE_ID" TEXT`). With
    --wait-reply SECONDS the command then waits for the reply to its own
    message in the sender's log and prints it (exit 0); with no reply in time
    it exits 5 naming the message id, and `yoi pod wait SOURCE --reply-to ID`
    waits on. A script that is no Pod uses a Pod as its mailbox: `yoi pod
    create ci && yoi pod start ci && yoi pod peer register ci agent`, then
    `yoi pod send --from ci agent ...`. Given --id with --wait-reply (a
    retry), a reply to that id already in the log counts. With --queue as
    well, a message queued for a TARGET that is not running is answered
    once TARGET starts: --wait-reply waits for that reply all the same.

    With --queue, a TARGET that is not running is no error: the message is
    appended to TARGET's durable queue (after the same checks as a live
    send) and the command exits 0 saying "queued for TARGET (id ID)"
    (--json: "state": "queued"; a delivered message says "delivered").
    TARGET commits what is queued for it, in order and each id once, when it
    starts, and runs its handler for each as for a live message; the peer
    relation is checked again then. A live TARGET is sent to as without
    --queue. With --lines and a TARGET that is not running, the input is
    read to its end and queued at once, in line order. A full queue
    (`yoi pod config --queue-max-messages/--queue-max-bytes`) is exit 1 and
    nothing is queued. `yoi pod log TARGET --queued` shows what waits.

    A Pod of the original Yoi has no message ids: a peer message is sent to
    it in the original's form (the sender in a header in the message), and
    a note says that sending again could deliver twice.

    Exit status: 0 delivered (or queued, with --queue), 1 not acknowledged,
    malformed reply or queue full, 2 usage (bad name, empty or over-long
    message), 3 no such Pod, 4 not a peer or refused by TARGET, 5 TARGET not
    running or timed out, 130 interrupted.

    \b
    Examples:
      yoi pod send reviewer 'build 1234 is green'
      yoi pod send --from coder reviewer 'please review PR 42'
      yoi pod send reviewer - < release-notes.txt
      yoi pod send --id deploy-1234 --json reviewer 'deployed'
      yoi pod send --lines --id run-17 reviewer < events.txt
      yoi pod send --lines --id build-9 reviewer < <(tail -n +1 -f build.log)
      yoi pod send --from ci agent 'summarise the failures' --wait-reply 60 --json
      yoi pod send "$YOI_FROM" --reply-to "$YOI_MESSAGE_ID" 'done'
      yoi pod send --from reviewer coder --reply-to 5f1e0c 'looks good'
      yoi pod send --queue --from coder reviewer 'review PR 42 when you start'
    """
    from yoi import delivery
    from yoi.errors import UsageError

    if source is None:
        source = os.environ.get("YOI_POD") or None
    elif source == "":
        source = None
    who = " as operator" if source is None else ""
    if wait_reply is not None and (lines or no_wait):
        raise UsageError("--wait-reply waits for the reply to one message: not with "
                         + ("--lines" if lines else "--no-wait"))
    if lines:
        if message not in (None, "-"):
            raise UsageError("--lines reads the messages from stdin: give - or no MESSAGE")
        if no_wait:
            raise UsageError("--no-wait cannot be used with --lines: the Pod reads a stream "
                             "while it answers, and a sender that left early would lose the "
                             "messages not read yet (--lines already pipelines)")
        if reply_to is not None:
            raise UsageError("--reply-to names the one message a reply answers: not with "
                             "--lines")
        result = _send_lines(delivery, state, target, source, msg_id, timeout, queue)
        count = result["messages"]
        ids = (f"id {result['first_id']}" if count == 1
               else f"ids {result['first_id']} .. {result['last_id']}")
        what = f"{count} message{'s' if count != 1 else ''} {{to}} {target}{who} ({ids})"
    else:
        if message is None:
            raise UsageError("missing MESSAGE (give - to read it from stdin)")
        if message == "-":
            message = delivery.message_from_stdin(sys.stdin.buffer.read())
        if wait_reply is not None:
            result = delivery.ask(state, target, message, source=source, msg_id=msg_id,
                                  timeout=timeout, reply_to=reply_to,
                                  reply_timeout=wait_reply, queue=queue)
        else:
            result = delivery.send(state, target, message, source=source, msg_id=msg_id,
                                   timeout=timeout, wait=not no_wait, reply_to=reply_to,
                                   queue=queue)
        what = f"{{to}} {target}{who} (id {result['id']})"
    for note in result.pop("notes", []):
        say(f"yoi: note: {note}")
    if result["state"] == "queued":
        text = "queued " + what.format(to="for")
    elif not no_wait:
        text = "delivered " + what.format(to="to")
    else:
        text = f"sent {what.format(to='to')}; no acknowledgement was awaited"
    if "reply" in result:
        from yoi.cli.runtime import render
        text = f"{text}\nreply: {render(result['reply'])}"
    emit(as_json, result, text)
    if not result["deduplicates_retries"] and not as_json:
        say(f"yoi: note: {target} cannot deduplicate retries (it announces no message "
            "ids): sending again would deliver twice")


def _send_lines(delivery, state, target, source, msg_id, timeout, queue) -> dict:
    """--lines: stream stdin, each line sent as it arrives; interrupts stop cleanly."""
    from yoi import client
    try:
        fd = sys.stdin.buffer.fileno()
        data = b""
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. a test runner's)
        fd, data = None, sys.stdin.buffer.read()
    prefix = delivery.lines_prefix(msg_id)

    def opened():
        if msg_id is None:  # a random prefix: the only way to resume is to know it now
            say(f"yoi: sending with ids {prefix}-N (N = input line); to resume, re-run "
                f"over the same input with --id {prefix}")

    with client.Interrupts() as interrupts:
        return delivery.send_lines(state, target, source=source, id_prefix=prefix,
                                   timeout=timeout, fd=fd, data=data,
                                   interrupts=interrupts, on_open=opened, queue=queue)
