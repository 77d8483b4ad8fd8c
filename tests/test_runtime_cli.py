"""yoi pod log and yoi pod list --as against live Pods; what the cheap commands import."""

from __future__ import annotations

import fcntl
import json
import re
import os
import socket
import subprocess
import sys

from yoi import peers
from yoi.client import notify


def test_log_text_json_and_last_n(state, run_yoi, started_pod):
    from yoi.client import request
    from yoi import protocol
    pod = started_pod("a", exec="echo handled")
    acks = [notify(pod.socket_path, f"line {i}\nsecond", f"n-{i}") for i in range(3)]
    request(pod.socket_path, protocol.method("run", {"input": [
        {"kind": "text", "content": "go"}]}), {"run_end"})
    r = run_yoi("pod", "log", "a")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert lines[0] == f"#1 {acks[0]['at']} notification from operator [n-0]: line 0\\nsecond"
    body = [re.sub(r" in \d+ ms:", " in _ ms:", line.split(" ", 2)[2])
            for line in lines]  # without "#SEQ AT", and the run's duration
    assert [int(line.split()[0][1:]) for line in lines] == list(range(1, len(lines) + 1))
    handled = [b for b in body if b.startswith("handler ok")]
    assert handled == [f"handler ok [n-{i}] in _ ms: handled" for i in range(3)] + \
        ["handler ok in _ ms: handled"]  # the run has no id
    assert "user: go" in body  # committed on arrival; handled after the notifications
    assert body[-2:] == ["handler ok in _ ms: handled", "run_end: finished"]
    r = run_yoi("pod", "log", "a", "-n", "2", "--json")
    assert r.exit_code == 0, r
    raw = state.session_path("a").read_bytes().decode().splitlines()
    assert r.stdout.splitlines() == raw[-2:]  # entries exactly as stored
    assert run_yoi("pod", "log", "a", "-n", "0").stdout == ""


def test_log_follow_streams_live_events_until_shutdown(state, run_yoi, started_pod):
    pod = started_pod("a")
    notify(pod.socket_path, "before", "f-0")
    p = subprocess.Popen([sys.executable, "-m", "yoi", "pod", "log", "a", "--follow", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(p.stdout.readline())
        assert first["item"]["id"] == "f-0"
        ack = notify(pod.socket_path, "live", "f-1")
        assert json.loads(p.stdout.readline()) == ack  # a live entry, as in the log
        assert run_yoi("pod", "stop", "a").exit_code == 0
        assert json.loads(p.stdout.readline()) == {"event": "shutdown"}
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
    r = run_yoi("pod", "log", "a", "--follow")
    assert r.exit_code == 5, r  # nothing to follow: not running


def test_list_as_reports_self_and_peers_with_liveness_and_restore(state, run_yoi, started_pod):
    for name in ("b", "c", "d", "other"):
        run_yoi("pod", "create", name)
    run_yoi("pod", "create", "a")
    for peer in ("b", "c", "d"):
        peers.register(state, "a", peer)
    pod_a = started_pod("a")
    started_pod("b")
    state.metadata_path("c").write_text("not = [toml")  # corrupt
    # d is "hung": its runtime lock is held and its socket accepts but never answers
    hung_lock = os.open(state.runtime_lock_path("d"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(hung_lock, fcntl.LOCK_EX)
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(state.default_socket_path("d")))
    hung.listen(4)
    try:
        r = run_yoi("pod", "list", "--as", "a", "--json")
        assert r.exit_code == 0, r
        pods = {p["pod_name"]: p for p in r.json["pods"]}
        assert r.json["as"] == {"pod_name": "a"}
        assert [p["pod_name"] for p in r.json["pods"]] == ["a", "b", "c", "d"]  # not "other"
        assert pods["a"]["visibility"] == "self_pod"
        assert pods["a"]["live"] == {"socket_path": pod_a.socket_path, "reachable": True,
                                     "status": "idle", "error": None}
        assert pods["a"]["restore"] == {"possible": False, "restore_name": None,
                                        "reason": "already live"}
        assert pods["b"]["visibility"] == "peer" and pods["b"]["live"]["reachable"] is True
        assert pods["c"]["state"] == "corrupt" and pods["c"]["restore"]["possible"] is False
        assert pods["d"]["state"] == "readable" and pods["d"]["live"]["reachable"] is False
        assert pods["d"]["live"]["error"] == "timed out waiting for the snapshot"
        assert pods["d"]["restore"] == {"possible": False, "restore_name": None,
                                        "reason": "running but not answering"}

        r = run_yoi("pod", "list", "--as", "a")
        assert r.exit_code == 0, r
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["NAME", "VISIBILITY", "STATE", "LIVE", "STATUS", "RESTORE"]
        assert lines[1].split() == ["a", "self_pod", "readable", "yes", "idle", "already", "live"]
        assert lines[2].split() == ["b", "peer", "readable", "yes", "idle", "already", "live"]

        r = run_yoi("pod", "list", "--json")  # the operator's list: every Pod, same probing
        assert r.exit_code == 0, r
        live = {p["pod_name"]: p["live"] for p in r.json["pods"] if p["live"]}
        assert live["a"]["status"] == "idle" and live["other"]["reachable"] is False
    finally:
        hung.close()
        os.close(hung_lock)
    peers.unregister(state, "a", "d")
    run_yoi("pod", "stop", "b")
    r = run_yoi("pod", "list", "--as", "a", "--json")
    pods = {p["pod_name"]: p for p in r.json["pods"]}
    assert pods["b"]["restore"] == {"possible": True, "restore_name": "b",
                                    "reason": "not running"}
    assert "d" not in pods


def test_list_as_unknown_pod_is_exit_3(run_yoi, state):
    r = run_yoi("pod", "list", "--as", "ghost")
    assert (r.exit_code, r.stderr) == \
        (3, f"yoi: error: no such Pod: ghost (no state directory at {state.root})\n")
    state.ensure()
    r = run_yoi("pod", "list", "--as", "ghost")
    assert (r.exit_code, r.stderr) == (3, "yoi: error: no such Pod: ghost\n")


def test_cheap_commands_never_import_the_server(yoi_home):
    code = ("import sys\n"
            "from yoi.cli import main\n"
            "for argv in (['--version'], ['pod', 'list'], ['pod', 'list', '--as', 'x'],\n"
            "             ['pod', 'status', 'x']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('yoi.server' in sys.modules, 'yoi.session.writer' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.splitlines()[-1] == "False False", p


def test_log_last_n_counts_entries_not_torn_lines(state, run_yoi):
    from yoi import session
    run_yoi("pod", "create", "a")
    good = [f'{{"event":"text_done","data":{{"text":"t{i}"}}}}\n'.encode() for i in range(5)]
    path = state.session_path("a")
    path.write_bytes(good[0] + good[1] + b"not an entry\n" + good[2] + good[3] + good[4]
                     + b'{"event":"text_do\n' + b"[1]\n")
    r = run_yoi("pod", "log", "a", "-n", "2")
    assert r.exit_code == 0, r
    assert r.stdout == "text: t3\ntext: t4\n"
    assert r.stderr == f"yoi: note: skipped 2 line(s) of {path} that are not entries\n"
    r = run_yoi("pod", "log", "a", "-n", "4")
    assert r.stdout == "text: t1\ntext: t2\ntext: t3\ntext: t4\n"
    assert r.stderr == f"yoi: note: skipped 3 line(s) of {path} that are not entries\n"
    r = run_yoi("pod", "log", "a", "-n", "0")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "", "")
    r = run_yoi("pod", "log", "a")
    assert r.stdout == "".join(f"text: t{i}\n" for i in range(5))
    # a whole log is read in blocks: lines that cross a block boundary come out whole
    big = [f'{{"event":"text_done","data":{{"text":"{i}{"x" * 100_000}"}}}}\n'.encode()
           for i in range(30)]
    path.write_bytes(b"".join(big))
    assert [raw + b"\n" for raw, _ in session.entries(path)] == big
    assert [raw + b"\n" for raw, _ in session.entries(path, 3)] == big[-3:]
