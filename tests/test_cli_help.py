"""The command tree: help everywhere, --json on every reporting command, lazy
imports, shell completion, --version, `python -m yoi`, and the README."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from clitree import walk
from yoi import __version__
from yoi.cli import main

ROOT = Path(__file__).resolve().parent.parent
NOT_REPORTING: set[str] = set()  # leaf commands exempt from --json (none so far)


COMMANDS = list(walk(main))
IDS = [" ".join(p) for p, _ in COMMANDS]


def test_the_tree_has_the_pod_commands():
    assert {"yoi", "yoi pod", "yoi pod create", "yoi pod config", "yoi pod list",
            "yoi pod show", "yoi pod rm"} <= set(IDS)


@pytest.mark.parametrize("path, command", COMMANDS, ids=IDS)
def test_every_command_has_help_with_an_example_block(cli, path, command):
    help_text = inspect.cleandoc(command.help or "")
    assert help_text, f"{' '.join(path)} has no help"
    assert "\n\b\nExamples:\n" in help_text, f"{' '.join(path)} has no example block"
    for flag in ("-h", "--help"):
        r = cli(*path[1:], flag)
        assert r.exit_code == 0, r
        assert r.stdout.startswith(f"Usage: {' '.join(path)} ")
        examples = r.stdout.split("Examples:\n", 1)[1].split("\n\n")[0].splitlines()
        assert examples and all(line.startswith("    yoi ") for line in examples), r


@pytest.mark.parametrize("path, command", [c for c in COMMANDS
                                           if not isinstance(c[1], click.Group)],
                         ids=[i for i, c in zip(IDS, COMMANDS) if not isinstance(c[1], click.Group)])
def test_every_reporting_command_takes_json(path, command):
    if " ".join(path) in NOT_REPORTING:
        pytest.skip("not a reporting command")
    options = {opt for p in command.params for opt in getattr(p, "opts", [])}
    assert "--json" in options, f"{' '.join(path)} has no --json"


def test_version(run_yoi):
    r = run_yoi("--version")
    assert (r.exit_code, r.stdout, r.stderr) == (0, f"yoi, version {__version__}\n", "")
    assert run_yoi("-V").stdout == r.stdout


def test_python_dash_m_yoi_runs_commands(run_yoi, yoi_home):
    r = run_yoi("pod", "create", "a", "--json")
    assert r.exit_code == 0, r
    assert r.json["created"] is True
    assert (yoi_home / "pods" / "a" / "metadata.toml").is_file()


# -- shell completion --------------------------------------------------------------

def complete(words: str, cword: int) -> list[str]:
    env = {**os.environ, "_YOI_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(cword)}
    p = subprocess.run([sys.executable, "-m", "yoi"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_shell_completion_of_commands_and_pod_names(state):
    from yoi import store
    for n in ("reviewer", "coder", "rover"):
        store.create(state, n)
    from yoi.cli import main
    from yoi.cli.pod import pod
    import click
    ctx = click.Context(main)
    assert complete("yoi ", 1) == [f"plain,{c}" for c in main.list_commands(ctx)]
    pod_commands = complete("yoi pod ", 2)
    assert pod_commands == [f"plain,{c}" for c in pod.list_commands(ctx)]
    assert {"plain,create", "plain,config", "plain,list", "plain,rm",
            "plain,show"} <= set(pod_commands)
    assert complete("yoi pod show r", 3) == ["plain,reviewer", "plain,rover"]
    assert complete("yoi pod rm ", 3) == ["plain,coder", "plain,reviewer", "plain,rover"]


def test_shell_completion_script(run_yoi):
    r = run_yoi(env={"_YOI_COMPLETE": "bash_source"})
    assert r.exit_code == 0, r
    assert "_yoi_completion()" in r.stdout and "_YOI_COMPLETE=bash_complete" in r.stdout


# -- lazy imports ----------------------------------------------------------------------

RECORD_MODULES = """
import atexit, runpy, sys
def record():
    with open({out!r}, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
atexit.register(record)
{body}
"""


def imported(tmp_path, body: str, exit_code: int = 0) -> set[str]:
    """Modules in sys.modules when a fresh interpreter that ran BODY exits (with
    EXIT_CODE; `yoi` runs the exit handlers, then ends without teardown)."""
    out = tmp_path / "modules.txt"
    p = subprocess.run([sys.executable, "-c", RECORD_MODULES.format(out=str(out), body=body)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == exit_code, p.stderr
    return set(out.read_text().split())


def run_yoi_with(*argv: str) -> str:
    return f"sys.argv = ['yoi', *{list(argv)!r}]\nrunpy.run_module('yoi', run_name='__main__')"


@pytest.fixture
def click_itself(tmp_path) -> set[str]:
    return imported(tmp_path, "import click")


def test_version_imports_nothing_it_does_not_use(click_itself, tmp_path):
    mods = imported(tmp_path, run_yoi_with("--version"))
    assert "yoi.cli" in mods
    # Whatever Click itself needs (it imports threading for its context stack) is paid
    # anyway; beyond it, --version must not load storage, sockets or the runtime.
    ours = mods - click_itself
    forbidden = {"threading", "socket", "selectors", "tomli_w", "tomllib", "fcntl", "json",
                 "yoi.cli.pod", "yoi.store", "yoi.txn", "yoi.metadata", "yoi.state",
                 "yoi.peers", "yoi.discovery", "yoi.protocol"}
    assert ours & forbidden == set()
    assert not [m for m in mods if m.startswith(("yoi.runtime", "yoi.server", "yoi.client"))]


# What the two commands CI runs most import, pinned: a new import on these paths
# must be a decision (measure it with `python -X importtime`), not an accident.
VERSION_MODULES = {"yoi", "yoi.cli", "yoi.cli.common", "yoi.errors", "yoi.timeouts"}
# A send to a live Pod of ours reads no record (see yoi.delivery): no TOML, no
# transaction or lock modules.
SEND_MODULES = VERSION_MODULES | {
    "yoi.cli.pod", "yoi.cli.send", "yoi.delivery", "yoi.client", "yoi.protocol",
    "yoi.state", "yoi.names", "yoi.parsing"}


def test_version_and_send_import_exactly_the_pinned_modules(click_itself, state, started_pod,
                                                           tmp_path):
    from yoi import store
    store.create(state, "B")
    mods = imported(tmp_path, run_yoi_with("--version"))
    assert {m for m in mods if m.split(".")[0] == "yoi"} == VERSION_MODULES
    started_pod("B", create=False)
    mods = imported(tmp_path, f"import os\nos.environ['YOI_HOME'] = {str(state.root)!r}\n"
                    + run_yoi_with("pod", "send", "B", "hi"))
    assert {m for m in mods if m.split(".")[0] == "yoi"} == SEND_MODULES
    # and from the standard library only what a one-shot exchange needs
    assert (mods - click_itself) & {"threading", "socket", "selectors", "select",
                                    "subprocess", "tomli_w", "tomllib", "fcntl", "shutil",
                                    "dataclasses", "tempfile"} == set()


def test_pod_list_does_not_import_the_runtime_or_writers(click_itself, state, tmp_path):
    from yoi import store
    store.create(state, "a")
    mods = imported(tmp_path, run_yoi_with("pod", "list"))
    assert {"yoi.cli.pod", "yoi.store", "yoi.discovery"} <= mods
    assert not [m for m in mods if m.startswith(("yoi.runtime", "yoi.server"))]
    assert "tomli_w" not in mods  # listing never writes
    # Nor what only writers or repairs need (each costs milliseconds on every run).
    assert (mods - click_itself) & {"shutil", "dataclasses", "tempfile", "hashlib"} == set()
    assert "threading" not in mods - click_itself  # one Pod, no socket: no probe threads


def test_yoi_ends_without_teardown_after_flushing_and_running_exit_handlers(state, tmp_path):
    """From the command line, `yoi` ends the process as soon as the command is done:
    every byte of its output is written and exit handlers run, objects are not torn
    down one by one; the exit status is the command's."""
    from yoi import store
    for i in range(400):  # a --json document far over a pipe's 64 KiB
        store.create(state, f"pod-{i:03d}", labels={"filler": "x" * 100})
    body = ("import atexit, os, sys\n"
            "class Torn:\n"
            "    def __del__(self, open=open):\n"
            f"        open({str(tmp_path / 'torn')!r}, 'w').close()\n"
            "kept = Torn()\n"
            f"atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').close())\n"
            f"os.environ['YOI_HOME'] = {str(state.root)!r}\n"
            "sys.argv = ['yoi', *sys.argv[1:]]\n"
            "from yoi.cli import main\n"
            "main()\n")
    for args, code in ((["pod", "list", "--json"], 0), (["pod", "send", "nosuch", "hi"], 3)):
        for f in ("torn", "atexit"):
            (tmp_path / f).unlink(missing_ok=True)
        p = subprocess.run([sys.executable, "-c", body, *args], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == code, p.stderr
        assert (tmp_path / "atexit").exists() and not (tmp_path / "torn").exists()
        if code == 0:
            assert len(json.loads(p.stdout)["pods"]) == 400
        else:
            assert p.stderr == "yoi: error: no such Pod: nosuch\n"


# -- README ----------------------------------------------------------------------------

def test_readme_shows_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"^\.venv/bin/python -m (pip install .*-e '\.\[test\]')$", ci, re.M)
    assert install, "CI no longer installs with pip install -e '.[test]'"
    assert install.group(1).replace("--quiet ", "") in readme
    assert "python3 -m venv .venv" in ci and "python3 -m venv .venv" in readme
    assert re.search(r"^\.venv/bin/python -m pytest\b", ci, re.M)
    assert ".venv/bin/python -m pytest" in readme


def test_completion_of_from_as_and_check_codes(state, tmp_path):
    from yoi import store
    from yoi.doctor import CHECKS
    for n in ("reviewer", "coder", "rover"):
        store.create(state, n)
    assert complete("yoi pod send --from r", 4) == ["plain,reviewer", "plain,rover"]
    assert complete("yoi pod send --from reviewer c", 5) == ["plain,coder"]
    assert complete("yoi pod list --as c", 4) == ["plain,coder"]
    assert complete("yoi doctor --check peer-", 3) == [
        f"plain,{c}" for c in CHECKS if c.startswith("peer-")]
    other = state_dir_with(tmp_path / "other", "remote")
    assert complete(f"yoi --state-dir {other} pod show r", 5) == ["plain,remote"]


def state_dir_with(root, *names):
    from yoi import store
    from yoi.state import State
    state = State.resolve(root)
    for n in names:
        store.create(state, n)
    return root


@pytest.mark.parametrize("path, command", [c for c in COMMANDS if isinstance(c[1], click.Group)],
                         ids=[i for i, c in zip(IDS, COMMANDS) if isinstance(c[1], click.Group)])
def test_command_summaries_are_not_cut_off(cli, path, command):
    r = cli(*path[1:], "--help")
    listing = r.stdout.split("Commands:\n", 1)[1]
    assert "..." not in listing, listing


def test_root_options_apply_to_the_command_and_the_command_wins(run_yoi, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_yoi("--state-dir", a, "pod", "create", "x").exit_code == 0
    assert (a / "pods" / "x").is_dir()
    r = run_yoi("--state-dir", a, "pod", "list", "--json")
    assert [p["pod_name"] for p in r.json["pods"]] == ["x"], r
    r = run_yoi("--state-dir", a, "pod", "list", "--state-dir", b)
    assert (r.exit_code, r.stdout, r.stderr) == (0, "", f"yoi: note: no state directory at {b}\n")
    r = run_yoi("--lock-timeout", "soon", "pod", "list")
    assert r.exit_code == 2, r
