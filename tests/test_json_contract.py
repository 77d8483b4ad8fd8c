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
    ("yoi pod log", ["a"], "entries", None),
    ("yoi pod log", ["a", "--tail", "1"], "entries", None),
    ("yoi doctor", [], "doctor", None),
    ("yoi doctor", ["--list-checks"], "doctor-checks", None),
    ("yoi pod stop", ["c"], "pod-stopped", None),
    ("yoi pod stop", ["--label", "job=1"], "pods-stopped", None),
    ("yoi pod peer remove", ["a", "b"], "peer-changed", None),
    ("yoi pod rm", ["c"], "pod-removed", None),
    ("yoi up", ["-f", "{project}/yoi.toml"], "converged", None),
    ("yoi down", ["-f", "{project}/yoi.toml", "--rm"], "converged", None),
    ("yoi demo", [], "demo", None),
]

# A failing run of each command (with `--json`): (command, args). Each prints the
# failure frame with the command's report fields where it has one.
FAILURES = {
    "yoi pod create": ["a", "--exist-ok", "--exec", "other"],
    "yoi pod config": ["ghost", "--no-exec"],
    "yoi pod show": ["ghost"],
    "yoi pod list": ["--as", "ghost"],
    "yoi pod rm": ["ghost"],
    "yoi pod start": ["ghost"],
    "yoi pod stop": ["ghost"],
    "yoi pod restore": ["ghost"],
    "yoi pod status": ["b"],
    "yoi pod log": ["ghost"],
    "yoi pod send": ["--from", "b", "b", "hi"],
    "yoi pod wait": ["a", "--reply-to", "never", "--timeout", "0.2"],
    "yoi pod peer register": ["a", "ghost"],
    "yoi pod peer remove": ["a", "ghost"],
    "yoi pod peer list": ["ghost"],
    "yoi pod peer approve": ["a", "b"],
    "yoi pod peer deny": ["a", "b"],
    "yoi doctor": ["--check", "no-such-check"],
    "yoi demo": ["--bogus"],
    "yoi up": ["-f", "{project}/missing.toml"],
    "yoi down": ["-f", "{project}/missing.toml"],
}


def test_every_command_has_a_scenario_and_a_documented_shape():
    assert sorted(shapes.COMMANDS) == sorted(LEAVES)
    assert sorted({s[0] for s in SCENARIOS}) == sorted(LEAVES)
    assert sorted(FAILURES) == sorted(LEAVES)
    for command, kinds in shapes.COMMANDS.items():
        assert all(k in shapes.LINE_KINDS or k in shapes.DOCUMENTS for k in kinds), command
    used = {s[2] for s in SCENARIOS} | {"pod-serving"}  # --foreground: test_runtime_*
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


def test_every_failure_document_has_the_frame(tmp_path, project, state):
    from yoi import store
    store.create(state, "a")
    store.create(state, "b")
    for command, args in FAILURES.items():
        p = run(state.root, command, args, project)
        where = f"{command} {' '.join(args)}"
        assert p.returncode not in (0, None), (where, p.stdout, p.stderr)
        doc = json.loads(p.stdout)
        assert doc["error"]["exit_code"] == p.returncode, (where, doc)
        assert p.stderr.startswith("yoi: error: "), (where, p.stderr)
        kinds = [k for k in shapes.COMMANDS[command] if k not in shapes.LINE_KINDS]
        fits = [k for k in kinds if shapes.check(doc, k, ok=False) == []]
        assert fits or shapes.check_failure(doc) == [], (where, doc, [
            shapes.check(doc, k, ok=False) for k in kinds])


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
