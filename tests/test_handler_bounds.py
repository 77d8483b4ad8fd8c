"""A handler run is bounded: what it leaves running, how long it takes and how much
it writes to stderr cannot freeze a Pod or grow its pod.log without bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from rawsock import Raw

from yoi import podlog
from yoi.client import notify


def gone(pid: int) -> bool:
    """Whether PID has ended (a zombie nobody reaps has ended too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(condition, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {seconds}s"
        time.sleep(0.05)


def pids(path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_a_background_child_holding_the_output_cannot_freeze_the_pod(
        state, started_pod, run_yoi, tmp_path):
    bg = tmp_path / "bg.pids"
    pod = started_pod("h", exec=f"cat >/dev/null; sleep 333 & echo $! >> {bg}; echo started")
    try:
        with Raw(pod.socket_path, timeout=30) as c:
            c.prelude()
            notify(pod.socket_path, "one", "m-1")
            ev, _ = c.until("text_done")
            assert ev["data"]["text"] == "started\n"  # committed although stdout stayed open
            alert, _ = c.until("alert")
            assert alert["data"]["level"] == "warn"
            assert alert["data"]["message"] == (
                "handler exited, but its output stayed open (a background process?); it was "
                "read for 1s more and the handler's process group was killed (message m-1)")
            c.until("status", lambda d: d["status"] == "idle")
            wait_until(lambda: gone(pids(bg)[0]), "killed with the run's process group")
            notify(pod.socket_path, "two", "m-2")  # later messages are handled
            ev, _ = c.until("text_done")
            assert ev["data"]["text"] == "started\n"
            c.until("status", lambda d: d["status"] == "idle")
        r = run_yoi("pod", "stop", "h")
        assert r.exit_code == 0 and r.stdout == "stopped\n", r
    finally:
        for pid in pids(bg):
            if not gone(pid):
                os.kill(pid, 9)
                raise AssertionError(f"background child {pid} outlived its run")


def test_a_handler_over_its_timeout_is_killed_with_its_group_and_the_pod_goes_on(
        state, started_pod, run_yoi, tmp_path):
    left = tmp_path / "pids"
    r = run_yoi("pod", "create", "h", "--handler-timeout", "1", "--exec",
                f'm=$(cat); if [ "$m" = slow ]; then echo $$ >> {left}; sleep 333 & '
                f'echo $! >> {left}; sleep 334; fi; echo "done $m"')
    assert r.exit_code == 0, r
    assert "timeout:      1s per handler run\n" in r.stdout, r
    pod = started_pod("h")
    try:
        with Raw(pod.socket_path, timeout=30) as c:
            c.prelude()
            notify(pod.socket_path, "slow", "m-1")
            ev, _ = c.until("text_done")  # the run's handler_result, as the original's event
            assert (ev["data"]["kind"], ev["data"]["id"], ev["data"]["ended"],
                    ev["data"]["ok"], ev["data"]["text"]) == (
                "handler_result", "m-1", "timed_out", False, "")
            alert, _ = c.until("alert")
            assert alert["data"] == {**alert["data"], "level": "error", "message":
                                     "handler timed out after 1s and was killed (message m-1)"}
            notify(pod.socket_path, "quick", "m-2")
            ev, _ = c.until("text_done")
            assert ev["data"]["text"] == "done quick\n" and ev["data"]["ok"] is True
        wait_until(lambda: all(gone(p) for p in pids(left)), "killed: the handler and its child")
        assert len(pids(left)) == 2
    finally:
        for pid in pids(left):
            if not gone(pid):
                os.kill(pid, 9)


def test_stopping_the_pod_ends_the_run_and_its_process_group(
        state, started_pod, run_yoi, tmp_path):
    left = tmp_path / "pids"
    pod = started_pod("h", exec=f"cat >/dev/null; sleep 333 & echo $! >> {left}; sleep 334")
    try:
        notify(pod.socket_path, "one", "m-1")
        wait_until(lambda: pids(left), "started")
        r = run_yoi("pod", "stop", "h")
        assert r.exit_code == 0 and r.stdout == "stopped\n", r
        wait_until(lambda: gone(pids(left)[0]), "killed with the Pod's handler")
        # the log says how the run ended, and it is no failure of the handler
        [result] = [e for e in map(json.loads, state.session_path("h").read_bytes()
                                   .splitlines()) if e["kind"] == "handler_result"]
        assert (result["id"], result["ok"], result["ended"], result["signal"]) == (
            "m-1", False, "stopped", 15), result
        r = run_yoi("pod", "status", "h", "--json")
        assert (r.json["handler"]["recent_failures"], r.json["handler"]["failing_streak"]) == (
            0, 0), r
        assert "handler cut short (the Pod stopped) [m-1]" in run_yoi(
            "pod", "log", "h").stdout
    finally:
        for pid in pids(left):
            if not gone(pid):
                os.kill(pid, 9)


def test_50_mib_of_handler_stderr_leave_pod_log_small(state, started_pod):
    big = 50 << 20
    pod = started_pod("h", exec=f"cat >/dev/null; echo first >&2; head -c {big} /dev/zero "
                                "| tr '\\0' e >&2; echo last >&2; echo done")
    with Raw(pod.socket_path, timeout=60) as c:
        c.prelude()
        notify(pod.socket_path, "go", "m-1")
        ev, _ = c.until("text_done")
        assert ev["data"]["text"] == "done\n"
        c.until("status", lambda d: d["status"] == "idle")
    logs = sorted(state.pod_dir("h").glob("pod.log*"))
    assert [p.name for p in logs] == ["pod.log"]
    text = logs[0].read_bytes()
    assert len(text) < 100 << 10
    assert text.count(b"e" * 1000) >= 60  # the first and the last 32 KiB are kept ...
    assert b"first\n" in text and b"last\n" in text
    dropped = big + len("first\nlast\n") - (64 << 10)
    assert (f"handler stderr (message m-1): {dropped} bytes dropped here (it wrote "
            f"{big + 11}; at most 65536 bytes of a run are kept: its first and its last)"
            ).encode() in text  # ... and the rest is accounted for


def test_pod_log_is_rotated_by_size_while_the_pod_runs(state, run_yoi, started_pod):
    run_yoi("pod", "create", "h")
    log = state.pod_log_path("h")
    filler = b"x" * 99 + b"\n"
    log.write_bytes(filler * ((podlog.MAX_BYTES - (16 << 10)) // len(filler)))
    pod = started_pod("h", exec="cat >/dev/null; head -c 40000 /dev/zero | tr '\\0' e >&2; echo")
    assert not log.with_name("pod.log.1").exists()  # under the size at start
    notify(pod.socket_path, "go", "m-1")  # 32 KiB into pod.log: over it now
    wait_until(log.with_name("pod.log.1").exists, "rotated")
    assert log.with_name("pod.log.1").read_bytes().startswith(filler)
    notify(pod.socket_path, "still logging", "m-2")
    wait_until(lambda: b"e" * 1000 in log.read_bytes(), "logging to the new pod.log")
    assert log.stat().st_size < 1 << 20


ROTATE = """
import os, sys
from pathlib import Path
from yoi.server import log
path = Path(sys.argv[1])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.dup2(fd, 1); os.dup2(fd, 2)
assert log.rotate_by_size(path, max_bytes=1000, keep=3)
for i in range(200):
    log.log(f"line {i:03d} " + "z" * 40)
print("through sys.stdout, after rotations", flush=True)
"""


def test_rotation_keeps_a_bounded_number_of_bounded_files(tmp_path):
    path = tmp_path / "pod.log"
    subprocess.run([sys.executable, "-c", ROTATE, str(path)], check=True, timeout=60)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["pod.log", "pod.log.1", "pod.log.2", "pod.log.3"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 1000 + 80, p
    assert path.read_text().splitlines()[-2:] == [
        path.read_text().splitlines()[-2], "through sys.stdout, after rotations"]
    assert "line 199" in path.read_text()
    assert "line 000" not in "".join(p.read_text() for p in tmp_path.iterdir())


def test_a_handler_timeout_longer_than_a_select_can_wait_still_runs_the_handler(
        state, started_pod, run_yoi):
    """35 days is more milliseconds than epoll takes in one wait: the run waits in
    parts, and a record can hold no timeout beyond the one range of seconds."""
    r = run_yoi("pod", "create", "h", "--handler-timeout", str(35 * 86400), "--exec", "cat")
    assert r.exit_code == 0, r
    started_pod("h", create=False)
    r = run_yoi("pod", "send", "h", "hello", "--id", "m-1")
    assert r.exit_code == 0, r
    r = run_yoi("pod", "wait", "h", "--kind", "handler_result", "--id", "m-1", "--timeout",
                "20", "--json")
    assert r.exit_code == 0, r
    assert (r.json["entry"]["ok"], r.json["entry"]["text"]) == (True, "hello"), r
    assert "internal error" not in state.pod_log_path("h").read_text()
    r = run_yoi("pod", "config", "h", "--handler-timeout", str(366 * 86400))
    assert r.exit_code == 2 and "at most 31536000" in r.stderr, r
    path = state.metadata_path("h")
    path.write_text(path.read_text().replace(f"= {35 * 86400}.0", "= 1e12"))
    r = run_yoi("pod", "show", "h")
    assert r.exit_code == 1 and "runtime.handler_timeout must be" in r.stderr, r
