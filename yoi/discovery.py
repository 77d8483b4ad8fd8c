"""Liveness probing of Pods: concurrent, each probe bounded by a short timeout."""

from __future__ import annotations

import os
from pathlib import Path

from yoi.state import State

PROBE_TIMEOUT = 0.5


def socket_path_of(state: State, name: str, doc: dict | None) -> Path:
    hint = ((doc or {}).get("runtime") or {}).get("socket_path")
    return Path(hint) if hint else state.default_socket_path(name)


def probe(path: Path, timeout: float = PROBE_TIMEOUT) -> dict:
    """Connect to PATH: {"socket_path", "reachable", "error"}."""
    import socket  # here: `yoi pod send` imports this module only for socket_path_of
    out = {"socket_path": str(path), "reachable": False, "error": None}
    if not os.path.exists(path):
        out["error"] = "no socket"
        return out
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(path))
        out["reachable"] = True
    except socket.timeout:
        out["error"] = "timed out"
    except OSError as e:
        out["error"] = e.strerror or str(e)
    finally:
        s.close()
    return out


def probe_many(paths: list[Path], timeout: float = PROBE_TIMEOUT) -> list[dict]:
    """Probe every path concurrently: a hung Pod costs one timeout, not one each."""
    results: list[dict | None] = [None] * len(paths)
    pending = []
    for i, p in enumerate(paths):
        if not os.path.exists(p):
            results[i] = {"socket_path": str(p), "reachable": False, "error": "no socket"}
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
