"""The handler worker: runs a Pod's ``--exec`` command for each committed message.

Handler contract: ``/bin/sh -c CMD`` with the raw ``message`` (for ``run``,
the text of the segments) on stdin, cwd = ``[runtime] cwd`` if set, and the
environment of the Pod plus ``YOI_POD``, ``YOI_HOME`` and ``YOI_STATE_DIR``
(the Pod's state directory, so every ``yoi`` command the handler runs uses
it), ``YOI_FROM`` (the source Pod, empty for the operator),
``YOI_MESSAGE_ID`` (empty if none) and ``YOI_EVENT`` (``run``, ``notify`` or
``peer_request``: a request to become a peer, whose run ``yoi.server.consent``
handles).

Each run commits one ``handler_result`` entry (a spawned child's, for its task,
is followed by a word to its parent: ``yoi.server.children``): the id of the message it
handled, how it ended (exit status or signal, a timeout), its duration, its
stdout (at most ``MAX_HANDLER_OUTPUT`` bytes, ``truncated`` if cut) as
``text``, and the last ``STDERR_TAIL`` bytes of its stderr. Its stderr also
goes to the Pod's own log, at most ``STDERR_KEEP`` bytes per run (the
beginning and the end, with a note of what was dropped between). A failed
run raises an alert; the Pod goes on. A run cut short because the Pod
stops is committed too (``ended: stopped``), before the log is closed.
Entries are not re-handled after a restart, except queued messages: a queued
message stays in the queue until its ``handler_result`` is committed, and
the next drain has the handler run for one committed without it
(``yoi.server.drain``); so a ``handler_result`` of a notification with an
id is indexed (``session.HANDLED_PREFIX``). A peer request's run commits a
``peer_decision`` instead (see ``yoi.server.consent``).

A run is bounded, whatever the handler leaves behind. It runs in its own
process group. Once the handler has exited, its output is read for at most
``OUTPUT_GRACE`` seconds more (a background child can hold the pipes open
forever); a run that takes longer than the Pod's handler timeout is
stopped. When the run ends, the whole group is killed: on a timeout or when
the Pod stops, SIGTERM, then SIGKILL after ``HANDLER_KILL_GRACE`` seconds;
after a normal exit, SIGKILL to whatever the handler left running. The
handler's own pid stays unreaped until then, so the group id cannot have
been reused by then.

One job at a time, in commit order, on its own thread and outside every lock
(a handler may itself run ``yoi pod send``, even to this Pod).
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import signal
import subprocess
import threading
import time

from yoi.procs import StillThere, terminate
from yoi.server.children import tell_soon
from yoi.server.log import log, write_raw
from yoi.session import Entry, handled_key
from yoi.session.writer import Committed
from yoi.timeouts import POLL_CHUNK

MAX_HANDLER_OUTPUT = 1 << 20   # stdout committed per run
STDERR_KEEP = 64 << 10         # stderr written to the Pod's log per run: half head, half tail
READ_CHUNK = 64 << 10
HANDLER_KILL_GRACE = 2.0       # seconds between SIGTERM and SIGKILL
OUTPUT_GRACE = 1.0             # seconds output is still read after the handler exited
STDERR_TAIL = 2 << 10          # stderr bytes a handler_result entry keeps: the last ones
POLL_EXIT = 0.05               # where pidfd_open is missing: how often to look for the exit


class Job:
    """One committed message to handle: where its entry is, not its text (a
    handler that takes its time while messages pour in costs a few bytes per
    waiting message, not up to a mebibyte each)."""

    __slots__ = ("kind", "entry", "source", "msg_id")

    def __init__(self, kind: str, entry: Committed, source: str | None, msg_id: str | None):
        self.kind, self.entry, self.source, self.msg_id = kind, entry, source, msg_id


class HandlerWorker:
    """POD provides ``loop``, ``session``, ``state``, ``name``, ``exec_cmd``, ``cwd``,
    ``handler_timeout``, ``parent``, ``task_id``, ``alert``, ``busy``, ``committed``
    and ``internal_error`` (see ``yoi.server.pod``)."""

    def __init__(self, pod):
        self.pod = pod
        self.jobs: queue.Queue = queue.Queue()
        # Ids of the notifications whose handler run this process has queued and whose
        # handler_result is not committed (loop thread). One whose result could not be
        # committed stays: this process does not run it again.
        self.unfinished: set[str] = set()
        self.on_handled = None  # ON_HANDLED(msg_id) on the loop, once its result is durable
        self.halting = threading.Event()  # the Pod stops: end the run in progress
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._work, name="handler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue JOB (loop thread); the Pod is ``running`` until it is handled."""
        if self.pod.loop.stopping:
            return  # committed, but no handler runs any more (a queued one: at next start)
        if job.kind == "notify" and job.msg_id is not None:
            self.unfinished.add(job.msg_id)
        self.pod.busy(+1)
        self.jobs.put(job)

    def stop(self) -> None:
        """End the run in progress (its whole process group), take no more jobs, wait."""
        self.kill()
        self.jobs.put(None)
        self.thread.join(HANDLER_KILL_GRACE + 5)

    def kill(self) -> None:
        """Have the worker end the run in progress, if any (any thread)."""
        self.halting.set()
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # the pipe is full: the worker is woken already

    # -- the thread --------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.pod.loop.stopping or self.halting.is_set():
                return
            try:
                self._handle(job)
            except Exception as e:
                self.pod.loop.call_soon(self.pod.internal_error, "the handler worker", e)
            self.pod.loop.call_soon(self.pod.busy, -1)

    def _handle(self, job: Job) -> None:
        pod = self.pod
        if job.kind == "peer_request":
            pod.handle_peer_request(self, job)
            return
        if pod.exec_cmd:
            outcome = self.run(self._input(job), job.source, job.msg_id, job.kind)

            def recorded(res, err) -> None:
                if err is None:
                    self._handled(job)

            # Committed also when the Pod stops (``ended: stopped``): the session is
            # closed only after this thread is done, so the log says how the run ended.
            self._commit(outcome.entry(job.kind, job.msg_id), recorded)
            if pod.loop.stopping:
                return
            for level, problem in outcome.problems:
                pod.loop.call_soon(pod.alert, level, problem)
            if job.msg_id is not None and job.msg_id == pod.task_id:
                tell_soon(pod.state, pod.name, pod.parent)  # its task is done
        if job.kind == "run" and not pod.loop.stopping:
            self._commit(Entry("run_end", {"result": "finished"}))

    def _input(self, job: Job) -> str:
        """The text a handler gets, read back from the committed entry."""
        entry = json.loads(self.pod.session.read(job.entry))
        if job.kind == "notify":
            return entry["item"]["message"]
        return "".join(s["content"] for s in entry["segments"])  # as session.text_segments

    def _handled(self, job: Job) -> None:
        """JOB's handler_result is durable (loop thread)."""
        if job.kind == "notify" and job.msg_id is not None:
            self.unfinished.discard(job.msg_id)
            if self.on_handled is not None:
                self.on_handled(job.msg_id)

    def _commit(self, entry: Entry, after=None) -> None:
        pod = self.pod

        reported = []

        def done(res, err):
            reported.append(True)
            pod.loop.call_soon(pod.committed, None, entry, res, err, after)

        try:
            pod.session.append(entry, done)
        except OSError as e:
            if not reported:  # refused before the writer took it (the log takes no more)
                pod.loop.call_soon(pod.committed, None, entry, None, e, after)

    # -- one run -------------------------------------------------------------------
    def _env(self, source: str | None, msg_id: str | None, event: str | None) -> dict:
        root = str(self.pod.state.root)
        env = dict(os.environ)
        env.update({"YOI_POD": self.pod.name, "YOI_HOME": root, "YOI_STATE_DIR": root,
                    "YOI_FROM": source or "", "YOI_MESSAGE_ID": msg_id or "",
                    "YOI_EVENT": event or ""})
        return env

    def run(self, text: str, source: str | None, msg_id: str | None,
            event: str | None = None) -> "Outcome":
        """Run the handler once on TEXT; what came of it."""
        what = f"message {msg_id}" if msg_id else ("run" if source is None else "message")
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", self.pod.exec_cmd], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=self.pod.cwd, env=self._env(source, msg_id, event),
                                    start_new_session=True)
        except OSError as e:
            why = f"handler could not start for {what}: {e.strerror or e}"
            return Outcome(b"", False, None, "not_started", 0, why, [("error", why)])
        self._drain_wake()
        handled = _Run(proc, text.encode("utf-8"), self.pod.handler_timeout, self._wake_r,
                       self.halting, what)
        try:
            handled.collect()
        finally:
            handled.end()
        return handled.outcome()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass


class Outcome:
    """What came of one handler run: its output (capped), how it ended, how long it took,
    the end of its stderr, and the problems to raise as alerts."""

    __slots__ = ("out", "truncated", "rc", "ended", "duration_ms", "stderr_tail", "problems")

    def __init__(self, out: bytes, truncated: bool, rc: int | None, ended: str,
                 duration_ms: int, stderr_tail: str, problems: list[tuple[str, str]]):
        self.out, self.truncated, self.rc, self.ended = out, truncated, rc, ended
        self.duration_ms, self.stderr_tail, self.problems = duration_ms, stderr_tail, problems

    @property
    def failed(self) -> bool:
        """Whether the handler failed; a run the Pod's stop cut short did not fail (nor
        succeed: its entry says ``ok: false, ended: stopped``)."""
        return self.ended in ("not_started", "timed_out") or (
            self.ended != "stopped" and self.rc is not None and self.rc != 0)

    def entry(self, event: str, msg_id: str | None) -> Entry:
        """The ``handler_result`` log entry of this run of the EVENT (``notify``/``run``)
        with MSG_ID (the message it handled, if it had an id)."""
        rc = self.rc
        fields = {} if msg_id is None else {"id": msg_id}
        key = handled_key(msg_id) if msg_id is not None and event == "notify" else None
        fields.update({
            "handled": event, "ok": not self.failed and self.ended != "stopped", "ended": self.ended,
            "exit_status": rc if rc is not None and rc >= 0 else None,
            "signal": -rc if rc is not None and rc < 0 else None,
            "duration_ms": self.duration_ms,
            "text": self.out.decode("utf-8", "replace"), "truncated": self.truncated,
            "stderr_tail": self.stderr_tail})
        return Entry("handler_result", fields, key=key)


class _Run:
    """One handler process: its pipes and its exit, watched by one selector.

    The handler's own pid is never reaped before ``end``: until then its
    number, which is also its process group's, cannot be reused.
    """

    def __init__(self, proc: subprocess.Popen, data: bytes, timeout: float, wake_fd: int,
                 halting: threading.Event, what: str):
        self.proc, self.data, self.what = proc, memoryview(data), what
        self.timeout, self.wake_fd, self.halting = timeout, wake_fd, halting
        self.started = time.monotonic()
        self.out = b""
        self.out_total = 0
        self.err_tail = b""
        self.stderr = _StderrToLog(what)
        self.exited_at: float | None = None
        self.ended = "exited"  # exited | output_held | timed_out | stopped
        self.rc: int | None = None
        self.sel = selectors.DefaultSelector()
        self._chunks: list[bytes] = []
        try:
            self.pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def collect(self) -> None:
        """Feed stdin and read stdout/stderr until the run is over, one way or another."""
        proc, sel = self.proc, self.sel
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            sel.register(stream.fileno(), selectors.EVENT_READ, stream)
        if self.data:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, proc.stdin)
        else:
            proc.stdin.close()
        sel.register(self.wake_fd, selectors.EVENT_READ, None)
        if self.pidfd is not None:
            sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        reading = 2
        while True:
            if self.halting.is_set():
                self.ended = "stopped"
                return
            if self.exited_at is None and self._has_exited():
                self.exited_at = time.monotonic()
                if self.pidfd is not None:
                    sel.unregister(self.pidfd)
            if self.exited_at is not None and reading == 0:
                return
            now = time.monotonic()
            deadline = self.started + self.timeout
            if self.exited_at is not None:
                deadline = min(deadline, self.exited_at + OUTPUT_GRACE)
            if now >= deadline:
                self.ended = "timed_out" if self.exited_at is None else "output_held"
                return
            wait = min(deadline - now, POLL_CHUNK)  # a long timeout: several waits
            if self.pidfd is None and self.exited_at is None:
                wait = min(wait, POLL_EXIT)
            for key, _ in sel.select(wait):
                stream = key.data
                if stream is proc.stdin:
                    self._feed()
                elif stream is proc.stdout or stream is proc.stderr:
                    if not self._read(stream):
                        sel.unregister(key.fd)
                        reading -= 1

    def _has_exited(self) -> bool:
        """Whether the handler has exited, without reaping it."""
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _feed(self) -> None:
        stdin = self.proc.stdin
        try:
            n = os.write(stdin.fileno(), self.data[:READ_CHUNK])
        except BlockingIOError:
            return
        except OSError:  # the handler does not read its stdin: fine
            n = len(self.data)
        self.data = self.data[n:]
        if not self.data:
            self.sel.unregister(stdin.fileno())
            stdin.close()

    def _read(self, stream) -> bool:
        """Take what STREAM has; False at its end."""
        try:
            chunk = os.read(stream.fileno(), READ_CHUNK)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        if stream is self.proc.stderr:
            self.stderr.take(chunk)
            self.err_tail = (self.err_tail + chunk)[-STDERR_TAIL:]
            return True
        room = MAX_HANDLER_OUTPUT - self.out_total
        if room > 0:
            self._chunks.append(chunk[:room])
        self.out_total += len(chunk)
        return True

    def end(self) -> None:
        """Kill what is left of the handler's process group, reap the handler, close all."""
        self.out = b"".join(self._chunks)
        pgid = self.proc.pid
        stuck = False
        if self.exited_at is None and not self._has_exited():
            # Timed out or the Pod stops: ask first, then insist.
            try:
                terminate(lambda sig: os.killpg(pgid, sig), self._exits_within,
                          HANDLER_KILL_GRACE)
            except StillThere:
                log(f"handler pid {pgid} survived SIGKILL ({self.what})")
                stuck = True
        if not stuck:
            _signal_group(pgid, signal.SIGKILL)  # whatever it left behind
            self.rc = self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        self.sel.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.stderr.finish()

    def _exits_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self._has_exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_EXIT)
        return True

    def outcome(self) -> Outcome:
        tail = self.err_tail.decode("utf-8", "replace")
        return Outcome(self.out, self.out_total > MAX_HANDLER_OUTPUT, self.rc, self.ended,
                       int((time.monotonic() - self.started) * 1000), tail, self.problems())

    def problems(self) -> list[tuple[str, str]]:
        what, rc, out = self.what, self.rc, []
        if self.ended == "stopped":
            return out  # the Pod is stopping: nobody is left to tell
        if self.ended == "timed_out":
            out.append(("error", f"handler timed out after {self.timeout:g}s and was killed "
                                 f"({what})"))
        elif rc is not None and rc != 0:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            out.append(("error", f"handler {how} ({what})"))
        if self.ended == "output_held":
            out.append(("warn", f"handler exited, but its output stayed open (a background "
                                f"process?); it was read for {OUTPUT_GRACE:g}s more and the "
                                f"handler's process group was killed ({what})"))
        if self.out_total > MAX_HANDLER_OUTPUT:
            out.append(("warn", f"handler output over {MAX_HANDLER_OUTPUT} bytes was "
                                 f"truncated ({what})"))
        return out


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in it


class _StderrToLog:
    """A run's stderr into the Pod's log: the first and the last ``STDERR_KEEP / 2``
    bytes, and a note of how much was dropped between them."""

    def __init__(self, what: str):
        self.what = what
        self.head_left = STDERR_KEEP // 2
        self.tail = bytearray()
        self.total = 0
        self.head_ended_line = True

    def take(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.head_left > 0:
            head, chunk = chunk[:self.head_left], chunk[self.head_left:]
            self.head_left -= len(head)
            self.head_ended_line = head.endswith(b"\n")
            write_raw(head)
        if chunk:
            self.tail += chunk
            if len(self.tail) > STDERR_KEEP // 2:
                del self.tail[:len(self.tail) - STDERR_KEEP // 2]

    def finish(self) -> None:
        dropped = self.total - (STDERR_KEEP // 2 - self.head_left) - len(self.tail)
        if dropped > 0:
            if not self.head_ended_line:
                write_raw(b"\n")
            log(f"handler stderr ({self.what}): {dropped} bytes dropped here (it wrote "
                f"{self.total}; at most {STDERR_KEEP} bytes of a run are kept: its first "
                "and its last)")
        if self.tail:
            write_raw(bytes(self.tail))
