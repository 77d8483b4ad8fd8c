"""A live Pod's side of offline delivery: committing the messages queued for it.

The queue (``pods/NAME/queue.jsonl``, see ``yoi.offline``) is drained in
*passes*, one at a time, on the drain thread. A pass:

1. takes the Pod's metadata lock (the lock every append takes) and holds it
   to the end, so nothing is appended meanwhile;
2. reads the queue; a torn last record and lines that are not records are
   moved aside (``queue.jsonl.torn-TIME``, ``.bad-TIME``) with an alert;
3. on the loop, settles each record in order:

   * one not in the log yet gets the receiver's peer check as a live message
     does; if it passes it goes through ``methods.notify`` itself, so it is
     committed exactly like a live one (the same ``system_item`` entry and
     broadcast, the same handler run); if it fails it is not committed: it is
     recorded as a ``delivery_rejected`` entry (with its text and the reason;
     once per id, see ``session.REJECTED_PREFIX``) and an alert is raised;
   * one committed before (by an earlier pass that a crash cut short, or
     sent live too) is not committed again; if the Pod has a handler and no
     ``handler_result`` of it is in the log (looked up in the id index,
     ``session.HANDLED_PREFIX``) and none is on its way in this process, its
     handler run is queued now;

4. removes from the queue the records that are done: rejected, or committed
   and, if the Pod has a handler, with their ``handler_result`` committed.
   The others stay, to be removed by a later pass (one is asked for when a
   queued message's handler result is committed); then releases the lock.

A crash anywhere leaves each record in the queue until it is done: the next
pass commits what is not in the log yet, runs the handler for what was
committed without it, and drops the rest, so every queued message is
committed exactly once and its handler runs (at least once: a run that a
crash cut short is run again). A run the Pod's stop cut short has its
``handler_result`` (``ended: stopped``) and counts as run.

Passes run at start-up, before the Pod accepts clients (so what was queued
comes before anything sent live), when a client asks (``drain_queue``, which
``yoi pod send --queue`` sends after appending, in case the Pod started
meanwhile), and whenever a look every ``QUEUE_POLL`` seconds (one ``stat``)
finds the queue not empty: a live Pod never leaves a message queued, even if
its sender died between its append and its request.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading

from yoi import offline
from yoi.errors import Failed, YoiError
from yoi.faults import fault
from yoi.server import methods
from yoi.server.log import log
from yoi.server.loop import Background, report
from yoi.server.operations import Invalid
from yoi.server.worker import Job
from yoi.session import REJECTED_PREFIX, Entry, entry_source, handled_key
from yoi.txn import lock_pods

QUEUE_POLL = 1.0    # seconds between looks at the queue file
PASS_WAIT = 120.0   # seconds a pass waits for the loop to settle its records


def _no_result() -> dict:
    """What a pass that settled nothing reports (``queue_drained``, less ``ids``)."""
    return {"committed": 0, "duplicates": 0, "rejected": 0, "queued": 0, "rejections": {}}


class Drainer(Background):
    def __init__(self, pod):
        super().__init__(pod, "drain")
        self.wanted = False
        self.waiters: list = []
        self.last_problem: str | None = None
        self.awaiting: set[str] = set()  # queued ids left waiting for their handler run

    def request(self, waiter=None) -> None:
        """Ask for a pass (any thread); WAITER(result) runs on the loop after a pass
        that began after this request."""
        with self.cond:
            self.wanted = True
            if waiter is not None:
                self.waiters.append(waiter)
            self.cond.notify()

    def poll(self) -> None:
        """Look at the queue file (loop thread) and ask for a pass if it is not empty."""
        if self.pod.loop.stopping:
            return
        try:
            waiting = os.lstat(self.pod.state.queue_path(self.pod.name)).st_size > 0
        except OSError:
            waiting = False
        if waiting:
            self.request()
        self.pod.loop.call_later(QUEUE_POLL, self.poll)

    def outcome(self, msg_id: str, result: dict) -> dict:
        """What became of MSG_ID, for a ``queue_drained`` answer (loop thread):
        ``delivered`` (in the log), ``rejected`` (with the reason), ``queued``
        (the pass failed) or ``unknown``."""
        session = self.pod.session
        if session.committed_line(msg_id) is not None:
            return {"state": "delivered"}
        reason = result["rejections"].get(msg_id)
        if reason is None:
            line = session.committed_line(REJECTED_PREFIX + msg_id)
            if line is not None:
                reason = json.loads(line).get("reason", "")
        if reason is not None:
            return {"state": "rejected", "reason": reason}
        return {"state": "queued" if result.get("error") else "unknown"}

    # -- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.wanted and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                self.wanted = False
                waiters, self.waiters = self.waiters, []
            try:
                result = self._pass()
            except Exception as e:  # _pass says what went wrong itself; the thread goes on
                result = {**_no_result(), "queued": None,
                          "error": f"internal error: {type(e).__name__}"}
                self.pod.loop.call_soon(self.pod.internal_error, "the queue drain", e)
            for waiter in waiters:
                self.pod.loop.call_soon(waiter, result)

    def _pass(self) -> dict:
        pod = self.pod
        path = pod.state.queue_path(pod.name)
        result = _no_result()
        try:
            if os.lstat(path).st_size == 0:
                return result
        except FileNotFoundError:
            return result
        except OSError:
            pass  # the pass itself says what is wrong
        try:
            with lock_pods(pod.state, [pod.name]):
                contents = offline.read(path)
                for note in offline.set_aside_damage(path, contents):
                    self._alert("warn", f"the queue {path}: {note}")
                records = contents.records
                if records:
                    done = self._settle(records, result)
                    fault("drain-before-clear")
                    offline.remove(path, records, done)
                    result["queued"] = len(records) - len(done)
                    failed = result.pop("failed", None)
                    if failed is not None:
                        raise Failed(f"{failed} of {len(records)} queued message(s) could "
                                     "not be committed; they stay queued")
            self.last_problem = None
        except Exception as e:  # whatever it is, the thread goes on and waiters are answered
            if isinstance(e, YoiError):
                why = e.message
            elif isinstance(e, OSError):
                why = f"{e.strerror or e}"
            else:
                why = f"internal error: {type(e).__name__}: {e} (traceback in the Pod's log)"
                report("the queue drain", e)
            result["error"] = why
            try:
                result["queued"] = offline.depth(path)
            except YoiError:
                result["queued"] = None  # the error says why
            if why != self.last_problem:  # a retry that fails alike says it once
                self.last_problem = why
                self._alert("error", f"could not deliver the queued messages: {why}; "
                                     "trying again")
        return result

    def _alert(self, level: str, message: str) -> None:
        self.pod.loop.call_soon(self.pod.alert, level, message)

    def _settle(self, records: list[dict], result: dict) -> set[str]:
        """Have the loop settle every record (see the module docstring); wait for it.
        Returns the ids of the records that are done (to be removed from the queue)."""
        settled = threading.Event()
        outcomes: list = [None] * len(records)
        self.pod.loop.call_soon(self._settle_on_loop, records, outcomes, settled)
        if not settled.wait(PASS_WAIT):
            raise Failed(f"the queued messages were not committed within {PASS_WAIT:g}s")
        handler = bool(self.pod.exec_cmd)
        done: set[str] = set()
        failed = rerun = 0
        for rec, outcome in zip(records, outcomes):
            if outcome == "committed":
                result["committed"] += 1
                if not handler:
                    done.add(rec["id"])
            elif outcome in ("duplicate", "rerun"):
                result["duplicates"] += 1
                if outcome == "duplicate":
                    done.add(rec["id"])
                else:
                    rerun += 1
            elif isinstance(outcome, tuple):  # ("rejected", reason)
                result["rejected"] += 1
                result["rejections"][rec["id"]] = outcome[1]
                done.add(rec["id"])
            elif outcome != "waiting":
                failed += 1
        if failed:
            result["failed"] = failed
        if rerun:
            log(f"queued {rerun} handler run(s) for queued message(s) committed without "
                "their handler_result (a crash or a stop came before it)")
        return done

    def _settle_on_loop(self, records: list[dict], outcomes: list,
                        done: threading.Event) -> None:
        pod = self.pod
        left = [len(records)]
        try:  # one query per few hundred records, not one each
            known = pod.session.lookup_many([rec["id"] for rec in records])
        except (sqlite3.Error, OSError):
            known = None  # each is looked up on its own below

        def settled(i: int, outcome) -> None:
            outcomes[i] = outcome
            if records[i]["id"] in pod.worker.unfinished:
                self.awaiting.add(records[i]["id"])  # see ``handled``
            left[0] -= 1
            if left[0] == 0:
                done.set()

        def notified(finish, outcome) -> None:
            # "duplicate": the same id was being committed live, and now is: its handler
            # run (if any) is on its way, and a later pass sees it done.
            finish("committed" if outcome is None else
                   "waiting" if outcome == "duplicate" and pod.exec_cmd else outcome)

        for i, rec in enumerate(records):
            finish = (lambda outcome, i=i: settled(i, outcome))
            if pod.loop.stopping:
                finish("waiting")  # the Pod stops: no handler runs now; all stay queued
                continue
            if rec["id"] in pod.worker.unfinished:
                finish("waiting")
                continue
            if known is None:
                found = pod.session.committed_at(rec["id"])
            else:
                where = known.get(rec["id"])
                found = None if where is None else (where, pod.session.read(where))
            if found is not None:
                finish(self._committed_before(rec["id"], *found))
                continue
            source = rec.get("source")
            try:
                refusal = pod.peer_refusal(source) if source is not None else None
                if refusal is None:
                    methods.notify(pod, None, offline.notify_params(rec),
                                   done=lambda o, f=finish: notified(f, o))
                    continue
            except Invalid as e:
                refusal = str(e)
            self._reject(rec, refusal, finish)
        if not records:
            done.set()

    def _committed_before(self, msg_id: str, where, line: bytes) -> str:
        """A queued message already in the log (loop thread): ``duplicate`` (done:
        the Pod has no handler, or its handler_result is committed) or ``rerun`` (its
        handler run is queued now)."""
        pod = self.pod
        if not pod.exec_cmd or pod.session.committed_line(handled_key(msg_id)) is not None:
            return "duplicate"
        pod.worker.submit(Job("notify", where, entry_source(json.loads(line)), msg_id))
        return "rerun"

    def handled(self, msg_id: str) -> None:
        """MSG_ID's handler_result is committed (loop thread). Once the last queued
        message a pass left waiting is handled, another pass removes them at once;
        until then the look every QUEUE_POLL seconds removes what is done."""
        if msg_id in self.awaiting:
            self.awaiting.discard(msg_id)
            if not self.awaiting:
                self.request()

    def _reject(self, rec: dict, reason: str, finish) -> None:
        """Record that REC is not delivered (its relation is gone), once per id: one
        recorded by a pass that crashed before emptying the queue is not written (nor
        alerted) again."""
        pod = self.pod
        key = REJECTED_PREFIX + rec["id"]
        fields = {"message_id": rec["id"], "source": rec.get("source"), "reason": reason,
                  "message": rec["message"], "queued_at": rec["queued_at"]}
        if rec.get("in_reply_to") is not None:
            fields["in_reply_to"] = rec["in_reply_to"]

        def after(res, err):
            if err is None and not res.duplicate:
                pod.alert("warn", f"queued message {rec['id']} from {rec.get('source')} was "
                                  f"not delivered: {reason} (recorded in the session log, "
                                  f"#{res.seq})")
            finish(("rejected", reason) if err is None else err)

        pod.commit(None, Entry("delivery_rejected", fields, key=key), after)
