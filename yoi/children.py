"""Spawned children: a Pod delegates work to a child Pod it owns and hears when it is done.

Records (``yoi.metadata``): the child's names its ``parent``, its ``scope``
(``parent``: it may reach its parent and its own children; ``peers``: also
its parent's peers), its ``spawn_id`` (random, one per spawn) and, when it
was spawned with a task, its ``task_id``; the parent's lists it in
``[[children]]``. ``spawn`` creates the child and changes both records as
one transaction (``yoi.txn``, action ``create``), then starts the child and
delivers the task as its first message, with the id ``task:CHILD:1``: a
retried spawn finds the child it made, starts it if need be and delivers
the task at most once.

Notices: a child Pod commits ``pod_started`` to its own log when it starts
and ``pod_stopped`` when it stops cleanly, so its log says which runs it had
and how each ended. The parent Pod reads its children's logs
(``yoi.server.children``) and commits, for each child, one
``child_completed`` (the handler run of the task ended) and one
``child_stopped`` per run of the child (it stopped, or its process died),
each under an id derived from what it is about (``metadata.notice_id``):
whoever notices first, and however often, the parent's id index commits
each once. ``read_child`` is that reading, a pure function of the log.
"""

from __future__ import annotations

import os

from yoi import control, delivery, metadata, session, store
from yoi.errors import AlreadyExists, Refused, UsageError
from yoi.names import check_name
from yoi.state import State
from yoi.timeouts import DEFAULT
from yoi.txn import Change, lock_pods, remove_trash

OUTPUT_CAP = 64 << 10   # characters of a child's output a notice carries


# -- spawning ---------------------------------------------------------------------

def spawn(state: State, parent: str, child: str, *, exec_cmd: str | None = None,
          cwd: str | None = None, scope: str = "parent", task: str | None = None,
          timeout: float = DEFAULT) -> dict:
    """Create CHILD owned by PARENT (one transaction), start it and deliver TASK.

    A CHILD that PARENT spawned already with these settings is not an error:
    it is started unless it is live, and the task is delivered unless it was
    (``created`` false). Raises UsageError (bad name, scope, a task without a
    handler), NotFound (no PARENT), AlreadyExists (CHILD exists otherwise, or
    with other settings), Refused (CHILD is another Pod's child), and what
    starting or sending raises.
    """
    check_name(parent, "parent Pod name")
    check_name(child, "child Pod name")
    if parent == child:
        raise UsageError(f"a Pod cannot be its own child ({child!r})")
    if scope not in metadata.SCOPES:
        raise UsageError(f"invalid scope {scope!r}: use parent or peers")
    task_id = None
    if task is not None:
        if exec_cmd is None:
            raise UsageError("a task needs a handler to run it: give --exec CMD")
        task_id = metadata.task_id_for(child)
        delivery.encode(task, task_id, parent)  # checked before anything is made
    if exec_cmd is not None:
        store.utf8_text(exec_cmd, "handler command")
    if cwd is not None:
        cwd = store.utf8_text(os.path.abspath(cwd), "working directory")
    record, created = create_child(state, parent, child, exec_cmd, cwd, scope, task_id)
    # control.restore waits out another start of CHILD under way (two spawns at once)
    started = control.restore(state, child, timeout=timeout)
    result = {"pod_name": child, "parent": {"pod_name": parent}, "created": created,
              "scope": metadata.scope_of(record), "started": started["restored"],
              "socket_path": started["socket_path"], "task": None}
    if task is not None:
        given = _given_task(state, child, task_id)
        if given not in (None, task):
            raise AlreadyExists(f"{child} was given its task already, with another text than "
                                f"this one (id {task_id}); a task is delivered once",
                                pod_name=child, data=result)
        sent = delivery.send(state, child, task, source=parent, msg_id=task_id,
                             timeout=timeout)
        result["task"] = {"id": task_id, "acknowledged": sent["acknowledged"],
                          "at": sent["at"]}
    result["record"] = record
    return result


def _given_task(state: State, child: str, task_id: str, look: int = 1000) -> str | None:
    """The text of the task CHILD was given already (its message TASK_ID, among the
    first LOOK entries of its log: it is its first message), or None."""
    for i, (_, entry) in enumerate(session.entries(state.session_path(child))):
        if i >= look:
            break
        if entry is not None and entry.get("kind") == "system_item" and \
                session.entry_id(entry) == task_id:
            message = (entry.get("item") or {}).get("message")
            return message if isinstance(message, str) else None
    return None


def create_child(state: State, parent: str, child: str, exec_cmd: str | None = None,
                 cwd: str | None = None, scope: str = "parent",
                 task_id: str | None = None) -> tuple[dict, bool]:
    """Create CHILD and list it in PARENT's record as one transaction (``spawn`` without
    starting it), or find the child a previous spawn made with these settings.
    Returns (CHILD's record, created)."""
    with lock_pods(state, [parent, child]) as locked:
        p = locked.require(parent)
        c = locked.read(child)
        if c.exists:
            return _respawn(c.doc, p.doc, parent, child, exec_cmd, cwd, scope, task_id), False
        remove_trash(state, child)
        now = metadata.utcnow()
        record = metadata.new_record(child, exec_cmd=exec_cmd, cwd=cwd)
        record.update({"parent": parent, "scope": scope, "spawn_id": os.urandom(6).hex()})
        if task_id is not None:
            record["task_id"] = task_id
        metadata.add_child(p.doc, child, now)
        locked.commit([Change(child, "create", metadata.dumps(record)),
                       Change(parent, "write", metadata.dump_record(p.doc))])
        return record, True


def _respawn(doc: dict, pdoc: dict, parent: str, child: str, exec_cmd, cwd, scope: str,
             task_id: str | None) -> dict:
    """The record of CHILD as spawned before by PARENT with these settings, or why not."""
    owner = metadata.parent_of(doc)
    if owner is not None and owner != parent:
        raise Refused(f"Pod {child!r} is a child of {owner}; a Pod has one parent",
                      pod_name=child)
    if owner is None or not metadata.has_child(pdoc, child):
        raise AlreadyExists(f"Pod {child!r} already exists and is not a child of {parent}",
                            pod_name=child)
    runtime = doc.get("runtime") or {}
    differences = [{"setting": k, "stored": have, "given": given} for k, have, given in (
        ("exec", runtime.get("exec"), exec_cmd), ("cwd", runtime.get("cwd"), cwd),
        ("scope", metadata.scope_of(doc), scope), ("task", doc.get("task_id"), task_id))
        if have != given]
    if differences:
        what = "; ".join(f"{d['setting']} is {d['stored']!r}, not {d['given']!r}"
                         for d in differences)
        raise AlreadyExists(f"Pod {child!r} was spawned by {parent} with other settings "
                            f"({what})", pod_name=child, differences=differences)
    return doc


# -- what a parent reads in a child's log -----------------------------------------

class Notice:
    """One entry to commit to the parent's log, with its deterministic id."""

    __slots__ = ("msg_id", "kind", "fields")

    def __init__(self, msg_id: str, kind: str, fields: dict):
        self.msg_id, self.kind, self.fields = msg_id, kind, fields

    def __repr__(self) -> str:
        return f"Notice({self.msg_id!r}, {self.kind!r})"


class Watch:
    """How far a parent has read one child's log: POS, the seq of the last entry read;
    OPEN_RUN, the seq of the ``pod_started`` entry of the run whose end has not been
    read yet; OUTPUT, the last handler output of that run; KEY, the log file as it was
    (inode, size) when last read; SPAWN_ID, the spawn of the child it watches (a child
    removed and spawned again under its name is another child, watched afresh)."""

    __slots__ = ("pos", "open_run", "output", "key", "spawn_id")

    def __init__(self, pos: int | None = None):
        self.pos, self.open_run, self.output, self.key = pos, None, "", None
        self.spawn_id: str | None = None

    def copy(self) -> "Watch":
        w = Watch(self.pos)
        w.open_run, w.output, w.key, w.spawn_id = (self.open_run, self.output, self.key,
                                                   self.spawn_id)
        return w

    @property
    def cursor(self) -> int | None:
        """Where a parent that starts again reads from: before the open run, if any."""
        return self.open_run - 1 if self.open_run is not None else self.pos


def _text(value) -> tuple[str, bool]:
    text = value if isinstance(value, str) else ""
    return text[:OUTPUT_CAP], len(text) > OUTPUT_CAP


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_child(path, watch: Watch, child: str, spawn_id: str,
               task_id: str | None) -> list[Notice]:
    """The notices the entries of CHILD's log at PATH after ``watch.pos`` call for,
    advancing WATCH over them: ``child_completed`` for the handler result of the task
    TASK_ID, ``child_stopped`` for each run that ended (its ``pod_stopped``, or the
    next ``pod_started`` when it ended without one: it died). A run still open
    stays open; see ``died``."""
    out = []
    for line, entry in session.entries(path, after=watch.pos):
        seq = None if entry is None else session.entry_seq(entry)
        if seq is None or not session.whole(line):
            continue  # not an entry, or one still being written
        watch.pos = seq
        kind = entry.get("kind")
        if kind == "handler_result":
            if watch.open_run is not None:
                watch.output = entry.get("text") if isinstance(entry.get("text"), str) else ""
            if task_id is not None and entry.get("id") == task_id:
                out.append(completed(entry, child, spawn_id, task_id))
        elif kind == "pod_started":
            if watch.open_run is not None:
                out.append(stopped(watch, child, spawn_id, task_id, None))
            watch.open_run, watch.output = seq, ""
        elif kind == "pod_stopped" and watch.open_run is not None:
            out.append(stopped(watch, child, spawn_id, task_id, seq))
    return out


def completed(entry: dict, child: str, spawn_id: str, task_id: str) -> Notice:
    """``child_completed`` for the task's ``handler_result`` ENTRY."""
    output, cut = _text(entry.get("text"))
    return Notice(metadata.notice_id(child, spawn_id, "done"), "child_completed", {
        "source": child, "task_id": task_id, "child_seq": entry["seq"],
        "ok": entry.get("ok") is True,
        "ended": entry.get("ended") if isinstance(entry.get("ended"), str) else None,
        "exit_status": _int(entry.get("exit_status")), "signal": _int(entry.get("signal")),
        "duration_ms": _int(entry.get("duration_ms")), "output": output,
        "truncated": cut or entry.get("truncated") is True})


def stopped(watch: Watch, child: str, spawn_id: str, task_id: str | None,
            stop_seq: int | None) -> Notice:
    """``child_stopped`` for the open run of WATCH, which ends here: with its
    ``pod_stopped`` entry at STOP_SEQ, or (None) without one: the process died."""
    run = watch.open_run
    output, cut = _text(watch.output)
    watch.open_run, watch.output = None, ""
    return Notice(metadata.notice_id(child, spawn_id, f"stopped:{run}"), "child_stopped", {
        "source": child, "run": run, "ended": "stopped" if stop_seq is not None else "died",
        "exit_status": 0 if stop_seq is not None else None, "task_id": task_id,
        "child_seq": stop_seq, "output": output, "truncated": cut})


def died(watch: Watch, child: str, spawn_id: str, task_id: str | None) -> Notice:
    """``child_stopped`` for WATCH's open run, whose process is gone without a word."""
    return stopped(watch, child, spawn_id, task_id, None)
