"""The Pod process: one per Pod, serving PROTOCOL.md on a Unix socket.

Imported only by ``yoi pod start --foreground`` (the detached start runs that
in a child process); nothing else may import it, so ``yoi --version`` and
``yoi pod list`` stay cheap.

Threads and who owns what:

* the **main thread** runs a selector loop and owns every connection, the
  in-memory snapshot (recent entries, greeting, status), the alert replay list
  and the idempotency bookkeeping of notifications still being committed. It
  never blocks on a client: sockets are non-blocking, each client has a bounded
  outbound queue (a client that lets it overflow is disconnected) and a bounded
  inbound buffer (an over-long method line gets ``error`` and the rest of it is
  read and dropped as it streams in). Broadcasts, replayed alerts and the
  snapshot share one bytes object among all clients, so many idle clients
  cost little; clients that do not read keep older snapshots alive, up to
  ``PINNED_LIMIT`` bytes of them.
* the **session writer** (``yoi.session``) appends and fsyncs in groups and
  reports each commit back to the loop, which then broadcasts it: nothing is
  broadcast before it is durable, and broadcasts follow commit order.
* the **handler worker** runs the handler command for each committed ``run`` or
  ``notify``, one at a time, in order, outside every lock (a handler may itself
  run ``yoi pod send``, even to this Pod).
* two **operation threads** run the methods that take metadata locks or probe
  other Pods (``list_pods``, ``restore_pod``, ``register_peer``,
  ``unregister_peer``), so a slow lock or a hung peer never stalls the loop.

Other threads talk to the loop only through ``call_soon`` (a queue plus a
wake-up socket pair).

Handler contract: ``/bin/sh -c CMD`` with the raw ``message`` (for ``run``, the
text of the segments) on stdin, cwd = ``[runtime] cwd`` if set, and the
environment of the Pod plus ``YOI_POD``, ``YOI_STATE_DIR``, ``YOI_FROM`` (the
source Pod, empty for the operator) and ``YOI_MESSAGE_ID`` (empty if none). Its
stdout (at most ``MAX_HANDLER_OUTPUT`` bytes) is committed and broadcast as
``text_done``; its stderr goes to the Pod's own log (``pod.log`` when
detached). A non-zero exit raises an alert; the Pod goes on. Entries are not
re-handled after a restart. The handler command and cwd are read at start-up:
``yoi pod config --exec`` takes effect at the next start.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

from yoi import metadata, protocol
from yoi.errors import Busy, Failed, YoiError
from yoi.names import is_valid_name
from yoi.session import Committed, Recent, SessionLog
from yoi.state import State, make_private_dir

OUTBOUND_LIMIT = 16 << 20      # bytes queued to one client beyond its prelude
PINNED_LIMIT = 128 << 20       # bytes of older snapshots kept for clients not reading them
RECV_CHUNK = 64 << 10
ACCEPT_BATCH = 64
MAX_ALERTS = 100               # alerts replayed to a new client
MAX_HANDLER_OUTPUT = 1 << 20
MAX_PENDING_OPS = 64
OPS_THREADS = 2
FLUSH_AT_EXIT = 2.0            # seconds given to clients to read the final events
HANDLER_KILL_GRACE = 2.0
RUNTIME_LOCK_GRACE = 2.0       # a start waits this long for a momentary lock taker

_PEERCRED = struct.Struct("3i")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def log(msg: str) -> None:
    """The Pod's own diagnostics: stderr (pod.log when detached)."""
    print(f"{now_iso()} {msg}", file=sys.stderr, flush=True)


class Client:
    __slots__ = ("sock", "fd", "inbuf", "discarding", "outq", "queued", "limit", "prelude_left",
                 "snap", "events", "closed", "eof", "hungup", "pending")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.discarding = False
        self.outq: deque = deque()
        self.queued = 0
        self.limit = OUTBOUND_LIMIT
        self.prelude_left = 0
        self.snap: bytes | None = None  # the snapshot it is being sent, until it is sent
        self.events = 0
        self.closed = False
        self.eof = False
        self.hungup = False  # writing to it failed: it gets nothing more, but is still read
        self.pending = 0  # answers still owed (commits, operations)


class Server:
    def __init__(self, state: State, name: str, exec_cmd: str | None = None):
        self.state = state
        self.name = name
        self.exec_override = exec_cmd
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self.calls: deque = deque()
        self.stopping = False
        self.stop_reason = ""
        self.status = "idle"
        self.busy = 0                  # accepted runs/notifications not yet handled
        self.alerts: deque[bytes] = deque(maxlen=MAX_ALERTS)
        self._alerts_blob: bytes | None = None
        self.recent = Recent()
        self.log_end = 0               # session offset covered by ``recent``
        self.snap: bytes | None = None
        # Snapshots still being sent, oldest first: id -> (snapshot, its clients).
        self.pinned: dict[int, tuple[bytes, set[Client]]] = {}
        self.pinned_bytes = 0
        self.pending_ids: dict[str, list[Client]] = {}
        self.jobs: queue.Queue = queue.Queue()
        self.ops: queue.Queue = queue.Queue()
        self.ops_pending = 0
        self.handler_proc: subprocess.Popen | None = None
        self.accept_paused_until = 0.0
        self._meta_cache: dict[str, tuple] = {}  # Pod name -> (stat key, record)
        self.runtime_fd: int | None = None
        self.listener: socket.socket | None = None
        self.socket_path: Path | None = None
        self.session: SessionLog | None = None

    # ======================================================================
    # start-up and shut-down
    # ======================================================================
    def serve(self, ready=None) -> int:
        from yoi import store
        doc = store.read(self.state, self.name)  # NotFound before anything else
        self.runtime_fd = hold_runtime_lock(self.state, self.name)
        try:
            return self._serve(doc, ready)
        finally:
            os.close(self.runtime_fd)  # releases the runtime lock: last thing we do

    def _serve(self, doc: dict, ready) -> int:
        runtime = doc.get("runtime") or {}
        self.exec_cmd = self.exec_override or runtime.get("exec") or None
        self.cwd = runtime.get("cwd") or None
        self.greeting = {
            "pod_name": self.name, "cwd": self.cwd or os.getcwd(),
            "provider": "exec" if self.exec_cmd else "none", "model": self.exec_cmd or "",
            "scope_summary": "", "tools": [], "context_window": 0, "context_tokens": 0,
        }
        raise_fd_limit()
        self.session = SessionLog(self.state.session_path(self.name))
        opened = self.session.open()
        try:
            self.recent = self.session.recent
            self.log_end = self.session.size
            for problem in opened.problems(self.session.path):
                self.alert("warn", problem)
            self.socket_path = self.state.default_socket_path(self.name)
            self.listener = self._bind(self.socket_path)
            try:
                self._record_runtime(pid=os.getpid())
                self._run(ready)
            finally:
                self.listener.close()
                self._remove_socket()
                try:
                    self._record_runtime(pid=None)
                except YoiError as e:
                    log(f"could not clear the pid in the metadata: {e.message}")
        finally:
            self.session.close()
        log(f"Pod {self.name} stopped ({self.stop_reason})")
        return 0

    def _run(self, ready) -> None:
        self.listener.listen(512)
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self._install_signals()
        self._start_threads()
        log(f"Pod {self.name} serving on {self.socket_path} (pid {os.getpid()})")
        if ready is not None:
            ready(self.socket_path)
        self._loop()
        self._shutdown()

    def _bind(self, path: Path) -> socket.socket:
        prepare_socket_dir(path.parent, self.state)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            # We hold the runtime lock, so a socket file here is a leftover.
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

    def _record_runtime(self, pid: int | None) -> None:
        from yoi import store

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

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum, frame):
            self.request_stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _start_threads(self) -> None:
        self.worker = threading.Thread(target=self._work, name="handler", daemon=True)
        self.worker.start()
        for i in range(OPS_THREADS):
            threading.Thread(target=self._operate, name=f"ops-{i}", daemon=True).start()

    def request_stop(self, reason: str) -> None:
        """Thread- and signal-safe: ask the loop to shut down."""
        if not self.stopping:
            self.stop_reason = reason
        self.stopping = True
        self._wake()

    def _shutdown(self) -> None:
        # 1. stop accepting
        if not self.accept_paused_until:
            self.sel.unregister(self.listener)
        self.listener.close()
        for c in list(self.clients.values()):
            self._set_events(c, reading=False)
        # 2. no new handler work; end the one in progress
        self._kill_handler()
        self.jobs.put(None)
        self.worker.join(HANDLER_KILL_GRACE + 5)
        # 3. finish the commits in progress and deliver their broadcasts
        self.session.close()
        self._run_calls()
        # 4. tell everyone, remove the socket, give clients a moment to read, close
        self.broadcast(protocol.event("shutdown"))
        self._remove_socket()
        deadline = time.monotonic() + FLUSH_AT_EXIT
        while any(c.outq for c in self.clients.values()) and time.monotonic() < deadline:
            for key, mask in self.sel.select(max(0.0, deadline - time.monotonic())):
                key.data(mask)
        for c in list(self.clients.values()):
            self._close(c)
        for _ in range(OPS_THREADS):
            self.ops.put(None)

    def _remove_socket(self) -> None:
        if self.socket_path is None:
            return
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log(f"could not remove {self.socket_path}: {e.strerror}")

    # ======================================================================
    # the loop
    # ======================================================================
    def _loop(self) -> None:
        while not self.stopping:
            timeout = None
            if self.accept_paused_until:
                timeout = max(0.0, self.accept_paused_until - time.monotonic())
                if timeout == 0:
                    self.accept_paused_until = 0.0
                    self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
                    timeout = None
            for key, mask in self.sel.select(timeout):
                key.data(mask)
                if self.stopping:
                    break
            self._run_calls()

    def call_soon(self, fn, *args) -> None:
        """Run FN(*ARGS) on the loop thread (callable from any thread)."""
        self.calls.append((fn, args))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, AttributeError, OSError):
            pass  # already awake (buffer full) or not started yet

    def _on_wake(self, mask) -> None:
        self._drain_wake()
        self._run_calls()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_calls(self) -> None:
        while self.calls:
            fn, args = self.calls.popleft()
            try:
                fn(*args)
            except Exception:
                log("internal error in the loop:\n" + traceback.format_exc())

    # -- accepting ------------------------------------------------------------
    def _on_accept(self, mask) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                # Out of descriptors: stop polling the listener for a moment
                # instead of spinning on it.
                log(f"accept failed: {e.strerror or e}")
                self.sel.unregister(self.listener)
                self.accept_paused_until = time.monotonic() + 0.1
                return
            try:
                cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                _, uid, _ = _PEERCRED.unpack(cred)
            except OSError:
                uid = -1
            if uid != os.getuid():
                sock.close()
                continue
            sock.setblocking(False)
            c = Client(sock)
            self.clients[c.fd] = c
            # Shared objects, queued as they are: a client costs no copy of them.
            alerts, snap = self.replayed_alerts(), self.snapshot()
            c.limit = OUTBOUND_LIMIT + len(alerts) + len(snap)
            c.prelude_left = len(alerts) + len(snap)
            self.sel.register(sock, selectors.EVENT_WRITE, lambda m, c=c: self._on_client(c, m))
            c.events = selectors.EVENT_WRITE
            self._pin(c, snap)
            if alerts:
                self.send(c, alerts)
            self.send(c, snap)

    def _pin(self, c: Client, snap: bytes) -> None:
        """Count SNAP as held for C until C has it; drop clients that hold old ones.

        Clients share the current snapshot, but one that does not read keeps
        the snapshot of the moment it connected: with commits in between,
        every such client would keep another copy. Beyond PINNED_LIMIT bytes
        of them, the clients holding the oldest are disconnected.
        """
        c.snap = snap
        held = self.pinned.get(id(snap))
        if held is None:
            held = self.pinned[id(snap)] = (snap, set())
            self.pinned_bytes += len(snap)
        held[1].add(c)
        while self.pinned_bytes > PINNED_LIMIT and len(self.pinned) > 1:
            _, clients = next(iter(self.pinned.values()))
            log(f"{len(clients)} client(s) did not read their snapshot while "
                f"{self.pinned_bytes} bytes of snapshots waited; disconnecting them")
            for old in list(clients):
                self._close(old)

    def _unpin(self, c: Client) -> None:
        snap, c.snap = c.snap, None
        if snap is None:
            return
        _, clients = self.pinned[id(snap)]
        clients.discard(c)
        if not clients:
            del self.pinned[id(snap)]
            self.pinned_bytes -= len(snap)

    def replayed_alerts(self) -> bytes:
        """The alerts a new client gets first, rebuilt only when one was raised."""
        if self._alerts_blob is None:
            self._alerts_blob = b"".join(self.alerts)
        return self._alerts_blob

    def snapshot(self) -> bytes:
        """The ``snapshot`` event, rebuilt only when an entry or the status changed.

        Entries are the most recent committed lines (at most
        ``protocol.SNAPSHOT_ENTRIES`` of them, and ``protocol.SNAPSHOT_BYTES``
        bytes), spliced in as they are; ``entries`` comes last so that a
        reader who wants only the status can stop early. ``session_offset``
        *(ours)* is the size of the log the entries reach up to (``yoi pod
        log --follow`` uses it).
        """
        if self.snap is None:
            head = json.dumps({"greeting": self.greeting, "status": self.status,
                               "session_offset": self.log_end},
                              ensure_ascii=False, separators=(",", ":"))
            self.snap = b"".join([b'{"event":"snapshot","data":', head[:-1].encode(),
                                  b',"entries":[', b",".join(self.recent), b"]}}\n"])
        return self.snap

    # -- per-client I/O -------------------------------------------------------
    def _on_client(self, c: Client, mask) -> None:
        if c.closed:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(c)
        if mask & selectors.EVENT_READ and not c.closed:
            self._read(c)

    def send(self, c: Client, data: bytes) -> None:
        if c.closed or c.hungup:
            return
        if c.queued + len(data) > c.limit:
            log(f"client fd {c.fd} does not read its events; disconnecting it")
            self._close(c)
            return
        c.outq.append(memoryview(data))
        c.queued += len(data)
        if len(c.outq) == 1:
            self._flush(c)

    def broadcast(self, data: bytes) -> None:
        for c in list(self.clients.values()):
            self.send(c, data)

    def _flush(self, c: Client) -> None:
        while c.outq:
            view = c.outq[0]
            try:
                n = c.sock.send(view)
            except BlockingIOError:
                break
            except OSError:
                self._hang_up(c)
                return
            c.queued -= n
            if c.prelude_left > 0:
                c.prelude_left -= n
                if c.prelude_left <= 0:
                    self._unpin(c)
            if n == len(view):
                c.outq.popleft()
            else:
                c.outq[0] = view[n:]
                break
        self._maybe_close(c)
        self._set_events(c)  # (nothing if it was closed)

    def _hang_up(self, c: Client) -> None:
        """Writing to C failed (it closed, or shut down its reading side).

        It gets nothing more, but every complete method line it wrote before
        its EOF is still read and handled: a sender that writes a ``notify``
        and closes at once (``yoi pod send --no-wait``) is not dropped just
        because a broadcast found its socket closed before its line was read.
        """
        c.hungup = True
        self._unpin(c)
        c.outq.clear()
        c.queued = 0
        c.prelude_left = 0
        if c.eof:
            self._close(c)
        else:
            self._set_events(c)

    def _set_events(self, c: Client, reading: bool | None = None) -> None:
        if c.closed:
            return
        if reading is None:
            # Methods are read only once the prelude is on its way (PROTOCOL.md).
            reading = c.prelude_left <= 0 and not c.eof and not self.stopping
        events = (selectors.EVENT_READ if reading else 0) | (
            selectors.EVENT_WRITE if c.outq else 0)
        if events == c.events:
            return
        if events == 0:
            self.sel.unregister(c.sock)
        elif c.events == 0:
            self.sel.register(c.sock, events, lambda m, c=c: self._on_client(c, m))
        else:
            self.sel.modify(c.sock, events, lambda m, c=c: self._on_client(c, m))
        c.events = events

    def _close(self, c: Client) -> None:
        if c.closed:
            return
        c.closed = True
        if c.events:
            self.sel.unregister(c.sock)
        c.events = 0
        self.clients.pop(c.fd, None)
        self._unpin(c)
        c.outq.clear()
        c.inbuf = bytearray()
        try:
            c.sock.close()
        except OSError:
            pass

    def _read(self, c: Client) -> None:
        try:
            data = c.sock.recv(RECV_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # reset: the kernel reports it only once all data was read
        if not data:
            # The client closed its side: answer what it asked, then close.
            c.eof = True
            if c.hungup or (not c.outq and c.pending == 0):
                self._close(c)
            else:
                self._set_events(c)
            return
        self._feed(c, data)

    def _feed(self, c: Client, data: bytes) -> None:
        if c.discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            c.discarding = False
            data = data[nl + 1:]
        buf = c.inbuf
        scan_from = len(buf)
        buf += data
        start = 0
        while not c.closed and not self.stopping:
            nl = buf.find(b"\n", max(start, scan_from))
            if nl < 0:
                break
            if nl - start > protocol.MAX_METHOD_LINE:
                self._over_long(c)
            else:
                line = bytes(buf[start:nl])
                if line.strip():
                    self._handle_line(c, line)
            start = nl + 1
        if c.closed:
            return
        rest = buf[start:] if start else buf
        if len(rest) > protocol.MAX_METHOD_LINE:
            self._over_long(c)
            c.discarding = True
            rest = bytearray()
        c.inbuf = rest

    def _over_long(self, c: Client) -> None:
        self.send(c, protocol.error_event(
            "invalid_request", f"method line over {protocol.MAX_METHOD_LINE} bytes; discarded"))

    # ======================================================================
    # methods
    # ======================================================================
    def _handle_line(self, c: Client, line: bytes) -> None:
        try:
            name, params = protocol.parse_method(line)
        except protocol.ProtocolError as e:
            self.send(c, protocol.error_event("invalid_request", f"bad method line: {e}"))
            return
        method = getattr(self, f"m_{name}", None) if name in protocol.METHODS else None
        if method is None:
            self.send(c, protocol.error_event("invalid_request", f"unknown method {name!r}"))
            return
        try:
            method(c, params)
        except _Invalid as e:
            self.send(c, protocol.error_event("invalid_request", str(e)))
        except Exception:
            log(f"internal error in {name}:\n" + traceback.format_exc())
            self.send(c, protocol.error_event("internal", f"internal error in {name}"))

    def m_shutdown(self, c: Client, params: dict) -> None:
        self.request_stop("shutdown method")

    def m_notify(self, c: Client, params: dict) -> None:
        message = params.get("message")
        if not isinstance(message, str):
            raise _Invalid("notify needs a string 'message'")
        source = params.get("source")
        msg_id = params.get("id")
        if source is not None and not (isinstance(source, str) and is_valid_name(source)):
            raise _Invalid("'source' must be a Pod name")
        if msg_id is not None and not protocol.is_valid_message_id(msg_id):
            raise _Invalid("'id' must be 1-128 characters of [A-Za-z0-9._:-]")
        if source is not None and not self._is_peer(source):
            raise _Invalid(f"{source!r} is not a peer of {self.name!r}; message refused")
        if msg_id is not None:
            original = self.session.committed_line(msg_id)
            if original is not None:
                self.send(c, original)  # a retry: acknowledge again, commit nothing
                return
            waiting = self.pending_ids.get(msg_id)
            if waiting is not None:
                waiting.append(c)
                c.pending += 1
                return
            self.pending_ids[msg_id] = []
        item = {"kind": "notification", "message": message,
                "body": protocol.peer_body(source, message) if source is not None else message}
        if source is not None:
            item["source"] = source
        if msg_id is not None:
            item["id"] = msg_id
        item["at"] = now_iso()
        line = protocol.event("system_item", {"item": item})

        def after(res, err):
            waiting = self.pending_ids.pop(msg_id, []) if msg_id is not None else []
            for w in waiting:
                w.pending -= 1
                if err is None:
                    self.send(w, line)
                else:
                    self._commit_failed(w, err)
                self._maybe_close(w)
            if err is None and self.exec_cmd:
                self._queue_job(("notify", res, source, msg_id))

        self._commit(c, line, after, msg_id)

    def m_run(self, c: Client, params: dict) -> None:
        segments = params.get("input")
        if isinstance(segments, str):
            segments = [{"kind": "text", "content": segments}]
        if not isinstance(segments, list) or not all(
                isinstance(s, dict) and isinstance(s.get("content", ""), str) for s in segments):
            raise _Invalid("run needs 'input': a list of segments "
                           '{"kind":"text","content":"..."}')
        self._busy(+1)  # status running is announced before the user message
        line = protocol.event("user_message", {"segments": segments})

        def after(res, err):
            if err is None:
                self._queue_job(("run", res, None, None))
            self._busy(-1)

        self._commit(c, line, after)

    def m_list_pods(self, c: Client, params: dict) -> None:
        from yoi.discovery import visible
        live = {"socket_path": str(self.socket_path), "reachable": True,
                "status": self.status, "error": None}
        self._offload(c, "pods_listed", lambda: {
            "pods": visible(self.state, self.name, self_live=live)})

    def m_restore_pod(self, c: Client, params: dict) -> None:
        target = self._name_param(params)

        def op():
            from yoi import control
            if target != self.name and not self._is_peer(target):
                raise _Invalid(f"Pod {target!r} is not visible from {self.name!r}")
            if target == self.name:
                return {"result": {"pod_name": target, "restored": False,
                                   "message": "already live", "pid": os.getpid(),
                                   "socket_path": str(self.socket_path)}}
            return {"result": control.restore(self.state, target)}

        self._offload(c, "pod_restored", op)

    def m_register_peer(self, c: Client, params: dict) -> None:
        self._peer_change(c, params, "register", "peer_registered")

    def m_unregister_peer(self, c: Client, params: dict) -> None:
        self._peer_change(c, params, "unregister", "peer_unregistered")

    def _peer_change(self, c: Client, params: dict, action: str, answer: str) -> None:
        """The same locked routine as the CLI, with this Pod as the source."""
        target = self._name_param(params)

        def op():
            from yoi import peers
            res = getattr(peers, action)(self.state, self.name, target)
            return {"result": {"source": res["source"], "peer": res["peer"]}}

        self._offload(c, answer, op)

    @staticmethod
    def _name_param(params: dict) -> str:
        name = params.get("name")
        if not isinstance(name, str) or not is_valid_name(name):
            raise _Invalid("'name' must be a Pod name")
        return name

    def _is_peer(self, other: str) -> bool:
        """Is OTHER a peer now? Both records must hold the relation: a one-sided entry
        (a registration interrupted between its two writes, not yet recovered) is
        not a relation, so the receiver's check does not trust its own file alone."""
        from yoi import peers
        try:
            return peers.is_peer(self.state, self.name, other, read=self._record)
        except YoiError as e:  # a corrupt or unreadable record: no relation can be shown
            raise _Invalid(f"cannot check the peer relation with {other!r}: {e.message}")

    def _record(self, name: str) -> dict | None:
        """NAME's current metadata, re-read only when the file changed (None: no Pod)."""
        from yoi.txn import read_pod_file
        path = self.state.metadata_path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise Failed(f"cannot read {path}: {e.strerror}")
        key = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        cached = self._meta_cache.get(name)
        if cached is None or cached[0] != key:
            cached = (key, read_pod_file(self.state, name).doc)
            self._meta_cache[name] = cached
        return cached[1]

    # -- commits -------------------------------------------------------------
    def _commit(self, c: Client | None, line: bytes, after=None, msg_id=None) -> None:
        """Append LINE durably, then (on the loop) broadcast it and run AFTER(committed, err)."""
        if c is not None:
            c.pending += 1

        def done(res, err):
            self.call_soon(self._committed, c, line, res, err, after)

        try:
            self.session.submit(line, done, msg_id)
        except OSError as e:
            self._committed(c, line, None, e, after)

    def _committed(self, c: Client | None, line: bytes, res: Committed | None,
                   err: OSError | None, after) -> None:
        if err is None:
            self.recent.append(line[:-1])
            self.log_end = max(self.log_end, res.end)
            self.snap = None
            self.broadcast(line)
        else:
            self.alert("error", f"could not commit to the session log: {err.strerror or err}")
            if c is not None:
                self._commit_failed(c, err)
        if after is not None:
            after(res, err)
        if c is not None:
            c.pending -= 1
            self._maybe_close(c)

    def _commit_failed(self, c: Client, err: OSError) -> None:
        self.send(c, protocol.error_event(
            "internal", f"not committed: {err.strerror or err}; nothing was recorded"))

    def _maybe_close(self, c: Client) -> None:
        if c.eof and (c.hungup or (c.pending == 0 and not c.outq)):
            self._close(c)

    # -- status and alerts ---------------------------------------------------
    def _busy(self, delta: int) -> None:
        self.busy += delta
        status = "running" if self.busy > 0 else "idle"
        if status != self.status:
            self.status = status
            self.snap = None
            self.broadcast(protocol.event("status", {"status": status}))

    def alert(self, level: str, message: str) -> None:
        """Record (for replay to later clients) and broadcast an alert. Loop thread."""
        log(f"alert ({level}): {message}")
        line = protocol.event("alert", {"level": level, "source": "pod", "message": message,
                                        "timestamp_ms": int(time.time() * 1000)})
        self.alerts.append(line)
        self._alerts_blob = None
        self.broadcast(line)

    # -- operations on other threads -----------------------------------------
    def _offload(self, c: Client, answer: str, fn) -> None:
        if self.ops_pending >= MAX_PENDING_OPS:
            self.send(c, protocol.error_event("internal", "too many operations in progress"))
            return
        self.ops_pending += 1
        c.pending += 1
        self.ops.put((c, answer, fn))

    def _operate(self) -> None:
        while True:
            task = self.ops.get()
            if task is None:
                return
            c, answer, fn = task
            try:
                line = protocol.event(answer, metadata.to_jsonable(fn()))
            except _Invalid as e:
                line = protocol.error_event("invalid_request", str(e))
            except YoiError as e:
                code = "invalid_request" if e.exit_code in (2, 3, 4) else "internal"
                line = protocol.error_event(code, e.message)
            except Exception:
                log(f"internal error in {answer}:\n" + traceback.format_exc())
                line = protocol.error_event("internal", f"internal error ({answer})")
            self.call_soon(self._answered, c, line)

    def _answered(self, c: Client, line: bytes) -> None:
        self.ops_pending -= 1
        c.pending -= 1
        self.send(c, line)
        self._maybe_close(c)

    # ======================================================================
    # the handler worker
    # ======================================================================
    def _queue_job(self, job) -> None:
        if self.stopping:
            return  # committed, but no handler runs any more (not re-handled later)
        self._busy(+1)
        self.jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.stopping:
                return
            try:
                self._handle(*job)
            except Exception:
                log("internal error in the handler worker:\n" + traceback.format_exc())
            self.call_soon(self._busy, -1)

    def _handle(self, kind: str, entry: Committed, source: str | None,
                msg_id: str | None) -> None:
        if self.exec_cmd:
            out, problem = self._run_handler(self._handler_input(kind, entry), source, msg_id)
            if self.stopping:
                return
            if out:
                self._commit_from_worker(protocol.event(
                    "text_done", {"text": out.decode("utf-8", "replace")}))
            if problem:
                self.call_soon(self.alert, "error", problem)
        if kind == "run" and not self.stopping:
            self._commit_from_worker(protocol.event("run_end", {"result": "finished"}))

    def _handler_input(self, kind: str, entry: Committed) -> str:
        """The text a handler gets, read back from the committed entry.

        Queued jobs hold only where their entry is, not its text: a handler
        that takes its time while messages pour in costs a few bytes per
        waiting message, not up to a mebibyte each.
        """
        data = json.loads(self.session.read(entry))["data"]
        if kind == "notify":
            return data["item"]["message"]
        return "".join(s.get("content", "") for s in data["segments"]
                       if s.get("kind", "text") == "text")

    def _commit_from_worker(self, line: bytes) -> None:
        def done(res, err):
            self.call_soon(self._committed, None, line, res, err, None)

        try:
            self.session.append(line, done)
        except OSError:
            pass  # already reported by _committed

    def _run_handler(self, text: str, source: str | None,
                     msg_id: str | None) -> tuple[bytes, str | None]:
        env = dict(os.environ)
        env.update({"YOI_POD": self.name, "YOI_STATE_DIR": str(self.state.root),
                    "YOI_FROM": source or "", "YOI_MESSAGE_ID": msg_id or ""})
        what = f"message {msg_id}" if msg_id else ("run" if source is None else "message")
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", self.exec_cmd], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, cwd=self.cwd, env=env,
                                    start_new_session=True)
        except OSError as e:
            return b"", f"handler could not start for {what}: {e.strerror or e}"
        self.handler_proc = proc
        if self.stopping:
            self._kill_handler()

        def feed():
            try:
                proc.stdin.write(text.encode("utf-8"))
            except OSError:
                pass  # the handler does not read its stdin: fine
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, name="handler-stdin", daemon=True)
        feeder.start()
        chunks, size, truncated = [], 0, False
        while True:
            chunk = proc.stdout.read1(RECV_CHUNK)
            if not chunk:
                break
            if size < MAX_HANDLER_OUTPUT:
                chunks.append(chunk[:MAX_HANDLER_OUTPUT - size])
                size += len(chunks[-1])
                truncated = truncated or len(chunk) > len(chunks[-1])
            else:
                truncated = True
        proc.stdout.close()
        rc = proc.wait()
        feeder.join()
        self.handler_proc = None
        problem = None
        if rc != 0:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            problem = f"handler {how} ({what})"
        elif truncated:
            problem = f"handler output over {MAX_HANDLER_OUTPUT} bytes was truncated ({what})"
        return b"".join(chunks), problem

    def _kill_handler(self) -> None:
        proc = self.handler_proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, HANDLER_KILL_GRACE), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


class _Invalid(Exception):
    """A request the Pod refuses with ``invalid_request``."""


# -- helpers -------------------------------------------------------------------

def hold_runtime_lock(state: State, name: str, grace: float = RUNTIME_LOCK_GRACE) -> int:
    """Take pods/NAME/runtime.lock for the life of the process, or raise Busy.

    Commands that only look (``yoi pod status``, ``list``, ``stop`` of a
    stopped Pod, ``doctor``) take this lock for an instant to see whether it
    is held; a start that meets one of them tries again for up to GRACE
    seconds instead of reporting a Pod that is not running as running.
    """
    from yoi.lock import lock_holder_pid, try_lock
    path = state.runtime_lock_path(name)
    fd = try_lock(path, grace)
    if fd is None:
        pid = lock_holder_pid(path)
        who = f" (pid {pid})" if pid else ""
        raise Busy(f"Pod {name!r} is already running{who}", pod=name, pid=pid)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def prepare_socket_dir(path: Path, state: State) -> None:
    """Create the socket's directory 0700 and make sure it is ours and private."""
    make_private_dir(path)
    dirs = [path] if path.parent == state.root else [path, path.parent]
    for d in dirs:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise Failed(f"socket directory {d} is not a directory owned by this user")
        if d == path and st.st_mode & 0o077:
            os.chmod(d, 0o700)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def serve(state: State, name: str, exec_cmd: str | None = None, ready=None) -> int:
    """Run Pod NAME in this process until shutdown; returns the exit status (0)."""
    return Server(state, name, exec_cmd).serve(ready)
