"""start / stop / restore / status with real Pod processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import workers
from conftest import yoi_cmd
from yoi import control, store
from yoi.errors import Busy
from yoi.lock import is_locked


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until PID no longer exists or is a zombie (its parent may reap it later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still running")


def released(lock, timeout: float = 10.0) -> bool:
    """Wait until nobody holds LOCK (a killed process's threads may still be exiting)."""
    deadline = time.monotonic() + timeout
    while is_locked(lock) and time.monotonic() < deadline:
        time.sleep(0.02)
    return is_locked(lock) is not True  # None: no lock file at all


def test_start_status_stop_round_trip(state, run_yoi, started_pod):
    pod = started_pod("a")
    assert pod.socket_path == str(state.root / "run" / "a.sock")
    st = os.stat(pod.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state.root / "run").st_mode) == 0o700
    runtime = store.read(state, "a")["runtime"]
    assert runtime["pid"] == pod.pid and runtime["socket_path"] == pod.socket_path

    r = run_yoi("pod", "status", "a")
    assert r.exit_code == 0, r
    assert r.stdout == f"a: live, idle, pid {pod.pid}, socket {pod.socket_path}\n"
    r = run_yoi("pod", "status", "a", "--json")
    assert r.exit_code == 0, r
    assert r.json == {"ok": True, "pod_name": "a", "running": True, "pid": pod.pid,
                      "exec": None, "live": {"socket_path": pod.socket_path,
                                             "reachable": True, "status": "idle",
                                             "error": None}, "queued": 0,
                      "handler": {"last": None, "recent_runs": 0, "recent_failures": 0,
                                  "failing_streak": 0}}

    r = run_yoi("pod", "start", "a")
    assert r.exit_code == 6, r
    assert r.stderr == f"yoi: error: Pod 'a' is already running (pid {pod.pid})\n"

    r = run_yoi("pod", "stop", "a")
    assert (r.exit_code, r.stdout) == (0, "stopped\n"), r
    wait_gone(pod.pid)
    assert not os.path.exists(pod.socket_path)
    assert is_locked(state.runtime_lock_path("a")) is False
    runtime = store.read(state, "a")["runtime"]
    assert "pid" not in runtime and runtime["socket_path"] == pod.socket_path

    r = run_yoi("pod", "status", "a")
    assert (r.exit_code, r.stdout) == (5, "a: not running\n"), r
    assert r.stderr == "yoi: error: Pod 'a' is not live: not running\n"
    r = run_yoi("pod", "status", "a", "--json")
    assert r.exit_code == 5 and r.json["ok"] is False and r.json["live"]["reachable"] is False
    assert r.json["error"]["code"] == "unreachable"
    r = run_yoi("pod", "stop", "a")
    assert (r.exit_code, r.stdout) == (0, "a: not running\n"), r


def test_unknown_pod_is_exit_3_for_every_command(run_yoi, state):
    for cmd in ("start", "stop", "restore", "status", "log"):
        r = run_yoi("pod", cmd, "ghost")
        assert r.exit_code == 3, r
        assert r.stderr == ("yoi: error: no such Pod: ghost (no state directory at "
                            f"{state.root})\n"), r
    state.ensure()
    for cmd in ("start", "stop", "restore", "status", "log"):
        r = run_yoi("pod", cmd, "ghost")
        assert r.stderr == "yoi: error: no such Pod: ghost\n", r
    assert run_yoi("pod", "start", "-bad").exit_code == 2


def test_restore_starts_a_stopped_pod_and_reports_a_live_one(state, run_yoi, started_pod):
    run_yoi("pod", "create", "a")
    r = run_yoi("pod", "restore", "a", "--json")
    assert r.exit_code == 0, r
    assert r.json["restored"] is True and r.json["message"] == "started"
    pid = r.json["pid"]
    assert control.holder_pid(state.runtime_lock_path("a")) == pid
    r = run_yoi("pod", "restore", "a")
    assert (r.exit_code, r.stdout) == (0, "a: already live\n"), r
    assert control.holder_pid(state.runtime_lock_path("a")) == pid
    # (teardown of started_pod stops every running Pod of the state directory)


def test_restore_waits_for_a_pod_holding_its_runtime_lock_until_the_timeout(state, run_yoi):
    """A Pod starting elsewhere holds its runtime lock before it answers: restore waits
    for it (up to --timeout) instead of failing at once; one that never answers is
    busy, and the message says that it was waited for."""
    run_yoi("pod", "create", "a")
    starting = workers.start("hold-runtime-lock", state.root, "a")
    with workers.stopping(starting):
        r = run_yoi("pod", "restore", "a", "--timeout", "1", "--json")
    assert r.exit_code == 6, r
    assert r.stderr == (f"yoi: error: Pod 'a' is running (pid {starting.pid}) but did not "
                        "answer within 1s\n"), r
    assert (r.json["error"]["code"], r.json["error"]["pid"]) == ("busy", starting.pid)


def test_restore_while_a_start_is_half_way_reports_the_pod_already_live(state, run_yoi,
                                                                          started_pod):
    """`yoi pod start x & sleep 0.1; yoi pod restore x` (and so `yoi up` beside a start)
    used to exit 6 while x held its runtime lock but did not listen yet. Here the Pod
    is held at that point for sure: it records its socket under its metadata lock,
    which the test holds, before it listens."""
    from yoi.lock import FileLock
    run_yoi("pod", "create", "a")
    with FileLock(state.lock_path("a"), 1):
        starter = subprocess.Popen(yoi_cmd() + ["pod", "start", "a", "--lock-timeout", "60",
                                                "--timeout", "60"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        restorer = None
        try:
            deadline = time.monotonic() + 30
            while not (control.is_running(state, "a")
                       and state.default_socket_path("a").exists()):
                assert starter.poll() is None and time.monotonic() < deadline, starter.stderr
                time.sleep(0.01)
            restorer = subprocess.Popen(yoi_cmd() + ["pod", "restore", "a", "--json",
                                                     "--timeout", "60"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
            with pytest.raises(subprocess.TimeoutExpired):  # it waits; it used to exit 6
                restorer.wait(timeout=2)
        finally:
            if restorer is None:
                starter.kill()
    out, err = restorer.communicate(timeout=60)  # the lock is free: the Pod comes up
    assert restorer.returncode == 0, err
    doc = json.loads(out)
    assert (doc["restored"], doc["message"]) == (False, "already live"), doc
    assert starter.wait(timeout=60) == 0, starter.stderr.read()
    assert doc["pid"] == control.holder_pid(state.runtime_lock_path("a"))


def test_sigkilled_pod_stale_socket_and_lock_are_handled(state, run_yoi, started_pod):
    pod = started_pod("a")
    os.kill(pod.pid, signal.SIGKILL)
    wait_gone(pod.pid)
    assert os.path.exists(pod.socket_path)  # the leftover socket file
    assert released(state.runtime_lock_path("a"))  # the kernel released the lock

    r = run_yoi("pod", "status", "a")
    assert (r.exit_code, r.stdout) == (5, "a: not running\n"), r
    # start again without stop: the new holder of the lock replaces the stale socket
    pod2 = started_pod("a")
    assert pod2.pid != pod.pid
    assert run_yoi("pod", "status", "a").exit_code == 0
    os.kill(pod2.pid, signal.SIGKILL)
    wait_gone(pod2.pid)
    assert released(state.runtime_lock_path("a"))
    r = run_yoi("pod", "stop", "a", "--json")
    assert r.exit_code == 0, r
    assert r.json["stopped"] is False and r.json["message"] == "not running"
    assert r.json["stale_socket_removed"] is True
    assert not os.path.exists(pod.socket_path)
    assert "pid" not in store.read(state, "a")["runtime"]


def test_stop_of_a_hung_pod_times_out_then_force_kills_the_lock_holder(state, run_yoi,
                                                                        started_pod):
    pod = started_pod("a")
    os.kill(pod.pid, signal.SIGSTOP)
    try:
        r = run_yoi("pod", "stop", "a", "--timeout", "0.5")
        assert r.exit_code == 5, r
        assert r.stderr == (f"yoi: error: Pod 'a' (pid {pod.pid}) did not stop within 0.5s; "
                            "`yoi pod stop a --force` kills it\n")
        assert control.is_running(state, "a")
        r = run_yoi("pod", "stop", "a", "--timeout", "0.5", "--force", "--json")
        assert r.exit_code == 0, r
        assert r.json["stopped"] is True and r.json["forced"] == "SIGKILL"  # stopped: no TERM
        assert r.json["pid"] == pod.pid
        wait_gone(pod.pid)
        assert not os.path.exists(pod.socket_path)
    finally:
        try:
            os.kill(pod.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_force_never_kills_a_pid_from_a_stale_hint(state, run_yoi):
    """The runtime.lock file names a live process that does not hold the lock."""
    run_yoi("pod", "create", "a")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state.runtime_lock_path("a").write_text(f"{bystander.pid}\n")
        r = run_yoi("pod", "stop", "a", "--force")
        assert (r.exit_code, r.stdout) == (0, "a: not running\n"), r
        assert bystander.poll() is None
        assert control.holder_pid(state.runtime_lock_path("a")) is None
    finally:
        bystander.kill()
        bystander.wait()


def test_start_that_fails_reports_the_pod_log_tail(state, run_yoi):
    run_yoi("pod", "create", "a")
    (state.root / "run").mkdir(mode=0o700)
    (state.root / "run" / "a.sock").mkdir()  # not a socket: the Pod refuses to remove it
    r = run_yoi("pod", "start", "a", "--timeout", "20")
    assert r.exit_code == 5, r
    assert r.stderr.startswith("yoi: error: Pod 'a' exited with status 1 while starting; "
                               "its log says: yoi: error: "), r
    assert "exists and is not a socket; refusing to remove it" in r.stderr
    assert is_locked(state.runtime_lock_path("a")) is False
    log = state.pod_log_path("a")
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600


def test_start_blocked_by_a_metadata_lock_is_not_called_already_running(state, run_yoi):
    """The child exits 6 because Pod a's metadata lock timed out: say that, not 'running'."""
    from yoi.lock import FileLock
    run_yoi("pod", "create", "a")
    with FileLock(state.lock_path("a"), 1):
        r = run_yoi("pod", "start", "a", "--lock-timeout", "0.3", "--timeout", "20")
    assert r.exit_code == 6, r
    assert r.stderr.startswith("yoi: error: Pod 'a' could not start: "), r
    assert "already running" not in r.stderr
    assert f"Pod 'a' is locked by pid {os.getpid()}" in r.stderr
    assert is_locked(state.runtime_lock_path("a")) is False


def test_start_that_times_out_stops_the_child(state, run_yoi):
    run_yoi("pod", "create", "a")
    r = run_yoi("pod", "start", "a", "--timeout", "0.001")
    assert r.exit_code == 5, r
    assert r.stderr.startswith("yoi: error: Pod 'a' did not answer within 0.001s and was "
                               "stopped")
    assert released(state.runtime_lock_path("a"))
    assert run_yoi("pod", "status", "a").exit_code == 5


def test_exec_given_to_start_is_stored_and_reported(state, run_yoi, started_pod):
    started_pod("a", exec="cat")
    assert store.read(state, "a")["runtime"]["exec"] == "cat"
    r = run_yoi("pod", "status", "a", "--json")
    assert r.json["exec"] == "cat"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_serves_until_a_signal_and_cleans_up(state, run_yoi, sig):
    from yoi.client import Connection
    run_yoi("pod", "create", "a")
    p = subprocess.Popen([sys.executable, "-m", "yoi", "pod", "start", "a", "--foreground"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line == f"{state.root / 'run' / 'a.sock'}\n"
        with Connection.open(line.strip(), 10, keep_snapshot=True) as conn:
            assert conn.snapshot["status"] == "idle"
        assert control.holder_pid(state.runtime_lock_path("a")) == p.pid
        p.send_signal(sig)
        assert p.wait(20) == 0
        assert f"Pod a stopped ({sig.name})" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not os.path.exists(line.strip())
    assert is_locked(state.runtime_lock_path("a")) is False


def test_long_state_path_puts_the_socket_in_a_short_private_directory(tmp_path, run_yoi,
                                                                      monkeypatch):
    from yoi.state import State
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("YOI_HOME", str(deep))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir(mode=0o700)
    st = State.resolve(deep)
    run_yoi("pod", "create", "a")
    r = run_yoi("pod", "start", "a")
    try:
        assert r.exit_code == 0, r
        path = r.stdout.strip()
        assert path == str(st.default_socket_path("a"))
        assert path.startswith(str(tmp_path / "xdg" / "yoi-")) and len(path) <= 107
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert store.read(st, "a")["runtime"]["socket_path"] == path
        assert run_yoi("pod", "status", "a").exit_code == 0
    finally:
        assert run_yoi("pod", "stop", "a", "--force").exit_code == 0
    assert not os.path.exists(path)


def test_two_pods_fresh_install_plain_socket_client(state, run_yoi, started_pod):
    """Done means: two Pods started, talked to with a plain socket client, stopped."""
    from rawsock import Raw
    pods = [started_pod("a"), started_pod("b")]
    for pod in pods:
        with Raw(pod.socket_path) as c:
            _, snap = c.prelude()
            assert snap["data"]["greeting"]["pod_name"] == pod.name
            c.send({"method": "notify", "params": {"message": f"hi {pod.name}", "id": "m1"}})
            ev, _ = c.until("system_item")
            assert ev["data"]["item"]["message"] == f"hi {pod.name}"
    for pod in pods:
        assert run_yoi("pod", "stop", pod.name).exit_code == 0
        wait_gone(pod.pid)


def test_a_start_is_not_refused_because_a_command_looked_at_the_lock(state, run_yoi):
    """`status`, `list`, `stop` of a stopped Pod take the runtime lock for an
    instant to test it; a Pod starting at that instant must still start."""
    import fcntl
    import threading
    run_yoi("pod", "create", "a")
    path = state.runtime_lock_path("a")
    looker = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(looker, fcntl.LOCK_SH)  # what is_locked() does, held a little longer
    threading.Timer(0.3, os.close, [looker]).start()
    held = store.hold_runtime_lock(state, "a")
    try:
        assert control.holder_pid(path) == os.getpid()
    finally:
        os.close(held)
    # a Pod that really runs is still refused, after the grace period
    running = os.open(path, os.O_RDWR)
    fcntl.flock(running, fcntl.LOCK_EX)
    try:
        with pytest.raises(Busy, match="already running"):
            store.hold_runtime_lock(state, "a", grace=0.1)
    finally:
        os.close(running)


def test_stop_never_removes_a_file_that_is_not_a_socket(state, run_yoi):
    run_yoi("pod", "create", "a")
    (state.root / "run").mkdir(mode=0o700)
    precious = state.root / "run" / "a.sock"
    precious.write_text("not a socket\n")
    r = run_yoi("pod", "stop", "a", "--json")
    assert r.exit_code == 0, r
    assert r.json["message"] == "not running" and r.json["stale_socket_removed"] is False
    assert precious.read_text() == "not a socket\n"
    r = run_yoi("pod", "send", "a", "hi")
    assert (r.exit_code, r.stderr) == (
        5, "yoi: error: a is not running; start it with `yoi pod restore a`\n"), r


@pytest.mark.parametrize("cmd", ["start", "stop", "restore", "status", "log", "send"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e12"])
def test_timeout_must_be_positive_and_finite(cli, cmd, value):
    r = cli("pod", cmd, "a", "--timeout", value)
    assert r.exit_code == 2, r
    assert r.stderr.startswith("yoi: error: Invalid value for '--timeout': "), r


def test_concurrent_starts_one_wins_the_others_name_it(state, run_yoi, started_pod):
    from concurrent.futures import ThreadPoolExecutor
    run_yoi("pod", "create", "a")
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: run_yoi("pod", "start", "a"), range(4)))
        assert sorted(r.exit_code for r in results) == [0, 6, 6, 6], results
        pid = control.holder_pid(state.runtime_lock_path("a"))
        for r in results:
            if r.exit_code == 6:
                assert r.stderr == f"yoi: error: Pod 'a' is already running (pid {pid})\n", r
        r = run_yoi("pod", "status", "a", "--json")
        assert r.exit_code == 0 and r.json["pid"] == pid, r
    finally:
        assert run_yoi("pod", "stop", "a").exit_code == 0


def test_start_runs_this_yoi_whatever_the_current_directory_holds(state, run_yoi, tmp_path):
    """`yoi pod start` in a checkout or project with a `yoi` package of its own."""
    other = tmp_path / "project"
    (other / "yoi").mkdir(parents=True)
    (other / "yoi" / "__init__.py").write_text("")
    (other / "yoi" / "__main__.py").write_text("raise SystemExit('not this yoi')\n")
    run_yoi("pod", "create", "a")
    # -P: as the installed `yoi` script runs, without the current directory on sys.path
    p = subprocess.run([sys.executable, "-P", "-m", "yoi", "pod", "start", "a"], cwd=other,
                       capture_output=True, text=True, timeout=60)
    try:
        assert p.returncode == 0, p.stderr
        assert run_yoi("pod", "status", "a").exit_code == 0
    finally:
        run_yoi("pod", "stop", "a", "--force")
