"""Spawned children, with real Pods: spawn and the task, the parent's notices (a task
done, a clean stop, a SIGKILL, a parent that was stopped), scope on both sides,
visibility, ownership (rm and stop of a tree), retries and hostile input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import yoi_cmd
from rawsock import Raw
from yoi import children, control, history, metadata, peers, store
from yoi.client import notify
from yoi.errors import Refused
from yoi.txn import read_pod_file


def entries(state, name) -> list[dict]:
    out = []
    for line in state.session_path(name).read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def kinds(state, name, kind) -> list[dict]:
    return [e for e in entries(state, name) if e["kind"] == kind]


def wait_until(condition, what: str, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"still not {what} after {seconds}s"
        time.sleep(0.05)


def record(state, name) -> dict:
    return read_pod_file(state, name).doc


def runs(state, child) -> list[int]:
    return [e["seq"] for e in kinds(state, child, "pod_started")]


# -- the task and the notices ---------------------------------------------------------

def test_a_child_that_finishes_its_task_is_reported_once_with_its_output(
        state, started_pod, run_yoi):
    started_pod("lead")
    r = run_yoi("pod", "spawn", "lead", "kid", "--exec", "tr a-z A-Z", "--task", "hello kid",
                "--json")
    assert r.exit_code == 0, r
    doc = r.json
    assert (doc["pod_name"], doc["parent"], doc["created"], doc["scope"], doc["started"]) == (
        "kid", {"pod_name": "lead"}, True, "parent", True)
    assert doc["task"]["id"] == "task:kid:1" and doc["task"]["acknowledged"] is True
    assert doc["record"]["parent"] == "lead" and doc["record"]["task_id"] == "task:kid:1"
    assert [c["pod_name"] for c in record(state, "lead")["children"]] == ["kid"]
    r = run_yoi("pod", "wait", "lead", "--from", "kid", "--kind", "child_completed",
                "--timeout", "20", "--json")
    assert r.exit_code == 0, r
    done = r.json["entry"]
    spawn_id = record(state, "kid")["spawn_id"]
    assert done["id"] == f"child:kid:{spawn_id}:done"
    assert (done["source"], done["task_id"], done["ok"], done["exit_status"], done["output"],
            done["truncated"]) == ("kid", "task:kid:1", True, 0, "HELLO KID", False)
    kid = entries(state, "kid")
    assert [(e["kind"], e.get("id")) for e in kid] == [
        ("pod_started", None), ("system_item", "task:kid:1"), ("handler_result", "task:kid:1")]
    assert kid[1]["item"]["source"] == "lead"  # the task comes from the parent
    assert done["child_seq"] == kid[2]["seq"]
    # A later message from the parent is no task: no second notice.
    assert run_yoi("pod", "send", "--from", "lead", "kid", "more").exit_code == 0
    wait_until(lambda: len(kinds(state, "kid", "handler_result")) == 2, "handled")
    # The child tells its parent as it stops, and waits for it to record it.
    assert run_yoi("pod", "stop", "kid").exit_code == 0
    stopped = kinds(state, "lead", "child_stopped")
    assert len(stopped) == 1, entries(state, "lead")
    assert (stopped[0]["ended"], stopped[0]["exit_status"], stopped[0]["run"],
            stopped[0]["output"]) == ("stopped", 0, kid[0]["seq"], "MORE")
    time.sleep(2.5)  # rounds of the parent's watcher: nothing more
    assert [e["kind"] for e in entries(state, "lead")] == ["child_completed", "child_stopped"]


def test_a_sigkilled_child_is_reported_as_died_and_each_run_once(state, started_pod,
                                                                 run_yoi):
    started_pod("lead")
    assert run_yoi("pod", "spawn", "lead", "kid", "--exec", "cat").exit_code == 0
    os.kill(control.holder_pid(state.runtime_lock_path("kid")), signal.SIGKILL)
    died = wait_until(lambda: kinds(state, "lead", "child_stopped"), "told of the death")
    assert len(died) == 1
    assert (died[0]["ended"], died[0]["exit_status"], died[0]["run"], died[0]["child_seq"]) == (
        "died", None, runs(state, "kid")[0], None)
    assert died[0]["task_id"] is None and kinds(state, "lead", "child_completed") == []
    assert run_yoi("pod", "start", "kid").exit_code == 0
    assert run_yoi("pod", "stop", "kid").exit_code == 0
    stopped = kinds(state, "lead", "child_stopped")
    assert [(e["run"], e["ended"]) for e in stopped] == [
        (runs(state, "kid")[0], "died"), (runs(state, "kid")[1], "stopped")]
    assert len({e["id"] for e in stopped}) == 2


def test_a_parent_that_was_stopped_gets_the_notices_when_it_starts(state, started_pod,
                                                                   run_yoi):
    store.create(state, "lead")
    r = run_yoi("pod", "spawn", "lead", "kid", "--exec", "wc -w", "--task", "one two three")
    assert r.exit_code == 0, r
    history.wait(state, "kid", history.Match(kind="handler_result"), timeout=20)
    assert run_yoi("pod", "stop", "kid").exit_code == 0  # lead is not live: nobody to tell
    assert entries(state, "lead") == []
    started_pod("lead", create=False)
    r = run_yoi("pod", "wait", "lead", "--from", "kid", "--kind", "child_stopped", "--json")
    assert r.exit_code == 0, r
    lead = entries(state, "lead")
    assert [e["kind"] for e in lead] == ["child_completed", "child_stopped"]
    assert lead[0]["output"].strip() == "3" and lead[1]["ended"] == "stopped"
    # Read again from where it was (its cursor), again and again: nothing twice.
    assert run_yoi("pod", "stop", "lead").exit_code == 0
    started_pod("lead", create=False)
    time.sleep(1.5)
    assert entries(state, "lead") == lead


def test_a_child_removed_and_spawned_again_at_once_is_a_new_child_told_once(
        state, started_pod, run_yoi):
    """Removed and spawned again under its name within one look of the watcher: the
    new child's log starts again at seq 1, and its notices still come, once."""
    started_pod("lead")
    assert run_yoi("pod", "spawn", "lead", "kid", "--exec", "cat", "--task", "one").exit_code == 0
    wait_until(lambda: kinds(state, "lead", "child_completed"), "the first task told")
    assert run_yoi("pod", "stop", "kid").exit_code == 0
    wait_until(lambda: kinds(state, "lead", "child_stopped"), "the first stop told")
    r = subprocess.run(["sh", "-c", f'{" ".join(yoi_cmd())} pod rm kid && '
                        f'{" ".join(yoi_cmd())} pod spawn lead kid --exec "cat; echo OUT2" '
                        '--task two'], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "YOI_HOME": str(state.root)})
    assert r.returncode == 0, r.stderr
    second = record(state, "kid")["spawn_id"]
    done = wait_until(lambda: [e for e in kinds(state, "lead", "child_completed")
                               if second in e["id"]], "the new child's task told")
    assert done[0]["output"].startswith("two")
    assert run_yoi("pod", "stop", "kid").exit_code == 0
    assert run_yoi("pod", "start", "kid").exit_code == 0
    assert run_yoi("pod", "stop", "kid").exit_code == 0
    wait_until(lambda: len([e for e in kinds(state, "lead", "child_stopped")
                            if second in e["id"]]) == 2, "both stops of the new child")
    ids = [e["id"] for e in entries(state, "lead") if e["kind"].startswith("child_")]
    assert len(ids) == len(set(ids)) == 5, ids
    cursor = json.loads((state.pod_dir("kid") / "cursors" / ".parent").read_text())
    assert cursor["spawn_id"] == second


def test_parent_and_child_queue_messages_to_each_other_but_no_one_else_does(
        state, run_yoi):
    store.create(state, "lead")
    store.create(state, "other")
    peers.register(state, "lead", "other")
    children.create_child(state, "lead", "kid")
    for source, target in (("lead", "kid"), ("kid", "lead")):
        r = run_yoi("pod", "send", "--queue", "--from", source, target, "later", "--json")
        assert (r.exit_code, r.json["state"]) == (0, "queued"), r
    r = run_yoi("pod", "send", "--queue", "--from", "other", "kid", "hi")
    assert r.exit_code == 4 and "kid is a child of lead on scope parent" in r.stderr, r
    r = run_yoi("pod", "send", "--queue", "--id", "child:kid:x:done", "lead", "fake")
    assert r.exit_code == 2 and "are a Pod's own" in r.stderr, r
    r = run_yoi("pod", "send", "--queue", "--lines", "--id", "child:x", "lead", input="a\n")
    assert r.exit_code == 2 and "are a Pod's own" in r.stderr, r
    assert json.loads(run_yoi("pod", "status", "lead", "--json").stdout)["queued"] == 1


def test_a_child_log_that_is_a_fifo_stalls_neither_the_others_nor_the_stop(
        state, started_pod, run_yoi):
    store.create(state, "lead")
    children.create_child(state, "lead", "odd")
    state.session_path("odd").unlink()
    os.mkfifo(state.session_path("odd"))
    started_pod("lead", create=False)
    assert run_yoi("pod", "spawn", "lead", "kid", "--exec", "cat", "--task", "x").exit_code == 0
    r = run_yoi("pod", "wait", "lead", "--from", "kid", "--kind", "child_completed",
                "--timeout", "20")
    assert r.exit_code == 0, r
    t0 = time.monotonic()
    assert run_yoi("pod", "stop", "lead").exit_code == 0
    assert time.monotonic() - t0 < 5
    assert "cannot read child odd: " in state.pod_log_path("lead").read_text()


# -- scope, both ways -------------------------------------------------------------------

def refused_by_pod(socket_path, source, msg_id):
    with pytest.raises(Refused) as e:
        notify(socket_path, "hi", msg_id, source=source)
    return e.value.message


def test_scope_is_enforced_by_the_sender_and_by_the_receiver(state, started_pod, run_yoi):
    for name in ("lead", "friend", "stranger"):
        store.create(state, name)
    peers.register(state, "lead", "friend")
    lead = started_pod("lead", create=False)
    friend = started_pod("friend", create=False)
    assert run_yoi("pod", "spawn", "lead", "kid").exit_code == 0
    kid = record(state, "kid")["runtime"]["socket_path"]
    # parent <-> child: allowed both ways
    assert run_yoi("pod", "send", "--from", "kid", "lead", "up").exit_code == 0
    assert run_yoi("pod", "send", "--from", "lead", "kid", "down").exit_code == 0
    # scope parent: the parent's peer is out of reach, both ways, on both sides
    for source, target in (("kid", "friend"), ("friend", "kid")):
        r = run_yoi("pod", "send", "--from", source, target, "hi")
        assert r.exit_code == 4, r
        assert ("kid is a child of lead on scope parent: it may reach only lead and its own "
                "children") in r.stderr, r
    before = state.session_path("friend").read_bytes()
    assert "may not message 'friend': kid is a child of lead on scope parent" in \
        refused_by_pod(friend.socket_path, "kid", "s-1")
    assert "'friend' may not message 'kid'" in refused_by_pod(kid, "friend", "s-2")
    assert state.session_path("friend").read_bytes() == before
    r = run_yoi("pod", "peer", "register", "kid", "friend")
    assert r.exit_code == 4 and "friend cannot become a peer of kid" in r.stderr, r
    assert not metadata.has_peer(record(state, "kid"), "friend")
    # scope peers: the parent's peers are within reach, nobody else
    assert run_yoi("pod", "spawn", "lead", "scout", "--scope", "peers").exit_code == 0
    scout = record(state, "scout")["runtime"]["socket_path"]
    assert run_yoi("pod", "send", "--from", "scout", "friend", "hi").exit_code == 0
    assert run_yoi("pod", "send", "--from", "friend", "scout", "hi back").exit_code == 0
    r = run_yoi("pod", "send", "--from", "scout", "stranger", "hi")
    assert r.exit_code == 4 and "on scope peers: it may reach only lead, the peers of lead" \
        in r.stderr, r
    assert run_yoi("pod", "peer", "register", "scout", "stranger").exit_code == 4
    assert run_yoi("pod", "peer", "register", "scout", "friend").exit_code == 0
    # siblings are not each other's reach
    assert run_yoi("pod", "send", "--from", "scout", "kid", "hi").exit_code == 4
    # once lead and friend part, scout's reach shrinks, peer entry or not
    assert run_yoi("pod", "peer", "remove", "lead", "friend").exit_code == 0
    assert run_yoi("pod", "send", "--from", "scout", "friend", "hi").exit_code == 4
    assert "'friend' may not message 'scout'" in refused_by_pod(scout, "friend", "s-3")
    assert "may not message 'friend'" in refused_by_pod(friend.socket_path, "scout", "s-4")
    assert lead.socket_path  # lead stayed live throughout


def test_visibility_shows_children_and_the_parent_and_counts_them(state, started_pod,
                                                                 run_yoi):
    started_pod("lead")
    assert run_yoi("pod", "spawn", "lead", "kid").exit_code == 0
    assert run_yoi("pod", "spawn", "lead", "nap").exit_code == 0
    assert run_yoi("pod", "stop", "nap").exit_code == 0
    r = run_yoi("pod", "list", "--as", "lead", "--json")
    items = {i["pod_name"]: i for i in r.json["pods"]}
    assert [(i["pod_name"], i["visibility"], i["relation"]) for i in r.json["pods"]] == [
        ("lead", "self_pod", "self"), ("kid", "spawned_child", "child"),
        ("nap", "spawned_child", "child")]
    assert items["lead"]["spawned_children"] == {"count": 2, "reachable": 1, "unreachable": 1}
    assert items["kid"]["spawned_children"] == {"count": 0, "reachable": 0, "unreachable": 0}
    r = run_yoi("pod", "list", "--as", "kid")
    assert r.stdout.splitlines()[2].split()[:3] == ["lead", "peer", "(parent)"], r
    # A live Pod answers list_pods with the same items (the original's enum: peer).
    with Raw(record(state, "kid")["runtime"]["socket_path"]) as c:
        c.prelude()
        c.send({"method": "list_pods"})
        ev = c.event()
        while ev["event"] != "pods_listed":
            ev = c.event()
    pods = {i["pod_name"]: i for i in ev["data"]["pods"]}
    assert (pods["lead"]["visibility"], pods["lead"]["relation"]) == ("peer", "parent")
    assert pods["lead"]["spawned_children"]["count"] == 2


# -- ownership ---------------------------------------------------------------------------

def tree(state):
    """top -> root -> (c1 -> (g1, g2), c2), root a peer of out (a peer of top)."""
    for name in ("top", "out"):
        store.create(state, name)
    peers.register(state, "top", "out")
    children.create_child(state, "top", "root", scope="peers")
    peers.register(state, "root", "out")
    children.create_child(state, "root", "c1")
    children.create_child(state, "root", "c2")
    children.create_child(state, "c1", "g1")
    children.create_child(state, "c1", "g2")


def test_rm_refuses_a_parent_and_recursive_removes_the_tree_in_one_go(state, cli):
    tree(state)
    r = cli("pod", "rm", "root", "--json")
    assert r.exit_code == 4, r
    assert r.stderr == ("yoi: error: Pod 'root' has children: c1, c2; remove them first, or "
                        "the whole tree with `yoi pod rm root --recursive`\n")
    assert r.json["error"]["children"] == [{"pod_name": "c1"}, {"pod_name": "c2"}]
    r = cli("pod", "rm", "g1", "--json")  # a child leaves its parent's list with it
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "pod_name": "g1", "removed": True, "peers_updated": [],
                      "parent_updated": {"pod_name": "c1"}}
    assert metadata.child_names(record(state, "c1")) == ["g2"]
    r = cli("pod", "rm", "root", "--recursive", "--json")
    assert r.exit_code == 0, r
    assert r.json["children_removed"] == [{"pod_name": n} for n in ("c1", "c2", "g2")]
    assert r.json["peers_updated"] == [{"pod_name": "out"}]
    assert r.json["parent_updated"] == {"pod_name": "top"}
    assert state.pod_names() == ["out", "top"]
    assert "children" not in record(state, "top")
    assert metadata.peer_names(record(state, "out")) == ["top"]
    assert [p for p in os.listdir(state.pods_dir) if p.startswith(".")] == []


def test_rm_recursive_refuses_while_a_pod_of_the_tree_runs(state, cli, started_pod):
    tree(state)
    started_pod("g2", create=False)
    before = {n: state.metadata_path(n).read_bytes() for n in state.pod_names()}
    r = cli("pod", "rm", "root", "--recursive")
    assert r.exit_code == 6, r
    assert "Pod 'g2' is running" in r.stderr and "yoi pod stop root --recursive" in r.stderr
    assert {n: state.metadata_path(n).read_bytes() for n in state.pod_names()} == before


def test_stop_recursive_stops_the_deepest_first_and_each_parent_hears(state, started_pod,
                                                                      run_yoi):
    started_pod("lead")
    assert run_yoi("pod", "spawn", "lead", "kid", "--exec", "cat").exit_code == 0
    assert run_yoi("pod", "spawn", "kid", "grand").exit_code == 0
    r = run_yoi("pod", "stop", "lead", "--recursive", "--json")
    assert r.exit_code == 0, r
    assert [(p["pod_name"], p["stopped"]) for p in r.json["pods"]] == [
        ("grand", True), ("kid", True), ("lead", True)]
    assert [(e["source"], e["ended"]) for e in kinds(state, "kid", "child_stopped")] == [
        ("grand", "stopped")]
    assert [(e["source"], e["ended"]) for e in kinds(state, "lead", "child_stopped")] == [
        ("kid", "stopped")]
    assert run_yoi("pod", "stop", "--label", "x=y", "--recursive").exit_code == 2


def test_stop_all_stops_every_pod_each_after_its_children(state, started_pod, run_yoi):
    # Listed by name, each parent comes before its children: --all must reorder.
    started_pod("a-lead")
    started_pod("m-other")
    assert run_yoi("pod", "create", "n-idle").exit_code == 0
    assert run_yoi("pod", "spawn", "a-lead", "b-kid", "--exec", "cat").exit_code == 0
    assert run_yoi("pod", "spawn", "b-kid", "c-grand").exit_code == 0
    state.metadata_path("z-bad").parent.mkdir(parents=True, exist_ok=True)
    state.metadata_path("z-bad").write_text("not = [toml")
    state.metadata_path("m-other").write_text("not = [toml")  # live, its record damaged
    r = run_yoi("pod", "stop", "--all", "--json")
    assert r.exit_code == 0, r
    assert [(p["pod_name"], p["stopped"]) for p in r.json["pods"]] == [
        ("c-grand", True), ("b-kid", True), ("a-lead", True), ("m-other", True),
        ("n-idle", False), ("z-bad", False)]
    assert [e["source"] for e in kinds(state, "a-lead", "child_stopped")] == ["b-kid"]
    assert [e["source"] for e in kinds(state, "b-kid", "child_stopped")] == ["c-grand"]
    for args in (("a-lead", "--all"), ("--all", "--label", "x=y"), ("--all", "--recursive")):
        r = run_yoi("pod", "stop", *args)
        assert r.exit_code == 2 and r.stderr.startswith("yoi: error: "), (args, r)


def test_stop_all_stops_a_child_whose_record_is_damaged_before_its_parent(
        state, started_pod, run_yoi):
    started_pod("a-lead")
    assert run_yoi("pod", "spawn", "a-lead", "b-kid", "--exec", "cat").exit_code == 0
    state.metadata_path("b-kid").write_text("not = [toml")
    r = run_yoi("pod", "stop", "--all", "--json")
    assert r.exit_code == 0, r
    assert [(p["pod_name"], p["stopped"]) for p in r.json["pods"]] == [
        ("b-kid", True), ("a-lead", True)]


def test_two_stop_all_at_once_stop_everything_and_each_child_is_told_once(
        state, started_pod, run_yoi):
    started_pod("a-lead")
    started_pod("z-other")
    assert run_yoi("pod", "spawn", "a-lead", "b-kid", "--exec", "cat").exit_code == 0
    assert run_yoi("pod", "spawn", "b-kid", "c-grand").exit_code == 0
    procs = [subprocess.Popen(yoi_cmd() + ["pod", "stop", "--all"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for name in ("a-lead", "z-other", "b-kid", "c-grand"):
        assert not control.is_running(state, name), name
    assert [e["source"] for e in kinds(state, "a-lead", "child_stopped")] == ["b-kid"]
    assert [e["source"] for e in kinds(state, "b-kid", "child_stopped")] == ["c-grand"]


def test_stop_all_in_an_empty_state_directory(state, run_yoi):
    state.pods_dir.mkdir(parents=True, exist_ok=True)
    r = run_yoi("pod", "stop", "--all", "--json")
    assert (r.exit_code, r.json) == (0, {"ok": True, "pods": []}), r
    r = run_yoi("pod", "stop", "--all")
    assert (r.exit_code, r.stderr) == (0, "no Pods\n"), r


# -- spawning again, and what spawn refuses -----------------------------------------------

def test_a_spawn_that_crashed_is_finished_by_a_retry_which_delivers_the_task_once(
        state, started_pod, run_yoi):
    store.create(state, "lead")
    spawn = ("pod", "spawn", "lead", "kid", "--exec", "cat", "--task", "do it")
    r = run_yoi(*spawn, env={"YOI_FAULT": "after-journal-remove:crash"})
    assert r.exit_code == 137, r  # created (committed), never started
    assert metadata.parent_of(record(state, "kid")) == "lead"
    assert not control.is_running(state, "kid")
    r = run_yoi(*spawn, "--json")
    assert r.exit_code == 0, r
    assert (r.json["created"], r.json["started"], r.json["task"]["id"]) == (
        False, True, "task:kid:1")
    r = run_yoi(*spawn)
    assert (r.exit_code, r.stdout) == (0, "already spawned kid (child of lead, scope parent): "
                                          "live\ntask delivered (id task:kid:1)\n"), r
    tasks = [e for e in kinds(state, "kid", "system_item") if e["id"] == "task:kid:1"]
    assert len(tasks) == 1
    r = run_yoi("pod", "spawn", "lead", "kid", "--exec", "cat", "--task", "another")
    assert r.exit_code == 1 and "given its task already" in r.stderr, r
    r = run_yoi("pod", "spawn", "lead", "kid", "--exec", "sort", "--task", "do it")
    assert r.exit_code == 1 and "exec is 'cat', not 'sort'" in r.stderr, r
    assert len([e for e in kinds(state, "kid", "system_item")]) == 1
    started_pod("lead", create=False)
    r = run_yoi("pod", "wait", "lead", "--kind", "child_completed", "--json")
    assert r.exit_code == 0 and r.json["entry"]["output"] == "do it", r


@pytest.mark.parametrize("args, code, message", [
    (("lead", "kid", "--task", "x"), 2, "a task needs a handler to run it: give --exec CMD"),
    (("lead", "kid", "--exec", "cat", "--task", "x", "--task-file", "-"), 2,
     "--task and --task-file are mutually exclusive"),
    (("lead", "lead"), 2, "a Pod cannot be its own child ('lead')"),
    (("ghost", "kid"), 3, "no such Pod: ghost"),
    (("lead", "other"), 1, "Pod 'other' already exists and is not a child of lead"),
    (("lead", "theirs"), 4, "Pod 'theirs' is a child of boss; a Pod has one parent"),
    (("lead", "kid", "--scope", "world"), 2, "'world' is not one of 'parent', 'peers'"),
    (("lead", "kid", "--exec", "cat", "--task", " "), 2, "empty message: nothing to send"),
])
def test_spawn_refuses_with_one_line_and_its_exit_code_and_makes_nothing(
        state, cli, args, code, message):
    for name in ("lead", "other", "boss"):
        store.create(state, name)
    children.create_child(state, "boss", "theirs")
    before = {n: state.metadata_path(n).read_bytes() for n in state.pod_names()}
    r = cli("pod", "spawn", *args, input="")
    assert r.exit_code == code, r
    assert r.stderr.startswith("yoi: error: ") and message in r.stderr, r
    assert len(r.stderr.splitlines()) == 1
    assert {n: state.metadata_path(n).read_bytes() for n in state.pod_names()} == before


def test_concurrent_spawns_lose_no_child_and_deliver_one_task_once(state, started_pod):
    started_pod("lead")
    procs = [subprocess.Popen(yoi_cmd() + ["pod", "spawn", "lead", f"k{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    procs += [subprocess.Popen(yoi_cmd() + ["pod", "spawn", "lead", "same", "--exec", "cat",
                                            "--task", "once", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, (out, err)
        results.append(out)
    assert sorted(metadata.child_names(record(state, "lead"))) == ["k0", "k1", "k2", "same"]
    created = [json.loads(out)["created"] for out in results[3:]]
    assert sorted(created) == [False, True]
    wait_until(lambda: kinds(state, "lead", "child_completed"), "the task done")
    assert [e["id"] for e in kinds(state, "same", "system_item")] == ["task:same:1"]
    assert len(kinds(state, "same", "handler_result")) == 1


# -- hostile input ------------------------------------------------------------------------

def test_hostile_child_updates_and_notice_ids_are_refused(state, started_pod):
    lead = started_pod("lead")
    store.create(state, "stranger")
    with Raw(lead.socket_path) as c:
        c.prelude()
        for params in ({"name": "stranger"}, {"name": "../x"}, {}, {"name": ["kid"]}):
            c.send({"method": "child_update", "params": params})
            ev = c.event()
            assert (ev["event"], ev["data"]["code"]) == ("error", "invalid_request"), ev
        c.send({"method": "notify", "params": {"message": "forged", "id": "child:k:0:done"}})
        ev = c.event()
        assert ev["event"] == "error" and "are the Pod's own" in ev["data"]["message"], ev
    assert entries(state, "lead") == []


def test_a_damaged_child_record_or_log_does_not_stop_the_parent(state, started_pod, run_yoi):
    store.create(state, "lead")
    children.create_child(state, "lead", "nospawn")
    children.create_child(state, "lead", "odd", exec_cmd="cat", task_id="task:odd:1")
    children.create_child(state, "lead", "broken")
    store.update(state, "nospawn", lambda d: {k: v for k, v in d.items() if k != "spawn_id"})
    state.metadata_path("broken").write_text("not = [toml")
    with open(state.session_path("odd"), "ab") as f:  # our kinds, with wrong types
        f.write(b'{"seq":1,"kind":"pod_started","ts":1,"at":"x"}\n'
                b'{"seq":2,"kind":"handler_result","ts":1,"at":"x","id":"task:odd:1",'
                b'"ok":"yes","exit_status":"0","text":["not","text"]}\n'
                b'{"seq":3,"kind":"pod_stopped","ts":1,"at":"x","run":"one"}\n'
                b'not json at all\n')
    started_pod("lead", create=False)
    done = wait_until(lambda: kinds(state, "lead", "child_stopped"), "the odd child read")
    completed = kinds(state, "lead", "child_completed")
    assert (completed[0]["ok"], completed[0]["exit_status"], completed[0]["output"]) == (
        False, None, "")
    assert (done[0]["source"], done[0]["run"], done[0]["ended"]) == ("odd", 1, "stopped")
    time.sleep(2.2)  # more rounds of the watcher
    r = run_yoi("pod", "status", "lead", "--json")
    assert r.exit_code == 0, r
    pod_log = state.pod_log_path("lead").read_text()
    assert "internal error" not in pod_log
    assert pod_log.count("cannot read child broken: ") == 1, pod_log  # said once
