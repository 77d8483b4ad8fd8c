"""Output cursors: `yoi pod log CHILD --as PARENT --new` gives each entry once, across
restarts and SIGKILLs of the Pod, to readers at once, and never past what it wrote."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading

from conftest import yoi_cmd
from test_children import wait_until
from yoi import children, control, store


def seqs(state, name) -> list[int]:
    out = []
    for line in state.session_path(name).read_bytes().splitlines():
        try:
            out.append(json.loads(line)["seq"])
        except (ValueError, KeyError):
            pass
    return out


def read_new(run_yoi) -> list[int]:
    r = run_yoi("pod", "log", "kid", "--as", "lead", "--new", "--json")
    assert r.exit_code == 0, r
    return [json.loads(line)["seq"] for line in r.stdout.splitlines()]


def family(state) -> None:
    store.create(state, "lead")
    children.create_child(state, "lead", "kid")


def test_new_gives_every_entry_once_across_restarts_and_kills(state, started_pod, run_yoi):
    family(state)
    started_pod("kid", create=False)
    rng = random.Random(3)
    got: list[int] = []
    for round_ in range(4):
        lines = "".join(f"round {round_} line {i}\n" for i in range(5))
        r = run_yoi("pod", "send", "--lines", "--id", f"r{round_}", "kid", input=lines)
        assert r.exit_code == 0, r
        got += read_new(run_yoi)
        if rng.random() < 0.5:
            os.kill(control.holder_pid(state.runtime_lock_path("kid")), signal.SIGKILL)
            wait_until(lambda: not control.is_running(state, "kid"), "kid dead")
        else:
            assert run_yoi("pod", "stop", "kid").exit_code == 0
        got += read_new(run_yoi)  # nothing new, or its pod_stopped
        assert run_yoi("pod", "start", "kid").exit_code == 0
    assert run_yoi("pod", "stop", "kid").exit_code == 0
    got += read_new(run_yoi)
    assert got == seqs(state, "kid")  # each once, in order, none skipped
    assert read_new(run_yoi) == []
    assert json.loads((state.pod_dir("kid") / "cursors" / "lead").read_text()) == {
        "seq": got[-1]}


def test_two_readers_at_once_are_given_disjoint_entries(state, started_pod):
    family(state)
    started_pod("kid", create=False)
    lines = "".join(f"message {i}\n" for i in range(150))
    sender = subprocess.Popen(yoi_cmd() + ["pod", "send", "--lines", "kid"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, text=True)
    got: list[list[int]] = [[], []]
    errors = []

    def reader(k: int) -> None:
        idle = 0
        while idle < 3:
            p = subprocess.run(yoi_cmd() + ["pod", "log", "kid", "--as", "lead", "--new",
                                            "--json"], capture_output=True, text=True,
                               timeout=60)
            if p.returncode != 0:
                errors.append(p.stderr)
                return
            new = [json.loads(line)["seq"] for line in p.stdout.splitlines()]
            got[k] += new
            idle = idle + 1 if not new and sender.poll() is not None else 0

    threads = [threading.Thread(target=reader, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    sender.communicate(lines, timeout=60)
    for t in threads:
        t.join(120)
    assert errors == [] and sender.returncode == 0
    assert set(got[0]) & set(got[1]) == set()
    assert sorted(got[0] + got[1]) == seqs(state, "kid")
    assert got[0] == sorted(got[0]) and got[1] == sorted(got[1])


def test_readers_that_start_together_take_turns_on_a_long_log(state):
    """Two readers started at once over 20,000 entries not read yet: reading and
    printing them takes long enough that both run at the same time, and the cursor
    lock makes them take turns, so no entry is given to both."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import write_log
    family(state)
    write_log(state.session_path("kid"), 20_000)
    argv = yoi_cmd() + ["pod", "log", "kid", "--as", "lead", "--new", "--json"]
    readers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs: list = [None, None]

    def drain(k: int) -> None:  # both at once: a reader blocked on a full pipe holds the lock
        outputs[k] = readers[k].communicate(timeout=120)

    threads = [threading.Thread(target=drain, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    got = []
    for p, (out, err) in zip(readers, outputs):
        assert p.returncode == 0, err
        got.append([json.loads(line)["seq"] for line in out.splitlines()])
    assert set(got[0]) & set(got[1]) == set()
    assert sorted(got[0] + got[1]) == list(range(1, 20_001))


def test_the_cursor_moves_only_past_what_was_written(state, run_yoi):
    family(state)
    with open(state.session_path("kid"), "ab") as f:
        for seq in range(1, 4):
            f.write(b'{"seq":%d,"kind":"run_end","ts":1,"at":"x","result":"finished"}\n' % seq)
    full = open("/dev/full", "w")
    try:
        p = subprocess.run(yoi_cmd() + ["pod", "log", "kid", "--as", "lead", "--new"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        full.close()
    assert p.returncode == 1 and "No space left on device" in p.stderr, p.stderr
    assert not (state.pod_dir("kid") / "cursors" / "lead").exists()
    assert read_new(run_yoi) == [1, 2, 3]
    assert read_new(run_yoi) == []


def test_new_is_checked_and_refused_where_it_makes_no_sense(state, run_yoi):
    family(state)
    store.create(state, "stranger")
    for args, code, message in [
            (("--new",), 2, "--new needs --as READER"),
            (("--as", "lead", "--new", "--tail", "3"), 2, "not with --tail"),
            (("--as", "lead", "--new", "--follow"), 2, "not with --follow"),
            (("--as", "stranger", "--new"), 4, "stranger cannot see kid"),
            (("--as", "ghost", "--new"), 3, "no such Pod: ghost")]:
        r = run_yoi("pod", "log", "kid", *args)
        assert r.exit_code == code and message in r.stderr, (args, r)
    (state.pod_dir("kid") / "cursors").mkdir()
    (state.pod_dir("kid") / "cursors" / "lead").write_text("garbage")
    r = run_yoi("pod", "log", "kid", "--as", "lead", "--new")
    assert r.exit_code == 1 and "not a cursor" in r.stderr and "remove it" in r.stderr, r
    # the parent sees its child, the child its parent, and each itself
    for reader, name in (("kid", "lead"), ("kid", "kid")):
        assert run_yoi("pod", "log", name, "--as", reader, "--new").exit_code == 0
