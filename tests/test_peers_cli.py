"""`yoi pod peer register/remove/list`: output, exit codes, and no change on failure."""

from __future__ import annotations

import json
import os

import pytest

from peer_worker import leftover_files, pairs_of, relations


@pytest.fixture
def pods(state):
    """Pods a, b, c (c refuses peers); returns a reader of their metadata bytes."""
    from yoi import store
    store.create(state, "a")
    store.create(state, "b")
    store.create(state, "c", accept_peers=False)

    def raw(*names):
        return {n: state.metadata_path(n).read_bytes() for n in names or ("a", "b", "c")}

    return raw


def peer_entries(state, name):
    from yoi.txn import read_pod_file
    return read_pod_file(state, name).doc.get("peers", [])


def test_register_makes_both_pods_list_each_other(cli, state, pods):
    r = cli("pod", "peer", "register", "a", "b")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "registered a <-> b\n", ""), r
    assert [p["pod_name"] for p in peer_entries(state, "a")] == ["b"]
    assert [p["pod_name"] for p in peer_entries(state, "b")] == ["a"]
    assert peer_entries(state, "a")[0]["registered_at"] == peer_entries(state, "b")[0]["registered_at"]
    assert leftover_files(state.root) == []


def test_register_json(cli, pods):
    r = cli("pod", "peer", "register", "a", "b", "--json")
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "pod_name": "a", "peer": {"pod_name": "b"}, "changed": True,
                      "state": "registered"}


def test_register_existing_relation_succeeds_and_rewrites_nothing(cli, state, pods):
    assert cli("pod", "peer", "register", "a", "b").exit_code == 0
    before = pods()
    inodes = {n: os.stat(state.metadata_path(n)).st_ino for n in "ab"}
    for args in (("a", "b"), ("b", "a")):
        r = cli("pod", "peer", "register", *args)
        assert (r.exit_code, r.stdout) == (0, f"already peers: {args[0]} <-> {args[1]}\n"), r
        r = cli("pod", "peer", "register", *args, "--json")
        assert r.json == {"ok": True, "pod_name": args[0], "peer": {"pod_name": args[1]},
                          "changed": False, "state": "registered"}
    assert pods() == before
    # An atomic replace would have given the files new inodes.
    assert {n: os.stat(state.metadata_path(n)).st_ino for n in "ab"} == inodes


def test_register_completes_a_one_sided_relation_keeping_its_entry(cli, state, pods):
    from yoi import store
    store.update(state, "a", lambda d: {**d, "peers": [{"pod_name": "b", "registered_at": "x"}]})
    before = pods("a")
    r = cli("pod", "peer", "register", "a", "b", "--json")
    assert r.json["changed"] is True, r
    assert pods("a") == before  # the source side already had it: not rewritten
    assert [p["pod_name"] for p in peer_entries(state, "b")] == ["a"]


def test_register_preserves_unknown_keys_and_other_peers(cli, state, pods):
    from yoi import store
    store.create(state, "d")
    assert cli("pod", "peer", "register", "a", "d").exit_code == 0
    store.update(state, "a", lambda d: {**d, "custom": {"note": "keep me"}})
    assert cli("pod", "peer", "register", "a", "b").exit_code == 0
    from yoi.txn import read_pod_file
    doc = read_pod_file(state, "a").doc
    assert doc["custom"] == {"note": "keep me"}
    assert [p["pod_name"] for p in doc["peers"]] == ["d", "b"]


def test_remove_deletes_both_directions(cli, state, pods):
    assert cli("pod", "peer", "register", "a", "b").exit_code == 0
    r = cli("pod", "peer", "remove", "b", "a")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "removed b <-> a\n", ""), r
    assert peer_entries(state, "a") == [] and peer_entries(state, "b") == []


def test_remove_missing_relation_is_success_without_change(cli, state, pods):
    before = pods()
    r = cli("pod", "peer", "remove", "a", "b", "--json")
    assert (r.exit_code, r.json) == (0, {"ok": True, "pod_name": "a",
                                         "peer": {"pod_name": "b"}, "changed": False}), r
    r = cli("pod", "peer", "remove", "a", "b")
    assert (r.exit_code, r.stdout) == (0, "not peers: a <-> b\n"), r
    assert pods() == before


def test_list_shows_registered_at_and_reciprocity(cli, state, pods):
    from yoi import store
    assert cli("pod", "peer", "register", "a", "b").exit_code == 0
    # Damage from outside: a lists c, c does not list a.
    store.update(state, "a", lambda d: {**d, "peers": d["peers"] + [
        {"pod_name": "c", "registered_at": "then"}, {"pod_name": "gone", "registered_at": "then"}]})
    r = cli("pod", "peer", "list", "a", "--json")
    assert r.exit_code == 0, r
    registered = peer_entries(state, "b")[0]["registered_at"]
    stamp = registered.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert r.json == {"ok": True, "pod_name": "a", "peers": [
        {"pod_name": "b", "registered_at": stamp, "exists": True, "reciprocal": True},
        {"pod_name": "c", "registered_at": "then", "exists": True, "reciprocal": False},
        {"pod_name": "gone", "registered_at": "then", "exists": False, "reciprocal": False},
    ]}
    r = cli("pod", "peer", "list", "a")
    assert r.exit_code == 0, r
    assert r.stdout.splitlines() == [
        "NAME  REGISTERED_AT         RECIPROCAL",
        f"b     {stamp}  yes",
        "c     then                  no",
        "gone  then                  no (missing Pod)",
    ]


def test_list_without_peers(cli, pods):
    r = cli("pod", "peer", "list", "a")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "", "a has no peers\n"), r
    assert cli("pod", "peer", "list", "a", "--json").json == {"ok": True, "pod_name": "a",
                                                                      "peers": []}


def test_list_missing_pod_is_not_found_and_creates_nothing(cli, yoi_home):
    r = cli("pod", "peer", "list", "nope", "--json")
    assert r.exit_code == 3, r
    assert r.json["error"]["code"] == "not_found"
    assert r.stderr == f"yoi: error: no such Pod: nope (no state directory at {yoi_home})\n"
    assert not yoi_home.exists()
    r = cli("pod", "peer", "list", "nope", "--pending")  # the same for its requests
    assert (r.exit_code, r.stderr) == (
        3, f"yoi: error: no such Pod: nope (no state directory at {yoi_home})\n"), r
    assert not yoi_home.exists()


# -- failures: exit code, message, and both files byte-for-byte unchanged -----------

FAILURES = [
    (("register", "a", "b/x"), 2, "invalid Pod name 'b/x': use 1-64 characters of "
                                  "[A-Za-z0-9._-], starting with a letter or digit"),
    (("register", "-a", "b"), 2, None),
    (("register", "a", "zz"), 3, "no such Pod: zz (target)"),
    (("register", "zz", "a"), 3, "no such Pod: zz (source)"),
    (("remove", "zz", "a"), 3, "no such Pod: zz (source)"),
    (("remove", "a", "zz"), 3, "no such Pod: zz (target)"),
    (("register", "a", "a"), 4, "a Pod cannot be its own peer ('a')"),
    (("remove", "b", "b"), 4, "a Pod cannot be its own peer ('b')"),
    (("register", "a", "c"), 4, "Pod 'c' does not accept peers"),
]


@pytest.mark.parametrize("args,code,message", FAILURES,
                         ids=[" ".join(f[0]) for f in FAILURES])
def test_failure_changes_nothing(cli, state, pods, args, code, message):
    before = pods()
    r = cli("pod", "peer", *args)
    assert r.exit_code == code, r
    if message is not None:
        assert r.stderr == f"yoi: error: {message}\n", r
        assert r.stdout == ""
        j = cli("pod", "peer", *args, "--json")
        assert j.exit_code == code and j.json["ok"] is False, j
        assert j.json["error"]["message"] == message
    assert pods() == before
    assert leftover_files(state.root) == []


def test_accept_peers_false_still_allows_an_existing_relation(cli, state, pods):
    from yoi import store
    assert cli("pod", "peer", "register", "a", "b").exit_code == 0
    store.configure(state, "b", accept_peers=False)
    r = cli("pod", "peer", "register", "a", "b", "--json")
    assert (r.exit_code, r.json["changed"]) == (0, False), r
    assert cli("pod", "peer", "remove", "a", "b").exit_code == 0
    assert cli("pod", "peer", "register", "a", "b").exit_code == 4


@pytest.mark.parametrize("victim", ["a", "b"])
def test_corrupt_metadata_fails_naming_the_file(cli, state, pods, victim):
    state.metadata_path(victim).write_bytes(b"schema = 1\npod_name = [\n")
    before = pods()
    r = cli("pod", "peer", "register", "a", "b")
    assert r.exit_code == 1, r
    assert r.stderr.startswith(f"yoi: error: {state.metadata_path(victim)}: does not parse"), r
    assert cli("pod", "peer", "remove", "a", "b").exit_code == 1
    assert pods() == before


def test_lock_timeout_is_busy_and_names_the_holder(cli, state, pods):
    from yoi.lock import FileLock
    before = pods()
    with FileLock(state.lock_path("b"), 1):
        for cmd in ("register", "remove"):
            r = cli("pod", "peer", cmd, "a", "b", "--lock-timeout", "0.2")
            assert r.exit_code == 6, r
            assert r.stderr == (f"yoi: error: Pod 'b' is locked by pid {os.getpid()} "
                                "(waited 0.2s)\n"), r
        r = cli("pod", "peer", "list", "b", "--lock-timeout", "0", "--json")
        assert (r.exit_code, r.json["error"]["code"]) == (6, "busy"), r
    assert pods() == before


def test_commands_have_help_with_examples(cli):
    for sub in ("", "register", "remove", "list"):
        r = cli("pod", "peer", *([sub] if sub else []), "--help")
        assert r.exit_code == 0, r
        assert "Examples:\n    yoi pod peer" in r.stdout or "Examples:\n  yoi pod peer" in r.stdout, r


def test_real_process_round_trip(run_yoi, yoi_home):
    for name in ("reviewer", "coder"):
        assert run_yoi("pod", "create", name).exit_code == 0
    r = run_yoi("pod", "peer", "register", "reviewer", "coder")
    assert (r.exit_code, r.stdout) == (0, "registered reviewer <-> coder\n"), r
    r = run_yoi("pod", "peer", "list", "coder", "--json")
    assert r.exit_code == 0, r
    assert [(p["pod_name"], p["reciprocal"]) for p in r.json["peers"]] == [("reviewer", True)]
    assert pairs_of(relations(yoi_home)) == {frozenset(("reviewer", "coder"))}
    r = run_yoi("pod", "peer", "remove", "coder", "reviewer", "--json")
    assert json.loads(r.stdout) == {"ok": True, "pod_name": "coder",
                                    "peer": {"pod_name": "reviewer"}, "changed": True}
    assert pairs_of(relations(yoi_home)) == set()


def test_remove_drops_an_entry_for_a_pod_that_no_longer_exists(cli, state, pods):
    from yoi import store
    store.update(state, "a", lambda d: {**d, "peers": [{"pod_name": "gone", "registered_at": "x"}]})
    r = cli("pod", "peer", "remove", "a", "gone", "--json")
    assert (r.exit_code, r.json["changed"]) == (0, True), r
    assert peer_entries(state, "a") == []
    assert not state.pod_dir("gone").exists()
