"""Many processes registering and removing peers at once among 20 Pods: no lost update."""

from __future__ import annotations

import itertools
import random
import subprocess

import pytest

from peer_worker import leftover_files, pairs_of, parse_report, relations, worker_command

PODS = [f"pod{i:02d}" for i in range(20)]
WORKERS = 8


@pytest.fixture
def pods(state):
    from yoi import store
    for name in PODS:
        store.create(state, name)
    return PODS


@pytest.fixture
def run_workers(state):
    """Start workers held at a barrier, release them together, return their reports."""
    procs = []

    def run(arg_lists):
        for args in arg_lists:
            procs.append(subprocess.Popen(
                worker_command("run", "--state-dir", str(state.root), "--wait", *args),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True))
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.close()
        reports = []
        for p in procs:
            out, err = p.stdout.read(), p.stderr.read()
            assert p.wait(timeout=90) == 0, err
            report = parse_report(out)
            failed = [r for r in report if r[0] == "fail"]
            assert failed == [], out
            reports.append(report)
        return reports

    try:
        yield run
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdout, p.stderr):
                f.close()


def test_concurrent_registrations_lose_no_update(state, pods, run_workers):
    reports = run_workers([["--pods", ",".join(pods), "--mix", "register",
                            "--count", "25", "--seed", str(i)] for i in range(WORKERS)])
    registered = {frozenset((a, b)) for report in reports
                  for kind, _, a, b in report if kind == "done"}
    assert sum(kind == "done" for report in reports for kind, *_ in report) == WORKERS * 25
    assert pairs_of(relations(state.root)) == registered
    assert leftover_files(state.root) == []


def test_concurrent_mixed_operations_end_in_each_pairs_last_state(state, pods, run_workers):
    rng = random.Random(7)
    all_pairs = list(itertools.combinations(pods, 2))
    chosen = rng.sample(all_pairs, WORKERS * 5)
    owned = [chosen[i::WORKERS] for i in range(WORKERS)]  # each pair has one owner
    pods_used = [{p for pair in pairs for p in pair} for pairs in owned]
    assert any(a & b for a, b in itertools.combinations(pods_used, 2)), "Pods must overlap"
    reports = run_workers([["--pairs", ",".join(f"{a}:{b}" for a, b in pairs),
                            "--count", "30", "--seed", str(100 + i)]
                           for i, pairs in enumerate(owned)])
    expected = set()
    for report in reports:
        last = {}
        for kind, op, a, b in report:
            if kind == "done":
                last[frozenset((a, b))] = op
        expected |= {pair for pair, op in last.items() if op == "register"}
    assert pairs_of(relations(state.root)) == expected
    assert leftover_files(state.root) == []
