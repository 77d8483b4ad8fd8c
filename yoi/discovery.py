"""Liveness probing and visibility (DESIGN.md "Visibility").

A probe connects to a Pod's socket and drains the connect-time prelude,
keeping the snapshot to read the Pod's status; the whole probe is bounded by
one short timeout, and many probes run concurrently, so a hung Pod costs one
timeout, not one per Pod.

From Pod P's point of view the visible set is P itself (``self``) and P's
peers (``peer``), each reported with ``pod_name``, ``visibility``, ``state``
(``ok``/``missing``/``corrupt``), ``live`` (``socket_path``, ``reachable``,
``status``, ``error``) and ``restore`` (``possible``, ``reason``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from yoi.state import State

PROBE_TIMEOUT = 1.0


def socket_path_of(state: State, name: str, doc: dict | None) -> Path:
    hint = ((doc or {}).get("runtime") or {}).get("socket_path")
    return Path(hint) if hint else state.default_socket_path(name)


def probe(path: Path, timeout: float = PROBE_TIMEOUT) -> dict:
    """Connect to PATH and read its snapshot: {"socket_path", "reachable", "status", "error"}."""
    import socket  # here: `yoi pod send` imports this module only for socket_path_of

    from yoi.client import Connection
    from yoi.errors import YoiError
    out = {"socket_path": str(path), "reachable": False, "status": None, "error": None}
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(path))
    except FileNotFoundError:
        out["error"] = "no socket"
    except ConnectionRefusedError:
        out["error"] = "connection refused"
    except socket.timeout:
        out["error"] = "timed out connecting"
    except OSError as e:
        out["error"] = e.strerror or str(e)
    if out["error"] is not None:
        s.close()
        return out
    conn = Connection(s, os.fspath(path))
    try:
        conn.drain_prelude(max(0.001, deadline - time.monotonic()), keep_snapshot=True)
    except YoiError as e:
        out["error"] = ("timed out waiting for the snapshot" if e.exit_code == 5
                        else e.message)
        return out
    finally:
        conn.close()
    snap = conn.snapshot or {}
    status = snap.get("status")
    if isinstance(status, dict):  # tolerate {"status": "..."} as well as "..."
        status = status.get("status")
    out["reachable"] = True
    out["status"] = status if isinstance(status, str) else None
    return out


def probe_many(paths: list[Path], timeout: float = PROBE_TIMEOUT) -> list[dict]:
    """Probe every path concurrently: a hung Pod costs one timeout, not one each."""
    results: list[dict | None] = [None] * len(paths)
    pending = []
    for i, p in enumerate(paths):
        if not os.path.exists(p):
            results[i] = {"socket_path": str(p), "reachable": False, "status": None,
                          "error": "no socket"}
        else:
            pending.append(i)
    if len(pending) <= 1:
        for i in pending:
            results[i] = probe(paths[i], timeout)
        return results  # type: ignore[return-value]
    import threading

    def work(i):
        results[i] = probe(paths[i], timeout)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in pending]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results  # type: ignore[return-value]


def visible(state: State, name: str, timeout: float = PROBE_TIMEOUT,
            self_live: dict | None = None) -> list[dict]:
    """NAME's visibility set: itself, then its peers (sorted), each probed concurrently.

    SELF_LIVE, if given, is used for NAME instead of probing it (a running Pod
    answering ``list_pods`` describes itself). Raises NotFound for an unknown
    NAME and CorruptMetadata if NAME's own record does not parse.
    """
    from yoi import store
    from yoi.errors import YoiError
    from yoi.lock import is_locked
    from yoi.metadata import peer_names
    from yoi.txn import read_pod_file
    doc = store.read(state, name)
    rows: list[dict] = [{"pod_name": name, "visibility": "self", "state": "ok", "doc": doc}]
    for peer in sorted(set(peer_names(doc)) - {name}):
        row = {"pod_name": peer, "visibility": "peer", "state": "ok", "doc": None, "why": None}
        try:
            pod = read_pod_file(state, peer)
            if pod.exists:
                row["doc"] = pod.doc
            else:
                row["state"] = "missing"
        except YoiError as e:
            row["state"], row["why"] = "corrupt", e.message
        rows.append(row)
    to_probe = [r for r in rows if r["state"] == "ok" and not (
        self_live is not None and r["visibility"] == "self")]
    probes = probe_many([socket_path_of(state, r["pod_name"], r["doc"]) for r in to_probe],
                        timeout)
    for r, live in zip(to_probe, probes):
        r["live"] = live
    out = []
    for r in rows:
        live = r.get("live")
        if r["visibility"] == "self" and self_live is not None:
            live = dict(self_live)
        if live is None:
            live = {"socket_path": None, "reachable": False, "status": None,
                    "error": r["state"]}
        if r["state"] == "missing":
            restore = {"possible": False, "reason": "no such Pod"}
        elif r["state"] == "corrupt":
            restore = {"possible": False, "reason": f"metadata is corrupt: {r['why']}"}
        elif live["reachable"]:
            restore = {"possible": False, "reason": "already live"}
        elif is_locked(state.runtime_lock_path(r["pod_name"])):
            restore = {"possible": False, "reason": "running but not answering"}
        else:
            restore = {"possible": True, "reason": "not running"}
        out.append({"pod_name": r["pod_name"], "visibility": r["visibility"],
                    "state": r["state"], "live": live, "restore": restore})
    return out
