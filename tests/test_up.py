"""`yoi up` / `yoi down`: converge to a yoi.toml idempotently, refuse bad files whole,
finish after a crash, and end converged when two runs race."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time

import pytest

import shapes
from conftest import yoi_cmd
from yoi import control, metadata, peers, store

FILE = """
[pods.reviewer]
peers = ["coder"]
labels = { team = "infra" }

[pods.coder]
exec = "cat"
cwd = "work"

[pods.idle]
start = false
peers = ["coder"]
"""


@pytest.fixture
def project(tmp_path):
    d = tmp_path / "project"
    (d / "work").mkdir(parents=True)
    (d / "yoi.toml").write_text(FILE)
    return d


def up(run_yoi, project, *args, **kwargs):
    return run_yoi("up", "-f", project / "yoi.toml", *args, **kwargs)


def assert_converged(state, project):
    for name in ("reviewer", "coder", "idle"):
        assert state.metadata_path(name).exists(), name
    settings = metadata.settings_of(store.read(state, "coder"))
    assert settings == {"exec": "cat", "cwd": str(project / "work"), "accept_peers": "open",
                        "peer_request_ttl": None, "handler_timeout": None, "labels": {},
                        "queue_max_messages": None, "queue_max_bytes": None}
    assert metadata.labels_of(store.read(state, "reviewer")) == {"team": "infra"}
    assert peers.is_peer(state, "reviewer", "coder") and peers.is_peer(state, "idle", "coder")
    assert control.is_running(state, "reviewer") and control.is_running(state, "coder")
    assert not control.is_running(state, "idle")


def test_up_converges_then_changes_nothing(run_yoi, state, project, started_pod):
    r = up(run_yoi, project)
    assert r.exit_code == 0, r
    assert r.stdout.splitlines() == [
        "created coder", "created idle", "created reviewer",
        "registered idle <-> coder", "registered reviewer <-> coder",
        "started coder", "started reviewer", "up: 7 changes"]
    assert_converged(state, project)
    r = up(run_yoi, project, "--json")
    assert r.exit_code == 0, r
    assert (r.json["changed"], r.json["changes"], r.json["failed"]) == (False, [], [])
    r = up(run_yoi, project)
    assert r.stdout == "up: nothing to change (3 Pods, 2 relations)\n", r


def test_up_changes_only_what_differs(run_yoi, state, project, started_pod):
    assert up(run_yoi, project, "--no-start").exit_code == 0
    store.configure(state, "coder", exec_cmd="other")
    peers.unregister(state, "reviewer", "coder")
    r = up(run_yoi, project, "--no-start", "--label", "job=7", "--json")
    assert r.exit_code == 0, r
    assert r.json["changes"] == [
        {"action": "configured", "pod_name": "coder", "settings": ["exec", "labels"]},
        {"action": "configured", "pod_name": "idle", "settings": ["labels"]},
        {"action": "configured", "pod_name": "reviewer", "settings": ["labels"]},
        {"action": "registered", "pod_name": "reviewer", "peer": {"pod_name": "coder"}}]
    assert metadata.labels_of(store.read(state, "reviewer")) == {"job": "7", "team": "infra"}


BAD_FILES = [
    ("[pods.a]\nexce = 'cat'\n", "pods.a.exce: unknown key (known: exec, cwd, accept_peers, "
                                "peer_request_ttl, handler_timeout, labels, peers, start, queue_max_messages, queue_max_bytes)"),
    ("version = 2\n[pods.a]\n", "version: unknown key (known: pods)"),
    ("[pods.'bad/name']\n", "pods.bad/name: invalid Pod name"),
    ("[pods.a]\npeers = ['ghost']\n",
     "pods.a.peers: 'ghost' is neither declared in this file nor an existing Pod"),
    ("[pods.a]\npeers = ['a']\n", "pods.a.peers: a Pod cannot be its own peer"),
    ("[pods.a]\npeers = ['b']\n[pods.b]\naccept_peers = 'never'\n",
     'pods.a.peers: a and b can never be peers: b has accept_peers = "never" (make it '
     '"open" or "ask", or drop the relation)'),
    ("[pods.a]\naccept_peers = false\npeers = ['fine']\n",
     'pods.a.peers: a and fine can never be peers: a has accept_peers = "never"'),
    ("[pods.a]\nstart = 'yes'\n", "pods.a.start: must be true or false"),
    ("[pods.a]\nlabels = { 'bad key' = 'x' }\n", "pods.a.labels: label key 'bad key'"),
    ("[pods.a\n", "does not parse"),
    ("x = " + "[" * 2000 + "]" * 2000 + "\n[pods.a]\n", "does not parse: nested deeper than 64"),
    ("[pods.a]\nhandler_timeout = " + "9" * 5000 + "\n", "does not parse: "),
    ("", "pods: declare at least one Pod"),
]


@pytest.mark.parametrize("text, message", BAD_FILES, ids=[m.split(":")[0] for _, m in BAD_FILES])
def test_an_invalid_file_is_refused_and_nothing_changes(run_yoi, state, tmp_path, text, message):
    store.create(state, "existing")
    path = tmp_path / "yoi.toml"
    path.write_text("[pods.fine]\n" + text if text.startswith("[pods.a]") else text)
    before = sorted(os.listdir(state.pods_dir))
    r = run_yoi("up", "-f", path)
    assert r.exit_code == 2, r
    assert r.stderr.startswith(f"yoi: error: {path}: "), r
    assert message in r.stderr, r
    assert sorted(os.listdir(state.pods_dir)) == before


def test_a_relation_to_an_existing_undeclared_pod_is_fine(run_yoi, state, tmp_path):
    store.create(state, "outside")
    path = tmp_path / "yoi.toml"
    path.write_text("[pods.a]\nstart = false\npeers = ['outside']\n")
    r = run_yoi("up", "-f", path)
    assert r.exit_code == 0, r
    assert peers.is_peer(state, "a", "outside")


ASKED = """
[pods.m1]
start = false
peers = ["m2"]

[pods.m2]
accept_peers = "ask"
start = false
"""


def test_a_relation_to_a_pod_on_ask_is_pending_not_converged(run_yoi, state, tmp_path):
    path = tmp_path / "yoi.toml"
    path.write_text(ASKED)
    r = run_yoi("up", "-f", path, "--json")
    assert r.exit_code == 5, r
    [request] = map(metadata.to_jsonable, peers.list_requests(state, "m2"))
    rid = request["id"]
    assert r.json["changes"][2] == {"action": "requested", "pod_name": "m1",
                                    "peer": {"pod_name": "m2"}, "request": request}
    [step] = r.json["failed"]
    assert (step["action"], step["pod_name"], step["peer"], step["request"]) == \
        ("register", "m1", {"pod_name": "m2"}, request)
    why = (f"m2 accepts peers only when asked: the request from m1 (id {rid}) waits until "
           f"{request['expires_at']}; m2 approves with `yoi pod peer approve m2 m1` or "
           "denies with `yoi pod peer deny m2 m1`")
    assert step["error"] == {"code": "pending", "message": why, "exit_code": 5,
                             "pod_name": "m2"}
    assert r.json["error"]["code"] == "pending"
    assert shapes.check(r.json, "converged", ok=False) == []
    assert r.stderr == (f"yoi: error: up: 1 relation pending (register m1 <-> m2: {why}); "
                        "3 changes made and kept; run `yoi up` again once decided\n"), r
    assert not peers.is_peer(state, "m1", "m2")
    # still pending: nothing to record again, and still not converged
    r = run_yoi("up", "-f", path)
    assert (r.exit_code, r.stdout) == (5, ""), r
    assert "; 0 changes made and kept; run `yoi up` again once decided\n" in r.stderr, r
    assert [q["id"] for q in peers.list_requests(state, "m2")] == [rid]
    peers.approve(state, "m2", "m1")
    r = run_yoi("up", "-f", path)
    assert (r.exit_code, r.stdout) == (0, "up: nothing to change (2 Pods, 1 relation)\n"), r


@pytest.mark.parametrize("asked, declaring", [("alpha", "zed"), ("zed", "alpha")])
def test_the_declaring_pod_asks_whatever_the_names(run_yoi, state, tmp_path, asked,
                                                   declaring):
    """The Pod on ask is asked whichever name sorts first; declared on both sides, two
    Pods on ask become peers (two requests that meet)."""
    path = tmp_path / "yoi.toml"
    path.write_text(f'[pods.{asked}]\naccept_peers = "ask"\nstart = false\n'
                    f'[pods.{declaring}]\npeers = ["{asked}"]\nstart = false\n')
    r = run_yoi("up", "-f", path, "--json")
    assert r.exit_code == 5 and r.json["error"]["code"] == "pending", r
    assert [q["pod_name"] for q in peers.list_requests(state, asked)] == [declaring]
    assert not peers.is_peer(state, asked, declaring)
    both = tmp_path / "both.toml"
    both.write_text(f'[pods.{asked}]\naccept_peers = "ask"\npeers = ["{declaring}"]\n'
                    f'start = false\n[pods.{declaring}]\naccept_peers = "ask"\n'
                    f'peers = ["{asked}"]\nstart = false\n')
    r = run_yoi("up", "-f", both)
    assert r.exit_code == 0, r
    assert peers.is_peer(state, asked, declaring)
    assert peers.list_requests(state, asked) == peers.list_requests(state, declaring) == []


def test_up_text_says_requested_and_a_real_failure_decides_the_exit_status(run_yoi, state,
                                                                             tmp_path):
    path = tmp_path / "yoi.toml"
    path.write_text(ASKED + "\n[pods.broken]\nstart = false\n")
    store.create(state, "broken")
    state.metadata_path("broken").write_text("not [toml")
    r = run_yoi("up", "-f", path)
    assert r.exit_code == 1, r  # the corrupt record's status, not the pending relation's
    rid = peers.list_requests(state, "m2")[0]["id"]
    assert r.stdout == f"created m1\ncreated m2\nrequested m1 <-> m2 (pending: request {rid})\n"
    assert r.stderr.startswith("yoi: error: up: 1 step failed (create broken: "), r
    assert ", 1 relation pending (register m1 <-> m2: m2 accepts peers only when asked" \
        in r.stderr, r
    assert r.stderr.endswith("3 changes made and kept; run `yoi up` again to finish\n"), r


def test_up_uses_yoi_toml_in_the_working_directory_and_says_when_there_is_none(
        run_yoi, project, tmp_path, state):
    r = run_yoi("up", "--no-start", cwd=project)
    assert r.exit_code == 0, r
    r = run_yoi("up", cwd=tmp_path)
    assert r.exit_code == 2, r
    assert r.stderr == ("yoi: error: no declaration file 'yoi.toml' in the current directory "
                        "(or give -f FILE)\n")


def test_a_failed_step_keeps_the_rest_and_a_rerun_finishes(run_yoi, state, project,
                                                            started_pod):
    store.create(state, "idle")
    good = state.metadata_path("idle").read_bytes()
    state.metadata_path("idle").write_text("not [toml")  # damaged: every step on it fails
    r = up(run_yoi, project, "--json")
    assert r.exit_code == 1, r
    assert [(f["action"], f["pod_name"]) for f in r.json["failed"]] == \
        [("create", "idle"), ("register", "idle")]
    assert r.json["failed"][1]["peer"] == {"pod_name": "coder"}
    assert [c["action"] for c in r.json["changes"]] == \
        ["created", "created", "registered", "started", "started"]
    assert r.json["error"]["code"] == "corrupt"
    assert r.stderr.startswith("yoi: error: up: 2 steps failed (create idle: "), r
    assert r.stderr.endswith("; 5 changes made and kept; run `yoi up` again to finish\n"), r
    state.metadata_path("idle").write_bytes(good)
    r = up(run_yoi, project)
    assert r.stdout == "registered idle <-> coder\nup: 1 change\n", r
    assert_converged(state, project)


def test_down_stops_and_removes_only_what_the_file_declares(run_yoi, state, project,
                                                             started_pod):
    started_pod("bystander")
    assert up(run_yoi, project).exit_code == 0
    r = run_yoi("down", "-f", project / "yoi.toml")
    assert r.exit_code == 0, r
    assert r.stdout == "stopped coder\nstopped reviewer\ndown: 2 changes\n"
    assert control.is_running(state, "bystander")
    r = run_yoi("down", "-f", project / "yoi.toml", "--rm", "--json")
    assert r.exit_code == 0, r
    assert [c["action"] for c in r.json["changes"]] == ["removed"] * 3
    assert state.pod_names() == ["bystander"]
    r = run_yoi("down", "-f", project / "yoi.toml")
    assert r.stdout == "down: nothing to stop\n", r


def test_down_stops_pods_whose_undeclared_peer_was_removed(run_yoi, state, tmp_path,
                                                           started_pod):
    """down does not check relations against the state directory: it only stops."""
    store.create(state, "outside")
    path = tmp_path / "yoi.toml"
    path.write_text("[pods.a]\npeers = ['outside']\n")
    assert run_yoi("up", "-f", path).exit_code == 0
    store.remove(state, "outside")
    r = run_yoi("down", "-f", path)
    assert (r.exit_code, r.stdout) == (0, "stopped a\ndown: 1 change\n"), r
    assert not control.is_running(state, "a")
    r = run_yoi("down", "-f", path, "--rm")
    assert (r.exit_code, r.stdout) == (0, "removed a\ndown: 1 change\n"), r
    r = run_yoi("up", "-f", path)  # up still refuses the relation to a Pod that is gone
    assert r.exit_code == 2, r
    assert "pods.a.peers: 'outside' is neither declared in this file nor an existing Pod" \
        in r.stderr


# -- crashes and races -----------------------------------------------------------

@pytest.mark.parametrize("fault", ["atomic-before-replace:crash:1",
                                   "atomic-before-replace:crash:3",
                                   "after-journal:crash:1", "after-journal:crash:2",
                                   "before-journal-remove:crash:1"])
def test_up_killed_half_way_is_finished_by_the_next_up(run_yoi, state, project, started_pod,
                                                       fault):
    r = up(run_yoi, project, env={"YOI_FAULT": fault})
    assert r.exit_code == 137, r  # died like SIGKILL at that point
    r = up(run_yoi, project)
    assert r.exit_code == 0, r
    assert_converged(state, project)
    r = run_yoi("doctor")
    assert r.exit_code == 0, r
    assert up(run_yoi, project).stdout.endswith("up: nothing to change (3 Pods, 2 relations)\n")


def test_up_sigkilled_while_starting_is_finished_by_the_next_up(run_yoi, state, project,
                                                                started_pod):
    assert up(run_yoi, project, "--no-start").exit_code == 0
    p = subprocess.Popen(yoi_cmd() + ["up", "-f", str(project / "yoi.toml")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not control.is_running(state, "coder") and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        p.kill()  # coder is up: `up` is now starting reviewer (or about to)
        p.wait(timeout=30)
    assert p.returncode == -9
    r = up(run_yoi, project)
    assert r.exit_code == 0, r
    assert_converged(state, project)


def test_two_ups_at_once_end_converged_without_a_lost_relation(run_yoi, state, project,
                                                               started_pod):
    many = FILE + "".join(textwrap.dedent(f"""
        [pods.w{i}]
        start = false
        peers = ["reviewer", "coder"]
        """) for i in range(6))
    (project / "yoi.toml").write_text(many)
    procs = [subprocess.Popen(yoi_cmd() + ["up", "-f", str(project / "yoi.toml")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    made = [line for out, _ in results for line in out.splitlines()
            if line.startswith(("created", "registered"))]
    assert sorted(made) == sorted(set(made))  # each change made by exactly one of them
    assert_converged(state, project)
    for i in range(6):
        assert peers.is_peer(state, f"w{i}", "reviewer") and peers.is_peer(state, f"w{i}", "coder")
    r = up(run_yoi, project)
    assert r.stdout.endswith("up: nothing to change (9 Pods, 14 relations)\n"), r
