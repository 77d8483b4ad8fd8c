"""Live consent: a running Pod on `ask` is told of each request, logs it, lets its
handler decide (YOI_EVENT=peer_request), and refuses messages while only a request
is pending. The socket's register_peer follows the same policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from rawsock import Raw

from peer_worker import leftover_files
from test_send_pods import wait_until
from yoi import metadata, peers, store
from yoi.client import Refused, notify


def log_entries(state, name) -> list[dict]:
    return [json.loads(line) for line in state.session_path(name).read_text().splitlines()]


def kinds(state, name, *wanted) -> list[dict]:
    return [e for e in log_entries(state, name) if e["kind"] in wanted]


def decider(tmp_path, verdict: str = "echo approve") -> str:
    """A handler that records what it was given for a peer request, then runs VERDICT."""
    seen = tmp_path / "seen"
    return (f'if [ "$YOI_EVENT" = peer_request ]; then '
            f'printf "%s|%s|%s|%s\\n" "$YOI_EVENT" "$YOI_FROM" "$YOI_MESSAGE_ID" "$YOI_POD" '
            f'>> {seen}; cat >> {tmp_path / "stdin"}; {verdict}; fi')


def decisions(state, name) -> list[tuple]:
    return [(e["source"], e["request_id"], e["decision"])
            for e in kinds(state, name, "peer_decision")]


# -- the policy, from the command line and over the socket ---------------------------------

@pytest.mark.parametrize("policy", ["open", "ask", "never"])
def test_cli_register_with_a_live_target_follows_its_policy(run_yoi, state, started_pod,
                                                            policy):
    store.create(state, "a")
    store.create(state, "b", accept_peers=policy)
    started_pod("b")
    r = run_yoi("pod", "peer", "register", "a", "b", "--json")
    if policy == "open":
        assert (r.exit_code, r.json["state"]) == (0, "registered"), r
        assert peers.is_peer(state, "a", "b")
    elif policy == "never":
        assert (r.exit_code, r.stderr) == (4, "yoi: error: Pod 'b' does not accept peers\n"), r
    else:
        assert (r.exit_code, r.json["state"]) == (0, "pending"), r
        # b was told: it logged the request, and without a handler leaves it to the operator.
        assert (r.json["offered"], r.json["decider"]) == (True, "operator"), r
        [entry] = kinds(state, "b", "peer_request")
        assert (entry["source"], entry["request_id"], entry["decider"]) == (
            "a", r.json["request"]["id"], "operator")
        assert not peers.is_peer(state, "a", "b")
    assert leftover_files(state.root) == []


@pytest.mark.parametrize("policy", ["open", "ask", "never"])
def test_socket_register_peer_follows_the_targets_policy(state, started_pod, policy):
    store.create(state, "b", accept_peers=policy)
    pod = started_pod("a")
    with Raw(pod.socket_path) as c:
        c.prelude()
        c.send({"method": "register_peer", "params": {"name": "b"}})
        ev = c.event()
    if policy == "open":
        assert ev == {"event": "peer_registered", "data": {"result": {"source": "a",
                                                                      "peer": "b"}}}
        assert peers.is_peer(state, "a", "b")
        return
    assert ev["event"] == "error" and ev["data"]["code"] == "invalid_request", ev
    if policy == "never":
        assert ev["data"]["message"] == "Pod 'b' does not accept peers"
        assert peers.list_requests(state, "b") == []
    else:
        [request] = peers.list_requests(state, "b")
        assert request["pod_name"] == "a"
        assert ev["data"]["message"] == (
            f"peer request pending: b accepts peers only when asked; the request (id "
            f"{request['id']}) is recorded; b approves with `yoi pod peer approve b a` or "
            "denies with `yoi pod peer deny b a`")
    assert not peers.is_peer(state, "a", "b")


def test_socket_register_peer_to_a_live_asked_pod_is_decided_by_that_pod(state, started_pod,
                                                                         tmp_path):
    store.create(state, "b", accept_peers="ask")
    started_pod("b", exec=decider(tmp_path))
    pod = started_pod("a")
    with Raw(pod.socket_path) as c:
        c.prelude()
        c.send({"method": "register_peer", "params": {"name": "b"}})
        ev = c.event()
        assert ev["event"] == "error" and "b is live and its handler decides" in ev["data"][
            "message"], ev
        wait_until(lambda: peers.is_peer(state, "a", "b"), what="b's handler to approve")
        # Asked again, the socket answers like any registration of existing peers.
        c.send({"method": "register_peer", "params": {"name": "b"}})
        assert c.until("peer_registered")[0]["data"] == {"result": {"source": "a",
                                                                    "peer": "b"}}
    assert (tmp_path / "seen").read_text().split("|")[:2] == ["peer_request", "a"]


# -- the handler decides -------------------------------------------------------------------

def test_handler_approves_and_wait_exits_0(run_yoi, state, started_pod, tmp_path):
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    started_pod("b", exec=decider(tmp_path))
    started_pod("a")
    r = run_yoi("pod", "peer", "register", "a", "b", "--wait", "30", "--json")
    assert r.exit_code == 0, r
    rid = r.json["request"]["id"]
    assert (r.json["state"], r.json["decider"], r.json["offered"]) == (
        "registered", "handler", True)
    assert r.stderr == ""
    assert (tmp_path / "seen").read_text() == f"peer_request|a|{rid}|b\n"
    text = (tmp_path / "stdin").read_text()
    assert text.startswith(f"Pod a asks to become a peer of b (request {rid}, expires ")
    assert text.endswith("Answer with a first line of `approve` or `deny`.\n")
    assert [(e["source"], e["request_id"], e["decider"])
            for e in kinds(state, "b", "peer_request")] == [("a", rid, "handler")]
    # the decision's entry is committed on the Pod's loop, just after the approval
    wait_until(lambda: decisions(state, "b") == [("a", rid, "approved")],
               what="the decision's entry")
    assert peers.is_peer(state, "a", "b") and peers.list_requests(state, "b") == []
    r = run_yoi("pod", "send", "--from", "a", "b", "hello")
    assert r.exit_code == 0, r
    r = run_yoi("pod", "log", "b")
    lines = r.stdout.splitlines()
    assert lines[0].endswith(f"peer request from a [{rid}], expires "
                             f"{kinds(state, 'b', 'peer_request')[0]['expires_at']}; "
                             "decided by the handler")
    assert lines[1].endswith(f"peer decision on a [{rid}] by the handler: approved")


def test_handler_denies_and_wait_exits_4(run_yoi, state, started_pod, tmp_path):
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    started_pod("b", exec=decider(tmp_path, "echo '  DENY  '; echo because"))
    r = run_yoi("pod", "peer", "register", "a", "b", "--wait", "30")
    assert r.exit_code == 4, r
    rid = r.stderr.split("(id ")[1].split(")")[0]
    assert r.stderr.splitlines()[-1] == f"yoi: error: b denied the peer request from a (id {rid})"
    [denial] = store.read(state, "b")["peer_denials"]
    assert (denial["pod_name"], denial["id"], denial["by"]) == ("a", rid, "handler")
    assert decisions(state, "b") == [("a", rid, "denied")]
    assert not peers.is_peer(state, "a", "b")
    r = run_yoi("pod", "send", "--from", "a", "b", "hello")
    assert (r.exit_code, r.stderr) == (4, "yoi: error: not a peer: a does not list b as a peer "
                                          "(introduce them with `yoi pod peer register a b`)\n")


@pytest.mark.parametrize("verdict, reason", [
    ("echo maybe", "the handler's first output line is not `approve` or `deny`"),
    ("true", "the handler printed nothing"),
    ("echo approve; exit 3", "handler exited with status 3"),
])
def test_no_verdict_leaves_the_request_for_the_operator(run_yoi, state, started_pod, tmp_path,
                                                        verdict, reason):
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    pod = started_pod("b", exec=decider(tmp_path, verdict))
    r = run_yoi("pod", "peer", "register", "a", "b", "--json")
    assert r.exit_code == 0, r
    rid = r.json["request"]["id"]
    [entry] = wait_until(lambda: kinds(state, "b", "peer_decision"), what="the decision entry")
    assert (entry["decision"], entry["by"]) == ("none", "handler")
    assert entry["reason"].startswith(reason), entry
    assert [q["id"] for q in peers.list_requests(state, "b")] == [rid]  # still pending
    with Raw(pod.socket_path) as c:
        alerts, _ = c.prelude()
    assert any(f"peer request from a (id {rid}) not decided by the handler: {reason}"
               in a["data"]["message"] for a in alerts), alerts
    assert run_yoi("pod", "peer", "approve", "b", "a").exit_code == 0
    assert peers.is_peer(state, "a", "b")


def test_a_pod_without_a_handler_logs_the_request_once_and_leaves_it(run_yoi, state,
                                                                     started_pod):
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    started_pod("b")
    started_pod("a")
    r = run_yoi("pod", "peer", "register", "a", "b")
    assert r.exit_code == 0, r
    assert r.stdout.splitlines()[1] == ("b approves with `yoi pod peer approve b a` or denies "
                                        "with `yoi pod peer deny b a`")
    assert run_yoi("pod", "peer", "register", "a", "b").exit_code == 0  # told again
    assert len(kinds(state, "b", "peer_request")) == 1  # logged once
    assert decisions(state, "b") == []
    # While only the request is pending neither side takes the other's messages ...
    assert run_yoi("pod", "send", "--from", "a", "b", "hi").exit_code == 4
    assert run_yoi("pod", "send", "--from", "b", "a", "hi").exit_code == 4
    # ... and once the operator approves (b is live) both do, at once.
    assert run_yoi("pod", "peer", "approve", "b", "a").exit_code == 0
    assert run_yoi("pod", "send", "--from", "a", "b", "hi").exit_code == 0
    assert run_yoi("pod", "send", "--from", "b", "a", "hi").exit_code == 0


@pytest.mark.parametrize("receiver, source", [("b", "a"), ("a", "b")])
def test_the_receiver_refuses_a_message_while_only_a_request_is_pending(state, started_pod,
                                                                       receiver, source):
    """The sender's check is not enough: a live receiver checks for itself, and names
    the pending request (here a sender that lists the receiver one-sidedly)."""
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    rid = peers.register(state, "a", "b")["request"]["id"]
    store.update(state, source, lambda d: d | {"peers": [{"pod_name": receiver}]})
    pod = started_pod(receiver)
    before = state.session_path(receiver).read_bytes()
    with pytest.raises(Refused) as e:
        notify(pod.socket_path, "let me in", "m-1", source=source)
    assert e.value.message == (
        f"refused by the Pod: {source!r} is not a peer of {receiver!r} yet: the peer request "
        f"from a to b (id {rid}) is pending: b approves it with `yoi pod peer approve b a`; "
        "message refused (invalid_request)")
    assert state.session_path(receiver).read_bytes() == before


def test_a_restarted_pod_offers_its_pending_requests_again(run_yoi, state, started_pod,
                                                           tmp_path):
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    started_pod("b", exec=decider(tmp_path, "echo later"))
    rid = run_yoi("pod", "peer", "register", "a", "b", "--json").json["request"]["id"]
    wait_until(lambda: decisions(state, "b"), what="the first decision")
    assert run_yoi("pod", "stop", "b").exit_code == 0
    assert run_yoi("pod", "config", "b", "--exec", decider(tmp_path)).exit_code == 0
    started_pod("b", create=False)
    wait_until(lambda: peers.is_peer(state, "a", "b"), what="the approval at start-up")
    assert [e["request_id"] for e in kinds(state, "b", "peer_request")] == [rid, rid]
    wait_until(lambda: decisions(state, "b") == [("a", rid, "none"), ("a", rid, "approved")],
               what="the decision's entry")


def test_a_request_is_decided_once_even_when_the_operator_is_faster(run_yoi, state,
                                                                    started_pod, tmp_path):
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    go = tmp_path / "go"
    started_pod("b", exec=decider(tmp_path, f"while [ ! -e {go} ]; do sleep 0.02; done; "
                                            "echo approve"))
    rid = run_yoi("pod", "peer", "register", "a", "b", "--json").json["request"]["id"]
    wait_until(lambda: (tmp_path / "seen").exists(), what="the handler to start")
    assert run_yoi("pod", "peer", "deny", "b", "a").exit_code == 0
    go.touch()
    [entry] = wait_until(lambda: kinds(state, "b", "peer_decision"), what="the handler")
    assert (entry["decision"], entry["answer"]) == ("none", "approve")
    assert entry["reason"] == f"no pending peer request {rid} from a to b"
    assert not peers.is_peer(state, "a", "b")
    assert store.read(state, "b")["peer_denials"][0]["by"] == "operator"


def test_eight_concurrent_requesters_wait_for_one_live_handler(state, started_pod, tmp_path):
    names = [f"r{i}" for i in range(8)]
    for n in names:
        store.create(state, n)
    store.create(state, "b", accept_peers="ask")
    started_pod("b", exec=decider(tmp_path))
    env = {**os.environ, "YOI_HOME": str(state.root)}
    procs = [subprocess.Popen([sys.executable, "-m", "yoi", "pod", "peer", "register", n, "b",
                               "--wait", "60", "--json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in names]
    try:
        results = [(p.wait(timeout=90), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [rc for rc, _, _ in results] == [0] * 8, results
    assert all(json.loads(out)["state"] == "registered" for _, out, _ in results)
    assert sorted(metadata.peer_names(store.read(state, "b"))) == names
    assert all(peers.is_peer(state, n, "b") for n in names)
    assert peers.list_requests(state, "b") == []
    assert sorted(s for s, _, d in decisions(state, "b") if d == "approved") == names
    assert leftover_files(state.root) == []


# -- hostile input -------------------------------------------------------------------------

@pytest.mark.parametrize("output, verdict", [
    (b"approve\n", "approve"), (b"  Deny \r\nand more\n", "deny"), (b"APPROVE", "approve"),
    (b"", None), (b"\n approve\n", None), (b"approve please\n", None), (b"yes\n", None),
    (b"\xff\xfe\n", None), (b"approve" * 1000, None), (b"den\x00y\n", None),
])
def test_only_a_first_line_of_approve_or_deny_is_a_verdict(output, verdict):
    from yoi.consent import verdict as read_verdict
    assert read_verdict(output) == verdict


@pytest.mark.parametrize("params, message", [
    (None, "'name' must be a Pod name"),
    ({"name": 5}, "'name' must be a Pod name"),
    ({"name": "../b"}, "'name' must be a Pod name"),
    ({"name": "a"}, "no pending peer request from a to b"),
    ({"name": "ghost"}, "no pending peer request from ghost to b"),
])
def test_offer_peer_request_refuses_what_is_not_a_pending_request(state, started_pod, params,
                                                                 message):
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    pod = started_pod("b")
    before = state.session_path("b").read_bytes()
    with Raw(pod.socket_path) as c:
        c.prelude()
        c.send({"method": "offer_peer_request", **({"params": params} if params else {})})
        assert c.event() == {"event": "error", "data": {"code": "invalid_request",
                                                        "message": message}}
        # The connection goes on: a real request is offered, once.
        rid = peers.register(state, "a", "b")["request"]["id"]
        for offered in (True, False):
            c.send({"method": "offer_peer_request", "params": {"name": "a"}})
            ev, _ = c.until("peer_request_offered")
            assert ev["data"] == {"result": {"source": "a", "peer": "b", "id": rid,
                                             "decider": "operator", "offered": offered}}
    assert len(kinds(state, "b", "peer_request")) == 1
    assert state.session_path("b").read_bytes().startswith(before)


def test_a_handler_flooding_its_output_decides_nothing(run_yoi, state, started_pod, tmp_path):
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    started_pod("b", exec=decider(tmp_path, "echo approve; head -c 2000000 /dev/zero"))
    rid = run_yoi("pod", "peer", "register", "a", "b", "--json").json["request"]["id"]
    [entry] = wait_until(lambda: kinds(state, "b", "peer_decision"), what="the decision")
    assert entry["decision"] == "none" and "truncated" in entry["reason"], entry
    assert [q["id"] for q in peers.list_requests(state, "b")] == [rid]


def test_registering_again_and_again_runs_the_handler_once(run_yoi, state, started_pod,
                                                           tmp_path):
    """A requester cannot make the asked Pod's handler (an agent that costs money per
    run) run again and again: a request is offered once while the Pod runs."""
    store.create(state, "a")
    store.create(state, "b", accept_peers="ask")
    started_pod("b", exec=decider(tmp_path, "echo let me think"))
    rid = run_yoi("pod", "peer", "register", "a", "b", "--json").json["request"]["id"]
    wait_until(lambda: decisions(state, "b"), what="the first (undecided) run")
    for _ in range(5):
        r = run_yoi("pod", "peer", "register", "a", "b", "--json")
        assert (r.exit_code, r.json["request"]["id"]) == (0, rid), r
    time.sleep(0.5)  # what a second run would take to show
    assert (tmp_path / "seen").read_text().count("peer_request|") == 1
    assert decisions(state, "b") == [("a", rid, "none")]
    assert peers.list_requests(state, "b")[0]["id"] == rid  # still the operator's to decide
