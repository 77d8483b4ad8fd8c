"""Speaking the original Yoi's wire, both ways (golden tests against ``original_shapes``).

Our Pod's every line must parse as both generations of the original's types;
the original's Pod (``fake_pods.original``: no ids, peer messages with the
header in the message, its own snapshot entries) must be usable by our
client; and the original's form of a peer message must be attributed and
checked by our Pod.
"""

from __future__ import annotations

import json
import re

import fake_pods
from fake_pods import fake  # noqa: F401  (fixture)
import original_shapes as shapes
import pytest
from rawsock import Raw

from yoi import client, metadata, peers, protocol, store
from yoi.errors import Refused

NOTE = ("yoi: note: B cannot deduplicate retries (it announces no message ids): sending "
        "again would deliver twice\n")
# item.body of a notification, spelled out as the original writes it
BODY = ("[Notification]\n{}\n\nThis is a notification, not a blocking request. If you are in "
        "the middle of a task, continue your current work and address this at a natural "
        "stopping point.")
SEGMENTS = [{"kind": "text", "content": "hello "}, {"kind": "text", "content": "pod"}]
WORKER_EVENTS = {"workers_listed", "worker_restored"}


class Lines:
    """A raw client that keeps every line it reads, as received."""

    def __init__(self, path):
        self.raw = Raw(path)
        self.lines: list[bytes] = []

    def event(self) -> dict:
        line = self.raw.read_line()
        self.lines.append(line)
        return json.loads(line)

    def until(self, name: str, pred=None) -> dict:
        while True:
            ev = self.event()
            if ev["event"] == name and (pred is None or pred(ev.get("data"))):
                return ev

    def prelude(self) -> dict:
        return self.until("snapshot")

    def ask(self, obj, answer: str, pred=None) -> dict:
        self.raw.send(obj)
        return self.until(answer, pred)

    def idle(self) -> None:
        self.until("status", lambda d: d["status"] == "idle")

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc) -> None:
        self.raw.close()


def check_both(line: bytes) -> None:
    for generation in shapes.GENERATIONS:
        shapes.event(line, generation)


def test_every_line_our_pod_writes_parses_as_both_generations_of_the_original(
        state, run_yoi, started_pod):
    for name in ("a", "b", "c"):
        run_yoi("pod", "create", name)
    peers.register(state, "a", "b")
    pod = started_pod("a", exec='msg=$(cat); case "$msg" in fail*) exit 3 ;; esac; '
                               'printf "%s" "$msg"')
    watcher, asker = Lines(pod.socket_path), Lines(pod.socket_path)
    try:
        watcher.prelude()
        snap = asker.prelude()
        assert snap["data"]["greeting"]["pod_name"] == snap["data"]["greeting"]["worker_name"]

        asker.ask({"method": "run", "params": {"input": SEGMENTS}}, "run_end")
        asker.idle()
        asker.ask({"method": "run", "params": {"input": [{"content": "no kind"}]}},
                  "user_message")
        asker.idle()
        asker.ask({"method": "notify", "params": {"message": "operator", "id": "m-1"}},
                  "system_item")
        asker.idle()
        asker.ask({"method": "notify", "params": {"message": "ours", "id": "m-2",
                                                  "source": "b"}}, "system_item")
        asker.idle()
        header = asker.ask({"method": "notify", "params": {
            "message": "[Peer message from `b`]\nthe original's form"}}, "system_item")
        assert header["data"]["item"]["source"] == "b"
        asker.idle()
        asker.ask({"method": "notify", "params": {"message": "fail now"}}, "alert")
        asker.idle()

        listed = asker.ask({"method": "list_pods"}, "pods_listed")
        assert [p["pod_name"] for p in listed["data"]["pods"]] == ["a", "b"]
        workers = asker.ask({"method": "list_workers"}, "workers_listed")
        assert [(w["worker_name"], w["pod_name"], w["visibility"])
                for w in workers["data"]["workers"]] == [("a", "a", "self_pod"),
                                                         ("b", "b", "peer")]
        restored = asker.ask({"method": "restore_pod", "params": {"name": "b"}},
                             "pod_restored")
        assert restored["data"]["result"]["action"] == "restored"
        again = asker.ask({"method": "restore_worker", "params": {"name": "b"}},
                          "worker_restored")
        assert again["data"]["result"] == {
            "action": "already_live", "pod_name": "b", "worker_name": "b",
            "socket_path": str(state.default_socket_path("b"))}
        asker.ask({"method": "restore_pod", "params": {"name": "a"}}, "pod_restored")
        asker.ask({"method": "register_peer", "params": {"name": "c"}}, "peer_registered")
        asker.ask({"method": "unregister_peer", "params": {"name": "c"}}, "peer_unregistered")
        asker.ask({"method": "cancel"}, "error")
        asker.ask({"method": "register_peer", "params": {"name": "ghost"}}, "error")

        later = Lines(pod.socket_path)  # a client that comes later: replayed alert, snapshot
        snap = later.prelude()
        later.raw.close()
        assert [json.loads(x)["event"] for x in later.lines] == ["alert", "snapshot"]
        assert json.loads(later.lines[0])["data"]["source"] == "worker"
        logged = [json.loads(x) for x in state.session_path("a").read_bytes().splitlines()]
        assert {"handler_result", "run_end"} <= {e["kind"] for e in logged}
        # entries of kinds the original does not know are held back from the snapshot
        assert snap["data"]["entries"] == [e for e in logged
                                           if e["kind"] in ("system_item", "user_message")]
        assert len(snap["data"]["entries"]) == 6
        with client.Connection.open(pod.socket_path, 10) as conn:
            assert conn.supports == {"id", "source", "compact_ack"}

        asker.raw.send({"method": "shutdown"})
        watcher.until("shutdown")
        asker.until("shutdown")
    finally:
        watcher.raw.close()
        asker.raw.close()

    # Everything every client was sent parses in both generations ...
    for line in watcher.lines + later.lines:
        check_both(line)
    assert {json.loads(x)["event"] for x in watcher.lines} >= {
        "snapshot", "status", "user_message", "text_done", "run_end", "system_item", "alert",
        "peer_registered", "shutdown"}
    # ... and the answers to the asker parse in the generation that asked.
    for line in asker.lines:
        name = json.loads(line)["event"]
        if name in WORKER_EVENTS:
            shapes.event(line, shapes.AUGUST)
        elif name in ("pods_listed", "pod_restored", "peer_unregistered"):
            shapes.event(line, shapes.JUNE, ours=True)
        else:
            check_both(line)


def test_a_snapshot_read_from_the_log_at_start_holds_back_unknown_kinds(state, run_yoi,
                                                                       started_pod):
    """Of the last 1,000 entries, those of kinds the original knows, also after a start."""
    from yoi.session import Entry
    run_yoi("pod", "create", "a")
    lines = []
    for seq in range(1, 1201):
        kind = ("text_done", "run_end", "system_item", "user_message")[seq % 4]
        fields = {"text_done": {"text": "t"}, "run_end": {"result": "finished"},
                  "system_item": {"item": {"kind": "notification", "message": f"m{seq}",
                                           "body": BODY.format(f"m{seq}")}},
                  "user_message": {"segments": [{"kind": "text", "content": f"u{seq}"}]}}
        lines.append(Entry(kind, fields[kind]).line(seq))
    state.session_path("a").write_bytes(b"".join(lines))
    pod = started_pod("a")
    with Lines(pod.socket_path) as c:
        snap = c.prelude()
    check_both(c.lines[-1])
    assert [e["seq"] for e in snap["data"]["entries"]] == [
        seq for seq in range(201, 1201) if seq % 4 in (2, 3)]


def test_a_log_of_an_older_version_gives_a_snapshot_the_original_reads(state, run_yoi,
                                                                        started_pod):
    """Older versions stored a `run`'s segments as sent (no `kind`), and other versions
    could leave entries the original cannot read: the snapshot mends the first and
    holds back the rest; the log is not rewritten."""
    run_yoi("pod", "create", "a")
    old = [
        b'{"seq":1,"kind":"user_message","ts":1764590000000,"at":"2025-12-01T11:53:20Z",'
        b'"segments":[{"content":"old"}]}',
        b'{"seq":2,"kind":"user_message","ts":1764590000000,"at":"2025-12-01T11:53:20Z",'
        b'"segments":[{"kind":"image","url":"x"}]}',
        b'{"seq":3,"kind":"system_item","ts":1764590000000,"at":"2025-12-01T11:53:20Z",'
        b'"item":{"kind":"notification","message":"no body"}}',
        b'{"seq":4,"kind":"system_item","ts":1764590000000,"at":"2025-12-01T11:53:20Z",'
        b'"item":{"kind":"notification","message":"m","body":"m"}}',
    ]
    log = b"\n".join(old) + b"\n"
    state.session_path("a").write_bytes(log)
    pod = started_pod("a")
    with Lines(pod.socket_path) as c:
        snap = c.prelude()
    check_both(c.lines[-1])
    entries = snap["data"]["entries"]
    assert [e["seq"] for e in entries] == [1, 4]
    assert entries[0]["segments"] == [{"content": "old", "kind": "text"}]
    assert state.session_path("a").read_bytes() == log


def test_the_validators_refuse_what_the_original_refuses():
    """The golden fixtures are strict where serde is: a check that passed everything
    would prove nothing."""
    ok = protocol.event("alert", {"level": "warn", "source": "worker", "message": "m",
                                  "timestamp_ms": 1})
    check_both(ok)
    for line, generation in [
            (ok.replace(b'"worker"', b'"pod"'), shapes.AUGUST),
            (protocol.event("snapshot", {"entries": [], "status": "idle", "greeting": {
                "pod_name": "a", "cwd": "/", "provider": "p", "model": "m",
                "scope_summary": "", "tools": [], "context_window": 0,
                "context_tokens": 0}}), shapes.AUGUST),  # missing field worker_name
            (protocol.event("snapshot", {"entries": [{"kind": "text_done", "ts": 1,
                                                      "text": "t"}], "status": "idle",
                                         "greeting": {}}), shapes.JUNE),
            (protocol.event("peer_unregistered", {"result": {"source": "a", "peer": "b"}}),
             shapes.JUNE),
            (protocol.event("pods_listed", {"pods": [{"pod_name": "a", "visibility": "self",
                                                      "state": "ok"}]}), shapes.JUNE),
            (protocol.event("pod_restored", {"result": {"pod_name": "a", "restored": True,
                                                        "socket_path": "/s"}}), shapes.JUNE),
            (protocol.event("status", {"status": "busy"}), shapes.JUNE),
            (protocol.event("shutdown", {}), shapes.JUNE)]:
        with pytest.raises(shapes.Mismatch):
            shapes.event(line, generation)
    shapes.method(protocol.method("notify", {"message": "m", "id": "x", "extra": 1}))
    with pytest.raises(shapes.Mismatch):
        shapes.method(protocol.method("notify", {"text": "m"}))
    with pytest.raises(shapes.Mismatch):
        shapes.method(protocol.method("list_pods"), shapes.AUGUST)


# -- the original's form of a peer message, received by our Pod ------------------------------

def header(source: str, text: str) -> str:
    return f"[Peer message from `{source}`]\n{text}"


def test_original_form_peer_messages_are_attributed_and_checked_by_the_receiver(
        state, run_yoi, started_pod):
    for name in ("a", "b", "c", "d"):
        run_yoi("pod", "create", name)
    peers.register(state, "a", "b")

    def one_sided(doc):  # a lists d, d does not list a: no relation
        doc.setdefault("peers", []).append({"pod_name": "d", "registered_at": metadata.utcnow()})
        return doc

    store.update(state, "a", one_sided)
    pod = started_pod("a", exec='printf "%s|" "$YOI_FROM"; cat')
    with Raw(pod.socket_path) as c:
        c.prelude()
        c.send({"method": "notify", "params": {"message": header("b", "hi from b")}})
        ack, _ = c.until("system_item")
        item = ack["data"]["item"]
        assert item == {"kind": "notification", "message": header("b", "hi from b"),
                        "body": BODY.format(header("b", "hi from b")), "source": "b",
                        "at": item["at"]}
        done, _ = c.until("text_done")
        assert done["data"]["text"] == "b|" + header("b", "hi from b")
        for sender in ("c", "d"):
            before = state.session_path("a").read_bytes()
            c.send({"method": "notify", "params": {"message": header(sender, "let me in")}})
            assert c.until("error")[0]["data"] == {
                "code": "invalid_request",
                "message": f"{sender!r} is not a peer of 'a'; message refused"}
            assert state.session_path("a").read_bytes() == before
        # not a header (no Pod name in it): an operator notification
        c.send({"method": "notify", "params": {"message": "[Peer message from `../x`]\nhm"}})
        assert "source" not in c.until("system_item")[0]["data"]["item"]
        c.until("text_done")
        # our form gives the same body; refused the same way
        ours = client.notify(pod.socket_path, "hi from b", "m-1", source="b")
        assert ours["item"]["body"] == item["body"]
        c.until("text_done")
        with pytest.raises(Refused):
            client.notify(pod.socket_path, "let me in", "m-2", source="c")
        # a peer cannot pass its message off as another Pod's to the original's clients
        with pytest.raises(Refused) as e:
            client.notify(pod.socket_path, header("c", "spoof"), "m-3", source="b")
        assert "starts with a peer header naming 'c' but comes from 'b'" in str(e.value)
    r = run_yoi("pod", "log", "a")
    assert [re.sub(r" in \d+ ms:", ":", line.split(" ", 2)[2])
            for line in r.stdout.splitlines()] == [
        "notification from b: hi from b", "handler ok: b|[Peer message from `b`]\\nhi from b",
        "notification from operator: [Peer message from `../x`]\\nhm", "handler ok: |[Peer "
        "message from `../x`]\\nhm", "notification from b [m-1]: hi from b",
        "handler ok [m-1]: b|hi from b"]


def test_an_operator_notification_has_the_original_body(state, started_pod):
    pod = started_pod("a")
    ack = client.notify(pod.socket_path, "deploy finished", "m-1")
    assert ack["item"]["body"] == BODY.format("deploy finished")
    assert protocol.notification_body("x") == fake_pods.original_body("x") == BODY.format("x")


# -- our client, talking to the original's Pod -------------------------------------------------

@pytest.fixture
def original(fake, state):
    """B is the original's Pod; A (not running) lists it as a peer."""
    store.create(state, "A")
    store.create(state, "B")
    peers.register(state, "A", "B")
    return fake


def messages(pod) -> list[dict]:
    return [params for name, params in pod.methods if name == "notify"]


def test_send_to_the_original_is_acknowledged_by_its_message(cli, original):
    pod = original(fake_pods.original)
    r = cli("pod", "send", "--id", "o-1", "B", "hello")
    assert (r.exit_code, r.stdout, r.stderr) == (
        0, "delivered to B as operator (id o-1)\n", NOTE), r
    r = cli("pod", "send", "--json", "--id", "o-2", "B", "again")
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "pod_name": "B", "source": None, "id": "o-2",
                      "acknowledged": True, "at": None, "deduplicates_retries": False,
                      "state": "delivered"}
    assert r.stderr == ""
    assert messages(pod) == [{"message": "hello", "id": "o-1"},
                             {"message": "again", "id": "o-2"}]
    assert pod.early == []


def test_what_acknowledges_nothing_sent_is_never_taken_for_the_acknowledgement(cli,
                                                                               original):
    """The only answers are another message and a hostile one (no string): one
    message and a stream both time out (exit 5), without a traceback."""
    original(fake_pods.original_decoys)
    for args in (("B", "hello"), ("--from", "A", "B", "hello")):
        r = cli("pod", "send", "--timeout", "1", *args)
        assert r.exit_code == 5 and "Traceback" not in r.stderr, r
    r = cli("pod", "send", "--lines", "--timeout", "1", "B", input="one\ntwo\n")
    assert r.exit_code in (1, 5) and "Traceback" not in r.stderr, r
    assert "0 of 2" in r.stderr or "not acknowledged" in r.stderr, r


def test_a_stream_acknowledged_out_of_order_and_twice_is_matched_line_by_line(cli,
                                                                             original):
    original(fake_pods.original_reversed)
    r = cli("pod", "send", "--lines", "--json", "B", input="one\ntwo\nthree\n")
    assert r.exit_code == 0, r
    assert (r.json["messages"], r.json["acknowledged_count"]) == (3, 3), r.json


def test_a_peer_message_to_the_original_carries_the_header_and_no_source(cli, original):
    pod = original(fake_pods.original)
    r = cli("pod", "send", "--from", "A", "--id", "p-1", "B", "hi")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "delivered to B (id p-1)\n", NOTE), r
    assert messages(pod) == [{"message": "[Peer message from `A`]\nhi", "id": "p-1"}]


def test_lines_to_the_original_operator_and_peer(cli, original):
    pod = original(fake_pods.original)
    r = cli("pod", "send", "--lines", "--id", "L", "B", input="one\ntwo\n\none\n")
    assert (r.exit_code, r.stdout, r.stderr) == (
        0, "delivered 3 messages to B as operator (ids L-1 .. L-4)\n", NOTE), r
    assert [m["message"] for m in messages(pod)] == ["one", "two", "one"]
    r = cli("pod", "send", "--lines", "--from", "A", "--json", "B", input="x\ny\n")
    assert r.exit_code == 0, r
    assert (r.json["acknowledged"], r.json["acknowledged_count"],
            r.json["deduplicates_retries"]) == (True, 2, False)
    assert [m["message"] for m in messages(pod)][3:] == [header("A", "x"), header("A", "y")]
    assert all("source" not in m for m in messages(pod))


def test_no_acknowledgement_from_the_original_says_a_retry_may_deliver_twice(cli, state,
                                                                           original):
    original(fake_pods.original_silent)
    r = cli("pod", "send", "--timeout", "0.5", "--json", "--id", "t-1", "B", "hello")
    assert r.exit_code == 5, r
    assert r.stderr == (
        "yoi: error: timed out waiting for the acknowledgement from "
        f"{state.default_socket_path('B')} (after 0.5s): the message may or may not have been "
        "delivered; the Pod cannot deduplicate retries (it announces no message ids): "
        "sending again may deliver it twice\n"), r
    assert r.json["error"]["deduplicates_retries"] is False
    r = cli("pod", "send", "--lines", "--timeout", "0.5", "--id", "T", "B", input="a\nb\n")
    assert r.exit_code == 5, r
    assert r.stderr.endswith("; the Pod cannot deduplicate retries (it announces no message "
                             "ids): sending again may deliver it twice\n"), r


def test_list_as_renders_the_original(cli, original):
    original(fake_pods.original)
    r = cli("pod", "list", "--as", "A")
    assert r.exit_code == 0, r
    assert [line.split() for line in r.stdout.splitlines()][1:] == [
        ["A", "self_pod", "readable", "no", "-", "possible"],
        ["B", "peer", "readable", "yes", "idle", "already", "live"]]


def test_log_follow_renders_the_original_history_and_broadcasts(cli, original):
    original(fake_pods.original_then_shutdown, name="C")
    r = cli("pod", "log", "--follow", "C")
    assert (r.exit_code, r.stderr) == (0, ""), r
    assert r.stdout.splitlines() == [
        "2025-12-01T11:53:20Z notification from A: earlier, from A",
        "2025-12-01T11:54:20Z user: do the thing",
        "notification from A: live, from A",
        "shutdown"]
    original(fake_pods.original_then_shutdown, name="D")
    r = cli("pod", "log", "--follow", "--json", "-n", "1", "D")
    assert r.exit_code == 0, r
    assert [json.loads(x) for x in r.stdout.splitlines()] == [
        fake_pods.ORIGINAL_HISTORY[-1],
        {"kind": "system_item",
         "item": fake_pods.original_notification(header("A", "live, from A"))},
        {"event": "shutdown"}]


def test_what_a_pod_supports_is_read_from_the_prefix_of_a_long_snapshot(state, fake):
    fake(fake_pods.good_big_snapshot)  # 2 MiB: skipped unparsed, over the drain limit
    fake(fake_pods.original, name="O")
    with client.Connection.open(state.default_socket_path("B"), 10) as c:
        assert c.supports == {"id", "source", "compact_ack"} and c.snapshot is None
    with client.Connection.open(state.default_socket_path("O"), 10) as c:
        assert c.supports == frozenset()


@pytest.mark.parametrize("prefix", [
    b'{"event":"snapshot","data":{"greeting":{},"yoi":{"supports":["id"]}}}',  # not first
    b'{"event":"snapshot","data":{"yoi":{"supports":"id"}}}',
    b'{"event":"snapshot","data":{"yoi":{"supports":[1,"id"',  # cut short
    b'{"event":"snapshot","data":{"yoi":{"supports":["\xff"]}}}',
    b'{"event":"alert","data":{"yoi":{"supports":["id"]}}}',
    b'{"event":"snapshot","data":{"yoi":[]}}'])
def test_an_announcement_that_is_not_one_supports_nothing(prefix):
    assert protocol.announced_in_prefix(prefix) == frozenset()


def test_the_announcement_is_read_as_our_pods_write_it():
    line = (b'{"event":"snapshot","data":{"yoi":' +
            json.dumps(protocol.announcement(), separators=(",", ":")).encode() + b',"gr')
    assert protocol.announced_in_prefix(line) == {"id", "source", "compact_ack"}
