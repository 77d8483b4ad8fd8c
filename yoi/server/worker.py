"""The handler worker: runs a Pod's ``--exec`` command for each committed message.

Handler contract: ``/bin/sh -c CMD`` with the raw ``message`` (for ``run``,
the text of the segments) on stdin, cwd = ``[runtime] cwd`` if set, and the
environment of the Pod plus ``YOI_POD``, ``YOI_HOME`` and ``YOI_STATE_DIR``
(the Pod's state directory, so every ``yoi`` command the handler runs uses
it), ``YOI_FROM`` (the source Pod, empty for the operator),
``YOI_MESSAGE_ID`` (empty if none) and ``YOI_EVENT`` (``run``, ``notify`` or
``peer_request``: a request to become a peer, whose run ``yoi.server.consent``
handles). Its stdout (at most
``MAX_HANDLER_OUTPUT`` bytes) is committed and broadcast as ``text_done``;
its stderr goes to the Pod's own log (``pod.log`` when detached). A non-zero
exit raises an alert; the Pod goes on. Entries are not re-handled after a
restart.

One job at a time, in commit order, on its own thread and outside every lock
(a handler may itself run ``yoi pod send``, even to this Pod).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import traceback

from yoi.procs import StillThere, popen_gone, terminate
from yoi.server.log import log
from yoi.session import Entry
from yoi.session.writer import Committed

MAX_HANDLER_OUTPUT = 1 << 20
READ_CHUNK = 64 << 10
HANDLER_KILL_GRACE = 2.0


class Job:
    """One committed message to handle: where its entry is, not its text (a
    handler that takes its time while messages pour in costs a few bytes per
    waiting message, not up to a mebibyte each)."""

    __slots__ = ("kind", "entry", "source", "msg_id")

    def __init__(self, kind: str, entry: Committed, source: str | None, msg_id: str | None):
        self.kind, self.entry, self.source, self.msg_id = kind, entry, source, msg_id


class HandlerWorker:
    """POD provides ``loop``, ``session``, ``state``, ``name``, ``exec_cmd``, ``cwd``,
    ``alert``, ``busy`` and ``committed`` (see ``yoi.server.pod``)."""

    def __init__(self, pod):
        self.pod = pod
        self.jobs: queue.Queue = queue.Queue()
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._work, name="handler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue JOB (loop thread); the Pod is ``running`` until it is handled."""
        if self.pod.loop.stopping:
            return  # committed, but no handler runs any more (not re-handled later)
        self.pod.busy(+1)
        self.jobs.put(job)

    def stop(self) -> None:
        """End the run in progress, take no more jobs, wait for the thread."""
        self.kill()
        self.jobs.put(None)
        self.thread.join(HANDLER_KILL_GRACE + 5)

    # -- the thread --------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.pod.loop.stopping:
                return
            try:
                self._handle(job)
            except Exception:
                log("internal error in the handler worker:\n" + traceback.format_exc())
            self.pod.loop.call_soon(self.pod.busy, -1)

    def _handle(self, job: Job) -> None:
        pod = self.pod
        if job.kind == "peer_request":
            pod.handle_peer_request(self, job)
            return
        if pod.exec_cmd:
            out, problem = self.run(self._input(job), job.source, job.msg_id, job.kind)
            if pod.loop.stopping:
                return
            if out:
                self._commit(Entry("text_done", {"text": out.decode("utf-8", "replace")}))
            if problem:
                pod.loop.call_soon(pod.alert, "error", problem)
        if job.kind == "run" and not pod.loop.stopping:
            self._commit(Entry("run_end", {"result": "finished"}))

    def _input(self, job: Job) -> str:
        """The text a handler gets, read back from the committed entry."""
        entry = json.loads(self.pod.session.read(job.entry))
        if job.kind == "notify":
            return entry["item"]["message"]
        return "".join(s.get("content", "") for s in entry["segments"]
                       if s.get("kind", "text") == "text")

    def _commit(self, entry: Entry) -> None:
        pod = self.pod

        def done(res, err):
            pod.loop.call_soon(pod.committed, None, entry, res, err, None)

        try:
            pod.session.append(entry, done)
        except OSError:
            pass  # already reported by ``committed``

    # -- one run -------------------------------------------------------------------
    def _env(self, source: str | None, msg_id: str | None, event: str | None) -> dict:
        root = str(self.pod.state.root)
        env = dict(os.environ)
        env.update({"YOI_POD": self.pod.name, "YOI_HOME": root, "YOI_STATE_DIR": root,
                    "YOI_FROM": source or "", "YOI_MESSAGE_ID": msg_id or "",
                    "YOI_EVENT": event or ""})
        return env

    def run(self, text: str, source: str | None, msg_id: str | None,
            event: str | None = None) -> tuple[bytes, str | None]:
        """Run the handler once on TEXT: (its stdout, capped; a problem to alert, or None)."""
        what = f"message {msg_id}" if msg_id else ("run" if source is None else "message")
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", self.pod.exec_cmd], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, cwd=self.pod.cwd,
                                    env=self._env(source, msg_id, event),
                                    start_new_session=True)
        except OSError as e:
            return b"", f"handler could not start for {what}: {e.strerror or e}"
        self.proc = proc
        if self.pod.loop.stopping:
            self.kill()
        feeder = threading.Thread(target=_feed, args=(proc, text), name="handler-stdin",
                                  daemon=True)
        feeder.start()
        out, truncated = _read_capped(proc.stdout, MAX_HANDLER_OUTPUT)
        proc.stdout.close()
        rc = proc.wait()
        feeder.join()
        self.proc = None
        problem = None
        if rc != 0:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            problem = f"handler {how} ({what})"
        elif truncated:
            problem = f"handler output over {MAX_HANDLER_OUTPUT} bytes was truncated ({what})"
        return out, problem

    def kill(self) -> None:
        """End the handler run in progress, its whole process group (any thread)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            terminate(lambda sig: os.killpg(proc.pid, sig), popen_gone(proc),
                      HANDLER_KILL_GRACE)
        except StillThere:
            log(f"handler pid {proc.pid} survived SIGKILL")


def _feed(proc: subprocess.Popen, text: str) -> None:
    try:
        proc.stdin.write(text.encode("utf-8"))
    except OSError:
        pass  # the handler does not read its stdin: fine
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _read_capped(stream, cap: int) -> tuple[bytes, bool]:
    """Everything STREAM gives until EOF, keeping at most CAP bytes: (kept, truncated)."""
    chunks, size, truncated = [], 0, False
    while True:
        chunk = stream.read1(READ_CHUNK)
        if not chunk:
            break
        if size < cap:
            chunks.append(chunk[:cap - size])
            size += len(chunks[-1])
            truncated = truncated or len(chunk) > len(chunks[-1])
        else:
            truncated = True
    return b"".join(chunks), truncated
