"""Random kill -9 during peer registrations and removals, then one recovery.

A `peer_worker.py serve` process forks a child per round that registers and
removes random pairs and reports each operation on a pipe; the test SIGKILLs
the child at a random moment. Each next child's first operations recover what
the previous one left behind, so recovery itself is also killed at times.
(bench/ runs the same KillLoop for longer.)
"""

from __future__ import annotations

import pytest

from peer_worker import KillLoop, leftover_files, pairs_of, recover, relations

PODS = ["p1", "p2", "p3", "p4", "p5"]
ROUNDS = 320  # in segments; each segment ends with one recovery and a full check
SEGMENTS = 4
MAX_DELAY = 0.005  # seconds a child may run on before it is killed (an operation takes ~3 ms)


@pytest.fixture
def kill_loop(state):
    from yoi import store
    for name in PODS:
        store.create(state, name)
    loop = KillLoop(state.root, PODS, seed=20261127)
    try:
        yield loop
    finally:
        loop.close()


@pytest.mark.timeout(180)
def test_random_kills_leave_every_relation_reciprocal_and_reported_ops_present(state, kill_loop):
    for _ in range(SEGMENTS):
        for _ in range(ROUNDS // SEGMENTS):
            kill_loop.round(MAX_DELAY, max_ops=2)
        recover(state.root)
        assert leftover_files(state.root) == []
        pairs = pairs_of(relations(state.root))  # every file parses, every relation reciprocal
        assert kill_loop.mismatches(pairs) == []
        kill_loop.settle(pairs)
    assert kill_loop.rounds == ROUNDS
    # The test means something only if kills landed inside operations.
    assert kill_loop.inflight_kills >= ROUNDS // 2, vars(kill_loop)
    assert kill_loop.done >= ROUNDS // 2, vars(kill_loop)
