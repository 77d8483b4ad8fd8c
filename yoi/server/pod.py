"""One Pod process: start-up, shut-down, commits, the snapshot and alerts.

``Pod`` ties the parts together and owns the in-memory state, all of it on
the loop thread: the recent entries and the snapshot built from them, the
status, the alerts replayed to new clients and the notifications still
being committed (by id). Commits go through the session writer
(``yoi.session``), which appends and fsyncs in groups and reports each
commit back through the loop; only then is the entry broadcast, so nothing
is broadcast before it is durable, and broadcasts follow commit order.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import stat
import time
from collections import deque
from pathlib import Path

from yoi import offline, peers, protocol, store, timeouts
from yoi.errors import Failed, YoiError
from yoi.metadata import REACH, parent_of
from yoi.server import consent, methods
from yoi.server.children import ChildWatcher, tell
from yoi.server.connection import Client, Hub, flush_then_close
from yoi.server.drain import QUEUE_POLL, Drainer
from yoi.server.log import log, rotate_by_size
from yoi.server.loop import Loop, Trimmer, report
from yoi.server.operations import Invalid, Operations
from yoi.server.worker import HandlerWorker
from yoi.session import Entry, Recent, event_of, parse_entry
from yoi.session.writer import Committed, SessionLog, Uncertain
from yoi.state import State, make_private_dir, private_dir_problem, socket_dir_chain
from yoi.txn import RecordCache

MAX_ALERTS = 100               # alerts replayed to a new client
FLUSH_AT_EXIT = 2.0            # seconds given to clients to read the final events


class Pod:
    def __init__(self, state: State, name: str, exec_cmd: str | None = None):
        self.state = state
        self.name = name
        self.exec_override = exec_cmd
        self.exec_cmd: str | None = None
        self.cwd: str | None = None
        self.handler_timeout = timeouts.HANDLER
        self.greeting: dict = {}
        self.status = "idle"
        self.running = 0               # accepted runs/notifications not yet handled
        self.alerts: deque[bytes] = deque(maxlen=MAX_ALERTS)
        self._alerts_blob: bytes | None = None
        self.recent = Recent()
        self.log_end = 0               # session offset covered by ``recent``
        self.snap: bytes | None = None
        self._landing: deque = deque()  # commit outcomes from the writer, for the loop
        self._land_soon = False
        self.pending_ids: dict[str, list[tuple[Client, bool]]] = {}  # id -> (client, compact)
        self.offered: set[str] = set()   # peer request ids offered, their handler run ahead
        self._record = RecordCache(state).read  # the loop thread's records, re-read on change
        self._refusals: dict[str, str | None] = {}  # sender -> peer_refusal, this chunk
        self._refusals_tick: tuple[int, int] | None = None
        self.socket_path: Path | None = None
        self.loop = Loop()
        self.loop.on_error = self.internal_error
        self.trimmer = Trimmer(self.loop)
        self.session: SessionLog | None = None
        self.hub: Hub | None = None
        self.ops: Operations | None = None
        self.worker = HandlerWorker(self)
        self.drainer = Drainer(self)
        self.children = ChildWatcher(self)
        self.parent: str | None = None  # this Pod's parent, if it is a spawned child
        self.task_id: str | None = None  # the id of the task it was spawned with
        self.run_seq: int | None = None  # a child's pod_started entry of this run
        self.worker.on_handled = self.drainer.handled

    # -- start-up and shut-down ------------------------------------------------
    def serve(self, ready=None) -> int:
        """Serve until shutdown; READY(socket_path) is called once clients can connect."""
        doc = store.read(self.state, self.name)  # NotFound before anything else
        runtime_fd = store.hold_runtime_lock(self.state, self.name)
        try:
            rotate_by_size(self.state.pod_log_path(self.name))
            offline.check_file(self.state.queue_path(self.name))  # like the index's check
            self._configure(doc)
            raise_fd_limit()
            self.session = SessionLog(self.state.session_path(self.name),
                                      self.state.session_index_path(self.name),
                                      on_problem=self._alert_soon)
            problems = self.session.open()
            try:
                self.recent = self.session.recent
                self.log_end = self.session.size
                for problem in problems:
                    self.alert("warn", problem)
                if self.parent is not None:
                    self._mark_run("pod_started", {"pid": os.getpid(), "parent": self.parent})
                self._serve_socket(ready)
            finally:
                self.session.close()
            log(f"Pod {self.name} stopped ({self.loop.stop_reason})")
        finally:
            self.loop.close()
            os.close(runtime_fd)  # releases the runtime lock: the last thing we do
        return 0

    def _configure(self, doc: dict) -> None:
        runtime = doc.get("runtime") or {}
        self.exec_cmd = self.exec_override or runtime.get("exec") or None
        self.cwd = runtime.get("cwd") or None
        self.handler_timeout = float(runtime.get("handler_timeout") or timeouts.HANDLER)
        self.parent = parent_of(doc)
        self.task_id = doc.get("task_id") if self.parent is not None else None
        # Both generations of the original read the greeting: "worker_name" is
        # the later one's name for "pod_name".
        self.greeting = {
            "pod_name": self.name, "worker_name": self.name, "cwd": self.cwd or os.getcwd(),
            "provider": "exec" if self.exec_cmd else "none", "model": self.exec_cmd or "",
            "scope_summary": "", "tools": [], "context_window": 0, "context_tokens": 0,
        }

    def _serve_socket(self, ready) -> None:
        self.socket_path = self.state.default_socket_path(self.name)
        listener = bind(self.socket_path)
        try:
            self._record_runtime(pid=os.getpid())
            listener.listen(512)
            self.hub = Hub(self.loop, listener, self._on_line, self._prelude)
            self.ops = Operations(self.loop, self.hub, self.internal_error)
            self.loop.install_signals()
            self.worker.start()
            self.ops.start()
            self.drainer.start()
            self.children.start()
            consent.offer_pending(self)

            def open_up(drained: dict) -> None:
                # Clients wait in the listen backlog until the queue is drained:
                # what was queued is committed before anything sent live.
                if self.loop.stopping:
                    return  # stopped meanwhile: accept nothing
                self.hub.start_accepting()
                log(f"Pod {self.name} serving on {self.socket_path} (pid {os.getpid()})"
                    + (f"; delivered {drained['committed']} queued message(s)"
                       if drained["committed"] else ""))
                if ready is not None:
                    ready(self.socket_path)
                self.loop.call_later(QUEUE_POLL, self.drainer.poll)

            self.drainer.request(open_up)
            self.loop.run()
            self._shutdown()
        finally:
            listener.close()
            self._remove_socket()
            try:
                self._record_runtime(pid=None)
            except YoiError as e:
                log(f"could not clear the pid in the metadata: {e.message}")

    def _shutdown(self) -> None:
        self.hub.stop()                  # 1. accept and read nothing more
        self.drainer.stop()              #    and start no drain pass
        self.worker.stop()               # 2. end the handler run in progress
        self.children.stop()             #    and the watching of children
        if self.parent is not None:      #    (a child: the end of this run, in its log)
            self._mark_run("pod_stopped", {"run": self.run_seq})
        self.session.close()             # 3. finish the commits in progress ...
        self.loop.run_calls()            #    ... and deliver their broadcasts
        self.hub.broadcast(protocol.event("shutdown"))   # 4. tell everyone,
        self._remove_socket()            #    remove the socket, let clients read, close
        flush_then_close(self.hub, self.loop, FLUSH_AT_EXIT)
        self.ops.stop()
        if self.parent is not None:      # 5. a child tells its parent, if it is live
            tell(self.state, self.name, self.parent)

    def _mark_run(self, kind: str, fields: dict) -> None:
        """Commit a child's ``pod_started``/``pod_stopped`` entry, and wait for it."""
        entry = Entry(kind, fields)
        try:
            res = self.session.append(entry)
        except OSError as e:
            self.alert("error", f"could not commit {kind} to the session log: "
                                f"{e.strerror or e}")
            return
        if kind == "pod_started":
            self.run_seq = res.seq
        self.recent.append(entry.line(res.seq)[:-1], kind)
        self.log_end = max(self.log_end, res.end)
        self.snap = None

    def _record_runtime(self, pid: int | None) -> None:
        def change(doc):
            runtime = doc.setdefault("runtime", {})
            runtime["socket_path"] = str(self.socket_path)
            if pid is None:
                runtime.pop("pid", None)
            else:
                runtime["pid"] = pid
                if self.exec_override:
                    runtime["exec"] = self.exec_override
            return doc

        store.update(self.state, self.name, change)

    def _remove_socket(self) -> None:
        if self.socket_path is None:
            return
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log(f"could not remove {self.socket_path}: {e.strerror}")

    # -- what clients get ---------------------------------------------------------
    def _on_line(self, c: Client, line: bytes) -> None:
        methods.handle_line(self, c, line)

    def _prelude(self) -> tuple[bytes, bytes]:
        if self._alerts_blob is None:
            self._alerts_blob = b"".join(self.alerts)
        return self._alerts_blob, self.snapshot()

    def snapshot(self) -> bytes:
        """The ``snapshot`` event, rebuilt only when an entry or the status changed.

        Entries are the most recent committed lines (see ``session.Recent``:
        of the last ``protocol.SNAPSHOT_ENTRIES``, those of kinds the original
        knows, within ``protocol.SNAPSHOT_BYTES``), spliced in as they are;
        ``entries`` comes last so that a reader who wants only the status can
        stop early. ``yoi`` *(ours)* comes first: what this Pod supports
        (``protocol.announcement``), read by clients from the line's prefix.
        ``session_offset`` *(ours)* is the size of the log the entries reach
        up to (``yoi pod log --follow`` uses it).
        """
        if self.snap is None:
            head = json.dumps({"yoi": protocol.announcement(), "greeting": self.greeting,
                               "status": self.status, "session_offset": self.log_end},
                              ensure_ascii=False, separators=(",", ":"))
            self.snap = b"".join([b'{"event":"snapshot","data":', head[:-1].encode(),
                                  b',"entries":[', self.recent.joined(b","), b"]}}\n"])
        return self.snap

    def busy(self, delta: int) -> None:
        """Count work in progress up or down; broadcast the status when it flips."""
        self.running += delta
        status = "running" if self.running > 0 else "idle"
        if status != self.status:
            self.status = status
            self.snap = None
            self.hub.broadcast(protocol.event("status", {"status": status}))

    def _alert_soon(self, message: str) -> None:
        """An error alert from another thread."""
        self.loop.call_soon(self.alert, "error", message)

    def alert(self, level: str, message: str) -> None:
        """Record (for replay to later clients) and broadcast an alert. Loop thread."""
        log(f"alert ({level}): {message}")
        line = protocol.event("alert", {"level": level, "source": protocol.ALERT_SOURCE,
                                        "message": message,
                                        "timestamp_ms": int(time.time() * 1000)})
        self.alerts.append(line)
        self._alerts_blob = None
        if self.hub is not None:
            self.hub.broadcast(line)

    def internal_error(self, what: str, exc: BaseException) -> None:
        """An unexpected exception while serving (loop thread): logged with its
        traceback and raised as an alert; the Pod goes on."""
        report(what, exc)
        detail = f"{type(exc).__name__}: {exc}"
        if len(detail) > 300:
            detail = detail[:300] + "..."
        self.alert("error", f"internal error in {what}: {detail} (traceback in the Pod's log)")

    # -- commits ------------------------------------------------------------------
    def commit(self, c: Client | None, entry: Entry, after=None, compact: bool = False) -> None:
        """Append ENTRY durably, then (on the loop) broadcast it and run AFTER(committed, err).

        An entry whose id was committed before is not committed again (see
        ``yoi.session.writer``) nor broadcast: C alone is acknowledged again.
        COMPACT: C asked for a compact acknowledgement (``protocol.ack_event``),
        which it gets instead of the broadcast, after the same fsync.
        """
        if c is not None:
            self.hub.owe(c, entry.size)

        def done(res, err):
            self._landed(c, entry, res, err, after, compact)

        try:
            self.session.submit(entry, done)
        except OSError as e:  # the log takes nothing more; an id it holds is still acknowledged
            try:
                res = self.session.lookup(entry.key) if entry.key is not None else None
            except Exception:  # (nor can its index be read: the failure stands)
                res = None
            self.committed(c, entry, res, None if res is not None else e, after, compact)

    def _landed(self, *commit) -> None:
        """A commit's outcome (writer thread): queued, and the loop woken once for
        all that land together (a group commit of many entries)."""
        self._landing.append(commit)
        if not self._land_soon:
            self._land_soon = True
            self.loop.call_soon(self._land)

    def _land(self) -> None:
        """Hand every commit outcome queued so far to ``committed``, in commit order,
        with the events they cause written to each client at once."""
        self._land_soon = False  # before draining: what lands later wakes the loop again
        landing = self._landing
        self.hub.cork()
        try:
            while landing:
                try:
                    self.committed(*landing.popleft())
                except Exception as e:  # the others still land
                    self.internal_error("a commit", e)
        finally:
            self.hub.uncork()

    def committed(self, c: Client | None, entry: Entry, res: Committed | None,
                  err: OSError | None, after, compact: bool = False) -> None:
        if err is None and res.duplicate:
            if c is not None:
                self.hub.send(c, self.acknowledgement(entry, res, compact))
        elif err is None:
            self.trimmer.count()
            line = entry.line(res.seq)
            self.recent.append(line[:-1], entry.kind)
            self.log_end = max(self.log_end, res.end)
            self.snap = None
            if compact and c is not None:
                self.hub.send(c, self.acknowledgement(entry, res, compact))
                if len(self.hub.clients) > (0 if c.closed else 1):  # anyone else?
                    self.hub.broadcast(event_of(line, entry.kind), skip=c)
            else:
                self.hub.broadcast(event_of(line, entry.kind))
        else:
            self.alert("error", f"could not commit to the session log: {err.strerror or err}")
            if c is not None:
                self.commit_failed(c, err)
        if after is not None:
            after(res, err)
        if c is not None:
            self.hub.paid(c, entry.size)

    def acknowledgement(self, entry: Entry, res: Committed, compact: bool,
                        again: bool = False) -> bytes:
        """What tells a client that ENTRY (with an id) is committed at RES: *(ours)*
        the compact ``ack`` if COMPACT, else the entry's event, as broadcast when it
        was committed. State ``duplicate`` if RES is an earlier entry with its id or
        AGAIN (the client sent it again while it was being committed)."""
        if not res.duplicate:
            if not compact:
                return entry.event(res.seq)
            state = protocol.ACK_DUPLICATE if again else protocol.ACK_COMMITTED
            return protocol.ack_event(entry.msg_id, res.seq, entry.at, state)
        line = self.session.read(res)
        if compact:
            first = parse_entry(line)
            at = first.get("at") if first is not None else None
            if res.seq and isinstance(at, str) and protocol.is_valid_message_id(entry.msg_id):
                return protocol.ack_event(entry.msg_id, res.seq, at, protocol.ACK_DUPLICATE)
        return event_of(line, entry.kind)

    def commit_failed(self, c: Client, err: OSError) -> None:
        """Tell C that its entry was not committed, and why: code ``internal`` (the Pod
        failed; nothing was refused) and *(ours)* ``"committed": false``; when the
        writer failed half-way (``Uncertain``) it may be, and ``committed`` is absent."""
        if isinstance(err, Uncertain):
            self.hub.send(c, protocol.error_event(
                "internal", f"perhaps not committed: {err}; after a restart, a retry with "
                "the same id records it once"))
            return
        self.hub.send(c, protocol.error_event(
            "internal", f"not committed: {err.strerror or err}; nothing was recorded",
            committed=False))

    # -- peers and family --------------------------------------------------------
    def is_peer(self, other: str) -> bool:
        """Is OTHER a peer now? Both records must hold the relation: a one-sided entry
        (a registration interrupted between its two writes, not yet recovered) is
        not a relation, so the receiver's check does not trust its own file alone."""
        return self._relation(other)[0] == "peers"

    def reaches(self, other: str) -> bool:
        """May this Pod and OTHER message each other: peers, parent and child, or
        within a child's scope (``metadata.relation``)?"""
        return self._relation(other)[0] in REACH

    def peer_refusal(self, other: str) -> str | None:
        """Why a message from OTHER is refused (naming a pending request, or the
        scope of a child), or None.

        Loop thread. The records are checked once per chunk of one client's
        input (in one loop iteration): its lines (a pipelining sender's) were
        all written before the chunk was read, so a check made after the read
        holds for each of them, and checking each again would stat both
        records per message. Another client's lines, read later in the same
        iteration, may have been written after a relation was removed: they
        are checked afresh.
        """
        moment = (self.loop.tick, self.hub.batch if self.hub is not None else 0)
        if self._refusals_tick != moment:
            self._refusals.clear()
            self._refusals_tick = moment
        try:
            return self._refusals[other]
        except KeyError:
            pass
        kind, why = self._relation(other)
        if kind in REACH:
            refusal = None
        elif kind == "pending":
            refusal = f"{other!r} is not a peer of {self.name!r} yet: {why}; message refused"
        elif kind == "in_doubt":
            refusal = f"{other!r} is not surely a peer of {self.name!r}: {why}; message refused"
        elif why:
            refusal = f"{other!r} may not message {self.name!r}: {why}; message refused"
        else:
            refusal = f"{other!r} is not a peer of {self.name!r}; message refused"
        self._refusals[other] = refusal
        return refusal

    def _relation(self, other: str) -> tuple[str, str | None]:
        try:
            return peers.relation(self.state, self.name, other, read=self._record)
        except YoiError as e:  # a corrupt or unreadable record: no relation can be shown
            raise Invalid(f"cannot check the peer relation with {other!r}: {e.message}")

    def handle_peer_request(self, worker, job) -> None:
        """A queued peer request's handler run (the handler thread)."""
        consent.handle(self, worker, job)


# -- the socket ---------------------------------------------------------------------

def bind(path: Path) -> socket.socket:
    """Bind a listening socket at PATH, 0600, in a private directory of ours.

    The caller holds the runtime lock, so a socket file already at PATH is a
    leftover of a dead Pod; anything else there is refused, never removed.
    """
    prepare_socket_dir(path.parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not (stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise Failed(f"{path} exists and is not a socket; refusing to remove it")
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(os.fspath(path))
    except OSError as e:
        s.close()
        raise Failed(f"cannot bind {path}: {e.strerror or e}")
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return s


def prepare_socket_dir(path: Path) -> None:
    """Create the socket's directory 0700 and make sure that no other user made it or
    can write into it, nor into the fallback root above a short one.

    The root is checked before anything is created in it: a ``yoi-UID``
    directory someone else created in the shared temp directory is refused,
    never used. Our own socket directory with a wider mode is narrowed.
    """
    for d in socket_dir_chain(path):
        make_private_dir(d)
        st = os.lstat(d)
        if (d == path and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
                and st.st_mode & 0o077):
            os.chmod(d, 0o700)
        problem = private_dir_problem(d)
        if problem:
            raise Failed(f"socket directory {problem}; refusing to use it (another user "
                         "could pose as this Pod)")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
