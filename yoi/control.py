"""Runtime control: start, stop, restore and inspect Pod processes (library, no click).

Whether a Pod runs is decided by its runtime lock (``pods/NAME/runtime.lock``,
flock-held by the live process for its whole life), never by a pid or socket
file alone: those are hints. Whether it is *live* is decided by its socket
answering with a snapshot.

A detached start runs ``python -P -m yoi pod start NAME --foreground`` in a new
session with stdin from /dev/null and stdout/stderr appended to
``pods/NAME/pod.log`` (rotated by size: ``yoi.podlog``), then waits until the
socket answers.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

from yoi import history, metadata, offline, podlog, protocol, store
from yoi.client import Connection, request
from yoi.discovery import probe, probe_result
from yoi.errors import Busy, CorruptMetadata, Failed, Unreachable, YoiError
from yoi.lock import if_free, is_locked, lock_holder_pid
from yoi.metadata import has_labels
from yoi.procs import StillThere, popen_gone, terminate
from yoi.state import State
from yoi.timeouts import DEFAULT

POLL = 0.05
LOG_TAIL_BYTES = 4096


def is_running(state: State, name: str) -> bool:
    return is_locked(state.runtime_lock_path(name)) is True


def holder_pid(path: Path) -> int | None:
    """The pid that holds the flock on PATH, checked against the kernel's lock table.

    The pid written in the file is only a hint; it is returned only if
    ``/proc/locks`` shows that process holding a lock on this very file (or,
    where ``/proc/locks`` cannot be read, if the lock is held at all).
    """
    hint = lock_holder_pid(path)
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        return hint if is_locked(path) else None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    exact, same_inode = set(), set()
    for line in table.splitlines():
        parts = line.split()
        # "N: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE START END"; waiters have "->"
        if len(parts) < 6 or parts[1] != "FLOCK" or not parts[4].isdigit():
            continue
        if parts[5] == dev:
            exact.add(int(parts[4]))
        elif parts[5].rsplit(":", 1)[-1] == str(st.st_ino):
            same_inode.add(int(parts[4]))  # e.g. overlayfs reports another device
    if hint is not None and (hint in exact or (not exact and hint in same_inode)):
        return hint
    return exact.pop() if len(exact) == 1 else None


def probe_status(state: State, name: str, timeout: float) -> dict:
    """NAME's runtime status: running (lock held), live (socket answers), status, pid,
    and how many messages wait in its queue."""
    doc = store.read(state, name)
    running = is_running(state, name)
    path = state.socket_path(name, doc)
    live = probe(path, timeout) if running else probe_result(path, error="not running")
    pid = holder_pid(state.runtime_lock_path(name)) if running else None
    return {"pod_name": name, "running": running, "pid": pid,
            "exec": (doc.get("runtime") or {}).get("exec"), "live": live,
            "queued": offline.depth(state.queue_path(name)),
            "handler": history.handler_summary(state.session_path(name))}


# -- start ---------------------------------------------------------------------

def _already_running(name: str, lock: Path) -> Busy:
    pid = holder_pid(lock)
    return Busy(f"Pod {name!r} is already running" + (f" (pid {pid})" if pid else ""),
                pod_name=name, pid=pid)


def start(state: State, name: str, exec_cmd: str | None = None,
          timeout: float = DEFAULT, doc: dict | None = None) -> dict:
    """Start NAME detached; return once its socket answers.

    Raises NotFound (3), Busy "already running" (6), or Unreachable (5) with
    the tail of the Pod's log when it does not come up within TIMEOUT (the
    child is then stopped, so nothing half-started is left behind). DOC:
    NAME's record, if the caller has just read it.
    """
    import subprocess  # measured: ~4 ms that status/stop/restore of a live Pod skip

    if doc is None:
        store.read(state, name)
    lock = state.runtime_lock_path(name)
    if is_locked(lock):
        raise _already_running(name, lock)
    log_path = state.pod_log_path(name)
    log_fd = podlog.open_for_start(log_path)
    log_start = os.fstat(log_fd).st_size
    # -P: not the current directory first on sys.path, where a `yoi` of
    # someone else's (a checkout, a project's package) would be run instead.
    argv = [sys.executable, "-P", "-m", "yoi", "pod", "start", name, "--foreground",
            "--state-dir", str(state.root), "--lock-timeout", repr(state.lock_timeout)]
    if exec_cmd is not None:
        argv += ["--exec", exec_cmd]
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                 start_new_session=True, close_fds=True)
    finally:
        os.close(log_fd)
    _wait_ready(state, name, child, timeout, log_path, log_start)
    return {"pod_name": name, "started": True, "pid": child.pid,
            "socket_path": str(state.default_socket_path(name)), "log": str(log_path)}


def _wait_ready(state: State, name: str, child, timeout: float, log_path: Path,
                log_start: int) -> None:
    """Wait until CHILD (a starting Pod) answers on its socket, or raise why not."""
    path = state.default_socket_path(name)  # the child inherits our environment
    lock = state.runtime_lock_path(name)
    deadline = time.monotonic() + timeout
    while True:
        code = child.poll()
        if code is not None:
            tail = _log_tail(log_path, log_start)
            if code == Busy.exit_code:  # the child's exit status: it said "busy"
                if is_locked(lock):  # another start won the race
                    raise _already_running(name, lock)
                # busy for another reason (its metadata lock timed out): say what it said
                raise Busy(f"Pod {name!r} could not start" + (f": {tail}" if tail else ""),
                           pod_name=name, log=str(log_path), log_tail=tail)
            raise Unreachable(f"Pod {name!r} exited with status {code} while starting"
                              + (f"; its log says: {tail}" if tail else ""),
                              pod_name=name, log=str(log_path), log_tail=tail)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _stop_child(child)
            tail = _log_tail(log_path, log_start)
            raise Unreachable(f"Pod {name!r} did not answer within {timeout:g}s and was stopped"
                              + (f"; its log says: {tail}" if tail else ""),
                              pod_name=name, log=str(log_path), log_tail=tail)
        if os.path.exists(path) and lock_holder_pid(lock) == child.pid:
            try:
                Connection.open(path, min(remaining, 2.0)).close()
                return
            except YoiError:
                pass
        time.sleep(POLL)


def _log_tail(path: Path, start: int) -> str:
    """The last lines this start wrote to pod.log, on one line (for an error message)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(start, size - LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return ""
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return " | ".join(lines[-8:])


def _stop_child(child) -> None:
    """Stop a child that did not come up: SIGTERM, then SIGKILL."""
    try:
        terminate(child.send_signal, popen_gone(child), grace=3.0)
    except StillThere:
        pass  # reported by the caller's Unreachable; nothing more can be done


# -- stop ----------------------------------------------------------------------

_READ = object()  # a record not read yet


def stop(state: State, name: str, timeout: float = DEFAULT, force: bool = False,
         doc=_READ) -> dict:
    """Ask NAME to shut down and wait until its runtime lock is released.

    Not running: ``{"stopped": False, "message": "not running"}`` (a stale
    socket is cleaned up on the way). Not gone within TIMEOUT: Unreachable (5),
    unless FORCE, which sends SIGTERM and then SIGKILL to the process that
    holds the runtime lock. DOC: NAME's record if read already (None: it does not
    parse).
    """
    result = {"pod_name": name, "stopped": False, "forced": None, "pid": None}
    if doc is _READ:
        try:
            doc = store.read(state, name)
        except CorruptMetadata:
            doc = None
    if doc is None:  # its process can still be stopped: the runtime lock says if it runs
        if not os.path.isdir(state.pod_dir(name)):  # no Pod directory: nothing can run
            return {**result, "message": "not running"}
    lock = state.runtime_lock_path(name)
    if not is_running(state, name):
        result["stale_socket_removed"] = clean_stale(state, name, doc)
        result["message"] = "not running"
        return result
    pid = holder_pid(lock)
    result["pid"] = pid
    deadline = time.monotonic() + timeout
    try:
        request(state.socket_path(name, doc), protocol.method("shutdown"), {"shutdown"},
                timeout=max(0.1, min(timeout, DEFAULT)), what="shutdown")
    except YoiError:
        pass  # closed early, hung or no socket: the lock decides
    if _wait_unlocked(lock, deadline):
        result.update(stopped=True, message="stopped")
        return result
    if not force:
        raise Unreachable(f"Pod {name!r}" + (f" (pid {pid})" if pid else "")
                          + f" did not stop within {timeout:g}s; "
                          f"`yoi pod stop {name} --force` kills it", pod_name=name, pid=pid)
    def send(sig: int) -> None:
        holder = holder_pid(lock)
        if holder is None:
            if not is_locked(lock):
                raise ProcessLookupError  # gone meanwhile: nothing to kill
            raise Failed(f"cannot tell which process holds {lock}; not killing anything",
                         pod_name=name)
        try:
            os.kill(holder, sig)
        except ProcessLookupError:
            pass  # exiting: the lock decides

    def gone(wait: float) -> bool:
        return _wait_unlocked(lock, time.monotonic() + wait)

    try:
        result["forced"] = terminate(send, gone, grace=min(max(timeout, 1.0), 5.0))
    except StillThere:
        raise Failed(f"Pod {name!r} still holds its runtime lock after SIGKILL", pod_name=name)
    result["stale_socket_removed"] = clean_stale(state, name)
    result.update(stopped=True, message=f"stopped ({result['forced']})")
    return result


def stop_labelled(state: State, labels: dict[str, str], timeout: float = DEFAULT,
                  force: bool = False) -> tuple[list[dict], YoiError | None]:
    """Stop every Pod carrying LABELS, one after the other; one that fails does not
    keep the others running. Returns (one result per Pod, the first error)."""
    return _stop_each(state, {p.name: p.doc for p in store.list_all(state)
                              if p.doc is not None and has_labels(p.doc, labels)},
                      timeout, force)


def stop_tree(state: State, name: str, timeout: float = DEFAULT,
              force: bool = False) -> tuple[list[dict], YoiError | None]:
    """Stop NAME's children (the deepest first), then NAME; as ``stop_labelled``."""
    store.read(state, name)  # NotFound before anything is stopped
    return _stop_each(state, {n: _READ for n in store.descendants(state, name) + [name]},
                      timeout, force)


def stop_all(state: State, timeout: float = DEFAULT,
             force: bool = False) -> tuple[list[dict], YoiError | None]:
    """Stop every Pod of the state directory, each one after every Pod its record lists
    as a child, and theirs (so a live parent hears of each child; a child whose own
    record is damaged is still stopped first); as ``stop_labelled``."""
    docs = {p.name: p.doc for p in store.list_all(state)}
    order: list[str] = []
    placed: set[str] = set()
    for root in docs:  # depth first: a Pod is placed once its children are
        if root in placed:
            continue
        placed.add(root)
        stack = [(root, iter(metadata.child_names(docs[root]) if docs[root] else ()))]
        while stack:
            name, children = stack[-1]
            child = next((c for c in children if c in docs and c not in placed), None)
            if child is None:
                stack.pop()
                order.append(name)
                continue
            placed.add(child)
            stack.append((child, iter(metadata.child_names(docs[child]) if docs[child] else ())))
    return _stop_each(state, {name: docs[name] for name in order}, timeout, force)


def _stop_each(state: State, docs: dict, timeout: float,
               force: bool) -> tuple[list[dict], YoiError | None]:
    """Stop each Pod of DOCS (name -> its record as read, or ``_READ``), in order."""
    results, first = [], None
    for name, doc in docs.items():
        try:
            results.append(stop(state, name, timeout=timeout, force=force, doc=doc))
        except YoiError as e:
            first = first or e
            results.append({"pod_name": name, "stopped": False, "forced": None,
                            "pid": None, "message": f"not stopped: {e.message}"})
    return results, first


def _wait_unlocked(lock: Path, deadline: float) -> bool:
    while True:
        if not is_locked(lock):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def clean_stale(state: State, name: str, doc=_READ) -> bool:
    """Remove a leftover socket of a dead Pod and its pid hint, holding its runtime lock
    (DOC: its record if read already, None if it does not parse).

    Returns True if a socket file was removed. Does nothing if the Pod runs.
    """
    with if_free(state.runtime_lock_path(name)) as free:
        if not free:
            return False  # it has just been started: not ours to touch
        removed = False
        path = state.default_socket_path(name)  # only what this state's runtime binds
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):  # never a file that is not ours
                os.unlink(path)
                removed = True
        except FileNotFoundError:
            pass
        if doc is _READ:
            try:
                doc = store.read(state, name)
            except CorruptMetadata:
                doc = None
        if doc is None:
            return removed  # a record that does not parse is doctor's to mend, not ours
        if (doc.get("runtime") or {}).get("pid") is not None:
            def clear(d):
                (d.get("runtime") or {}).pop("pid", None)
                return d
            store.update(state, name, clear)
    return removed


# -- restore -------------------------------------------------------------------

def restore(state: State, name: str, timeout: float = DEFAULT) -> dict:
    """Start NAME unless it is live already (then report that, not an error).

    A Pod that holds its runtime lock but does not answer yet is starting (a
    start racing this one, or one just begun elsewhere): it is waited for, up
    to TIMEOUT, and reported "already live" once it answers. Busy (6) only if
    it still holds the lock without answering when the time is up.
    """
    deadline = time.monotonic() + timeout
    doc = store.read(state, name)
    if is_running(state, name):
        live = _already_live(state, name, state.socket_path(name, doc), min(timeout, DEFAULT))
        if live is not None:
            return live
    while True:
        try:
            res = start(state, name, timeout=max(deadline - time.monotonic(), POLL), doc=doc)
            break
        except Busy as busy:
            if not is_running(state, name):
                raise  # busy for another reason (a metadata lock): not a start to wait for
            live = _wait_live(state, name, deadline)
            if live is not None:
                return live
            if is_running(state, name) or time.monotonic() >= deadline:
                pid = holder_pid(state.runtime_lock_path(name))
                raise Busy(f"Pod {name!r} is running" + (f" (pid {pid})" if pid else "")
                           + f" but did not answer within {timeout:g}s",
                           pod_name=name, pid=pid) from busy
            # the start it was waiting for gave up and released the lock: try again
    res.pop("started", None)
    return {**res, "restored": True, "message": "started"}


def _already_live(state: State, name: str, path: Path, timeout: float) -> dict | None:
    """The "already live" result if NAME answers at PATH within TIMEOUT, else None."""
    live = probe(path, timeout)
    if not live["reachable"]:
        return None
    return {"pod_name": name, "restored": False, "message": "already live",
            "pid": holder_pid(state.runtime_lock_path(name)),
            "socket_path": live["socket_path"]}


def _wait_live(state: State, name: str, deadline: float) -> dict | None:
    """Wait while NAME holds its runtime lock until it answers ("already live") or
    DEADLINE passes; None if it did not answer (or let go of the lock)."""
    while is_running(state, name):
        remaining = deadline - time.monotonic()
        # the socket path it records once it has bound (ours is the default)
        path = state.socket_path(name, store.read(state, name))
        live = _already_live(state, name, path, max(min(remaining, DEFAULT), POLL))
        if live is not None:
            return live
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(POLL, max(deadline - time.monotonic(), 0)))
    return None
