"""`yoi doctor --fix` beside processes that register, remove and crash: it breaks nothing."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from yoi import metadata, store
from yoi.txn import read_pod_file

PODS = [f"p{i}" for i in range(7)]
WORKERS = 3
OPS = 60

WORKER = textwrap.dedent("""
    import json, random, sys
    from yoi.state import State
    from yoi import peers
    state = State.resolve(sys.argv[1])
    pairs = json.loads(sys.argv[2])
    rng = random.Random(sys.argv[3])
    last = {}
    for _ in range(int(sys.argv[4])):
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        if rng.random() < 0.6:
            peers.register(state, a, b)
            last[min(a, b) + " " + max(a, b)] = True
        else:
            peers.unregister(state, a, b)
            last[min(a, b) + " " + max(a, b)] = False
    print(json.dumps(last))
""")

DOCTOR_LOOP = textwrap.dedent("""
    import json, os, sys
    from yoi.state import State
    from yoi import doctor
    state = State.resolve(sys.argv[1])
    stop = sys.argv[2]
    runs = 0
    while not os.path.exists(stop) or runs < 3:
        report = doctor.run(state, fix=True)
        print(json.dumps(report.to_json()), flush=True)
        runs += 1
""")

CRASH_POINTS = ["after-journal:crash", "atomic-before-replace:crash:1",
                "atomic-before-replace:crash:2", "after-write-1:crash",
                "atomic-before-replace:crash:3", "before-journal-remove:crash"]


def python(code: str, *args, env=None) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def relation(state, a: str, b: str) -> tuple[bool, bool]:
    pa, pb = read_pod_file(state, a), read_pod_file(state, b)
    return metadata.has_peer(pa.doc, b), metadata.has_peer(pb.doc, a)


@pytest.mark.timeout(180)
def test_fix_beside_registrations_removals_and_crashes(state, tmp_path, run_yoi):
    for name in PODS:
        store.create(state, name)
    pairs = [list(p) for p in itertools.combinations(PODS, 2)]
    random.Random(7).shuffle(pairs)
    crash_pairs, pairs = pairs[:3], pairs[3:]
    owned = [pairs[i::WORKERS] for i in range(WORKERS)]
    stop = tmp_path / "stop"
    procs = []
    try:
        doctor = subprocess.Popen(python(DOCTOR_LOOP, state.root, stop), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        procs.append(doctor)
        for i, mine in enumerate(owned):
            procs.append(subprocess.Popen(python(WORKER, state.root, json.dumps(mine), i, OPS),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        # Meanwhile, changes that die half-way and leave journals and temp files behind.
        expected: dict[str, bool] = {}
        rng = random.Random(3)
        for point in CRASH_POINTS:
            a, b = rng.choice(crash_pairs)
            key = f"{a} {b}"
            fn = "unregister" if expected.get(key) else "register"
            p = subprocess.run(python(f"from yoi.state import State; from yoi import peers; "
                                      f"peers.{fn}(State.resolve({str(state.root)!r}), "
                                      f"{a!r}, {b!r})"),
                               env=dict(os.environ, YOI_FAULT=point), capture_output=True,
                               text=True, timeout=60)
            assert p.returncode == 137, p.stderr
            expected.setdefault(key, False)  # the change was never committed
            p = run_yoi("doctor", "--fix", "--json")  # the real command, in the crowd
            assert p.exit_code == 0, p
        for proc in procs[1:]:
            out, err = proc.communicate(timeout=150)
            assert proc.returncode == 0, err
            expected.update(json.loads(out))
        stop.touch()
        out, err = doctor.communicate(timeout=60)
        assert doctor.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    reports = [json.loads(line) for line in out.splitlines()]
    assert len(reports) >= 3
    for report in reports:
        # Only what the crashes left may be found, and all of it is repaired.
        assert report["ok"] is True, report
        assert {p["code"] for p in report["problems"]} <= {"journal-leftover", "temp-file"}, report
    r = run_yoi("doctor", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["problems"] == []
    for key, registered in expected.items():
        a, b = key.split()
        assert relation(state, a, b) == (registered, registered), key
    for a, b in itertools.combinations(PODS, 2):
        ab, ba = relation(state, a, b)
        assert ab == ba, (a, b)


@pytest.mark.timeout(120)
def test_fix_beside_a_live_pod_at_work_finds_nothing_and_changes_nothing(state, started_pod):
    """A live Pod appending to its log, running its handler, holding its socket and pid."""
    import threading
    from yoi import client, doctor, peers
    a = started_pod("a", exec="cat")
    started_pod("b")
    peers.register(state, "a", "b")
    sent, errors = [], []

    def traffic():
        try:
            for i in range(40):
                client.notify(a.socket_path, f"message {i} " + "x" * 2000, f"m-{i}")
                sent.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=traffic)
    t.start()
    reports = []
    try:
        while t.is_alive() or len(reports) < 3:
            reports.append(doctor.run(state, fix=True))
    finally:
        t.join(60)
    assert not errors and len(sent) == 40
    for report in reports:
        assert report.problems == [], report
        assert report.checked["sockets"] == 2
    doc = read_pod_file(state, "a").doc
    assert doc["runtime"]["pid"] == a.pid and doc["runtime"]["socket_path"] == a.socket_path
    entries = [json.loads(line) for line in state.session_path("a").read_text().splitlines()]
    ids = [e["item"]["id"] for e in entries if e["kind"] == "system_item"]
    assert ids == [f"m-{i}" for i in range(40)]
    assert list(state.pod_dir("a").glob("session.jsonl.torn-*")) == []
