"""`yoi pod send` against real Pod processes: what lands in the receiver's session log."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time

import pytest

from yoi import control, delivery, peers, store
from yoi.errors import YoiError
from yoi.protocol import notification_body


def read_log(state, name: str) -> tuple[list[dict], int]:
    """NAME's log entries, and how many lines are torn (a SIGKILL mid-append
    leaves one; the Pod keeps it as evidence and every reader skips it)."""
    entries, torn = [], 0
    with open(state.session_path(name), "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except ValueError:
                torn += 1
    return entries, torn


def log_entries(state, name: str) -> list[dict]:
    entries, torn = read_log(state, name)
    assert torn == 0
    return entries


def notifications(state, name: str, torn_allowed: int = 0) -> list[dict]:
    entries, torn = read_log(state, name)
    assert torn <= torn_allowed
    return [e["item"] for e in entries if e.get("kind") == "system_item"]


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def pair(state, started_pod):
    """Peers A and B; B is running."""
    store.create(state, "A")
    store.create(state, "B")
    peers.register(state, "A", "B")
    return started_pod("B", create=False)


def test_peer_message_is_recorded_once_with_source_id_and_body(run_yoi, state, pair):
    r = run_yoi("pod", "send", "--from", "A", "--id", "m-1", "--json", "B", "hello B")
    assert r.exit_code == 0, r
    entries = log_entries(state, "B")
    assert len(entries) == 1
    entry = entries[0]
    item = entry["item"]
    assert entry == {"seq": 1, "kind": "system_item", "ts": entry["ts"], "at": item["at"],
                     "id": "m-1", "item": {
                         "kind": "notification", "message": "hello B",
                         "body": notification_body("[Peer message from `A`]\nhello B"),
                         "source": "A", "id": "m-1",
                         "at": item["at"]}}
    assert r.json == {"ok": True, "pod_name": "B", "source": {"pod_name": "A"}, "id": "m-1",
                      "acknowledged": True, "at": item["at"], "deduplicates_retries": True,
                      "state": "delivered"}


def test_operator_notification_has_no_source(run_yoi, state, pair):
    r = run_yoi("pod", "send", "--id", "op-1", "B", "-", input="deploy finished\n")
    assert r.exit_code == 0, r
    assert r.stdout == "delivered to B as operator (id op-1)\n"
    [item] = notifications(state, "B")
    assert (item["message"], item["body"], item["id"]) == \
        ("deploy finished", notification_body("deploy finished"), "op-1")
    assert "source" not in item


def test_non_peer_is_refused_and_the_log_is_unchanged(cli, state, pair):
    store.create(state, "C")
    assert cli("pod", "send", "--from", "A", "B", "before").exit_code == 0
    before = state.session_path("B").read_bytes()
    r = cli("pod", "send", "--from", "C", "B", "hi")
    assert (r.exit_code, r.stderr) == (4, "yoi: error: not a peer: C does not list B as a "
                                          "peer (introduce them with `yoi pod peer register "
                                          "C B`)\n"), r
    assert state.session_path("B").read_bytes() == before


def test_the_receiver_checks_its_own_metadata(cli, state, pair):
    """A sender whose record lists B is still refused when B does not list it."""
    store.create(state, "D")
    store.update(state, "D", lambda d: {**d, "peers": [{"pod_name": "B"}]})
    before = state.session_path("B").read_bytes()
    r = cli("pod", "send", "--from", "D", "--id", "d-1", "B", "let me in")
    assert r.exit_code == 4, r
    assert r.stderr.startswith("yoi: error: B refused the message: ")
    assert "invalid_request" in r.stderr
    assert state.session_path("B").read_bytes() == before


def test_stopped_peer_is_not_running_and_not_restored(run_yoi, state, pair):
    r = run_yoi("pod", "stop", "B")
    assert r.exit_code == 0, r
    before = state.session_path("B").read_bytes()
    r = run_yoi("pod", "send", "--from", "A", "B", "are you there?")
    assert (r.exit_code, r.stderr) == \
        (5, "yoi: error: B is not running; start it with `yoi pod restore B`\n"), r
    assert not control.is_running(state, "B")
    assert state.session_path("B").read_bytes() == before


def test_the_same_id_twice_is_recorded_once(cli, state, pair):
    first = cli("pod", "send", "--from", "A", "--id", "dup-1", "--json", "B", "once")
    second = cli("pod", "send", "--from", "A", "--id", "dup-1", "--json", "B", "once")
    assert first.exit_code == second.exit_code == 0, (first, second)
    assert first.json == second.json  # the original acknowledgement, sent again
    assert [i["id"] for i in notifications(state, "B")] == ["dup-1"]


def test_lines_1000_in_order_exactly_once_and_a_rerun_adds_nothing(run_yoi, state, pair):
    data = "".join(f"line {i} of the stream\n" for i in range(1, 1001))
    r = run_yoi("pod", "send", "--lines", "--from", "A", "--id", "L", "B", input=data)
    assert r.exit_code == 0, r
    assert r.stdout == "delivered 1000 messages to B (ids L-1 .. L-1000)\n"
    expected = [(f"L-{i}", f"line {i} of the stream") for i in range(1, 1001)]
    assert [(i["id"], i["message"]) for i in notifications(state, "B")] == expected
    r = run_yoi("pod", "send", "--lines", "--from", "A", "--id", "L", "B", input=data)
    assert r.exit_code == 0, r
    assert [(i["id"], i["message"]) for i in notifications(state, "B")] == expected


# -- delivery under faults ---------------------------------------------------------

class Killer:
    """SIGKILLs Pod B whenever its log has grown by STEP entries; restarts it."""

    def __init__(self, state, started_pod, pod, step: int, times: int):
        self.state, self.started_pod, self.pod = state, started_pod, pod
        self.step, self.times = step, times
        self.kills = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _count(self) -> int:
        try:
            with open(self.state.session_path("B"), "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        try:
            while self.kills < self.times and not self.done.is_set():
                target = (self.kills + 1) * self.step
                while self._count() < target and not self.done.is_set():
                    time.sleep(0.005)
                if self.done.is_set():
                    return
                os.kill(self.pod.pid, signal.SIGKILL)
                self.kills += 1
                wait_until(lambda: not control.is_running(self.state, "B"), 10, "B to die")
                time.sleep(0.2)  # the sender meets a dead Pod for a while
                self.pod = self.started_pod("B", create=False)
        except BaseException as e:  # reported by the test
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(60)


def test_acknowledged_messages_survive_sigkill_exactly_once(state, pair, started_pod):
    acked: list[str] = []
    outcomes: set[int] = set()
    with Killer(state, started_pod, pair, step=25, times=3) as killer:
        i = 0
        while i < 100 or (killer.kills < 3 and killer.error is None and i < 2000):
            i += 1
            msg_id = f"k-{i}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    delivery.send(state, "B", f"message {i}", source="A", msg_id=msg_id,
                                  timeout=2)
                    acked.append(msg_id)
                    break
                except YoiError as e:
                    assert e.exit_code in (1, 5), e.message  # closed, timed out, not running
                    outcomes.add(e.exit_code)
                    assert time.monotonic() < deadline, f"{msg_id} never acknowledged"
                    time.sleep(0.02)
    assert killer.error is None, killer.error
    assert killer.kills == 3
    ids = [i["id"] for i in notifications(state, "B", torn_allowed=killer.kills)]
    assert acked == [f"k-{n}" for n in range(1, i + 1)]
    assert ids == acked  # each acknowledged message exactly once, in order
    assert 5 in outcomes  # the sender did meet the dead Pod


def test_lines_retried_after_sigkill_deliver_each_line_once(run_yoi, state, pair, started_pod):
    n = 3000
    data = "".join(f"streamed {i}\n" for i in range(1, n + 1))
    codes = []
    with Killer(state, started_pod, pair, step=100, times=1) as killer:
        for _ in range(200):
            r = run_yoi("pod", "send", "--lines", "--from", "A", "--id", "S", "--timeout", "3",
                        "B", input=data)
            codes.append(r.exit_code)
            if r.exit_code == 0:
                break
            assert r.exit_code in (1, 5), r
            assert "retry with --id S" in r.stderr or "not running" in r.stderr, r
            time.sleep(0.05)
    assert killer.error is None, killer.error
    assert codes[0] != 0 and codes[-1] == 0, codes  # killed mid-stream, then completed
    items = notifications(state, "B", torn_allowed=killer.kills)
    assert [(i["id"], i["message"]) for i in items] == \
        [(f"S-{i}", f"streamed {i}") for i in range(1, n + 1)]


# -- a conversation through a handler ---------------------------------------------

def test_two_pods_talk_through_a_handler(run_yoi, state, started_pod, tmp_path):
    """A's handler answers every message by sending back with `yoi pod send`.

    It gives no --from ($YOI_POD is the default) and no state directory
    (A runs with --state-dir while $YOI_HOME points elsewhere: the Pod sets
    $YOI_HOME for its handler), and derives its reply id from $YOI_MESSAGE_ID,
    so a re-run handler cannot answer twice.
    """
    yoi = shlex.join([sys.executable, "-m", "yoi"])
    handler = (f'msg=$(cat); {yoi} pod send --id "re-$YOI_MESSAGE_ID" "$YOI_FROM" '
               '"pong from $YOI_POD: $msg"')
    store.create(state, "A")
    store.create(state, "B")
    peers.register(state, "A", "B")
    started_pod("A", exec=handler, create=False, args=("--state-dir", str(state.root)),
                env={"YOI_HOME": str(tmp_path / "elsewhere")})
    started_pod("B", create=False)
    r = run_yoi("pod", "send", "--from", "B", "--id", "ping-1", "A", "ping")
    assert r.exit_code == 0, r
    reply = wait_until(lambda: [i for i in notifications(state, "B")], 30, "the reply")
    assert reply == [{"kind": "notification", "message": "pong from A: ping",
                      "body": notification_body("[Peer message from `A`]\npong from A: ping"),
                      "source": "A",
                      "id": "re-ping-1", "at": reply[0]["at"]}]
    a_log = wait_until(lambda: [e for e in log_entries(state, "A")
                                if e["kind"] == "handler_result"] and log_entries(state, "A"),
                       30, "A's handler output")
    assert a_log[0]["item"]["id"] == "ping-1"
    assert a_log[0]["item"]["source"] == "B"
    assert [e["text"] for e in a_log if e["kind"] == "handler_result"] == \
        ["delivered to B (id re-ping-1)\n"]
