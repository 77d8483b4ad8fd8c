"""`yoi pod send --lines` streams: each line is sent as it is read, an interrupt stops
cleanly with a report, and a re-run with the printed prefix delivers each line once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import yoi_cmd
from yoi import session


def ids_in_log(state, name: str) -> list[str]:
    return [e.get("id") for _, e in session.entries(state.session_path(name))
            if e and e.get("kind") == "system_item"]


def wait_until(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish(p) -> tuple[bytes, bytes]:
    """Wait for P with its stdin still open (so no EOF races a signal); its output."""
    p.wait(timeout=30)
    return p.stdout.read(), p.stderr.read()


@pytest.fixture
def sender(tmp_path):
    """Start `yoi pod send --lines ...` reading a pipe we write to; stopped at teardown."""
    procs = []

    def start(*args):
        p = subprocess.Popen(yoi_cmd() + ["pod", "send", "--lines", *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def test_lines_arrive_before_the_input_ends(state, started_pod, sender):
    """`tail -f build.log | yoi pod send --lines T` used to send nothing until EOF."""
    started_pod("T")
    p = sender("--id", "grow", "T")
    for n in range(1, 4):
        p.stdin.write(f"build step {n}\n".encode())
        p.stdin.flush()
        wait_until(lambda: f"grow-{n}" in ids_in_log(state, "T"), 30, f"line {n} in T's log")
    assert p.poll() is None  # still reading: the input has not ended
    p.stdin.close()
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out == b"delivered 3 messages to T as operator (ids grow-1 .. grow-3)\n"
    assert ids_in_log(state, "T") == ["grow-1", "grow-2", "grow-3"]


def test_a_growing_file_through_tail_f(state, started_pod, tmp_path):
    started_pod("T")
    log = tmp_path / "build.log"
    log.write_text("first\n")
    p = subprocess.Popen(f"tail -n +1 -f {log} | {' '.join(yoi_cmd())} pod send --lines "
                         "--id tl T", shell=True, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: "tl-1" in ids_in_log(state, "T"), 30, "the first line")
        with open(log, "a") as f:
            f.write("second\n")
        wait_until(lambda: "tl-2" in ids_in_log(state, "T"), 30, "the appended line")
    finally:
        os.killpg(p.pid, signal.SIGTERM)  # as a CI runner cancels a job
        out, err = p.communicate(timeout=30)
    assert ids_in_log(state, "T") == ["tl-1", "tl-2"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupt_reports_and_the_printed_prefix_resumes_exactly_once(state, started_pod,
                                                                       sender, sig):
    started_pod("T")
    data = "".join(f"event {n}\n" for n in range(1, 41))
    p = sender("--json", "T")  # no --id: the prefix is random and must be shown
    p.stdin.write(data[:data.index("event 21\n")].encode())  # lines 1-20, then nothing yet
    p.stdin.flush()
    note = p.stderr.readline().decode()
    assert note.startswith("yoi: sending with ids "), note
    prefix = note.split("--id ")[1].strip()
    wait_until(lambda: f"{prefix}-20" in ids_in_log(state, "T"), 30, "line 20")
    p.send_signal(sig)
    out, err = finish(p)
    assert p.returncode == 130, err
    doc = json.loads(out)
    assert (doc["ok"], doc["interrupted"], doc["id_prefix"]) == (False, True, prefix)
    assert (doc["acknowledged_count"], doc["lines_read"], doc["messages"]) == (20, 20, 20)
    assert doc["acknowledged"] is True  # every message sent was: the input was not all read
    assert doc["error"]["code"] == "interrupted" and doc["error"]["exit_code"] == 130
    message = (f"20 of 20 messages to T acknowledged; interrupted after line 20; resume with "
               f"--id {prefix} over the same input (what was delivered is not delivered again)")
    assert doc["error"]["message"] == message
    assert err.decode().splitlines()[-1] == f"yoi: error: {message}"
    # the same input, whole this time, resumed with the printed prefix
    r = subprocess.run(yoi_cmd() + ["pod", "send", "--lines", "--id", prefix, "--json", "T"],
                       input=data.encode(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["acknowledged_count"] == 40
    assert ids_in_log(state, "T") == [f"{prefix}-{n}" for n in range(1, 41)]


def test_interrupt_without_json_says_how_to_resume(state, started_pod, sender):
    started_pod("T")
    p = sender("--id", "ctl", "T")
    p.stdin.write(b"one\ntwo\n")
    p.stdin.flush()
    wait_until(lambda: "ctl-2" in ids_in_log(state, "T"), 30, "line 2")
    p.send_signal(signal.SIGINT)
    out, err = finish(p)
    assert (p.returncode, out) == (130, b"")
    assert err.decode() == ("yoi: error: 2 of 2 messages to T acknowledged; interrupted after "
                            "line 2; resume with --id ctl over the same input (what was "
                            "delivered is not delivered again)\n")


def test_interrupt_before_any_line_says_nothing_was_sent(state, started_pod, sender):
    started_pod("T")
    p = sender("--json", "T")
    note = p.stderr.readline().decode()  # printed once connected, signals handled
    prefix = note.split("--id ")[1].strip()
    p.send_signal(signal.SIGINT)
    out, err = finish(p)
    assert p.returncode == 130, err
    doc = json.loads(out)
    assert (doc["messages"], doc["acknowledged_count"], doc["acknowledged"]) == (0, 0, False)
    assert doc["error"]["message"] == (
        f"nothing sent to T; interrupted before the first line; resume with --id {prefix} "
        "over the same input (what was delivered is not delivered again)")
