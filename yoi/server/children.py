"""A live Pod's side of spawned children: watching its children, telling its parent.

As a parent, a Pod runs a ``ChildWatcher`` thread. For each child its
record lists (and whose record names it back) it reads the child's log
after where it last read (``yoi.children.read_child``) and commits the
notices that calls for, each under its deterministic id and only if that id
is not in its log yet: so a notice is committed once, whoever noticed first.
It reads a child's log:

* at start-up (what happened while it was stopped: delivered now);
* when the child tells it (the ``child_update`` method, ours: a child sends
  it when its task's handler run has ended and when it stops);
* when it sees the child's log change or its process go (every
  ``WATCH_INTERVAL`` it looks at each child's log size and, while a run of
  the child is open, at its runtime lock: a SIGKILLed child tells nobody).

A run whose process is gone without its ``pod_stopped`` entry ended as
``died``. The log is read before the runtime lock is looked at, and once
more after the lock is seen free, so a clean stop is never taken for a
death, nor a new run for the end of the old one.

How far it has read each child's log is kept in the child's directory
(``cursors/.parent``: the seq before the oldest run still open, or the last
entry read), written only after the notices up to there are durable. A
crash in between makes the parent read a stretch again, and the ids make
that harmless.

As a child, a Pod commits ``pod_started`` when it starts and ``pod_stopped``
when it stops cleanly (the end of a run, in its own log), and tells its
parent, if live, after its task's handler run and when it stops (``tell``):
a courtesy for speed, since the parent would see both by itself.
"""

from __future__ import annotations

import os
import threading

from yoi import client, control, cursors, metadata, protocol
from yoi.children import Notice, Watch, died, read_child
from yoi.errors import CorruptMetadata, YoiError
from yoi.server.log import log
from yoi.server.loop import Background
from yoi.session import Entry
from yoi.timeouts import DEFAULT
from yoi.txn import RecordCache, read_pod_file

WATCH_INTERVAL = 1.0   # seconds between looks at the children's logs and locks
LOOP_WAIT = 0.1        # while waiting for the loop to commit, how often to look up
TELL_TIMEOUT = 3.0     # seconds a child waits for its parent to take its news in
WATCH_CURSOR = ".parent"  # the parent's cursor among the child's (no Pod name starts with .)


class ChildWatcher(Background):
    """The thread that turns what the children of POD did into notices in POD's log."""

    def __init__(self, pod):
        super().__init__(pod, "children")
        self.dirty: set[str] = set()
        self.everything = True          # look at every child on the next round
        self.waiters: dict[str, list] = {}
        self.watches: dict[str, Watch] = {}
        self._record = RecordCache(pod.state).read  # this thread's own cache
        self._problems: dict[str, str | None] = {}  # what was logged last, per Pod

    def stop(self, join: float | None = DEFAULT) -> None:
        """Stop watching; shut-down waits up to JOIN for a round in progress."""
        super().stop(join)

    def wake(self, name: str, answered=None) -> None:
        """Read CHILD NAME's log now; ANSWERED() runs on the loop once that is done and
        what it called for is committed (any thread)."""
        with self.cond:
            self.dirty.add(name)
            if answered is not None:
                self.waiters.setdefault(name, []).append(answered)
            self.cond.notify()

    # -- the thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                if not (self.dirty or self.everything or self.stopping):
                    self.cond.wait(WATCH_INTERVAL)
                if self.stopping:
                    return
                dirty, self.dirty = self.dirty, set()
                everything, self.everything = self.everything, False
                waiters, self.waiters = self.waiters, {}
            try:
                self._round(dirty, everything)
            except Exception as e:
                self.pod.loop.call_soon(self.pod.internal_error, "the child watcher", e)
            for answers in waiters.values():
                for answered in answers:
                    self.pod.loop.call_soon(answered)

    def _round(self, dirty: set[str], everything: bool) -> None:
        pod = self.pod
        try:
            doc = self._record(pod.name)
        except YoiError as e:
            self._problem(pod.name, f"cannot read this Pod's record: {e.message}")
            return
        names = metadata.child_names(doc)
        for gone in set(self.watches) - set(names):
            del self.watches[gone]
        for name in names:
            if self.stopping:
                return
            try:
                self._check(name, everything or name in dirty)
                self._problem(name, None)
            except YoiError as e:
                self._problem(name, f"cannot read child {name}: {e.message}")
            except OSError as e:
                self._problem(name, f"cannot read child {name}: {e.strerror or e}")

    def _problem(self, name: str, problem: str | None) -> None:
        """Log PROBLEM with NAME once, not every round it persists (None: it is gone)."""
        if problem is not None and self._problems.get(name) != problem:
            log(problem)
        self._problems[name] = problem

    def _check(self, name: str, force: bool) -> None:
        """Read what is new in child NAME's log and commit the notices it calls for."""
        pod, state = self.pod, self.pod.state
        cdoc = self._record(name)
        spawn_id = (cdoc or {}).get("spawn_id")
        if metadata.parent_of(cdoc) != pod.name or not isinstance(spawn_id, str):
            return  # not (or no longer) ours by its own record
        task_id = cdoc.get("task_id")
        path = state.session_path(name)
        watch = self.watches.get(name)
        if watch is None or watch.spawn_id != spawn_id:  # new, or removed and spawned again
            try:
                watch = Watch(cursors.load(state, name, WATCH_CURSOR, spawn_id))
            except CorruptMetadata:
                watch = Watch()  # read it all again: the ids keep notices single
            watch.spawn_id = spawn_id
        key = _file_key(path)
        if not force and key == watch.key and (
                watch.open_run is None or control.is_running(state, name)):
            return  # nothing written, nothing ended
        new = watch.copy()
        new.key = key
        notices = read_child(path, new, name, spawn_id, task_id)
        # The lock is looked at after the log is read (a run that starts meanwhile has
        # its pod_started entry read next time), and the log read once more once the
        # lock is free (a pod_stopped committed before it let go is a clean stop).
        if new.open_run is not None and not control.is_running(state, name):
            run = new.open_run
            notices += read_child(path, new, name, spawn_id, task_id)
            if new.open_run == run:
                notices.append(died(new, name, spawn_id, task_id))
        if notices and not self._commit(notices):
            return  # not committed: read the same again on the next round
        before = watch.cursor
        self.watches[name] = new
        if new.cursor is not None and new.cursor != before:
            cursors.store(state, name, WATCH_CURSOR, new.cursor, spawn_id)

    def _commit(self, notices: list[Notice]) -> bool:
        """Have the loop commit NOTICES (those whose id is not in the log yet); True once
        all are durable."""
        done = threading.Event()
        box: list = []

        def finished(err) -> None:
            box.append(err)
            done.set()

        self.pod.loop.call_soon(commit_notices, self.pod, notices, finished)
        while not done.wait(LOOP_WAIT):
            if self.stopping:
                return False
        return box[0] is None


def commit_notices(pod, notices: list[Notice], finished) -> None:
    """Commit each of NOTICES, in order (the session writer commits an id once: one in
    the log already, or twice among them, is not written again); FINISHED(error or
    None) once all are durable (loop thread)."""
    if pod.loop.stopping:
        finished("stopping")
        return
    if not notices:
        finished(None)
        return
    left, errors = [len(notices)], []

    def after(res, err) -> None:
        if err is not None:
            errors.append(err)
        left[0] -= 1
        if left[0] == 0:
            finished(errors[0] if errors else None)

    for n in notices:
        pod.commit(None, Entry(n.kind, n.fields, n.msg_id), after)


def _file_key(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size


# -- the child's side --------------------------------------------------------------

def tell(state, name: str, parent: str, timeout: float = TELL_TIMEOUT) -> bool:
    """Tell PARENT, if it is live, to read child NAME's log now, and wait until it has
    (``child_update``, answered ``child_update_seen``). False if it could not be told."""
    try:
        doc = read_pod_file(state, parent).doc
        if doc is None:
            return False
        client.request(state.socket_path(parent, doc),
                       protocol.method("child_update", {"name": name}),
                       {"child_update_seen"}, timeout, "the parent's answer")
        return True
    except YoiError:
        return False


def tell_soon(state, name: str, parent: str) -> None:
    """``tell`` on a thread of its own: the caller does not wait for the parent."""
    threading.Thread(target=tell, args=(state, name, parent), name="tell-parent",
                     daemon=True).start()
