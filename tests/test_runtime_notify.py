"""notify: durable before acknowledged, idempotent by id, re-checked by the receiver."""

from __future__ import annotations

import json
import threading

import pytest
from rawsock import Raw

from yoi import peers, protocol
from yoi.client import notify
from yoi.errors import Refused


def log_entries(state, name) -> list[dict]:
    return [json.loads(x) for x in state.session_path(name).read_bytes().splitlines()]


def test_acknowledged_notification_is_already_in_the_log(state, started_pod):
    pod = started_pod("a")
    for i in range(5):
        ack = notify(pod.socket_path, f"m{i}", f"id-{i}")
        # at acknowledgement time the entry is on disk, exactly as broadcast
        assert log_entries(state, "a")[-1] == ack
        assert ack["seq"] == i + 1 and ack["kind"] == "system_item" and ack["id"] == f"id-{i}"
    item = log_entries(state, "a")[0]["item"]
    assert set(item) == {"kind", "message", "body", "id", "at"}  # operator: no source key
    assert item["message"] == "m0"
    assert item["body"] == protocol.notification_body("m0")
    assert item["at"].endswith("Z")


def test_same_id_twice_one_entry_two_acknowledgements(state, started_pod):
    pod = started_pod("a")
    first = notify(pod.socket_path, "once", "dup-1")
    second = notify(pod.socket_path, "once (retry)", "dup-1")
    assert second == first  # the original item, re-sent
    assert len(log_entries(state, "a")) == 1
    # pipelined on one connection, before the first is committed: still one entry
    with Raw(pod.socket_path) as c:
        c.prelude()
        line = protocol.method("notify", {"message": "x", "id": "dup-2"})
        c.send(line + line + line)
        acks = [c.until("system_item")[0] for _ in range(3)]
    assert all(a["data"]["item"]["id"] == "dup-2" for a in acks)
    assert acks[0] == acks[1] == acks[2]
    assert [e["item"]["id"] for e in log_entries(state, "a")] == ["dup-1", "dup-2"]


def test_ids_survive_a_restart(state, run_yoi, started_pod):
    pod = started_pod("a")
    first = notify(pod.socket_path, "before restart", "keep-1")
    assert run_yoi("pod", "stop", "a").exit_code == 0
    pod = started_pod("a")
    assert notify(pod.socket_path, "after restart", "keep-1") == first
    assert len(log_entries(state, "a")) == 1


def test_every_client_sees_the_broadcast_sender_included(started_pod):
    pod = started_pod("a")
    with Raw(pod.socket_path) as watcher, Raw(pod.socket_path) as sender:
        watcher.prelude()
        sender.prelude()
        sender.send({"method": "notify", "params": {"message": "hello", "id": "b-1"}})
        got = [c.until("system_item")[0] for c in (sender, watcher)]
    assert got[0] == got[1]


def compact(message: str, msg_id: str | None) -> bytes:
    params = {"message": message, "ack": "compact"}
    if msg_id is not None:
        params["id"] = msg_id
    return protocol.method("notify", params)


def test_a_compact_ack_replaces_the_senders_broadcast(state, started_pod):
    """(ours) "ack": "compact" is answered with an ``ack`` {id, seq, at, state} after
    the fsync, instead of the entry's broadcast; everyone else still gets that."""
    pod = started_pod("a")
    with Raw(pod.socket_path) as watcher, Raw(pod.socket_path) as sender:
        watcher.prelude()
        sender.prelude()
        sender.send(compact("hello", "c-1"))
        ack, seen = sender.until("ack")
        entry = log_entries(state, "a")[-1]  # on disk when acknowledged
        assert ack == {"event": "ack", "data": {"id": "c-1", "seq": entry["seq"],
                                                "at": entry["at"], "state": "committed"}}
        assert watcher.until("system_item")[0]["data"] == entry
        # the sender never gets the entry itself: the next thing it sees is its next answer
        sender.send({"method": "notify", "params": {"message": "full", "id": "c-2"}})
        full, seen = sender.until("system_item")
        assert [e["event"] for e in seen] == ["system_item"]
        assert full["data"]["id"] == "c-2"
        # a retry: acknowledged again, as a duplicate of the same entry, nothing committed
        sender.send(compact("hello (retry)", "c-1"))
        assert sender.until("ack")[0]["data"] == {**ack["data"], "state": "duplicate"}
        # pipelined, before the first is committed: one entry, the others duplicates
        sender.send(compact("x", "c-3") * 3)
        acks = [sender.until("ack")[0]["data"] for _ in range(3)]
        assert [a["state"] for a in acks] == ["committed", "duplicate", "duplicate"]
        assert len({(a["seq"], a["at"]) for a in acks}) == 1
        # without an id there is nothing to acknowledge compactly: the broadcast
        sender.send(compact("anonymous", None))
        assert sender.until("system_item")[0]["data"]["item"]["message"] == "anonymous"
    assert [e["item"]["message"] for e in log_entries(state, "a")] == [
        "hello", "full", "x", "anonymous"]


@pytest.mark.parametrize("fault, ending", [("session-before-fsync:crash", "closed"),
                                           ("session-before-fsync:eio", "error")])
def test_a_compact_ack_is_sent_only_after_the_fsync(started_pod, fault, ending):
    pod = started_pod("a", env={"YOI_FAULT": fault})
    seen = []
    with Raw(pod.socket_path) as sender:
        sender.prelude()
        sender.send(compact("hello", "f-1"))
        try:
            while True:
                seen.append(sender.event())
                if seen[-1]["event"] == "error":
                    break
        except EOFError:
            seen.append("closed")
    assert "ack" not in [e["event"] for e in seen if isinstance(e, dict)]
    if ending == "closed":
        assert seen == ["closed"]
    else:
        assert seen[-1]["data"]["code"] == "internal"


def test_a_reader_that_falls_behind_gets_every_event_whole_and_in_order(state, started_pod):
    """Events queued for a client leave in writes of many pieces (more than one
    sendmsg can take) that the socket takes in part: none is lost, cut or reordered."""
    from yoi.client import notify_pipelined
    from yoi.server.connection import IOV_MAX
    pod = started_pod("a")
    n = IOV_MAX * 3
    with Raw(pod.socket_path) as watcher:
        watcher.prelude()  # then reads nothing while the events pile up
        ids = [f"slow-{i}" for i in range(n)]
        lines = [protocol.notify_method(f"message {i} " + "y" * (i % 300), mid)
                 for i, mid in enumerate(ids)]
        batch = notify_pipelined(pod.socket_path, lines, ids, timeout=30)
        assert batch.failure is None and batch.acked == n
        got = [watcher.until("system_item")[0]["data"] for _ in range(n)]
    assert got == log_entries(state, "a")
    assert [e["id"] for e in got] == ids


def test_concurrent_senders_each_committed_exactly_once(state, started_pod):
    pod = started_pod("a")
    errors = []

    def send(t):
        try:
            for i in range(25):
                notify(pod.socket_path, f"{t}/{i}", f"t{t}-{i}", timeout=30)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    ids = [e["item"]["id"] for e in log_entries(state, "a")]
    assert sorted(ids) == sorted(f"t{t}-{i}" for t in range(8) for i in range(25))


def test_receiver_refuses_a_source_that_is_not_its_peer(state, run_yoi, started_pod):
    run_yoi("pod", "create", "stranger")
    pod = started_pod("a")
    before = state.session_path("a").read_bytes()
    with pytest.raises(Refused) as e:
        notify(pod.socket_path, "let me in", "s-1", source="stranger")
    assert e.value.message == ("refused by the Pod: 'stranger' is not a peer of 'a'; "
                               "message refused (invalid_request)")
    assert state.session_path("a").read_bytes() == before  # nothing committed
    # a sender that lists the receiver one-sidedly is refused just the same
    with pytest.raises(Refused):
        notify(pod.socket_path, "me neither", "s-2", source="ghost")
    assert state.session_path("a").read_bytes() == before


def test_receiver_refuses_a_one_sided_relation_it_holds_itself(state, run_yoi, started_pod):
    """The receiver lists the sender, but the sender does not list it back (a register
    interrupted between its two writes): that is no relation, so nothing is committed."""
    from yoi import store
    run_yoi("pod", "create", "b")
    pod = started_pod("a")
    store.update(state, "a", lambda d: d | {"peers": [{"pod_name": "b"}]})
    before = state.session_path("a").read_bytes()
    with pytest.raises(Refused) as e:
        notify(pod.socket_path, "half a relation", "o-1", source="b")
    assert "'b' is not a peer of 'a'" in e.value.message
    assert state.session_path("a").read_bytes() == before
    # a corrupt sender record is refused with a reason, not an internal error
    state.metadata_path("b").write_text("not = [toml")
    with pytest.raises(Refused) as e:
        notify(pod.socket_path, "half a relation", "o-2", source="b")
    assert "cannot check the peer relation with 'b'" in e.value.message
    assert state.session_path("a").read_bytes() == before


def test_peer_changes_while_running_take_effect_at_once(state, run_yoi, started_pod):
    run_yoi("pod", "create", "b")
    pod = started_pod("a")
    with pytest.raises(Refused):
        notify(pod.socket_path, "early", "p-0", source="b")
    peers.register(state, "b", "a")
    ack = notify(pod.socket_path, "now a peer", "p-1", source="b")
    assert ack["item"]["source"] == "b"
    assert ack["item"]["body"] == protocol.notification_body("[Peer message from `b`]\nnow a peer")
    peers.unregister(state, "a", "b")
    with pytest.raises(Refused):
        notify(pod.socket_path, "gone again", "p-2", source="b")
    assert [e["item"]["id"] for e in log_entries(state, "a")] == ["p-1"]


def test_sigterm_finishes_commits_in_progress(state, started_pod):
    """Every acknowledged notification is in the log after SIGTERM; the Pod exits 0."""
    import os
    import signal
    import time
    pod = started_pod("a")
    acked = []
    with Raw(pod.socket_path) as c:
        c.prelude()
        c.send(b"".join(protocol.method("notify", {"message": str(i), "id": f"q-{i}"})
                        for i in range(200)))
        os.kill(pod.pid, signal.SIGTERM)
        try:
            while True:
                ev = c.event()
                if ev["event"] == "system_item":
                    acked.append(ev["data"]["item"]["id"])
                if ev["event"] == "shutdown":
                    break
        except EOFError:
            pass
    deadline = time.monotonic() + 10
    while os.path.exists(pod.socket_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    ids = [e["item"]["id"] for e in log_entries(state, "a")]
    assert ids[:len(acked)] == acked
    assert set(acked) <= set(ids)


def test_a_failed_fsync_commits_nothing_and_a_retry_succeeds(state, started_pod):
    from yoi.client import PodFailed
    pod = started_pod("a", env={"YOI_FAULT": "session-before-fsync:eio:1"})
    with pytest.raises(PodFailed) as e:  # a failure of the Pod (exit 1), not a refusal
        notify(pod.socket_path, "unlucky", "e-1")
    assert e.value.exit_code == 1 and e.value.details["pod_error"] == "internal"
    assert "not committed" in e.value.message
    assert state.session_path("a").read_bytes() == b""  # the failed write was cut away
    ack = notify(pod.socket_path, "unlucky", "e-1")  # the sender's retry
    assert log_entries(state, "a") == [ack]


def test_a_retry_of_a_committed_id_is_acknowledged_when_a_write_fails(state, started_pod):
    """The message is durable already: the failure of the batch beside it, or a log
    that takes nothing more, does not turn its acknowledgement into an error."""
    pod = started_pod("a", env={"YOI_FAULT": "session-before-fsync:eio:2"})
    first = notify(pod.socket_path, "kept", "w-1")
    with Raw(pod.socket_path) as c:
        c.prelude()
        c.send(compact("kept (retry)", "w-1") + compact("new", "w-2"))
        seen = [c.event()]
        while {"ack", "error"} - {e["event"] for e in seen}:
            seen.append(c.event())
    acks = [e["data"] for e in seen if e["event"] == "ack"]
    errors = [e["data"] for e in seen if e["event"] == "error"]
    assert acks == [{"id": "w-1", "seq": first["seq"], "at": first["at"],
                     "state": "duplicate"}]
    assert errors[0]["code"] == "internal" and errors[0]["committed"] is False
    assert [e["id"] for e in log_entries(state, "a")] == ["w-1"]


def test_a_crash_in_the_middle_of_an_append_leaves_a_recoverable_log(state, started_pod):
    from yoi.errors import Failed
    pod = started_pod("a", env={"YOI_FAULT": "session-mid-write:crash"})
    with pytest.raises(Failed) as e:
        notify(pod.socket_path, "lost in the crash", "c-1")
    assert e.value.message == ("not acknowledged: the message may or may not have been "
                               "delivered; retry with --id c-1")
    torn = state.session_path("a").read_bytes()
    assert torn and not torn.endswith(b"\n")
    pod = started_pod("a")  # the stale socket and the torn line do not stop it
    with Raw(pod.socket_path) as c:
        alerts, _ = c.prelude()
        assert "ended with a torn line" in alerts[0]["data"]["message"]
    # the torn bytes are kept aside, never deleted, and out of the log
    aside = list(state.pod_dir("a").glob("session.jsonl.torn-*"))
    assert [p.read_bytes() for p in aside] == [torn]
    ack = notify(pod.socket_path, "lost in the crash", "c-1")
    assert log_entries(state, "a") == [ack]


def test_a_sender_that_closes_right_after_writing_is_still_heard(state, started_pod):
    """`send --no-wait`: write the notify, close at once. Broadcasts that the Pod
    can no longer write to that client must not make it drop what it received."""
    import time
    from yoi.client import notify_pipelined
    pod = started_pod("a")
    stop = threading.Event()
    flowing = []

    def broadcasts():  # a steady stream of system_items to every client
        round_ = 0
        while not stop.is_set():
            ids = [f"flow-{round_}-{i}" for i in range(50)]
            lines = [protocol.notify_method("flow", mid) for mid in ids]
            batch = notify_pipelined(pod.socket_path, lines, ids, timeout=30)
            flowing.append(batch.failure)
            round_ += 1

    flow = threading.Thread(target=broadcasts)
    flow.start()
    try:
        sent = []
        for i in range(300):
            notify(pod.socket_path, f"fire {i}", f"fire-{i}", wait=False)
            sent.append(f"fire-{i}")
    finally:
        stop.set()
        flow.join(60)
    assert flowing and not any(flowing)
    deadline = time.monotonic() + 20
    while True:
        ids = {e["item"]["id"] for e in log_entries(state, "a")}
        missing = [mid for mid in sent if mid not in ids]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert missing == []


@pytest.mark.parametrize("close", ["half-close", "close"])
def test_a_client_far_ahead_is_held_back_but_everything_it_wrote_is_committed(
        state, started_pod, close):
    """A sender may write thousands of notifies before reading anything: the Pod works
    on a bounded number at a time (its memory does not follow the client's window),
    leaves the rest unread until then, and still commits every line written before
    the client closed, whether it half-closes or closes outright."""
    import socket
    import time
    from yoi.server.connection import PENDING_LIMIT
    pod = started_pod("a")
    n = PENDING_LIMIT * 8
    with Raw(pod.socket_path) as c:
        c.prelude()
        c.send(b"".join(protocol.method("notify", {"message": f"m{i}", "id": f"far-{i}"})
                        for i in range(n)))
        if close == "half-close":
            c.sock.shutdown(socket.SHUT_WR)
            acked = set()
            while len(acked) < n:
                ev = c.event()
                if ev["event"] == "system_item":
                    acked.add(ev["data"]["id"])
            assert acked == {f"far-{i}" for i in range(n)}
    deadline = time.monotonic() + 30
    while len(log_entries(state, "a")) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["id"] for e in log_entries(state, "a")] == [f"far-{i}" for i in range(n)]
