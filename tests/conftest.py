"""Shared fixtures: every test gets its own state directory ($YOI_HOME)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner


@pytest.fixture(autouse=True)
def yoi_home(tmp_path, monkeypatch) -> Path:
    """Point YOI_HOME at a fresh directory so no test touches a real home."""
    home = tmp_path / "state"
    monkeypatch.setenv("YOI_HOME", str(home))
    monkeypatch.delenv("YOI_FAULT", raising=False)
    monkeypatch.delenv("YOI_POD", raising=False)
    monkeypatch.delenv("YOI_LOCK_TIMEOUT", raising=False)
    return home


@pytest.fixture
def state(yoi_home):
    from yoi.state import State
    return State.resolve(yoi_home)


class Result:
    """What a command did; the repr shows it all when an assertion fails."""

    def __init__(self, code, stdout, stderr, args, prog="yoi"):
        self.exit_code, self.stdout, self.stderr, self.args = code, stdout, stderr, args
        self.prog = prog

    def __repr__(self):
        return (f"<{self.prog} {' '.join(map(str, self.args))} -> exit {self.exit_code}\n"
                f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}>")

    @property
    def json(self):
        import json
        return json.loads(self.stdout)


@pytest.fixture
def cli():
    """Invoke the CLI in-process with CliRunner; stdout and stderr kept apart."""
    from yoi.cli import main

    def invoke(*args, input=None, env=None):
        runner = CliRunner()
        r = runner.invoke(main, [str(a) for a in args], input=input, env=env,
                          catch_exceptions=False)
        return Result(r.exit_code, r.stdout, r.stderr, args)

    return invoke


def yoi_cmd() -> list[str]:
    return [sys.executable, "-m", "yoi"]


@pytest.fixture
def run_yoi(yoi_home):
    """Run the real `yoi` in a subprocess (YOI_HOME inherited), with a timeout."""

    def run(*args, input=None, env=None, timeout=60, cwd=None):
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        p = subprocess.run(yoi_cmd() + [str(a) for a in args], input=input,
                           capture_output=True, text=True, env=full_env, timeout=timeout,
                           cwd=cwd)
        return Result(p.returncode, p.stdout, p.stderr, args)

    return run


# -- live Pods ------------------------------------------------------------------
#
# ``started_pod(name, exec=None, create=True, args=(), env=None)`` runs the real
# ``yoi pod start NAME [*args] [--exec EXEC]`` in a subprocess (a detached Pod
# process, YOI_HOME = this test's state directory, ENV added to its
# environment, e.g. {"YOI_FAULT": ...}), creating the Pod first unless it
# exists or CREATE is false, and returns a ``LivePod`` with ``name``,
# ``socket_path`` (str), ``pid`` and ``state``. Every Pod the test started --
# and any other Pod of this state directory that is still running at teardown,
# e.g. one started through ``restore`` -- is stopped at teardown, with
# ``--force``, and if even that fails its runtime-lock holder is SIGKILLed.
#
#     def test_x(started_pod):
#         pod = started_pod("a", exec="cat")
#         yoi.client.notify(pod.socket_path, "hi", "id-1")
#
# ``pod_process`` is the same fixture under another name.
# A session-wide check (``no_pod_left_behind``) kills and reports any process
# still running with this session's temporary directory in its command line or
# YOI_HOME once all tests are done.

from dataclasses import dataclass  # noqa: E402


@dataclass
class LivePod:
    name: str
    socket_path: str
    pid: int
    state: object


def _stop_all_pods(state) -> list[str]:
    """Stop every running Pod of STATE; return a description of each forced kill."""
    import signal
    from yoi import control
    problems = []
    for name in state.pod_names():
        lock = state.runtime_lock_path(name)
        if not control.is_running(state, name):
            continue
        try:
            control.stop(state, name, timeout=5.0, force=True)
        except Exception as e:  # noqa: BLE001 - teardown must go on
            problems.append(f"{name}: stop --force failed: {e}")
        pid = control.holder_pid(lock)
        if pid is not None and control.is_running(state, name):
            os.kill(pid, signal.SIGKILL)
            problems.append(f"{name}: SIGKILLed pid {pid}")
    return problems


@pytest.fixture
def started_pod(state, run_yoi):
    started: list[str] = []

    def start(name: str, exec: str | None = None, create: bool = True, args=(), env=None):
        from yoi import control
        if create and not state.metadata_path(name).exists():
            r = run_yoi("pod", "create", name)
            assert r.exit_code == 0, r
        argv = ["pod", "start", name, *args]
        if exec is not None:
            argv += ["--exec", exec]
        r = run_yoi(*argv, env=env)
        started.append(name)
        assert r.exit_code == 0, r
        path = r.stdout.strip()
        pid = control.holder_pid(state.runtime_lock_path(name))
        assert pid is not None, r
        return LivePod(name, path, pid, state)

    try:
        yield start
    finally:
        problems = _stop_all_pods(state) if state.root.exists() else []
        assert not problems, problems


pod_process = started_pod


def _stray_processes(marker: str) -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline or f"YOI_HOME={marker}".encode() in environ:
            found.append(int(entry))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_pod_left_behind(tmp_path_factory):
    """After the whole session: no process may still run from this session's temp dir."""
    import signal
    import time
    base = str(tmp_path_factory.getbasetemp()) + os.sep
    yield
    strays = _stray_processes(base)
    deadline = time.monotonic() + 3
    while strays and time.monotonic() < deadline:  # a Pod may be finishing its exit
        time.sleep(0.1)
        strays = _stray_processes(base)
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not strays, f"processes left behind by the test suite (killed now): {strays}"
