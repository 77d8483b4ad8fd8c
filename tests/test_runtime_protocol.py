"""The wire protocol of a live Pod, checked with a raw socket (PROTOCOL.md)."""

from __future__ import annotations

import calendar
import json
import os
import sys
import time

from rawsock import Raw

from yoi import peers
from yoi.lock import is_locked
from yoi.session import Entry

ENTRY = (b'{"seq":1,"kind":"user_message","ts":1764590000000,"at":"2025-12-01T11:53:20Z",'
         b'"segments":[{"kind":"text","content":"old"}]}\n')
TORN = b'{"seq":2,"kind":"text_do'
GARBAGE = b'not an entry\n'
OLD_ENTRY = b'{"event":"user_message","data":{"segments":[{"kind":"text","content":"old"}]}}\n'


def compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def test_prelude_byte_for_byte_then_shutdown_without_params(state, run_yoi, started_pod):
    run_yoi("pod", "create", "a")
    session = state.session_path("a")
    session.write_bytes(ENTRY + TORN)  # a crash in the middle of an append
    pod = started_pod("a")
    with Raw(pod.socket_path) as c:
        line = c.read_line()
        alert = json.loads(line)
        assert line == compact(alert)
        assert list(alert) == ["event", "data"] and alert["event"] == "alert"
        data = alert["data"]
        assert list(data) == ["level", "source", "message", "timestamp_ms"]
        assert data["level"] == "warn" and data["source"] == "worker"
        aside = next(state.pod_dir("a").glob("session.jsonl.torn-*"))
        assert data["message"] == (f"{session} ended with a torn line ({len(TORN)} bytes, from a "
                                   f"crash during an append); it was moved to {aside}")
        assert isinstance(data["timestamp_ms"], int)

        line = c.read_line()
        # what the Pod supports comes first, where a client reads it from the prefix
        assert line.startswith(b'{"event":"snapshot","data":{"yoi":{"protocol":1,'
                               b'"supports":["id","source","compact_ack"]},"greeting":{')
        snap = json.loads(line)
        assert list(snap) == ["event", "data"]
        assert list(snap["data"]) == ["yoi", "greeting", "status", "session_offset", "entries"]
        assert snap["data"]["entries"] == [json.loads(ENTRY)]
        assert snap["data"]["status"] == "idle"
        assert snap["data"]["greeting"] == {
            "pod_name": "a", "worker_name": "a", "cwd": snap["data"]["greeting"]["cwd"],
            "provider": "none", "model": "", "scope_summary": "", "tools": [],
            "context_window": 0, "context_tokens": 0}
        assert snap["data"]["session_offset"] == len(ENTRY)
        assert c.buf == b""  # nothing else before we speak

        c.send(b'{"method":"shutdown"}\n')
        assert c.read_line() == b'{"event":"shutdown"}\n'
        assert c.sock.recv(1) == b""  # then the Pod closes the connection
    deadline = time.monotonic() + 10
    while is_locked(state.runtime_lock_path("a")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert is_locked(state.runtime_lock_path("a")) is False
    assert not os.path.exists(pod.socket_path)
    # the torn bytes are set aside, never deleted; the log keeps its whole entries
    assert session.read_bytes() == ENTRY
    assert aside.read_bytes() == TORN


def test_unreadable_lines_are_kept_skipped_and_reported(state, run_yoi, started_pod):
    from yoi.client import notify
    run_yoi("pod", "create", "a")
    state.session_path("a").write_bytes(ENTRY + GARBAGE)
    pod = started_pod("a")
    with Raw(pod.socket_path) as c:
        alerts, snap = c.prelude()
        assert [a["data"]["message"] for a in alerts] == [
            f"{state.session_path('a')}: skipped 1 line(s) that are not entries (kept in the "
            "log)"]
        assert snap["data"]["entries"] == [json.loads(ENTRY)]
    ack = notify(pod.socket_path, "after it", "m-1")
    assert ack["seq"] == 2
    lines = state.session_path("a").read_bytes().split(b"\n")
    assert lines[:2] == [ENTRY[:-1], GARBAGE[:-1]]
    assert json.loads(lines[2]) == ack
    r = run_yoi("pod", "log", "a")
    assert r.exit_code == 0, r
    assert r.stdout.splitlines() == [
        "#1 2025-12-01T11:53:20Z user: old",
        f"#2 {ack['at']} notification from operator [m-1]: after it"]
    assert r.stderr == f"yoi: note: skipped 1 line(s) of {state.session_path('a')} " \
                       "that are not entries\n"


def test_a_log_from_before_sequence_numbers_is_converted_once(state, run_yoi, started_pod):
    from yoi import protocol
    from yoi.client import notify
    run_yoi("pod", "create", "a")
    old_ack = protocol.event("system_item", {"item": {
        "kind": "notification", "message": "m", "body": "m", "id": "old-1",
        "at": "2026-11-01T10:00:00Z"}})
    state.session_path("a").write_bytes(OLD_ENTRY + old_ack)
    pod = started_pod("a")
    with Raw(pod.socket_path) as c:
        alerts, snap = c.prelude()
        assert [a["data"]["message"] for a in alerts] == [
            f"{state.session_path('a')}: converted 2 entries of the format before sequence "
            "numbers"]
    entries = [json.loads(x) for x in state.session_path("a").read_bytes().splitlines()]
    assert [(e["seq"], e["kind"]) for e in entries] == [(1, "user_message"), (2, "system_item")]
    assert entries[0]["segments"] == [{"kind": "text", "content": "old"}]
    assert entries[1]["id"] == "old-1" and entries[1]["at"] == "2026-11-01T10:00:00Z"
    assert entries[1]["ts"] == calendar.timegm((2026, 11, 1, 10, 0, 0)) * 1000
    assert snap["data"]["entries"] == entries
    # the converted ids are known: a retry is acknowledged, not committed again
    retry = notify(pod.socket_path, "m", "old-1")
    assert retry == entries[1]
    assert notify(pod.socket_path, "new", "new-1")["seq"] == 3
    run_yoi("pod", "stop", "a")
    before = state.session_path("a").read_bytes()
    pod = started_pod("a")
    with Raw(pod.socket_path) as c:
        assert c.prelude()[0] == []  # nothing to convert or report the second time
    assert state.session_path("a").read_bytes() == before


def test_unknown_methods_and_bad_lines_get_invalid_request_and_the_connection_stays(
        started_pod):
    pod = started_pod("a")
    with Raw(pod.socket_path) as c:
        c.prelude()
        for name in ("cancel", "pause", "resume", "compact"):
            c.send({"method": name})
            assert c.event() == {"event": "error", "data": {
                "code": "invalid_request", "message": f"unknown method {name!r}"}}
        for bad in (b"not json\n", b"[1,2]\n", b'{"params":{}}\n', b'{"method":"notify",'
                    b'"params":[]}\n', b'\xff\xfe\n', b'{"method":"notify","params":{}}\n',
                    b'{"method":"notify","params":{"message":"x","id":"bad id"}}\n',
                    b'{"method":"notify","params":{"message":"x","source":"../x"}}\n'):
            c.send(b"\n   \n" + bad)  # blank lines are ignored
            ev = c.event()
            assert ev["event"] == "error" and ev["data"]["code"] == "invalid_request", (bad, ev)
        c.send({"method": "notify", "params": {"message": "still here", "id": "m-1"}})
        ev = c.event()
        assert ev["event"] == "system_item" and ev["data"]["item"]["id"] == "m-1"


HOSTILE_LINES = {
    "100,000 brackets": b"[" * 100_000,
    "params nested 100,000 deep": b'{"method":"notify","params":{"message":"x","id":"d",'
                                  b'"extra":' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
    "an integer of 5,000 digits": b'{"method":"notify","params":{"message":"x","id":"i",'
                                  b'"n":' + b"7" * 5000 + b"}}",
    "a run segment nested 65 deep": json.dumps({"method": "run", "params": {"input": [
        {"kind": "text", "content": "x", "extra": json.loads("[" * 61 + "]" * 61)}]}}).encode(),
    # Python reads these, but nothing could write them back as strict UTF-8 JSON
    "a message that is half a surrogate pair": b'{"method":"notify","params":{'
                                               b'"message":"\\ud800","id":"same"}}',
    "a run input with a lone low surrogate": b'{"method":"run","params":{"input":"\\udc00"}}',
    "a surrogate in a key": b'{"method":"notify","params":{"message":"x","id":"same",'
                            b'"\\udbff":1}}',
    "NaN in a run segment": b'{"method":"run","params":{"input":[{"content":"x","n":NaN}]}}',
    "1e999 in a run segment": b'{"method":"run","params":{"input":[{"content":"x",'
                              b'"n":1e999}]}}',
    "-Infinity": b'{"method":"notify","params":{"message":"x","id":"same","n":-Infinity}}',
}


def test_no_line_kills_the_pod_each_is_invalid_request_and_the_connection_stays(
        state, started_pod):
    pod = started_pod("a")
    with Raw(pod.socket_path) as c:
        c.prelude()
        for what, line in HOSTILE_LINES.items():
            c.send(line + b"\n")
            ev = c.event()
            assert ev["event"] == "error" and ev["data"]["code"] == "invalid_request", (what, ev)
            assert "not valid JSON" in ev["data"]["message"], (what, ev)
        c.send({"method": "notify", "params": {"message": "still here", "id": "same"}})
        ev, _ = c.until("system_item")  # the id refused above is not stuck "in flight"
        assert ev["data"]["item"]["id"] == "same"
    assert len(state.session_path("a").read_bytes().splitlines()) == 1  # nothing else committed
    with Raw(pod.socket_path) as c:  # and a new client is served, with no alert to replay
        alerts, snap = c.prelude()
        assert alerts == [] and len(snap["data"]["entries"]) == 1
        assert snap["data"]["status"] == "idle"  # no refused run left it "running"


def test_an_unexpected_error_is_answered_internal_logged_and_alerted(state, started_pod):
    # An injected I/O error while the first method line is handled stands for
    # any bug: the client gets ``internal``, pod.log the traceback, everyone an alert.
    pod = started_pod("a", env={"YOI_FAULT": "handle-line:eio"})
    with Raw(pod.socket_path) as watcher, Raw(pod.socket_path) as c:
        watcher.prelude()
        c.prelude()
        c.send({"method": "notify", "params": {"message": "first", "id": "m-1"}})
        ev = c.event()
        assert ev == {"event": "error", "data": {
            "code": "internal", "message": "internal error in a method line"}}
        alert, _ = watcher.until("alert")
        assert c.event() == alert  # the client that sent the line gets the alert too
        assert alert["data"]["level"] == "error"
        assert alert["data"]["message"].startswith(
            "internal error in a method line: OSError: [Errno 5] injected I/O error at "
            "handle-line")
        c.send({"method": "notify", "params": {"message": "second", "id": "m-2"}})
        ev, _ = c.until("system_item")
        assert ev["data"]["item"]["id"] == "m-2"
    log = state.pod_log_path("a").read_text()
    assert "internal error in a method line:\nTraceback (most recent call last):" in log
    assert "OSError: [Errno 5] injected I/O error at handle-line" in log


def test_run_broadcasts_status_message_output_end_in_order(state, started_pod):
    pod = started_pod("a", exec="tr a-z A-Z")
    with Raw(pod.socket_path) as watcher, Raw(pod.socket_path) as c:
        watcher.prelude()
        c.prelude()
        segments = [{"kind": "text", "content": "hello "}, {"kind": "text", "content": "pod"}]
        c.send({"method": "run", "params": {"input": segments}})
        _, seen = c.until("status", lambda d: d["status"] == "idle")
        assert [ev["event"] for ev in seen] == [
            "status", "user_message", "text_done", "run_end", "status"]
        assert seen[0]["data"] == {"status": "running"} and seen[4]["data"] == {"status": "idle"}
        # a committed entry's event carries the entry itself; the handler's result goes
        # out as the original's text_done, its output being its text
        assert [ev["data"]["kind"] for ev in seen[1:4]] == [
            "user_message", "handler_result", "run_end"]
        assert [ev["data"]["seq"] for ev in seen[1:4]] == [1, 2, 3]
        assert seen[1]["data"]["segments"] == segments
        assert seen[2]["data"]["text"] == "HELLO POD"
        assert seen[3]["data"]["result"] == "finished"
        _, seen_by_watcher = watcher.until("status", lambda d: d["status"] == "idle")
        assert seen_by_watcher == seen
    entries = [json.loads(x) for x in state.session_path("a").read_bytes().splitlines()]
    assert entries == [ev["data"] for ev in seen[1:4]]


def test_handler_environment_stdin_and_cwd(state, run_yoi, started_pod, tmp_path):
    from yoi.client import notify
    work = tmp_path / "work"
    work.mkdir()
    run_yoi("pod", "create", "a")
    r = run_yoi("pod", "create", "b", "--cwd", work, "--exec",
                'printf "%s|%s|%s|%s|%s|" "$YOI_POD" "$YOI_STATE_DIR" "$YOI_FROM" '
                '"$YOI_MESSAGE_ID" "$(pwd)"; cat')
    assert r.exit_code == 0, r
    peers.register(state, "a", "b")
    pod = started_pod("b")
    with Raw(pod.socket_path) as c:
        c.prelude()
        notify(pod.socket_path, "two\nlines", "m-1", source="a")
        ev, _ = c.until("text_done")
        assert ev["data"]["text"] == f"b|{state.root}|a|m-1|{work}|two\nlines"
        notify(pod.socket_path, "from the operator", "m-2")
        ev, _ = c.until("text_done")
        assert ev["data"]["text"] == f"b|{state.root}||m-2|{work}|from the operator"


def test_a_failing_handler_raises_an_alert_and_the_pod_goes_on(state, started_pod):
    from yoi.client import notify
    pod = started_pod("a", exec='cat >/dev/null; echo "partial"; exit 3')
    with Raw(pod.socket_path) as c:
        c.prelude()
        notify(pod.socket_path, "one", "m-1")
        alert, seen = c.until("alert")
        assert alert["data"]["level"] == "error"
        assert alert["data"]["message"] == "handler exited with status 3 (message m-1)"
        assert [ev["data"]["text"] for ev in seen if ev["event"] == "text_done"] == ["partial\n"]
        c.until("status", lambda d: d["status"] == "idle")
    assert notify(pod.socket_path, "two", "m-2")["item"]["id"] == "m-2"
    with Raw(pod.socket_path) as c:  # replayed to later clients
        alerts, _ = c.prelude()
        assert [a["data"]["message"] for a in alerts][:1] == [
            "handler exited with status 3 (message m-1)"]


def test_a_handler_can_talk_to_its_own_pod_while_it_runs(state, started_pod):
    """The handler runs outside every lock and off the loop: it may message its own Pod."""
    sock = state.default_socket_path("a")
    echo = (f"{sys.executable} -c \"import os; from yoi import client; "
            f"client.notify('{sock}', 'echo', 'echo-' + os.environ['YOI_MESSAGE_ID'])\"")
    pod = started_pod("a", exec=f'case "$YOI_MESSAGE_ID" in echo-*) cat ;; *) {echo} ;; esac')
    with Raw(pod.socket_path) as c:
        c.prelude()
        c.send({"method": "notify", "params": {"message": "start", "id": "m-1"}})
        ev, _ = c.until("text_done", lambda d: d["id"] == "echo-m-1")
        assert ev["data"]["text"] == "echo"
    entries = [json.loads(x) for x in state.session_path("a").read_bytes().splitlines()]
    assert [e["id"] for e in entries if e["kind"] == "system_item"] == ["m-1", "echo-m-1"]
    assert sorted(e["id"] for e in entries if e["kind"] == "handler_result") == [
        "echo-m-1", "m-1"]


def test_peer_methods_list_and_restore_over_the_socket(state, run_yoi, started_pod):
    for name in ("b", "c", "hidden"):
        run_yoi("pod", "create", name)
    pod = started_pod("a")
    with Raw(pod.socket_path) as c, Raw(pod.socket_path) as other:
        c.prelude()
        other.prelude()
        c.send({"method": "register_peer", "params": {"name": "b"}})
        registered = {"event": "peer_registered",
                      "data": {"result": {"source": "a", "peer": "b"}}}
        assert c.event() == registered
        assert other.event() == registered  # broadcast to every client, as the original
        c.send({"method": "register_peer", "params": {"name": "c"}})
        c.until("peer_registered")
        assert other.event()["event"] == "peer_registered"
        assert peers.is_peer(state, "a", "b") and peers.is_peer(state, "b", "a")
        c.send({"method": "unregister_peer", "params": {"name": "c"}})
        assert c.event() == {"event": "peer_unregistered",
                             "data": {"result": {"source": "a", "peer": "c"}}}
        assert not peers.is_peer(state, "c", "a")
        c.send({"method": "register_peer", "params": {"name": "ghost"}})
        ev = c.event()
        assert ev == {"event": "error", "data": {"code": "invalid_request",
                                                 "message": "no such Pod: ghost (target)"}}
        c.send({"method": "register_peer", "params": {"name": "a"}})
        assert c.event()["data"]["code"] == "invalid_request"  # self-peer

        c.send({"method": "list_pods"})
        ev = c.event()
        assert ev["event"] == "pods_listed"
        pods = ev["data"]["pods"]
        assert [(p["pod_name"], p["visibility"]) for p in pods] == [
            ("a", "self_pod"), ("b", "peer")]
        assert pods[0]["live"] == {"socket_path": pod.socket_path, "reachable": True,
                                   "status": "idle", "error": None}
        assert pods[0]["comm_registry"] == {"registered": True, "socket_path": pod.socket_path}
        assert pods[1]["state"] == "readable" and pods[1]["live"]["reachable"] is False
        assert pods[1]["restore"] == {"possible": True, "restore_name": "b",
                                      "reason": "not running"}
        assert pods[1]["comm_registry"] == {"registered": False, "socket_path": None}
        assert pods[1]["spawned_children"] == {"count": 0, "reachable": 0, "unreachable": 0}

        c.send({"method": "restore_pod", "params": {"name": "hidden"}})
        assert c.event() == {"event": "error", "data": {
            "code": "invalid_request", "message": "Pod 'hidden' is not visible from 'a'"}}
        c.send({"method": "restore_pod", "params": {"name": "b"}})
        ev = c.event()
        assert ev == {"event": "pod_restored", "data": {"result": {
            "action": "restored", "pod_name": "b",
            "socket_path": str(state.default_socket_path("b"))}}}
        c.send({"method": "restore_pod", "params": {"name": "b"}})
        assert c.event() == {"event": "pod_restored", "data": {"result": {
            "action": "already_live", "pod_name": "b",
            "socket_path": str(state.default_socket_path("b"))}}}
        c.send({"method": "restore_pod", "params": {"name": "a"}})
        assert c.event() == {"event": "pod_restored", "data": {"result": {
            "action": "already_live", "pod_name": "a", "socket_path": pod.socket_path,
            "status": "idle"}}}
        assert other.pending() == b""  # none of these answers went to the other client
    r = run_yoi("pod", "status", "b")
    assert r.exit_code == 0, r
    # b is stopped by the fixture's teardown, like every running Pod of the state dir


def test_half_closed_client_still_gets_its_answer(started_pod):
    import socket
    pod = started_pod("a")
    with Raw(pod.socket_path) as c:
        c.prelude()
        c.send({"method": "notify", "params": {"message": "bye", "id": "m-1"}})
        c.sock.shutdown(socket.SHUT_WR)
        ev = c.event()
        assert ev["event"] == "system_item" and ev["data"]["item"]["id"] == "m-1"
        assert c.sock.recv(1) == b""


def test_other_uids_are_refused(started_pod):
    import pytest
    import shutil
    import socket
    import tempfile
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    pod = started_pod("a")
    # Give uid 65534 a way to the socket (a hard link in an open directory, mode 0666),
    # so that only the Pod's SO_PEERCRED check stands in its way.
    open_dir = tempfile.mkdtemp(prefix="yoi-peercred-")
    try:
        os.chmod(open_dir, 0o755)
        link = os.path.join(open_dir, "a.sock")
        os.link(pod.socket_path, link)
        os.chmod(link, 0o666)
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                s.connect(link)
                os.write(w, b"got:" + s.recv(100))
            except BaseException as e:
                os.write(w, f"error:{e!r}".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            result = f.read()
        os.waitpid(child, 0)
        assert result == b"got:"  # connected, then closed without a byte
        with Raw(pod.socket_path) as c:  # the owner is still served
            c.prelude()
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)


def user_message(text: str) -> Entry:
    return Entry("user_message", {"segments": [{"kind": "text", "content": text}]})


def newest_within(lines: list[bytes], budget: int) -> list[bytes]:
    """The longest run of newest LINES (without newlines) of at most BUDGET bytes."""
    out, total = [], 0
    for line in reversed(lines):
        if out and total + len(line) - 1 > budget:
            break
        out.append(line)
        total += len(line) - 1
    return out[::-1]


def test_snapshot_is_the_last_1000_entries_within_a_byte_budget(state, run_yoi, started_pod):
    from yoi import protocol
    from yoi.client import Connection, notify
    run_yoi("pod", "create", "a")
    small = [user_message(f"t{i}").line(i + 1) for i in range(1005)]
    state.session_path("a").write_bytes(b"".join(small))
    pod = started_pod("a")
    with Connection.open(pod.socket_path, 30, keep_snapshot=True) as c:
        assert c.snapshot["entries"] == [json.loads(x) for x in small[5:]]
    assert run_yoi("pod", "stop", "a").exit_code == 0
    # Large entries: 40 MiB of them are more than a snapshot may hold.
    big = [user_message(f"{i}:" + "x" * (1 << 20)).line(1006 + i) for i in range(40)]
    with open(state.session_path("a"), "ab") as f:
        f.write(b"".join(big))
    pod = started_pod("a")
    with Connection.open(pod.socket_path, 30, keep_snapshot=True) as c:
        assert c.snapshot["entries"] == [
            json.loads(x) for x in newest_within(small + big, protocol.SNAPSHOT_BYTES)]
    ack = notify(pod.socket_path, "y" * 500_000, "last")  # and while it runs
    added = state.session_path("a").read_bytes().splitlines(keepends=True)[-1]
    assert json.loads(added) == ack
    with Connection.open(pod.socket_path, 30, keep_snapshot=True) as c:
        expected = newest_within(small + big + [added], protocol.SNAPSHOT_BYTES)
        assert len(expected) < len(big)
        assert c.snapshot["entries"] == [json.loads(x) for x in expected]
