"""`yoi doctor`: every check finds exactly its breakage, and --fix repairs it."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from yoi import doctor as lib
from yoi import metadata, peers, store
from yoi.atomic import atomic_write
from yoi.lock import FileLock


# -- helpers ------------------------------------------------------------------


def lists(state, name: str, other: str) -> bool:
    """Does NAME's record, as it is on disk, list OTHER (one side of a relation)?"""
    from yoi.txn import read_pod_file
    pod = read_pod_file(state, name)
    return pod.exists and any(p["pod_name"] == other for p in pod.doc.get("peers", []))

def pods(state, *names):
    for name in names:
        store.create(state, name)


def meta_path(state, name) -> Path:
    return state.metadata_path(name)


def read_doc(state, name) -> dict:
    return metadata.parse(meta_path(state, name).read_bytes(), "x", expect_name=name)


def write_doc(state, name, doc) -> None:
    """Write NAME's metadata directly, bypassing locks and transactions."""
    atomic_write(meta_path(state, name), metadata.dumps(doc))


def set_peers(state, name, *others) -> None:
    doc = read_doc(state, name)
    doc["peers"] = [{"pod_name": o, "registered_at": metadata.utcnow()} for o in others]
    write_doc(state, name, doc)


def doctor(cli, *args):
    """Run `yoi doctor --json ARGS`; return (result, problems)."""
    r = cli("doctor", "--json", *args)
    assert r.exit_code in (0, 1), r
    doc = r.json
    assert doc["ok"] is (r.exit_code == 0), r
    return r, doc["problems"]


def only(problems, code):
    found = [p for p in problems if p["code"] == code]
    assert len(found) == 1 and len(problems) == 1, problems
    return found[0]


def check_found_and_fixed(cli, code, pod, path, fixable=True):
    """The finding is reported alone; --fix repairs it; a second run is clean."""
    failing = 1 if lib.severity(code) == "error" else 0  # a warning is reported, exit 0
    r, problems = doctor(cli)
    assert r.exit_code == failing, r
    p = only(problems, code)
    assert (p["pod_name"], p["path"], p["fixable"], p["fixed"], p["severity"]) == \
        (pod, str(path), fixable, False, lib.severity(code))
    if not failing:
        r, _ = doctor(cli, "--strict")
        assert r.exit_code == 1, r
    r, problems = doctor(cli, "--fix")
    p = only(problems, code)
    assert p["fixed"] is fixable, r
    assert r.exit_code == (0 if fixable else failing), r
    r, problems = doctor(cli)
    assert (r.exit_code, problems) == ((0, []) if fixable
                                       else (failing, [p | {"fixed": False}])), r
    return p


def assert_clean_while_locked(cli, state, name, code):
    """While NAME's metadata lock is held, `yoi doctor --fix --check CODE` finds nothing."""
    lock = FileLock(state.lock_path(name), 5).acquire()
    try:
        r, problems = doctor(cli, "--fix", "--check", code)
        assert (r.exit_code, problems) == (0, []), r
    finally:
        lock.release()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def holder(tmp_path):
    """Start a process that flocks a file (writing its pid there) until stopped."""
    procs = []

    def start(path: Path, write_pid: bool = True) -> subprocess.Popen:
        code = textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if {write_pid!r}:
                os.ftruncate(fd, 0); os.pwrite(fd, f"{{os.getpid()}}\\n".encode(), 0)
            print("locked", flush=True)
            sys.stdin.read()
        """)
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline() == "locked\n"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


# -- a healthy directory ------------------------------------------------------------

def test_fresh_install_is_healthy_and_untouched(cli, yoi_home):
    r = cli("doctor")
    assert (r.exit_code, r.stderr) == (0, f"yoi: note: no state directory at {yoi_home}\n"), r
    assert r.stdout == ("no problems found (checked 0 Pods, 0 relations, 0 journals, "
                        "0 session logs, 0 sockets)\n")
    r = cli("doctor", "--fix", "--json")
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "strict": False, "state_exists": False,
                      "checked": {"pods": 0, "relations": 0, "journals": 0,
                                  "sessions": 0, "sockets": 0},
                      "errors": 0, "warnings": 0, "problems": []}
    assert not yoi_home.exists()


def test_healthy_directory_exits_0_with_no_findings(cli, state):
    pods(state, "a", "b", "c")
    peers.register(state, "a", "b")
    peers.register(state, "b", "c")
    r = cli("doctor")
    assert r.exit_code == 0, r
    assert r.stdout == ("no problems found (checked 3 Pods, 2 relations, 0 journals, "
                        "3 session logs, 0 sockets)\n")
    r, problems = doctor(cli, "--fix")
    assert (r.exit_code, problems) == (0, [])
    assert r.json["checked"]["pods"] == 3


def test_summary_counts_in_the_singular_when_there_is_one(cli, state):
    pods(state, "a", "b")
    peers.register(state, "a", "b")
    r = cli("doctor")
    assert r.stdout == ("no problems found (checked 2 Pods, 1 relation, 0 journals, "
                        "2 session logs, 0 sockets)\n"), r


# -- output, options, exit codes ------------------------------------------------------

def test_human_output_is_one_line_per_finding_then_a_summary(cli, state):
    pods(state, "a", "b")
    set_peers(state, "a", "ghost")
    meta_path(state, "b").write_text("not [toml")
    r = cli("doctor")
    assert r.exit_code == 1, r
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r
    assert lines[0] == (f"peer-dangling a: lists 'ghost' as a peer, but there is no Pod "
                        f"'ghost' ({meta_path(state, 'a')}) [error, fixable with --fix]")
    assert lines[1].startswith("metadata-parse b: does not parse: ")
    assert lines[1].endswith(f"({meta_path(state, 'b')}) [error, not fixable]")
    assert lines[2].startswith("2 problems found (2 errors, 0 warnings), 1 fixable with --fix "
                               "(checked 2 Pods")
    r = cli("doctor", "--fix")
    assert r.exit_code == 1, r
    lines = r.stdout.splitlines()
    assert lines[0].endswith("[error, fixed]") and lines[1].endswith("[error, not fixable]"), r
    assert lines[2].startswith("2 problems found, 1 fixed, 1 remaining (1 error, 0 warnings)"), r


def test_warnings_are_reported_but_do_not_fail_unless_strict(cli, state):
    """A crashed job leaves a stale socket and pid hint: reported, exit 0, so
    `yoi doctor` gates the next job; --strict fails on them; --fix clears them."""
    pods(state, "a")
    state.run_dir.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(state.default_socket_path("a")))
    s.close()
    doc = read_doc(state, "a")
    doc["runtime"]["pid"] = dead_pid()
    write_doc(state, "a", doc)
    r = cli("doctor")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines[:-1]) == ["stale-pid", "stale-socket"]
    assert all(line.endswith("[warning, fixable with --fix]") for line in lines[:-1]), r
    assert lines[-1].startswith("2 problems found (0 errors, 2 warnings), 2 fixable"), r
    r = cli("doctor", "--json")
    assert (r.exit_code, r.json["ok"], r.json["errors"], r.json["warnings"]) == (0, True, 0, 2)
    r = cli("doctor", "--strict", "--json")
    assert (r.exit_code, r.json["ok"], r.json["strict"]) == (1, False, True), r
    assert r.json["error"]["code"] == "failed"
    assert cli("doctor", "--fix", "--strict").exit_code == 0
    assert cli("doctor", "--strict").stdout.startswith("no problems found")


def test_json_problem_fields(cli, state):
    pods(state, "a")
    set_peers(state, "a", "ghost")
    r, problems = doctor(cli)
    assert r.json["checked"] == {"pods": 1, "relations": 1, "journals": 0, "sessions": 1,
                                 "sockets": 0}
    assert problems == [{"code": "peer-dangling", "severity": "error", "pod_name": "a",
                         "path": str(meta_path(state, "a")),
                         "message": "lists 'ghost' as a peer, but there is no Pod 'ghost'",
                         "fixable": True, "fixed": False}]


def test_list_checks_names_every_code_once(cli):
    r = cli("doctor", "--list-checks")
    assert r.exit_code == 0, r
    codes = [line.split()[0] for line in r.stdout.splitlines()]
    assert codes == list(lib.CHECKS)
    r = cli("doctor", "--list-checks", "--json")
    assert [c["code"] for c in r.json["checks"]] == list(lib.CHECKS)
    assert r.json["checks"][0] == {"code": "state-permissions", "severity": "error",
                                   "description": lib.CHECKS["state-permissions"][0],
                                   "fixable": True}


def test_check_limits_the_run_to_those_codes(cli, state):
    pods(state, "a", "b")
    set_peers(state, "a", "ghost")
    set_peers(state, "b", "b")
    r, problems = doctor(cli, "--check", "peer-self")
    assert [p["code"] for p in problems] == ["peer-self"], r
    r, problems = doctor(cli, "--check", "peer-self", "--fix")
    assert r.exit_code == 0, r
    assert metadata.peer_names(read_doc(state, "a")) == ["ghost"]  # not selected: untouched
    assert metadata.peer_names(read_doc(state, "b")) == []
    r, problems = doctor(cli, "--check", "peer-dangling", "--check", "peer-self")
    assert [p["code"] for p in problems] == ["peer-dangling"], r


def test_usage_errors_exit_2(cli):
    r = cli("doctor", "--check", "no-such-check")
    assert r.exit_code == 2, r
    assert r.stderr.startswith("yoi: error: unknown check code 'no-such-check'; known codes: "
                               "state-permissions, "), r
    r = cli("doctor", "--bogus")
    assert r.exit_code == 2, r


def test_help_has_examples(cli):
    r = cli("doctor", "--help")
    assert r.exit_code == 0
    assert "yoi doctor --fix --json" in r.stdout


def test_scan_in_worker_processes_finds_the_same(state, monkeypatch):
    pods(state, *"abcdef")
    set_peers(state, "a", "ghost")
    meta_path(state, "b").write_text("oops [")
    state.session_path("c").write_bytes(b'{"torn')
    (state.pod_dir("d") / ".metadata.toml.tmp-0123456789ab").write_text("x")
    monkeypatch.setattr(lib, "POOL_CHUNK", 2)
    monkeypatch.setattr(lib, "POOL_THRESHOLD", 10**9)
    alone = lib.run(state)
    monkeypatch.setattr(lib, "POOL_THRESHOLD", 1)
    pooled = lib.run(state)
    assert pooled == alone
    assert [p.code for p in pooled.problems] == ["peer-dangling", "metadata-parse",
                                                 "session-torn", "temp-file"]


def test_progress_is_reported_by_the_library_and_never_in_json(cli, state):
    pods(state, "a", "b")
    seen = []
    lib.run(state, progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert seen[-1] == ("pods", 2, 2)
    r = cli("doctor", "--json")  # CliRunner's stderr is not a TTY
    assert (r.exit_code, r.stderr) == (0, ""), r


def test_progress_counter_waits_a_moment_then_uses_carriage_returns(capsys, monkeypatch):
    from yoi.cli.doctor import _Progress
    progress = _Progress()
    progress("pods", 1, 10)
    assert capsys.readouterr().err == ""  # not yet: the run has not taken a moment
    monkeypatch.setattr(_Progress, "DELAY", 0.0)
    progress("pods", 5, 10)
    progress("pods", 6, 10)  # too soon after the last redraw
    monkeypatch.setattr(_Progress, "INTERVAL", 0.0)
    progress("relations", 1, 2)
    progress.clear()
    assert capsys.readouterr().err == ("\ryoi doctor: pods 5/10"
                                       "\ryoi doctor: relations 1/2"
                                       "\r" + " " * 25 + "\r")


# -- state directory ------------------------------------------------------------

def test_state_permissions(cli, state, yoi_home):
    pods(state, "a")
    os.chmod(yoi_home, 0o755)
    check_found_and_fixed(cli, "state-permissions", None, yoi_home)
    assert os.stat(yoi_home).st_mode & 0o777 == 0o700


def test_pod_directory_permissions(cli, state):
    pods(state, "a")
    os.chmod(state.pod_dir("a"), 0o750)
    p = check_found_and_fixed(cli, "state-permissions", "a", state.pod_dir("a"))
    assert p["message"].startswith("mode 0750, expected 0700")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")
def test_state_owner(cli, state):
    pods(state, "a")
    os.chown(state.journal_dir, 4242, -1)
    p = check_found_and_fixed(cli, "state-owner", None, state.journal_dir, fixable=False)
    assert p["message"] == f"owned by uid 4242, not by the current user (uid {os.getuid()})"


# -- entries under pods/ and metadata ---------------------------------------------

def test_invalid_directory_name_under_pods(cli, state):
    pods(state, "a")
    bad = state.pods_dir / "bad name"
    bad.mkdir()
    p = check_found_and_fixed(cli, "pod-dir-name", None, bad, fixable=False)
    assert p["message"] == "'bad name' is not a valid Pod name"
    assert bad.is_dir()


def test_pod_entry_that_is_not_a_directory(cli, state):
    state.ensure()
    (state.pods_dir / "x").write_text("hello")
    check_found_and_fixed(cli, "pod-not-dir", "x", state.pods_dir / "x", fixable=False)
    assert (state.pods_dir / "x").read_text() == "hello"


@pytest.mark.parametrize("what", ["pod-dir", "lock", "metadata.toml", "session.jsonl",
                                  "runtime.lock"])
def test_symlinks_where_files_are_expected(cli, state, tmp_path, what):
    pods(state, "a")
    if what == "pod-dir":
        link = state.pods_dir / "alias"
        link.symlink_to(state.pod_dir("a"))
        pod = "alias"
    elif what == "lock":
        link = state.lock_path("a")
        link.unlink()
        link.symlink_to(tmp_path / "elsewhere.lock")
        pod = "a"
    elif what == "runtime.lock":
        link = state.runtime_lock_path("a")
        link.symlink_to(tmp_path / "elsewhere.lock")
        pod = "a"
    else:
        link = state.pod_dir("a") / what
        target = tmp_path / what
        target.write_bytes(link.read_bytes())
        link.unlink()
        link.symlink_to(target)
        pod = "a"
    p = check_found_and_fixed(cli, "symlink", pod, link, fixable=False)
    assert "symlink" in p["message"]
    assert link.is_symlink()


@pytest.mark.parametrize("name", ["session.index", "session.index-wal"])
@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_an_index_that_is_no_file_is_reported_and_the_pod_refuses_to_start(
        cli, state, tmp_path, run_yoi, name, kind):
    pods(state, "a")
    path = state.pod_dir("a") / name
    if kind == "symlink":
        (tmp_path / "target").write_bytes(b"precious")
        path.symlink_to(tmp_path / "target")
    else:
        path.mkdir()
    p = check_found_and_fixed(cli, "symlink" if kind == "symlink" else "unreadable", "a",
                              path, fixable=False)
    assert "the Pod cannot start; remove it" in p["message"]
    r = run_yoi("pod", "start", "a")
    assert r.exit_code == 5, r
    assert f"{path} is a {kind}, not the Pod's id index (never followed)" in r.stderr, r
    if kind == "symlink":
        assert (tmp_path / "target").read_bytes() == b"precious"
        path.unlink()
    else:
        path.rmdir()
    assert run_yoi("pod", "start", "a").exit_code == 0
    assert run_yoi("pod", "stop", "a").exit_code == 0


def test_metadata_missing(cli, state):
    pods(state, "a")
    meta_path(state, "a").unlink()
    check_found_and_fixed(cli, "metadata-missing", "a", meta_path(state, "a"), fixable=False)


@pytest.mark.parametrize("content, code, message", [
    (b"schema = 1\npod_name = [oops\n", "metadata-parse", "does not parse: "),
    (b'schema = 1\n# \xff\n', "metadata-parse", "not UTF-8 (at line 2, column 3)"),
    (b'schema = 2\npod_name = "a"\n', "metadata-schema", "unsupported schema 2 (expected 1)"),
    (b'schema = 1\npod_name = "a"\npeers = [{pod_name = "no/slash"}]\n', "metadata-schema",
     "peers[0] has no valid pod_name"),
    (b'schema = 1\npod_name = "b"\n', "metadata-name",
     "pod_name 'b' differs from its directory name 'a'"),
])
def test_bad_metadata_is_reported_and_left_byte_for_byte(cli, state, content, code, message):
    pods(state, "a", "b")
    peers.register(state, "a", "b")
    meta_path(state, "a").write_bytes(content)
    before = {p: p.read_bytes() for p in state.root.rglob("*") if p.is_file()}
    p = check_found_and_fixed(cli, code, "a", meta_path(state, "a"), fixable=False)
    assert p["message"].startswith(message), p
    # b's entry for a is not judged against a file that cannot be read: nothing changed.
    after = {p: p.read_bytes() for p in state.root.rglob("*") if p.is_file()
             and "locks" not in p.parts}
    assert after == {p: b for p, b in before.items() if "locks" not in p.parts}


# -- peer relations -------------------------------------------------------------------

def test_one_sided_relation_is_removed(cli, state):
    pods(state, "a", "b")
    set_peers(state, "a", "b")
    b_before = meta_path(state, "b").read_bytes()
    p = check_found_and_fixed(cli, "peer-one-sided", "a", meta_path(state, "a"))
    assert p["message"] == ("lists 'b' as a peer, but 'b' does not list 'a'; a relation is "
                            "real only when both sides hold it")
    assert metadata.peer_names(read_doc(state, "a")) == []
    assert meta_path(state, "b").read_bytes() == b_before


def test_dangling_relation_is_removed_and_other_peers_kept(cli, state):
    pods(state, "a", "b")
    peers.register(state, "a", "b")
    doc = read_doc(state, "a")
    doc["peers"].append({"pod_name": "ghost", "registered_at": metadata.utcnow()})
    doc["extra"] = {"kept": True}
    write_doc(state, "a", doc)
    check_found_and_fixed(cli, "peer-dangling", "a", meta_path(state, "a"))
    fixed = read_doc(state, "a")
    assert metadata.peer_names(fixed) == ["b"]
    assert fixed["extra"] == {"kept": True}


def test_self_peer_is_removed(cli, state):
    pods(state, "a")
    set_peers(state, "a", "a")
    p = check_found_and_fixed(cli, "peer-self", "a", meta_path(state, "a"))
    assert p["message"] == "lists itself as a peer"
    assert metadata.peer_names(read_doc(state, "a")) == []


def test_duplicate_peers_are_merged_keeping_the_relation(cli, state):
    pods(state, "a", "b")
    peers.register(state, "a", "b")
    doc = read_doc(state, "a")
    first = doc["peers"][0]
    doc["peers"].append({"pod_name": "b", "registered_at": metadata.utcnow(), "note": "x"})
    write_doc(state, "a", doc)
    p = check_found_and_fixed(cli, "peer-duplicate", "a", meta_path(state, "a"))
    assert p["message"] == "lists 'b' as a peer 2 times"
    assert read_doc(state, "a")["peers"] == [first | {"note": "x"}]
    assert lists(state, "b", "a")


def test_relation_to_a_corrupt_pod_is_not_judged(cli, state):
    pods(state, "a", "b")
    set_peers(state, "a", "b")
    meta_path(state, "b").write_text("garbage [")
    r, problems = doctor(cli, "--fix")
    assert [p["code"] for p in problems] == ["metadata-parse"], r
    assert metadata.peer_names(read_doc(state, "a")) == ["b"]


def test_relation_half_written_by_a_live_transaction_is_not_reported(cli, state):
    """A scan that sees a transaction between its two writes waits for its locks."""
    pods(state, "a", "b")
    locks = [FileLock(state.lock_path(n), 5).acquire() for n in ("a", "b")]
    try:
        set_peers(state, "a", "b")  # first write of a "register" in progress
        results = []
        t = threading.Thread(target=lambda: results.append(lib.run(state, fix=True)))
        t.start()
        time.sleep(0.3)  # the doctor is now waiting for the locks
        set_peers(state, "b", "a")  # second write
    finally:
        for lock in locks:
            lock.release()
    t.join(30)
    assert results and results[0].problems == []
    assert lists(state, "a", "b") and lists(state, "b", "a")


# -- journals -----------------------------------------------------------------------

def crash(state, fn: str, *args, point: str) -> subprocess.CompletedProcess:
    """Run yoi.peers.FN(*ARGS) / yoi.store.FN in a subprocess that dies at POINT."""
    module = "store" if fn == "remove" else "peers"
    code = (f"from yoi.state import State; from yoi import {module}; "
            f"{module}.{fn}(State.resolve({str(state.root)!r}), *{args!r})")
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, YOI_FAULT=point),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 137, p.stderr
    return p


def journals(state):
    return sorted(state.journal_dir.iterdir())


def test_leftover_journal_is_rolled_back(cli, state):
    pods(state, "a", "b")
    crash(state, "register", "a", "b", point="after-write-1:crash")
    [journal] = journals(state)
    assert lists(state, "a", "b") and not lists(state, "b", "a")
    # The half-done relation is not reported: rolling back the journal removes it.
    p = check_found_and_fixed(cli, "journal-leftover", None, journal)
    assert p["message"].startswith("interrupted change of Pods a, b (txid ")
    assert journals(state) == []
    assert not lists(state, "a", "b") and not lists(state, "b", "a")


def test_check_without_fix_leaves_a_leftover_journal_alone(cli, state):
    pods(state, "a", "b")
    crash(state, "register", "a", "b", point="after-write-1:crash")
    before = {p: p.read_bytes() for p in state.root.rglob("*") if p.is_file()
              and "locks" not in p.parts}
    r, problems = doctor(cli)
    assert [p["code"] for p in problems] == ["journal-leftover"], r
    after = {p: p.read_bytes() for p in state.root.rglob("*") if p.is_file()
             and "locks" not in p.parts}
    assert after == before


def test_journal_whose_writer_holds_the_locks_is_not_leftover(cli, state):
    pods(state, "a", "b")
    crash(state, "register", "a", "b", point="after-write-1:crash")
    assert_clean_while_locked(cli, state, "b", "journal-leftover")
    assert len(journals(state)) == 1


def test_corrupt_journal_is_left_in_place(cli, state):
    pods(state, "a")
    path = state.journal_dir / "1-2-abcd.toml"
    path.write_bytes(b"txid = [")
    p = check_found_and_fixed(cli, "journal-corrupt", None, path, fixable=False)
    assert p["message"].startswith("journal does not parse: ")
    assert path.read_bytes() == b"txid = ["


# YOI_FAULT rule -> what `yoi doctor --fix` finds after that crash of `register a b`.
CRASH_POINTS = {"after-lock:crash": [], "atomic-before-replace:crash:1": ["temp-file"],
                "after-journal:crash": ["journal-leftover"],
                "atomic-before-replace:crash:2": ["journal-leftover"],
                "after-write-1:crash": ["journal-leftover"],
                "atomic-before-replace:crash:3": ["journal-leftover"],
                "after-write-2:crash": ["journal-leftover"],
                "before-journal-remove:crash": ["journal-leftover"]}


@pytest.mark.parametrize("recover_with", ["doctor", "command"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crashed_register_is_recovered(cli, state, point, recover_with):
    """After a crash at any point before the commit both Pods show the old relation."""
    pods(state, "a", "b", "c")
    peers.register(state, "a", "c")
    crash(state, "register", "a", "b", point=point)
    if recover_with == "doctor":
        r, problems = doctor(cli, "--fix")
        assert r.exit_code == 0, r
        assert [p["code"] for p in problems] == CRASH_POINTS[point], r
    else:
        store.configure(state, "a", accept_peers=True)  # any command that takes a's lock
    r, problems = doctor(cli)
    assert (r.exit_code, problems) == (0, []), r
    assert journals(state) == []
    assert not lists(state, "a", "b") and not lists(state, "b", "a")
    assert lists(state, "a", "c") and lists(state, "c", "a")


def test_records_staged_by_a_leftover_journal_are_its_rollbacks_unless_only_temps_are_checked(
        cli, state):
    pods(state, "a", "b")
    crash(state, "register", "a", "b", point="before-write-1:crash")
    staged = sorted(p.parent.name for p in state.pods_dir.glob("*/.metadata.toml.tmp-*"))
    assert staged == ["a", "b"]
    r, problems = doctor(cli)  # the journal's rollback removes them: said once
    assert [p["code"] for p in problems] == ["journal-leftover"], r
    r, problems = doctor(cli, "--check", "temp-file", "--fix")
    # a's lock rolls the journal back, which takes b's lock too and clears b's as well
    assert [(p["code"], p["pod_name"], p["fixed"]) for p in problems] == [
        ("temp-file", "a", True)], r
    assert list(state.pods_dir.glob("*/.metadata.toml.tmp-*")) == []
    assert journals(state) == []  # taking the locks to remove them rolled it back


def test_crash_after_the_commit_keeps_the_new_relation(cli, state):
    pods(state, "a", "b")
    crash(state, "register", "a", "b", point="after-journal-remove:crash")
    r, problems = doctor(cli, "--fix")
    assert (r.exit_code, problems) == (0, []), r
    assert lists(state, "a", "b") and lists(state, "b", "a")


def test_crash_after_a_committed_removal_leaves_only_its_staging_directory(cli, state):
    pods(state, "a", "b")
    peers.register(state, "a", "b")
    crash(state, "remove", "a", point="after-journal-remove:crash")
    [trash] = state.pods_dir.glob(".a.removed-*")
    p = check_found_and_fixed(cli, "staging-dir", "a", trash)
    assert p["message"] == "leftover directory of an interrupted removal of Pod 'a' (committed)"
    assert not trash.exists() and not state.pod_dir("a").exists()
    assert metadata.peer_names(read_doc(state, "b")) == []


@pytest.mark.parametrize("point", ["after-write-1", "before-journal-remove"])
def test_crashed_unregister_keeps_the_prior_relation(cli, state, point):
    pods(state, "a", "b")
    peers.register(state, "a", "b")
    crash(state, "unregister", "a", "b", point=f"{point}:crash")
    r, problems = doctor(cli, "--fix")
    assert [p["code"] for p in problems] == ["journal-leftover"] and r.exit_code == 0, r
    assert lists(state, "a", "b") and lists(state, "b", "a")


@pytest.mark.parametrize("point", ["after-write-1", "after-write-2"])
def test_crashed_pod_removal_is_rolled_back(cli, state, point):
    pods(state, "a", "b")
    peers.register(state, "a", "b")
    crash(state, "remove", "a", point=f"{point}:crash")
    r, problems = doctor(cli, "--fix")
    assert [p["code"] for p in problems] == ["journal-leftover"] and r.exit_code == 0, r
    assert state.pod_dir("a").is_dir()
    assert lists(state, "a", "b") and lists(state, "b", "a")
    r, problems = doctor(cli)
    assert (r.exit_code, problems) == (0, []), r


# -- temp files and staging directories ----------------------------------------------

def test_leftover_temp_file_in_a_pod_directory(cli, state):
    pods(state, "a")
    tmp = state.pod_dir("a") / ".metadata.toml.tmp-0123456789ab"
    tmp.write_text("half")
    check_found_and_fixed(cli, "temp-file", "a", tmp)
    assert not tmp.exists()


def test_temp_file_of_a_writer_holding_the_lock_is_not_leftover(cli, state):
    pods(state, "a")
    tmp = state.pod_dir("a") / ".metadata.toml.tmp-0123456789ab"
    tmp.write_text("in progress")
    assert_clean_while_locked(cli, state, "a", "temp-file")
    assert tmp.exists()


def test_leftover_journal_temp_file(cli, state):
    pods(state, "a")
    gone, alive = dead_pid(), os.getppid()
    tmp = state.journal_dir / f".1700000000000-{gone}-abcd1234.toml.tmp-0123456789ab"
    tmp.write_text("half")
    live = state.journal_dir / f".1700000000000-{alive}-abcd1234.toml.tmp-0123456789ab"
    live.write_text("in progress")
    p = check_found_and_fixed(cli, "temp-file", None, tmp)
    assert p["message"] == f"leftover temp file of a journal written by pid {gone}, which is gone"
    assert not tmp.exists() and live.exists()


@pytest.mark.parametrize("kind", ["creating", "removed"])
def test_leftover_staging_directory(cli, state, kind):
    pods(state, "a")
    tag = "4242" if kind == "creating" else "1700000000000-4242-abcd1234"
    staging = state.pods_dir / f".b.{kind}-{tag}"
    staging.mkdir()
    (staging / "metadata.toml").write_text("x")
    p = check_found_and_fixed(cli, "staging-dir", "b", staging)
    assert not staging.exists()
    assert "interrupted " + ("creation" if kind == "creating" else "removal") in p["message"]


def test_staging_directory_is_attributed_to_the_pod_whose_name_contains_a_mark(cli, state):
    """`.a.removed-1.creating-PID` is a create of Pod `a.removed-1`, not a removal of `a`."""
    pods(state, "a")
    staging = state.pods_dir / ".a.removed-1.creating-4242"
    staging.mkdir()
    p = check_found_and_fixed(cli, "staging-dir", "a.removed-1", staging)
    assert "interrupted creation" in p["message"]


# -- runtime hints ----------------------------------------------------------------------

def dead_socket(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens


def test_stale_socket_is_removed(cli, state):
    pods(state, "a")
    sock = state.default_socket_path("a")
    dead_socket(sock)
    p = check_found_and_fixed(cli, "stale-socket", "a", sock)
    assert p["message"] == ("socket file no process serves (connection refused); "
                            "the Pod is not running")
    assert not sock.exists()


def test_stale_socket_named_by_metadata_and_of_a_removed_pod(cli, state, tmp_path):
    pods(state, "a")
    hinted = tmp_path / "elsewhere" / "a.sock"
    dead_socket(hinted)
    store.update(state, "a", lambda d: d | {"runtime": {"socket_path": str(hinted)}})
    orphan = state.default_socket_path("gone")
    dead_socket(orphan)
    r, problems = doctor(cli, "--fix")
    assert sorted((p["code"], p["pod_name"], p["path"], p["fixed"]) for p in problems) == [
        ("stale-socket", "a", str(hinted), True), ("stale-socket", "gone", str(orphan), True)]
    assert not hinted.exists() and not orphan.exists()


def test_socket_of_a_live_pod_is_left_alone(cli, state, holder):
    pods(state, "a")
    sock = state.default_socket_path("a")
    dead_socket(sock)
    holder(state.runtime_lock_path("a"))
    r, problems = doctor(cli, "--fix")
    assert (r.exit_code, problems) == (0, []), r
    assert r.json["checked"]["sockets"] == 1
    assert sock.exists()


def test_socket_that_something_serves_is_left_alone(cli, state):
    pods(state, "a")
    sock = state.default_socket_path("a")
    sock.parent.mkdir(mode=0o700, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(sock))
        server.listen(8)
        r, problems = doctor(cli, "--fix")
        assert (r.exit_code, problems) == (0, []), r
        assert sock.exists()
    finally:
        server.close()


def test_stale_pid_of_a_dead_process_is_cleared(cli, state):
    pods(state, "a")
    pid = dead_pid()
    store.update(state, "a", lambda d: d | {"runtime": {"pid": pid, "exec": "agent"}})
    p = check_found_and_fixed(cli, "stale-pid", "a", meta_path(state, "a"))
    assert p["message"] == f"metadata records pid {pid}, which is not running"
    assert read_doc(state, "a")["runtime"] == {"exec": "agent"}


def test_pid_that_is_alive_but_not_the_pod_is_stale(cli, state, holder):
    pods(state, "a")
    store.update(state, "a", lambda d: d | {"runtime": {"pid": os.getpid()}})
    p = check_found_and_fixed(cli, "stale-pid", "a", meta_path(state, "a"))
    assert p["message"] == (f"metadata records pid {os.getpid()}, which does not hold the "
                            "Pod's runtime lock")
    live = holder(state.runtime_lock_path("a"))
    store.update(state, "a", lambda d: d | {"runtime": {"pid": os.getpid()}})
    p = check_found_and_fixed(cli, "stale-pid", "a", meta_path(state, "a"))
    assert p["message"] == (f"metadata records pid {os.getpid()}, but the live Pod is "
                            f"pid {live.pid}")


def test_pid_of_the_live_pod_is_fine(cli, state, holder):
    pods(state, "a")
    live = holder(state.runtime_lock_path("a"))
    store.update(state, "a", lambda d: d | {"runtime": {"pid": live.pid}})
    r, problems = doctor(cli, "--fix")
    assert (r.exit_code, problems) == (0, []), r
    assert read_doc(state, "a")["runtime"] == {"pid": live.pid}


# -- session logs -------------------------------------------------------------------------

GOOD = b'{"kind": "user", "text": "hi"}\n{"kind": "assistant", "text": "hello"}\n'


@pytest.mark.parametrize("tail, why", [
    (b'{"kind": "user", "te', "no newline at the end (20 bytes)"),
    (b'{"kind": "user", "te\n', "not valid JSON (21 bytes)"),
])
def test_torn_last_line_is_moved_aside(cli, state, tail, why):
    pods(state, "a")
    log = state.session_path("a")
    log.write_bytes(GOOD + tail)
    p = check_found_and_fixed(cli, "session-torn", "a", log)
    assert p["message"] == f"last line is torn: {why}"
    assert log.read_bytes() == GOOD
    [backup] = state.pod_dir("a").glob("session.jsonl.torn-*")
    assert backup.read_bytes() == tail


def test_torn_log_with_one_long_line_and_nothing_good(cli, state):
    pods(state, "a")
    log = state.session_path("a")
    tail = b'{"x": "' + b"y" * 100_000
    log.write_bytes(tail)
    check_found_and_fixed(cli, "session-torn", "a", log)
    assert log.read_bytes() == b""
    [backup] = state.pod_dir("a").glob("session.jsonl.torn-*")
    assert backup.read_bytes() == tail


def test_whole_long_last_line_is_fine(cli, state):
    pods(state, "a")
    state.session_path("a").write_bytes(GOOD + json.dumps({"kind": "user_message", "t": "z" * 50_000}).encode() + b"\n")
    r, problems = doctor(cli)
    assert (r.exit_code, problems) == (0, []), r


def test_torn_log_of_a_running_pod_is_not_fixable_now(cli, state):
    pods(state, "a")
    log = state.session_path("a")
    log.write_bytes(GOOD + b'{"torn')
    fd = os.open(state.runtime_lock_path("a"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        r, problems = doctor(cli, "--fix")
        assert r.exit_code == 0, r  # a warning: the Pod's next start sets it aside
        assert doctor(cli, "--fix", "--strict")[0].exit_code == 1
        p = only(problems, "session-torn")
        assert (p["fixable"], p["fixed"]) == (False, False)
        assert p["message"].endswith("(the Pod is running; stop it and run `yoi doctor --fix` "
                                     "again)")
        assert log.read_bytes() == GOOD + b'{"torn'
    finally:
        os.close(fd)
    r, problems = doctor(cli, "--fix")
    assert r.exit_code == 0, r


# -- a real subprocess -----------------------------------------------------------------------

def test_real_command_fix_json(run_yoi, state):
    pods(state, "a", "b")
    set_peers(state, "a", "b")
    r = run_yoi("doctor", "--fix", "--json")
    assert r.exit_code == 0, r
    assert r.stderr == ""
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert [(p["code"], p["fixed"]) for p in doc["problems"]] == [("peer-one-sided", True)]
    r = run_yoi("doctor")
    assert r.exit_code == 0, r


# -- a broken layout, and findings that vanish on a second look ----------------------------

def test_temp_file_beside_a_relation_repair_is_reported_too(cli, state):
    """Repairing a relation takes the Pod's lock, which removes its temp files: still reported."""
    pods(state, "a", "b")
    set_peers(state, "a", "b")
    tmp = state.pod_dir("a") / ".metadata.toml.tmp-0123456789ab"
    tmp.write_text("half")
    r, problems = doctor(cli, "--fix")
    assert r.exit_code == 0, r
    assert [(p["code"], p["path"], p["fixed"]) for p in problems] == [
        ("peer-one-sided", str(meta_path(state, "a")), True), ("temp-file", str(tmp), True)]
    assert not tmp.exists()


def test_missing_locks_directory_is_no_reason_to_give_up(cli, state):
    pods(state, "a", "b")
    set_peers(state, "a", "b")
    for lock in state.locks_dir.iterdir():
        lock.unlink()
    state.locks_dir.rmdir()
    r, problems = doctor(cli)
    assert [p["code"] for p in problems] == ["peer-one-sided"], r
    assert not state.locks_dir.exists()  # a check writes nothing
    r, problems = doctor(cli, "--fix")
    assert (r.exit_code, [p["fixed"] for p in problems]) == (0, [True]), r


@pytest.mark.parametrize("sub", ["locks", "journal", "pods", "run"])
def test_state_subdirectory_that_is_a_file_blocks_every_repair(cli, state, sub):
    pods(state, "a", "b")
    set_peers(state, "a", "b")
    os.chmod(state.pod_dir("a"), 0o755)
    os.chmod(state.root, 0o750)  # checked before the subdirectories: not repaired either
    path = state.root / sub
    if path.exists():
        for entry in path.iterdir():
            if entry.is_dir():
                os.chmod(entry, 0o755)  # a file's mode is never "repaired"
        import shutil
        saved = state.root.parent / f"saved-{sub}"
        shutil.move(path, saved)
    path.write_text("not a directory")
    os.chmod(path, 0o644)
    before = {p: (p.read_bytes(), p.stat().st_mode) for p in state.root.rglob("*") if p.is_file()}
    r, problems = doctor(cli, "--fix")
    assert r.exit_code == 1, r
    first = [p for p in problems if p["code"] == "state-not-dir"]
    assert [(p["path"], p["fixable"], p["fixed"]) for p in first] == [(str(path), False, False)]
    assert not any(p["fixed"] for p in problems), r
    after = {p: (p.read_bytes(), p.stat().st_mode) for p in state.root.rglob("*") if p.is_file()}
    assert after == before
    assert state.root.stat().st_mode & 0o777 == 0o750
    for p in problems:
        if p["code"] != "state-not-dir" and p["code"] != "state-permissions":
            assert p["message"].endswith(f"(not repaired: {path} is not a directory; "
                                         "repair that by hand first)"), p


def test_symlinked_locks_directory_is_never_followed_by_a_repair(cli, state, tmp_path):
    pods(state, "a", "b")
    set_peers(state, "a", "b")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import shutil
    shutil.rmtree(state.locks_dir)
    state.locks_dir.symlink_to(elsewhere)
    r, problems = doctor(cli, "--fix")
    assert r.exit_code == 1, r
    assert [(p["code"], p["fixed"]) for p in problems] == [("symlink", False),
                                                          ("peer-one-sided", False)], r
    assert list(elsewhere.iterdir()) == []  # no lock was taken through the link
    assert metadata.peer_names(read_doc(state, "a")) == ["b"]


def test_root_that_is_not_a_directory(cli, tmp_path, monkeypatch):
    path = tmp_path / "file"
    path.write_text("x")
    os.chmod(path, 0o644)
    monkeypatch.setenv("YOI_HOME", str(path))
    r, problems = doctor(cli, "--fix")
    assert [(p["code"], p["path"], p["fixed"]) for p in problems] == [
        ("state-not-dir", str(path), False)], r
    assert (path.read_text(), path.stat().st_mode & 0o777) == ("x", 0o644)


def test_root_mode_is_not_changed_when_it_holds_files_that_are_not_yois(cli, state, yoi_home):
    """`--state-dir ~` by mistake must not make a home directory 0700."""
    pods(state, "a")
    os.chmod(yoi_home, 0o755)
    (yoi_home / ".bashrc").write_text("")
    r, problems = doctor(cli, "--fix")
    assert r.exit_code == 1, r
    p = only(problems, "state-permissions")
    assert (p["fixable"], p["fixed"]) == (False, False)
    assert p["message"] == ("mode 0755, expected 0700; not changed: it holds '.bashrc', which "
                            "is not Yoi's (is it the right state directory?)")
    assert yoi_home.stat().st_mode & 0o777 == 0o755


def test_torn_tail_that_is_whole_on_a_second_look_is_not_reported(state):
    """The scan may catch a Pod mid-append; the check looks again before it reports."""
    pods(state, "a")
    log = state.session_path("a")
    log.write_bytes(GOOD)
    d = lib._Doctor(state, True, set(lib.CHECKS), None)
    d.check_torn("a", (0, len(GOOD) - 5, "no newline at the end (5 bytes)"))
    assert d.problems == []
    assert log.read_bytes() == GOOD


def test_stale_socket_of_a_pod_started_meanwhile_is_no_problem(state, holder):
    pods(state, "a")
    sock = state.default_socket_path("a")
    dead_socket(sock)
    d = lib._Doctor(state, True, set(lib.CHECKS), None)
    p = d.add("stale-socket", "a", sock, "socket file no process serves")
    holder(state.runtime_lock_path("a"))  # the Pod has started since the probe
    d.attempt(p, lambda: d.remove_socket(sock, "a"))
    assert d.problems == []
    assert sock.exists()


@pytest.mark.parametrize("key, value, message", [
    ("pid", "4242", "runtime.pid must be an integer, not '4242'"),
    ("pid", True, "runtime.pid must be an integer, not True"),
    ("socket_path", 42, "runtime.socket_path must be a string, not 42"),
    ("exec", ["my-agent"], "runtime.exec must be a string, not ['my-agent']"),
])
def test_runtime_hint_of_the_wrong_type_is_a_schema_problem(cli, state, key, value, message):
    """Such a hint broke `yoi pod list` with a traceback; doctor names it."""
    pods(state, "a")
    store.update(state, "a", lambda d: d | {"runtime": {key: value}})
    p = check_found_and_fixed(cli, "metadata-schema", "a", meta_path(state, "a"), fixable=False)
    assert p["message"] == message


def test_pid_that_cannot_be_a_pid_is_stale_not_a_crash(cli, state):
    pods(state, "a")
    store.update(state, "a", lambda d: d | {"runtime": {"pid": 2**40}})
    p = check_found_and_fixed(cli, "stale-pid", "a", meta_path(state, "a"))
    assert p["message"] == f"metadata records pid {2**40}, which is not running"


def test_runtime_lock_that_is_a_directory(cli, state):
    pods(state, "a")
    state.runtime_lock_path("a").mkdir()
    p = check_found_and_fixed(cli, "unreadable", "a", state.runtime_lock_path("a"),
                              fixable=False)
    assert p["message"] == "runtime.lock is not a regular file, so the Pod cannot start; remove it"
