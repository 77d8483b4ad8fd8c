"""The Pod process's own diagnostics: one timestamped line on stderr (pod.log when detached)."""

from __future__ import annotations

import sys
import time


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def log(msg: str) -> None:
    try:
        print(f"{now_iso()} {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # a full disk or a closed stderr: the Pod goes on without its diagnostics
