"""`yoi pod send` against scripted servers on real sockets: the prelude, hostile peers."""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager

import pytest

import fake_pods
from fake_pods import fake  # noqa: F401  (fixture)
from yoi import client, peers, protocol, store

NOT_ACK = "not acknowledged: the message may or may not have been delivered; retry with --id"


def assert_failed(r, code: int, *fragments: str) -> None:
    assert r.exit_code == code, r
    assert "delivered" not in r.stdout, r
    assert r.stderr.startswith("yoi: error: "), r
    assert len(r.stderr.splitlines()) == 1, r
    for f in fragments:
        assert f in r.stderr, (f, r)


# -- regression: drain the prelude before writing --------------------------------

@pytest.mark.parametrize("script", [fake_pods.good, fake_pods.good_big_snapshot],
                         ids=["small-snapshot", "2MiB-snapshot"])
def test_send_drains_alert_and_snapshot_before_writing(cli, fake, script):
    pod = fake(script)
    r = cli("pod", "send", "--id", "seed-1", "B", "hello after the prelude")
    assert r.exit_code == 0, r
    assert r.stdout == "delivered to B as operator (id seed-1)\n"
    assert r.stderr == ""
    assert pod.early == []
    assert pod.methods == [("notify", {"message": "hello after the prelude", "id": "seed-1",
                                       "ack": "compact"})]


def test_strict_fake_catches_a_sender_that_writes_before_the_snapshot(state, fake):
    """The regression tests can fail: a naive sender loses its message to this fake."""
    pod = fake(fake_pods.good)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(os.fspath(state.default_socket_path("B")))
        s.sendall(protocol.notify_method("too early", "naive-1"))
        got = b""
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and b"naive-1" not in got:
            try:
                chunk = s.recv(1 << 16)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    assert b"naive-1" not in got
    assert pod.early and b"naive-1" in pod.early[0]
    assert pod.notified_ids() == []


def test_peer_message_carries_source_and_yoi_pod_is_the_default(cli, fake, state, monkeypatch):
    store.create(state, "A")
    pod = fake(fake_pods.good)
    peers.register(state, "A", "B")
    r = cli("pod", "send", "--from", "A", "--id", "p-1", "B", "one")
    assert r.exit_code == 0, r
    monkeypatch.setenv("YOI_POD", "A")
    r = cli("pod", "send", "--id", "p-2", "B", "two")
    assert r.exit_code == 0, r
    r = cli("pod", "send", "--from", "", "--id", "p-3", "B", "three")
    assert r.exit_code == 0, r
    assert pod.methods == [
        ("notify", {"message": "one", "id": "p-1", "source": "A", "ack": "compact"}),
        ("notify", {"message": "two", "id": "p-2", "source": "A", "ack": "compact"}),
        ("notify", {"message": "three", "id": "p-3", "ack": "compact"}),
    ]


def test_inside_a_handler_the_pods_state_dir_is_the_default(cli, fake, state, tmp_path):
    """A Pod sets $YOI_HOME (and $YOI_STATE_DIR, for information) for its handler:
    $YOI_STATE_DIR alone decides nothing, so every command agrees on the directory."""
    store.create(state, "A")
    pod = fake(fake_pods.good)
    peers.register(state, "A", "B")
    r = cli("pod", "send", "B", "x", env={"YOI_POD": "A", "YOI_STATE_DIR": str(state.root),
                                          "YOI_HOME": str(tmp_path / "elsewhere")})
    assert r.exit_code == 3, r  # no Pod A in $YOI_HOME, whatever $YOI_STATE_DIR says
    env = {"YOI_POD": "A", "YOI_HOME": str(state.root)}
    r = cli("pod", "send", "--id", "h-1", "B", "reply", env=env)
    assert r.exit_code == 0, r
    assert pod.methods == [("notify", {"message": "reply", "id": "h-1", "source": "A",
                                       "ack": "compact"})]
    r = cli("pod", "send", "--state-dir", str(tmp_path / "elsewhere"), "B", "x", env=env)
    assert r.exit_code == 3, r  # an explicit --state-dir still wins


def test_json_success_document(cli, fake):
    fake(fake_pods.good)
    r = cli("pod", "send", "--json", "--id", "j-1", "B", "hi")
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "pod_name": "B", "source": None, "id": "j-1",
                      "acknowledged": True, "at": "2026-11-27T10:00:00Z",
                      "deduplicates_retries": True, "state": "delivered"}


def test_fresh_ids_are_random_and_valid(cli, fake):
    pod = fake(fake_pods.good)
    ids = []
    for _ in range(2):
        r = cli("pod", "send", "--json", "B", "hi")
        assert r.exit_code == 0, r
        ids.append(r.json["id"])
    assert ids[0] != ids[1]
    assert all(protocol.is_valid_message_id(i) for i in ids)
    assert pod.notified_ids() == ids


def test_message_dash_reads_stdin_without_the_trailing_newline(cli, fake):
    pod = fake(fake_pods.good)
    r = cli("pod", "send", "--id", "s-1", "B", "-", input="line one\nline two\n")
    assert r.exit_code == 0, r
    assert pod.methods[0][1]["message"] == "line one\nline two"


def test_no_wait_returns_after_the_write(cli, fake):
    pod = fake(fake_pods.silent)
    r = cli("pod", "send", "--no-wait", "--id", "nw-1", "B", "fire and forget")
    assert r.exit_code == 0, r
    assert r.stdout == "sent to B as operator (id nw-1); no acknowledgement was awaited\n"
    deadline = time.monotonic() + 10
    while not pod.methods and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pod.notified_ids() == ["nw-1"]
    r = cli("pod", "send", "--no-wait", "--json", "--id", "nw-2", "B", "again")
    assert r.json == {"ok": True, "pod_name": "B", "source": None, "id": "nw-2",
                      "acknowledged": False, "at": None, "deduplicates_retries": True,
                      "state": "sent"}


# -- hostile servers ---------------------------------------------------------

def test_server_that_never_sends_a_snapshot_times_out(cli, fake):
    pod = fake(fake_pods.no_snapshot)
    r = cli("pod", "send", "--timeout", "0.5", "--id", "h-1", "B", "hi")
    assert_failed(r, 5, "timed out waiting for the connect-time snapshot",
                  "(after 0.5s); nothing was sent")
    assert pod.methods == []


def test_server_that_sends_garbage_is_malformed(cli, fake):
    pod = fake(fake_pods.garbage)
    r = cli("pod", "send", "--timeout", "1", "--id", "h-2", "B", "hi")
    assert_failed(r, 1, "malformed data from", "not valid JSON", "nothing was sent")
    assert pod.methods == []


@pytest.mark.parametrize("prelude,line", [
    (fake_pods.DEEP_PRELUDE, fake_pods.DEEP_EVENT),
    (fake_pods.HUGE_INT_EVENT, fake_pods.HUGE_INT_EVENT),
], ids=["nested-deep", "integer-of-5000-digits"])
def test_hostile_event_lines_are_malformed_not_a_traceback(cli, fake, prelude, line):
    pod = fake(fake_pods.hostile_prelude(prelude))
    r = cli("pod", "send", "--timeout", "5", "--id", "h-9", "B", "hi")
    assert_failed(r, 1, "malformed data from", "not valid JSON", "nothing was sent")
    assert pod.methods == []
    pod.stop()
    fake(fake_pods.hostile_answer(line))
    r = cli("pod", "send", "--timeout", "5", "--id", "h-10", "B", "hi")
    assert_failed(r, 1, "malformed data from", "not valid JSON", f"{NOT_ACK} h-10")
    r = cli("pod", "send", "--lines", "--timeout", "5", "--id", "h-11", "B", input="a\nb\n")
    assert r.exit_code == 1 and "malformed data from" in r.stderr, r


def test_server_that_closes_right_after_the_snapshot(cli, fake):
    fake(fake_pods.close_after_snapshot)
    r = cli("pod", "send", "--timeout", "1", "--id", "h-3", "B", "hi")
    assert_failed(r, 1, f"{NOT_ACK} h-3")


def test_server_that_closes_after_reading_the_method(cli, fake):
    pod = fake(fake_pods.close_after_method)
    r = cli("pod", "send", "--timeout", "1", "--id", "h-4", "B", "hi")
    assert_failed(r, 1, f"{NOT_ACK} h-4")
    assert pod.notified_ids() == ["h-4"]


def test_acknowledgement_of_another_id_is_not_ours(cli, fake):
    fake(fake_pods.ack_other_id)
    r = cli("pod", "send", "--timeout", "0.5", "--id", "h-5", "B", "hi")
    assert_failed(r, 5, "timed out waiting for the acknowledgement", "(after 0.5s)",
                  "may or may not have been delivered; retry with --id h-5")


def test_error_event_is_a_refusal(cli, fake):
    fake(fake_pods.answer_error)
    r = cli("pod", "send", "--timeout", "1", "--id", "h-6", "B", "hi")
    assert_failed(r, 4, "B refused the message: source is not a peer of this Pod "
                        "(invalid_request)")


def test_error_json_document(cli, fake):
    fake(fake_pods.answer_error)
    r = cli("pod", "send", "--json", "--timeout", "1", "--id", "h-7", "B", "hi")
    assert r.exit_code == 4
    err = r.json["error"]
    assert r.json["ok"] is False
    assert (err["code"], err["exit_code"], err["pod_error"], err["pod_name"]) == \
        ("refused", 4, "invalid_request", "B")


def test_malformed_acknowledgement(cli, fake):
    fake(fake_pods.garbage_after_method)
    r = cli("pod", "send", "--timeout", "1", "--id", "h-8", "B", "hi")
    assert_failed(r, 1, "malformed data from", f"{NOT_ACK} h-8")


def test_no_socket_means_not_running(cli, state):
    store.create(state, "B")
    r = cli("pod", "send", "--timeout", "1", "B", "hi")
    assert_failed(r, 5)
    assert r.stderr == "yoi: error: B is not running; start it with `yoi pod restore B`\n"


@contextmanager
def bound_socket(state, name: str):
    """A socket bound at NAME's socket path, accepting nothing; removed afterwards."""
    store.create(state, name)
    path = state.default_socket_path(name)
    fake_pods.make_private_dir(path.parent)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(path))
    try:
        yield s
    finally:
        s.close()
        os.unlink(path)


def test_stale_socket_file_means_not_running(cli, state):
    with bound_socket(state, "B") as s:
        s.close()  # the file stays; nobody listens
        r = cli("pod", "send", "--timeout", "1", "B", "hi")
    assert_failed(r, 5, "B is not running; start it with `yoi pod restore B`")


def test_listener_that_never_accepts_times_out(cli, state):
    with bound_socket(state, "B") as s:
        s.listen(8)
        r = cli("pod", "send", "--timeout", "0.5", "B", "hi")
    assert_failed(r, 5, "timed out waiting for the connect-time snapshot")


def test_socket_path_hint_in_metadata_is_used(cli, state, fake, tmp_path):
    store.create(state, "B")
    other = tmp_path / "elsewhere.sock"
    pod = fake_pods.FakePod(other, fake_pods.good, "B").start()
    try:
        store.update(state, "B", lambda d: {**d, "runtime": {"socket_path": str(other)}})
        r = cli("pod", "send", "--id", "hint-1", "B", "hi")
    finally:
        pod.stop()
    assert r.exit_code == 0, r
    assert pod.notified_ids() == ["hint-1"]


# -- the library helper directly ----------------------------------------------------

def test_request_and_overlong_snapshot_drain(state, fake):
    fake(fake_pods.good_big_snapshot)
    path = state.default_socket_path("B")
    with client.Connection.open(path, 5) as conn:
        assert conn.buf == bytearray()  # the 2 MiB line was not kept
        assert len(conn.alerts) == 1
    def acks_r1(name, data):
        return client.acknowledgement(name, data, True) == "r-1"

    name, data = client.request(path, protocol.method("notify", {"message": "m", "id": "r-1"}),
                                {"system_item"}, 5, match=acks_r1)
    assert (name, data["item"]["id"]) == ("system_item", "r-1")


def test_keep_snapshot_reads_a_large_snapshot_whole(state, fake):
    fake(fake_pods.good_big_snapshot)
    with client.Connection.open(state.default_socket_path("B"), 5, keep_snapshot=True) as c:
        entry = c.snapshot["entries"][0]
        assert len(entry["item"]["message"]) == 2 << 20


# -- a message written first: what decides the outcome -------------------------------

def test_a_relation_removed_after_the_write_does_not_turn_no_ack_into_refused(cli, fake,
                                                                             state):
    """The message was written and not acknowledged: it may be in, whatever the records
    say by the time the send gives up (a refusal would tell the script not to retry)."""
    store.create(state, "A")
    store.create(state, "B")
    peers.register(state, "A", "B")

    def takes_it_then_the_relation_goes(peer):
        peer.prelude()
        if peer.read_method() is not None:
            peers.unregister(state, "A", "B")
        while peer.read_method() is not None:
            pass

    pod = fake(takes_it_then_the_relation_goes)
    r = cli("pod", "send", "--from", "A", "B", "hello", "--timeout", "1", "--id", "m1")
    assert_failed(r, 5, "timed out waiting for the acknowledgement",
                  "may or may not have been delivered; retry with --id m1")
    assert pod.notified_ids() == ["m1"]


def test_an_operator_message_needs_the_targets_record(cli, fake, state):
    pod = fake(fake_pods.good)
    os.rename(state.pod_dir("B"), state.root / "B-moved")  # its socket still answers
    r = cli("pod", "send", "B", "hello", "--id", "op-1")
    assert_failed(r, 3, "no such Pod: B")
    assert pod.notified_ids() == []
    os.rename(state.root / "B-moved", state.pod_dir("B"))
    state.metadata_path("B").write_text("not = [toml")  # damaged: doctor's to report
    r = cli("pod", "send", "B", "hello", "--id", "op-2")
    assert r.exit_code == 0, r
    assert pod.notified_ids() == ["op-2"]


def test_a_failure_before_the_write_is_explained_by_the_records(cli, fake, state):
    """Nothing was sent (the Pod never finished its prelude): a send the records would
    have refused says so, as if they had been read first."""
    store.create(state, "A")
    pod = fake(fake_pods.no_snapshot)
    r = cli("pod", "send", "--from", "A", "B", "hello", "--timeout", "1", "--id", "m1")
    assert_failed(r, 4, "not a peer")
    assert pod.notified_ids() == []
