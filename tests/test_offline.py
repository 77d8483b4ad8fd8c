"""Offline delivery: `yoi pod send --queue` to a Pod that is not running, delivered
exactly once, in order, when it starts (yoi.offline, yoi.server.drain)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import yoi_cmd
from yoi import client, control, metadata, offline, peers, session, store


def committed(state, name: str, kind: str = "system_item") -> list[dict]:
    return [e for _, e in session.entries(state.session_path(name))
            if e is not None and e["kind"] == kind]


def committed_ids(state, name: str) -> list[str]:
    return [e["item"]["id"] for e in committed(state, name)]


def queue_items(ids, source=None, text="m"):
    return [(i, offline.record_line(i, f"{text} {i}", source)) for i in ids]


def wait_for(check, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def peers_ab(state):
    store.create(state, "A")
    store.create(state, "B")
    peers.register(state, "A", "B")


# -- sending -------------------------------------------------------------------------------

def test_queue_send_to_a_stopped_pod_is_queued_then_delivered_in_order_at_start(
        run_yoi, state, peers_ab, started_pod):
    r = run_yoi("pod", "send", "--queue", "--from", "A", "--id", "q-1", "B", "first")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "queued for B (id q-1)\n", ""), r
    r = run_yoi("pod", "send", "--queue", "--json", "--id", "q-2", "B", "second")
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "pod_name": "B", "source": None, "id": "q-2",
                      "acknowledged": False, "at": None, "deduplicates_retries": True,
                      "state": "queued"}
    r = run_yoi("pod", "send", "--queue", "--lines", "--id", "L", "--from", "A", "B",
                input="three\n\nfour\n")
    assert (r.exit_code, r.stdout) == (0, "queued 2 messages for B (ids L-1 .. L-3)\n"), r
    # a retry of a queued id queues nothing more
    r = run_yoi("pod", "send", "--queue", "--from", "A", "--id", "q-1", "B", "first")
    assert r.exit_code == 0, r
    assert offline.depth(state.queue_path("B")) == 4
    r = run_yoi("pod", "status", "B", "--json")
    assert (r.exit_code, r.json["queued"]) == (5, 4), r
    r = run_yoi("pod", "log", "B", "--queued")
    assert [line.split(": ", 1)[1] for line in r.stdout.splitlines()] == \
        ["first", "second", "three", "four"], r
    r = run_yoi("pod", "list")
    assert r.stdout.splitlines()[0].split() == ["NAME", "PEERS", "LIVE", "QUEUED", "STATE"], r

    started_pod("B", exec="cat")
    assert committed_ids(state, "B") == ["q-1", "q-2", "L-1", "L-3"]
    sources = [e["item"].get("source") for e in committed(state, "B")]
    assert sources == ["A", None, "A", "A"]
    # each ran the handler, as a live message does, and only then left the queue
    wait_for(lambda: offline.depth(state.queue_path("B")) == 0, what="the queue to empty")
    assert len(committed(state, "B", "handler_result")) == 4
    assert [e["text"] for e in committed(state, "B", "handler_result")] == \
        ["first", "second", "three", "four"]
    # a live Pod: --queue sends as usual
    r = run_yoi("pod", "send", "--queue", "--json", "--id", "live-1", "B", "now")
    assert (r.exit_code, r.json["state"], r.json["acknowledged"]) == (0, "delivered", True), r


def test_queue_send_checks_like_a_live_send(run_yoi, state, peers_ab):
    store.create(state, "C")
    cases = [
        (("--from", "A", "ghost", "x"), 3, "yoi: error: no such Pod: ghost\n"),
        (("--from", "C", "B", "x"), 4, "not a peer: C does not list B as a peer"),
        (("--from", "A", "B", " "), 2, "empty message: nothing to send"),
        (("--from", "A", "bad/name", "x"), 2, "invalid target Pod name"),
    ]
    for args, code, message in cases:
        r = run_yoi("pod", "send", "--queue", *args)
        assert r.exit_code == code and message in r.stderr, r
    assert not state.queue_path("B").exists()
    r = run_yoi("pod", "send", "--from", "A", "B", "x")  # without --queue: as before
    assert r.exit_code == 5 and "B is not running" in r.stderr, r


def test_queue_send_refuses_a_one_sided_relation_as_a_live_send_is(
        run_yoi, state, peers_ab, started_pod):
    """A still lists B, B no longer lists A: B would refuse the message."""
    store.update(state, "B", lambda doc: (metadata.drop_peer(doc, "A"), doc)[1])
    words = ("yoi: error: not a peer: A and B do not both list each other as peers, so B "
             "would refuse the message; nothing was queued (introduce them with `yoi pod "
             "peer register A B`)\n")
    r = run_yoi("pod", "send", "--queue", "--from", "A", "B", "x")
    assert (r.exit_code, r.stdout, r.stderr) == (4, "", words), r
    r = run_yoi("pod", "send", "--queue", "--lines", "--from", "A", "B", input="x\ny\n")
    assert (r.exit_code, r.stderr) == (4, words), r
    assert offline.depth(state.queue_path("B")) == 0
    started_pod("B", create=False)
    r = run_yoi("pod", "send", "--from", "A", "B", "x")  # live: B refuses it, also exit 4
    assert r.exit_code == 4 and "'A' is not a peer of 'B'; message refused" in r.stderr, r
    assert committed_ids(state, "B") == []


def test_queue_full_exits_1_and_queues_nothing(run_yoi, state):
    r = run_yoi("pod", "create", "T", "--queue-max-messages", "3", "--queue-max-bytes", "4000")
    assert r.exit_code == 0, r
    for i in range(3):
        assert run_yoi("pod", "send", "--queue", "--id", f"m{i}", "T", "x").exit_code == 0
    before = state.queue_path("T").read_bytes()
    r = run_yoi("pod", "send", "--queue", "--id", "m3", "T", "x")
    assert r.exit_code == 1, r
    assert r.stderr.startswith("yoi: error: T's queue is full: 3 message(s)"), r
    assert "nothing was queued" in r.stderr and "--queue-max-messages" in r.stderr, r
    assert state.queue_path("T").read_bytes() == before
    # a batch over the byte limit: none of it
    run_yoi("pod", "config", "T", "--queue-max-messages", "100")
    r = run_yoi("pod", "send", "--queue", "--lines", "T", input="y" * 1000 + "\n" + "z" * 3000)
    assert r.exit_code == 1 and "2 more" in r.stderr, r
    assert state.queue_path("T").read_bytes() == before
    r = run_yoi("pod", "send", "--queue", "--lines", "T", input="fits\n")
    assert r.exit_code == 0, r
    assert offline.depth(state.queue_path("T")) == 4
    r = run_yoi("pod", "config", "T", "--queue-max-bytes", "0")
    assert r.exit_code == 2, r


def test_queue_limits_are_settings_of_the_record_and_of_yoi_toml(run_yoi, state, tmp_path):
    decl = tmp_path / "yoi.toml"
    decl.write_text("[pods.w]\nqueue_max_messages = 7\nstart = false\n")
    r = run_yoi("up", "-f", decl)
    assert r.exit_code == 0, r
    assert store.read(state, "w")["queue_max_messages"] == 7
    decl.write_text("[pods.w]\nqueue_max_messages = 0\nstart = false\n")
    r = run_yoi("up", "-f", decl)
    assert r.exit_code == 2 and "pods.w.queue_max_messages: queue_max_messages must be a " \
        "whole number of messages from 1" in r.stderr, r
    doc = state.metadata_path("w").read_text().replace("= 7", "= -1")
    state.metadata_path("w").write_text(doc)
    r = run_yoi("pod", "show", "w")
    assert r.exit_code == 1 and "queue_max_messages must be" in r.stderr, r


def test_a_queued_reply_keeps_the_id_it_answers_through_the_queue(state, run_yoi,
                                                                   started_pod):
    store.create(state, "T")
    r = run_yoi("pod", "send", "--queue", "--id", "r-1", "--reply-to", "q-7", "T", "yes",
                "--json")
    assert (r.exit_code, r.json["state"]) == (0, "queued"), r
    [rec] = offline.read(state.queue_path("T")).records
    assert rec["in_reply_to"] == "q-7"
    started_pod("T", create=False)
    [entry] = committed(state, "T")
    assert (entry["id"], entry["item"]["in_reply_to"]) == ("r-1", "q-7")


def test_wait_reply_waits_across_the_queue_until_the_target_starts_and_answers(
        state, run_yoi, started_pod):
    """A question queued for a stopped agent: --wait-reply gets the answer it gives
    once it is started."""
    import shlex
    yoi = shlex.join(yoi_cmd())
    store.create(state, "ci")
    store.create(state, "agent", exec_cmd=(
        f'm=$(cat); {yoi} pod send "$YOI_FROM" --reply-to "$YOI_MESSAGE_ID" "re: $m"'))
    peers.register(state, "ci", "agent")
    started_pod("ci", create=False)
    asking = subprocess.Popen(yoi_cmd() + ["pod", "send", "--queue", "--from", "ci", "agent",
                                           "are you there?", "--id", "q-1",
                                           "--wait-reply", "60", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: offline.depth(state.queue_path("agent")) == 1, what="the queued question")
        assert asking.poll() is None  # still waiting: nobody has answered
        started_pod("agent", create=False)
        out, err = asking.communicate(timeout=60)
    finally:
        if asking.poll() is None:
            asking.kill()
            asking.wait()
    assert asking.returncode == 0, err
    doc = json.loads(out)
    assert (doc["state"], doc["reply"]["item"]["message"]) == ("queued", "re: are you there?")
    assert doc["reply"]["item"]["in_reply_to"] == "q-1"


def test_wait_reply_to_a_queued_message_times_out_saying_it_is_queued(state, run_yoi,
                                                                      started_pod):
    store.create(state, "ci")
    store.create(state, "agent")
    peers.register(state, "ci", "agent")
    started_pod("ci", create=False)
    r = run_yoi("pod", "send", "--queue", "--from", "ci", "agent", "hello", "--id", "q-2",
                "--wait-reply", "0.3")
    assert r.exit_code == 5, r
    assert ("message q-2 is queued for agent, which is not running, but no reply to it came "
            "to ci within 0.3s") in r.stderr, r


def test_an_interrupt_while_reading_lines_to_queue_queues_nothing(state, yoi_home):
    store.create(state, "T")
    p = subprocess.Popen(yoi_cmd() + ["pod", "send", "--queue", "--lines", "T"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    p.stdin.write("one\ntwo\n")
    p.stdin.flush()
    time.sleep(0.5)  # reading, waiting for more
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 130, err
    assert "nothing was queued for T (2 line(s) read)" in err
    assert offline.depth(state.queue_path("T")) == 0


def test_rm_removes_the_queue_with_the_pod(run_yoi, state):
    store.create(state, "T")
    assert run_yoi("pod", "send", "--queue", "T", "x").exit_code == 0
    r = run_yoi("pod", "rm", "T")
    assert r.exit_code == 0, r
    assert not state.pod_dir("T").exists()
    store.create(state, "T")
    assert offline.depth(state.queue_path("T")) == 0
    r = run_yoi("pod", "send", "--queue", "ghost", "x")
    assert r.exit_code == 3, r


# -- the acceptance scenarios ----------------------------------------------------------------

SENDER = textwrap.dedent("""
    import sys
    from yoi import delivery
    from yoi.state import State
    state, me, n = State.resolve(), sys.argv[1], int(sys.argv[2])
    for i in range(n):
        r = delivery.send(state, "T", f"{me} says {i}", source=me, msg_id=f"{me}-{i}",
                          queue=True)
        assert r["state"] == "queued", r
""")


def test_1000_messages_from_4_concurrent_senders_arrive_once_each_in_sender_order(
        state, started_pod):
    store.create(state, "T")
    senders = [f"s{k}" for k in range(4)]
    for s in senders:
        store.create(state, s)
        peers.register(state, s, "T")
    procs = [subprocess.Popen([sys.executable, "-c", SENDER, s, "250"]) for s in senders]
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert offline.depth(state.queue_path("T")) == 1000
    started_pod("T")
    ids = committed_ids(state, "T")
    assert len(ids) == 1000 and len(set(ids)) == 1000
    for s in senders:
        assert [i for i in ids if i.startswith(f"{s}-")] == [f"{s}-{i}" for i in range(250)]
    assert offline.depth(state.queue_path("T")) == 0


def _serve(state, name, env=None):
    """The Pod process itself, in the foreground: ours to SIGKILL."""
    return subprocess.Popen(yoi_cmd() + ["pod", "start", name, "--foreground"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_sigkill_while_draining_loses_and_duplicates_nothing(state, started_pod):
    store.create(state, "T", queue_max_messages=100_000)
    rng = random.Random(1234)
    queued: list[str] = []
    log = state.session_path("T")
    mid_drain = 0  # kills that left part of a round committed and its queue not emptied
    for round_ in range(60):  # at least 22 rounds, more while too few kills land mid-drain
        if round_ >= 22 and mid_drain >= 5:
            break
        ids = [f"r{round_}-{i}" for i in range(1000)]
        offline.append(state, "T", queue_items(ids, text="x" * 2000))
        queued += ids
        size = log.stat().st_size
        proc = _serve(state, "T")
        try:
            wait_for(lambda: log.stat().st_size > size or proc.poll() is not None,
                     what="the drain to begin")
            time.sleep(rng.choice([0, 0, 0.002, 0.005, 0.01, 0.2]))  # in the drain, or after
        finally:
            _kill(proc)
        mid_drain += (log.stat().st_size > size
                      and offline.depth(state.queue_path("T")) > 0)
    assert mid_drain >= 5, mid_drain
    started_pod("T")
    ids = committed_ids(state, "T")
    assert sorted(ids) == sorted(queued)  # every id, and each once
    assert ids == queued  # in the order queued
    assert offline.depth(state.queue_path("T")) == 0


def _slow_handler(tmp_path) -> tuple[str, object, object]:
    """A handler that, while the file SLOW exists, writes its pid (its process group's)
    to PIDFILE and sleeps; it then echoes its message."""
    slow, pidfile = tmp_path / "slow", tmp_path / "handler.pid"
    slow.touch()
    return f"if [ -e '{slow}' ]; then echo $$ > '{pidfile}'; sleep 30; fi; cat", slow, pidfile


def _running_handler(pidfile) -> int:
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(),
             what="the handler to run")
    return int(pidfile.read_text())


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_kill_9_during_a_queued_message_s_handler_run_runs_it_after_the_restart(
        state, tmp_path, started_pod, run_yoi):
    exec_cmd, slow, pidfile = _slow_handler(tmp_path)
    store.create(state, "T", exec_cmd=exec_cmd)
    ids = ["s-1", "s-2", "s-3"]
    offline.append(state, "T", queue_items(ids))
    proc = _serve(state, "T")
    try:
        handler = _running_handler(pidfile)  # the first run, of s-1
    finally:
        _kill(proc)
    _kill_group(handler)
    assert committed_ids(state, "T") == ids
    assert committed(state, "T", "handler_result") == []
    # committed, but not handled: still queued, and doctor --fix leaves them there
    assert [r["id"] for r in offline.read(state.queue_path("T")).records] == ids
    r = run_yoi("doctor", "--fix")
    assert "queue-delivered" not in r.stdout, r
    assert [r["id"] for r in offline.read(state.queue_path("T")).records] == ids
    slow.unlink()
    started_pod("T", create=False)
    wait_for(lambda: offline.depth(state.queue_path("T")) == 0, what="the queue to empty")
    assert committed_ids(state, "T") == ids  # not committed again
    assert [(r["id"], r["text"], r["ok"]) for r in committed(state, "T", "handler_result")] \
        == [(i, f"m {i}", True) for i in ids]


def test_a_queued_message_whose_run_a_stop_cut_short_is_not_run_again_the_next_is(
        state, tmp_path, started_pod):
    exec_cmd, slow, pidfile = _slow_handler(tmp_path)
    store.create(state, "T", exec_cmd=exec_cmd)
    offline.append(state, "T", queue_items(["s-1", "s-2"]))
    started_pod("T", create=False)
    _running_handler(pidfile)
    control.stop(state, "T")  # ends the run of s-1; s-2's never began
    slow.unlink()
    [cut] = committed(state, "T", "handler_result")
    assert (cut["id"], cut["ended"]) == ("s-1", "stopped")
    assert [r["id"] for r in offline.read(state.queue_path("T")).records] == ["s-1", "s-2"]
    started_pod("T", create=False)
    wait_for(lambda: offline.depth(state.queue_path("T")) == 0, what="the queue to empty")
    assert committed_ids(state, "T") == ["s-1", "s-2"]
    assert [(r["id"], r["ended"], r["text"]) for r in committed(state, "T", "handler_result")] \
        == [("s-1", "stopped", ""), ("s-2", "exited", "m s-2")]


def test_sigkill_during_handler_runs_loses_no_queued_message_s_run(state, tmp_path,
                                                                   started_pod):
    runs = tmp_path / "runs"
    store.create(state, "T", exec_cmd=f"m=$(cat); sleep 0.02; echo \"$m\" >> '{runs}'; "
                                      "echo \"$m\"")
    ids = [f"h-{i}" for i in range(20)]
    offline.append(state, "T", queue_items(ids))
    rng = random.Random(4321)
    kills = 0
    while kills < 10 and len(committed(state, "T", "handler_result")) < len(ids):
        before = len(committed(state, "T", "handler_result"))
        proc = _serve(state, "T")
        try:
            wait_for(lambda: len(committed(state, "T", "handler_result")) > before
                     or offline.depth(state.queue_path("T")) == 0 or proc.poll() is not None,
                     what="a handler run")
            time.sleep(rng.choice([0, 0.01, 0.03, 0.1]))  # in a run, or between two
        finally:
            _kill(proc)
        kills += 1
    assert kills >= 5, kills
    started_pod("T", create=False)
    wait_for(lambda: offline.depth(state.queue_path("T")) == 0, what="the queue to empty")
    assert committed_ids(state, "T") == ids  # each committed once, in order
    results = committed(state, "T", "handler_result")
    assert [r["id"] for r in results] == ids  # each run to its end once, in order
    assert all(r["ok"] and r["text"] == f"m {r['id']}\n" for r in results)
    # every message ran (some more than once: a run a kill cut short, its input perhaps
    # not all fed, ran again)
    ran = [m for m in runs.read_text().splitlines() if m]
    assert set(ran) == {f"m {i}" for i in ids} and len(ran) > len(ids)


@pytest.mark.parametrize("point", ["drain-before-clear", "session-before-index",
                                   "session-mid-write"])
def test_a_crash_at_each_drain_step_delivers_once_on_restart(state, started_pod, point):
    store.create(state, "T")
    ids = [f"c-{i}" for i in range(50)]
    offline.append(state, "T", queue_items(ids))
    proc = _serve(state, "T", {"YOI_FAULT": f"{point}:crash"})
    assert proc.wait(timeout=30) == 137
    started_pod("T")
    assert committed_ids(state, "T") == ids
    assert offline.depth(state.queue_path("T")) == 0


def test_a_relation_removed_while_queued_is_a_rejected_delivery_not_a_commit(
        run_yoi, state, peers_ab, started_pod):
    r = run_yoi("pod", "send", "--queue", "--from", "A", "--id", "gone-1", "B", "secret plan")
    assert r.exit_code == 0, r
    assert run_yoi("pod", "send", "--queue", "--id", "op-1", "B", "from the operator").exit_code == 0
    peers.unregister(state, "A", "B")
    pod = started_pod("B")
    assert committed_ids(state, "B") == ["op-1"]
    [rejected] = committed(state, "B", "delivery_rejected")
    assert rejected["message_id"] == "gone-1" and rejected["source"] == "A"
    assert rejected["message"] == "secret plan"
    assert rejected["reason"] == "'A' is not a peer of 'B'; message refused"
    assert "id" not in rejected  # a retry of gone-1 is not taken for delivered
    assert offline.depth(state.queue_path("B")) == 0
    with client.Connection.open(pod.socket_path) as conn:
        assert any("gone-1" in a["message"] and "not delivered" in a["message"]
                   for a in conn.alerts), conn.alerts
    r = run_yoi("pod", "log", "B")
    assert "delivery rejected: queued message from A [gone-1]: 'A' is not a peer" in r.stdout
    # re-introduced, the same id is delivered (it never was)
    peers.register(state, "A", "B")
    r = run_yoi("pod", "send", "--from", "A", "--id", "gone-1", "B", "secret plan")
    assert r.exit_code == 0, r
    assert committed_ids(state, "B") == ["op-1", "gone-1"]


def test_a_queue_send_racing_starts_and_stops_never_strands_a_message(state, started_pod):
    store.create(state, "T")
    stop = threading.Event()
    outcomes: dict[str, str] = {}
    code = textwrap.dedent("""
        import json, sys
        from yoi import delivery
        from yoi.errors import YoiError
        from yoi.state import State
        state = State.resolve()
        for i in range(100000):
            try:
                r = delivery.send(state, "T", f"race {i}", msg_id=f"race-{i}", queue=True,
                                  timeout=5)
                print(json.dumps([r["id"], r["state"]]), flush=True)
            except YoiError as e:  # e.g. a send in doubt as the Pod stopped: say so
                print(json.dumps([f"race-{i}", "error:" + e.message]), flush=True)
            if sys.stdin.readline() != "more\\n":
                break
    """)
    sender = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def send_all():
        while not stop.is_set():
            line = sender.stdout.readline()
            if not line:
                return
            msg_id, outcome = json.loads(line)
            outcomes[msg_id] = outcome
            sender.stdin.write("more\n")
            sender.stdin.flush()

    t = threading.Thread(target=send_all)
    t.start()
    try:
        for _ in range(20):
            control.start(state, "T")
            # A live Pod leaves nothing queued: what a racing sender appended after the
            # Pod's first pass is drained by this very Pod (the sender asks it to, and
            # it looks every second), not by a later start.
            wait_for(lambda: offline.depth(state.queue_path("T")) == 0, timeout=5,
                     what="the live Pod to drain its queue")
            time.sleep(0.05)
            control.stop(state, "T")
    finally:
        stop.set()
        t.join(timeout=30)
        sender.stdin.close()
        sender.wait(timeout=30)
    started_pod("T")  # delivers what was queued while it was stopped
    ids = committed_ids(state, "T")
    assert len(ids) == len(set(ids))
    sent = [i for i, o in outcomes.items() if o in ("queued", "delivered")]
    assert len(sent) > 20 and {"queued", "delivered"} <= set(outcomes.values()), outcomes
    assert set(sent) <= set(ids)  # every message reported sent or queued arrived, once


# -- damage -------------------------------------------------------------------------------------

def test_doctor_on_a_torn_queue_tail_reports_and_moves_it_aside(run_yoi, state, started_pod):
    store.create(state, "T")
    offline.append(state, "T", queue_items(["d-1", "d-2"]))
    path = state.queue_path("T")
    with open(path, "ab") as f:
        f.write(b'{"id":"d-3","source":null,"mess')
    r = run_yoi("doctor")
    assert r.exit_code == 0, r  # a warning: a crash's leftover
    assert f"queue-torn T: the last record is torn (31 bytes without a newline) ({path}) " \
        "[warning, fixable with --fix]" in r.stdout, r
    r = run_yoi("doctor", "--fix")
    assert r.exit_code == 0 and "[warning, fixed]" in r.stdout, r
    [aside] = [p for p in path.parent.iterdir() if p.name.startswith("queue.jsonl.torn-")]
    assert aside.read_bytes() == b'{"id":"d-3","source":null,"mess'
    assert run_yoi("doctor").stdout.startswith("no problems"), r
    started_pod("T")
    assert committed_ids(state, "T") == ["d-1", "d-2"]


def test_a_crash_during_an_append_leaves_a_torn_tail_the_next_send_sets_aside(
        run_yoi, state):
    store.create(state, "T")
    assert run_yoi("pod", "send", "--queue", "--id", "a-1", "T", "one").exit_code == 0
    r = run_yoi("pod", "send", "--queue", "--id", "a-2", "T", "two",
                env={"YOI_FAULT": "queue-mid-append:crash"})
    assert r.exit_code == 137, r
    assert not state.queue_path("T").read_bytes().endswith(b"\n")
    r = run_yoi("pod", "send", "--queue", "--id", "a-3", "T", "three")
    assert r.exit_code == 0, r
    assert r.stderr.startswith("yoi: note: T's queue: its last record was torn"), r
    assert [rec["id"] for rec in offline.read(state.queue_path("T")).records] == ["a-1", "a-3"]


def test_doctor_drops_queued_ids_already_delivered_and_sets_aside_garbage(
        run_yoi, state, started_pod):
    store.create(state, "T")
    offline.append(state, "T", queue_items(["x-1", "x-2"]))
    started_pod("T")
    control.stop(state, "T")
    path = state.queue_path("T")
    # as if the Pod died between committing and emptying its queue, plus damage
    path.write_bytes(offline.record_line("x-2", "again", None) + b"not a record\n"
                     + offline.record_line("x-9", "new", None))
    r = run_yoi("doctor")
    assert r.exit_code == 1, r
    assert "queue-delivered T: 1 queued message(s) are in the session log already: x-2" \
        in r.stdout, r
    assert "queue-unreadable T: 1 line(s) are not message records: line 2" in r.stdout, r
    r = run_yoi("doctor", "--fix")
    assert r.exit_code == 0, r
    assert [rec["id"] for rec in offline.read(path).records] == ["x-9"]
    [bad] = [p for p in path.parent.iterdir() if p.name.startswith("queue.jsonl.bad-")]
    assert bad.read_bytes() == b"not a record\n"


PRECIOUS = offline.record_line("x-1", "precious", None, queued_at="2026-12-01T12:00:00Z")


def _no_queue_file(state, tmp_path, name: str, kind: str) -> str:
    """Put a KIND (directory, symlink) where NAME's queue goes; what commands then say."""
    path = state.queue_path(name)
    if kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(PRECIOUS)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.mkdir()
    return (f"{path} is a {kind}, not the Pod's message queue (never followed); move it "
            "out of the way (`yoi doctor` reports it)")


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_a_queue_that_is_no_file_is_named_by_each_command_and_never_followed(
        run_yoi, state, tmp_path, kind):
    store.create(state, "T")
    store.create(state, "U")
    offline.append(state, "U", queue_items(["u-1"]))
    problem = _no_queue_file(state, tmp_path, "T", kind)
    r = run_yoi("pod", "list")  # the others are still listed, T with its problem
    assert r.exit_code == 0, r
    assert [line.split() for line in r.stdout.splitlines()] == [
        ["NAME", "PEERS", "LIVE", "QUEUED", "STATE"], ["T", "0", "no", "?", "readable"],
        ["U", "0", "no", "1", "readable"]], r
    assert r.stderr == f"yoi: note: T's queue cannot be counted: {problem}\n", r
    r = run_yoi("pod", "list", "--json")
    t, u = r.json["pods"]
    assert (t["queued"], t["error"], u["queued"], u["error"]) == (None, problem, 1, None), r
    for args in (("pod", "status", "T"), ("pod", "log", "T", "--queued"),
                 ("pod", "send", "--queue", "T", "x")):
        r = run_yoi(*args)
        assert (r.exit_code, r.stdout, r.stderr) == (1, "", f"yoi: error: {problem}\n"), r
    r = run_yoi("pod", "start", "T")
    assert (r.exit_code, r.stderr) == (5, "yoi: error: Pod 'T' exited with status 1 while "
                                          f"starting; its log says: yoi: error: {problem}\n"), r
    r = run_yoi("doctor")
    what = "a symlink; never followed," if kind == "symlink" else "not a regular file,"
    assert r.exit_code == 1, r
    assert f"T: queue.jsonl is {what} so the Pod cannot start; move it out of the way " \
        f"({state.queue_path('T')})" in r.stdout, r
    if kind == "symlink":
        assert (tmp_path / "elsewhere").read_bytes() == PRECIOUS


def test_a_live_pod_s_drain_answers_and_goes_on_when_its_queue_is_no_file(
        state, tmp_path, started_pod):
    pod = started_pod("T")
    problem = _no_queue_file(state, tmp_path, "T", "directory")
    for _ in range(2):  # each request is answered, and the thread goes on
        answer = client.request_drain(pod.socket_path, ["q-1"], timeout=5)
        assert (answer["error"], answer["queued"]) == (problem, None), answer
        assert answer["ids"] == {"q-1": {"state": "queued"}}, answer
    r = subprocess.run(yoi_cmd() + ["pod", "status", "T"], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (1, f"yoi: error: {problem}\n"), r
    state.queue_path("T").rmdir()
    offline.append(state, "T", queue_items(["q-1"]))  # found by the look every second
    wait_for(lambda: committed_ids(state, "T") == ["q-1"], what="the drain to go on")
    with client.Connection.open(pod.socket_path) as conn:
        said = [a["message"] for a in conn.alerts if problem in a["message"]]
    assert said == [f"could not deliver the queued messages: {problem}; trying again"]


def test_the_pod_sets_aside_hostile_queue_lines_and_delivers_the_rest(state, started_pod):
    store.create(state, "T")
    path = state.queue_path("T")
    hostile = [b"[" * 100000, b'{"id":"../x","source":null,"message":"m","queued_at":"t"}',
               b'{"id":"ok-0","source":"no such/pod","message":"m","queued_at":"t"}',
               b'{"id":"ok-1","source":null,"message":"","queued_at":"t"}', b"\xff\xfe"]
    path.write_bytes(offline.record_line("ok-2", "fine", None) + b"\n".join(hostile) + b"\n"
                     + offline.record_line("ok-3", "fine too", None))
    pod = started_pod("T")
    assert committed_ids(state, "T") == ["ok-2", "ok-3"]
    [bad] = [p for p in path.parent.iterdir() if p.name.startswith("queue.jsonl.bad-")]
    assert bad.read_bytes() == b"\n".join(hostile) + b"\n"
    with client.Connection.open(pod.socket_path) as conn:
        assert any("5 line(s) that are not queue records" in a["message"]
                   for a in conn.alerts), conn.alerts
