"""`yoi pod send --lines`: pipelined messages over one connection, against scripted servers."""

from __future__ import annotations

import pytest

import fake_pods
from fake_pods import fake  # noqa: F401  (fixture)
from yoi import client, protocol
from yoi.errors import Refused


def numbered(n: int, start: int = 1) -> str:
    return "".join(f"message {i}\n" for i in range(start, start + n))


def test_lines_are_sent_in_order_with_line_numbered_ids(cli, fake):
    pod = fake(fake_pods.good)
    r = cli("pod", "send", "--lines", "--id", "run", "B", input=numbered(1000))
    assert r.exit_code == 0, r
    assert r.stdout == "delivered 1000 messages to B as operator (ids run-1 .. run-1000)\n"
    assert pod.methods == [("notify", {"message": f"message {i}", "id": f"run-{i}",
                                       "ack": "compact"}) for i in range(1, 1001)]
    assert pod.connections == 1


def test_blank_lines_are_skipped_but_counted(cli, fake):
    pod = fake(fake_pods.good)
    r = cli("pod", "send", "--lines", "--json", "--id", "b", "B", "-",
            input="first\n\n   \nfourth\r\nfifth")
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "pod_name": "B", "source": None, "id_prefix": "b",
                      "messages": 3, "first_id": "b-1", "last_id": "b-5", "lines_read": 5,
                      "skipped_blank": 2, "acknowledged": True, "acknowledged_count": 3,
                      "interrupted": False, "deduplicates_retries": True,
                      "state": "delivered"}
    assert [(p["id"], p["message"]) for _, p in pod.methods] == \
        [("b-1", "first"), ("b-4", "fourth"), ("b-5", "fifth")]


def test_random_prefix_when_no_id(cli, fake):
    pod = fake(fake_pods.good)
    r = cli("pod", "send", "--lines", "--json", "B", input="one\n")
    assert r.exit_code == 0, r
    prefix = r.json["id_prefix"]
    assert protocol.is_valid_message_id(prefix)
    assert pod.notified_ids() == [f"{prefix}-1"]
    assert r.json["first_id"] == f"{prefix}-1"


def test_a_flooding_server_does_not_deadlock_the_sender(cli, fake):
    """Each ack comes with ~130 KiB of unrelated broadcasts the sender must keep reading."""
    pod = fake(fake_pods.chatty)
    pad = "z" * 2000  # 600 KB in all: more than the socket buffers hold
    data = "".join(f"{i} {pad}\n" for i in range(1, 301))
    r = cli("pod", "send", "--lines", "--id", "c", "--timeout", "5", "B", input=data)
    assert r.exit_code == 0, r
    assert pod.notified_ids() == [f"c-{i}" for i in range(1, 301)]


def test_large_unrelated_broadcasts_are_read_through(cli, fake):
    def script(peer):
        peer.prelude()
        big = {"message": "b" * (3 << 20), "id": "someone-else"}
        while (got := peer.read_method()) is not None:
            peer.ack(big)
            peer.ack(got[1])

    pod = fake(script)
    r = cli("pod", "send", "--lines", "--id", "g", "B", input=numbered(3))
    assert r.exit_code == 0, r
    assert pod.notified_ids() == ["g-1", "g-2", "g-3"]


def test_closed_midway_names_what_is_in_doubt(cli, fake):
    pod = fake(fake_pods.close_after(10))
    r = cli("pod", "send", "--lines", "--json", "--id", "k", "--timeout", "2", "B",
            input=numbered(50))
    assert r.exit_code == 1, r
    doc, err = r.json, r.json["error"]
    assert doc["acknowledged_count"] == 10
    assert doc["acknowledged"] is False
    assert doc["refused"] == []
    doubt = doc["not_acknowledged"] + doc["not_sent"]
    assert sorted(doubt, key=lambda i: int(i[2:])) == [f"k-{i}" for i in range(11, 51)]
    assert "k-11" in doc["not_acknowledged"]
    assert err["message"].startswith("40 of 50 messages to B not acknowledged; "
                                     "the Pod closed the connection")
    assert err["message"].endswith("; retry with --id k over the same input "
                                   "(what was delivered is not delivered again)")
    assert pod.notified_ids()[:11] == [f"k-{i}" for i in range(1, 12)]


def test_refusal_stops_the_stream_and_exits_4(cli, fake):
    fake(fake_pods.close_after(5, refuse=True))
    r = cli("pod", "send", "--lines", "--json", "--id", "f", "--timeout", "2", "B",
            input=numbered(20))
    assert r.exit_code == 4, r
    doc, err = r.json, r.json["error"]
    assert doc["acknowledged_count"] == 5
    assert doc["refused"][0] == "f-6"
    assert doc["not_acknowledged"] == []
    assert sorted(doc["refused"] + doc["not_sent"], key=lambda i: int(i[2:])) == \
        [f"f-{i}" for i in range(6, 21)]
    assert err["message"].startswith("15 of 20 messages to B not acknowledged; "
                                     "B refused f-6: source is not a peer of this Pod "
                                     "(invalid_request)")
    assert r.stderr.startswith("yoi: error: 15 of 20 messages")


def test_silent_server_times_out_with_everything_in_doubt(cli, fake):
    fake(fake_pods.silent)
    r = cli("pod", "send", "--lines", "--json", "--id", "s", "--timeout", "0.5", "B",
            input=numbered(3))
    assert r.exit_code == 5, r
    assert r.json["not_acknowledged"] == ["s-1", "s-2", "s-3"]
    assert "timed out after 0.5s without progress" in r.json["error"]["message"]


def test_no_wait_is_refused_with_lines(cli, fake):
    pod = fake(fake_pods.good)
    r = cli("pod", "send", "--lines", "--no-wait", "B", input=numbered(3))
    assert r.exit_code == 2, r
    assert "--no-wait cannot be used with --lines" in r.stderr
    assert pod.connections == 0


def test_an_error_that_overtakes_an_acknowledgement_refuses_the_right_message(state, fake):
    """The Pod refuses at once but acknowledges after its commit: errors carry no id."""

    def script(peer):
        peer.prelude()
        first, _second = peer.read_method(), peer.read_method()
        peer.event("error", {"code": "invalid_request", "message": "not a peer"})
        peer.ack(first[1])
        peer.hang()

    fake(script)
    ids = ["o-1", "o-2"]
    lines = [protocol.notify_method(f"m{i}", mid) for i, mid in enumerate(ids)]
    batch = client.notify_pipelined(state.default_socket_path("B"), lines, ids, timeout=5)
    assert batch.with_status(client.ACKED) == ["o-1"]
    assert batch.with_status(client.REFUSED) == ["o-2"]
    assert isinstance(batch.failure, Refused)


def test_a_bad_line_stops_the_stream_there(cli, fake):
    """Lines are sent as they are read, so the lines before a bad one are delivered;
    nothing from the bad line on is sent, and the report says where it stopped."""
    pod = fake(fake_pods.good)
    big = "y" * (protocol.MAX_METHOD_LINE + 1)
    r = cli("pod", "send", "--lines", "--json", "--id", "v", "B",
            input=f"fine\n{big}\nfine too\n")
    assert r.exit_code == 2, r
    assert r.stderr.startswith("yoi: error: 1 of 1 messages to B acknowledged; "
                               "line 2: message too long"), r
    assert str(protocol.MAX_METHOD_LINE) in r.stderr
    assert pod.notified_ids() == ["v-1"]
    assert (r.json["acknowledged_count"], r.json["lines_read"]) == (1, 2)
    assert r.json["error"]["code"] == "usage"


@pytest.mark.parametrize("data", ["", "\n\n  \n"], ids=["empty", "blank"])
def test_no_messages_is_a_usage_error(cli, fake, data):
    pod = fake(fake_pods.good)
    r = cli("pod", "send", "--lines", "B", input=data)
    assert r.exit_code == 2, r
    assert "no messages" in r.stderr
    assert pod.methods == []


def test_lines_rejects_a_message_argument(cli, fake):
    fake(fake_pods.good)
    r = cli("pod", "send", "--lines", "B", "hello")
    assert r.exit_code == 2
    assert "--lines reads the messages from stdin" in r.stderr


def test_prefix_too_long_for_the_line_numbers(cli, fake):
    fake(fake_pods.good)
    r = cli("pod", "send", "--lines", "--id", "p" * 127, "B", input="a\nb\n")
    assert r.exit_code == 2, r
    assert "invalid --id prefix" in r.stderr


def test_pipelined_library_call_reports_each_status(state, fake):
    fake(fake_pods.close_after(2))
    ids = [f"x-{i}" for i in range(4)]
    lines = [protocol.notify_method(f"m{i}", mid) for i, mid in enumerate(ids)]
    batch = client.notify_pipelined(state.default_socket_path("B"), lines, ids, timeout=2)
    assert batch.acked == 2
    assert batch.with_status(client.ACKED) == ["x-0", "x-1"]
    assert isinstance(batch.failure, client.Closed)


def test_unacknowledged_bytes_in_flight_are_bounded(state, fake):
    """A Pod echoes each message in its acknowledgement and disconnects a client that
    lets 16 MiB of events pile up: the sender keeps at most 4 MiB unacknowledged."""
    seen = []

    def slow_to_answer(peer):  # reads everything it can for a while before answering
        import time
        peer.prelude()
        got = []
        deadline = time.monotonic() + 1.0
        while True:
            m = peer.read_method(timeout=max(0.01, deadline - time.monotonic()))
            if m is None:
                break
            got.append(m)
        seen.append(sum(len(protocol.notify_method(p["message"], p["id"])) for _, p in got))
        for _, params in got:
            peer.ack(params)
        while (m := peer.read_method()) is not None:
            peer.ack(m[1])

    fake(slow_to_answer)
    ids = [f"big-{i}" for i in range(40)]
    lines = [protocol.notify_method("x" * 500_000, mid) for mid in ids]
    batch = client.notify_pipelined(state.default_socket_path("B"), lines, ids, timeout=10)
    assert batch.failure is None and batch.acked == 40
    assert 0 < seen[0] <= client.MAX_IN_FLIGHT
