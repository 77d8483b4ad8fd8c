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

    def run(*args, input=None, env=None, timeout=60):
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        p = subprocess.run(yoi_cmd() + [str(a) for a in args], input=input,
                           capture_output=True, text=True, env=full_env, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr, args)

    return run
