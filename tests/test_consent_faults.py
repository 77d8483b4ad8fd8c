"""Peer requests and their decisions under injected crashes and I/O errors, and
under random kill -9.

The property: after the failing command and the next recovery, the pair is
wholly before (the request pending, no relation) or wholly after (for an
approval: the relation in both records and no request; for a request: the
request recorded; for a denial: the request gone and the denial recorded),
nothing else in any record changed, and no journal or temp file is left.
Never a request and a relation that disagree.
"""

from __future__ import annotations

import tomllib

import pytest

from peer_worker import (KillLoop, disagreements, leftover_files, pairs_of, recover,
                         relations, requests_of)
from test_peers_faults import (POINTS, RECOVERY_COMMANDS, RECOVERY_POINTS, fault_spec,
                               recover_with, run_cmd)

ALL_PODS = ("alpha", "beta", "gamma", "delta")
REQUESTER, ASKED = "alpha", "beta"


def build(state, op: str) -> dict[str, bytes]:
    """alpha (an unknown key, a peer gamma) asks beta (on ask, a peer delta); for
    approve and deny the request is already pending. Returns every record's bytes."""
    from yoi import peers, store
    for name in ALL_PODS:
        store.create(state, name)
    peers.register(state, "alpha", "gamma")
    peers.register(state, "beta", "delta")
    store.update(state, "alpha", lambda d: {**d, "custom": {"note": "keep me", "n": [1, 2]}})
    store.configure(state, ASKED, accept_peers="ask")
    if op != "register":
        assert peers.register(state, REQUESTER, ASKED)["state"] == "pending"
    return read_all(state)


def read_all(state) -> dict[str, bytes]:
    return {n: state.metadata_path(n).read_bytes() for n in ALL_PODS}


def doc(raw: bytes) -> dict:
    return tomllib.loads(raw.decode())


def expected_new(op: str, old: dict[str, bytes], now: dict[str, bytes]) -> dict[str, dict]:
    """The requester's and the asked Pod's records after OP, built from the old ones
    (the new entries' times and ids taken from what was written)."""
    a, b = doc(old[REQUESTER]), doc(old[ASKED])
    na, nb = doc(now[REQUESTER]), doc(now[ASKED])
    if op == "register":
        b["peer_requests"] = [r for r in nb.get("peer_requests", [])
                              if r["pod_name"] == REQUESTER][:1]
    elif op == "approve":
        a["peers"].append(next((p for p in na["peers"] if p["pod_name"] == ASKED),
                               {"missing": True}))
        b["peers"].append(next((p for p in nb["peers"] if p["pod_name"] == REQUESTER),
                               {"missing": True}))
        b.pop("peer_requests")
    else:
        b.pop("peer_requests")
        b["peer_denials"] = nb.get("peer_denials", [{"missing": True}])
        assert [(d["pod_name"], d.get("by")) for d in b["peer_denials"]] == [
            (REQUESTER, "operator")], b
    return {REQUESTER: a, ASKED: b}


def outcome(state, op: str, old: dict[str, bytes]) -> str:
    """'old' or 'new' for the pair; fails on anything else (a half-done change)."""
    now = read_all(state)
    for name in ALL_PODS:
        if name not in (REQUESTER, ASKED):
            assert now[name] == old[name], f"{name} changed:\n{now[name].decode()}"
    if all(now[n] == old[n] for n in (REQUESTER, ASKED)):
        return "old"
    new = expected_new(op, old, now)
    for name in (REQUESTER, ASKED):
        assert doc(now[name]) == new[name], (
            f"{name} is neither the old nor the new record:\n{now[name].decode()}"
            f"\n--- old ---\n{old[name].decode()}")
    return "new"


OPS = {"register": ["pod", "peer", "register", REQUESTER, ASKED],
       "approve": ["pod", "peer", "approve", ASKED, REQUESTER],
       "deny": ["pod", "peer", "deny", ASKED, REQUESTER]}
# The points a single-record change reaches: the lock, its one atomic write.
SINGLE_WRITE_POINTS = {"after-lock", "atomic-before-replace:{action}:1"}


@pytest.mark.parametrize("how", list(RECOVERY_COMMANDS))
@pytest.mark.parametrize("action", ["crash", "eio"])
@pytest.mark.parametrize("point,second_write,before_commit", POINTS,
                         ids=[p[0].replace(":{action}", "") for p in POINTS])
def test_an_approval_is_all_or_nothing_at_every_fault_point(cli, state, point, second_write,
                                                            before_commit, action, how):
    old = build(state, "approve")
    r = run_cmd(state, OPS["approve"], fault_spec(point, action))
    if action == "crash":
        expect_code, expect = 137, "old" if before_commit else "new"
    else:
        expect_code, expect = (1, "old") if before_commit else (0, "new")
    assert r.exit_code == expect_code, r
    if action == "eio":
        assert leftover_files(state.root) == [], "the failing command cleaned up after itself"
    recover_with(cli, how, REQUESTER, ASKED)
    assert outcome(state, "approve", old) == expect
    assert leftover_files(state.root) == []
    assert disagreements(pairs_of(relations(state.root)), requests_of(state.root)) == []


@pytest.mark.parametrize("action", ["crash", "eio"])
@pytest.mark.parametrize("point", RECOVERY_POINTS,
                         ids=[p.replace(":{action}", "") for p in RECOVERY_POINTS])
def test_an_interrupted_approval_is_rolled_back_by_an_interrupted_recovery_too(
        cli, state, point, action):
    old = build(state, "approve")
    r = run_cmd(state, OPS["approve"], "before-journal-remove:crash")
    assert r.exit_code == 137, r
    r = run_cmd(state, ["pod", "peer", "list", ASKED, "--pending"], fault_spec(point, action))
    assert r.exit_code == (137 if action == "crash" else 1), r
    recover_with(cli, "next-command", REQUESTER, ASKED)
    assert outcome(state, "approve", old) == "old"
    assert [q["pod_name"] for q in cli("pod", "peer", "list", ASKED, "--pending",
                                       "--json").json["requests"]] == [REQUESTER]


@pytest.mark.parametrize("action", ["crash", "eio"])
@pytest.mark.parametrize("point", [p for p, _, _ in POINTS],
                         ids=[p[0].replace(":{action}", "") for p in POINTS])
@pytest.mark.parametrize("op", ["register", "deny"])
def test_a_request_and_a_denial_are_all_or_nothing_at_every_fault_point(cli, state, op, point,
                                                                        action):
    """Both change one record (no journal): only the lock and the one atomic write
    are reached; a fault anywhere else does not fire."""
    old = build(state, op)
    r = run_cmd(state, OPS[op], fault_spec(point, action))
    fired = point in SINGLE_WRITE_POINTS
    if not fired:
        expect_code, expect = 0, "new"
    else:
        expect_code, expect = (137 if action == "crash" else 1), "old"
    assert r.exit_code == expect_code, r
    # The next command on the Pod whose record was being written.
    recover_with(cli, "next-command", ASKED, REQUESTER)
    assert outcome(state, op, old) == expect
    assert leftover_files(state.root) == []


# -- random kill -9 ------------------------------------------------------------------------

PODS = ["p1", "p2", "p3", "p4"]
ROUNDS = 160
SEGMENTS = 4


@pytest.mark.timeout(180)
def test_random_kills_never_leave_a_request_and_a_relation_that_disagree(state):
    """Requests, approvals, denials and removals among Pods on ask, killed at random."""
    from yoi import store
    for name in PODS:
        store.create(state, name, accept_peers="ask")
    loop = KillLoop(state.root, PODS, seed=20261201, mix="consent")
    seen_pairs = seen_requests = 0
    try:
        for _ in range(SEGMENTS):
            for _ in range(ROUNDS // SEGMENTS):
                loop.round(0.005, max_ops=3)
            recover(state.root)
            assert leftover_files(state.root) == []
            pairs = pairs_of(relations(state.root))  # every relation two-sided
            requests = requests_of(state.root)
            assert disagreements(pairs, requests) == []
            assert loop.mismatches(pairs) == []
            loop.settle(pairs)
            seen_pairs += len(pairs)
            seen_requests += sum(map(len, requests.values()))
    finally:
        loop.close()
    assert loop.rounds == ROUNDS
    assert loop.inflight_kills >= ROUNDS // 2, vars(loop)
    # The test means something only if both states were reached.
    assert seen_pairs and seen_requests, (seen_pairs, seen_requests)


def test_an_approval_not_committed_yet_lets_no_message_through(state, run_yoi, started_pod):
    """Both records already show the relation, but the approval's journal is still
    there (the command died just before removing it): the receiving Pod and the
    sender treat the relation as not there yet, and recovery undoes it."""
    from yoi import peers, store
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    peers.register(state, "a", "b")
    started_pod("b", create=False)
    r = run_yoi("pod", "peer", "approve", "b", "a",
                env={"YOI_FAULT": "before-journal-remove:crash"})
    assert r.exit_code == 137, r
    assert list(state.journal_dir.iterdir())  # both records written, journal left
    r = run_yoi("pod", "send", "--from", "a", "b", "sneaked in")
    assert r.exit_code == 4, r
    assert "is not committed" in r.stderr, r
    assert not [e for e in state.session_path("b").read_text().splitlines()
                if "sneaked in" in e]
    r = run_yoi("pod", "peer", "list", "b", "--pending", "--json")  # recovers: rolled back
    assert [q["pod_name"] for q in r.json["requests"]] == ["a"], r
    assert not peers.is_peer(state, "a", "b")
    assert run_yoi("pod", "peer", "approve", "b", "a").exit_code == 0
    assert run_yoi("pod", "send", "--from", "a", "b", "now it is").exit_code == 0


def test_a_queued_send_during_an_approval_not_committed_says_why(state, run_yoi):
    """The same to a Pod that is not running: --queue refuses, naming the unfinished
    change, not advising to introduce Pods whose records already list each other."""
    from yoi import peers, store
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    peers.register(state, "a", "b")
    r = run_yoi("pod", "peer", "approve", "b", "a",
                env={"YOI_FAULT": "before-journal-remove:crash"})
    assert r.exit_code == 137, r
    r = run_yoi("pod", "send", "--queue", "--from", "a", "b", "queued too early")
    assert r.exit_code == 4, r
    assert "a is not surely a peer of b: a change to the records" in r.stderr, r
    assert "peer register" not in r.stderr and "nothing was queued" in r.stderr, r
    assert not state.queue_path("b").exists() or state.queue_path("b").read_bytes() == b""


def test_a_waiter_is_not_told_registered_by_an_approval_that_was_rolled_back(state, run_yoi):
    import subprocess
    import time
    from conftest import yoi_cmd
    from yoi import peers, store
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    waiter = subprocess.Popen(yoi_cmd() + ["pod", "peer", "register", "a", "b", "--wait", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not peers.list_requests(state, "b") and time.monotonic() < deadline:
            time.sleep(0.05)
        r = run_yoi("pod", "peer", "approve", "b", "a",
                    env={"YOI_FAULT": "before-journal-remove:crash"})
        assert r.exit_code == 137, r
        out, err = waiter.communicate(timeout=20)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 5, (out, err)
    assert "registered" not in out
    assert [q["pod_name"] for q in peers.list_requests(state, "b")] == ["a"]
    assert not peers.is_peer(state, "a", "b")
