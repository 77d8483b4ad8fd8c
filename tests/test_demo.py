"""`yoi demo`: the main job end to end, through the real command line."""

from __future__ import annotations

import json
import re

from yoi.lock import is_locked


def test_demo_runs_every_step_and_removes_its_state(run_yoi):
    r = run_yoi("demo", timeout=120)
    assert r.exit_code == 0, r
    assert r.stdout.endswith("\ndemo: ok\n"), r
    m = re.match(r"state directory: (\S+) \(removed afterwards\)\n", r.stdout)
    assert m, r
    from pathlib import Path
    assert not Path(m.group(1)).exists()
    # The order of the issue: create, start, register (coder is asked, its handler
    # approves), send and wait for the reply, doctor, stop.
    commands = [re.sub(r" --exec .*", " --exec ...", line.split("$ ", 1)[1])
                for line in r.stdout.splitlines() if re.match(r"\[\d+\] \$ ", line)]
    assert commands == [
        "yoi pod create reviewer", "yoi pod create coder --accept-peers ask --exec ...",
        "yoi pod start reviewer", "yoi pod start coder",
        "yoi pod peer register reviewer coder --wait 30", "yoi pod list",
        "yoi pod send --from reviewer coder 'please review PR 42' --id pr-42 --wait-reply 30",
        "yoi pod log coder",
        "yoi pod spawn reviewer words --exec ...",
        "yoi pod spawn reviewer shout --exec ...",
        "yoi pod wait reviewer --from words --kind child_completed --timeout 30",
        "yoi pod wait reviewer --from shout --kind child_completed --timeout 30",
        "yoi pod list --as reviewer",
        "yoi doctor", "yoi pod stop coder", "yoi pod stop reviewer --recursive"], r
    assert ': pong from coder: got "please review PR 42"\n' in r.stdout
    # reviewer fanned out to two children and collected both results
    assert re.search(r"child words completed its task task:words:1: ok \[child:words:\w+:done\]"
                     r": +4\n", r.stdout), r
    assert "child shout completed its task task:shout:1: ok" in r.stdout
    assert ": PLEASE REVIEW PR 42\n" in r.stdout
    assert "    words: stopped\n    shout: stopped\n    reviewer: stopped\n" in r.stdout
    assert re.search(r"registered reviewer <-> coder \(coder approved request \w+\)", r.stdout)


def test_demo_json_in_a_kept_state_dir_leaves_stopped_pods_and_both_logs(run_yoi, tmp_path):
    state = tmp_path / "demo-state"
    r = run_yoi("demo", "--state-dir", state, "--keep", "--json", timeout=120)
    assert r.exit_code == 0, r
    doc = r.json
    assert doc["ok"] is True and doc["kept"] is True and doc["state_dir"] == str(state)
    assert all(step["exit_code"] == 0 for step in doc["steps"]), doc
    reply = [s for s in doc["steps"] if "reply" in s]
    assert reply and reply[0]["reply"] == 'pong from coder: got "please review PR 42"'
    assert "$ yoi pod create reviewer" in r.stderr  # the commentary is talk
    for name in ("reviewer", "coder", "words", "shout"):
        assert is_locked(state / "pods" / name / "runtime.lock") is False  # stopped
    coder_log = [json.loads(line) for line in
                 (state / "pods" / "coder" / "session.jsonl").read_text().splitlines()]
    items = [e["item"] for e in coder_log if e["kind"] == "system_item"]
    assert [(i["source"], i["message"]) for i in items] == [("reviewer", "please review PR 42")]
    # coder was asked first: its handler approved the request, and only then was
    # reviewer's message accepted.
    kinds = [e["kind"] for e in coder_log]
    assert kinds[:3] == ["peer_request", "peer_decision", "system_item"], kinds
    request, decision = coder_log[0], coder_log[1]
    assert request["source"] == "reviewer" and request["decider"] == "handler"
    assert (decision["source"], decision["request_id"], decision["decision"]) == (
        "reviewer", request["request_id"], "approved")
    outputs = [s["output"].strip() for s in doc["steps"] if "output" in s]
    assert outputs == ["4", "PLEASE REVIEW PR 42"], doc["steps"]
    reviewer_log = [json.loads(line) for line in
                    (state / "pods" / "reviewer" / "session.jsonl").read_text().splitlines()]
    notices = sorted((e["kind"], e["source"]) for e in reviewer_log
                     if e["kind"].startswith("child_"))
    assert notices == [("child_completed", "shout"), ("child_completed", "words"),
                       ("child_stopped", "shout"), ("child_stopped", "words")], notices
    register = [s for s in doc["steps"] if s["command"].startswith("yoi pod peer register")]
    assert register == [{"command": "yoi pod peer register reviewer coder --wait 30",
                         "exit_code": 0}]
    assert run_yoi("doctor", "--state-dir", state).exit_code == 0


def test_demo_fails_with_the_step_that_failed(run_yoi, tmp_path):
    state = tmp_path / "busy"
    assert run_yoi("pod", "create", "reviewer", "--state-dir", state).exit_code == 0
    r = run_yoi("demo", "--state-dir", state, "--json", timeout=120)
    assert r.exit_code == 1, r
    assert r.json["ok"] is False
    assert r.stderr.splitlines()[-1] == (
        "yoi: error: demo step `yoi pod create reviewer` exited 1: "
        "yoi: error: Pod 'reviewer' already exists")
    # The Pod that was there before is not the demo's to remove.
    assert run_yoi("pod", "show", "reviewer", "--state-dir", state).exit_code == 0


def test_demo_in_an_existing_state_dir_removes_only_its_own_pods(run_yoi, tmp_path):
    state = tmp_path / "mine"
    assert run_yoi("pod", "create", "other", "--state-dir", state).exit_code == 0
    r = run_yoi("demo", "--state-dir", state, timeout=120)
    assert r.exit_code == 0, r
    assert r.stdout.startswith(f"state directory: {state} (the demo's Pods are removed "
                               "afterwards)\n"), r
    assert r.stdout.endswith("[18] $ yoi pod rm reviewer --recursive\n    removed reviewer "
                             "and words, shout\n\ndemo: ok\n"), r
    assert sorted(p.name for p in (state / "pods").iterdir()) == ["other"]
