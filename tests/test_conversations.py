"""Conversations: replies, waiting for them, and the handler's results as log entries.

Real Pods throughout: a mailbox Pod with no handler (what a CI job uses), and
an agent Pod whose handler answers with `yoi pod send --reply-to`.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time

import pytest

from conftest import yoi_cmd
from fake_pods import Peer, fake  # noqa: F401  (fixture)
from yoi import history, peers, store
from yoi.client import notify
from yoi.errors import TimedOutWaiting

YOI = shlex.join(yoi_cmd())
# The agent answers every peer message with a reply to it; MODE (a file) can make it
# send unrelated messages around the reply, or wait before it.
AGENT = (f'm=$(cat); [ -z "$YOI_FROM" ] && exit 0; '
         f'{YOI} pod send "$YOI_FROM" --reply-to "$YOI_MESSAGE_ID" "re: $m"')


@pytest.fixture
def pair(state, started_pod):
    """Mailbox `ci` and agent `agent`, peers, both live."""
    store.create(state, "ci")
    store.create(state, "agent", exec_cmd=AGENT)
    peers.register(state, "ci", "agent")
    return started_pod("ci", create=False), started_pod("agent", create=False)


def entries(state, name) -> list[dict]:
    return [json.loads(x) for x in state.session_path(name).read_bytes().splitlines()]


def background(*args) -> subprocess.Popen:
    return subprocess.Popen(yoi_cmd() + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout=60) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out, err


# -- replies ----------------------------------------------------------------------------

def test_a_handler_replies_with_reply_to_and_the_reply_records_it(state, pair, run_yoi):
    r = run_yoi("pod", "send", "--from", "ci", "agent", "2+2?", "--id", "q-1")
    assert r.exit_code == 0, r
    reply = history.wait(state, "ci", history.Match(reply_to="q-1"), timeout=30)
    assert reply["item"]["message"] == "re: 2+2?"
    assert reply["item"]["source"] == "agent" and reply["item"]["in_reply_to"] == "q-1"
    # the agent's log: the question, then its handler's result naming it
    history.wait(state, "agent", history.Match(kind="handler_result", msg_id="q-1"),
                 timeout=30)
    agent = entries(state, "agent")
    assert [(e["kind"], e.get("id")) for e in agent] == [("system_item", "q-1"),
                                                           ("handler_result", "q-1")]
    result = agent[1]
    assert (result["ok"], result["ended"], result["exit_status"], result["handled"]) == (
        True, "exited", 0, "notify")
    assert result["text"] == f"delivered to ci (id {reply['id']})\n"


def test_wait_reply_prints_exactly_the_reply_among_other_messages(state, pair, run_yoi):
    """Unrelated messages reach the mailbox before and after the reply: only the reply
    to this very message is printed."""
    store.configure(state, "agent", exec_cmd=(
        f'm=$(cat); [ -z "$YOI_FROM" ] && exit 0; '
        f'{YOI} pod send "$YOI_FROM" "noise before"; '
        f'{YOI} pod send "$YOI_FROM" --reply-to other "a reply to something else"; '
        f'{YOI} pod send "$YOI_FROM" --reply-to "$YOI_MESSAGE_ID" "re: $m"; '
        f'{YOI} pod send "$YOI_FROM" "noise after"'))
    run_yoi("pod", "stop", "agent")
    run_yoi("pod", "start", "agent")
    assert notify(pair[0].socket_path, "earlier, from the operator", "op-1")
    r = run_yoi("pod", "send", "--from", "ci", "agent", "status?", "--id", "q-2",
                "--wait-reply", "30", "--json")
    assert r.exit_code == 0, r
    assert r.json["id"] == "q-2" and r.json["reply"]["item"]["message"] == "re: status?"
    assert r.json["reply"]["item"]["in_reply_to"] == "q-2"
    r = run_yoi("pod", "send", "--from", "ci", "agent", "again?", "--id", "q-3",
                "--wait-reply", "30")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == "delivered to agent (id q-3)"
    assert lines[1].startswith("reply: #") and lines[1].endswith(": re: again?"), r


def test_reply_to_is_checked_and_refused_when_it_is_no_message_id(state, pair, run_yoi):
    r = run_yoi("pod", "send", "--from", "ci", "agent", "x", "--reply-to", "not an id")
    assert r.exit_code == 2 and "--reply-to" in r.stderr, r
    from rawsock import Raw
    with Raw(pair[1].socket_path) as c:
        c.prelude()
        c.send({"method": "notify", "params": {"message": "x", "in_reply_to": "a b"}})
        ev = c.event()
        assert ev["event"] == "error" and ev["data"]["code"] == "invalid_request", ev
        c.send({"method": "notify", "params": {"message": "x", "in_reply_to": ["nested"]}})
        assert c.event()["data"]["code"] == "invalid_request"


# -- waiting ------------------------------------------------------------------------------

def test_wait_started_before_the_reply_and_one_started_after_both_get_it(state, pair,
                                                                       run_yoi):
    before = background("pod", "wait", "ci", "--reply-to", "q-4", "--timeout", "30",
                        "--json")
    time.sleep(0.3)  # it is waiting (on a live Pod: following it)
    r = run_yoi("pod", "send", "--from", "ci", "agent", "hello", "--id", "q-4")
    assert r.exit_code == 0, r
    rc, out, err = finish(before)
    assert rc == 0, err
    got = json.loads(out)["entry"]
    assert got["item"]["in_reply_to"] == "q-4"
    r = run_yoi("pod", "wait", "ci", "--reply-to", "q-4", "--json")  # already there
    assert r.exit_code == 0, r
    assert r.json["entry"] == got
    r = run_yoi("pod", "wait", "ci", "--reply-to", "q-4", "--after", str(got["seq"]),
                "--timeout", "0.5")
    assert r.exit_code == 5, r  # only later entries count


def test_wait_on_a_stopped_pod_picks_it_up_when_it_starts(state, run_yoi, started_pod):
    store.create(state, "ci")
    waiter = background("pod", "wait", "ci", "--reply-to", "q-5", "--timeout", "40")
    try:
        time.sleep(0.5)  # ci is not running: the waiter looks at its log
        pod = started_pod("ci", create=False)
        notify(pod.socket_path, "unrelated", "u-1")
        time.sleep(0.2)
        from yoi import client, protocol
        client.deliver(pod.socket_path, protocol.notify_method(
            "the answer", "a-1", in_reply_to="q-5"), "a-1")
    finally:
        rc, out, err = finish(waiter)
    assert rc == 0, err
    assert out.endswith(": the answer\n"), out


def test_wait_outlives_a_sigkilled_pod_and_gets_the_entry_after_its_restart(
        state, run_yoi, started_pod):
    pod = started_pod("ci")
    waiter = background("pod", "wait", "ci", "--id", "late", "--timeout", "40", "--json")
    try:
        time.sleep(0.5)  # following the live Pod
        os.kill(pod.pid, signal.SIGKILL)
        time.sleep(0.3)
        pod = started_pod("ci", create=False)
        notify(pod.socket_path, "after the crash", "late")
    finally:
        rc, out, err = finish(waiter)
    assert rc == 0, err
    assert json.loads(out)["entry"]["item"]["message"] == "after the crash"


def test_wait_times_out_within_a_fifth_of_its_limit_saying_what_it_waited_for(state,
                                                                            run_yoi):
    store.create(state, "ci")
    t0 = time.monotonic()
    with pytest.raises(TimedOutWaiting) as e:
        history.wait(state, "ci", history.Match(reply_to="q-6", source="agent"), timeout=1.0)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 1.2, elapsed
    assert e.value.exit_code == 5
    r = run_yoi("pod", "wait", "ci", "--reply-to", "q-6", "--from", "agent",
                "--timeout", "0.5")
    assert r.exit_code == 5, r
    assert r.stderr == ("yoi: error: timed out after 0.5s waiting for a reply to q-6 from "
                        "agent in ci's log\n")


def test_wait_usage_and_missing_pod(run_yoi, state):
    store.create(state, "ci")
    assert run_yoi("pod", "wait", "ci", "--reply-to", "a b").exit_code == 2
    assert run_yoi("pod", "wait", "ci", "--after", "-1").exit_code == 2
    assert run_yoi("pod", "wait", "ghost", "--timeout", "0.2").exit_code == 3


# -- --wait-reply without a mailbox, and timing out ---------------------------------------------

def test_wait_reply_needs_a_live_sender_pod(state, run_yoi, started_pod):
    store.create(state, "agent", exec_cmd=AGENT)
    started_pod("agent", create=False)
    r = run_yoi("pod", "send", "agent", "hi", "--wait-reply", "5")
    assert r.exit_code == 2 and "--wait-reply needs a Pod" in r.stderr, r
    store.create(state, "ci")
    peers.register(state, "ci", "agent")
    r = run_yoi("pod", "send", "--from", "ci", "agent", "hi", "--wait-reply", "5")
    assert r.exit_code == 5, r
    assert "ci is not running, so a reply to it has nowhere to land" in r.stderr
    assert entries(state, "agent") == []  # nothing was sent
    r = run_yoi("pod", "send", "--from", "ci", "agent", "hi", "--wait-reply", "5", "--lines")
    assert r.exit_code == 2, r


def test_wait_reply_timeout_names_the_id_and_yoi_pod_wait_resumes(state, pair, run_yoi):
    store.configure(state, "agent", exec_cmd=(
        f'm=$(cat); sleep 2; {YOI} pod send "$YOI_FROM" --reply-to "$YOI_MESSAGE_ID" '
        '"late: $m"'))
    run_yoi("pod", "stop", "agent")
    run_yoi("pod", "start", "agent")
    r = run_yoi("pod", "send", "--from", "ci", "agent", "slow?", "--id", "q-7",
                "--wait-reply", "0.5", "--json")
    assert r.exit_code == 5, r
    assert r.json["id"] == "q-7" and r.json["acknowledged"] is True
    assert "yoi pod wait ci --reply-to q-7" in r.json["error"]["message"]
    r = run_yoi("pod", "wait", "ci", "--reply-to", "q-7", "--timeout", "30")
    assert r.exit_code == 0, r
    assert r.stdout.endswith(" (reply to q-7): late: slow?\n")


def test_wait_reply_retried_with_the_same_id_finds_the_reply_that_came_in_between(
        state, pair, run_yoi):
    store.configure(state, "agent", exec_cmd=(
        f'm=$(cat); sleep 1; {YOI} pod send "$YOI_FROM" --reply-to "$YOI_MESSAGE_ID" '
        '"late: $m"'))
    run_yoi("pod", "stop", "agent")
    run_yoi("pod", "start", "agent")
    r = run_yoi("pod", "send", "--from", "ci", "agent", "slow?", "--id", "q-8",
                "--wait-reply", "0.2")
    assert r.exit_code == 5, r
    assert "`yoi pod wait ci --reply-to q-8`" in r.stderr  # no --after: any reply counts
    history.wait(state, "ci", history.Match(reply_to="q-8"), timeout=30)
    r = run_yoi("pod", "send", "--from", "ci", "agent", "slow?", "--id", "q-8",
                "--wait-reply", "5", "--json")
    assert r.exit_code == 0, r
    assert r.json["reply"]["item"]["message"] == "late: slow?"
    runs = [e for e in entries(state, "agent") if e["kind"] == "handler_result"]
    assert len(runs) == 1  # the retry delivered nothing twice


def test_wait_takes_an_entry_the_live_pod_broadcasts_before_it_is_in_the_file(
        state, fake):
    """The entry is only ever broadcast, never written: found only by following."""
    from yoi import protocol

    def pod(peer: Peer) -> None:
        peer.event("snapshot", {"yoi": protocol.announcement(), "entries": [],
                                "session_offset": 0, "status": "idle"})
        time.sleep(0.3)
        peer.event("system_item", {"seq": 7, "kind": "system_item", "id": "r-1",
                                   "at": "2026-12-01T00:00:00Z", "item": {
                                       "kind": "notification", "message": "answer",
                                       "source": "agent", "id": "r-1",
                                       "in_reply_to": "q-9"}})
        peer.hang()

    fake(pod, name="ci")
    got = history.wait(state, "ci", history.Match(reply_to="q-9"), timeout=10)
    assert (got["seq"], got["item"]["message"]) == (7, "answer")
    assert not state.session_path("ci").exists() or not state.session_path(
        "ci").read_bytes()


# -- many at once ---------------------------------------------------------------------------

def test_fifty_concurrent_requests_each_get_their_own_reply(state, pair):
    procs = [background("pod", "send", "--from", "ci", "agent", f"question {i}",
                        "--id", f"c-{i}", "--wait-reply", "120", "--json")
             for i in range(50)]
    results = [finish(p, timeout=180) for p in procs]
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, (i, err)
        doc = json.loads(out)
        assert doc["reply"]["item"]["in_reply_to"] == f"c-{i}"
        assert doc["reply"]["item"]["message"] == f"re: question {i}"
    replies = [e for e in entries(state, "ci") if e["kind"] == "system_item"]
    assert sorted(e["item"]["in_reply_to"] for e in replies) == sorted(
        f"c-{i}" for i in range(50))  # each answered once


# -- a failing handler is seen ----------------------------------------------------------------

def test_a_handler_exiting_127_shows_in_status_and_doctor(state, run_yoi, started_pod):
    store.create(state, "broken", exec_cmd="cat > /dev/null; no-such-agent-cli --stdin")
    pod = started_pod("broken", create=False)
    for i in range(3):
        notify(pod.socket_path, f"m{i}", f"b-{i}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = run_yoi("pod", "status", "broken", "--json")
        if r.json["handler"]["recent_runs"] == 3:
            break
        time.sleep(0.1)
    handler = r.json["handler"]
    assert (handler["recent_runs"], handler["recent_failures"], handler["failing_streak"]) == (
        3, 3, 3)
    last = handler["last"]
    assert (last["kind"], last["id"], last["ok"], last["exit_status"]) == (
        "handler_result", "b-2", False, 127)
    assert "not found" in last["stderr_tail"]
    # a Pod whose handler was removed runs no handler: nothing for doctor to say
    store.configure(state, "broken", exec_cmd=None)
    assert run_yoi("doctor").exit_code == 0
    store.configure(state, "broken", exec_cmd="cat > /dev/null; no-such-agent-cli --stdin")
    r = run_yoi("pod", "status", "broken")
    assert r.stdout.splitlines()[1].startswith(
        "last handler run for b-2 at "), r
    assert "failed (exit status 127: " in r.stdout and "3 of the last 3 failed" in r.stdout
    r = run_yoi("doctor", "--json")
    assert r.exit_code == 1, r
    [p] = r.json["problems"]
    assert (p["code"], p["severity"], p["pod_name"]) == ("handler-failing", "error", "broken")
    assert "exit status 127" in p["message"] and "not found" in p["message"]
    r = run_yoi("pod", "log", "broken", "--tail", "1")
    assert "handler failed, exit status 127: " in r.stdout and "[b-2]" in r.stdout
    # a handler that works again ends the report
    store.configure(state, "broken", exec_cmd="cat > /dev/null")
    run_yoi("pod", "stop", "broken")
    pod = started_pod("broken", create=False)
    notify(pod.socket_path, "fine now", "fixed")
    history.wait(state, "broken", history.Match(kind="handler_result", msg_id="fixed"),
                 timeout=30)
    assert run_yoi("doctor").exit_code == 0


def test_a_handler_that_cannot_start_in_its_cwd_is_a_failed_result(state, tmp_path,
                                                                  started_pod):
    gone = tmp_path / "gone"
    gone.mkdir()
    store.create(state, "a", exec_cmd="cat", cwd=str(gone))
    gone.rmdir()
    pod = started_pod("a", create=False)
    notify(pod.socket_path, "hi", "m-1")
    result = history.wait(state, "a", history.Match(kind="handler_result", msg_id="m-1"),
                          timeout=30)
    assert (result["ok"], result["ended"], result["exit_status"]) == (
        False, "not_started", None)
    assert "could not start" in result["stderr_tail"]
