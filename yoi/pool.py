"""Reading many Pods' files in worker processes, once there are enough to pay for them.

Parsing a record is CPU work (``tomllib`` is pure Python), and a state
directory can hold 100,000 Pods; commands that read them all (``yoi pod
list``, ``yoi doctor``) split the names into chunks and, at scale, hand the
chunks to forked workers. What a worker returns is pickled back: callers
return small results (a doctor's findings, a listing's few fields), never
whole records, whose dates cost more to pickle than to parse.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, TypeVar

from yoi.parsing import paused_gc

POOL_THRESHOLD = 2000  # items; below this a worker pool costs more than it saves
POOL_CHUNK = 500
MAX_WORKERS = 4

T = TypeVar("T")
R = TypeVar("R")


def map_chunks(fn: Callable[[list[T]], list[R]], items: list[T],
               threshold: int = POOL_THRESHOLD, chunk: int = POOL_CHUNK) -> Iterator[list[R]]:
    """FN over ITEMS in chunks, yielding each chunk's results in order; in worker
    processes when there are at least THRESHOLD items and more than one core.

    FN must be picklable (a module-level function, or a ``functools.partial`` of
    one with picklable arguments), and so must what it returns."""
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    workers = min(MAX_WORKERS, os.cpu_count() or 1)
    if len(items) >= threshold and workers > 1 and hasattr(os, "fork"):
        import multiprocessing  # measured: ~15 ms, paid only at this scale
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_Chunk(fn), chunks)
        return
    for c in chunks:
        yield _Chunk(fn)(c)


class _Chunk:
    """FN on one chunk with the cyclic collector paused (see ``parsing.paused_gc``)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, items):
        with paused_gc():
            return self.fn(items)
