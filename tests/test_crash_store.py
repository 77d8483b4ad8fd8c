"""Crashes and I/O errors: records are never torn, `pod rm` is all-or-nothing."""

from __future__ import annotations

import os
import random
import time

import pytest

import workers
from yoi import metadata, peers, store
from yoi.atomic import is_temp_name

CRASH = 137  # yoi.faults: a "crash" is os._exit(137)


def leftovers(state) -> list[str]:
    """Journals, temp files, trash and staging directories anywhere in STATE."""
    found = [f"journal/{e}" for e in os.listdir(state.journal_dir)]
    for entry in os.listdir(state.pods_dir):
        if entry.startswith("."):
            found.append(f"pods/{entry}")
            continue
        found += [f"pods/{entry}/{f}" for f in os.listdir(state.pods_dir / entry)
                  if is_temp_name(f)]
    return found


# -- torn writes ----------------------------------------------------------------

def disk_calls(monkeypatch) -> list[tuple[str, str]]:
    """Record, in order, every fsync (by the path its descriptor was opened with),
    rename and unlink this process makes."""
    calls, fds = [], {}
    real_open, real_fsync = os.open, os.fsync
    real_replace, real_rename, real_unlink = os.replace, os.rename, os.unlink

    def opened(path, *a, **k):
        fd = real_open(path, *a, **k)
        fds[fd] = os.fspath(path)
        return fd

    def fsync(fd):
        calls.append(("fsync", fds.get(fd, "?")))
        return real_fsync(fd)

    def moved(real, what):
        def move(src, dst, *a, **k):
            calls.append((what, os.fspath(src), os.fspath(dst)))
            return real(src, dst, *a, **k)
        return move

    def unlink(path, *a, **k):
        calls.append(("unlink", os.fspath(path)))
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", moved(real_replace, "rename"))
    monkeypatch.setattr(os, "rename", moved(real_rename, "rename"))
    monkeypatch.setattr(os, "unlink", unlink)
    return calls


@pytest.mark.parametrize("op", ["register", "remove"])
def test_a_record_reaches_the_disk_before_its_name_does(state, monkeypatch, op):
    """A power cut (which a kill -9 cannot show) may keep a rename and lose the data
    it points to: every record a transaction renames into place is synced first, and
    its directory before the journal goes."""
    store.create(state, "a")
    store.create(state, "b")
    if op == "remove":
        peers.register(state, "a", "b")
    calls = disk_calls(monkeypatch)
    (peers.register if op == "register" else peers.unregister)(state, "a", "b")
    monkeypatch.undo()
    records = {str(state.metadata_path(n)) for n in ("a", "b")}
    renames = [i for i, c in enumerate(calls) if c[0] == "rename" and c[2] in records]
    assert len(renames) == 2, calls
    for i in renames:
        assert ("fsync", calls[i][1]) in calls[:i], (calls[i], calls)
    journal_gone = next(i for i, c in enumerate(calls)
                        if c[0] == "unlink" and "/journal/" in c[1])
    for name in ("a", "b"):
        assert ("fsync", str(state.pod_dir(name))) in calls[renames[-1]:journal_gone], calls
    # One wait for the disk: both records are synced before either is renamed.
    first_sync = min(calls.index(("fsync", calls[i][1])) for i in renames)
    assert first_sync < renames[0] and all(
        ("fsync", calls[i][1]) in calls[first_sync:renames[0]] for i in renames), calls

def test_sigkill_at_random_moments_never_leaves_a_torn_record(state):
    store.create(state, "a")
    path = state.metadata_path("a")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for attempt in range(30):
        writer = workers.start("rewrite-forever", state.root, "a")
        with workers.stopping(writer):
            time.sleep(rng.uniform(0, 0.04))
            writer.kill()  # SIGKILL: no cleanup of any kind
            writer.wait()
        doc = metadata.parse(path.read_bytes(), path, expect_name="a")  # raises if torn
        if "counter" in doc:  # the blob belongs to the same write as the counter
            assert len(doc["blob"]) == 20_000 + (doc["counter"] * 7919) % 200_000, (seed, attempt)
    # The next locked command sweeps temp files a killed writer left behind.
    store.update(state, "a", lambda d: {**d, "after": True})
    assert not [f for f in os.listdir(path.parent) if is_temp_name(f)]
    assert store.read(state, "a")["after"] is True


# -- `yoi pod rm` under injected faults ------------------------------------------
#
# Pods a, b, c are all mutual peers and b is removed. The change is
# [write a, write c, remove b]: before/after-write-1 is a, -2 is c, -3 renames
# b's directory aside; atomic-before-replace fires for the journal (1), a (2)
# and c (3), and again for each restored file when a rollback runs.

def make_trio(state) -> dict:
    for n in "abc":
        store.create(state, n)
    peers.register(state, "a", "b")
    peers.register(state, "c", "b")
    peers.register(state, "a", "c")
    store.update(state, "b", lambda d: {**d, "unknown": {"kept": True}})
    return snapshot(state)


def snapshot(state) -> dict:
    out = {}
    for n in "abc":
        p = state.metadata_path(n)
        out[n] = p.read_bytes() if p.exists() else None
    out["b-dir"] = sorted(os.listdir(state.pod_dir("b"))) if state.pod_dir("b").is_dir() else None
    return out


def outcome(state, before: dict) -> str:
    """'intact' or 'gone', asserting that it is exactly one of them."""
    assert leftovers(state) == []
    now = snapshot(state)
    if now["b"] is not None:
        assert {k: v for k, v in now.items() if k != "b-dir"} == \
            {k: v for k, v in before.items() if k != "b-dir"}
        assert set(now["b-dir"]) - {"runtime.lock"} == {"metadata.toml", "session.jsonl"}
        return "intact"
    assert not state.pod_dir("b").exists()
    assert metadata.peer_names(store.read(state, "a")) == ["c"]
    assert metadata.peer_names(store.read(state, "c")) == ["a"]
    return "gone"


def spec(point: str, action: str) -> str:
    name, _, nth = point.partition("#")
    return f"{name}:{action}" + (f":{nth}" if nth else "")


FORWARD = ["after-lock", "after-lock#2", "after-journal", "before-write-1", "after-write-1",
           "before-write-2", "after-write-2", "before-write-3", "after-write-3",
           "before-journal-remove", "atomic-before-replace#1", "atomic-before-replace#2",
           "atomic-before-replace#3"]


@pytest.mark.parametrize("action", ["crash", "eio"])
@pytest.mark.parametrize("point", FORWARD)
def test_pod_rm_fault_before_commit_leaves_everything_intact(cli, run_yoi, state, point, action):
    before = make_trio(state)
    r = run_yoi("pod", "rm", "b", env={"YOI_FAULT": spec(point, action)})
    if action == "crash":
        assert r.exit_code == CRASH, r
    else:
        assert r.exit_code == 1, r
        assert r.stderr.startswith("yoi: error: ") and r.stderr.count("\n") == 1, r
        assert f"injected I/O error at {point.partition('#')[0]}" in r.stderr, r
    recover_and_check(cli, state, before, expect="intact")


def recover_and_check(cli, state, before, expect):
    # Any command that takes one of the locks finishes or undoes the change first.
    r = cli("pod", "create", "a", "--exist-ok")
    assert r.exit_code == 0, r
    assert outcome(state, before) == expect
    if expect == "intact":  # and the Pod can still be removed cleanly
        assert cli("pod", "rm", "b").exit_code == 0
        assert outcome(state, before) == "gone"


@pytest.mark.parametrize("action", ["crash", "eio"])
def test_pod_rm_fault_after_commit_keeps_the_removal(cli, run_yoi, state, action):
    before = make_trio(state)
    r = run_yoi("pod", "rm", "b", env={"YOI_FAULT": f"after-journal-remove:{action}"})
    if action == "crash":
        assert r.exit_code == CRASH, r
    else:  # the change is committed: an error syncing afterwards does not undo it
        assert r.exit_code == 0, r
        assert r.stdout == "removed b\n", r
    # Committed: nothing to roll back; only b's directory, set aside, may remain ...
    assert [e for e in leftovers(state) if not e.startswith("pods/.b.removed-")] == []
    assert cli("pod", "create", "a", "--exist-ok").exit_code == 0
    assert not state.pod_dir("b").exists()
    # ... and creating the name again sweeps it.
    assert cli("pod", "create", "b").exit_code == 0
    assert cli("pod", "rm", "b").exit_code == 0
    assert outcome(state, before) == "gone"


ROLLBACK_FAULTS = [  # the forward write fails with EIO, then the rollback is hit too
    ("before-write-3:eio,recovery-after-write-1:{action}", "intact"),
    ("before-write-3:eio,recovery-after-write-2:{action}", "intact"),
    ("after-write-3:eio,recovery-after-write-3:{action}", "intact"),
    ("after-write-3:eio,recovery-before-journal-remove:{action}", "intact"),
    ("after-write-2:eio,atomic-before-replace:{action}:4", "intact"),
    # a failure after the commit point must not start a rollback at all
    ("after-journal-remove:eio,recovery-after-write-1:{action}", "gone"),
]


@pytest.mark.parametrize("action", ["crash", "eio"])
@pytest.mark.parametrize("faults, expect", ROLLBACK_FAULTS)
def test_pod_rm_fault_during_its_own_rollback(cli, run_yoi, state, faults, expect, action):
    before = make_trio(state)
    r = run_yoi("pod", "rm", "b", env={"YOI_FAULT": faults.format(action=action)})
    if expect == "gone":
        assert r.exit_code == 0, r  # committed: the error after it is not a failure
    elif action == "crash":
        assert r.exit_code == CRASH, r
    else:
        assert r.exit_code == 1, r
        assert "and so did its rollback" in r.stderr and "journal" in r.stderr, r
    if expect == "gone":
        cli("pod", "create", "b")  # sweeps the set-aside directory
        assert cli("pod", "rm", "b").exit_code == 0
    recover_and_check(cli, state, before, expect)


RECOVERY_FAULTS = ["recovery-after-write-1", "recovery-after-write-2", "recovery-after-write-3",
                   "recovery-before-journal-remove", "atomic-before-replace#1",
                   "atomic-before-replace#2"]


@pytest.mark.parametrize("action", ["crash", "eio"])
@pytest.mark.parametrize("point", RECOVERY_FAULTS)
def test_interrupted_recovery_is_finished_by_the_next_command(cli, run_yoi, state, point, action):
    before = make_trio(state)
    # Everything applied except the commit: the worst moment to die.
    r = run_yoi("pod", "rm", "b", env={"YOI_FAULT": "before-journal-remove:crash"})
    assert r.exit_code == CRASH, r
    assert len(os.listdir(state.journal_dir)) == 1
    # The next command, on a peer only, runs the recovery and is itself hit.
    r = run_yoi("pod", "config", "c", "--accept-peers", env={"YOI_FAULT": spec(point, action)})
    assert r.exit_code == (CRASH if action == "crash" else 1), r
    recover_and_check(cli, state, before, expect="intact")


def test_set_aside_directory_of_a_removed_pod_is_swept_by_create(cli, state):
    state.ensure()
    trash = state.pods_dir / ".b.removed-1-2-3"
    trash.mkdir()
    (trash / "metadata.toml").write_text("old")
    assert cli("pod", "create", "b").exit_code == 0
    assert leftovers(state) == []


def test_journal_temp_file_of_a_dead_writer_is_swept(cli, run_yoi, state):
    make_trio(state)
    r = run_yoi("pod", "rm", "b", env={"YOI_FAULT": "atomic-before-replace:crash:1"})
    assert r.exit_code == CRASH, r
    [temp] = os.listdir(state.journal_dir)
    assert temp.startswith(".") and ".tmp-" in temp
    assert cli("pod", "show", "a").exit_code == 0  # reading takes no lock: nothing swept
    assert os.listdir(state.journal_dir) == [temp]
    assert cli("pod", "create", "a", "--exist-ok").exit_code == 0
    assert os.listdir(state.journal_dir) == []


def test_create_cleans_a_staging_directory_left_by_a_killed_create(state, cli):
    """A create killed before its rename leaves `.NAME.creating-PID`; the next create removes it."""
    state.ensure()
    leftover = state.pods_dir / ".a.creating-99999999"
    leftover.mkdir(mode=0o700)
    (leftover / "metadata.toml").write_text("half")
    r = cli("pod", "create", "a")
    assert r.exit_code == 0, r
    assert not leftover.exists()
    assert sorted(p.name for p in state.pods_dir.iterdir()) == ["a"]


@pytest.mark.parametrize("spec", ["garbage", "after-lock:crash:abc", "after-lock:boom",
                                  "after-lock:crash:0", ":crash", "after-lock:eio:1:2"])
def test_malformed_yoi_fault_is_one_line_exit_2_and_writes_nothing(run_yoi, yoi_home, spec):
    r = run_yoi("pod", "create", "a", "--json", env={"YOI_FAULT": spec})
    assert r.exit_code == 2, r
    message = (f"bad YOI_FAULT rule {spec!r}: want POINT:crash|eio[:N] with N >= 1 "
               "(YOI_FAULT is a testing aid: unset it)")
    assert r.stderr == f"yoi: error: {message}\n", r
    assert r.json["error"]["message"] == message
    assert not yoi_home.exists()


def test_create_never_sweeps_the_set_aside_directory_of_a_similarly_named_pod(cli, run_yoi, state):
    """Pod `x.removed-1` set aside by an uncommitted removal is not Pod `x`'s trash."""
    store.create(state, "x.removed-1", exec_cmd="keep me")
    before = state.metadata_path("x.removed-1").read_bytes()
    r = run_yoi("pod", "rm", "x.removed-1", env={"YOI_FAULT": "before-journal-remove:crash"})
    assert r.exit_code == CRASH, r
    [aside] = [e for e in os.listdir(state.pods_dir) if e.startswith(".")]
    assert aside.startswith(".x.removed-1.removed-")
    assert cli("pod", "create", "x").exit_code == 0  # sweeps only x's own leftovers
    assert aside in os.listdir(state.pods_dir)
    # The next command on the Pod rolls its removal back: it is there, unchanged.
    r = cli("pod", "config", "x.removed-1", "--accept-peers")
    assert r.exit_code == 0, r
    assert store.read(state, "x.removed-1")["runtime"]["exec"] == "keep me"
    assert leftovers(state) == []
    assert state.metadata_path("x.removed-1").read_bytes() == before  # accept_peers was true


DAMAGED_JOURNALS = {  # damaged from outside: Yoi never writes these
    "no-action": ('pods = ["a"]\nchanges = [{pod = "a"}]', r"changes\[0\] has an unknown action None"),
    "no-prior": ('pods = ["a"]\nchanges = [{pod = "a", action = "write"}]',
                 r"changes\[0\] has no prior text to restore"),
    "bad-pod-name": ('pods = ["a", "../x"]\nchanges = []', r"pods \['a', '../x'\] is not a list"),
    "unlocked-pod": ('pods = ["a"]\nchanges = [{pod = "b", action = "write", prior = "junk"}]',
                     r"changes\[0\] does not name one of the journal's Pods"),
    "pods-string": ('pods = "ab"\nchanges = []', r"pods 'ab' is not a list of Pod names"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGED_JOURNALS))
@pytest.mark.parametrize("txid", ["1-2-ab", "../../elsewhere"])
def test_damaged_journal_is_never_followed_and_left_for_doctor(cli, state, kind, txid):
    from yoi.errors import CorruptMetadata
    from yoi.txn import load_journal
    body, problem = DAMAGED_JOURNALS[kind]
    store.create(state, "a")
    store.create(state, "b")
    b_before = state.metadata_path("b").read_bytes()
    text = f'txid = "{txid}"\n{body}\n'
    path = state.journal_dir / "1-2-ab.toml"
    path.write_text(text)
    if txid != "1-2-ab":
        problem = r"txid '\.\./\.\./elsewhere' is not MILLIS-PID-HEX"
    with pytest.raises(CorruptMetadata, match=f"{path}: journal is not valid: {problem}"):
        load_journal(path)
    r = cli("pod", "config", "a", "--exec", "x")
    assert r.exit_code == 0, r
    assert store.read(state, "a")["runtime"]["exec"] == "x"
    assert state.metadata_path("b").read_bytes() == b_before  # b's lock was never taken
    assert path.read_text() == text  # `yoi doctor` reports it


def test_peer_list_of_a_pod_whose_removal_crashed_rolls_it_back(cli, run_yoi, state):
    before = make_trio(state)
    r = run_yoi("pod", "rm", "b", env={"YOI_FAULT": "after-write-3:crash"})
    assert r.exit_code == CRASH, r
    assert not state.pod_dir("b").exists()  # set aside, not committed
    r = cli("pod", "peer", "list", "b", "--json")
    assert r.exit_code == 0, r
    assert [p["pod_name"] for p in r.json["peers"]] == ["a", "c"]
    assert outcome(state, before) == "intact"
