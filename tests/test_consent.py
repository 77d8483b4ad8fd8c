"""Peer consent in the records: the policy, requests, approve/deny, expiry, --wait,
send while pending, and `yoi doctor` on requests. No live Pod here (see
test_consent_live.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib

import pytest

from peer_worker import leftover_files
from yoi import metadata, peers, store

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def record(state, name: str) -> dict:
    return tomllib.loads(state.metadata_path(name).read_text())


def raw(state, *names) -> dict[str, bytes]:
    return {n: state.metadata_path(n).read_bytes() for n in names}


@pytest.fixture
def asked(state):
    """Pods a (open) and b (ask)."""
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    return state


def past(seconds: float) -> dt.datetime:
    return metadata.utcnow() - dt.timedelta(seconds=seconds)


def age(state, name: str, seconds: float) -> None:
    """Move every request in NAME's record SECONDS into the past, as time would
    (written directly: a write through yoi clears expired requests)."""
    doc = record(state, name)
    for r in doc.get("peer_requests", []):
        r["requested_at"] -= dt.timedelta(seconds=seconds)
        r["expires_at"] -= dt.timedelta(seconds=seconds)
    state.metadata_path(name).write_bytes(metadata.dumps(doc))


# -- the policy -----------------------------------------------------------------------

@pytest.mark.parametrize("old, policy", [(True, "open"), (False, "never")])
def test_old_boolean_records_read_as_a_policy_and_keep_their_form(cli, state, old, policy):
    store.create(state, "a")
    store.create(state, "b")
    text = state.metadata_path("b").read_text().replace('accept_peers = "open"',
                                                        f"accept_peers = {str(old).lower()}")
    state.metadata_path("b").write_text(text)
    assert f"accept_peers: {policy}\n" in cli("pod", "show", "b").stdout
    r = cli("pod", "peer", "register", "a", "b")
    if policy == "open":
        assert (r.exit_code, r.stdout) == (0, "registered a <-> b\n"), r
    else:
        assert (r.exit_code, r.stderr) == (4, "yoi: error: Pod 'b' does not accept peers\n"), r
    # Other changes keep the old form ...
    assert cli("pod", "config", "b", "--exec", "agent").exit_code == 0
    assert record(state, "b")["accept_peers"] is old
    # ... only a policy given is written in the new one.
    r = cli("pod", "config", "b", "--accept-peers", policy, "--json")
    assert r.exit_code == 0, r
    assert r.json["record"]["accept_peers"] == policy
    assert record(state, "b")["accept_peers"] == policy


@pytest.mark.parametrize("args, policy", [
    ([], "open"), (["--accept-peers"], "open"), (["--accept-peers", "ask"], "ask"),
    (["--accept-peers=never"], "never"), (["--no-accept-peers"], "never"),
    (["--no-accept-peers", "--accept-peers", "never"], "never"),
])
def test_create_and_config_set_the_policy(cli, state, args, policy):
    r = cli("pod", "create", "a", *args, "--json")
    assert r.exit_code == 0, r
    assert record(state, "a")["accept_peers"] == policy
    assert cli("pod", "config", "a", "--accept-peers", "ask").exit_code == 0
    r = cli("pod", "config", "a", *(args or ["--accept-peers", "open"]))
    assert r.exit_code == 0, r
    assert f"accept_peers: {policy}\n" in r.stdout, r


@pytest.mark.parametrize("args, message", [
    (["--accept-peers", "maybe"], "Invalid value for '--accept-peers': 'maybe' is not one of "
                                  "'open', 'ask', 'never'"),
    (["--no-accept-peers", "--accept-peers", "ask"],
     "--no-accept-peers and --accept-peers ask contradict each other"),
    (["--peer-request-ttl", "0"], "Invalid value for '--peer-request-ttl': must be a number "
                                  "of seconds above 0 and at most 31536000, not '0'"),
])
def test_bad_policy_options_are_usage_errors_and_write_nothing(cli, state, args, message):
    r = cli("pod", "create", "a", *args)
    assert r.exit_code == 2, r
    assert r.stderr.startswith(f"yoi: error: {message}"), r
    assert not state.pod_dir("a").exists()
    store.create(state, "a")
    before = raw(state, "a")
    assert cli("pod", "config", "a", *args).exit_code == 2
    assert raw(state, "a") == before


def test_peer_request_ttl_is_stored_and_sets_the_expiry(cli, state):
    r = cli("pod", "create", "b", "--accept-peers", "ask", "--peer-request-ttl", "90")
    assert r.exit_code == 0, r
    assert record(state, "b")["peer_request_ttl"] == 90
    assert cli("pod", "config", "b", "--peer-request-ttl", "1.5").exit_code == 0
    assert record(state, "b")["peer_request_ttl"] == 1.5
    assert cli("pod", "config", "b", "--peer-request-ttl", "3600").exit_code == 0
    store.create(state, "a")
    request = peers.register(state, "a", "b")["request"]
    assert request["expires_at"] - request["requested_at"] == dt.timedelta(hours=1)
    store.create(state, "c", accept_peers="ask")
    request = peers.register(state, "a", "c")["request"]
    assert request["expires_at"] - request["requested_at"] == dt.timedelta(hours=24)


def test_a_damaged_request_makes_the_record_corrupt(cli, state):
    store.create(state, "b")
    path = state.metadata_path("b")
    path.write_text(path.read_text() + '\n[[peer_requests]]\npod_name = "a"\nid = "x"\n')
    r = cli("pod", "show", "b")
    assert r.exit_code == 1, r
    assert r.stderr == (f"yoi: error: {path}: peer_requests[0].requested_at must be a "
                        "date-time with a UTC offset\n"), r


# -- ask: a request, its approval or denial ---------------------------------------------

def test_register_with_an_asked_target_records_a_pending_request(cli, asked):
    before = raw(asked, "a")
    r = cli("pod", "peer", "register", "a", "b")
    assert r.exit_code == 0, r
    [request] = record(asked, "b")["peer_requests"]
    rid = request["id"]
    expires = metadata.to_jsonable(request["expires_at"])
    assert r.stdout == (
        f"pending: b accepts peers only when asked; the request from a (id {rid}) is "
        f"waiting, until {expires}\n"
        "b approves with `yoi pod peer approve b a` or denies with `yoi pod peer deny b a`\n")
    assert request["pod_name"] == "a"
    assert request["expires_at"] - request["requested_at"] == dt.timedelta(hours=24)
    assert raw(asked, "a") == before  # the requester's record is not touched
    assert "peers" not in record(asked, "b") or record(asked, "b")["peers"] == []
    assert not peers.is_peer(asked, "a", "b")
    # Again: idempotent, nothing rewritten.
    before = raw(asked, "a", "b")
    r = cli("pod", "peer", "register", "a", "b", "--json")
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "pod_name": "a", "peer": {"pod_name": "b"}, "changed": False,
                      "state": "pending", "offered": False, "decider": "operator",
                      "request": {"pod_name": "a", "id": rid, "expires_at": expires,
                                  "requested_at": metadata.to_jsonable(request["requested_at"])}}
    assert raw(asked, "a", "b") == before
    assert leftover_files(asked.root) == []


def test_operator_approves_both_records_change_and_the_request_is_cleared(cli, asked):
    rid = peers.register(asked, "a", "b")["request"]["id"]
    r = cli("pod", "peer", "approve", "b", "a")
    assert (r.exit_code, r.stdout) == (0, f"approved: registered a <-> b (request {rid})\n"), r
    assert peers.is_peer(asked, "a", "b")
    assert "peer_requests" not in record(asked, "b")
    r = cli("pod", "peer", "approve", "b", "a", "--json")
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "pod_name": "b", "peer": {"pod_name": "a"}, "changed": False,
                      "state": "registered"}
    assert leftover_files(asked.root) == []


def test_operator_denies_the_request_is_cleared_and_the_denial_recorded(cli, asked):
    rid = peers.register(asked, "a", "b")["request"]["id"]
    r = cli("pod", "peer", "deny", "b", "a", "--json")
    assert r.exit_code == 0, r
    assert r.json["state"] == "denied" and r.json["request"]["id"] == rid
    doc = record(asked, "b")
    assert "peer_requests" not in doc
    [denial] = doc["peer_denials"]
    assert (denial["pod_name"], denial["id"], denial["by"]) == ("a", rid, "operator")
    assert not peers.is_peer(asked, "a", "b")
    # a may ask again: a new request; approving it forgets the denial.
    rid2 = peers.register(asked, "a", "b")["request"]["id"]
    assert rid2 != rid
    assert cli("pod", "peer", "approve", "b", "a").exit_code == 0
    assert "peer_denials" not in record(asked, "b")


@pytest.mark.parametrize("command", ["approve", "deny"])
def test_deciding_without_a_pending_request_is_not_found_and_changes_nothing(cli, asked,
                                                                            command):
    before = raw(asked, "a", "b")
    r = cli("pod", "peer", command, "b", "a", "--json")
    assert r.exit_code == 3, r
    assert r.stderr == "yoi: error: no pending peer request from a to b\n"
    assert r.json["error"]["code"] == "not_found"
    r = cli("pod", "peer", command, "b", "ghost")
    assert (r.exit_code, r.stderr) == (3, "yoi: error: no pending peer request from ghost "
                                          "to b\n"), r
    assert cli("pod", "peer", command, "b", "b").exit_code == 4
    assert cli("pod", "peer", command, "b", "a/x").exit_code == 2
    assert raw(asked, "a", "b") == before


def test_list_pending(cli, asked):
    r = cli("pod", "peer", "list", "b", "--pending")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "", "b has no pending peer requests\n"), r
    assert cli("pod", "peer", "list", "b", "--pending", "--json").json == {
        "ok": True, "pod_name": "b", "requests": []}
    store.create(asked, "longer-name")
    ids = [peers.register(asked, n, "b")["request"]["id"] for n in ("a", "longer-name")]
    r = cli("pod", "peer", "list", "b", "--pending")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "FROM         REQUESTED_AT          EXPIRES_AT            ID"
    assert re.fullmatch(rf"a            {STAMP}  {STAMP}  {ids[0]}", lines[1]), lines
    assert re.fullmatch(rf"longer-name  {STAMP}  {STAMP}  {ids[1]}", lines[2]), lines
    items = cli("pod", "peer", "list", "b", "--pending", "--json").json["requests"]
    assert [(i["pod_name"], i["id"]) for i in items] == [("a", ids[0]), ("longer-name", ids[1])]
    assert set(items[0]) == {"pod_name", "id", "requested_at", "expires_at"}
    assert cli("pod", "peer", "list", "nope", "--pending").exit_code == 3


def test_a_mutual_request_registers(cli, state):
    store.create(state, "a", accept_peers="ask")
    store.create(state, "b", accept_peers="ask")
    assert peers.register(state, "b", "a")["state"] == "pending"
    # a asking b back is a's approval of b's request: no second request needed.
    r = cli("pod", "peer", "register", "a", "b", "--json")
    assert (r.exit_code, r.json["state"], r.json["changed"]) == (0, "registered", True), r
    assert peers.is_peer(state, "a", "b")
    assert "peer_requests" not in record(state, "a") and "peer_requests" not in record(state, "b")


def test_an_open_registration_clears_a_request_left_from_ask(cli, asked):
    peers.register(asked, "a", "b")
    assert cli("pod", "config", "b", "--accept-peers", "open").exit_code == 0
    assert cli("pod", "peer", "list", "b", "--pending", "--json").json["requests"] != []
    assert cli("pod", "peer", "register", "a", "b").stdout == "registered a <-> b\n"
    assert "peer_requests" not in record(asked, "b")


def test_never_keeps_pending_requests_for_the_operator(cli, asked):
    peers.register(asked, "a", "b")
    assert cli("pod", "config", "b", "--no-accept-peers").exit_code == 0
    store.create(asked, "c")
    assert cli("pod", "peer", "register", "c", "b").exit_code == 4  # new ones are refused
    assert cli("pod", "peer", "approve", "b", "a").exit_code == 0   # the old one is decided
    assert peers.is_peer(asked, "a", "b")


def test_remove_withdraws_a_pending_request(cli, asked):
    peers.register(asked, "a", "b")
    r = cli("pod", "peer", "remove", "a", "b", "--json")
    assert (r.exit_code, r.json["changed"]) == (0, True), r
    assert "peer_requests" not in record(asked, "b")
    assert cli("pod", "peer", "remove", "a", "b", "--json").json["changed"] is False


def test_a_new_pod_never_inherits_the_request_of_a_removed_pod_of_its_name(cli, asked):
    rid = peers.register(asked, "a", "b", now=past(5))["request"]["id"]
    assert cli("pod", "rm", "a").exit_code == 0
    store.create(asked, "a")  # the same name: another Pod, which never asked
    r = cli("pod", "peer", "approve", "b", "a")
    assert r.exit_code == 3, r
    assert (f"the peer request {rid} to b was made by an earlier Pod named a, since removed"
            in r.stderr), r
    assert not peers.is_peer(asked, "a", "b")
    r = cli("doctor", "--json")
    [p] = r.json["problems"]
    assert (p["code"], p["pod_name"]) == ("peer-request-dangling", "b"), p
    assert "made before this Pod 'a' was created" in p["message"]
    assert cli("doctor", "--fix").exit_code == 0
    assert "peer_requests" not in record(asked, "b")
    # the new a asks for itself: that request is approved
    peers.register(asked, "a", "b")
    assert cli("pod", "peer", "approve", "b", "a").exit_code == 0
    assert peers.is_peer(asked, "a", "b")


# -- expiry -----------------------------------------------------------------------------

def test_an_expired_request_is_absent_to_every_reader_and_cleared_by_the_next_write(cli, asked):
    old = peers.register(asked, "a", "b")["request"]
    age(asked, "b", 86400 + 5)
    assert len(record(asked, "b")["peer_requests"]) == 1  # still on disk ...
    assert cli("pod", "peer", "list", "b", "--pending", "--json").json["requests"] == []
    assert cli("pod", "peer", "approve", "b", "a").exit_code == 3
    assert cli("pod", "peer", "deny", "b", "a").exit_code == 3
    r = cli("pod", "send", "--from", "a", "b", "hi")
    assert r.stderr.startswith("yoi: error: not a peer: a does not list b"), r
    assert "requests:" not in cli("pod", "show", "b").stdout
    # ... until the next write of b's record, whatever it changes.
    assert cli("pod", "config", "b", "--exec", "agent").exit_code == 0
    assert "peer_requests" not in record(asked, "b")
    # Asking again is a new request.
    new = peers.register(asked, "a", "b")
    assert new["changed"] is True and new["request"]["id"] != old["id"]


# -- sending while a request is pending ---------------------------------------------------

@pytest.mark.parametrize("sender, receiver", [("a", "b"), ("b", "a")])
def test_send_is_refused_while_only_a_request_is_pending(cli, asked, sender, receiver):
    rid = peers.register(asked, "a", "b")["request"]["id"]
    r = cli("pod", "send", "--from", sender, receiver, "hi", "--json")
    assert r.exit_code == 4, r
    assert r.stderr == (f"yoi: error: not a peer yet: the peer request from a to b (id {rid}) "
                        "is pending: b approves it with `yoi pod peer approve b a`\n"), r
    assert r.json["error"]["code"] == "refused"


# -- --wait --------------------------------------------------------------------------------

def test_wait_times_out_with_5_and_the_request_stays_pending(cli, asked):
    r = cli("pod", "peer", "register", "a", "b", "--wait", "0.3", "--json")
    assert r.exit_code == 5, r
    rid = r.json["request"]["id"]
    assert r.json["state"] == "pending" and r.json["error"]["code"] == "unreachable"
    assert r.stderr.startswith(f"yoi: error: no decision on the peer request from a to b "
                               f"(id {rid}) within 0.3s; it stays pending until "), r
    assert [q["id"] for q in peers.list_requests(asked, "b")] == [rid]
    r = cli("pod", "peer", "register", "a", "b", "--wait", "0.1")
    assert r.exit_code == 5, r
    assert r.stderr.startswith("pending: b accepts peers only when asked; waiting up to 0.1s "
                               f"for the decision on request {rid}\n"), r


def test_wait_on_an_open_or_never_target_does_not_wait(cli, asked):
    store.create(asked, "c", accept_peers="never")
    r = cli("pod", "peer", "register", "b", "a", "--wait", "100")
    assert (r.exit_code, r.stdout) == (0, "registered b <-> a\n"), r
    assert cli("pod", "peer", "register", "a", "c", "--wait", "100").exit_code == 4


def _register_waiting(state, *extra):
    return subprocess.Popen([sys.executable, "-m", "yoi", "pod", "peer", "register", "a", "b",
                             "--wait", "60", "--json", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "YOI_HOME": str(state.root)})


def _wait_for_request(state, timeout=30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requests = peers.list_requests(state, "b")
        if requests:
            return requests[0]["id"]
        time.sleep(0.02)
    raise AssertionError("no request appeared")


@pytest.mark.parametrize("decision, code, state_word", [("approve", 0, "registered"),
                                                        ("deny", 4, "denied")])
def test_wait_ends_with_the_operators_decision(cli, asked, decision, code, state_word):
    proc = _register_waiting(asked)
    try:
        rid = _wait_for_request(asked)
        assert cli("pod", "peer", decision, "b", "a").exit_code == 0
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == code, (out, err)
    doc = json.loads(out)
    assert doc["state"] == state_word and doc["request"]["id"] == rid
    if code:
        assert err == f"yoi: error: b denied the peer request from a (id {rid})\n"
        assert doc["error"]["code"] == "refused"
    assert peers.is_peer(asked, "a", "b") is (decision == "approve")


def test_wait_reports_an_expiry_with_5(cli, state):
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask", peer_request_ttl=0.5)
    r = cli("pod", "peer", "register", "a", "b", "--wait", "30", "--json")
    assert r.exit_code == 5, r
    assert r.json["state"] == "expired"
    assert r.stderr.endswith(f"(id {r.json['request']['id']}) expired without a decision\n"), r
    assert peers.list_requests(state, "b") == []


def test_wait_reports_a_withdrawn_request_with_1(cli, asked):
    proc = _register_waiting(asked)
    try:
        _wait_for_request(asked)
        assert cli("pod", "peer", "remove", "a", "b").exit_code == 0
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, (out, err)
    assert "was withdrawn without a decision" in err


# -- concurrency: 8 requesters to one asked Pod --------------------------------------------

def test_eight_concurrent_requesters_each_get_one_request_then_approval(state):
    store.create(state, "b", accept_peers="ask")
    names = [f"r{i}" for i in range(8)]
    for n in names:
        store.create(state, n)
    env = {**os.environ, "YOI_HOME": str(state.root)}

    def together(argvs):
        procs = [subprocess.Popen([sys.executable, "-m", "yoi", *argv], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for argv in argvs]
        results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
        assert all(rc == 0 for rc, _, _ in results), results

    together([("pod", "peer", "register", n, "b") for n in names])
    requests = peers.list_requests(state, "b")
    assert sorted(r["pod_name"] for r in requests) == names  # no lost update
    assert len({r["id"] for r in requests}) == 8
    together([("pod", "peer", "approve", "b", n) for n in names])
    assert sorted(metadata.peer_names(record(state, "b"))) == names
    assert all(peers.is_peer(state, n, "b") for n in names)
    assert "peer_requests" not in record(state, "b")
    assert leftover_files(state.root) == []


# -- yoi doctor ----------------------------------------------------------------------------

def test_doctor_reports_and_clears_stale_requests(cli, state):
    for n in ("a", "c", "d", "gone"):
        store.create(state, n)
    store.create(state, "b", accept_peers="ask")
    peers.register(state, "gone", "b")
    peers.register(state, "d", "b")
    peers.deny(state, "b", "d")
    peers.register(state, "c", "b")
    # gone and d are removed (`yoi pod rm` leaves the request and the denial that
    # name them); damage from outside makes c a peer while its request stays.
    store.remove(state, "gone")
    shutil.rmtree(state.pod_dir("d"))
    stale = record(state, "b")["peer_requests"][-1]
    store.update(state, "b", lambda doc: {**doc, "peers": [{"pod_name": "c",
                                                            "registered_at": doc["created_at"]}]})
    store.update(state, "c", lambda doc: {**doc, "peers": [{"pod_name": "b",
                                                            "registered_at": doc["created_at"]}]})
    expired = peers.register(state, "a", "b")["request"]
    doc = record(state, "b")
    doc["peer_requests"][-1]["expires_at"] = expired["expires_at"] = past(10)
    state.metadata_path("b").write_bytes(metadata.dumps(doc))
    r = cli("doctor", "--json")
    assert r.exit_code == 0, r  # stale requests are warnings: harmless, cleared by --fix
    assert r.json["warnings"] == len(r.json["problems"]) > 0
    assert cli("doctor", "--strict").exit_code == 1
    found = sorted((p["code"], p["message"]) for p in r.json["problems"])
    meta = str(state.metadata_path("b"))
    assert found == [
        ("peer-request-dangling", "has a peer request from 'gone', but there is no Pod 'gone'"),
        ("peer-request-dangling", "records a denied peer request from 'd', but there is no "
                                  "Pod 'd'"),
        ("peer-request-expired", f"has a peer request from 'a' (id {expired['id']}) that "
                                 f"expired at {metadata.to_jsonable(expired['expires_at'])}"),
        ("peer-request-stale", f"has a peer request from 'c' (id {stale['id']}) pending, but "
                               "'b' and 'c' are peers already"),
    ], r.json
    assert {p["path"] for p in r.json["problems"]} == {meta}
    r = cli("doctor", "--fix", "--json")
    assert r.exit_code == 0, r
    assert all(p["fixed"] for p in r.json["problems"]), r.json
    doc = record(state, "b")
    assert "peer_requests" not in doc and "peer_denials" not in doc
    assert metadata.peer_names(doc) == ["c"]
    assert cli("doctor").exit_code == 0


def test_doctor_leaves_live_requests_alone(cli, asked):
    peers.register(asked, "a", "b")
    before = raw(asked, "a", "b")
    r = cli("doctor", "--fix")
    assert r.exit_code == 0, r
    assert raw(asked, "a", "b") == before
