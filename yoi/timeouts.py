"""Durations given in seconds: one default, one range, one parser.

Every wait a user can set (``--timeout``, ``--lock-timeout``,
``$YOI_LOCK_TIMEOUT``) is read by ``parse`` and so has the same range,
whether it comes from a flag or from the environment, and whichever process
reads it (a detached Pod gets its lock timeout passed on as a flag).
"""

from __future__ import annotations

import math

from yoi.errors import UsageError

DEFAULT = 10.0             # a lock wait, each step of a socket exchange, a start, a stop
HANDLER = 3600.0           # one handler run, unless the Pod's handler_timeout says otherwise
MAX = 365 * 86400.0        # a year: long enough for any wait, short enough to stay exact
POLL_CHUNK = 3600.0        # the longest single poll()/select() (their ms counters overflow)


def parse(raw: str | float, what: str, zero_ok: bool = False) -> float:
    """RAW as seconds in (0, MAX], or [0, MAX] with ZERO_OK; UsageError naming WHAT.

    Zero is allowed only where it means "do not wait" (a lock timeout), not
    where it would mean "fail at once" (a timeout for a Pod's answer). NaN
    and infinities are refused: a wait on NaN never ends.
    """
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    low_ok = value >= 0 if zero_ok else value > 0
    if not (math.isfinite(value) and low_ok and value <= MAX):
        span = "from 0 to" if zero_ok else "above 0 and at most"
        subject = f"{what} must" if what else "must"
        raise UsageError(f"{subject} be a number of seconds {span} {MAX:.0f}, not {raw!r}")
    return value
