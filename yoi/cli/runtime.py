"""``yoi pod start|stop|restore|status|log``: run Pods and watch them."""

from __future__ import annotations

import json
import time

import click

from yoi.cli.common import (PodNameType, YoiCommand, emit, json_option, pod_argument, say,
                            state_options, streaming, timeout_option)


@click.command("start", cls=YoiCommand)
@pod_argument()
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="Handler command for each message (stored in the Pod's metadata).")
@click.option("--foreground", is_flag=True,
              help="Serve in this process until SIGTERM/SIGINT or `shutdown` "
                   "(for supervisors such as systemd).")
@timeout_option(help="How long to wait for the Pod.")
@json_option
@state_options
def start_command(name, exec_cmd, foreground, timeout, as_json, state):
    """Start a Pod process; print its socket path once the socket answers.

    Detached by default: the Pod's own output goes to pods/NAME/pod.log under
    the state directory. Exit 6 if it is already running, 5 (with the tail of
    its log) if it does not come up within --timeout.

    \b
    Examples:
      yoi pod start reviewer
      yoi pod start coder --exec 'my-agent --stdin'
      yoi pod start reviewer --foreground     # e.g. ExecStart= of a systemd unit
    """
    if foreground:
        from yoi import server

        def ready(path):
            emit(as_json, {"pod_name": name, "socket_path": str(path)}, str(path))

        server.serve(state, name, exec_cmd, ready=ready)
        return
    from yoi import control
    res = control.start(state, name, exec_cmd=exec_cmd, timeout=timeout)
    emit(as_json, res, res["socket_path"])


@click.command("stop", cls=YoiCommand)
@pod_argument(required=False)
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Stop every Pod with this label instead of NAME (repeatable: all must "
                   "match).")
@timeout_option(help="How long to wait for the Pod.")
@click.option("--force", is_flag=True,
              help="If it does not stop in time, SIGTERM then SIGKILL the process "
                   "holding its runtime lock.")
@click.option("--recursive", "-r", is_flag=True,
              help="Stop its children (theirs first) before it.")
@click.option("--all", "every", is_flag=True,
              help="Stop every Pod of the state directory (children before parents).")
@json_option
@state_options
def stop_command(name, labels, timeout, force, recursive, every, as_json, state):
    """Stop a Pod: send `shutdown` and wait until its process has exited.

    A Pod that is not running is not an error ("not running", exit 0). Exit 5
    if it does not stop within --timeout (unless --force). With --label
    instead of NAME, stop every Pod that carries all the labels given (only
    this job's Pods, when each job labels its own); a Pod that fails to stop
    does not keep the others from stopping, and the exit status is the first
    failure's. With --recursive, NAME's children are stopped first (the
    deepest first), then NAME, one line each: each child's parent, still
    live, hears of it. With --all, every Pod of the state directory is
    stopped the same way, each after its children.

    \b
    Examples:
      yoi pod stop reviewer
      yoi pod stop reviewer --timeout 3 --force
      yoi pod stop --label job=$CI_JOB_ID
      yoi pod stop lead --recursive
      yoi pod stop --all
    """
    from yoi import control
    from yoi.errors import UsageError
    if (name is not None) + bool(labels) + every != 1:
        raise UsageError("give one of a Pod NAME, --label KEY=VALUE or --all")
    if recursive and name is None:
        raise UsageError("--recursive stops one Pod's tree: give a Pod NAME")
    if labels or recursive or every:
        if every:
            results, first = control.stop_all(state, timeout=timeout, force=force)
        elif labels:
            from yoi.cli.pod import parse_labels
            results, first = control.stop_labelled(state, parse_labels(labels),
                                                   timeout=timeout, force=force)
        else:
            results, first = control.stop_tree(state, name, timeout=timeout, force=force)
        text = "\n".join(f"{r['pod_name']}: {r['message']}" for r in results)
        if first is not None:
            if not as_json and text:
                click.echo(text)
            raise type(first)(first.message, data={"pods": results}, **first.details)
        emit(as_json, {"pods": results}, text or None)
        if not results:
            say("no Pods" if every else "no Pods with these labels")
        return
    res = control.stop(state, name, timeout=timeout, force=force)
    emit(as_json, res, res["message"] if res["stopped"] else f"{name}: not running")


@click.command("restore", cls=YoiCommand)
@pod_argument()
@timeout_option(help="How long to wait for the Pod.")
@json_option
@state_options
def restore_command(name, timeout, as_json, state):
    """Start a stopped Pod; a live one is reported as "already live" (exit 0).

    A Pod that is starting at the same moment (it holds its runtime lock but
    does not answer yet) is waited for, up to --timeout, and then reported
    "already live"; exit 6 if it still does not answer.

    \b
    Examples:
      yoi pod restore reviewer
    """
    from yoi import control
    res = control.restore(state, name, timeout=timeout)
    emit(as_json, res, f"{name}: already live" if not res["restored"] else res["socket_path"])


@click.command("status", cls=YoiCommand)
@pod_argument()
@timeout_option(5.0, help="How long to wait for the Pod's answer.")
@json_option
@state_options
def status_command(name, timeout, as_json, state):
    """Show whether a Pod is live, its status (idle/running), pid and socket.

    Exit 0 if live, 5 if not, so scripts can write
    `yoi pod status x || yoi pod start x`. With --json, `live` is the same
    object as in `yoi pod list` (socket_path, reachable, status, error), and
    `queued` the number of messages waiting in its queue (`send --queue`).
    A Pod with a handler also shows how its last run ended and how many of
    its last 10 runs failed (--json: `handler`, with `last`, the newest
    handler_result entry).

    \b
    Examples:
      yoi pod status reviewer
      yoi pod status reviewer --json | jq -r .live.status
    """
    from yoi import control
    st = control.probe_status(state, name, timeout)
    live = st["live"]
    handler = _handler_text(st["handler"])
    queued = f"; {st['queued']} message(s) queued" if st["queued"] else ""
    if live["reachable"]:
        emit(as_json, st, f"{name}: live, {live['status']}, pid {st['pid']}, "
                          f"socket {live['socket_path']}{queued}" + handler)
        return
    from yoi.errors import Unreachable
    why = ("not running" if not st["running"]
           else f"running but not answering ({live['error']})")
    if not as_json:
        click.echo(f"{name}: {why}{queued}{handler}")
    raise Unreachable(f"Pod {name!r} is not live: {why}", data=st, pod_name=name)


def _handler_text(summary: dict) -> str:
    """A second line of `status`: the last handler run and the recent failures."""
    from yoi.history import failure_words
    last = summary["last"]
    if last is None:
        return ""
    ident = f" for {last['id']}" if last.get("id") else ""
    how = "ok" if last.get("ok") else f"failed ({failure_words(last)})"
    return (f"\nlast handler run{ident} at {last.get('at')}: {how}; "
            f"{summary['recent_failures']} of the last {summary['recent_runs']} failed")


@click.command("log", cls=YoiCommand)
@pod_argument()
@click.option("-n", "--tail", "count", type=click.IntRange(min=0), default=None, metavar="N",
              help="Only the last N entries (default: all).")
@click.option("--lines", "old_count", type=click.IntRange(min=0), default=None, hidden=True,
              help="The old name of --tail (kept for one release).")
@click.option("--after", type=click.IntRange(min=0), default=None, metavar="SEQ",
              help="Only entries with a sequence number above SEQ.")
@click.option("--follow", "-f", is_flag=True,
              help="Then stream live events from the Pod's socket until interrupted.")
@click.option("--queued", is_flag=True,
              help="Print the messages waiting in the Pod's queue instead (send --queue).")
@click.option("--as", "reader", type=PodNameType("reader Pod name"), metavar="READER",
              help="Read as Pod READER, which must be able to see NAME (e.g. its parent).")
@click.option("--new", "new", is_flag=True,
              help="Only what READER (--as) has not read yet; then remember how far it "
                   "read.")
@timeout_option(help="How long to wait for the Pod.")
@json_option
@state_options
def log_command(name, count, old_count, after, follow, queued, reader, new, timeout, as_json,
                state):
    """Print a Pod's session log, one line per entry: `#SEQ TIME what`.

    Every entry has a sequence number, strictly increasing and never reused;
    --after SEQ prints only the entries after it (found without reading the
    whole log). With --json, one JSON object per line: the entries exactly as
    stored (and, with --follow, each entry committed live, then the Pod's
    other events as received). Lines that are not entries (e.g. damaged ones)
    are skipped with a note on stderr.

    Each handler run is an entry too (handler_result: ok or failed, its
    exit, its output), and a reply names the message it answers
    ("(reply to ID)"; in JSON `item.in_reply_to`).

    With --queued, print instead the messages queued for the Pod (`yoi pod
    send --queue` while it was not running), oldest first, one per line:
    `queued TIME from SOURCE [ID]: text`; with --json, the queue records as
    stored ({"id", "source", "message", "queued_at", ["in_reply_to"]}).

    With --as READER --new, only the entries READER has not been given yet
    (a parent reading what its child produced since it last looked), and
    READER's cursor (pods/NAME/cursors/READER) moves past each entry once it
    is written out whole: nothing is skipped, and nothing is printed twice
    unless this command is killed between printing and moving the cursor.

    \b
    Examples:
      yoi pod log reviewer --tail 20
      yoi pod log reviewer --after 120 --json
      yoi pod log reviewer --follow
      yoi pod log reviewer --json | jq -r '.item.message? // empty'
      yoi pod log reviewer --queued
      yoi pod log lint --as lead --new --json
    """
    from yoi import history
    from yoi.errors import UsageError
    if old_count is not None:
        if count is not None:
            raise UsageError("--lines is the old name of --tail: give one of them")
        say("yoi: note: `yoi pod log --lines N` is now `--tail N`; --lines goes away "
            "in the next release")
        count = old_count
    if queued:
        if reader is not None or new:
            raise UsageError("--queued shows what waits for the Pod: not with --as or --new")
        _print_queued(state, name, count, after, follow, as_json)
        return
    if new:
        clash = [o for o, given in (("--tail", count is not None), ("--after", after is not None),
                                    ("--follow", follow)) if given]
        if reader is None or clash:
            raise UsageError("--new needs --as READER" if reader is None else
                             f"--new reads from READER's cursor: not with {clash[0]}")
    if reader is not None:
        history.check_reader(state, name, reader)
    if new:
        _print_new(state, name, reader, as_json)
        return
    with history.Log(state, name, follow, timeout) as log:
        streaming()  # the Pod is found (and followed): stdout is entries and events only
        skipped = 0
        for raw, entry in log.entries(count, after):
            if entry is None:
                skipped += 1
            else:
                click.echo(raw.decode("utf-8") if as_json else render(entry))
        if skipped:
            say(f"yoi: note: skipped {skipped} line(s) of {log.path} that are not entries")
        for obj in log.live():
            click.echo(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) if as_json
                       else render(obj))


def _print_queued(state, name: str, count, after, follow: bool, as_json: bool) -> None:
    from yoi import offline, store
    from yoi.errors import UsageError
    if after is not None or follow:
        raise UsageError("--queued cannot be used with --after or --follow")
    store.read(state, name)  # NotFound
    streaming()
    path = state.queue_path(name)
    contents = offline.read(path)
    records = contents.records
    if count is not None:
        records = records[-count:] if count else []
    for rec in records:
        click.echo(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) if as_json
                   else f"queued {rec['queued_at']} from {rec.get('source') or 'operator'} "
                        f"[{rec['id']}]: {_one_line(rec['message'])}")
    skipped = len(contents.bad) + (contents.torn is not None)
    if skipped:
        say(f"yoi: note: skipped {skipped} line(s) of {path} that are not queue records "
            "(`yoi doctor` reports them)")


def _print_new(state, name: str, reader: str, as_json: bool) -> None:
    """The entries of NAME's log after READER's cursor, each counted as read once it is
    written out (see yoi.history.NewEntries)."""
    from yoi import history
    with history.NewEntries(state, name, reader) as new:
        for raw, entry in new:
            click.echo(raw.decode("utf-8") if as_json else render(entry))  # and flushed
    if new.skipped:
        say(f"yoi: note: skipped {new.skipped} line(s) of {new.log.path} that are not entries")


def _one_line(text) -> str:
    return str(text).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def render(obj: dict) -> str:
    """One readable line for a log entry (``#SEQ AT what``) or another event."""
    if "kind" not in obj and "event" in obj:
        return _render_event(obj["event"], obj.get("data") or {})
    seq = f"#{obj['seq']} " if isinstance(obj.get("seq"), int) else ""
    at = obj.get("at")
    if not isinstance(at, str) and isinstance(obj.get("ts"), int):  # the original's entries
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(obj["ts"] // 1000))
    at = f"{at} " if isinstance(at, str) else ""
    return f"{seq}{at}{_render_entry(obj)}"


def _render_entry(entry: dict) -> str:
    kind = entry.get("kind")
    if kind == "system_item":
        from yoi.protocol import peer_header_source, with_peer_header
        item = entry.get("item") or {}
        message = str(item.get("message", ""))
        source = item.get("source") or peer_header_source(message)
        if source and message.startswith(with_peer_header(source, "")):
            message = message[len(with_peer_header(source, "")):]  # the header names it
        who = f"from {source}" if source else "from operator"
        ident = f" [{item['id']}]" if item.get("id") else ""
        answers = f" (reply to {item['in_reply_to']})" if item.get("in_reply_to") else ""
        return f"{item.get('kind', 'item')} {who}{ident}{answers}: {_one_line(message)}"
    if kind == "user_message":
        text = "".join(s.get("content", "") for s in entry.get("segments", [])
                       if isinstance(s, dict))
        return f"user: {_one_line(text)}"
    if kind == "handler_result":
        return _render_result(entry)
    if kind == "text_done":
        return f"text: {_one_line(str(entry.get('text', '')).rstrip(chr(10)))}"
    if kind == "run_end":
        return f"run_end: {entry.get('result')}"
    if kind == "peer_request":
        return (f"peer request from {entry.get('source')} [{entry.get('request_id')}], "
                f"expires {entry.get('expires_at')}; decided by the {entry.get('decider')}")
    if kind == "delivery_rejected":
        return (f"delivery rejected: queued message from {entry.get('source') or 'operator'} "
                f"[{entry.get('message_id')}]: {_one_line(entry.get('reason', ''))}; text: "
                f"{_one_line(entry.get('message', ''))}")
    if kind == "peer_decision":
        how = entry.get("decision")
        why = f": {_one_line(entry.get('reason', ''))}" if how == "none" else ""
        return (f"peer decision on {entry.get('source')} [{entry.get('request_id')}] by the "
                f"{entry.get('by')}: {'undecided' if how == 'none' else how}{why}")
    if kind in ("child_completed", "child_stopped"):
        return _render_notice(entry)
    if kind == "pod_started":
        return f"started (pid {entry.get('pid')}), a child of {entry.get('parent')}"
    if kind == "pod_stopped":
        return f"stopped (the run started at #{entry.get('run')})"
    rest = {k: v for k, v in entry.items() if k not in ("seq", "kind", "ts", "at")}
    return f"{kind}: {json.dumps(rest, ensure_ascii=False)}"


def _render_notice(entry: dict) -> str:
    """A parent's notice about its child, on one line."""
    child, ident = entry.get("source"), f" [{entry['id']}]" if entry.get("id") else ""
    out = _one_line(str(entry.get("output", "")).rstrip(chr(10)))
    cut = " (output truncated)" if entry.get("truncated") else ""
    if entry.get("kind") == "child_completed":
        from yoi.history import failure_words
        how = "ok" if entry.get("ok") else f"failed, {failure_words(entry)}"
        return (f"child {child} completed its task {entry.get('task_id')}: {how}{ident}{cut}"
                + (f": {out}" if out else ""))
    how = ("stopped" if entry.get("ended") == "stopped"
           else "died (its process ended without stopping)")
    return (f"child {child} {how}, the run started at #{entry.get('run')}{ident}{cut}"
            + (f": {out}" if out else ""))


def _render_result(entry: dict) -> str:
    from yoi.history import failure_words
    ident = f" [{entry['id']}]" if entry.get("id") else ""
    if entry.get("ok"):
        how = "ok"
    elif entry.get("ended") == "stopped":
        how = "cut short (the Pod stopped)"
    else:
        how = f"failed, {failure_words(entry)}"
    cut = " (output truncated)" if entry.get("truncated") else ""
    text = _one_line(str(entry.get("text", "")).rstrip(chr(10)))
    return f"handler {how}{ident} in {entry.get('duration_ms')} ms{cut}" + (
        f": {text}" if text else "")


def _render_event(name: str, data: dict) -> str:
    if name == "status":
        return f"status: {data.get('status')}"
    if name == "alert":
        return f"alert ({data.get('level')}): {_one_line(data.get('message', ''))}"
    if name == "error":
        return f"error ({data.get('code')}): {_one_line(data.get('message', ''))}"
    if name == "shutdown":
        return "shutdown"
    rest = json.dumps(data, ensure_ascii=False) if data else ""
    return f"{name}: {rest}".rstrip(": ")


@click.command("wait", cls=YoiCommand)
@pod_argument()
@click.option("--reply-to", "reply_to", metavar="ID",
              help="An entry that answers message ID (sent with --reply-to ID).")
@click.option("--from", "source", type=PodNameType("source Pod name"), metavar="POD",
              help="An entry from Pod POD (a message it sent, a notice about it).")
@click.option("--id", "msg_id", metavar="ID", help="An entry with id ID.")
@click.option("--kind", metavar="KIND",
              help="An entry of kind KIND (e.g. system_item, handler_result).")
@click.option("--after", type=click.IntRange(min=0), default=None, metavar="SEQ",
              help="Only entries after sequence number SEQ (default: any, also those "
                   "already in the log).")
@timeout_option(help="How long to wait.")
@json_option
@state_options
def wait_command(name, reply_to, source, msg_id, kind, after, timeout, as_json, state):
    """Wait until an entry that matches every filter given is in NAME's log.

    An entry already in the log counts (give --after SEQ to look only at
    later ones). Prints the entry (one line; --json: the whole entry, one
    document) and exits 0. Works whether or not NAME is live: a live Pod is
    followed as it commits, nothing committed in between is missed, and a
    Pod that starts while this waits is picked up. Exit 5 on timeout, saying
    what was waited for.

    \b
    Examples:
      yoi pod wait ci --reply-to q-42 --timeout 60
      yoi pod wait parent --from child --after 17 --json
      yoi pod wait agent --kind handler_result --id q-42
    """
    from yoi import history
    from yoi.delivery import check_id
    for value, what in ((reply_to, "--reply-to"), (msg_id, "--id")):
        if value is not None:
            check_id(value, what, sent=False)
    match = history.Match(reply_to=reply_to, source=source, msg_id=msg_id, kind=kind)
    entry = history.wait(state, name, match, after, timeout)
    emit(as_json, {"pod_name": name, "entry": entry}, render(entry))
