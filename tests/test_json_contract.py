"""Every command's `--json` output, success and failure, against the shapes written
down once in tests/shapes.py (and in yoi(1), JSON OUTPUT)."""

from __future__ import annotations

import json
import shlex
import subprocess

import click
import pytest

import shapes
from clitree import walk
from conftest import yoi_cmd
from yoi.cli import main

LEAVES = [" ".join(p) for p, c in walk(main) if not isinstance(c, click.Group)]
# a's handler answers a peer message with a reply to it
REPLIER = (f'm=$(cat); [ -z "$YOI_FROM" ] || {shlex.join(yoi_cmd())} pod send "$YOI_FROM" '
           '--reply-to "$YOI_MESSAGE_ID" "re: $m"')

# (command, extra args after it, kind, stdin): run in this order against one state
# directory, given to the root group (`yoi --state-dir D ...`). A new command adds
# its rows here; test_every_command_has_a_scenario fails until it does.
SCENARIOS = [
    ("yoi pod create", ["a", "--exec", REPLIER, "--label", "job=1"], "pod-created", None),
    ("yoi pod create", ["b"], "pod-created", None),
    ("yoi pod create", ["c", "--exist-ok"], "pod-created", None),
    ("yoi pod config", ["c", "--label", "job=1"], "pod-record", None),
    ("yoi pod peer register", ["a", "b"], "peer-changed", None),
    ("yoi pod peer list", ["a"], "peer-list", None),
    ("yoi pod create", ["asked", "--accept-peers", "ask"], "pod-created", None),
    ("yoi pod create", ["asked2", "--accept-peers", "ask"], "pod-created", None),
    ("yoi pod peer register", ["b", "asked"], "peer-changed", None),
    ("yoi pod peer register", ["b", "asked2"], "peer-changed", None),
    ("yoi pod peer list", ["asked", "--pending"], "peer-requests", None),
    ("yoi pod peer approve", ["asked", "b"], "peer-changed", None),
    ("yoi pod peer deny", ["asked2", "b"], "peer-changed", None),
    ("yoi pod start", ["a"], "pod-started", None),
    ("yoi pod restore", ["a"], "pod-restored", None),
    ("yoi pod restore", ["c"], "pod-restored", None),
    ("yoi pod status", ["a"], "pod-status", None),
    ("yoi pod show", ["a"], "pod-shown", None),
    ("yoi pod list", [], "pod-list", None),
    ("yoi pod list", ["--label", "job=1"], "pod-list", None),
    ("yoi pod list", ["--as", "a"], "pod-visible", None),
    ("yoi pod send", ["a", "hello"], "sent", None),
    ("yoi pod send", ["--from", "b", "a", "from b"], "sent", None),
    ("yoi pod send", ["--lines", "--id", "L", "a"], "lines-sent", "one\n\ntwo\n"),
    ("yoi pod send", ["--queue", "--from", "a", "b", "later"], "sent", None),
    ("yoi pod send", ["--queue", "--lines", "--id", "Q", "b"], "lines-sent", "x\ny\n"),
    ("yoi pod log", ["b", "--queued"], "queued", None),
    ("yoi pod start", ["b"], "pod-started", None),
    ("yoi pod send", ["--from", "b", "a", "question", "--id", "q-1", "--wait-reply", "20"],
     "sent", None),
    ("yoi pod wait", ["b", "--reply-to", "q-1"], "waited", None),
    ("yoi pod wait", ["a", "--kind", "handler_result", "--id", "q-1"], "waited", None),
    ("yoi pod spawn", ["a", "kid", "--exec", "cat", "--task", "hi kid"], "pod-spawned", None),
    ("yoi pod wait", ["a", "--from", "kid", "--kind", "child_completed"], "waited", None),
    ("yoi pod list", ["--as", "kid"], "pod-visible", None),
    ("yoi pod log", ["kid", "--as", "a", "--new"], "entries", None),
    ("yoi pod stop", ["a", "--recursive"], "pods-stopped", None),
    ("yoi pod log", ["a"], "entries", None),
    ("yoi pod log", ["a", "--tail", "1"], "entries", None),
    ("yoi doctor", [], "doctor", None),
    ("yoi doctor", ["--list-checks"], "doctor-checks", None),
    ("yoi pod stop", ["c"], "pod-stopped", None),
    ("yoi pod stop", ["--label", "job=1"], "pods-stopped", None),
    ("yoi pod stop", ["--all"], "pods-stopped", None),
    ("yoi pod peer remove", ["a", "b"], "peer-changed", None),
    ("yoi pod rm", ["c"], "pod-removed", None),
    ("yoi pod rm", ["a", "--recursive"], "pod-removed", None),
    ("yoi up", ["-f", "{project}/yoi.toml"], "converged", None),
    ("yoi down", ["-f", "{project}/yoi.toml", "--rm"], "converged", None),
    ("yoi demo", [], "demo", None),
]

# Failing runs (with `--json`), at least one per command: (command, args, kind). A
# failure prints the frame with the command's whole report of KIND where it has one,
# else (None) the frame alone, nothing else. Failures that need a live Pod or a
# signal are in test_failure_documents_with_a_report_have_the_commands_shape.
FAILURES = [
    ("yoi pod create", ["a", "--exist-ok", "--exec", "other"], None),
    ("yoi pod config", ["ghost", "--no-exec"], None),
    ("yoi pod show", ["ghost"], None),
    ("yoi pod list", ["--as", "ghost"], None),
    ("yoi pod rm", ["ghost"], None),
    ("yoi pod spawn", ["ghost", "kid2"], None),
    ("yoi pod start", ["ghost"], None),
    ("yoi pod start", ["ghost", "--foreground"], None),
    ("yoi pod stop", ["ghost"], None),
    ("yoi pod restore", ["ghost"], None),
    ("yoi pod status", ["b"], "pod-status"),
    ("yoi pod log", ["ghost"], None),
    ("yoi pod log", ["ghost", "--follow"], None),
    ("yoi pod send", ["--from", "b", "b", "hi"], None),
    ("yoi pod send", ["--lines", "b"], None),
    ("yoi pod wait", ["a", "--reply-to", "never", "--timeout", "0.2"], None),
    ("yoi pod peer register", ["a", "ghost"], None),
    ("yoi pod peer remove", ["a", "ghost"], None),
    ("yoi pod peer list", ["ghost"], None),
    ("yoi pod peer approve", ["a", "b"], None),
    ("yoi pod peer deny", ["a", "b"], None),
    ("yoi doctor", ["--check", "no-such-check"], None),
    ("yoi demo", ["--bogus"], None),
    ("yoi up", ["-f", "{project}/missing.toml"], None),
    ("yoi down", ["-f", "{project}/missing.toml"], None),
]


def test_every_command_has_a_scenario_and_a_documented_shape():
    assert sorted(shapes.COMMANDS) == sorted(LEAVES)
    assert sorted({s[0] for s in SCENARIOS}) == sorted(LEAVES)
    assert sorted({f[0] for f in FAILURES}) == sorted(LEAVES)
    for command, kinds in shapes.COMMANDS.items():
        assert all(k in shapes.LINE_KINDS or k in shapes.DOCUMENTS for k in kinds), command
    used = {s[2] for s in SCENARIOS} | {"pod-serving"}  # --foreground: a test of its own
    assert used == {k for kinds in shapes.COMMANDS.values() for k in kinds}


def run(state_dir, command: str, args: list[str], project, stdin=None):
    argv = ["--state-dir", str(state_dir), *command.split()[1:],
            *[a.format(project=project) for a in args], "--json"]
    p = subprocess.run(yoi_cmd() + argv, input=stdin, capture_output=True, text=True,
                       timeout=120)
    return p


@pytest.fixture
def project(tmp_path):
    d = tmp_path / "project"
    d.mkdir()
    (d / "yoi.toml").write_text("[pods.u]\nexec = 'cat'\npeers = ['v']\n[pods.v]\n")
    return d


def test_every_json_document_has_its_documented_shape(tmp_path, project, started_pod):
    # started_pod: its teardown stops every Pod of the test's state directory,
    # which is given to the root group as `yoi --state-dir D ...`
    from yoi.state import State
    state_dir = State.resolve().root
    for command, args, kind, stdin in SCENARIOS:
        p = run(state_dir, command, args, project, stdin)
        where = f"{command} {' '.join(args)}"
        assert p.returncode == 0, (where, p.stdout, p.stderr)
        if kind in shapes.LINE_KINDS:
            lines = p.stdout.splitlines()
            assert lines, where
            for line in lines:
                entry = json.loads(line)
                assert shapes.check_line(entry, kind) == [], (where, entry)
            continue
        doc = json.loads(p.stdout)  # exactly one document
        assert shapes.check(doc, kind) == [], (where, doc)
        assert kind in shapes.COMMANDS[command], where


def assert_failure_shape(command: str, where: str, p, kind: str | None) -> dict:
    """P failed and printed one failure document: the whole report of KIND (one of
    COMMAND's kinds) with `error`, or with KIND None the frame alone."""
    assert p.returncode not in (0, None), (where, p.stdout, p.stderr)
    doc = json.loads(p.stdout)  # exactly one document
    assert doc["error"]["exit_code"] == p.returncode, (where, doc)
    assert p.stderr.splitlines()[-1].startswith("yoi: error: "), (where, p.stderr)
    if kind is None:
        assert shapes.check_failure(doc) == [], (where, doc)
    else:
        assert kind in shapes.COMMANDS[command], where
        assert shapes.check(doc, kind, ok=False) == [], (where, doc)
    return doc


def test_every_failure_document_has_the_commands_shape(tmp_path, project, state):
    from yoi import store
    store.create(state, "a")
    store.create(state, "b")
    for command, args, kind in FAILURES:
        p = run(state.root, command, args, project, stdin="")
        assert_failure_shape(command, f"{command} {' '.join(args)}", p, kind)


def test_failure_documents_with_a_report_have_the_commands_shape(tmp_path, state,
                                                                  started_pod):
    """An interrupted `send --lines`, a `yoi up` with a failed step, `start --foreground`
    of a Pod that runs: each prints its own report (or frame), nothing else."""
    import signal
    import time
    from yoi import session, store
    started_pod("a")
    sender = subprocess.Popen(yoi_cmd() + ["--state-dir", str(state.root), "pod", "send",
                                           "--lines", "--id", "L", "a", "--json"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        sender.stdin.write("one\n")
        sender.stdin.flush()
        deadline = time.monotonic() + 30
        while "L-1" not in [e.get("id") for _, e in session.entries(state.session_path("a"))
                            if e]:
            assert time.monotonic() < deadline, "line 1 never reached a's log"
            time.sleep(0.02)
        sender.send_signal(signal.SIGINT)
        out, err = sender.communicate(timeout=30)  # stdin still open: no EOF races it
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(timeout=30)
    p = subprocess.CompletedProcess(sender.args, sender.returncode, out, err)
    doc = assert_failure_shape("yoi pod send", "send --lines, interrupted", p, "lines-sent")
    assert (doc["interrupted"], doc["error"]["code"]) == (True, "interrupted")

    project = tmp_path / "broken-project"
    project.mkdir()
    (project / "yoi.toml").write_text("[pods.fine]\nstart = false\n"
                                      "[pods.broken]\nstart = false\n")
    store.create(state, "broken")
    state.metadata_path("broken").write_text("not [toml")
    p = run(state.root, "yoi up", ["-f", "{project}/yoi.toml"], project)
    doc = assert_failure_shape("yoi up", "up with a failed step", p, "converged")
    assert [f["action"] for f in doc["failed"]] == ["create"], doc

    p = run(state.root, "yoi pod start", ["a", "--foreground"], project)
    doc = assert_failure_shape("yoi pod start", "start --foreground of a running Pod", p, None)
    assert doc["error"]["code"] == "busy", doc


def test_start_foreground_json_prints_its_document_once_it_serves(state, run_yoi):
    import signal
    run_yoi("pod", "create", "a")
    p = subprocess.Popen(yoi_cmd() + ["--state-dir", str(state.root), "pod", "start", "a",
                                      "--foreground", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        doc = json.loads(p.stdout.readline())
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert shapes.check(doc, "pod-serving") == [], doc
    assert doc["pod_name"] == "a" and out == ""


def test_log_follow_json_lines_have_their_shapes_and_an_interrupt_adds_no_line(state,
                                                                              started_pod):
    """`log --follow --json` is JSON Lines of entries and events only: Ctrl-C ends it
    with exit 130 and a line on stderr, not with a failure document in the stream."""
    import queue
    import signal
    import threading
    started_pod("a")
    p = subprocess.Popen(yoi_cmd() + ["--state-dir", str(state.root), "pod", "log", "a",
                                      "--follow", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in p.stdout], daemon=True)
    reader.start()
    try:
        r = subprocess.run(yoi_cmd() + ["--state-dir", str(state.root), "pod", "send", "a",
                                        "hello"], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        seen = []
        while not any(json.loads(x).get("item", {}).get("message") == "hello" for x in seen):
            seen.append(lines.get(timeout=30))
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    reader.join(timeout=30)
    err = p.stderr.read()
    assert (p.returncode, err) == (130, "yoi: error: interrupted\n"), err
    while not lines.empty():
        seen.append(lines.get())
    for line in seen:
        entry = json.loads(line)
        assert "ok" not in entry and shapes.check_line(entry, "entries") == [], entry
