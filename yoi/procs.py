"""Ending a process: SIGTERM, a grace period, then SIGKILL.

The one escalation used for a Pod that will not stop (``yoi pod stop
--force``), a Pod that did not come up (``yoi pod start``) and a handler run
(its whole process group).
"""

from __future__ import annotations

import signal
from typing import Callable

KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed process to be gone


def terminate(send: Callable[[int], None], gone: Callable[[float], bool],
              grace: float) -> str | None:
    """SEND(SIGTERM), wait up to GRACE for GONE(timeout); if still there, SIGKILL.

    SEND raises ProcessLookupError when there is nothing left to signal.
    Returns the name of the last signal sent ("SIGTERM"/"SIGKILL") once
    GONE says so, None if there was nothing to signal; raises
    ``StillThere`` if even SIGKILL did not end it in ``KILL_WAIT`` seconds.
    """
    sent = None
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
        try:
            send(sig)
        except ProcessLookupError:
            return sent
        sent = signal.Signals(sig).name
        if gone(wait):
            return sent
    raise StillThere(sent)


class StillThere(Exception):
    """A process outlived SIGKILL (e.g. stuck in the kernel)."""


def popen_gone(proc) -> Callable[[float], bool]:
    """GONE for a ``subprocess.Popen``: wait for it to exit, at most the timeout."""
    import subprocess  # the caller has it already; `yoi pod stop` does not need it

    def gone(timeout: float) -> bool:
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    return gone
