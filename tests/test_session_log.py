"""The session log writer: seq numbers, the on-disk id index, and recovery from crashes.

Recovery is tested in two ways: in-process against every state a crash can
leave on disk (every split position of a batch's write), and end to end with
real Pods killed at the project's fault points.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rawsock import Raw

from yoi import session
from yoi.client import notify
from yoi.session import Entry
from yoi.session.index import IdIndex
from yoi.session.writer import SessionLog


ROOT = Path(__file__).resolve().parents[1]


def message(mid: str, text: str = "x") -> Entry:
    return Entry("system_item", {"item": {"kind": "notification", "message": text, "body": text,
                                          "id": mid}}, mid)


def line_id(line: bytes) -> str | None:
    """The message id of a log line, None if it is not an entry."""
    entry = session.parse_entry(line)
    return entry.get("id") if entry else None


def log_lines(path) -> list[bytes]:
    return path.read_bytes().splitlines()


def opened(path, index) -> tuple[SessionLog, list[str]]:
    log = SessionLog(path, index)
    return log, log.open()


# -- every state a crash inside a batch can leave -------------------------------------------

def test_every_split_position_of_a_batch_recovers_with_every_kept_entry_indexed(tmp_path):
    """A batch is written, then fsynced; a crash can stop the write after any byte.
    Whatever recovery keeps must be indexed (or a retry of its id is committed twice),
    and what it does not keep is set aside, never deleted."""
    base = message("before").line(1)
    batch = message("P-1", "xx").line(2) + message("P-2", "x").line(3)
    for k in range(len(batch) + 1):
        d = tmp_path / str(k)
        d.mkdir()
        path, index = d / "session.jsonl", d / "session.index"
        path.write_bytes(base)
        log, _ = opened(path, index)  # the index catches up with the committed entry
        log.close()
        with open(path, "ab") as f:  # the crash: the batch's first K bytes, no index update
            f.write(batch[:k])
        log, problems = opened(path, index)
        try:
            lines = log_lines(path)
            kept = [json.loads(x) for x in lines]  # every line left is a whole entry
            assert [e["seq"] for e in kept] == list(range(1, len(kept) + 1)), k
            for e, line in zip(kept, lines):
                assert log.committed_line(e["id"]) == line + b"\n", (k, e["id"])
            newlines = [i for i, b in enumerate(batch) if b == ord("\n")]
            written_whole = sum(1 for i in newlines if i < k)
            only_newline_missing = k in newlines  # the line is whole but for its newline
            assert len(kept) == 1 + written_whole + only_newline_missing, k
            start = max([i + 1 for i in newlines if i < k], default=0)
            fragment = b"" if only_newline_missing else batch[start:k]
            aside = list(d.glob("session.jsonl.torn-*"))
            assert [p.read_bytes() for p in aside] == ([fragment] if fragment else []), k
            assert bool(fragment) == any("ended with a torn line" in p for p in problems), k
            # the next entry continues the sequence, and no kept id is written again
            assert log.append(message("after")).seq == len(kept) + 1
            for e in kept:
                again = log.append(message(e["id"]))
                assert (again.duplicate, again.seq) == (True, e["seq"]), (k, e["id"])
            assert len(log_lines(path)) == len(kept) + 1, k
        finally:
            log.close()


def test_an_index_that_lags_the_log_catches_up_from_where_it_stopped(tmp_path):
    path, index = tmp_path / "session.jsonl", tmp_path / "session.index"
    log, _ = opened(path, index)
    for i in range(5):
        log.append(message(f"m-{i}"))
    log.close()
    idx = IdIndex(index)
    idx.open()
    end, _, _ = idx.covers()
    idx.close()
    assert end == path.stat().st_size
    with open(path, "ab") as f:  # committed by a Pod that died before indexing
        f.write(message("late").line(6))
    log, problems = opened(path, index)
    try:
        assert problems == []
        assert json.loads(log.committed_line("late"))["seq"] == 6
        assert json.loads(log.committed_line("m-0"))["seq"] == 1
    finally:
        log.close()


@pytest.mark.parametrize("damage", ["garbage", "missing", "other-log", "beyond-the-log"])
def test_an_index_that_does_not_match_the_log_is_rebuilt(tmp_path, damage):
    path, index = tmp_path / "session.jsonl", tmp_path / "session.index"
    log, _ = opened(path, index)
    for i in range(3):
        log.append(message(f"m-{i}"))
    log.close()
    if damage == "garbage":
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{index}{suffix}"):
                os.unlink(f"{index}{suffix}")
        index.write_bytes(b"this is not a database" * 100)
    elif damage == "missing":
        os.unlink(index)
    elif damage == "other-log":  # the log was replaced (another inode), same size
        data = path.read_bytes()
        os.unlink(path)
        path.write_bytes(data.replace(b'"m-1"', b'"m-9"'))
    else:  # the log was cut shorter than what the index covers
        data = path.read_bytes()
        path.write_bytes(data[:data.index(b"\n") + 1])
    log, _ = opened(path, index)
    try:
        ids = [json.loads(x)["id"] for x in log_lines(path)]
        for mid in ids:
            assert json.loads(log.committed_line(mid))["id"] == mid
        for mid in {"m-0", "m-1", "m-2", "m-9"} - set(ids):
            assert log.committed_line(mid) is None
    finally:
        log.close()


def test_the_writer_commits_an_id_once_in_a_batch_and_across_batches(tmp_path):
    """The writer is where an id is committed at most once: whether the earlier entry
    is in the index, or in the same group commit."""
    path, index = tmp_path / "session.jsonl", tmp_path / "session.index"
    log, _ = opened(path, index)
    try:
        first = log.append(message("a"))
        got = []
        with log._cond:  # held: the writer takes all four as one batch
            for mid in ("a", "b", "b", "a"):
                log.submit(message(mid, "retry"), lambda res, err: got.append((res, err)))
        log.append(Entry("run_end", {"result": "finished"}))  # after that batch
        assert [err for _, err in got] == [None] * 4
        assert [(r.seq, r.duplicate) for r, _ in got] == [(1, True), (2, False), (2, True),
                                                          (1, True)]
        assert [(r.offset, r.length) for r, _ in got] == [
            (first.offset, first.length), (got[1][0].offset, got[1][0].length),
            (got[1][0].offset, got[1][0].length), (first.offset, first.length)]
        assert [line_id(x) for x in log_lines(path)] == ["a", "b", None]
        assert log.read(got[2][0]) == log.committed_line("b")
    finally:
        log.close()


def test_a_failed_write_fails_the_new_entries_only(tmp_path, monkeypatch):
    """An entry whose id was committed before needs no write: when the batch's write
    fails, it is still acknowledged (from the earlier entry), the new ones fail."""
    import errno
    from yoi.session import writer
    path, index = tmp_path / "session.jsonl", tmp_path / "session.index"
    log, _ = opened(path, index)
    try:
        first = log.append(message("a"))

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(writer, "write_all", full)
        got, landed = [], threading.Event()

        def done(res, err):
            got.append((res, err))
            if len(got) == 2:
                landed.set()

        with log._cond:
            for mid in ("a", "b"):
                log.submit(message(mid), done)
        assert landed.wait(10)
        monkeypatch.undo()
        log.append(Entry("run_end", {"result": "finished"}))
        (dup, no_error), (none, error) = got
        assert (dup.duplicate, dup.seq, dup.offset, no_error) == (True, 1, first.offset, None)
        assert none is None and error.errno == errno.ENOSPC
        assert [line_id(x) for x in log_lines(path)] == ["a", None]
    finally:
        log.close()


def test_ids_that_cannot_be_looked_up_are_not_written(tmp_path):
    """If the index cannot be read, an entry with an id could be a duplicate: it
    fails (the sender retries later); entries without an id are committed."""
    import sqlite3
    path, index = tmp_path / "session.jsonl", tmp_path / "session.index"
    log, _ = opened(path, index)
    try:
        log.append(message("a"))

        def broken(ids):
            raise sqlite3.OperationalError("disk I/O error")

        log.index.lookup = broken
        got = []
        with log._cond:
            log.submit(message("a"), lambda res, err: got.append((res, err)))
            log.submit(message("new"), lambda res, err: got.append((res, err)))
            log.submit(Entry("run_end", {"result": "finished"}),
                       lambda res, err: got.append((res, err)))
        log.append(Entry("run_end", {"result": "finished"}))
        assert [res is None for res, _ in got] == [True, True, False]
        assert all("cannot look message ids up" in str(err) for _, err in got[:2])
        assert [line_id(x) for x in log_lines(path)] == ["a", None, None]
        assert [json.loads(x)["seq"] for x in log_lines(path)] == [1, 2, 3]
    finally:
        log.close()


def test_files_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        path, index = tmp_path / "session.jsonl", tmp_path / "session.index"
        log, _ = opened(path, index)
        log.append(message("m"))
        log.close()
    finally:
        os.umask(old)
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o077 == 0, p


# -- reading by seq -------------------------------------------------------------------------

def test_entries_after_a_seq_are_found_by_binary_search(tmp_path):
    path = tmp_path / "session.jsonl"
    lines = []
    for seq in range(1, 3001):
        lines.append(Entry("text_done", {"text": "t" * (seq % 97)}).line(seq))
        if seq % 250 == 0:
            lines.append(b"a damaged line\n")
    path.write_bytes(b"".join(lines))
    for after in (0, 1, 2, 249, 250, 251, 1777, 2999, 3000, 5000):
        got = [e["seq"] for _, e in session.entries(path, after=after) if e is not None]
        assert got == list(range(after + 1, 3001)), after
    assert [e["seq"] for _, e in session.entries(path, 3, after=10)
            if e is not None] == [2998, 2999, 3000]


def test_log_after_prints_only_later_entries(state, started_pod, run_yoi):
    pod = started_pod("a")
    acks = [notify(pod.socket_path, f"m{i}", f"m-{i}") for i in range(6)]
    r = run_yoi("pod", "log", "a", "--after", str(acks[3]["seq"]), "--json")
    assert r.exit_code == 0, r
    assert [json.loads(x) for x in r.stdout.splitlines()] == acks[4:]
    r = run_yoi("pod", "log", "a", "--after", "6")
    assert (r.exit_code, r.stdout) == (0, ""), r


# -- end to end with real Pods ----------------------------------------------------------------

def test_a_crash_between_the_halves_of_a_write_never_commits_an_id_twice(state, run_yoi,
                                                                        started_pod):
    """The issue's reproduction: the batch "xx\\nx\\n" sent with --lines; the Pod dies
    between the two halves of its write; the sender's retry must not add a second P-1."""
    started_pod("T", env={"YOI_FAULT": "session-mid-write:crash"})
    r = run_yoi("pod", "send", "--lines", "--id", "P", "T", input="xx\nx\n")
    assert r.exit_code != 0, r
    started_pod("T")
    r = run_yoi("pod", "send", "--lines", "--id", "P", "T", input="xx\nx\n")
    assert r.exit_code == 0, r
    ids = [line_id(x) for x in log_lines(state.session_path("T"))]
    assert sorted(i for i in ids if i) == ["P-1", "P-2"]


@pytest.mark.parametrize("point", ["session-before-fsync", "session-before-index"])
def test_a_crash_around_the_commit_loses_nothing_acknowledged_and_duplicates_nothing(
        state, run_yoi, started_pod, point):
    started_pod("T", env={"YOI_FAULT": f"{point}:crash:3"})
    for i in range(4):
        run_yoi("pod", "send", "--id", f"c-{i}", "T", f"message {i}")
    started_pod("T")
    for i in range(4):
        r = run_yoi("pod", "send", "--id", f"c-{i}", "T", f"message {i}")
        assert r.exit_code == 0, r
    entries = [json.loads(x) for x in log_lines(state.session_path("T"))]
    assert sorted(e["id"] for e in entries) == [f"c-{i}" for i in range(4)]
    assert [e["seq"] for e in entries] == list(range(1, 5))


def test_a_writer_that_fails_unexpectedly_answers_at_once_and_takes_nothing_more(
        state, run_yoi, started_pod):
    """An injected error where nothing expects one stands for any bug in the writer:
    the Pod says so (alert, exit 1 at once, no 10 s silence), and after a restart a
    retry of the same id is recorded exactly once."""
    started_pod("T", env={"YOI_FAULT": "session-before-index:eio"})
    t0 = time.monotonic()
    r = run_yoi("pod", "send", "--id", "w-1", "T", "first")
    assert r.exit_code == 1 and "perhaps not committed: the session log writer failed" in \
        r.stderr, r
    r = run_yoi("pod", "send", "--id", "w-2", "T", "second")
    assert r.exit_code == 1 and "not committed: the session log writer failed" in r.stderr, r
    assert time.monotonic() - t0 < 5  # answered, not timed out
    with Raw(state.default_socket_path("T")) as c:
        alerts, _ = c.prelude()
    assert any("no more entries are accepted" in a["data"]["message"] for a in alerts), alerts
    assert run_yoi("pod", "stop", "T").exit_code == 0
    started_pod("T")
    for i, text in ((1, "first"), (2, "second")):
        r = run_yoi("pod", "send", "--id", f"w-{i}", "T", text)
        assert r.exit_code == 0, r
    entries = [json.loads(x) for x in log_lines(state.session_path("T"))]
    assert [e["id"] for e in entries] == ["w-1", "w-2"]


def test_seq_strictly_increases_across_sigkill_and_restart(state, started_pod):
    seqs = []
    for round_ in range(3):
        pod = started_pod("a")
        seqs += [notify(pod.socket_path, "m", f"r{round_}-{i}")["seq"] for i in range(5)]
        os.kill(pod.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pod.pid}/status") and time.monotonic() < deadline:
            if "State:\tZ" in open(f"/proc/{pod.pid}/status").read():
                break
            time.sleep(0.02)
    assert seqs == list(range(1, 16))


def test_a_start_reads_only_what_the_index_does_not_cover(state, run_yoi, started_pod):
    """200,000 entries: the first start indexes them all; later starts read only the
    tail written since. (If a start re-read the history, it would find and report the
    line damaged below.) Memory does not grow with the history either."""
    sys.path.insert(0, str(ROOT))
    from bench.common import write_log
    run_yoi("pod", "create", "a")
    run_yoi("pod", "create", "fresh")
    path = state.session_path("a")
    write_log(path, 200_000)
    fresh = started_pod("fresh")
    pod = started_pod("a")
    assert notify(pod.socket_path, "m", "prefill-7")["seq"] == 7  # indexed: a retry
    assert notify(pod.socket_path, "m", "new")["seq"] == 200_001
    rss = {name: rss_kib(p.pid) for name, p in (("a", pod), ("fresh", fresh))}
    assert rss["a"] < rss["fresh"] + 8 * 1024, rss
    assert run_yoi("pod", "stop", "a").exit_code == 0
    with open(path, "r+b") as f:  # damage an old line in place, keeping its length
        head = f.read(100_000)
        third = head.index(b"\n", head.index(b"\n") + 1) + 1
        f.seek(third)
        f.write(b"#")  # its opening brace: no longer JSON
    pod = started_pod("a")
    r = run_yoi("pod", "log", "a", "-n", "1", "--json")
    assert json.loads(r.stdout)["id"] == "new"
    with_alerts = subprocess.run(
        [sys.executable, "-c", "import sys; from yoi.client import Connection; "
         "c = Connection.open(sys.argv[1], 30); print(len(c.alerts))", pod.socket_path],
        capture_output=True, text=True, timeout=60)
    assert with_alerts.stdout.strip() == "0", with_alerts


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_backward_reads_newest_first_and_no_further_than_its_limit(tmp_path):
    path = tmp_path / "s.jsonl"
    lines = [b"a" * n for n in (10, 3_000_000, 5, 1_500_000, 7)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert list(session.backward(path, 1 << 30)) == lines[::-1]
    # a limit that ends inside the 1.5 MB line yields only the whole lines after it
    assert list(session.backward(path, 1_000_000)) == [lines[4]]
    assert list(session.backward(path, 1_500_010)) == [lines[4], lines[3]]
    assert list(session.backward(path, 1_500_016)) == [lines[4], lines[3], lines[2]]
    assert list(session.backward(tmp_path / "missing", 100)) == []
    path.write_bytes(b"no newline at the end")
    assert list(session.backward(path, 100)) == [b"no newline at the end"]


def test_handler_runs_stop_at_the_runs_wanted_and_the_byte_limit(tmp_path):
    from yoi import history
    path = tmp_path / "s.jsonl"
    result = {"kind": "handler_result", "ok": False, "ended": "exited", "exit_status": 1}
    with open(path, "wb") as f:
        for i in range(30):
            f.write(json.dumps({**result, "seq": i}).encode() + b"\n")
            f.write(json.dumps({"kind": "system_item", "seq": 100 + i,
                                "item": {"message": "x" * 50_000}}).encode() + b"\n")
    assert [e["seq"] for e in history.handler_runs(path, 10)] == list(range(29, 19, -1))
    # within the last 200 kB only the last 3 or 4 runs are seen
    assert len(history.handler_runs(path, 10, scan=200_000)) in (3, 4)
    stopped = {**result, "ok": False, "ended": "stopped", "seq": 99}
    with open(path, "ab") as f:
        f.write(json.dumps(stopped).encode() + b"\n")
    summary = history.handler_summary(path)
    assert (summary["last"]["ended"], summary["failing_streak"],
            summary["recent_failures"]) == ("stopped", 9, 9)
